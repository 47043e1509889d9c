//! Assembling the Pingora server: the proxy listener behind the header deadline, the metrics
//! listener, the provider and the key reloader.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::prelude::*;
use pingora::proxy::HttpProxy;
use pingora::server::RunArgs;
use pingora::server::configuration::ServerConf;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::config::{Config, ConfigError, Provider};
use crate::conn::HeaderDeadline;
use crate::drain::{Drain, Signals};
use crate::keys::KeysReloader;
use crate::metrics::metrics;
use crate::provider::file::FileProvider;
use crate::proxy::{Gateway, Limits};
use crate::table::RouteTable;

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
    };

    let gateway = Gateway::new(
        config.mode,
        table.clone(),
        keys.clone(),
        drain.clone(),
        limits,
    );
    let mut proxy = HttpProxy::new(gateway, conf.clone());
    proxy.handle_init_modules();
    let app = HeaderDeadline {
        inner: Arc::new(proxy),
        timeout: Duration::from_secs(config.header_timeout_seconds),
    };
    let mut listener = Service::new("sandbox gateway".to_owned(), app);
    listener.add_tcp(&socket(config.bind, config.port));
    server.add_service(listener);

    let admin = Admin {
        table: table.clone(),
        drain: drain.clone(),
    };
    let mut metrics_service = Service::new("metrics".to_owned(), HttpServer::new_app(admin));
    metrics_service.add_tcp(&socket(config.bind, config.metrics_port));
    server.add_service(metrics_service);

    for provider in providers {
        match provider {
            Provider::File => {
                let path = config
                    .sandbox_file
                    .clone()
                    .ok_or(ConfigError::MissingSandboxFile)?;
                server.add_service(background_service(
                    "file provider",
                    FileProvider {
                        path,
                        table: table.clone(),
                    },
                ));
            }
            Provider::BatchSandbox | Provider::AgentSandbox => {
                return Err(ConfigError::KubernetesUnavailable(
                    config.provider_type.clone(),
                ));
            }
        }
    }
    if let Some(path) = config.secure_access_keys_file.clone() {
        server.add_service(background_service(
            "key reloader",
            KeysReloader { path, keys },
        ));
    }

    tracing::info!(
        port = config.port,
        metrics_port = config.metrics_port,
        mode = config.mode.label(),
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
