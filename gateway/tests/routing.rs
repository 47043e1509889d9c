//! Reference routing and secure access, end to end: the real gateway binary, real upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::client::{Response, get};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox, unique_loopback};

struct Scenario {
    ip: IpAddr,
    gw: Gateway,
    _upstreams: Vec<Upstream>,
    _dir: TempDir,
}

/// `nosec` (no token) and `sec` (token `annot-token`) on one loopback address with an upstream
/// on each of `ports`, plus any `extra` objects.
fn scenario(mode: &str, keys: Option<&str>, ports: &[u16], extra: &[String]) -> Scenario {
    let ip = unique_loopback();
    let upstreams = ports.iter().map(|p| Upstream::start(ip, *p)).collect();
    let endpoints = format!(r#"["{ip}"]"#);
    let mut docs = vec![
        batch_sandbox("nosec", "team-a", 1, Some(&endpoints), None),
        batch_sandbox("sec", "team-a", 1, Some(&endpoints), Some("annot-token")),
        batch_sandbox("my-sandbox", "team-b", 1, Some(&endpoints), None),
    ];
    docs.extend(extra.iter().cloned());
    let dir = TempDir::new();
    let file = dir.write("sandboxes.yaml", &docs.join("---\n"));
    let gw = Gateway::start(
        &file,
        GatewayOptions {
            mode,
            keys,
            ..Default::default()
        },
    );
    Scenario {
        ip,
        gw,
        _upstreams: upstreams,
        _dir: dir,
    }
}

fn host(gw: &Gateway, host: &str, extra: &[(&str, &str)]) -> Response {
    let mut headers = vec![("Host", host)];
    headers.extend_from_slice(extra);
    get(gw.addr, "/probe?x=1", &headers)
}

fn upstream_header(resp: &Response, name: &str) -> Option<String> {
    resp.upstream_header(name)
}

fn assert_proxied(resp: &Response, path: &str) {
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert_eq!(resp.echo()["path"], path);
    assert_eq!(
        resp.header("Reverse-Proxy-Server-PowerBy"),
        Some("OpenSandbox-ingress")
    );
}

fn assert_refused(resp: &Response, status: u16) {
    assert_eq!(resp.status, status, "{}", resp.body_text());
    assert!(
        resp.body_text().starts_with("OpenSandbox Ingress: "),
        "{}",
        resp.body_text()
    );
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
}

#[test]
fn header_mode_secure_access() {
    let s = scenario("header", Some("k=cHFycw=="), &[7777, 8080], &[]);
    let gw = &s.gw;
    assert_refused(&host(gw, "sec-7777.gw", &[]), 401);
    let ok = host(
        gw,
        "sec-7777.gw",
        &[("OpenSandbox-Secure-Access", "annot-token")],
    );
    assert_proxied(&ok, "/probe");
    assert_eq!(upstream_header(&ok, "opensandbox-secure-access"), None);
    assert_refused(
        &host(
            gw,
            "sec-7777.gw",
            &[("OpenSandbox-Secure-Access", "bad-token")],
        ),
        401,
    );
    assert_refused(
        &host(gw, "sec-7777.gw", &[("OpenSandbox-Secure-Access", "")]),
        401,
    );
    assert_proxied(&host(gw, "sec-7777-x2qxvk-65ad791ek.gw", &[]), "/probe");
    assert_refused(&host(gw, "sec-7777-x2qxvk-aabbccddk.gw", &[]), 401);
    assert_proxied(
        &host(
            gw,
            "sec-7777-x2qxvk-aabbccddk.gw",
            &[("OpenSandbox-Secure-Access", "annot-token")],
        ),
        "/probe",
    );
    let expired = host(gw, "sec-7777-gjdgxs-d35726e3k.gw", &[]);
    assert_refused(&expired, 401);
    assert!(
        expired.body_text().contains("expired"),
        "{}",
        expired.body_text()
    );
    assert_proxied(&host(gw, "nosec-8080.sandbox.gw", &[]), "/probe");
    let junk = [
        ("OpenSandbox-Secure-Access", "junk"),
        ("Authorization", "Bearer junk"),
    ];
    let resp = host(gw, "nosec-8080.sandbox.gw", &junk);
    assert_proxied(&resp, "/probe");
    assert_eq!(
        upstream_header(&resp, "authorization").as_deref(),
        Some("Bearer junk")
    );
    assert_proxied(&host(gw, "nosec-8080-0-2def8676a.gw", &[]), "/probe");
    assert!(gw.metric("sandbox_gateway_auth_failures_total{reason=\"bad_signature\"}") >= 1.0);
    assert!(gw.metric("sandbox_gateway_auth_failures_total{reason=\"expired\"}") >= 1.0);
    assert!(gw.metric("sandbox_gateway_auth_failures_total{reason=\"bad_token\"}") >= 2.0);
}

#[test]
fn failed_credentials_are_rate_limited_per_client() {
    let ip = unique_loopback();
    let _up = Upstream::start(ip, 7777);
    let dir = TempDir::new();
    let e = format!(r#"["{ip}"]"#);
    let docs = [
        batch_sandbox("sec", "a", 1, Some(&e), Some("annot-token")),
        batch_sandbox("nosec", "a", 1, Some(&e), None),
        batch_sandbox("sec2", "a", 1, Some(&e), Some("other-token")),
    ];
    let file = dir.write("s.yaml", &docs.join("---\n"));
    let opts = GatewayOptions {
        keys: Some("k=cHFycw=="),
        extra: vec!["--auth-failures-per-minute".into(), "3".into()],
        ..Default::default()
    };
    let gw = Gateway::start(&file, opts);
    for forged in [
        "sec-7777-x2qxvk-aabbccd1k.gw",
        "sec-7777-x2qxvk-aabbccd2k.gw",
        "sec-7777-x2qxvk-aabbccd3k.gw",
    ] {
        assert_refused(&host(&gw, forged, &[]), 401);
    }
    // Out of attempts: even a valid signature is not checked now.
    let limited = host(&gw, "sec-7777-x2qxvk-65ad791ek.gw", &[]);
    assert_refused(&limited, 429);
    assert_refused(
        &host(
            &gw,
            "sec-7777.gw",
            &[("OpenSandbox-Secure-Access", "annot-token")],
        ),
        429,
    );
    assert_proxied(&host(&gw, "nosec-7777.gw", &[]), "/probe");
    // Other secure sandboxes keep their own budget.
    assert_refused(&host(&gw, "sec2-7777.gw", &[]), 401);
    assert_proxied(
        &host(
            &gw,
            "sec2-7777.gw",
            &[("OpenSandbox-Secure-Access", "other-token")],
        ),
        "/probe",
    );
    assert!(gw.metric("sandbox_gateway_auth_failures_total{reason=\"rate_limited\"}") >= 2.0);
}

#[test]
fn signed_label_without_keys_is_unavailable() {
    let s = scenario("header", None, &[7777], &[]);
    assert_refused(&host(&s.gw, "sec-7777-x2qxvk-65ad791ek.gw", &[]), 503);
    // The token still works without keys.
    assert_proxied(
        &host(
            &s.gw,
            "sec-7777.gw",
            &[("OpenSandbox-Secure-Access", "annot-token")],
        ),
        "/probe",
    );
}

#[test]
fn uri_mode_routes_and_rewrites() {
    let s = scenario("uri", Some("a=mpucnQ=="), &[5000, 8080], &[]);
    let gw = &s.gw;
    let token = [("OpenSandbox-Secure-Access", "annot-token")];
    assert_refused(&get(gw.addr, "/sec/5000/only/legacy", &[]), 401);
    assert_proxied(
        &get(gw.addr, "/sec/5000/only/legacy", &token),
        "/only/legacy",
    );
    assert_proxied(&get(gw.addr, "/sec/5000/x2qxvk/666f95eaa/p/q", &[]), "/p/q");
    assert_refused(&get(gw.addr, "/sec/5000/x2qxvk/badbadbaa/ok", &[]), 401);
    assert_proxied(
        &get(gw.addr, "/sec/5000/x2qxvk/badbadbaa/ok", &token),
        "/ok",
    );
    assert_proxied(&get(gw.addr, "/my-sandbox/8080", &[]), "/");
    let q = get(gw.addr, "/nosec/8080/hello?a=1&b=2", &[]);
    assert_proxied(&q, "/hello");
    assert_eq!(q.echo()["query"], "a=1&b=2");
    assert_eq!(upstream_header(&q, "host"), Some(format!("{}:8080", s.ip)));
    assert_refused(&get(gw.addr, "/sb/08080", &[]), 400);
    assert_refused(&get(gw.addr, "/", &[]), 400);
    assert_refused(&get(gw.addr, "/nosec/70000/x", &[]), 400);
}

#[test]
fn uri_mode_keeps_signed_segments_of_open_sandboxes() {
    let s = scenario("uri", Some("a=GhoaGg=="), &[3000], &[]);
    let resp = get(s.gw.addr, "/nosec/3000/x2qxvk/dab97f28a/extra/segment", &[]);
    assert_proxied(&resp, "/x2qxvk/dab97f28a/extra/segment");
}

#[test]
fn sandbox_states_map_to_status_codes() {
    let ip = unique_loopback();
    let e = format!(r#"["{ip}"]"#);
    let extra = [
        batch_sandbox("down", "a", 0, Some(&e), None),
        batch_sandbox("noendpoints", "a", 1, None, None),
        batch_sandbox("badendpoints", "a", 1, Some("not json"), None),
        batch_sandbox("emptyendpoints", "a", 1, Some("[]"), None),
        batch_sandbox("twice", "a", 1, Some(&e), None),
        batch_sandbox("twice", "b", 1, Some(&e), None),
    ];
    let s = scenario("header", None, &[8080], &extra);
    let gw = &s.gw;
    assert_refused(&host(gw, "unknown-8080.gw", &[]), 404);
    assert_refused(&host(gw, "down-8080.gw", &[]), 503);
    assert_refused(&host(gw, "noendpoints-8080.gw", &[]), 503);
    assert_refused(&host(gw, "badendpoints-8080.gw", &[]), 503);
    assert_refused(&host(gw, "emptyendpoints-8080.gw", &[]), 503);
    let amb = host(gw, "twice-8080.gw", &[]);
    assert_refused(&amb, 502);
    assert!(
        amb.body_text().contains("[a/twice b/twice]"),
        "{}",
        amb.body_text()
    );
    assert_refused(&host(gw, "sb-0.x", &[]), 400);
    assert_refused(&host(gw, "sb-65536.x", &[]), 400);
    assert_refused(&host(gw, &gw.addr.to_string(), &[]), 400);
    let no_host = support::client::raw(gw.addr, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_refused(&no_host, 400);
    gw.metric_reaches(
        "sandbox_gateway_requests_total{class=\"4xx\",mode=\"header\"}",
        5.0,
    );
}

#[test]
fn forwarding_headers_seen_by_the_sandbox() {
    let s = scenario("header", None, &[8080], &[]);
    let gw = &s.gw;
    let resp = host(
        gw,
        "public.example.test",
        &[
            ("OpenSandbox-Ingress-To", "nosec-8080"),
            ("OPEN-SANDBOX-INGRESS", "sec-8080"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "forged.test"),
        ],
    );
    assert_proxied(&resp, "/probe");
    assert_eq!(resp.echo()["query"], "x=1");
    assert_eq!(
        upstream_header(&resp, "host"),
        Some(format!("{}:8080", s.ip))
    );
    assert_eq!(upstream_header(&resp, "opensandbox-ingress-to"), None);
    assert_eq!(upstream_header(&resp, "open-sandbox-ingress"), None);
    assert_eq!(
        upstream_header(&resp, "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(
        upstream_header(&resp, "x-forwarded-proto").as_deref(),
        Some("http")
    );
    assert_eq!(
        upstream_header(&resp, "x-forwarded-host").as_deref(),
        Some("public.example.test")
    );
    // The deprecated header routes when the current one is absent.
    let legacy = host(
        gw,
        "public.example.test",
        &[("OPEN-SANDBOX-INGRESS", "nosec-8080")],
    );
    assert_proxied(&legacy, "/probe");
    assert_eq!(upstream_header(&legacy, "open-sandbox-ingress"), None);
}

#[test]
fn spreads_over_usable_endpoints_and_skips_dead_ones() {
    let (a, b, dead) = (unique_loopback(), unique_loopback(), unique_loopback());
    let _ua = Upstream::start(a, 8080);
    let _ub = Upstream::start(b, 8080);
    let dir = TempDir::new();
    let docs = [
        batch_sandbox(
            "multi",
            "a",
            2,
            Some(&format!(r#"["", "{a}", "{b}"]"#)),
            None,
        ),
        batch_sandbox("half", "a", 2, Some(&format!(r#"["{dead}", "{a}"]"#)), None),
        batch_sandbox("gone", "a", 1, Some(&format!(r#"["{dead}"]"#)), None),
    ];
    let file = dir.write("s.yaml", &docs.join("---\n"));
    let gw = Gateway::start(&file, GatewayOptions::default());
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = host(&gw, "multi-8080.gw", &[]);
        assert_proxied(&r, "/probe");
        seen.insert(upstream_header(&r, "host").unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    for _ in 0..4 {
        assert_proxied(&host(&gw, "half-8080.gw", &[]), "/probe");
    }
    let start = Instant::now();
    assert_refused(&host(&gw, "gone-8080.gw", &[]), 502);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "refused upstream took {:?}",
        start.elapsed()
    );
    assert!(gw.metric("sandbox_gateway_upstream_errors_total{kind=\"connect_refused\"}") >= 1.0);
}

#[test]
fn health_endpoints() {
    let s = scenario("header", None, &[], &[]);
    let ok = get(s.gw.addr, "/status.ok", &[]);
    assert_eq!((ok.status, ok.body_text().as_str()), (200, "OK"));
    assert_eq!(get(s.gw.addr, "/readyz", &[]).status, 200);
    assert_eq!(get(s.gw.metrics, "/readyz", &[]).status, 200);
    let metrics = get(s.gw.metrics, "/metrics", &[]).body_text();
    for name in [
        "sandbox_gateway_route_table_sandboxes 3",
        "sandbox_gateway_ready 1",
        "sandbox_gateway_request_duration_seconds",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }
}
