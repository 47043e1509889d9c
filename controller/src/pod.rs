//! Building a sandbox pod from the BatchSandbox's template. The template is handled as JSON so
//! every field survives, including ones this program's Kubernetes types do not know.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::json;
use crate::sidecar::{self, Egress};

/// Label holding the pod's index within its BatchSandbox.
pub const LABEL_INDEX: &str = "batch-sandbox.sandbox.opensandbox.io/pod-index";
/// Label holding the owning BatchSandbox's name.
pub const LABEL_NAME: &str = "batch-sandbox.sandbox.opensandbox.io/name";

/// What the pod needs from the owner beyond its template.
pub struct Owner<'a> {
    pub api_version: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub template: Option<&'a Value>,
    /// The sidecar's settings, when egress is requested (the template passed the fence).
    pub egress: Option<Egress<'a>>,
}

impl Owner<'_> {
    /// The controller reference every object made for this BatchSandbox carries, so it is
    /// garbage-collected with it.
    pub fn reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: self.api_version.into(),
            kind: self.kind.into(),
            name: self.name.into(),
            uid: self.uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }
}

pub fn pod_name(owner: &str, index: u32) -> String {
    format!("{owner}-{index}")
}

/// The pod for `index`, as JSON ready to create. It carries no token: the sandbox's access
/// token stays on the BatchSandbox, the sidecar's comes from a Secret.
pub fn build(owner: &Owner<'_>, index: u32) -> Value {
    let template = owner.template.cloned().unwrap_or_else(|| json!({}));
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod"});
    let mut metadata = template
        .get("metadata")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    let mut spec = template
        .get("spec")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    metadata["name"] = json!(pod_name(owner.name, index));
    metadata["namespace"] = json!(owner.namespace);
    if let Some(meta) = metadata.as_object_mut() {
        let labels = json::object(meta, "labels");
        labels.insert(LABEL_NAME.into(), json!(owner.name));
        labels.insert(LABEL_INDEX.into(), json!(index.to_string()));
    }
    metadata["ownerReferences"] = json!([owner.reference()]);
    if let Some(egress) = &owner.egress {
        sidecar::inject(&mut spec, egress);
    }
    pod["metadata"] = metadata;
    pod["spec"] = spec;
    pod
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn owner<'a>(template: &'a Value, egress: Option<Egress<'a>>) -> Owner<'a> {
        Owner {
            api_version: "sandbox.opensandbox.io/v1alpha1",
            kind: "BatchSandbox",
            name: "bs",
            namespace: "ns",
            uid: "u-1",
            template: Some(template),
            egress,
        }
    }

    #[test]
    fn keeps_template_fields_and_adds_identity() {
        let template = json!({
            "metadata": {"labels": {"app": "x"}, "annotations": {"team": "a"}},
            "spec": {"containers": [{"name": "main", "image": "img", "futureField": {"a": 1}}], "someNewPodField": true},
        });
        let pod = build(&owner(&template, None), 1);
        assert_eq!(pod["metadata"]["name"], "bs-1");
        assert_eq!(pod["metadata"]["labels"]["app"], "x");
        assert_eq!(pod["metadata"]["labels"][LABEL_INDEX], "1");
        assert_eq!(pod["metadata"]["labels"][LABEL_NAME], "bs");
        assert_eq!(pod["metadata"]["annotations"], json!({"team": "a"}));
        assert_eq!(
            pod["metadata"]["ownerReferences"],
            json!([{"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
                "name": "bs", "uid": "u-1", "controller": true, "blockOwnerDeletion": true}])
        );
        assert_eq!(pod["spec"]["containers"][0]["futureField"]["a"], 1);
        assert_eq!(pod["spec"]["someNewPodField"], true);
        assert!(
            pod["spec"]["containers"][0]
                .get("securityContext")
                .is_none(),
            "no fence without egress"
        );
    }

    #[test]
    fn egress_pods_are_fenced() {
        let template = json!({"spec": {"containers": [{"name": "main", "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}}}]}});
        let egress = Egress {
            policy: "{}",
            secret: "bs-egress-token",
            mode: "dns",
            image: "egress:1",
            sandbox: "bs",
        };
        let pod = build(&owner(&template, Some(egress)), 0);
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(
            containers[0]["securityContext"]["capabilities"],
            json!({"add": ["SYS_PTRACE"], "drop": ["NET_ADMIN", "NET_RAW"]})
        );
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "egress");
    }
}
