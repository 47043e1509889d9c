//! The metrics listener: Prometheus text on `/metrics`, plus `/readyz` and `/status.ok` so
//! probes need not share the proxy port.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use crate::drain::Drain;
use crate::table::RouteTable;

pub struct Admin {
    pub table: Arc<RouteTable>,
    pub drain: Arc<Drain>,
}

/// Readiness: the first full snapshot is loaded and the gateway is not draining. Sources in
/// trouble (a lost watch) are listed after the verdict; the gateway stays ready while it can
/// serve from its last table.
pub fn readiness(table: &RouteTable, drain: &Drain) -> (u16, String) {
    let (status, verdict) = if drain.is_draining() {
        (503, "draining")
    } else if table.is_ready() {
        (200, "ready")
    } else {
        (503, "waiting for the first full sandbox snapshot")
    };
    (status, format!("{verdict}\n{}", table.notes()))
}

fn text(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, len.into());
    resp
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::with_capacity(16 * 1024);
                match encoder.encode(&prometheus::gather(), &mut buf) {
                    Ok(()) => text(200, encoder.format_type(), buf),
                    Err(e) => text(500, "text/plain", e.to_string().into_bytes()),
                }
            }
            "/readyz" => {
                let (status, body) = readiness(&self.table, &self.drain);
                text(status, "text/plain", body.into_bytes())
            }
            "/status.ok" => text(200, "text/plain", b"OK".to_vec()),
            _ => text(
                404,
                "text/plain",
                b"not found: try /metrics, /readyz or /status.ok".to_vec(),
            ),
        }
    }
}
