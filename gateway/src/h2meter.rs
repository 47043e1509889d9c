//! A meter on the frames an HTTP/2 client sends, read off the connection's bytes before
//! Pingora's HTTP/2 server (the `h2` crate) sees them. It does two jobs:
//!
//! - **Floods.** `h2` answers every SETTINGS and PING and takes every PRIORITY and RST_STREAM,
//!   each cheap alone; sent without end they cost the gateway CPU and output for nothing. Each
//!   connection gets a budget of such frames at a steady rate with a burst of ten seconds' worth
//!   (a GCRA: nothing banked while the connection is quiet beyond that burst), and is ended when
//!   it runs out. Requests, bodies and WINDOW_UPDATEs are not metered: the stream limit, flow
//!   control and `h2`'s own bounds on rapid reset and header size cover them.
//! - **Slow headers.** It tells the stream wrapper when the client owes the header deadline:
//!   until its preface and first frame (SETTINGS) are in, and while a request's header block
//!   is being sent (a HEADERS frame, through the CONTINUATION that ends it). An idle connection
//!   owes nothing; `--h2-idle-timeout-seconds` bounds it.

use std::time::{Duration, Instant};

/// Frame types and flags (RFC 9113, section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FRAME_HEADER: usize = 9;
/// The client connection preface, which comes before the first frame.
const PREFACE_LEN: usize = 24;
/// Seconds of the steady rate a connection may spend at once.
const BURST: Duration = Duration::from_secs(10);

/// The frames that ended a connection, for the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    Settings,
    Ping,
    Priority,
    Reset,
    EmptyData,
}

impl Flood {
    pub fn label(self) -> &'static str {
        match self {
            Flood::Settings => "settings",
            Flood::Ping => "ping",
            Flood::Priority => "priority",
            Flood::Reset => "rst_stream",
            Flood::EmptyData => "empty_data",
        }
    }
}

#[derive(Debug)]
pub struct FrameMeter {
    /// The time one metered frame costs (`1 s / --h2-max-control-frames-per-second`); `None`:
    /// no budget.
    interval: Option<Duration>,
    /// When the frames spent so far are paid off (GCRA's theoretical arrival time); a frame
    /// is refused when it would push this more than [`BURST`] past now.
    paid_until: Instant,
    /// Bytes still to pass before the next frame header (the preface, then each payload).
    skip: usize,
    /// A frame header read in part.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// The preface and the first whole frame are in.
    started: bool,
    /// A frame header has been read (the first frame is under way or done).
    framed: bool,
    /// A request's header block is being sent.
    block_open: bool,
    /// The frame being read ends the header block (END_HEADERS).
    ends_block: bool,
    /// Header blocks opened so far: each starts the header deadline afresh.
    blocks: u64,
}

impl FrameMeter {
    /// A meter for a connection whose first bytes are the client preface; `rate` 0 meters no
    /// flood (the header deadline is still told).
    pub fn new(rate: u32, now: Instant) -> Self {
        Self {
            interval: (rate > 0).then(|| Duration::from_secs(1) / rate),
            paid_until: now,
            skip: PREFACE_LEN,
            header: [0; FRAME_HEADER],
            have: 0,
            started: false,
            framed: false,
            block_open: false,
            ends_block: false,
            blocks: 0,
        }
    }

    /// Whether the client owes the header deadline: its preface and first frame, or the rest
    /// of a header block.
    pub fn header_pending(&self) -> bool {
        !self.started || self.block_open
    }

    /// How many header blocks the client has opened (a new one restarts the deadline).
    pub fn blocks_opened(&self) -> u64 {
        self.blocks
    }

    /// Reads `bytes` (the next the client sent, at `now`); `Err` once a kind of frame ran the
    /// budget out.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = bytes.get(n..).unwrap_or_default();
                if self.skip == 0 {
                    self.frame_done();
                }
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n]
                .copy_from_slice(bytes.get(..n).unwrap_or_default());
            self.have += n;
            bytes = bytes.get(n..).unwrap_or_default();
            if self.have < FRAME_HEADER {
                break;
            }
            self.have = 0;
            self.framed = true;
            let [l0, l1, l2, kind, flags, ..] = self.header;
            let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            self.skip = len;
            if matches!(kind, HEADERS | CONTINUATION) {
                if kind == HEADERS && !self.block_open {
                    self.block_open = true;
                    self.blocks += 1;
                }
                self.ends_block = flags & FLAG_END_HEADERS != 0;
            }
            if let Some(flood) = metered(kind, flags, len) {
                self.spend(flood, now)?;
            }
            if len == 0 {
                self.frame_done();
            }
        }
        Ok(())
    }

    /// The payload of a frame (or the preface) has been read whole.
    fn frame_done(&mut self) {
        self.started |= self.framed;
        if self.ends_block {
            self.block_open = false;
            self.ends_block = false;
        }
    }

    fn spend(&mut self, flood: Flood, now: Instant) -> Result<(), Flood> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        let paid_until = self.paid_until.max(now) + interval;
        if paid_until > now + BURST {
            return Err(flood);
        }
        self.paid_until = paid_until;
        Ok(())
    }
}

/// Which frames draw on the budget: those the server must answer or act on that carry no
/// request and no data.
fn metered(kind: u8, flags: u8, len: usize) -> Option<Flood> {
    match kind {
        SETTINGS if flags & FLAG_ACK == 0 => Some(Flood::Settings),
        PING if flags & FLAG_ACK == 0 => Some(Flood::Ping),
        PRIORITY => Some(Flood::Priority),
        RST_STREAM => Some(Flood::Reset),
        DATA if len == 0 && flags & FLAG_END_STREAM == 0 => Some(Flood::EmptyData),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        out.extend_from_slice(payload);
        out
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for f in frames {
            out.extend_from_slice(f);
        }
        out
    }

    /// A meter and a clock the test moves itself.
    fn meter(rate: u32) -> (FrameMeter, Instant) {
        let t0 = Instant::now();
        (FrameMeter::new(rate, t0), t0)
    }

    #[test]
    fn a_flood_runs_the_budget_out_and_ordinary_traffic_does_not() {
        // Requests and data, however many, cost nothing; their payloads are skipped whole,
        // even when they look like frames.
        let fake_ping = frame(PING, 0, &[0; 8]);
        let mut ordinary = vec![frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100])];
        for _ in 0..1000 {
            ordinary.push(frame(HEADERS, FLAG_END_HEADERS, b"block"));
            ordinary.push(frame(DATA, 0, &fake_ping.repeat(3)));
            ordinary.push(frame(SETTINGS, FLAG_ACK, &[]));
            ordinary.push(frame(0x8, 0, &[0, 0, 1, 0]));
        }
        let (mut m, t0) = meter(10);
        assert_eq!(m.feed(&connection(&ordinary), t0), Ok(()));
        // The burst is ten seconds' worth: 100 frames (the SETTINGS and 99 PINGs) pass, the
        // next is a flood.
        let pings = frame(PING, 0, &[0; 8]).repeat(99);
        assert_eq!(m.feed(&pings, t0), Ok(()));
        assert_eq!(m.feed(&frame(PING, 0, &[0; 8]), t0), Err(Flood::Ping));
        let (mut m, t0) = meter(1);
        let settings = connection(&[frame(SETTINGS, 0, &[]).repeat(11)]);
        assert_eq!(m.feed(&settings, t0), Err(Flood::Settings));
    }

    #[test]
    fn frames_split_anywhere_are_read_the_same() {
        let bytes = connection(&[frame(RST_STREAM, 0, &[0, 0, 0, 8]).repeat(25)]);
        // Rate 2: a burst of 20; the 21st reset fails, in the chunk holding its header's end.
        let header_end = PREFACE_LEN + 20 * 13 + FRAME_HEADER;
        for size in [1, 2, 7, 9, 10, 13, 33, 4096] {
            let (mut m, t0) = meter(2);
            let mut fed = 0;
            let failed = bytes.chunks(size).find_map(|chunk| {
                fed += chunk.len();
                m.feed(chunk, t0).err()
            });
            assert_eq!(failed, Some(Flood::Reset), "chunks of {size}");
            assert!(
                fed >= header_end && fed < header_end + size,
                "chunks of {size}: {fed}"
            );
        }
    }

    #[test]
    fn the_budget_refills_with_time_and_zero_meters_nothing() {
        let (mut m, t0) = meter(1000);
        let burst = frame(PING, 0, &[0; 8]).repeat(10_000);
        assert_eq!(m.feed(&connection(&[burst]), t0), Ok(()));
        assert!(m.feed(&frame(PING, 0, &[0; 8]), t0).is_err());
        let later = t0 + Duration::from_millis(20);
        assert_eq!(m.feed(&frame(PING, 0, &[0; 8]), later), Ok(()));
        let (mut off, t0) = meter(0);
        let flood = frame(SETTINGS, 0, &[]).repeat(100_000);
        assert_eq!(off.feed(&connection(&[flood]), t0), Ok(()));
    }

    #[test]
    fn quiet_time_is_not_banked_beyond_the_burst() {
        // A connection quiet for 100 s at 10 frames a second has earned 1,000, but may spend
        // only the burst of 100 at once.
        let (mut m, t0) = meter(10);
        assert_eq!(m.feed(&connection(&[]), t0), Ok(()));
        let later = t0 + Duration::from_secs(100);
        let pings = frame(PING, 0, &[0; 8]).repeat(100);
        assert_eq!(m.feed(&pings, later), Ok(()));
        assert_eq!(m.feed(&frame(PING, 0, &[0; 8]), later), Err(Flood::Ping));
    }

    #[test]
    fn the_header_deadline_is_owed_for_the_preface_and_each_header_block() {
        let (mut m, t0) = meter(100);
        let mut feed = |bytes: &[u8]| {
            m.feed(bytes, t0).unwrap();
            (m.header_pending(), m.blocks_opened())
        };
        assert_eq!(feed(b"PRI * HTTP/2.0\r\n\r\nSM"), (true, 0));
        assert_eq!(feed(b"\r\n\r\n"), (true, 0), "no frame yet");
        let settings = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        assert_eq!(feed(&settings[..12]), (true, 0), "the first frame in part");
        assert_eq!(
            feed(&settings[12..]),
            (false, 0),
            "started; idle owes nothing"
        );
        // A header block over three frames, the last read in two pieces.
        assert_eq!(feed(&frame(HEADERS, 0, b"ab")), (true, 1));
        assert_eq!(feed(&frame(CONTINUATION, 0, b"cd")), (true, 1));
        let last = frame(CONTINUATION, FLAG_END_HEADERS, b"efgh");
        assert_eq!(feed(&last[..10]), (true, 1));
        assert_eq!(feed(&last[10..]), (false, 1));
        // Bodies and control frames owe nothing; the next request opens a second block.
        assert_eq!(feed(&frame(DATA, FLAG_END_STREAM, b"body")), (false, 1));
        let whole = frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, b"ij");
        assert_eq!(feed(&whole[..9]), (true, 2), "its payload still owed");
        assert_eq!(feed(&whole[9..]), (false, 2));
    }
}
