//! The Helm chart installed by real Helm (helm-python-sdk, `charts/tests/release.py`) into a
//! real kube-apiserver: every object made; the gateway's and the controller's ServiceAccounts
//! allowed what they need and refused the rest; the controller and the gateway working end to
//! end on those accounts' own tokens; monitoring refused until its CRDs exist; upgrade and
//! uninstall (the CRD kept).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
#[path = "../../gateway/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::GatewayOptions;
use support::client::get;
use support::k8s::{ControlPlane, batch_resource};

use harness::{Controller, eventually};

/// Where the release lives.
const NS: &str = "opensandbox-system";
const RELEASE: &str = "os";
/// Where sandboxes live.
const SANDBOXES: &str = "sandboxes";
const GATEWAY: &str = "os-opensandbox-gateway";
const CONTROLLER: &str = "os-opensandbox-controller";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The project's virtualenv with real Helm, made (or reused) by `scripts/python-env.sh`.
fn python() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "python-env.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let venv = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(venv.lines().last().unwrap().trim()).join("bin/python")
}

/// One Helm action: the release (or rendered templates) as JSON, or Helm's message.
fn helm(plane: &ControlPlane, action: &str, values: Value) -> Result<Value, String> {
    let out = Command::new(python())
        .arg(repo_root().join("charts/tests/release.py"))
        .arg(action)
        .arg(&plane.kubeconfig)
        .args([NS, RELEASE])
        .arg(values.to_string())
        .output()
        .expect("run release.py");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A kubeconfig holding a fresh token of ServiceAccount `name` in the release namespace.
fn account_kubeconfig(plane: &ControlPlane, dir: &Path, name: &str) -> PathBuf {
    let accounts: Api<ServiceAccount> = Api::namespaced(plane.client.clone(), NS);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600},
    }))
    .unwrap();
    let issued = plane
        .runtime
        .block_on(accounts.create_token_request(name, &PostParams::default(), &request))
        .unwrap();
    let token = issued.status.unwrap().token.unwrap();
    let path = dir.join(format!("{name}.kubeconfig"));
    plane.write_kubeconfig(&path, &token);
    path
}

/// The status code of a refused request, or 0 when it was allowed.
fn refused<T>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Ok(_) => 0,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => panic!("not an API answer: {e}"),
    }
}

/// PrometheusRules in the release namespace.
fn prometheus_rules(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        NS,
        &kube::api::ApiResource {
            group: "monitoring.coreos.com".into(),
            version: "v1".into(),
            api_version: "monitoring.coreos.com/v1".into(),
            kind: "PrometheusRule".into(),
            plural: "prometheusrules".into(),
        },
    )
}

/// The minimal CRDs of the Prometheus Operator's kinds the chart makes.
fn monitoring_crds(plane: &ControlPlane) {
    let crds: Api<CustomResourceDefinition> = Api::all(plane.client.clone());
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PodMonitor", "podmonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com", "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            },
        }))
        .unwrap();
        plane
            .runtime
            .block_on(crds.create(&PostParams::default(), &crd))
            .unwrap();
    }
    // Served once discovery shows the group.
    eventually("monitoring CRDs served", Duration::from_secs(20), || {
        let rules = prometheus_rules(&plane.client);
        plane
            .runtime
            .block_on(rules.list(&ListParams::default()))
            .ok()
    });
}

#[test]
fn chart_installs_with_least_privilege_and_runs_end_to_end() {
    let plane = ControlPlane::start_with_crds(false);
    plane.create_namespace(SANDBOXES);
    let dir = support::TempDir::new();
    let admin = plane.client.clone();
    let rt = &plane.runtime;

    let release = helm(&plane, "install", json!({})).unwrap_or_else(|e| panic!("install: {e}"));
    assert_eq!(release["status"], "deployed", "{}", release["status"]);

    // Every object the defaults make.
    let daemonset: DaemonSet = block_on(&plane, Api::namespaced(admin.clone(), NS).get(GATEWAY));
    let args = daemonset.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--mode=header".to_owned()), "{args:?}");
    let _: Deployment = block_on(&plane, Api::namespaced(admin.clone(), NS).get(CONTROLLER));
    let service: Service = block_on(&plane, Api::namespaced(admin.clone(), NS).get(GATEWAY));
    assert_eq!(service.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));
    for name in [GATEWAY, CONTROLLER] {
        let _: ServiceAccount = block_on(&plane, Api::namespaced(admin.clone(), NS).get(name));
    }
    let crd: CustomResourceDefinition = block_on(
        &plane,
        Api::all(admin.clone()).get("batchsandboxes.sandbox.opensandbox.io"),
    );
    assert_eq!(crd.annotations()["helm.sh/resource-policy"], "keep");

    // The gateway's account: read sandboxes, nothing else.
    let gateway_kc = account_kubeconfig(&plane, dir.path(), GATEWAY);
    let as_gateway = plane.client_for(&gateway_kc);
    let boxes = |c: &Client, ns: Option<&str>| -> Api<DynamicObject> {
        match ns {
            Some(ns) => Api::namespaced_with(c.clone(), ns, &batch_resource()),
            None => Api::all_with(c.clone(), &batch_resource()),
        }
    };
    assert_eq!(
        refused(rt.block_on(boxes(&as_gateway, None).list(&ListParams::default()))),
        0
    );
    let watched = rt.block_on(async {
        let stream = boxes(&as_gateway, None)
            .watch(&WatchParams::default().timeout(1), "0")
            .await?;
        let events: Vec<WatchEvent<DynamicObject>> = stream.try_collect().await?;
        Ok::<_, kube::Error>(events)
    });
    assert!(watched.is_ok(), "gateway cannot watch: {watched:?}");
    let sandbox: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
        "metadata": {"name": "bs"},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:latest"}]}}},
    }))
    .unwrap();
    let secrets = |c: &Client| Api::<Secret>::namespaced(c.clone(), SANDBOXES);
    let pods = |c: &Client| Api::<Pod>::namespaced(c.clone(), SANDBOXES);
    assert_eq!(
        refused(rt.block_on(secrets(&as_gateway).list(&ListParams::default()))),
        403
    );
    assert_eq!(
        refused(rt.block_on(pods(&as_gateway).list(&ListParams::default()))),
        403
    );
    assert_eq!(
        refused(rt.block_on(
            boxes(&as_gateway, Some(SANDBOXES)).create(&PostParams::default(), &sandbox)
        )),
        403
    );

    // The controller's account: pods, its Secrets, events, its lease; no ConfigMaps, no
    // lease elsewhere, no creating sandboxes.
    let controller_kc = account_kubeconfig(&plane, dir.path(), CONTROLLER);
    let as_controller = plane.client_for(&controller_kc);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe"},
        "spec": {"containers": [{"name": "main", "image": "sandbox:latest"}]},
    }))
    .unwrap();
    assert_eq!(
        refused(rt.block_on(pods(&as_controller).create(&PostParams::default(), &pod))),
        0
    );
    assert_eq!(
        refused(rt.block_on(pods(&as_controller).delete("probe", &DeleteParams::default()))),
        0
    );
    assert_eq!(
        refused(
            rt.block_on(
                Api::<ConfigMap>::namespaced(as_controller.clone(), SANDBOXES)
                    .list(&ListParams::default())
            )
        ),
        403
    );
    assert_eq!(
        refused(rt.block_on(
            boxes(&as_controller, Some(SANDBOXES)).create(&PostParams::default(), &sandbox)
        )),
        403
    );
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "someone-else"}})).unwrap();
    assert_eq!(
        refused(
            rt.block_on(
                Api::<Lease>::namespaced(as_controller.clone(), SANDBOXES)
                    .create(&PostParams::default(), &lease)
            )
        ),
        403,
        "a lease outside the release namespace"
    );
    assert_eq!(
        refused(
            rt.block_on(Api::<Lease>::namespaced(as_controller.clone(), NS).get("someone-else"))
        ),
        403,
        "another lease by name"
    );

    // End to end on those accounts' own tokens.
    let controller = Controller::start_with(
        &controller_kc,
        &["--lease-namespace", NS, "--lease-name", CONTROLLER],
    );
    let gateway = support::kube_gateway(&gateway_kc, "batchsandbox", GatewayOptions::default());
    gateway.wait_ready();
    rt.block_on(boxes(&admin, Some(SANDBOXES)).create(&PostParams::default(), &sandbox))
        .unwrap();
    eventually("pod bs-0", Duration::from_secs(20), || {
        rt.block_on(pods(&admin).get_opt("bs-0")).unwrap()
    });
    let upstream = support::upstream::Upstream::start(support::unique_loopback(), 0);
    let ip = upstream.addr.ip().to_string();
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    rt.block_on(pods(&admin).patch_status("bs-0", &PatchParams::default(), &Patch::Merge(status)))
        .unwrap();
    let host = format!("bs-{}.sandbox.test", upstream.addr.port());
    eventually(
        "routed through the gateway",
        Duration::from_secs(20),
        || (get(gateway.addr, "/hello", &[("Host", &host)]).status == 200).then_some(()),
    );
    assert!(
        controller.log_text().contains("controller running"),
        "{}",
        controller.log_text()
    );

    // Every metric the chart's alerts and dashboard query exists on the real binaries: after
    // a refused connection (nothing on port 1) and a refused credential (a token set by hand).
    let refused_port = get(gateway.addr, "/", &[("Host", "bs-1.sandbox.test")]);
    assert_eq!(refused_port.status, 502, "{}", refused_port.body_text());
    rt.block_on(boxes(&admin, Some(SANDBOXES)).patch(
        "bs",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
            "opensandbox.io/secure-access-token": "token-set-by-hand"}}})),
    ))
    .unwrap();
    eventually("credentials required", Duration::from_secs(20), || {
        (get(gateway.addr, "/hello", &[("Host", &host)]).status == 401).then_some(())
    });
    let body = support::client::blocking_get(gateway.metrics, "/metrics")
        .unwrap()
        .body_text();
    support::chart_metrics::assert_exposed("sandbox_gateway_", &body);
    let body = support::client::blocking_get(controller.health, "/metrics")
        .unwrap()
        .body_text();
    support::chart_metrics::assert_exposed("sandbox_controller_", &body);
    drop(gateway);
    drop(controller);

    // Monitoring is refused until the cluster serves its kinds, then made.
    let monitoring = json!({"monitoring": {"prometheusRule": {"enabled": true}}});
    let refusal = helm(&plane, "render", monitoring.clone()).unwrap_err();
    assert!(refusal.contains("monitoring.coreos.com/v1"), "{refusal}");
    monitoring_crds(&plane);
    helm(&plane, "upgrade", monitoring).unwrap_or_else(|e| panic!("upgrade: {e}"));
    let rules = prometheus_rules(&admin);
    let rule = rt.block_on(rules.get("os-opensandbox")).unwrap();
    assert!(
        rule.data["spec"]["groups"].as_array().unwrap().len() >= 3,
        "{:?}",
        rule.data
    );

    // Upgrade with new values, then uninstall: the objects go, the CRD (and so every
    // sandbox) stays.
    helm(&plane, "upgrade", json!({"gateway": {"mode": "uri"}}))
        .unwrap_or_else(|e| panic!("upgrade: {e}"));
    let daemonset: DaemonSet = block_on(&plane, Api::namespaced(admin.clone(), NS).get(GATEWAY));
    let args = daemonset.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&"--mode=uri".to_owned()), "{args:?}");
    helm(&plane, "uninstall", json!({})).unwrap_or_else(|e| panic!("uninstall: {e}"));
    eventually("gateway removed", Duration::from_secs(20), || {
        rt.block_on(Api::<DaemonSet>::namespaced(admin.clone(), NS).get_opt(GATEWAY))
            .unwrap()
            .is_none()
            .then_some(())
    });
    assert!(
        rt.block_on(
            Api::<CustomResourceDefinition>::all(admin.clone())
                .get_opt("batchsandboxes.sandbox.opensandbox.io")
        )
        .unwrap()
        .is_some(),
        "the CRD is kept"
    );
    assert!(
        rt.block_on(boxes(&admin, Some(SANDBOXES)).get_opt("bs"))
            .unwrap()
            .is_some(),
        "sandboxes survive an uninstall"
    );
}

fn block_on<T>(
    plane: &ControlPlane,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> T {
    plane.runtime.block_on(f).unwrap()
}
