//! Hostile and broken input: oversized headers, non-HTTP bytes, slow clients, bad flags.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::client::{get, raw};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox, start_fails, unique_loopback};

fn gateway(extra: &[&str]) -> (Gateway, Upstream, TempDir, String) {
    let ip = unique_loopback();
    let upstream = Upstream::start(ip, 0);
    let dir = TempDir::new();
    let file = dir.write(
        "s.yaml",
        &batch_sandbox("box", "a", 1, Some(&format!(r#"["{ip}"]"#)), None),
    );
    let opts = GatewayOptions {
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let host = format!("box-{}.gw", upstream.addr.port());
    (Gateway::start(&file, opts), upstream, dir, host)
}

#[test]
fn oversized_headers_get_431() {
    let (gw, _u, _d, host) = gateway(&[]);
    let big = "v".repeat(70 * 1024);
    let resp = get(gw.addr, "/", &[("Host", &host), ("X-Big", &big)]);
    assert_eq!(resp.status, 431, "{}", resp.body_text());
    let many: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-H{i}"), "w".repeat(700)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut headers = vec![("Host", host.as_str())];
    headers.extend(many);
    assert_eq!(get(gw.addr, "/", &headers).status, 431);
    assert_eq!(get(gw.addr, "/", &[("Host", &host)]).status, 200);
}

#[test]
fn non_http_bytes_get_400_and_the_gateway_lives_on() {
    let (gw, _u, _d, host) = gateway(&[]);
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\n\r\n",
    ] {
        match raw(gw.addr, junk) {
            Ok(resp) => assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(junk)),
            Err(e) => panic!("no response to {:?}: {e}", String::from_utf8_lossy(junk)),
        }
    }
    assert_eq!(get(gw.addr, "/", &[("Host", &host)]).status, 200);
}

#[test]
fn slow_header_clients_are_cut_off() {
    let (gw, _u, _d, host) = gateway(&["--header-timeout-seconds", "1"]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(200)
    );
    let mut cut = false;
    for byte in request.as_bytes() {
        if s.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !cut {
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "slow client was served"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(4));
    // A client that connects and says nothing is closed too.
    let mut idle = TcpStream::connect(gw.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(3));
    // Normal clients are unaffected, also on a kept-alive connection after a slow pause.
    let mut keep = TcpStream::connect(gw.addr).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..2 {
        write!(keep, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = keep.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(1500));
    }
}

#[test]
fn blank_lines_do_not_dodge_the_header_deadline() {
    // Parsers skip blank lines before a request line, so a client can send them forever; they
    // count as header bytes, under the header deadline, CRLF or bare LF alike.
    let (gw, _u, _d, host) = gateway(&["--header-timeout-seconds", "1"]);
    for blank in ["\r\n", "\n"] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        let mut cut = false;
        while start.elapsed() < Duration::from_secs(4) {
            if s.write_all(blank.as_bytes()).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !cut {
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap_or(0);
            assert!(
                n == 0 || !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
                "{blank:?}: a blank-line client was kept"
            );
        }
        assert!(
            cut || start.elapsed() < Duration::from_secs(5),
            "{blank:?}: the connection outlived the header deadline"
        );
        let mut probe = [0u8; 16];
        let closed = matches!(s.read(&mut probe), Ok(0) | Err(_));
        assert!(
            closed,
            "{blank:?}: the connection is still open after the deadline"
        );
    }
    // A request after a few leading blank lines, sent at once, is served.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "\r\n\r\nGET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[test]
fn idle_keepalive_connections_are_closed() {
    let (gw, _u, _d, host) = gateway(&["--keepalive-timeout-seconds", "1"]);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "idle connection must be closed"
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

#[test]
fn bad_port_lists_and_proxy_ranges_refuse_to_start() {
    // Were a value wrongly accepted, the gateway must not take anyone's ports.
    let file = [
        "--provider-type",
        "file",
        "--sandbox-file",
        "/nonexistent.yaml",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "1",
    ];
    for bad in ["80,", "0", "90-80", "http", "65536"] {
        let err = start_fails(&[&file[..], &["--denied-ports", bad]].concat());
        assert!(err.contains("--denied-ports"), "{bad}: {err}");
    }
    for bad in ["10.0.0.0/33", "proxy", "10.0.0.1/8/8"] {
        let err = start_fails(&[&file[..], &["--trusted-proxy-cidrs", bad]].concat());
        assert!(err.contains("--trusted-proxy-cidrs"), "{bad}: {err}");
    }
    let err = start_fails(&[&file[..], &["--auth-limiter-max-clients", "0"]].concat());
    assert!(err.contains("--auth-limiter-max-clients"), "{err}");
}

#[test]
fn bad_flags_refuse_to_start_naming_the_problem() {
    let file = [
        "--provider-type",
        "file",
        "--sandbox-file",
        "/nonexistent.yaml",
        "--port",
        "0",
    ];
    let with = |more: &[&'static str]| -> Vec<&'static str> { [&file[..], more].concat() };
    let err = start_fails(&with(&["--mode", "path"]));
    assert!(err.contains("--mode") && err.contains("path"), "{err}");
    let err = start_fails(&with(&["--secure-access-keys", "a=mpucnQ==,bad=cHFycw=="]));
    assert!(
        err.contains("bad=<redacted>") && err.contains("key id"),
        "{err}"
    );
    let err = start_fails(&with(&["--secure-access-keys", "a=mpucnQ==,b=not*base64"]));
    assert!(
        err.contains("b=<redacted>") && err.contains("base64"),
        "{err}"
    );
    assert!(!err.contains("not*base64"), "the secret was printed: {err}");
    let err = start_fails(&["--provider-type", "file"]);
    assert!(err.contains("--sandbox-file"), "{err}");
    let err = start_fails(&with(&["--log-level", "chatty"]));
    assert!(err.contains("--log-level"), "{err}");
}
