//! Leaving root: with `OPENSANDBOX_EGRESS_RUN_AS=<uid>:<gid>` the sidecar, started as root
//! (Kubernetes grants an added capability to a non-root process only through file capabilities,
//! which need privilege escalation allowed), becomes that uid and gid before it starts any
//! thread, keeping `NET_ADMIN` alone: in its effective and permitted sets, and as an ambient
//! capability so the `nft` it runs keeps it too. The switch itself needs `SETUID` and `SETGID`,
//! which are then gone from every set the process can use.
//!
//! It happens first, before the configuration is read: a restarted sidecar (root without
//! DAC_OVERRIDE) could not read the policy file it wrote as its own user.
//!
//! Any failure stops the sidecar: it never runs as root when asked not to.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error("OPENSANDBOX_EGRESS_RUN_AS {0:?} is not <uid>:<gid> with two non-zero numbers")]
    Invalid(String),
    #[error(
        "cannot become {uid}:{gid}: {step} failed: {reason} (the sidecar needs SETUID and SETGID to switch, besides NET_ADMIN)"
    )]
    Switch {
        uid: u32,
        gid: u32,
        step: &'static str,
        reason: String,
    },
}

/// `OPENSANDBOX_EGRESS_RUN_AS` from the environment: `None` when unset or empty.
pub fn run_as_from_env() -> Result<Option<(u32, u32)>, PrivilegeError> {
    std::env::var(sandbox_api::egress::env::RUN_AS)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| parse_run_as(&v))
        .transpose()
}

/// Parses `<uid>:<gid>`; root (0) is refused, since leaving root is the point.
pub fn parse_run_as(text: &str) -> Result<(u32, u32), PrivilegeError> {
    let invalid = || PrivilegeError::Invalid(text.to_owned());
    let (uid, gid) = text.trim().split_once(':').ok_or_else(invalid)?;
    let uid: u32 = uid.parse().map_err(|_| invalid())?;
    let gid: u32 = gid.parse().map_err(|_| invalid())?;
    if uid == 0 || gid == 0 {
        return Err(invalid());
    }
    Ok((uid, gid))
}

/// Becomes `uid:gid` keeping only `NET_ADMIN`. Call before any other thread exists: the
/// capability sets are per thread.
pub fn become_user(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    let fail = |step: &'static str| {
        move |e: &dyn std::fmt::Display| PrivilegeError::Switch {
            uid,
            gid,
            step,
            reason: e.to_string(),
        }
    };
    let keep: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
    nix::sys::prctl::set_keepcaps(true).map_err(|e| fail("keeping capabilities")(&e))?;
    setgroups(&[]).map_err(|e| fail("dropping supplementary groups")(&e))?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(|e| fail("setresgid")(&e))?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(|e| fail("setresuid")(&e))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| fail("clearing keep-caps")(&e))?;
    // Permitted first (it bounds the others), then effective, inheritable and ambient.
    for (set, step) in [
        (CapSet::Permitted, "limiting the permitted set"),
        (CapSet::Effective, "setting the effective set"),
        (CapSet::Inheritable, "setting the inheritable set"),
    ] {
        caps::set(None, set, &keep).map_err(|e| fail(step)(&e))?;
    }
    caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN)
        .map_err(|e| fail("raising ambient NET_ADMIN")(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_forms() {
        assert_eq!(parse_run_as("65533:65533"), Ok((65533, 65533)));
        assert_eq!(parse_run_as(" 1000:2000 "), Ok((1000, 2000)));
        for bad in [
            "",
            "65533",
            "0:0",
            "0:5",
            "5:0",
            "a:b",
            "-1:5",
            "1:2:3",
            "99999999999:1",
        ] {
            assert!(
                matches!(parse_run_as(bad), Err(PrivilegeError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
