//! TLS on the listener with certificates made by `openssl` for each test: the pair chosen by
//! SNI (wildcard, apex, none), routing by Host over TLS, certificates swapped on disk while a
//! connection stays open, a broken pair keeping the old one, the expiry metric, bad pairs at
//! start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::pki::Pki;
use support::{GatewayOptions, TempDir, batch_sandbox, unique_loopback};

const TLS_PORT: u16 = 28443;

/// A kept-alive TLS connection to the gateway.
struct Client {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Client {
    /// Connects with SNI `sni` (`None`: by address, no SNI).
    fn connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr, sni: Option<&str>) -> Client {
        Client::try_connect(config, addr, sni, b"").unwrap()
    }

    /// Connects, sending `before` (a PROXY protocol header) ahead of the handshake.
    fn try_connect(
        config: Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        sni: Option<&str>,
        before: &[u8],
    ) -> std::io::Result<Client> {
        Client::over(TcpStream::connect(addr)?, config, sni, before)
    }

    /// [`Client::try_connect`] on a connection already open.
    fn over(
        mut tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        sni: Option<&str>,
        before: &[u8],
    ) -> std::io::Result<Client> {
        let name = match sni {
            Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
            None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
        };
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(before)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.flush()?;
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Client { tls })
    }

    /// The leaf certificate the gateway served.
    fn leaf(&self) -> Vec<u8> {
        self.tls.conn.peer_certificates().unwrap()[0].to_vec()
    }

    /// `GET path` with `host`; the status and body.
    fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
    }

    /// Sends `request` as written; the status and body of the answer.
    fn send(&mut self, request: &str) -> (u16, String) {
        self.tls.write_all(request.as_bytes()).unwrap();
        let resp = support::client::read_response(&mut self.tls).unwrap();
        (resp.status, resp.body_text())
    }
}

fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

struct Setup {
    _dir: TempDir,
    pki: Pki,
    gw: support::Gateway,
    upstream: support::upstream::Upstream,
    tls: SocketAddr,
    wild: (PathBuf, PathBuf),
    apex: (PathBuf, PathBuf),
}

fn setup() -> Setup {
    setup_with(&[])
}

/// As [`setup`], with `extra` flags.
fn setup_with(extra: &[&str]) -> Setup {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let wild = pki.leaf("wild", &["*.sandbox.test"], 20);
    let apex = pki.leaf("apex", &["sandbox.test"], 10);
    let ip: IpAddr = unique_loopback();
    let upstream = support::upstream::Upstream::start(ip, 0);
    let file = dir.write(
        "s.yaml",
        &batch_sandbox("box", "a", 1, Some(&format!(r#"["{ip}"]"#)), None),
    );
    let gw = support::Gateway::start(
        &file,
        GatewayOptions {
            extra: vec![
                "--tls-cert-file".into(),
                wild.0.display().to_string(),
                "--tls-key-file".into(),
                wild.1.display().to_string(),
                "--tls-cert-file".into(),
                apex.0.display().to_string(),
                "--tls-key-file".into(),
                apex.1.display().to_string(),
            ]
            .into_iter()
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect(),
            ..Default::default()
        },
    );
    let tls = SocketAddr::new(gw.addr.ip(), TLS_PORT);
    Setup {
        _dir: dir,
        pki,
        gw,
        upstream,
        tls,
        wild,
        apex,
    }
}

#[test]
fn sni_chooses_the_certificate_and_host_routes_over_tls() {
    let s = setup();
    let port = s.upstream.addr.port();
    let host = format!("box-{port}.sandbox.test");
    let mut c = Client::connect(s.pki.client(), s.tls, Some(&host));
    assert_eq!(
        c.leaf(),
        der(&s.wild.0),
        "the wildcard serves a sandbox host"
    );
    let (status, body) = c.get(&host, "/hello?x=1");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (echo["path"].as_str(), echo["query"].as_str()),
        (Some("/hello"), Some("x=1"))
    );
    let proto = echo["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "x-forwarded-proto")
        .map(|h| h[1].clone());
    assert_eq!(
        proto,
        Some("https".into()),
        "the sandbox learns the client used TLS"
    );
    // The same through the full path (a chunked body is handed over to it).
    let (status, body) = c.send(&format!(
        "POST /full HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#"["x-forwarded-proto","https"]"#), "{body}");
    // Kept alive: a second request on the same connection.
    assert_eq!(c.get(&host, "/again").0, 200);
    let apex = Client::connect(s.pki.client(), s.tls, Some("sandbox.test"));
    assert_eq!(
        apex.leaf(),
        der(&s.apex.0),
        "the apex has its own certificate"
    );
    // A name two labels under the wildcard is not covered (RFC 6125): the first pair is
    // served, and the client refuses it.
    let deep = std::panic::catch_unwind(|| {
        Client::connect(s.pki.client(), s.tls, Some("a.b.sandbox.test"));
    });
    assert!(deep.is_err(), "a two-label-deep name must not verify");
    // Unknown sandbox over TLS: the same 404 as in plaintext.
    let mut c = Client::connect(s.pki.client(), s.tls, Some("nobox-80.sandbox.test"));
    assert_eq!(c.get("nobox-80.sandbox.test", "/").0, 404);
    let wild_left = s
        .gw
        .metric("sandbox_gateway_tls_certificate_expiry_seconds{certificate=\"*.sandbox.test\"}");
    let apex_left =
        s.gw.metric("sandbox_gateway_tls_certificate_expiry_seconds{certificate=\"sandbox.test\"}");
    assert!(
        (19.9 * 86_400.0..=20.0 * 86_400.0).contains(&wild_left),
        "{wild_left}"
    );
    assert!(
        (9.9 * 86_400.0..=10.0 * 86_400.0).contains(&apex_left),
        "{apex_left}"
    );
}

#[test]
fn certificates_swapped_on_disk_serve_new_connections_and_spare_open_ones() {
    let s = setup();
    let port = s.upstream.addr.port();
    let host = format!("box-{port}.sandbox.test");
    let mut open = Client::connect(s.pki.client(), s.tls, Some(&host));
    let old = open.leaf();
    assert_eq!(open.get(&host, "/before").0, 200);

    let renewed = s.pki.leaf("wild", &["*.sandbox.test"], 60);
    assert_eq!(renewed, s.wild);
    let new = der(&renewed.0);
    assert_ne!(new, old);
    let start = Instant::now();
    loop {
        let c = Client::connect(s.pki.client(), s.tls, Some(&host));
        if c.leaf() == new {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "new certificate not served within 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "new certificate served {:?} after the swap",
        start.elapsed()
    );
    assert_eq!(
        open.get(&host, "/after").0,
        200,
        "the open connection keeps working"
    );

    // A broken pair: a key that is not the certificate's. The renewed pair stays in force.
    // (A check that fell between the two renames of the swap above may have counted one.)
    let errors = s.gw.metric("sandbox_gateway_tls_reload_errors_total");
    let stray = s.pki.leaf("stray", &["*.sandbox.test"], 5);
    std::fs::copy(&stray.1, &s.wild.1).unwrap();
    let start = Instant::now();
    while s.gw.metric("sandbox_gateway_tls_reload_errors_total") <= errors {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{}",
            s.gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.gw.wait_log("TLS certificates not reloaded");
    let mut c = Client::connect(s.pki.client(), s.tls, Some(&host));
    assert_eq!(c.leaf(), new);
    assert_eq!(c.get(&host, "/still").0, 200);
    let left = s
        .gw
        .metric("sandbox_gateway_tls_certificate_expiry_seconds{certificate=\"*.sandbox.test\"}");
    assert!(
        left > 59.0 * 86_400.0,
        "the metric follows the pair in force: {left}"
    );
}

/// Starts the gateway with `args` and expects it to refuse, naming `needle`.
fn refused(args: &[String], needle: &str) {
    let stderr = support::start_fails_with(args);
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn bad_pairs_refuse_start_up_naming_the_file() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let (cert, key) = pki.leaf("w", &["*.sandbox.test"], 20);
    let (_, other_key) = pki.leaf("o", &["o.test"], 20);
    let s = |p: &Path| p.display().to_string();
    let flag = |name: &str, p: &Path| [format!("--{name}"), s(p)];
    refused(&flag("tls-cert-file", &cert), "come in pairs");
    refused(
        &[
            flag("tls-cert-file", &cert),
            flag("tls-key-file", &other_key),
        ]
        .concat(),
        "does not belong to",
    );
    let missing = dir.path().join("missing.pem");
    refused(
        &[flag("tls-cert-file", &missing), flag("tls-key-file", &key)].concat(),
        &s(&missing),
    );
    let garbage = dir.write("garbage.pem", "not a certificate\n");
    refused(
        &[flag("tls-cert-file", &garbage), flag("tls-key-file", &key)].concat(),
        "garbage.pem",
    );
    refused(
        &[
            flag("tls-cert-file", &cert),
            flag("tls-key-file", &key),
            ["--tls-port".into(), "1".into()],
        ]
        .concat(),
        "--tls-port",
    );
}

#[test]
fn the_proxy_protocol_header_comes_before_the_tls_handshake() {
    let s = setup_with(&["--proxy-protocol", "--header-timeout-seconds", "1"]);
    let host = format!("box-{}.sandbox.test", s.upstream.addr.port());
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n";
    let mut c = Client::try_connect(s.pki.client(), s.tls, Some(&host), header).unwrap();
    let (status, body) = c.get(&host, "/hello");
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    let seen = |name: &str| {
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    assert_eq!(seen("x-forwarded-for").as_deref(), Some("203.0.113.7"));
    assert_eq!(seen("x-forwarded-proto").as_deref(), Some("https"));
    s.gw.wait_log(r#""client":"203.0.113.7""#);
    // A handshake without the header first is refused; so is a header that stops coming,
    // after the header timeout (not the TLS library's own minute).
    assert!(Client::try_connect(s.pki.client(), s.tls, Some(&host), b"").is_err());
    let started = Instant::now();
    let mut slow = TcpStream::connect(s.tls).unwrap();
    slow.write_all(b"PROXY TCP4 ").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut slow, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let errors = |r: &str| {
        s.gw.metric(&format!(
            "sandbox_gateway_proxy_protocol_errors_total{{reason=\"{r}\"}}"
        ))
    };
    assert_eq!(errors("missing"), 1.0);
    assert_eq!(errors("timeout"), 1.0);
    // The plain port still reads its own header.
    let plain = support::client::raw(
        s.gw.addr,
        format!("PROXY TCP4 203.0.113.8 10.0.0.1 40000 80\r\nGET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(plain.status, 200);
}

#[test]
fn one_header_timeout_covers_the_proxy_header_the_handshake_and_the_request() {
    let s = setup_with(&["--proxy-protocol", "--header-timeout-seconds", "3"]);
    let host = format!("box-{}.sandbox.test", s.upstream.addr.port());
    let header = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n";
    let timeouts = s.gw.metric("sandbox_gateway_header_timeouts_total");
    // Each client spends two of its three seconds before the PROXY header, then finishes
    // the next step at once (the handshake) and stalls in the request header. Had each step
    // its own timeout, the connections would live five seconds.
    let tls = std::thread::spawn({
        let (addr, config, host) = (s.tls, s.pki.client(), host.clone());
        move || {
            let started = Instant::now();
            let tcp = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            let mut c = Client::over(tcp, config, Some(&host), header).unwrap();
            c.tls.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
            let mut buf = [0u8; 64];
            let n = std::io::Read::read(&mut c.tls, &mut buf).unwrap_or(0);
            (n, started.elapsed())
        }
    });
    let started = Instant::now();
    let mut plain = TcpStream::connect(s.gw.addr).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    plain.write_all(header).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut plain, &mut buf).unwrap_or(0);
    let plain_took = started.elapsed();
    let (tls_n, tls_took) = tls.join().unwrap();
    for (port, n, took) in [("plain", n, plain_took), ("TLS", tls_n, tls_took)] {
        assert_eq!(n, 0, "{port}: closed without an answer");
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_millis(4300),
            "{port}: closed after {took:?}, the timeout is 3 s from connect"
        );
    }
    assert_eq!(
        s.gw.metric("sandbox_gateway_header_timeouts_total"),
        timeouts + 2.0
    );
}

#[test]
fn a_handshake_that_never_finishes_is_closed_at_the_header_timeout() {
    let s = setup_with(&["--header-timeout-seconds", "1"]);
    // One connection says nothing; another sends the first bytes of a ClientHello and stops.
    let mut silent = TcpStream::connect(s.tls).unwrap();
    let mut partial = TcpStream::connect(s.tls).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let started = Instant::now();
    for conn in [&mut silent, &mut partial] {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(conn, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Counted as the socket closes (the count may trail the close by a moment).
    let counted = |reason: &str, n: f64| {
        let name = format!("sandbox_gateway_tls_handshake_errors_total{{reason=\"{reason}\"}}");
        let end = Instant::now() + Duration::from_secs(2);
        while s.gw.metric(&name) < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.gw.metric(&name), n, "{reason}");
    };
    counted("timeout", 2.0);
    // A client that is not TLS at all fails its handshake at once.
    let plain = support::client::raw(s.tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.is_err() || plain.unwrap().status == 0);
    counted("failed", 1.0);
    // And a real client is served all along.
    let host = format!("box-{}.sandbox.test", s.upstream.addr.port());
    let mut c = Client::connect(s.pki.client(), s.tls, Some(&host));
    assert_eq!(c.get(&host, "/").0, 200);
}
