//! The fence as an attacker inside the sandbox tries it: a non-root process holding only
//! CAP_NET_RAW that sets the sidecar's socket mark, flows that were open before a deny, and
//! names that answer into private address space. Real namespaces, nftables and dnsmasq; needs
//! root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{ALLOWED_IP, ALLOWED_IP6, BLOCKED_IP, BLOCKED_IP6, DNS, Lab};

const ALLOW_ALLOWED: &str =
    r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"allowed.test"}]}"#;

/// Run as uid 65534 with only CAP_NET_RAW. For each socket mark (the sidecar's, another, none)
/// it tries TCP and UDP echo at an address and asks the resolver directly for a name, printing
/// `tcp <mark> <reached>`, `udp <mark> <reached>`, `dns <mark> <rcode>` (or `markerr` if the
/// kernel refused the mark, which would make the test prove nothing).
const ATTACKER: &str = r#"
import socket, struct, sys
ip, ip6, resolver, name = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
SO_MARK = 36
def marked(kind, mark, family=socket.AF_INET):
    s = socket.socket(family, kind)
    if mark:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except OSError as e:
            print("markerr", mark, e, flush=True)
            sys.exit(3)
    s.settimeout(1.5)
    return s
def query(name):
    q = struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)
for mark in (0x1, 0x2, 0x0):
    s = marked(socket.SOCK_STREAM, mark)
    try:
        s.connect((ip, 7)); s.sendall(b"x"); ok = s.recv(1) == b"x"
    except OSError:
        ok = False
    print("tcp", mark, ok, flush=True)
    s6 = marked(socket.SOCK_STREAM, mark, socket.AF_INET6)
    try:
        s6.connect((ip6, 7)); s6.sendall(b"x"); ok = s6.recv(1) == b"x"
    except OSError:
        ok = False
    print("tcp6", mark, ok, flush=True)
    u = marked(socket.SOCK_DGRAM, mark)
    try:
        u.sendto(b"x", (ip, 7)); ok = u.recv(16) == b"x"
    except OSError:
        ok = False
    print("udp", mark, ok, flush=True)
    d = marked(socket.SOCK_DGRAM, mark)
    try:
        d.sendto(query(name), (resolver, 53)); r = d.recv(512); rcode = r[3] & 15
    except OSError:
        rcode = -1
    print("dns", mark, rcode, flush=True)
"#;

/// Runs [`ATTACKER`] in the sandbox as uid 65534 with CAP_NET_RAW only; returns its lines.
fn attack(lab: &Lab, ip: &str, ip6: &str, name: &str) -> Vec<String> {
    let out = lab
        .in_sandbox("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_raw",
            "--ambient-caps=+net_raw",
            "--bounding-set=-all,+net_raw",
            // The system interpreter: a per-user one may not be readable by uid 65534.
            "/usr/bin/python3",
            "-c",
            ATTACKER,
            ip,
            ip6,
            DNS,
            name,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "attacker script failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_owned).collect()
}

#[test]
fn a_process_with_net_raw_cannot_pass_for_the_sidecar() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
    ]);
    // The sidecar is its own user now, with NET_ADMIN alone (its `nft` children inherit it).
    assert_eq!(lab.sidecar_status("Uid"), "65533\t65533\t65533\t65533");
    for set in ["CapEff", "CapPrm", "CapAmb"] {
        assert_eq!(lab.sidecar_status(set), "0000000000001000", "{set}");
    }
    // The denied address, whatever mark the socket carries: no TCP, no UDP, and a query sent
    // straight to the resolver is still answered by the sidecar's policy.
    let lines = attack(&lab, BLOCKED_IP, BLOCKED_IP6, "blocked.test");
    for mark in ["1", "2", "0"] {
        assert!(
            lines.contains(&format!("tcp {mark} False")),
            "TCP with mark {mark} reached the denied address: {lines:?}\n{}",
            lab.nft_ruleset()
        );
        assert!(
            lines.contains(&format!("tcp6 {mark} False")),
            "TCP with mark {mark} reached the denied IPv6 address: {lines:?}"
        );
        assert!(
            lines.contains(&format!("udp {mark} False")),
            "UDP with mark {mark} reached the denied address: {lines:?}"
        );
        assert!(
            lines.contains(&format!("dns {mark} 3")),
            "a direct query with mark {mark} was not answered NXDOMAIN by the sidecar: {lines:?}"
        );
    }
    // The same process reaches what the policy allows (the script and the lab work).
    assert_eq!(lab.dig("allowed.test", &[]).0, "NOERROR");
    assert_eq!(lab.dig("allowed.test", &["AAAA"]).0, "NOERROR");
    let lines = attack(&lab, ALLOWED_IP, ALLOWED_IP6, "allowed.test");
    for mark in ["1", "2", "0"] {
        assert!(lines.contains(&format!("tcp {mark} True")), "{lines:?}");
        assert!(lines.contains(&format!("tcp6 {mark} True")), "{lines:?}");
        assert!(lines.contains(&format!("udp {mark} True")), "{lines:?}");
        assert!(lines.contains(&format!("dns {mark} 0")), "{lines:?}");
    }
    // The sidecar itself still resolves through its marked sockets (it answered above), and
    // its exemption names its cgroup.
    let ruleset = lab.nft_ruleset();
    assert!(ruleset.contains("socket cgroupv2 level"), "{ruleset}");
    assert!(
        !ruleset.contains("meta mark 0x00000001 accept"),
        "{ruleset}"
    );
}

/// A client in the sandbox holding one TCP connection to `ip`'s echo port: every 100 ms it
/// sends a byte and prints `ok <unix time>` when the echo came back, `stall <time>` when not.
struct Flow {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Lines already taken from `lines`.
    seen: Vec<String>,
}

const FLOW: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7), timeout=2)
s.settimeout(0.2)
end = time.time() + float(sys.argv[2])
print("connected", time.time(), flush=True)
while time.time() < end:
    try:
        s.sendall(b"x")
        data = s.recv(64)
        print(("ok" if data else "closed"), time.time(), flush=True)
        if not data:
            break
    except socket.timeout:
        print("stall", time.time(), flush=True)
    except OSError:
        print("error", time.time(), flush=True)
        break
    time.sleep(0.1)
"#;

impl Flow {
    fn open(lab: &Lab, ip: &str, seconds: u32) -> Flow {
        let mut child = lab
            .in_sandbox("/usr/bin/python3")
            .args(["-c", FLOW, ip, &seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let flow = Flow {
            child,
            lines,
            seen: Vec::new(),
        };
        let first = flow.lines.recv_timeout(Duration::from_secs(5));
        assert!(
            first.as_deref().is_ok_and(|l| l.starts_with("connected")),
            "no connection to {ip}: {first:?}"
        );
        flow
    }

    /// Waits until data has gone both ways at least once.
    fn wait_for_echo(&mut self) {
        while !self.seen.iter().any(|l| l.starts_with("ok ")) {
            let line = self.lines.recv_timeout(Duration::from_secs(3));
            self.seen
                .push(line.expect("no echo within 3 s of connecting"));
        }
    }

    /// Waits for the client to finish; returns the times of its successful echoes.
    fn echoes(mut self) -> Vec<f64> {
        let _ = self.child.wait();
        self.seen.extend(self.lines.try_iter());
        self.seen
            .iter()
            .filter_map(|l| l.strip_prefix("ok ").and_then(|t| t.parse().ok()))
            .collect()
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Opens a flow to the address of allowed.test and one to 198.51.100.20 (allowed by an IP
/// rule), runs `deny`, and checks the first flow stops within 2 s while the second goes on.
fn open_flows_end_when_denied(deny: impl FnOnce(&mut Lab)) {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        (
            "OPENSANDBOX_EGRESS_RULES",
            r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"allowed.test"},{"action":"allow","target":"198.51.100.20/32"}]}"#,
        ),
    ]);
    assert_eq!(lab.dig("allowed.test", &[]).0, "NOERROR");
    let mut denied = Flow::open(&lab, ALLOWED_IP, 6);
    let mut kept = Flow::open(&lab, BLOCKED_IP, 6);
    denied.wait_for_echo();
    kept.wait_for_echo();
    let changed = now();
    deny(&mut lab);
    let denied = denied.echoes();
    let kept = kept.echoes();
    assert!(
        denied.iter().any(|t| *t < changed),
        "the flow never worked before the change"
    );
    let late: Vec<f64> = denied
        .iter()
        .map(|t| t - changed)
        .filter(|d| *d > 2.0)
        .collect();
    assert!(
        late.is_empty(),
        "data still flowed to the denied address {late:?} s after the change"
    );
    assert!(
        kept.iter().any(|t| *t > changed + 2.5),
        "the flow to the still-allowed address stopped too"
    );
    // And a new connection to the denied address is refused.
    assert!(!lab.http(ALLOWED_IP));
}

#[test]
fn a_patch_that_denies_a_name_ends_its_open_flows() {
    open_flows_end_when_denied(|lab| {
        let (code, body) = lab.call(
            "PATCH",
            Some(r#"[{"action":"deny","target":"allowed.test"}]"#),
        );
        assert_eq!(code, 200, "{body}");
    });
}

#[test]
fn a_deny_always_line_ends_open_flows() {
    open_flows_end_when_denied(|lab| lab.write_rule_file("deny.always", "allowed.test\n"));
}

#[test]
fn a_restart_under_a_narrower_policy_ends_open_flows() {
    open_flows_end_when_denied(|lab| {
        lab.kill_sidecar();
        std::fs::write(
            lab.policy_file(),
            r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"198.51.100.20/32"}]}"#,
        )
        .unwrap();
        lab.restart_sidecar();
    });
}

#[test]
fn answers_pointing_into_private_space_are_stripped_unless_a_rule_names_them() {
    let mut lab = Lab::new();
    let policy = r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"private10.test"},{"action":"allow","target":"loop.test"},{"action":"allow","target":"ula.test"},{"action":"allow","target":"mixed.test"}]}"#;
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        ("OPENSANDBOX_EGRESS_RULES", policy),
    ]);
    lab.serve_private();
    assert_eq!(lab.dig("private10.test", &[]), ("NOERROR".into(), vec![]));
    assert_eq!(lab.dig("loop.test", &[]), ("NOERROR".into(), vec![]));
    assert_eq!(lab.dig("ula.test", &["AAAA"]), ("NOERROR".into(), vec![]));
    // Only the private record goes; the public one stays.
    assert_eq!(
        lab.dig("mixed.test", &[]),
        ("NOERROR".into(), vec![ALLOWED_IP.to_owned()])
    );
    assert!(
        !lab.http(support::PRIVATE_IP),
        "stripped address must stay closed"
    );
    assert!(!lab.http(support::PRIVATE_IP6));
    let metrics = lab.api("GET", "/metrics", None, None).1;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("egress_dns_answers_stripped_total{class=\"private\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    // A rule naming the range lets the answer through, and the address opens.
    let (code, body) = lab.call(
        "PATCH",
        Some(r#"[{"action":"allow","target":"10.0.0.0/24"},{"action":"allow","target":"fd00::/64"}]"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        lab.dig("private10.test", &[]),
        ("NOERROR".into(), vec![support::PRIVATE_IP.to_owned()])
    );
    assert!(lab.http(support::PRIVATE_IP));
    assert_eq!(
        lab.dig("ula.test", &["AAAA"]),
        ("NOERROR".into(), vec![support::PRIVATE_IP6.to_owned()])
    );
    assert!(lab.http(support::PRIVATE_IP6));
    // Loopback answers stay stripped: no rule names 127.0.0.5.
    assert_eq!(lab.dig("loop.test", &[]), ("NOERROR".into(), vec![]));
}

#[test]
fn allow_private_answers_restores_the_reference_behaviour() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        (
            "OPENSANDBOX_EGRESS_RULES",
            r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"private10.test"},{"action":"allow","target":"meta.test"}]}"#,
        ),
        ("OPENSANDBOX_EGRESS_ALLOW_PRIVATE_ANSWERS", "true"),
    ]);
    lab.serve_private();
    assert_eq!(
        lab.dig("private10.test", &[]),
        ("NOERROR".into(), vec![support::PRIVATE_IP.to_owned()])
    );
    assert!(lab.http(support::PRIVATE_IP));
    // Metadata addresses are stripped regardless.
    assert_eq!(lab.dig("meta.test", &[]), ("NOERROR".into(), vec![]));
}

#[test]
fn extra_private_ranges_are_stripped_too() {
    let mut lab = Lab::new();
    lab.start_sidecar(&[
        ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
        (
            "OPENSANDBOX_EGRESS_RULES",
            r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"allowed.test"}]}"#,
        ),
        ("OPENSANDBOX_EGRESS_PRIVATE_CIDRS", "198.51.100.8/29"),
    ]);
    assert_eq!(lab.dig("allowed.test", &[]), ("NOERROR".into(), vec![]));
    assert!(!lab.http(ALLOWED_IP));
}

#[test]
fn a_taken_api_port_stops_the_sidecar_with_the_rules_in_place() {
    let mut lab = Lab::new();
    // Something in the sandbox holds the API port first.
    let mut squatter = lab
        .in_sandbox("/usr/bin/python3")
        .args([
            "-c",
            "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('127.0.0.1',18080))\ns.listen()\nprint('bound',flush=True)\ntime.sleep(30)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(squatter.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "bound");
    let status = lab.run_sidecar_to_exit(
        &[
            ("OPENSANDBOX_EGRESS_MODE", "dns+nft"),
            ("OPENSANDBOX_EGRESS_RULES", ALLOW_ALLOWED),
        ],
        Duration::from_secs(10),
    );
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert!(
        status.is_some_and(|s| !s.success()),
        "sidecar must exit non-zero: {status:?}\n{}",
        lab.log()
    );
    assert!(
        lab.log().contains("cannot listen for the API"),
        "{}",
        lab.log()
    );
    let ruleset = lab.nft_ruleset();
    assert!(
        ruleset.contains("table inet opensandbox") && ruleset.contains("policy drop"),
        "rules must stay in place: {ruleset}"
    );
    assert!(!lab.http(BLOCKED_IP));
    assert!(!lab.http(ALLOWED_IP), "nothing was learned");
}
