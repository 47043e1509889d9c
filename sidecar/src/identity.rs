//! How the firewall recognises the sidecar's own traffic. The socket mark alone proves nothing:
//! since Linux 5.17 any process holding `CAP_NET_RAW` may set `SO_MARK`. So the rules also
//! require the packet's socket to belong to the sidecar's cgroup (cgroup v2). A sandbox process
//! cannot put a socket there: it sees only its own container's cgroup (cgroup namespace), the
//! cgroup filesystem is read-only in its container, and moving a process into another
//! container's cgroup needs write access to that cgroup's `cgroup.procs`.
//!
//! nftables compares the ancestor of the socket's cgroup at an absolute depth, which a process
//! inside a cgroup namespace cannot learn; the rules therefore list every depth up to
//! [`MAX_LEVEL`]. Only the true depth can match, since a cgroup's id is unique.

use std::path::{Path, PathBuf};

/// Deepest cgroup level matched (Kubernetes places containers at depth 3 to 5; nested
/// runtimes add a few).
pub const MAX_LEVEL: u32 = 24;
/// nft resolves a cgroup path relative to this directory.
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The id (inode number) of a cgroup v2 hierarchy's root.
const ROOT_CGROUP_ID: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no cgroup v2 hierarchy is mounted in this container; the egress sidecar needs cgroup v2 \
         to tell its own DNS traffic from the sandbox's"
    )]
    NoCgroup2,
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("this process's cgroup v2 directory {0} is not under the cgroup v2 mount")]
    Outside(String),
    #[error(
        "the cgroup path {0:?} cannot be written into an nftables rule (quote or control character)"
    )]
    Unquotable(String),
    #[error(
        "the egress sidecar runs in the root cgroup, which every other process shares; run it in \
         a container (or cgroup) of its own"
    )]
    RootCgroup,
}

/// The sidecar's cgroup as nft names it: a path relative to `/sys/fs/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub nft_path: String,
    pub dir: PathBuf,
}

/// The cgroup v2 mount from `/proc/self/mountinfo`: (mount point, root of the mount within the
/// hierarchy).
fn cgroup2_mount(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        Some((unescape(point), unescape(root)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup v2 path from `/proc/self/cgroup` (the `0::` line).
fn own_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// Where the cgroup directory is, from the two files' contents.
pub fn locate(mountinfo: &str, proc_cgroup: &str) -> Result<PathBuf, IdentityError> {
    let (point, root) = cgroup2_mount(mountinfo).ok_or(IdentityError::NoCgroup2)?;
    let path = own_path(proc_cgroup).ok_or(IdentityError::NoCgroup2)?;
    // The mount may show a sub-tree of the hierarchy (its root field); the process's path is
    // relative to the hierarchy as this cgroup namespace sees it.
    let rel = if root == "/" {
        path.as_str()
    } else {
        path.strip_prefix(root.as_str())
            .filter(|r| r.is_empty() || r.starts_with('/'))
            .ok_or_else(|| IdentityError::Outside(path.clone()))?
    };
    Ok(Path::new(&point).join(rel.trim_start_matches('/')))
}

/// The path nft resolves against `/sys/fs/cgroup`, as it goes between the quotes of a rule.
pub fn nft_path(dir: &Path) -> Result<String, IdentityError> {
    let path = match dir.strip_prefix(NFT_CGROUP_ROOT) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        // nft joins "/sys/fs/cgroup/" and the path; climbing out reaches any absolute path.
        Err(_) => format!("../../..{}", dir.display()),
    };
    if path.contains(|c: char| c == '"' || c == '\\' || c.is_control()) {
        return Err(IdentityError::Unquotable(path));
    }
    Ok(path)
}

/// Finds this process's cgroup and checks it is one nobody else is in by default.
pub fn discover() -> Result<Cgroup, IdentityError> {
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| IdentityError::Read(p.into(), e));
    let dir = locate(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)?;
    let meta =
        std::fs::metadata(&dir).map_err(|e| IdentityError::Read(dir.display().to_string(), e))?;
    if std::os::unix::fs::MetadataExt::ino(&meta) == ROOT_CGROUP_ID {
        return Err(IdentityError::RootCgroup);
    }
    Ok(Cgroup {
        nft_path: nft_path(&dir)?,
        dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 1 0:22 / /sys rw,nosuid - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_cgroup_on_hybrid_and_unified_hosts() {
        let dir = locate(HYBRID, "4:memory:/x\n0::/fence/sidecar\n").unwrap();
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/unified/fence/sidecar"));
        assert_eq!(nft_path(&dir).unwrap(), "unified/fence/sidecar");
        // A container with its own cgroup namespace: its cgroup is the mount's root.
        let container = "40 30 0:30 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";
        let dir = locate(container, "0::/\n").unwrap();
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(nft_path(&dir).unwrap(), "");
        // A mount of a sub-tree (no cgroup namespace).
        let sub = "40 30 0:30 /kubepods/pod1/c1 /sys/fs/cgroup ro - cgroup2 cgroup rw\n";
        let dir = locate(sub, "0::/kubepods/pod1/c1\n").unwrap();
        assert_eq!(dir, PathBuf::from("/sys/fs/cgroup"));
        assert!(matches!(
            locate(sub, "0::/kubepods/pod2/c1\n"),
            Err(IdentityError::Outside(_))
        ));
        // Mounted elsewhere, with an escaped space.
        let odd = "40 30 0:30 / /run/my\\040cg rw - cgroup2 cgroup2 rw\n";
        let dir = locate(odd, "0::/a\n").unwrap();
        assert_eq!(dir, PathBuf::from("/run/my cg/a"));
        assert_eq!(nft_path(&dir).unwrap(), "../../../run/my cg/a");
        // A path that would end the rule's string early is refused, not written.
        for bad in [
            "/sys/fs/cgroup/a\"b",
            "/sys/fs/cgroup/a\nb",
            "/sys/fs/cgroup/a\\b",
        ] {
            assert!(
                matches!(nft_path(Path::new(bad)), Err(IdentityError::Unquotable(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn no_cgroup2_is_a_clear_error() {
        let v1 = "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert!(matches!(
            locate(v1, "4:memory:/x\n"),
            Err(IdentityError::NoCgroup2)
        ));
        assert!(matches!(
            locate(HYBRID, "4:memory:/x\n"),
            Err(IdentityError::NoCgroup2)
        ));
    }
}
