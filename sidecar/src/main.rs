//! `egress-sidecar`: configured from the environment like the reference sidecar.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sidecar::always::Watcher;
use sidecar::api::{self, Api};
use sidecar::config::{Config, Mode};
use sidecar::dns::{self, Proxy};
use sidecar::nft::{self, Nft};
use sidecar::state::State;
use sidecar::{metrics, state};

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
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .init();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            init_logging("info");
            tracing::error!(error = %e, "egress sidecar cannot start");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log_level);
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
    let (mut watcher, errors) = Watcher::new(&config.rules_dir);
    for e in errors {
        // Without its deny rules the sidecar would let through what the operator forbade.
        if e.is_deny_file() {
            return Err(format!("{e}; refusing to start without the deny rules"));
        }
        tracing::error!(error = %e, "always-rule file ignored");
    }

    let nft = Nft::start();
    let state = State::start(&config, watcher.current().clone(), Some(nft))
        .await
        .map_err(|e| format!("cannot install the nftables table: {e}"))?;

    let proxy = Arc::new(Proxy::new(
        state.clone(),
        config.upstreams.clone(),
        config.upstream_timeout,
    ));
    dns::serve(proxy.clone(), config.dns_listen)
        .await
        .map_err(|e| format!("cannot listen for DNS on {}: {e}", config.dns_listen))?;
    // Port-53 traffic over IPv6 is redirected to [::1]; serve there too when the host has IPv6.
    if config.dns_listen.ip().is_loopback() {
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, config.dns_listen.port()));
        if let Err(e) = dns::serve(proxy, v6).await {
            tracing::debug!(error = %e, "no IPv6 loopback DNS listener");
        }
    }

    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| format!("cannot listen for the API on {}: {e}", config.http_addr))?;
    let api = Arc::new(Api {
        state: state.clone(),
        token: config.token.clone(),
        writes: tokio::sync::Mutex::new(()),
    });
    tokio::spawn(api::serve(api, listener));

    let watched = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ALWAYS_POLL).await;
            let (changed, errors) = watcher.poll();
            for e in errors {
                tracing::error!(error = %e, "always-rule file not applied; keeping its previous rules");
            }
            if let Some(rules) = changed
                && let Err(e) = watched.set_always(rules).await
            {
                tracing::error!(error = %e, "always-rule change not applied; retrying");
                watcher.retry();
            }
        }
    });

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

    wait_for_signal().await;
    // The table stays: a stopped sidecar leaves the namespace locked, and the next one takes
    // the table over.
    tracing::info!("egress sidecar stopping; nftables rules stay in place");
    Ok(())
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
