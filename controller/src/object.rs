//! The BatchSandbox as this controller reads it: metadata, the spec fields it acts on, the pod
//! template as raw JSON (so every field of it survives into the pod, known to this program's
//! Kubernetes types or not) and the status as last written.
//!
//! Reading never fails: a spec whose fields have the wrong shape (possible under a CRD that does
//! not type them) becomes [`Spec::invalid`], which the controller reports on the object, instead
//! of an error that would stop the watch for every BatchSandbox.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use kube::api::ObjectMeta;
use sandbox_api::names;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct BatchSandbox {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
    /// As last written by this controller (or whoever wrote it before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// The spec fields the controller acts on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Number of pods; absent means 1.
    pub replicas: Option<i64>,
    /// When the BatchSandbox is to be deleted, as written (checked when acted on).
    pub expire_time: Option<String>,
    /// The pod template, exactly as written.
    pub template: Option<Value>,
    /// Why the spec could not be read; nothing is made for such a spec.
    #[serde(skip)]
    pub invalid: Option<String>,
    /// Fields of the reference's spec that ask for a feature not built here (a pool, tasks,
    /// shard patches, pausing); nothing is made for such a spec rather than something else.
    #[serde(skip)]
    pub unsupported: Vec<&'static str>,
}

/// The reference's spec fields this controller does not act on, and when a value asks for them.
const UNBUILT_FIELDS: [(&str, &str); 5] = [
    ("pause", "spec.pause: true (pause/resume)"),
    ("poolRef", "spec.poolRef (pods from a pool)"),
    ("taskTemplate", "spec.taskTemplate (tasks)"),
    ("shardPatches", "spec.shardPatches"),
    ("shardTaskPatches", "spec.shardTaskPatches"),
];

/// Whether a field's value asks for its feature: `pause: true`, a non-empty string, list or
/// object; `null`, `false`, `""`, `[]` and `{}` ask for nothing.
fn asks(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.trim().is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    }
}

/// The typed view of a spec, used only to read it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    #[serde(default)]
    replicas: Option<i64>,
    #[serde(default)]
    expire_time: Option<String>,
    #[serde(default)]
    template: Option<Value>,
}

impl<'de> Deserialize<'de> for Spec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Value::deserialize(deserializer)?;
        let unsupported = UNBUILT_FIELDS
            .iter()
            .filter(|(field, _)| raw.get(field).is_some_and(asks))
            .map(|(_, what)| *what)
            .collect();
        Ok(match serde_json::from_value::<Fields>(raw) {
            Ok(f) => Spec {
                replicas: f.replicas,
                expire_time: f.expire_time,
                template: f.template.filter(|t| !t.is_null()),
                invalid: None,
                unsupported,
            },
            Err(e) => Spec {
                invalid: Some(format!("spec: {e}")),
                ..Spec::default()
            },
        })
    }
}

impl Resource for BatchSandbox {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        names::BATCH_SANDBOX_KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        names::BATCH_SANDBOX_GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        names::BATCH_SANDBOX_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "batchsandboxes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl BatchSandbox {
    /// A non-blank annotation.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn template_survives_whole_and_bad_shapes_are_reported() {
        let obj: BatchSandbox = serde_json::from_value(json!({
            "metadata": {"name": "bs", "namespace": "ns"},
            "spec": {"replicas": 2, "expireTime": "2999-01-01T00:00:00Z", "poolRef": "p",
                "template": {"spec": {"containers": [{"name": "main", "futureField": {"a": 1}}]}}},
            "status": {"ready": 1},
        }))
        .unwrap();
        assert_eq!(obj.spec.replicas, Some(2));
        assert_eq!(
            obj.spec.expire_time.as_deref(),
            Some("2999-01-01T00:00:00Z")
        );
        assert_eq!(
            obj.spec.template.as_ref().unwrap()["spec"]["containers"][0]["futureField"]["a"],
            1
        );
        assert_eq!(obj.status.unwrap()["ready"], 1);
        assert_eq!(obj.spec.unsupported, ["spec.poolRef (pods from a pool)"]);

        let bad: BatchSandbox = serde_json::from_value(json!({
            "metadata": {"name": "bs"}, "spec": {"replicas": "two"},
        }))
        .unwrap();
        assert!(
            bad.spec.invalid.as_deref().unwrap().contains("spec:"),
            "{:?}",
            bad.spec
        );
        let empty: BatchSandbox = serde_json::from_value(json!({"metadata": {}})).unwrap();
        assert_eq!(empty.spec, Spec::default());
    }

    #[test]
    fn only_values_that_ask_for_a_feature_count() {
        let spec = |v: Value| serde_json::from_value::<Spec>(v).unwrap().unsupported;
        assert!(
            spec(json!({"pause": false, "poolRef": "", "taskTemplate": null, "shardPatches": []}))
                .is_empty()
        );
        assert_eq!(
            spec(json!({"pause": true, "shardPatches": [{"a": 1}], "taskTemplate": {"spec": {}}})),
            [
                "spec.pause: true (pause/resume)",
                "spec.taskTemplate (tasks)",
                "spec.shardPatches"
            ]
        );
    }

    #[test]
    fn resource_names() {
        assert_eq!(BatchSandbox::plural(&()), "batchsandboxes");
        assert_eq!(
            BatchSandbox::api_version(&()),
            format!(
                "{}/{}",
                names::BATCH_SANDBOX_GROUP,
                names::BATCH_SANDBOX_VERSION
            )
        );
    }
}
