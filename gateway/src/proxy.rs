//! The request's life through the gateway, one Pingora phase per method: find the route and
//! check credentials (`request_filter`), pick the endpoint (`upstream_peer`), rewrite what the
//! sandbox sees (`upstream_request_filter`), mark the response (`response_filter`), turn
//! failures into responses (`fail_to_proxy`), count and log (`logging`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};
use prometheus::{Histogram, IntCounter};
use sandbox_api::names;

use crate::access::{self, KeyRing};
use crate::admin::readiness;
use crate::config::Mode;
use crate::conn;
use crate::drain::{Drain, InFlight};
use crate::error::GatewayError;
use crate::limit::FailureLimit;
use crate::metrics::{self, metrics};
use crate::route::{self, Route, RouteError};
use crate::table::{Entry, RouteTable};

// Header names built once at compile time, so the request path never parses a name.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
const INGRESS_TO: HeaderName = HeaderName::from_static(names::HEADER_INGRESS_TO);
const INGRESS_LEGACY: HeaderName = HeaderName::from_static(names::HEADER_INGRESS_LEGACY);
const SECURE_ACCESS: HeaderName = HeaderName::from_static(names::HEADER_SECURE_ACCESS);
const POWERED_BY: HeaderName = HeaderName::from_static(names::HEADER_POWERED_BY);
const POWERED_BY_VALUE: HeaderValue = HeaderValue::from_static(names::POWERED_BY_VALUE);
const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
const PATH_LIVENESS: &str = "/status.ok";
const PATH_READINESS: &str = "/readyz";

/// Per-connection limits and upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Failed credential checks allowed per client per minute (0: unlimited).
    pub auth_failures_per_minute: u32,
    /// Longest lifetime of a signed route, in seconds (`None`: unlimited).
    pub max_signed_route_lifetime: Option<u64>,
}

pub struct Gateway {
    mode: Mode,
    table: Arc<RouteTable>,
    keys: Arc<ArcSwap<KeyRing>>,
    drain: Arc<Drain>,
    limits: Limits,
    failures: FailureLimit,
    /// Request counters by status class, resolved once so the hot path does no label lookup.
    by_class: [IntCounter; 6],
    duration: Histogram,
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
            limits,
            failures: FailureLimit::new(limits.auth_failures_per_minute, Duration::from_secs(60)),
            by_class: metrics::CLASSES.map(class),
            duration: metrics::duration_for(mode.label()),
        }
    }

    /// The route a request names, borrowed from its header.
    fn route<'a>(&self, req: &'a RequestHeader) -> Result<Route<'a>, RouteError> {
        match self.mode {
            Mode::Header => route::parse_label(route::first_label(
                routing_key(req).ok_or(RouteError::Missing)?,
            )),
            Mode::Uri => route::parse_path(req.uri.path()),
        }
    }

    /// Resolves the request to a sandbox and checks its credentials.
    fn admit(&self, session: &Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let req = session.req_header();
        if header_size(req) > self.limits.max_header_bytes {
            return Err(GatewayError::HeaderTooLarge(self.limits.max_header_bytes));
        }
        let route = self.route(req)?;
        let entry = self
            .table
            .get(route.id)
            .ok_or_else(|| GatewayError::NotFound(route.id.into()))?;
        let routable = match entry.as_ref() {
            Entry::Routable(r) => r,
            Entry::Unavailable(reason) => {
                return Err(GatewayError::Unavailable(reason.to_string()));
            }
            Entry::Ambiguous(found) => {
                return Err(GatewayError::Ambiguous {
                    id: route.id.into(),
                    found: found.to_string(),
                });
            }
        };
        if let Some(token) = routable.token.as_deref() {
            let client = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            if client.is_some_and(|ip| self.failures.blocked(ip, route.id)) {
                metrics()
                    .auth_failures
                    .with_label_values(&["rate_limited"])
                    .inc();
                return Err(GatewayError::TooManyFailures);
            }
            let header = req
                .headers
                .get(names::HEADER_SECURE_ACCESS)
                .map(|v| v.as_bytes());
            access::check(
                token,
                header,
                &route,
                &self.keys.load(),
                unix_now(),
                self.limits.max_signed_route_lifetime,
            )
            .map_err(|denied| {
                if let Some(ip) = client {
                    self.failures.failed(ip, route.id);
                }
                metrics()
                    .auth_failures
                    .with_label_values(&[denied.reason()])
                    .inc();
                GatewayError::Denied(denied)
            })?;
        }
        if self.mode == Mode::Uri {
            // Signed segments are the gateway's own only for secure sandboxes; otherwise they are
            // part of the sandbox's path.
            let rest = if routable.token.is_some() && route.signed.is_some() {
                route.rest_after_signature
            } else {
                route.rest
            };
            ctx.rewrite = Some(rewrite_path(rest, req.uri.query())?);
        }
        ctx.port = route.port;
        ctx.entry = Some(entry.clone());
        Ok(())
    }

    async fn respond(&self, session: &mut Session, status: u16, body: String, keepalive: bool) {
        let result = async {
            let mut resp = ResponseHeader::build(status, Some(3))?;
            resp.insert_header(CONTENT_TYPE, "text/plain; charset=utf-8")?;
            resp.insert_header(X_CONTENT_TYPE_OPTIONS, "nosniff")?;
            resp.insert_header(CONTENT_LENGTH, body.len())?;
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
        match ctx.entry.as_deref() {
            Some(Entry::Routable(r)) => ctx.tries < r.endpoints().len(),
            _ => false,
        }
    }
}

/// The routing key in header mode: the routing header, its deprecated twin, then Host.
fn routing_key(req: &RequestHeader) -> Option<&str> {
    [
        names::HEADER_INGRESS_TO,
        names::HEADER_INGRESS_LEGACY,
        HOST.as_str(),
    ]
    .into_iter()
    .filter_map(|name| req.headers.get(name))
    .filter_map(|v| v.to_str().ok())
    .find(|v| !v.trim().is_empty())
    .or_else(|| req.uri.host())
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

/// `X-Forwarded-For` with the client appended to what earlier proxies recorded.
fn forwarded_for(prior: Option<&HeaderValue>, client: std::net::IpAddr) -> String {
    use std::fmt::Write;
    let prior = prior
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    let mut out = String::with_capacity(prior.len() + 48);
    if !prior.is_empty() {
        out.push_str(prior);
        out.push_str(", ");
    }
    let _ = write!(out, "{client}");
    out
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

/// Per-request state.
pub struct Ctx {
    start: Instant,
    entry: Option<Arc<Entry>>,
    port: u16,
    tries: usize,
    target: Option<SocketAddr>,
    rewrite: Option<http::Uri>,
    status: u16,
    _in_flight: InFlight,
}

#[async_trait]
impl ProxyHttp for Gateway {
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
            _in_flight: self.drain.enter(),
        }
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        match session.req_header().uri.path() {
            PATH_LIVENESS => {
                self.respond(session, 200, "OK".into(), true).await;
                ctx.status = 200;
                return Ok(true);
            }
            PATH_READINESS if self.route(session.req_header()).is_err() => {
                let (status, body) = readiness(&self.table, &self.drain);
                self.respond(session, status, body, true).await;
                ctx.status = status;
                return Ok(true);
            }
            _ => {}
        }
        match self.admit(session, ctx) {
            Ok(()) => Ok(false),
            Err(e) => {
                ctx.status = e.status();
                self.respond(session, e.status(), e.body(), false).await;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(Entry::Routable(routable)) = ctx.entry.as_deref() else {
            return Error::e_explain(ErrorType::InternalError, "no route selected");
        };
        let addr = SocketAddr::new(routable.pick(), ctx.port);
        ctx.tries += 1;
        ctx.target = Some(addr);
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.limits.connect_timeout);
        peer.options.idle_timeout = Some(self.limits.idle_timeout);
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
        for name in [&INGRESS_TO, &INGRESS_LEGACY, &SECURE_ACCESS] {
            upstream.remove_header(name);
        }
        if let Some(host) = session.req_header().headers.get(HOST).cloned() {
            upstream.insert_header(X_FORWARDED_HOST, host)?;
        } else {
            upstream.remove_header(&X_FORWARDED_HOST);
        }
        upstream.insert_header(X_FORWARDED_PROTO, PROTO_HTTP)?;
        if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
            let forwarded = forwarded_for(upstream.headers.get(&X_FORWARDED_FOR), client.ip());
            upstream.insert_header(X_FORWARDED_FOR, forwarded)?;
        }
        if let Some(target) = ctx.target {
            upstream.insert_header(HOST, host_value(target))?;
        }
        if let Some(uri) = ctx.rewrite.take() {
            upstream.set_uri(uri);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        resp.insert_header(POWERED_BY, POWERED_BY_VALUE)?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => {
                    let kind = upstream_kind(e);
                    if !matches!(
                        e.etype(),
                        ErrorType::ConnectRefused
                            | ErrorType::ConnectTimedout
                            | ErrorType::ConnectError
                            | ErrorType::ConnectNoRoute
                            | ErrorType::SocketError
                    ) {
                        metrics().upstream_errors.with_label_values(&[kind]).inc();
                    }
                    502
                }
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        // A response already under way cannot be replaced; the connection is closed instead so
        // the client sees an aborted response, never a complete-looking truncated one.
        if code > 0 && session.response_written().is_none() {
            let body = if code == 502 {
                GatewayError::Upstream(upstream_kind(e)).body()
            } else {
                format!("OpenSandbox Ingress: request failed ({code})\n")
            };
            self.respond(session, code, body, false).await;
        }
        ctx.status = code;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        conn::request_done(session.as_downstream().stream());
        let status = session
            .response_written()
            .map_or(ctx.status, |r| r.status.as_u16());
        let class = metrics::class_index(status);
        self.by_class[class].inc();
        let elapsed = ctx.start.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        if tracing::enabled!(target: "access", tracing::Level::INFO) {
            access_log(self, session, ctx, status, elapsed, e);
        }
    }
}

/// One structured line per request. The Host, query string and any credential are left out:
/// they can carry tokens and signatures.
fn access_log(
    gw: &Gateway,
    session: &Session,
    ctx: &Ctx,
    status: u16,
    elapsed: Duration,
    e: Option<&Error>,
) {
    let req = session.req_header();
    let route = gw.route(req).ok();
    let path = match (gw.mode, route) {
        (Mode::Uri, Some(r)) if r.signed.is_some() => r.rest_after_signature,
        (Mode::Uri, Some(r)) => r.rest,
        (Mode::Uri, None) => "",
        (Mode::Header, _) => req.uri.path(),
    };
    let client = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    tracing::info!(
        target: "access",
        sandbox = route.map_or("", |r| r.id),
        port = route.map_or(0, |r| r.port),
        signed = route.is_some_and(|r| r.signed.is_some()),
        method = req.method.as_str(),
        path,
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        bytes_sent = session.body_bytes_sent(),
        bytes_received = session.body_bytes_read(),
        client = client.map(|ip| ip.to_string()),
        upstream = ctx.target.map(|t| t.to_string()),
        error = e.map(|e| e.etype().as_str()),
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
        assert_eq!(forwarded_for(None, ip), "10.0.0.1");
        let prior = HeaderValue::from_static("203.0.113.9");
        assert_eq!(forwarded_for(Some(&prior), ip), "203.0.113.9, 10.0.0.1");
    }
}
