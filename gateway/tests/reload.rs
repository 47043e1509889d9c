//! The file provider and key file follow their files; broken files keep the last good state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::client::get;
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox, unique_loopback};

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// A sandbox file with one secure sandbox `sec` (token `annot-token`) on `ip`.
fn secure_sandbox(dir: &TempDir, ip: std::net::IpAddr) -> std::path::PathBuf {
    let endpoints = format!(r#"["{ip}"]"#);
    dir.write(
        "s.yaml",
        &batch_sandbox("sec", "a", 1, Some(&endpoints), Some("annot-token")),
    )
}

#[test]
fn sandbox_file_changes_apply_within_a_second() {
    let ip = unique_loopback();
    let upstream = Upstream::start(ip, 0);
    let port = upstream.addr.port();
    let endpoints = format!(r#"["{ip}"]"#);
    let first = batch_sandbox("first", "a", 1, Some(&endpoints), None);
    let second = batch_sandbox("second", "a", 1, Some(&endpoints), None);
    let dir = TempDir::new();
    let file = dir.write("s.yaml", &first);
    let gw = Gateway::start(&file, GatewayOptions::default());
    let status = |id: &str| get(gw.addr, "/", &[("Host", &format!("{id}-{port}.gw"))]).status;
    assert_eq!((status("first"), status("second")), (200, 404));

    dir.write("s.yaml", &format!("{first}---\n{second}"));
    let took = wait_for("new sandbox routable", Duration::from_secs(1), || {
        status("second") == 200
    });
    eprintln!("added sandbox routable after {took:?}");

    dir.write("s.yaml", &second);
    wait_for("removed sandbox gone", Duration::from_secs(1), || {
        status("first") == 404
    });
    assert_eq!(status("second"), 200);

    let failures = gw.metric("sandbox_gateway_provider_errors_total");
    dir.write("s.yaml", "apiVersion: v1\nkind: List\nitems: [ {unclosed\n");
    wait_for("failure counted", Duration::from_secs(2), || {
        gw.metric("sandbox_gateway_provider_errors_total") > failures
    });
    assert_eq!(
        status("second"),
        200,
        "the last good table must keep serving"
    );
    wait_for("failure logged", Duration::from_secs(2), || {
        gw.log_text().contains("keeping the previous table")
    });

    // An emptied file, or YAML that is not a Kubernetes object (a half-written or mistaken
    // file), is a load error too: counted, and the table stays.
    for (i, mistaken) in ["", "name: second\nready: 1\n"].into_iter().enumerate() {
        let before = gw.metric("sandbox_gateway_provider_errors_total");
        dir.write("s.yaml", mistaken);
        wait_for(
            &format!("mistaken file {i} counted"),
            Duration::from_secs(2),
            || gw.metric("sandbox_gateway_provider_errors_total") > before,
        );
        assert_eq!(status("second"), 200, "mistaken file {i} kept the table");
    }
    gw.wait_log("the file holds no object");
    gw.wait_log("is not a Kubernetes object");
    dir.write("s.yaml", &second);

    // A removed file keeps the table too, and a restored one is read again.
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(status("second"), 200);
    dir.write("s.yaml", &first);
    wait_for("restored file read", Duration::from_secs(1), || {
        status("first") == 200
    });

    // Emptying the table on purpose: an empty List.
    dir.write("s.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
    wait_for("table emptied on purpose", Duration::from_secs(1), || {
        status("first") == 404
    });
}

#[test]
fn readiness_waits_for_a_readable_file() {
    let dir = TempDir::new();
    let missing = dir.path().join("later.yaml");
    let gw = Gateway::spawn(&missing, GatewayOptions::default());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        support::client::blocking_get(gw.metrics, "/readyz")
            .unwrap()
            .status,
        503
    );
    // An empty file is not a table yet.
    dir.write("later.yaml", "");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        support::client::blocking_get(gw.metrics, "/readyz")
            .unwrap()
            .status,
        503
    );
    dir.write("later.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
    gw.wait_ready();
}

#[test]
fn key_file_is_reloaded() {
    let ip = unique_loopback();
    let _upstream = Upstream::start(ip, 7777);
    let dir = TempDir::new();
    let file = secure_sandbox(&dir, ip);
    let keys = dir.write("keys", "z=cXVpdGUtb3RoZXI=\n");
    let opts = GatewayOptions {
        extra: vec![
            "--secure-access-keys-file".into(),
            keys.display().to_string(),
        ],
        ..Default::default()
    };
    let gw = Gateway::start(&file, opts);
    let signed = || get(gw.addr, "/", &[("Host", "sec-7777-x2qxvk-65ad791ek.gw")]).status;
    assert_eq!(signed(), 401);
    dir.write("keys", "z=cXVpdGUtb3RoZXI=\nk=cHFycw==\n");
    wait_for("new key used", Duration::from_secs(2), || signed() == 200);
    dir.write("keys", "k=%%%");
    wait_for("bad key file counted", Duration::from_secs(2), || {
        gw.metric("sandbox_gateway_key_reload_errors_total") >= 1.0
    });
    assert_eq!(signed(), 200, "a broken key file keeps the previous keys");
    // Emptied (or caught half-written): the keys stay too.
    dir.write("keys", "");
    wait_for("empty key file counted", Duration::from_secs(2), || {
        gw.metric("sandbox_gateway_key_reload_errors_total") >= 2.0
    });
    assert_eq!(signed(), 200, "an empty key file keeps the previous keys");
    gw.wait_log("the file holds no key");
    assert!(
        !gw.log_text().contains("cHFycw"),
        "secrets must not be logged"
    );
    // The file was left readable by others (0644): said at start.
    gw.wait_log("readable by other users; make it 0600, 0400 or 0440");
}

#[test]
fn signed_routes_living_too_long_are_refused() {
    let ip = unique_loopback();
    let _upstream = Upstream::start(ip, 7777);
    let dir = TempDir::new();
    let file = secure_sandbox(&dir, ip);
    // The route expires in 2033: years beyond a one-day bound.
    let opts = GatewayOptions {
        keys: Some("k=cHFycw=="),
        extra: vec!["--max-signed-route-lifetime".into(), "86400".into()],
        ..Default::default()
    };
    let gw = Gateway::start(&file, opts);
    let signed = get(gw.addr, "/", &[("Host", "sec-7777-x2qxvk-65ad791ek.gw")]);
    assert_eq!(signed.status, 401, "{}", signed.body_text());
    assert!(signed.body_text().contains("expiry too far ahead"));
    assert_eq!(
        gw.metric("sandbox_gateway_auth_failures_total{reason=\"too_far_ahead\"}"),
        1.0
    );
    // The secure-access header is not a signed route: it still opens the sandbox.
    let with_token = get(
        gw.addr,
        "/",
        &[
            ("Host", "sec-7777.gw"),
            ("OpenSandbox-Secure-Access", "annot-token"),
        ],
    );
    assert_eq!(with_token.status, 200);
}

#[test]
fn a_private_key_file_gets_no_warning() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let file = dir.write("s.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
    let keys = dir.write("keys", "k=cHFycw==\n");
    // 0440: what a Secret volume with fsGroup gives a non-root container.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o440)).unwrap();
    let opts = GatewayOptions {
        extra: vec![
            "--secure-access-keys-file".into(),
            keys.display().to_string(),
        ],
        ..Default::default()
    };
    let gw = Gateway::start(&file, opts);
    gw.wait_log("sandbox gateway starting");
    assert!(
        !gw.log_text().contains("readable by other users"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn keys_from_the_environment() {
    let ip = unique_loopback();
    let _upstream = Upstream::start(ip, 7777);
    let dir = TempDir::new();
    let file = secure_sandbox(&dir, ip);
    let opts = GatewayOptions {
        env: vec![("OPENSANDBOX_SECURE_ACCESS_KEYS".into(), "k=cHFycw==".into())],
        ..Default::default()
    };
    let gw = Gateway::start(&file, opts);
    assert_eq!(
        get(gw.addr, "/", &[("Host", "sec-7777-x2qxvk-65ad791ek.gw")]).status,
        200
    );
}
