//! The policy API on `:18080`, with the reference's routes, bodies and status codes:
//! `GET/POST/PUT/PATCH/DELETE /policy` (token in `OPENSANDBOX-EGRESS-AUTH` when one is set),
//! `GET /healthz`, and `GET /metrics`. Errors are plain text, successes JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sandbox_api::policy::{self, Policy, Rule};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::deny_all;
use crate::metrics;
use crate::state::{self, State};

pub use sandbox_api::egress::HEADER_AUTH as AUTH_HEADER;
/// Largest request body; a larger one is refused with 413 (the reference silently truncates).
pub const MAX_BODY: usize = 1 << 20;

pub struct Api {
    pub state: Arc<State>,
    pub token: Option<String>,
    /// Write requests run one at a time, so a PATCH merges into the policy it read.
    pub writes: tokio::sync::Mutex<()>,
}

type Reply = Response<Full<Bytes>>;

fn text(code: StatusCode, body: &str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// A non-empty JSON array body (PATCH, DELETE); the error is the 400 text, `what` its prefix.
fn json_array<T: serde::de::DeserializeOwned>(body: &str, what: &str) -> Result<Vec<T>, String> {
    if body.is_empty() {
        return Err("empty body".into());
    }
    match serde_json::from_str::<Option<Vec<T>>>(body) {
        Ok(Some(items)) if !items.is_empty() => Ok(items),
        Ok(_) => Err(format!("{what}: empty array")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The JSON answer of the policy routes, keys in the reference's order.
#[derive(serde::Serialize)]
struct Status<'a> {
    status: &'static str,
    mode: &'static str,
    #[serde(rename = "enforcementMode")]
    enforcement_mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a Policy>,
}

fn json_reply(value: &impl serde::Serialize) -> Reply {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

impl Api {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(given) = req.headers().get(AUTH_HEADER) else {
            return false;
        };
        let given = given.as_bytes();
        given.len() == token.len() && bool::from(given.ct_eq(token.as_bytes()))
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Reply {
        let reply = self.route(req).await;
        metrics::API_REQUESTS
            .with_label_values(&[reply.status().as_str()])
            .inc();
        reply
    }

    async fn route(&self, req: Request<Incoming>) -> Reply {
        match req.uri().path() {
            "/healthz" => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r
            }
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(metrics::render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            "/policy" => {
                if !self.authorized(&req) {
                    tracing::warn!(target: "audit", event = "api.unauthorized", method = %req.method(), "policy API request without a valid token");
                    return text(StatusCode::UNAUTHORIZED, "unauthorized");
                }
                let method = req.method().clone();
                if method == Method::GET {
                    return self.get().await;
                }
                if ![Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(&method) {
                    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
                    r.headers_mut().insert(
                        header::ALLOW,
                        header::HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
                    );
                    return r;
                }
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                        return text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &format!("request body exceeds {MAX_BODY} bytes"),
                        );
                    }
                    Err(e) => {
                        return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}"));
                    }
                };
                let body = String::from_utf8_lossy(&body);
                let body = body.trim();
                let _serial = self.writes.lock().await;
                match method {
                    Method::PATCH => self.patch(body).await,
                    Method::DELETE => self.delete(body).await,
                    _ => self.replace(body).await,
                }
            }
            _ => text(StatusCode::NOT_FOUND, "404 page not found"),
        }
    }

    async fn get(&self) -> Reply {
        let policy = self.state.policy().await;
        json_reply(&Status {
            policy: Some(&policy),
            ..self.status(&policy, None)
        })
    }

    fn status<'a>(&self, policy: &Policy, reason: Option<&'a str>) -> Status<'a> {
        Status {
            status: "ok",
            mode: state::mode_name(policy),
            enforcement_mode: self.state.mode.as_str(),
            reason,
            policy: None,
        }
    }

    fn too_many(&self, count: usize) -> Option<Reply> {
        (count > self.state.max_rules).then(|| {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "egress rule total count {count} exceeds limit {}",
                    self.state.max_rules
                ),
            )
        })
    }

    async fn commit(&self, policy: Policy, reason: Option<&str>) -> Reply {
        let mode = state::mode_name(&policy);
        if let Err(e) = self.state.set_policy(policy, "api").await {
            tracing::error!(error = %e, "policy change failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
        json_reply(&Status {
            mode,
            ..self.status(&crate::config::deny_all(), reason)
        })
    }

    /// POST and PUT: the whole policy; an empty body resets to deny-all.
    async fn replace(&self, body: &str) -> Reply {
        if body.is_empty() {
            return self
                .commit(deny_all(), Some("policy reset to default deny-all"))
                .await;
        }
        let policy = if body == "null" {
            deny_all()
        } else {
            match policy::parse(body) {
                Ok(p) => p,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("invalid policy: {e}")),
            }
        };
        if let Some(r) = self.too_many(policy.egress.len()) {
            return r;
        }
        self.commit(policy, None).await
    }

    /// PATCH: an array of rules merged in front of the current ones.
    async fn patch(&self, body: &str) -> Reply {
        let rules: Vec<Rule> = match json_array(body, "invalid patch rules") {
            Ok(r) => r,
            Err(why) => return text(StatusCode::BAD_REQUEST, &why),
        };
        let merged = state::merge(&self.state.policy().await, &rules);
        if let Err(e) = policy::validate(&merged) {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("invalid merged policy: {e}"),
            );
        }
        if let Some(r) = self.too_many(merged.egress.len()) {
            return r;
        }
        self.commit(merged, None).await
    }

    /// DELETE: an array of targets to remove.
    async fn delete(&self, body: &str) -> Reply {
        let targets: Vec<String> = match json_array(body, "invalid delete targets") {
            Ok(t) => t,
            Err(why) => return text(StatusCode::BAD_REQUEST, &why),
        };
        let mut policy = self.state.policy().await;
        if state::remove(&mut policy, &targets) == 0 {
            return json_reply(&self.status(&policy, Some("no matching targets found")));
        }
        self.commit(policy, None).await
    }
}

/// Serves the API on `listener` until `cancel` fires.
pub async fn serve(api: Arc<Api>, listener: TcpListener, cancel: CancellationToken) {
    while let Some(stream) = crate::accept::next(&listener, &cancel).await {
        let api = api.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}
