//! The request's life through the gateway, one Pingora phase per method: find the route and
//! check credentials (`request_filter`), pick the endpoint (`upstream_peer`), rewrite what the
//! sandbox sees (`upstream_request_filter`), mark the response (`response_filter`), turn
//! failures into responses (`fail_to_proxy`), count and log (`logging`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, PROXY_AUTHORIZATION,
    RETRY_AFTER, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use pingora::ErrorType;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use prometheus::{Histogram, IntCounter};
use sandbox_api::names;
use sandbox_api::net::{self, Cidr};
use sandbox_api::renew;
use sandbox_api::signing::SignatureError;

use crate::access::{self, KeyRing};
use crate::admin::readiness;
use crate::config::Mode;
use crate::conn;
use crate::drain::{Drain, InFlight};
use crate::error::GatewayError;
use crate::grpc;
use crate::limit::{Blocked, Budgets, FailureLimit};
use crate::metrics::{self, metrics};
use crate::ports::PortSet;
use crate::renew::Renewer;
use crate::route::{self, Route, RouteError};
use crate::table::{Entry, RouteTable, State};

// Header names built once at compile time, so the request path never parses a name.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const CONNECTION_UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");
const INGRESS_TO: HeaderName = HeaderName::from_static(names::HEADER_INGRESS_TO);
const INGRESS_LEGACY: HeaderName = HeaderName::from_static(names::HEADER_INGRESS_LEGACY);
const SECURE_ACCESS: HeaderName = HeaderName::from_static(names::HEADER_SECURE_ACCESS);
const POWERED_BY: HeaderName = HeaderName::from_static(names::HEADER_POWERED_BY);
const POWERED_BY_VALUE: HeaderValue = HeaderValue::from_static(names::POWERED_BY_VALUE);
const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
const PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const TE_TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
/// Streams one HTTP/2 connection to a sandbox carries at once; more open another connection.
const UPSTREAM_H2_STREAMS: usize = 100;
const PATH_LIVENESS: &str = "/status.ok";
const PATH_READINESS: &str = "/readyz";

/// Per-connection limits, upstream timeouts and the gateway's request policy.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Failed-credential budgets (see `limit.rs`).
    pub budgets: Budgets,
    /// Longest lifetime of a signed route, in seconds (`None`: unlimited).
    pub max_signed_route_lifetime: Option<u64>,
    /// Ports never forwarded (`--denied-ports`).
    pub denied_ports: PortSet,
    /// Peers whose `X-Forwarded-For` is believed (`--trusted-proxy-cidrs`).
    pub trusted_proxies: Vec<Cidr>,
}

pub struct Gateway {
    mode: Mode,
    table: Arc<RouteTable>,
    keys: Arc<ArcSwap<KeyRing>>,
    pub(crate) drain: Arc<Drain>,
    pub(crate) limits: Limits,
    failures: FailureLimit,
    /// Request counters by status class, resolved once so the hot path does no label lookup.
    by_class: [IntCounter; 6],
    duration: Histogram,
    /// OSEP-0009: told of every request that passed its checks, when publishing is on.
    renew: Option<Arc<Renewer>>,
}

/// A request the gateway answers itself without a route.
enum Local {
    Liveness,
    Readiness,
}

impl Gateway {
    pub fn new(
        mode: Mode,
        table: Arc<RouteTable>,
        keys: Arc<ArcSwap<KeyRing>>,
        drain: Arc<Drain>,
        limits: Limits,
    ) -> Self {
        let m = metrics();
        let class = |c| m.requests.with_label_values(&[mode.label(), c]);
        Self {
            mode,
            table,
            keys,
            drain,
            failures: FailureLimit::new(limits.budgets),
            limits,
            by_class: metrics::CLASSES.map(class),
            duration: metrics::duration_for(mode.label()),
            renew: None,
        }
    }

    /// Publishes renew intents through `renewer` for the requests this gateway admits.
    pub fn with_renewer(mut self, renewer: Option<Arc<Renewer>>) -> Self {
        self.renew = renewer;
        self
    }

    /// The route a request names, borrowed from its header.
    pub(crate) fn route<'a, R: RequestView>(&self, req: &'a R) -> Result<Route<'a>, RouteError> {
        match self.mode {
            Mode::Header => route::parse_label(route::first_label(
                routing_key(req).ok_or(RouteError::Missing)?,
            )),
            Mode::Uri => route::parse_path(req.path()),
        }
    }

    /// Decides what to do with a request: answer it locally, refuse it, or (Ok(None)) proxy it
    /// with the route, client and credentials settled in `ctx`. The route is parsed here once.
    fn admit(&self, session: &Session, ctx: &mut Ctx) -> Result<Option<Local>, GatewayError> {
        let req = session.req_header();
        let path = req.uri.path();
        if path == PATH_LIVENESS {
            return Ok(Some(Local::Liveness));
        }
        ctx.grpc = req
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| grpc::is_grpc(v.as_bytes()));
        let route = self.route(req);
        if path == PATH_READINESS && route.is_err() {
            return Ok(Some(Local::Readiness));
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| net::canonical(a.ip()));
        (ctx.client, ctx.forwarded) = self.client_of(peer, req);
        ctx.log.path_from = (self.mode == Mode::Header).then_some(0);
        if header_size(req) > self.limits.max_header_bytes {
            return Err(GatewayError::HeaderTooLarge(self.limits.max_header_bytes));
        }
        let raw = session.as_downstream().as_http1().and_then(|h1| {
            // Only requests with Transfer-Encoding need their raw header.
            h1.req_header()
                .headers
                .contains_key(TRANSFER_ENCODING)
                .then(|| h1.get_headers_raw_bytes())
        });
        framing(req, raw.as_deref()).inspect_err(|_| refused("framing"))?;
        let route = route?;
        ctx.log = LogRoute::of(&route, self.mode, path);
        if self.limits.denied_ports.contains(route.port) {
            refused("port_denied");
            return Err(GatewayError::PortDenied(route.port));
        }
        let Some(entry) = self.table.get(route.id) else {
            ctx.log.unknown = Some(route.id.into());
            return Err(GatewayError::NotFound(route.id.into()));
        };
        let checked = self.check_entry(req, &route, &entry, ctx.client, true);
        // Kept even when refused: the access log names the sandbox from it.
        ctx.entry = Some(entry);
        ctx.rewrite = checked?;
        ctx.port = route.port;
        // gRPC needs HTTP/2 end to end (trailers); an h2c port gets HTTP/2 whatever the client spoke.
        ctx.h2c = ctx.grpc
            || ctx
                .entry
                .as_deref()
                .is_some_and(|e| e.speaks_h2c(route.port));
        Ok(None)
    }

    /// The lean path's admission: `Some` when the request goes to a sandbox as it is; `None`
    /// for anything the full path answers (health endpoints, every refusal), which then sees
    /// the request afresh. Nothing is counted here, so a refusal is counted once, there.
    pub(crate) fn admit_plain<R: RequestView>(
        &self,
        req: &R,
        peer: Option<IpAddr>,
        header_bytes: usize,
    ) -> Option<Admitted> {
        let path = req.path();
        if path == PATH_LIVENESS || header_bytes > self.limits.max_header_bytes {
            return None;
        }
        let route = self.route(req).ok()?;
        if self.limits.denied_ports.contains(route.port) {
            return None;
        }
        let entry = self.table.get(route.id)?;
        if entry.speaks_h2c(route.port) {
            return None;
        }
        let (client, forwarded) = self.client_of(peer, req);
        let rewrite = self.check_entry(req, &route, &entry, client, false).ok()?;
        Some(Admitted {
            log: LogRoute::of(&route, self.mode, path),
            port: route.port,
            entry,
            rewrite,
            client,
            forwarded,
        })
    }

    /// Whether a request may go to a sandbox in the table: routable, credentials, exposed port.
    /// Returns the path to send in URI mode.
    /// `count`: failed credentials count against the client's and the sandbox's budgets (the
    /// lean path asks without counting and hands a refusal over to the full path).
    pub(crate) fn check_entry<R: RequestView>(
        &self,
        req: &R,
        route: &Route<'_>,
        entry: &Entry,
        client: Option<IpAddr>,
        count: bool,
    ) -> Result<Option<http::Uri>, GatewayError> {
        match &entry.state {
            State::One(_) | State::Many(_) => {}
            State::Unavailable(reason) => {
                return Err(GatewayError::Unavailable(reason.to_string()));
            }
            State::Ambiguous(found) => {
                return Err(GatewayError::Ambiguous {
                    id: route.id.into(),
                    found: found.to_string(),
                });
            }
        }
        if let Some(token) = entry.token.as_deref() {
            self.check_credentials(req, token, route, client, count)?;
        }
        // After the credentials, so an unauthenticated client learns nothing of the doors.
        if let Some(ports) = &entry.ports
            && !ports.contains(route.port)
        {
            if count {
                refused("port_not_exposed");
            }
            return Err(GatewayError::PortNotExposed(route.port));
        }
        if self.mode != Mode::Uri {
            if let Some(renew) = &self.renew {
                renew.observe(route.id, route.port, b"");
            }
            return Ok(None);
        }
        // Signed segments are the gateway's own only for secure sandboxes; otherwise they are
        // part of the sandbox's path.
        let rest = if entry.token.is_some() && route.signed.is_some() {
            route.rest_after_signature
        } else {
            route.rest
        };
        let rewritten = rewrite_path(rest, req.query())?;
        if let Some(renew) = &self.renew {
            // The path as the reference reports it: decoded, without the query.
            renew.observe(route.id, route.port, &renew::decode_path(rewritten.path()));
        }
        Ok(Some(rewritten))
    }

    /// The secure-access header or a signed route, under the failed-credential limiter.
    fn check_credentials<R: RequestView>(
        &self,
        req: &R,
        token: &str,
        route: &Route<'_>,
        client: Option<IpAddr>,
        count: bool,
    ) -> Result<(), GatewayError> {
        let header = req.header(&SECURE_ACCESS);
        // Only a signature can be guessed; the 192-bit header token cannot.
        let signature = header.is_none() && route.signed.is_some();
        if let Some(blocked) = self.failures.blocked(client, route.id, signature) {
            if !count {
                return Err(GatewayError::TooManyFailures(blocked));
            }
            metrics()
                .auth_failures
                .with_label_values(&[blocked.reason()])
                .inc();
            return Err(match blocked {
                Blocked::Client { .. } => GatewayError::TooManyFailures(blocked),
                Blocked::Sandbox { .. } => GatewayError::TooManySignatureFailures(blocked),
            });
        }
        access::check(
            token,
            header,
            route,
            &self.keys.load(),
            unix_now(),
            self.limits.max_signed_route_lifetime,
        )
        .map_err(|denied| {
            if !count {
                return GatewayError::Denied(denied);
            }
            let m = metrics();
            // Without keys nothing was guessed: the gateway is at fault, not the client.
            if !matches!(denied, access::Denied::Signature(SignatureError::NoKeys)) {
                let evicted = self.failures.failed(client, route.id, signature);
                if evicted > 0 {
                    m.auth_limiter_evictions.inc_by(evicted);
                }
                m.auth_limiter_clients
                    .set(i64::try_from(self.failures.clients()).unwrap_or(i64::MAX));
            }
            m.auth_failures.with_label_values(&[denied.reason()]).inc();
            GatewayError::Denied(denied)
        })
    }

    /// The client's address: the connection's peer (the PROXY protocol's source when that is
    /// on), or, when the peer is a trusted proxy, the last untrusted address it forwarded; and
    /// then the `X-Forwarded-For` chain to send.
    pub(crate) fn client_of<R: RequestView>(
        &self,
        peer: Option<IpAddr>,
        req: &R,
    ) -> (Option<IpAddr>, Option<String>) {
        match peer {
            Some(peer) if !self.limits.trusted_proxies.is_empty() => {
                let prior = req.header_values("x-forwarded-for").filter_map(visible);
                let (client, forwarded) = trusted_chain(prior, peer, &self.limits.trusted_proxies);
                (Some(client), Some(forwarded))
            }
            _ => (peer, None),
        }
    }

    /// Writes a refusal; the connection is closed after it. A gRPC client gets it as a gRPC
    /// status.
    async fn refuse(&self, session: &mut Session, ctx: &Ctx, e: &GatewayError) {
        if ctx.grpc {
            self.respond_grpc(session, e).await;
        } else {
            self.respond(session, e.status(), e.body(), false, e.retry_after())
                .await;
        }
    }

    /// A refusal as gRPC's trailers-only response: HTTP 200 whose one header block ends the
    /// stream and carries `grpc-status` and `grpc-message`.
    async fn respond_grpc(&self, session: &mut Session, e: &GatewayError) {
        let result = async {
            let mut resp = ResponseHeader::build(200, Some(5))?;
            resp.insert_header(CONTENT_TYPE, GRPC_CONTENT_TYPE)?;
            resp.insert_header(GRPC_STATUS, u16::from(grpc::code_of(e) as u8))?;
            resp.insert_header(GRPC_MESSAGE, grpc::encode_message(&e.to_string()))?;
            resp.insert_header(CONTENT_LENGTH, 0)?;
            if let Some(secs) = e.retry_after() {
                resp.insert_header(RETRY_AFTER, secs)?;
            }
            session.set_keepalive(None);
            session.write_response_header(Box::new(resp), true).await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not write response");
        }
    }

    async fn respond(
        &self,
        session: &mut Session,
        status: u16,
        body: String,
        keepalive: bool,
        retry_after: Option<u64>,
    ) {
        let result = async {
            let mut resp = ResponseHeader::build(status, Some(4))?;
            resp.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")?;
            resp.insert_header(X_CONTENT_TYPE_OPTIONS, "nosniff")?;
            resp.insert_header(CONTENT_LENGTH, body.len())?;
            if let Some(secs) = retry_after {
                resp.insert_header(RETRY_AFTER, secs)?;
            }
            if keepalive {
                session.write_response_header(Box::new(resp), false).await?;
                session
                    .write_response_body(Some(Bytes::from(body)), true)
                    .await
            } else {
                session
                    .as_downstream_mut()
                    .write_error_response(resp, Bytes::from(body))
                    .await
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not write response");
        }
    }

    fn endpoints_left(&self, ctx: &Ctx) -> bool {
        ctx.entry
            .as_deref()
            .is_some_and(|e| ctx.tries < e.endpoints().len())
    }
}

/// The routing key in header mode: the routing header, its deprecated twin, then Host.
fn routing_key<R: RequestView>(req: &R) -> Option<&str> {
    [&INGRESS_TO, &INGRESS_LEGACY, &HOST]
        .into_iter()
        .filter_map(|name| req.header(name))
        .filter_map(visible)
        .find(|v| !v.trim().is_empty())
        .or_else(|| req.uri_host())
}

/// A header value as text when it is visible ASCII (what `HeaderValue::to_str` accepts).
pub(crate) fn visible(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// What the routing and credential checks read of a request: Pingora's parsed header on the
/// full path, the raw header fields on the lean path.
pub(crate) trait RequestView {
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    /// The host of an absolute-form request target.
    fn uri_host(&self) -> Option<&str>;
    /// The first value of a header field.
    fn header(&self, name: &HeaderName) -> Option<&[u8]>;
    /// Every value of a header field, in order.
    fn header_values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]>;
}

impl RequestView for RequestHeader {
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
    fn uri_host(&self) -> Option<&str> {
        self.uri.host()
    }
    fn header(&self, name: &HeaderName) -> Option<&[u8]> {
        self.headers.get(name).map(HeaderValue::as_bytes)
    }
    fn header_values<'a>(&'a self, name: &'static str) -> impl Iterator<Item = &'a [u8]> {
        self.headers.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// Bytes of the request line and header fields as they were sent.
fn header_size(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.to_string_len_hint() + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

trait UriLen {
    fn to_string_len_hint(&self) -> usize;
}

impl UriLen for http::Uri {
    fn to_string_len_hint(&self) -> usize {
        self.path_and_query().map_or(1, |pq| pq.as_str().len())
            + self.authority().map_or(0, |a| a.as_str().len())
    }
}

fn rewrite_path(rest: &str, query: Option<&str>) -> Result<http::Uri, RouteError> {
    let path = if rest.is_empty() { "/" } else { rest };
    let uri = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    uri.parse().map_err(|_| RouteError::MalformedPath)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `X-Forwarded-For` with the client appended to what earlier proxies recorded (every prior
/// field, in order), as the reference does.
pub(crate) fn forwarded_for<'a>(prior: impl Iterator<Item = &'a str>, client: IpAddr) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(48);
    for value in prior.map(str::trim) {
        if !value.is_empty() {
            out.push_str(value);
            out.push_str(", ");
        }
    }
    let _ = write!(out, "{client}");
    out
}

/// Most `X-Forwarded-For` entries walked: a chain longer than any real proxy path is a client's.
const MAX_FORWARDED_HOPS: usize = 32;

/// With a trusted `peer`: walks the forwarded chain from the right past trusted proxies; the first
/// untrusted address is the client (the leftmost when all are trusted; the last good one when an
/// entry does not parse). Returns the client and the chain to forward: from the client on, then
/// the peer, so the sandbox never sees addresses nobody vouched for. An untrusted peer is the
/// client and its own claims are dropped.
fn trusted_chain<'a>(
    prior: impl Iterator<Item = &'a str>,
    peer: IpAddr,
    trusted: &[Cidr],
) -> (IpAddr, String) {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return (peer, peer.to_string());
    }
    let entries: Vec<&str> = prior
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut chain = vec![peer];
    for entry in entries.iter().rev().take(MAX_FORWARDED_HOPS) {
        let Some(ip) = forwarded_ip(entry) else {
            break;
        };
        chain.push(ip);
        if !is_trusted(ip) {
            break;
        }
    }
    let client = chain.last().copied().unwrap_or(peer);
    let forwarded = chain
        .iter()
        .rev()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    (client, forwarded)
}

/// One `X-Forwarded-For` entry: an address, optionally bracketed (IPv6) or with a port.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())?;
    Some(net::canonical(ip))
}

/// Refuses framing two parsers could read differently (request smuggling): Content-Length with
/// Transfer-Encoding, a Transfer-Encoding other than one `chunked`, Content-Lengths that differ
/// or are not plain digits. Pingora drops a Content-Length that comes with Transfer-Encoding
/// before the gateway sees the header, so `raw` (the header as sent) is read for it.
fn framing(req: &RequestHeader, raw: Option<&[u8]>) -> Result<(), GatewayError> {
    let te = req.headers.get_all(TRANSFER_ENCODING);
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    if te.iter().next().is_some() {
        if first_length.is_some() || raw.is_some_and(names_content_length) {
            return Err(GatewayError::Framing(
                "Content-Length together with Transfer-Encoding",
            ));
        }
        let codings: Vec<&[u8]> = te
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        if !matches!(codings.as_slice(), [only] if only.eq_ignore_ascii_case(b"chunked")) {
            return Err(GatewayError::Framing(
                "Transfer-Encoding other than a single chunked",
            ));
        }
    }
    if let Some(first) = first_length {
        let expected = first
            .as_bytes()
            .split(|&b| b == b',')
            .next()
            .map(<[u8]>::trim_ascii);
        let all_same = std::iter::once(first)
            .chain(lengths)
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .all(|l| Some(l) == expected && !l.is_empty() && l.iter().all(u8::is_ascii_digit));
        if !all_same {
            return Err(GatewayError::Framing("conflicting Content-Length"));
        }
    }
    Ok(())
}

/// Whether a raw request header has a Content-Length field (names are matched without case;
/// the request line is skipped).
fn names_content_length(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"content-length:";
    raw.split(|&b| b == b'\n').skip(1).any(|line| {
        line.get(..NAME.len())
            .is_some_and(|n| n.eq_ignore_ascii_case(NAME))
    })
}

/// Headers that mean something only on one connection are not forwarded: `Connection` and the
/// headers it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Proxy-Authorization`.
/// A WebSocket upgrade keeps `Upgrade` with `Connection: upgrade`. Framing headers and `Host`
/// are never removed on a client's say-so. Requests and responses alike.
fn strip_hop_by_hop<M: Message>(message: &mut M) {
    let mut upgrade = false;
    let mut named: Vec<HeaderName> = Vec::new();
    for value in message.fields().get_all(CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                && ![CONTENT_LENGTH, TRANSFER_ENCODING, HOST].contains(&name)
            {
                named.push(name);
            }
        }
    }
    for name in named.iter().chain(&[
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRAILER,
        PROXY_AUTHORIZATION,
    ]) {
        message.remove(name);
    }
    if upgrade && message.fields().contains_key(UPGRADE) {
        message.upgrade();
    } else {
        message.remove(&CONNECTION);
    }
}

/// Pingora's request and response headers, as `strip_hop_by_hop` edits them.
trait Message {
    fn fields(&self) -> &http::HeaderMap;
    fn remove(&mut self, name: &HeaderName);
    /// Sets `Connection: upgrade`.
    fn upgrade(&mut self);
}

macro_rules! message {
    ($t:ty) => {
        impl Message for $t {
            fn fields(&self) -> &http::HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn upgrade(&mut self) {
                let _ = self.insert_header(CONNECTION, CONNECTION_UPGRADE);
            }
        }
    };
}
message!(RequestHeader);
message!(ResponseHeader);

/// The hop-by-hop fields of one message for the lean path: the fixed ones `strip_hop_by_hop`
/// removes and those its `Connection` fields name (never framing fields or `Host`).
pub(crate) struct HopByHop<'a> {
    named: [&'a str; MAX_CONNECTION_FIELDS],
    count: usize,
}

/// `Connection` fields read per message; a request with more goes to the full path.
pub(crate) const MAX_CONNECTION_FIELDS: usize = 8;

pub(crate) fn hop_by_hop<'a>(connection: impl Iterator<Item = &'a str>) -> HopByHop<'a> {
    let mut named = [""; MAX_CONNECTION_FIELDS];
    let mut count = 0;
    for (slot, value) in named.iter_mut().zip(connection) {
        *slot = value;
        count += 1;
    }
    HopByHop { named, count }
}

impl HopByHop<'_> {
    pub(crate) fn drops(&self, name: &str) -> bool {
        const FIXED: [HeaderName; 6] = [
            CONNECTION,
            KEEP_ALIVE,
            PROXY_CONNECTION,
            TE,
            TRAILER,
            PROXY_AUTHORIZATION,
        ];
        const NEVER: [HeaderName; 3] = [CONTENT_LENGTH, TRANSFER_ENCODING, HOST];
        let is = |n: &HeaderName| name.eq_ignore_ascii_case(n.as_str());
        if FIXED.iter().any(is) {
            return true;
        }
        !NEVER.iter().any(is)
            && self
                .named
                .get(..self.count)
                .unwrap_or_default()
                .iter()
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(name))
    }
}

fn refused(reason: &str) {
    metrics().refused.with_label_values(&[reason]).inc();
}

/// Formats the `Host` a sandbox sees: its own address and port.
fn host_value(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Small fixed label for an upstream failure.
fn upstream_kind(e: &Error) -> &'static str {
    match e.etype() {
        ErrorType::ConnectRefused => "connect_refused",
        ErrorType::ConnectTimedout => "connect_timeout",
        ErrorType::ConnectError | ErrorType::ConnectNoRoute | ErrorType::SocketError => {
            "connect_error"
        }
        ErrorType::ReadTimedout => "read_timeout",
        ErrorType::WriteTimedout => "write_timeout",
        ErrorType::ReadError => "read_error",
        ErrorType::WriteError => "write_error",
        ErrorType::ConnectionClosed => "closed",
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error | ErrorType::InvalidH2 => "protocol",
        _ => "other",
    }
}

/// What the access log says of the route, settled once in `admit`.
#[derive(Default)]
pub(crate) struct LogRoute {
    /// The sandbox id a request named when the table has no such sandbox (otherwise the log
    /// names the entry's own).
    unknown: Option<Box<str>>,
    port: u16,
    signed: bool,
    /// Where the logged path starts in the request path (URI mode leaves out the route and any
    /// signature); `None`: no path is logged.
    path_from: Option<usize>,
}

impl LogRoute {
    pub(crate) fn of(route: &Route<'_>, mode: Mode, path: &str) -> Self {
        let path_from = match mode {
            Mode::Header => Some(0),
            // The rest is a suffix of the path.
            Mode::Uri => {
                let rest = if route.signed.is_some() {
                    route.rest_after_signature
                } else {
                    route.rest
                };
                path.len().checked_sub(rest.len())
            }
        };
        Self {
            unknown: None,
            port: route.port,
            signed: route.signed.is_some(),
            path_from,
        }
    }
}

/// A request the lean path may send on (see `Gateway::admit_plain`).
pub(crate) struct Admitted {
    pub entry: Arc<Entry>,
    pub port: u16,
    /// The path and query to send in URI mode.
    pub rewrite: Option<http::Uri>,
    pub client: Option<IpAddr>,
    /// The `X-Forwarded-For` to send when trusted proxies decided it.
    pub forwarded: Option<String>,
    pub log: LogRoute,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    /// The table's entry for the sandbox the request named; set also when the request was
    /// refused (the access log names the sandbox from it), proxied only when admitted.
    entry: Option<Arc<Entry>>,
    port: u16,
    tries: usize,
    target: Option<SocketAddr>,
    rewrite: Option<http::Uri>,
    status: u16,
    /// The client's address (see `settle_client`).
    client: Option<IpAddr>,
    /// The `X-Forwarded-For` to send when trusted proxies decided it.
    forwarded: Option<String>,
    log: LogRoute,
    /// The request is gRPC (its refusals are answered as gRPC statuses).
    grpc: bool,
    /// The sandbox is reached over HTTP/2 in cleartext.
    h2c: bool,
    /// The gateway answered the request itself (`status` is what it answered).
    answered: bool,
    _in_flight: InFlight,
}

/// The gateway as Pingora's proxy; the lean path shares the same [`Gateway`].
pub struct Proxy(pub Arc<Gateway>);

impl std::ops::Deref for Proxy {
    type Target = Gateway;
    fn deref(&self) -> &Gateway {
        &self.0
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            entry: None,
            port: 0,
            tries: 0,
            target: None,
            rewrite: None,
            status: 0,
            client: None,
            forwarded: None,
            log: LogRoute::default(),
            grpc: false,
            h2c: false,
            answered: false,
            _in_flight: self.drain.enter(),
        }
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        match self.admit(session, ctx) {
            Ok(None) => Ok(false),
            Ok(Some(Local::Liveness)) => {
                self.respond(session, 200, "OK".into(), true, None).await;
                ctx.status = 200;
                Ok(true)
            }
            Ok(Some(Local::Readiness)) => {
                let (status, body) = readiness(&self.table, &self.drain);
                self.respond(session, status, body, true, None).await;
                ctx.status = status;
                Ok(true)
            }
            Err(e) => {
                ctx.status = e.status();
                ctx.answered = true;
                self.refuse(session, ctx, &e).await;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(ip) = ctx.entry.as_deref().and_then(Entry::pick) else {
            return Error::e_explain(ErrorType::InternalError, "no route selected");
        };
        let addr = SocketAddr::new(ip, ctx.port);
        ctx.tries += 1;
        ctx.target = Some(addr);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.limits.connect_timeout);
        peer.options.idle_timeout = Some(self.limits.idle_timeout);
        if ctx.h2c {
            // Prior knowledge: cleartext has no ALPN, the annotation or gRPC said h2.
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = UPSTREAM_H2_STREAMS;
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        metrics()
            .upstream_errors
            .with_label_values(&[upstream_kind(&e)])
            .inc();
        // Another endpoint of the same sandbox may still answer.
        if self.endpoints_left(ctx) {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        strip_hop_by_hop(upstream);
        for name in [&INGRESS_TO, &INGRESS_LEGACY, &SECURE_ACCESS] {
            upstream.remove_header(name);
        }
        let req = session.req_header();
        // HTTP/2 clients name the host in `:authority`, which may stand without a `Host`.
        let host = req.headers.get(HOST).cloned().or_else(|| {
            req.uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(host) = host {
            upstream.insert_header(X_FORWARDED_HOST, host)?;
        } else {
            upstream.remove_header(&X_FORWARDED_HOST);
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        upstream.insert_header(
            X_FORWARDED_PROTO,
            if tls { PROTO_HTTPS } else { PROTO_HTTP },
        )?;
        let forwarded = match (&ctx.forwarded, ctx.client) {
            (Some(chain), _) => Some(chain.clone()),
            (None, Some(client)) => Some(forwarded_for(
                upstream
                    .headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
                client,
            )),
            (None, None) => None,
        };
        if let Some(forwarded) = forwarded {
            upstream.insert_header(X_FORWARDED_FOR, forwarded)?;
        }
        if let Some(target) = ctx.target {
            upstream.insert_header(HOST, host_value(target))?;
        }
        if let Some(uri) = ctx.rewrite.take() {
            upstream.set_uri(uri);
        }
        if ctx.grpc {
            // The one `TE` HTTP/2 allows, which gRPC servers may require.
            upstream.insert_header(TE, TE_TRAILERS)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        strip_hop_by_hop(resp);
        resp.insert_header(POWERED_BY, POWERED_BY_VALUE)?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let kind = upstream_kind(e);
        // Connect failures were counted in `fail_to_connect`, once per try.
        if e.esource() == &pingora::ErrorSource::Upstream
            && !matches!(
                e.etype(),
                ErrorType::ConnectRefused
                    | ErrorType::ConnectTimedout
                    | ErrorType::ConnectError
                    | ErrorType::ConnectNoRoute
                    | ErrorType::SocketError
            )
        {
            metrics().upstream_errors.with_label_values(&[kind]).inc();
        }
        let answer = GatewayError::from_proxy_error(e, kind);
        let code = answer.as_ref().map_or(0, GatewayError::status);
        // A response already under way cannot be replaced; the connection is closed instead so
        // the client sees an aborted response, never a complete-looking truncated one.
        if let Some(answer) = &answer
            && session.response_written().is_none()
        {
            self.refuse(session, ctx, answer).await;
            ctx.answered = true;
        }
        ctx.status = code;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        conn::request_done(session.as_downstream().stream());
        // A gRPC refusal went out as HTTP 200; it is counted and logged as what it was.
        let status = match session.response_written() {
            Some(r) if !(ctx.grpc && ctx.answered) => r.status.as_u16(),
            _ => ctx.status,
        };
        let elapsed = self.count(status, ctx.start);
        if tracing::enabled!(target: "access", tracing::Level::INFO) {
            let req = session.req_header();
            access_log(&AccessRecord {
                sandbox: ctx.entry.as_deref(),
                log: &ctx.log,
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                elapsed,
                bytes_sent: session.body_bytes_sent(),
                bytes_received: session.body_bytes_read(),
                client: ctx.client,
                upstream: ctx.target,
                error: e.map(|e| e.etype().as_str()),
            });
        }
    }
}

impl Gateway {
    /// Counts a finished request by status class and duration; returns its duration.
    pub(crate) fn count(&self, status: u16, start: Instant) -> Duration {
        self.by_class[metrics::class_index(status)].inc();
        let elapsed = start.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        elapsed
    }
}

/// What the access log says of one request.
pub(crate) struct AccessRecord<'a> {
    pub sandbox: Option<&'a Entry>,
    pub log: &'a LogRoute,
    pub method: &'a str,
    /// The request path; the part logged is settled by `log`.
    pub path: &'a str,
    pub status: u16,
    pub elapsed: Duration,
    pub bytes_sent: usize,
    pub bytes_received: usize,
    pub client: Option<IpAddr>,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'a str>,
}

/// One structured line per request. The Host, query string and any credential are left out:
/// they can carry tokens and signatures.
pub(crate) fn access_log(r: &AccessRecord<'_>) {
    let path = r
        .log
        .path_from
        .and_then(|from| r.path.get(from..))
        .unwrap_or("");
    tracing::info!(
        target: "access",
        sandbox = r
            .sandbox
            .map(Entry::name)
            .or(r.log.unknown.as_deref())
            .unwrap_or(""),
        port = r.log.port,
        signed = r.log.signed,
        method = r.method,
        path,
        status = r.status,
        latency_ms = r.elapsed.as_secs_f64() * 1000.0,
        bytes_sent = r.bytes_sent,
        bytes_received = r.bytes_received,
        client = r.client.map(tracing::field::display),
        upstream = r.upstream.map(tracing::field::display),
        error = r.error,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_paths_keeping_the_query() {
        assert_eq!(rewrite_path("", None).unwrap(), "/");
        assert_eq!(
            rewrite_path("/p/q", Some("a=1&b=2")).unwrap(),
            "/p/q?a=1&b=2"
        );
        assert_eq!(host_value("[::1]:80".parse().unwrap()), "[::1]:80");
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(forwarded_for(std::iter::empty(), ip), "10.0.0.1");
        let prior = ["203.0.113.9", " 198.51.100.1 "];
        assert_eq!(
            forwarded_for(prior.into_iter(), ip),
            "203.0.113.9, 198.51.100.1, 10.0.0.1"
        );
    }

    fn chain(prior: &[&str], peer: &str, trusted: &str) -> (String, String) {
        let trusted = net::parse_list(trusted).unwrap();
        let (client, forwarded) =
            trusted_chain(prior.iter().copied(), peer.parse().unwrap(), &trusted);
        (client.to_string(), forwarded)
    }

    #[test]
    fn trusted_proxies_name_the_client_and_untrusted_claims_are_dropped() {
        let lb = "10.0.0.0/8";
        // The balancer forwarded one client.
        assert_eq!(
            chain(&["203.0.113.9"], "10.1.1.1", lb),
            ("203.0.113.9".into(), "203.0.113.9, 10.1.1.1".into())
        );
        // A client's forged prefix is skipped: the balancer vouches only for its own peer.
        assert_eq!(
            chain(&["1.1.1.1, 203.0.113.9"], "10.1.1.1", lb),
            ("203.0.113.9".into(), "203.0.113.9, 10.1.1.1".into())
        );
        // Several trusted hops, split over two fields, IPv6 with brackets and ports.
        assert_eq!(
            chain(&["[2001:db8::7]:443", "10.2.2.2"], "10.1.1.1", lb),
            (
                "2001:db8::7".into(),
                "2001:db8::7, 10.2.2.2, 10.1.1.1".into()
            )
        );
        // A peer that is not trusted is the client, whatever it claims.
        assert_eq!(
            chain(&["1.1.1.1"], "198.51.100.4", lb),
            ("198.51.100.4".into(), "198.51.100.4".into())
        );
        // Garbage stops the walk at the last address vouched for.
        assert_eq!(
            chain(&["1.1.1.1, not-an-ip"], "10.1.1.1", lb),
            ("10.1.1.1".into(), "10.1.1.1".into())
        );
        // IPv4-mapped is IPv4.
        assert_eq!(chain(&["::ffff:192.0.2.1"], "10.1.1.1", lb).0, "192.0.2.1");
        // All trusted: the leftmost.
        assert_eq!(chain(&["10.9.9.9"], "10.1.1.1", lb).0, "10.9.9.9");
        // A chain longer than any real path is cut.
        let long = vec!["10.3.3.3"; 100].join(", ");
        assert_eq!(
            chain(&[&long], "10.1.1.1", lb).1.split(", ").count(),
            MAX_FORWARDED_HOPS + 1
        );
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/", Some(headers.len())).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let ok = [
            vec![],
            vec![("content-length", "5")],
            vec![("content-length", "5"), ("content-length", "5")],
            vec![("transfer-encoding", "chunked")],
            vec![("transfer-encoding", "Chunked")],
        ];
        for h in ok {
            assert!(framing(&request(&h), None).is_ok(), "{h:?}");
        }
        let bad = [
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
            vec![("content-length", "5"), ("content-length", "6")],
            vec![("content-length", "5, 6")],
            vec![("content-length", "+5")],
            vec![("content-length", "")],
            vec![("transfer-encoding", "xchunked")],
            vec![("transfer-encoding", "chunked, gzip")],
            vec![("transfer-encoding", "gzip, chunked")],
            vec![
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            vec![("transfer-encoding", "")],
        ];
        for h in bad {
            assert!(framing(&request(&h), None).is_err(), "{h:?}");
        }
        // Pingora removes a Content-Length sent with Transfer-Encoding; the raw header shows it.
        let te = request(&[("transfer-encoding", "chunked")]);
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n";
        assert!(framing(&te, Some(raw)).is_err());
        let raw = b"POST /content-length: HTTP/1.1\r\nX-Content-Length: 5\r\n\r\n";
        assert!(framing(&te, Some(raw)).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut req = request(&[
            ("connection", "close, x-secret, Content-Length, host"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("content-length", "3"),
            ("host", "a"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut req);
        let mut left: Vec<&str> = req.headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-kept"]);
        let mut ws = request(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut ws);
        assert_eq!(ws.headers.get("connection").unwrap(), "upgrade");
        assert_eq!(ws.headers.get("upgrade").unwrap(), "websocket");
    }
}
