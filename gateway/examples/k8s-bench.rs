//! Benchmarks of the Kubernetes provider against a real kube-apiserver (run through
//! `loadtest/k8s.sh`, which builds the release gateway and sets `SANDBOX_GATEWAY_BIN`).
//!
//! - `propagation [N]`: N endpoint changes (default 500); for each, the time from the API
//!   server acknowledging the patch to the first request routed by the new endpoint.
//! - `scale [N]`: N BatchSandboxes (default 100000) created first; then the gateway's time to
//!   ready and its RSS with all of them in the table.
//! - `fanout [N] [K]`: K gateways (default 9) start at once against N BatchSandboxes (default
//!   20000), with paged and with streaming initial lists: the API server's CPU per gateway sync.
//! - `serve KUBECONFIG`: for `make bench`'s Kubernetes targets: a control plane with one
//!   BatchSandbox `bench` in `default` whose endpoint is 127.0.0.1, its admin kubeconfig
//!   copied to KUBECONFIG; runs until its standard input closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::client::get;
use support::k8s::{ControlPlane, Objects, batch_resource};
use support::{Gateway, GatewayOptions};

fn gateway(plane: &ControlPlane) -> Gateway {
    gateway_listing(plane, "streaming")
}

/// The gateway loading its objects with `--initial-list <mode>`.
fn gateway_listing(plane: &ControlPlane, mode: &str) -> Gateway {
    let opts = GatewayOptions {
        extra: vec![
            "--access-log=false".into(),
            format!("--initial-list={mode}"),
        ],
        ..Default::default()
    };
    support::kube_gateway(&plane.kubeconfig, "batchsandbox", opts)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn propagation(n: usize) {
    let plane = ControlPlane::start();
    plane.create_namespace("bench");
    let (u1, u2) = support::upstream::pair();
    let (ip1, ip2, port) = (u1.addr.ip(), u2.addr.ip(), u1.addr.port());
    let boxes = Objects::new(&plane, "bench", &batch_resource());
    let endpoints =
        |ip: std::net::IpAddr| json!({"sandbox.opensandbox.io/endpoints": format!("[\"{ip}\"]")});
    boxes.create("prop", endpoints(ip1), json!({"replicas": 1, "ready": 1}));
    let gw = gateway(&plane);
    gw.wait_ready();
    let host = format!("prop-{port}.bench");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let target = if i % 2 == 0 { ip2 } else { ip1 };
        let want = format!("{target}:{port}");
        boxes.annotate("prop", endpoints(target));
        let acked = Instant::now();
        loop {
            let r = get(gw.addr, "/", &[("Host", &host)]);
            let routed = r.status == 200
                && r.echo()["headers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h[0] == "host" && h[1] == want.as_str());
            if routed {
                samples.push(acked.elapsed());
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "update {i} never routed"
            );
        }
    }
    samples.sort();
    let (p50, p99, max) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
    println!("| updates | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    println!("| {n} | {:.2} | {:.2} | {:.2} |", ms(p50), ms(p99), ms(max));
    println!();
    println!(
        "verdict: route propagation p99 {:.2} ms ({} the 100 ms target)",
        ms(p99),
        if p99 < Duration::from_millis(100) {
            "within"
        } else {
            "above"
        }
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

fn scale(n: usize) {
    let plane = ControlPlane::start();
    plane.create_namespace("scale");
    let created = Instant::now();
    plane.create_many("scale", n, |i| {
        json!({
            "metadata": {"name": format!("sbx-{i:07}"), "annotations": {
                "sandbox.opensandbox.io/endpoints": format!("[\"10.{}.{}.{}\"]", i / 65536 % 256, i / 256 % 256, i % 256)}},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:latest", "args": ["--serve"]}]}}},
        })
    });
    eprintln!("created {n} BatchSandboxes in {:?}", created.elapsed());
    let baseline = {
        let empty = ControlPlane::start();
        let gw = gateway(&empty);
        gw.wait_ready();
        std::thread::sleep(Duration::from_secs(1));
        rss_kib(gw.child.id())
    };
    let start = Instant::now();
    let gw = gateway(&plane);
    gw.wait_ready();
    let ready = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(gw.child.id());
    assert_eq!(
        gw.metric("sandbox_gateway_route_table_sandboxes") as usize,
        n
    );
    println!("| sandboxes | RSS MiB | time to ready s |");
    println!("|---|---|---|");
    println!("| 0 | {:.1} | - |", baseline as f64 / 1024.0);
    println!(
        "| {n} | {:.1} | {:.2} |",
        rss as f64 / 1024.0,
        ready.as_secs_f64()
    );
    println!();
    println!(
        "verdict: {:.0} bytes of RSS per sandbox loaded from the API server",
        (rss - baseline) as f64 * 1024.0 / n as f64
    );
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// `gateways` gateways start at once against `n` BatchSandboxes (a DaemonSet rolling out), once
/// per initial-list mode: the API server's CPU per gateway sync and each gateway's time to ready.
fn fanout(n: usize, gateways: usize) {
    let plane = ControlPlane::start();
    plane.create_namespace("fanout");
    let created = Instant::now();
    plane.create_many("fanout", n, |i| {
        json!({
            "metadata": {"name": format!("sbx-{i:07}"), "annotations": {
                "sandbox.opensandbox.io/endpoints": format!("[\"10.{}.{}.{}\"]", i / 65536 % 256, i / 256 % 256, i % 256)}},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:latest"}]}}},
        })
    });
    eprintln!("created {n} BatchSandboxes in {:?}", created.elapsed());
    let apiserver = plane.apiserver_pid().expect("the API server runs");
    std::thread::sleep(Duration::from_secs(3));
    println!(
        "| initial list | gateways | objects | API server CPU s per gateway sync | API server peak RSS MiB | ready p50 s | ready max s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut per_gateway = Vec::new();
    // Two alternating rounds of each, so drift on a shared machine shows.
    for mode in ["paged", "streaming", "paged", "streaming"] {
        let idle = {
            let before = cpu_seconds(apiserver);
            std::thread::sleep(Duration::from_secs(2));
            (cpu_seconds(apiserver) - before) / 2.0
        };
        // Reset the API server's peak RSS, so this round's peak is read afterwards.
        std::fs::write(format!("/proc/{apiserver}/clear_refs"), "5").unwrap();
        let before = cpu_seconds(apiserver);
        let start = Instant::now();
        let gws: Vec<Gateway> = (0..gateways)
            .map(|_| gateway_listing(&plane, mode))
            .collect();
        let mut ready: Vec<Option<Duration>> = vec![None; gateways];
        while ready.iter().any(Option::is_none) {
            for (i, gw) in gws.iter().enumerate() {
                if ready[i].is_none()
                    && support::client::blocking_get(gw.metrics, "/readyz")
                        .is_ok_and(|r| r.status == 200)
                {
                    ready[i] = Some(start.elapsed());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "{mode}: not all ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = start.elapsed();
        let peak = peak_rss_kib(apiserver);
        let cpu = cpu_seconds(apiserver) - before - idle * took.as_secs_f64();
        for gw in &gws {
            assert_eq!(
                gw.metric("sandbox_gateway_route_table_sandboxes") as usize,
                n
            );
        }
        drop(gws);
        let mut times: Vec<Duration> = ready.into_iter().flatten().collect();
        times.sort();
        let each = cpu / gateways as f64;
        per_gateway.push((mode, each));
        println!(
            "| {mode} | {gateways} | {n} | {each:.2} | {:.0} | {:.2} | {:.2} |",
            peak as f64 / 1024.0,
            percentile(&times, 0.5).as_secs_f64(),
            times[times.len() - 1].as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    println!();
    let cost = |mode: &str| -> f64 {
        per_gateway
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, c)| c)
            .sum()
    };
    println!(
        "verdict: a streaming initial list costs the API server {:.0}% of a paged one's CPU per gateway",
        cost("streaming") / cost("paged") * 100.0
    );
    println!();
    updates(&plane, apiserver, n, gateways);
}

/// The API server's CPU per object update with no gateway watching and with `gateways` watching
/// (streaming initial list): what each watching gateway adds to every change of a sandbox.
fn updates(plane: &ControlPlane, apiserver: u32, n: usize, gateways: usize) {
    const UPDATES: usize = 500;
    let boxes = Objects::new(plane, "fanout", &batch_resource());
    println!("| gateways watching | updates | API server CPU ms per update |");
    println!("|---|---|---|");
    let mut per_update = Vec::new();
    for (round, watchers) in [0, gateways, 0, gateways].into_iter().enumerate() {
        let gws: Vec<Gateway> = (0..watchers)
            .map(|_| gateway_listing(plane, "streaming"))
            .collect();
        for gw in &gws {
            gw.wait_ready();
        }
        std::thread::sleep(Duration::from_secs(2));
        let idle = {
            let before = cpu_seconds(apiserver);
            std::thread::sleep(Duration::from_secs(2));
            (cpu_seconds(apiserver) - before) / 2.0
        };
        let before = cpu_seconds(apiserver);
        let start = Instant::now();
        for i in 0..UPDATES {
            let name = format!("sbx-{:07}", (round * UPDATES + i) % n);
            boxes.annotate(
                &name,
                json!({"bench.opensandbox.io/touch": format!("{round}-{i}")}),
            );
        }
        // Let the watch events reach every gateway before the CPU is read.
        std::thread::sleep(Duration::from_millis(500));
        let took = start.elapsed().as_secs_f64();
        let ms = (cpu_seconds(apiserver) - before - idle * took) * 1000.0 / UPDATES as f64;
        per_update.push((watchers, ms));
        println!("| {watchers} | {UPDATES} | {ms:.2} |");
        drop(gws);
        std::thread::sleep(Duration::from_secs(2));
    }
    let mean = |w: usize| {
        let v: Vec<f64> = per_update
            .iter()
            .filter(|(k, _)| *k == w)
            .map(|(_, ms)| *ms)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!();
    println!(
        "verdict: each watching gateway adds {:.3} ms of API server CPU to every object update ({:.2} ms with none, {:.2} ms with {gateways})",
        (mean(gateways) - mean(0)) / gateways as f64,
        mean(0),
        mean(gateways)
    );
}

fn serve(kubeconfig: &str) {
    use std::io::Read;
    let plane = ControlPlane::start();
    let boxes = Objects::new(&plane, "default", &batch_resource());
    boxes.create(
        "bench",
        json!({"sandbox.opensandbox.io/endpoints": "[\"127.0.0.1\"]"}),
        json!({"replicas": 1, "ready": 1}),
    );
    // Written whole, then renamed: a reader never sees half a file.
    let partial = format!("{kubeconfig}.partial");
    std::fs::copy(&plane.kubeconfig, &partial).unwrap();
    std::fs::rename(&partial, kubeconfig).unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args.get(2).and_then(|s| s.parse().ok());
    match args.get(1).map(String::as_str).unwrap_or("propagation") {
        "propagation" => propagation(n.unwrap_or(500)),
        "scale" => scale(n.unwrap_or(100_000)),
        "fanout" => fanout(
            n.unwrap_or(20_000),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(9),
        ),
        "serve" => serve(args.get(2).expect("serve KUBECONFIG")),
        other => panic!("unknown benchmark {other:?}: propagation, scale, fanout or serve"),
    }
}
