//! A tiny HTTP server that stands in for a sandbox in the quick start: it answers every request
//! with what it received, so you can see what the gateway forwarded.
//!
//! Usage: `demo-upstream [ADDR]` (default `127.0.0.1:18080`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("demo upstream listening on {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(stream).await {
                eprintln!("demo upstream: {e}");
            }
        });
    }
}

/// Answers requests on one connection until the client closes it. Request bodies are ignored.
async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default();
        let headers: Vec<&str> = lines.collect();
        let body = format!(
            "Hello from the demo sandbox!\nrequest: {request_line}\nheaders as received:\n  {}\n",
            headers.join("\n  ")
        );
        let close = headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("connection: close"));
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}
