//! OSEP-0009 renew intents against a real `redis-server`: the payload as the reference writes
//! it, the per-sandbox throttle, the list cap, a Redis outage that requests do not feel, and
//! the bad inputs (a DSN that does not parse, an unreachable Redis, a password file missing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use support::redis::Redis;
use support::{GatewayOptions, TempDir, eventually, single_sandbox};

const KEY: &str = "opensandbox:renew:intent";

fn renew_flags(dsn: &str, more: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--renew-intent-enabled".to_owned(),
        "--renew-intent-redis-dsn".to_owned(),
        dsn.to_owned(),
    ];
    flags.extend(more.iter().map(|s| s.to_string()));
    flags
}

/// Go's `time.RFC3339Nano` in UTC: seconds, then a fraction without trailing zeros, then `Z`.
fn is_go_rfc3339_nano(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let fixed = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b.last() == Some(&b'Z');
    let fraction = &ts[19..ts.len() - 1];
    fixed
        && (fraction.is_empty()
            || (fraction.starts_with('.')
                && (2..=10).contains(&fraction.len())
                && fraction[1..].bytes().all(|c| c.is_ascii_digit())
                && !fraction.ends_with('0')))
}

/// The intent's `observed_at`, checked against the reference's layout: exactly
/// `{"sandbox_id":…,"observed_at":…[,"port":…][,"request_uri":…]}`.
fn check_shape(payload: &str, id: &str, port: Option<u16>, uri: Option<&str>) -> Timestamp {
    let start = format!(r#"{{"sandbox_id":"{id}","observed_at":""#);
    assert!(payload.starts_with(&start), "{payload}");
    let rest = &payload[start.len()..];
    let ts = &rest[..rest.find('"').unwrap()];
    assert!(
        is_go_rfc3339_nano(ts),
        "observed_at {ts:?} is not Go's RFC3339Nano"
    );
    let mut expected = format!(r#"{{"sandbox_id":"{id}","observed_at":"{ts}""#);
    if let Some(p) = port {
        expected.push_str(&format!(r#","port":{p}"#));
    }
    if let Some(u) = uri {
        expected.push_str(&format!(r#","request_uri":"{u}""#));
    }
    expected.push('}');
    assert_eq!(payload, expected);
    ts.parse().unwrap()
}

#[test]
fn header_mode_intent_matches_the_reference_payload() {
    let redis = Redis::start();
    let (gw, upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(&redis.dsn(), &[]),
        ..Default::default()
    });
    let before = Timestamp::now();
    let resp = support::client::get(gw.addr, "/hello?x=1", &[("Host", &host)]);
    assert_eq!(resp.status, 200);
    let after = Timestamp::now();
    let list = eventually("intent on the list", Duration::from_secs(10), || {
        let l = redis.list(KEY);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(list.len(), 1, "{list:?}");
    let observed = check_shape(&list[0], "box", Some(upstream.addr.port()), None);
    assert!(
        before <= observed && observed <= after,
        "{observed} not in {before}..{after}"
    );
    assert_eq!(gw.metric("sandbox_gateway_renew_redis_up"), 1.0);
    gw.metric_settles(
        "sandbox_gateway_renew_intents_total{outcome=\"published\"}",
        1.0,
    );
}

#[test]
fn uri_mode_intent_names_the_decoded_path_without_the_query() {
    let redis = Redis::start();
    let (gw, upstream, _dir, _host) = single_sandbox(GatewayOptions {
        mode: "uri",
        extra: renew_flags(&redis.dsn(), &["--renew-intent-min-interval", "0"]),
        ..Default::default()
    });
    let port = upstream.addr.port();
    let resp = support::client::get(gw.addr, &format!("/box/{port}/a%20b/c%3Cd?q=1&r=2"), &[]);
    assert_eq!(resp.status, 200);
    let resp = support::client::get(gw.addr, &format!("/box/{port}"), &[]);
    assert_eq!(resp.status, 200);
    let list = eventually("two intents", Duration::from_secs(10), || {
        let l = redis.list(KEY);
        (l.len() == 2).then_some(l)
    });
    // Newest first, as LPUSH leaves them; `<` escaped as Go's encoder does.
    check_shape(&list[1], "box", Some(port), Some(r"/a b/c\u003cd"));
    check_shape(&list[0], "box", Some(port), Some("/"));
}

/// Sends `GET /` with `host` on one kept-alive connection until `stop`; counts the answers.
fn hammer(addr: SocketAddr, host: &str, stop: &AtomicBool, ok: &AtomicUsize, failed: &AtomicUsize) {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let s = match conn.as_mut() {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                conn.insert(s)
            }
        };
        let answered = s
            .write_all(request.as_bytes())
            .and_then(|()| support::client::read_response(s))
            .ok()
            .map(|r| r.status);
        match answered {
            Some(200) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

/// Requests per second over `for_` with `threads` connections, and the failures.
fn throughput(addr: SocketAddr, host: &str, threads: usize, for_: Duration) -> (f64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, ok, failed, host) =
                (stop.clone(), ok.clone(), failed.clone(), host.to_owned());
            std::thread::spawn(move || hammer(addr, &host, &stop, &ok, &failed))
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(for_);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    )
}

#[test]
fn a_thousand_requests_in_a_second_make_one_intent() {
    let redis = Redis::start();
    let (gw, upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(&redis.dsn(), &[]),
        ..Default::default()
    });
    let start = Instant::now();
    let mut sent = 0;
    while sent < 1000 {
        let (rate, failed) = throughput(gw.addr, &host, 4, Duration::from_millis(250));
        assert_eq!(failed, 0);
        sent += (rate / 4.0) as usize;
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    eventually("the intent published", Duration::from_secs(10), || {
        (redis.len(KEY) >= 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let list = redis.list(KEY);
    assert_eq!(
        list.len(),
        1,
        "one intent per minute for one sandbox: {list:?}"
    );
    check_shape(&list[0], "box", Some(upstream.addr.port()), None);
    assert_eq!(
        gw.metric("sandbox_gateway_renew_intents_total{outcome=\"queued\"}"),
        1.0
    );
}

#[test]
fn the_list_is_trimmed_to_its_cap() {
    let redis = Redis::start();
    let (gw, _upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(
            &redis.dsn(),
            &[
                "--renew-intent-min-interval",
                "0",
                "--renew-intent-queue-max-len",
                "3",
                "--renew-intent-queue-key",
                "q",
            ],
        ),
        ..Default::default()
    });
    for _ in 0..10 {
        assert_eq!(
            support::client::get(gw.addr, "/", &[("Host", &host)]).status,
            200
        );
    }
    eventually("ten published", Duration::from_secs(10), || {
        (gw.metric("sandbox_gateway_renew_intents_total{outcome=\"published\"}") == 10.0)
            .then_some(())
    });
    assert_eq!(redis.len("q"), 3);
    assert_eq!(redis.len(KEY), 0);
}

#[test]
fn a_redis_outage_neither_slows_nor_fails_requests_and_intents_resume() {
    let mut redis = Redis::start();
    // An intent for every request: the most the publisher is ever asked to carry.
    let (gw, _upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(
            &redis.dsn(),
            &[
                "--renew-intent-min-interval",
                "0",
                "--renew-intent-buffer",
                "256",
            ],
        ),
        ..Default::default()
    });
    // The best of three windows in each state: other work on the machine only ever lowers
    // a window's rate, while a publisher that held requests up would lower all three.
    let best = || {
        (0..3)
            .map(|_| throughput(gw.addr, &host, 2, Duration::from_millis(700)))
            .fold((0.0f64, 0), |(rate, failed), (r, f)| {
                (rate.max(r), failed + f)
            })
    };
    let (warm, _) = throughput(gw.addr, &host, 2, Duration::from_millis(500));
    assert!(warm > 0.0);
    let (up_rate, up_failed) = best();
    redis.stop();
    let (down_rate, down_failed) = best();
    let ratio = down_rate / up_rate;
    println!("requests/s with Redis up {up_rate:.0}, down {down_rate:.0}: ratio {ratio:.2}");
    assert_eq!((up_failed, down_failed), (0, 0));
    assert!(ratio > 0.8, "Redis down slowed requests: {ratio:.2}");
    eventually("gauge shows Redis down", Duration::from_secs(10), || {
        (gw.metric("sandbox_gateway_renew_redis_up") == 0.0).then_some(())
    });
    assert!(gw.metric("sandbox_gateway_renew_intents_total{outcome=\"dropped\"}") > 0.0);
    gw.wait_log("Redis unavailable");

    redis.resume();
    assert_eq!(redis.len(KEY), 0);
    let (_, failed) = throughput(gw.addr, &host, 1, Duration::from_millis(300));
    assert_eq!(failed, 0);
    eventually("intents flow again", Duration::from_secs(15), || {
        (redis.len(KEY) > 0).then_some(())
    });
    eventually("gauge shows Redis up", Duration::from_secs(10), || {
        (gw.metric("sandbox_gateway_renew_redis_up") == 1.0).then_some(())
    });
}

#[test]
fn an_unreachable_redis_at_start_does_not_stop_the_gateway() {
    let dsn = format!("redis://{}/0", Redis::nowhere());
    let (gw, _upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(&dsn, &[]),
        ..Default::default()
    });
    assert_eq!(
        support::client::get(gw.addr, "/", &[("Host", &host)]).status,
        200
    );
    gw.wait_log("Redis unavailable");
    assert_eq!(gw.metric("sandbox_gateway_renew_redis_up"), 0.0);
}

#[test]
fn the_password_comes_from_the_environment_or_a_file() {
    let redis = Redis::start_with(Some("s3cret pass"));
    let (gw, _upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(&redis.dsn(), &[]),
        env: vec![(
            "OPENSANDBOX_RENEW_INTENT_REDIS_PASSWORD".into(),
            "s3cret pass".into(),
        )],
        ..Default::default()
    });
    assert_eq!(
        support::client::get(gw.addr, "/", &[("Host", &host)]).status,
        200
    );
    eventually(
        "intent with the password from the environment",
        Duration::from_secs(10),
        || (redis.len(KEY) == 1).then_some(()),
    );
    drop(gw);

    let secrets = TempDir::new();
    let file = secrets.write("redis-password", "s3cret pass\n");
    let (gw, _upstream, _dir, host) = single_sandbox(GatewayOptions {
        extra: renew_flags(
            &redis.dsn(),
            &[
                "--renew-intent-redis-password-file",
                file.to_str().unwrap(),
                "--renew-intent-queue-key",
                "f",
            ],
        ),
        ..Default::default()
    });
    assert_eq!(
        support::client::get(gw.addr, "/", &[("Host", &host)]).status,
        200
    );
    eventually(
        "intent with the password from a file",
        Duration::from_secs(10),
        || (redis.len("f") == 1).then_some(()),
    );
}

/// Runs the gateway with `args` and expects it to refuse to start, naming `flag`.
fn refused(args: &[&str], flag: &str) {
    let stderr = support::start_fails_with(args);
    assert!(stderr.contains(flag), "{args:?}: {stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
}

#[test]
fn bad_renew_settings_are_refused_at_start_naming_the_flag() {
    let dsn = "--renew-intent-redis-dsn";
    refused(&["--renew-intent-enabled", dsn, "http://host:6379"], dsn);
    refused(
        &[
            "--renew-intent-enabled",
            dsn,
            "redis://:hunter2@host:notaport/0",
        ],
        dsn,
    );
    refused(&["--renew-intent-enabled", dsn, "not a url"], dsn);
    refused(
        &[
            "--renew-intent-enabled",
            "--renew-intent-redis-password-file",
            "/nonexistent/pw",
        ],
        "--renew-intent-redis-password-file",
    );
    refused(
        &["--renew-intent-enabled", "--renew-intent-queue-key", " "],
        "--renew-intent-queue-key",
    );
    refused(
        &["--renew-intent-min-interval=-5"],
        "--renew-intent-min-interval",
    );
    refused(
        &["--renew-intent-queue-max-len", "lots"],
        "--renew-intent-queue-max-len",
    );
}
