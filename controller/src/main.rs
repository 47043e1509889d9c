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
mod ratelimit;
mod recent;
mod reconcile;
mod renew;
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
use sandbox_api::cli::{self, Unbuilt};
use sandbox_api::egress::{MODE_DNS, MODE_DNS_NFT};

#[derive(Debug, Parser)]
#[command(
    name = "sandbox-controller",
    version,
    // A flag given twice: the last wins, as with Go's flag package.
    args_override_self = true,
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
    /// The reference's form of the health listener: `[host]:port` (`:8081` is every address);
    /// `0` turns it off. Wins over `--bind` and `--health-port`.
    #[arg(long)]
    health_probe_bind_address: Option<String>,
    /// The reference's form of the metrics listener: `[host]:port`; `0` turns the separate
    /// listener off (`/metrics` stays on the health listener). Wins over `--metrics-port`.
    #[arg(long)]
    metrics_bind_address: Option<String>,
    /// Reconcile only while holding the leader lease (`--leader-elect` alone means true).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
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
    /// The reference's log level: debug, info, warn, error (dpanic, panic, fatal: error), or a
    /// number of 1 or more for more detail. Wins over `--log-level`.
    #[arg(long)]
    zap_log_level: Option<String>,
    /// Requests per second to the API server, as client-go's limiter (0: no limit).
    #[arg(long, default_value_t = 0.0)]
    kube_client_qps: f64,
    /// Requests the limiter lets through at once after a quiet time (default: the qps, at least 1).
    #[arg(long, default_value_t = 0)]
    kube_client_burst: u32,
    /// Parallel reconciles, the reference's form: `batchsandbox=N` (`;`-separated; other
    /// controllers of the reference are not built here and are logged).
    #[arg(long)]
    concurrency: Option<String>,
    /// Take OSEP-0009 renew intents off Redis and extend opted-in sandboxes (leader only).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    renew_intent_enabled: bool,
    /// Redis of the renew intents: `redis://[user:password@]host[:port][/db]` or `unix:///path`.
    #[arg(long, default_value = sandbox_api::renew::DEFAULT_REDIS_DSN)]
    renew_intent_redis_dsn: String,
    /// Redis password, so it need not be in the DSN on the command line (wins over the DSN's).
    #[arg(long, env = sandbox_api::renew::ENV_REDIS_PASSWORD, hide_env_values = true, conflicts_with = "renew_intent_redis_password_file")]
    renew_intent_redis_password: Option<String>,
    /// File holding the Redis password (wins over the DSN's).
    #[arg(long)]
    renew_intent_redis_password_file: Option<PathBuf>,
    /// The Redis list renew intents are taken from.
    #[arg(long, default_value = sandbox_api::renew::DEFAULT_QUEUE_KEY)]
    renew_intent_queue_key: String,
}

const SNAPSHOTS: &str = "pause/resume snapshots are not built here";
const METRICS_TLS: &str = "metrics are served over plain HTTP (keep the port inside the cluster)";
const LOG_FILES: &str = "logs go to stdout as JSON lines; collect them from the container";
const ZAP_FORMAT: &str = "logs are always JSON lines with RFC 3339 times";

/// The reference controller's flags for features not built here: accepted, logged once.
const UNBUILT: &[Unbuilt] = &[
    Unbuilt {
        name: "metrics-secure",
        takes_value: false,
        why: METRICS_TLS,
    },
    Unbuilt {
        name: "metrics-cert-path",
        takes_value: true,
        why: METRICS_TLS,
    },
    Unbuilt {
        name: "metrics-cert-name",
        takes_value: true,
        why: METRICS_TLS,
    },
    Unbuilt {
        name: "metrics-cert-key",
        takes_value: true,
        why: METRICS_TLS,
    },
    Unbuilt {
        name: "webhook-cert-path",
        takes_value: true,
        why: "no admission webhooks are served",
    },
    Unbuilt {
        name: "webhook-cert-name",
        takes_value: true,
        why: "no admission webhooks are served",
    },
    Unbuilt {
        name: "webhook-cert-key",
        takes_value: true,
        why: "no admission webhooks are served",
    },
    Unbuilt {
        name: "enable-http2",
        takes_value: false,
        why: "no HTTP/2 or TLS servers here",
    },
    Unbuilt {
        name: "allow-weak-tls-keylengths",
        takes_value: false,
        why: "no HTTP/2 or TLS servers here",
    },
    Unbuilt {
        name: "enable-file-log",
        takes_value: false,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "log-file-path",
        takes_value: true,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "log-max-size",
        takes_value: true,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "log-max-backups",
        takes_value: true,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "log-max-age",
        takes_value: true,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "log-compress",
        takes_value: false,
        why: LOG_FILES,
    },
    Unbuilt {
        name: "image-committer-image",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "containerd-socket-path",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "commit-job-timeout",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "snapshot-registry",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "snapshot-registry-insecure",
        takes_value: false,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "snapshot-push-secret",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "resume-pull-secret",
        takes_value: true,
        why: SNAPSHOTS,
    },
    Unbuilt {
        name: "zap-devel",
        takes_value: false,
        why: ZAP_FORMAT,
    },
    Unbuilt {
        name: "zap-encoder",
        takes_value: true,
        why: ZAP_FORMAT,
    },
    Unbuilt {
        name: "zap-stacktrace-level",
        takes_value: true,
        why: ZAP_FORMAT,
    },
    Unbuilt {
        name: "zap-time-encoding",
        takes_value: true,
        why: ZAP_FORMAT,
    },
];

impl Config {
    /// The tracing level: `--zap-log-level` when given, else `--log-level`.
    fn level(&self) -> Result<&'static str, String> {
        if let Some(zap) = &self.zap_log_level {
            return Ok(match zap.trim().to_ascii_lowercase().as_str() {
                "debug" => "debug",
                "info" => "info",
                "warn" | "warning" => "warn",
                "error" | "dpanic" | "panic" | "fatal" => "error",
                n => match n.parse::<u32>() {
                    Ok(1) => "debug",
                    Ok(v) if v > 1 => "trace",
                    _ => {
                        return Err(format!(
                            "--zap-log-level: {zap:?} is not debug, info, warn, error or a number of 1 or more"
                        ));
                    }
                },
            });
        }
        Ok(match self.log_level.to_ascii_lowercase().as_str() {
            "error" => "error",
            "warn" | "warning" => "warn",
            "info" => "info",
            "debug" => "debug",
            "trace" => "trace",
            _ => {
                return Err(format!(
                    "--log-level: {:?} is not error, warn, info, debug or trace",
                    self.log_level
                ));
            }
        })
    }

    /// The health and metrics listeners; `None` is off.
    fn listeners(&self) -> Result<[(&'static str, Option<SocketAddr>); 2], String> {
        let health = match &self.health_probe_bind_address {
            Some(text) => bind_address("--health-probe-bind-address", text)?,
            None => Some(SocketAddr::new(self.bind, self.health_port)),
        };
        let metrics = match &self.metrics_bind_address {
            Some(text) => bind_address("--metrics-bind-address", text)?,
            None => Some(SocketAddr::new(self.bind, self.metrics_port)),
        };
        Ok([("health", health), ("metrics", metrics)])
    }

    /// Parallel reconciles (0: no limit) and the controllers named that are not built here.
    fn concurrency(&self) -> Result<(u16, Vec<String>), String> {
        let mut n = 0;
        let mut other = Vec::new();
        for pair in self.concurrency.as_deref().unwrap_or("").split(';') {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let Some((name, value)) = pair.split_once('=') else {
                return Err(format!("--concurrency: {pair:?} is not controller=N"));
            };
            let value: u16 = match value.trim().parse() {
                Ok(v) if v > 0 => v,
                _ => {
                    return Err(format!(
                        "--concurrency: {:?} for {} is not a whole number from 1 to 65535",
                        value.trim(),
                        name.trim()
                    ));
                }
            };
            match name.trim() {
                "batchsandbox" => n = value,
                name => other.push(name.to_owned()),
            }
        }
        Ok((n, other))
    }

    fn rate_limit(&self) -> Result<Option<ratelimit::RateLimit>, String> {
        if !self.kube_client_qps.is_finite() || self.kube_client_qps < 0.0 {
            return Err(format!(
                "--kube-client-qps: {} is not a rate of 0 or more",
                self.kube_client_qps
            ));
        }
        if self.kube_client_qps == 0.0 {
            return Ok(None);
        }
        let burst = if self.kube_client_burst > 0 {
            self.kube_client_burst
        } else {
            self.kube_client_qps.ceil().max(1.0) as u32
        };
        Ok(Some(ratelimit::RateLimit {
            qps: self.kube_client_qps,
            burst,
        }))
    }
}

/// Go's listen-address forms: `:8081` (every address), `host:port`, `[v6]:port`; `0` is off.
fn bind_address(flag: &str, text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text == "0" || text.is_empty() {
        return Ok(None);
    }
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.replace("localhost:", "127.0.0.1:"),
    };
    full.parse()
        .map(Some)
        .map_err(|_| format!("{flag}: {text:?} is not [host]:port or 0"))
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
    let builder = kube::client::ClientBuilder::try_from(kube_config).map_err(|e| e.to_string())?;
    Ok(match config.rate_limit()? {
        Some(limit) => builder.with_layer(&limit).build(),
        None => builder.build(),
    })
}

fn identity(config: &Config) -> String {
    config.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "sandbox-controller".into(), |h| h.trim().to_owned())
    }) + &format!("-{}", std::process::id())
}

#[tokio::main]
async fn main() {
    let (args, unbuilt) = cli::set_aside(cli::normalize(std::env::args()), UNBUILT);
    let config = Config::parse_from(args);
    let level = match config.level() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandbox-controller: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "{level},kube=warn"
        )))
        .init();
    for flag in unbuilt {
        tracing::warn!(flag = %format!("--{}", flag.name), why = flag.why, "flag accepted and ignored: not supported");
    }
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
    let listeners = config.listeners()?;
    let (concurrency, other_controllers) = config.concurrency()?;
    for name in other_controllers {
        tracing::warn!(controller = %name, "--concurrency: controller not built here; ignored");
    }
    let renew = if config.renew_intent_enabled {
        let password = match &config.renew_intent_redis_password_file {
            Some(path) => Some(
                sandbox_api::renew::password_file(path)
                    .map_err(|e| format!("--renew-intent-redis-password-file {e}"))?,
            ),
            None => config
                .renew_intent_redis_password
                .clone()
                .filter(|p| !p.is_empty()),
        };
        if config.renew_intent_queue_key.trim().is_empty() {
            return Err("--renew-intent-queue-key must not be empty".into());
        }
        let info =
            sandbox_api::renew::connection(&config.renew_intent_redis_dsn, password.as_deref())
                .map_err(|e| format!("--renew-intent-redis-dsn: {e}"))?;
        Some(redis::Client::open(info).map_err(|e| format!("--renew-intent-redis-dsn: {e}"))?)
    } else {
        None
    };
    let _ = metrics::metrics();
    let client = client(&config).await?;
    let health = Arc::new(health::Health::default());
    for (listener, addr) in listeners {
        let Some(addr) = addr else {
            tracing::info!(listener, "listener off");
            continue;
        };
        let socket = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
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
    .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
    .owns_stream(pods)
    .owns_stream(secrets);
    tokio::spawn(report_backlog(controller.store()));
    if let Some(redis) = renew {
        let consumer = renew::Consumer {
            client: redis,
            queue_key: config.renew_intent_queue_key.clone(),
            sandboxes: controller.store(),
            kube: client.clone(),
            events: ctx.events.clone(),
        };
        tokio::spawn(consumer.run());
    }
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
