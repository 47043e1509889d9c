//! The proxy's listeners. The caller binds the sockets and hands them in (tests bind port 0
//! and keep the address); each loop stops when the cancellation token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Proxy;

/// Queries handled at once over UDP; beyond this, packets wait in the socket buffer.
const UDP_INFLIGHT: usize = 1024;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Binds UDP and TCP on `addr` (the TCP listener on the UDP socket's port when `addr` asks for
/// port 0; the kernel picks UDP and TCP ports separately, so a port free for UDP may be taken
/// for TCP: then another UDP port is tried).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 32 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

/// Serves DNS on `udp` and `tcp` until `cancel` fires.
pub async fn serve(proxy: Arc<Proxy>, udp: UdpSocket, tcp: TcpListener, cancel: CancellationToken) {
    tokio::join!(
        serve_udp(proxy.clone(), Arc::new(udp), cancel.clone()),
        serve_tcp(proxy, tcp, cancel),
    );
}

async fn serve_udp(proxy: Arc<Proxy>, socket: Arc<UdpSocket>, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(UDP_INFLIGHT));
    let mut buf = vec![0u8; 65_535];
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "DNS UDP receive failed");
                continue;
            }
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let query = buf[..n].to_vec();
        let proxy = proxy.clone();
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Some(reply) = proxy.answer(&query, false).await {
                let _ = socket.send_to(&reply, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(proxy: Arc<Proxy>, listener: TcpListener, cancel: CancellationToken) {
    while let Some(stream) = crate::accept::next(&listener, &cancel).await {
        let proxy = proxy.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tcp_connection(proxy, stream) => {}
            }
        });
    }
}

async fn tcp_connection(proxy: Arc<Proxy>, mut stream: TcpStream) -> std::io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return Ok(());
        };
        let len = usize::from(len?);
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::other("slow client"))??;
        let Some(reply) = proxy.answer(&query, true).await else {
            return Ok(());
        };
        let n = u16::try_from(reply.len()).map_err(std::io::Error::other)?;
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
