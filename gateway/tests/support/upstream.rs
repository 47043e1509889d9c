//! Real upstream servers (hyper HTTP/1.1 with WebSocket upgrades) on a loopback address.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = BoxBody<Bytes, std::io::Error>;

pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests whose header reached this upstream.
    pub hits: Arc<AtomicUsize>,
    /// Request bodies that ended in an error (the sender aborted them) on `/count`.
    pub body_errors: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Serves on `ip:port` (port 0 picks one).
    pub fn start(ip: IpAddr, port: u16) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let hits = Arc::new(AtomicUsize::new(0));
        let body_errors = Arc::new(AtomicUsize::new(0));
        let (hits_in, errors_in) = (hits.clone(), body_errors.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind((ip, port)).await.unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                let serve = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let hits = hits_in.clone();
                        let errors = errors_in.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                hits.fetch_add(1, Ordering::SeqCst);
                                handle(req, errors.clone())
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("upstream did not start");
        Self {
            addr,
            hits,
            body_errors,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

/// Two upstreams on two loopback addresses of their own, listening on the same port, so a
/// sandbox can be moved from one to the other by changing only its address.
pub fn pair() -> (Upstream, Upstream) {
    let first = Upstream::start(super::unique_loopback(), 0);
    let second = Upstream::start(super::unique_loopback(), first.addr.port());
    (first, second)
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}

fn echo_json(req: &Request<Incoming>, extra: serde_json::Value) -> serde_json::Value {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "extra": extra,
    })
}

async fn handle(
    mut req: Request<Incoming>,
    body_errors: Arc<AtomicUsize>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/sse" => {
            let events = futures_util::stream::unfold(0u32, |i| async move {
                if i >= 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event-{i}\n\n")));
                Some((Ok::<_, std::io::Error>(frame), i + 1))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(BodyExt::boxed(StreamBody::new(events)))
                .unwrap()
        }
        "/die" => {
            // Promise a large body, send part of it, then fail so the connection drops mid-body.
            let chunks = futures_util::stream::iter(vec![
                Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))),
                Err(std::io::Error::other("upstream died")),
            ])
            .then(|item| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                item
            });
            Response::builder()
                .header("content-length", "100000")
                .body(BodyExt::boxed(StreamBody::new(chunks)))
                .unwrap()
        }
        "/count" => {
            let mut n = 0usize;
            let mut body = req.body_mut();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                    Err(_) => {
                        body_errors.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
            }
            let _ = &mut body;
            full(
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "bytes": n }).to_string(),
            )
        }
        "/ws" => websocket(req),
        _ => full(
            StatusCode::OK,
            "application/json",
            echo_json(&req, serde_json::Value::Null).to_string(),
        ),
    };
    Ok(resp)
}

/// Accepts a WebSocket upgrade and echoes every message; the first message back is the
/// handshake's view of the request (headers and path), so tests can check what arrived.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "not a websocket request",
        );
    };
    let protocol = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_owned());
    let seen = echo_json(&req, serde_json::Value::Null).to_string();
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if ws.send(seen.into()).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()));
    if let Some(p) = protocol {
        resp = resp.header("sec-websocket-protocol", p);
    }
    resp.body(
        Full::new(Bytes::new())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    )
    .unwrap()
}
