//! Settings from the environment, read exactly as the reference sidecar reads them, with the
//! differences the issue asks for: a broken policy never stops the sidecar (it starts deny-all
//! and says why), an unknown `defaultAction` is refused.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use sandbox_api::policy::{self, Action, Policy};

pub use sandbox_api::egress::env::*;
pub use sandbox_api::egress::{DEFAULT_RULES_DIR, SOCKET_MARK};

pub const DEFAULT_MAX_RULES: usize = 4096;

/// The reference's settings of its mitmproxy mode, not built here.
const MITM_SETTINGS: [&str; 5] = [
    "OPENSANDBOX_EGRESS_MITMPROXY_TRANSPARENT",
    "OPENSANDBOX_EGRESS_MITMPROXY_PORT",
    "OPENSANDBOX_EGRESS_MITMPROXY_SCRIPT",
    "OPENSANDBOX_EGRESS_MITMPROXY_UPSTREAM_TRUST_DIR",
    "OPENSANDBOX_EGRESS_MITMPROXY_SSL_INSECURE",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dns,
    DnsNft,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dns => "dns",
            Mode::DnsNft => "dns+nft",
        }
    }
}

/// Where the starting policy came from, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    File,
    Env,
    Default,
}

impl PolicySource {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicySource::File => "file",
            PolicySource::Env => "env",
            PolicySource::Default => "default",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub policy: Policy,
    pub policy_source: PolicySource,
    pub policy_file: Option<PathBuf>,
    pub token: Option<String>,
    pub upstreams: Vec<SocketAddr>,
    pub upstream_timeout: Duration,
    pub max_rules: usize,
    pub http_addr: SocketAddr,
    pub dns_listen: SocketAddr,
    pub rules_dir: PathBuf,
    pub block_doh_443: bool,
    pub doh_blocklist: Vec<String>,
    pub nameserver_exempt: Vec<IpAddr>,
    /// Extra private ranges: answer records pointing there are stripped like RFC 1918 ones.
    pub private_cidrs: Vec<sandbox_api::net::Cidr>,
    /// Let answers pointing into private ranges through (the reference behaviour).
    pub allow_private_answers: bool,
    pub log_level: String,
    /// The probe's question: `None` is `. NS`, else `<name> A`.
    pub probe_name: Option<String>,
    pub probe_interval: Duration,
    pub deny_webhook: Option<crate::webhook::Target>,
    /// `OPENSANDBOX_EGRESS_SANDBOX_ID`, as given (empty when unset).
    pub sandbox_id: String,
    /// Problems that did not stop start-up (bad policy, bad mode); logged once logging is up.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{DNS_UPSTREAM}: {0:?} is not an IP address (IP, IP:port, [IPv6] or [IPv6]:port)")]
    Upstream(String),
    #[error("{DNS_UPSTREAM} lists no upstream")]
    NoUpstream,
    #[error("{HTTP_ADDR}: {0:?} is not a listen address (e.g. :18080 or 127.0.0.1:18080)")]
    HttpAddr(String),
    #[error("{PRIVATE_CIDRS}: {0}")]
    PrivateCidrs(String),
    #[error("{DNS_LISTEN}: {0:?} is not a socket address")]
    DnsListen(String),

    #[error("{DENY_WEBHOOK}: {url:?}: {reason}")]
    DenyWebhook { url: String, reason: String },

    #[error("{POLICY_FILE}: cannot read {path}: {error}")]
    PolicyFileRead { path: String, error: std::io::Error },
}

impl Config {
    /// Reads the process environment (and the policy file and resolv.conf it names).
    pub fn from_env() -> Result<Config, ConfigError> {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Config::from_lookup(|k| std::env::var(k).ok(), &resolv)
    }

    pub fn from_lookup(
        env: impl Fn(&str) -> Option<String>,
        resolv_conf: &str,
    ) -> Result<Config, ConfigError> {
        let get = |k: &str| {
            env(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut warnings = Vec::new();

        let mode = match get(MODE) {
            None => Mode::Dns,
            Some(m) => parse_mode(&m).unwrap_or_else(|| {
                warnings.push(format!(
                    "{MODE}={m:?} is not dns or dns+nft; using dns (no address enforcement)"
                ));
                Mode::Dns
            }),
        };

        let policy_file = get(POLICY_FILE).map(PathBuf::from);
        let mut loaded = None;
        if let Some(path) = &policy_file {
            match std::fs::read_to_string(path) {
                Ok(text) if text.trim().is_empty() => {
                    warnings.push(format!("{} is empty; using {RULES}", path.display()))
                }
                Ok(text) => match policy::parse(&text) {
                    Ok(p) => loaded = Some((p, PolicySource::File)),
                    Err(e) => warnings.push(format!(
                        "{} holds no valid policy ({e}); using {RULES}",
                        path.display()
                    )),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(ConfigError::PolicyFileRead {
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
        let (policy, policy_source) = match loaded {
            Some(found) => found,
            None => match get(RULES) {
                None => (deny_all(), PolicySource::Default),
                Some(text) => match policy::parse(&text) {
                    Ok(p) => (p, PolicySource::Env),
                    Err(e) => {
                        warnings.push(format!(
                            "{RULES} is not a valid policy ({e}); starting with deny-all"
                        ));
                        (deny_all(), PolicySource::Default)
                    }
                },
            },
        };

        let upstreams = match get(DNS_UPSTREAM) {
            Some(list) => parse_upstreams(&list)?,
            None => resolv_upstreams(resolv_conf),
        };
        if upstreams.is_empty() {
            return Err(ConfigError::NoUpstream);
        }

        let upstream_timeout = Duration::from_secs(
            get(DNS_UPSTREAM_TIMEOUT)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v > 0)
                .unwrap_or(5)
                .min(120),
        );
        let max_rules = match get(MAX_RULES).map(|v| v.parse::<i64>()) {
            None => DEFAULT_MAX_RULES,
            Some(Ok(0)) => usize::MAX,
            Some(Ok(n)) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(_) => {
                warnings.push(format!(
                    "{MAX_RULES} is not a non-negative integer; using {DEFAULT_MAX_RULES}"
                ));
                DEFAULT_MAX_RULES
            }
        };
        let http_addr = match get(HTTP_ADDR) {
            None => SocketAddr::from(([0, 0, 0, 0], sandbox_api::egress::API_PORT)),
            Some(a) => parse_listen(&a).ok_or(ConfigError::HttpAddr(a))?,
        };
        let dns_listen = match get(DNS_LISTEN) {
            None => SocketAddr::from(([127, 0, 0, 1], 15353)),
            Some(a) => a.parse().map_err(|_| ConfigError::DnsListen(a))?,
        };
        let mut doh_blocklist = Vec::new();
        for entry in get(DOH_BLOCKLIST).unwrap_or_default().split(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            if is_ip_or_cidr(entry) {
                doh_blocklist.push(entry.to_owned());
            } else {
                warnings.push(format!(
                    "{DOH_BLOCKLIST}: {entry:?} is not an IP or CIDR; ignored"
                ));
            }
        }
        let nameserver_exempt = get(NAMESERVER_EXEMPT)
            .unwrap_or_default()
            .split(',')
            .filter_map(|e| e.trim().parse().ok())
            .collect();

        let private_cidrs = sandbox_api::net::parse_list(&get(PRIVATE_CIDRS).unwrap_or_default())
            .map_err(|e| ConfigError::PrivateCidrs(e.to_string()))?;
        let allow_private_answers = match get(ALLOW_PRIVATE_ANSWERS) {
            None => false,
            Some(v) => parse_bool(&v).unwrap_or_else(|| {
                // Unclear: keep the safe behaviour.
                warnings.push(format!(
                    "{ALLOW_PRIVATE_ANSWERS}={v:?} is not true or false; private answers stay stripped"
                ));
                false
            }),
        };

        let probe_name = match get(DNS_UPSTREAM_PROBE) {
            None => None,
            Some(n) if n == "." => None,
            Some(n) => match hickory_proto::rr::Name::from_ascii(&n) {
                Ok(_) => Some(n),
                Err(e) => {
                    warnings.push(format!(
                        "{DNS_UPSTREAM_PROBE}={n:?} is not a DNS name ({e}); probing with . NS"
                    ));
                    None
                }
            },
        };
        let probe_interval = Duration::from_secs(
            get(DNS_UPSTREAM_PROBE_INTERVAL_SEC)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|v| *v >= 1)
                .unwrap_or(30)
                .min(3600),
        );
        warnings.extend(identity_fields(&env).1);
        for name in MITM_SETTINGS {
            if get(name).is_some() {
                warnings.push(format!(
                    "{name} is not supported: TLS interception (mitmproxy) is not built into this sidecar; ignored"
                ));
            }
        }
        let deny_webhook = match get(DENY_WEBHOOK) {
            None => None,
            Some(url) => Some(
                crate::webhook::Target::parse(&url)
                    .map_err(|reason| ConfigError::DenyWebhook { url, reason })?,
            ),
        };

        Ok(Config {
            mode,
            probe_name,
            probe_interval,
            deny_webhook,
            sandbox_id: env(SANDBOX_ID)
                .map(|v| v.trim().to_owned())
                .unwrap_or_default(),
            private_cidrs,
            allow_private_answers,
            policy,
            policy_source,
            policy_file,
            token: env(TOKEN).filter(|t| !t.is_empty()),
            upstreams,
            upstream_timeout,
            max_rules,
            http_addr,
            dns_listen,
            rules_dir: get(RULES_DIR)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RULES_DIR)),
            block_doh_443: get(BLOCK_DOH_443).and_then(|v| parse_bool(&v)) == Some(true),
            doh_blocklist,
            nameserver_exempt,
            log_level: get(LOG_LEVEL).unwrap_or_else(|| "info".into()),
            warnings,
        })
    }
}

/// The fields every log line and metric carries: `sandbox_id` from `OPENSANDBOX_EGRESS_SANDBOX_ID`,
/// then the pairs of `OPENSANDBOX_EGRESS_METRICS_EXTRA_ATTRS` (`k=v,k2=v2`), and what was
/// refused in them. A key must be a metric label name (`[A-Za-z_][A-Za-z0-9_]*`, not `__…`) and
/// appear once; `sandbox_id` is the id's own.
pub fn identity_fields(
    env: impl Fn(&str) -> Option<String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut fields = Vec::new();
    let mut refused = Vec::new();
    if let Some(id) = env(SANDBOX_ID)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
    {
        fields.push(("sandbox_id".to_owned(), id));
    }
    for pair in env(METRICS_EXTRA_ATTRS).unwrap_or_default().split(',') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let Some((key, value)) = pair.split_once('=').map(|(k, v)| (k.trim(), v.trim())) else {
            refused.push(format!(
                "{METRICS_EXTRA_ATTRS}: {pair:?} is not key=value; ignored"
            ));
            continue;
        };
        let label =
            key.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            }) && !key.is_empty()
                && !key.starts_with("__");
        if !label || fields.iter().any(|(k, _)| k == key) {
            refused.push(format!(
                "{METRICS_EXTRA_ATTRS}: {key:?} is not a label name, or repeats one; ignored"
            ));
            continue;
        }
        fields.push((key.to_owned(), value.to_owned()));
    }
    (fields, refused)
}

pub fn deny_all() -> Policy {
    Policy {
        default_action: Action::Deny,
        egress: Vec::new(),
    }
}

/// `dns`, `dns+nft` or `nft+dns`, any case; `dns` is required.
pub fn parse_mode(text: &str) -> Option<Mode> {
    let mut dns = false;
    let mut nft = false;
    for token in text.split('+') {
        match token.trim().to_ascii_lowercase().as_str() {
            "dns" => dns = true,
            "nft" => nft = true,
            _ => return None,
        }
    }
    match (dns, nft) {
        (true, true) => Some(Mode::DnsNft),
        (true, false) => Some(Mode::Dns),
        _ => None,
    }
}

/// `1`/`true`/`yes`/`y`/`on` and `0`/`false`/`no`/`n`/`off`, any case; `None` for anything else.
fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

fn is_ip_or_cidr(text: &str) -> bool {
    text.parse::<sandbox_api::net::Cidr>().is_ok()
}

/// One upstream: `IP`, `IP:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; port 53 by default.
pub fn parse_upstream(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53));
    }
    text.parse::<SocketAddr>().ok().filter(|a| a.port() != 0)
}

fn parse_upstreams(list: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let addr = parse_upstream(entry).ok_or_else(|| ConfigError::Upstream(entry.into()))?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// Nameservers from resolv.conf: non-loopback first, then loopback, at most 10.
pub fn resolv_upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut servers: Vec<SocketAddr> = resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let word = words.next()?;
            // A zone index (fe80::1%eth0) cannot be represented; such entries are skipped.
            parse_upstream(word)
        })
        .collect();
    servers.sort_by_key(|a| a.ip().is_loopback());
    servers.dedup();
    servers.truncate(10);
    servers
}

/// `:18080`, `0.0.0.0:18080`, `[::]:18080`.
fn parse_listen(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned(), "nameserver 192.0.2.53\n")
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = load(&[]).unwrap();
        assert_eq!(c.mode, Mode::Dns);
        assert_eq!(c.policy, deny_all());
        assert_eq!(c.upstreams, vec!["192.0.2.53:53".parse().unwrap()]);
        assert_eq!(c.http_addr, "0.0.0.0:18080".parse().unwrap());
        assert_eq!(c.dns_listen, "127.0.0.1:15353".parse().unwrap());
        assert_eq!(c.max_rules, 4096);
        assert_eq!(c.upstream_timeout, Duration::from_secs(5));
        assert_eq!(c.rules_dir, PathBuf::from("/var/egress/rules"));
        assert!(c.token.is_none());
    }

    #[test]
    fn broken_policy_in_env_starts_deny_all_with_a_warning() {
        let c = load(&[(RULES, "{not json")]).unwrap();
        assert_eq!(c.policy, deny_all());
        assert!(
            c.warnings[0].contains("not a valid policy"),
            "{:?}",
            c.warnings
        );
        let c = load(&[(RULES, r#"{"defaultAction":"permit"}"#)]).unwrap();
        assert_eq!(
            c.policy.default_action,
            Action::Deny,
            "unknown defaultAction never allows"
        );
        assert!(
            c.warnings[0].contains("unsupported action"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn private_answer_settings() {
        let c = load(&[]).unwrap();
        assert!(!c.allow_private_answers && c.private_cidrs.is_empty());
        let c = load(&[
            (PRIVATE_CIDRS, "198.18.0.0/15, 2001:db8:99::/48"),
            (ALLOW_PRIVATE_ANSWERS, "TRUE"),
        ])
        .unwrap();
        assert!(c.allow_private_answers);
        assert_eq!(c.private_cidrs.len(), 2);
        let e = load(&[(PRIVATE_CIDRS, "10.0.0.0/8,not-a-range")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(PRIVATE_CIDRS) && e.contains("not-a-range"),
            "{e}"
        );
        let c = load(&[(ALLOW_PRIVATE_ANSWERS, "maybe")]).unwrap();
        assert!(!c.allow_private_answers, "unclear value keeps stripping");
        assert!(c.warnings.iter().any(|w| w.contains(ALLOW_PRIVATE_ANSWERS)));
    }

    #[test]
    fn modes_and_upstreams() {
        assert_eq!(parse_mode("DNS+NFT"), Some(Mode::DnsNft));
        assert_eq!(parse_mode("nft+dns"), Some(Mode::DnsNft));
        assert_eq!(parse_mode("nft"), None);
        let c = load(&[(MODE, "iptables")]).unwrap();
        assert_eq!(c.mode, Mode::Dns);
        assert_eq!(c.warnings.len(), 1);
        let c = load(&[(
            DNS_UPSTREAM,
            "198.51.100.2, 198.51.100.3:5353,[2001:db8::1],[2001:db8::2]:54,2001:db8::3,198.51.100.2",
        )])
        .unwrap();
        let want: Vec<SocketAddr> = [
            "198.51.100.2:53",
            "198.51.100.3:5353",
            "[2001:db8::1]:53",
            "[2001:db8::2]:54",
            "[2001:db8::3]:53",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(c.upstreams, want);
        assert!(matches!(
            load(&[(DNS_UPSTREAM, "dns.example")]),
            Err(ConfigError::Upstream(_))
        ));
        assert!(matches!(
            load(&[(DNS_UPSTREAM, ",")]),
            Err(ConfigError::NoUpstream)
        ));
        assert_eq!(
            resolv_upstreams("# c\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch x\n"),
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.53:53".parse().unwrap()
            ]
        );
        assert_eq!(load(&[(MAX_RULES, "0")]).unwrap().max_rules, usize::MAX);
        assert_eq!(load(&[(MAX_RULES, "-3")]).unwrap().max_rules, 4096);
        assert_eq!(
            load(&[(HTTP_ADDR, ":9000")]).unwrap().http_addr,
            "0.0.0.0:9000".parse().unwrap()
        );
    }

    #[test]
    fn policy_file_wins_when_valid() {
        let dir = std::env::temp_dir().join(format!("egress-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.json");
        let env_policy = r#"{"defaultAction":"allow"}"#;
        std::fs::write(
            &file,
            r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"a.test"}]}"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let c = load(&[(POLICY_FILE, path), (RULES, env_policy)]).unwrap();
        assert_eq!(c.policy_source, PolicySource::File);
        assert_eq!(c.policy.egress.len(), 1);
        std::fs::write(&file, "garbage").unwrap();
        let c = load(&[(POLICY_FILE, path), (RULES, env_policy)]).unwrap();
        assert_eq!(c.policy_source, PolicySource::Env);
        assert_eq!(c.policy.default_action, Action::Allow);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
