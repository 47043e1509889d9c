//! Long-lived and streamed traffic through the gateway: WebSocket upgrades, Server-Sent Events,
//! streamed request bodies, upstreams that die mid-response, graceful drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::client::{parse, request};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

fn setup(mode: &str) -> (Gateway, Upstream, TempDir) {
    let (gw, upstream, dir, _) = support::single_sandbox(GatewayOptions {
        mode,
        ..Default::default()
    });
    (gw, upstream, dir)
}

fn websocket_echo(gw: &Gateway, path: &str, host: &str, connection: &str) {
    let url = format!("ws://{}{path}", gw.addr);
    let mut req = url.into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert("host", host.parse().unwrap());
    h.insert("connection", connection.parse().unwrap());
    h.insert("authorization", "Bearer sandbox-user".parse().unwrap());
    h.insert(
        "sec-websocket-protocol",
        "chat.v1, chat.v0".parse().unwrap(),
    );
    let stream = TcpStream::connect(gw.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut ws, resp) =
        tungstenite::client(req, stream).expect("websocket handshake through the gateway");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v1"
    );
    let Message::Text(seen) = ws.read().unwrap() else {
        panic!("expected the upstream's view")
    };
    let seen: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(seen["path"], "/ws");
    let headers = seen["headers"].as_array().unwrap();
    let get = |n: &str| {
        headers
            .iter()
            .find(|h| h[0] == n)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    assert_eq!(get("authorization").as_deref(), Some("Bearer sandbox-user"));
    assert_eq!(
        get("sec-websocket-protocol").as_deref(),
        Some("chat.v1, chat.v0")
    );
    for i in 0..3 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(text));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).unwrap();
}

#[test]
fn websocket_echo_in_header_mode() {
    let (gw, upstream, _dir) = setup("header");
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    websocket_echo(&gw, "/ws", &host, "Upgrade");
    websocket_echo(&gw, "/ws", &host, "keep-alive, Upgrade");
}

#[test]
fn websocket_echo_in_uri_mode() {
    let (gw, upstream, _dir) = setup("uri");
    websocket_echo(
        &gw,
        &format!("/box/{}/ws", upstream.addr.port()),
        "gateway.test",
        "Upgrade, keep-alive",
    );
}

#[test]
fn server_sent_events_arrive_one_by_one() {
    let (gw, upstream, _dir) = setup("header");
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    write!(s, "GET /sse HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n").unwrap();
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while arrivals.len() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        while arrivals.len() < 3 && seen.contains(&format!("data: event-{}", arrivals.len())) {
            arrivals.push(start.elapsed());
        }
    }
    // The upstream spaces events 300 ms apart; a buffering proxy would deliver them together,
    // the first no earlier than 600 ms. The bounds leave room for a reader descheduled a while.
    for pair in arrivals.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(100),
            "{arrivals:?}"
        );
    }
    assert!(
        arrivals[0] < Duration::from_millis(450),
        "first event late: {arrivals:?}"
    );
}

#[test]
fn request_bodies_stream_through() {
    let (gw, upstream, _dir) = setup("header");
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    let body = vec![b'z'; 8 * 1024 * 1024];
    let resp = request(gw.addr, "POST", "/count", &[("Host", &host)], &body);
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert_eq!(resp.echo()["bytes"], body.len());
    // Chunked uploads of unknown length too.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST /count HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    for _ in 0..10 {
        write!(s, "400\r\n").unwrap();
        s.write_all(&[b'q'; 1024]).unwrap();
        write!(s, "\r\n").unwrap();
    }
    write!(s, "0\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert_eq!(parse(&raw).unwrap().echo()["bytes"], 10 * 1024);
}

#[test]
fn upstream_dying_mid_body_aborts_the_response() {
    let (gw, upstream, _dir) = setup("header");
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    let resp = request(gw.addr, "GET", "/die", &[("Host", &host)], b"");
    assert_eq!(resp.status, 200);
    assert!(
        !resp.complete,
        "a truncated body must not look complete ({} bytes)",
        resp.body.len()
    );
    assert!(resp.body.len() < 100_000);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let (mut gw, upstream, _dir) = setup("header");
    let host = format!("box-{}.sandbox.test", upstream.addr.port());
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /sse HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 64];
    let _ = s.read(&mut first).unwrap();
    let start = Instant::now();
    gw.signal("TERM");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&rest)
    );
    assert!(
        all.contains("data: event-2"),
        "in-flight stream was cut: {all}"
    );
    assert!(
        all.ends_with("0\r\n\r\n"),
        "stream did not finish cleanly: {all:?}"
    );
    // New connections are refused while draining.
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        TcpStream::connect(gw.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "gateway did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        start.elapsed()
    );
}
