//! The sidecar in real network namespaces with real nftables, dnsmasq as upstream and real web
//! servers. Needs root (network namespaces, nftables); `scripts/test.sh` runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{ALLOWED_IP, ALLOWED_IP6, BLOCKED_IP, BLOCKED_IP6, Lab, TOKEN};

const ALLOW_ALLOWED: &str =
    r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"allowed.test"}]}"#;

#[test]
fn dns_nft_admits_only_the_addresses_of_allowed_names() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
    ]);
    // Before any lookup even the allowed address is closed: it is admitted by its answer.
    assert!(!lab.http(ALLOWED_IP), "address open before the lookup");
    let (status, answers) = lab.dig("allowed.test", &[]);
    assert_eq!(status, "NOERROR");
    assert_eq!(answers, vec![ALLOWED_IP]);
    assert!(
        lab.http(ALLOWED_IP),
        "allowed address must connect after the lookup"
    );
    assert_eq!(lab.dig("blocked.test", &[]).0, "NXDOMAIN");
    assert!(!lab.http(BLOCKED_IP), "denied address must stay closed");
    // IPv6: the AAAA answer opens its address in the v6 set; the denied one stays closed.
    assert!(!lab.http(ALLOWED_IP6), "v6 address open before the lookup");
    let (status, answers) = lab.dig("allowed.test", &["AAAA"]);
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec![ALLOWED_IP6.to_owned()])
    );
    assert!(
        lab.http(ALLOWED_IP6),
        "allowed v6 address must connect after the lookup"
    );
    assert!(!lab.http(BLOCKED_IP6));
    // Over TCP, any case, trailing dot: same verdicts.
    assert_eq!(lab.dig("ALLOWED.test.", &["+tcp"]).0, "NOERROR");
    assert_eq!(lab.dig("blocked.test", &["+tcp"]).0, "NXDOMAIN");
    // DNS over TLS to the upstream is dropped even though the address is the resolver's.
    let dot = lab
        .in_sandbox("curl")
        .args(["-s", "--max-time", "1", "telnet://198.51.100.2:853"])
        .status()
        .unwrap();
    assert_eq!(
        dot.code(),
        Some(28),
        "port 853 must time out (dropped), got {dot:?}"
    );

    // A CNAME chain through a name a rule denies is refused; one through an unlisted name is not.
    let (code, _) = lab.call(
        "POST",
        Some(
            r#"{"defaultAction":"deny","egress":[
                {"action":"allow","target":"alias.test"},
                {"action":"allow","target":"good-alias.test"},
                {"action":"deny","target":"blocked.test"},
                {"action":"allow","target":"meta.test"}]}"#,
        ),
    );
    assert_eq!(code, 200);
    assert_eq!(lab.dig("alias.test", &[]).0, "NXDOMAIN");
    let (status, answers) = lab.dig("good-alias.test", &[]);
    assert_eq!(status, "NOERROR");
    assert_eq!(answers, vec!["allowed.test.", ALLOWED_IP]);
    // An allowed name pointing at the metadata address: the record is dropped.
    let (status, answers) = lab.dig("meta.test", &[]);
    assert_eq!(status, "NOERROR");
    assert!(
        answers.is_empty(),
        "metadata address must not be answered: {answers:?}"
    );
    assert!(!lab.nft_ruleset().contains("169.254.169.254"));
}

#[test]
fn first_match_wins_and_wildcards_skip_the_bare_suffix() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[(
        "OPENSANDBOX_EGRESS_RULES",
        r#"{"defaultAction":"deny","egress":[
            {"action":"allow","target":"*.example.test"},
            {"action":"deny","target":"api.example.test"},
            {"action":"allow","target":"*.a.test"},
            {"action":"allow","target":"allowed.test."}]}"#,
    )]);
    assert_eq!(
        lab.dig("api.example.test", &[]).0,
        "NOERROR",
        "first match wins"
    );
    assert_eq!(lab.dig("deep.er.example.test", &[]).0, "NOERROR");
    assert_eq!(lab.dig("example.test", &[]).0, "NXDOMAIN");
    assert_eq!(lab.dig("x.a.test", &[]).0, "NOERROR");
    assert_eq!(
        lab.dig("a.test", &[]).0,
        "NXDOMAIN",
        "*.a.test must not match a.test"
    );
    assert_eq!(
        lab.dig("allowed.test", &[]).0,
        "NOERROR",
        "trailing dot in a target"
    );
    // dns mode: names only, the address stays reachable.
    assert!(lab.http(BLOCKED_IP));
    let (code, body) = lab.call("GET", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["enforcementMode"], "dns");
    assert_eq!(v["mode"], "enforcing");
}

#[test]
fn api_changes_and_always_files_take_effect() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
    ]);
    assert_eq!(lab.dig("blocked.test", &[]).0, "NXDOMAIN");

    // PATCH puts the rule in front: now it resolves and connects.
    let (code, body) = lab.call(
        "PATCH",
        Some(r#"[{"action":"allow","target":"blocked.test"}]"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status":"ok","mode":"enforcing","enforcementMode":"dns+nft"})
    );
    assert_eq!(lab.dig("allowed.test", &[]).0, "NOERROR");
    let (status, answers) = lab.dig("blocked.test", &[]);
    assert_eq!(
        (status.as_str(), answers),
        ("NOERROR", vec![BLOCKED_IP.to_owned()])
    );
    assert!(lab.http(BLOCKED_IP));
    assert!(lab.http(ALLOWED_IP));
    let (_, body) = lab.call("GET", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["policy"]["egress"][0]["target"], "blocked.test");
    assert_eq!(v["policy"]["egress"][1]["target"], "allowed.test");

    // DELETE: NXDOMAIN again, and its learned address is withdrawn while allowed.test's stays.
    let (code, body) = lab.call("DELETE", Some(r#"["blocked.test"]"#));
    assert_eq!(code, 200, "{body}");
    assert_eq!(lab.dig("blocked.test", &[]).0, "NXDOMAIN");
    assert!(
        !lab.http(BLOCKED_IP),
        "address of a name no longer allowed must close"
    );
    assert!(
        lab.http(ALLOWED_IP),
        "learned entries of names still allowed are kept"
    );
    let (code, body) = lab.call("DELETE", Some(r#"["nothing.test"]"#));
    assert_eq!(code, 200);
    assert!(body.contains("no matching targets found"), "{body}");

    // The deny file beats the user policy, within 2 s of the change.
    lab.write_rule_file("deny.always", "# operator rule\nallowed.test\n");
    let took = lab
        .within(Duration::from_secs(2), || {
            lab.dig("allowed.test", &[]).0 == "NXDOMAIN"
        })
        .expect("deny.always not in force within 2 s");
    eprintln!("deny.always took effect in {took:?}");
    assert!(
        !lab.http(ALLOWED_IP),
        "deny.always withdraws learned addresses too"
    );
    // allow.always beats the policy's default deny; deny.always beats allow.always.
    lab.write_rule_file("allow.always", "blocked.test\nallowed.test\n");
    lab.within(Duration::from_secs(2), || {
        lab.dig("blocked.test", &[]).0 == "NOERROR"
    })
    .expect("allow.always not in force within 2 s");
    assert_eq!(lab.dig("allowed.test", &[]).0, "NXDOMAIN");
    // A broken always file keeps the rules last read from it.
    lab.write_rule_file("deny.always", "allowed.test\nnot a name!\n");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(lab.dig("allowed.test", &[]).0, "NXDOMAIN");
    assert!(
        lab.log().contains("deny.always line 2"),
        "broken file reported"
    );
    // IP rules in an always file go to the static sets.
    lab.write_rule_file("deny.always", "198.51.100.20\n");
    lab.within(Duration::from_secs(2), || {
        lab.dig("allowed.test", &[]).0 == "NOERROR"
    })
    .expect("deny.always change not applied");
    assert_eq!(
        lab.dig("blocked.test", &[]).0,
        "NOERROR",
        "names are not addresses"
    );
    assert!(
        !lab.http(BLOCKED_IP),
        "deny.always address dropped although the name is allowed"
    );
    assert!(lab.log().contains("\"source\":\"always-file\""));
    assert!(lab.log().contains("\"event\":\"dns.denied\""));
}

#[test]
fn api_authentication_limits_and_bad_bodies() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED)]);
    assert_eq!(lab.api("GET", "/policy", None, None).0, 401);
    assert_eq!(lab.api("GET", "/policy", None, Some("wrong")).0, 401);
    assert_eq!(lab.api("GET", "/policy", None, Some("test-toke")).0, 401);
    let (code, body) = lab.api("GET", "/policy", None, Some(TOKEN));
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["mode"], "enforcing");
    assert_eq!(v["policy"]["defaultAction"], "deny");
    // Health and metrics need no token.
    assert_eq!(lab.api("GET", "/healthz", None, None), (200, "ok".into()));
    let (code, metrics) = lab.api("GET", "/metrics", None, None);
    assert_eq!(code, 200);
    for name in [
        "egress_dns_queries_total",
        "egress_policy_rules 1",
        "egress_nft_updates_total",
        "egress_dns_upstream_duration_seconds",
        "egress_dns_cache_hits_total",
        "egress_dns_query_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "missing {name}");
    }

    // 4,097 rules → 413, 4,096 → 200.
    let rules = |n: usize| {
        let egress: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"action":"allow","target":"h{i}.bulk.test"}}"#))
            .collect();
        format!(
            r#"{{"defaultAction":"deny","egress":[{}]}}"#,
            egress.join(",")
        )
    };
    let (code, body) = lab.call("POST", Some(&rules(4097)));
    assert_eq!(code, 413, "{body}");
    assert!(
        body.contains("egress rule total count 4097 exceeds limit 4096"),
        "{body}"
    );
    assert_eq!(lab.call("PUT", Some(&rules(4096))).0, 200);
    let (code, _) = lab.call(
        "PATCH",
        Some(r#"[{"action":"allow","target":"one-more.test"}]"#),
    );
    assert_eq!(code, 413, "merged count counts");
    // 1 MiB + 1 byte body: refused, policy unchanged.
    let huge = format!("{}{}", rules(0), " ".repeat((1 << 20) + 1 - rules(0).len()));
    assert_eq!(huge.len(), (1 << 20) + 1);
    let (code, _) = lab.call("POST", Some(&huge));
    assert_eq!(code, 413);
    // Bad bodies: 400 with a reason, nothing changed.
    for (method, body, want) in [
        ("POST", "{not json", "invalid policy"),
        ("POST", r#"{"defaultAction":"maybe"}"#, "unsupported action"),
        (
            "POST",
            r#"{"egress":[{"action":"allow","target":""}]}"#,
            "empty target",
        ),
        ("PATCH", "", "empty body"),
        ("PATCH", "[]", "invalid patch rules: empty array"),
        ("PATCH", r#"{"action":"allow"}"#, "invalid patch rules"),
        ("DELETE", "[]", "invalid delete targets: empty array"),
        ("DELETE", "7", "invalid delete targets"),
    ] {
        let (code, text) = lab.call(method, Some(body));
        assert_eq!(code, 400, "{method} {body}: {text}");
        assert!(text.contains(want), "{method} {body}: {text}");
    }
    let (_, body) = lab.call("GET", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["policy"]["egress"].as_array().unwrap().len(), 4096);
    assert_eq!(lab.api("PURGE", "/policy", None, Some(TOKEN)).0, 405);
    assert_eq!(lab.api("GET", "/nothing", None, Some(TOKEN)).0, 404);
    // Empty POST resets to deny-all.
    let (code, body) = lab.call("POST", Some(""));
    assert_eq!(code, 200);
    assert!(body.contains("policy reset to default deny-all"), "{body}");
    assert_eq!(lab.dig("allowed.test", &[]).0, "NXDOMAIN");
}

#[test]
fn kill_leaves_the_namespace_locked_and_restart_keeps_api_changes() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
    ]);
    let (code, _) = lab.call(
        "PATCH",
        Some(r#"[{"action":"allow","target":"*.example.test"}]"#),
    );
    assert_eq!(code, 200);
    assert_eq!(lab.dig("www.example.test", &[]).0, "NOERROR");
    assert!(lab.http(ALLOWED_IP));
    // Thirty more names on the same address: no nft process for any of them.
    let dynamic = |lab: &Lab| {
        let (_, m) = lab.api("GET", "/metrics", None, None);
        m.lines()
            .find(|l| l.starts_with("egress_nft_updates_total{kind=\"dynamic\",result=\"ok\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = dynamic(&lab);
    for i in 0..30 {
        assert_eq!(lab.dig(&format!("n{i}.example.test"), &[]).0, "NOERROR");
    }
    assert_eq!(
        dynamic(&lab),
        before,
        "address already admitted: no nftables update"
    );

    lab.kill_sidecar();
    assert!(
        !lab.http(BLOCKED_IP),
        "a dead sidecar must leave the namespace locked"
    );
    assert_eq!(
        lab.dig("blocked.test", &[]).0,
        "ERROR",
        "no DNS around the dead proxy either"
    );
    assert!(lab.nft_ruleset().contains("policy drop"));

    lab.restart_sidecar();
    let (_, body) = lab.call("GET", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["policy"]["egress"][0]["target"], "*.example.test",
        "{body}"
    );
    assert_eq!(lab.dig("www.example.test", &[]).0, "NOERROR");
    assert_eq!(lab.dig("blocked.test", &[]).0, "NXDOMAIN");
    assert!(!lab.http(BLOCKED_IP));
    assert!(lab.http(ALLOWED_IP));
    // One table, taken over, not a second one beside it.
    assert_eq!(
        lab.nft_ruleset().matches("table inet opensandbox").count(),
        1
    );
}

#[test]
fn bad_configuration_starts_deny_all_or_fails_clearly() {
    // Invalid policy JSON in env: running, deny-all, the reason logged.
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        (
            "OPENSANDBOX_EGRESS_RULES",
            "{\"defaultAction\":\"deny\",\"egress\":[{",
        ),
    ]);
    assert_eq!(lab.dig("allowed.test", &[]).0, "NXDOMAIN");
    let (_, body) = lab.call("GET", None);
    assert!(body.contains("\"mode\":\"deny_all\""), "{body}");
    assert!(lab.log().contains("is not a valid policy"), "{}", lab.log());
    lab.kill_sidecar();

    // Unknown defaultAction: rejected, never taken as allow.
    let _ = std::fs::remove_file(lab.policy_file());
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", r#"{"defaultAction":"alow"}"#),
    ]);
    assert_eq!(lab.dig("blocked.test", &[]).0, "NXDOMAIN");
    assert!(!lab.http(BLOCKED_IP));
    assert!(lab.log().contains("unsupported action"));
    lab.kill_sidecar();

    // A broken deny.always at start: refuses to run without the operator's denials, naming the
    // line; a broken allow.always only costs its own rules.
    lab.write_rule_file("allow.always", "fine.test\nnot a name!\n");
    lab.start_sidecar(&[("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED)]);
    assert_eq!(lab.dig("allowed.test", &[]).0, "NOERROR");
    assert!(lab.log().contains("allow.always line 2"), "{}", lab.log());
    lab.kill_sidecar();
    lab.write_rule_file("deny.always", "evil.test\nnot a name!\n");
    let out = lab
        .in_sandbox(env!("CARGO_BIN_EXE_egress-sidecar"))
        .env("OPENSANDBOX_EGRESS_RULES_DIR", lab.rules_dir())
        .env("OPENSANDBOX_EGRESS_DNS_UPSTREAM", support::DNS)
        .env("OPENSANDBOX_EGRESS_HTTP_ADDR", "127.0.0.1:18080")
        .output()
        .unwrap();
    assert!(!out.status.success(), "must not start");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("deny.always line 2") && text.contains("refusing to start"),
        "{text}"
    );

    // Without NET_ADMIN: exits with an error naming the capability.
    let out = lab
        .in_sandbox("setpriv")
        .args([
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
            "--",
            env!("CARGO_BIN_EXE_egress-sidecar"),
        ])
        .env("OPENSANDBOX_EGRESS_MODE", "dns+nft")
        .env("OPENSANDBOX_EGRESS_DNS_UPSTREAM", support::DNS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NET_ADMIN"), "{text}");

    // Asked to leave root but not allowed to (no SETUID), or asked for root or nonsense: it
    // stops, naming what is wrong, and never runs as root instead.
    for (run_as, says) in [
        ("65533:65533", "SETUID and SETGID"),
        ("0:0", "OPENSANDBOX_EGRESS_RUN_AS"),
        ("sidecar", "OPENSANDBOX_EGRESS_RUN_AS"),
    ] {
        let out = lab
            .in_sandbox("setpriv")
            .args([
                "--bounding-set=-all,+net_admin",
                "--inh-caps=-all",
                "--",
                env!("CARGO_BIN_EXE_egress-sidecar"),
            ])
            .env("OPENSANDBOX_EGRESS_MODE", "dns+nft")
            .env("OPENSANDBOX_EGRESS_DNS_UPSTREAM", support::DNS)
            .env("OPENSANDBOX_EGRESS_RUN_AS", run_as)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{run_as}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(says), "{run_as}: {text}");
    }
}

#[test]
fn takes_over_a_table_left_by_another_sidecar_and_starts_closed() {
    let mut lab = Lab::new();
    // A table of the same name but another shape, open by default, with a stale learned entry.
    lab.nft(
        "add table inet opensandbox
         add set inet opensandbox dyn_allow_v4 { type ipv4_addr; timeout 360s; }
         add element inet opensandbox dyn_allow_v4 { 198.51.100.20 }
         add chain inet opensandbox egress { type filter hook output priority 0; policy accept; }
         add rule inet opensandbox egress ip daddr @dyn_allow_v4 accept
         add chain inet opensandbox legacy { type filter hook output priority 10; policy accept; }",
    );
    assert!(lab.http(BLOCKED_IP));
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
    ]);
    assert!(
        !lab.http(BLOCKED_IP),
        "stale entry of the old table must not survive"
    );
    let ruleset = lab.nft_ruleset();
    assert!(!ruleset.contains("legacy"), "old chains removed: {ruleset}");
    assert_eq!(ruleset.matches("table inet opensandbox").count(), 1);
    assert_eq!(lab.dig("allowed.test", &[]).0, "NOERROR");
    assert!(lab.http(ALLOWED_IP));
}
