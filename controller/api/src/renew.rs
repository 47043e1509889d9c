//! OSEP-0009 renew intents: what the gateway pushes onto a Redis list when a request reaches a
//! sandbox, and what the controller takes off it to extend the sandbox's expiry.
//!
//! The payload is the reference's byte for byte: the fields `sandbox_id`, `observed_at`, `port`,
//! `request_uri` in that order, `port` and `request_uri` left out when empty, `observed_at` in
//! RFC 3339 UTC with the fraction of a second trimmed of trailing zeros, and strings escaped as
//! Go's `encoding/json` escapes them (`<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes, bytes
//! that are not UTF-8 as U+FFFD).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

/// The Redis list the reference uses.
pub const DEFAULT_QUEUE_KEY: &str = "opensandbox:renew:intent";
/// The reference's default DSN.
pub const DEFAULT_REDIS_DSN: &str = "redis://127.0.0.1:6379/0";
/// Read when the password is not in the DSN, so it need not be on the command line.
pub const ENV_REDIS_PASSWORD: &str = "OPENSANDBOX_RENEW_INTENT_REDIS_PASSWORD";
/// Seconds a BatchSandbox's expiry is pushed past the last access; its presence is the opt-in.
pub const ANNOTATION_EXTEND_SECONDS: &str = "opensandbox.io/access-renew-extend-seconds";
/// The extension an opted-in sandbox may ask for, in seconds (five minutes to a day).
pub const EXTEND_SECONDS: std::ops::RangeInclusive<i64> = 300..=86_400;
/// Intents older than this are ignored: the access they report is stale.
pub const MAX_AGE: Duration = Duration::from_secs(300);

/// Encodes one intent as the reference does.
pub fn encode(sandbox_id: &str, observed_at: SystemTime, port: u16, request_uri: &[u8]) -> String {
    let mut out = String::with_capacity(96 + sandbox_id.len() + request_uri.len());
    out.push_str("{\"sandbox_id\":");
    go_string(&mut out, sandbox_id.as_bytes());
    out.push_str(",\"observed_at\":\"");
    crate::time::write_rfc3339(&mut out, observed_at, true);
    out.push('"');
    if port != 0 {
        let _ = write!(out, ",\"port\":{port}");
    }
    if !request_uri.is_empty() {
        out.push_str(",\"request_uri\":");
        go_string(&mut out, request_uri);
    }
    out.push('}');
    out
}

/// A string as Go's `json.Marshal` writes it (HTML-safe escaping on).
fn go_string(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '<' | '>' | '&' | '\u{0}'..='\u{1f}' => {
                    let b = c as u8;
                    out.push_str("\\u00");
                    out.push(HEX[usize::from(b >> 4)] as char);
                    out.push(HEX[usize::from(b & 0xf)] as char);
                }
                '\u{2028}' => out.push_str("\\u2028"),
                '\u{2029}' => out.push_str("\\u2029"),
                c => out.push(c),
            }
        }
        if !chunk.invalid().is_empty() {
            out.push_str("\\ufffd");
        }
    }
    out.push('"');
}

/// An intent as read off the list. Unknown fields are ignored, as a newer publisher may add some.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Intent {
    pub sandbox_id: String,
    /// RFC 3339, checked by the consumer (which has a time library).
    pub observed_at: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub request_uri: String,
}

/// Why an entry of the list is not an intent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not an intent: {0}")]
    Json(String),
    #[error("sandbox_id is empty")]
    NoSandbox,
}

/// Reads one entry of the list.
pub fn decode(payload: &[u8]) -> Result<Intent, DecodeError> {
    let intent: Intent =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
    if intent.sandbox_id.trim().is_empty() {
        return Err(DecodeError::NoSandbox);
    }
    Ok(intent)
}

/// The annotation's extension in seconds, or why it cannot be used.
pub fn extend_seconds(annotation: &str) -> Result<i64, String> {
    let text = annotation.trim();
    let seconds: i64 = text
        .parse()
        .map_err(|_| format!("{ANNOTATION_EXTEND_SECONDS} {text:?} is not a whole number"))?;
    if !EXTEND_SECONDS.contains(&seconds) {
        return Err(format!(
            "{ANNOTATION_EXTEND_SECONDS} {seconds} is outside {}..{} seconds",
            EXTEND_SECONDS.start(),
            EXTEND_SECONDS.end()
        ));
    }
    Ok(seconds)
}

/// The DSN as connection settings, with `password` (from an environment variable or a file)
/// winning over one written in the DSN. Errors never repeat the DSN, which may hold a password.
#[cfg(feature = "redis")]
pub fn connection(dsn: &str, password: Option<&str>) -> Result<redis::ConnectionInfo, String> {
    use redis::IntoConnectionInfo;
    let info = dsn.into_connection_info().map_err(|e| {
        format!("not a Redis DSN (redis://[user:password@]host[:port][/db] or unix:///path): {e}")
    })?;
    redis::Client::open(info.clone()).map_err(|e| e.to_string())?;
    Ok(match password {
        Some(p) => {
            let settings = info.redis_settings().clone().set_password(p);
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

/// A password kept in a file (a mounted Secret), without its trailing newline.
pub fn password_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(password.to_owned())
}

/// Percent-decodes a path as Go's `URL.Path` holds it; an escape that is not two hex digits is
/// kept as written.
pub fn decode_path(path: &str) -> std::borrow::Cow<'_, [u8]> {
    let bytes = path.as_bytes();
    if !bytes.contains(&b'%') {
        return bytes.into();
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn matches_the_reference_payload() {
        // 2026-06-15T09:46:58Z
        let t = at(1_781_516_818, 120_000_000);
        assert_eq!(
            encode("sbx-1", t, 8080, b""),
            r#"{"sandbox_id":"sbx-1","observed_at":"2026-06-15T09:46:58.12Z","port":8080}"#
        );
        assert_eq!(
            encode("sbx-1", at(1_781_516_818, 0), 0, b"/a?b"),
            r#"{"sandbox_id":"sbx-1","observed_at":"2026-06-15T09:46:58Z","request_uri":"/a?b"}"#
        );
        assert_eq!(
            encode("s", at(0, 1), 1, b"/x<y>&\"\\\n\x01\xff\xe2\x80\xa8"),
            r#"{"sandbox_id":"s","observed_at":"1970-01-01T00:00:00.000000001Z","port":1,"request_uri":"/x\u003cy\u003e\u0026\"\\\n\u0001\ufffd\u2028"}"#
        );
    }

    #[test]
    fn decodes_what_it_encodes_and_refuses_the_rest() {
        let text = encode("sbx", at(5, 0), 80, b"/p");
        let intent = decode(text.as_bytes()).unwrap();
        assert_eq!(
            (
                intent.sandbox_id.as_str(),
                intent.port,
                intent.request_uri.as_str()
            ),
            ("sbx", 80, "/p")
        );
        assert!(matches!(decode(b"not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode(b"{\"port\":1}"), Err(DecodeError::Json(_))));
        assert_eq!(
            decode(br#"{"sandbox_id":" ","observed_at":"x"}"#),
            Err(DecodeError::NoSandbox)
        );
        let extra = decode(br#"{"sandbox_id":"a","observed_at":"x","new":1}"#).unwrap();
        assert_eq!(extra.port, 0);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn dsns_and_passwords() {
        assert!(connection("redis://127.0.0.1:6379/0", None).is_ok());
        assert!(connection("unix:///run/redis.sock", None).is_ok());
        for bad in [
            "rediss://h:6379/0",
            "http://h:6379",
            "redis://h:port/0",
            "h:6379",
        ] {
            let e = connection(bad, None).unwrap_err();
            assert!(!e.contains(bad), "the DSN is repeated: {e}");
        }
        let info = connection("redis://:old@h/1", Some("new")).unwrap();
        assert_eq!(info.redis_settings().password(), Some("new"));
        assert_eq!(info.redis_settings().db(), 1);
    }

    #[test]
    fn extension_bounds() {
        assert_eq!(extend_seconds("300"), Ok(300));
        assert_eq!(extend_seconds(" 86400 "), Ok(86_400));
        assert!(extend_seconds("299").unwrap_err().contains("outside"));
        assert!(extend_seconds("86401").is_err());
        assert!(extend_seconds("10m").unwrap_err().contains("whole number"));
        assert!(extend_seconds("-300").is_err());
    }

    #[test]
    fn paths_decode_as_go_does() {
        assert_eq!(&*decode_path("/a%20b"), b"/a b");
        assert_eq!(&*decode_path("/a%zzb%4"), b"/a%zzb%4");
        assert_eq!(&*decode_path("/%E2%82%AC"), "/€".as_bytes());
    }
}
