//! nftables enforcement: one `inet` table holding
//! - a nat chain that sends every port-53 query of the namespace to the DNS proxy (the proxy's
//!   own upstream sockets are let through: marked and in the sidecar's cgroup),
//! - in `dns+nft` mode, an output filter chain with default drop, static allow/deny interval sets
//!   built from the IP and CIDR rules, and dynamic allow sets filled from allowed DNS answers.
//!
//! `ruleset` writes the static part, `writer` is the one task that programs the kernel.

mod ruleset;
mod writer;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

pub use ruleset::{Fence, Partition, StaticSpec, partition, static_script};
pub use writer::Nft;

/// The table name the reference sidecar uses, so either one takes over the other's table.
pub const TABLE: &str = "opensandbox";
const MIN_TIMEOUT: u32 = 60;
const MAX_TIMEOUT: u32 = 360;

/// How long a learned address stays in a dynamic set: the record's TTL plus a minute, clamped
/// to 60..=360 seconds (the reference's bounds).
pub fn element_timeout(ttl: u32) -> u32 {
    ttl.saturating_add(60).clamp(MIN_TIMEOUT, MAX_TIMEOUT)
}

/// Errors from running `nft`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NftError {
    #[error(
        "cannot run nft ({0}); the egress sidecar needs the nft command (package nftables) in its image"
    )]
    Spawn(String),
    #[error(
        "nft refused the change: operation not permitted; the egress sidecar needs the NET_ADMIN capability (securityContext.capabilities.add: [\"NET_ADMIN\"])"
    )]
    Permission,
    #[error("nft refused the change: {0}")]
    Refused(String),
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the nftables writer has stopped")]
    Stopped,
}

/// Runs one `nft -f -` transaction.
pub async fn run(script: &str) -> Result<(), NftError> {
    const LIMIT: Duration = Duration::from_secs(30);
    let work = async {
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| NftError::Spawn(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| NftError::Spawn(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| NftError::Spawn(e.to_string()))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if err.contains("Operation not permitted") {
            Err(NftError::Permission)
        } else {
            Err(NftError::Refused(err))
        }
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .unwrap_or(Err(NftError::Timeout(LIMIT)))
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff in /proc/self/status).
pub fn has_net_admin() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    let caps = u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()?;
    Some(caps & (1 << 12) != 0)
}
