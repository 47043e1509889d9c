//! A webhook receiver for the deny-webhook tests: `test-hook <addr> <ok|fail|refuse|hang> <file>`
//! answers every request with 204, 500, 400 or never, and appends each request to `<file>` as
//! one JSON line: `{"method","path","content_type","body"}`.

use std::io::Write;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, mode, file] = args.as_slice() else {
        eprintln!("usage: test-hook <addr> <ok|fail|refuse|hang> <file>");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let (mode, file) = (mode.clone(), file.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let Ok(n) = stream.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (end + 4, length);
                }
            };
            while buf.len() < head_end + length {
                let Ok(n) = stream.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut request_line = head.lines().next().unwrap_or("").split(' ');
            let content_type = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-type")
                        .then(|| v.trim().to_owned())
                })
                .unwrap_or_default();
            let record = serde_json::json!({
                "method": request_line.next().unwrap_or(""),
                "path": request_line.next().unwrap_or(""),
                "content_type": content_type,
                "body": String::from_utf8_lossy(&buf[head_end..head_end + length]),
            });
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
            {
                let _ = writeln!(f, "{record}");
            }
            let status = match mode.as_str() {
                "ok" => "204 No Content",
                "fail" => "500 Internal Server Error",
                "refuse" => "400 Bad Request",
                _ => {
                    // Hang: hold the connection, answer nothing.
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                    return;
                }
            };
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
    }
}
