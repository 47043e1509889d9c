//! The DNS proxy in-process on loopback against a real dnsmasq: malformed input, upstream
//! failures, TCP fallback and the cache. (Upstream sockets carry SO_MARK, which needs root.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../gateway/tests/support/chart_metrics.rs"]
mod chart_metrics;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use sidecar::config::Config;
use sidecar::dns::{self, AnswerFilter, Proxy};
use sidecar::state::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A loopback port with nothing behind it: queries to it are refused at once.
fn closed_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

struct Setup {
    proxy: SocketAddr,
    dnsmasq: Option<std::process::Child>,
    /// Stops the proxy's listeners when the test ends.
    _stop: tokio_util::sync::DropGuard,
}

impl Drop for Setup {
    /// A dropped `Child` keeps running: stop dnsmasq with the test.
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A proxy on loopback with `policy`, asking `upstreams` (`"dnsmasq"` is replaced by a fresh
/// dnsmasq's address, answering with TTL 300).
async fn setup(policy: &str, upstreams: &[String], timeout_secs: u64) -> Setup {
    setup_ttl(policy, upstreams, timeout_secs, 300).await
}

async fn setup_ttl(policy: &str, upstreams: &[String], timeout_secs: u64, ttl: u32) -> Setup {
    let mut dnsmasq = None;
    let upstreams: Vec<String> = upstreams
        .iter()
        .map(|u| {
            if u == "dnsmasq" {
                let (child, port) = support::dnsmasq_local("127.0.0.1", ttl);
                dnsmasq = Some(child);
                format!("127.0.0.1:{port}")
            } else {
                u.clone()
            }
        })
        .collect();
    let proxy = Arc::new(proxy(policy, &upstreams.join(","), timeout_secs).await);
    // Bound here and handed over: the address is known and nobody can take it in between.
    let (udp, tcp) = dns::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = udp.local_addr().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(dns::serve(proxy, udp, tcp, cancel.clone()));
    Setup {
        proxy: addr,
        dnsmasq,
        _stop: cancel.drop_guard(),
    }
}

const ALLOW: &str = r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"allowed.test"},{"action":"allow","target":"big.test"}]}"#;

fn query(name: &str, ty: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

async fn udp(proxy: SocketAddr, packet: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(packet, proxy).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn ask(proxy: SocketAddr, m: &Message) -> Message {
    let reply = udp(proxy, &m.to_vec().unwrap(), Duration::from_secs(10))
        .await
        .expect("no reply");
    Message::from_vec(&reply).unwrap()
}

async fn ask_tcp(proxy: SocketAddr, m: &Message) -> Message {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let bytes = m.to_vec().unwrap();
    stream
        .write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes())
        .await
        .unwrap();
    stream.write_all(&bytes).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn rcode(reply: &[u8]) -> u8 {
    reply[3] & 0x0f
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_the_proxy_keeps_serving() {
    let s = setup(ALLOW, &["dnsmasq".into()], 2).await;
    let short = Duration::from_millis(300);
    // Shorter than a header: nothing to answer to.
    assert!(udp(s.proxy, &[1, 2, 3, 4, 5], short).await.is_none());
    // A header promising a question that is not there.
    let header_only = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let reply = udp(s.proxy, &header_only, short).await.expect("FORMERR");
    assert_eq!(&reply[..2], &[0xab, 0xcd], "same id");
    assert_eq!(rcode(&reply), 1, "FORMERR");
    // A question cut off in the middle of its name.
    let mut cut = query("allowed.test.", RecordType::A, None)
        .to_vec()
        .unwrap();
    cut.truncate(18);
    assert_eq!(rcode(&udp(s.proxy, &cut, short).await.expect("reply")), 1);
    // Garbage after a header.
    let mut garbage = header_only.to_vec();
    garbage.extend_from_slice(&[0xff; 40]);
    assert_eq!(
        rcode(&udp(s.proxy, &garbage, short).await.expect("reply")),
        1
    );
    // No question at all.
    let mut empty = Message::query();
    empty.metadata.id = 7;
    let reply = ask(s.proxy, &empty).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // Two questions.
    let mut two = query("allowed.test.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("big.test.").unwrap(),
        RecordType::A,
    ));
    assert_eq!(
        ask(s.proxy, &two).await.metadata.response_code,
        ResponseCode::FormErr
    );
    // A response sent to the proxy: ignored.
    let mut response = query("allowed.test.", RecordType::A, None);
    response.metadata.message_type = MessageType::Response;
    assert!(
        udp(s.proxy, &response.to_vec().unwrap(), short)
            .await
            .is_none()
    );
    // Not a QUERY.
    let mut status = query("allowed.test.", RecordType::A, None);
    status.metadata.op_code = OpCode::Status;
    assert_eq!(
        rcode(
            &udp(s.proxy, &status.to_vec().unwrap(), short)
                .await
                .unwrap()
        ),
        4
    );
    // Still serving, over UDP and TCP.
    let reply = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(reply.metadata.id, 0x4242);
    assert_eq!(reply.answers.len(), 1);
    let reply = ask_tcp(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(reply.answers.len(), 1);
    // A TCP client sending a broken frame does not disturb others.
    let mut bad = TcpStream::connect(s.proxy).await.unwrap();
    bad.write_all(&[0, 40, 1, 2, 3]).await.unwrap();
    drop(bad);
    let reply = ask_tcp(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(reply.answers.len(), 1);
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_within_the_timeout_and_failover_answers() {
    // Bound but never read: queries to it go unanswered.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let s = setup(ALLOW, std::slice::from_ref(&silent_addr), 1).await;
    let started = Instant::now();
    let reply = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    let took = started.elapsed();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "SERVFAIL after {took:?}, timeout 1 s"
    );
    // Denied names never wait on the upstream.
    let started = Instant::now();
    let reply = ask(s.proxy, &query("blocked.test.", RecordType::A, None)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(reply.queries.len(), 1, "question echoed");
    assert!(started.elapsed() < Duration::from_millis(500));

    let s = setup(ALLOW, &[silent_addr, "dnsmasq".into()], 1).await;
    let reply = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "second upstream answers"
    );
    assert_eq!(reply.answers.len(), 1);
    // The silent one is now asked last: the next query does not wait for it.
    let started = Instant::now();
    // (AAAA: not in the cache yet, so it goes upstream.)
    let reply = ask(s.proxy, &query("allowed.test.", RecordType::AAAA, None)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a known-silent upstream must not delay every query: {:?}",
        started.elapsed()
    );
    drop(silent);
    // This test made upstream failures and denied and allowed queries: every egress metric
    // the chart's alerts and dashboard query is now exposed.
    chart_metrics::assert_exposed("egress_", &sidecar::metrics::render());
}

#[tokio::test]
async fn large_answers_are_fetched_over_tcp_and_truncated_only_for_small_udp_buffers() {
    let s = setup(ALLOW, &["dnsmasq".into()], 2).await;
    let full = ask_tcp(s.proxy, &query("big.test.", RecordType::TXT, None)).await;
    assert_eq!(full.metadata.response_code, ResponseCode::NoError);
    assert_eq!(full.answers.len(), 1);
    assert!(!full.metadata.truncation);
    let size = full.to_vec().unwrap().len();
    assert!(size > 512, "test record must exceed 512 bytes, is {size}");
    // A plain UDP client (512 bytes) is told to retry over TCP.
    let small = ask(s.proxy, &query("big.test.", RecordType::TXT, None)).await;
    assert!(small.metadata.truncation, "TC set for a 512-byte client");
    // An EDNS client with a large buffer gets it all over UDP.
    let edns = ask(s.proxy, &query("big.test.", RecordType::TXT, Some(4096))).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 1);
}

#[tokio::test]
async fn answers_are_served_from_the_cache_within_their_ttl() {
    let mut s = setup(ALLOW, &["dnsmasq".into()], 1).await;
    let first = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(first.answers.len(), 1);
    // Take the upstream away: the second answer can only come from the cache.
    let mut dnsmasq = s.dnsmasq.take().unwrap();
    dnsmasq.kill().unwrap();
    dnsmasq.wait().unwrap();
    let mut again = query("ALLOWED.test.", RecordType::A, None);
    again.metadata.id = 99;
    let cached = ask(s.proxy, &again).await;
    assert_eq!(
        cached.metadata.id, 99,
        "the cached answer carries the new id"
    );
    assert_eq!(
        cached.queries[0].name().to_ascii(),
        "ALLOWED.test.",
        "and the new question's spelling"
    );
    assert_eq!(cached.answers.len(), 1);
    assert!(cached.answers[0].ttl <= 300);
    // A name never asked is not in the cache: SERVFAIL without the upstream.
    let other = ask(s.proxy, &query("allowed.test.", RecordType::AAAA, None)).await;
    assert_eq!(other.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn a_cached_answer_expires_with_its_ttl() {
    let mut s = setup_ttl(ALLOW, &["dnsmasq".into()], 1, 2).await;
    let first = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(first.answers.len(), 1);
    assert!(first.answers[0].ttl <= 2);
    let mut dnsmasq = s.dnsmasq.take().unwrap();
    dnsmasq.kill().unwrap();
    dnsmasq.wait().unwrap();
    // Within the TTL the cache answers without the upstream.
    let cached = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
    assert_eq!(cached.metadata.response_code, ResponseCode::NoError);
    assert_eq!(cached.answers.len(), 1);
    // Once the TTL has run out the entry is gone: with no upstream left, SERVFAIL.
    let started = Instant::now();
    loop {
        let reply = ask(s.proxy, &query("allowed.test.", RecordType::A, None)).await;
        if reply.metadata.response_code == ResponseCode::ServFail {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a 2 s answer still served from the cache after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A proxy (not listening) with `policy` and `upstreams` (comma-separated).
async fn proxy(policy: &str, upstreams: &str, timeout_secs: u64) -> Proxy {
    let vars = [
        ("OPENSANDBOX_EGRESS_RULES", policy.to_owned()),
        ("OPENSANDBOX_EGRESS_DNS_UPSTREAM", upstreams.to_owned()),
        (
            "OPENSANDBOX_EGRESS_DNS_UPSTREAM_TIMEOUT",
            timeout_secs.to_string(),
        ),
    ];
    let config = Config::from_lookup(
        |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
        "",
    )
    .unwrap();
    let state = State::start(&config, Default::default(), None)
        .await
        .unwrap();
    Proxy::new(
        state,
        config.upstreams.clone(),
        config.upstream_timeout,
        AnswerFilter::default(),
    )
}

/// A proxy (not listening) with `policy` whose only upstream refuses connections at once.
async fn bare_proxy(policy: &str) -> Proxy {
    proxy(policy, &format!("127.0.0.1:{}", closed_port()), 1).await
}

/// xorshift64: reproducible pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_and_mutated_packets_never_crash_the_proxy() {
    let deny = bare_proxy(r#"{"defaultAction":"deny"}"#).await;
    let allow = bare_proxy(r#"{"defaultAction":"allow"}"#).await;
    let valid = query("a.b.example.test.", RecordType::A, Some(1232))
        .to_vec()
        .unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut answered = 0;
    // Allowed queries that reached the (refusing) upstream and came back SERVFAIL.
    let mut forwarded = 0;
    for case in 0..3000u32 {
        let packet: Vec<u8> = if case.is_multiple_of(2) {
            let len = (rng.next() % 300) as usize;
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut p = valid.clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() as usize) % p.len();
                p[at] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(3) {
                p.truncate((rng.next() as usize) % p.len());
            }
            p
        };
        for (proxy, tcp) in [(&deny, false), (&allow, case % 4 == 1)] {
            if let Some(reply) = proxy.answer(&packet, tcp).await {
                assert!(
                    reply.len() >= 12,
                    "case {case}: reply shorter than a header"
                );
                assert_eq!(reply[..2], packet[..2], "case {case}: reply to another id");
                assert!(
                    reply[2] & 0x80 != 0,
                    "case {case}: reply not flagged as response"
                );
                answered += 1;
                if !std::ptr::eq(proxy, &deny) && reply[3] & 0x0f == 2 {
                    forwarded += 1;
                }
            }
        }
    }
    assert!(answered > 1000, "most packets get an answer: {answered}");
    assert!(forwarded > 100, "the forwarding path ran: {forwarded}");
}
