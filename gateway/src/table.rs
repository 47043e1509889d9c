//! The route table: sandbox id → what a request for it should do. Readers load an immutable
//! snapshot without locks. The snapshot is split into shards, each a hash table of entries keyed
//! by their own name (one pointer per slot); the single writer copies only the shards it edits
//! and swaps the whole snapshot in, so a sandbox present before and after an update is never seen
//! as absent, and a relist replaces a source's objects atomically.
//!
//! Each object is held once, as the entry requests read: the writer keeps no copy of its own
//! except for names held by several objects (a clash), which are rare.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hashbrown::HashTable;

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
    /// Ports that speak h2c.
    pub h2c: Option<PortSet>,
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
            h2c: sandbox.h2c.clone(),
        }
    }
}

/// What the gateway does with a request for a sandbox.
#[derive(Debug)]
pub enum State {
    /// Routable to one address (the common case, held without an allocation of its own).
    One(IpAddr),
    /// Routable to several addresses, taken round-robin; never empty.
    Many(Box<[IpAddr]>),
    /// Known but not routable now (503), with the reason.
    Unavailable(Box<str>),
    /// The same id exists in several namespaces (502), naming them as `[ns/id ns/id]`.
    Ambiguous(Box<str>),
}

/// One sandbox object, or the clash of several objects of one name. About 100 bytes with its
/// name and slot: every field is sized for a million of them.
#[derive(Debug)]
pub struct Entry {
    name: Box<str>,
    /// The provider source that holds the object (index into the writer's sources).
    source: u16,
    /// The object's namespace (index into the writer's interned namespaces).
    namespace: u32,
    /// The relist that last wrote the object, so a relist can drop what it did not list.
    epoch: u32,
    next: AtomicU32,
    /// Non-empty when the sandbox requires credentials.
    pub token: Option<Box<str>>,
    /// Ports requests may reach; `None`: every port.
    pub ports: Option<PortSet>,
    /// Ports that speak h2c; boxed, as few sandboxes have any.
    h2c: Option<Box<PortSet>>,
    pub state: State,
}

impl Entry {
    /// The sandbox id.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `port` speaks HTTP/2 in cleartext (`opensandbox.io/h2c-ports`).
    pub fn speaks_h2c(&self, port: u16) -> bool {
        self.h2c.as_deref().is_some_and(|set| set.contains(port))
    }

    pub fn is_routable(&self) -> bool {
        matches!(self.state, State::One(_) | State::Many(_))
    }

    /// The addresses a request may be sent to (empty when not routable).
    pub fn endpoints(&self) -> &[IpAddr] {
        match &self.state {
            State::One(ip) => std::slice::from_ref(ip),
            State::Many(ips) => ips,
            _ => &[],
        }
    }

    /// Picks the next endpoint round-robin; `None` when not routable.
    pub fn pick(&self) -> Option<IpAddr> {
        match &self.state {
            State::One(ip) => Some(*ip),
            State::Many(ips) => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                Some(ips[i % ips.len()])
            }
            _ => None,
        }
    }
}

type Shard = HashTable<Arc<Entry>>;

/// Shards per snapshot: an edit copies one shard (about a thousandth of the table) and the
/// list of shard pointers.
const SHARDS: usize = 1024;

/// The shard of a name's hash: bits the shard's own table uses neither for its buckets (low
/// bits) nor for its control bytes (the top seven).
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize & (SHARDS - 1)
}

#[derive(Clone)]
struct Snapshot {
    shards: Box<[Arc<Shard>]>,
    len: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::new())).collect(),
            len: 0,
        }
    }
}

/// The shared table that requests read.
#[derive(Default)]
pub struct RouteTable {
    snapshot: ArcSwap<Snapshot>,
    hasher: RandomState,
    ready: AtomicBool,
    /// Per-source health notes shown by `/readyz` (e.g. a lost watch); not on the request path.
    notes: Mutex<BTreeMap<String, String>>,
}

impl RouteTable {
    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        let hash = self.hasher.hash_one(id);
        self.snapshot.load().shards[shard_of(hash)]
            .find(hash, |e| &*e.name == id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.snapshot.load().len
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

/// The single writer of a table. Each source (a file, or one watch) owns its objects; the
/// table is ready once every registered source has synced once.
pub struct TableWriter {
    table: Arc<RouteTable>,
    /// The writer's working copy; shards it shares with the published snapshot are copied on
    /// the first edit after a publish.
    shards: Vec<Arc<Shard>>,
    len: usize,
    /// Source names; an entry names its source by index here.
    sources: Vec<String>,
    namespaces: Vec<Arc<str>>,
    namespace_ids: HashMap<Arc<str>, u32>,
    /// Names held by several objects → every one of those objects (the table holds the clash).
    clashes: HashMap<Box<str>, Vec<Arc<Entry>>>,
    epoch: u32,
    unsynced: HashSet<String>,
}

impl TableWriter {
    pub fn new(table: Arc<RouteTable>, sources: impl IntoIterator<Item = String>) -> Self {
        let unsynced: HashSet<String> = sources.into_iter().collect();
        let mut writer = Self {
            table,
            shards: Snapshot::default().shards.into_vec(),
            len: 0,
            sources: Vec::new(),
            namespaces: Vec::new(),
            namespace_ids: HashMap::new(),
            clashes: HashMap::new(),
            epoch: 0,
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
        (self.sources.len() - 1) as u16
    }

    fn intern(&mut self, namespace: &str) -> u32 {
        if let Some(id) = self.namespace_ids.get(namespace) {
            return *id;
        }
        let ns: Arc<str> = namespace.into();
        let id = self.namespaces.len() as u32;
        self.namespaces.push(ns.clone());
        self.namespace_ids.insert(ns, id);
        id
    }

    /// The entry of a record. Its parts are copied, not moved: records are often built on a
    /// parser's thread among transient allocations, and an entry that kept one of those would
    /// pin the parser's memory for as long as the sandbox lives.
    fn entry(&mut self, source: u16, record: &Record) -> Entry {
        let state = match &record.upstream {
            Ok(ips) => match ips.as_slice() {
                [] => State::Unavailable("sandbox has no endpoints".into()),
                [ip] => State::One(*ip),
                _ => State::Many(ips.as_slice().into()),
            },
            Err(reason) => State::Unavailable(reason.as_str().into()),
        };
        Entry {
            name: record.name.as_str().into(),
            source,
            namespace: self.intern(&record.namespace),
            epoch: self.epoch,
            next: AtomicU32::new(0),
            token: record
                .token
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(Into::into),
            ports: record.ports.clone(),
            h2c: record
                .h2c
                .as_ref()
                .filter(|set| !set.is_empty())
                .map(|set| Box::new(set.clone())),
            state,
        }
    }

    fn hash(&self, name: &str) -> u64 {
        self.table.hasher.hash_one(name)
    }

    fn current(&self, name: &str) -> Option<&Arc<Entry>> {
        let hash = self.hash(name);
        self.shards[shard_of(hash)].find(hash, |e| &*e.name == name)
    }

    /// Puts `entry` in the table under its name, or removes the name when `None`.
    fn set(&mut self, name: &str, entry: Option<Arc<Entry>>) {
        self.set_hashed(self.hash(name), name, entry);
    }

    fn set_hashed(&mut self, hash: u64, name: &str, entry: Option<Arc<Entry>>) {
        let hasher = &self.table.hasher;
        let shard = Arc::make_mut(&mut self.shards[shard_of(hash)]);
        match (shard.find_entry(hash, |e| &*e.name == name), entry) {
            (Ok(mut found), Some(entry)) => *found.get_mut() = entry,
            (Ok(found), None) => {
                found.remove();
                self.len -= 1;
            }
            (Err(_), Some(entry)) => {
                shard.insert_unique(hash, entry, |e| hasher.hash_one(&*e.name));
                self.len += 1;
            }
            (Err(_), None) => {}
        }
    }

    /// The objects now held under `name` (one unless the name clashes).
    fn objects(&self, name: &str) -> Vec<Arc<Entry>> {
        match self.clashes.get(name) {
            Some(list) => list.clone(),
            None => self.current(name).cloned().into_iter().collect(),
        }
    }

    /// Stores the objects of one name: the object itself, a clash, or nothing.
    fn put(&mut self, name: &str, mut objects: Vec<Arc<Entry>>) {
        if objects.len() < 2 {
            self.clashes.remove(name);
            self.set(name, objects.pop());
            return;
        }
        let mut found: Vec<String> = objects
            .iter()
            .map(|e| format!("{}/{name}", self.namespaces[e.namespace as usize]))
            .collect();
        found.sort_unstable();
        let clash = Entry {
            name: name.into(),
            source: u16::MAX,
            namespace: u32::MAX,
            epoch: 0,
            next: AtomicU32::new(0),
            token: None,
            ports: None,
            h2c: None,
            state: State::Ambiguous(format!("[{}]", found.join(" ")).into()),
        };
        self.set(name, Some(Arc::new(clash)));
        self.clashes.insert(name.into(), objects);
    }

    fn upsert_entry(&mut self, entry: Entry) {
        // The common cases first: a new name, or a new version of the one object of a name.
        if !self.clashes.contains_key(&*entry.name) {
            let hash = self.hash(&entry.name);
            let simple = match self.shards[shard_of(hash)].find(hash, |e| e.name == entry.name) {
                None => true,
                Some(e) => e.source == entry.source && e.namespace == entry.namespace,
            };
            if simple {
                let name = entry.name.clone();
                self.set_hashed(hash, &name, Some(Arc::new(entry)));
                return;
            }
        }
        let mut objects = self.objects(&entry.name);
        objects.retain(|e| !(e.source == entry.source && e.namespace == entry.namespace));
        let name = entry.name.clone();
        objects.push(Arc::new(entry));
        self.put(&name, objects);
    }

    /// Adds or replaces one object of a source.
    pub fn upsert(&mut self, source: &str, record: Record) {
        let id = self.source_id(source);
        let entry = self.entry(id, &record);
        self.upsert_entry(entry);
    }

    /// Removes one object of a source.
    pub fn remove(&mut self, source: &str, namespace: &str, name: &str) {
        let id = self.source_id(source);
        let Some(&ns) = self.namespace_ids.get(namespace) else {
            return;
        };
        let mut objects = self.objects(name);
        let before = objects.len();
        objects.retain(|e| !(e.source == id && e.namespace == ns));
        if objects.len() != before {
            self.put(name, objects);
        }
    }

    /// Replaces everything a source holds (a full list), dropping objects no longer present,
    /// and marks the source synced.
    pub fn replace_source(&mut self, source: &str, records: &[Record]) {
        let id = self.source_id(source);
        self.epoch = self.epoch.wrapping_add(1);
        // Sized once for a first load instead of growing every shard step by step.
        let per_shard = records.len().saturating_sub(self.len) / SHARDS;
        if per_shard > 0 {
            let hasher = self.table.hasher.clone();
            for shard in &mut self.shards {
                Arc::make_mut(shard)
                    .reserve(per_shard + per_shard / 8, |e| hasher.hash_one(&*e.name));
            }
        }
        for record in records {
            let entry = self.entry(id, record);
            self.upsert_entry(entry);
        }
        // Drop the source's objects this list did not write.
        let epoch = self.epoch;
        let stale = |e: &Arc<Entry>| e.source == id && e.epoch != epoch;
        let mut gone: Vec<Box<str>> = Vec::new();
        for shard in &self.shards {
            gone.extend(shard.iter().filter(|e| stale(e)).map(|e| e.name.clone()));
        }
        for name in gone {
            self.set(&name, None);
        }
        let clashing: Vec<Box<str>> = self
            .clashes
            .iter()
            .filter(|(_, list)| list.iter().any(stale))
            .map(|(name, _)| name.clone())
            .collect();
        for name in clashing {
            let mut objects = self.objects(&name);
            objects.retain(|e| !stale(e));
            self.put(&name, objects);
        }
        self.unsynced.remove(source);
    }

    /// Makes the current state visible to requests.
    pub fn publish(&mut self) {
        self.table.snapshot.store(Arc::new(Snapshot {
            shards: self.shards.clone().into(),
            len: self.len,
        }));
        let m = metrics();
        m.table_size.set(self.len as i64);
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
            h2c: None,
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
            &[
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
        let Some(r) = table.get("one") else {
            panic!("missing")
        };
        assert_eq!(r.name(), "one");
        let picks: Vec<IpAddr> = (0..4).map(|_| r.pick().unwrap()).collect();
        assert_eq!(picks[0], picks[2]);
        assert_ne!(picks[0], picks[1]);
        assert!(
            matches!(table.get("dup").as_deref().map(|e| &e.state), Some(State::Ambiguous(ns)) if &**ns == "[a/dup b/dup]")
        );
        for name in ["down", "none"] {
            let entry = table.get(name).unwrap();
            assert!(matches!(entry.state, State::Unavailable(_)), "{name}");
            assert_eq!(entry.pick(), None);
        }
        assert!(table.get("absent").is_none());
    }

    #[test]
    fn incremental_updates_and_relists() {
        let (table, mut w) = writer(&["bsbx", "agent"]);
        w.replace_source(
            "bsbx",
            &[
                rec("a", "x", Ok(vec!["10.0.0.1"])),
                rec("a", "gone", Ok(vec!["10.0.0.2"])),
            ],
        );
        w.publish();
        assert!(!table.is_ready(), "ready only when every source synced");
        w.replace_source("agent", &[rec("b", "x", Ok(vec!["10.0.0.9"]))]);
        w.publish();
        assert!(table.is_ready());
        assert!(
            matches!(table.get("x").unwrap().state, State::Ambiguous(_)),
            "clash across sources"
        );
        w.remove("agent", "b", "x");
        w.upsert("bsbx", rec("a", "x", Ok(vec!["10.0.0.3"])));
        w.publish();
        let r = table.get("x").unwrap();
        assert!(r.is_routable());
        assert_eq!(r.endpoints(), &["10.0.0.3".parse::<IpAddr>().unwrap()]);
        // A relist without "gone" drops it and keeps the rest.
        let before = table.get("x");
        w.replace_source("bsbx", &[rec("a", "x", Ok(vec!["10.0.0.3"]))]);
        w.publish();
        assert!(table.get("gone").is_none());
        assert!(table.get("x").is_some() && before.is_some());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn relists_at_scale_keep_every_shard_consistent() {
        let (table, mut w) = writer(&["file", "watch"]);
        let addr = |i: usize| format!("10.0.{}.{}", i / 256 % 256, i % 256);
        let first: Vec<Record> = (0..20_000)
            .map(|i| rec("ns", &format!("s{i}"), Ok(vec![addr(i).as_str()])))
            .collect();
        w.replace_source("file", &first);
        w.replace_source("watch", &[rec("other", "s7", Ok(vec!["10.9.9.9"]))]);
        w.publish();
        assert_eq!(table.len(), 20_000);
        assert!(matches!(
            table.get("s7").unwrap().state,
            State::Ambiguous(_)
        ));
        let before = table.get("s1").unwrap();
        // Keep the odd ones, change s1's address, add new ones; the clash with the other
        // source stays until that source lets go.
        let second: Vec<Record> = (0..30_000)
            .filter(|i| i % 2 == 1 || *i >= 20_000)
            .map(|i| {
                let ip = if i == 1 { "10.8.8.8".into() } else { addr(i) };
                rec("ns", &format!("s{i}"), Ok(vec![ip.as_str()]))
            })
            .collect();
        w.replace_source("file", &second);
        w.publish();
        assert_eq!(table.len(), 10_000 + 10_000);
        assert!(table.get("s2").is_none() && table.get("s29999").is_some());
        assert_eq!(table.get("s1").unwrap().pick(), "10.8.8.8".parse().ok());
        // A reader holding the old entry keeps it.
        assert_eq!(before.pick(), "10.0.0.1".parse().ok());
        assert!(matches!(
            table.get("s7").unwrap().state,
            State::Ambiguous(_)
        ));
        w.replace_source("watch", &[]);
        w.publish();
        assert!(table.get("s7").unwrap().is_routable());
        // Removing one object of a clash leaves the other; the same object twice is one.
        w.upsert("watch", rec("other", "s9", Ok(vec!["10.9.9.9"])));
        w.upsert("watch", rec("other", "s9", Ok(vec!["10.9.9.8"])));
        w.publish();
        let State::Ambiguous(found) = &table.get("s9").unwrap().state else {
            panic!("s9 should clash")
        };
        assert_eq!(&**found, "[ns/s9 other/s9]");
        w.remove("file", "ns", "s9");
        w.publish();
        assert_eq!(table.get("s9").unwrap().pick(), "10.9.9.8".parse().ok());
        w.remove("watch", "other", "s9");
        w.remove("watch", "nowhere", "s11");
        w.publish();
        assert!(table.get("s9").is_none() && table.get("s11").is_some());
        assert_eq!(table.len(), 19_999);
    }
}
