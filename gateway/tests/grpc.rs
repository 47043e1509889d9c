//! gRPC through the gateway to real `tonic` servers in sandboxes, with a real `tonic` client:
//! unary and bidirectional streaming over HTTP/2 (h2c to the sandbox, chosen by the content
//! type or by the `opensandbox.io/h2c-ports` annotation), trailers carried back, deadlines and
//! cancellation passed on, and the gateway's own refusals answered as gRPC statuses.
//!
//! The services move raw bytes with a hand-written codec, so no protobuf code is generated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, BoxStream, Context, Poll, Service};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status, Streaming};

use support::{GatewayOptions, TempDir, batch_sandbox, free_port, unique_loopback};

/// Messages are their bytes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What the server saw, for the tests to read.
#[derive(Default)]
struct Seen {
    /// Calls of `Slow` whose handler was dropped before it finished.
    abandoned: AtomicUsize,
    /// The last `grpc-timeout` a call arrived with.
    timeout: std::sync::Mutex<Option<String>>,
}

/// The service: `Unary` echoes (or fails when asked), `Slow` answers after 5 s, `Chat` echoes
/// each message as it arrives and ends with a status in the trailers; any other path is a plain
/// HTTP answer naming the protocol version it came over.
#[derive(Clone)]
struct Echo(Arc<Seen>);

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let seen = self.0.clone();
        *seen.timeout.lock().unwrap() = req
            .headers()
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_owned());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw);
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/test.Echo/Slow" => grpc.unary(Slow(seen), req).await,
                "/test.Echo/Chat" => grpc.streaming(Chat, req).await,
                _ => {
                    let text = format!(
                        "plain over {:?}, forwarded proto {}",
                        req.version(),
                        req.headers()
                            .get("x-forwarded-proto")
                            .map_or("-", |v| v.to_str().unwrap())
                    );
                    http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
                        Bytes::from(text),
                    )))
                }
            })
        })
    }
}

struct Unary;

impl Service<Request<Bytes>> for Unary {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Response<Bytes>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            if let Some(reason) = req.metadata().get("x-fail") {
                let reason = reason.to_str().unwrap().to_owned();
                let mut status = Status::failed_precondition(format!("asked to fail: {reason}"));
                status
                    .metadata_mut()
                    .insert("x-detail", MetadataValue::from_static("kept"));
                return Err(status);
            }
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(req.get_ref());
            Ok(Response::new(Bytes::from(out)))
        })
    }
}

struct Slow(Arc<Seen>);

/// Counts the call as abandoned when dropped before it finished.
struct Abandon(Arc<Seen>, bool);

impl Abandon {
    fn finished(&mut self) {
        self.1 = true;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Service<Request<Bytes>> for Slow {
    type Response = Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Response<Bytes>, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        let guard = Abandon(self.0.clone(), false);
        Box::pin(async move {
            let mut guard = guard;
            tokio::time::sleep(Duration::from_secs(5)).await;
            guard.finished();
            Ok(Response::new(Bytes::from_static(b"late")))
        })
    }
}

struct Chat;

impl Service<Request<Streaming<Bytes>>> for Chat {
    type Response = Response<BoxStream<Bytes>>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let inbound = req.into_inner();
            // Echo each message as it comes; when the client ends its side, end with a status
            // that only trailers can carry (messages were already sent).
            let out = futures_util::stream::unfold(
                (inbound, 0u32, false),
                |(mut inbound, n, done)| async move {
                    if done {
                        return None;
                    }
                    match inbound.next().await {
                        Some(Ok(msg)) => {
                            let mut reply = b"re:".to_vec();
                            reply.extend_from_slice(&msg);
                            Some((Ok(Bytes::from(reply)), (inbound, n + 1, false)))
                        }
                        Some(Err(status)) => Some((Err(status), (inbound, n, true))),
                        None => {
                            let mut status =
                                Status::aborted(format!("chat over after {n} messages"));
                            status
                                .metadata_mut()
                                .insert("x-count", n.to_string().parse().unwrap());
                            Some((Err(status), (inbound, n, true)))
                        }
                    }
                },
            );
            Ok(Response::new(Box::pin(out) as BoxStream<Bytes>))
        })
    }
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

/// A tonic server (HTTP/2 only, as tonic serves by default) on a loopback address of its own.
async fn serve(seen: Arc<Seen>) -> SocketAddr {
    let addr = SocketAddr::new(unique_loopback(), free_port());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(Echo(seen), incoming));
    addr
}

struct Lab {
    gw: support::Gateway,
    /// Sandbox `h2`: its port is in `opensandbox.io/h2c-ports`.
    h2: SocketAddr,
    /// Sandbox `plain`: no annotation; gRPC reaches it by its content type.
    plain: SocketAddr,
    /// Sandbox `locked`: secure, token `t0ken`.
    locked: SocketAddr,
    seen: Arc<Seen>,
    _dir: TempDir,
}

impl Lab {
    async fn start() -> Lab {
        Lab::start_with(&[]).await
    }

    async fn start_with(extra: &'static [&'static str]) -> Lab {
        let seen = Arc::new(Seen::default());
        let (h2, plain, locked) = (
            serve(seen.clone()).await,
            serve(seen.clone()).await,
            serve(seen.clone()).await,
        );
        // `gone`: an address with nothing listening.
        let gone = unique_loopback();
        let dir = TempDir::new();
        let annotated = batch_sandbox("h2", "ns", 1, Some(&format!(r#"["{}"]"#, h2.ip())), None)
            .replace(
                "  annotations:\n",
                &format!(
                    "  annotations:\n    opensandbox.io/h2c-ports: \"{}\"\n",
                    h2.port()
                ),
            );
        let file = dir.write(
            "s.yaml",
            &[
                annotated,
                batch_sandbox(
                    "plain",
                    "ns",
                    1,
                    Some(&format!(r#"["{}"]"#, plain.ip())),
                    None,
                ),
                batch_sandbox(
                    "locked",
                    "ns",
                    1,
                    Some(&format!(r#"["{}"]"#, locked.ip())),
                    Some("t0ken"),
                ),
                batch_sandbox("gone", "ns", 1, Some(&format!(r#"["{gone}"]"#)), None),
            ]
            .join("---\n"),
        );
        let gw = tokio::task::spawn_blocking(move || {
            support::Gateway::start(
                &file,
                GatewayOptions {
                    extra: extra.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
            )
        })
        .await
        .unwrap();
        Lab {
            gw,
            h2,
            plain,
            locked,
            seen,
            _dir: dir,
        }
    }

    /// A gRPC client whose requests name `<sandbox>-<port>` as `:authority`.
    async fn client(
        &self,
        sandbox: &str,
        port: u16,
    ) -> tonic::client::Grpc<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.gw.addr))
            .unwrap()
            .origin(
                format!("http://{sandbox}-{port}.sandbox.test")
                    .parse()
                    .unwrap(),
            )
            .connect()
            .await
            .unwrap();
        tonic::client::Grpc::new(channel)
    }

    async fn stop(self) {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .unwrap();
    }
}

async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, Status> {
    client.ready().await.unwrap();
    client
        .unary(req, PathAndQuery::from_static("/test.Echo/Unary"), Raw)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_reach_sandboxes_with_statuses_and_trailers() {
    let lab = Lab::start().await;
    for (name, addr) in [("h2", lab.h2), ("plain", lab.plain)] {
        let mut c = lab.client(name, addr.port()).await;
        let ok = unary(&mut c, Request::new(Bytes::from_static(b"hi"))).await;
        assert_eq!(
            ok.unwrap().into_inner(),
            Bytes::from_static(b"echo:hi"),
            "{name}"
        );
        // The sandbox's own error status and its metadata come back as it sent them.
        let mut req = Request::new(Bytes::new());
        req.metadata_mut()
            .insert("x-fail", "on purpose".parse().unwrap());
        let err = unary(&mut c, req).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
        assert_eq!(err.message(), "asked to fail: on purpose");
        assert_eq!(err.metadata().get("x-detail").unwrap(), "kept");
    }
    // The routing header works as for any request.
    let mut c = lab.client("unrouted", 1).await;
    let mut req = Request::new(Bytes::from_static(b"x"));
    req.metadata_mut().insert(
        "opensandbox-ingress-to",
        format!("plain-{}", lab.plain.port()).parse().unwrap(),
    );
    assert_eq!(
        unary(&mut c, req).await.unwrap().into_inner(),
        Bytes::from_static(b"echo:x")
    );
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refusals_are_grpc_statuses() {
    let lab = Lab::start().await;
    let call = |sandbox: &'static str, port: u16, token: Option<&'static str>| {
        let lab = &lab;
        async move {
            let mut c = lab.client(sandbox, port).await;
            let mut req = Request::new(Bytes::from_static(b"x"));
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("opensandbox-secure-access", t.parse().unwrap());
            }
            unary(&mut c, req).await
        }
    };
    let port = lab.locked.port();
    let missing = call("locked", port, None).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("required"), "{missing:?}");
    let wrong = call("locked", port, Some("nope")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert_eq!(
        call("locked", port, Some("t0ken"))
            .await
            .unwrap()
            .into_inner(),
        Bytes::from_static(b"echo:x")
    );
    let unknown = call("nobox", 50051, None).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("nobox"), "{unknown:?}");
    let down = call("gone", 50051, None).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    let bad = call("plain", 0, None).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    // Counted and logged as the refusals they are, not as the HTTP 200 that carried them.
    lab.gw.metric_reaches(
        "sandbox_gateway_requests_total{class=\"4xx\",mode=\"header\"}",
        4.0,
    );
    lab.gw.metric_reaches(
        "sandbox_gateway_requests_total{class=\"5xx\",mode=\"header\"}",
        1.0,
    );
    lab.gw.wait_log("\"status\":401");
    // An HTTP/1.1 client sending gRPC's content type gets the status in the header block.
    let resp = support::client::raw(
        lab.gw.addr,
        b"POST /x HTTP/1.1\r\nHost: nobox-1.sandbox.test\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("grpc-status"), Some("5"));
    assert_eq!(resp.header("content-type"), Some("application/grpc"));
    lab.stop().await;
}

/// Opens a `Chat` stream: the sender of its messages and the stream of replies.
async fn chat(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
) -> (tokio::sync::mpsc::Sender<Bytes>, Streaming<Bytes>) {
    c.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let resp = c
        .streaming(
            Request::new(outbound),
            PathAndQuery::from_static("/test.Echo/Chat"),
            Raw,
        )
        .await
        .unwrap();
    (tx, resp.into_inner())
}

/// Established TCP connections to `addr` (the gateway's side of them), as `ss` lists them.
fn connections_to(addr: SocketAddr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("dst {addr}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Fifty gRPC streams open at once to one sandbox share the gateway's HTTP/2 connections to
/// it, instead of one connection each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_to_a_sandbox_share_upstream_connections() {
    let lab = Lab::start().await;
    let c = lab.client("h2", lab.h2.port()).await;
    let mut open = Vec::new();
    for i in 0..50 {
        let (tx, mut inbound) = chat(&mut c.clone()).await;
        tx.send(Bytes::from(format!("s{i}"))).await.unwrap();
        assert_eq!(
            inbound.next().await.unwrap().unwrap(),
            Bytes::from(format!("re:s{i}"))
        );
        open.push((tx, inbound));
    }
    // All fifty are open now.
    let upstream = connections_to(lab.h2);
    eprintln!("50 open streams over {upstream} upstream connection(s)");
    assert!(
        (1..=5).contains(&upstream),
        "{upstream} connections to the sandbox for 50 open streams"
    );
    drop(open);
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streams_flow_message_by_message_and_end_in_trailers() {
    let lab = Lab::start().await;
    for (name, addr) in [("h2", lab.h2), ("plain", lab.plain)] {
        let (tx, mut inbound) = chat(&mut lab.client(name, addr.port()).await).await;
        // Each reply arrives before the next message is sent: nothing waits for the end of
        // either stream, so nothing is buffered whole.
        for i in 0..100 {
            tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(5), inbound.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no reply to m{i} within 5 s"))
                .unwrap()
                .unwrap();
            assert_eq!(reply, Bytes::from(format!("re:m{i}")));
        }
        drop(tx);
        let end = inbound.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), Code::Aborted, "{name}: {end:?}");
        assert_eq!(end.message(), "chat over after 100 messages");
        assert_eq!(end.metadata().get("x-count").unwrap(), "100");
    }
    lab.stop().await;
}

/// Waits up to 3 s for `n` calls of `Slow` to have been dropped unfinished.
async fn wait_abandoned(seen: &Seen, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while seen.abandoned.load(Ordering::SeqCst) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox's call went on after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_reach_the_sandbox_and_cancellation_follows() {
    let lab = Lab::start().await;
    let mut c = lab.client("h2", lab.h2.port()).await;
    let slow = |c: &mut tonic::client::Grpc<tonic::transport::Channel>, timeout: Option<u64>| {
        let mut req = Request::new(Bytes::new());
        if let Some(ms) = timeout {
            req.set_timeout(Duration::from_millis(ms));
        }
        let mut c = c.clone();
        async move {
            c.ready().await.unwrap();
            c.unary(req, PathAndQuery::from_static("/test.Echo/Slow"), Raw)
                .await
        }
    };
    // The deadline travels as `grpc-timeout`, and the call ends at it: by the sandbox's
    // DEADLINE_EXCEEDED or the client's own timer (tonic runs both), whichever comes first.
    let started = std::time::Instant::now();
    let err = slow(&mut c, Some(300)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The sandbox records the call's `grpc-timeout` before its handler starts.
    wait_abandoned(&lab.seen, 1).await;
    assert_eq!(lab.seen.timeout.lock().unwrap().as_deref(), Some("300000u"));
    // A client that gives up with no deadline sent (its stream reset) ends the sandbox's
    // call too: the gateway resets its stream to the sandbox.
    let gave_up = tokio::time::timeout(Duration::from_millis(300), slow(&mut c, None)).await;
    assert!(gave_up.is_err());
    wait_abandoned(&lab.seen, 2).await;
    assert_eq!(lab.seen.timeout.lock().unwrap().as_deref(), None);
    lab.stop().await;
}

/// An h2c connection is not held to HTTP/1's header and keep-alive timeouts: a call that
/// waits longer than both on a connection whose earlier stream ended still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_outlives_the_http1_timeouts_of_its_connection() {
    let lab = Lab::start_with(&[
        "--keepalive-timeout-seconds",
        "1",
        "--header-timeout-seconds",
        "1",
    ])
    .await;
    let mut c = lab.client("h2", lab.h2.port()).await;
    let ok = unary(&mut c, Request::new(Bytes::from_static(b"a"))).await;
    assert_eq!(ok.unwrap().into_inner(), Bytes::from_static(b"echo:a"));
    c.ready().await.unwrap();
    let late = c
        .unary(
            Request::new(Bytes::new()),
            PathAndQuery::from_static("/test.Echo/Slow"),
            Raw,
        )
        .await;
    assert_eq!(late.unwrap().into_inner(), Bytes::from_static(b"late"));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_port_gets_http2_whatever_the_client_speaks() {
    let lab = Lab::start().await;
    let host = format!("h2-{}.sandbox.test", lab.h2.port());
    let host2 = host.clone();
    // HTTP/1.1 from the client, HTTP/2 to the sandbox (tonic serves nothing else).
    let req = format!("GET /page HTTP/1.1\r\nHost: {host2}\r\nConnection: close\r\n\r\n");
    let resp = support::client::raw(lab.gw.addr, req.as_bytes()).unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert_eq!(
        resp.body_text(),
        "plain over HTTP/2.0, forwarded proto http"
    );
    // Kept-alive requests too, which the lean path would otherwise take.
    let addr = lab.gw.addr;
    let bodies = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (0..3)
            .map(|_| {
                write!(s, "GET /page HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
                support::client::read_response(&mut s).unwrap().body_text()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(bodies, vec!["plain over HTTP/2.0, forwarded proto http"; 3]);
    // A port not in the annotation gets HTTP/1.1, which this server does not speak.
    let other = format!("plain-{}.sandbox.test", lab.plain.port());
    let req = format!("GET /page HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n");
    let resp = support::client::raw(lab.gw.addr, req.as_bytes()).unwrap();
    assert_eq!(resp.status, 502, "{}", resp.body_text());
    lab.stop().await;
}

#[test]
fn a_malformed_h2c_annotation_makes_the_sandbox_unavailable_with_the_reason() {
    let dir = TempDir::new();
    let ip = unique_loopback();
    let file = dir.write(
        "s.yaml",
        &batch_sandbox("bad", "ns", 1, Some(&format!(r#"["{ip}"]"#)), None).replace(
            "  annotations:\n",
            "  annotations:\n    opensandbox.io/h2c-ports: \"50051,x\"\n",
        ),
    );
    let gw = support::Gateway::start(&file, GatewayOptions::default());
    let resp = support::client::raw(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: bad-50051.sandbox.test\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(resp.status, 503);
    assert!(
        resp.body_text()
            .contains("malformed opensandbox.io/h2c-ports annotation"),
        "{}",
        resp.body_text()
    );
}
