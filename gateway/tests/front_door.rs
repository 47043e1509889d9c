//! The front door against a hostile client, end to end on the real binary: doors opened on
//! purpose, credential limits nobody dodges or turns on others, framing nobody smuggles through,
//! hop-by-hop headers kept on their hop, and client addresses behind trusted proxies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::client::{Response, get, raw};
use support::upstream::Upstream;
use support::{Gateway, GatewayOptions, TempDir, batch_sandbox, unique_loopback};

/// A sandbox document with one more annotation.
fn annotated(doc: String, key: &str, value: &str) -> String {
    doc.replacen(
        "  annotations:\n",
        &format!("  annotations:\n    {key}: '{value}'\n"),
        1,
    )
}

struct Front {
    gw: Gateway,
    upstreams: Vec<Upstream>,
    _dir: TempDir,
}

/// Upstreams on `ports` of one loopback address; every document's endpoints name it.
fn front(docs: &[String], ports: &[u16], keys: Option<&'static str>, extra: &[&str]) -> Front {
    let ip = unique_loopback();
    let upstreams = ports.iter().map(|p| Upstream::start(ip, *p)).collect();
    let dir = TempDir::new();
    let text = docs
        .iter()
        .map(|d| d.replace("@IP@", &ip.to_string()))
        .collect::<Vec<_>>()
        .join("---\n");
    let file = dir.write("s.yaml", &text);
    let gw = Gateway::start(
        &file,
        GatewayOptions {
            keys,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        },
    );
    Front {
        gw,
        upstreams,
        _dir: dir,
    }
}

fn doc(name: &str, token: Option<&str>) -> String {
    batch_sandbox(name, "a", 1, Some(r#"["@IP@"]"#), token)
}

fn send(gw: &Gateway, host: &str, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Host", host)];
    all.extend_from_slice(headers);
    get(gw.addr, "/probe", &all)
}

fn assert_status(resp: &Response, status: u16, body_has: &str) {
    assert_eq!(resp.status, status, "{}", resp.body_text());
    assert!(
        resp.body_text().contains(body_has),
        "{:?} lacks {body_has:?}",
        resp.body_text()
    );
}

fn seen(resp: &Response, name: &str) -> Option<String> {
    resp.upstream_header(name)
}

#[test]
fn only_ports_opened_on_purpose_are_reachable() {
    let docs = [
        annotated(
            doc("doors", None),
            "opensandbox.io/exposed-ports",
            "8080,3000,9000-9010",
        ),
        doc("open", None),
        annotated(
            doc("broken", None),
            "opensandbox.io/exposed-ports",
            "80,abc",
        ),
        annotated(
            doc("secure", Some("tok")),
            "opensandbox.io/exposed-ports",
            "9005",
        ),
    ];
    let f = front(
        &docs,
        &[9005, 8081, 18080],
        None,
        &["--denied-ports", "18080,19000-19010"],
    );
    let gw = &f.gw;
    let hits = |i: usize| f.upstreams[i].hits.load(Ordering::SeqCst);

    assert_eq!(send(gw, "doors-9005.gw", &[]).status, 200);
    assert_status(
        &send(gw, "doors-8081.gw", &[]),
        403,
        "port 8081 is not exposed",
    );
    assert_eq!(hits(1), 0, "a closed door is never dialled");
    // No annotation: every port, as the reference.
    assert_eq!(send(gw, "open-8081.gw", &[]).status, 200);
    // Denied gateway-wide, whatever the sandbox says.
    assert_status(
        &send(gw, "open-18080.gw", &[]),
        403,
        "port 18080 is not open",
    );
    assert_status(&send(gw, "doors-19005.gw", &[]), 403, "not open");
    assert_eq!(hits(2), 0);
    // A malformed list opens nothing and says why.
    let broken = send(gw, "broken-9005.gw", &[]);
    assert_status(&broken, 503, "opensandbox.io/exposed-ports");
    assert!(broken.body_text().contains("abc"), "{}", broken.body_text());
    // An unauthenticated client learns nothing of a secure sandbox's doors.
    assert_eq!(send(gw, "secure-8081.gw", &[]).status, 401);
    assert_status(
        &send(
            gw,
            "secure-8081.gw",
            &[("OpenSandbox-Secure-Access", "tok")],
        ),
        403,
        "not exposed",
    );
    assert_eq!(
        send(
            gw,
            "secure-9005.gw",
            &[("OpenSandbox-Secure-Access", "tok")]
        )
        .status,
        200
    );
    assert_eq!(hits(1), 1, "only the open sandbox reached 8081");
    let refused = |r: &str| {
        gw.metric(&format!(
            "sandbox_gateway_requests_refused_total{{reason=\"{r}\"}}"
        ))
    };
    assert_eq!(refused("port_not_exposed"), 2.0);
    assert_eq!(refused("port_denied"), 2.0);
}

/// The signed-route vector for `sec` on 7777 with key `k` = "pqrs".
const SIGNED: &str = "sec-7777-x2qxvk-65ad791ek.gw";
const FORGED: [&str; 3] = [
    "sec-7777-x2qxvk-aabbccd1k.gw",
    "sec-7777-x2qxvk-aabbccd2k.gw",
    "sec-7777-x2qxvk-aabbccd3k.gw",
];

/// Secure sandboxes on 7777 with the signing key, behind a trusted proxy on loopback (so tests
/// speak for any client address with `X-Forwarded-For`).
fn behind_proxy(docs: &[String], flags: &[&str]) -> Front {
    let mut all = vec!["--trusted-proxy-cidrs", "127.0.0.0/8"];
    all.extend_from_slice(flags);
    front(docs, &[7777], Some("k=cHFycw=="), &all)
}

/// Each forged signature from the address `from(i)`: each is refused.
fn forge_from(gw: &Gateway, from: impl Fn(usize) -> String) {
    for (i, forged) in FORGED.iter().enumerate() {
        let from = from(i);
        assert_eq!(send(gw, forged, &[("X-Forwarded-For", &from)]).status, 401);
    }
}

#[test]
fn a_sandbox_signature_budget_holds_against_many_addresses_and_spares_the_header() {
    let docs = [doc("sec", Some("annot-token")), doc("sec2", Some("other"))];
    let f = behind_proxy(
        &docs,
        &[
            "--auth-failures-per-minute",
            "0",
            "--signature-failures-per-sandbox-per-minute",
            "3",
        ],
    );
    let gw = &f.gw;
    // Three forged signatures, each from a different address.
    forge_from(gw, |i| format!("198.51.100.{i}"));
    // The sandbox's signed routes rest now, for everyone, even a genuine one…
    let limited = send(gw, SIGNED, &[("X-Forwarded-For", "203.0.113.50")]);
    assert_status(&limited, 429, "secure-access header");
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // …while the 192-bit header token keeps working,
    let header = send(
        gw,
        "sec-7777.gw",
        &[
            ("OpenSandbox-Secure-Access", "annot-token"),
            ("X-Forwarded-For", "203.0.113.50"),
        ],
    );
    assert_eq!(header.status, 200, "{}", header.body_text());
    // and other sandboxes keep their own budget.
    assert_eq!(send(gw, "sec2-7777-x2qxvk-aabbccd1k.gw", &[]).status, 401);
    assert_eq!(
        gw.metric("sandbox_gateway_auth_failures_total{reason=\"sandbox_rate_limited\"}"),
        1.0
    );
}

#[test]
fn ipv6_clients_are_one_client_per_64() {
    let f = behind_proxy(
        &[doc("sec", Some("annot-token"))],
        &["--auth-failures-per-minute", "3"],
    );
    let gw = &f.gw;
    forge_from(gw, |i| format!("2001:db8:1:2::{}", i + 1));
    // Another address of the same /64 is the same client.
    let same = send(gw, SIGNED, &[("X-Forwarded-For", "2001:db8:1:2:ffff::9")]);
    assert_status(&same, 429, "from this client");
    assert!(same.header("retry-after").is_some());
    // The next /64 is someone else.
    let other = send(gw, SIGNED, &[("X-Forwarded-For", "2001:db8:1:3::1")]);
    assert_eq!(other.status, 200, "{}", other.body_text());
    // The log names the client behind the proxy.
    gw.wait_log(r#""client":"2001:db8:1:3::1""#);
}

#[test]
fn the_limiter_forgets_within_its_capacity_and_counts_it() {
    let f = behind_proxy(
        &[doc("sec", Some("annot-token"))],
        &["--auth-limiter-max-clients", "10"],
    );
    for i in 0..30 {
        let from = format!("192.0.2.{i}");
        assert_eq!(
            send(&f.gw, FORGED[0], &[("X-Forwarded-For", &from)]).status,
            401
        );
    }
    assert_eq!(
        f.gw.metric("sandbox_gateway_auth_limiter_evictions_total"),
        20.0
    );
    assert!(f.gw.metric("sandbox_gateway_auth_limiter_clients") <= 10.0);
}

#[test]
fn trusted_proxies_name_the_client_and_others_cannot() {
    // (trusted ranges, X-Forwarded-For sent, X-Forwarded-For the sandbox sees, client logged)
    let cases: [(&[&str], &str, &str, &str); 3] = [
        // The forged prefix is not passed on: the chain starts at the client the proxy vouched for.
        (
            &["--trusted-proxy-cidrs", "127.0.0.0/8"],
            "1.1.1.1, 203.0.113.9",
            "203.0.113.9, 127.0.0.1",
            "203.0.113.9",
        ),
        // The peer is not trusted: its claims are dropped.
        (
            &["--trusted-proxy-cidrs", "10.0.0.0/8"],
            "1.1.1.1",
            "127.0.0.1",
            "127.0.0.1",
        ),
        // Off (the default): the reference's append.
        (&[], "1.1.1.1", "1.1.1.1, 127.0.0.1", "127.0.0.1"),
    ];
    for (flags, sent, forwarded, client) in cases {
        let f = front(&[doc("box", None)], &[7777], None, flags);
        let r = send(&f.gw, "box-7777.gw", &[("X-Forwarded-For", sent)]);
        assert_eq!(
            seen(&r, "x-forwarded-for").as_deref(),
            Some(forwarded),
            "{flags:?}"
        );
        f.gw.wait_log(&format!(r#""client":"{client}""#));
    }
}

#[test]
fn ambiguous_framing_never_reaches_the_upstream() {
    let f = front(&[doc("box", None)], &[7777], None, &[]);
    let head = "POST /count HTTP/1.1\r\nHost: box-7777.gw\r\n";
    let smuggling = [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "Content-Length: 5, 6\r\n\r\nhello!",
        "Content-Length: +5\r\n\r\nhello",
        "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    ];
    for tail in smuggling {
        let resp = raw(f.gw.addr, format!("{head}{tail}").as_bytes()).unwrap();
        assert_eq!(resp.status, 400, "{tail:?}: {}", resp.body_text());
    }
    assert_eq!(f.upstreams[0].hits.load(Ordering::SeqCst), 0);
    // Pingora refuses most of these itself; the two Content-Length + Transfer-Encoding ones are
    // the gateway's own.
    assert!(f.gw.metric("sandbox_gateway_requests_refused_total{reason=\"framing\"}") >= 2.0);
    // Well-formed framing still passes.
    let chunked = raw(
        f.gw.addr,
        format!(
            "{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(chunked.status, 200, "{}", chunked.body_text());
    assert_eq!(chunked.echo()["bytes"], 5);
}

#[test]
fn a_malformed_chunk_aborts_the_upstream_request() {
    let f = front(&[doc("box", None)], &[7777], None, &[]);
    let bad = "POST /count HTTP/1.1\r\nHost: box-7777.gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n";
    let resp = raw(f.gw.addr, bad.as_bytes()).unwrap();
    assert_eq!(resp.status, 400, "{}", resp.body_text());
    // The upstream saw its request fail (its connection closed mid-body), never a complete
    // short body.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while f.upstreams[0].body_errors.load(Ordering::SeqCst) == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(f.upstreams[0].body_errors.load(Ordering::SeqCst), 1);
    assert_eq!(send(&f.gw, "box-7777.gw", &[]).status, 200);
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let f = front(&[doc("box", None)], &[7777], None, &[]);
    let resp = send(
        &f.gw,
        "box-7777.gw",
        &[
            ("Connection", "x-private, close"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "x-sum"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("X-Kept", "yes"),
        ],
    );
    assert_eq!(resp.status, 200);
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
    ] {
        assert_eq!(seen(&resp, gone), None, "{gone} was forwarded");
    }
    assert_eq!(seen(&resp, "x-kept").as_deref(), Some("yes"));
}

/// A v2 PROXY header for a TCP connection from `source` (IPv6) to `destination`.
fn proxy_v2(source: std::net::SocketAddrV6, destination: std::net::SocketAddrV6) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x21, 0, 36]);
    h.extend_from_slice(&source.ip().octets());
    h.extend_from_slice(&destination.ip().octets());
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&destination.port().to_be_bytes());
    h
}

#[test]
fn the_proxy_protocol_names_the_client_and_is_required_when_on() {
    let f = front(
        &[doc("box", None)],
        &[7777],
        None,
        &["--proxy-protocol", "--header-timeout-seconds", "1"],
    );
    let request = "GET /probe HTTP/1.1\r\nHost: box-7777.gw\r\nX-Forwarded-For: 1.1.1.1\r\nConnection: close\r\n\r\n";
    let v1 = raw(
        f.gw.addr,
        format!("PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n{request}").as_bytes(),
    )
    .unwrap();
    assert_eq!(v1.status, 200, "{}", v1.body_text());
    assert_eq!(
        seen(&v1, "x-forwarded-for").as_deref(),
        Some("1.1.1.1, 203.0.113.7")
    );
    let mut v2 = proxy_v2(
        "[2001:db8:7::1]:40000".parse().unwrap(),
        "[2001:db8::80]:80".parse().unwrap(),
    );
    v2.extend_from_slice(request.as_bytes());
    let v2 = raw(f.gw.addr, &v2).unwrap();
    assert_eq!(v2.status, 200, "{}", v2.body_text());
    assert_eq!(
        seen(&v2, "x-forwarded-for").as_deref(),
        Some("1.1.1.1, 2001:db8:7::1")
    );
    // A balancer's own health check (v1 UNKNOWN) keeps the peer's address.
    let local = raw(f.gw.addr, format!("PROXY UNKNOWN\r\n{request}").as_bytes()).unwrap();
    assert_eq!(
        seen(&local, "x-forwarded-for").as_deref(),
        Some("1.1.1.1, 127.0.0.1")
    );
    f.gw.wait_log(r#""client":"203.0.113.7""#);
    f.gw.wait_log(r#""client":"2001:db8:7::1""#);

    // Without the header, with a malformed one, or too slowly: closed without an answer.
    for bad in [
        request.to_owned(),
        format!("PROXY TCP4 203.0.113.777 10.0.0.1 1 2\r\n{request}"),
        format!("PROXY TCP6 203.0.113.7 10.0.0.1 1 2\r\n{request}"),
    ] {
        assert!(
            raw(f.gw.addr, bad.as_bytes()).is_err(),
            "{bad:?} was answered"
        );
    }
    let mut slow = std::net::TcpStream::connect(f.gw.addr).unwrap();
    std::io::Write::write_all(&mut slow, b"PROXY TCP4 ").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut slow, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(f.upstreams[0].hits.load(Ordering::SeqCst), 3);
    let errors = |r: &str| {
        f.gw.metric(&format!(
            "sandbox_gateway_proxy_protocol_errors_total{{reason=\"{r}\"}}"
        ))
    };
    assert_eq!(errors("missing"), 1.0);
    assert_eq!(errors("malformed"), 2.0);
    assert_eq!(errors("timeout"), 1.0);
}
