//! Policy evaluation time at 10 and at 10,000 rules, side by side: prints a table and a verdict.
//! Run with `cargo run --release -p sidecar --example policy-bench`.

use std::hint::black_box;
use std::time::Instant;

use sandbox_api::policy::{Action, Policy, Rule};
use sidecar::engine::Engine;

fn policy(n: usize) -> Policy {
    let egress = (0..n)
        .map(|i| Rule {
            action: if i % 3 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
            target: match i % 4 {
                0 => format!("host{i}.example{}.test", i % 97),
                1 => format!("*.zone{i}.test"),
                2 => format!("10.{}.{}.0/24", i / 256 % 256, i % 256),
                _ => format!("198.51.{}.{}", i / 256 % 256, i % 256),
            },
        })
        .collect();
    Policy {
        default_action: Action::Deny,
        egress,
    }
}

/// Nanoseconds per evaluation, median of 5 runs of `iterations` lookups over a mixed query set.
fn measure(engine: &Engine, iterations: usize) -> f64 {
    let names: Vec<String> = (0..64)
        .map(|i| format!("a.b.zone{}.test", i * 7))
        .chain((0..64).map(|i| format!("miss{i}.nowhere.test")))
        .collect();
    let ips: Vec<std::net::IpAddr> = (0..128u8)
        .map(|i| std::net::Ipv4Addr::new(10, 0, i, i).into())
        .collect();
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iterations {
                black_box(engine.name(black_box(&names[i % names.len()])));
                black_box(engine.ip(black_box(ips[i % ips.len()])));
            }
            start.elapsed().as_nanos() as f64 / (2 * iterations) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    let iterations = 200_000;
    let small = Engine::new(&policy(10), &[], &[]);
    let large = Engine::new(&policy(10_000), &[], &[]);
    let (a, b) = (measure(&small, iterations), measure(&large, iterations));
    println!("| rules | ns per evaluation (median of 5) |");
    println!("|---|---|");
    println!("| 10 | {a:.0} |");
    println!("| 10,000 | {b:.0} |");
    println!();
    println!(
        "verdict: 10,000 rules cost {:.2}x the time of 10 rules per evaluation",
        b / a
    );
}
