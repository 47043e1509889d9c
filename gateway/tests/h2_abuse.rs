//! HTTP/2 attacks against the gateway, written frame by frame on a raw connection (h2c with
//! prior knowledge, and over TLS with ALPN `h2`): rapid reset of 10,000 streams, an endless
//! CONTINUATION, a SETTINGS flood and a PING flood. Each must end with the attacker's
//! connection closed, the gateway's memory flat, and a well-behaved client on other
//! connections served throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::pki::Pki;
use support::upstream::Upstream;
use support::{GatewayOptions, TempDir, batch_sandbox, unique_loopback};

const TLS_PORT: u16 = 28443;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap();
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal, not Huffman-coded (lengths under 127).
fn literal(out: &mut Vec<u8>, text: &str) {
    out.push(u8::try_from(text.len()).unwrap());
    out.extend_from_slice(text.as_bytes());
}

/// A GET request's header block: `:method GET`, `:scheme http`, `:path /` from the static
/// table and `:authority` as a literal with an indexed name, never indexed.
fn request_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01];
    literal(&mut b, authority);
    b
}

/// One field `x-pad: <100 bytes>` as a literal with a literal name, never indexed.
fn padding_field(out: &mut Vec<u8>) {
    out.push(0x10);
    literal(out, "x-pad");
    literal(out, &"p".repeat(100));
}

trait Wire: Read + Write + Send {}
impl<T: Read + Write + Send> Wire for T {}

/// A raw HTTP/2 client connection, the preface and an empty SETTINGS sent.
struct Attacker {
    /// The socket, for its timeouts.
    tcp: TcpStream,
    io: Box<dyn Wire>,
}

impl Attacker {
    /// h2c with prior knowledge.
    fn plain(addr: SocketAddr) -> Attacker {
        let mut a = Attacker::plain_silent(addr);
        a.hello();
        a
    }

    /// h2c, nothing sent yet.
    fn plain_silent(addr: SocketAddr) -> Attacker {
        let tcp = TcpStream::connect(addr).unwrap();
        let io = Box::new(tcp.try_clone().unwrap());
        Attacker::on(tcp, io)
    }

    /// TLS with ALPN `h2` only.
    fn tls(addr: SocketAddr, pki: &Pki) -> Attacker {
        let mut a = Attacker::tls_silent(addr, pki);
        a.hello();
        a
    }

    /// TLS with ALPN `h2`, the handshake done and nothing sent after it.
    fn tls_silent(addr: SocketAddr, pki: &Pki) -> Attacker {
        let tcp = TcpStream::connect(SocketAddr::new(addr.ip(), TLS_PORT)).unwrap();
        let mut config = (*pki.client()).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = "gw.test".try_into().unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut io = rustls::StreamOwned::new(conn, tcp.try_clone().unwrap());
        tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        io.flush().unwrap();
        while io.conn.is_handshaking() {
            io.conn.complete_io(&mut io.sock).unwrap();
        }
        assert_eq!(io.conn.alpn_protocol(), Some(&b"h2"[..]));
        Attacker::on(tcp, Box::new(io))
    }

    fn on(tcp: TcpStream, io: Box<dyn Wire>) -> Attacker {
        tcp.set_nodelay(true).unwrap();
        tcp.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        Attacker { tcp, io }
    }

    /// The preface and an empty SETTINGS.
    fn hello(&mut self) {
        let mut hello = PREFACE.to_vec();
        frame(&mut hello, SETTINGS, 0, 0, &[]);
        assert!(self.send(&hello));
    }

    /// Writes `bytes`; false once the gateway has closed the connection (or stopped reading
    /// it for the write timeout).
    fn send(&mut self, bytes: &[u8]) -> bool {
        self.io
            .write_all(bytes)
            .and_then(|()| self.io.flush())
            .is_ok()
    }

    /// Reads what the gateway sends until it closes the connection, up to `within`; whether
    /// it closed, and whether a GOAWAY came first.
    fn closed_within(&mut self, within: Duration) -> (bool, bool) {
        closed_within(&self.tcp, &mut self.io, within)
    }
}

fn closed_within(tcp: &TcpStream, s: &mut impl Read, within: Duration) -> (bool, bool) {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    while Instant::now() < end {
        tcp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (true, has_goaway(&seen)),
            Ok(n) => {
                // Keep only the frame headers' worth at the end of a large stream of bytes.
                seen.extend_from_slice(&buf[..n]);
                if seen.len() > 1 << 20 {
                    seen.drain(..seen.len() - (1 << 16));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (true, has_goaway(&seen)),
        }
    }
    (false, has_goaway(&seen))
}

/// Whether a GOAWAY frame header appears in what the gateway sent (a frame-aligned scan from
/// the start when the bytes are whole, else a search for its fixed header shape).
fn has_goaway(bytes: &[u8]) -> bool {
    bytes
        .windows(9)
        .any(|w| w[3] == GOAWAY && w[5..9] == [0, 0, 0, 0] && w[0] == 0 && w[1] == 0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A gateway with one sandbox, and a well-behaved HTTP/1.1 client on its own connections
/// asking it in a loop while an attack runs.
struct Lab {
    gw: support::Gateway,
    pki: Pki,
    _up: Upstream,
    authority: String,
    _dir: TempDir,
}

impl Lab {
    /// A gateway with TLS on, and `extra` flags.
    fn start(extra: &[&str]) -> Lab {
        let dir = TempDir::new();
        let pki = Pki::new(dir.path());
        let (cert, key) = pki.leaf("gw", &["gw.test"], 20);
        let ip = unique_loopback();
        let up = Upstream::start(ip, 0);
        let file = dir.write(
            "s.yaml",
            &batch_sandbox("a", "ns", 1, Some(&format!(r#"["{ip}"]"#)), None),
        );
        let mut flags = vec![
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
        ];
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        let gw = support::Gateway::start(
            &file,
            GatewayOptions {
                extra: flags,
                ..Default::default()
            },
        );
        let authority = format!("a-{}.sandbox.test", up.addr.port());
        Lab {
            gw,
            pki,
            _up: up,
            authority,
            _dir: dir,
        }
    }

    /// Runs `attack` while a bystander sends requests on its own connections; returns the
    /// bystander's (successes, failures) and the gateway's RSS growth in KiB.
    fn under_attack(&self, attack: impl FnOnce()) -> (usize, usize, i64) {
        // Warm the gateway up so its steady state is what is measured.
        for _ in 0..50 {
            support::client::get(self.gw.addr, "/", &[("host", &self.authority)]);
        }
        let before = rss_kib(self.gw.child.id());
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let bystander = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let (addr, authority) = (self.gw.addr, self.authority.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let req = format!(
                        "GET /b HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
                    );
                    match support::client::raw(addr, req.as_bytes()) {
                        Ok(r) if r.status == 200 && r.complete => {
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let served_at_least = |n: usize| {
            let end = Instant::now() + Duration::from_secs(10);
            while ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < end, "the bystander made no progress");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        served_at_least(5);
        attack();
        // And after the attack, on the same gateway.
        let during = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        served_at_least(during + 5);
        stop.store(true, Ordering::Relaxed);
        bystander.join().unwrap();
        let after = rss_kib(self.gw.child.id());
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            i64::try_from(after).unwrap() - i64::try_from(before).unwrap(),
        )
    }
}

/// Asserts the outcome of one attack: the bystander was served, memory stayed flat.
fn assert_contained(name: &str, (ok, failed, grown): (usize, usize, i64)) {
    eprintln!("{name}: bystander {ok} ok, {failed} failed; gateway RSS grew {grown} KiB");
    assert_eq!(failed, 0, "{name}: the well-behaved client saw errors");
    assert!(ok > 0, "{name}: the well-behaved client was never served");
    assert!(grown < 16 * 1024, "{name}: RSS grew {grown} KiB");
}

/// Opens and at once cancels 10,000 streams, in batches of 100; asserts the connection ends.
fn rapid_reset(mut s: Attacker, authority: &str) {
    let block = request_block(authority);
    let mut sent = 0;
    let mut batch = Vec::new();
    let mut open = true;
    for stream in (1..20_000u32).step_by(2) {
        frame(
            &mut batch,
            HEADERS,
            END_STREAM | END_HEADERS,
            stream,
            &block,
        );
        frame(&mut batch, RST_STREAM, 0, stream, &8u32.to_be_bytes());
        sent += 1;
        if sent % 100 == 0 {
            if !s.send(&batch) {
                open = false;
                break;
            }
            batch.clear();
        }
    }
    let (closed, goaway) = if open {
        s.closed_within(Duration::from_secs(5))
    } else {
        (true, false)
    };
    eprintln!("rapid reset: {sent} streams written; closed: {closed}, GOAWAY seen: {goaway}");
    assert!(closed, "the attacker's connection is still open");
}

/// Sends `frames` (each batch of 1,000 alike) up to `total` times; asserts the connection ends.
fn flood(mut s: Attacker, name: &str, one: &[u8], total: usize) {
    let batch = one.repeat(1000);
    let mut sent = 0;
    while sent < total && s.send(&batch) {
        sent += 1000;
    }
    let (closed, _) = s.closed_within(Duration::from_secs(5));
    eprintln!("{name}: {sent} frames written; closed: {closed}");
    assert!(closed, "{name}: the attacker's connection is still open");
}

fn ping() -> Vec<u8> {
    let mut f = Vec::new();
    frame(&mut f, PING, 0, 0, &[1; 8]);
    f
}

fn settings() -> Vec<u8> {
    let mut f = Vec::new();
    frame(&mut f, SETTINGS, 0, 0, &[0, 0x3, 0, 0, 0, 100]);
    f
}

#[test]
fn rapid_reset_of_ten_thousand_streams_closes_the_connection() {
    let lab = Lab::start(&[]);
    // Ended by whichever bound comes first: the frame meter, or the HTTP/2 server's own limit
    // on streams reset before they are served.
    let outcome = lab.under_attack(|| rapid_reset(Attacker::plain(lab.gw.addr), &lab.authority));
    assert_contained("rapid reset", outcome);
    // Over TLS too.
    let outcome =
        lab.under_attack(|| rapid_reset(Attacker::tls(lab.gw.addr, &lab.pki), &lab.authority));
    assert_contained("rapid reset over TLS", outcome);
}

/// With the frame meter off, the HTTP/2 server's own bound on streams reset before they are
/// served (`--h2-max-pending-resets`) still ends the attack.
#[test]
fn rapid_reset_is_bounded_with_the_frame_meter_off() {
    let lab = Lab::start(&["--h2-max-control-frames-per-second", "0"]);
    let outcome = lab.under_attack(|| rapid_reset(Attacker::plain(lab.gw.addr), &lab.authority));
    assert_contained("rapid reset, meter off", outcome);
    // Not the meter: it is off and counted nothing.
    assert_eq!(lab.gw.metric("sandbox_gateway_h2_floods_total"), 0.0);
}

#[test]
fn an_endless_continuation_closes_the_connection() {
    let lab = Lab::start(&[]);
    let outcome = lab.under_attack(|| {
        let mut s = Attacker::plain(lab.gw.addr);
        let mut first = Vec::new();
        frame(
            &mut first,
            HEADERS,
            END_STREAM,
            1,
            &request_block(&lab.authority),
        );
        assert!(s.send(&first));
        // 16 KB CONTINUATION frames that never end the header block: up to 64 MiB. What is
        // written before the gateway stops is mostly socket buffers.
        let mut payload = Vec::new();
        while payload.len() < 16_000 {
            padding_field(&mut payload);
        }
        let mut cont = Vec::new();
        frame(&mut cont, CONTINUATION, 0, 1, &payload);
        let mut written = 0usize;
        while written < 64 << 20 && s.send(&cont) {
            written += cont.len();
        }
        let (closed, goaway) = s.closed_within(Duration::from_secs(5));
        eprintln!("continuation: {written} bytes written; closed: {closed}, GOAWAY: {goaway}");
        assert!(closed, "the attacker's connection is still open");
        assert!(
            written < 16 << 20,
            "the gateway read {written} bytes of one header block"
        );
    });
    assert_contained("continuation", outcome);
}

#[test]
fn settings_and_ping_floods_close_the_connection() {
    let lab = Lab::start(&[]);
    let outcome = lab.under_attack(|| {
        flood(
            Attacker::plain(lab.gw.addr),
            "settings",
            &settings(),
            100_000,
        )
    });
    assert_contained("settings flood", outcome);
    let outcome =
        lab.under_attack(|| flood(Attacker::plain(lab.gw.addr), "ping", &ping(), 100_000));
    assert_contained("ping flood", outcome);
    let outcome = lab.under_attack(|| {
        flood(
            Attacker::tls(lab.gw.addr, &lab.pki),
            "ping over TLS",
            &ping(),
            100_000,
        )
    });
    assert_contained("ping flood over TLS", outcome);
    assert_eq!(
        lab.gw
            .metric("sandbox_gateway_h2_floods_total{frame=\"settings\"}"),
        1.0
    );
    assert_eq!(
        lab.gw
            .metric("sandbox_gateway_h2_floods_total{frame=\"ping\"}"),
        2.0
    );
    lab.gw.wait_log("control frame flood");
}

/// The HTTP/2 slowloris: a client that stalls its preface or a request's header block is
/// closed at the header timeout, as a slow HTTP/1 header is, over TLS and h2c alike; one that
/// finished them and sits idle is not (the HTTP/2 idle timeout is its bound).
#[test]
fn a_stalled_preface_or_header_block_is_closed_at_the_header_timeout() {
    let lab = Lab::start(&["--header-timeout-seconds", "1"]);
    let block = request_block(&lab.authority);
    let mut stalled = Vec::new();
    // TLS done, no preface.
    stalled.push((
        "TLS, no preface",
        Attacker::tls_silent(lab.gw.addr, &lab.pki),
    ));
    // The preface, and no SETTINGS.
    let mut a = Attacker::plain_silent(lab.gw.addr);
    assert!(a.send(PREFACE));
    stalled.push(("preface only", a));
    // A header block that never ends (HEADERS without END_HEADERS), over TLS and h2c.
    for (name, mut a) in [
        (
            "open header block, TLS",
            Attacker::tls(lab.gw.addr, &lab.pki),
        ),
        ("open header block", Attacker::plain(lab.gw.addr)),
    ] {
        let mut f = Vec::new();
        frame(&mut f, HEADERS, END_STREAM, 1, &block);
        assert!(a.send(&f));
        stalled.push((name, a));
    }
    // A HEADERS frame whose payload stops half way.
    let mut a = Attacker::plain(lab.gw.addr);
    let mut f = Vec::new();
    frame(&mut f, HEADERS, END_STREAM | END_HEADERS, 1, &block);
    assert!(a.send(&f[..f.len() - 5]));
    stalled.push(("half a HEADERS frame", a));
    // Idle after a finished request: kept.
    let mut idle = Attacker::plain(lab.gw.addr);
    let mut f = Vec::new();
    frame(&mut f, HEADERS, END_STREAM | END_HEADERS, 1, &block);
    assert!(idle.send(&f));

    let started = Instant::now();
    for (name, a) in &mut stalled {
        let (closed, _) = a.closed_within(Duration::from_secs(5));
        assert!(closed, "{name}: still open");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let (closed, _) = idle.closed_within(Duration::from_secs(2));
    assert!(
        !closed,
        "an idle connection whose request was whole was closed"
    );
    assert_eq!(lab.gw.metric("sandbox_gateway_header_timeouts_total"), 5.0);
}

/// The limits leave ordinary HTTP/2 use alone: many streams, some cancelled, a few PINGs, on
/// one connection.
#[test]
fn ordinary_streams_and_a_few_cancellations_are_not_an_attack() {
    let lab = Lab::start(&[]);
    let mut s = Attacker::plain(lab.gw.addr);
    let block = request_block(&lab.authority);
    let mut out = Vec::new();
    for stream in (1..200u32).step_by(2) {
        frame(&mut out, HEADERS, END_STREAM | END_HEADERS, stream, &block);
        if stream % 20 == 1 {
            frame(&mut out, RST_STREAM, 0, stream, &8u32.to_be_bytes());
            out.extend_from_slice(&ping());
        }
    }
    assert!(s.send(&out));
    // 100 streams, 10 cancelled: at least 90 answered, the connection kept.
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let end = Instant::now() + Duration::from_secs(10);
    let mut ends = 0;
    while ends < 90 && Instant::now() < end {
        s.tcp
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.io.read(&mut buf) {
            Ok(0) => panic!("the gateway closed an ordinary connection"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{e}"),
        }
        ends = count_stream_ends(&got);
    }
    assert!(ends >= 90, "{ends} streams answered");
    assert!(!has_goaway(&got));
    assert_eq!(lab.gw.metric("sandbox_gateway_h2_floods_total"), 0.0);
}

/// Stream ends (DATA or HEADERS with END_STREAM on a stream) in a frame-aligned byte stream of
/// server frames.
fn count_stream_ends(bytes: &[u8]) -> usize {
    let mut at = 0;
    let mut ends = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        let (kind, flags) = (bytes[at + 3], bytes[at + 4]);
        let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        if at + 9 + len > bytes.len() {
            break;
        }
        if stream != 0 && (kind == DATA || kind == HEADERS) && flags & END_STREAM != 0 {
            ends += 1;
        }
        at += 9 + len;
    }
    ends
}
