//! A minimal HTTP server for the network-namespace tests and benchmarks: listens on every
//! address given (`198.51.100.10:80 198.51.100.20:80`) and answers each request with
//! `hello from <address>`. On each address's port 7 it also echoes TCP streams and UDP
//! datagrams, for tests that need a long-lived flow.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

const ECHO_PORT: u16 = 7;

async fn echo_tcp(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn echo_udp(socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut tasks = Vec::new();
    for addr in std::env::args().skip(1) {
        let mut echo: SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
        echo.set_port(ECHO_PORT);
        tasks.push(tokio::spawn(echo_tcp(TcpListener::bind(echo).await?)));
        tasks.push(tokio::spawn(echo_udp(UdpSocket::bind(echo).await?)));
        let listener = TcpListener::bind(&addr).await?;
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let body = format!("hello from {local}\n");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
