//! gRPC through the gateway: which requests are gRPC, and how the gateway's own refusals reach
//! a gRPC client as a status it understands (HTTP 200, trailers-only, `grpc-status` and
//! `grpc-message`) instead of an HTTP error page its library reports as `UNKNOWN`.

use crate::error::GatewayError;

/// gRPC status codes the gateway answers with (the numbers of the gRPC protocol, written as
/// `grpc-status: <number>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// Whether a `Content-Type` value is gRPC's (`application/grpc`, `application/grpc+proto`,
/// `application/grpc;...`). gRPC-Web (`application/grpc-web...`) is not: it runs over HTTP/1.1
/// and carries its trailers in the body.
pub fn is_grpc(content_type: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    content_type.len() >= GRPC.len()
        && content_type[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(content_type.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The gRPC status for a refusal. The gateway's own reasons map to the status a gRPC client
/// acts on (a missing credential is `UNAUTHENTICATED`, an unknown sandbox `NOT_FOUND`); a bare
/// HTTP status maps as gRPC's HTTP-to-status table does.
pub fn code_of(e: &GatewayError) -> Code {
    match e {
        GatewayError::Route(_) | GatewayError::Framing(_) => Code::InvalidArgument,
        GatewayError::HeaderTooLarge(_) => Code::ResourceExhausted,
        GatewayError::NotFound(_) => Code::NotFound,
        GatewayError::Ambiguous { .. } => Code::FailedPrecondition,
        GatewayError::PortDenied(_) | GatewayError::PortNotExposed(_) => Code::PermissionDenied,
        GatewayError::TooManyFailures(_) | GatewayError::TooManySignatureFailures(_) => {
            Code::ResourceExhausted
        }
        GatewayError::Unavailable(_) | GatewayError::Upstream(_) => Code::Unavailable,
        GatewayError::Denied(_) => match e.status() {
            401 => Code::Unauthenticated,
            _ => Code::Unavailable,
        },
        GatewayError::Status(status) => match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            408 | 504 => Code::DeadlineExceeded,
            413 | 431 => Code::ResourceExhausted,
            429 | 502 | 503 => Code::Unavailable,
            500 => Code::Internal,
            _ => Code::Unknown,
        },
    }
}

/// `grpc-message` as the protocol writes it: UTF-8, with bytes outside printable ASCII and `%`
/// percent-encoded.
pub fn encode_message(message: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(message.len());
    for b in message.trim_end().bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Denied;
    use sandbox_api::signing::SignatureError;

    #[test]
    fn grpc_content_types_are_told_apart() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(yes.as_bytes()), "{yes}");
        }
        for no in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpcx",
            "application/json",
            "application/grp",
            "",
        ] {
            assert!(!is_grpc(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn refusals_map_to_the_status_a_grpc_client_acts_on() {
        let cases = [
            (GatewayError::Denied(Denied::Missing), Code::Unauthenticated),
            (
                GatewayError::Denied(Denied::Signature(SignatureError::NoKeys)),
                Code::Unavailable,
            ),
            (GatewayError::NotFound("x".into()), Code::NotFound),
            (GatewayError::Unavailable("down".into()), Code::Unavailable),
            (GatewayError::Upstream("connect_refused"), Code::Unavailable),
            (GatewayError::PortNotExposed(1), Code::PermissionDenied),
            (GatewayError::Status(504), Code::DeadlineExceeded),
            (GatewayError::Status(404), Code::Unimplemented),
            (GatewayError::Status(418), Code::Unknown),
        ];
        for (e, code) in cases {
            assert_eq!(code_of(&e), code, "{e}");
        }
        assert_eq!(Code::Unauthenticated as u8, 16);
        assert_eq!(Code::Unavailable as u8, 14);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            encode_message("sandbox not found: a-b\n"),
            "sandbox not found: a-b"
        );
        assert_eq!(encode_message("100% ü"), "100%25 %C3%BC");
        assert_eq!(encode_message("a\tb"), "a%09b");
    }
}
