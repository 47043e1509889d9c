//! The egress sidecar's contract: what the controller injects and the sidecar reads. Both sides
//! take these names from here, so a pod built by the controller is always one the sidecar
//! understands.

/// Environment variables the sidecar reads (the reference sidecar's names).
pub mod env {
    pub const RULES: &str = "OPENSANDBOX_EGRESS_RULES";
    pub const POLICY_FILE: &str = "OPENSANDBOX_EGRESS_POLICY_FILE";
    pub const MODE: &str = "OPENSANDBOX_EGRESS_MODE";
    pub const TOKEN: &str = "OPENSANDBOX_EGRESS_TOKEN";
    pub const DNS_UPSTREAM: &str = "OPENSANDBOX_EGRESS_DNS_UPSTREAM";
    pub const DNS_UPSTREAM_TIMEOUT: &str = "OPENSANDBOX_EGRESS_DNS_UPSTREAM_TIMEOUT";
    pub const MAX_RULES: &str = "OPENSANDBOX_EGRESS_MAX_RULES";
    pub const HTTP_ADDR: &str = "OPENSANDBOX_EGRESS_HTTP_ADDR";
    pub const RULES_DIR: &str = "OPENSANDBOX_EGRESS_RULES_DIR";
    pub const LOG_LEVEL: &str = "OPENSANDBOX_EGRESS_LOG_LEVEL";
    pub const BLOCK_DOH_443: &str = "OPENSANDBOX_EGRESS_BLOCK_DOH_443";
    pub const DOH_BLOCKLIST: &str = "OPENSANDBOX_EGRESS_DOH_BLOCKLIST";
    pub const NAMESERVER_EXEMPT: &str = "OPENSANDBOX_EGRESS_NAMESERVER_EXEMPT";
    /// Extra ranges (comma-separated CIDRs) whose addresses are stripped from DNS answers.
    pub const PRIVATE_CIDRS: &str = "OPENSANDBOX_EGRESS_PRIVATE_CIDRS";
    /// `true` lets answers pointing into private ranges through (the reference behaviour).
    pub const ALLOW_PRIVATE_ANSWERS: &str = "OPENSANDBOX_EGRESS_ALLOW_PRIVATE_ANSWERS";
    /// Where the DNS proxy listens; not an operator setting in the reference, kept for tests.
    pub const DNS_LISTEN: &str = "OPENSANDBOX_EGRESS_DNS_LISTEN";
    /// `<uid>:<gid>` the sidecar becomes after start-up, keeping only `NET_ADMIN`.
    pub const RUN_AS: &str = "OPENSANDBOX_EGRESS_RUN_AS";
    /// The question the upstream probe asks: empty or `.` is `. NS`, anything else `<name> A`.
    pub const DNS_UPSTREAM_PROBE: &str = "OPENSANDBOX_EGRESS_DNS_UPSTREAM_PROBE";
    /// Seconds between probe rounds (1..3600, default 30).
    pub const DNS_UPSTREAM_PROBE_INTERVAL_SEC: &str =
        "OPENSANDBOX_EGRESS_DNS_UPSTREAM_PROBE_INTERVAL_SEC";
    /// `http://` URL posted once per denied DNS query.
    pub const DENY_WEBHOOK: &str = "OPENSANDBOX_EGRESS_DENY_WEBHOOK";
    /// The sandbox's id, in every log line, metric and webhook payload.
    pub const SANDBOX_ID: &str = "OPENSANDBOX_EGRESS_SANDBOX_ID";
    /// `k=v,k2=v2`: more fields of every log line and labels of every metric.
    pub const METRICS_EXTRA_ATTRS: &str = "OPENSANDBOX_EGRESS_METRICS_EXTRA_ATTRS";
}

/// Enforcement modes (`OPENSANDBOX_EGRESS_MODE`).
pub const MODE_DNS: &str = "dns";
pub const MODE_DNS_NFT: &str = "dns+nft";

/// Header carrying the policy API's token.
pub const HEADER_AUTH: &str = "OPENSANDBOX-EGRESS-AUTH";
/// Port of the policy API (and of `/healthz`).
pub const API_PORT: u16 = 18080;
/// Health path: answers 200 only once the first nftables apply is in place; needs no token.
pub const HEALTH_PATH: &str = "/healthz";

/// Name of the injected sidecar container; reserved in sandbox templates.
pub const CONTAINER: &str = "egress";
/// Volume holding policy changes made through the API; reserved in sandbox templates.
pub const STATE_VOLUME: &str = "egress-state";
/// Where that volume is mounted in the sidecar; no sandbox container may mount this path.
pub const STATE_DIR: &str = "/var/egress/state";
/// The policy file inside [`STATE_DIR`].
pub const STATE_POLICY_FILE: &str = "/var/egress/state/policy.json";
/// Default directory of `deny.always` and `allow.always`.
pub const DEFAULT_RULES_DIR: &str = "/var/egress/rules";
/// Key of the token in the per-sandbox Secret.
pub const SECRET_TOKEN_KEY: &str = "token";

/// Mark on the sidecar's own upstream sockets. The mark alone proves nothing (any process with
/// CAP_NET_RAW can set it); the rules also require the socket to belong to the sidecar's cgroup.
pub const SOCKET_MARK: u32 = 0x1;

/// The uid and gid the injected sidecar runs as once started: its own, used by nothing else
/// in the pod.
pub const SIDECAR_UID: u32 = 65533;

/// Longest Kubernetes object name (a DNS-1123 subdomain).
const MAX_OBJECT_NAME: usize = 253;
const SECRET_SUFFIX: &str = "-egress-token";
/// Hex digits of the name's hash kept when a long name is shortened.
const SECRET_HASH_DIGITS: usize = 10;

/// Name of the Secret holding a BatchSandbox's egress token: `<name>-egress-token`, or, when that
/// would exceed 253 characters, a prefix of the name, a hash of the whole name and the suffix
/// (so two long names never share a Secret). A valid BatchSandbox name gives a valid Secret name.
pub fn secret_name(batch_sandbox: &str) -> String {
    if batch_sandbox.len() + SECRET_SUFFIX.len() <= MAX_OBJECT_NAME {
        return format!("{batch_sandbox}{SECRET_SUFFIX}");
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(batch_sandbox.as_bytes());
    let hash: String = digest
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(SECRET_HASH_DIGITS)
        .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('0'))
        .collect();
    let mut keep = MAX_OBJECT_NAME - SECRET_SUFFIX.len() - 1 - SECRET_HASH_DIGITS;
    while !batch_sandbox.is_char_boundary(keep) {
        keep -= 1;
    }
    // A label may not end in '-' or '.', and the hash starts a new part of this one.
    let prefix = batch_sandbox[..keep].trim_end_matches(['-', '.']);
    if prefix.is_empty() {
        format!("{hash}{SECRET_SUFFIX}")
    } else {
        format!("{prefix}-{hash}{SECRET_SUFFIX}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Kubernetes' IsDNS1123Subdomain.
    fn is_subdomain(name: &str) -> bool {
        let label = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        name.len() <= MAX_OBJECT_NAME && name.split('.').all(label)
    }

    #[test]
    fn short_names_keep_the_reference_form() {
        assert_eq!(secret_name("bs"), "bs-egress-token");
        let longest_plain = "a".repeat(MAX_OBJECT_NAME - SECRET_SUFFIX.len());
        assert_eq!(
            secret_name(&longest_plain),
            format!("{longest_plain}-egress-token")
        );
    }

    #[test]
    fn long_names_are_shortened_distinctly() {
        let a = format!("{}a", "x".repeat(252));
        let b = format!("{}b", "x".repeat(252));
        let (sa, sb) = (secret_name(&a), secret_name(&b));
        assert_ne!(sa, sb);
        assert!(is_subdomain(&sa) && is_subdomain(&sb), "{sa}");
        assert!(sa.ends_with(SECRET_SUFFIX) && sa.starts_with("xxxx"));
        // A cut that lands after a '.' or '-' must not leave an empty or dashed label.
        let dotted = format!("{}.{}", "a".repeat(228), "b".repeat(24));
        assert!(
            is_subdomain(&secret_name(&dotted)),
            "{}",
            secret_name(&dotted)
        );
        let dashed = format!("{}{}", "a".repeat(200), "-".repeat(52)) + "z";
        assert!(
            is_subdomain(&secret_name(&dashed)),
            "{}",
            secret_name(&dashed)
        );
    }

    proptest! {
        #[test]
        fn any_valid_name_gives_a_valid_secret_name(
            name in "[a-z0-9]([-a-z0-9]{0,60}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,60}[a-z0-9])?){0,4}"
        ) {
            prop_assume!(is_subdomain(&name));
            let secret = secret_name(&name);
            prop_assert!(is_subdomain(&secret), "{} -> {}", name, secret);
        }
    }
}
