//! `sandbox-controller`: runs BatchSandbox pods and publishes where they live.
#![forbid(unsafe_code)]

mod cache;
mod error;
mod events;
mod fence;
mod health;
mod json;
mod leader;
mod metrics;
mod object;
mod pod;
mod recent;
mod reconcile;
mod secret;
mod sidecar;
mod status;
mod tokens;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use object::BatchSandbox;
use sandbox_api::egress::{MODE_DNS, MODE_DNS_NFT};

#[derive(Debug, Parser)]
#[command(
    name = "sandbox-controller",
    version,
    about = "BatchSandbox controller"
)]
struct Config {
    /// Kubeconfig (default: in-cluster, then `KUBECONFIG`, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Image of the injected egress sidecar.
    #[arg(long, default_value = "opensandbox/egress:latest")]
    egress_image: String,
    /// `OPENSANDBOX_EGRESS_MODE` given to the sidecar: `dns+nft` (names and addresses
    /// enforced) or `dns` (names only).
    #[arg(long, default_value = MODE_DNS_NFT)]
    egress_mode: String,
    /// Upper bound on `spec.replicas`; larger values are capped.
    #[arg(long, default_value_t = 1000)]
    max_replicas: u32,
    /// Address of the health and metrics listeners.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Port of `/healthz` and `/readyz` (and `/metrics`); 0 picks a free one (logged).
    #[arg(long, default_value_t = 8081)]
    health_port: u16,
    /// Port of `/metrics`; 0 picks a free one (logged).
    #[arg(long, default_value_t = 8080)]
    metrics_port: u16,
    /// Reconcile only while holding the leader lease.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader lease.
    #[arg(long, default_value = "sandbox-controller")]
    lease_name: String,
    /// Namespace of the leader lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a standby waits after the leader's last renewal before taking over.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// This process's name in the lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// Counts, from the controller's cache, the objects whose latest spec has not been reconciled.
async fn report_backlog(store: Store<BatchSandbox>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let pending = store
            .state()
            .iter()
            .filter(|o| {
                o.status
                    .as_ref()
                    .and_then(|s| s["observedGeneration"].as_i64())
                    != o.metadata.generation
            })
            .count();
        metrics::metrics().pending.set(pending as i64);
    }
}

async fn client(config: &Config) -> Result<Client, String> {
    let kube_config = match &config.kubeconfig {
        Some(path) if !path.to_string_lossy().contains(':') => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string())?
        }
        _ => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    Client::try_from(kube_config).map_err(|e| e.to_string())
}

fn identity(config: &Config) -> String {
    config.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "sandbox-controller".into(), |h| h.trim().to_owned())
    }) + &format!("-{}", std::process::id())
}

#[tokio::main]
async fn main() {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "{},kube=warn",
            config.log_level
        )))
        .init();
    if let Err(e) = run(config).await {
        eprintln!("sandbox-controller: {e}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> Result<(), String> {
    if ![MODE_DNS, MODE_DNS_NFT].contains(&config.egress_mode.as_str()) {
        return Err(format!(
            "--egress-mode: {:?} is not {MODE_DNS} or {MODE_DNS_NFT}",
            config.egress_mode
        ));
    }
    let _ = metrics::metrics();
    let client = client(&config).await?;
    let health = Arc::new(health::Health::default());
    for (listener, port) in [
        ("health", config.health_port),
        ("metrics", config.metrics_port),
    ] {
        let socket = tokio::net::TcpListener::bind(SocketAddr::new(config.bind, port))
            .await
            .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(listener, %addr, "listening");
        tokio::spawn(health::serve(socket, health.clone()));
    }
    health.ready.store(true, Ordering::Release);

    let election = leader::Election {
        api: Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
        name: config.lease_name.clone(),
        identity: identity(&config),
        duration: Duration::from_secs(config.lease_duration_seconds.max(3)),
    };
    if config.leader_elect {
        tokio::select! {
            _ = election.acquire() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }

    // Pods and token Secrets come from watches that keep caches the passes read from, so a
    // pass asks the API server only to change something.
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (secret_store, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let ctx = Arc::new(reconcile::Context {
        client: client.clone(),
        pods: cache::Pods::new(pod_store),
        secrets: secret::Secrets::new(secret_store),
        events: events::Events::start(Recorder::new(
            client.clone(),
            Reporter {
                controller: "sandbox-controller".into(),
                instance: Some(election.identity.clone()),
            },
        )),
        recent: recent::Recent::default(),
        egress_image: config.egress_image.clone(),
        egress_mode: config.egress_mode.clone(),
        max_replicas: config.max_replicas,
    });
    let index = ctx.clone();
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(pod::LABEL_NAME),
    )
    .default_backoff()
    .modify(|p| p.managed_fields_mut().clear())
    .reflect(pod_writer)
    .inspect(move |event| {
        if let Ok(event) = event {
            index.pods.observe(event);
        }
    })
    .touched_objects();
    // Metadata only: a deleted or changed token Secret brings its owner back, and no token is
    // cached here.
    let secret_selector = format!("{}={}", secret::LABEL, secret::LABEL_VALUE);
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().labels(&secret_selector),
    )
    .default_backoff()
    .modify(|s| s.managed_fields_mut().clear())
    .reflect(secret_writer)
    .touched_objects();
    let controller = Controller::new(
        Api::<BatchSandbox>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns_stream(pods)
    .owns_stream(secrets);
    tokio::spawn(report_backlog(controller.store()));
    let controller = controller
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "controller");
            }
        });
    tracing::info!("controller running");
    if config.leader_elect {
        tokio::select! {
            _ = controller => Ok(()),
            _ = election.hold() => Err("lost the leader lease; exiting so a fresh process can stand by".into()),
        }
    } else {
        controller.await;
        Ok(())
    }
}
