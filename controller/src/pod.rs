//! Building a sandbox pod from the BatchSandbox's template. The template is handled as JSON so
//! every field survives, including ones this program's Kubernetes types do not know.

use serde_json::{Map, Value, json};

use sandbox_api::names;

/// Label holding the pod's index within its BatchSandbox.
pub const LABEL_INDEX: &str = "batch-sandbox.sandbox.opensandbox.io/pod-index";
/// Label holding the owning BatchSandbox's name.
pub const LABEL_NAME: &str = "batch-sandbox.sandbox.opensandbox.io/name";
/// Name of the injected egress sidecar container.
pub const EGRESS_CONTAINER: &str = "egress";
/// Port of the sidecar's policy API.
pub const EGRESS_PORT: u16 = 18080;

pub const ENV_EGRESS_RULES: &str = "OPENSANDBOX_EGRESS_RULES";
pub const ENV_EGRESS_MODE: &str = "OPENSANDBOX_EGRESS_MODE";
pub const ENV_EGRESS_TOKEN: &str = "OPENSANDBOX_EGRESS_TOKEN";
pub const ENV_EGRESS_POLICY_FILE: &str = "OPENSANDBOX_EGRESS_POLICY_FILE";
/// Where the sidecar keeps policy changes made through its API: an emptyDir, so a restarted
/// sidecar container finds them (the pod's lifetime bounds them, as it bounds the sandbox).
pub const EGRESS_STATE_DIR: &str = "/var/egress/state";
pub const EGRESS_STATE_VOLUME: &str = "egress-state";

/// What the pod needs from the owner beyond its template.
pub struct Owner<'a> {
    pub api_version: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub template: Option<&'a Value>,
    pub secure_token: Option<&'a str>,
    /// Policy JSON, sidecar token, enforcement mode and image, when egress is requested.
    pub egress: Option<Egress<'a>>,
}

pub struct Egress<'a> {
    pub policy: &'a str,
    pub token: &'a str,
    pub mode: &'a str,
    pub image: &'a str,
}

fn object<'v>(v: &'v mut Value, key: &str) -> &'v mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    match v.get_mut(key) {
        Some(Value::Object(m)) => m,
        _ => unreachable!("just made an object"),
    }
}

pub fn pod_name(owner: &str, index: u32) -> String {
    format!("{owner}-{index}")
}

/// The pod for `index`, as JSON ready to create.
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
    let labels = object(&mut metadata, "labels");
    labels.insert(LABEL_NAME.into(), json!(owner.name));
    labels.insert(LABEL_INDEX.into(), json!(index.to_string()));
    if let Some(token) = owner.secure_token {
        object(&mut metadata, "annotations")
            .insert(names::ANNOTATION_SECURE_ACCESS_TOKEN.into(), json!(token));
    }
    metadata["ownerReferences"] = json!([{
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    if let Some(egress) = &owner.egress {
        inject_egress(&mut spec, egress);
    }
    pod["metadata"] = metadata;
    pod["spec"] = spec;
    pod
}

/// Adds the egress sidecar (unless the template already has one) and takes NET_ADMIN away
/// from every other container, so only the sidecar can change the pod's firewall.
fn inject_egress(spec: &mut Value, egress: &Egress<'_>) {
    if !spec.get("containers").is_some_and(Value::is_array) {
        spec["containers"] = json!([]);
    }
    let Some(containers) = spec["containers"].as_array_mut() else {
        return;
    };
    if containers.iter().any(|c| c["name"] == EGRESS_CONTAINER) {
        return;
    }
    for c in containers.iter_mut() {
        if let Some(add) = c
            .pointer_mut("/securityContext/capabilities/add")
            .and_then(Value::as_array_mut)
        {
            add.retain(|cap| cap != "NET_ADMIN" && cap != "CAP_NET_ADMIN");
        }
    }
    if !spec.get("volumes").is_some_and(Value::is_array) {
        spec["volumes"] = json!([]);
    }
    if let Some(volumes) = spec["volumes"].as_array_mut()
        && !volumes.iter().any(|v| v["name"] == EGRESS_STATE_VOLUME)
    {
        volumes.push(json!({"name": EGRESS_STATE_VOLUME, "emptyDir": {}}));
    }
    let Some(containers) = spec["containers"].as_array_mut() else {
        return;
    };
    containers.push(json!({
        "name": EGRESS_CONTAINER,
        "image": egress.image,
        "env": [
            {"name": ENV_EGRESS_RULES, "value": egress.policy},
            {"name": ENV_EGRESS_MODE, "value": egress.mode},
            {"name": ENV_EGRESS_TOKEN, "value": egress.token},
            {"name": ENV_EGRESS_POLICY_FILE, "value": format!("{EGRESS_STATE_DIR}/policy.json")},
        ],
        "volumeMounts": [{"name": EGRESS_STATE_VOLUME, "mountPath": EGRESS_STATE_DIR}],
        "ports": [{"name": "egress-api", "containerPort": EGRESS_PORT}],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
        "readinessProbe": {
            "httpGet": {
                "path": "/healthz",
                "port": EGRESS_PORT,
                "httpHeaders": [{"name": "OPENSANDBOX-EGRESS-AUTH", "value": egress.token}],
            },
            "periodSeconds": 5,
        },
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner<'a>(template: &'a Value, egress: Option<Egress<'a>>) -> Owner<'a> {
        Owner {
            api_version: "sandbox.opensandbox.io/v1alpha1",
            kind: "BatchSandbox",
            name: "bs",
            namespace: "ns",
            uid: "u-1",
            template: Some(template),
            secure_token: Some("tok"),
            egress,
        }
    }

    #[test]
    fn keeps_template_fields_and_adds_identity() {
        let template = json!({
            "metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [{"name": "main", "image": "img", "futureField": {"a": 1}}], "someNewPodField": true},
        });
        let pod = build(&owner(&template, None), 1);
        assert_eq!(pod["metadata"]["name"], "bs-1");
        assert_eq!(pod["metadata"]["labels"]["app"], "x");
        assert_eq!(pod["metadata"]["labels"][LABEL_INDEX], "1");
        assert_eq!(pod["metadata"]["labels"][LABEL_NAME], "bs");
        assert_eq!(
            pod["metadata"]["annotations"][names::ANNOTATION_SECURE_ACCESS_TOKEN],
            "tok"
        );
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(pod["spec"]["containers"][0]["futureField"]["a"], 1);
        assert_eq!(pod["spec"]["someNewPodField"], true);
    }

    #[test]
    fn injects_egress_once_and_drops_net_admin() {
        let template = json!({"spec": {"containers": [{"name": "main", "securityContext": {"capabilities": {"add": ["NET_ADMIN", "SYS_PTRACE"]}}}]}});
        let egress = Egress {
            policy: "{}",
            token: "t",
            mode: "dns",
            image: "egress:1",
        };
        let pod = build(&owner(&template, Some(egress)), 0);
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 2);
        assert_eq!(
            containers[0]["securityContext"]["capabilities"]["add"],
            json!(["SYS_PTRACE"])
        );
        assert_eq!(containers[1]["name"], EGRESS_CONTAINER);
        assert_eq!(containers[1]["env"][2]["value"], "t");
        // API changes survive a sidecar restart: policy file on an emptyDir.
        assert_eq!(
            containers[1]["env"][3]["value"],
            "/var/egress/state/policy.json"
        );
        assert_eq!(
            containers[1]["volumeMounts"][0]["mountPath"],
            EGRESS_STATE_DIR
        );
        assert_eq!(
            pod["spec"]["volumes"],
            json!([{"name": EGRESS_STATE_VOLUME, "emptyDir": {}}])
        );
        // A template that already has the sidecar is left as it is.
        let egress = Egress {
            policy: "{}",
            token: "t",
            mode: "dns",
            image: "egress:1",
        };
        let again = build(
            &owner(&pod["spec"].clone().pipe_template(), Some(egress)),
            0,
        );
        assert_eq!(again["spec"]["containers"].as_array().unwrap().len(), 2);
    }

    trait PipeTemplate {
        fn pipe_template(self) -> Value;
    }
    impl PipeTemplate for Value {
        fn pipe_template(self) -> Value {
            json!({ "spec": self })
        }
    }
}
