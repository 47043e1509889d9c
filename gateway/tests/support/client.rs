//! A small blocking HTTP/1.1 client over raw TCP: it sends exactly the bytes a test gives and
//! reports whether the response framing completed, which is what truncation tests need.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Content-Length satisfied or the chunked terminator seen.
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// A header as the echo upstream received it.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.echo()["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
            .and_then(|h| h[1].as_str().map(str::to_owned))
    }
    /// The echo upstream's JSON view of the request it received.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {} {}", self.status, self.body_text()))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response read until the connection closed.
pub fn parse(raw: &[u8]) -> io::Result<Response> {
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        io::Error::other(format!(
            "no header end in {:?}",
            String::from_utf8_lossy(raw)
        ))
    })?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
        complete: false,
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut pos = 0;
        while let Some(line_end) = find(&rest[pos..], b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[pos..pos + line_end]).into_owned();
            let Ok(size) =
                usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            else {
                break;
            };
            pos += line_end + 2;
            if size == 0 {
                resp.complete = true;
                break;
            }
            if rest.len() < pos + size + 2 {
                resp.body.extend_from_slice(&rest[pos.min(rest.len())..]);
                break;
            }
            resp.body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    } else if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body = rest[..len.min(rest.len())].to_vec();
        resp.complete = rest.len() >= len;
    } else {
        resp.body = rest.to_vec();
        resp.complete = true;
    }
    Ok(resp)
}

/// Reads one response off a kept-alive connection: until [`parse`] finds it complete.
pub fn read_response(s: &mut impl Read) -> io::Result<Response> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(resp) = parse(&buf)
            && resp.complete
        {
            return Ok(resp);
        }
    }
}

/// Sends raw bytes and reads until the server closes (or the timeout passes).
pub fn raw(addr: SocketAddr, request: &[u8]) -> io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(request)?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => {}
        // A reset after the response is still a response; a test checks `complete`.
        Err(e) if !buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    parse(&buf)
}

/// A request with `Connection: close`; `headers` are sent as given, in order.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: gateway.test\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, b"")
}

pub fn blocking_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}
