//! The route table: sandbox id → what a request for it should do. Readers load an immutable
//! snapshot without locks; the single writer edits a persistent map (copy-on-write in O(1))
//! and swaps it in whole, so a sandbox present before and after an update is never seen as
//! absent, and a relist replaces a source's objects atomically.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::metrics::metrics;
use crate::objects::Sandbox;
use crate::ports::PortSet;

/// One sandbox object as a provider read it, before names are checked for clashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub namespace: String,
    pub name: String,
    /// Non-empty when the sandbox requires credentials.
    pub token: Option<String>,
    /// Upstream addresses, or why there are none.
    pub upstream: Result<Vec<IpAddr>, String>,
    /// Ports requests may reach; `None`: every port.
    pub ports: Option<PortSet>,
}

impl Record {
    /// The record of a sandbox read by a provider, with its upstream resolved.
    pub fn of(sandbox: &Sandbox, upstream: Result<Vec<IpAddr>, String>) -> Self {
        Self {
            namespace: sandbox.namespace.clone(),
            name: sandbox.name.clone(),
            token: sandbox.token.clone(),
            upstream,
            ports: sandbox.ports.clone(),
        }
    }
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
    /// Ports requests may reach; `None`: every port.
    pub ports: Option<PortSet>,
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

pub type Map = imbl::HashMap<Arc<str>, Arc<Entry>>;

/// The entry for one sandbox id given every object of that name.
fn entry_for(records: &[(String, Record)]) -> Entry {
    if let [(_, r)] = records {
        return match &r.upstream {
            Ok(endpoints) if !endpoints.is_empty() => Entry::Routable(Routable {
                namespace: r.namespace.as_str().into(),
                token: r.token.as_deref().filter(|t| !t.is_empty()).map(Into::into),
                ports: r.ports.clone(),
                endpoints: endpoints.as_slice().into(),
                next: AtomicUsize::new(0),
            }),
            Ok(_) => Entry::Unavailable("sandbox has no endpoints".into()),
            Err(reason) => Entry::Unavailable(reason.as_str().into()),
        };
    }
    let mut found: Vec<String> = records
        .iter()
        .map(|(_, r)| format!("{}/{}", r.namespace, r.name))
        .collect();
    found.sort_unstable();
    Entry::Ambiguous(format!("[{}]", found.join(" ")).into())
}

/// The shared table that requests read.
#[derive(Default)]
pub struct RouteTable {
    snapshot: ArcSwap<Map>,
    ready: AtomicBool,
    /// Per-source health notes shown by `/readyz` (e.g. a lost watch); not on the request path.
    notes: Mutex<BTreeMap<String, String>>,
}

impl RouteTable {
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.snapshot.load().get(id).cloned()
    }

    /// The entry with the table's own copy of its id (kept for logging without a copy).
    pub fn get_with_id(&self, id: &str) -> Option<(Arc<str>, Arc<Entry>)> {
        self.snapshot
            .load()
            .get_key_value(id)
            .map(|(k, v)| (k.clone(), v.clone()))
    }

    pub fn len(&self) -> usize {
        self.snapshot.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every source has loaded its first full snapshot.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Sets or clears a source's health note.
    pub fn note(&self, source: &str, note: Option<String>) {
        if let Ok(mut notes) = self.notes.lock() {
            match note {
                Some(n) => notes.insert(source.to_owned(), n),
                None => notes.remove(source),
            };
        }
    }

    /// Health notes as `source: note` lines.
    pub fn notes(&self) -> String {
        self.notes
            .lock()
            .map(|n| n.iter().map(|(s, v)| format!("{s}: {v}\n")).collect())
            .unwrap_or_default()
    }
}

/// The single writer of a table. Each source (a file, or one watch) owns its records; the
/// table is ready once every registered source has synced once.
pub struct TableWriter {
    table: Arc<RouteTable>,
    map: Map,
    /// name → (source, record) for every object with that name.
    by_name: HashMap<String, Vec<(String, Record)>>,
    /// source → names it holds.
    names_of: HashMap<String, HashSet<String>>,
    unsynced: HashSet<String>,
}

impl TableWriter {
    pub fn new(table: Arc<RouteTable>, sources: impl IntoIterator<Item = String>) -> Self {
        Self {
            table,
            map: Map::default(),
            by_name: HashMap::new(),
            names_of: HashMap::new(),
            unsynced: sources.into_iter().collect(),
        }
    }

    fn refresh(&mut self, name: &str) {
        match self.by_name.get(name) {
            Some(records) if !records.is_empty() => {
                self.map.insert(name.into(), Arc::new(entry_for(records)));
            }
            _ => {
                self.by_name.remove(name);
                self.map.remove(name);
            }
        }
    }

    fn detach(&mut self, source: &str, namespace: &str, name: &str) {
        if let Some(records) = self.by_name.get_mut(name) {
            records.retain(|(s, r)| !(s == source && r.namespace == namespace));
            if !records.iter().any(|(s, _)| s == source)
                && let Some(names) = self.names_of.get_mut(source)
            {
                names.remove(name);
            }
        }
    }

    /// Adds or replaces one object of a source.
    pub fn upsert(&mut self, source: &str, record: Record) {
        let name = record.name.clone();
        self.detach(source, &record.namespace, &name);
        self.by_name
            .entry(name.clone())
            .or_default()
            .push((source.to_owned(), record));
        self.names_of
            .entry(source.to_owned())
            .or_default()
            .insert(name.clone());
        self.refresh(&name);
    }

    /// Removes one object of a source.
    pub fn remove(&mut self, source: &str, namespace: &str, name: &str) {
        self.detach(source, namespace, name);
        self.refresh(name);
    }

    /// Replaces everything a source holds (a full list), dropping objects no longer present,
    /// and marks the source synced.
    pub fn replace_source(&mut self, source: &str, records: Vec<Record>) {
        let old = self.names_of.remove(source).unwrap_or_default();
        for name in &old {
            if let Some(list) = self.by_name.get_mut(name) {
                list.retain(|(s, _)| s != source);
            }
        }
        let mut touched = old;
        let mut names = HashSet::with_capacity(records.len());
        for record in records {
            names.insert(record.name.clone());
            touched.insert(record.name.clone());
            self.by_name
                .entry(record.name.clone())
                .or_default()
                .push((source.to_owned(), record));
        }
        self.names_of.insert(source.to_owned(), names);
        for name in touched {
            self.refresh(&name);
        }
        self.unsynced.remove(source);
    }

    /// Makes the current state visible to requests.
    pub fn publish(&mut self) {
        self.table.snapshot.store(Arc::new(self.map.clone()));
        let m = metrics();
        m.table_size.set(self.map.len() as i64);
        if self.unsynced.is_empty() && !self.table.is_ready() {
            self.table.ready.store(true, Ordering::Release);
            m.ready.set(1);
        }
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
            ports: None,
            upstream: upstream
                .map(|v| v.iter().map(|s| s.parse().unwrap()).collect())
                .map_err(String::from),
        }
    }

    fn writer(sources: &[&str]) -> (Arc<RouteTable>, TableWriter) {
        let table = Arc::new(RouteTable::default());
        let w = TableWriter::new(table.clone(), sources.iter().map(|s| s.to_string()));
        (table, w)
    }

    #[test]
    fn builds_entries_and_flags_clashes() {
        let (table, mut w) = writer(&["file"]);
        assert!(!table.is_ready());
        w.replace_source(
            "file",
            vec![
                rec("a", "one", Ok(vec!["127.0.0.1", "127.0.0.2"])),
                rec("a", "dup", Ok(vec!["127.0.0.1"])),
                rec("b", "dup", Ok(vec!["127.0.0.1"])),
                rec("a", "down", Err("sandbox is not ready")),
                rec("a", "none", Ok(vec![])),
            ],
        );
        w.publish();
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

    #[test]
    fn incremental_updates_and_relists() {
        let (table, mut w) = writer(&["bsbx", "agent"]);
        w.replace_source(
            "bsbx",
            vec![
                rec("a", "x", Ok(vec!["10.0.0.1"])),
                rec("a", "gone", Ok(vec!["10.0.0.2"])),
            ],
        );
        w.publish();
        assert!(!table.is_ready(), "ready only when every source synced");
        w.replace_source("agent", vec![rec("b", "x", Ok(vec!["10.0.0.9"]))]);
        w.publish();
        assert!(table.is_ready());
        assert!(
            matches!(table.get("x").as_deref(), Some(Entry::Ambiguous(_))),
            "clash across sources"
        );
        w.remove("agent", "b", "x");
        w.upsert("bsbx", rec("a", "x", Ok(vec!["10.0.0.3"])));
        w.publish();
        let entry = table.get("x").unwrap();
        let Entry::Routable(r) = entry.as_ref() else {
            panic!("x not routable")
        };
        assert_eq!(r.endpoints(), &["10.0.0.3".parse::<IpAddr>().unwrap()]);
        // A relist without "gone" drops it and keeps the rest.
        let before = table.get("x");
        w.replace_source("bsbx", vec![rec("a", "x", Ok(vec!["10.0.0.3"]))]);
        w.publish();
        assert!(table.get("gone").is_none());
        assert!(table.get("x").is_some() && before.is_some());
        assert_eq!(table.len(), 1);
    }
}
