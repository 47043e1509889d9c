//! The DNS proxy: answers denied names with NXDOMAIN, forwards allowed queries to the upstreams
//! (UDP, and TCP when the client used TCP or the answer came back truncated; next upstream on
//! timeout, SERVFAIL or REFUSED), checks the CNAME chain of the answer, refuses addresses in
//! link-local and metadata ranges unless a rule names them, admits the answer's addresses to the
//! nftables sets before the client sees the answer, and caches answers for their TTL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use sandbox_api::policy::Action;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::config::SOCKET_MARK;
use crate::engine::{Source, canonical};
use crate::metrics::{self, Verdict};
use crate::nft::is_special;
use crate::state::State;

const HEADER_LEN: usize = 12;
const CACHE_ENTRIES: usize = 10_000;
const CACHE_MAX_TTL: u32 = 300;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries handled at once over UDP; beyond this, packets wait in the socket buffer.
const UDP_INFLIGHT: usize = 1024;
/// Idle upstream sockets kept per upstream.
const POOL_PER_UPSTREAM: usize = 64;
/// How often upstreams that stopped answering are probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Name, type, class, DNSSEC OK, checking disabled.
type CacheKey = (String, u16, u16, bool, bool);

struct Cached {
    message: Message,
    stored: Instant,
    ttl: u32,
    generation: u64,
}

pub struct Proxy {
    state: Arc<State>,
    upstreams: Vec<SocketAddr>,
    /// Idle connected sockets per upstream. A socket goes back only after a clean exchange,
    /// so no late answer to an abandoned query can be waiting on it.
    pools: Vec<Mutex<Vec<UdpSocket>>>,
    /// Per upstream: it timed out or failed on its last attempt and has not answered since.
    down: Vec<AtomicBool>,
    /// The probe task runs once per proxy, however many listeners serve it.
    probing: AtomicBool,
    timeout: Duration,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

/// A reply carrying only a header: same ID, opcode and RD bit as the query, `rcode` set. Used
/// when the query cannot be parsed, so nothing else about it can be echoed.
fn header_reply(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0] = query[0];
    out[1] = query[1];
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = rcode.low() & 0x0f;
    out
}

fn reply_to(query: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.checking_disabled = query.metadata.checking_disabled;
    reply.metadata.response_code = rcode;
    reply.queries = query.queries.clone();
    reply
}

/// Counts `verdict` and answers `query` with `rcode`, question echoed.
fn refuse(message: &Message, query: &[u8], rcode: ResponseCode, verdict: Verdict) -> Vec<u8> {
    metrics::query(verdict);
    encode(&reply_to(message, rcode), query, rcode)
}

fn servfail(message: &Message, query: &[u8]) -> Vec<u8> {
    refuse(message, query, ResponseCode::ServFail, Verdict::Servfail)
}

fn encode(message: &Message, fallback_query: &[u8], rcode_on_error: ResponseCode) -> Vec<u8> {
    message
        .to_vec()
        .unwrap_or_else(|_| header_reply(fallback_query, rcode_on_error))
}

fn min_ttl(message: &Message) -> Option<u32> {
    if message.answers.is_empty() {
        // Negative answers: the SOA's TTL bounds how long the absence may be remembered.
        return message
            .authorities
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .map(|r| r.ttl)
            .min();
    }
    message.answers.iter().map(|r| r.ttl).min()
}

/// A marked socket of the upstream's family, so the port-53 redirect and the filter let it out.
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

/// Length of the question section of a query whose first question starts at byte 12.
fn question_len(query: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            return Some(at + 1 + 4 - HEADER_LEN);
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
}

/// Whether `reply` answers `query`: response bit, same ID, same question (any case).
fn answers(query: &[u8], reply: &[u8]) -> bool {
    if reply.len() < HEADER_LEN || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    match question_len(query) {
        Some(len) => reply
            .get(HEADER_LEN..HEADER_LEN + len)
            .is_some_and(|q| q.eq_ignore_ascii_case(&query[HEADER_LEN..HEADER_LEN + len])),
        None => true,
    }
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

/// What the answer's content says.
enum Inspected {
    /// Forward as is (possibly re-encoded without refused records), admitting these addresses.
    Pass {
        message: Message,
        changed: bool,
        addrs: Vec<(IpAddr, u32)>,
    },
    /// A name in the CNAME chain is denied by a rule (which layer).
    Denied(String, Source),
}

impl Proxy {
    pub fn new(state: Arc<State>, upstreams: Vec<SocketAddr>, timeout: Duration) -> Proxy {
        for upstream in &upstreams {
            metrics::UPSTREAM_UP
                .with_label_values(&[upstream.to_string().as_str()])
                .set(1);
        }
        Proxy {
            state,
            pools: upstreams.iter().map(|_| Mutex::new(Vec::new())).collect(),
            down: upstreams.iter().map(|_| AtomicBool::new(false)).collect(),
            probing: AtomicBool::new(false),
            upstreams,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The reply to one query, or `None` when nothing should be sent (not a query at all).
    pub async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let started = Instant::now();
        let reply = self.answer_inner(query, tcp).await;
        if reply.is_some() {
            metrics::QUERY_LATENCY.observe(started.elapsed().as_secs_f64());
        }
        reply
    }

    async fn answer_inner(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
            return None;
        }
        let message = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                metrics::query(Verdict::Formerr);
                return Some(header_reply(query, ResponseCode::FormErr));
            }
        };
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        if message.metadata.op_code != OpCode::Query {
            metrics::query(Verdict::Notimp);
            return Some(header_reply(query, ResponseCode::NotImp));
        }
        if message.queries.len() != 1 {
            return Some(refuse(
                &message,
                query,
                ResponseCode::FormErr,
                Verdict::Formerr,
            ));
        }
        let question = &message.queries[0];
        let name = canonical(&question.name().to_ascii());
        let engine = self.state.engine();
        let (verdict, source) = engine.name(&name);
        drop(engine);
        if verdict == Action::Deny {
            return Some(self.deny(&message, query, &name, &name, source));
        }

        let max_udp = usize::from(message.max_payload().max(512));
        let key = (
            name.clone(),
            u16::from(question.query_type()),
            u16::from(question.query_class()),
            message.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            message.metadata.checking_disabled,
        );
        let generation = self.state.generation();
        if let Some(mut hit) = self.cached(&key, generation) {
            metrics::CACHE_HITS.inc();
            metrics::query(Verdict::Allowed);
            hit.metadata.id = message.metadata.id;
            // The client's own spelling of the question (case may differ from the first asker).
            hit.queries = message.queries.clone();
            return Some(self.fit(hit, tcp, max_udp, query));
        }

        let Some(raw) = self.forward(query, tcp, max_udp).await else {
            return Some(servfail(&message, query));
        };
        let reply = match Message::from_vec(&raw) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, name, "upstream answer does not parse; SERVFAIL");
                return Some(servfail(&message, query));
            }
        };
        let (message_out, changed, addrs) = match self.inspect(&name, reply) {
            Inspected::Denied(denied, source) => {
                return Some(self.deny(&message, query, &name, &denied, source));
            }
            Inspected::Pass {
                message,
                changed,
                addrs,
            } => (message, changed, addrs),
        };
        if let Some(nft) = self.state.nft().filter(|_| !addrs.is_empty())
            && let Err(e) = nft.learn(name.clone(), addrs).await
        {
            tracing::error!(error = %e, name, "could not admit the answer's addresses; SERVFAIL");
            return Some(servfail(&message, query));
        }
        metrics::query(Verdict::Allowed);
        let rcode = message_out.metadata.response_code;
        if matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
            && !message_out.metadata.truncation
            && let Some(ttl) = min_ttl(&message_out).map(|t| t.min(CACHE_MAX_TTL))
            && ttl > 0
        {
            self.store(key, message_out.clone(), ttl, generation);
        }
        if !changed && (tcp || raw.len() <= max_udp) {
            return Some(raw);
        }
        Some(self.fit(message_out, tcp, max_udp, query))
    }

    /// Encodes, truncating for a UDP client whose buffer is too small (it retries over TCP).
    fn fit(&self, message: Message, tcp: bool, max_udp: usize, query: &[u8]) -> Vec<u8> {
        let bytes = encode(&message, query, ResponseCode::ServFail);
        if tcp || bytes.len() <= max_udp {
            return bytes;
        }
        encode(&message.truncate(), query, ResponseCode::ServFail)
    }

    fn deny(
        &self,
        message: &Message,
        query: &[u8],
        name: &str,
        matched: &str,
        source: Source,
    ) -> Vec<u8> {
        tracing::info!(
            target: "audit",
            event = "dns.denied",
            name,
            matched,
            by = source_str(source),
            "egress name denied"
        );
        refuse(message, query, ResponseCode::NXDomain, Verdict::Denied)
    }

    fn cached(&self, key: &CacheKey, generation: u64) -> Option<Message> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(key)?;
        let age = entry.stored.elapsed().as_secs();
        if entry.generation != generation || age >= u64::from(entry.ttl) {
            return None;
        }
        let mut message = entry.message.clone();
        let age = u32::try_from(age).unwrap_or(u32::MAX);
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(message)
    }

    fn store(&self, key: CacheKey, message: Message, ttl: u32, gen_: u64) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= CACHE_ENTRIES {
            let now = Instant::now();
            cache.retain(|_, c| {
                c.generation == gen_
                    && now.duration_since(c.stored) < Duration::from_secs(u64::from(c.ttl))
            });
            // Still full of live answers: drop a tenth, so the scan above runs once per
            // thousand inserts rather than on every one.
            if cache.len() >= CACHE_ENTRIES * 9 / 10 {
                let evict: Vec<CacheKey> = cache.keys().take(CACHE_ENTRIES / 10).cloned().collect();
                for key in evict {
                    cache.remove(&key);
                }
            }
        }
        cache.insert(
            key,
            Cached {
                message,
                stored: Instant::now(),
                ttl,
                generation: gen_,
            },
        );
    }

    /// Tries the upstreams in order; `None` when none gave a usable answer.
    /// Upstream indices to try: those answering first (configured order), then those that
    /// stopped answering (they are still tried when nothing else works).
    fn order(&self) -> Vec<usize> {
        let (up, down): (Vec<usize>, Vec<usize>) =
            (0..self.upstreams.len()).partition(|&i| !self.down[i].load(Ordering::Relaxed));
        up.into_iter().chain(down).collect()
    }

    fn mark(&self, index: usize, down: bool) {
        let was = self.down[index].swap(down, Ordering::Relaxed);
        if was != down {
            let upstream = self.upstreams[index];
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

    /// Tries the upstreams; `None` when none gave a usable answer.
    async fn forward(&self, query: &[u8], tcp: bool, max_udp: usize) -> Option<Vec<u8>> {
        for index in self.order() {
            let upstream = self.upstreams[index];
            let started = Instant::now();
            let attempt = async {
                if tcp {
                    return tcp_exchange(upstream, query).await;
                }
                let reply = self.udp_exchange(index, upstream, query, max_udp).await?;
                if reply[2] & 0x02 != 0 {
                    // Truncated: ask again over TCP for the whole answer.
                    return tcp_exchange(upstream, query).await;
                }
                Ok(reply)
            };
            let result = tokio::time::timeout(self.timeout, attempt).await;
            metrics::UPSTREAM_LATENCY.observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(Ok(reply)) => {
                    self.mark(index, false);
                    match reply[3] & 0x0f {
                        // NOERROR and NXDOMAIN are answers; SERVFAIL, REFUSED … mean ask
                        // elsewhere (the upstream itself is up).
                        0 | 3 => return Some(reply),
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

    /// Asks every upstream marked down for `. IN NS` every few seconds; any answer brings it
    /// back to the front. Runs until the process ends.
    pub async fn probe(self: Arc<Self>) {
        let mut probe = Message::query();
        probe.metadata.recursion_desired = true;
        probe.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::root(),
            RecordType::NS,
        ));
        let mut id: u16 = 0;
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            for index in 0..self.upstreams.len() {
                if !self.down[index].load(Ordering::Relaxed) {
                    continue;
                }
                id = id.wrapping_add(1);
                probe.metadata.id = id;
                let Ok(bytes) = probe.to_vec() else { continue };
                let upstream = self.upstreams[index];
                let answered =
                    tokio::time::timeout(self.timeout.min(Duration::from_secs(2)), async {
                        let socket = udp_socket(upstream).await?;
                        socket.send(&bytes).await?;
                        let mut buf = vec![0u8; 4096];
                        loop {
                            let n = socket.recv(&mut buf).await?;
                            if answers(&bytes, &buf[..n]) {
                                return Ok::<_, std::io::Error>(());
                            }
                        }
                    })
                    .await;
                if matches!(answered, Ok(Ok(()))) {
                    self.mark(index, false);
                }
            }
        }
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

    /// Follows the CNAME chain from `name`, refuses the answer if a rule denies a name on it,
    /// drops link-local/metadata addresses no rule allows, and lists the addresses to admit.
    fn inspect(&self, name: &str, mut reply: Message) -> Inspected {
        let engine = self.state.engine();
        let mut chain = vec![name.to_owned()];
        // CNAMEs may come in any order; follow them until no new name appears.
        loop {
            let last = chain.last().cloned().unwrap_or_default();
            let next = reply.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target)
                    if canonical(&r.name.to_ascii()) == last
                        && r.record_type() == RecordType::CNAME =>
                {
                    Some(canonical(&target.0.to_ascii()))
                }
                _ => None,
            });
            match next {
                Some(n) if !chain.contains(&n) && chain.len() < 16 => chain.push(n),
                _ => break,
            }
        }
        for link in chain.iter().skip(1) {
            // Names reached through an allowed name are not subject to the default action,
            // only to rules that deny them by name.
            let (action, source) = engine.name(link);
            if action == Action::Deny && source != Source::Default {
                return Inspected::Denied(link.clone(), source);
            }
        }
        let mut addrs = Vec::new();
        let before = reply.answers.len();
        reply.answers.retain(|r: &Record| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            if !chain.contains(&canonical(&r.name.to_ascii())) {
                // An address for a name off the chain is not the answer to this question.
                return false;
            }
            if is_special(ip) {
                let (action, source) = engine.ip(ip);
                if action != Action::Allow || source == Source::Default {
                    tracing::warn!(
                        target: "audit",
                        event = "dns.refused_address",
                        name,
                        address = %ip,
                        "answer points at a link-local or metadata address; record dropped"
                    );
                    return false;
                }
            }
            addrs.push((ip, r.ttl));
            true
        });
        let changed = reply.answers.len() != before;
        Inspected::Pass {
            message: reply,
            changed,
            addrs,
        }
    }
}

fn source_str(source: Source) -> &'static str {
    match source {
        Source::AlwaysDeny => "deny.always",
        Source::AlwaysAllow => "allow.always",
        Source::Policy => "policy",
        Source::Default => "default",
    }
}

/// Serves UDP and TCP on `addr` until the process ends.
pub async fn serve(proxy: Arc<Proxy>, addr: SocketAddr) -> std::io::Result<()> {
    if !proxy.probing.swap(true, Ordering::Relaxed) {
        tokio::spawn(proxy.clone().probe());
    }
    let udp = Arc::new(UdpSocket::bind(addr).await?);
    let tcp = TcpListener::bind(addr).await?;
    tokio::spawn(serve_udp(proxy.clone(), udp));
    tokio::spawn(serve_tcp(proxy, tcp));
    Ok(())
}

async fn serve_udp(proxy: Arc<Proxy>, socket: Arc<UdpSocket>) {
    let permits = Arc::new(Semaphore::new(UDP_INFLIGHT));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
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

async fn serve_tcp(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _ = tcp_connection(proxy, stream).await;
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
