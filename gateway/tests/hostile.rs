//! The hostile-client suite: the real gateway binary inside a network namespace of its own,
//! attacked by slow clients, credential guessers (from one address and from many addresses of
//! one IPv6 /64 on the namespace's loopback), request smugglers, oversized headers and idle
//! connections, while a well-behaved client (a token holder of the attacked sandbox among them)
//! asks at a steady rate and must see no error. Prints a table; the short form runs in the test
//! command, `make hostile` (HOSTILE_FULL=1) runs the full one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Set in the process that runs inside the namespace.
const INSIDE: &str = "HOSTILE_INSIDE_NETNS";
const NAME: &str = "hostile_clients_leave_a_well_behaved_client_untouched";
/// The attackers' /64, on the namespace's loopback; `::1` of it is the gateway's.
const PREFIX: [u16; 4] = [0x2001, 0xdb8, 0x6, 0];
const HEADER_TIMEOUT: u64 = 2;
const TOKEN: &str = "annot-token";

fn in_prefix(host: u16) -> IpAddr {
    let [a, b, c, d] = PREFIX;
    IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, host))
}

struct Scale {
    signatures: usize,
    addresses: u16,
    per_address: usize,
    slow: usize,
    idle: usize,
    smuggling_rounds: usize,
    oversized: usize,
}

fn scale() -> Scale {
    if std::env::var_os("HOSTILE_FULL").is_some() {
        Scale {
            signatures: 10_000,
            addresses: 1_000,
            per_address: 10,
            slow: 500,
            idle: 5_000,
            smuggling_rounds: 50,
            oversized: 200,
        }
    } else {
        Scale {
            signatures: 1_000,
            addresses: 100,
            per_address: 10,
            slow: 50,
            idle: 300,
            smuggling_rounds: 3,
            oversized: 20,
        }
    }
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace, removed with everything in it when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn hostile_clients_leave_a_well_behaved_client_untouched() {
    if std::env::var_os(INSIDE).is_some() {
        return inside();
    }
    let ns = Netns(format!("gw-hostile-{}", std::process::id()));
    ok(Command::new("ip").args(["netns", "add", &ns.0]));
    let mut batch = String::from("link set lo up\n");
    for host in 1..=scale().addresses + 1 {
        batch.push_str(&format!("addr add {}/64 dev lo nodad\n", in_prefix(host)));
    }
    let dir = TempDir::new();
    let script = dir.write("addresses", &batch);
    ok(Command::new("ip")
        .args(["-n", &ns.0, "-batch"])
        .arg(&script));
    let status = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .status()
        .unwrap();
    assert!(status.success(), "the suite failed inside {}", ns.0);
}

/// Answers by status code, or by what happened instead.
#[derive(Default)]
struct Tally {
    requests: usize,
    answers: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, answer: impl Into<String>) {
        self.requests += 1;
        *self.answers.entry(answer.into()).or_default() += 1;
    }
    fn count(&self, answer: &str) -> usize {
        self.answers.get(answer).copied().unwrap_or(0)
    }
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
    }
    fn summary(&self) -> String {
        self.answers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn connect(from: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(to).await
}

/// Reads one response; its status, or what happened instead.
async fn read_response(stream: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(limit, async {
        loop {
            let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
            if let Some(end) = head_end {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    let status = head.split(' ').nth(1).unwrap_or("?").to_owned();
                    return status;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) => {
                    return if buf.is_empty() {
                        "closed".into()
                    } else {
                        "cut".into()
                    };
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => return "reset".into(),
            }
        }
    })
    .await;
    read.unwrap_or_else(|_| "no answer".into())
}

/// One request on a fresh connection.
async fn one_shot(from: IpAddr, to: SocketAddr, request: Vec<u8>) -> String {
    let Ok(mut stream) = connect(Some(from), to).await else {
        return "connect failed".into();
    };
    if stream.write_all(&request).await.is_err() {
        return "reset".into();
    }
    read_response(&mut stream, Duration::from_secs(10)).await
}

/// Runs `requests` one-shot requests, `concurrency` at a time.
async fn flood(to: SocketAddr, concurrency: usize, requests: Vec<(IpAddr, Vec<u8>)>) -> Tally {
    let queue = Arc::new(std::sync::Mutex::new(requests));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let next = queue.lock().unwrap().pop();
                    let Some((from, bytes)) = next else {
                        return tally;
                    };
                    tally.add(one_shot(from, to, bytes).await);
                }
            })
        })
        .collect();
    let mut tally = Tally::default();
    for w in workers {
        tally.merge(w.await.unwrap());
    }
    tally
}

fn get(host: &str, extra: &str) -> Vec<u8> {
    format!("GET /probe HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

/// How a connection ended, and whether within the timeout plus 1.5 s of `start`.
fn ended(how: &str, start: Instant) -> String {
    let on_time = start.elapsed() <= Duration::from_millis(HEADER_TIMEOUT * 1000 + 1500);
    format!("{how} {}", if on_time { "in time" } else { "late" })
}

/// Slow clients: each sends a header start, then a byte (or a blank line) every 300 ms. Each is
/// tallied by when and how the gateway ended it.
async fn slowloris(to: SocketAddr, clients: usize, blank_lines: bool) -> Tally {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(async move {
                let Ok(mut s) = connect(Some(Ipv4Addr::new(127, 0, 1, 1).into()), to).await else {
                    return "connect failed".to_owned();
                };
                let start = Instant::now();
                let (first, drip): (&[u8], &[u8]) = if blank_lines {
                    (b"\r\n", b"\r\n")
                } else {
                    (
                        b"GET /probe HTTP/1.1\r\nHost: open-7777.gw\r\nX-Slow: ",
                        b"a",
                    )
                };
                let _ = s.write_all(first).await;
                let mut buf = [0u8; 512];
                // Spread the drips so the clients do not move in lockstep.
                tokio::time::sleep(Duration::from_millis(i as u64 % 300)).await;
                loop {
                    if start.elapsed() > Duration::from_secs(HEADER_TIMEOUT + 8) {
                        return "still open".to_owned();
                    }
                    tokio::select! {
                        r = s.read(&mut buf) => {
                            let how = match r {
                                Ok(0) | Err(_) => "closed",
                                Ok(_) => "answered",
                            };
                            return ended(how, start);
                        }
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {
                            if s.write_all(drip).await.is_err() {
                                return ended("closed", start);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.add(t.await.unwrap());
    }
    tally
}

/// Connections that send nothing (`keepalive`: one complete request first, then nothing); each
/// must be closed by the gateway's header or keep-alive timeout.
async fn idle(to: SocketAddr, clients: usize, keepalive: bool) -> Tally {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut s) = connect(Some(Ipv4Addr::new(127, 0, 1, 2).into()), to).await else {
                    return "connect failed".to_owned();
                };
                if keepalive {
                    let req = b"GET /probe HTTP/1.1\r\nHost: open-7777.gw\r\n\r\n";
                    if s.write_all(req).await.is_err() {
                        return "reset".to_owned();
                    }
                    let status = read_response(&mut s, Duration::from_secs(10)).await;
                    if status != "200" {
                        return format!("first request {status}");
                    }
                }
                let start = Instant::now();
                let mut buf = [0u8; 64];
                let limit = Duration::from_secs(HEADER_TIMEOUT + 8);
                match tokio::time::timeout(limit, s.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => ended("closed", start),
                    Ok(Ok(_)) => "answered".to_owned(),
                    Err(_) => "still open".to_owned(),
                }
            })
        })
        .collect();
    let mut tally = Tally::default();
    for t in tasks {
        tally.add(t.await.unwrap());
    }
    tally
}

/// What the well-behaved client saw.
#[derive(Default)]
struct Calm {
    requests: usize,
    errors: Vec<String>,
    latencies: Vec<Duration>,
}

impl Calm {
    fn p99_ms(&mut self) -> f64 {
        self.latencies.sort_unstable();
        let i = (self.latencies.len() * 99 / 100).min(self.latencies.len().saturating_sub(1));
        self.latencies
            .get(i)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

/// Every 20 ms, alternately: the open sandbox, and the attacked secure sandbox with its token,
/// on keep-alive connections of its own address.
async fn well_behaved(to: SocketAddr, stop: Arc<AtomicBool>) -> Calm {
    let mut calm = Calm::default();
    let mut conn: Option<TcpStream> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        i += 1;
        let req = if i.is_multiple_of(2) {
            "GET /probe HTTP/1.1\r\nHost: open-7777.gw\r\n\r\n".to_owned()
        } else {
            format!(
                "GET /probe HTTP/1.1\r\nHost: sec-7777.gw\r\nOpenSandbox-Secure-Access: {TOKEN}\r\n\r\n"
            )
        };
        let start = Instant::now();
        if conn.is_none() {
            conn = connect(Some(Ipv4Addr::new(127, 0, 0, 2).into()), to)
                .await
                .ok();
        }
        calm.requests += 1;
        let Some(s) = conn.as_mut() else {
            calm.errors.push("connect failed".into());
            continue;
        };
        let status = if s.write_all(req.as_bytes()).await.is_ok() {
            read_response(s, Duration::from_secs(5)).await
        } else {
            "write failed".to_owned()
        };
        calm.latencies.push(start.elapsed());
        if status != "200" {
            calm.errors.push(status);
            conn = None;
        }
    }
    calm
}

struct Row {
    attack: String,
    tally: Tally,
    calm: Calm,
    verdict: Result<(), String>,
}

/// Runs `attack` while the well-behaved client asks `to` (over IPv4); `check` judges the
/// attack's answers.
async fn under_attack<F>(
    to: SocketAddr,
    name: &str,
    attack: F,
    check: impl Fn(&Tally) -> Result<(), String>,
) -> Row
where
    F: std::future::Future<Output = Tally>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let calm = tokio::spawn(well_behaved(to, stop.clone()));
    // Let the well-behaved client settle in first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tally = attack.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let calm = calm.await.unwrap();
    let mut verdict = check(&tally);
    if verdict.is_ok() && !calm.errors.is_empty() {
        verdict = Err(format!("well-behaved client errors: {:?}", calm.errors));
    }
    Row {
        attack: name.to_owned(),
        tally,
        calm,
        verdict,
    }
}

fn all(tally: &Tally, answer: &str) -> Result<(), String> {
    if tally.count(answer) == tally.requests {
        Ok(())
    } else {
        Err(format!("expected only {answer}: {}", tally.summary()))
    }
}

fn guessed_at_most(tally: &Tally, checked: usize) -> Result<(), String> {
    if tally.count("401") <= checked && tally.count("401") + tally.count("429") == tally.requests {
        Ok(())
    } else {
        Err(format!("more than {checked} checked: {}", tally.summary()))
    }
}

fn inside() {
    let scale = scale();
    let _open = Upstream::start(Ipv4Addr::LOCALHOST.into(), 7777);
    let smuggled_to = Upstream::start(Ipv4Addr::LOCALHOST.into(), 7778);
    let dir = TempDir::new();
    let endpoints = r#"["127.0.0.1"]"#;
    let docs = [
        batch_sandbox("open", "a", 1, Some(endpoints), None),
        batch_sandbox("sec", "a", 1, Some(endpoints), Some(TOKEN)),
        batch_sandbox("sec2", "a", 1, Some(endpoints), Some(TOKEN)),
        batch_sandbox("smug", "a", 1, Some(endpoints), None),
    ];
    let file = dir.write("s.yaml", &docs.join("---\n"));
    let gw = Gateway::start(
        &file,
        GatewayOptions {
            bind: Some(Ipv6Addr::UNSPECIFIED.into()),
            keys: Some("k=cHFycw=="),
            extra: [
                "--header-timeout-seconds",
                &HEADER_TIMEOUT.to_string(),
                "--keepalive-timeout-seconds",
                &HEADER_TIMEOUT.to_string(),
                "--access-log",
                "false",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            ..Default::default()
        },
    );
    let v4 = gw.addr;
    let v6 = SocketAddr::new(in_prefix(1), gw.addr.port());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let per_client = 60; // the default --auth-failures-per-minute
    let per_sandbox = 600; // the default --signature-failures-per-sandbox-per-minute
    let mut rows = Vec::new();
    runtime.block_on(async {
        rows.push(
            under_attack(
                v4,
                "slowloris: header trickled a byte at a time",
                slowloris(v4, scale.slow, false),
                |t| all(t, "closed in time"),
            )
            .await,
        );
        rows.push(
            under_attack(
                v4,
                "slowloris: blank lines before the request line",
                slowloris(v4, scale.slow, true),
                |t| all(t, "closed in time"),
            )
            .await,
        );
        let one_address: Vec<_> = (0..scale.signatures)
            .map(|i| {
                let host = format!("sec-7777-x2qxvk-{:08x}k.gw", i);
                (IpAddr::from(Ipv4Addr::new(127, 0, 2, 1)), get(&host, ""))
            })
            .collect();
        rows.push(
            under_attack(
                v4,
                &format!("{} bad signatures from one address", scale.signatures),
                flood(v4, 8, one_address),
                |t| guessed_at_most(t, per_client),
            )
            .await,
        );
        let one_64: Vec<_> = (0..usize::from(scale.addresses) * scale.per_address)
            .map(|i| {
                let from = in_prefix(2 + (i % usize::from(scale.addresses)) as u16);
                let host = format!("sec-7777-x2qxvk-{:08x}k.gw", i + 1_000_000);
                (from, get(&host, ""))
            })
            .collect();
        rows.push(
            under_attack(
                v4,
                &format!(
                    "{} bad signatures from {} addresses of one /64",
                    one_64.len(),
                    scale.addresses
                ),
                flood(v6, 8, one_64),
                |t| guessed_at_most(t, per_client),
            )
            .await,
        );
        // Every guess from an address of its own: only the sandbox's budget holds them.
        let everywhere: Vec<_> = (0..scale.signatures)
            .map(|i| {
                let from = Ipv4Addr::new(
                    127,
                    10 + (i / 65_536) as u8,
                    (i / 256 % 256) as u8,
                    (i % 256) as u8,
                );
                let host = format!("sec2-7777-x2qxvk-{:08x}k.gw", i);
                (IpAddr::from(from), get(&host, ""))
            })
            .collect();
        rows.push(
            under_attack(
                v4,
                &format!("{0} bad signatures from {0} addresses", scale.signatures),
                flood(v4, 8, everywhere),
                |t| guessed_at_most(t, per_sandbox),
            )
            .await,
        );
        let head = "POST /count HTTP/1.1\r\nHost: smug-7778.gw\r\nConnection: close\r\n";
        let pairs = [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "Content-Length: 5, 6\r\n\r\nhello!",
            "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        ];
        let smuggling: Vec<_> = (0..scale.smuggling_rounds)
            .flat_map(|_| pairs.iter())
            .map(|tail| {
                (
                    IpAddr::from(Ipv4Addr::new(127, 0, 3, 1)),
                    format!("{head}{tail}").into_bytes(),
                )
            })
            .collect();
        let hits_before = smuggled_to.hits.load(Ordering::SeqCst);
        let mut row = under_attack(
            v4,
            "request smuggling pairs (CL+TE, two CLs, bad TE, obs-fold)",
            flood(v4, 4, smuggling),
            |t| all(t, "400"),
        )
        .await;
        let reached = smuggled_to.hits.load(Ordering::SeqCst) - hits_before;
        if reached > 0 && row.verdict.is_ok() {
            row.verdict = Err(format!("{reached} smuggled requests reached the upstream"));
        }
        rows.push(row);
        let big = format!("X-Big: {}\r\n", "a".repeat(70_000));
        let oversized: Vec<_> = (0..scale.oversized)
            .map(|_| {
                (
                    IpAddr::from(Ipv4Addr::new(127, 0, 4, 1)),
                    get("open-7777.gw", &big),
                )
            })
            .collect();
        rows.push(
            under_attack(
                v4,
                "oversized headers (70 KB)",
                flood(v4, 4, oversized),
                |t| all(t, "431"),
            )
            .await,
        );
        rows.push(
            under_attack(
                v4,
                &format!("{} half-open connections (nothing sent)", scale.idle),
                idle(v4, scale.idle, false),
                |t| all(t, "closed in time"),
            )
            .await,
        );
        rows.push(
            under_attack(
                v4,
                &format!("{} idle keep-alive connections", scale.idle),
                idle(v4, scale.idle, true),
                |t| all(t, "closed in time"),
            )
            .await,
        );
    });

    println!(
        "\n| attack | requests | answers | well-behaved requests | errors | p99 ms | verdict |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    for row in &mut rows {
        let verdict = match &row.verdict {
            Ok(()) => "PASS".to_owned(),
            Err(e) => {
                failed.push(format!("{}: {e}", row.attack));
                "FAIL".to_owned()
            }
        };
        let p99 = row.calm.p99_ms();
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} |",
            row.attack,
            row.tally.requests,
            row.tally.summary(),
            row.calm.requests,
            row.calm.errors.len(),
            p99,
            verdict
        );
    }
    // Slow and silent clients are counted, not logged one line each (the log is lossless: a
    // flood of lines would slow every request).
    let timeouts = gw.metric("sandbox_gateway_header_timeouts_total");
    let expected = (2 * scale.slow + scale.idle) as f64;
    println!("header timeouts counted: {timeouts} (at least {expected} expected)");
    if timeouts < expected {
        failed.push(format!(
            "header timeouts counted {timeouts}, expected at least {expected}"
        ));
    }
    let log = gw.log_text();
    let lines = log.lines().count();
    println!("gateway log lines: {lines}");
    if lines > 50 {
        failed.push(format!("the attacks wrote {lines} log lines"));
    }
    println!(
        "\nhostile suite verdict: {}",
        if failed.is_empty() { "PASS" } else { "FAIL" }
    );
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    assert!(
        failed.is_empty(),
        "{failed:#?}\nlast log lines:\n{}",
        tail.join("\n")
    );
}
