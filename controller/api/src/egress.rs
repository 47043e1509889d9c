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

/// Name of the Secret holding a BatchSandbox's egress token.
pub fn secret_name(batch_sandbox: &str) -> String {
    format!("{batch_sandbox}-egress-token")
}
