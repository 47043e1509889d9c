//! The injected egress sidecar: a native sidecar (an init container with `restartPolicy:
//! Always`) placed before every other init container, whose startup probe passes only once its
//! first firewall apply is in place, so no sandbox process ever runs unfenced.

use sandbox_api::egress::{self, env};
use serde_json::{Value, json};

use crate::{fence, json};

/// What the sidecar is given.
pub struct Egress<'a> {
    /// Policy JSON (`OPENSANDBOX_EGRESS_RULES`).
    pub policy: &'a str,
    /// Name of the Secret holding the API token under [`egress::SECRET_TOKEN_KEY`].
    pub secret: &'a str,
    pub mode: &'a str,
    pub image: &'a str,
    /// The BatchSandbox's name (`OPENSANDBOX_EGRESS_SANDBOX_ID`: in the sidecar's logs,
    /// metrics and deny-webhook payloads).
    pub sandbox: &'a str,
}

/// Seconds the sidecar has, probed every second, to apply its first rules before the kubelet
/// restarts it.
const STARTUP_PROBE_FAILURES: u32 = 120;

/// The sidecar's own security context, complete so that nothing the template sets for the pod
/// (`runAsUser`, `runAsNonRoot`, ...) reaches it. It starts as root with `NET_ADMIN`, `SETUID`
/// and `SETGID` only (Kubernetes grants an added capability to a non-root process only through
/// file capabilities, which need privilege escalation) and at once becomes its own uid
/// ([`egress::SIDECAR_UID`], `OPENSANDBOX_EGRESS_RUN_AS`) with `NET_ADMIN` alone; it writes only
/// to its state volume.
fn security_context() -> Value {
    json!({
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": false,
        "privileged": false,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SETUID", "SETGID"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The sidecar container. Its probes carry no token: `/healthz` needs none.
pub fn container(egress: &Egress<'_>) -> Value {
    let health = json!({"path": egress::HEALTH_PATH, "port": egress::API_PORT});
    json!({
        "name": egress::CONTAINER,
        "image": egress.image,
        "restartPolicy": "Always",
        "env": [
            {"name": env::RULES, "value": egress.policy},
            {"name": env::MODE, "value": egress.mode},
            {"name": env::TOKEN, "valueFrom": {"secretKeyRef": {
                "name": egress.secret,
                "key": egress::SECRET_TOKEN_KEY,
            }}},
            {"name": env::POLICY_FILE, "value": egress::STATE_POLICY_FILE},
            {"name": env::RUN_AS, "value": format!("{0}:{0}", egress::SIDECAR_UID)},
            {"name": env::SANDBOX_ID, "value": egress.sandbox},
        ],
        // An emptyDir, so a restarted sidecar finds the API's changes (the pod bounds them).
        "volumeMounts": [{"name": egress::STATE_VOLUME, "mountPath": egress::STATE_DIR}],
        "ports": [{"name": "egress-api", "containerPort": egress::API_PORT}],
        "securityContext": security_context(),
        "startupProbe": {
            "httpGet": health,
            "periodSeconds": 1,
            "failureThreshold": STARTUP_PROBE_FAILURES,
        },
        "readinessProbe": {"httpGet": health, "periodSeconds": 5},
    })
}

/// Fences `spec` (a template that passed [`fence::violations`]): every container loses
/// `NET_ADMIN` and `NET_RAW`, then the sidecar becomes the first init container.
pub fn inject(spec: &mut Value, egress: &Egress<'_>) {
    fence::drop_net_capabilities(spec);
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    json::array(spec, "initContainers").insert(0, container(egress));
    json::array(spec, "volumes").push(json!({"name": egress::STATE_VOLUME, "emptyDir": {}}));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const EGRESS: Egress<'static> = Egress {
        policy: r#"{"defaultAction":"deny"}"#,
        secret: "bs-egress-token",
        mode: "dns+nft",
        image: "egress:1",
        sandbox: "bs",
    };

    #[test]
    fn sidecar_is_the_first_init_container_and_starts_first() {
        let mut spec = json!({
            "initContainers": [{"name": "setup", "image": "i"}],
            "containers": [{"name": "main", "image": "i"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        });
        inject(&mut spec, &EGRESS);
        let init = spec["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 2);
        let sidecar = &init[0];
        assert_eq!(sidecar["name"], egress::CONTAINER);
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(init[1]["name"], "setup");
        let startup = &sidecar["startupProbe"];
        assert_eq!(
            startup["httpGet"],
            json!({"path": "/healthz", "port": 18080})
        );
        assert_eq!(startup["periodSeconds"], 1);
        assert!(startup["failureThreshold"].as_u64().unwrap() >= 60);
        assert_eq!(
            sidecar["readinessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": 18080})
        );
        let security = &sidecar["securityContext"];
        assert_eq!(
            security["capabilities"],
            json!({"drop": ["ALL"], "add": ["NET_ADMIN", "SETUID", "SETGID"]})
        );
        // A pod-level runAsUser / runAsNonRoot in the template must not reach the sidecar.
        assert_eq!(
            (&security["runAsUser"], &security["runAsNonRoot"]),
            (&json!(0), &json!(false))
        );
        assert_eq!(
            spec["volumes"][1],
            json!({"name": "egress-state", "emptyDir": {}})
        );
        assert_eq!(
            sidecar["volumeMounts"],
            json!([{"name": "egress-state", "mountPath": "/var/egress/state"}])
        );
        for c in [&spec["initContainers"][1], &spec["containers"][0]] {
            assert_eq!(
                c["securityContext"]["capabilities"]["drop"],
                json!(["NET_ADMIN", "NET_RAW"])
            );
        }
    }

    #[test]
    fn token_comes_from_the_secret() {
        let sidecar = container(&EGRESS);
        let env: Vec<&Value> = sidecar["env"].as_array().unwrap().iter().collect();
        let find = |n: &str| env.iter().find(|e| e["name"] == n).copied().unwrap();
        assert_eq!(find(env::RULES)["value"], EGRESS.policy);
        assert_eq!(find(env::MODE)["value"], "dns+nft");
        assert_eq!(
            find(env::POLICY_FILE)["value"],
            "/var/egress/state/policy.json"
        );
        assert_eq!(find(env::RUN_AS)["value"], "65533:65533");
        assert_eq!(find(env::SANDBOX_ID)["value"], EGRESS.sandbox);
        assert_eq!(
            find(env::TOKEN),
            &json!({"name": env::TOKEN, "valueFrom": {"secretKeyRef": {"name": "bs-egress-token", "key": "token"}}})
        );
        assert!(
            !sidecar.to_string().contains(egress::HEADER_AUTH),
            "probes carry no token header"
        );
    }

    #[test]
    fn a_template_without_lists_gets_them() {
        let mut spec = json!({"containers": [{"name": "main"}]});
        inject(&mut spec, &EGRESS);
        assert_eq!(spec["initContainers"].as_array().unwrap().len(), 1);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 1);
    }
}
