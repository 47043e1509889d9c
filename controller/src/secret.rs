//! The per-BatchSandbox Secret holding the egress sidecar's token, so the token never appears
//! in a pod spec. The controller writes only a Secret it owns: a Secret of the reserved name
//! that someone else made (perhaps to hand the sidecar a token of their choosing) is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use sandbox_api::egress;
use serde_json::json;

use crate::cache::controller_uid;
use crate::error::Error;
use crate::metrics::metrics;
use crate::pod::Owner;
use crate::status::Problem;

/// Label on the Secrets this controller makes; it watches only those.
pub const LABEL: &str = "sandbox.opensandbox.io/egress-token";
pub const LABEL_VALUE: &str = "true";

/// What to do about the Secret, given what exists.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Create,
    /// Ours and holding the token.
    Keep,
    /// Ours but holding another token (the annotation was changed): rewrite it.
    Update,
    /// Not controlled by this BatchSandbox: leave it alone and refuse.
    Foreign,
}

pub fn verdict(existing: Option<&Secret>, uid: &str, token: &str) -> Verdict {
    let Some(secret) = existing else {
        return Verdict::Create;
    };
    let ours = controller_uid(secret) == Some(uid);
    let current = secret
        .data
        .as_ref()
        .and_then(|d| d.get(egress::SECRET_TOKEN_KEY));
    match (ours, current) {
        (false, _) => Verdict::Foreign,
        (true, Some(t)) if t.0 == token.as_bytes() => Verdict::Keep,
        (true, _) => Verdict::Update,
    }
}

/// The token Secrets as the controller knows them: the metadata of those it labelled, from a
/// watch, and the resource version at which each was last read or written holding its token.
/// A pass reads a Secret from the API server only when the watch shows a version it has not
/// checked; metadata alone cannot vouch for the token inside.
pub struct Secrets {
    store: Store<PartialObjectMeta<Secret>>,
    checked: Mutex<Checked>,
}

#[derive(Default)]
struct Checked {
    /// (namespace, name) → (resource version, token) found right.
    at: HashMap<(String, String), (String, String)>,
    /// Size at which entries for Secrets that are gone are dropped.
    prune_at: usize,
}

impl Secrets {
    pub fn new(store: Store<PartialObjectMeta<Secret>>) -> Self {
        Secrets {
            store,
            checked: Mutex::default(),
        }
    }

    fn checked(&self) -> MutexGuard<'_, Checked> {
        self.checked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the watched Secret is ours at a version already checked to hold `token`.
    fn vouched(&self, namespace: &str, name: &str, uid: &str, token: &str) -> bool {
        let Some(meta) = self.store.get(&ObjectRef::new(name).within(namespace)) else {
            return false;
        };
        if controller_uid(meta.as_ref()) != Some(uid) {
            return false;
        }
        let key = (namespace.to_owned(), name.to_owned());
        self.checked().at.get(&key).is_some_and(|(version, held)| {
            meta.metadata.resource_version.as_deref() == Some(version) && held == token
        })
    }

    fn remember(&self, secret: &Secret, token: &str) {
        let (Some(namespace), Some(name), Some(version)) = (
            secret.metadata.namespace.clone(),
            secret.metadata.name.clone(),
            secret.metadata.resource_version.clone(),
        ) else {
            return;
        };
        let mut checked = self.checked();
        checked
            .at
            .insert((namespace, name), (version, token.to_owned()));
        if checked.at.len() > checked.prune_at {
            let store = &self.store;
            checked
                .at
                .retain(|(ns, n), _| store.get(&ObjectRef::new(n).within(ns)).is_some());
            checked.prune_at = (checked.at.len() * 2).max(1024);
        }
    }

    /// Makes sure the owner's Secret exists, is its own and holds `token`; `Ok(Some(problem))`
    /// when a foreign Secret has the name.
    pub async fn ensure(
        &self,
        client: &Client,
        owner: &Owner<'_>,
        token: &str,
    ) -> Result<Option<Problem>, Error> {
        let name = egress::secret_name(owner.name);
        if self.vouched(owner.namespace, &name, owner.uid, token) {
            return Ok(None);
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), owner.namespace);
        metrics().secret_reads.inc();
        let existing = api.get_opt(&name).await?;
        let written = match verdict(existing.as_ref(), owner.uid, token) {
            Verdict::Keep => existing,
            Verdict::Create => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(owner.namespace.into()),
                        labels: Some(BTreeMap::from([(LABEL.into(), LABEL_VALUE.into())])),
                        owner_references: Some(vec![owner.reference()]),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(BTreeMap::from([(
                        egress::SECRET_TOKEN_KEY.into(),
                        ByteString(token.as_bytes().to_vec()),
                    )])),
                    ..Secret::default()
                };
                let made = api.create(&PostParams::default(), &secret).await?;
                tracing::debug!(namespace = %owner.namespace, secret = %name, "created egress token secret");
                Some(made)
            }
            Verdict::Update => {
                let data = ByteString(token.as_bytes().to_vec());
                let patch = json!({"data": {egress::SECRET_TOKEN_KEY: data}});
                Some(
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await?,
                )
            }
            Verdict::Foreign => {
                return Ok(Some(Problem {
                    reason: "ForeignEgressSecret",
                    message: format!(
                        "Secret {name:?} exists and is not controlled by this BatchSandbox; \
                         the egress token is not put into it and no pod is created"
                    ),
                }));
            }
        };
        if let Some(secret) = written {
            self.remember(&secret, token);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn secret(owner: Option<(&str, Option<bool>)>, token: Option<&str>) -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "bs-egress-token", "ownerReferences": owner.map_or(json!([]), |(uid, controller)| json!([{
                "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox", "name": "bs",
                "uid": uid, "controller": controller}]))},
            "data": token.map_or(json!({}), |t| json!({"token": ByteString(t.as_bytes().to_vec())})),
        }))
        .unwrap()
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(None, "u1", "t"), Verdict::Create);
        let ours = secret(Some(("u1", Some(true))), Some("t"));
        assert_eq!(verdict(Some(&ours), "u1", "t"), Verdict::Keep);
        assert_eq!(verdict(Some(&ours), "u1", "other"), Verdict::Update);
        let empty = secret(Some(("u1", Some(true))), None);
        assert_eq!(verdict(Some(&empty), "u1", "t"), Verdict::Update);
        for foreign in [
            secret(None, Some("t")),
            secret(Some(("u2", Some(true))), Some("t")),
            // An owner reference that is not the controller reference is not ownership.
            secret(Some(("u1", None)), Some("t")),
            secret(Some(("u1", Some(false))), Some("t")),
        ] {
            assert_eq!(verdict(Some(&foreign), "u1", "t"), Verdict::Foreign);
        }
    }
}
