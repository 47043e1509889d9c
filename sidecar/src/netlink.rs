//! Adding elements to the dynamic sets over nf_tables netlink, without starting a process:
//! one batch (`NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_NEWSETELEM` per set, `NFNL_MSG_BATCH_END`) per
//! group of answers, acknowledged by the kernel. Starting `nft` costs milliseconds per answer;
//! this costs tens of microseconds. Static changes stay on `nft -f` (they are rare and their
//! script is easier to read and check).

use std::net::IpAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;

/// A netlink attribute writer: `nla_len`, `nla_type`, payload, padding to 4 bytes.
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn nest(&mut self, kind: u16, inner: Attrs) {
        self.put(kind | NLA_F_NESTED, &inner.0);
    }

    fn string(&mut self, kind: u16, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes);
    }
}

fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) {
    let len = u32::try_from(16 + 4 + body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id (big-endian).
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
}

/// The batch adding `elements` (address, timeout) to the sets `v4_set` / `v6_set` of `table`.
pub fn batch(
    table: &str,
    v4_set: &str,
    v6_set: &str,
    elements: &[(IpAddr, Duration)],
    seq: u32,
) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::new();
    let mut acked = Vec::new();
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut next = seq + 1;
    for (set, v6) in [(v4_set, false), (v6_set, true)] {
        let mut list = Attrs(Vec::new());
        for (ip, timeout) in elements.iter().filter(|(ip, _)| ip.is_ipv6() == v6) {
            let mut key = Attrs(Vec::new());
            match ip {
                IpAddr::V4(a) => key.put(NFTA_DATA_VALUE, &a.octets()),
                IpAddr::V6(a) => key.put(NFTA_DATA_VALUE, &a.octets()),
            }
            let mut elem = Attrs(Vec::new());
            elem.nest(NFTA_SET_ELEM_KEY, key);
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            elem.put(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
            list.nest(NFTA_LIST_ELEM, elem);
        }
        if list.0.is_empty() {
            continue;
        }
        let mut body = Attrs(Vec::new());
        body.string(NFTA_SET_ELEM_LIST_TABLE, table);
        body.string(NFTA_SET_ELEM_LIST_SET, set);
        body.nest(NFTA_SET_ELEM_LIST_ELEMENTS, list);
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
            next,
            NFPROTO_INET,
            0,
            &body.0,
        );
        acked.push(next);
        next += 1;
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (out, acked)
}

/// A netfilter netlink socket. Blocking, with a receive timeout; used from a blocking thread.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    pub fn open() -> std::io::Result<Netlink> {
        let socket = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Netlink { socket, seq: 1 })
    }

    /// Adds the elements in one transaction and waits for the kernel's acknowledgements.
    pub fn add(
        &mut self,
        table: &str,
        v4_set: &str,
        v6_set: &str,
        elements: &[(IpAddr, Duration)],
    ) -> std::io::Result<()> {
        let (bytes, mut waiting) = batch(table, v4_set, v6_set, elements, self.seq);
        self.seq = self.seq.wrapping_add(4);
        // An unconnected netlink socket sends to the kernel.
        self.socket.send(&bytes)?;
        let mut buf = vec![0u8; 65_536];
        while !waiting.is_empty() {
            let n = std::io::Read::read(&mut self.socket, &mut buf)?;
            let data = &buf[..n];
            let mut at = 0;
            while at + 16 <= data.len() {
                let len = u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
                    as usize;
                let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
                let seq =
                    u32::from_ne_bytes([data[at + 8], data[at + 9], data[at + 10], data[at + 11]]);
                if len < 16 || at + len > data.len() {
                    break;
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes([
                        data[at + 16],
                        data[at + 17],
                        data[at + 18],
                        data[at + 19],
                    ]);
                    waiting.retain(|s| *s != seq);
                    if code != 0 {
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                }
                at += (len + 3) & !3;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, flags, seq, length) of each message in a batch.
    fn headers(bytes: &[u8]) -> Vec<(u16, u16, u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(bytes[at + 4..at + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(bytes[at + 6..at + 8].try_into().unwrap());
            let seq = u32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            out.push((kind, flags, seq, len));
            at += len;
        }
        assert_eq!(at, bytes.len(), "messages fill the batch exactly");
        out
    }

    #[test]
    fn batches_frame_one_message_per_family_between_begin_and_end() {
        let v4 = ("198.51.100.10".parse().unwrap(), Duration::from_secs(360));
        let v6 = ("2001:db8::1".parse().unwrap(), Duration::from_secs(60));
        let (bytes, acked) = batch("opensandbox", "dyn_allow_v4", "dyn_allow_v6", &[v4], 10);
        let h = headers(&bytes);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].0, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(h[1].0, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM);
        assert_eq!(h[1].1, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
        assert_eq!(h[2].0, NFNL_MSG_BATCH_END);
        assert_eq!(acked, vec![11]);
        // The address and the big-endian millisecond timeout are in the element message.
        assert!(bytes.windows(4).any(|w| w == [198, 51, 100, 10]));
        assert!(bytes.windows(8).any(|w| w == 360_000u64.to_be_bytes()));
        assert!(bytes.windows(12).any(|w| w == b"opensandbox\0"));

        let (bytes, acked) = batch("t", "a", "b", &[v4, v6], 1);
        assert_eq!(headers(&bytes).len(), 4, "one message per set");
        assert_eq!(acked, vec![2, 3]);
    }
}
