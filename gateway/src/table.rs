//! The route table: sandbox id → what a request for it should do. Readers load a snapshot
//! without locks; a provider swaps in a complete new snapshot, so a sandbox present before
//! and after an update is never seen as absent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

/// One sandbox object as a provider read it, before names are checked for clashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub namespace: String,
    pub name: String,
    /// Non-empty when the sandbox requires credentials.
    pub token: Option<String>,
    /// Upstream addresses, or why there are none.
    pub upstream: Result<Vec<IpAddr>, String>,
}

/// What the gateway does with a request for a sandbox id.
#[derive(Debug)]
pub enum Entry {
    Routable(Routable),
    /// Known but not routable now (503), with the reason.
    Unavailable(Box<str>),
    /// The same id exists in several namespaces (502), naming them as `[ns/id ns/id]`.
    Ambiguous(Box<str>),
}

#[derive(Debug)]
pub struct Routable {
    pub namespace: Box<str>,
    pub token: Option<Box<str>>,
    endpoints: Box<[IpAddr]>,
    next: AtomicUsize,
}

impl Routable {
    /// Picks the next endpoint round-robin; endpoints are never empty.
    pub fn pick(&self) -> IpAddr {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints[i % self.endpoints.len()]
    }

    pub fn endpoints(&self) -> &[IpAddr] {
        &self.endpoints
    }
}

pub type Snapshot = HashMap<Box<str>, Arc<Entry>>;

/// Builds a snapshot from records; the same name in several namespaces becomes ambiguous.
pub fn build(records: Vec<Record>) -> Snapshot {
    let mut by_name: HashMap<String, Vec<Record>> = HashMap::with_capacity(records.len());
    for r in records {
        by_name.entry(r.name.clone()).or_default().push(r);
    }
    by_name
        .into_iter()
        .map(|(name, mut group)| {
            let entry = if group.len() > 1 {
                let mut found: Vec<String> = group
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect();
                found.sort_unstable();
                Entry::Ambiguous(format!("[{}]", found.join(" ")).into())
            } else {
                let r = group.remove(0);
                match r.upstream {
                    Ok(endpoints) if !endpoints.is_empty() => Entry::Routable(Routable {
                        namespace: r.namespace.into(),
                        token: r.token.filter(|t| !t.is_empty()).map(Into::into),
                        endpoints: endpoints.into(),
                        next: AtomicUsize::new(0),
                    }),
                    Ok(_) => Entry::Unavailable("sandbox has no endpoints".into()),
                    Err(reason) => Entry::Unavailable(reason.into()),
                }
            };
            (name.into_boxed_str(), Arc::new(entry))
        })
        .collect()
}

/// The shared table.
#[derive(Default)]
pub struct RouteTable {
    snapshot: ArcSwap<Snapshot>,
    ready: AtomicBool,
}

impl RouteTable {
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.snapshot.load().get(id).cloned()
    }

    /// Replaces the whole table and marks it ready (a full snapshot has been loaded).
    pub fn replace(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.ready.store(true, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.snapshot.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first full snapshot has been loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ns: &str, name: &str, upstream: Result<Vec<&str>, &str>) -> Record {
        Record {
            namespace: ns.into(),
            name: name.into(),
            token: None,
            upstream: upstream
                .map(|v| v.iter().map(|s| s.parse().unwrap()).collect())
                .map_err(String::from),
        }
    }

    #[test]
    fn builds_entries_and_flags_clashes() {
        let table = RouteTable::default();
        assert!(!table.is_ready());
        table.replace(build(vec![
            rec("a", "one", Ok(vec!["127.0.0.1", "127.0.0.2"])),
            rec("a", "dup", Ok(vec!["127.0.0.1"])),
            rec("b", "dup", Ok(vec!["127.0.0.1"])),
            rec("a", "down", Err("sandbox is not ready")),
            rec("a", "none", Ok(vec![])),
        ]));
        assert!(table.is_ready());
        assert_eq!(table.len(), 4);
        let Some(entry) = table.get("one") else {
            panic!("missing")
        };
        let Entry::Routable(r) = entry.as_ref() else {
            panic!("not routable")
        };
        let picks: Vec<IpAddr> = (0..4).map(|_| r.pick()).collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1]);
        assert!(
            matches!(table.get("dup").as_deref(), Some(Entry::Ambiguous(ns)) if &**ns == "[a/dup b/dup]")
        );
        assert!(matches!(
            table.get("down").as_deref(),
            Some(Entry::Unavailable(_))
        ));
        assert!(matches!(
            table.get("none").as_deref(),
            Some(Entry::Unavailable(_))
        ));
        assert!(table.get("absent").is_none());
    }
}
