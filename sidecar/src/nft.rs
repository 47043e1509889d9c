//! nftables enforcement: one `inet` table holding
//! - a nat chain that sends every port-53 query of the namespace to the DNS proxy (the proxy's
//!   own upstream sockets carry a mark and are let through),
//! - in `dns+nft` mode, an output filter chain with default drop, static allow/deny interval sets
//!   built from the IP and CIDR rules, and dynamic allow sets filled from allowed DNS answers.
//!
//! All programming goes through one task that writes `nft -f -` batches: every change is one
//! atomic transaction, DNS answers arriving together share one batch, and an address already
//! learned with enough time left costs nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_api::policy::Action;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Mode, SOCKET_MARK};
use crate::engine::{Engine, parse_net};
use crate::metrics;
use crate::netlink::Netlink;

/// The table name the reference sidecar uses, so either one takes over the other's table.
pub const TABLE: &str = "opensandbox";
const MIN_TIMEOUT: u32 = 60;
const MAX_TIMEOUT: u32 = 360;
/// Names remembered per learned address, to withdraw it when none of them is allowed any more.
const NAMES_PER_ADDRESS: usize = 32;

/// How long a learned address stays in a dynamic set: the record's TTL plus a minute, clamped
/// to 60..=360 seconds (the reference's bounds).
pub fn element_timeout(ttl: u32) -> u32 {
    ttl.saturating_add(60).clamp(MIN_TIMEOUT, MAX_TIMEOUT)
}

/// Everything that decides the static part of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticSpec {
    pub mode: Mode,
    pub dns_port: u16,
    /// IP and CIDR rules in decision order: deny.always, allow.always, then the user policy.
    pub ip_rules: Vec<(Action, String)>,
    pub default_action: Action,
    /// Nameservers the sandbox may query directly on port 53 (not redirected to the proxy).
    pub redirect_exempt: Vec<IpAddr>,
    pub block_doh_443: bool,
    pub doh_blocklist: Vec<String>,
}

/// Disjoint address ranges per verdict, from first-match-wins rules.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Partition {
    pub allow_v4: Vec<(u128, u128)>,
    pub deny_v4: Vec<(u128, u128)>,
    pub allow_v6: Vec<(u128, u128)>,
    pub deny_v6: Vec<(u128, u128)>,
}

fn range(v6: bool, value: u128, prefix: u8) -> (u128, u128) {
    let width = if v6 { 128 } else { 32 };
    let host_bits = width - u32::from(prefix);
    let span = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (value, value | span)
}

/// Splits the address space among rules so that each address belongs to the first rule that
/// covers it; nft interval sets cannot overlap, and set order cannot express "first match".
pub fn partition(rules: &[(Action, String)]) -> Partition {
    // Per family: start -> (end, action), disjoint.
    let mut covered: [BTreeMap<u128, (u128, Action)>; 2] = [BTreeMap::new(), BTreeMap::new()];
    for (action, target) in rules {
        let Some((v6, value, prefix)) = parse_net(target.trim()) else {
            continue;
        };
        let map = &mut covered[usize::from(v6)];
        let (start, end) = range(v6, value, prefix);
        // Walk the covered intervals overlapping [start, end] and fill the gaps between them.
        let mut gaps = Vec::new();
        let mut cursor = start;
        let mut done = false;
        let from = map
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e >= start)
            .map_or(start, |(s, _)| *s);
        for (&s, &(e, _)) in map.range(from..=end) {
            if s > cursor {
                gaps.push((cursor, s - 1));
            }
            if e >= end {
                done = true;
                break;
            }
            cursor = cursor.max(e + 1);
        }
        if !done {
            gaps.push((cursor, end));
        }
        for (s, e) in gaps {
            map.insert(s, (e, *action));
        }
    }
    let mut out = Partition::default();
    for (v6, map) in covered.iter().enumerate() {
        let mut merged: Vec<(u128, u128, Action)> = Vec::new();
        for (&s, &(e, a)) in map {
            match merged.last_mut() {
                Some(last) if last.2 == a && last.1.checked_add(1) == Some(s) => last.1 = e,
                _ => merged.push((s, e, a)),
            }
        }
        for (s, e, a) in merged {
            let list = match (v6 == 1, a) {
                (false, Action::Allow) => &mut out.allow_v4,
                (false, Action::Deny) => &mut out.deny_v4,
                (true, Action::Allow) => &mut out.allow_v6,
                (true, Action::Deny) => &mut out.deny_v6,
            };
            list.push((s, e));
        }
    }
    out
}

fn addr(v6: bool, value: u128) -> String {
    if v6 {
        Ipv6Addr::from(value).to_string()
    } else {
        Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX)).to_string()
    }
}

fn elements(v6: bool, ranges: &[(u128, u128)]) -> String {
    ranges
        .iter()
        .map(|&(s, e)| {
            if s == e {
                addr(v6, s)
            } else {
                format!("{}-{}", addr(v6, s), addr(v6, e))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nft payload keyword for an address's family.
fn family(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// The nft script for the static part. `takeover` replaces whatever table of that name exists
/// (also one of another shape, from an older sidecar) in the same transaction, so there is no
/// moment without rules; otherwise sets and chains are updated in place and the dynamic sets
/// keep what they learned.
pub fn static_script(spec: &StaticSpec, takeover: bool) -> String {
    let t = TABLE;
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {t}");
    if takeover {
        let _ = writeln!(s, "delete table inet {t}");
        let _ = writeln!(s, "add table inet {t}");
    }
    let port = spec.dns_port;
    let _ = writeln!(
        s,
        "add chain inet {t} dns_redirect {{ type nat hook output priority -100; }}"
    );
    let _ = writeln!(s, "flush chain inet {t} dns_redirect");
    let _ = writeln!(
        s,
        "add rule inet {t} dns_redirect meta mark {SOCKET_MARK:#x} return"
    );
    for ip in &spec.redirect_exempt {
        let fam = family(ip);
        let _ = writeln!(
            s,
            "add rule inet {t} dns_redirect {fam} daddr {ip} udp dport 53 return"
        );
        let _ = writeln!(
            s,
            "add rule inet {t} dns_redirect {fam} daddr {ip} tcp dport 53 return"
        );
    }
    for proto in ["udp", "tcp"] {
        let _ = writeln!(
            s,
            "add rule inet {t} dns_redirect {proto} dport 53 redirect to :{port}"
        );
    }
    if spec.mode == Mode::Dns {
        return s;
    }

    // The proxy's own upstream traffic is marked and needs no address rule.
    let parts = partition(&spec.ip_rules);
    let doh_parts = partition(
        &spec
            .doh_blocklist
            .iter()
            .map(|e| (Action::Deny, e.clone()))
            .collect::<Vec<_>>(),
    );
    type Set<'a> = (&'a str, &'a str, &'a [(u128, u128)]);
    let sets: [Set; 6] = [
        ("allow_v4", "ipv4_addr", &parts.allow_v4),
        ("deny_v4", "ipv4_addr", &parts.deny_v4),
        ("allow_v6", "ipv6_addr", &parts.allow_v6),
        ("deny_v6", "ipv6_addr", &parts.deny_v6),
        ("doh_block_v4", "ipv4_addr", &doh_parts.deny_v4),
        ("doh_block_v6", "ipv6_addr", &doh_parts.deny_v6),
    ];
    for (name, ty, ranges) in sets {
        let _ = writeln!(
            s,
            "add set inet {t} {name} {{ type {ty}; flags interval; }}"
        );
        let _ = writeln!(s, "flush set inet {t} {name}");
        if !ranges.is_empty() {
            let _ = writeln!(
                s,
                "add element inet {t} {name} {{ {} }}",
                elements(ty == "ipv6_addr", ranges)
            );
        }
    }
    for (name, ty) in [("dyn_allow_v4", "ipv4_addr"), ("dyn_allow_v6", "ipv6_addr")] {
        let _ = writeln!(s, "add set inet {t} {name} {{ type {ty}; flags timeout; }}");
    }
    let _ = writeln!(
        s,
        "add chain inet {t} egress {{ type filter hook output priority 0; policy drop; }}"
    );
    let _ = writeln!(s, "flush chain inet {t} egress");
    let mut rule = |text: &str| {
        let _ = writeln!(s, "add rule inet {t} egress {text}");
    };
    rule("ct state established,related accept");
    rule(&format!("meta mark {SOCKET_MARK:#x} accept"));
    // Loopback by destination too: a query just redirected to 127.0.0.1 does not match
    // `oifname "lo"` in the output hook.
    rule("oifname \"lo\" accept");
    rule("ip daddr 127.0.0.0/8 accept");
    rule("ip6 daddr ::1 accept");
    // IPv6 needs neighbour discovery to reach anything (ARP, its IPv4 counterpart, is not
    // filtered by an inet table).
    rule("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept");
    // DNS over TLS would bypass the proxy.
    rule("tcp dport 853 drop");
    rule("udp dport 853 drop");
    for ip in &spec.redirect_exempt {
        let fam = family(ip);
        rule(&format!("{fam} daddr {ip} udp dport 53 accept"));
        rule(&format!("{fam} daddr {ip} tcp dport 53 accept"));
    }
    if spec.block_doh_443 {
        if spec.doh_blocklist.is_empty() {
            rule("tcp dport 443 drop");
        } else {
            rule("ip daddr @doh_block_v4 tcp dport 443 drop");
            rule("ip6 daddr @doh_block_v6 tcp dport 443 drop");
        }
    }
    rule("ip daddr @deny_v4 drop");
    rule("ip6 daddr @deny_v6 drop");
    rule("ip daddr @allow_v4 accept");
    rule("ip6 daddr @allow_v6 accept");
    rule("ip daddr @dyn_allow_v4 accept");
    rule("ip6 daddr @dyn_allow_v6 accept");
    if spec.default_action == Action::Allow {
        rule("accept");
    } else {
        rule("counter drop");
    }
    s
}

fn dyn_set(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "dyn_allow_v4",
        IpAddr::V6(_) => "dyn_allow_v6",
    }
}

/// Errors from running `nft`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NftError {
    #[error(
        "cannot run nft ({0}); the egress sidecar needs the nft command (package nftables) in its image"
    )]
    Spawn(String),
    #[error(
        "nft refused the change: operation not permitted; the egress sidecar needs the NET_ADMIN capability (securityContext.capabilities.add: [\"NET_ADMIN\"])"
    )]
    Permission,
    #[error("nft refused the change: {0}")]
    Refused(String),
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the nftables writer has stopped")]
    Stopped,
}

/// Runs one `nft -f -` transaction.
pub async fn run(script: &str) -> Result<(), NftError> {
    const LIMIT: Duration = Duration::from_secs(30);
    let work = async {
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| NftError::Spawn(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| NftError::Spawn(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| NftError::Spawn(e.to_string()))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if err.contains("Operation not permitted") {
            Err(NftError::Permission)
        } else {
            Err(NftError::Refused(err))
        }
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .unwrap_or(Err(NftError::Timeout(LIMIT)))
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff in /proc/self/status).
pub fn has_net_admin() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    let caps = u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()?;
    Some(caps & (1 << 12) != 0)
}

struct Learned {
    expires: Instant,
    names: Vec<String>,
}

enum Job {
    Static {
        spec: StaticSpec,
        engine: Arc<Engine>,
        reply: oneshot::Sender<Result<(), NftError>>,
    },
    Learn {
        name: String,
        addrs: Vec<(IpAddr, u32)>,
        reply: oneshot::Sender<Result<(), NftError>>,
    },
}

/// Learned addresses: when each leaves the kernel set (as last written there) and the names
/// that led to it. Shared between the writer and the DNS path, which skips the writer when an
/// answer's addresses are all in place with enough time left.
type LearnedMap = Arc<std::sync::Mutex<HashMap<IpAddr, Learned>>>;

fn remember(entry: &mut Learned, name: &str) {
    if !entry.names.iter().any(|n| n == name) {
        // Bounded: many names on one address (a CDN) keep the newest few. Losing one only
        // means the address may be withdrawn early (fail closed).
        if entry.names.len() >= NAMES_PER_ADDRESS {
            entry.names.remove(0);
        }
        entry.names.push(name.to_owned());
    }
}

/// Whether the kernel entry must be (re)written: less than half its timeout left.
fn stale(entry: Option<&Learned>, ttl: u32, now: Instant) -> bool {
    let half = Duration::from_secs(u64::from(element_timeout(ttl) / 2));
    entry.is_none_or(|l| l.expires.saturating_duration_since(now) < half)
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct Nft {
    tx: mpsc::Sender<Job>,
    learned: LearnedMap,
}

impl Nft {
    /// Starts the writer. The first static apply takes the table over.
    pub fn start() -> Nft {
        let (tx, rx) = mpsc::channel(4096);
        let learned = LearnedMap::default();
        tokio::spawn(writer(rx, learned.clone()));
        Nft { tx, learned }
    }

    /// Replaces the static part; learned addresses of names the new engine denies are dropped,
    /// the others stay.
    pub async fn apply(&self, spec: StaticSpec, engine: Arc<Engine>) -> Result<(), NftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Static {
                spec,
                engine,
                reply,
            })
            .await
            .map_err(|_| NftError::Stopped)?;
        rx.await.map_err(|_| NftError::Stopped)?
    }

    /// Admits the addresses of an allowed answer for `name`; returns once they are in the set.
    pub async fn learn(&self, name: String, addrs: Vec<(IpAddr, u32)>) -> Result<(), NftError> {
        if let Ok(mut learned) = self.learned.lock() {
            let now = Instant::now();
            if addrs
                .iter()
                .all(|(ip, ttl)| !stale(learned.get(ip), *ttl, now))
            {
                for (ip, _) in &addrs {
                    if let Some(entry) = learned.get_mut(ip) {
                        remember(entry, &name);
                    }
                }
                return Ok(());
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Learn { name, addrs, reply })
            .await
            .map_err(|_| NftError::Stopped)?;
        rx.await.map_err(|_| NftError::Stopped)?
    }
}

fn lock(map: &LearnedMap) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Learned>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds learned addresses over netlink (on a blocking thread: it waits for the kernel's
/// acknowledgement), falling back to `nft -f` with the same elements if netlink fails.
async fn add_elements(
    netlink: &mut Option<Netlink>,
    elements: Vec<(IpAddr, Duration)>,
    script: &str,
) -> Result<(), NftError> {
    if let Some(mut nl) = netlink.take() {
        let joined = tokio::task::spawn_blocking(move || {
            let r = nl.add(TABLE, "dyn_allow_v4", "dyn_allow_v6", &elements);
            (nl, r)
        })
        .await;
        match joined {
            Ok((nl, Ok(()))) => {
                *netlink = Some(nl);
                return Ok(());
            }
            Ok((nl, Err(e))) => {
                tracing::warn!(error = %e, "netlink element add failed; retrying through nft");
                *netlink = Some(nl);
            }
            Err(e) => tracing::warn!(error = %e, "netlink worker failed; using nft from now on"),
        }
    }
    run(script).await
}

async fn writer(mut rx: mpsc::Receiver<Job>, learned: LearnedMap) {
    let mut taken_over = false;
    let mut dynamic_ready = false;
    // The engine of the static state in the kernel: learns for names it denies are refused,
    // so an answer in flight during a policy change cannot re-admit a withdrawn name.
    let mut current: Option<Arc<Engine>> = None;
    let mut last_prune = Instant::now();
    let mut netlink = match Netlink::open() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "no nf_tables netlink socket; learned addresses go through nft");
            None
        }
    };
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < 512 {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if now.duration_since(last_prune) > Duration::from_secs(10) {
            lock(&learned).retain(|_, l| l.expires > now);
            last_prune = now;
        }
        let mut statics = Vec::new();
        let mut learns = Vec::new();
        for job in jobs {
            match job {
                Job::Static {
                    spec,
                    engine,
                    reply,
                } => statics.push((spec, engine, reply)),
                Job::Learn { name, addrs, reply } => learns.push((name, addrs, reply)),
            }
        }
        // Static changes: only the newest matters, every caller gets its outcome.
        if let Some((spec, engine, _)) = statics.last() {
            // The first apply replaces any existing table, learned addresses included: they may
            // come from a policy no longer in force (a restart reverts API changes that were not
            // persisted), so a restarted sidecar starts closed and relearns from answers.
            let mut script = static_script(spec, !taken_over);
            // Before the first apply nothing is learned (answers are refused until then).
            if taken_over {
                let mut map = lock(&learned);
                // Forget the addresses of names this policy denies; rebuild the dynamic
                // sets from what stays, in the same transaction.
                let mut dropped = false;
                map.retain(|_, l| {
                    l.names.retain(|n| engine.name(n).0 == Action::Allow);
                    let keep = !l.names.is_empty();
                    dropped |= !keep;
                    keep
                });
                if dropped && spec.mode == Mode::DnsNft {
                    for set in ["dyn_allow_v4", "dyn_allow_v6"] {
                        let _ = writeln!(script, "flush set inet {TABLE} {set}");
                    }
                    for (ip, l) in map.iter() {
                        let left = l.expires.saturating_duration_since(now).as_secs().max(1);
                        let _ = writeln!(
                            script,
                            "add element inet {TABLE} {} {{ {ip} timeout {left}s }}",
                            dyn_set(ip)
                        );
                    }
                }
            }
            let result = run(&script).await;
            metrics::nft_update("static", result.is_ok());
            if result.is_ok() {
                taken_over = true;
                dynamic_ready = spec.mode == Mode::DnsNft;
                current = Some(engine.clone());
            }
            for (_, _, reply) in statics {
                let _ = reply.send(result.clone());
            }
        }
        if learns.is_empty() {
            metrics::LEARNED.set(lock(&learned).len() as i64);
            continue;
        }
        if !dynamic_ready {
            for (_, _, reply) in learns {
                let _ = reply.send(Err(NftError::Refused(
                    "the nftables table is not in place".into(),
                )));
            }
            continue;
        }
        let mut script = String::new();
        let mut written: Vec<(IpAddr, Instant)> = Vec::new();
        let mut refused = Vec::new();
        {
            let map = lock(&learned);
            for (index, (name, addrs, _)) in learns.iter().enumerate() {
                if current
                    .as_ref()
                    .is_some_and(|e| e.name(name).0 != Action::Allow)
                {
                    refused.push(index);
                    continue;
                }
                for &(ip, ttl) in addrs {
                    if stale(map.get(&ip), ttl, now) && !written.iter().any(|(w, _)| *w == ip) {
                        let timeout = element_timeout(ttl);
                        let _ = writeln!(
                            script,
                            "add element inet {TABLE} {} {{ {ip} timeout {timeout}s }}",
                            dyn_set(&ip)
                        );
                        written.push((ip, now + Duration::from_secs(u64::from(timeout))));
                    }
                }
            }
        }
        let result = if script.is_empty() {
            Ok(())
        } else {
            let elements: Vec<(IpAddr, Duration)> = written
                .iter()
                .map(|(ip, until)| (*ip, until.saturating_duration_since(now)))
                .collect();
            let r = add_elements(&mut netlink, elements, &script).await;
            metrics::nft_update("dynamic", r.is_ok());
            r
        };
        {
            // Only what the kernel now holds is recorded.
            let mut map = lock(&learned);
            if result.is_ok() {
                for (ip, until) in &written {
                    let entry = map.entry(*ip).or_insert(Learned {
                        expires: *until,
                        names: Vec::new(),
                    });
                    entry.expires = entry.expires.max(*until);
                }
                for (index, (name, addrs, _)) in learns.iter().enumerate() {
                    if refused.contains(&index) {
                        continue;
                    }
                    for (ip, _) in addrs {
                        if let Some(entry) = map.get_mut(ip) {
                            remember(entry, name);
                        }
                    }
                }
            }
            metrics::LEARNED.set(map.len() as i64);
        }
        for (index, (_, _, reply)) in learns.into_iter().enumerate() {
            let outcome = if refused.contains(&index) {
                Err(NftError::Refused(
                    "the name is no longer allowed by the policy in force".into(),
                ))
            } else {
                result.clone()
            };
            let _ = reply.send(outcome);
        }
    }
}

/// Link-local and cloud metadata addresses: an allowed name pointing there is refused unless a
/// rule allows the address itself.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4 == Ipv4Addr::new(100, 100, 100, 200)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_special(IpAddr::V4(v4)),
            None => {
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.is_unspecified()
                    || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{Allow, Deny};

    fn rules(list: &[(Action, &str)]) -> Vec<(Action, String)> {
        list.iter().map(|(a, t)| (*a, (*t).to_owned())).collect()
    }

    fn v4(s: &str) -> u128 {
        u128::from(u32::from(s.parse::<Ipv4Addr>().unwrap()))
    }

    #[test]
    fn partition_gives_each_address_its_first_rule() {
        let p = partition(&rules(&[
            (Allow, "10.0.0.5"),
            (Deny, "10.0.0.0/24"),
            (Allow, "10.0.0.0/8"),
            (Deny, "10.0.0.7"),
        ]));
        assert_eq!(
            p.allow_v4,
            vec![
                (v4("10.0.0.5"), v4("10.0.0.5")),
                (v4("10.0.1.0"), v4("10.255.255.255"))
            ]
        );
        assert_eq!(
            p.deny_v4,
            vec![
                (v4("10.0.0.0"), v4("10.0.0.4")),
                (v4("10.0.0.6"), v4("10.0.0.255"))
            ]
        );
        let all = partition(&rules(&[(Deny, "198.51.100.20"), (Allow, "0.0.0.0/0")]));
        assert_eq!(
            all.allow_v4,
            vec![
                (0, v4("198.51.100.19")),
                (v4("198.51.100.21"), u128::from(u32::MAX))
            ]
        );
        let v6 = partition(&rules(&[(Allow, "::/0"), (Deny, "2001:db8::/32")]));
        assert_eq!(v6.allow_v6, vec![(0, u128::MAX)]);
        assert!(v6.deny_v6.is_empty(), "covered by the earlier rule");
    }

    #[test]
    fn partition_agrees_with_the_engine() {
        use sandbox_api::policy::{Policy, Rule};
        let list = rules(&[
            (Deny, "198.51.100.0/28"),
            (Allow, "198.51.100.8/29"),
            (Allow, "198.51.100.20"),
            (Deny, "198.51.0.0/16"),
            (Allow, "198.0.0.0/8"),
        ]);
        let engine = Engine::new(
            &Policy {
                default_action: Deny,
                egress: list
                    .iter()
                    .map(|(a, t)| Rule {
                        action: *a,
                        target: t.clone(),
                    })
                    .collect(),
            },
            &[],
            &[],
        );
        let p = partition(&list);
        for last in 0..=255u8 {
            for third in [0u8, 100, 200] {
                let ip = Ipv4Addr::new(198, 51, third, last);
                let x = u128::from(u32::from(ip));
                let inside = |r: &[(u128, u128)]| r.iter().any(|&(s, e)| s <= x && x <= e);
                let want = engine.ip(IpAddr::V4(ip)).0;
                assert_eq!(inside(&p.allow_v4), want == Allow, "{ip}");
                assert_eq!(inside(&p.deny_v4), want == Deny, "{ip}");
            }
        }
    }

    #[test]
    fn scripts() {
        let spec = StaticSpec {
            mode: Mode::DnsNft,
            dns_port: 15353,
            ip_rules: rules(&[(Allow, "198.51.100.10"), (Deny, "198.51.100.0/24")]),
            default_action: Deny,
            redirect_exempt: vec![],
            block_doh_443: false,
            doh_blocklist: vec![],
        };
        let s = static_script(&spec, true);
        assert!(s.starts_with("add table inet opensandbox\ndelete table inet opensandbox\n"));
        assert!(s.contains("udp dport 53 redirect to :15353"));
        assert!(s.contains("add element inet opensandbox allow_v4 { 198.51.100.10 }"));
        assert!(s.contains(
            "add element inet opensandbox deny_v4 { 198.51.100.0-198.51.100.9, 198.51.100.11-198.51.100.255 }"
        ));
        assert!(s.ends_with("add rule inet opensandbox egress counter drop\n"));
        assert!(!static_script(&spec, false).contains("delete table"));
        let dns_only = static_script(
            &StaticSpec {
                mode: Mode::Dns,
                ..spec
            },
            true,
        );
        assert!(!dns_only.contains("egress"));
        assert_eq!(element_timeout(0), 60);
        assert_eq!(element_timeout(120), 180);
        assert_eq!(element_timeout(86_400), 360);
    }

    #[test]
    fn special_addresses() {
        for ip in [
            "169.254.169.254",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.1.1",
            "0.0.0.0",
        ] {
            assert!(is_special(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.51.100.10", "2001:db8::1", "100.100.100.201"] {
            assert!(!is_special(ip.parse().unwrap()), "{ip}");
        }
    }
}
