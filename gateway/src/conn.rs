//! Downstream connections with a deadline on the request header: a client must deliver a
//! whole header within the header timeout, however it spaces its bytes (slowloris defence).
//! Pingora only bounds each single read, so the deadline lives in a stream wrapper. On a new
//! connection one deadline covers the PROXY header, the TLS handshake and the first request
//! header together: each step spends what the one before left. On an HTTP/2 connection the
//! deadline covers the client's preface and first frame and each header block, and the same
//! wrapper meters its control frames (see `h2meter`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::socket::SocketAddr as L4SocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::h2meter::FrameMeter;
use crate::lean::{Lean, Served};
use crate::proxy_protocol::{self, Header, ParseError};

/// Where the connection is in reading a request header.
#[derive(Debug)]
enum Phase {
    /// Idle between requests: the deadline is the keep-alive timeout.
    Idle,
    /// Inside a header, under the header deadline.
    Header(HeaderScan),
    /// Header complete: body and upgraded traffic are bounded by the proxy's own timeouts.
    Body,
}

/// Finds the end of a request header the way HTTP parsers read one: blank lines before the
/// request line are skipped (so they count as header bytes, under the deadline, and cannot end
/// the header), lines end with LF or CRLF, and the first empty line after the request line ends
/// the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderScan {
    /// A non-blank byte has been seen: the request line has begun.
    started: bool,
    /// Nothing but CR on the current line so far.
    line_empty: bool,
}

impl Default for HeaderScan {
    fn default() -> Self {
        Self {
            started: false,
            line_empty: true,
        }
    }
}

impl HeaderScan {
    /// Feeds bytes; the index just past the header's end when it ends within them.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if self.started && self.line_empty => return Some(i + 1),
                b'\n' => self.line_empty = true,
                b'\r' => {}
                _ => {
                    self.started = true;
                    self.line_empty = false;
                }
            }
        }
        None
    }
}

#[derive(Debug)]
pub struct DeadlineStream {
    inner: Stream,
    timeout: Duration,
    keepalive: Duration,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Set when a request finished, so the next bytes start a new header.
    next_request: AtomicBool,
    /// Bytes read once and put back (see [`DeadlineStream::rewind`]), served before the socket.
    rewound: Vec<u8>,
    /// Set once the connection is HTTP/2: its frames are metered, and the header deadline runs
    /// while the meter says a preface or header block is owed.
    h2: Option<FrameMeter>,
    /// The control-frame rate for an h2c connection found by [`Peek::try_peek`]; `None`: h2c
    /// is off, so the preface is not treated as HTTP/2.
    h2c_rate: Option<u32>,
    /// The header deadline passed: counted once, however often the connection is read after.
    timed_out: bool,
}

impl DeadlineStream {
    /// A connection whose first request header is owed by `due`; later ones get `timeout`
    /// each, from their first byte.
    pub fn new(inner: Stream, timeout: Duration, keepalive: Duration, due: Instant) -> Self {
        Self {
            inner,
            timeout,
            keepalive,
            phase: Phase::Header(HeaderScan::default()),
            deadline: Box::pin(tokio::time::sleep_until(due)),
            next_request: AtomicBool::new(false),
            rewound: Vec::new(),
            h2: None,
            h2c_rate: None,
            timed_out: false,
        }
    }

    /// With h2c on: a connection that opens with the HTTP/2 preface is metered at `rate`
    /// control frames a second.
    pub fn with_h2c(mut self, rate: Option<u32>) -> Self {
        self.h2c_rate = rate;
        self
    }

    /// A connection that is HTTP/2 from its first byte (ALPN `h2`), metered at `rate`; its
    /// preface and first frame are owed by `due`, each later header block within `timeout`.
    pub fn h2(inner: Stream, rate: u32, timeout: Duration, due: Instant) -> Self {
        let mut s = Self::new(inner, timeout, timeout, due);
        s.phase = Phase::Body;
        s.h2 = Some(FrameMeter::new(rate, Instant::now().into_std()));
        s
    }

    /// Puts back the bytes of a request header the lean path read but leaves to the full path,
    /// which reads them again as if fresh. The header deadline keeps running.
    pub fn rewind(&mut self, bytes: Vec<u8>) {
        if let Phase::Header(_) | Phase::Body = self.phase {
            self.phase = Phase::Header(HeaderScan::default());
        }
        self.rewound = bytes;
    }

    /// Called when a request on this connection is finished.
    pub fn request_done(&self) {
        self.next_request.store(true, Ordering::Release);
    }

    /// Advances the header scanner over newly read bytes.
    fn scan(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if matches!(self.phase, Phase::Idle) {
            self.phase = Phase::Header(HeaderScan::default());
            let at = Instant::now() + self.timeout;
            self.deadline.as_mut().reset(at);
        }
        if let Phase::Header(scan) = &mut self.phase
            && scan.feed(bytes).is_some()
        {
            self.phase = Phase::Body;
        }
    }

    /// The read error of a passed header deadline, counted on the first such read.
    fn time_out(&mut self, what: &'static str) -> io::Error {
        if !std::mem::replace(&mut self.timed_out, true) {
            crate::metrics::metrics().header_timeouts.inc();
        }
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    /// An HTTP/2 connection's read: the bytes pass through the frame meter.
    fn poll_read_h2(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.h2.as_ref().is_some_and(FrameMeter::header_pending)
            && self.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(self.time_out(
                "HTTP/2 preface or request header not received within the header timeout",
            )));
        }
        let before = buf.filled().len();
        if self.rewound.is_empty() {
            let res = Pin::new(&mut self.inner).poll_read(cx, buf);
            if !matches!(res, Poll::Ready(Ok(()))) {
                return res;
            }
        } else {
            let n = self.rewound.len().min(buf.remaining());
            buf.put_slice(self.rewound.get(..n).unwrap_or_default());
            self.rewound.drain(..n);
        }
        let Some(meter) = self.h2.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let now = Instant::now();
        let opened = meter.blocks_opened();
        let fed = meter.feed(&buf.filled()[before..], now.into_std());
        if meter.blocks_opened() != opened {
            // A new header block: it is owed within the header timeout from now.
            self.deadline.as_mut().reset(now + self.timeout);
        }
        match fed {
            Ok(()) => Poll::Ready(Ok(())),
            Err(flood) => {
                crate::metrics::metrics()
                    .h2_floods
                    .with_label_values(&[flood.label()])
                    .inc();
                let client = self
                    .inner
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().map(ToString::to_string));
                tracing::info!(
                    frames = flood.label(),
                    client,
                    "HTTP/2 connection closed: control frame flood"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 control frame flood",
                )))
            }
        }
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.h2.is_some() {
            return this.poll_read_h2(cx, buf);
        }
        if this.next_request.swap(false, Ordering::AcqRel) {
            this.phase = Phase::Idle;
            let at = Instant::now() + this.keepalive;
            this.deadline.as_mut().reset(at);
        }
        match this.phase {
            Phase::Header(_) if this.deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(
                    this.time_out("request header not received within the header timeout")
                ));
            }
            // An idle keep-alive connection past its timeout reads as closed by the client.
            Phase::Idle if this.deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Ok(()));
            }
            _ => {}
        }
        let before = buf.filled().len();
        if !this.rewound.is_empty() {
            let n = this.rewound.len().min(buf.remaining());
            buf.put_slice(this.rewound.get(..n).unwrap_or_default());
            this.rewound.drain(..n);
            this.scan(&buf.filled()[before..]);
            return Poll::Ready(Ok(()));
        }
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            this.scan(&buf.filled()[before..]);
        }
        res
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    /// Reads the first bytes of the connection and puts them back, for the h2c check: stops
    /// as soon as they differ from the HTTP/2 preface, so a short HTTP/1 request is never
    /// waited on for bytes that will not come. The header deadline applies to the reading.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        use tokio::io::AsyncReadExt;
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut have: Vec<u8> = Vec::with_capacity(buf.len());
        let mut chunk = vec![0u8; buf.len()];
        while have.len() < buf.len() && PREFACE.starts_with(&have) {
            let n = self.read(&mut chunk[..buf.len() - have.len()]).await?;
            if n == 0 {
                break;
            }
            have.extend_from_slice(&chunk[..n]);
        }
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        if let Some(rate) = self.h2c_rate
            && have.starts_with(PREFACE)
        {
            // h2c: from here the frames are metered from the preface on, and the deadline
            // (still the one of the connection's start) covers the preface, the first frame
            // and each header block, not the HTTP/1 header.
            self.phase = Phase::Body;
            self.h2 = Some(FrameMeter::new(rate, Instant::now().into_std()));
        }
        // Ahead of whatever was already put back and not read here.
        let rest = std::mem::take(&mut self.rewound);
        have.extend_from_slice(&rest);
        self.rewind(have);
        Ok(true)
    }
}

/// Reads the PROXY protocol header off a fresh TCP connection, by `due`, and makes its
/// source the connection's peer address; the bytes after the header are put back for the HTTP
/// parser (or the TLS handshake). A failure is counted and logged; `Err` is its metric reason.
async fn read_proxy_header(l4: &mut L4Stream, due: Instant) -> Result<(), &'static str> {
    let read = tokio::time::timeout_at(due, read_proxy_header_now(l4)).await;
    read.unwrap_or(Err("timeout")).inspect_err(|reason| {
        crate::metrics::metrics()
            .proxy_protocol_errors
            .with_label_values(&[reason])
            .inc();
        tracing::debug!(reason, "connection closed: no valid PROXY protocol header");
    })
}

async fn read_proxy_header_now(l4: &mut L4Stream) -> Result<(), &'static str> {
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;

    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = l4.read(&mut chunk).await.map_err(|_| "read_error")?;
        if n == 0 {
            return Err("closed");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match proxy_protocol::parse(&buf) {
            Ok(Some((header, used))) => {
                l4.rewind(buf.get(used..).unwrap_or_default());
                if let Header::Proxied { source, .. } = header {
                    let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
                    let _ = digest.peer_addr.set(Some(L4SocketAddr::Inet(source)));
                    l4.set_socket_digest(digest);
                }
                return Ok(());
            }
            Ok(None) if buf.len() < proxy_protocol::MAX_HEADER => {}
            Ok(None) | Err(ParseError::TooLong) => return Err("too_long"),
            Err(ParseError::NotProxyProtocol) => return Err("missing"),
            Err(_) => return Err("malformed"),
        }
    }
}

/// The TLS handshake, finished by `due` (a client that opens connections and never
/// finishes a handshake holds each for the header timeout, not the TLS library's minute).
async fn tls_handshake(acceptor: &Acceptor, stream: Stream, due: Instant) -> Option<Stream> {
    let m = crate::metrics::metrics();
    let Ok(l4) = stream.into_any().downcast::<L4Stream>() else {
        tracing::warn!("TLS on a connection that is not TCP; closed");
        return None;
    };
    match tokio::time::timeout_at(due, acceptor.tls_handshake(*l4)).await {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            m.tls_handshake_errors.with_label_values(&["failed"]).inc();
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            m.tls_handshake_errors.with_label_values(&["timeout"]).inc();
            tracing::debug!("TLS handshake not finished within the header timeout");
            None
        }
    }
}

/// Marks the request on `stream` finished, if it is one of ours.
pub fn request_done(stream: Option<&Stream>) {
    if let Some(s) = stream.and_then(|s| s.as_any().downcast_ref::<DeadlineStream>()) {
        s.request_done();
    }
}

/// A server app that wraps each accepted connection in a [`DeadlineStream`], after reading
/// its PROXY protocol header when the listener expects one and, on the TLS port, running the
/// handshake.
pub struct HeaderDeadline<A> {
    pub inner: Arc<A>,
    pub timeout: Duration,
    pub keepalive: Duration,
    /// Every connection starts with a PROXY protocol header (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// Serves plain HTTP/1.1 requests before `inner` sees the connection (`--lean-path`).
    pub lean: Option<Lean>,
    /// HTTP/2 control frames a client may send a second (`--h2-max-control-frames-per-second`).
    pub h2_control_rate: u32,
    /// h2c with prior knowledge is served on the plain port.
    pub h2c: bool,
    /// The TLS listener: its port, and the acceptor for its handshakes.
    pub tls: Option<(u16, Arc<Acceptor>)>,
}

impl<A> HeaderDeadline<A> {
    /// The TLS acceptor when `stream` came in on the TLS port.
    fn tls_for(&self, stream: &Stream) -> Option<&Acceptor> {
        let (port, acceptor) = self.tls.as_ref()?;
        let digest = stream.get_socket_digest()?;
        let local = digest.local_addr()?.as_inet()?.port();
        (local == *port).then_some(acceptor.as_ref())
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let tls = self.tls_for(&stream);
        // One budget from accept: the PROXY header, the handshake and the first request
        // header all arrive by `due`, so stalling each in turn gains a client nothing.
        let due = Instant::now() + self.timeout;
        // The PROXY header comes first, before a TLS handshake too.
        let stream = if self.proxy_protocol {
            let mut l4 = match stream.into_any().downcast::<L4Stream>() {
                Ok(l4) => l4,
                Err(_) => {
                    tracing::warn!("PROXY protocol on a connection that is not TCP; closed");
                    return None;
                }
            };
            read_proxy_header(&mut l4, due).await.ok()?;
            l4
        } else {
            stream
        };
        let stream = match tls {
            Some(acceptor) => tls_handshake(acceptor, stream, due).await?,
            None => stream,
        };
        // HTTP/2 chosen in the TLS handshake: Pingora's HTTP/2 server takes the connection
        // (its own limits bound the streams), the preface and header blocks under the header
        // deadline and the control frames metered.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let metered = DeadlineStream::h2(stream, self.h2_control_rate, self.timeout, due);
            return self.inner.process_new(Box::new(metered), shutdown).await;
        }
        let mut wrapped = DeadlineStream::new(stream, self.timeout, self.keepalive, due)
            .with_h2c(self.h2c.then_some(self.h2_control_rate));
        if let Some(lean) = &self.lean
            && let Served::Closed = lean.serve(&mut wrapped, shutdown).await
        {
            return None;
        }
        self.inner.process_new(Box::new(wrapped), shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderScan;
    use proptest::prelude::*;

    fn ends_at(chunks: &[&[u8]]) -> Option<usize> {
        let mut scan = HeaderScan::default();
        let mut offset = 0;
        for chunk in chunks {
            if let Some(at) = scan.feed(chunk) {
                return Some(offset + at);
            }
            offset += chunk.len();
        }
        None
    }

    #[test]
    fn header_ends_at_the_first_empty_line_after_the_request_line() {
        let crlf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(ends_at(&[crlf]), Some(crlf.len() - 4));
        let lf = b"GET / HTTP/1.1\nHost: a\n\nbody";
        assert_eq!(ends_at(&[lf]), Some(lf.len() - 4));
        let leading = b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(ends_at(&[leading]), Some(leading.len()));
        // Blank lines alone never end a header: they are what a slowloris client sends.
        assert_eq!(ends_at(&[b"\r\n\r\n\r\n\n\n\r\n"]), None);
        assert_eq!(ends_at(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
    }

    proptest! {
        #[test]
        fn blank_lines_never_end_a_header(lines in proptest::collection::vec(prop_oneof![Just("\r\n"), Just("\n"), Just("\r")], 0..200)) {
            let text = lines.concat();
            prop_assert_eq!(ends_at(&[text.as_bytes()]), None);
        }

        #[test]
        fn a_header_ends_where_it_ends_however_it_is_split(
            blank in proptest::collection::vec(prop_oneof![Just("\r\n"), Just("\n")], 0..5),
            fields in proptest::collection::vec("[A-Za-z-]{1,10}: [ -~]{0,20}", 0..6),
            crlf: bool,
            body in "[ -~\r\n]{0,40}",
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut header = blank.concat();
            header.push_str("GET / HTTP/1.1");
            header.push_str(eol);
            for f in &fields {
                header.push_str(f.trim_end());
                header.push_str(eol);
            }
            header.push_str(eol);
            let text = format!("{header}{body}");
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for p in points {
                chunks.push(&bytes[last..p]);
                last = p;
            }
            chunks.push(&bytes[last..]);
            prop_assert_eq!(ends_at(&chunks), Some(header.len()));
        }
    }
}
