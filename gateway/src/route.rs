//! Parsing a request into the sandbox it is for: the routing key in header mode
//! (`<id>-<port>` or the signed `<id>-<port>-<expires_b36>-<sig>`, from a header or the first
//! label of the Host) and the path in URI mode (`/<id>/<port>/...`). Parsing borrows from the
//! request and never allocates.

use sandbox_api::signing;

/// A signed-route credential carried in the route itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed<'a> {
    pub expires_b36: &'a str,
    pub signature: &'a str,
}

/// The sandbox a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub id: &'a str,
    pub port: u16,
    /// The port exactly as written, which is what a signature covers.
    pub port_text: &'a str,
    pub signed: Option<Signed<'a>>,
    /// URI mode: the path after `/<id>/<port>`, including any signed segments.
    pub rest: &'a str,
    /// URI mode: the path after the signed segments, when the route has them.
    pub rest_after_signature: &'a str,
}

/// Why a request carries no usable route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("missing header 'OpenSandbox-Ingress-To' or 'Host'")]
    Missing,
    #[error("invalid ingress route: expected <sandbox-id>-<sandbox-port>")]
    Malformed,
    #[error("invalid URI path format: expected '/<sandbox-id>/<sandbox-port>/<path-to-request>'")]
    MalformedPath,
    #[error("invalid ingress route: invalid port format: expected 1-65535 without leading zeros")]
    InvalidPort,
}

/// Parses a decimal port in 1..=65535 written without sign or leading zeros.
pub fn parse_port(s: &str) -> Result<u16, RouteError> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 5 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
        return Err(RouteError::InvalidPort);
    }
    let v = b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(v).map_err(|_| RouteError::InvalidPort)
}

/// The first DNS label of a header value or Host, without a `:port` suffix.
pub fn first_label(value: &str) -> &str {
    let value = value.trim();
    let value = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .unwrap_or(value);
    let end = value.find(['.', ':']).unwrap_or(value.len());
    &value[..end]
}

/// Parses a header-mode routing key (`<id>-<port>` or `<id>-<port>-<expires_b36>-<sig>`).
pub fn parse_label(label: &str) -> Result<Route<'_>, RouteError> {
    if label.is_empty() {
        return Err(RouteError::Missing);
    }
    if let Some(route) = parse_signed_label(label) {
        return Ok(route);
    }
    let (id, port_text) = label.rsplit_once('-').ok_or(RouteError::Malformed)?;
    if id.is_empty() || port_text.is_empty() {
        return Err(RouteError::Malformed);
    }
    let port = parse_port(port_text)?;
    Ok(Route {
        id,
        port,
        port_text,
        signed: None,
        rest: "",
        rest_after_signature: "",
    })
}

fn parse_signed_label(label: &str) -> Option<Route<'_>> {
    let (head, signature) = label.rsplit_once('-')?;
    if !signing::is_signature_shape(signature) {
        return None;
    }
    let (head, expires_b36) = head.rsplit_once('-')?;
    signing::parse_b36(expires_b36)?;
    let (id, port_text) = head.rsplit_once('-')?;
    if id.is_empty() {
        return None;
    }
    let port = parse_port(port_text).ok()?;
    Some(Route {
        id,
        port,
        port_text,
        signed: Some(Signed {
            expires_b36,
            signature,
        }),
        rest: "",
        rest_after_signature: "",
    })
}

/// Splits `/<segment>/<tail>` into the segment and `/<tail>` (or `""` at the end).
fn next_segment(path: &str) -> Option<(&str, &str)> {
    let path = path.strip_prefix('/')?;
    match path.find('/') {
        Some(i) => Some((&path[..i], &path[i..])),
        None => Some((path, "")),
    }
}

/// Parses a URI-mode path (without the query): `/<id>/<port>[/<expires_b36>/<sig>]/<rest>`.
pub fn parse_path(path: &str) -> Result<Route<'_>, RouteError> {
    let (id, after_id) = next_segment(path).ok_or(RouteError::MalformedPath)?;
    if id.is_empty() {
        return Err(RouteError::MalformedPath);
    }
    let (port_text, rest) = next_segment(after_id).ok_or(RouteError::MalformedPath)?;
    let port = parse_port(port_text)?;
    let mut route = Route {
        id,
        port,
        port_text,
        signed: None,
        rest,
        rest_after_signature: rest,
    };
    if let Some((expires_b36, after_exp)) = next_segment(rest)
        && signing::parse_b36(expires_b36).is_some()
        && let Some((signature, after_sig)) = next_segment(after_exp)
        && signing::is_signature_shape(signature)
    {
        route.signed = Some(Signed {
            expires_b36,
            signature,
        });
        route.rest_after_signature = after_sig;
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_labels() {
        let r = parse_label(first_label("nosec-8080.sandbox.gw")).unwrap();
        assert_eq!((r.id, r.port, r.signed), ("nosec", 8080, None));
        let r = parse_label(first_label("http://nosec-8080.sandbox.gw")).unwrap();
        assert_eq!((r.id, r.port), ("nosec", 8080));
        let r = parse_label(first_label("my-sandbox-9000:28888")).unwrap();
        assert_eq!((r.id, r.port), ("my-sandbox", 9000));
        assert_eq!(
            parse_label(first_label("sb-0.x")),
            Err(RouteError::InvalidPort)
        );
        assert_eq!(parse_label("sb-65536"), Err(RouteError::InvalidPort));
        assert_eq!(parse_label("sb-08080"), Err(RouteError::InvalidPort));
        assert_eq!(parse_label("sb-80a"), Err(RouteError::InvalidPort));
        assert_eq!(parse_label("sandbox"), Err(RouteError::Malformed));
        assert_eq!(parse_label("-80"), Err(RouteError::Malformed));
        assert_eq!(parse_label(""), Err(RouteError::Missing));
    }

    #[test]
    fn signed_labels() {
        let r = parse_label("sec-7777-x2qxvk-65ad791ek").unwrap();
        assert_eq!((r.id, r.port, r.port_text), ("sec", 7777, "7777"));
        assert_eq!(
            r.signed,
            Some(Signed {
                expires_b36: "x2qxvk",
                signature: "65ad791ek"
            })
        );
        let r = parse_label("my-sandbox-8080-0-2def8676a").unwrap();
        assert_eq!((r.id, r.port), ("my-sandbox", 8080));
        assert!(r.signed.is_some());
        // Not a signature shape: a plain label whose port is the last segment.
        assert_eq!(
            parse_label("a-1-x2qxvk-65AD791Ek"),
            Err(RouteError::InvalidPort)
        );
    }

    #[test]
    fn uri_paths() {
        let r = parse_path("/sec/5000/x2qxvk/666f95eaa/p/q").unwrap();
        assert_eq!(
            (r.id, r.port, r.rest, r.rest_after_signature),
            ("sec", 5000, "/x2qxvk/666f95eaa/p/q", "/p/q")
        );
        let r = parse_path("/sec/5000/only/legacy").unwrap();
        assert_eq!((r.signed, r.rest), (None, "/only/legacy"));
        let r = parse_path("/my-sandbox/8080").unwrap();
        assert_eq!((r.id, r.port, r.rest), ("my-sandbox", 8080, ""));
        let r = parse_path("/my-sandbox/8080/").unwrap();
        assert_eq!(r.rest, "/");
        assert_eq!(parse_path("/sb/08080"), Err(RouteError::InvalidPort));
        assert_eq!(parse_path("/"), Err(RouteError::MalformedPath));
        assert_eq!(parse_path("/sb"), Err(RouteError::MalformedPath));
        assert_eq!(parse_path(""), Err(RouteError::MalformedPath));
        assert_eq!(parse_path("//80"), Err(RouteError::MalformedPath));
    }

    use proptest::prelude::*;

    fn sandbox_id() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?"
    }

    proptest! {
        #[test]
        fn plain_labels_round_trip(id in sandbox_id(), port in 1u16..) {
            let host = format!("{id}-{port}.sandbox.example:28888");
            let r = parse_label(first_label(&host)).unwrap();
            prop_assert_eq!((r.id, r.port, r.signed), (id.as_str(), port, None));
        }

        #[test]
        fn signed_labels_round_trip(id in sandbox_id(), port in 1u16.., expires: u64, sig in "[0-9a-f]{8}[a-z0-9]") {
            let exp = signing::format_b36(expires);
            let label = format!("{id}-{port}-{exp}-{sig}");
            let r = parse_label(&label).unwrap();
            prop_assert_eq!((r.id, r.port), (id.as_str(), port));
            prop_assert_eq!(r.signed, Some(Signed { expires_b36: &exp, signature: &sig }));
        }

        #[test]
        fn paths_round_trip(id in "[a-zA-Z0-9_.-]{1,40}", port in 1u16.., rest in "(/[a-zA-Z0-9._~-]{0,12}){0,4}") {
            let path = format!("/{id}/{port}{rest}");
            let r = parse_path(&path).unwrap();
            prop_assert_eq!((r.id, r.port, r.rest), (id.as_str(), port, rest.as_str()));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,64}") {
            let _ = parse_label(first_label(&s));
            if let Ok(r) = parse_path(&s) {
                prop_assert!(s.contains(r.id) && r.port > 0);
            }
        }
    }
}
