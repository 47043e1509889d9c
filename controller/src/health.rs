//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1, one request per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{Encoder, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Health {
    /// Set once the controller is running (as leader or standby).
    pub ready: AtomicBool,
}

fn response(status: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn answer(path: &str, health: &Health) -> Vec<u8> {
    match path {
        "/healthz" => response("200 OK", "text/plain", b"ok"),
        "/readyz" if health.ready.load(Ordering::Acquire) => {
            response("200 OK", "text/plain", b"ready")
        }
        "/readyz" => response("503 Service Unavailable", "text/plain", b"starting"),
        "/metrics" => {
            let mut buf = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&prometheus::gather(), &mut buf) {
                Ok(()) => response("200 OK", encoder.format_type(), &buf),
                Err(e) => response(
                    "500 Internal Server Error",
                    "text/plain",
                    e.to_string().as_bytes(),
                ),
            }
        }
        _ => response("404 Not Found", "text/plain", b"not found"),
    }
}

pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                    .await;
            let Ok(Ok(n)) = read else { return };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let _ = stream.write_all(&answer(path, &health)).await;
        });
    }
}
