//! DNS latency and throughput of the egress proxy against asking its upstream directly, side by
//! side in one run. Run inside the sandbox namespace (see `loadtest/dns.sh`):
//!
//! `dns-bench <proxy addr> <direct addr> [latency queries] [qps seconds] [concurrency]`
//!
//! Direct queries carry the proxy's socket mark and run in its cgroup, so the port-53 redirect lets
//! them through as it lets the proxy's own.
//! Scenarios: `cached` asks one name again and again (the proxy answers from its cache),
//! `uncached` asks a new name every time, all on one address (the proxy forwards every query;
//! the address is admitted once), `new address` asks AAAA for `f<i>.fresh.test`, a new name on
//! a new address every time (every answer must reach the nftables set before it is returned;
//! needs the `fresh.test` hosts file `loadtest/dns.sh` gives dnsmasq, `FRESH` names).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use socket2::{Domain, Protocol, Socket, Type};

const MARK: u32 = 0x1;

fn socket(target: SocketAddr, mark: bool) -> UdpSocket {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .unwrap_or_else(|e| panic!("socket: {e}"));
    if mark {
        s.set_mark(MARK).unwrap_or_else(|e| panic!("SO_MARK: {e}"));
    }
    let s: UdpSocket = s.into();
    s.connect(target).unwrap_or_else(|e| panic!("connect: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("timeout: {e}"));
    s
}

fn packet(id: u16, name: &str, ty: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).unwrap_or_else(|e| panic!("{e}")),
        ty,
    ));
    m.to_vec().unwrap_or_else(|e| panic!("{e}"))
}

/// One query and its answer; `None` on timeout or a non-NOERROR answer.
fn exchange(s: &UdpSocket, id: u16, name: &str, buf: &mut [u8]) -> Option<Duration> {
    let ty = if name.ends_with(".fresh.test.") {
        RecordType::AAAA
    } else {
        RecordType::A
    };
    let q = packet(id, name, ty);
    let start = Instant::now();
    s.send(&q).ok()?;
    loop {
        let n = s.recv(buf).ok()?;
        if n >= 12 && buf[..2] == id.to_be_bytes() {
            return (buf[3] & 0x0f == 0).then(|| start.elapsed());
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Cached,
    Uncached,
    /// Fresh names from `f<first>` on, one per query.
    NewAddress {
        first: u64,
    },
}

fn name_for(scenario: Scenario, run: &str, i: u64) -> String {
    match scenario {
        Scenario::Cached => "hot.bench.test.".to_owned(),
        Scenario::Uncached => format!("n{i}.{run}.bench.test."),
        Scenario::NewAddress { first } => format!("f{}.fresh.test.", first + i),
    }
}

struct Latency {
    p50: f64,
    p99: f64,
    failed: usize,
}

fn latency(target: SocketAddr, mark: bool, scenario: Scenario, run: &str, n: usize) -> Latency {
    let s = socket(target, mark);
    let mut buf = vec![0u8; 4096];
    // Warm the cache (and the learned address) once.
    let _ = exchange(&s, 1, &name_for(Scenario::Cached, run, 0), &mut buf);
    let mut samples = Vec::with_capacity(n);
    let mut failed = 0;
    for i in 0..n {
        let id = (i % 65_000) as u16 + 2;
        match exchange(&s, id, &name_for(scenario, run, i as u64), &mut buf) {
            Some(d) => samples.push(d.as_secs_f64() * 1e6),
            None => failed += 1,
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Latency {
        p50: pct(0.50),
        p99: pct(0.99),
        failed,
    }
}

/// Queries per second with `workers` clients each keeping one query outstanding.
fn throughput(
    target: SocketAddr,
    mark: bool,
    scenario: Scenario,
    run: &str,
    secs: u64,
    workers: u64,
    span: u64,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let (done, failed, run) = (done.clone(), failed.clone(), run.to_owned());
            std::thread::spawn(move || {
                let s = socket(target, mark);
                let mut buf = vec![0u8; 4096];
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let id = (i % 65_000) as u16 + 1;
                    // Workers interleave over the fresh names, so none is asked twice.
                    let name = match scenario {
                        Scenario::NewAddress { .. } => {
                            name_for(scenario, &run, (i * workers + w) % span.max(1))
                        }
                        _ => name_for(scenario, &format!("{run}w{w}"), i),
                    };
                    match exchange(&s, id, &name, &mut buf) {
                        Some(_) => done.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    (
        done.load(Ordering::Relaxed) as f64 / secs as f64,
        failed.load(Ordering::Relaxed),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!(
            "usage: dns-bench <proxy addr> <direct addr> [latency queries] [qps seconds] [concurrency]"
        );
        std::process::exit(2);
    }
    let proxy: SocketAddr = args[1].parse().unwrap_or_else(|e| panic!("proxy: {e}"));
    let direct: SocketAddr = args[2].parse().unwrap_or_else(|e| panic!("direct: {e}"));
    let n: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(5000);
    let secs: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(5);
    let workers: u64 = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(16);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    println!(
        "| scenario | direct p50 µs | direct p99 µs | proxy p50 µs | proxy p99 µs | added p50 µs | added p99 µs | direct q/s | proxy q/s | proxy/direct q/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let fresh: u64 = std::env::var("FRESH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut scenarios = vec![
        ("cached", Scenario::Cached),
        ("uncached", Scenario::Uncached),
    ];
    if fresh > 0 {
        scenarios.push(("new address", Scenario::NewAddress { first: 0 }));
    }
    for (label, scenario) in scenarios {
        // Fresh names: latency runs use the first n (direct) and the next n (proxy), the
        // throughput runs the rest, direct and proxy each from their own half.
        let pick = |offset: u64| match scenario {
            Scenario::NewAddress { .. } => Scenario::NewAddress { first: offset },
            other => other,
        };
        let n64 = n as u64;
        let half = fresh.saturating_sub(2 * n64) / 2;
        let d = latency(direct, true, pick(0), &format!("d{stamp}l"), n);
        let p = latency(proxy, false, pick(n64), &format!("p{stamp}l"), n);
        let (dq, df) = throughput(
            direct,
            true,
            pick(2 * n64),
            &format!("d{stamp}t"),
            secs,
            workers,
            half,
        );
        let (pq, pf) = throughput(
            proxy,
            false,
            pick(2 * n64 + half),
            &format!("p{stamp}t"),
            secs,
            workers,
            half,
        );
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x |",
            d.p50,
            d.p99,
            p.p50,
            p.p99,
            p.p50 - d.p50,
            p.p99 - d.p99,
            dq,
            pq,
            pq / dq
        );
        let failures = d.failed as u64 + p.failed as u64 + df + pf;
        if failures > 0 {
            println!(
                "  ({label}: {failures} queries failed or timed out: direct {} + {df}, proxy {} + {pf})",
                d.failed, p.failed
            );
        }
        if let Scenario::NewAddress { .. } = scenario
            && pq * secs as f64 > half as f64
        {
            println!("  (new address: more queries than fresh names; raise FRESH)");
        }
    }
}
