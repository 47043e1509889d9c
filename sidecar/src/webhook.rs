//! The deny webhook (`OPENSANDBOX_EGRESS_DENY_WEBHOOK`): one `POST` per denied DNS query with
//! `{"hostname","timestamp","source","sandboxId"}`, as the reference sends it.
//!
//! A denial only queues the name (`try_send` into a bounded queue); one worker posts them in
//! order, each with up to three retries after 1, 2 and 4 seconds when the hook fails or answers
//! 5xx, and none after a 3xx or 4xx. So a hook that hangs or fails fills the queue and loses
//! names (counted), and never slows a DNS answer.
//!
//! The post is plain HTTP/1.1 over a socket carrying the sidecar's mark (it belongs to the
//! sidecar's cgroup like every socket of this process), so the fence lets it out; a host name
//! in the URL is resolved through the sidecar's own upstreams, not through the sandbox's DNS
//! path and its policy.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;

use crate::config::SOCKET_MARK;
use crate::dns::Resolver;
use crate::metrics;

/// Names waiting to be posted (the reference's queue size).
pub const QUEUE: usize = 256;
/// One attempt, connect to status line.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits before the retries.
const BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
/// The `source` field, as the reference writes it.
pub const SOURCE: &str = "opensandbox-egress";

/// Where denials are posted: an `http://` URL, checked at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parses `http://host[:port][/path][?query]`; refuses what it cannot post to.
    pub fn parse(url: &str) -> Result<Target, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(
                    "https is not supported; post to an http:// endpoint inside the cluster".into(),
                );
            }
            _ => return Err("not an http:// URL".into()),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'#')
        {
            return Err("the path has spaces, control characters or a fragment".into());
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (ip, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
                let port = match after.strip_prefix(':') {
                    Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
                    None if after.is_empty() => 80,
                    None => return Err("junk after the IPv6 address".into()),
                };
                ip.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| "bad IPv6 address".to_owned())?;
                (ip.to_owned(), port)
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("bad port {p:?}"))?,
                ),
                None => (authority.to_owned(), 80),
            },
        };
        if port == 0 {
            return Err("port 0".into());
        }
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !valid_host {
            return Err(format!("{host:?} is not a host name or address"));
        }
        Ok(Target { host, port, path })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// The queue side, held by the DNS proxy.
pub struct Webhook {
    tx: mpsc::Sender<String>,
    /// A drop was logged since the queue last took a name: a sandbox flooding denied names
    /// must not flood the log twice over (each denial is already an audit line).
    drop_logged: AtomicBool,
}

impl Webhook {
    /// Starts the worker on the current runtime.
    pub fn start(target: Target, sandbox_id: String, resolve: Resolver) -> Webhook {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(worker(rx, target, sandbox_id, resolve));
        Webhook {
            tx,
            drop_logged: AtomicBool::new(false),
        }
    }

    /// Queues a denied name; never waits.
    pub fn denied(&self, hostname: &str) {
        let name = hostname.trim_end_matches('.').to_ascii_lowercase();
        if self.tx.try_send(name).is_ok() {
            self.drop_logged.store(false, Ordering::Relaxed);
            return;
        }
        metrics::WEBHOOK.with_label_values(&["dropped"]).inc();
        if !self.drop_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                hostname,
                "deny webhook queue full; dropping notifications until it drains (counted in egress_deny_webhook_total)"
            );
        }
    }
}

/// The reference's payload, its fields in the reference's order.
pub fn payload(hostname: &str, at: SystemTime, sandbox_id: &str) -> String {
    let text = |v: &str| serde_json::Value::from(v).to_string();
    format!(
        "{{\"hostname\":{},\"timestamp\":\"{}\",\"source\":\"{SOURCE}\",\"sandboxId\":{}}}",
        text(hostname),
        sandbox_api::time::rfc3339(at),
        text(sandbox_id)
    )
}

async fn worker(
    mut rx: mpsc::Receiver<String>,
    target: Target,
    sandbox_id: String,
    resolve: Resolver,
) {
    while let Some(hostname) = rx.recv().await {
        let body = payload(&hostname, SystemTime::now(), &sandbox_id);
        let mut attempt = 0;
        loop {
            let result =
                tokio::time::timeout(ATTEMPT_TIMEOUT, post(&target, &body, &resolve)).await;
            let failure = match result {
                Ok(Ok(status)) if status < 300 => {
                    metrics::WEBHOOK.with_label_values(&["delivered"]).inc();
                    break;
                }
                Ok(Ok(status)) if status < 500 => {
                    metrics::WEBHOOK.with_label_values(&["refused"]).inc();
                    tracing::warn!(
                        status,
                        hostname,
                        "deny webhook refused the notification; not retried"
                    );
                    break;
                }
                Ok(Ok(status)) => format!("status {status}"),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            };
            let Some(wait) = BACKOFF.get(attempt) else {
                metrics::WEBHOOK.with_label_values(&["failed"]).inc();
                tracing::warn!(failure, hostname, "deny webhook failed after retries");
                break;
            };
            attempt += 1;
            tokio::time::sleep(*wait).await;
        }
    }
}

/// One POST; the status code of the answer.
async fn post(target: &Target, body: &str, resolve: &Resolver) -> std::io::Result<u16> {
    let ip = match target.host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => resolve
            .resolve(&target.host)
            .await
            .ok_or_else(|| std::io::Error::other(format!("{} does not resolve", target.host)))?,
    };
    let addr = SocketAddr::new(ip, target.port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(SOCKET_MARK)?;
    socket.set_nonblocking(true)?;
    let mut stream = TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await?;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: opensandbox-egress\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        target.path,
        target.authority(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    let status = std::str::from_utf8(&head)
        .ok()
        .filter(|h| h.starts_with("HTTP/1."))
        .and_then(|h| h[9..12].parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("the webhook did not answer HTTP"))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Target::parse("http://hooks.example:8080/deny?x=1").unwrap(),
            Target {
                host: "hooks.example".into(),
                port: 8080,
                path: "/deny?x=1".into()
            }
        );
        assert_eq!(Target::parse("HTTP://10.0.0.1").unwrap().path, "/");
        assert_eq!(
            Target::parse("http://[fd00::1]:81/h").unwrap().authority(),
            "[fd00::1]:81"
        );
        for bad in [
            "",
            "hooks.example/deny",
            "ftp://x/",
            "https://x/",
            "http://",
            "http://a b/",
            "http://x:port/",
            "http://u:p@x/",
            "http://x/a b",
            "http://[::1/",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn payload_has_the_reference_fields() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_781_516_818_250);
        assert_eq!(
            payload("blocked.test", at, "sbx-1"),
            r#"{"hostname":"blocked.test","timestamp":"2026-06-15T09:46:58Z","source":"opensandbox-egress","sandboxId":"sbx-1"}"#
        );
    }
}
