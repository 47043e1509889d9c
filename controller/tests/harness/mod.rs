//! The controller under test, started as a process, and waiting on conditions; shared by the
//! controller's integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::TempDir;
use crate::support::k8s::ControlPlane;

pub struct Controller {
    pub child: Child,
    log: PathBuf,
    /// Where `/healthz`, `/readyz` and `/metrics` answer (the controller picked the port).
    pub health: SocketAddr,
    _dir: TempDir,
}

impl Controller {
    pub fn start(plane: &ControlPlane, extra: &[&str]) -> Self {
        Self::start_with(&plane.kubeconfig, extra)
    }

    /// The controller with the credentials of `kubeconfig`.
    pub fn start_with(kubeconfig: &Path, extra: &[&str]) -> Self {
        let dir = TempDir::new();
        let log = dir.path().join("controller.log");
        // Port 0: the controller binds and logs the address, so no port is released and
        // bound again.
        let child = Command::new(env!("CARGO_BIN_EXE_sandbox-controller"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--bind",
                "127.0.0.1",
                "--health-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .args([
                "--leader-elect",
                "--lease-duration-seconds",
                "3",
                "--egress-image",
                "egress:test",
            ])
            .args(extra)
            .env_remove("KUBECONFIG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sandbox-controller");
        let mut controller = Controller {
            child,
            log,
            health: SocketAddr::from(([127, 0, 0, 1], 0)),
            _dir: dir,
        };
        controller.health = eventually("health listener", Duration::from_secs(20), || {
            controller.log_text().lines().find_map(|line| {
                let entry: Value = serde_json::from_str(line).ok()?;
                (entry["message"] == "listening" && entry["listener"] == "health")
                    .then(|| entry["addr"].as_str()?.parse().ok())?
            })
        });
        controller
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.try_metric(name)
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// The sample's value, or `None` while the series does not exist yet (a labelled counter
    /// appears on its first increment).
    pub fn try_metric(&self, name: &str) -> Option<f64> {
        let body = crate::support::client::blocking_get(self.health, "/metrics")
            .unwrap()
            .body_text();
        body.lines()
            .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "controller ({:?}) log:\n{}",
                self.child.try_wait(),
                self.log_text()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn eventually<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    eventually_every(what, limit, Duration::from_millis(50), f)
}

/// `eventually`, asking every `every`: listing a thousand objects is itself work that would
/// slow down the controller under test.
pub fn eventually_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        std::thread::sleep(every);
    }
}
