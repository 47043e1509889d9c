//! Parser for the HAProxy PROXY protocol, versions 1 (text) and 2 (binary).
//!
//! A load balancer in front of the gateway (an AWS NLB, for example) can put one PROXY header at
//! the start of each TCP connection to name the client it accepted the connection from. [`parse`]
//! reads that header; the bytes after it belong to the client and must be passed on untouched.
//!
//! The parser is strict and decides as early as it can: a byte that no valid header could hold is
//! an error at once, so a client that talks HTTP straight to the listener is refused after its
//! first byte rather than after a read timeout.
//!
//! Strict points worth knowing:
//! - v1 fields are separated by exactly one space, with no space before the CRLF. A `TCP4` address
//!   is a dotted quad with no leading zeros in an octet (`010.0.0.1` is refused); a `TCP6` address
//!   is anything [`Ipv6Addr`] parses (no zone id). Ports are decimal 0 to 65535 with no sign and no
//!   leading zeros (`0` alone is fine, `080` is not). After `UNKNOWN` anything up to the CRLF is
//!   ignored.
//! - v2 `PROXY` headers with a unix or unspecified family give [`Header::Local`] whatever their
//!   address block holds; `LOCAL` headers give [`Header::Local`] whatever their family byte says.
//!   TLVs after the addresses are skipped, not read.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest header we ever need to buffer: the v2 fixed part (16 bytes) plus 4096 bytes of
/// addresses and TLVs.
///
/// The protocol allows up to 65535 bytes after the fixed part, but we refuse longer headers with
/// [`ParseError::TooLong`] so that memory per connection stays small and bounded. The largest
/// address block (unix, 216 bytes) fits with plenty of room for TLVs such as the AWS VPC endpoint
/// id, and so does any v1 line (at most 107 bytes).
pub const MAX_HEADER: usize = V2_FIXED + 4096;

/// The start of every v1 line.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included, that the protocol allows.
const V1_MAX: usize = 107;
/// The first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol and the 2-byte length.
const V2_FIXED: usize = 16;

/// What a PROXY header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The balancer names the client: source and destination of the original connection.
    Proxied {
        /// The client's address and port.
        source: SocketAddr,
        /// The address and port the client connected to.
        destination: SocketAddr,
    },
    /// v1 `UNKNOWN`, v2 `LOCAL` command, or v2 with an unspecified/unix family: the connection's
    /// own peer address stands (e.g. the balancer's health check).
    Local,
}

/// Why the start of a connection is not a PROXY header we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The first bytes are neither the v1 `PROXY ` nor the v2 signature.
    NotProxyProtocol,
    /// A v1 line that breaks the format; the text says how.
    BadV1(&'static str),
    /// A v2 header that breaks the format; the text says how.
    BadV2(&'static str),
    /// A v1 line longer than 107 bytes, or a v2 header longer than [`MAX_HEADER`].
    TooLong,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotProxyProtocol => f.write_str(
                "not a PROXY protocol header: expected \"PROXY \" (v1) or the v2 signature \
                 \\r\\n\\r\\n\\0\\r\\nQUIT\\n",
            ),
            Self::BadV1(reason) => write!(f, "malformed PROXY v1 header: {reason}"),
            Self::BadV2(reason) => write!(f, "malformed PROXY v2 header: {reason}"),
            Self::TooLong => write!(
                f,
                "PROXY header too long: a v1 line may have at most {V1_MAX} bytes and a v2 \
                 header at most {MAX_HEADER}"
            ),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses a PROXY header at the start of `buf`.
///
/// - `Ok(Some((header, consumed)))` when a whole header is present; `consumed` is its length, and
///   the bytes after it are the client's own, to be handed on untouched.
/// - `Ok(None)` when `buf` is a valid beginning so far and more bytes are needed. This never
///   happens once `buf` holds [`MAX_HEADER`] bytes.
/// - `Err` as soon as `buf` cannot begin a valid header; more bytes would not change that.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    if starts_like(buf, V1_SIGNATURE) {
        if buf.len() < V1_SIGNATURE.len() {
            return Ok(None);
        }
        parse_v1(buf)
    } else if starts_like(buf, V2_SIGNATURE) {
        if buf.len() < V2_SIGNATURE.len() {
            return Ok(None);
        }
        parse_v2(buf)
    } else {
        Err(ParseError::NotProxyProtocol)
    }
}

/// Whether `buf` and `signature` agree on every byte they both have.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    buf.iter().zip(signature).all(|(a, b)| a == b)
}

const BAD_PROTOCOL: ParseError = ParseError::BadV1("protocol must be TCP4, TCP6 or UNKNOWN");
const BAD_IPV4: ParseError = ParseError::BadV1("TCP4 address is not a dotted-quad IPv4 address");
const BAD_IPV6: ParseError = ParseError::BadV1("TCP6 address is not an IPv6 address");
const BAD_PORT: ParseError =
    ParseError::BadV1("port is not a decimal number 0-65535 without sign or leading zeros");

/// Parses a v1 line; `buf` starts with `PROXY `.
fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    // A line of at most V1_MAX bytes has its CR before this index, so we never look further.
    let window = buf.get(..V1_MAX - 1).unwrap_or(buf);
    let end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    let fields = window
        .get(V1_SIGNATURE.len()..end.unwrap_or(window.len()))
        .unwrap_or_default();
    let Some(at) = end else {
        v1_fields(fields, false)?;
        if window.len() == V1_MAX - 1 {
            return Err(ParseError::TooLong);
        }
        return Ok(None);
    };
    if window.get(at) == Some(&b'\n') {
        return Err(ParseError::BadV1(
            "line feed without a carriage return before it",
        ));
    }
    match buf.get(at + 1) {
        None => v1_fields(fields, false).map(|_| None),
        Some(b'\n') => match v1_fields(fields, true)? {
            Some(header) => Ok(Some((header, at + 2))),
            // v1_fields never gives None for a complete line; refuse rather than assume.
            None => Err(ParseError::BadV1("incomplete line")),
        },
        Some(_) => Err(ParseError::BadV1(
            "carriage return not followed by a line feed",
        )),
    }
}

/// Checks the fields of a v1 line (between `PROXY ` and the CRLF).
///
/// When `complete` is false the line has not ended yet and its last field may be cut short; the
/// result is then `Ok(None)` if the fields so far can still begin a valid line.
fn v1_fields(fields: &[u8], complete: bool) -> Result<Option<Header>, ParseError> {
    if fields.starts_with(b"UNKNOWN") {
        return Ok(complete.then_some(Header::Local));
    }
    if !complete && b"UNKNOWN".starts_with(fields) {
        return Ok(None);
    }
    let count = fields.iter().filter(|&&b| b == b' ').count() + 1;
    let mut v6 = false;
    let (mut source, mut destination) = (None, None);
    let (mut source_port, mut destination_port) = (None, None);
    for (index, field) in fields.split(|&b| b == b' ').enumerate() {
        // Only the last field of an unfinished line may be cut short.
        let partial = !complete && index + 1 == count;
        match index {
            0 => {
                v6 = match field {
                    b"TCP4" => false,
                    b"TCP6" => true,
                    _ if partial && (b"TCP4".starts_with(field) || b"TCP6".starts_with(field)) => {
                        return Ok(None);
                    }
                    _ => return Err(BAD_PROTOCOL),
                }
            }
            1 => source = v1_address(field, v6, partial)?,
            2 => destination = v1_address(field, v6, partial)?,
            3 => source_port = v1_port(field, partial)?,
            4 => destination_port = v1_port(field, partial)?,
            _ => {
                return Err(ParseError::BadV1(
                    "more than five fields, or a space before the CRLF",
                ));
            }
        }
    }
    if !complete {
        return Ok(None);
    }
    match (source, destination, source_port, destination_port) {
        (Some(source), Some(destination), Some(source_port), Some(destination_port)) => {
            Ok(Some(Header::Proxied {
                source: SocketAddr::new(source, source_port),
                destination: SocketAddr::new(destination, destination_port),
            }))
        }
        _ => Err(ParseError::BadV1(
            "expected PROXY TCP4|TCP6 <source> <destination> <source port> <destination port>",
        )),
    }
}

/// Reads a v1 address of the line's family; `Ok(None)` for a valid beginning when `partial`.
fn v1_address(field: &[u8], v6: bool, partial: bool) -> Result<Option<IpAddr>, ParseError> {
    let address = if v6 {
        v1_ipv6(field, partial)?.map(IpAddr::V6)
    } else {
        v1_ipv4(field, partial)?.map(IpAddr::V4)
    };
    match address {
        None if !partial => Err(if v6 { BAD_IPV6 } else { BAD_IPV4 }),
        address => Ok(address),
    }
}

/// Reads a dotted quad with no leading zeros; `Ok(None)` for a valid beginning when `partial`.
fn v1_ipv4(field: &[u8], partial: bool) -> Result<Option<Ipv4Addr>, ParseError> {
    let dots = field.iter().filter(|&&b| b == b'.').count();
    if dots > 3 {
        return Err(BAD_IPV4);
    }
    let mut octets = [0u8; 4];
    for (index, (octet, digits)) in octets
        .iter_mut()
        .zip(field.split(|&b| b == b'.'))
        .enumerate()
    {
        if digits.is_empty() && partial && index == dots {
            return Ok(None);
        }
        *octet = decimal(digits, u8::MAX.into())
            .and_then(|value| u8::try_from(value).ok())
            .ok_or(BAD_IPV4)?;
    }
    match dots {
        3 => Ok(Some(Ipv4Addr::from(octets))),
        _ if partial => Ok(None),
        _ => Err(BAD_IPV4),
    }
}

/// Reads an IPv6 address; `Ok(None)` for a plausible beginning when `partial`.
///
/// A beginning is only checked for its characters and length, not its shape.
fn v1_ipv6(field: &[u8], partial: bool) -> Result<Option<Ipv6Addr>, ParseError> {
    // The longest form: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
    const LONGEST: usize = 45;
    let allowed = |b: &u8| b.is_ascii_hexdigit() || *b == b':' || *b == b'.';
    if field.len() > LONGEST || !field.iter().all(allowed) {
        return Err(BAD_IPV6);
    }
    if partial {
        return Ok(None);
    }
    std::str::from_utf8(field)
        .ok()
        .and_then(|text| text.parse().ok())
        .map(Some)
        .ok_or(BAD_IPV6)
}

/// Reads a v1 port; `Ok(None)` for an empty last field when `partial`.
fn v1_port(field: &[u8], partial: bool) -> Result<Option<u16>, ParseError> {
    if field.is_empty() && partial {
        return Ok(None);
    }
    decimal(field, u16::MAX.into())
        .and_then(|value| u16::try_from(value).ok())
        .map(Some)
        .ok_or(BAD_PORT)
}

/// Reads a decimal number no larger than `max`: ASCII digits only, no sign, and no leading zero
/// unless the number is `0` itself.
fn decimal(digits: &[u8], max: u32) -> Option<u32> {
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with(b"0")) {
        return None;
    }
    let mut value: u32 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(digit - b'0');
        if value > max {
            return None;
        }
    }
    Some(value)
}

/// Parses a v2 header; `buf` starts with the 12-byte signature.
fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    // Bytes 13 to 16: version and command, family and protocol, big-endian length.
    let Some(&version_command) = buf.get(12) else {
        return Ok(None);
    };
    if version_command >> 4 != 2 {
        return Err(ParseError::BadV2("version is not 2"));
    }
    let proxy = match version_command & 0x0f {
        0 => false,
        1 => true,
        _ => {
            return Err(ParseError::BadV2(
                "command is neither LOCAL (0) nor PROXY (1)",
            ));
        }
    };
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    // Address bytes the family needs; a LOCAL header's family does not matter.
    let needed = match family {
        _ if !proxy => 0,
        0x11 => 12,
        0x21 => 36,
        0x00 | 0x31 | 0x32 => 0,
        0x12 | 0x22 => {
            return Err(ParseError::BadV2(
                "datagram (UDP) addresses on a TCP listener",
            ));
        }
        _ => {
            return Err(ParseError::BadV2(
                "unknown address family or transport protocol",
            ));
        }
    };
    let Some(&[high, low]) = buf.get(14..V2_FIXED) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    let total = V2_FIXED + length;
    if total > MAX_HEADER {
        return Err(ParseError::TooLong);
    }
    if length < needed {
        return Err(ParseError::BadV2(
            "address block shorter than its family needs",
        ));
    }
    let Some(block) = buf.get(V2_FIXED..total) else {
        return Ok(None);
    };
    let header = match family {
        _ if !proxy => Header::Local,
        0x11 => match (
            take::<4>(block, 0),
            take::<4>(block, 4),
            take::<2>(block, 8),
            take::<2>(block, 10),
        ) {
            (Some(source), Some(destination), Some(source_port), Some(destination_port)) => {
                proxied(
                    IpAddr::V4(Ipv4Addr::from(source)),
                    IpAddr::V4(Ipv4Addr::from(destination)),
                    source_port,
                    destination_port,
                )
            }
            _ => return Err(ParseError::BadV2("truncated IPv4 address block")),
        },
        0x21 => match (
            take::<16>(block, 0),
            take::<16>(block, 16),
            take::<2>(block, 32),
            take::<2>(block, 34),
        ) {
            (Some(source), Some(destination), Some(source_port), Some(destination_port)) => {
                proxied(
                    IpAddr::V6(Ipv6Addr::from(source)),
                    IpAddr::V6(Ipv6Addr::from(destination)),
                    source_port,
                    destination_port,
                )
            }
            _ => return Err(ParseError::BadV2("truncated IPv6 address block")),
        },
        _ => Header::Local,
    };
    Ok(Some((header, total)))
}

/// The `N` bytes of `block` starting at `at`, if it has them.
fn take<const N: usize>(block: &[u8], at: usize) -> Option<[u8; N]> {
    block.get(at..)?.first_chunk().copied()
}

/// A [`Header::Proxied`] from addresses and big-endian ports.
fn proxied(
    source: IpAddr,
    destination: IpAddr,
    source_port: [u8; 2],
    destination_port: [u8; 2],
) -> Header {
    Header::Proxied {
        source: SocketAddr::new(source, u16::from_be_bytes(source_port)),
        destination: SocketAddr::new(destination, u16::from_be_bytes(destination_port)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn proxied_from(source: &str, destination: &str) -> Header {
        Header::Proxied {
            source: sock(source),
            destination: sock(destination),
        }
    }

    /// A v2 header with the given command byte, family byte and block after the fixed part.
    fn v2_raw(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend(u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    /// The v1 line for `header`.
    fn encode_v1(header: &Header) -> Vec<u8> {
        match header {
            Header::Proxied {
                source,
                destination,
            } => {
                let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {protocol} {} {} {} {}\r\n",
                    source.ip(),
                    destination.ip(),
                    source.port(),
                    destination.port()
                )
                .into_bytes()
            }
            Header::Local => b"PROXY UNKNOWN\r\n".to_vec(),
        }
    }

    /// The v2 header for `header`, with `tlvs` appended after the addresses.
    fn encode_v2(header: &Header, tlvs: &[u8]) -> Vec<u8> {
        let (command, family, mut block) = match header {
            Header::Proxied {
                source,
                destination,
            } => {
                let (family, mut block) = match (source.ip(), destination.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => (0x11, [s.octets(), d.octets()].concat()),
                    (IpAddr::V6(s), IpAddr::V6(d)) => (0x21, [s.octets(), d.octets()].concat()),
                    _ => panic!("source and destination of different families"),
                };
                block.extend(source.port().to_be_bytes());
                block.extend(destination.port().to_be_bytes());
                (0x21, family, block)
            }
            Header::Local => (0x20, 0x00, Vec::new()),
        };
        block.extend_from_slice(tlvs);
        v2_raw(command, family, &block)
    }

    /// Checks that `wire` parses to `expected`, alone and with `rest` after it, and that every
    /// strict prefix asks for more.
    fn check_header(wire: &[u8], expected: Header, rest: &[u8]) {
        assert_eq!(parse(wire), Ok(Some((expected, wire.len()))), "{wire:?}");
        let mut with_rest = wire.to_vec();
        with_rest.extend_from_slice(rest);
        assert_eq!(parse(&with_rest), Ok(Some((expected, wire.len()))));
        for end in 0..wire.len() {
            assert_eq!(parse(&wire[..end]), Ok(None), "prefix {:?}", &wire[..end]);
        }
    }

    // A few TLVs as AWS sends them: PP2_TYPE_AWS (0xEA) with a VPC endpoint id, and a NOOP.
    const TLVS: &[u8] = b"\xea\x00\x17\x01vpce-08d2bf15fac5001c9\x04\x00\x02ab";

    #[test]
    fn v1_tcp4() {
        check_header(
            b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n",
            proxied_from("192.168.0.1:56324", "10.0.0.2:443"),
            b"",
        );
        check_header(
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            proxied_from("0.0.0.0:0", "255.255.255.255:65535"),
            b"",
        );
    }

    #[test]
    fn v1_tcp6() {
        check_header(
            b"PROXY TCP6 2001:db8::1 ::1 4000 80\r\n",
            proxied_from("[2001:db8::1]:4000", "[::1]:80"),
            b"",
        );
        // An IPv4-mapped source comes back as it is.
        check_header(
            b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 1 2\r\n",
            proxied_from("[::ffff:192.0.2.7]:1", "[::ffff:10.0.0.1]:2"),
            b"",
        );
        let longest = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
            ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        check_header(
            longest,
            Header::Proxied {
                source: SocketAddr::new(Ipv6Addr::from([0xffff; 8]).into(), 65535),
                destination: SocketAddr::new(Ipv6Addr::from([0xffff; 8]).into(), 65535),
            },
            b"",
        );
    }

    #[test]
    fn v1_unknown() {
        check_header(b"PROXY UNKNOWN\r\n", Header::Local, b"");
        check_header(
            b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
            Header::Local,
            b"",
        );
        check_header(b"PROXY UNKNOWN\x00\xff junk\tx\r\n", Header::Local, b"");
        // Exactly the 107-byte maximum.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(105, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(line.len(), 107);
        check_header(&line, Header::Local, b"");
    }

    #[test]
    fn v2_proxy_inet() {
        let mut block = vec![192, 168, 0, 1, 10, 0, 0, 2];
        block.extend(56324u16.to_be_bytes());
        block.extend(443u16.to_be_bytes());
        let expected = proxied_from("192.168.0.1:56324", "10.0.0.2:443");
        let wire = v2_raw(0x21, 0x11, &block);
        assert_eq!(wire.len(), 28);
        check_header(&wire, expected, b"");
        block.extend_from_slice(TLVS);
        check_header(&v2_raw(0x21, 0x11, &block), expected, b"");
    }

    #[test]
    fn v2_proxy_inet6() {
        let source: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let destination: Ipv6Addr = "::ffff:10.0.0.2".parse().unwrap();
        let mut block = [source.octets(), destination.octets()].concat();
        block.extend(4000u16.to_be_bytes());
        block.extend(80u16.to_be_bytes());
        let expected = proxied_from("[2001:db8::1]:4000", "[::ffff:10.0.0.2]:80");
        let wire = v2_raw(0x21, 0x21, &block);
        assert_eq!(wire.len(), 52);
        check_header(&wire, expected, b"");
        block.extend_from_slice(TLVS);
        check_header(&v2_raw(0x21, 0x21, &block), expected, b"");
    }

    #[test]
    fn v2_local() {
        check_header(&v2_raw(0x20, 0x00, b""), Header::Local, b"");
        // LOCAL ignores the family and skips whatever the length covers.
        check_header(&v2_raw(0x20, 0x11, &[7; 12]), Header::Local, b"");
        check_header(&v2_raw(0x20, 0x12, b"x"), Header::Local, b"");
        check_header(&v2_raw(0x20, 0xff, TLVS), Header::Local, b"");
    }

    #[test]
    fn v2_unix_and_unspec() {
        let mut path = [0u8; 216];
        path[..12].copy_from_slice(b"/run/lb.sock");
        check_header(&v2_raw(0x21, 0x31, &path), Header::Local, b"");
        check_header(&v2_raw(0x21, 0x32, &path), Header::Local, b"");
        check_header(&v2_raw(0x21, 0x00, b""), Header::Local, b"");
        check_header(&v2_raw(0x21, 0x00, TLVS), Header::Local, b"");
    }

    #[test]
    fn leftover_bytes_are_left_alone() {
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".as_slice();
        let v2 = encode_v2(&proxied_from("1.2.3.4:1", "5.6.7.8:2"), TLVS);
        for header in [v1, v2.as_slice()] {
            let mut wire = header.to_vec();
            wire.extend_from_slice(request);
            let (_, consumed) = parse(&wire).unwrap().unwrap();
            assert_eq!(&wire[consumed..], request);
        }
        // The client's bytes may even look like another header.
        check_header(v1, proxied_from("1.2.3.4:1", "5.6.7.8:2"), v1);
        check_header(&v2, proxied_from("1.2.3.4:1", "5.6.7.8:2"), &v2);
    }

    #[test]
    fn plain_traffic_is_refused_at_once() {
        let request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
        for end in 1..=request.len() {
            assert_eq!(parse(&request[..end]), Err(ParseError::NotProxyProtocol));
        }
        // "PRI * HTTP/2.0" and "PUT" share the first byte with "PROXY", but not the second.
        assert_eq!(parse(b"P"), Ok(None));
        assert_eq!(parse(b"PR"), Ok(None));
        assert_eq!(parse(b"PRI"), Err(ParseError::NotProxyProtocol));
        assert_eq!(parse(b"PU"), Err(ParseError::NotProxyProtocol));
        // A TLS ClientHello, a bare CRLF line, lower case, a missing space.
        for bad in [
            b"\x16\x03\x01".as_slice(),
            b"\r\n\r\n\r",
            b"\n",
            b"proxy ",
            b"PROXY\r\n",
            b"PROXYTCP4",
        ] {
            assert_eq!(parse(bad), Err(ParseError::NotProxyProtocol), "{bad:?}");
        }
    }

    #[test]
    fn v1_errors() {
        let bad_lines: &[&[u8]] = &[
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY UNKNOW\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            // Addresses of the wrong family or shape.
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4. 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::1::2 ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP6 [::1] ::1 1 2\r\n",
            b"PROXY TCP6 12345::1 ::1 1 2\r\n",
            // Ports.
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999999999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2a\r\n",
            // Line ends.
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN\rX\r\n",
            b"PROXY UNKNOWN foo\nbar\r\n",
        ];
        for line in bad_lines {
            let error = parse(line).unwrap_err();
            assert!(
                matches!(error, ParseError::BadV1(_) | ParseError::NotProxyProtocol),
                "{line:?}: {error:?}"
            );
        }
    }

    #[test]
    fn v1_errors_come_before_the_line_ends() {
        for probe in [
            b"PROXY TCP5".as_slice(),
            b"PROXY X",
            b"PROXY UNKNOWX",
            b"PROXY TCP4  ",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
            b"PROXY TCP4 ::",
            b"PROXY TCP4 1.2.3.256",
            b"PROXY TCP4 1.2.3.4.",
            b"PROXY TCP4 1..",
            b"PROXY TCP4 01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +",
            b"PROXY TCP6 g",
            b"PROXY TCP6 ::1 ::1 1 2 3",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\n",
            b"PROXY UNKNOWN\rX",
        ] {
            assert!(
                matches!(parse(probe), Err(ParseError::BadV1(_))),
                "{probe:?}: {:?}",
                parse(probe)
            );
        }
    }

    #[test]
    fn v1_too_long() {
        // 108 bytes with the CRLF.
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(106, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), Err(ParseError::TooLong));
        // No CRLF in sight.
        let mut endless = b"PROXY UNKNOWN ".to_vec();
        endless.resize(105, b'x');
        assert_eq!(parse(&endless), Ok(None));
        endless.push(b'x');
        assert_eq!(parse(&endless), Err(ParseError::TooLong));
        endless.resize(MAX_HEADER, b'x');
        assert_eq!(parse(&endless), Err(ParseError::TooLong));
    }

    #[test]
    fn v2_errors() {
        let inet = [0u8; 12];
        let cases: &[(Vec<u8>, ParseError)] = &[
            (
                v2_raw(0x11, 0x11, &inet),
                ParseError::BadV2("version is not 2"),
            ),
            (
                v2_raw(0x31, 0x11, &inet),
                ParseError::BadV2("version is not 2"),
            ),
            (
                v2_raw(0x01, 0x11, &inet),
                ParseError::BadV2("version is not 2"),
            ),
            (
                v2_raw(0x22, 0x11, &inet),
                ParseError::BadV2("command is neither LOCAL (0) nor PROXY (1)"),
            ),
            (
                v2_raw(0x2f, 0x11, &inet),
                ParseError::BadV2("command is neither LOCAL (0) nor PROXY (1)"),
            ),
            (
                v2_raw(0x21, 0x12, &inet),
                ParseError::BadV2("datagram (UDP) addresses on a TCP listener"),
            ),
            (
                v2_raw(0x21, 0x22, &[0; 36]),
                ParseError::BadV2("datagram (UDP) addresses on a TCP listener"),
            ),
            (
                v2_raw(0x21, 0x13, &inet),
                ParseError::BadV2("unknown address family or transport protocol"),
            ),
            (
                v2_raw(0x21, 0x41, &inet),
                ParseError::BadV2("unknown address family or transport protocol"),
            ),
            (
                v2_raw(0x21, 0x01, b""),
                ParseError::BadV2("unknown address family or transport protocol"),
            ),
            (
                v2_raw(0x21, 0x10, &inet),
                ParseError::BadV2("unknown address family or transport protocol"),
            ),
            (
                v2_raw(0x21, 0x11, &[0; 11]),
                ParseError::BadV2("address block shorter than its family needs"),
            ),
            (
                v2_raw(0x21, 0x21, &[0; 35]),
                ParseError::BadV2("address block shorter than its family needs"),
            ),
            (
                v2_raw(0x21, 0x21, &[0; 12]),
                ParseError::BadV2("address block shorter than its family needs"),
            ),
        ];
        for (wire, error) in cases {
            assert_eq!(parse(wire).as_ref(), Err(error), "{wire:?}");
            // Decided from the fixed part alone.
            assert_eq!(parse(&wire[..V2_FIXED]).as_ref(), Err(error), "{wire:?}");
        }
        // Version and command are judged from byte 13 alone, the family from byte 14.
        assert!(parse(&v2_raw(0x11, 0x11, &inet)[..13]).is_err());
        assert!(parse(&v2_raw(0x21, 0x12, &inet)[..14]).is_err());
    }

    #[test]
    fn v2_too_long() {
        let limit = MAX_HEADER - V2_FIXED;
        let at_limit = v2_raw(0x21, 0x00, &vec![0; limit]);
        check_header(&at_limit, Header::Local, b"");
        for (command, family) in [(0x21, 0x11), (0x21, 0x00), (0x20, 0x00)] {
            let mut over = v2_raw(command, family, &vec![0; limit + 1]);
            assert_eq!(parse(&over), Err(ParseError::TooLong));
            over.truncate(V2_FIXED);
            assert_eq!(parse(&over), Err(ParseError::TooLong));
        }
        let mut largest = V2_SIGNATURE.to_vec();
        largest.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&largest), Err(ParseError::TooLong));
    }

    #[test]
    fn errors_read_well() {
        let not = ParseError::NotProxyProtocol.to_string();
        assert!(not.contains("\"PROXY \"") && not.contains("QUIT"), "{not}");
        assert_eq!(
            ParseError::BadV1("x").to_string(),
            "malformed PROXY v1 header: x"
        );
        assert_eq!(
            ParseError::BadV2("y").to_string(),
            "malformed PROXY v2 header: y"
        );
        assert!(ParseError::TooLong.to_string().contains("4112"));
        let boxed: Box<dyn std::error::Error> = Box::new(ParseError::TooLong);
        assert!(boxed.source().is_none());
    }

    fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
        prop::array::uniform4(prop_oneof![Just(0u8), Just(255), any::<u8>()])
            .prop_map(Ipv4Addr::from)
    }

    fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            prop::array::uniform8(prop_oneof![Just(0u16), Just(0xffff), any::<u16>()])
                .prop_map(Ipv6Addr::from),
            ipv4().prop_map(|v4| v4.to_ipv6_mapped()),
        ]
    }

    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![Just(0u16), Just(u16::MAX), any::<u16>()]
    }

    fn header() -> BoxedStrategy<Header> {
        prop_oneof![
            Just(Header::Local),
            (ipv4(), ipv4(), port(), port()).prop_map(|(s, d, sp, dp)| Header::Proxied {
                source: SocketAddr::new(s.into(), sp),
                destination: SocketAddr::new(d.into(), dp),
            }),
            (ipv6(), ipv6(), port(), port()).prop_map(|(s, d, sp, dp)| Header::Proxied {
                source: SocketAddr::new(s.into(), sp),
                destination: SocketAddr::new(d.into(), dp),
            }),
        ]
        .boxed()
    }

    /// Valid headers of every kind, with the header each stands for.
    fn wire_header() -> BoxedStrategy<(Vec<u8>, Header)> {
        let bytes = |max| prop::collection::vec(any::<u8>(), 0..max);
        // Anything but CR and LF may follow UNKNOWN; 92 bytes keeps the line within 107.
        let tail = prop::collection::vec(
            any::<u8>().prop_map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            0..=92,
        );
        prop_oneof![
            header().prop_map(|h| (encode_v1(&h), h)),
            tail.prop_map(|tail| {
                let mut line = b"PROXY UNKNOWN".to_vec();
                line.extend(tail);
                line.extend_from_slice(b"\r\n");
                (line, Header::Local)
            }),
            (header(), bytes(300)).prop_map(|(h, tlvs)| (encode_v2(&h, &tlvs), h)),
            (any::<u8>(), bytes(300))
                .prop_map(|(family, block)| (v2_raw(0x20, family, &block), Header::Local)),
            (prop::sample::select(vec![0x00u8, 0x31, 0x32]), bytes(300))
                .prop_map(|(family, block)| (v2_raw(0x21, family, &block), Header::Local)),
        ]
        .boxed()
    }

    /// Mostly-valid input: a valid header with one byte changed, cut anywhere.
    fn damaged() -> BoxedStrategy<Vec<u8>> {
        (
            wire_header(),
            any::<prop::sample::Index>(),
            any::<u8>(),
            any::<prop::sample::Index>(),
        )
            .prop_map(|((mut wire, _), at, byte, cut)| {
                let at = at.index(wire.len());
                wire[at] = byte;
                wire.truncate(cut.index(wire.len() + 1));
                wire
            })
            .boxed()
    }

    /// Input of every sort: random bytes, random bytes after a signature, v1-like text.
    fn anything() -> BoxedStrategy<Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            (
                prop::sample::select(vec![V1_SIGNATURE, V2_SIGNATURE]),
                prop::collection::vec(any::<u8>(), 0..600),
            )
                .prop_map(|(signature, rest)| [signature, rest.as_slice()].concat()),
            "PROXY (TCP4|TCP6|UNKNOWN)[ 0-9a-f:.+\r\n]{0,120}".prop_map(String::into_bytes),
            damaged(),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn never_panics_and_stays_in_bounds(buf in anything()) {
            match parse(&buf) {
                Ok(Some((_, consumed))) => {
                    prop_assert!(consumed <= buf.len() && consumed <= MAX_HEADER);
                }
                Ok(None) => prop_assert!(buf.len() < MAX_HEADER),
                Err(_) => {}
            }
        }

        #[test]
        fn more_bytes_never_change_a_decision(buf in anything(), more in prop::collection::vec(any::<u8>(), 0..200)) {
            let extended = [buf.as_slice(), &more].concat();
            match parse(&buf) {
                Ok(Some(found)) => prop_assert_eq!(parse(&extended), Ok(Some(found))),
                Ok(None) => {}
                Err(_) => prop_assert!(parse(&extended).is_err()),
            }
        }

        #[test]
        fn valid_headers_parse_and_prefixes_wait(
            (wire, expected) in wire_header(),
            payload in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let full = [wire.as_slice(), &payload].concat();
            prop_assert_eq!(parse(&full), Ok(Some((expected, wire.len()))));
            for end in 0..wire.len() {
                prop_assert_eq!(parse(&full[..end]), Ok(None));
            }
        }

        #[test]
        fn encoders_round_trip(header in header(), tlvs in prop::collection::vec(any::<u8>(), 0..64)) {
            let v1 = encode_v1(&header);
            prop_assert!(v1.len() <= V1_MAX);
            prop_assert_eq!(parse(&v1), Ok(Some((header, v1.len()))));
            let v2 = encode_v2(&header, &tlvs);
            prop_assert_eq!(parse(&v2), Ok(Some((header, v2.len()))));
            // Encoding what was parsed gives back the same bytes.
            let (again, _) = parse(&v1).unwrap().unwrap();
            prop_assert_eq!(encode_v1(&again), v1);
            let (again, _) = parse(&v2).unwrap().unwrap();
            prop_assert_eq!(encode_v2(&again, &tlvs), v2);
        }
    }
}
