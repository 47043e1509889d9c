//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from their Go
//! modules (`scripts/k8s-testenv/build.sh`), started on 127.0.0.1 with free ports, static-token
//! users and RBAC, torn down on drop. The CRDs come from `charts/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{TempDir, free_port};

pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
pub const LIMITED_TOKEN: &str = "limited-token-for-tests";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where kube-apiserver and etcd live: `K8S_TESTENV_DIR`, else whatever the build script
/// prints (it builds once and caches outside the work tree).
fn binaries() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Ok(dir) = std::env::var("K8S_TESTENV_DIR") {
            return PathBuf::from(dir);
        }
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/k8s-testenv/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/k8s-testenv/build.sh");
        assert!(
            out.status.success(),
            "building the test control plane failed"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            text.lines()
                .last()
                .expect("build.sh printed no directory")
                .trim(),
        )
    })
}

pub struct ControlPlane {
    etcd: Child,
    apiserver: Option<Child>,
    pub port: u16,
    etcd_port: u16,
    pub kubeconfig: PathBuf,
    pub limited_kubeconfig: PathBuf,
    pub runtime: tokio::runtime::Runtime,
    pub client: Client,
    pub dir: TempDir,
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    super::eventually(what, limit, || ok().then_some(()));
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and installs the CRDs from `charts/`.
    pub fn start() -> Self {
        Self::start_with_crds(true)
    }

    pub fn start_with_crds(install_crds: bool) -> Self {
        let bin = binaries().clone();
        let dir = TempDir::new();
        let d = dir.path();
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd = Command::new(bin.join("etcd"))
            .args([
                "--data-dir",
                &d.join("etcd").display().to_string(),
                "--unsafe-no-fsync",
                "--log-level",
                "error",
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd");
        let key = d.join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl genrsa failed");
        std::fs::write(
            d.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,1,\"system:masters\"\n{LIMITED_TOKEN},limited,2,\"tests\"\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut plane = ControlPlane {
            etcd,
            apiserver: None,
            port,
            etcd_port,
            kubeconfig: d.join("admin.kubeconfig"),
            limited_kubeconfig: d.join("limited.kubeconfig"),
            client: runtime.block_on(async {
                Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap()
            }),
            runtime,
            dir,
        };
        plane.start_apiserver();
        plane.write_kubeconfig(&plane.kubeconfig.clone(), ADMIN_TOKEN);
        plane.write_kubeconfig(&plane.limited_kubeconfig.clone(), LIMITED_TOKEN);
        plane.client = plane.client_for(&plane.kubeconfig.clone());
        if install_crds {
            plane.install_crds();
        }
        plane
    }

    /// Starts (or restarts) kube-apiserver on the same port.
    pub fn start_apiserver(&mut self) {
        self.apiserver = Some(self.spawn_apiserver(self.port));
        self.wait_ready(self.port);
    }

    /// Starts a second API server on the same etcd (its port), for changes made "while the
    /// first one was down".
    /// The running API server's process id.
    pub fn apiserver_pid(&self) -> Option<u32> {
        self.apiserver.as_ref().map(Child::id)
    }

    pub fn spawn_apiserver(&self, port: u16) -> Child {
        let d = self.dir.path();
        let key = d.join("sa.key").display().to_string();
        Command::new(binaries().join("kube-apiserver"))
            .args([
                "--etcd-servers",
                &format!("http://127.0.0.1:{}", self.etcd_port),
            ])
            .args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={port}"),
            ])
            .args([
                "--cert-dir",
                &d.join(format!("certs-{port}")).display().to_string(),
            ])
            .args([
                "--token-auth-file",
                &d.join("tokens.csv").display().to_string(),
            ])
            .args([
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
            ])
            .args([
                "--service-account-key-file",
                &key,
                "--service-account-signing-key-file",
                &key,
            ])
            .args([
                "--service-cluster-ip-range=10.96.0.0/24",
                "--allow-privileged=true",
                "-v=0",
            ])
            // No controller-manager runs here to create namespaces' default service accounts.
            .arg("--disable-admission-plugins=ServiceAccount")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("apiserver-{port}.log"))).unwrap())
            .spawn()
            .expect("start kube-apiserver")
    }

    pub fn wait_ready(&self, port: u16) {
        wait_until("kube-apiserver ready", Duration::from_secs(60), || {
            Command::new("curl")
                .args([
                    "-fsk",
                    "-o",
                    "/dev/null",
                    "-H",
                    &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                ])
                .arg(format!("https://127.0.0.1:{port}/readyz"))
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        // The generated serving certificate file carries its CA as the second certificate.
        let ca = self
            .dir
            .path()
            .join(format!("certs-{}/apiserver.crt", self.port));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            self.port,
            ca.display()
        );
        std::fs::write(path, text).unwrap();
    }

    pub fn client_for(&self, kubeconfig: &Path) -> Client {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
        self.runtime.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            Client::try_from(config).unwrap()
        })
    }

    pub fn install_crds(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let dir = repo_root().join("charts/opensandbox/files/crds");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
            names.push(crd.metadata.name.clone().unwrap());
            self.runtime
                .block_on(crds.create(&PostParams::default(), &crd))
                .expect("create CRD");
        }
        for name in names {
            wait_until("CRD established", Duration::from_secs(30), || {
                self.runtime
                    .block_on(crds.get(&name))
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            });
        }
    }

    /// Creates `n` BatchSandboxes in `namespace`, 32 requests at a time; `object(i)` gives the
    /// metadata and spec of the i-th.
    pub fn create_many(&self, namespace: &str, n: usize, object: impl Fn(usize) -> Value) {
        use futures::StreamExt;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &batch_resource());
        self.runtime.block_on(
            futures::stream::iter(0..n)
                .map(|i| {
                    let api = api.clone();
                    let mut body = object(i);
                    body["apiVersion"] = json!("sandbox.opensandbox.io/v1alpha1");
                    body["kind"] = json!("BatchSandbox");
                    async move {
                        let obj: DynamicObject = serde_json::from_value(body).unwrap();
                        api.create(&PostParams::default(), &obj)
                            .await
                            .expect("create BatchSandbox");
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>(),
        );
    }

    pub fn create_namespace(&self, name: &str) {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        self.runtime
            .block_on(api.create(&PostParams::default(), &ns))
            .expect("create namespace");
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

pub fn batch_resource() -> ApiResource {
    ApiResource {
        group: "sandbox.opensandbox.io".into(),
        version: "v1alpha1".into(),
        api_version: "sandbox.opensandbox.io/v1alpha1".into(),
        kind: "BatchSandbox".into(),
        plural: "batchsandboxes".into(),
    }
}

pub fn agent_resource() -> ApiResource {
    ApiResource {
        group: "agents.x-k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "agents.x-k8s.io/v1alpha1".into(),
        kind: "Sandbox".into(),
        plural: "sandboxes".into(),
    }
}

/// Sandbox objects in one namespace, through the real API.
pub struct Objects<'a> {
    pub plane: &'a ControlPlane,
    pub api: Api<DynamicObject>,
    resource: ApiResource,
}

impl<'a> Objects<'a> {
    pub fn new(plane: &'a ControlPlane, namespace: &str, resource: &ApiResource) -> Self {
        Self {
            plane,
            api: Api::namespaced_with(plane.client.clone(), namespace, resource),
            resource: resource.clone(),
        }
    }

    /// Creates an object with `annotations`, then sets its `status` (a subresource).
    pub fn create(&self, name: &str, annotations: Value, status: Value) {
        let r = &self.api;
        let body: DynamicObject = serde_json::from_value(json!({
            "apiVersion": self.resource.api_version,
            "kind": self.resource.kind,
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:latest"}]}}},
        }))
        .unwrap();
        self.plane
            .runtime
            .block_on(r.create(&PostParams::default(), &body))
            .expect("create object");
        self.set_status(name, status);
    }

    pub fn set_status(&self, name: &str, status: Value) {
        let patch = Patch::Merge(json!({"status": status}));
        self.plane
            .runtime
            .block_on(self.api.patch_status(name, &PatchParams::default(), &patch))
            .expect("patch status");
    }

    pub fn annotate(&self, name: &str, annotations: Value) {
        let patch = Patch::Merge(json!({"metadata": {"annotations": annotations}}));
        self.plane
            .runtime
            .block_on(self.api.patch(name, &PatchParams::default(), &patch))
            .expect("patch annotations");
    }

    pub fn delete(&self, name: &str) {
        self.plane
            .runtime
            .block_on(self.api.delete(name, &DeleteParams::default()))
            .expect("delete object");
    }
}
