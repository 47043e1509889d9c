//! Controller metrics in the default Prometheus registry.

use std::sync::LazyLock;

use prometheus::{
    Histogram, IntCounter, IntCounterVec, IntGauge, histogram_opts, opts, register_histogram,
    register_int_counter, register_int_counter_vec, register_int_gauge,
};

pub struct Metrics {
    pub reconciles: IntCounter,
    pub errors: IntCounter,
    pub duration: Histogram,
    pub pods_created: IntCounter,
    pub leader: IntGauge,
    /// BatchSandboxes whose latest generation has not been reconciled yet: the work backlog.
    pub pending: IntGauge,
    /// Events not recorded because the queue to the API server was full.
    pub events_dropped: IntCounter,
    /// Token Secrets read from the API server (the cache could not vouch for them).
    pub secret_reads: IntCounter,
    /// OSEP-0009 renew intents taken off Redis, by outcome and (for `ignored`) reason.
    pub renew_intents: IntCounterVec,
    /// 1 while the renew-intent consumer is connected to Redis.
    pub renew_redis_up: IntGauge,
}

fn build() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        reconciles: register_int_counter!(opts!(
            "sandbox_controller_reconciles_total",
            "Reconcile passes."
        ))?,
        errors: register_int_counter!(opts!(
            "sandbox_controller_reconcile_errors_total",
            "Reconcile passes that failed and were retried."
        ))?,
        duration: register_histogram!(histogram_opts!(
            "sandbox_controller_reconcile_duration_seconds",
            "Time of one reconcile pass.",
            vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
            ]
        ))?,
        pods_created: register_int_counter!(opts!(
            "sandbox_controller_pods_created_total",
            "Sandbox pods created."
        ))?,
        leader: register_int_gauge!(opts!(
            "sandbox_controller_leader",
            "1 while this process holds the leader lease."
        ))?,
        pending: register_int_gauge!(opts!(
            "sandbox_controller_pending_objects",
            "BatchSandboxes whose latest generation the controller has not reconciled yet (the work backlog)."
        ))?,
        events_dropped: register_int_counter!(opts!(
            "sandbox_controller_events_dropped_total",
            "Kubernetes events dropped because the queue to the API server was full."
        ))?,
        secret_reads: register_int_counter!(opts!(
            "sandbox_controller_secret_reads_total",
            "Egress token Secrets read from the API server to check their content."
        ))?,
        renew_intents: register_int_counter_vec!(
            opts!(
                "sandbox_controller_renew_intents_total",
                "OSEP-0009 renew intents taken off Redis: renewed, malformed, or ignored (with the reason)."
            ),
            &["outcome", "reason"]
        )?,
        renew_redis_up: register_int_gauge!(opts!(
            "sandbox_controller_renew_redis_up",
            "1 while the renew-intent consumer is connected to Redis."
        ))?,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(m) => m,
    Err(e) => panic!("metric registration failed: {e}"),
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}
