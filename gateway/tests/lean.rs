//! The lean HTTP/1.1 path against a scripted upstream that answers in every framing a sandbox
//! may use: kept-alive connections, pipelined requests, close-delimited, chunked and interim
//! responses, bad framing, connections the sandbox closes while idle, and a connection that
//! changes over to the full path midway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::client::{Response, parse};
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox, unique_loopback};

/// An upstream whose answer is chosen by the request path; counts the connections it accepted
/// and those it has closed.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

impl Scripted {
    fn start(ip: IpAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, gone) = (accepted.clone(), closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let gone = gone.clone();
                std::thread::spawn(move || {
                    serve(stream, n);
                    gone.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            closed,
        }
    }

    /// Waits until the upstream has closed `n` connections.
    fn wait_closed(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.closed.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} connections not closed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(mut s: TcpStream, conn: usize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = header_end(&buf) else {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        // A chunked body (small, no trailers here) ends at the last chunk.
        let length = loop {
            let have = &buf[end..];
            if !chunked && have.len() >= length {
                break length;
            }
            if let Some(at) = chunked
                .then(|| have.windows(5).position(|w| w == b"0\r\n\r\n"))
                .flatten()
            {
                break at + 5;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        let body_text = if chunked {
            String::new()
        } else {
            String::from_utf8_lossy(&buf[end..end + length]).into_owned()
        };
        buf.drain(..end + length);
        let plain = |text: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
        };
        let answer = match path.as_str() {
            "/close-delimited" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nuntil the end");
                return;
            }
            "/early" => "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                         HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                .to_owned(),
            "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                           5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
                .to_owned(),
            // A chunked body followed by bytes no request asked for.
            "/chunked-extra" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                                 2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
                .to_owned(),
            "/gzip-chunked" => {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_owned()
            }
            "/conflict" => {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_owned()
            }
            "/private" => "HTTP/1.1 200 OK\r\nConnection: x-private\r\nX-Private: 1\r\n\
                           Keep-Alive: timeout=5\r\nX-Public: 1\r\nContent-Length: 2\r\n\r\nok"
                .to_owned(),
            "/head" => "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_owned(),
            "/once" => {
                let _ = s.write_all(plain(&format!("conn={conn}")).as_bytes());
                // Closed while idle: the gateway's kept connection is dead.
                return;
            }
            _ => plain(&format!("conn={conn} path={path} body={body_text}")),
        };
        if s.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn setup(extra: &[&str]) -> (Gateway, Scripted, TempDir) {
    let ip = unique_loopback();
    let upstream = Scripted::start(ip);
    let dir = TempDir::new();
    let file = dir.write(
        "s.yaml",
        &batch_sandbox("box", "a", 1, Some(&format!(r#"["{ip}"]"#)), None),
    );
    let gw = Gateway::start(
        &file,
        GatewayOptions {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    (gw, upstream, dir)
}

/// One kept-alive client connection.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    /// Statuses of the interim responses read.
    interim: Vec<u16>,
}

impl Client {
    fn connect(gw: &Gateway) -> Self {
        let s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self {
            s,
            buf: Vec::new(),
            interim: Vec::new(),
        }
    }

    fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).unwrap();
    }

    /// Reads one complete response (a HEAD answer is complete at its header).
    fn response(&mut self, head_only: bool) -> Response {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = header_end(&self.buf) {
                let resp = parse(&self.buf).unwrap();
                if (100..200).contains(&resp.status) {
                    self.interim.push(resp.status);
                    self.buf.drain(..end);
                    continue;
                }
                let len = if head_only {
                    Some(end)
                } else if resp.complete {
                    framed_len(&self.buf, end, &resp)
                } else {
                    None
                };
                if let Some(len) = len {
                    self.buf.drain(..len);
                    let mut resp = resp;
                    if head_only {
                        resp.body.clear();
                    }
                    return resp;
                }
            }
            let n = self.s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(self.s.read(&mut chunk), Ok(0) | Err(_))
    }
}

/// The bytes one response takes in `buf`.
fn framed_len(buf: &[u8], end: usize, resp: &Response) -> Option<usize> {
    if let Some(len) = resp.header("content-length") {
        return Some(end + len.parse::<usize>().unwrap());
    }
    // Chunked: up to the empty line after the last chunk (and any trailers).
    let rest = &buf[end..];
    let last = rest
        .windows(5)
        .position(|w| w == b"0\r\n\r\n" || w.starts_with(b"0\r\nX"))?;
    let tail = &rest[last + 3..];
    let done = tail
        .windows(2)
        .position(|w| w == b"\r\n")
        .and_then(|first| {
            if first == 0 {
                Some(2)
            } else {
                header_end(tail)
            }
        })?;
    Some(end + last + 3 + done)
}

fn get(path: &str, port: u16) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: box-{port}.gw\r\n\r\n")
}

#[test]
fn kept_alive_and_pipelined_requests_share_one_upstream_connection() {
    let (gw, up, _dir) = setup(&[]);
    let port = up.addr.port();
    let mut c = Client::connect(&gw);
    for i in 0..3 {
        c.send(&get(&format!("/n{i}"), port));
        let r = c.response(false);
        assert_eq!(r.status, 200);
        assert_eq!(r.body_text(), format!("conn=1 path=/n{i} body="));
        assert_eq!(r.header("connection"), Some("keep-alive"));
        assert_eq!(
            r.header("reverse-proxy-server-powerby"),
            Some("OpenSandbox-ingress")
        );
    }
    // Three requests in one write, one with a body split from its header.
    let body_req =
        format!("POST /b HTTP/1.1\r\nHost: box-{port}.gw\r\nContent-Length: 11\r\n\r\nhello");
    c.send(&format!(
        "{}{}{body_req}",
        get("/p1", port),
        get("/p2", port)
    ));
    std::thread::sleep(Duration::from_millis(50));
    c.send(" world");
    let seen: Vec<String> = (0..3).map(|_| c.response(false).body_text()).collect();
    assert_eq!(
        seen,
        [
            "conn=1 path=/p1 body=",
            "conn=1 path=/p2 body=",
            "conn=1 path=/b body=hello world"
        ]
    );
    assert_eq!(up.accepted(), 1, "one upstream connection for all of them");
}

#[test]
fn every_response_framing_reaches_the_client_intact() {
    let (gw, up, _dir) = setup(&[]);
    let port = up.addr.port();
    let mut c = Client::connect(&gw);

    // Read until the sandbox closes: chunked to a kept-alive client, which stays open.
    c.send(&get("/close-delimited", port));
    let r = c.response(false);
    assert_eq!((r.status, r.body_text().as_str()), (200, "until the end"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("x-kind"), Some("eof"));

    // Chunked passes through with its trailer, and the connection is used again.
    c.send(&get("/chunked", port));
    let r = c.response(false);
    assert_eq!(r.body_text(), "hello world");
    c.send(&get("/after-chunked", port));
    assert!(
        c.response(false)
            .body_text()
            .ends_with("path=/after-chunked body=")
    );

    // Bytes past a response's end: relayed no further, and the connection is not used again.
    c.send(&get("/chunked-extra", port));
    assert_eq!(c.response(false).body_text(), "ok");
    c.send(&get("/after-extra", port));
    let r = c.response(false);
    assert_eq!(r.status, 200);
    // Connection 1 ended with the close-delimited body, 2 with the bytes past the end.
    assert!(
        r.body_text().starts_with("conn=3 path=/after-extra"),
        "{}",
        r.body_text()
    );

    // An interim response is passed on; the final one follows.
    c.send(&get("/early", port));
    let r = c.response(false);
    assert_eq!((r.status, r.body_text().as_str()), (200, "final"));
    assert_eq!(c.interim, [103]);

    // The sandbox's hop-by-hop fields stay on its hop.
    c.send(&get("/private", port));
    let r = c.response(false);
    assert_eq!(r.header("x-public"), Some("1"));
    assert_eq!(r.header("x-private"), None);
    assert_eq!(r.header("keep-alive"), None);
    assert_eq!(r.header("connection"), Some("keep-alive"));

    // HEAD: the length of the body not sent, and nothing after the header.
    c.send(&format!(
        "HEAD /head HTTP/1.1\r\nHost: box-{port}.gw\r\n\r\n"
    ));
    let r = c.response(true);
    assert_eq!(r.header("content-length"), Some("1234"));
    c.send(&get("/after-head", port));
    assert!(
        c.response(false)
            .body_text()
            .ends_with("path=/after-head body=")
    );

    // Conflicting lengths and codings the client would not be told of are never passed on.
    for (n, path) in ["/conflict", "/gzip-chunked"].into_iter().enumerate() {
        let mut c = Client::connect(&gw);
        c.send(&get(path, port));
        let r = c.response(false);
        assert_eq!(r.status, 502, "{path}");
        assert!(r.body_text().contains("protocol"), "{}", r.body_text());
        assert!(c.closed());
        assert_eq!(
            gw.metric("sandbox_gateway_upstream_errors_total{kind=\"protocol\"}"),
            (n + 1) as f64
        );
    }
}

#[test]
fn a_connection_the_sandbox_closed_while_idle_is_replaced_unseen() {
    let (gw, up, _dir) = setup(&[]);
    let port = up.addr.port();
    for (i, expected) in ["conn=1", "conn=2", "conn=3"].into_iter().enumerate() {
        let mut c = Client::connect(&gw);
        c.send(&get("/once", port));
        let r = c.response(false);
        assert_eq!((r.status, r.body_text().as_str()), (200, expected));
        // The kept connection is dead before the next request takes it.
        up.wait_closed(i + 1);
    }
    assert_eq!(
        gw.metric("sandbox_gateway_requests_total{class=\"5xx\",mode=\"header\"}"),
        0.0
    );
}

#[test]
fn a_connection_changes_over_to_the_full_path_and_refusals_are_counted_once() {
    let (gw, up, _dir) = setup(&[]);
    let port = up.addr.port();
    let mut c = Client::connect(&gw);
    c.send(&get("/lean", port));
    assert!(c.response(false).body_text().ends_with("path=/lean body="));
    // A chunked upload goes to the full path, on the same connection.
    c.send(&format!(
        "POST /chunky HTTP/1.1\r\nHost: box-{port}.gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ));
    let r = c.response(false);
    assert_eq!(r.status, 200);
    assert!(
        r.body_text().ends_with("path=/chunky body="),
        "{}",
        r.body_text()
    );
    // And so does what follows it.
    c.send(&get("/full", port));
    assert!(c.response(false).body_text().ends_with("path=/full body="));

    // A refusal is answered and counted by the full path, once.
    let mut c = Client::connect(&gw);
    c.send("GET / HTTP/1.1\r\nHost: nobody-80.gw\r\n\r\n");
    assert_eq!(c.response(false).status, 404);
    // Counted when the request is finished, which may be just after the client has its answer.
    gw.metric_settles(
        "sandbox_gateway_requests_total{class=\"4xx\",mode=\"header\"}",
        1.0,
    );
    gw.metric_settles(
        "sandbox_gateway_requests_total{class=\"2xx\",mode=\"header\"}",
        3.0,
    );
}

#[test]
fn the_full_path_alone_serves_the_same_answers() {
    let (gw, up, _dir) = setup(&["--lean-path=false"]);
    let port = up.addr.port();
    let mut c = Client::connect(&gw);
    for path in ["/chunked", "/early", "/private", "/close-delimited"] {
        c.send(&get(path, port));
        let r = c.response(false);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("x-private"), None);
    }
    assert_eq!(c.interim, [103]);
}

#[test]
fn idle_upstream_connections_expire() {
    let (gw, up, _dir) = setup(&["--upstream-idle-timeout-seconds", "1"]);
    let port = up.addr.port();
    let ask = |path: &str| {
        let mut c = Client::connect(&gw);
        c.send(&get(path, port));
        c.response(false).body_text()
    };
    assert!(ask("/a").starts_with("conn=1 "));
    assert!(ask("/b").starts_with("conn=1 "), "kept for reuse");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        ask("/c").starts_with("conn=2 "),
        "an expired connection is not reused"
    );
}
