//! The k6 load tests (run through `loadtest/k6.sh`, which installs k6 and builds the release
//! gateway): starts the tests' upstream (HTTP echo, SSE, WebSocket echo) and the gateway on a
//! sandbox file, writes the hosts, tokens and signed routes each scenario uses, runs every
//! scenario of `loadtest/k6/gateway.js` with k6 and prints one table and a verdict.
//!
//! `k6-load short|full [scenario...]`, or `k6-load soak`: the mixed scenario for a long run
//! (10,000 sandboxes, 1,000/s, 10 minutes) while the gateway's RSS is sampled; its growth from
//! the end of the first sixth of the run to the end must stay under 5%. Env: `K6_BIN` (the k6
//! binary), `SANDBOX_GATEWAY_BIN`, `K6_RATE` and `K6_DURATION` (override the form's rate and
//! duration).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sandbox_api::signing;
use serde_json::{Value, json};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox};

const SCENARIOS: [&str; 8] = [
    "header",
    "host",
    "signed",
    "secure",
    "websocket",
    "sse",
    "churn",
    "flood",
];
/// The signing key `k` ("pqrs"), as the gateway is given it.
const KEYS: &str = "k=cHFycw==";
const SECRET: &[u8] = b"pqrs";

struct Form {
    sandboxes: usize,
    rate: u32,
    duration: String,
}

fn form(name: &str) -> Form {
    let (sandboxes, rate, duration) = match name {
        "full" => (10_000, 1_000, "30s"),
        "soak" => (10_000, 1_000, "10m"),
        _ => (1_000, 200, "5s"),
    };
    Form {
        sandboxes,
        rate: std::env::var("K6_RATE")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(rate),
        duration: std::env::var("K6_DURATION").unwrap_or_else(|_| duration.to_owned()),
    }
}

/// The sandbox file: `o<i>` open, `s<i>` secure (token holders and signed routes), `a<i>` secure
/// (the flood's targets), and, when `churn` is `Some(k)`, the churning `c<j>` present in turn.
fn sandbox_file(open: usize, secure: usize, churn: Option<usize>) -> String {
    let e = Some(r#"["127.0.0.1"]"#);
    let mut docs: Vec<String> = (0..open)
        .map(|i| batch_sandbox(&format!("o{i}"), "load", 1, e, None))
        .collect();
    for i in 0..secure {
        docs.push(batch_sandbox(
            &format!("s{i}"),
            "load",
            1,
            e,
            Some(&token(i)),
        ));
        docs.push(batch_sandbox(
            &format!("a{i}"),
            "load",
            1,
            e,
            Some(&token(i)),
        ));
    }
    if let Some(k) = churn {
        docs.extend(
            (0..100)
                .filter(|j| (j + k) % 2 == 0)
                .map(|j| batch_sandbox(&format!("c{j}"), "load", 1, e, None)),
        );
    }
    format!("apiVersion: v1\nkind: List\nitems:\n{}", list_items(&docs))
}

/// The documents as `kind: List` items (indented under `items:`).
fn list_items(docs: &[String]) -> String {
    docs.iter()
        .map(|d| {
            let mut lines = d.lines();
            let first = lines.next().unwrap_or_default();
            let rest: String = lines.map(|l| format!("    {l}\n")).collect();
            format!("  - {first}\n{rest}")
        })
        .collect()
}

fn token(i: usize) -> String {
    format!("load-token-{i:06}-abcdefghijklmnopqrstuvwx")
}

fn data(form: &Form, port: u16, secure: usize) -> Value {
    let expires = signing::format_b36(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600,
    );
    let port_text = port.to_string();
    let signed: Vec<String> = (0..secure)
        .map(|i| {
            let id = format!("s{i}");
            let sig = signing::sign(SECRET, b'k', &id, &port_text, &expires);
            format!("{id}-{port}-{expires}-{}", String::from_utf8_lossy(&sig))
        })
        .collect();
    let forged: Vec<String> = (0..secure)
        .flat_map(|i| (0..4).map(move |n| format!("a{i}-{port}-zzzzzz-{:08x}k", i * 7 + n)))
        .collect();
    json!({
        "open": (0..form.sandboxes).map(|i| format!("o{i}-{port}")).collect::<Vec<_>>(),
        "secure": (0..secure).map(|i| json!({"route": format!("s{i}-{port}"), "token": token(i)})).collect::<Vec<_>>(),
        "signed": signed,
        "forged": forged,
    })
}

/// Samples a process's RSS every second: the sample at the end of the first sixth of the run
/// (pools and caches warmed up) and the last one.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    fn start(pid: u32, duration: &str) -> Self {
        let total = parse_duration(duration);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let (mut warm, mut last) = (None, 0);
            while !flag.load(Ordering::Relaxed) {
                last = rss_kib(pid);
                if warm.is_none() && started.elapsed() >= total / 6 {
                    warm = Some(last);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            (warm.unwrap_or(last), last)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// k6 durations as this runner writes them: `30s`, `10m`, `1h`.
fn parse_duration(text: &str) -> Duration {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number.parse().unwrap_or(0);
    Duration::from_secs(match unit {
        "m" => n * 60,
        "h" => n * 3600,
        _ => n,
    })
}

struct Outcome {
    scenario: String,
    passed: bool,
    summary: Value,
    log: String,
}

fn metric(summary: &Value, name: &str, field: &str) -> f64 {
    summary["metrics"][name][field].as_f64().unwrap_or(0.0)
}

fn run_k6(
    k6: &str,
    script: &Path,
    scenario: &str,
    base: &str,
    data: &Path,
    form: &Form,
    dir: &Path,
) -> Outcome {
    let export = dir.join(format!("{scenario}.json"));
    let out = Command::new(k6)
        // k6 reads `K6_*` variables as its own options (`K6_DURATION` would replace the
        // scenarios); this runner's overrides reach the script through `-e` only.
        .env_remove("K6_DURATION")
        .env_remove("K6_RATE")
        .args(["run", "--quiet", "--no-color", "--summary-export"])
        .arg(&export)
        .args(["-e", &format!("SCENARIO={scenario}")])
        .args(["-e", &format!("BASE={base}")])
        .args(["-e", &format!("DATA={}", data.display())])
        .args(["-e", &format!("RATE={}", form.rate)])
        .args(["-e", &format!("DURATION={}", form.duration)])
        .arg(script)
        .output()
        .expect("run k6 (loadtest/k6.sh installs it)");
    let summary = std::fs::read_to_string(&export)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Outcome {
        scenario: scenario.to_owned(),
        passed: out.status.success(),
        summary,
        log: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let form_name = args.next().unwrap_or_else(|| "short".into());
    let wanted: Vec<String> = args.collect();
    let form = form(&form_name);
    let k6 = std::env::var("K6_BIN").unwrap_or_else(|_| "k6".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/k6/gateway.js");
    let secure = 100;

    let upstream = Upstream::start("127.0.0.1".parse().unwrap(), 0);
    let port = upstream.addr.port();
    let dir = TempDir::new();
    let file = dir.write(
        "sandboxes.yaml",
        &sandbox_file(form.sandboxes, secure, None),
    );
    let data_file = dir.write("data.json", &data(&form, port, secure).to_string());
    let gw = Gateway::start(
        &file,
        GatewayOptions {
            keys: Some(KEYS),
            extra: vec!["--access-log=false".into()],
            ..Default::default()
        },
    );
    let base = format!("http://{}", gw.addr);
    println!(
        "k6 {form_name}: {} open + {} secure sandboxes, {} iterations/s for {} per scenario",
        form.sandboxes,
        2 * secure,
        form.rate,
        form.duration
    );

    let soak = form_name == "soak";
    let scenarios: Vec<&str> = if soak {
        vec!["soak"]
    } else {
        SCENARIOS
            .into_iter()
            .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s))
            .collect()
    };
    let sampler = soak.then(|| RssSampler::start(gw.child.id(), &form.duration));
    let mut outcomes = Vec::new();
    for scenario in &scenarios {
        let stop = Arc::new(AtomicBool::new(false));
        // Churn: the sandbox file flips 50 sandboxes in and 50 out every 250 ms while the load
        // asks only for sandboxes that stay.
        let churner = (*scenario == "churn").then(|| {
            let (stop, path, n) = (stop.clone(), file.clone(), form.sandboxes);
            std::thread::spawn(move || {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, sandbox_file(n, secure, Some(k))).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                    std::thread::sleep(Duration::from_millis(250));
                }
                k
            })
        });
        let outcome = run_k6(&k6, &script, scenario, &base, &data_file, &form, dir.path());
        stop.store(true, Ordering::Relaxed);
        if let Some(t) = churner {
            let rewrites = t.join().unwrap();
            println!("churn: the sandbox file was rewritten {rewrites} times under load");
            std::fs::write(&file, sandbox_file(form.sandboxes, secure, None)).unwrap();
        }
        outcomes.push(outcome);
    }

    println!(
        "\n| scenario | requests | failed | checks | p50 ms | p95 ms | p99 ms | dropped | verdict |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        let s = &o.summary;
        let (requests, latency) = if o.scenario == "websocket" {
            (metric(s, "ws_sessions", "count"), "ws_connecting")
        } else {
            (metric(s, "http_reqs", "count"), "http_req_duration")
        };
        println!(
            "| {} | {:.0} | {:.2}% | {:.2}% | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
            o.scenario,
            requests,
            metric(s, "http_req_failed", "value") * 100.0,
            metric(s, "checks", "value") * 100.0,
            metric(s, latency, "p(50)"),
            metric(s, latency, "p(95)"),
            metric(s, latency, "p(99)"),
            metric(s, "dropped_iterations", "count"),
            if o.passed { "PASS" } else { "FAIL" }
        );
    }
    let mut memory_ok = true;
    if let Some(sampler) = sampler {
        let (warm, end) = sampler.finish();
        let growth = (end as f64 / warm.max(1) as f64 - 1.0) * 100.0;
        // Growth over a few seconds says little (pools still filling): judged from 5 minutes.
        let judged = parse_duration(&form.duration) >= Duration::from_secs(300);
        memory_ok = !judged || growth < 5.0;
        println!(
            "\nsoak memory: gateway RSS {:.1} MiB after the first sixth of the run, {:.1} MiB at the end ({growth:+.1}%; limit +5%): {}",
            warm as f64 / 1024.0,
            end as f64 / 1024.0,
            match (judged, memory_ok) {
                (false, _) => "not judged, run shorter than 5 minutes",
                (true, true) => "PASS",
                (true, false) => "FAIL",
            }
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    for o in &failed {
        eprintln!("\n--- k6 output of {} ---\n{}", o.scenario, o.log);
    }
    println!(
        "\nk6 verdict: {} ({} of {} scenarios passed their thresholds)",
        if failed.is_empty() && memory_ok {
            "PASS"
        } else {
            "FAIL"
        },
        outcomes.len() - failed.len(),
        outcomes.len()
    );
    drop(gw);
    drop(upstream);
    if !failed.is_empty() || !memory_ok {
        std::process::exit(1);
    }
}
