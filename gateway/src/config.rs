//! Command-line flags (with environment fallbacks), validated before anything binds.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::access::{KeyError, KeyRing};
use crate::ports::{PortSet, PortsError};
use crate::renew::RenewConfig;
use crate::tls::{Certificates, Pair};
use crate::upstream::UpstreamPolicy;
use sandbox_api::net::{self, Cidr};
use sandbox_api::renew;

/// Environment variable read when `--secure-access-keys` is not given, so keys stay off argv.
pub const ENV_SECURE_ACCESS_KEYS: &str = "OPENSANDBOX_SECURE_ACCESS_KEYS";

/// How a request names its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `OpenSandbox-Ingress-To: <id>-<port>` or the Host `<id>-<port>.<domain>`.
    Header,
    /// The path `/<id>/<port>/<rest>`, forwarded as `/<rest>`.
    Uri,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Header => "header",
            Mode::Uri => "uri",
        }
    }
}

/// How a Kubernetes watch loads its objects before following changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitialList {
    /// A watch that streams the current objects first (`sendInitialEvents`, served from the API
    /// server's watch cache); falls back to `paged` when the server does not offer it.
    Streaming,
    /// Paginated LIST calls, then a watch.
    Paged,
}

/// Where sandbox objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    BatchSandbox,
    AgentSandbox,
    File,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "sandbox-gateway",
    version,
    // A flag given twice: the last wins, as with Go's flag package.
    args_override_self = true,
    about = "Ingress gateway for sandboxes on Kubernetes"
)]
pub struct Config {
    /// Port of the proxy listener.
    #[arg(long, default_value_t = 28888)]
    pub port: u16,

    /// Address the proxy and metrics listeners bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Routing mode.
    #[arg(long, value_enum, default_value_t = Mode::Header)]
    pub mode: Mode,

    /// Sandbox source: `batchsandbox`, `agent-sandbox`, both comma-separated, or `file`.
    #[arg(long, default_value = "batchsandbox")]
    pub provider_type: String,

    /// Kubeconfig for the Kubernetes providers (default: in-cluster, then `KUBECONFIG`, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch only these namespaces (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Watch only sandbox objects matching this label selector.
    #[arg(long)]
    pub label_selector: Option<String>,

    /// How each Kubernetes watch loads the current objects: `streaming` (one watch stream from the
    /// API server's cache; `paged` when the server does not offer it) or `paged` LIST calls.
    #[arg(long, value_enum, default_value_t = InitialList::Streaming)]
    pub initial_list: InitialList,

    /// Sandbox addresses the gateway may dial (comma-separated CIDRs; default: all but link-local, metadata and unspecified).
    #[arg(long, default_value = "")]
    pub allowed_upstream_cidrs: String,

    /// Sandbox objects (multi-document YAML or `kind: List`) for `--provider-type file`.
    #[arg(long)]
    pub sandbox_file: Option<PathBuf>,

    /// Signing keys for signed routes: `a=<base64>,b=<base64>`.
    #[arg(long, env = ENV_SECURE_ACCESS_KEYS, hide_env_values = true)]
    pub secure_access_keys: Option<String>,

    /// File holding the signing keys (same format, commas or newlines); re-read when it changes.
    #[arg(long, conflicts_with = "secure_access_keys")]
    pub secure_access_keys_file: Option<PathBuf>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Port serving Prometheus metrics on `/metrics`.
    #[arg(long, default_value_t = 9091)]
    pub metrics_port: u16,

    /// On SIGTERM: stop accepting, finish in-flight requests, exit within this many seconds.
    #[arg(long, default_value_t = 25)]
    pub shutdown_grace_seconds: u64,

    /// A client must send a complete request header within this many seconds.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_seconds: u64,

    /// Failed credential checks allowed per client address per minute before its requests to
    /// secure sandboxes get 429 without being checked (0: unlimited).
    #[arg(long, default_value_t = 60)]
    pub auth_failures_per_minute: u32,

    /// Failed signed-route checks allowed per sandbox per minute across all clients; past it the
    /// sandbox's signed routes get 429 while the secure-access header keeps working (0: unlimited).
    #[arg(long, default_value_t = 600)]
    pub signature_failures_per_sandbox_per_minute: u32,

    /// Most clients the failed-credential limiter remembers; past it expired entries are dropped,
    /// then others evicted (counted in `sandbox_gateway_auth_limiter_evictions_total`).
    #[arg(long, default_value_t = 100_000)]
    pub auth_limiter_max_clients: usize,

    /// Ports never forwarded to any sandbox (e.g. `18080,9000-9100`); requests for them get 403.
    #[arg(long, default_value = "")]
    pub denied_ports: String,

    /// Expect a PROXY protocol (v1 or v2) header on every connection, as load balancers such as
    /// AWS NLB send it, and take the client address from it; connections without one are closed.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub proxy_protocol: bool,

    /// Peers whose `X-Forwarded-For` is believed (comma-separated CIDRs; default: none). The
    /// client is the last address in the chain that is not in these ranges.
    #[arg(long, default_value = "")]
    pub trusted_proxy_cidrs: String,

    /// A signed route whose expiry lies more than this many seconds ahead is refused with 401,
    /// so a leaked or forged-by-insider link cannot live for years (0: unlimited, as the
    /// reference).
    #[arg(long, default_value_t = 0)]
    pub max_signed_route_lifetime: u64,

    /// Idle keep-alive connections from clients are closed after this many seconds.
    #[arg(long, default_value_t = 75)]
    pub keepalive_timeout_seconds: u64,

    /// Largest request header accepted (request line and all fields); larger gets 431.
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: usize,

    /// Timeout for connecting to a sandbox.
    #[arg(long, default_value_t = 3000)]
    pub upstream_connect_timeout_ms: u64,

    /// Idle upstream connections are kept this long for reuse.
    #[arg(long, default_value_t = 60)]
    pub upstream_idle_timeout_seconds: u64,

    /// Write one JSON access-log line per request to stdout.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,

    /// Carry plain HTTP/1.1 requests on the lean path (see the README); `false` sends every
    /// request through the full Pingora proxy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub lean_path: bool,

    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// Accepted for compatibility with the reference gateway and ignored: all namespaces are watched.
    #[arg(long, hide = true)]
    pub namespace: Option<String>,

    /// Publish OSEP-0009 renew intents to Redis for requests that reach a sandbox.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub renew_intent_enabled: bool,

    /// Redis for renew intents: `redis://[user:password@]host[:port][/db]` or `unix:///path`.
    #[arg(long, default_value = renew::DEFAULT_REDIS_DSN)]
    pub renew_intent_redis_dsn: String,

    /// Redis password, so it need not be in the DSN on the command line (wins over the DSN's).
    #[arg(long, env = renew::ENV_REDIS_PASSWORD, hide_env_values = true, conflicts_with = "renew_intent_redis_password_file")]
    pub renew_intent_redis_password: Option<String>,

    /// File holding the Redis password (wins over the DSN's).
    #[arg(long)]
    pub renew_intent_redis_password_file: Option<PathBuf>,

    /// The Redis list renew intents are pushed onto.
    #[arg(long, default_value = renew::DEFAULT_QUEUE_KEY)]
    pub renew_intent_queue_key: String,

    /// The list is trimmed to this many entries after each push (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub renew_intent_queue_max_len: u64,

    /// At most one intent per sandbox in this many seconds (0: one per request).
    #[arg(long, default_value_t = 60)]
    pub renew_intent_min_interval: u64,

    /// Intents held while Redis is slow or down; beyond this they are dropped (and counted).
    #[arg(long, default_value_t = 8192)]
    pub renew_intent_buffer: usize,

    /// PEM certificate chain served on `--tls-port`; repeat it (with `--tls-key-file`) for more
    /// pairs, chosen per handshake by SNI. Reloaded when the files change.
    #[arg(long)]
    pub tls_cert_file: Vec<PathBuf>,

    /// PEM private key of the `--tls-cert-file` at the same position.
    #[arg(long)]
    pub tls_key_file: Vec<PathBuf>,

    /// Port of the TLS listener, opened when certificates are given (beside `--port`).
    #[arg(long, default_value_t = 28443)]
    pub tls_port: u16,

    /// HTTP/2 from clients on the TLS listener, when ALPN picks `h2`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub http2: bool,

    /// HTTP/2 in cleartext with prior knowledge (h2c) on `--port`, beside HTTP/1.1 (needs
    /// `--http2`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub h2c: bool,

    /// HTTP/2: streams a client may have open at once on one connection.
    #[arg(long, default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,

    /// HTTP/2: flow-control window of each stream, in bytes (the client may send this much
    /// before the sandbox reads it).
    #[arg(long, default_value_t = 1_048_576)]
    pub h2_stream_window: u32,

    /// HTTP/2: flow-control window of a whole connection, in bytes.
    #[arg(long, default_value_t = 4_194_304)]
    pub h2_connection_window: u32,

    /// HTTP/2: largest decoded request header list (bounds CONTINUATION floods), in bytes.
    #[arg(long, default_value_t = 65_536)]
    pub h2_max_header_list_size: u32,

    /// HTTP/2: streams a client may reset before they are served (rapid reset) before the
    /// connection is closed.
    #[arg(long, default_value_t = 20)]
    pub h2_max_pending_resets: usize,

    /// HTTP/2: SETTINGS, PING, PRIORITY, RST_STREAM and empty DATA frames a client may send
    /// a second on one connection, on average (a burst of ten seconds' worth is allowed); a
    /// connection over it is closed (floods). 0: unmetered.
    #[arg(long, default_value_t = 100)]
    pub h2_max_control_frames_per_second: u32,

    /// HTTP/2: a connection idle this many seconds is closed.
    #[arg(long, default_value_t = 300)]
    pub h2_idle_timeout_seconds: u64,
}

/// A flag value that passed parsing but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--provider-type: unknown provider {0:?} (expected batchsandbox, agent-sandbox or file)"
    )]
    UnknownProvider(String),
    #[error("--provider-type: {0} cannot be combined with other providers")]
    FileCombined(String),
    #[error("--allowed-upstream-cidrs: {0}")]
    UpstreamCidrs(String),
    #[error("Kubernetes client configuration: {0}")]
    Kubernetes(String),
    #[error("--sandbox-file is required with --provider-type file")]
    MissingSandboxFile,
    #[error("--log-level: unknown level {0:?} (expected error, warn, info, debug or trace)")]
    LogLevel(String),
    #[error("--secure-access-keys: {0}")]
    Keys(#[from] KeyError),
    #[error("--secure-access-keys-file {path}: {reason}")]
    KeysFile { path: PathBuf, reason: String },
    #[error("--port and --metrics-port must differ")]
    SamePorts,
    #[error("--max-header-bytes must be between 1024 and 1048575")]
    HeaderLimit,
    #[error("--denied-ports: {0}")]
    DeniedPorts(#[from] PortsError),
    #[error("--trusted-proxy-cidrs: {0}")]
    TrustedProxies(String),
    #[error("--auth-limiter-max-clients must be at least 1")]
    LimiterCapacity,
    #[error("--renew-intent-redis-dsn: {0}")]
    RedisDsn(String),
    #[error("--renew-intent-redis-password-file {0}")]
    RedisPasswordFile(String),
    #[error("--renew-intent-queue-key must not be empty")]
    EmptyQueueKey,
    #[error("--renew-intent-buffer must be at least 1")]
    RenewBuffer,
    #[error(
        "--tls-cert-file and --tls-key-file come in pairs: {certs} certificate(s), {keys} key(s)"
    )]
    TlsPairs { certs: usize, keys: usize },
    #[error("--tls-cert-file/--tls-key-file: {0}")]
    Tls(String),
    #[error("--tls-port must differ from --port and --metrics-port")]
    TlsPort,
    #[error("{0} is out of range: {1}")]
    Http2(&'static str, &'static str),
}

impl Config {
    /// Checks every flag; returns the providers to run and the initial keys.
    pub fn validate(&self) -> Result<(Vec<Provider>, KeyRing), ConfigError> {
        let providers = self.providers()?;
        self.upstream_policy()?;
        self.tracing_level()?;
        if self.port == self.metrics_port {
            return Err(ConfigError::SamePorts);
        }
        if !(1024..=1_048_575).contains(&self.max_header_bytes) {
            return Err(ConfigError::HeaderLimit);
        }
        self.denied_ports()?;
        self.trusted_proxies()?;
        if self.auth_limiter_max_clients == 0 {
            return Err(ConfigError::LimiterCapacity);
        }
        self.renew()?;
        // The files are read once, when the listener is built.
        self.tls_pairs()?;
        self.h2_options()?;
        let keys = match (&self.secure_access_keys, &self.secure_access_keys_file) {
            (Some(text), _) => KeyRing::parse(text)?,
            (None, Some(path)) => read_keys_file(path)?,
            (None, None) => KeyRing::default(),
        };
        Ok((providers, keys))
    }

    /// The renew-intent publisher's settings, when it is on.
    pub fn renew(&self) -> Result<Option<RenewConfig>, ConfigError> {
        if !self.renew_intent_enabled {
            return Ok(None);
        }
        if self.renew_intent_queue_key.trim().is_empty() {
            return Err(ConfigError::EmptyQueueKey);
        }
        if self.renew_intent_buffer == 0 {
            return Err(ConfigError::RenewBuffer);
        }
        let password = match &self.renew_intent_redis_password_file {
            Some(path) => Some(renew::password_file(path).map_err(ConfigError::RedisPasswordFile)?),
            None => self
                .renew_intent_redis_password
                .clone()
                .filter(|p| !p.is_empty()),
        };
        let connection = renew::connection(&self.renew_intent_redis_dsn, password.as_deref())
            .map_err(ConfigError::RedisDsn)?;
        Ok(Some(RenewConfig {
            connection,
            queue_key: self.renew_intent_queue_key.clone(),
            max_len: self.renew_intent_queue_max_len,
            min_interval: Duration::from_secs(self.renew_intent_min_interval),
            buffer: self.renew_intent_buffer,
        }))
    }

    /// The TLS pairs as given (counted and their port checked, nothing read).
    fn tls_pairs(&self) -> Result<Vec<Pair>, ConfigError> {
        let (certs, keys) = (self.tls_cert_file.len(), self.tls_key_file.len());
        if certs != keys {
            return Err(ConfigError::TlsPairs { certs, keys });
        }
        if certs > 0 && (self.tls_port == self.port || self.tls_port == self.metrics_port) {
            return Err(ConfigError::TlsPort);
        }
        Ok(self
            .tls_cert_file
            .iter()
            .zip(&self.tls_key_file)
            .map(|(cert, key)| Pair {
                cert: cert.clone(),
                key: key.clone(),
            })
            .collect())
    }

    /// The TLS pairs and their certificates, read from disk (a bad pair refuses start-up), or
    /// `None` when no certificate is given.
    pub fn tls(&self) -> Result<Option<(Vec<Pair>, Certificates)>, ConfigError> {
        let pairs = self.tls_pairs()?;
        if pairs.is_empty() {
            return Ok(None);
        }
        let loaded = Certificates::load(&pairs).map_err(ConfigError::Tls)?;
        Ok(Some((pairs, loaded)))
    }

    /// The HTTP/2 server settings, bounded against abuse.
    pub fn h2_options(
        &self,
    ) -> Result<pingora::protocols::http::v2::server::H2Options, ConfigError> {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        if !(1..=10_000).contains(&self.h2_max_concurrent_streams) {
            return Err(ConfigError::Http2(
                "--h2-max-concurrent-streams",
                "1..=10000",
            ));
        }
        if !(65_535..=MAX_WINDOW).contains(&self.h2_stream_window) {
            return Err(ConfigError::Http2(
                "--h2-stream-window",
                "65535..=2147483647",
            ));
        }
        if !(65_535..=MAX_WINDOW).contains(&self.h2_connection_window) {
            return Err(ConfigError::Http2(
                "--h2-connection-window",
                "65535..=2147483647",
            ));
        }
        if !(1024..=1_048_576).contains(&self.h2_max_header_list_size) {
            return Err(ConfigError::Http2(
                "--h2-max-header-list-size",
                "1024..=1048576",
            ));
        }
        let mut options = pingora::protocols::http::v2::server::default_h2_options();
        options
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .initial_window_size(self.h2_stream_window)
            .initial_connection_window_size(self.h2_connection_window)
            .max_header_list_size(self.h2_max_header_list_size)
            .max_pending_accept_reset_streams(self.h2_max_pending_resets)
            // Streams the gateway itself resets for a client's errors, per connection.
            .max_local_error_reset_streams(Some(1024));
        Ok(options)
    }

    /// The dial policy; loopback is in the default only for the file provider.
    pub fn upstream_policy(&self) -> Result<UpstreamPolicy, ConfigError> {
        let file = self.providers()?.contains(&Provider::File);
        UpstreamPolicy::parse(&self.allowed_upstream_cidrs, file)
            .map_err(ConfigError::UpstreamCidrs)
    }

    pub fn denied_ports(&self) -> Result<PortSet, ConfigError> {
        Ok(PortSet::parse(&self.denied_ports)?)
    }

    pub fn trusted_proxies(&self) -> Result<Vec<Cidr>, ConfigError> {
        net::parse_list(&self.trusted_proxy_cidrs)
            .map_err(|e| ConfigError::TrustedProxies(e.to_string()))
    }

    /// The tracing level for `--log-level`; accepts the reference's spellings in any case.
    pub fn tracing_level(&self) -> Result<&'static str, ConfigError> {
        Ok(match self.log_level.to_ascii_lowercase().as_str() {
            "error" | "fatal" | "panic" => "error",
            "warn" | "warning" => "warn",
            "info" => "info",
            "debug" => "debug",
            "trace" => "trace",
            _ => return Err(ConfigError::LogLevel(self.log_level.clone())),
        })
    }

    fn providers(&self) -> Result<Vec<Provider>, ConfigError> {
        let mut out = Vec::new();
        for name in self.provider_type.split(',').map(str::trim) {
            let p = match name {
                "batchsandbox" => Provider::BatchSandbox,
                "agent-sandbox" => Provider::AgentSandbox,
                "file" => Provider::File,
                other => return Err(ConfigError::UnknownProvider(other.to_owned())),
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        if out.contains(&Provider::File) {
            if out.len() > 1 {
                return Err(ConfigError::FileCombined(self.provider_type.clone()));
            }
            if self.sandbox_file.is_none() {
                return Err(ConfigError::MissingSandboxFile);
            }
        }
        Ok(out)
    }
}

/// Reads a keys file, naming the file in every error.
pub fn read_keys_file(path: &std::path::Path) -> Result<KeyRing, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::KeysFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    KeyRing::parse(&text).map_err(|e| ConfigError::KeysFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("sandbox-gateway").chain(args.iter().copied()))
    }

    #[test]
    fn accepts_go_style_flags() {
        let args = sandbox_api::cli::normalize(["gw", "-port=1", "-mode", "uri"].map(String::from));
        let c = Config::try_parse_from(&args).unwrap();
        assert_eq!((c.port, c.mode), (1, Mode::Uri));
    }

    #[test]
    fn rejects_unknown_mode_naming_the_flag() {
        let err = config(&["--mode", "path"]).unwrap_err().to_string();
        assert!(err.contains("--mode") && err.contains("path"), "{err}");
    }

    #[test]
    fn validates_providers_and_keys() {
        let ok = config(&[
            "--provider-type",
            "file",
            "--sandbox-file",
            "x.yaml",
            "--secure-access-keys",
            "k=cHFycw==",
        ])
        .unwrap();
        let (providers, keys) = ok.validate().unwrap();
        assert_eq!((providers, keys.len()), (vec![Provider::File], 1));
        let bad = config(&[
            "--provider-type",
            "file",
            "--sandbox-file",
            "x",
            "--secure-access-keys",
            "k=%%",
        ])
        .unwrap();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("k=<redacted>")
        );
        let missing = config(&["--provider-type", "file"]).unwrap();
        assert!(matches!(
            missing.validate(),
            Err(ConfigError::MissingSandboxFile)
        ));
        let unknown = config(&["--provider-type", "consul"]).unwrap();
        assert!(
            matches!(unknown.validate(), Err(ConfigError::UnknownProvider(p)) if p == "consul")
        );
        let level = config(&[
            "--provider-type",
            "file",
            "--sandbox-file",
            "x",
            "--log-level",
            "loud",
        ])
        .unwrap();
        assert!(matches!(level.validate(), Err(ConfigError::LogLevel(_))));
        let warning = config(&["--log-level", "WARNING"]).unwrap();
        assert_eq!(warning.tracing_level().unwrap(), "warn");
    }
}
