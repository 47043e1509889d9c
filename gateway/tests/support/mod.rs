//! Test harness: the real gateway binary, real upstream servers on loopback, a real HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod chart_metrics;
pub mod client;
pub mod k8s;
pub mod pki;
pub mod redis;
pub mod upstream;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it gives a value, for up to `limit`; fails naming `what`.
pub fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback address of this test's own, so fixed sandbox ports (the signed vectors name them)
/// never collide with other tests or programs.
pub fn unique_loopback() -> IpAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() % 200 * 256;
    IpAddr::V4(Ipv4Addr::new(
        127,
        77 + (n / 65536 % 100) as u8,
        (n / 256 % 256) as u8,
        (n % 254 + 1) as u8,
    ))
}

/// A port nobody listens on now, never handed out twice in this process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One sandbox object for the sandbox file.
pub fn batch_sandbox(
    name: &str,
    namespace: &str,
    ready: i64,
    endpoints: Option<&str>,
    token: Option<&str>,
) -> String {
    let mut annotations = String::new();
    if let Some(e) = endpoints {
        annotations.push_str(&format!("    sandbox.opensandbox.io/endpoints: '{e}'\n"));
    }
    if let Some(t) = token {
        annotations.push_str(&format!("    opensandbox.io/secure-access-token: {t}\n"));
    }
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    format!(
        "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{annotations}spec:\n  replicas: 1\nstatus:\n  replicas: 1\n  ready: {ready}\n"
    )
}

/// A temporary directory removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    /// Writes `name` atomically (temp file + rename), as a careful operator or ConfigMap would.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        let tmp = self.0.path().join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

/// The real `sandbox-gateway` process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

pub struct GatewayOptions<'a> {
    /// Listen address (default: a loopback address of the test's own); an unspecified
    /// address listens on every address, reached at 127.0.0.1.
    pub bind: Option<IpAddr>,
    pub mode: &'a str,
    pub keys: Option<&'a str>,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Default for GatewayOptions<'_> {
    fn default() -> Self {
        Self {
            bind: None,
            mode: "header",
            keys: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The gateway binary: Cargo's for the gateway's tests, `SANDBOX_GATEWAY_BIN` for benchmarks,
/// else the workspace build next to the running test.
pub fn gateway_binary() -> String {
    option_env!("CARGO_BIN_EXE_sandbox-gateway")
        .map(str::to_owned)
        .or_else(|| std::env::var("SANDBOX_GATEWAY_BIN").ok())
        .or_else(|| {
            // Other packages' tests: the workspace's binaries sit next to the test's `deps/`.
            let exe = std::env::current_exe().ok()?;
            let bin = exe.parent()?.parent()?.join("sandbox-gateway");
            bin.exists().then(|| {
                refuse_stale(&bin);
                bin.display().to_string()
            })
        })
        .expect("set SANDBOX_GATEWAY_BIN to the sandbox-gateway binary")
}

/// Panics when `bin` is older than a source it is built from: a test must not pass or fail
/// on yesterday's gateway (`cargo test --workspace` builds it first; a single package's tests
/// do not).
fn refuse_stale(bin: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        let mut latest = None;
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            let t = if path.is_dir() {
                newest(&path)
            } else {
                entry.metadata().ok()?.modified().ok()
            };
            latest = latest.max(t);
        }
        latest
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("gateway/src").is_dir())
        .map(Path::to_path_buf);
    let (Some(root), Ok(built)) = (root, std::fs::metadata(bin).and_then(|m| m.modified())) else {
        return;
    };
    let sources = ["gateway/src", "controller/api/src"]
        .iter()
        .filter_map(|d| newest(&root.join(d)))
        .chain(
            ["gateway/Cargo.toml", "Cargo.lock"]
                .iter()
                .filter_map(|f| std::fs::metadata(root.join(f)).ok()?.modified().ok()),
        )
        .max();
    if let Some(source) = sources {
        assert!(
            built >= source,
            "{} is older than its sources; build it first (cargo build -p gateway --bin \
             sandbox-gateway, or cargo test --workspace)",
            bin.display()
        );
    }
}

impl Gateway {
    /// Starts the gateway on a sandbox file and waits until it is ready.
    pub fn start(sandbox_file: &Path, opts: GatewayOptions<'_>) -> Self {
        let gw = Self::spawn(sandbox_file, opts);
        gw.wait_ready();
        gw
    }

    pub fn spawn(sandbox_file: &Path, opts: GatewayOptions<'_>) -> Self {
        let provider = vec![
            "--provider-type".into(),
            "file".into(),
            "--sandbox-file".into(),
            sandbox_file.display().to_string(),
        ];
        Self::spawn_with(provider, opts)
    }

    /// Starts the gateway with the given provider flags.
    pub fn spawn_with(provider: Vec<String>, opts: GatewayOptions<'_>) -> Self {
        let dir = TempDir::new();
        let log = dir.path().join("gateway.log");
        // A loopback address of its own with fixed ports: nothing else binds there, so the
        // ports cannot be taken between choosing and binding them (a port 0 probe could).
        let ip = opts.bind.unwrap_or_else(unique_loopback);
        let (port, metrics_port) = (28888, 28889);
        let mut cmd = Command::new(gateway_binary());
        cmd.args(["--bind", &ip.to_string(), "--threads", "1"])
            .args(&provider)
            .args([
                "--port",
                &port.to_string(),
                "--metrics-port",
                &metrics_port.to_string(),
                "--mode",
                opts.mode,
            ])
            .args(&opts.extra)
            .env_remove("OPENSANDBOX_SECURE_ACCESS_KEYS")
            .env_remove("KUBECONFIG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        if let Some(keys) = opts.keys {
            cmd.args(["--secure-access-keys", keys]);
        }
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start sandbox-gateway");
        let ip = if ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            ip
        };
        Self {
            child,
            addr: SocketAddr::new(ip, port),
            metrics: SocketAddr::new(ip, metrics_port),
            log,
            _dir: dir,
        }
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // Pingora starts each listener on its own thread: the metrics port can answer
            // before the proxy port is bound.
            if client::blocking_get(self.metrics, "/readyz").is_ok_and(|r| r.status == 200)
                && std::net::TcpStream::connect(self.addr).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("gateway not ready; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the log (written off the request path) to contain `needle`; panics with the
    /// log when it does not within 5 seconds.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log lacks {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of a metric line starting with `prefix` (name and labels), or 0.
    pub fn metric(&self, prefix: &str) -> f64 {
        let body = client::blocking_get(self.metrics, "/metrics")
            .map(|r| r.body_text())
            .unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits up to five seconds for a metric to reach `want` and checks it stays there a
    /// moment. For counters that move after the client has its answer: requests and the
    /// access log are counted once the response is written, intents once Redis acknowledges.
    pub fn metric_settles(&self, prefix: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.metric(prefix) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.metric(prefix), want, "{prefix}");
    }

    /// Waits up to five seconds for a metric to reach at least `least`.
    pub fn metric_reaches(&self, prefix: &str, least: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.metric(prefix);
            if seen >= least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix} is {seen}, not {least} or more"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One open sandbox `box` on a loopback address of its own, in front of a fresh upstream, with
/// a gateway in `opts.mode`. Returns the gateway, the upstream, the directory holding the
/// sandbox file, and the Host that routes to the upstream.
pub fn single_sandbox(opts: GatewayOptions<'_>) -> (Gateway, upstream::Upstream, TempDir, String) {
    let ip = unique_loopback();
    let upstream = upstream::Upstream::start(ip, 0);
    let dir = TempDir::new();
    let file = dir.write(
        "s.yaml",
        &batch_sandbox("box", "a", 1, Some(&format!(r#"["{ip}"]"#)), None),
    );
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    (Gateway::start(&file, opts), upstream, dir, host)
}

/// The gateway on Kubernetes `providers` (e.g. `batchsandbox,agent-sandbox`), not yet ready.
/// The tests' upstreams listen on loopback, which the Kubernetes providers refuse by default:
/// it is allowed here unless `opts` sets `--allowed-upstream-cidrs` itself.
pub fn kube_gateway(kubeconfig: &Path, providers: &str, opts: GatewayOptions<'_>) -> Gateway {
    let mut provider = vec![
        "--provider-type".into(),
        providers.into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    if !opts
        .extra
        .iter()
        .any(|a| a.starts_with("--allowed-upstream-cidrs"))
    {
        provider.extend([
            "--allowed-upstream-cidrs".into(),
            "127.0.0.0/8,::1/128".into(),
        ]);
    }
    Gateway::spawn_with(provider, opts)
}

/// Runs the gateway expecting it to refuse `args`; its standard error. One that starts instead
/// is stopped and fails the test rather than hanging it. The credentials a test may pass
/// through the environment are cleared, so only `args` decide.
pub fn start_fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let mut child = Command::new(gateway_binary())
        .args(args)
        .env_remove("OPENSANDBOX_SECURE_ACCESS_KEYS")
        .env_remove("OPENSANDBOX_RENEW_INTENT_REDIS_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// As [`start_fails`], on a file provider with an empty sandbox file and ports of no use.
pub fn start_fails_with<S: AsRef<str>>(args: &[S]) -> String {
    let dir = TempDir::new();
    let file = dir.write("s.yaml", "");
    let mut all: Vec<String> = [
        "--provider-type",
        "file",
        "--sandbox-file",
        file.to_str().unwrap(),
        "--bind",
        "127.0.0.1",
        "--port",
        "1",
        "--metrics-port",
        "2",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    all.extend(args.iter().map(|a| a.as_ref().to_owned()));
    start_fails(&all)
}
