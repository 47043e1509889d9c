//! Assembling the Pingora server: the proxy listener behind the header deadline, the metrics
//! listener, the provider and the key reloader.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::prelude::*;
use pingora::proxy::HttpProxy;
use pingora::server::RunArgs;
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::config::{Config, ConfigError, Provider};
use crate::conn::HeaderDeadline;
use crate::drain::{Drain, Signals};
use crate::keys::KeysReloader;
use crate::lean::Lean;
use crate::limit::Budgets;
use crate::metrics::metrics;
use crate::provider::file;
use crate::provider::file::FileProvider;
use crate::provider::kubernetes::{Kind, KubeProvider};
use crate::proxy::{Gateway, Limits, Proxy};
use crate::renew::Renewer;
use crate::table::{RouteTable, TableWriter};
use crate::tls::{Reloader, Resolver};
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;

/// Validates the configuration, binds the listeners and serves until shut down.
pub fn run(config: Config) -> Result<(), ConfigError> {
    let (providers, keys) = config.validate()?;
    // Register every metric before serving so a registration fault shows at start-up.
    let _ = metrics();

    let conf = Arc::new(server_conf(&config));
    let mut server = Server::new_with_opt_and_conf(None, server_conf(&config));

    let table = Arc::new(RouteTable::default());
    let keys = Arc::new(ArcSwap::from_pointee(keys));
    let drain = Arc::new(Drain::default());
    let limits = Limits {
        max_header_bytes: config.max_header_bytes,
        connect_timeout: Duration::from_millis(config.upstream_connect_timeout_ms),
        idle_timeout: Duration::from_secs(config.upstream_idle_timeout_seconds),
        budgets: Budgets {
            per_client: config.auth_failures_per_minute,
            per_sandbox: config.signature_failures_per_sandbox_per_minute,
            window: Duration::from_secs(60),
            capacity: config.auth_limiter_max_clients,
        },
        max_signed_route_lifetime: Some(config.max_signed_route_lifetime).filter(|&s| s > 0),
        denied_ports: config.denied_ports()?,
        trusted_proxies: config.trusted_proxies()?,
    };

    let mut background: Vec<(String, Box<dyn BackgroundService + Send + Sync>)> = Vec::new();
    let renewer = match config.renew()? {
        Some(renew) => {
            let (renewer, publisher) = Renewer::new(renew).map_err(ConfigError::RedisDsn)?;
            background.push(("renew-intent publisher".into(), Box::new(publisher)));
            Some(renewer)
        }
        None => None,
    };
    let gateway = Arc::new(
        Gateway::new(
            config.mode,
            table.clone(),
            keys.clone(),
            drain.clone(),
            limits,
        )
        .with_renewer(renewer),
    );
    let mut proxy = HttpProxy::new(Proxy(gateway.clone()), conf.clone());
    proxy.handle_init_modules();
    if config.http2 {
        // HTTP/2 over TLS by ALPN, and in cleartext with prior knowledge (h2c) when on.
        let mut options = HttpServerOptions::default();
        options.h2c = config.h2c;
        options.h2_idle_timeout = Some(Duration::from_secs(config.h2_idle_timeout_seconds.max(1)));
        proxy.server_options = Some(options);
        proxy.h2_options = Some(config.h2_options()?);
    }
    // The TLS port is a TCP listener whose handshakes `HeaderDeadline` runs itself: after the
    // PROXY header when there is one, and under the header timeout.
    let tls = match config.tls()? {
        Some((pairs, certs)) => {
            let resolver = Resolver::new(certs);
            let mut settings =
                TlsSettings::intermediate("", "").map_err(|e| ConfigError::Tls(e.to_string()))?;
            settings.set_cert_resolver(resolver.clone());
            if config.http2 {
                settings.enable_h2();
            }
            background.push((
                "TLS certificate reloader".into(),
                Box::new(Reloader { pairs, resolver }),
            ));
            Some((config.tls_port, Arc::new(settings.build())))
        }
        None => None,
    };
    let tls_port = tls.as_ref().map(|(port, _)| *port);
    let app = HeaderDeadline {
        inner: Arc::new(proxy),
        timeout: Duration::from_secs(config.header_timeout_seconds),
        keepalive: Duration::from_secs(config.keepalive_timeout_seconds),
        proxy_protocol: config.proxy_protocol,
        lean: config.lean_path.then(|| Lean::new(gateway.clone())),
        h2_control_rate: config.h2_max_control_frames_per_second,
        h2c: config.http2 && config.h2c,
        tls,
    };
    let mut listener = Service::new("sandbox gateway".to_owned(), app);
    listener.add_tcp(&socket(config.bind, config.port));
    if let Some(port) = tls_port {
        listener.add_tcp(&socket(config.bind, port));
    }
    server.add_service(listener);

    let admin = Admin {
        table: table.clone(),
        drain: drain.clone(),
    };
    let mut metrics_service = Service::new("metrics".to_owned(), HttpServer::new_app(admin));
    metrics_service.add_tcp(&socket(config.bind, config.metrics_port));
    server.add_service(metrics_service);

    let policy = Arc::new(config.upstream_policy()?);
    let mut services = background;
    let mut sources = Vec::new();
    let writer_slot: Arc<Mutex<TableWriter>> =
        Arc::new(Mutex::new(TableWriter::new(table.clone(), [])));
    let kube = if providers.iter().any(|p| *p != Provider::File) {
        Some(kube_config(&config)?)
    } else {
        None
    };
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config
            .namespaces
            .iter()
            .map(|n| Some(n.trim().to_owned()))
            .collect()
    };
    for provider in providers {
        let kind = match provider {
            Provider::File => {
                let path = config
                    .sandbox_file
                    .clone()
                    .ok_or(ConfigError::MissingSandboxFile)?;
                sources.push(file::SOURCE.to_owned());
                let service = FileProvider {
                    path,
                    writer: writer_slot.clone(),
                    policy: policy.clone(),
                };
                services.push(("file provider".into(), Box::new(service)));
                continue;
            }
            Provider::BatchSandbox => Kind::BatchSandbox,
            Provider::AgentSandbox => Kind::AgentSandbox,
        };
        for namespace in &namespaces {
            let service = KubeProvider {
                kind,
                client: kube
                    .clone()
                    .ok_or_else(|| ConfigError::Kubernetes("no configuration".into()))?,
                namespace: namespace.clone(),
                label_selector: config.label_selector.clone(),
                initial_list: config.initial_list,
                writer: writer_slot.clone(),
                table: table.clone(),
                policy: policy.clone(),
            };
            sources.push(service.source());
            services.push((format!("{} watch", service.source()), Box::new(service)));
        }
    }
    if let Ok(mut w) = writer_slot.lock() {
        *w = TableWriter::new(table.clone(), sources);
    }
    for (name, service) in services {
        server.add_service(background_service(&name, BoxedBackground(service)));
    }
    if let Some(path) = config.secure_access_keys_file.clone() {
        crate::keys::warn_if_exposed(&path);
        server.add_service(background_service(
            "key reloader",
            KeysReloader { path, keys },
        ));
    }

    tracing::info!(
        port = config.port,
        metrics_port = config.metrics_port,
        mode = config.mode.label(),
        tls_port = (!config.tls_cert_file.is_empty()).then_some(config.tls_port),
        renew_intents = config.renew_intent_enabled,
        "sandbox gateway starting"
    );
    server.bootstrap();
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            drain,
            grace: Duration::from_secs(config.shutdown_grace_seconds),
        }),
    });
    Ok(())
}

fn socket(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn server_conf(config: &Config) -> ServerConf {
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    ServerConf {
        threads,
        // The drain in `drain.rs` exits as soon as in-flight work is done; this is the upper bound.
        grace_period_seconds: Some(config.shutdown_grace_seconds),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 4096,
        ..ServerConf::default()
    }
}

/// Lets differently typed providers share one list.
struct BoxedBackground(Box<dyn BackgroundService + Send + Sync>);

#[async_trait::async_trait]
impl BackgroundService for BoxedBackground {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.start(shutdown).await
    }
}

/// Loads the Kubernetes client configuration before anything binds, so a broken kubeconfig
/// stops start-up with a clear error.
fn kube_config(config: &Config) -> Result<kube::Config, ConfigError> {
    let err = |e: String| ConfigError::Kubernetes(e);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    runtime.block_on(async {
        match &config.kubeconfig {
            // A single file; a KUBECONFIG list is merged by `infer`.
            Some(path) if !path.to_string_lossy().contains(':') => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| err(format!("--kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| err(format!("--kubeconfig {}: {e}", path.display())))
            }
            _ => kube::Config::infer().await.map_err(|e| err(e.to_string())),
        }
    })
}
