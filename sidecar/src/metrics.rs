//! Prometheus metrics, served at `/metrics` on the API port.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric carries `sandbox_id` and the extra attributes, when set, as the reference's do.
pub static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let (fields, _) = crate::config::identity_fields(|k| std::env::var(k).ok());
    if fields.is_empty() {
        return Registry::new();
    }
    Registry::new_custom(None, Some(fields.into_iter().collect())).unwrap_or_default()
});

fn register<C: prometheus::core::Collector + Clone + 'static>(c: C) -> C {
    // Names are constants; registering twice is a programming error caught by the tests.
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{e}")))
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).unwrap_or_else(|e| panic!("{e}")))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).unwrap_or_else(|e| panic!("{e}")))
}

/// DNS queries by verdict: `allowed`, `denied`, `servfail` (upstreams failed), `formerr`
/// (malformed or no question), `notimp` (not a QUERY).
pub static QUERIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_dns_queries_total",
        "DNS queries answered by the proxy, by verdict.",
        &["verdict"],
    )
});

/// The verdict label of `egress_dns_queries_total`.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    Allowed,
    Denied,
    Servfail,
    Formerr,
    Notimp,
}

impl Verdict {
    const ALL: [Verdict; 5] = [
        Verdict::Allowed,
        Verdict::Denied,
        Verdict::Servfail,
        Verdict::Formerr,
        Verdict::Notimp,
    ];

    fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Servfail => "servfail",
            Verdict::Formerr => "formerr",
            Verdict::Notimp => "notimp",
        }
    }
}

/// The per-verdict counters, resolved once instead of by label on every query.
static VERDICTS: LazyLock<[IntCounter; 5]> =
    LazyLock::new(|| Verdict::ALL.map(|v| QUERIES.with_label_values(&[v.label()])));

/// Counts one answered query.
pub fn query(verdict: Verdict) {
    VERDICTS[verdict as usize].inc();
}

pub static CACHE_HITS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "egress_dns_cache_hits_total",
        "Allowed queries answered from the answer cache.",
    )
});

pub static UPSTREAM_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "egress_dns_upstream_duration_seconds",
                "Time to get an answer from an upstream resolver (one attempt).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}")),
    )
});

pub static QUERY_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "egress_dns_query_duration_seconds",
                "Time from a query's arrival to its answer, whatever the verdict.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}")),
    )
});

/// Answer records dropped because they point where a public name must not: `metadata`
/// (link-local, cloud metadata) or `private` (loopback, RFC 1918, 100.64.0.0/10, fc00::/7 and
/// `OPENSANDBOX_EGRESS_PRIVATE_CIDRS`), unless a rule names the address.
pub static ANSWERS_STRIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_dns_answers_stripped_total",
        "Answer records dropped because they pointed into metadata or private address space.",
        &["class"],
    )
});

pub static UPSTREAM_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_dns_upstream_failures_total",
        "Upstream attempts that timed out, failed or answered SERVFAIL/REFUSED, by upstream.",
        &["upstream"],
    )
});

pub static UPSTREAM_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new(
                "egress_dns_upstream_up",
                "1 while the upstream answers, 0 after a timeout or error until a probe or query gets an answer.",
            ),
            &["upstream"],
        )
        .unwrap_or_else(|e| panic!("{e}")),
    )
});

pub static NFT_UPDATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_nft_updates_total",
        "nftables transactions, by kind (static: policy; dynamic: learned addresses) and result.",
        &["kind", "result"],
    )
});

pub static LEARNED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "egress_nft_learned_addresses",
        "Addresses admitted from allowed DNS answers and not yet expired.",
    )
});

pub static RULES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "egress_policy_rules",
        "Rules in force: user policy plus the always-rule files.",
    )
});

pub static POLICY_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_policy_changes_total",
        "Policy changes applied, by source (env, file, api, always-file).",
        &["source"],
    )
});

pub static API_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_api_requests_total",
        "Policy API requests, by status code.",
        &["code"],
    )
});

pub fn nft_update(kind: &str, ok: bool) {
    NFT_UPDATES
        .with_label_values(&[kind, if ok { "ok" } else { "error" }])
        .inc();
}

/// Registers every metric, so all appear from the first scrape.
/// Deny-webhook notifications by outcome: `delivered`, `refused` (3xx/4xx, not retried),
/// `failed` (after the retries), `dropped` (the queue was full).
pub static WEBHOOK: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "egress_deny_webhook_total",
        "Deny-webhook notifications by outcome: delivered, refused, failed, dropped.",
        &["outcome"],
    )
});

/// Allowed lookups not logged because `log_skip.always` names them.
pub static LOG_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "egress_dns_log_skipped_total",
        "Allowed lookups whose log line was skipped because log_skip.always names them.",
    )
});

pub fn init() {
    LazyLock::force(&WEBHOOK);
    LazyLock::force(&LOG_SKIPPED);
    LazyLock::force(&VERDICTS);
    LazyLock::force(&CACHE_HITS);
    LazyLock::force(&UPSTREAM_LATENCY);
    LazyLock::force(&QUERY_LATENCY);
    LazyLock::force(&UPSTREAM_FAILURES);
    LazyLock::force(&UPSTREAM_UP);
    for class in ["metadata", "private"] {
        ANSWERS_STRIPPED.with_label_values(&[class]);
    }
    LazyLock::force(&NFT_UPDATES);
    LazyLock::force(&LEARNED);
    LazyLock::force(&RULES);
    LazyLock::force(&POLICY_CHANGES);
    LazyLock::force(&API_REQUESTS);
}

pub fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}
