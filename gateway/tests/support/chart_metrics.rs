//! The metric names the chart's alerts and dashboard query, checked against what a real binary
//! exposes on /metrics, so no alert watches a series that never exists.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::Path;

fn chart_files() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("charts/opensandbox").is_dir())
        .expect("the repository root")
        .join("charts/opensandbox/files");
    ["alerts.yaml", "dashboard.json"]
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
        .collect()
}

/// Names starting with `prefix` in the chart's alert and dashboard queries.
pub fn used(prefix: &str) -> BTreeSet<String> {
    let text = chart_files();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Series names in a Prometheus text exposition.
pub fn exposed(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Metrics only a gateway serving TLS exposes.
const TLS_ONLY: &str = "sandbox_gateway_tls_";

/// Panics naming every metric with `prefix` the chart queries that `body` does not expose.
pub fn assert_exposed(prefix: &str, body: &str) {
    let used = used(prefix);
    assert!(!used.is_empty(), "the chart queries no {prefix} metric");
    let exposed = exposed(body);
    let missing: Vec<&String> = used
        .difference(&exposed)
        // Exposed only by a gateway with certificates; `gateway/tests/tls.rs` checks them.
        .filter(|m| prefix.starts_with(TLS_ONLY) || !m.starts_with(TLS_ONLY))
        .collect();
    assert!(
        missing.is_empty(),
        "the chart's alerts or dashboard query {missing:?}, which /metrics does not expose"
    );
}
