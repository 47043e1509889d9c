//! Accepting connections until shutdown, for every TCP listener of the sidecar.

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection on `listener`, or `None` once `cancel` fires. Accept errors (a client
/// that went away, a full descriptor table) are logged and skipped.
pub async fn next(listener: &TcpListener, cancel: &CancellationToken) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => return Some(stream),
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                // A full descriptor table fails every accept at once: do not spin on it.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}
