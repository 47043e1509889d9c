//! `log_skip.always`: names whose allowed lookups are not logged (busy, uninteresting names such
//! as a package mirror). One pattern per line, `#` comments and blank lines skipped; `host.test`
//! is that name only, `*.host.test` every name under it (not the name itself); case does not
//! matter. Addresses and CIDRs are refused, as by the reference. The file sits beside the
//! always-rule files and is polled like them; a bad line is reported and skipped, the rest apply.

use std::collections::HashSet;
use std::path::Path;

pub const FILE: &str = "log_skip.always";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogSkip {
    exact: HashSet<String>,
    /// `.host.test` for `*.host.test`.
    suffixes: Vec<String>,
}

impl LogSkip {
    /// The patterns of a file's text, and the lines refused (`<path> line N: …`).
    pub fn parse(path: &Path, text: &str) -> (LogSkip, Vec<String>) {
        let mut skip = LogSkip::default();
        let mut errors = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let pattern = line.trim_end_matches('.').to_ascii_lowercase();
            let refuse =
                |why: &str| format!("{} line {}: {line:?} {why}", path.display(), index + 1);
            if pattern.parse::<sandbox_api::net::Cidr>().is_ok() {
                errors.push(refuse(
                    "is not a domain pattern; only host/domain entries are supported",
                ));
                continue;
            }
            let (suffix, name) = match pattern.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, pattern.as_str()),
            };
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                errors.push(refuse("is not a domain name or *.domain pattern"));
                continue;
            }
            if suffix {
                skip.suffixes.push(format!(".{name}"));
            } else {
                skip.exact.insert(name.to_owned());
            }
        }
        (skip, errors)
    }

    /// Whether `name` (lower case, no trailing dot) is not to be logged.
    pub fn skips(&self, name: &str) -> bool {
        self.exact.contains(name) || self.suffixes.iter().any(|s| name.ends_with(s.as_str()))
    }

    /// Patterns held.
    pub fn len(&self) -> usize {
        self.exact.len() + self.suffixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Polls the file by size and modification time.
pub struct Watcher {
    path: std::path::PathBuf,
    stamp: Option<(u64, std::time::SystemTime)>,
}

impl Watcher {
    pub fn new(dir: &Path) -> Watcher {
        Watcher {
            path: dir.join(FILE),
            stamp: None,
        }
    }

    /// The patterns and refused lines when the file changed since the last poll (a missing
    /// file holds none); `None` when it did not.
    pub fn poll(&mut self) -> Option<(LogSkip, Vec<String>)> {
        let meta = std::fs::metadata(&self.path).ok();
        let stamp = meta.and_then(|m| Some((m.len(), m.modified().ok()?)));
        if stamp == self.stamp && self.stamp.is_some() {
            return None;
        }
        let first = self.stamp.is_none();
        self.stamp = stamp;
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Some(LogSkip::parse(&self.path, &text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (!first).then(|| (LogSkip::default(), Vec::new()))
            }
            Err(e) => Some((
                LogSkip::default(),
                vec![format!("cannot read {}: {e}", self.path.display())],
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_patterns() {
        let (skip, errors) = LogSkip::parse(
            Path::new("log_skip.always"),
            "# mirrors\n\nPyPI.org.\n*.Mirror.test\n10.0.0.0/8\n1.2.3.4\nbad name\n*.\n",
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("line 5") && errors[0].contains("not a domain pattern"));
        assert!(skip.skips("pypi.org"));
        assert!(!skip.skips("files.pypi.org"));
        assert!(skip.skips("a.mirror.test") && skip.skips("a.b.mirror.test"));
        assert!(
            !skip.skips("mirror.test"),
            "the bare domain is not under *."
        );
        assert!(!skip.skips("xmirror.test"));
    }
}
