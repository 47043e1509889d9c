//! The one place gateway failures become HTTP responses.

use crate::access::Denied;
use crate::route::RouteError;
use sandbox_api::signing::SignatureError;

/// Why the gateway answered a request itself instead of proxying it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("request header exceeds {0} bytes")]
    HeaderTooLarge(usize),
    #[error("sandbox not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("ambiguous sandbox id {id:?} found in multiple namespaces: {found}")]
    Ambiguous { id: String, found: String },
    #[error("{0}")]
    Denied(Denied),
    #[error("too many failed credential checks from this client; try again later")]
    TooManyFailures,
    #[error("upstream request failed: {0}")]
    Upstream(&'static str),
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            GatewayError::Route(_) => 400,
            GatewayError::HeaderTooLarge(_) => 431,
            GatewayError::NotFound(_) => 404,
            GatewayError::Unavailable(_) => 503,
            GatewayError::Ambiguous { .. } => 502,
            // Signed routes cannot be honoured at all without keys: a gateway fault, not the client's.
            GatewayError::Denied(Denied::Signature(SignatureError::NoKeys)) => 503,
            GatewayError::Denied(_) => 401,
            GatewayError::Upstream(_) => 502,
            GatewayError::TooManyFailures => 429,
        }
    }

    /// The `text/plain` body, in the reference's `OpenSandbox Ingress: ` form.
    pub fn body(&self) -> String {
        format!("OpenSandbox Ingress: {self}\n")
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
}
