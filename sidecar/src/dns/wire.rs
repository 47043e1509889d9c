//! DNS messages on the wire: the replies the proxy makes itself (the one place that picks an
//! rcode for a refusal), and how an upstream's reply is matched to the query that was sent.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use crate::metrics::{self, Verdict};

pub const HEADER_LEN: usize = 12;

/// Why the proxy answers a query itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A rule or the default action denies the name (or a name on its CNAME chain).
    Denied,
    /// No upstream gave a usable answer, or the answer's addresses could not be admitted.
    Failed,
    /// Not exactly one question.
    Malformed,
}

impl Refusal {
    fn rcode(self) -> ResponseCode {
        match self {
            Refusal::Denied => ResponseCode::NXDomain,
            Refusal::Failed => ResponseCode::ServFail,
            Refusal::Malformed => ResponseCode::FormErr,
        }
    }

    fn verdict(self) -> Verdict {
        match self {
            Refusal::Denied => Verdict::Denied,
            Refusal::Failed => Verdict::Servfail,
            Refusal::Malformed => Verdict::Formerr,
        }
    }
}

/// A reply carrying only a header: same ID, opcode and RD bit as the query, `rcode` set. Used
/// when the query cannot be parsed, so nothing else about it can be echoed.
pub fn header_reply(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0] = query[0];
    out[1] = query[1];
    out[2] = 0x80 | (query[2] & 0x79);
    out[3] = rcode.low() & 0x0f;
    out
}

fn reply_to(query: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.checking_disabled = query.metadata.checking_disabled;
    reply.metadata.response_code = rcode;
    reply.queries = query.queries.clone();
    reply
}

/// Counts the refusal and answers `query` with its rcode, question echoed.
pub fn refuse(message: &Message, query: &[u8], why: Refusal) -> Vec<u8> {
    metrics::query(why.verdict());
    encode(&reply_to(message, why.rcode()), query, why.rcode())
}

pub fn encode(message: &Message, fallback_query: &[u8], rcode_on_error: ResponseCode) -> Vec<u8> {
    message
        .to_vec()
        .unwrap_or_else(|_| header_reply(fallback_query, rcode_on_error))
}

/// How long an answer may be remembered: its smallest TTL, or for a negative answer the SOA's.
pub fn min_ttl(message: &Message) -> Option<u32> {
    if message.answers.is_empty() {
        return message
            .authorities
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .map(|r| r.ttl)
            .min();
    }
    message.answers.iter().map(|r| r.ttl).min()
}

/// Length of the question section of a query whose first question starts at byte 12.
fn question_len(query: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            return Some(at + 1 + 4 - HEADER_LEN);
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
}

/// Whether `reply` answers `query`: response bit, same ID, same question (any case).
pub fn answers(query: &[u8], reply: &[u8]) -> bool {
    if reply.len() < HEADER_LEN || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    match question_len(query) {
        Some(len) => reply
            .get(HEADER_LEN..HEADER_LEN + len)
            .is_some_and(|q| q.eq_ignore_ascii_case(&query[HEADER_LEN..HEADER_LEN + len])),
        None => true,
    }
}

/// A copy of `query` under a fresh random ID, so an off-path spoofer must guess it (the
/// client's own ID may be predictable).
pub fn with_fresh_id(query: &[u8]) -> Vec<u8> {
    let mut out = query.to_vec();
    out[..2].copy_from_slice(&rand::random::<u16>().to_be_bytes());
    out
}

/// Puts the client's ID back on an upstream's reply.
pub fn restore_id(reply: &mut [u8], query: &[u8]) {
    reply[..2].copy_from_slice(&query[..2]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_on_id_and_question() {
        // ID 0x1234, RD, one question "a.test" A IN.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x01a\x04test\x00\x00\x01\x00\x01");
        let mut r = q.clone();
        r[2] |= 0x80;
        assert!(answers(&q, &r));
        r[HEADER_LEN + 1] = b'A';
        assert!(answers(&q, &r), "question compared in any case");
        r[HEADER_LEN + 1] = b'b';
        assert!(!answers(&q, &r), "another question");
        let mut other = q.clone();
        other[2] |= 0x80;
        other[1] ^= 1;
        assert!(!answers(&q, &other), "another ID");
        assert!(!answers(&q, &q), "not a response");
        assert!(!answers(&q, &r[..5]), "short");
    }

    #[test]
    fn fresh_ids_vary_and_the_client_id_comes_back() {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x01a\x04test\x00\x00\x01\x00\x01");
        let ids: std::collections::HashSet<[u8; 2]> = (0..64)
            .map(|_| {
                let f = with_fresh_id(&q);
                assert_eq!(f[2..], q[2..], "only the ID changes");
                [f[0], f[1]]
            })
            .collect();
        assert!(ids.len() > 32, "IDs are random: {}", ids.len());
        let mut reply = with_fresh_id(&q);
        restore_id(&mut reply, &q);
        assert_eq!(reply[..2], [0xab, 0xcd]);
    }
}
