"""The chart rendered and linted by real Helm (helm-python-sdk): defaults, every documented
combination, the schema's refusals, contradictions that fail the render, and the gateway's
pod hardening. Installing into a real API server is tested by controller/tests/chart.rs."""

from pathlib import Path

import pytest
import yaml
from helm_python import Chart, HelmRenderError, HelmValuesError, lint

CHART = Path(__file__).resolve().parents[1] / "opensandbox"
NAMESPACE = "sandbox-system"


@pytest.fixture(scope="module")
def chart():
    return Chart.load(str(CHART))


def render(chart, values=None):
    """All objects of a render, as (template, object) pairs."""
    out = chart.render(values or {}, name="os", namespace=NAMESPACE)
    objects = []
    for template, text in out.items():
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects):
    return sorted(o["kind"] for o in objects)


def gateway_container(objects, kind="DaemonSet"):
    return one(objects, kind)["spec"]["template"]["spec"]["containers"][0]


def test_lint_strict_is_clean():
    report = lint(str(CHART), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


def test_defaults(chart):
    objects = render(chart)
    assert kinds(objects) == sorted([
        "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
        "CustomResourceDefinition", "DaemonSet", "Deployment", "PodDisruptionBudget",
        "Role", "RoleBinding", "Service", "Service", "Service", "ServiceAccount", "ServiceAccount",
    ])
    ds = one(objects, "DaemonSet")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = ds["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 25
    args = pod["containers"][0]["args"]
    assert "--mode=header" in args and "--provider-type=batchsandbox" in args
    assert "--port=28888" in args
    assert "--max-signed-route-lifetime=604800" in args
    probes = pod["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/status.ok"
    svc = one(objects, "Service", "os-opensandbox-gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "proxy", "protocol": "TCP"}]
    crd = one(objects, "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "batchsandboxes.sandbox.opensandbox.io"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    controller = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--egress-image=localhost/opensandbox/egress-sidecar:0.1.0" in controller["args"]
    assert "--egress-mode=dns+nft" in controller["args"]
    assert "--leader-elect=true" in controller["args"]


def test_gateway_rbac_is_read_only_batchsandboxes(chart):
    role = one(render(chart), "ClusterRole", "os-opensandbox-gateway")
    assert role["rules"] == [{
        "apiGroups": ["sandbox.opensandbox.io"], "resources": ["batchsandboxes"],
        "verbs": ["get", "list", "watch"],
    }]


@pytest.mark.parametrize("providers,groups,flag", [
    ("agent-sandbox", ["agents.x-k8s.io"], "agent-sandbox"),
    ("both", ["sandbox.opensandbox.io", "agents.x-k8s.io"], "batchsandbox,agent-sandbox"),
])
def test_providers(chart, providers, groups, flag):
    objects = render(chart, {"gateway": {"providers": providers}})
    role = one(objects, "ClusterRole", "os-opensandbox-gateway")
    assert [r["apiGroups"][0] for r in role["rules"]] == groups
    assert all(r["verbs"] == ["get", "list", "watch"] for r in role["rules"])
    assert f"--provider-type={flag}" in gateway_container(objects)["args"]


def test_namespaced_gateway_gets_roles_not_a_cluster_role(chart):
    objects = render(chart, {"gateway": {"namespaces": ["team-a", "team-b"]}})
    roles = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "os-opensandbox-gateway"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "os-opensandbox-gateway"]
    assert "--namespaces=team-a,team-b" in gateway_container(objects)["args"]


def test_deployment_workload(chart):
    objects = render(chart, {"gateway": {"workload": "Deployment", "replicas": 3}})
    assert not [o for o in objects if o["kind"] == "DaemonSet"]
    deploy = one(objects, "Deployment", "os-opensandbox-gateway")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spread = deploy["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "kubernetes.io/hostname"
    assert render(chart, {"gateway": {"workload": "Deployment"}})


def test_cluster_ip_and_node_port(chart):
    svc = one(render(chart, {"gateway": {"service": {"type": "ClusterIP"}}}), "Service", "os-opensandbox-gateway")
    assert svc["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in svc["spec"]
    svc = one(render(chart, {"gateway": {"service": {"type": "NodePort", "nodePort": 30080}}}),
              "Service", "os-opensandbox-gateway")
    assert svc["spec"]["ports"][0]["nodePort"] == 30080


def test_reference_service_name(chart):
    objects = render(chart, {"gateway": {"service": {"name": "opensandbox-ingress-gateway"}}})
    one(objects, "Service", "opensandbox-ingress-gateway")


def test_crds_off(chart):
    objects = render(chart, {"crds": {"install": False}})
    assert not [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    objects = render(chart, {"crds": {"keep": False, "agentSandbox": True}})
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "batchsandboxes.sandbox.opensandbox.io", "sandboxes.agents.x-k8s.io"]
    assert all("helm.sh/resource-policy" not in c["metadata"].get("annotations", {}) for c in crds)


def test_parts_switch_off(chart):
    objects = render(chart, {"gateway": {"enabled": False}})
    assert not [o for o in objects if o["metadata"]["name"].startswith("os-opensandbox-gateway")]
    objects = render(chart, {"controller": {"enabled": False}})
    assert not [o for o in objects if o["metadata"]["name"].startswith("os-opensandbox-controller")]


def test_gateway_pod_is_hardened_and_keys_stay_off_argv(chart):
    key = "c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkw"
    objects = render(chart, {"gateway": {"secureAccess": {"keys": {"a": key}}}})
    ds = one(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert not [a for a in container["args"] if key in a], container["args"]
    assert "--secure-access-keys-file=/etc/opensandbox/keys/keys" in container["args"]
    assert yaml.safe_dump(container).count(key) == 0
    secret = one(objects, "Secret")
    assert secret["stringData"]["keys"].strip() == f"a={key}"
    assert ds["spec"]["template"]["metadata"]["annotations"]["checksum/keys"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    objects = render(chart, {"gateway": {"secureAccess": {"existingSecret": "mine", "existingSecretKey": "k"}}})
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert "--secure-access-keys-file=/etc/opensandbox/keys/k" in pod["containers"][0]["args"]
    assert [v for v in pod["volumes"] if v["name"] == "keys"][0]["secret"]["secretName"] == "mine"
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_front_door_values_become_flags(chart):
    args = gateway_container(render(chart, {}))["args"]
    assert "--signature-failures-per-sandbox-per-minute=600" in args
    assert "--auth-limiter-max-clients=100000" in args
    assert "--initial-list=streaming" in args
    assert not [a for a in args if a.startswith(("--denied-ports", "--proxy-protocol", "--trusted-proxy-cidrs"))]
    args = gateway_container(render(chart, {"gateway": {
        "deniedPorts": ["18080", "9000-9100"],
        "proxyProtocol": True,
        "trustedProxyCidrs": ["10.0.0.0/8", "192.0.2.1"],
    }}))["args"]
    assert "--denied-ports=18080,9000-9100" in args
    assert "--proxy-protocol=true" in args
    assert "--trusted-proxy-cidrs=10.0.0.0/8,192.0.2.1" in args


def test_tls_secrets_are_mounted_and_served_on_their_own_port(chart):
    objects = render(chart, {})
    gateway = gateway_container(objects)
    assert not [a for a in gateway["args"] if a.startswith(("--tls-", "--tls-port"))]
    assert [p["name"] for p in gateway["ports"]] == ["proxy", "metrics"]
    assert "--http2=true" in gateway["args"] and "--h2c=true" in gateway["args"]
    assert "--h2-max-control-frames-per-second=100" in gateway["args"]
    objects = render(chart, {"gateway": {
        "tls": {"secrets": ["sandbox-wildcard", "apex.example"]},
        "http2": {"maxConcurrentStreams": 250, "maxControlFramesPerSecond": 0},
    }})
    ds = one(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    args = gateway["args"]
    assert "--tls-port=28443" in args
    # Pairs in order: each certificate followed by its key, the first the default.
    pairs = [a for a in args if a.startswith(("--tls-cert-file", "--tls-key-file"))]
    assert pairs == [
        "--tls-cert-file=/etc/opensandbox/tls/sandbox-wildcard/tls.crt",
        "--tls-key-file=/etc/opensandbox/tls/sandbox-wildcard/tls.key",
        "--tls-cert-file=/etc/opensandbox/tls/apex.example/tls.crt",
        "--tls-key-file=/etc/opensandbox/tls/apex.example/tls.key",
    ]
    assert "--h2-max-concurrent-streams=250" in args
    assert "--h2-max-control-frames-per-second=0" in args
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert mounts["tls-0"] == {"name": "tls-0", "mountPath": "/etc/opensandbox/tls/sandbox-wildcard", "readOnly": True}
    assert "subPath" not in mounts["tls-1"], "a subPath mount never sees a renewed Secret"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls-1"]["secret"]["secretName"] == "apex.example"
    assert volumes["tls-1"]["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert {"name": "proxy-tls", "containerPort": 28443, "protocol": "TCP"} in gateway["ports"]
    svc = one(objects, "Service", "os-opensandbox-gateway")
    assert {"name": "https", "port": 443, "targetPort": "proxy-tls", "protocol": "TCP"} in svc["spec"]["ports"]
    # No certificate material is in the render: the Secrets are the operator's (or cert-manager's).
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_renew_intent_values_become_flags_and_the_password_stays_off_argv(chart):
    objects = render(chart, {})
    assert not [a for a in gateway_container(objects)["args"] if "renew-intent" in a]
    objects = render(chart, {"renewIntent": {
        "enabled": True, "redisDsn": "redis://redis.cache:6380/2", "queueMaxLen": 1000,
        "minIntervalSeconds": 30, "passwordSecret": "redis-auth",
    }})
    gateway = gateway_container(objects)
    for flag in ["--renew-intent-enabled=true", "--renew-intent-redis-dsn=redis://redis.cache:6380/2",
                 "--renew-intent-queue-key=opensandbox:renew:intent", "--renew-intent-queue-max-len=1000",
                 "--renew-intent-min-interval=30"]:
        assert flag in gateway["args"], gateway["args"]
    controller = one(objects, "Deployment", "os-opensandbox-controller")["spec"]["template"]["spec"]["containers"][0]
    assert "--renew-intent-enabled=true" in controller["args"]
    assert "--renew-intent-redis-dsn=redis://redis.cache:6380/2" in controller["args"]
    for container in (gateway, controller):
        env = {e["name"]: e for e in container["env"]}
        assert env["OPENSANDBOX_RENEW_INTENT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
            {"name": "redis-auth", "key": "password"}


@pytest.mark.parametrize("values,where", [
    ({"gateway": {"mode": "path"}}, "/gateway/mode"),
    ({"gateway": {"workload": "StatefulSet"}}, "/gateway/workload"),
    ({"gateway": {"replicas": -1, "workload": "Deployment"}}, "/gateway/replicas"),
    ({"controller": {"replicas": -2}}, "/controller/replicas"),
    ({"gateway": {"service": {"type": "ExternalName"}}}, "/gateway/service/type"),
    ({"gateway": {"providers": "pods"}}, "/gateway/providers"),
    ({"gateway": {"port": 70000}}, "/gateway/port"),
    ({"gateway": {"secureAccess": {"keys": {"AB": "x"}}}}, "/gateway/secureAccess/keys"),
    ({"gateway": {"allowedUpstreamCidrs": ["10.0.0.0"]}}, "/gateway/allowedUpstreamCidrs/0"),
    ({"controller": {"egress": {"mode": "nft"}}}, "/controller/egress/mode"),
    ({"gateway": {"initialList": "watch"}}, "/gateway/initialList"),
    ({"gateway": {"deniedPorts": ["0"]}}, "/gateway/deniedPorts/0"),
    ({"gateway": {"deniedPorts": ["80,81"]}}, "/gateway/deniedPorts/0"),
    ({"gateway": {"trustedProxyCidrs": ["lb"]}}, "/gateway/trustedProxyCidrs/0"),
    ({"gateway": {"proxyProtocol": "yes"}}, "/gateway/proxyProtocol"),
    ({"gateway": {"authLimiterMaxClients": 0}}, "/gateway/authLimiterMaxClients"),
    ({"renewIntent": {"redisDsn": "http://redis:6379"}}, "/renewIntent/redisDsn"),
    ({"renewIntent": {"minIntervalSeconds": -1}}, "/renewIntent/minIntervalSeconds"),
    ({"gateway": {"tls": {"secrets": ["Bad_Name"]}}}, "/gateway/tls/secrets/0"),
    ({"gateway": {"tls": {"secrets": ["a", "a"]}}}, "/gateway/tls/secrets"),
    ({"gateway": {"http2": {"maxConcurrentStreams": 0}}}, "/gateway/http2/maxConcurrentStreams"),
    ({"gateway": {"http2": {"streamWindow": 100}}}, "/gateway/http2/streamWindow"),
    ({"gateway": {"http2": {"maxControlFramesPerSecond": -1}}}, "/gateway/http2/maxControlFramesPerSecond"),
    ({"gatway": {}}, "gatway"),
])
def test_schema_refuses_bad_values(chart, values, where):
    with pytest.raises(HelmValuesError) as refused:
        chart.validate_schema(values)
    assert where in str(refused.value), str(refused.value)


@pytest.mark.parametrize("values,message", [
    ({"gateway": {"replicas": 3}}, "gateway.replicas applies to workload: Deployment only"),
    ({"gateway": {"topologySpreadConstraints": [{"maxSkew": 1}]}}, "gateway.topologySpreadConstraints"),
    ({"gateway": {"secureAccess": {"keys": {"a": "AAAA"}, "existingSecret": "mine"}}},
     "gateway.secureAccess: set keys or existingSecret, not both"),
    ({"gateway": {"terminationGracePeriodSeconds": 20}}, "gateway.terminationGracePeriodSeconds (20)"),
    ({"gateway": {"service": {"nodePort": 30080}}}, "gateway.service.nodePort is set"),
    ({"gateway": {"service": {"type": "ClusterIP", "loadBalancerSourceRanges": ["10.0.0.0/8"]}}},
     "gateway.service.loadBalancerSourceRanges needs"),
    ({"gateway": {"tls": {"secrets": ["c"], "nodePort": 30443}}}, "gateway.tls.nodePort is set"),
    ({"gateway": {"tls": {"secrets": ["c"], "port": 28888}}}, "gateway.tls.port (28888) must differ"),
    ({"gateway": {"http2": {"enabled": False}}}, "gateway.http2.h2c needs gateway.http2.enabled"),
    ({"monitoring": {"prometheusRule": {"enabled": True}}}, "monitoring.coreos.com/v1"),
    ({"gateway": {"serviceMonitor": {"enabled": True}}}, "install the Prometheus Operator's CRDs first"),
])
def test_contradictions_fail_the_render(chart, values, message):
    with pytest.raises(HelmRenderError) as refused:
        render(chart, values)
    assert message in str(refused.value), str(refused.value)


def test_alerts_and_dashboard_are_well_formed():
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    alerts = [r for g in groups for r in g["rules"]]
    assert len(alerts) >= 9
    for rule in alerts:
        assert rule["alert"].startswith("OpenSandbox") and rule["expr"] and rule["for"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
    import json
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
