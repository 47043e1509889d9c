//! The static part of the table as an nft script: the DNS redirect, the sidecar's identity
//! check, the address sets and the filter chain.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sandbox_api::policy::Action;

use super::TABLE;
use crate::config::{Mode, SOCKET_MARK};
use crate::engine::parse_net;
use crate::identity::MAX_LEVEL;

/// The conntrack zone of the sidecar's own flows (original direction).
const SIDECAR_ZONE: u16 = 1;

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

/// What the static script needs beyond the policy: the sidecar's cgroup (as nft names it) and
/// the generation its admitted flows carry in their conntrack mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub cgroup: String,
    pub generation: u32,
}

/// The nft script for the static part. `takeover` replaces whatever table of that name exists
/// (also one of another shape, from an older sidecar) in the same transaction, so there is no
/// moment without rules; otherwise sets and chains are updated in place and the dynamic sets
/// keep what they learned.
pub fn static_script(spec: &StaticSpec, takeover: bool, fence: &Fence) -> String {
    let t = TABLE;
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {t}");
    if takeover {
        let _ = writeln!(s, "delete table inet {t}");
        let _ = writeln!(s, "add table inet {t}");
    }
    // The sidecar's own sockets: marked AND created in its cgroup (see `identity`). Accepts;
    // anything else returns to the chain that jumped here.
    let _ = writeln!(s, "add chain inet {t} sidecar");
    let _ = writeln!(s, "flush chain inet {t} sidecar");
    let cgroup = &fence.cgroup;
    for level in 1..=MAX_LEVEL {
        let _ = writeln!(
            s,
            "add rule inet {t} sidecar socket cgroupv2 level {level} \"{cgroup}\" accept"
        );
    }
    // The sidecar's own flows are tracked in a conntrack zone of their own, in the original
    // direction. Its closed sockets leave entries behind (tens of seconds), and a sandbox process
    // can see their ports and bind one: in the shared zone its packets would match the entry and
    // skip the redirect below. Replies still match in the default zone (the reply direction's).
    let _ = writeln!(
        s,
        "add chain inet {t} sidecar_zone {{ type filter hook output priority raw; }}"
    );
    let _ = writeln!(s, "flush chain inet {t} sidecar_zone");
    for level in 1..=MAX_LEVEL {
        let _ = writeln!(
            s,
            "add rule inet {t} sidecar_zone meta mark {SOCKET_MARK:#x} socket cgroupv2 level {level} \"{cgroup}\" ct original zone set {SIDECAR_ZONE}"
        );
    }
    let port = spec.dns_port;
    let _ = writeln!(
        s,
        "add chain inet {t} dns_redirect {{ type nat hook output priority -100; }}"
    );
    let _ = writeln!(s, "flush chain inet {t} dns_redirect");
    let _ = writeln!(
        s,
        "add rule inet {t} dns_redirect meta mark {SOCKET_MARK:#x} jump sidecar"
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
    // Replies of connections opened towards the sandbox (the gateway's requests).
    rule("ct direction reply accept");
    // Flows the rules in force admitted. Every change of the rules takes a new generation, so
    // an established flow is judged again on its next packet and ends if now denied.
    let generation = fence.generation;
    rule(&format!(
        "ct state established,related ct mark {generation:#x} accept"
    ));
    rule(&format!("meta mark {SOCKET_MARK:#x} jump sidecar"));
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
    let admit = format!("ct mark set {generation:#x} accept");
    rule(&format!("ip daddr @allow_v4 {admit}"));
    rule(&format!("ip6 daddr @allow_v6 {admit}"));
    rule(&format!("ip daddr @dyn_allow_v4 {admit}"));
    rule(&format!("ip6 daddr @dyn_allow_v6 {admit}"));
    if spec.default_action == Action::Allow {
        rule(&admit);
    } else {
        rule("counter drop");
    }
    s
}

pub fn dyn_set(ip: &IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "dyn_allow_v4",
        IpAddr::V6(_) => "dyn_allow_v6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::nft::element_timeout;
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
        let fence = Fence {
            cgroup: "unified/sidecar".into(),
            generation: 0x2a,
        };
        let s = static_script(&spec, true, &fence);
        assert!(s.starts_with("add table inet opensandbox\ndelete table inet opensandbox\n"));
        assert!(s.contains("udp dport 53 redirect to :15353"));
        assert!(s.contains("add element inet opensandbox allow_v4 { 198.51.100.10 }"));
        assert!(s.contains(
            "add element inet opensandbox deny_v4 { 198.51.100.0-198.51.100.9, 198.51.100.11-198.51.100.255 }"
        ));
        assert!(s.ends_with("add rule inet opensandbox egress counter drop\n"));
        assert!(!static_script(&spec, false, &fence).contains("delete table"));
        // The sidecar's traffic needs the mark and the cgroup; flows carry the generation.
        assert!(s.contains("dns_redirect meta mark 0x1 jump sidecar\n"));
        assert!(s.contains("egress meta mark 0x1 jump sidecar\n"));
        assert!(
            !s.contains("meta mark 0x1 accept"),
            "the mark alone admits nothing"
        );
        assert!(s.contains("sidecar socket cgroupv2 level 1 \"unified/sidecar\" accept"));
        assert!(s.contains(
            "sidecar_zone meta mark 0x1 socket cgroupv2 level 1 \"unified/sidecar\" ct original zone set 1\n"
        ));
        assert!(s.contains("egress ct state established,related ct mark 0x2a accept"));
        assert!(s.contains("egress ip daddr @allow_v4 ct mark set 0x2a accept"));
        let dns_only = static_script(
            &StaticSpec {
                mode: Mode::Dns,
                ..spec
            },
            true,
            &fence,
        );
        assert!(dns_only.contains("dns_redirect meta mark 0x1 jump sidecar"));
        assert!(dns_only.contains("ct original zone set 1"));
        assert!(!dns_only.contains("egress"));
        assert_eq!(element_timeout(0), 60);
        assert_eq!(element_timeout(120), 180);
        assert_eq!(element_timeout(86_400), 360);
    }
}
