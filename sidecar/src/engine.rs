//! Policy evaluation with cost independent of the number of rules: names are looked up label by
//! label in hash maps (exact names, and `*.suffix` wildcards per suffix), addresses per prefix
//! length. The first matching rule wins; the always-deny file beats the always-allow file, which
//! beats the user policy; the default action decides the rest.

use std::collections::HashMap;
use std::net::IpAddr;

use sandbox_api::policy::{Action, Policy, Rule};

/// A name in canonical form: lowercase, no trailing dot.
pub fn canonical(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// One layer of rules, indexed. Each entry keeps the position of the first rule that set it.
#[derive(Debug, Default, Clone)]
struct Layer {
    exact: HashMap<String, (usize, Action)>,
    /// `*.suffix` rules by suffix: they match names strictly below the suffix.
    wildcard: HashMap<String, (usize, Action)>,
    /// CIDR rules per (is IPv6, prefix length), keyed by the masked address.
    nets: HashMap<(bool, u8), HashMap<u128, (usize, Action)>>,
    /// Prefix lengths in use, so a lookup tries only those.
    prefixes: Vec<(bool, u8)>,
}

pub use sandbox_api::net::{bits, mask};

/// An IP or CIDR target as (is IPv6, address bits, prefix length); IPv4-mapped IPv6 addresses
/// and blocks are IPv4. `None` for names (and for blocks the policy check refuses).
pub fn parse_net(target: &str) -> Option<(bool, u128, u8)> {
    let c: sandbox_api::net::Cidr = target.parse().ok()?;
    Some((c.v6, c.bits, c.prefix))
}

fn keep_first(map: &mut HashMap<String, (usize, Action)>, key: String, entry: (usize, Action)) {
    map.entry(key).or_insert(entry);
}

impl Layer {
    fn build(rules: &[Rule]) -> Self {
        let mut layer = Layer::default();
        for (index, rule) in rules.iter().enumerate() {
            let target = canonical(&rule.target);
            let entry = (index, rule.action);
            if let Some((v6, value, prefix)) = parse_net(&target) {
                layer.add_net(v6, value, prefix, entry);
            } else if let Some(suffix) = target.strip_prefix("*.") {
                keep_first(&mut layer.wildcard, suffix.to_owned(), entry);
            } else {
                keep_first(&mut layer.exact, target, entry);
            }
        }
        layer.prefixes.sort_unstable();
        layer
    }

    fn add_net(&mut self, v6: bool, value: u128, prefix: u8, entry: (usize, Action)) {
        if !self.prefixes.contains(&(v6, prefix)) {
            self.prefixes.push((v6, prefix));
        }
        self.nets
            .entry((v6, prefix))
            .or_default()
            .entry(mask(v6, value, prefix))
            .or_insert(entry);
    }

    /// The first rule matching `name` (canonical), if any.
    fn name(&self, name: &str) -> Option<(usize, Action)> {
        let mut best = self.exact.get(name).copied();
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(hit) = self.wildcard.get(parent) {
                best = Some(match best {
                    Some(b) if b.0 < hit.0 => b,
                    _ => *hit,
                });
            }
            rest = parent;
        }
        best
    }

    fn ip(&self, ip: IpAddr) -> Option<(usize, Action)> {
        let (v6, value) = bits(ip);
        self.prefixes
            .iter()
            .filter(|(is_v6, _)| *is_v6 == v6)
            .filter_map(|&(is_v6, prefix)| {
                self.nets
                    .get(&(is_v6, prefix))?
                    .get(&mask(v6, value, prefix))
                    .copied()
            })
            .min_by_key(|(index, _)| *index)
    }
}

/// Which layer decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    AlwaysDeny,
    AlwaysAllow,
    Policy,
    Default,
}

impl Source {
    /// The layer's name in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::AlwaysDeny => "deny.always",
            Source::AlwaysAllow => "allow.always",
            Source::Policy => "policy",
            Source::Default => "default",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Engine {
    deny_always: Layer,
    allow_always: Layer,
    policy: Layer,
    default: Action,
}

impl Engine {
    /// `deny_always` and `allow_always` are targets from the always-rule files.
    pub fn new(policy: &Policy, deny_always: &[String], allow_always: &[String]) -> Self {
        let layer = |targets: &[String], action| {
            Layer::build(
                &targets
                    .iter()
                    .map(|t| Rule {
                        action,
                        target: t.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        };
        Engine {
            deny_always: layer(deny_always, Action::Deny),
            allow_always: layer(allow_always, Action::Allow),
            policy: Layer::build(&policy.egress),
            default: policy.default_action,
        }
    }

    fn decide(&self, lookup: impl Fn(&Layer) -> Option<(usize, Action)>) -> (Action, Source) {
        if lookup(&self.deny_always).is_some() {
            return (Action::Deny, Source::AlwaysDeny);
        }
        if lookup(&self.allow_always).is_some() {
            return (Action::Allow, Source::AlwaysAllow);
        }
        match lookup(&self.policy) {
            Some((_, action)) => (action, Source::Policy),
            None => (self.default, Source::Default),
        }
    }

    /// The verdict for a DNS name (any case, trailing dot or not).
    pub fn name(&self, name: &str) -> (Action, Source) {
        let name = canonical(name);
        self.decide(|layer| layer.name(&name))
    }

    /// The verdict for an address.
    pub fn ip(&self, ip: IpAddr) -> (Action, Source) {
        self.decide(|layer| layer.ip(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: Action, rules: &[(Action, &str)]) -> Policy {
        Policy {
            default_action: default,
            egress: rules
                .iter()
                .map(|(a, t)| Rule {
                    action: *a,
                    target: (*t).into(),
                })
                .collect(),
        }
    }

    use Action::{Allow, Deny};

    #[test]
    fn first_match_wins_and_wildcards_skip_the_bare_suffix() {
        let e = Engine::new(
            &policy(
                Deny,
                &[
                    (Allow, "*.example.test"),
                    (Deny, "api.example.test"),
                    (Allow, "a.test"),
                ],
            ),
            &[],
            &[],
        );
        assert_eq!(
            e.name("api.example.test").0,
            Allow,
            "first matching rule wins"
        );
        assert_eq!(e.name("deep.er.example.test").0, Allow);
        assert_eq!(
            e.name("example.test").0,
            Deny,
            "*.suffix does not match the suffix itself"
        );
        assert_eq!(e.name("A.Test.").0, Allow, "case and trailing dot ignored");
        let w = Engine::new(&policy(Deny, &[(Allow, "*.a.test")]), &[], &[]);
        assert_eq!(w.name("a.test").0, Deny);
        assert_eq!(w.name("x.a.test").0, Allow);
        let order = Engine::new(
            &policy(
                Allow,
                &[(Deny, "api.example.test"), (Allow, "*.example.test")],
            ),
            &[],
            &[],
        );
        assert_eq!(order.name("api.example.test").0, Deny);
    }

    #[test]
    fn always_files_beat_the_policy() {
        let e = Engine::new(
            &policy(Allow, &[(Allow, "blocked.test"), (Deny, "allowed.test")]),
            &["blocked.test".into(), "10.0.0.0/8".into()],
            &["allowed.test".into(), "blocked.test".into()],
        );
        assert_eq!(e.name("blocked.test"), (Deny, Source::AlwaysDeny));
        assert_eq!(e.name("allowed.test"), (Allow, Source::AlwaysAllow));
        assert_eq!(e.name("other.test"), (Allow, Source::Default));
        assert_eq!(
            e.ip("10.1.2.3".parse().unwrap()),
            (Deny, Source::AlwaysDeny)
        );
    }

    #[test]
    fn addresses_and_cidrs() {
        let e = Engine::new(
            &policy(
                Deny,
                &[
                    (Allow, "198.51.100.10"),
                    (Deny, "198.51.100.0/24"),
                    (Allow, "198.51.0.0/16"),
                    (Allow, "2001:db8::/32"),
                ],
            ),
            &[],
            &[],
        );
        let v = |s: &str| e.ip(s.parse().unwrap()).0;
        assert_eq!(v("198.51.100.10"), Allow);
        assert_eq!(v("198.51.100.20"), Deny);
        assert_eq!(v("198.51.7.7"), Allow);
        assert_eq!(v("::ffff:198.51.100.10"), Allow);
        assert_eq!(v("2001:db8::1"), Allow);
        assert_eq!(v("2001:db9::1"), Deny);
        assert_eq!(v("203.0.113.1"), Deny);
        let all = Engine::new(&policy(Deny, &[(Allow, "0.0.0.0/0")]), &[], &[]);
        assert_eq!(all.ip("192.0.2.1".parse().unwrap()).0, Allow);
    }

    use proptest::prelude::*;

    /// The indexed evaluator agrees with a plain scan of the rules.
    fn scan(rules: &[(Action, String)], default: Action, name: &str) -> Action {
        let name = canonical(name);
        for (action, target) in rules {
            let t = canonical(target);
            let hit = match t.strip_prefix("*.") {
                Some(suffix) => name.len() > suffix.len() && name.ends_with(&format!(".{suffix}")),
                None => name == t,
            };
            if hit {
                return *action;
            }
        }
        default
    }

    proptest! {
        #[test]
        fn index_agrees_with_a_scan(
            rules in proptest::collection::vec((any::<bool>(), "(\\*\\.)?[ab]{1,2}(\\.[ab]{1,2}){0,2}"), 0..12),
            name in "[ab]{1,2}(\\.[ab]{1,2}){0,3}\\.?",
            default_allow: bool,
        ) {
            let rules: Vec<(Action, String)> = rules.into_iter().map(|(a, t)| (if a { Allow } else { Deny }, t)).collect();
            let default = if default_allow { Allow } else { Deny };
            let p = Policy { default_action: default, egress: rules.iter().map(|(a, t)| Rule { action: *a, target: t.clone() }).collect() };
            let e = Engine::new(&p, &[], &[]);
            prop_assert_eq!(e.name(&name).0, scan(&rules, default, &name));
        }
    }
}
