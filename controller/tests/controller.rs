//! The controller against a real kube-apiserver; the test plays the kubelet by patching pod
//! status, and the real gateway routes by what the controller publishes.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

mod harness;
#[path = "../../gateway/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use harness::{Controller, eventually, eventually_every};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::GatewayOptions;
use support::client::get;
use support::k8s::{ControlPlane, batch_resource};

const LABEL_NAME: &str = "batch-sandbox.sandbox.opensandbox.io/name";
const LABEL_INDEX: &str = "batch-sandbox.sandbox.opensandbox.io/pod-index";

struct Env {
    plane: ControlPlane,
    ns: String,
}

impl Env {
    fn new(ns: &str) -> Self {
        let plane = ControlPlane::start();
        plane.create_namespace(ns);
        Env {
            plane,
            ns: ns.into(),
        }
    }

    fn boxes(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.plane.client.clone(), &self.ns, &batch_resource())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.plane.client.clone(), &self.ns)
    }

    /// Waits for an event with `reason` in namespace `ns` (events are recorded off the
    /// reconcile path, so they may follow the status by a moment).
    fn wait_event(&self, ns: &str, reason: &str) {
        eventually(
            &format!("{reason} event in {ns}"),
            Duration::from_secs(10),
            || (!self.event_notes(ns, reason).is_empty()).then_some(()),
        );
    }

    /// Notes of the events with `reason` in namespace `ns`, about any object.
    fn event_notes(&self, ns: &str, reason: &str) -> Vec<(String, String)> {
        let events = self
            .block(
                Api::<k8s_openapi::api::events::v1::Event>::namespaced(
                    self.plane.client.clone(),
                    ns,
                )
                .list(&Default::default()),
            )
            .unwrap();
        events
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| {
                let about = e.regarding.and_then(|r| r.name).unwrap_or_default();
                (about, e.note.unwrap_or_default())
            })
            .collect()
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.plane.client.clone(), &self.ns)
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.plane.runtime.block_on(f)
    }

    fn create(&self, name: &str, spec: Value, annotations: Value) -> Result<(), kube::Error> {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1",
            "kind": "BatchSandbox",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec,
        }))
        .unwrap();
        self.block(self.boxes().create(&PostParams::default(), &obj))
            .map(|_| ())
    }

    fn get(&self, name: &str) -> Option<DynamicObject> {
        self.block(self.boxes().get_opt(name)).unwrap()
    }

    fn patch_spec(&self, name: &str, spec: Value) {
        self.block(self.boxes().patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        ))
        .unwrap();
    }

    fn pod_names(&self, owner: &str) -> Vec<String> {
        let list = self
            .block(
                self.pods()
                    .list(&ListParams::default().labels(&format!("{LABEL_NAME}={owner}"))),
            )
            .unwrap();
        let mut names: Vec<String> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name)
            .collect();
        names.sort();
        names
    }

    /// Plays the kubelet: the pod runs, has `ip` and is Ready.
    fn kubelet_ready(&self, pod: &str, ip: &str) {
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "main", "image": "sandbox:latest", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}],
        }});
        self.block(
            self.pods()
                .patch_status(pod, &PatchParams::default(), &Patch::Merge(status)),
        )
        .unwrap();
    }

    fn kubelet_status(&self, pod: &str, status: Value) {
        self.block(self.pods().patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        ))
        .unwrap();
    }
}

fn template() -> Value {
    json!({
        "metadata": {"labels": {"app": "sandbox"}, "annotations": {"team": "a"}},
        "spec": {
            "terminationGracePeriodSeconds": 7,
            "hostname": "sandbox-host",
            "containers": [{"name": "main", "image": "sandbox:latest", "args": ["--serve"],
                "env": [{"name": "MODE", "value": "test"}],
                "securityContext": {"capabilities": {"add": ["NET_ADMIN", "SYS_PTRACE"]}}}],
        },
    })
}

#[test]
fn end_to_end_controller_to_gateway() {
    let env = Env::new("e2e");
    let controller = Controller::start(&env.plane, &[]);
    env.create(
        "bs",
        json!({"replicas": 2, "template": template()}),
        json!({}),
    )
    .unwrap();
    let pods = eventually("2 pods", Duration::from_secs(20), || {
        let names = env.pod_names("bs");
        (names.len() == 2).then_some(names)
    });
    assert_eq!(pods, ["bs-0", "bs-1"], "log:\n{}", controller.log_text());
    let pod = env.block(env.pods().get("bs-1")).unwrap();
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_INDEX], "1");
    assert_eq!(labels[LABEL_NAME], "bs");
    assert_eq!(labels["app"], "sandbox");
    assert_eq!(pod.metadata.annotations.clone().unwrap()["team"], "a");
    let owner = &pod.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("BatchSandbox", "bs", Some(true))
    );
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.termination_grace_period_seconds, Some(7));
    assert_eq!(spec.hostname.as_deref(), Some("sandbox-host"));
    assert_eq!(spec.containers[0].args.clone().unwrap(), ["--serve"]);
    // Without egress the fence is not applied: the template's containers are as written.
    assert_eq!(spec.init_containers, None);
    let caps = spec.containers[0]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap();
    assert_eq!(
        (caps.add.unwrap(), caps.drop),
        (vec!["NET_ADMIN".to_owned(), "SYS_PTRACE".to_owned()], None)
    );

    let (up3, up4) = support::upstream::pair();
    let (ip3, ip4, port) = (up3.addr.ip(), up4.addr.ip(), up3.addr.port());
    env.kubelet_ready("bs-0", &ip3.to_string());
    env.kubelet_ready("bs-1", &ip4.to_string());
    let want = format!(r#"["{ip3}","{ip4}"]"#);
    let obj = eventually("endpoints and status", Duration::from_secs(20), || {
        let o = env.get("bs")?;
        let ok = o
            .metadata
            .annotations
            .as_ref()?
            .get("sandbox.opensandbox.io/endpoints")
            == Some(&want)
            && o.data["status"]["ready"] == 2;
        ok.then_some(o)
    });
    let status = &obj.data["status"];
    assert_eq!(status["phase"], "Succeed");
    assert_eq!(status["replicas"], 2);
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("PodsReady"))
    );

    let gw = support::kube_gateway(
        &env.plane.kubeconfig,
        "batchsandbox",
        GatewayOptions::default(),
    );
    gw.wait_ready();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = get(
            gw.addr,
            "/hello",
            &[("Host", &format!("bs-{port}.sandbox.test"))],
        );
        assert_eq!(r.status, 200, "{}", r.body_text());
        let host = r.echo()["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "host")
            .unwrap()[1]
            .clone();
        seen.insert(host.as_str().unwrap().to_owned());
    }
    assert!(seen.contains(&format!("{ip3}:{port}")), "{seen:?}");
    env.wait_event("e2e", "SuccessfulCreate");
}

#[test]
fn scaling_recreation_and_failures() {
    let env = Env::new("scale");
    let _controller = Controller::start(&env.plane, &["--max-replicas", "4"]);
    env.create(
        "bs",
        json!({"replicas": 2, "template": template()}),
        json!({}),
    )
    .unwrap();
    let count = |n: usize| {
        eventually(&format!("{n} pods"), Duration::from_secs(20), || {
            (env.pod_names("bs").len() == n).then_some(())
        })
    };
    count(2);
    env.patch_spec("bs", json!({"replicas": 3}));
    count(3);
    env.patch_spec("bs", json!({"replicas": 1}));
    count(1);
    assert_eq!(env.pod_names("bs"), ["bs-0"]);
    env.block(env.pods().delete("bs-0", &Default::default()))
        .unwrap();
    eventually("pod recreated", Duration::from_secs(20), || {
        let p = env.block(env.pods().get_opt("bs-0")).unwrap()?;
        p.metadata.deletion_timestamp.is_none().then_some(())
    });
    env.patch_spec("bs", json!({"replicas": 9}));
    count(4);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.pod_names("bs").len(), 4, "--max-replicas caps the pods");
    assert!(
        env.create(
            "negative",
            json!({"replicas": -1, "template": template()}),
            json!({})
        )
        .is_err(),
        "schema rejects negative replicas"
    );

    env.kubelet_status("bs-2", json!({
        "phase": "Running", "podIP": "127.0.0.9", "podIPs": [{"ip": "127.0.0.9"}],
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": "main", "image": "sandbox:latest", "imageID": "", "ready": false, "restartCount": 5,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}}}],
    }));
    let status = eventually("Failed phase", Duration::from_secs(20), || {
        let o = env.get("bs")?;
        (o.data["status"]["phase"] == "Failed").then(|| o.data["status"].clone())
    });
    let failed = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodFailed")
        .unwrap();
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("CrashLoopBackOff"),
        "{failed}"
    );
}

#[test]
fn bad_templates_and_policies_fail_clearly() {
    let env = Env::new("bad");
    let controller = Controller::start(&env.plane, &[]);
    // No image: the API server refuses the pod.
    let no_image = json!({"spec": {"containers": [{"name": "main"}]}});
    env.create(
        "noimage",
        json!({"replicas": 1, "template": no_image}),
        json!({}),
    )
    .unwrap();
    let status = eventually("FailedCreate", Duration::from_secs(20), || {
        let o = env.get("noimage")?;
        (o.data["status"]["phase"] == "Failed").then(|| o.data["status"].clone())
    });
    let c = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodFailed")
        .unwrap()
        .clone();
    assert_eq!(c["reason"], "FailedCreate");
    assert!(c["message"].as_str().unwrap().contains("image"), "{c}");
    env.wait_event("bad", "FailedCreate");
    let before = controller.metric("sandbox_controller_reconciles_total");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        controller.metric("sandbox_controller_reconciles_total") - before < 5.0,
        "hot loop on a refused template"
    );

    env.create(
        "badpolicy",
        json!({"replicas": 1, "template": template()}),
        json!({"opensandbox.io/network-policy": "{not json"}),
    )
    .unwrap();
    let status = eventually("policy condition", Duration::from_secs(20), || {
        let o = env.get("badpolicy")?;
        (o.data["status"]["phase"] == "Failed").then(|| o.data["status"].clone())
    });
    assert!(
        status.to_string().contains("InvalidNetworkPolicy"),
        "{status}"
    );
    assert!(
        env.pod_names("badpolicy").is_empty(),
        "no pod for an invalid policy"
    );
    assert!(
        env.create(
            "badtime",
            json!({"replicas": 1, "expireTime": "next tuesday"}),
            json!({})
        )
        .is_err(),
        "schema rejects a non-RFC 3339 expireTime"
    );
    fence_refusals(&env, &controller);
}

#[test]
fn expiry_and_renewal() {
    let env = Env::new("expiry");
    let _controller = Controller::start(&env.plane, &[]);
    let at = |secs: i64| {
        (k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .to_string()
    };
    env.create(
        "short",
        json!({"replicas": 1, "template": template(), "expireTime": at(2)}),
        json!({}),
    )
    .unwrap();
    env.create(
        "renewed",
        json!({"replicas": 1, "template": template(), "expireTime": at(3)}),
        json!({}),
    )
    .unwrap();
    env.patch_spec("renewed", json!({"expireTime": at(120)}));
    eventually("expired object deleted", Duration::from_secs(15), || {
        env.get("short").is_none().then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        env.get("renewed").is_some(),
        "a renewed expireTime must be honoured"
    );
}

/// A template for an egress-managed sandbox: one init container and one container, neither
/// asking for anything the fence refuses.
fn fenced_template() -> Value {
    json!({
        "metadata": {"labels": {"app": "sandbox"}},
        "spec": {
            // Pod-wide settings a hardened sandbox sets; they must not reach the sidecar.
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000},
            "initContainers": [{"name": "setup", "image": "sandbox:latest",
                "securityContext": {"capabilities": {"drop": ["CHOWN"]}}}],
            "containers": [{"name": "main", "image": "sandbox:latest",
                "securityContext": {"runAsUser": 1000, "capabilities": {"add": ["SYS_PTRACE"]}}}],
        },
    })
}

const POLICY: &str =
    r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"*.pypi.org"}]}"#;

/// Everything the fence demands of an injected pod, and no token anywhere in it.
fn assert_fenced(pod: &Pod, secret: &str, tokens: &[&str]) {
    let json = serde_json::to_string(pod).unwrap();
    for token in tokens {
        assert!(!json.contains(token), "a token is in the pod: {json}");
    }
    let spec = pod.spec.clone().unwrap();
    let init = spec.init_containers.clone().unwrap();
    assert_eq!(init.len(), 2, "sidecar + the template's init container");
    let sidecar = &init[0];
    assert_eq!(
        (
            sidecar.name.as_str(),
            sidecar.image.as_deref(),
            sidecar.restart_policy.as_deref()
        ),
        ("egress", Some("egress:test"), Some("Always")),
        "the sidecar is a native sidecar started before everything else"
    );
    assert_eq!(init[1].name, "setup");
    let startup = sidecar.startup_probe.clone().expect("startup probe");
    let get = startup.http_get.clone().unwrap();
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    assert_eq!(
        get.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(18080)
    );
    assert_eq!(startup.period_seconds, Some(1));
    assert!(startup.failure_threshold.unwrap() >= 60);
    for probe in [
        sidecar.startup_probe.clone(),
        sidecar.readiness_probe.clone(),
    ] {
        let get = probe.unwrap().http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.http_headers, None, "probes carry no token header");
    }
    let env_var = |n: &str| {
        sidecar
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    assert_eq!(
        env_var("OPENSANDBOX_EGRESS_RULES").value.as_deref(),
        Some(POLICY)
    );
    assert_eq!(
        env_var("OPENSANDBOX_EGRESS_MODE").value.as_deref(),
        Some("dns+nft"),
        "the default mode enforces addresses too"
    );
    assert_eq!(
        env_var("OPENSANDBOX_EGRESS_POLICY_FILE").value.as_deref(),
        Some("/var/egress/state/policy.json")
    );
    let token = env_var("OPENSANDBOX_EGRESS_TOKEN");
    assert_eq!(token.value, None);
    let reference = token.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (reference.name.as_str(), reference.key.as_str()),
        (secret, "token")
    );
    let security = sidecar.security_context.clone().unwrap();
    assert_eq!(
        (security.run_as_user, security.run_as_non_root),
        (Some(0), Some(false)),
        "the sidecar runs as it needs whatever the pod sets"
    );
    let caps = security.capabilities.unwrap();
    assert_eq!(
        (caps.add.unwrap(), caps.drop.unwrap()),
        (
            vec![
                "NET_ADMIN".to_owned(),
                "SETUID".to_owned(),
                "SETGID".to_owned()
            ],
            vec!["ALL".to_owned()]
        ),
        "root with the capabilities to become its own user keeping NET_ADMIN alone"
    );
    assert!(
        spec.volumes
            .unwrap()
            .iter()
            .any(|v| v.name == "egress-state" && v.empty_dir.is_some())
    );
    let sandbox_containers = init[1..].iter().chain(spec.containers.iter());
    for c in sandbox_containers {
        let sc = c.security_context.clone().unwrap();
        let drop = sc.capabilities.clone().unwrap().drop.unwrap();
        for cap in ["NET_ADMIN", "NET_RAW"] {
            assert!(
                drop.contains(&cap.to_owned()),
                "{} keeps {cap}: {drop:?}",
                c.name
            );
        }
    }
    assert_eq!(spec.containers.len(), 1);
    let main = spec.containers[0].security_context.clone().unwrap();
    assert_eq!(
        main.run_as_user,
        Some(1000),
        "the rest of the context is kept"
    );
    assert_eq!(main.capabilities.unwrap().add.unwrap(), ["SYS_PTRACE"]);
    let setup_drop = init[1]
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap()
        .drop
        .unwrap();
    assert_eq!(setup_drop, ["CHOWN", "NET_ADMIN", "NET_RAW"]);
}

#[test]
fn access_and_egress_provisioned_exactly_once() {
    let env = Env::new("access");
    let annotations =
        json!({"opensandbox.io/secure-access": "true", "opensandbox.io/network-policy": POLICY});
    let first = Controller::start(&env.plane, &[]);
    env.create(
        "bs",
        json!({"replicas": 1, "template": fenced_template()}),
        annotations,
    )
    .unwrap();
    let pod = eventually("pod", Duration::from_secs(20), || {
        env.block(env.pods().get_opt("bs-0")).unwrap()
    });
    let obj = env.get("bs").unwrap();
    let ann = obj.metadata.annotations.clone().unwrap();
    let token = ann["opensandbox.io/secure-access-token"].clone();
    let egress_token = ann["opensandbox.io/egress-auth-token"].clone();
    assert_eq!((token.len(), egress_token.len()), (32, 32));
    assert_fenced(&pod, "bs-egress-token", &[&token, &egress_token]);

    // The token lives in a Secret the BatchSandbox controls (garbage-collected with it).
    let secret = env.block(env.secrets().get("bs-egress-token")).unwrap();
    let owner = &secret.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str(),
            owner.controller
        ),
        (
            "BatchSandbox",
            "bs",
            obj.metadata.uid.as_deref().unwrap(),
            Some(true)
        )
    );
    let stored = |s: &Secret| s.data.clone().unwrap()["token"].0.clone();
    assert_eq!(stored(&secret), egress_token.as_bytes());

    // A deleted Secret comes back with the same token.
    env.block(env.secrets().delete("bs-egress-token", &Default::default()))
        .unwrap();
    let back = eventually("secret recreated", Duration::from_secs(20), || {
        env.block(env.secrets().get_opt("bs-egress-token"))
            .unwrap()
            .filter(|s| s.metadata.uid != secret.metadata.uid)
    });
    assert_eq!(stored(&back), egress_token.as_bytes());

    // A token written into the Secret by someone else is put back: the cache shows a version
    // the controller has not checked, so it reads the Secret and rewrites it.
    let tampered = json!({"data": {"token": ByteString(b"chosen-by-someone-else".to_vec())}});
    env.block(env.secrets().patch(
        "bs-egress-token",
        &PatchParams::default(),
        &Patch::Merge(tampered),
    ))
    .unwrap();
    eventually("token restored", Duration::from_secs(20), || {
        let s = env.block(env.secrets().get("bs-egress-token")).unwrap();
        (stored(&s) == egress_token.as_bytes()).then_some(())
    });

    // Restarts and repeated reconciles change nothing.
    drop(first);
    let _second = Controller::start(&env.plane, &[]);
    env.block(env.pods().delete("bs-0", &Default::default()))
        .unwrap();
    let recreated = eventually("pod recreated", Duration::from_secs(20), || {
        env.block(env.pods().get_opt("bs-0"))
            .unwrap()
            .filter(|p| p.metadata.uid != pod.metadata.uid)
    });
    std::thread::sleep(Duration::from_secs(1));
    let ann = env.get("bs").unwrap().metadata.annotations.unwrap();
    assert_eq!(ann["opensandbox.io/secure-access-token"], token);
    assert_eq!(ann["opensandbox.io/egress-auth-token"], egress_token);
    assert_fenced(&recreated, "bs-egress-token", &[&token, &egress_token]);
    let kept = env.block(env.secrets().get("bs-egress-token")).unwrap();
    assert_eq!(kept.metadata.uid, back.metadata.uid);
    assert_eq!(stored(&kept), egress_token.as_bytes());
}

/// Each template the fence refuses, by BatchSandbox name: (template spec, condition reason,
/// the field the condition and the event must name).
fn refused_templates() -> Vec<(&'static str, Value, &'static str, &'static str)> {
    let main = |extra: Value| {
        let mut c = json!({"name": "main", "image": "sandbox:latest"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let setup = json!({"name": "setup", "image": "sandbox:latest"});
    vec![
        (
            "privileged",
            json!({"containers": [main(json!({"securityContext": {"privileged": true}}))]}),
            "PrivilegedContainer",
            "spec.template.spec.containers[0].securityContext.privileged",
        ),
        (
            "init-privileged",
            json!({"initContainers": [main(json!({"name": "setup", "securityContext": {"privileged": true}}))],
                "containers": [main(json!({}))]}),
            "PrivilegedContainer",
            "spec.template.spec.initContainers[0].securityContext.privileged",
        ),
        (
            "cap-sys-admin",
            json!({"initContainers": [setup.clone(), main(json!({"name": "more", "securityContext": {"capabilities": {"add": ["cap_sys_admin"]}}}))],
                "containers": [main(json!({}))]}),
            "ForbiddenCapability",
            "spec.template.spec.initContainers[1].securityContext.capabilities.add[0]",
        ),
        (
            "cap-all",
            json!({"containers": [main(json!({"securityContext": {"capabilities": {"add": ["SYS_PTRACE", "all"]}}}))]}),
            "ForbiddenCapability",
            "spec.template.spec.containers[0].securityContext.capabilities.add[1]",
        ),
        (
            "cap-net-admin",
            json!({"containers": [main(json!({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}))]}),
            "ForbiddenCapability",
            "spec.template.spec.containers[0].securityContext.capabilities.add[0]",
        ),
        (
            "cap-net-raw",
            json!({"containers": [main(json!({"securityContext": {"capabilities": {"add": ["CAP_NET_RAW"]}}}))]}),
            "ForbiddenCapability",
            "spec.template.spec.containers[0].securityContext.capabilities.add[0]",
        ),
        (
            "host-network",
            json!({"hostNetwork": true, "containers": [main(json!({}))]}),
            "HostNetwork",
            "spec.template.spec.hostNetwork",
        ),
        (
            "host-pid",
            json!({"hostPID": true, "containers": [main(json!({}))]}),
            "HostPID",
            "spec.template.spec.hostPID",
        ),
        (
            "shared-pid",
            json!({"shareProcessNamespace": true, "containers": [main(json!({}))]}),
            "SharedProcessNamespace",
            "spec.template.spec.shareProcessNamespace",
        ),
        (
            "named-egress",
            json!({"containers": [main(json!({})), main(json!({"name": "egress"}))]}),
            "ReservedContainerName",
            "spec.template.spec.containers[1].name",
        ),
        (
            "init-named-egress",
            json!({"initContainers": [main(json!({"name": "egress"}))], "containers": [main(json!({}))]}),
            "ReservedContainerName",
            "spec.template.spec.initContainers[0].name",
        ),
        (
            "state-volume",
            json!({"volumes": [{"name": "egress-state", "emptyDir": {}}], "containers": [main(json!({}))]}),
            "ReservedVolumeName",
            "spec.template.spec.volumes[0].name",
        ),
        (
            "state-mount",
            json!({"volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [main(json!({"volumeMounts": [{"name": "data", "mountPath": "/var/egress/state/"}]}))]}),
            "ReservedMount",
            "spec.template.spec.containers[0].volumeMounts[0].mountPath",
        ),
        (
            "state-mount-name",
            json!({"initContainers": [main(json!({"name": "setup", "volumeMounts": [{"name": "egress-state", "mountPath": "/state"}]}))],
                "containers": [main(json!({}))]}),
            "ReservedMount",
            "spec.template.spec.initContainers[0].volumeMounts[0].name",
        ),
    ]
}

/// Every template of [`refused_templates`] and a planted Secret are refused: no pod, a
/// condition and one event naming the field, no hot loop; fixing the template lifts it.
fn fence_refusals(env: &Env, controller: &Controller) {
    // A Secret of the reserved name that the BatchSandbox does not control.
    let planted: Secret = serde_json::from_value(json!({
        "metadata": {"name": "planted-egress-token"},
        "stringData": {"token": "chosen-by-someone-else"},
    }))
    .unwrap();
    env.block(env.secrets().create(&PostParams::default(), &planted))
        .unwrap();
    let policy = json!({"opensandbox.io/network-policy": POLICY});
    let cases = refused_templates();
    for (name, spec, _, _) in &cases {
        env.create(
            name,
            json!({"replicas": 1, "template": {"spec": spec}}),
            policy.clone(),
        )
        .unwrap();
    }
    env.create(
        "planted",
        json!({"replicas": 1, "template": fenced_template()}),
        policy.clone(),
    )
    .unwrap();
    // The same templates without egress are not the fence's business.
    env.create(
        "no-egress",
        json!({"replicas": 1, "template": {"spec": cases[0].1}}),
        json!({}),
    )
    .unwrap();

    let condition = |name: &str| {
        eventually(&format!("{name} Failed"), Duration::from_secs(30), || {
            let status = env.get(name)?.data["status"].clone();
            (status["phase"] == "Failed").then_some(())?;
            status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PodFailed" && c["status"] == "True")
                .cloned()
        })
    };
    let mut expected: Vec<(&str, &str, String)> = cases
        .iter()
        .map(|(name, _, reason, field)| (*name, *reason, (*field).to_owned()))
        .collect();
    expected.push((
        "planted",
        "ForeignEgressSecret",
        "\"planted-egress-token\"".into(),
    ));
    for (name, reason, field) in &expected {
        let c = condition(name);
        let message = c["message"].as_str().unwrap();
        assert_eq!(c["reason"], *reason, "{name}: {c}");
        assert!(message.contains(field.as_str()), "{name}: {message}");
        let notes = eventually(&format!("{name} event"), Duration::from_secs(10), || {
            let notes: Vec<String> = env
                .event_notes(&env.ns, reason)
                .into_iter()
                .filter(|(about, _)| about == name)
                .map(|(_, note)| note)
                .collect();
            (!notes.is_empty()).then_some(notes)
        });
        assert!(
            notes.iter().all(|n| n.contains(field.as_str())),
            "{name}: {notes:?}"
        );
    }
    let c = condition("cap-sys-admin");
    assert_eq!(
        c["message"],
        r#"spec.template.spec.initContainers[1].securityContext.capabilities.add[0]: "cap_sys_admin" would let the sandbox undo the egress fence"#
    );
    eventually("the pod without egress", Duration::from_secs(20), || {
        (env.pod_names("no-egress").len() == 1).then_some(())
    });

    // No pod, no Secret for a refused template; the planted Secret is left as it was.
    for (name, _, _) in &expected {
        assert_eq!(
            env.pod_names(name),
            Vec::<String>::new(),
            "{name} got a pod"
        );
    }
    let secrets = env.block(env.secrets().list(&Default::default())).unwrap();
    let names: Vec<_> = secrets
        .items
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(names, ["planted-egress-token"]);
    assert_eq!(
        secrets.items[0].data.clone().unwrap()["token"].0,
        b"chosen-by-someone-else"
    );
    assert_eq!(secrets.items[0].metadata.owner_references, None);

    // Refusals settle: no hot loop, one event each.
    // A slow retry each, and the passes their own status writes trigger, may fall into the
    // window; a hot loop would be hundreds.
    let before = controller.metric("sandbox_controller_reconciles_total");
    std::thread::sleep(Duration::from_secs(2));
    let during = controller.metric("sandbox_controller_reconciles_total") - before;
    assert!(
        during <= 3.0 * expected.len() as f64,
        "{during} reconciles in 2 s of {} refusals",
        expected.len()
    );
    for (name, reason, _) in &expected {
        let count = env
            .event_notes(&env.ns, reason)
            .iter()
            .filter(|(about, _)| about == name)
            .count();
        assert_eq!(count, 1, "{name}: one Warning event per refusal");
    }

    // Fixing the template lifts the refusal.
    env.patch_spec(
        "host-network",
        json!({"template": {"spec": {"hostNetwork": false}}}),
    );
    eventually(
        "fixed template gets its pod",
        Duration::from_secs(20),
        || (env.pod_names("host-network").len() == 1).then_some(()),
    );
}

#[test]
fn standby_takes_over_when_the_leader_dies() {
    let env = Env::new("leader");
    let mut a = Controller::start(&env.plane, &["--identity", "a"]);
    eventually("a leads", Duration::from_secs(20), || {
        a.log_text().contains("became leader").then_some(())
    });
    let b = Controller::start(&env.plane, &["--identity", "b"]);
    env.create(
        "first",
        json!({"replicas": 1, "template": template()}),
        json!({}),
    )
    .unwrap();
    eventually("leader reconciles", Duration::from_secs(20), || {
        (env.pod_names("first").len() == 1).then_some(())
    });
    // Longer than a lease (3 s): a live leader keeps renewing, so the standby never takes over.
    std::thread::sleep(Duration::from_secs(4));
    assert!(!b.log_text().contains("became leader"), "{}", b.log_text());
    assert_eq!(b.metric("sandbox_controller_leader"), 0.0);
    assert_eq!(
        b.metric("sandbox_controller_reconciles_total"),
        0.0,
        "the standby reconciled while the leader lived"
    );
    assert_eq!(a.metric("sandbox_controller_leader"), 1.0);
    let _ = a.child.kill();
    let _ = a.child.wait();
    let killed = Instant::now();
    env.create(
        "second",
        json!({"replicas": 1, "template": template()}),
        json!({}),
    )
    .unwrap();
    eventually("standby reconciles", Duration::from_secs(20), || {
        (env.pod_names("second").len() == 1).then_some(())
    });
    let took = killed.elapsed();
    // The lease runs out at most 3 s after the kill; the standby tries every 0.6 s.
    assert!(
        took < Duration::from_secs(8),
        "takeover took {took:?} with a 3 s lease"
    );
    assert!(b.log_text().contains("became leader"));
    eprintln!("standby took over after {took:?}");
}

#[test]
fn thousand_sandboxes() {
    let env = Env::new("many");
    let controller = Controller::start(&env.plane, &[]);
    let n = 1000;
    let start = Instant::now();
    env.plane.create_many(&env.ns, n, |i| {
        json!({
            "metadata": {"name": format!("sb-{i:04}")},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:latest"}]}}},
        })
    });
    let poll = Duration::from_millis(500);
    eventually_every("all pods created", Duration::from_secs(120), poll, || {
        let pods = env
            .block(
                env.pods()
                    .list_metadata(&ListParams::default().labels(LABEL_NAME)),
            )
            .unwrap();
        (pods.items.len() == n).then_some(())
    });
    let created = start.elapsed();
    env.block(async {
        use futures::StreamExt;
        futures::stream::iter(0..n)
            .map(|i| {
                let pods = env.pods();
                async move {
                    let ip = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "conditions": [{"type": "Ready", "status": "True"}]}});
                    pods.patch_status(&format!("sb-{i:04}-0"), &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    });
    let ip_of = |name: &str| {
        let i: usize = name.strip_prefix("sb-")?.parse().ok()?;
        Some(format!("127.1.{}.{}", i / 250, i % 250 + 1))
    };
    eventually_every(
        "all annotated and ready",
        Duration::from_secs(120),
        poll,
        || {
            let list = env.block(env.boxes().list(&Default::default())).unwrap();
            let done = list
                .items
                .iter()
                .filter(|o| {
                    let want = ip_of(o.metadata.name.as_deref().unwrap_or_default())
                        .map(|ip| format!(r#"["{ip}"]"#));
                    let published = o
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get("sandbox.opensandbox.io/endpoints"));
                    o.data["status"]["ready"] == 1 && want.is_some() && published == want.as_ref()
                })
                .count();
            (done == n).then_some(())
        },
    );
    let health = controller.health;
    let metrics = support::client::blocking_get(health, "/metrics")
        .unwrap()
        .body_text();
    assert!(
        metrics.contains("sandbox_controller_pending_objects"),
        "backlog metric missing"
    );
    assert!(metrics.contains("sandbox_controller_reconcile_duration_seconds_bucket"));
    assert_eq!(
        support::client::blocking_get(health, "/readyz")
            .unwrap()
            .status,
        200
    );
    eprintln!(
        "1000 BatchSandboxes: pods created after {created:?}, all ready and annotated after {:?}",
        start.elapsed()
    );
}

/// RFC 3339 of now plus `secs`.
fn at(secs: i64) -> String {
    (k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .to_string()
}

/// Seconds from now to the object's `spec.expireTime`.
fn expires_in(obj: &DynamicObject) -> i64 {
    let t: k8s_openapi::jiff::Timestamp = obj.data["spec"]["expireTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    t.duration_since(k8s_openapi::jiff::Timestamp::now())
        .as_secs()
}

const RENEW_KEY: &str = "opensandbox:renew:intent";

#[test]
fn renew_on_access_closes_the_loop() {
    let env = Env::new("renew");
    let redis = support::redis::Redis::start();
    let dsn = redis.dsn();
    let controller = Controller::start(
        &env.plane,
        &["--renew-intent-enabled", "--renew-intent-redis-dsn", &dsn],
    );
    let extend = "opensandbox.io/access-renew-extend-seconds";
    let later = at(300);
    for (name, annotations) in [
        ("opted", json!({extend: "600"})),
        ("plain", json!({})),
        ("short", json!({extend: "30"})),
        ("words", json!({extend: "ten minutes"})),
    ] {
        env.create(
            name,
            json!({"replicas": 1, "template": template(), "expireTime": later}),
            annotations,
        )
        .unwrap();
    }
    let upstream = support::upstream::Upstream::start(support::unique_loopback(), 0);
    let (ip, port) = (upstream.addr.ip().to_string(), upstream.addr.port());
    for name in ["opted", "plain", "short", "words"] {
        let pod = format!("{name}-0");
        eventually(&format!("pod {pod}"), Duration::from_secs(20), || {
            env.pod_names(name).contains(&pod).then_some(())
        });
        env.kubelet_ready(&pod, &ip);
    }
    let gw = support::kube_gateway(
        &env.plane.kubeconfig,
        "batchsandbox",
        GatewayOptions {
            extra: vec![
                "--renew-intent-enabled".into(),
                "--renew-intent-redis-dsn".into(),
                dsn.clone(),
            ],
            ..Default::default()
        },
    );
    gw.wait_ready();
    let route = |name: &str| {
        eventually(&format!("{name} routed"), Duration::from_secs(20), || {
            let r = get(
                gw.addr,
                "/",
                &[("Host", &format!("{name}-{port}.sandbox.test"))],
            );
            (r.status == 200).then_some(())
        })
    };
    // Expiry 20 s away, then a request through the gateway.
    env.patch_spec("opted", json!({"expireTime": at(20)}));
    let before = expires_in(&env.get("opted").unwrap());
    assert!(before <= 20, "{before}");
    for name in ["opted", "plain", "short", "words"] {
        route(name);
    }
    let renewed = eventually("opted renewed", Duration::from_secs(15), || {
        let left = expires_in(&env.get("opted")?);
        (left > 60).then_some(left)
    });
    assert!(
        (590..=601).contains(&renewed),
        "now + 600 s expected, {renewed} s left"
    );
    // The patch is visible before the events and the counters: wait for them, then hold the
    // counters to exact values.
    let counted = |outcome: &str, reason: &str| {
        controller
            .try_metric(&format!(
                "sandbox_controller_renew_intents_total{{outcome=\"{outcome}\",reason=\"{reason}\"}}"
            ))
            .unwrap_or(0.0)
    };
    let ignored = |reason: &str| counted("ignored", reason);
    eventually("intents counted", Duration::from_secs(10), || {
        (counted("renewed", "") >= 1.0
            && counted("ignored", "not_opted_in") >= 1.0
            && counted("ignored", "invalid_annotation") >= 2.0)
            .then_some(())
    });
    assert_eq!(counted("renewed", ""), 1.0);
    assert_eq!(ignored("not_opted_in"), 1.0);
    assert_eq!(ignored("invalid_annotation"), 2.0);
    // Opted in with a bad extension: an event each, posted in the background.
    eventually(
        "both bad extensions reported",
        Duration::from_secs(10),
        || {
            let notes = env.event_notes("renew", "InvalidRenewExtension");
            let about = |name: &str, says: &str| {
                notes
                    .iter()
                    .any(|(about, n)| about == name && n.contains(says))
            };
            (about("short", "outside 300..86400") && about("words", "not a whole number"))
                .then_some(())
        },
    );
    // Not opted in, or opted in with a bad extension: untouched.
    for name in ["plain", "short", "words"] {
        assert_eq!(
            env.get(name).unwrap().data["spec"]["expireTime"],
            later.as_str()
        );
    }

    // What a bad or stray entry of the list does: skipped and counted, nothing patched.
    let expire_before = env.get("opted").unwrap().data["spec"]["expireTime"].clone();
    redis.push(RENEW_KEY, "not json");
    redis.push(
        RENEW_KEY,
        r#"{"sandbox_id":"opted","observed_at":"yesterday"}"#,
    );
    redis.push(
        RENEW_KEY,
        &format!(r#"{{"sandbox_id":"ghost","observed_at":"{}"}}"#, at(0)),
    );
    redis.push(
        RENEW_KEY,
        &format!(r#"{{"sandbox_id":"opted","observed_at":"{}"}}"#, at(-600)),
    );
    // Within five minutes but earlier than the last: never shortens.
    redis.push(
        RENEW_KEY,
        &format!(r#"{{"sandbox_id":"opted","observed_at":"{}"}}"#, at(-240)),
    );
    eventually("bad entries counted", Duration::from_secs(10), || {
        (counted("malformed", "") == 2.0
            && ignored("unknown_sandbox") == 1.0
            && ignored("stale") == 1.0
            && ignored("already_later") == 1.0)
            .then_some(())
    });
    assert_eq!(
        env.get("opted").unwrap().data["spec"]["expireTime"],
        expire_before
    );
    assert_eq!(redis.len(RENEW_KEY), 0);
    // An observed_at a day ahead (a forged entry, a skewed clock) counts as now: the expiry
    // goes no further than now + 600 s.
    let handled = || counted("renewed", "") + ignored("already_later");
    let before = handled();
    let future = format!(r#"{{"sandbox_id":"opted","observed_at":"{}"}}"#, at(86_400));
    redis.push(RENEW_KEY, &future);
    eventually("future intent handled", Duration::from_secs(10), || {
        (handled() == before + 1.0).then_some(())
    });
    let left = expires_in(&env.get("opted").unwrap());
    assert!(
        left <= 601,
        "a future observed_at extended to now + {left} s"
    );
    assert_eq!(controller.metric("sandbox_controller_renew_redis_up"), 1.0);
}

#[test]
fn reference_chart_arguments_start_both_binaries() {
    let env = Env::new("reference");
    let probe = support::free_port();
    // The reference chart's controller arguments (opensandbox-controller deployment, with
    // every optional value set), the probe port made free.
    let probe_addr = format!("--health-probe-bind-address=:{probe}");
    let nowhere = format!("redis://{}/0", support::redis::Redis::nowhere());
    let controller = Controller::start(
        &env.plane,
        &[
            "--leader-elect",
            &probe_addr,
            "--zap-log-level=info",
            "--kube-client-qps=100",
            "--kube-client-burst=200",
            "--image-committer-image=image-committer:v1",
            "--containerd-socket-path=/run/containerd/containerd.sock",
            "--commit-job-timeout=10m",
            "--snapshot-registry=registry.example.com/snapshots",
            "--snapshot-registry-insecure=true",
            "--snapshot-push-secret=push",
            "--resume-pull-secret=pull",
            // Further reference flags an operator may have added.
            "--metrics-bind-address=0",
            "--metrics-secure=false",
            "--concurrency=batchsandbox=8;pool=16",
            "-enable-file-log",
            "--zap-devel",
            // A Redis that is not there: the controller runs and says so.
            "--renew-intent-enabled",
            "--renew-intent-redis-dsn",
            &nowhere,
        ],
    );
    assert_eq!(controller.health.port(), probe);
    eventually("leader", Duration::from_secs(20), || {
        controller
            .log_text()
            .contains("became leader")
            .then_some(())
    });
    let log = controller.log_text();
    for flag in [
        "--image-committer-image",
        "--containerd-socket-path",
        "--commit-job-timeout",
        "--snapshot-registry",
        "--snapshot-registry-insecure",
        "--snapshot-push-secret",
        "--resume-pull-secret",
        "--metrics-secure",
        "--enable-file-log",
        "--zap-devel",
    ] {
        let lines = log
            .lines()
            .filter(|l| {
                l.contains("flag accepted and ignored") && l.contains(&format!("\"{flag}\""))
            })
            .count();
        assert_eq!(lines, 1, "{flag} logged {lines} times:\n{log}");
    }
    assert!(log.contains("\"controller\":\"pool\""), "{log}");
    eventually("Redis down reported", Duration::from_secs(10), || {
        controller
            .log_text()
            .contains("Redis unavailable")
            .then_some(())
    });
    assert_eq!(controller.metric("sandbox_controller_renew_redis_up"), 0.0);
    assert!(
        log.contains("\"listener\":\"metrics\"") && log.contains("listener off"),
        "{log}"
    );
    // It still does its job.
    env.create(
        "bs",
        json!({"replicas": 1, "template": template()}),
        json!({}),
    )
    .unwrap();
    eventually("pod", Duration::from_secs(20), || {
        (env.pod_names("bs") == ["bs-0"]).then_some(())
    });
    // A spec asking for a feature not built here gets a condition, not pods.
    env.create(
        "pooled",
        json!({"replicas": 1, "poolRef": "warm-pool", "template": template()}),
        json!({}),
    )
    .unwrap();
    let condition = eventually(
        "UnsupportedFeature condition",
        Duration::from_secs(20),
        || {
            let o = env.get("pooled")?;
            o.data["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["reason"] == "UnsupportedFeature")
                .cloned()
        },
    );
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("spec.poolRef"),
        "{condition}"
    );
    assert!(env.pod_names("pooled").is_empty());

    // The reference chart's gateway arguments (opensandbox-server ingress-gateway), with the
    // renew flags of the reference's README; the listen address made the test's own.
    let redis = support::redis::Redis::start();
    let ip = support::unique_loopback();
    let keys = "a=c2VjcmV0LWtleS1ieXRlcy0zMg==";
    let mut gw = std::process::Command::new(support::gateway_binary())
        .args([
            "--namespace=opensandbox",
            "--port=28888",
            "--provider-type=batchsandbox",
            "--mode=header",
            "--log-level=info",
            &format!("--secure-access-keys={keys}"),
            "--renew-intent-enabled",
            "--renew-intent-redis-dsn",
            &redis.dsn(),
            "--renew-intent-min-interval",
            "120",
        ])
        .args(["--bind", &ip.to_string(), "--metrics-port", "28889"])
        .args(["--allowed-upstream-cidrs", "127.0.0.0/8"])
        .arg("--kubeconfig")
        .arg(&env.plane.kubeconfig)
        .env_remove("KUBECONFIG")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let metrics = std::net::SocketAddr::new(ip, 28889);
    let ready = eventually("gateway ready", Duration::from_secs(20), || {
        support::client::blocking_get(metrics, "/readyz")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert_eq!(ready.status, 200);
    let probe = get(std::net::SocketAddr::new(ip, 28888), "/status.ok", &[]);
    assert_eq!(probe.status, 200);
    let _ = gw.kill();
    let _ = gw.wait();
}
