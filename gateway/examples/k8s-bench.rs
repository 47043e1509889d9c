//! Benchmarks of the Kubernetes provider against a real kube-apiserver (run through
//! `loadtest/k8s.sh`, which builds the release gateway and sets `SANDBOX_GATEWAY_BIN`).
//!
//! - `propagation [N]`: N endpoint changes (default 500); for each, the time from the API
//!   server acknowledging the patch to the first request routed by the new endpoint.
//! - `scale [N]`: N BatchSandboxes (default 100000) created first; then the gateway's time to
//!   ready and its RSS with all of them in the table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::client::get;
use support::k8s::{ControlPlane, Objects, batch_resource};
use support::{Gateway, GatewayOptions};

fn gateway(plane: &ControlPlane) -> Gateway {
    let opts = GatewayOptions {
        extra: vec!["--access-log=false".into()],
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

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args.get(2).and_then(|s| s.parse().ok());
    match args.get(1).map(String::as_str).unwrap_or("propagation") {
        "propagation" => propagation(n.unwrap_or(500)),
        "scale" => scale(n.unwrap_or(100_000)),
        other => panic!("unknown benchmark {other:?}: propagation or scale"),
    }
}
