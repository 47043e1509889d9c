//! A meter on the frames an HTTP/2 client sends, read off the connection's bytes before
//! Pingora's HTTP/2 server (the `h2` crate) sees them. `h2` answers every SETTINGS and PING
//! and takes every PRIORITY and RST_STREAM, each cheap alone; sent without end they cost the
//! gateway CPU and output for nothing (SETTINGS and PING floods). The meter gives each
//! connection a budget of such frames, refilled at a steady rate with a burst of ten seconds'
//! worth, and ends the connection when it runs out.
//!
//! Requests, bodies and WINDOW_UPDATEs are not metered: the stream limit, flow control and
//! `h2`'s own bounds on rapid reset and header size cover them.

use std::time::Instant;

/// Frame types (RFC 9113, section 6).
const DATA: u8 = 0x0;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_STREAM: u8 = 0x1;
const FRAME_HEADER: usize = 9;
/// The client connection preface, which comes before the first frame.
const PREFACE_LEN: usize = 24;
/// Seconds of the steady rate a connection may spend at once.
const BURST_SECONDS: u32 = 10;

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
    /// Frames a second the budget refills by (`--h2-max-control-frames-per-second`).
    rate: u32,
    /// Frames that may be sent now, scaled by 1000 for sub-frame refills.
    tokens_milli: u64,
    refilled: Instant,
    /// Bytes still to pass before the next frame header (the preface, then each payload).
    skip: usize,
    /// A frame header read in part.
    header: [u8; FRAME_HEADER],
    have: usize,
}

impl FrameMeter {
    /// A meter for a connection whose first bytes are the client preface; `rate` 0 meters
    /// nothing.
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            tokens_milli: u64::from(rate) * u64::from(BURST_SECONDS) * 1000,
            refilled: Instant::now(),
            skip: PREFACE_LEN,
            header: [0; FRAME_HEADER],
            have: 0,
        }
    }

    /// Reads `bytes` (the next the client sent); `Err` once a kind of frame ran the budget out.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Flood> {
        if self.rate == 0 {
            return Ok(());
        }
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = bytes.get(n..).unwrap_or_default();
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
            let [l0, l1, l2, kind, flags, ..] = self.header;
            let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            self.skip = len;
            if let Some(flood) = metered(kind, flags, len) {
                self.spend(flood)?;
            }
        }
        Ok(())
    }

    fn spend(&mut self, flood: Flood) -> Result<(), Flood> {
        if self.tokens_milli < 1000 {
            let now = Instant::now();
            let elapsed = now.duration_since(self.refilled);
            self.refilled = now;
            let cap = u64::from(self.rate) * u64::from(BURST_SECONDS) * 1000;
            let earned = u64::try_from(elapsed.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(self.rate));
            self.tokens_milli = self.tokens_milli.saturating_add(earned).min(cap);
            if self.tokens_milli < 1000 {
                return Err(flood);
            }
        }
        self.tokens_milli -= 1000;
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

    #[test]
    fn a_flood_runs_the_budget_out_and_ordinary_traffic_does_not() {
        // Requests and data, however many, cost nothing; their payloads are skipped whole,
        // even when they look like frames.
        let fake_ping = frame(PING, 0, &[0; 8]);
        let mut ordinary = vec![frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100])];
        for _ in 0..1000 {
            ordinary.push(frame(0x1, 0x4, b"block"));
            ordinary.push(frame(DATA, 0, &fake_ping.repeat(3)));
            ordinary.push(frame(SETTINGS, FLAG_ACK, &[]));
            ordinary.push(frame(0x8, 0, &[0, 0, 1, 0]));
        }
        let mut meter = FrameMeter::new(10);
        assert_eq!(meter.feed(&connection(&ordinary)), Ok(()));
        // The burst is ten seconds' worth: 100 PINGs pass, the next is a flood.
        let pings = frame(PING, 0, &[0; 8]).repeat(99);
        assert_eq!(meter.feed(&pings), Ok(()));
        assert_eq!(meter.feed(&frame(PING, 0, &[0; 8])), Err(Flood::Ping));
        let mut meter = FrameMeter::new(1);
        let settings = connection(&[frame(SETTINGS, 0, &[]).repeat(11)]);
        assert_eq!(meter.feed(&settings), Err(Flood::Settings));
    }

    #[test]
    fn frames_split_anywhere_are_read_the_same() {
        let bytes = connection(&[frame(RST_STREAM, 0, &[0, 0, 0, 8]).repeat(25)]);
        // Rate 2: a burst of 20; the 21st reset fails, in the chunk holding its header's end.
        let header_end = PREFACE_LEN + 20 * 13 + FRAME_HEADER;
        for size in [1, 2, 7, 9, 10, 13, 33, 4096] {
            let mut meter = FrameMeter::new(2);
            let mut fed = 0;
            let failed = bytes.chunks(size).find_map(|chunk| {
                fed += chunk.len();
                meter.feed(chunk).err()
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
        let mut meter = FrameMeter::new(1000);
        let burst = frame(PING, 0, &[0; 8]).repeat(10_000);
        assert_eq!(meter.feed(&connection(&[burst])), Ok(()));
        assert!(meter.feed(&frame(PING, 0, &[0; 8])).is_err());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(meter.feed(&frame(PING, 0, &[0; 8])), Ok(()));
        let mut off = FrameMeter::new(0);
        let flood = frame(SETTINGS, 0, &[]).repeat(100_000);
        assert_eq!(off.feed(&connection(&[flood])), Ok(()));
    }
}
