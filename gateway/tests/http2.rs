//! HTTP/2 from clients, over TLS (ALPN `h2`) and in cleartext with prior knowledge (h2c), with
//! real clients: curl (nghttp2) and the `h2` crate. Routed as HTTP/1.1 is (`:authority` as
//! Host, header and URI modes), the same refusals and secure access, a hundred streams on one
//! connection to two sandboxes, and HTTP/1.1 beside it on the same ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::pki::Pki;
use support::upstream::Upstream;
use support::{GatewayOptions, TempDir, batch_sandbox, unique_loopback};

const TLS_PORT: u16 = 28443;

/// `curl` with `args` and one `-o /dev/null` per URL; `<http_version> <status>` per transfer.
fn curl(args: &[String], urls: &[String]) -> Vec<String> {
    curl_counting(args, urls).0
}

/// As [`curl`], with the number of connections curl opened for all the transfers.
fn curl_counting(args: &[String], urls: &[String]) -> (Vec<String>, u32) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "20", "-w"])
        .arg("%{http_version} %{http_code} %{num_connects}\n")
        .args(args);
    for url in urls {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = cmd.output().expect("curl");
    let mut connects = 0;
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (status, n) = l.rsplit_once(' ').unwrap_or((l, "0"));
            connects += n.parse::<u32>().unwrap_or(0);
            status.to_owned()
        })
        .collect();
    (lines, connects)
}

struct Two {
    dir: TempDir,
    pki: Pki,
    gw: support::Gateway,
    a: Upstream,
    b: Upstream,
}

impl Two {
    /// Sandbox `a` open, `b` secure with token `t0ken`, behind a TLS gateway in `mode`.
    fn start(mode: &'static str) -> Two {
        let dir = TempDir::new();
        let pki = Pki::new(dir.path());
        let (cert, key) = pki.leaf("wild", &["*.sandbox.test", "gw.test"], 20);
        let (ia, ib) = (unique_loopback(), unique_loopback());
        let (a, b) = (Upstream::start(ia, 0), Upstream::start(ib, 0));
        let file = dir.write(
            "s.yaml",
            &format!(
                "{}---\n{}",
                batch_sandbox("a", "ns", 1, Some(&format!(r#"["{ia}"]"#)), None),
                batch_sandbox("b", "ns", 1, Some(&format!(r#"["{ib}"]"#)), Some("t0ken"))
            ),
        );
        let gw = support::Gateway::start(
            &file,
            GatewayOptions {
                mode,
                extra: vec![
                    "--tls-cert-file".into(),
                    cert.display().to_string(),
                    "--tls-key-file".into(),
                    key.display().to_string(),
                ],
                ..Default::default()
            },
        );
        Two { dir, pki, gw, a, b }
    }

    /// curl options reaching `host` on the TLS listener, HTTP/2 preferred.
    fn tls(&self, host: &str) -> Vec<String> {
        vec![
            "--http2".into(),
            "--cacert".into(),
            self.pki.dir.join("ca.pem").display().to_string(),
            "--resolve".into(),
            format!("{host}:{TLS_PORT}:{}", self.gw.addr.ip()),
        ]
    }
}

#[test]
fn h2_routes_by_authority_with_the_same_refusals_and_secure_access() {
    let t = Two::start("header");
    let host = |name: &str, port: u16| format!("{name}-{port}.sandbox.test");
    let get = |h: &str, extra: &[&str]| {
        let mut args = t.tls(h);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        curl(&args, &[format!("https://{h}:{TLS_PORT}/x")])
    };
    let (pa, pb) = (t.a.addr.port(), t.b.addr.port());
    assert_eq!(get(&host("a", pa), &[]), ["2 200"]);
    assert_eq!(get(&host("nobox", 80), &[]), ["2 404"]);
    assert_eq!(get(&host("a", 0), &[]), ["2 400"]);
    assert_eq!(get(&host("b", pb), &[]), ["2 401"], "no credential");
    assert_eq!(
        get(&host("b", pb), &["-H", "OpenSandbox-Secure-Access: wrong"]),
        ["2 401"]
    );
    assert_eq!(
        get(&host("b", pb), &["-H", "OpenSandbox-Secure-Access: t0ken"]),
        ["2 200"]
    );
    // The routing header wins over :authority, as over HTTP/1.1.
    let routed = format!("OpenSandbox-Ingress-To: a-{pa}");
    assert_eq!(get("gw.test", &["-H", &routed]), ["2 200"]);
    // HTTP/1.1 on the same listener.
    assert_eq!(get(&host("a", pa), &["--http1.1"]), ["1.1 200"]);
    let _ = &t.dir;
}

#[test]
fn a_hundred_streams_on_one_connection_reach_two_sandboxes() {
    let t = Two::start("uri");
    let (pa, pb) = (t.a.addr.port(), t.b.addr.port());
    let urls: Vec<String> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                format!("https://gw.test:{TLS_PORT}/a/{pa}/stream/{i}")
            } else {
                format!("https://gw.test:{TLS_PORT}/b/{pb}/stream/{i}")
            }
        })
        .collect();
    let mut args = t.tls("gw.test");
    args.extend(
        [
            "--parallel",
            "--parallel-max",
            "100",
            "-H",
            "OpenSandbox-Secure-Access: t0ken",
        ]
        .map(String::from),
    );
    let (results, connects) = curl_counting(&args, &urls);
    assert_eq!(results.len(), 100, "{results:?}");
    assert!(results.iter().all(|r| r == "2 200"), "{results:?}");
    assert_eq!(connects, 1, "all hundred streams on one connection");
    t.gw.metric_settles(
        "sandbox_gateway_requests_total{class=\"2xx\",mode=\"uri\"}",
        100.0,
    );
}

/// A hundred concurrent requests on one h2c connection with the `h2` crate's client (curl
/// 7.88's prior-knowledge mode does not multiplex: its second stream fails in its own framing
/// layer, whatever the server); the statuses in request order.
async fn h2c_streams(
    addr: std::net::SocketAddr,
    paths: Vec<String>,
    headers: &[(&str, &str)],
) -> Vec<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut pending = Vec::new();
    for path in paths {
        let mut req = http::Request::get(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut client = client.clone().ready().await.unwrap();
        let (resp, _) = client.send_request(req.body(()).unwrap(), true).unwrap();
        pending.push(resp);
    }
    let mut statuses = Vec::new();
    for resp in pending {
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), resp)
            .await
            .expect("answer within 10 s")
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_beside_http1_on_the_plain_port() {
    let t = tokio::task::spawn_blocking(|| Two::start("uri"))
        .await
        .unwrap();
    let (pa, pb) = (t.a.addr.port(), t.b.addr.port());
    let plain = |path: &str| format!("http://{}{path}", t.gw.addr);
    // curl, one stream per connection.
    let h2c = vec!["--http2-prior-knowledge".to_owned()];
    assert_eq!(curl(&h2c, &[plain(&format!("/a/{pa}/x"))]), ["2 200"]);
    assert_eq!(curl(&h2c, &[plain("/nobox/80/x")]), ["2 404"]);
    assert_eq!(curl(&h2c, &[plain(&format!("/b/{pb}/x"))]), ["2 401"]);
    assert_eq!(curl(&h2c, &[plain("/a/0/x")]), ["2 400"]);
    // HTTP/1.1 on the same port, including a request shorter than the HTTP/2 preface.
    assert_eq!(curl(&[], &[plain(&format!("/a/{pa}/h1"))]), ["1.1 200"]);
    let short = support::client::raw(t.gw.addr, b"GET /status.ok HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(short.status, 200);
    // A hundred streams on one connection, half to each sandbox, the secure one with its token.
    let paths = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                format!("/a/{pa}/stream/{i}")
            } else {
                format!("/b/{pb}/stream/{i}")
            }
        })
        .collect();
    let statuses = h2c_streams(t.gw.addr, paths, &[("opensandbox-secure-access", "t0ken")]).await;
    assert_eq!(statuses, vec![200; 100]);
    tokio::task::spawn_blocking(move || drop(t)).await.unwrap();
}

#[test]
fn h2_signed_routes_and_unavailable_sandboxes_as_over_http1() {
    let dir = TempDir::new();
    let ip = unique_loopback();
    let _up = Upstream::start(ip, 7777);
    let file = dir.write(
        "s.yaml",
        &format!(
            "{}---\n{}",
            batch_sandbox(
                "sec",
                "a",
                1,
                Some(&format!(r#"["{ip}"]"#)),
                Some("annot-token")
            ),
            batch_sandbox("down", "a", 0, None, None)
        ),
    );
    let gw = support::Gateway::start(
        &file,
        GatewayOptions {
            keys: Some("k=cHFycw=="),
            ..Default::default()
        },
    );
    let h2c = |host: &str| {
        let args = [
            "--http2-prior-knowledge".to_owned(),
            "-H".to_owned(),
            format!("Host: {host}"),
        ];
        curl(&args, &[format!("http://{}/probe", gw.addr)])
    };
    // A valid signed route (key `k`, no expiry), the same route with a bad signature, a
    // sandbox that is not ready.
    assert_eq!(h2c("sec-7777-x2qxvk-65ad791ek.gw"), ["2 200"]);
    assert_eq!(h2c("sec-7777-x2qxvk-aabbccddk.gw"), ["2 401"]);
    assert_eq!(h2c("down-8080.gw"), ["2 503"]);
    assert_eq!(
        gw.metric("sandbox_gateway_auth_failures_total{reason=\"bad_signature\"}"),
        1.0
    );
    // The access log line is the one HTTP/1.1 requests get.
    gw.wait_log(r#""sandbox":"down","port":8080,"signed":false,"method":"GET","path":"/probe","status":503"#);
}

/// An HTTP/2 request whose `:authority` and `Host` name different sandboxes is refused (400):
/// a balancer in front that routes or filters by one cannot be walked past with the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_and_host_that_disagree_are_refused() {
    let t = tokio::task::spawn_blocking(|| Two::start("header"))
        .await
        .unwrap();
    let pa = t.a.addr.port();
    let tcp = tokio::net::TcpStream::connect(t.gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://a-{pa}.sandbox.test/x"))
        .header("host", format!("b-{}.sandbox.test", t.b.addr.port()))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 400);
    assert_eq!(t.a.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    tokio::task::spawn_blocking(move || drop(t)).await.unwrap();
}
