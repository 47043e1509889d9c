//! The egress fence's demands on a sandbox pod template: what makes a template unacceptable
//! (it would let a sandbox process undo or bypass the sidecar's firewall, or reach the sidecar's
//! own state), and the capabilities every sandbox container must lose.

use std::fmt;

use sandbox_api::egress;
use serde_json::{Value, json};

use crate::json;

/// Container lists of a pod spec, all checked; ephemeral containers cannot be set on create, but
/// a template that names them is refused all the same.
const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];
/// Capabilities that let a process change the pod's firewall or mark its packets as the
/// sidecar's (`NET_RAW` sets `SO_MARK` since Linux 5.17), or do anything at all.
const FORBIDDEN_CAPABILITIES: [&str; 4] = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "ALL"];
/// Capabilities taken from every sandbox container (the runtime grants `NET_RAW` by default).
const DROPPED_CAPABILITIES: [&str; 2] = ["NET_ADMIN", "NET_RAW"];
const FIELD_PREFIX: &str = "spec.template.spec";

/// What is wrong with one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Privileged,
    Capability,
    HostNetwork,
    HostPid,
    ShareProcessNamespace,
    ReservedContainer,
    ReservedVolume,
    StateMount,
}

impl Kind {
    /// The condition and event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::Privileged => "PrivilegedContainer",
            Kind::Capability => "ForbiddenCapability",
            Kind::HostNetwork => "HostNetwork",
            Kind::HostPid => "HostPID",
            Kind::ShareProcessNamespace => "SharedProcessNamespace",
            Kind::ReservedContainer => "ReservedContainerName",
            Kind::ReservedVolume => "ReservedVolumeName",
            Kind::StateMount => "ReservedMount",
        }
    }

    fn why(self) -> &'static str {
        match self {
            Kind::Privileged | Kind::Capability => "would let the sandbox undo the egress fence",
            Kind::HostNetwork => "would put the sandbox outside the egress fence",
            Kind::HostPid | Kind::ShareProcessNamespace => {
                "would let the sandbox read and trace the egress sidecar"
            }
            Kind::ReservedContainer => "is reserved for the egress sidecar",
            Kind::ReservedVolume => "is reserved for the egress sidecar's state",
            Kind::StateMount => "would give the sandbox the egress sidecar's state",
        }
    }
}

/// One field of the template that breaks the fence.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub kind: Kind,
    /// Path from the BatchSandbox, e.g. `spec.template.spec.containers[0].securityContext.privileged`.
    pub field: String,
    pub value: Value,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.field, self.value, self.kind.why())
    }
}

/// `cap_net_admin`, ` Net_Admin` and `NET_ADMIN` are one capability to the container runtime.
fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

/// `/var/egress//state/` and `/var/egress/./state` are the state directory too.
fn normalize_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Every field of `template` (a BatchSandbox's `spec.template`) that breaks the fence, in
/// document order: pod-level fields first, then each container list.
pub fn violations(template: Option<&Value>) -> Vec<Violation> {
    let mut found = Vec::new();
    let Some(spec) = template
        .and_then(|t| t.get("spec"))
        .filter(|s| s.is_object())
    else {
        return found;
    };
    let mut flag = |kind: Kind, field: &str| {
        if spec.get(field) == Some(&Value::Bool(true)) {
            found.push(Violation {
                kind,
                field: format!("{FIELD_PREFIX}.{field}"),
                value: json!(true),
            });
        }
    };
    flag(Kind::HostNetwork, "hostNetwork");
    flag(Kind::HostPid, "hostPID");
    flag(Kind::ShareProcessNamespace, "shareProcessNamespace");
    for (i, volume) in list(spec, "volumes") {
        if volume.get("name").and_then(Value::as_str) == Some(egress::STATE_VOLUME) {
            found.push(Violation {
                kind: Kind::ReservedVolume,
                field: format!("{FIELD_PREFIX}.volumes[{i}].name"),
                value: json!(egress::STATE_VOLUME),
            });
        }
    }
    for name in CONTAINER_LISTS {
        for (i, container) in list(spec, name) {
            container_violations(
                container,
                &format!("{FIELD_PREFIX}.{name}[{i}]"),
                &mut found,
            );
        }
    }
    found
}

fn list<'v>(v: &'v Value, key: &str) -> impl Iterator<Item = (usize, &'v Value)> {
    v.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

fn container_violations(c: &Value, at: &str, found: &mut Vec<Violation>) {
    let mut push = |kind, field: String, value: &Value| {
        found.push(Violation {
            kind,
            field,
            value: value.clone(),
        })
    };
    if let Some(name) = c
        .get("name")
        .filter(|n| n.as_str() == Some(egress::CONTAINER))
    {
        push(Kind::ReservedContainer, format!("{at}.name"), name);
    }
    if let Some(privileged) = c
        .pointer("/securityContext/privileged")
        .filter(|p| **p == Value::Bool(true))
    {
        push(
            Kind::Privileged,
            format!("{at}.securityContext.privileged"),
            privileged,
        );
    }
    let added = c
        .pointer("/securityContext/capabilities")
        .unwrap_or(&Value::Null);
    for (j, cap) in list(added, "add") {
        let forbidden = cap
            .as_str()
            .is_some_and(|name| FORBIDDEN_CAPABILITIES.contains(&capability(name).as_str()));
        if forbidden {
            push(
                Kind::Capability,
                format!("{at}.securityContext.capabilities.add[{j}]"),
                cap,
            );
        }
    }
    let state_dir = normalize_path(egress::STATE_DIR);
    for (k, mount) in list(c, "volumeMounts") {
        if let Some(name) = mount
            .get("name")
            .filter(|n| n.as_str() == Some(egress::STATE_VOLUME))
        {
            push(
                Kind::StateMount,
                format!("{at}.volumeMounts[{k}].name"),
                name,
            );
        }
        if let Some(path) = mount
            .get("mountPath")
            .filter(|p| p.as_str().is_some_and(|p| normalize_path(p) == state_dir))
        {
            push(
                Kind::StateMount,
                format!("{at}.volumeMounts[{k}].mountPath"),
                path,
            );
        }
    }
}

/// Makes every container and init container of `spec` drop `NET_ADMIN` and `NET_RAW`, keeping
/// the rest of its security context and its own drop entries. Call before adding the sidecar.
pub fn drop_net_capabilities(spec: &mut Value) {
    for name in ["initContainers", "containers"] {
        let Some(containers) = spec.get_mut(name).and_then(Value::as_array_mut) else {
            continue;
        };
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            let drop = json::array(
                json::object(json::object(container, "securityContext"), "capabilities"),
                "drop",
            );
            for cap in DROPPED_CAPABILITIES {
                let present = drop
                    .iter()
                    .any(|d| d.as_str().is_some_and(|d| capability(d) == cap));
                if !present {
                    drop.push(json!(cap));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn of(spec: Value) -> Vec<(Kind, String, Value)> {
        violations(Some(&json!({ "spec": spec })))
            .into_iter()
            .map(|v| (v.kind, v.field, v.value))
            .collect()
    }

    fn one(kind: Kind, field: &str, value: Value) -> Vec<(Kind, String, Value)> {
        vec![(kind, field.into(), value)]
    }

    #[test]
    fn a_plain_template_passes() {
        let spec = json!({
            "containers": [{"name": "main", "image": "i",
                "securityContext": {"privileged": false, "capabilities": {"add": ["SYS_PTRACE", "CHOWN"], "drop": ["NET_RAW"]}},
                "volumeMounts": [{"name": "data", "mountPath": "/var/egress/state-copy"}]}],
            "initContainers": [{"name": "setup", "image": "i"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "hostNetwork": false, "hostPID": false, "shareProcessNamespace": false, "hostIPC": true,
        });
        assert_eq!(of(spec), vec![]);
        assert_eq!(violations(None), vec![]);
        assert_eq!(violations(Some(&json!({"spec": "nonsense"}))), vec![]);
    }

    #[test]
    fn privileged_in_any_container_list() {
        let p = json!({"securityContext": {"privileged": true}});
        assert_eq!(
            of(json!({"containers": [{"name": "a"}, p.clone()]})),
            one(
                Kind::Privileged,
                "spec.template.spec.containers[1].securityContext.privileged",
                json!(true)
            )
        );
        assert_eq!(
            of(json!({"initContainers": [p.clone()]})),
            one(
                Kind::Privileged,
                "spec.template.spec.initContainers[0].securityContext.privileged",
                json!(true)
            )
        );
        assert_eq!(
            of(json!({"ephemeralContainers": [p]}))[0].1,
            "spec.template.spec.ephemeralContainers[0].securityContext.privileged"
        );
    }

    #[test]
    fn forbidden_capabilities_in_any_spelling() {
        for cap in [
            "NET_ADMIN",
            "net_admin",
            "CAP_NET_ADMIN",
            "cap_net_admin",
            "Net_Raw",
            "CAP_NET_RAW",
            "SYS_ADMIN",
            "cap_sys_admin",
            "ALL",
            "all",
            "CAP_ALL",
            " NET_ADMIN ",
        ] {
            let spec = json!({"initContainers": [{"name": "a"}, {"name": "b",
                "securityContext": {"capabilities": {"add": [cap]}}}]});
            assert_eq!(
                of(spec),
                one(
                    Kind::Capability,
                    "spec.template.spec.initContainers[1].securityContext.capabilities.add[0]",
                    json!(cap)
                ),
                "{cap}"
            );
        }
        let spec = json!({"containers": [{"securityContext": {"capabilities": {"add": ["SYS_PTRACE", "net_raw"]}}}]});
        assert_eq!(
            of(spec)[0].1,
            "spec.template.spec.containers[0].securityContext.capabilities.add[1]"
        );
        let v = &violations(Some(
            &json!({"spec": {"initContainers": [{}, {"securityContext": {"capabilities": {"add": ["cap_sys_admin"]}}}]}}),
        ))[0];
        assert_eq!(
            v.to_string(),
            r#"spec.template.spec.initContainers[1].securityContext.capabilities.add[0]: "cap_sys_admin" would let the sandbox undo the egress fence"#
        );
        assert_eq!(v.kind.reason(), "ForbiddenCapability");
    }

    #[test]
    fn host_namespaces() {
        assert_eq!(
            of(json!({"hostNetwork": true})),
            one(
                Kind::HostNetwork,
                "spec.template.spec.hostNetwork",
                json!(true)
            )
        );
        assert_eq!(
            of(json!({"hostPID": true})),
            one(Kind::HostPid, "spec.template.spec.hostPID", json!(true))
        );
        assert_eq!(
            of(json!({"shareProcessNamespace": true})),
            one(
                Kind::ShareProcessNamespace,
                "spec.template.spec.shareProcessNamespace",
                json!(true)
            )
        );
    }

    #[test]
    fn reserved_names_and_the_state_dir() {
        assert_eq!(
            of(json!({"containers": [{"name": "main"}, {"name": "egress"}]})),
            one(
                Kind::ReservedContainer,
                "spec.template.spec.containers[1].name",
                json!("egress")
            )
        );
        assert_eq!(
            of(json!({"initContainers": [{"name": "egress"}]}))[0].1,
            "spec.template.spec.initContainers[0].name"
        );
        assert_eq!(
            of(json!({"volumes": [{"name": "a"}, {"name": "egress-state", "emptyDir": {}}]})),
            one(
                Kind::ReservedVolume,
                "spec.template.spec.volumes[1].name",
                json!("egress-state")
            )
        );
        assert_eq!(
            of(
                json!({"containers": [{"volumeMounts": [{"name": "egress-state", "mountPath": "/x"}]}]})
            ),
            one(
                Kind::StateMount,
                "spec.template.spec.containers[0].volumeMounts[0].name",
                json!("egress-state")
            )
        );
        for path in [
            "/var/egress/state",
            "/var/egress/state/",
            "//var/egress//state",
            "/var/egress/./state",
            "/var/egress/rules/../state",
        ] {
            let spec = json!({"initContainers": [{"volumeMounts": [{"name": "data", "mountPath": path}]}]});
            assert_eq!(
                of(spec),
                one(
                    Kind::StateMount,
                    "spec.template.spec.initContainers[0].volumeMounts[0].mountPath",
                    json!(path)
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn every_violation_is_reported_in_order() {
        let spec = json!({
            "hostNetwork": true,
            "volumes": [{"name": "egress-state"}],
            "containers": [{"name": "egress", "securityContext": {"privileged": true, "capabilities": {"add": ["ALL"]}}}],
        });
        let kinds: Vec<Kind> = of(spec).into_iter().map(|v| v.0).collect();
        assert_eq!(
            kinds,
            [
                Kind::HostNetwork,
                Kind::ReservedVolume,
                Kind::ReservedContainer,
                Kind::Privileged,
                Kind::Capability
            ]
        );
    }

    #[test]
    fn drops_net_capabilities_merged() {
        let mut spec = json!({
            "initContainers": [{"name": "setup"}],
            "containers": [
                {"name": "main", "securityContext": {"runAsUser": 1000, "capabilities": {"add": ["SYS_PTRACE"], "drop": ["CHOWN", "cap_net_raw"]}}},
                {"name": "other", "securityContext": null},
            ],
        });
        drop_net_capabilities(&mut spec);
        assert_eq!(
            spec["initContainers"][0]["securityContext"],
            json!({"capabilities": {"drop": ["NET_ADMIN", "NET_RAW"]}})
        );
        assert_eq!(
            spec["containers"][0]["securityContext"],
            json!({"runAsUser": 1000, "capabilities": {"add": ["SYS_PTRACE"], "drop": ["CHOWN", "cap_net_raw", "NET_ADMIN"]}})
        );
        assert_eq!(
            spec["containers"][1]["securityContext"]["capabilities"]["drop"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
        let again = spec.clone();
        drop_net_capabilities(&mut spec);
        assert_eq!(spec, again, "idempotent");
    }
}
