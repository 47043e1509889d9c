//! A two-host lab in network namespaces: a "sandbox" namespace running the sidecar and the
//! client tools, and an "upstream" namespace with dnsmasq answering a test zone and a web
//! server on 198.51.100.10 (allowed.test) and 198.51.100.20 (blocked.test). Documentation
//! addresses only, no route out, everything removed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const DNS: &str = "198.51.100.2";
pub const ALLOWED_IP: &str = "198.51.100.10";
pub const BLOCKED_IP: &str = "198.51.100.20";
pub const ALLOWED_IP6: &str = "2001:db8::10";
pub const BLOCKED_IP6: &str = "2001:db8::20";
pub const TOKEN: &str = "test-token";
/// Private addresses some test names answer with (DNS rebinding); served by
/// [`Lab::serve_private`].
pub const PRIVATE_IP: &str = "10.0.0.10";
pub const PRIVATE_IP6: &str = "fd00::10";

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/setup.sh installs it)"))
}

fn ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Directory holding the cargo-built examples (next to the test executable's `deps`).
fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples")
}

/// Polls `f` every 50 ms until it gives a value, for up to `limit`; fails with what `what`
/// says then (called once, at the failure).
pub fn eventually<T>(
    limit: Duration,
    what: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{}", what());
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn example(name: &str) -> PathBuf {
    let path = examples_dir().join(name);
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "sidecar", "--example", name])
            .status()
            .unwrap();
        assert!(status.success(), "building example {name}");
    }
    path
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .expect("the sidecar needs a cgroup v2 hierarchy")
}

pub struct Lab {
    id: String,
    pub sandbox: String,
    pub upstream: String,
    pub dir: PathBuf,
    /// The sidecar's own cgroup (as a container runtime would give it one).
    pub cgroup: PathBuf,
    children: Vec<Child>,
    sidecar: Option<Child>,
    env: Vec<(String, String)>,
}

/// dnsmasq's zone: fixed names, a wildcard zone, a CNAME to blocked.test, a name pointing at
/// the cloud metadata address, and a TXT record too large for a 512-byte UDP answer.
fn dnsmasq_args(listen: &str, port: u16, ttl: u32) -> Vec<String> {
    let big = "x".repeat(200);
    let mut args: Vec<String> = [
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--host-record=allowed.test,198.51.100.10,2001:db8::10",
        "--host-record=blocked.test,198.51.100.20,2001:db8::20",
        "--address=/example.test/198.51.100.10",
        "--address=/a.test/198.51.100.10",
        "--address=/bench.test/198.51.100.30",
        "--address=/meta.test/169.254.169.254",
        // Public-looking names answering into private space (DNS rebinding).
        "--host-record=private10.test,10.0.0.10",
        "--host-record=loop.test,127.0.0.5",
        "--host-record=ula.test,fd00::10",
        "--host-record=mixed.test,198.51.100.10",
        "--host-record=mixed.test,10.0.0.10",
        "--cname=alias.test,blocked.test",
        "--cname=good-alias.test,allowed.test",
        "--pid-file=",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(format!("--local-ttl={ttl}"));
    args.push(format!("--listen-address={listen}"));
    args.push(format!("--port={port}"));
    args.push(format!(
        "--txt-record=big.test,\"{big}\",\"{big}\",\"{big}\""
    ));
    args
}

/// A port free for both UDP and TCP on `listen` right now.
fn free_port(listen: &str) -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind((listen, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind((listen, port)).is_ok() {
            return port;
        }
    }
}

/// Starts dnsmasq on a free port of `listen` in the current namespace (used by the in-process
/// tests); another process can take the port between the check and dnsmasq's bind, so a
/// dnsmasq that does not come up is retried on another port.
pub fn dnsmasq_local(listen: &str, ttl: u32) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port(listen);
        let mut child = Command::new("dnsmasq")
            .args(dnsmasq_args(listen, port, ttl))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/setup.sh installs it)");
        if wait_udp(listen, port, &mut child) {
            return (child, port);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("dnsmasq did not come up on {listen} after 5 ports");
}

fn wait_udp(listen: &str, port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let out = run(Command::new("dig").args([
            "+short",
            "+tries=1",
            "+timeout=1",
            &format!("@{listen}"),
            "-p",
            &port.to_string(),
            "allowed.test",
        ]));
        if String::from_utf8_lossy(&out.stdout).contains("198.51.100.10") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The uid:gid the sidecar becomes, as the controller configures it.
pub const SIDECAR_USER: &str = "65533:65533";

impl Lab {
    pub fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let sandbox = format!("egsb{id}");
        let upstream = format!("egup{id}");
        let dir = std::env::temp_dir().join(format!("egress-lab-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        // The sidecar, once it is its own user, writes its policy file here (a pod gives it an
        // emptyDir it can write).
        ok(Command::new("chown").arg(SIDECAR_USER).arg(&dir));
        let cgroup = cgroup2_mount().join(format!("egress-lab-{id}"));
        let _ = std::fs::create_dir(&cgroup);
        let mut lab = Lab {
            id: id.clone(),
            sandbox: sandbox.clone(),
            upstream: upstream.clone(),
            dir,
            cgroup,
            children: Vec::new(),
            sidecar: None,
            env: Vec::new(),
        };
        ok(Command::new("ip").args(["netns", "add", &sandbox]));
        ok(Command::new("ip").args(["netns", "add", &upstream]));
        let (a, b) = (format!("vs{id}"), format!("vu{id}"));
        ok(Command::new("ip").args([
            "link", "add", &a, "netns", &sandbox, "type", "veth", "peer", "name", &b, "netns",
            &upstream,
        ]));
        for (ns, dev, addrs) in [
            (&sandbox, &a, &["198.51.100.1/24", "2001:db8::1/64"][..]),
            (
                &upstream,
                &b,
                &[
                    "198.51.100.2/24",
                    "198.51.100.10/24",
                    "198.51.100.20/24",
                    "2001:db8::10/64",
                    "2001:db8::20/64",
                ][..],
            ),
        ] {
            for addr in addrs {
                let mut cmd = Command::new("ip");
                cmd.args(["-n", ns, "addr", "add", addr, "dev", dev]);
                if addr.contains(':') {
                    // No duplicate address detection: usable at once.
                    cmd.arg("nodad");
                }
                ok(&mut cmd);
            }
            ok(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
            ok(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        let dnsmasq = Command::new("ip")
            .args(["netns", "exec", &upstream, "dnsmasq"])
            .args(dnsmasq_args(DNS, 53, 300))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/setup.sh installs it)");
        lab.children.push(dnsmasq);
        let web = Command::new("ip")
            .args(["netns", "exec", &upstream])
            .arg(example("test-web"))
            .args([
                format!("{ALLOWED_IP}:80"),
                format!("{BLOCKED_IP}:80"),
                format!("[{ALLOWED_IP6}]:80"),
                format!("[{BLOCKED_IP6}]:80"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        lab.children.push(web);
        // Both up before any test step (no sidecar yet, so the sandbox reaches them directly).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // From a fixed source port outside the ephemeral range: the conntrack entry this
            // flow leaves (not redirected, as no sidecar runs yet) lives on for 30 s, and a
            // later query that happened to reuse its port would follow it to dnsmasq directly.
            let dns = lab.dig("allowed.test", &["-b", "198.51.100.1#20053"]).0 == "NOERROR";
            if dns && lab.http(BLOCKED_IP) && lab.http(BLOCKED_IP6) {
                break;
            }
            assert!(Instant::now() < deadline, "test hosts did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        lab
    }

    /// Puts the private test addresses on the upstream host (routed on-link from the sandbox,
    /// inside the lab's own namespaces) with a web server on each.
    pub fn serve_private(&mut self) {
        let (a, b) = (format!("vs{}", self.id), format!("vu{}", self.id));
        ok(Command::new("ip").args([
            "-n",
            &self.upstream,
            "addr",
            "add",
            "10.0.0.10/24",
            "dev",
            &b,
        ]));
        ok(Command::new("ip").args([
            "-n",
            &self.upstream,
            "addr",
            "add",
            "fd00::10/64",
            "dev",
            &b,
            "nodad",
        ]));
        ok(Command::new("ip").args([
            "-n",
            &self.sandbox,
            "route",
            "add",
            "10.0.0.0/24",
            "dev",
            &a,
        ]));
        ok(Command::new("ip").args(["-n", &self.sandbox, "route", "add", "fd00::/64", "dev", &a]));
        let web = Command::new("ip")
            .args(["netns", "exec", &self.upstream])
            .arg(example("test-web"))
            .args([format!("{PRIVATE_IP}:80"), format!("[{PRIVATE_IP6}]:80")])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(web);
    }

    /// A webhook receiver (`examples/test-hook.rs`) on the upstream host answering `mode`
    /// (`ok`, `fail`, `refuse`, `hang`) at `port`; returns the file it records requests in.
    pub fn serve_hook(&mut self, port: u16, mode: &str) -> PathBuf {
        let record = self.dir.join(format!("hook-{port}.jsonl"));
        let hook = Command::new("ip")
            .args(["netns", "exec", &self.upstream])
            .arg(example("test-hook"))
            .arg(format!("{DNS}:{port}"))
            .arg(mode)
            .arg(&record)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(hook);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(Command::new("ip")
                .args(["netns", "exec", &self.upstream])
                .args(["ss", "-Hltn", &format!("sport = :{port}")]));
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return record;
            }
            assert!(Instant::now() < deadline, "test-hook did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the sidecar with the lab's defaults plus `env` and waits up to `limit` for it to
    /// exit; `None` if it is still running then (it is killed).
    pub fn run_sidecar_to_exit(
        &mut self,
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut child = self.sidecar_command().spawn().unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn rules_dir(&self) -> PathBuf {
        self.dir.join("rules")
    }

    pub fn policy_file(&self) -> PathBuf {
        self.dir.join("policy.json")
    }

    /// A command run inside the sandbox namespace.
    pub fn in_sandbox(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.sandbox]).arg(program);
        cmd
    }

    /// Starts the sidecar with the lab's defaults plus `env`, and waits for /healthz.
    pub fn start_sidecar(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.restart_sidecar();
    }

    /// The sidecar as a pod would run it, with the lab's defaults and the last start's env,
    /// logging to the lab's log file.
    fn sidecar_command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sidecar.log"))
            .unwrap();
        // As in a pod: the sandbox's network namespace, a cgroup of its own, and the security
        // context the controller gives the sidecar (started as root with NET_ADMIN, SETUID and
        // SETGID alone, no privilege escalation, becoming its own uid with NET_ADMIN alone).
        // `nsenter` keeps the host's /sys (where `ip netns exec` mounts a fresh one without
        // cgroups); the shell moves itself into the cgroup, then `setpriv` leaves only those
        // capabilities in the bounding set and execs the sidecar.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.sandbox))
            .args(["sh", "-c", "echo $$ > \"$0\"/cgroup.procs && exec \"$@\""])
            .arg(&self.cgroup)
            .args([
                "setpriv",
                "--bounding-set=-all,+net_admin,+setuid,+setgid",
                "--inh-caps=-all",
                "--no-new-privs",
            ])
            .arg(env!("CARGO_BIN_EXE_egress-sidecar"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OPENSANDBOX_EGRESS_DNS_UPSTREAM", DNS)
            .env("OPENSANDBOX_EGRESS_RULES_DIR", self.rules_dir())
            .env("OPENSANDBOX_EGRESS_POLICY_FILE", self.policy_file())
            .env("OPENSANDBOX_EGRESS_TOKEN", TOKEN)
            .env("OPENSANDBOX_EGRESS_HTTP_ADDR", "127.0.0.1:18080")
            .env("OPENSANDBOX_EGRESS_RUN_AS", SIDECAR_USER)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd
    }

    /// Starts the sidecar again with the environment of the last start.
    pub fn restart_sidecar(&mut self) {
        assert!(self.sidecar.is_none(), "sidecar already running");
        let mut cmd = self.sidecar_command();
        self.sidecar = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.api("GET", "/healthz", None, None).0 == 200 {
                return;
            }
            if let Some(status) = self.sidecar.as_mut().unwrap().try_wait().unwrap() {
                panic!("sidecar exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not healthy: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lines of the running sidecar's /proc status (`Uid`, `CapEff`, ...), by name.
    pub fn sidecar_status(&self, field: &str) -> String {
        let pid = self.sidecar.as_ref().expect("sidecar running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in the sidecar's status"))
            .trim()
            .to_owned()
    }

    pub fn kill_sidecar(&mut self) {
        if let Some(mut child) = self.sidecar.take() {
            // nsenter, the shell and setpriv exec the program, so this is the sidecar itself.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// `dig` from the sandbox at the upstream's address (port 53, so the redirect applies).
    /// Returns the status (`NOERROR`, `NXDOMAIN`, …, or `ERROR` when dig got no answer) and the
    /// answer lines.
    pub fn dig(&self, name: &str, extra: &[&str]) -> (String, Vec<String>) {
        let out = run(self
            .in_sandbox("dig")
            .args([
                "+tries=1",
                "+timeout=3",
                "+nocmd",
                "+noall",
                "+comments",
                "+answer",
            ])
            .arg(format!("@{DNS}"))
            .args(extra)
            .arg(name));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("ERROR")
            .to_owned();
        let answers = text
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| l.split_whitespace().last().unwrap_or_default().to_owned())
            .collect();
        (status, answers)
    }

    /// Whether an HTTP request from the sandbox to `ip` gets the web server's answer.
    pub fn http(&self, ip: &str) -> bool {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let out = run(self.in_sandbox("curl").args([
            "-s",
            "-g",
            "--max-time",
            "2",
            &format!("http://{host}/"),
        ]));
        String::from_utf8_lossy(&out.stdout).contains("hello from")
    }

    /// A request to the sidecar's API from inside the sandbox: (status, body).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, String) {
        let mut cmd = self.in_sandbox("curl");
        cmd.args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("OPENSANDBOX-EGRESS-AUTH: {token}")]);
        }
        let mut child;
        if let Some(body) = body {
            cmd.args([
                "--data-binary",
                "@-",
                "-H",
                "content-type: application/json",
            ]);
            cmd.arg(format!("http://127.0.0.1:18080{path}"));
            child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(body.as_bytes());
        } else {
            cmd.arg(format!("http://127.0.0.1:18080{path}"));
            child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The API with the lab's token.
    pub fn call(&self, method: &str, body: Option<&str>) -> (u16, String) {
        self.api(method, "/policy", body, Some(TOKEN))
    }

    /// Polls `check` for up to `limit`; returns how long it took.
    pub fn within(&self, limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn write_rule_file(&self, name: &str, text: &str) {
        let path = self.rules_dir().join(name);
        let tmp = self.rules_dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Runs an nft script in the sandbox namespace.
    pub fn nft(&self, script: &str) {
        use std::io::Write;
        let mut child = self
            .in_sandbox("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft script failed");
    }

    pub fn nft_ruleset(&self) -> String {
        let out = run(self.in_sandbox("nft").args(["list", "ruleset"]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_sidecar();
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.sandbox, &self.upstream] {
            let pids = run(Command::new("ip").args(["netns", "pids", ns]));
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("sidecar log:\n{}", self.log());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
