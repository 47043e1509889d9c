//! The resolvers the proxy forwards to: tried in order (those that stopped answering last),
//! UDP with pooled connected sockets, TCP when the client used TCP or the answer was truncated,
//! every query under a fresh random ID. The sockets carry the sidecar's mark; together with
//! the sidecar's cgroup that lets them past the redirect and the filter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::wire::{answers, restore_id, with_fresh_id};
use crate::config::SOCKET_MARK;
use crate::metrics;

/// Idle upstream sockets kept per upstream.
const POOL_PER_UPSTREAM: usize = 64;
/// How often upstreams that stopped answering are probed (at most; the probe interval when
/// shorter).
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Upstreams {
    addrs: Vec<SocketAddr>,
    /// Idle connected sockets per upstream. A socket goes back only after a clean exchange,
    /// so no late answer to an abandoned query can be waiting on it.
    pools: Vec<Mutex<Vec<UdpSocket>>>,
    /// Per upstream: it timed out or failed on its last attempt and has not answered since.
    down: Vec<AtomicBool>,
    timeout: Duration,
}

/// A marked socket of the upstream's family.
fn marked(addr: &SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(*addr), ty, Some(proto))?;
    socket.set_mark(SOCKET_MARK).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot set SO_MARK on the upstream socket (needs NET_ADMIN): {e}"),
        )
    })?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A marked UDP socket connected to `upstream`.
async fn udp_socket(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = marked(&upstream, Type::DGRAM, Protocol::UDP)?;
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    socket.bind(&any.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(upstream).await?;
    Ok(socket)
}

async fn tcp_exchange(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let socket = marked(&upstream, Type::STREAM, Protocol::TCP)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let mut stream = socket.connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let n = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    stream.read_exact(&mut buf).await?;
    if !answers(query, &buf) {
        return Err(std::io::Error::other("upstream answered another query"));
    }
    Ok(buf)
}

impl Upstreams {
    pub fn new(addrs: Vec<SocketAddr>, timeout: Duration) -> Upstreams {
        for upstream in &addrs {
            metrics::UPSTREAM_UP
                .with_label_values(&[upstream.to_string().as_str()])
                .set(1);
        }
        Upstreams {
            pools: addrs.iter().map(|_| Mutex::new(Vec::new())).collect(),
            down: addrs.iter().map(|_| AtomicBool::new(false)).collect(),
            addrs,
            timeout,
        }
    }

    /// Upstream indices to try: those answering first (configured order), then those that
    /// stopped answering (they are still tried when nothing else works).
    fn order(&self) -> Vec<usize> {
        let (up, down): (Vec<usize>, Vec<usize>) =
            (0..self.addrs.len()).partition(|&i| !self.down[i].load(Ordering::Relaxed));
        up.into_iter().chain(down).collect()
    }

    fn mark(&self, index: usize, down: bool) {
        let was = self.down[index].swap(down, Ordering::Relaxed);
        if was != down {
            let upstream = self.addrs[index];
            if down {
                tracing::warn!(upstream = %upstream, "DNS upstream not answering; asked last until it answers again");
            } else {
                tracing::info!(upstream = %upstream, "DNS upstream answering again");
            }
            metrics::UPSTREAM_UP
                .with_label_values(&[upstream.to_string().as_str()])
                .set(i64::from(!down));
        }
    }

    /// The first usable answer to `query` (NOERROR or NXDOMAIN), carrying the query's own ID;
    /// `None` when no upstream gave one.
    pub async fn forward(&self, query: &[u8], tcp: bool, max_udp: usize) -> Option<Vec<u8>> {
        for index in self.order() {
            let upstream = self.addrs[index];
            let sent = with_fresh_id(query);
            let started = Instant::now();
            let attempt = async {
                if tcp {
                    return tcp_exchange(upstream, &sent).await;
                }
                let reply = self.udp_exchange(index, upstream, &sent, max_udp).await?;
                if reply[2] & 0x02 != 0 {
                    // Truncated: ask again over TCP for the whole answer.
                    return tcp_exchange(upstream, &sent).await;
                }
                Ok(reply)
            };
            let result = tokio::time::timeout(self.timeout, attempt).await;
            metrics::UPSTREAM_LATENCY.observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(Ok(mut reply)) => {
                    self.mark(index, false);
                    match reply[3] & 0x0f {
                        // NOERROR and NXDOMAIN are answers; SERVFAIL, REFUSED … mean ask
                        // elsewhere (the upstream itself is up).
                        0 | 3 => {
                            restore_id(&mut reply, query);
                            return Some(reply);
                        }
                        rcode => format!("answered rcode {rcode}"),
                    }
                }
                Ok(Err(e)) => {
                    self.mark(index, true);
                    e.to_string()
                }
                Err(_) => {
                    self.mark(index, true);
                    format!("no answer within {:?}", self.timeout)
                }
            };
            let label = upstream.to_string();
            metrics::UPSTREAM_FAILURES
                .with_label_values(&[label.as_str()])
                .inc();
            tracing::warn!(upstream = %upstream, failure, "DNS upstream failed; trying the next");
        }
        None
    }

    async fn udp_exchange(
        &self,
        index: usize,
        upstream: SocketAddr,
        query: &[u8],
        size: usize,
    ) -> std::io::Result<Vec<u8>> {
        let pooled = self.pools[index].lock().ok().and_then(|mut p| p.pop());
        let socket = match pooled {
            Some(s) => s,
            None => udp_socket(upstream).await?,
        };
        socket.send(query).await?;
        // The upstream answers within the client's buffer size (its EDNS size is forwarded).
        let mut buf = vec![0u8; size.clamp(512, 65_535)];
        loop {
            let n = socket.recv(&mut buf).await?;
            if answers(query, &buf[..n]) {
                buf.truncate(n);
                if let Ok(mut pool) = self.pools[index].lock()
                    && pool.len() < POOL_PER_UPSTREAM
                {
                    pool.push(socket);
                }
                return Ok(buf);
            }
        }
    }

    /// One probe of upstream `index` with `question`: whether it answered at all (any
    /// response code counts: the upstream is there).
    async fn probe_one(&self, index: usize, question: &[u8]) -> Result<(), String> {
        let sent = with_fresh_id(question);
        let upstream = self.addrs[index];
        let limit = self.timeout.min(Duration::from_secs(2));
        let answered = tokio::time::timeout(limit, async {
            let socket = udp_socket(upstream).await?;
            socket.send(&sent).await?;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = socket.recv(&mut buf).await?;
                if answers(&sent, &buf[..n]) {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await;
        match answered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// Asks every upstream `probe` every `interval` (as the reference: `. NS` or `<name> A`),
    /// and those marked down every few seconds besides; an answer brings an upstream to the
    /// front, a failure sends it to the back. Stops when `cancel` fires.
    pub async fn probe(self: Arc<Self>, probe: Probe, cancel: CancellationToken) {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        let query = match probe
            .name
            .as_deref()
            .map(hickory_proto::rr::Name::from_ascii)
        {
            Some(Ok(mut name)) => {
                name.set_fqdn(true);
                hickory_proto::op::Query::query(name, RecordType::A)
            }
            _ => hickory_proto::op::Query::query(hickory_proto::rr::Name::root(), RecordType::NS),
        };
        message.add_query(query);
        let Ok(bytes) = message.to_vec() else { return };
        let interval = probe.interval.max(Duration::from_secs(1));
        let mut all = tokio::time::interval(interval);
        let mut down = tokio::time::interval(PROBE_INTERVAL.min(interval));
        loop {
            let every = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = all.tick() => true,
                _ = down.tick() => false,
            };
            for index in 0..self.addrs.len() {
                if !every && !self.down[index].load(Ordering::Relaxed) {
                    continue;
                }
                match self.probe_one(index, &bytes).await {
                    Ok(()) => self.mark(index, false),
                    Err(failure) => {
                        if every {
                            tracing::warn!(upstream = %self.addrs[index], failure, "DNS upstream probe failed");
                        }
                        self.mark(index, true);
                    }
                }
            }
        }
    }

    /// An address of `host` (A, else AAAA), asked of the upstreams directly.
    pub async fn resolve(&self, host: &str) -> Option<std::net::IpAddr> {
        let mut name = hickory_proto::rr::Name::from_ascii(host).ok()?;
        name.set_fqdn(true);
        for kind in [RecordType::A, RecordType::AAAA] {
            let mut message = Message::query();
            message.metadata.recursion_desired = true;
            message.add_query(hickory_proto::op::Query::query(name.clone(), kind));
            let bytes = message.to_vec().ok()?;
            let Some(raw) = self.forward(&bytes, false, 4096).await else {
                continue;
            };
            let reply = Message::from_vec(&raw).ok()?;
            let found = reply.answers.iter().find_map(|r| match &r.data {
                hickory_proto::rr::RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                hickory_proto::rr::RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
                _ => None,
            });
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// What the upstream probe asks and how often.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `None`: `. NS`; else `<name> A`.
    pub name: Option<String>,
    pub interval: Duration,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe {
            name: None,
            interval: Duration::from_secs(30),
        }
    }
}
