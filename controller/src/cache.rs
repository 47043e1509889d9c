//! The controller's view of the pods it made, kept from one watch: a reflector store by name and
//! an index by owning BatchSandbox, so a pass finds its pods without asking the API server and
//! without looking at every pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

use crate::pod::LABEL_INDEX;

/// The uid of the object that controls `obj`, if any.
pub fn controller_uid<K: kube::Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

pub struct Pods {
    store: Store<Pod>,
    /// Owner uid → (namespace, name) of the pods it controls. May hold names of pods that are
    /// gone (a deletion missed across a relist); the store is the truth, and lookups prune them.
    by_owner: Mutex<HashMap<String, BTreeSet<(String, String)>>>,
}

impl Pods {
    pub fn new(store: Store<Pod>) -> Self {
        Pods {
            store,
            by_owner: Mutex::default(),
        }
    }

    /// Keeps the index in step with the watch; called after the store has applied `event`.
    pub fn observe(&self, event: &Event<Pod>) {
        let mut index = self.by_owner.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Apply(pod) | Event::InitApply(pod) => {
                if let Some(uid) = controller_uid(pod) {
                    index
                        .entry(uid.to_owned())
                        .or_default()
                        .insert((pod.namespace().unwrap_or_default(), pod.name_any()));
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = controller_uid(pod)
                    && let Some(names) = index.get_mut(uid)
                {
                    names.remove(&(pod.namespace().unwrap_or_default(), pod.name_any()));
                    if names.is_empty() {
                        index.remove(uid);
                    }
                }
            }
            Event::Init | Event::InitDone => {}
        }
    }

    /// The pods controlled by `owner_uid`, by their index label.
    pub fn owned(&self, owner_uid: &str) -> BTreeMap<u32, Arc<Pod>> {
        let mut index = self.by_owner.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(names) = index.get_mut(owner_uid) else {
            return BTreeMap::new();
        };
        let mut found = BTreeMap::new();
        names.retain(|(namespace, name)| {
            let Some(pod) = self
                .store
                .get(&ObjectRef::new(name).within(namespace))
                .filter(|p| controller_uid(p.as_ref()) == Some(owner_uid))
            else {
                return false;
            };
            if let Some(i) = pod.labels().get(LABEL_INDEX).and_then(|i| i.parse().ok()) {
                found.insert(i, pod);
            }
            true
        });
        if names.is_empty() {
            index.remove(owner_uid);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::runtime::reflector;
    use serde_json::json;

    fn pod(name: &str, owner: &str, index: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {
            "name": name, "namespace": "ns",
            "labels": {LABEL_INDEX: index},
            "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o", "uid": owner, "controller": true}],
        }}))
        .unwrap()
    }

    #[test]
    fn finds_owned_pods_and_forgets_gone_ones() {
        let (store, mut writer) = reflector::store::<Pod>();
        let pods = Pods::new(store);
        let events = [
            Event::Init,
            Event::InitApply(pod("a-0", "u1", "0")),
            Event::InitApply(pod("a-1", "u1", "1")),
            Event::InitApply(pod("b-0", "u2", "0")),
            Event::InitApply(pod("c-x", "u1", "not-a-number")),
            Event::InitDone,
        ];
        for e in &events {
            writer.apply_watcher_event(e);
            pods.observe(e);
        }
        assert_eq!(pods.owned("u1").keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(pods.owned("u2").len(), 1);
        assert!(pods.owned("u3").is_empty());

        let gone = Event::Delete(pod("a-1", "u1", "1"));
        writer.apply_watcher_event(&gone);
        pods.observe(&gone);
        assert_eq!(pods.owned("u1").keys().copied().collect::<Vec<_>>(), [0]);

        // A relist that misses a deletion: the store drops the pod, the index prunes it.
        for e in [
            Event::Init,
            Event::InitApply(pod("a-0", "u1", "0")),
            Event::InitDone,
        ] {
            writer.apply_watcher_event(&e);
            pods.observe(&e);
        }
        assert!(pods.owned("u2").is_empty());
        assert!(!pods.by_owner.lock().unwrap().contains_key("u2"));
    }
}
