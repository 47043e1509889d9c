//! The always-rule files `deny.always` and `allow.always`: one target per line, blank lines and
//! `#` comments skipped, each line validated like a policy target. They are polled (size and
//! modification time) so a change takes effect within a second; a broken file keeps the rules
//! last read from it and says why.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sandbox_api::policy;

pub const DENY_FILE: &str = "deny.always";
pub const ALLOW_FILE: &str = "allow.always";

/// The targets of both files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlwaysRules {
    pub deny: Vec<String>,
    pub allow: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AlwaysError {
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

impl AlwaysError {
    /// Whether the error is about `deny.always`.
    pub fn is_deny_file(&self) -> bool {
        let path = match self {
            AlwaysError::Line { path, .. } | AlwaysError::Read { path, .. } => path,
        };
        Path::new(path).file_name() == Some(std::ffi::OsStr::new(DENY_FILE))
    }
}

/// Parses one file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<String>, AlwaysError> {
    let mut targets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        policy::validate_target(line).map_err(|reason| AlwaysError::Line {
            path: path.display().to_string(),
            line: index + 1,
            reason: reason.to_owned(),
        })?;
        targets.push(line.to_owned());
    }
    Ok(targets)
}

/// What identifies a file's version without reading it.
type Stamp = Option<(u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Reads one file; a missing file holds no rules.
fn read(path: &Path) -> Result<Vec<String>, AlwaysError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(AlwaysError::Read {
            path: path.display().to_string(),
            error,
        }),
    }
}

/// Watches the two files of one directory.
pub struct Watcher {
    deny: PathBuf,
    allow: PathBuf,
    stamps: [Stamp; 2],
    current: AlwaysRules,
    /// The last error reported per file, so a broken file is reported once, not every poll.
    reported: [Option<String>; 2],
    /// The last change was not applied: report the rules again even if unchanged.
    unapplied: bool,
}

impl Watcher {
    /// Reads both files now. Errors are returned alongside the rules that could be read.
    pub fn new(dir: &Path) -> (Watcher, Vec<AlwaysError>) {
        let mut watcher = Watcher {
            deny: dir.join(DENY_FILE),
            allow: dir.join(ALLOW_FILE),
            stamps: [None, None],
            current: AlwaysRules::default(),
            reported: [None, None],
            unapplied: false,
        };
        let errors = watcher.poll_inner(true).1;
        (watcher, errors)
    }

    pub fn current(&self) -> &AlwaysRules {
        &self.current
    }

    /// Forgets what was read, so the next poll reads both files again and reports them as a
    /// change (used when applying the last change failed).
    pub fn retry(&mut self) {
        self.stamps = [None, None];
        self.unapplied = true;
    }

    /// Re-reads files whose size or modification time changed. Returns the new rules when
    /// they differ from the current ones, and the errors not reported before.
    pub fn poll(&mut self) -> (Option<AlwaysRules>, Vec<AlwaysError>) {
        self.poll_inner(false)
    }

    fn poll_inner(&mut self, force: bool) -> (Option<AlwaysRules>, Vec<AlwaysError>) {
        let mut next = self.current.clone();
        let mut errors = Vec::new();
        for (slot, path) in [self.deny.clone(), self.allow.clone()].iter().enumerate() {
            let now = stamp(path);
            if !force && now == self.stamps[slot] {
                continue;
            }
            self.stamps[slot] = now;
            match read(path) {
                Ok(targets) => {
                    self.reported[slot] = None;
                    if slot == 0 {
                        next.deny = targets;
                    } else {
                        next.allow = targets;
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.reported[slot].as_ref() != Some(&text) {
                        self.reported[slot] = Some(text);
                        errors.push(e);
                    }
                }
            }
        }
        if next == self.current && !self.unapplied {
            return (None, errors);
        }
        self.unapplied = false;
        self.current = next.clone();
        (Some(next), errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comments_blank_lines_and_rejects_bad_lines() {
        let p = Path::new("deny.always");
        assert_eq!(
            parse(p, "# comment\n\n  evil.test  \n10.0.0.0/8\n*.bad.test.\n").unwrap(),
            vec!["evil.test", "10.0.0.0/8", "*.bad.test."]
        );
        let e = parse(p, "ok.test\nbad name!\n").unwrap_err().to_string();
        assert!(e.contains("deny.always line 2"), "{e}");
    }

    #[test]
    fn watcher_sees_changes_and_keeps_rules_of_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("egress-always-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut w, errors) = Watcher::new(&dir);
        assert!(errors.is_empty());
        assert_eq!(w.current(), &AlwaysRules::default());
        std::fs::write(dir.join(DENY_FILE), "blocked.test\n").unwrap();
        let (changed, _) = w.poll();
        assert_eq!(changed.unwrap().deny, vec!["blocked.test"]);
        assert!(w.poll().0.is_none(), "no change, no update");
        std::fs::write(dir.join(DENY_FILE), "blocked.test\nnot valid!!\n").unwrap();
        let (changed, errors) = w.poll();
        assert!(changed.is_none());
        assert_eq!(errors.len(), 1);
        assert_eq!(
            w.current().deny,
            vec!["blocked.test"],
            "last good rules kept"
        );
        w.retry();
        assert_eq!(
            w.poll().0.unwrap().deny,
            vec!["blocked.test"],
            "a change that failed to apply is reported again"
        );
        std::fs::remove_file(dir.join(DENY_FILE)).unwrap();
        let (changed, _) = w.poll();
        assert!(
            changed.unwrap().deny.is_empty(),
            "a removed file clears its rules"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
