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

/// Shares its namespace, token and endpoints with the writer's copy of the object, so a sandbox's
/// strings and addresses are held once.
#[derive(Debug)]
pub struct Routable {
    pub namespace: Arc<str>,
    pub token: Option<Arc<str>>,
    /// Ports requests may reach; `None`: every port.
    pub ports: Option<PortSet>,
    endpoints: Arc<[IpAddr]>,
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

/// The writer's compact copy of one object: its source by index, its namespace interned, its
/// strings and addresses shared with the table's entry.
#[derive(Debug)]
struct Stored {
    source: u16,
    namespace: Arc<str>,
    token: Option<Arc<str>>,
    upstream: Result<Arc<[IpAddr]>, Box<str>>,
    ports: Option<PortSet>,
}

/// The entry for sandbox id `name` given every object of that name.
fn entry_for(name: &str, records: &[Stored]) -> Entry {
    if let [r] = records {
        return match &r.upstream {
            Ok(endpoints) if !endpoints.is_empty() => Entry::Routable(Routable {
                namespace: r.namespace.clone(),
                token: r.token.clone(),
                ports: r.ports.clone(),
                endpoints: endpoints.clone(),
                next: AtomicUsize::new(0),
            }),
            Ok(_) => Entry::Unavailable("sandbox has no endpoints".into()),
            Err(reason) => Entry::Unavailable(reason.clone()),
        };
    }
    let mut found: Vec<String> = records
        .iter()
        .map(|r| format!("{}/{name}", r.namespace))
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
/// table is ready once every registered source has synced once. Names are held once (shared by
/// the map, the per-name records and the per-source name sets) and namespaces are interned.
pub struct TableWriter {
    table: Arc<RouteTable>,
    map: Map,
    /// Source names; a record names its source by index here.
    sources: Vec<String>,
    /// name → every object with that name.
    by_name: HashMap<Arc<str>, Vec<Stored>>,
    /// Per source (by index): the names it holds.
    names_of: Vec<HashSet<Arc<str>>>,
    namespaces: HashSet<Arc<str>>,
    unsynced: HashSet<String>,
}

impl TableWriter {
    pub fn new(table: Arc<RouteTable>, sources: impl IntoIterator<Item = String>) -> Self {
        let unsynced: HashSet<String> = sources.into_iter().collect();
        let mut writer = Self {
            table,
            map: Map::default(),
            sources: Vec::new(),
            by_name: HashMap::new(),
            names_of: Vec::new(),
            namespaces: HashSet::new(),
            unsynced: HashSet::new(),
        };
        for source in &unsynced {
            writer.source_id(source);
        }
        writer.unsynced = unsynced;
        writer
    }

    fn source_id(&mut self, source: &str) -> u16 {
        if let Some(i) = self.sources.iter().position(|s| s == source) {
            return i as u16;
        }
        self.sources.push(source.to_owned());
        self.names_of.push(HashSet::new());
        (self.sources.len() - 1) as u16
    }

    fn intern(&mut self, namespace: &str) -> Arc<str> {
        if let Some(ns) = self.namespaces.get(namespace) {
            return ns.clone();
        }
        let ns: Arc<str> = namespace.into();
        self.namespaces.insert(ns.clone());
        ns
    }

    /// The map's copy of `name` when it has one, so the name is held once.
    fn shared_name(&self, name: &str) -> Arc<str> {
        self.by_name
            .get_key_value(name)
            .map_or_else(|| name.into(), |(k, _)| k.clone())
    }

    fn store(&mut self, source: u16, record: Record) -> (Arc<str>, Stored) {
        let name = self.shared_name(&record.name);
        let stored = Stored {
            source,
            namespace: self.intern(&record.namespace),
            token: record.token.filter(|t| !t.is_empty()).map(Into::into),
            upstream: record.upstream.map(Into::into).map_err(Into::into),
            ports: record.ports,
        };
        (name, stored)
    }

    fn refresh(&mut self, name: &Arc<str>) {
        match self.by_name.get(name) {
            Some(records) if !records.is_empty() => {
                self.map
                    .insert(name.clone(), Arc::new(entry_for(name, records)));
            }
            _ => {
                self.by_name.remove(name);
                self.map.remove(name);
            }
        }
    }

    fn detach(&mut self, source: u16, namespace: &str, name: &str) {
        if let Some(records) = self.by_name.get_mut(name) {
            records.retain(|r| !(r.source == source && &*r.namespace == namespace));
            if !records.iter().any(|r| r.source == source) {
                self.names_of[usize::from(source)].remove(name);
            }
        }
    }

    /// Adds or replaces one object of a source.
    pub fn upsert(&mut self, source: &str, record: Record) {
        let id = self.source_id(source);
        self.detach(id, &record.namespace, &record.name);
        let (name, stored) = self.store(id, record);
        self.by_name.entry(name.clone()).or_default().push(stored);
        self.names_of[usize::from(id)].insert(name.clone());
        self.refresh(&name);
    }

    /// Removes one object of a source.
    pub fn remove(&mut self, source: &str, namespace: &str, name: &str) {
        let id = self.source_id(source);
        self.detach(id, namespace, name);
        let name = self.shared_name(name);
        self.refresh(&name);
    }

    /// Replaces everything a source holds (a full list), dropping objects no longer present,
    /// and marks the source synced.
    pub fn replace_source(&mut self, source: &str, records: Vec<Record>) {
        let id = self.source_id(source);
        let old = std::mem::take(&mut self.names_of[usize::from(id)]);
        for name in &old {
            if let Some(list) = self.by_name.get_mut(name) {
                list.retain(|r| r.source != id);
            }
        }
        let mut touched = old;
        let mut names = HashSet::with_capacity(records.len());
        for record in records {
            let (name, stored) = self.store(id, record);
            names.insert(name.clone());
            self.by_name.entry(name.clone()).or_default().push(stored);
            touched.insert(name);
        }
        self.names_of[usize::from(id)] = names;
        for name in &touched {
            self.refresh(name);
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
