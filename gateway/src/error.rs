//! The one place gateway failures become HTTP responses: what the gateway refuses itself
//! (`request_filter`) and what went wrong while proxying (`fail_to_proxy`) both end here.

use pingora::{Error, ErrorSource, ErrorType};

use crate::access::Denied;
use crate::limit::Blocked;
use crate::route::RouteError;
use sandbox_api::signing::SignatureError;

/// Why the gateway answered a request itself instead of proxying it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("request header exceeds {0} bytes")]
    HeaderTooLarge(usize),
    #[error("ambiguous request framing: {0}")]
    Framing(&'static str),
    #[error("sandbox not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("ambiguous sandbox id {id:?} found in multiple namespaces: {found}")]
    Ambiguous { id: String, found: String },
    #[error("{0}")]
    Denied(Denied),
    #[error("too many failed credential checks from this client; try again later")]
    TooManyFailures(Blocked),
    #[error(
        "too many failed signatures for this sandbox; try again later or use the secure-access header"
    )]
    TooManySignatureFailures(Blocked),
    #[error("port {0} is not open through this gateway")]
    PortDenied(u16),
    #[error("port {0} is not exposed by this sandbox")]
    PortNotExposed(u16),
    #[error("upstream request failed: {0}")]
    Upstream(&'static str),
    #[error("request failed ({0})")]
    Status(u16),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Route(_) | GatewayError::Framing(_) => 400,
            GatewayError::HeaderTooLarge(_) => 431,
            GatewayError::NotFound(_) => 404,
            GatewayError::Unavailable(_) => 503,
            GatewayError::Ambiguous { .. } => 502,
            // Signed routes cannot be honoured at all without keys: a gateway fault, not the client's.
            GatewayError::Denied(Denied::Signature(SignatureError::NoKeys)) => 503,
            GatewayError::Denied(_) => 401,
            GatewayError::PortDenied(_) | GatewayError::PortNotExposed(_) => 403,
            GatewayError::Upstream(_) => 502,
            GatewayError::TooManyFailures(_) | GatewayError::TooManySignatureFailures(_) => 429,
            GatewayError::Status(code) => *code,
        }
    }

    /// The rate limiter's wait, sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::TooManyFailures(b) | GatewayError::TooManySignatureFailures(b) => {
                Some(b.retry_after())
            }
            _ => None,
        }
    }

    /// The `text/plain` body, in the reference's `OpenSandbox Ingress: ` form.
    pub fn body(&self) -> String {
        format!("OpenSandbox Ingress: {self}\n")
    }

    /// The response for a failure while proxying; `None` when the client is gone (nothing to
    /// answer).
    pub fn from_proxy_error(e: &Error, upstream_kind: &'static str) -> Option<Self> {
        Some(match e.etype() {
            ErrorType::HTTPStatus(code) => GatewayError::Status(*code),
            _ => match e.esource() {
                ErrorSource::Upstream => GatewayError::Upstream(upstream_kind),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        return None;
                    }
                    _ => GatewayError::Status(400),
                },
                ErrorSource::Internal | ErrorSource::Unset => GatewayError::Status(500),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_status_codes() {
        assert_eq!(GatewayError::Route(RouteError::InvalidPort).status(), 400);
        assert_eq!(GatewayError::NotFound("x".into()).status(), 404);
        assert_eq!(GatewayError::Denied(Denied::Missing).status(), 401);
        assert_eq!(
            GatewayError::Denied(Denied::Signature(SignatureError::NoKeys)).status(),
            503
        );
        assert_eq!(GatewayError::PortNotExposed(18080).status(), 403);
        let limited = GatewayError::TooManySignatureFailures(Blocked::Sandbox { retry_after: 7 });
        assert_eq!((limited.status(), limited.retry_after()), (429, Some(7)));
        assert_eq!(GatewayError::Framing("x").retry_after(), None);
        let amb = GatewayError::Ambiguous {
            id: "amb".into(),
            found: "[a/amb b/amb]".into(),
        };
        assert_eq!(amb.status(), 502);
        assert_eq!(
            amb.body(),
            "OpenSandbox Ingress: ambiguous sandbox id \"amb\" found in multiple namespaces: [a/amb b/amb]\n"
        );
    }

    #[test]
    fn proxy_errors_map_by_source() {
        let up = Error::explain(ErrorType::ConnectRefused, "x").into_up();
        assert_eq!(
            GatewayError::from_proxy_error(&up, "connect_refused").map(|e| e.status()),
            Some(502)
        );
        let gone = Error::explain(ErrorType::ConnectionClosed, "x").into_down();
        assert!(GatewayError::from_proxy_error(&gone, "closed").is_none());
        let bad = Error::explain(ErrorType::InvalidHTTPHeader, "x").into_down();
        assert_eq!(
            GatewayError::from_proxy_error(&bad, "protocol").map(|e| e.status()),
            Some(400)
        );
        let status = Error::new(ErrorType::HTTPStatus(413));
        assert_eq!(
            GatewayError::from_proxy_error(&status, "other").map(|e| e.status()),
            Some(413)
        );
    }
}
