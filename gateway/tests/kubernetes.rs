//! The Kubernetes providers against a real kube-apiserver and etcd, with real upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::client::{Response, get};
use support::k8s::{ControlPlane, Objects, agent_resource, batch_resource};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, unique_loopback};

fn gateway(kubeconfig: &std::path::Path, opts: GatewayOptions<'_>) -> Gateway {
    support::kube_gateway(kubeconfig, "batchsandbox,agent-sandbox", opts)
}

fn request(gw: &Gateway, host: &str) -> Response {
    get(gw.addr, "/", &[("Host", host)])
}

fn seen_host(resp: &Response) -> Option<String> {
    if resp.status != 200 {
        return None;
    }
    resp.echo()["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == "host")
        .map(|h| h[1].as_str().unwrap().to_owned())
}

/// Waits until `check` holds for a request to `host`; returns how long it took.
fn eventually(gw: &Gateway, host: &str, what: &str, check: impl Fn(&Response) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let resp = request(gw, host);
        if check(&resp) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: last answer {} {}\nlog:\n{}",
            resp.status,
            resp.body_text(),
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready_status(n: i64) -> Value {
    json!({"replicas": 1, "ready": n})
}

fn endpoints(ips: &[String]) -> Value {
    json!({"sandbox.opensandbox.io/endpoints": serde_json::to_string(ips).unwrap()})
}

#[test]
fn batch_sandbox_routes_follow_the_object() {
    let plane = ControlPlane::start();
    plane.create_namespace("lifecycle");
    let (u1, u2) = support::upstream::pair();
    let (ip1, ip2, port) = (u1.addr.ip(), u2.addr.ip(), u1.addr.port());
    let boxes = Objects::new(&plane, "lifecycle", &batch_resource());
    boxes.create("box", endpoints(&[ip1.to_string()]), ready_status(1));
    let gw = gateway(&plane.kubeconfig, GatewayOptions::default());
    gw.wait_ready();
    let host = format!("box-{port}.sandbox.test");
    assert_eq!(
        seen_host(&request(&gw, &host)),
        Some(format!("{ip1}:{port}"))
    );

    boxes.annotate("box", endpoints(&[ip2.to_string()]));
    let moved = eventually(&gw, &host, "traffic moves", |r| {
        seen_host(r) == Some(format!("{ip2}:{port}"))
    });
    eprintln!("endpoint change routed after {moved:?}");
    // Doors follow the object too: another port only, then a malformed list, then this port.
    let exposed = |v: &str| json!({"opensandbox.io/exposed-ports": v});
    boxes.annotate("box", exposed("1-80"));
    eventually(&gw, &host, "door closed", |r| r.status == 403);
    boxes.annotate("box", exposed("80,x"));
    eventually(&gw, &host, "malformed list opens nothing", |r| {
        r.status == 503 && r.body_text().contains("opensandbox.io/exposed-ports")
    });
    boxes.annotate("box", exposed(&format!("1-80,{port}")));
    eventually(&gw, &host, "door open", |r| r.status == 200);
    boxes.set_status("box", ready_status(0));
    eventually(&gw, &host, "not ready", |r| r.status == 503);
    boxes.delete("box");
    eventually(&gw, &host, "deleted", |r| r.status == 404);
    assert!(
        gw.metric("sandbox_gateway_watch_events_total{kind=\"batchsandbox\",type=\"apply\"}")
            >= 2.0
    );
}

#[test]
fn agent_sandbox_routes_by_service_name() {
    let plane = ControlPlane::start();
    plane.create_namespace("agents");
    let up4 = Upstream::start("127.0.0.1".parse().unwrap(), 0);
    let port = up4.addr.port();
    // `localhost` may also resolve to ::1; serve there too.
    let _up6 = std::panic::catch_unwind(|| Upstream::start("::1".parse().unwrap(), port)).ok();
    let agents = Objects::new(&plane, "agents", &agent_resource());
    let ready = |fqdn: &str, status: &str| json!({"serviceFQDN": fqdn, "conditions": [{"type": "Ready", "status": status, "reason": "Test", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    agents.create("agent", json!({}), ready("localhost", "True"));
    agents.create(
        "noconditions",
        json!({}),
        json!({"serviceFQDN": "localhost"}),
    );
    agents.create(
        "nowhere",
        json!({}),
        ready("sandbox.does-not-exist.invalid", "True"),
    );
    let gw = gateway(&plane.kubeconfig, GatewayOptions::default());
    gw.wait_ready();
    let host = format!("agent-{port}.sandbox.test");
    eventually(&gw, &host, "agent routable", |r| r.status == 200);
    assert_eq!(request(&gw, &format!("noconditions-{port}.gw")).status, 503);
    eventually(
        &gw,
        &format!("nowhere-{port}.gw"),
        "unresolvable name",
        |r| r.status == 503 && r.body_text().contains("does-not-exist.invalid"),
    );
    agents.set_status("agent", ready("localhost", "False"));
    eventually(&gw, &host, "agent not ready", |r| r.status == 503);
    agents.delete("agent");
    eventually(&gw, &host, "agent deleted", |r| r.status == 404);
}

#[test]
fn namespaces_clashes_and_secure_access() {
    let plane = ControlPlane::start();
    for ns in ["team-a", "team-b"] {
        plane.create_namespace(ns);
    }
    let ip = unique_loopback();
    let _up = Upstream::start(ip, 7777);
    let e = endpoints(&[ip.to_string()]);
    let a = Objects::new(&plane, "team-a", &batch_resource());
    let b = Objects::new(&plane, "team-b", &batch_resource());
    a.create("dup", e.clone(), ready_status(1));
    b.create("dup", e.clone(), ready_status(1));
    b.create("only-b", e.clone(), ready_status(1));
    let mut secure = e.as_object().unwrap().clone();
    secure.insert(
        "opensandbox.io/secure-access-token".into(),
        "annot-token".into(),
    );
    a.create("sec", Value::Object(secure), ready_status(1));
    let gw = gateway(
        &plane.kubeconfig,
        GatewayOptions {
            keys: Some("k=cHFycw=="),
            ..Default::default()
        },
    );
    gw.wait_ready();
    let dup = request(&gw, "dup-7777.gw");
    assert_eq!(dup.status, 502);
    assert!(
        dup.body_text().contains("[team-a/dup team-b/dup]"),
        "{}",
        dup.body_text()
    );
    assert_eq!(request(&gw, "only-b-7777.gw").status, 200);
    assert_eq!(request(&gw, "sec-7777.gw").status, 401);
    let with_token = get(
        gw.addr,
        "/",
        &[
            ("Host", "sec-7777.gw"),
            ("OpenSandbox-Secure-Access", "annot-token"),
        ],
    );
    assert_eq!(with_token.status, 200);
    assert_eq!(request(&gw, "sec-7777-x2qxvk-65ad791ek.gw").status, 200);
    assert_eq!(request(&gw, "sec-7777-x2qxvk-aabbccddk.gw").status, 401);
    assert_eq!(request(&gw, "sec-7777-gjdgxs-d35726e3k.gw").status, 401);
    // Deleting one of the clashing objects makes the other routable.
    b.delete("dup");
    eventually(&gw, "dup-7777.gw", "clash resolved", |r| r.status == 200);
}

#[test]
fn bad_endpoints_never_route() {
    let plane = ControlPlane::start();
    plane.create_namespace("bad");
    let ip = unique_loopback();
    let up = Upstream::start(ip, 0);
    let port = up.addr.port();
    let _up6 = Upstream::start("::1".parse().unwrap(), port);
    let boxes = Objects::new(&plane, "bad", &batch_resource());
    let annotation = |v: &str| json!({"sandbox.opensandbox.io/endpoints": v});
    boxes.create("notjson", annotation("10.0.0.1,10.0.0.2"), ready_status(1));
    boxes.create(
        "notarray",
        annotation(r#"{"ip":"10.0.0.1"}"#),
        ready_status(1),
    );
    boxes.create(
        "notaddresses",
        annotation(r#"["pod-a","pod-b"]"#),
        ready_status(1),
    );
    boxes.create(
        "emptyfirst",
        annotation(&format!(r#"["","{ip}"]"#)),
        ready_status(1),
    );
    boxes.create(
        "linklocal",
        annotation(r#"["169.254.169.254"]"#),
        ready_status(1),
    );
    boxes.create("outside", annotation(r#"["192.0.2.10"]"#), ready_status(1));
    boxes.create("ipv6", annotation(r#"["::1"]"#), ready_status(1));
    boxes.create("noannotation", json!({}), ready_status(1));
    let opts = GatewayOptions {
        extra: vec![
            "--allowed-upstream-cidrs".into(),
            "127.0.0.0/8,::1/128".into(),
        ],
        ..Default::default()
    };
    let gw = gateway(&plane.kubeconfig, opts);
    gw.wait_ready();
    for name in [
        "notjson",
        "notarray",
        "notaddresses",
        "linklocal",
        "outside",
        "noannotation",
    ] {
        let r = request(&gw, &format!("{name}-{port}.gw"));
        assert_eq!(r.status, 503, "{name}: {}", r.body_text());
    }
    assert_eq!(
        seen_host(&request(&gw, &format!("emptyfirst-{port}.gw"))),
        Some(format!("{ip}:{port}"))
    );
    assert_eq!(
        seen_host(&request(&gw, &format!("ipv6-{port}.gw"))),
        Some(format!("[::1]:{port}"))
    );
    assert!(gw.metric("sandbox_gateway_upstream_refused_total") >= 2.0);
    // Nothing outside the policy was dialled: each refused sandbox's access-log line exists,
    // says 503 and names no upstream (a dialled one names it). The log is written off the
    // request path: wait for the last request's line first.
    gw.wait_log(r#""sandbox":"ipv6""#);
    let log = gw.log_text();
    let access = |name: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["target"] == "access" && e["sandbox"] == name)
            .collect()
    };
    assert!(
        access("emptyfirst")
            .iter()
            .any(|e| e["upstream"] == format!("{ip}:{port}").as_str()),
        "{log}"
    );
    for name in ["linklocal", "outside"] {
        let lines = access(name);
        assert!(!lines.is_empty(), "no access-log line for {name}:\n{log}");
        for e in lines {
            assert_eq!(e["status"], 503, "{e}");
            assert!(
                e["upstream"].is_null() || e["upstream"] == "",
                "{name} was dialled: {e}"
            );
        }
    }
}

#[test]
fn loopback_endpoints_are_refused_by_default() {
    // Endpoints come from annotations any sandbox owner can write: by default the Kubernetes
    // providers never dial loopback (nor metadata addresses), and do not even try.
    let plane = ControlPlane::start();
    plane.create_namespace("lo");
    let ip = unique_loopback();
    let upstream = Upstream::start(ip, 0);
    let port = upstream.addr.port();
    let boxes = Objects::new(&plane, "lo", &batch_resource());
    boxes.create(
        "local",
        json!({"sandbox.opensandbox.io/endpoints": format!(r#"["{ip}"]"#)}),
        ready_status(1),
    );
    boxes.create(
        "azure",
        json!({"sandbox.opensandbox.io/endpoints": r#"["168.63.129.16"]"#}),
        ready_status(1),
    );
    let provider = vec![
        "--provider-type".into(),
        "batchsandbox".into(),
        "--kubeconfig".into(),
        plane.kubeconfig.display().to_string(),
    ];
    let gw = Gateway::spawn_with(provider, GatewayOptions::default());
    gw.wait_ready();
    for name in ["local", "azure"] {
        let r = request(&gw, &format!("{name}-{port}.gw"));
        assert_eq!(r.status, 503, "{name}: {}", r.body_text());
    }
    assert!(gw.metric("sandbox_gateway_upstream_refused_total") >= 2.0);
    assert!(
        !gw.log_text()
            .contains(&format!("\"upstream\":\"{ip}:{port}\"")),
        "loopback was dialled"
    );
}

#[test]
fn missing_crd_and_missing_permissions_are_explained() {
    let plane = ControlPlane::start_with_crds(false);
    let gw = gateway(&plane.kubeconfig, GatewayOptions::default());
    // The note is in the log and in /readyz once the first watch attempt failed.
    gw.wait_log("batchsandboxes.sandbox.opensandbox.io installed");
    let ready = get(gw.metrics, "/readyz", &[]);
    assert_eq!(ready.status, 503);
    assert!(
        ready
            .body_text()
            .contains("is the CRD batchsandboxes.sandbox.opensandbox.io installed"),
        "{}",
        ready.body_text()
    );
    // The watch keeps retrying: installing the CRDs later makes the gateway ready.
    plane.install_crds();
    gw.wait_ready();

    let plane = ControlPlane::start();
    let limited = gateway(&plane.limited_kubeconfig, GatewayOptions::default());
    let start = Instant::now();
    while !limited
        .log_text()
        .contains("RBAC must allow get, list and watch on batchsandboxes.sandbox.opensandbox.io")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "log:\n{}",
            limited.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(limited.metrics, "/readyz", &[]).status, 503);
}

#[test]
fn survives_api_server_restarts_and_relists() {
    let mut plane = ControlPlane::start();
    plane.create_namespace("restart");
    let (u1, u2) = support::upstream::pair();
    let (ip1, ip2, port) = (u1.addr.ip(), u2.addr.ip(), u1.addr.port());
    let boxes = Objects::new(&plane, "restart", &batch_resource());
    boxes.create("stay", endpoints(&[ip1.to_string()]), ready_status(1));
    boxes.create("gone", endpoints(&[ip1.to_string()]), ready_status(1));
    let gw = gateway(&plane.kubeconfig, GatewayOptions::default());
    gw.wait_ready();
    let stay = format!("stay-{port}.gw");

    plane.stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        seen_host(&request(&gw, &stay)),
        Some(format!("{ip1}:{port}")),
        "must serve from the last table"
    );
    // Ready from the last table, the lost watch named (once the gateway has noticed it).
    support::eventually(
        "/readyz naming the lost watch",
        Duration::from_secs(15),
        || {
            let ready = get(gw.metrics, "/readyz", &[]);
            assert_eq!(ready.status, 200);
            ready.body_text().contains("watch failing").then_some(())
        },
    );

    plane.start_apiserver();
    let boxes = Objects::new(&plane, "restart", &batch_resource());
    boxes.annotate("stay", endpoints(&[ip2.to_string()]));
    eventually(&gw, &stay, "change after restart", |r| {
        seen_host(r) == Some(format!("{ip2}:{port}"))
    });

    // Delete an object through another API server while the gateway's one is down.
    plane.stop_apiserver();
    let side_port = support::free_port();
    let mut side = plane.spawn_apiserver(side_port);
    plane.wait_ready(side_port);
    let side_config = plane.dir.path().join("side.kubeconfig");
    let text = std::fs::read_to_string(&plane.kubeconfig)
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}", plane.port),
            &format!("127.0.0.1:{side_port}"),
        )
        .replace(
            &format!("certs-{}", plane.port),
            &format!("certs-{side_port}"),
        );
    std::fs::write(&side_config, text).unwrap();
    let side_client = plane.client_for(&side_config);
    let side_api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(side_client, "restart", &batch_resource());
    plane
        .runtime
        .block_on(side_api.delete("gone", &Default::default()))
        .unwrap();
    let _ = side.kill();
    let _ = side.wait();
    assert_eq!(
        request(&gw, &format!("gone-{port}.gw")).status,
        200,
        "still the last table while disconnected"
    );
    plane.start_apiserver();
    eventually(&gw, &format!("gone-{port}.gw"), "deleted while down", |r| {
        r.status == 404
    });
    assert_eq!(request(&gw, &stay).status, 200);
}

#[test]
fn ready_only_after_the_initial_list_of_10000() {
    let plane = ControlPlane::start();
    plane.create_namespace("many");
    let created = Instant::now();
    plane.create_many("many", 10_000, |i| {
        json!({
            "metadata": {"name": format!("sbx-{i:05}"), "annotations": {"sandbox.opensandbox.io/endpoints": "[\"10.1.2.3\"]"}},
            "spec": {"replicas": 1},
        })
    });
    eprintln!("created 10000 BatchSandboxes in {:?}", created.elapsed());
    // Both ways of loading: a streaming list (the default, which this API server offers) and
    // paged lists.
    for mode in ["paged", "streaming"] {
        let opts = GatewayOptions {
            extra: vec![format!("--initial-list={mode}")],
            ..Default::default()
        };
        let gw = gateway(&plane.kubeconfig, opts);
        let start = Instant::now();
        let mut not_ready_seen = 0;
        loop {
            let r = support::client::blocking_get(gw.metrics, "/readyz");
            if let Ok(r) = r {
                if r.status == 200 {
                    break;
                }
                not_ready_seen += 1;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "never ready:\n{}",
                gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready_after = start.elapsed();
        assert_eq!(
            gw.metric("sandbox_gateway_route_table_sandboxes"),
            10_000.0,
            "{mode}: ready before the whole list loaded"
        );
        assert!(
            !gw.log_text().contains("does not offer streaming lists"),
            "{mode}: fell back:\n{}",
            gw.log_text()
        );
        eprintln!(
            "{mode}: ready after {ready_after:?} ({not_ready_seen} not-ready answers before)"
        );
        let r = request(&gw, "sbx-04242-80.gw");
        assert_eq!(r.status, 503, "ready 0: {}", r.body_text());
    }
}
