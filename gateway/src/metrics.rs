//! Prometheus metrics, registered in the default registry that the metrics listener serves.
//! Labels come from small fixed sets, never from sandbox ids or error text.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, histogram_opts,
    opts, register_histogram, register_histogram_vec, register_int_counter,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

pub struct Metrics {
    /// Requests by route mode and status class (`2xx`…`5xx`).
    pub requests: IntCounterVec,
    /// Time from request header to end of response, by route mode.
    pub duration: HistogramVec,
    /// Failures talking to sandboxes by kind.
    pub upstream_errors: IntCounterVec,
    /// Refused credentials by reason.
    pub auth_failures: IntCounterVec,
    /// Sandbox ids in the route table.
    pub table_size: IntGauge,
    /// 1 once the provider has loaded its first full snapshot.
    pub ready: IntGauge,
    /// Provider loads that failed and kept the previous table, by provider.
    pub provider_errors: IntCounterVec,
    /// Successful provider loads, by provider.
    pub provider_loads: IntCounterVec,
    /// Unix time of the last successful provider load.
    pub last_sync: IntGauge,
    /// Requests in flight.
    pub in_flight: IntGauge,
    /// Signing-key reloads that failed and kept the previous keys.
    pub key_reload_errors: IntCounter,
    /// Endpoints dropped because `--allowed-upstream-cidrs` does not permit them.
    pub upstream_refused: IntCounter,
    /// Requests refused before any dial by the gateway's policy, by reason.
    pub refused: IntCounterVec,
    /// Failed-credential limiter entries evicted to stay within its capacity.
    pub auth_limiter_evictions: IntCounter,
    /// Clients the failed-credential limiter holds.
    pub auth_limiter_clients: IntGauge,
    /// Connections closed for a missing or malformed PROXY protocol header, by reason.
    pub proxy_protocol_errors: IntCounterVec,
    /// Connections closed because their request header did not arrive within the deadline.
    pub header_timeouts: IntCounter,
    /// HTTP/2 connections closed for a control-frame flood, by the frame that ran the budget out.
    pub h2_floods: IntCounterVec,
    /// TLS handshakes that failed or did not finish within the header timeout.
    pub tls_handshake_errors: IntCounterVec,
    /// Watch events by kind and type.
    pub watch_events: IntCounterVec,
    /// 1 while a provider's watch is connected, by provider.
    pub provider_connected: IntGaugeVec,
    /// Time from an object's last write (API server clock, whole seconds) to its route being published.
    pub propagation: Histogram,
    /// OSEP-0009 renew intents by outcome: `queued` (passed the per-sandbox throttle),
    /// `published` (on the Redis list), `dropped` (the queue was full).
    pub renew_intents: IntCounterVec,
    /// 1 while the renew-intent publisher is connected to Redis.
    pub renew_redis_up: IntGauge,
    /// Seconds until each TLS certificate in force expires, by its first name.
    pub tls_expiry: IntGaugeVec,
    /// Certificate reloads that failed and kept the previous certificates.
    pub tls_reload_errors: IntCounter,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    Ok(Metrics {
        requests: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_requests_total",
                "Requests handled, by route mode and status class."
            ),
            &["mode", "class"]
        )?,
        duration: register_histogram_vec!(
            histogram_opts!(
                "sandbox_gateway_request_duration_seconds",
                "Time from request header to the end of the response.",
                buckets
            ),
            &["mode"]
        )?,
        upstream_errors: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_upstream_errors_total",
                "Failures talking to sandboxes, by kind."
            ),
            &["kind"]
        )?,
        auth_failures: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_auth_failures_total",
                "Refused credentials, by reason."
            ),
            &["reason"]
        )?,
        table_size: register_int_gauge!(opts!(
            "sandbox_gateway_route_table_sandboxes",
            "Sandbox ids in the route table."
        ))?,
        ready: register_int_gauge!(opts!(
            "sandbox_gateway_ready",
            "1 once the first full snapshot of sandboxes has loaded."
        ))?,
        provider_errors: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_provider_errors_total",
                "Provider loads that failed and kept the previous table."
            ),
            &["provider"]
        )?,
        provider_loads: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_provider_loads_total",
                "Successful provider loads."
            ),
            &["provider"]
        )?,
        last_sync: register_int_gauge!(opts!(
            "sandbox_gateway_provider_last_sync_timestamp_seconds",
            "Unix time of the last successful provider load."
        ))?,
        in_flight: register_int_gauge!(opts!(
            "sandbox_gateway_requests_in_flight",
            "Requests being handled."
        ))?,
        key_reload_errors: register_int_counter!(opts!(
            "sandbox_gateway_key_reload_errors_total",
            "Signing-key file reloads that failed and kept the previous keys."
        ))?,
        upstream_refused: register_int_counter!(opts!(
            "sandbox_gateway_upstream_refused_total",
            "Endpoints never dialled because --allowed-upstream-cidrs does not permit them."
        ))?,
        refused: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_requests_refused_total",
                "Requests refused before any dial, by reason (port_denied, port_not_exposed, framing)."
            ),
            &["reason"]
        )?,
        auth_limiter_evictions: register_int_counter!(opts!(
            "sandbox_gateway_auth_limiter_evictions_total",
            "Failed-credential limiter entries evicted to stay within --auth-limiter-max-clients."
        ))?,
        auth_limiter_clients: register_int_gauge!(opts!(
            "sandbox_gateway_auth_limiter_clients",
            "Clients the failed-credential limiter holds."
        ))?,
        header_timeouts: register_int_counter!(opts!(
            "sandbox_gateway_header_timeouts_total",
            "Connections closed because their request header did not arrive within --header-timeout-seconds."
        ))?,
        tls_handshake_errors: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_tls_handshake_errors_total",
                "TLS handshakes that failed (failed) or did not finish within --header-timeout-seconds (timeout)."
            ),
            &["reason"]
        )?,
        h2_floods: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_h2_floods_total",
                "HTTP/2 connections closed for sending control frames faster than --h2-max-control-frames-per-second, by frame type."
            ),
            &["frame"]
        )?,
        proxy_protocol_errors: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_proxy_protocol_errors_total",
                "Connections closed for a missing or malformed PROXY protocol header, by reason."
            ),
            &["reason"]
        )?,
        watch_events: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_watch_events_total",
                "Kubernetes watch events, by kind and type."
            ),
            &["kind", "type"]
        )?,
        provider_connected: register_int_gauge_vec!(
            opts!(
                "sandbox_gateway_provider_connected",
                "1 while the provider's watch is connected."
            ),
            &["provider"]
        )?,
        propagation: register_histogram!(histogram_opts!(
            "sandbox_gateway_route_propagation_seconds",
            "Time from an object's last write (API server clock, whole seconds) to its route being published.",
            vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
        ))?,
        renew_intents: register_int_counter_vec!(
            opts!(
                "sandbox_gateway_renew_intents_total",
                "OSEP-0009 renew intents: queued (passed the per-sandbox throttle), published (on the Redis list), dropped (queue full)."
            ),
            &["outcome"]
        )?,
        renew_redis_up: register_int_gauge!(opts!(
            "sandbox_gateway_renew_redis_up",
            "1 while the renew-intent publisher is connected to Redis."
        ))?,
        tls_expiry: register_int_gauge_vec!(
            opts!(
                "sandbox_gateway_tls_certificate_expiry_seconds",
                "Seconds until each TLS certificate in force expires (negative: expired), by its first name."
            ),
            &["certificate"]
        )?,
        tls_reload_errors: register_int_counter!(opts!(
            "sandbox_gateway_tls_reload_errors_total",
            "TLS certificate reloads that failed and kept the previous certificates."
        ))?,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(m) => m,
    // Registration fails only if a name is registered twice, a programming error caught by tests.
    Err(e) => panic!("metric registration failed: {e}"),
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Status classes, as metric labels.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Index into [`CLASSES`] of a status code's class.
pub fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 5,
    }
}

/// Observes a request's duration; kept separate so the hot path holds the resolved histogram.
pub fn duration_for(mode: &'static str) -> Histogram {
    metrics().duration.with_label_values(&[mode])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_once_and_classifies() {
        metrics()
            .requests
            .with_label_values(&["header", "2xx"])
            .inc();
        assert_eq!(CLASSES[class_index(404)], "4xx");
        assert_eq!(CLASSES[class_index(101)], "1xx");
        assert_eq!(CLASSES[class_index(599)], "5xx");
        assert_eq!(CLASSES[class_index(0)], "other");
        assert_eq!(CLASSES[class_index(600)], "other");
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .unwrap();
        assert!(text.contains("sandbox_gateway_requests_total"));
    }
}
