//! `egress-sidecar`: configured from the environment like the reference sidecar.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sidecar::always::Watcher;
use sidecar::api::{self, Api};
use sidecar::config::{Config, Mode};
use sidecar::dns::{self, AnswerFilter, Proxy};
use sidecar::nft::{self, Nft};
use sidecar::state::State;
use sidecar::webhook::Webhook;
use sidecar::{logskip, metrics, state};
use tokio_util::sync::CancellationToken;

const ALWAYS_POLL: Duration = Duration::from_millis(500);

fn init_logging(level: &str) {
    let level = match level.to_ascii_lowercase().as_str() {
        "debug" => "debug",
        "warn" | "warning" => "warn",
        "error" | "fatal" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (fields, _) = sidecar::config::identity_fields(|k| std::env::var(k).ok());
    let mut prefix = String::from("{");
    for (key, value) in fields {
        prefix.push_str(&format!(
            "{}:{},",
            serde_json::Value::from(key),
            serde_json::Value::from(value)
        ));
    }
    let prefix = prefix.into_bytes();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(Tagged(prefix.into()))
        .init();
}

/// Stdout, with `"sandbox_id":…` and the extra attributes first in every JSON line when they
/// are set (the formatter writes each line in one call, starting with `{`).
struct Tagged(Arc<[u8]>);

struct TaggedWriter(Arc<[u8]>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tagged {
    type Writer = TaggedWriter;
    fn make_writer(&'a self) -> TaggedWriter {
        TaggedWriter(self.0.clone())
    }
}

impl std::io::Write for TaggedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        match buf.strip_prefix(b"{") {
            Some(rest) if self.0.len() > 1 => {
                let mut line = Vec::with_capacity(self.0.len() + rest.len());
                line.extend_from_slice(&self.0);
                line.extend_from_slice(rest);
                out.write_all(&line)?;
            }
            _ => out.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn command_line() -> Option<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => None,
        ["--version" | "-V"] => {
            println!("egress-sidecar {}", env!("CARGO_PKG_VERSION"));
            Some(ExitCode::SUCCESS)
        }
        ["--help" | "-h"] => {
            println!(
                "egress-sidecar {}: egress DNS proxy and nftables fence for one sandbox pod.\n\
                 It takes no flags: settings come from OPENSANDBOX_EGRESS_* environment \
                 variables (see the README).",
                env!("CARGO_PKG_VERSION")
            );
            Some(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!(
                "egress-sidecar: unexpected arguments {args:?}; settings come from \
                 OPENSANDBOX_EGRESS_* environment variables (--version, --help)"
            );
            Some(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    if let Some(code) = command_line() {
        return code;
    }
    // Leave root before reading anything, and before any other thread exists (capability sets
    // belong to each thread): the policy file was written by the sidecar's own user.
    let run_as = match sidecar::privileges::run_as_from_env() {
        Ok(run_as) => run_as,
        Err(e) => return cannot_start(&e),
    };
    if let Some((uid, gid)) = run_as
        && let Err(e) = sidecar::privileges::become_user(uid, gid)
    {
        return cannot_start(&e);
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return cannot_start(&e),
    };
    init_logging(&config.log_level);
    if let Some((uid, gid)) = run_as {
        tracing::info!(
            uid,
            gid,
            "running as the sidecar's own user with NET_ADMIN alone"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

fn cannot_start(error: &dyn std::fmt::Display) -> ExitCode {
    init_logging("info");
    tracing::error!(error = %error, "egress sidecar cannot start");
    ExitCode::from(2)
}

async fn serve(config: Config) -> ExitCode {
    metrics::init();
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "egress sidecar stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    if nft::has_net_admin() == Some(false) {
        return Err(
            "the egress sidecar needs the NET_ADMIN capability to install its nftables rules \
             (securityContext.capabilities.add: [\"NET_ADMIN\"]); this process does not have it"
                .into(),
        );
    }
    if config.token.is_none() {
        tracing::warn!(
            "{} is not set: the policy API accepts requests without a token",
            sidecar::config::TOKEN
        );
    }
    let (watcher, errors) = Watcher::new(&config.rules_dir);
    for e in errors {
        // Without its deny rules the sidecar would let through what the operator forbade.
        if e.is_deny_file() {
            return Err(format!("{e}; refusing to start without the deny rules"));
        }
        tracing::error!(error = %e, "always-rule file ignored");
    }

    // Who the sidecar is, to the firewall: without it the rules could not tell the sidecar's
    // own DNS traffic from a sandbox process that sets the same socket mark.
    let own = sidecar::identity::discover().map_err(|e| e.to_string())?;
    tracing::info!(cgroup = %own.dir.display(), "sidecar traffic recognised by mark and cgroup");
    let nft = Nft::start(own.nft_path);
    let state = State::start(&config, watcher.current().clone(), Some(nft))
        .await
        .map_err(|e| format!("cannot install the nftables table: {e}"))?;

    let proxy = Arc::new(
        Proxy::new(
            state.clone(),
            config.upstreams.clone(),
            config.upstream_timeout,
            AnswerFilter {
                allow_private: config.allow_private_answers,
                private_cidrs: config.private_cidrs.clone(),
            },
        )
        .with_probe(dns::Probe {
            name: config.probe_name.clone(),
            interval: config.probe_interval,
        }),
    );
    if let Some(target) = config.deny_webhook.clone() {
        proxy.set_webhook(Webhook::start(
            target,
            config.sandbox_id.clone(),
            proxy.resolver(),
        ));
        tracing::info!("denied hostname webhook enabled");
    }
    let mut log_skip = logskip::Watcher::new(&config.rules_dir);
    apply_log_skip(&proxy, &mut log_skip);
    // Every listener is bound before anything is served; a port that cannot be bound stops
    // the sidecar (non-zero exit, the kubelet restarts it) with the rules left in place.
    let (udp, tcp) = dns::bind(config.dns_listen)
        .await
        .map_err(|e| format!("cannot listen for DNS on {}: {e}", config.dns_listen))?;
    // Port-53 traffic over IPv6 is redirected to [::1]; serve there too when the host has IPv6.
    let v6 = if config.dns_listen.ip().is_loopback() {
        let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, config.dns_listen.port()));
        dns::bind(addr)
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "no IPv6 loopback DNS listener"))
            .ok()
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| format!("cannot listen for the API on {}: {e}", config.http_addr))?;
    let api = Arc::new(Api {
        state: state.clone(),
        token: config.token.clone(),
        writes: tokio::sync::Mutex::new(()),
    });

    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(dns::serve(proxy.clone(), udp, tcp, cancel.clone()));
    if let Some((udp, tcp)) = v6 {
        tasks.spawn(dns::serve(proxy.clone(), udp, tcp, cancel.clone()));
    }
    let probing = proxy.clone();
    let stop = cancel.clone();
    tasks.spawn(async move { probing.probe(stop).await });
    tasks.spawn(api::serve(api, listener, cancel.clone()));
    tasks.spawn(watch_always(state.clone(), watcher, cancel.clone()));
    tasks.spawn(watch_log_skip(proxy.clone(), log_skip, cancel.clone()));

    let policy = state.policy().await;
    tracing::info!(
        dns = %config.dns_listen,
        api = %config.http_addr,
        enforcement = config.mode.as_str(),
        mode = state::mode_name(&policy),
        upstreams = ?config.upstreams,
        "egress sidecar ready"
    );
    if config.mode == Mode::Dns {
        tracing::info!("mode dns: names are filtered, addresses are not (set dns+nft to enforce)");
    }

    tokio::select! {
        _ = wait_for_signal() => {}
        // A task ending on its own is a fault: stop, and let the kubelet restart the sidecar.
        Some(ended) = tasks.join_next() => {
            cancel.cancel();
            return Err(format!("a sidecar task stopped unexpectedly: {ended:?}"));
        }
    }
    // The table stays: a stopped sidecar leaves the namespace locked, and the next one takes
    // the table over.
    tracing::info!("egress sidecar stopping; nftables rules stay in place");
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Applies changes of the always-rule files until `cancel` fires.
async fn watch_always(state: Arc<State>, mut watcher: Watcher, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ALWAYS_POLL) => {}
        }
        let (changed, errors) = watcher.poll();
        for e in errors {
            tracing::error!(error = %e, "always-rule file not applied; keeping its previous rules");
        }
        if let Some(rules) = changed
            && let Err(e) = state.set_always(rules).await
        {
            tracing::error!(error = %e, "always-rule change not applied; retrying");
            watcher.retry();
        }
    }
}

/// Applies a change of `log_skip.always`, reporting lines it refused.
fn apply_log_skip(proxy: &Proxy, watcher: &mut logskip::Watcher) {
    if let Some((skip, errors)) = watcher.poll() {
        for e in errors {
            tracing::error!(error = %e, "log_skip.always line ignored");
        }
        tracing::info!(
            patterns = skip.len(),
            "outbound log skip patterns loaded from {}",
            logskip::FILE
        );
        proxy.set_log_skip(skip);
    }
}

async fn watch_log_skip(
    proxy: Arc<Proxy>,
    mut watcher: logskip::Watcher,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ALWAYS_POLL) => {}
        }
        apply_log_skip(&proxy, &mut watcher);
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
