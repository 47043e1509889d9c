//! Turning sandbox targets into addresses off the request path. Names (AgentSandbox service
//! FQDNs) are looked up concurrently with a timeout; a name that does not resolve makes its
//! sandbox unavailable (503), never an error for the others.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use crate::metrics::metrics;
use crate::objects::{Sandbox, Target};
use crate::table::Record;
use crate::upstream::UpstreamPolicy;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

type Resolved = HashMap<String, Result<Vec<IpAddr>, String>>;

pub async fn lookup(name: String) -> (String, Result<Vec<IpAddr>, String>) {
    let result =
        match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name.as_str(), 0)))
            .await
        {
            Ok(Ok(addrs)) => {
                let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                ips.dedup();
                if ips.is_empty() {
                    Err(format!("{name} resolved to no address"))
                } else {
                    Ok(ips)
                }
            }
            Ok(Err(e)) => Err(format!("cannot resolve {name}: {e}")),
            Err(_) => Err(format!("cannot resolve {name}: timed out")),
        };
    (name, result)
}

async fn resolve_names(sandboxes: &[Sandbox]) -> Resolved {
    let names: HashSet<&str> = sandboxes
        .iter()
        .filter_map(|s| match &s.target {
            Target::Name(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    let tasks: Vec<_> = names
        .into_iter()
        .map(|n| tokio::spawn(lookup(n.to_owned())))
        .collect();
    let mut out = HashMap::with_capacity(tasks.len());
    for task in tasks {
        if let Ok((name, result)) = task.await {
            out.insert(name, result);
        }
    }
    out
}

/// Whether any sandbox needs a name looked up (and so a periodic refresh).
pub fn has_names(sandboxes: &[Sandbox]) -> bool {
    sandboxes
        .iter()
        .any(|s| matches!(s.target, Target::Name(_)))
}

/// Builds table records, resolving names first.
pub async fn records(sandboxes: &[Sandbox], policy: &UpstreamPolicy) -> Vec<Record> {
    let resolved = resolve_names(sandboxes).await;
    sandboxes
        .iter()
        .map(|s| Record::of(s, upstream(&s.target, &resolved, policy)))
        .collect()
}

/// Builds table records of sandboxes that name no upstream host (none to resolve), moving
/// their strings instead of copying them.
pub fn records_without_names(sandboxes: Vec<Sandbox>, policy: &UpstreamPolicy) -> Vec<Record> {
    let none = Resolved::new();
    sandboxes
        .into_iter()
        .map(|s| {
            let upstream = upstream(&s.target, &none, policy);
            Record {
                namespace: s.namespace,
                name: s.name,
                token: s.token,
                upstream,
                ports: s.ports,
                h2c: s.h2c,
            }
        })
        .collect()
}

fn upstream(
    target: &Target,
    resolved: &Resolved,
    policy: &UpstreamPolicy,
) -> Result<Vec<IpAddr>, String> {
    match target {
        Target::Addresses(a) => usable(a, policy),
        Target::Unavailable(reason) => Err(reason.clone()),
        Target::Name(n) => resolved
            .get(n)
            .cloned()
            .unwrap_or_else(|| Err(format!("cannot resolve {n}")))
            .and_then(|a| usable(&a, policy)),
    }
}

/// Keeps the addresses the upstream policy permits; refused ones are counted and logged.
pub fn usable(addresses: &[IpAddr], policy: &UpstreamPolicy) -> Result<Vec<IpAddr>, String> {
    let (ok, refused): (Vec<IpAddr>, Vec<IpAddr>) =
        addresses.iter().partition(|ip| policy.permits(**ip));
    if !refused.is_empty() {
        metrics().upstream_refused.inc_by(refused.len() as u64);
        tracing::warn!(refused = ?refused, "endpoints outside --allowed-upstream-cidrs are never dialled");
    }
    if ok.is_empty() {
        Err("sandbox has no permitted endpoint".into())
    } else {
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(name: &str, target: Target) -> Sandbox {
        Sandbox {
            namespace: "ns".into(),
            name: name.into(),
            token: None,
            target,
            ports: None,
            h2c: None,
        }
    }

    #[tokio::test]
    async fn resolves_names_and_refuses_forbidden_addresses() {
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        let got = records(
            &[
                sandbox("local", Target::Name("localhost".into())),
                sandbox("nowhere", Target::Name("does-not-exist.invalid".into())),
                sandbox(
                    "meta",
                    Target::Addresses(ips(&["169.254.169.254", "fe80::1", "0.0.0.0"])),
                ),
                sandbox(
                    "mixed",
                    Target::Addresses(ips(&["169.254.169.254", "127.0.0.2"])),
                ),
            ],
            &UpstreamPolicy::parse("", true).unwrap(),
        )
        .await;
        assert!(
            got[0]
                .upstream
                .as_ref()
                .unwrap()
                .iter()
                .all(|ip| ip.is_loopback())
        );
        assert!(
            got[1]
                .upstream
                .as_ref()
                .unwrap_err()
                .contains("does-not-exist.invalid")
        );
        assert!(got[2].upstream.is_err());
        assert_eq!(got[3].upstream, Ok(ips(&["127.0.0.2"])));
    }
}
