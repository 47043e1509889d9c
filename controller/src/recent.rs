//! What this controller last wrote to each BatchSandbox, until its cache shows it.
//!
//! A pass reads the object from the controller's cache, which may not hold the status and
//! endpoints the previous pass wrote yet (the pod event that brings the pass can arrive before
//! the object's own). Without this, such a pass would write the same status again. A write is
//! remembered with the versions of the object it made out of date; a pass whose object is at one
//! of those versions sees the remembered values instead, and one at any other version trusts
//! the cache and drops the memory.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// After this long the cache has long caught up (or the object is gone): the memory is dropped.
const KEEP: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    /// Object versions older than these values.
    pub behind: Vec<String>,
    /// The version the last write made, which holds them all.
    pub latest: Option<String>,
    pub status: Option<Value>,
    pub endpoints: Option<String>,
}

#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_uid: HashMap<String, (Instant, Written)>,
    prune_at: usize,
}

impl Recent {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was written to the object that its cached `version` does not show yet; `None` (and
    /// the memory dropped) when the cache has caught up or someone else wrote since.
    pub fn ahead_of(&self, uid: &str, version: Option<&str>) -> Option<Written> {
        let mut inner = self.lock();
        let (_, written) = inner.by_uid.get(uid)?;
        if version.is_some_and(|v| written.behind.iter().any(|b| b == v)) {
            return Some(written.clone());
        }
        inner.by_uid.remove(uid);
        None
    }

    pub fn remember(&self, uid: &str, written: Written) {
        let mut inner = self.lock();
        inner
            .by_uid
            .insert(uid.to_owned(), (Instant::now(), written));
        if inner.by_uid.len() > inner.prune_at {
            inner.by_uid.retain(|_, (at, _)| at.elapsed() < KEEP);
            inner.prune_at = (inner.by_uid.len() * 2).max(1024);
        }
    }

    pub fn forget(&self, uid: &str) {
        self.lock().by_uid.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn remembered_until_the_cache_moves_on() {
        let recent = Recent::default();
        assert_eq!(recent.ahead_of("u", Some("1")), None);
        let written = Written {
            behind: vec!["1".into(), "2".into()],
            latest: Some("3".into()),
            status: Some(json!({"ready": 1})),
            endpoints: Some(r#"["10.0.0.1"]"#.into()),
        };
        recent.remember("u", written.clone());
        assert_eq!(recent.ahead_of("u", Some("1")), Some(written.clone()));
        assert_eq!(recent.ahead_of("u", Some("2")), Some(written));
        assert_eq!(recent.ahead_of("other", Some("1")), None);
        // The cache shows the last write (or a later one): trusted from now on.
        assert_eq!(recent.ahead_of("u", Some("3")), None);
        assert_eq!(recent.ahead_of("u", Some("1")), None, "forgotten");
        recent.remember("u", Written::default());
        recent.forget("u");
        assert_eq!(recent.ahead_of("u", None), None);
    }
}
