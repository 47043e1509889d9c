//! The lean path: plain HTTP/1.1 requests proxied in the connection's own task with one read
//! and one write each way, no header map, no per-request task or timer, and upstream
//! connections kept in one pool per process.
//!
//! A request takes this path when it is a complete HTTP/1.1 header with an origin-form target,
//! no `Transfer-Encoding`, `Upgrade` or `Expect`, at most one `Content-Length` of at most
//! [`MAX_BODY`] bytes, and the gateway admits it as it is (routable sandbox, good credentials,
//! open port). Anything else (health endpoints, refusals, upgrades, chunked or large uploads,
//! HTTP/1.0, malformed or oversized headers, a header deadline passed) is put back on the
//! connection unread and the connection is handed to the full Pingora path for the rest of
//! its life, so every refusal is written and counted by one piece of code.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, EXPECT, HOST, HeaderName, TRANSFER_ENCODING,
    UPGRADE,
};
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::{GetSocketDigest, Ssl};
use pingora::server::ShutdownWatch;
use sandbox_api::names;
use sandbox_api::net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::DeadlineStream;
use crate::error::GatewayError;
use crate::grpc;
use crate::metrics::metrics;
use crate::proxy::{
    AccessRecord, Admitted, Gateway, MAX_CONNECTION_FIELDS, RequestView, access_log, forwarded_for,
    hop_by_hop,
};

/// Header fields parsed per message; a request with more goes to the full path.
const MAX_HEADERS: usize = 96;
/// Largest request body the lean path buffers (so a request can be sent again on a fresh
/// connection when a kept-alive one turns out closed).
pub const MAX_BODY: usize = 64 * 1024;
/// Header fields parsed per response (a sandbox's answer with more is refused as 502).
const MAX_RESPONSE_FIELDS: usize = 256;
/// Largest upstream response header.
const MAX_RESPONSE_HEADER: usize = 64 * 1024;
/// Idle upstream connections kept per address and in all.
const POOL_PER_ADDRESS: usize = 64;
const POOL_TOTAL: usize = 4096;
/// How often expired idle connections are swept out of the pool.
const POOL_SWEEP: Duration = Duration::from_secs(1);

/// How a connection left the lean path.
pub enum Served {
    /// Finished: the connection is closed.
    Closed,
    /// Its unread bytes are put back; the full path serves it from here on.
    HandOver,
}

/// What comes after one request.
enum Next {
    /// The header is not complete yet.
    Partial,
    KeepAlive,
    Close,
    HandOver,
}

pub struct Lean {
    gateway: Arc<Gateway>,
    pool: Pool,
}

/// Per-connection buffers, reused by every request on it.
#[derive(Default)]
struct Buffers {
    /// The request as sent upstream.
    out: Vec<u8>,
    /// The upstream response as read.
    resp: Vec<u8>,
    /// The response header and body as sent downstream.
    reply: Vec<u8>,
    /// Body bytes read from the sandbox after the first read.
    scratch: Vec<u8>,
}

impl Lean {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        let pool = Pool::new(gateway.limits.idle_timeout);
        Self { gateway, pool }
    }

    /// Serves requests on a downstream connection until it closes or needs the full path.
    pub async fn serve(&self, down: &mut DeadlineStream, shutdown: &ShutdownWatch) -> Served {
        let peer = down
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .map(net::canonical);
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut bufs = Buffers::default();
        let limit = self.gateway.limits.max_header_bytes;
        loop {
            if !buf.is_empty() {
                let closing = *shutdown.borrow();
                match self
                    .exchange(down, &mut buf, peer, closing, &mut bufs)
                    .await
                {
                    Next::Partial if buf.len() <= limit => {}
                    Next::Partial | Next::HandOver => return hand_over(down, buf),
                    Next::KeepAlive if !*shutdown.borrow() => {
                        down.request_done();
                        continue;
                    }
                    Next::KeepAlive | Next::Close => return Served::Closed,
                }
            }
            buf.reserve(4096);
            match down.read_buf(&mut buf).await {
                Ok(0) if buf.is_empty() => return Served::Closed,
                Ok(0) | Err(_) => return hand_over(down, buf),
                Ok(_) => {}
            }
        }
    }

    /// The request at the start of `buf`: proxied, or left whole in `buf` for the full path
    /// (or for more bytes when its header is incomplete). The bytes it used are removed.
    async fn exchange(
        &self,
        down: &mut DeadlineStream,
        buf: &mut Vec<u8>,
        peer: Option<IpAddr>,
        closing: bool,
        bufs: &mut Buffers,
    ) -> Next {
        let start = Instant::now();
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut fields);
        let head = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Next::Partial,
            Err(_) => return Next::HandOver,
        };
        let Some(req) = Plain::of(&parsed) else {
            return Next::HandOver;
        };
        let Some(admitted) = self.gateway.admit_plain(&req, peer, head) else {
            return Next::HandOver;
        };
        let _in_flight = self.gateway.drain.enter();
        // A gateway shutting down answers with `Connection: close`.
        let keepalive = !req.close && !closing;

        // The body, whole: what came with the header, then the rest from the socket.
        let have = buf.len().saturating_sub(head).min(req.length);
        let mut body = Vec::new();
        let body: &[u8] = if have == req.length {
            buf.get(head..head + have).unwrap_or_default()
        } else {
            body.extend_from_slice(buf.get(head..head + have).unwrap_or_default());
            if read_exact_into(down, &mut body, req.length).await.is_err() {
                return Next::Close;
            }
            &body
        };

        let mut outcome = Outcome {
            status: 0,
            sent: 0,
            target: None,
            error: None,
        };
        let next = self
            .proxy(down, &req, body, &admitted, keepalive, bufs, &mut outcome)
            .await;
        let elapsed = self.gateway.count(outcome.status, start);
        if tracing::enabled!(target: "access", tracing::Level::INFO) {
            access_log(&AccessRecord {
                sandbox: Some(&admitted.entry),
                log: &admitted.log,
                method: req.method,
                path: req.path,
                status: outcome.status,
                elapsed,
                bytes_sent: outcome.sent,
                bytes_received: req.length,
                client: admitted.client,
                upstream: outcome.target,
                error: outcome.error,
            });
        }
        buf.drain(..(head + have).min(buf.len()));
        next
    }

    /// Sends the request to one of the sandbox's endpoints and relays the answer.
    #[allow(clippy::too_many_arguments)]
    async fn proxy(
        &self,
        down: &mut DeadlineStream,
        req: &Plain<'_>,
        body: &[u8],
        admitted: &Admitted,
        keepalive: bool,
        bufs: &mut Buffers,
        outcome: &mut Outcome,
    ) -> Next {
        let limits = &self.gateway.limits;
        let endpoints = admitted.entry.endpoints().len();
        let mut tries = 0;
        let tls = down.get_ssl().is_some();
        let (mut up, target, head) = loop {
            let Some(ip) = admitted.entry.pick() else {
                return self.fail(down, outcome, "other").await;
            };
            let target = SocketAddr::new(ip, admitted.port);
            outcome.target = Some(target);
            tries += 1;
            bufs.out.clear();
            write_request(&mut bufs.out, req, admitted, target, tls);
            bufs.out.extend_from_slice(body);
            // A kept-alive connection may have been closed by the sandbox meanwhile: then the
            // request goes once more on a fresh one.
            let mut pooled = self.pool.take(target);
            let result = loop {
                let reused = pooled.is_some();
                let mut up = match pooled.take() {
                    Some(up) => up,
                    None => match connect(target, limits.connect_timeout).await {
                        Ok(up) => up,
                        Err(kind) => break Err(kind),
                    },
                };
                bufs.reply.clear();
                match send_and_read_head(&mut up, &bufs.out, &mut bufs.resp, &mut bufs.reply).await
                {
                    Ok(head) => break Ok((up, head)),
                    Err(Failure {
                        kind,
                        before_response,
                    }) => {
                        if reused && before_response {
                            continue;
                        }
                        break Err(kind);
                    }
                }
            };
            match result {
                Ok((up, head)) => break (up, target, head),
                Err(kind) => {
                    metrics().upstream_errors.with_label_values(&[kind]).inc();
                    // Another endpoint may still answer, if nothing was answered yet.
                    if tries < endpoints && kind.starts_with("connect") {
                        continue;
                    }
                    return self.fail(down, outcome, kind).await;
                }
            }
        };

        let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_FIELDS];
        let mut resp = httparse::Response::new(&mut fields);
        let parsed = resp.parse(bufs.resp.get(..head).unwrap_or_default());
        let (status, framing, upstream_keepalive) = match parsed {
            Ok(httparse::Status::Complete(_)) => match response_framing(&resp, req.head) {
                Some(f) => f,
                None => return self.fail_protocol(down, outcome).await,
            },
            _ => return self.fail_protocol(down, outcome).await,
        };
        outcome.status = status;
        let chunk_out = matches!(framing, Framing::Close) && keepalive;
        write_response_head(&mut bufs.reply, &resp, &framing, chunk_out, keepalive);
        let first = bufs.resp.get(head..).unwrap_or_default();
        let relay = relay_body(
            &mut up,
            down,
            framing,
            chunk_out,
            first,
            &mut bufs.reply,
            &mut bufs.scratch,
        )
        .await;
        match relay {
            Ok(Relayed { sent, reusable }) => {
                outcome.sent = sent;
                if reusable && upstream_keepalive {
                    self.pool.put(target, up);
                }
                if keepalive {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            Err((sent, failure)) => {
                outcome.sent = sent;
                if let Some(kind) = failure {
                    metrics().upstream_errors.with_label_values(&[kind]).inc();
                    outcome.error = Some(kind);
                } else {
                    outcome.error = Some("downstream");
                }
                Next::Close
            }
        }
    }

    /// Answers 502 for an upstream failure and closes the connection.
    async fn fail(
        &self,
        down: &mut DeadlineStream,
        outcome: &mut Outcome,
        kind: &'static str,
    ) -> Next {
        let e = GatewayError::Upstream(kind);
        outcome.status = e.status();
        outcome.error = Some(kind);
        let _ = down.write_all(&error_response(&e)).await;
        let _ = down.flush().await;
        Next::Close
    }

    async fn fail_protocol(&self, down: &mut DeadlineStream, outcome: &mut Outcome) -> Next {
        metrics()
            .upstream_errors
            .with_label_values(&["protocol"])
            .inc();
        self.fail(down, outcome, "protocol").await
    }
}

fn hand_over(down: &mut DeadlineStream, buf: Vec<u8>) -> Served {
    down.rewind(buf);
    Served::HandOver
}

/// What the access log and the metrics learn of a proxied request.
struct Outcome {
    status: u16,
    sent: usize,
    target: Option<SocketAddr>,
    error: Option<&'static str>,
}

/// A request the lean path can carry: its parts, borrowed from the header as read.
struct Plain<'a> {
    method: &'a str,
    /// The request target as sent: path and query.
    target: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    fields: &'a [httparse::Header<'a>],
    /// The body's length.
    length: usize,
    /// `Connection: close` was asked for.
    close: bool,
    /// A HEAD request (the response has no body).
    head: bool,
}

impl<'a> Plain<'a> {
    fn of(req: &'a httparse::Request<'_, 'a>) -> Option<Self> {
        let (method, target) = (req.method?, req.path?);
        if req.version != Some(1)
            || method == "CONNECT"
            || !target.starts_with('/')
            || !target
                .bytes()
                .all(|b| (0x21..0x7f).contains(&b) && b != b'#')
        {
            return None;
        }
        let mut length = None;
        let mut close = false;
        let mut connection_fields = 0;
        for field in req.headers.iter() {
            let name = field.name;
            if name.eq_ignore_ascii_case(TRANSFER_ENCODING.as_str())
                || name.eq_ignore_ascii_case(UPGRADE.as_str())
                || name.eq_ignore_ascii_case(EXPECT.as_str())
            {
                return None;
            }
            // gRPC goes to the sandbox over HTTP/2, which only the full path speaks.
            if name.eq_ignore_ascii_case(CONTENT_TYPE.as_str()) && grpc::is_grpc(field.value) {
                return None;
            }
            if name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str()) {
                let value = field.value;
                if length.is_some()
                    || value.is_empty()
                    || value.len() > 6
                    || !value.iter().all(u8::is_ascii_digit)
                {
                    return None;
                }
                let n: usize = std::str::from_utf8(value).ok()?.parse().ok()?;
                length = Some(n);
            } else if name.eq_ignore_ascii_case(CONNECTION.as_str()) {
                // Every field it names must be dropped; `hop_by_hop` holds this many.
                connection_fields += 1;
                if connection_fields > MAX_CONNECTION_FIELDS {
                    return None;
                }
                close |= field
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
        }
        let length = length.unwrap_or(0);
        if length > MAX_BODY {
            return None;
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Some(Self {
            method,
            target,
            path,
            query,
            fields: req.headers,
            length,
            close,
            head: method == "HEAD",
        })
    }
}

impl RequestView for Plain<'_> {
    fn path(&self) -> &str {
        self.path
    }
    fn query(&self) -> Option<&str> {
        self.query
    }
    fn uri_host(&self) -> Option<&str> {
        None
    }
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str();
        self.fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }
    fn header_values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> {
        self.fields
            .iter()
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }
}

/// Header fields the gateway sets or removes itself, whatever the client sent.
const REPLACED: [&str; 7] = [
    "host",
    names::HEADER_INGRESS_TO,
    names::HEADER_INGRESS_LEGACY,
    names::HEADER_SECURE_ACCESS,
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-for",
];

/// The request line and header as the sandbox sees them (the same fields the full path
/// sends): hop-by-hop fields dropped, the routing and credential fields removed, `Host` the
/// sandbox's own address, `X-Forwarded-*` set.
fn write_request(
    out: &mut Vec<u8>,
    req: &Plain<'_>,
    admitted: &Admitted,
    target: SocketAddr,
    tls: bool,
) {
    use std::io::Write;
    let dropped = hop_by_hop(
        req.header_values(CONNECTION.as_str())
            .filter_map(crate::proxy::visible),
    );
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    match &admitted.rewrite {
        Some(uri) => out.extend_from_slice(
            uri.path_and_query()
                .map_or("/", |pq| pq.as_str())
                .as_bytes(),
        ),
        None => out.extend_from_slice(req.target.as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = None;
    for field in req.fields {
        let name = field.name;
        if name.eq_ignore_ascii_case(HOST.as_str()) && host.is_none() {
            host = Some(field.value);
        }
        if REPLACED.iter().any(|r| name.eq_ignore_ascii_case(r)) || dropped.drops(name) {
            continue;
        }
        field_line(out, name.as_bytes(), field.value);
    }
    let _ = write!(out, "Host: {target}\r\n");
    if let Some(host) = host {
        field_line(out, b"X-Forwarded-Host", host);
    }
    out.extend_from_slice(if tls {
        b"X-Forwarded-Proto: https\r\n"
    } else {
        b"X-Forwarded-Proto: http\r\n"
    });
    match (&admitted.forwarded, admitted.client) {
        (Some(chain), _) => field_line(out, b"X-Forwarded-For", chain.as_bytes()),
        (None, Some(client)) => {
            let prior = req
                .header_values("x-forwarded-for")
                .filter_map(crate::proxy::visible);
            field_line(
                out,
                b"X-Forwarded-For",
                forwarded_for(prior, client).as_bytes(),
            );
        }
        (None, None) => {}
    }
    out.extend_from_slice(b"\r\n");
}

fn field_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How an upstream response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Read until the sandbox closes.
    Close,
}

/// The status, the body's framing and whether the sandbox keeps the connection open; `None`
/// for a response no proxy should pass on (conflicting lengths, an unknown coding, an
/// interim or upgrade response nobody asked for).
fn response_framing(resp: &httparse::Response<'_, '_>, head: bool) -> Option<(u16, Framing, bool)> {
    let status = resp.code?;
    if (100..200).contains(&status) {
        return None;
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut keepalive = resp.version == Some(1);
    for field in resp.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case(TRANSFER_ENCODING.as_str()) {
            // Only `chunked` alone: relaying another coding would need it named to the client
            // in a field this path rewrites.
            if !field.value.trim_ascii().eq_ignore_ascii_case(b"chunked") || chunked {
                return None;
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str()) {
            let value = field.value.trim_ascii();
            if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let n: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(CONNECTION.as_str()) {
            for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    keepalive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                    keepalive = true;
                }
            }
        }
    }
    let framing = if head || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keepalive = false;
        Framing::Close
    };
    Some((status, framing, keepalive))
}

/// The response header the client sees: the sandbox's fields less the hop-by-hop ones, the
/// framing, `X-Powered-By`-style marker, `Date` and `Connection` as the full path writes them.
fn write_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    framing: &Framing,
    chunk_out: bool,
    keepalive: bool,
) {
    use std::io::Write;
    let status = resp.code.unwrap_or(502);
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", resp.reason.unwrap_or(""));
    let connection = resp
        .headers
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case(CONNECTION.as_str()))
        .filter_map(|f| crate::proxy::visible(f.value));
    let dropped = hop_by_hop(connection);
    for field in resp.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case(TRANSFER_ENCODING.as_str())
            || name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str())
            || name.eq_ignore_ascii_case(DATE.as_str())
            || name.eq_ignore_ascii_case(names::HEADER_POWERED_BY)
            || dropped.drops(name)
        {
            continue;
        }
        field_line(out, name.as_bytes(), field.value);
    }
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Close if chunk_out => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::Close | Framing::None => {
            // A HEAD or 204/304 answer keeps the sandbox's Content-Length, which describes the
            // body it would have sent.
            if let Some(f) = resp
                .headers
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str()))
                && *framing == Framing::None
            {
                field_line(out, b"Content-Length", f.value);
            }
        }
    }
    field_line(
        out,
        names::HEADER_POWERED_BY.as_bytes(),
        names::POWERED_BY_VALUE.as_bytes(),
    );
    field_line(out, b"Date", get_cached_date().as_bytes());
    out.extend_from_slice(if keepalive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
}

/// An upstream failure: its metric label, and whether nothing of the response had arrived.
struct Failure {
    kind: &'static str,
    before_response: bool,
}

async fn connect(target: SocketAddr, timeout: Duration) -> Result<TcpStream, &'static str> {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Err(_) => Err("connect_timeout"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err("connect_refused"),
        Ok(Err(_)) => Err("connect_error"),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Writes the request and reads until the final response header is complete; returns its
/// length (the bytes after it in `resp` are the body's first). Interim responses to pass on
/// are appended to `interim_out`.
async fn send_and_read_head(
    up: &mut TcpStream,
    request: &[u8],
    resp: &mut Vec<u8>,
    interim_out: &mut Vec<u8>,
) -> Result<usize, Failure> {
    let fail = |kind, before_response| Failure {
        kind,
        before_response,
    };
    up.write_all(request)
        .await
        .map_err(|_| fail("write_error", true))?;
    resp.clear();
    // An interim response was read: the sandbox has answered, so nothing is sent again.
    let mut interim = false;
    let mut need_read = true;
    loop {
        if need_read {
            resp.reserve(4096);
            let before_response = !interim && resp.is_empty();
            match up.read_buf(resp).await {
                Ok(0) => return Err(fail("closed", before_response)),
                Ok(_) => {}
                Err(_) => return Err(fail("read_error", before_response)),
            }
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_FIELDS];
        let mut head = httparse::Response::new(&mut fields);
        match head.parse(resp) {
            // An interim response is passed on as it came (103 Early Hints), except
            // 100 Continue: the lean path sends no `Expect`. The final response follows.
            Ok(httparse::Status::Complete(n))
                if head
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                if head.code != Some(100) {
                    interim_out.extend_from_slice(resp.get(..n).unwrap_or_default());
                }
                resp.drain(..n);
                interim = true;
                need_read = resp.is_empty();
            }
            Ok(httparse::Status::Complete(n)) => return Ok(n),
            Ok(httparse::Status::Partial) if resp.len() < MAX_RESPONSE_HEADER => need_read = true,
            _ => return Err(fail("protocol", false)),
        }
    }
}

async fn read_exact_into(
    down: &mut DeadlineStream,
    body: &mut Vec<u8>,
    length: usize,
) -> std::io::Result<()> {
    while body.len() < length {
        let at = body.len();
        body.resize(length, 0);
        let n = down.read(body.get_mut(at..).unwrap_or_default()).await;
        match n {
            Ok(0) => {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(n) => body.truncate(at + n),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Relayed {
    /// Body bytes written to the client.
    sent: usize,
    /// The upstream connection ended its response cleanly and may serve another.
    reusable: bool,
}

/// Relays the response body after writing `reply` (the header) with its first bytes. Errors
/// carry the bytes sent and the upstream failure's label (`None`: the client went away).
async fn relay_body(
    up: &mut TcpStream,
    down: &mut DeadlineStream,
    framing: Framing,
    chunk_out: bool,
    first: &[u8],
    reply: &mut Vec<u8>,
    read: &mut Vec<u8>,
) -> Result<Relayed, (usize, Option<&'static str>)> {
    let mut sent = 0usize;
    let mut body = Body {
        framing,
        chunk_out,
        remaining: framing_len(framing),
        chunks: ChunkScan::default(),
        overrun: false,
    };
    let mut done = body
        .take(first, reply, &mut sent)
        .map_err(|()| (0, Some("protocol")))?;
    loop {
        if !reply.is_empty() {
            // The client's stream buffers writes: each piece goes out now (event streams).
            down.write_all(reply).await.map_err(|_| (sent, None))?;
            down.flush().await.map_err(|_| (sent, None))?;
            reply.clear();
        }
        if done {
            return Ok(Relayed {
                sent,
                // Bytes past the body's end leave the connection's state unknown.
                reusable: !body.overrun && framing != Framing::Close,
            });
        }
        if read.is_empty() {
            read.resize(16 * 1024, 0);
        }
        let n = up.read(read).await;
        match n {
            Ok(0) if framing == Framing::Close => {
                if chunk_out {
                    reply.extend_from_slice(b"0\r\n\r\n");
                }
                done = true;
            }
            Ok(0) => return Err((sent, Some("closed"))),
            Ok(n) => {
                let data = read.get(..n).unwrap_or_default();
                done = body
                    .take(data, reply, &mut sent)
                    .map_err(|()| (sent, Some("protocol")))?;
            }
            Err(_) => return Err((sent, Some("read_error"))),
        }
    }
}

/// Where a response body is in its framing.
struct Body {
    framing: Framing,
    /// Close-delimited bodies are sent to a kept-alive client chunked.
    chunk_out: bool,
    remaining: u64,
    chunks: ChunkScan,
    /// The sandbox sent bytes past the body's end.
    overrun: bool,
}

impl Body {
    /// Appends what of `data` belongs to the body to `reply`; true when the body is complete.
    /// Bytes past the end are dropped and noted in `overrun`.
    fn take(&mut self, data: &[u8], reply: &mut Vec<u8>, sent: &mut usize) -> Result<bool, ()> {
        let (n, done) = match self.framing {
            Framing::None => (0, true),
            Framing::Length(_) => {
                let n = data
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                (n, self.remaining == 0)
            }
            Framing::Chunked => match self.chunks.feed(data)? {
                Some(end) => (end, true),
                None => (data.len(), false),
            },
            Framing::Close => {
                if !data.is_empty() {
                    if self.chunk_out {
                        use std::io::Write;
                        let _ = write!(reply, "{:x}\r\n", data.len());
                        reply.extend_from_slice(data);
                        reply.extend_from_slice(b"\r\n");
                    } else {
                        reply.extend_from_slice(data);
                    }
                    *sent += data.len();
                }
                return Ok(false);
            }
        };
        reply.extend_from_slice(data.get(..n).unwrap_or_default());
        *sent += n;
        self.overrun |= n < data.len();
        Ok(done)
    }
}

fn framing_len(framing: Framing) -> u64 {
    match framing {
        Framing::Length(n) => n,
        _ => 0,
    }
}

/// Follows chunked framing over a byte stream to find where the message ends (after the last
/// chunk and any trailer fields), without changing the bytes.
#[derive(Debug, Default, Clone, Copy)]
struct ChunkScan {
    state: ChunkState,
    /// Bytes of chunk data still to pass.
    left: u64,
    /// Digits in the size line so far.
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    #[default]
    Size,
    /// After the size: extensions up to LF.
    SizeRest,
    Data,
    /// CR LF after a chunk's data.
    DataEnd,
    /// After the last chunk: the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The final CR before LF.
    FinalLf,
}

impl ChunkScan {
    /// Feeds bytes; the index just past the message's end when it ends within them.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data.get(i).copied().unwrap_or_default();
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(());
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.left = self.left * 16 + u64::from(d);
                    }
                    b'\r' | b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.state = ChunkState::SizeRest
                    }
                    b'\n' if self.digits > 0 => self.size_done(),
                    _ => return Err(()),
                },
                ChunkState::SizeRest => {
                    if b == b'\n' {
                        self.size_done();
                    }
                }
                ChunkState::Data => {
                    let n = (data.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => *self = Self::default(),
                    _ => return Err(()),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::FinalLf,
                    b'\n' => return Ok(Some(i + 1)),
                    _ => self.state = ChunkState::Trailer,
                },
                ChunkState::Trailer => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::FinalLf => {
                    if b == b'\n' {
                        return Ok(Some(i + 1));
                    }
                    return Err(());
                }
            }
            i += 1;
        }
        Ok(None)
    }

    fn size_done(&mut self) {
        self.digits = 0;
        self.state = if self.left == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }
}

/// The full path's refusal, written by the lean path for upstream failures: the same status,
/// fields and text, and the connection closed after it.
fn error_response(e: &GatewayError) -> Vec<u8> {
    use std::io::Write;
    let status = e.status();
    let body = e.body();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Length: {}\r\n",
        body.len()
    );
    field_line(&mut out, b"Date", get_cached_date().as_bytes());
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// Idle upstream connections by address, shared by the process's threads.
struct Pool {
    inner: Mutex<PoolInner>,
    /// How long a connection is kept idle (`--upstream-idle-timeout-seconds`).
    max_idle: Duration,
}

#[derive(Default)]
struct PoolInner {
    idle: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
    total: usize,
    swept: Option<Instant>,
}

impl Pool {
    fn new(max_idle: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            max_idle,
        }
    }

    /// The most recently used idle connection to `addr` that is younger than `max_idle`.
    fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let max_idle = self.max_idle;
        let mut inner = self.inner.lock().ok()?;
        let PoolInner { idle, total, .. } = &mut *inner;
        let list = idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            *total -= 1;
            if since.elapsed() < max_idle {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        if inner
            .swept
            .is_none_or(|at| now.duration_since(at) >= POOL_SWEEP)
        {
            inner.swept = Some(now);
            inner.sweep(now, self.max_idle);
        }
        if inner.total >= POOL_TOTAL {
            return;
        }
        let list = inner.idle.entry(addr).or_default();
        if list.len() >= POOL_PER_ADDRESS {
            return;
        }
        list.push((stream, now));
        inner.total += 1;
    }
}

impl PoolInner {
    /// Closes connections idle longer than `max_idle` (they would be refused at `take`) and
    /// forgets addresses with none left, such as deleted sandboxes'.
    fn sweep(&mut self, now: Instant, max_idle: Duration) {
        let mut total = 0;
        self.idle.retain(|_, list| {
            list.retain(|(_, since)| now.duration_since(*since) < max_idle);
            total += list.len();
            !list.is_empty()
        });
        self.total = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(parts: &[&[u8]]) -> Result<Option<usize>, ()> {
        let mut scan = ChunkScan::default();
        let mut offset = 0;
        for part in parts {
            if let Some(at) = scan.feed(part)? {
                return Ok(Some(offset + at));
            }
            offset += part.len();
        }
        Ok(None)
    }

    fn plain(raw: &str) -> bool {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(raw.as_bytes()).unwrap().is_complete(), "{raw}");
        Plain::of(&req).is_some()
    }

    #[test]
    fn only_plain_requests_take_the_lean_path() {
        assert!(plain("GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(plain("POST / HTTP/1.1\r\nContent-Length: 65536\r\n\r\n"));
        let connection = "Connection: keep-alive\r\n".repeat(MAX_CONNECTION_FIELDS);
        assert!(plain(&format!("GET / HTTP/1.1\r\n{connection}\r\n")));
        for other in [
            format!("GET / HTTP/1.1\r\n{connection}Connection: x-more\r\n\r\n"),
            "GET / HTTP/1.0\r\n\r\n".into(),
            "GET http://x/ HTTP/1.1\r\n\r\n".into(),
            "OPTIONS * HTTP/1.1\r\n\r\n".into(),
            "CONNECT x:443 HTTP/1.1\r\n\r\n".into(),
            "GET /\u{e9} HTTP/1.1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n".into(),
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n".into(),
        ] {
            assert!(!plain(&other), "{other:?}");
        }
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        assert_eq!(end(&[body]), Ok(Some(body.len() - 4)));
        for cut in 0..body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(end(&[a, b]), Ok(Some(body.len() - 4)), "cut at {cut}");
        }
        let trailers = b"0\r\nx-sum: 1\r\n\r\n";
        assert_eq!(end(&[trailers]), Ok(Some(trailers.len())));
        assert_eq!(end(&[b"5\r\nhel"]), Ok(None));
        assert_eq!(end(&[b"zz\r\n"]), Err(()));
        assert_eq!(end(&[b"5\r\nhelloXX"]), Err(()));
        assert_eq!(end(&[b"ffffffffffffffff\r\n"]), Err(()));
    }
}
