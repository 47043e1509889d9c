//! The BatchSandbox controller against the reference controller, each on a fresh kube-apiserver
//! (run through `loadtest/controller.sh`, which builds the release controller).
//!
//! `controller-bench [N] [ROUNDS]` (defaults 200 and 1): per round, each controller gets a fresh
//! control plane; after one warm-up object, N BatchSandboxes are created back to back (each
//! create awaited). The bench plays the kubelet: as soon as a sandbox's pod
//! appears in the pod watch, its status is patched Running and Ready with an address of its own.
//! Measured, from watch events:
//! - create → pod: from just before the create request to the event in which its pod appears;
//! - pod Ready → endpoints: from just before the kubelet patch to the BatchSandbox event that
//!   carries the pod's address in the endpoints annotation and `status.ready >= 1`;
//! - CPU seconds of the controller process over the counted run;
//! - the API requests it made per sandbox (the API server's counters).
//!
//! Each round's figures are printed, then their medians and a verdict line.
//!
//! Env: `SANDBOX_CONTROLLER_BIN` (ours; default: the release build beside this example),
//! `REFERENCE_CONTROLLER_BIN` and `REFERENCE_CONTROLLER_CRDS` (a directory of CRD YAML files;
//! without both, ours runs alone), `K8S_TESTENV_DIR` (the test control plane's binaries).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../gateway/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use sandbox_api::names::{ANNOTATION_ENDPOINTS, BATCH_SANDBOX_KIND};
use serde_json::json;
use support::k8s::{ControlPlane, batch_resource};
use support::{TempDir, free_port};

const NAMESPACE: &str = "bench";
/// Bound on every wait: a controller start, one create, the last object after the last create.
const LIMIT: Duration = Duration::from_secs(60);
/// API resources whose requests are counted (the API server's own background work is not).
const COUNTED: [&str; 3] = ["batchsandboxes", "pods", "events"];

/// Which controller runs, and how to start it.
enum Kind {
    Ours(PathBuf),
    Reference { bin: PathBuf, crds: PathBuf },
}

impl Kind {
    fn label(&self) -> &'static str {
        match self {
            Kind::Ours(_) => "ours",
            Kind::Reference { .. } => "reference",
        }
    }
}

/// The controller process, killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
    health: SocketAddr,
    metrics: Option<SocketAddr>,
    _dir: TempDir,
}

impl Running {
    fn start(kind: &Kind, kubeconfig: &Path) -> Self {
        let dir = TempDir::new();
        let log = dir.path().join("controller.log");
        let out = std::fs::File::create(&log).unwrap();
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut metrics = None;
        let mut cmd = match kind {
            Kind::Ours(bin) => {
                let m = SocketAddr::from(([127, 0, 0, 1], free_port()));
                metrics = Some(m);
                let mut cmd = Command::new(bin);
                cmd.arg("--kubeconfig").arg(kubeconfig).args([
                    "--bind",
                    "127.0.0.1",
                    "--health-port",
                    &health.port().to_string(),
                    "--metrics-port",
                    &m.port().to_string(),
                    "--leader-elect=false",
                    "--egress-image",
                    "egress:bench",
                ]);
                cmd.env_remove("KUBECONFIG");
                cmd
            }
            Kind::Reference { bin, .. } => {
                // It has no kubeconfig flag; its metrics listener stays off.
                let mut cmd = Command::new(bin);
                cmd.env("KUBECONFIG", kubeconfig).args([
                    format!("--health-probe-bind-address={health}"),
                    "--metrics-bind-address=0".into(),
                ]);
                cmd
            }
        };
        let child = cmd
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} controller: {e}", kind.label()));
        let running = Running {
            child,
            log,
            health,
            metrics,
            _dir: dir,
        };
        running.wait_healthy();
        running
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + LIMIT;
        while Instant::now() < deadline {
            if support::client::blocking_get(self.health, "/readyz").is_ok_and(|r| r.status == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "controller not healthy within {LIMIT:?}; log:\n{}",
            self.log_tail()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// utime + stime of the process, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks()
    }

    /// Reconcile passes so far: ours counts them in a metric, the reference logs one line each.
    fn reconciles(&self) -> Option<f64> {
        let Some(metrics) = self.metrics else {
            return Some(self.log_text().matches("Reconcile finished").count() as f64);
        };
        let body = support::client::blocking_get(metrics, "/metrics")
            .ok()?
            .body_text();
        Some(
            body.lines()
                .filter(|l| {
                    l.split([' ', '{']).next() == Some("sandbox_controller_reconciles_total")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What was seen of one BatchSandbox.
#[derive(Default)]
struct Times {
    ip: String,
    created: Option<Instant>,
    pod: Option<Instant>,
    patched: Option<Instant>,
    ready: Option<Instant>,
}

type Book = Arc<Mutex<HashMap<String, Times>>>;

fn ip(k: usize) -> String {
    format!("127.0.{}.{}", k / 250, k % 250 + 2)
}

fn name(k: usize) -> String {
    if k == 0 {
        "warmup".into()
    } else {
        format!("cb-{k:05}")
    }
}

/// The kubelet's part: the pod runs, has its address and is Ready.
async fn kubelet(pods: Api<Pod>, pod: String, owner: String, book: Book) {
    let address = book.lock().unwrap()[&owner].ip.clone();
    let status = json!({"status": {
        "phase": "Running", "podIP": address, "podIPs": [{"ip": address}], "hostIP": "127.0.0.1",
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
        ],
    }});
    book.lock().unwrap().get_mut(&owner).unwrap().patched = Some(Instant::now());
    if let Err(e) = pods
        .patch_status(&pod, &PatchParams::default(), &Patch::Merge(status))
        .await
    {
        eprintln!("kubelet patch of {pod} failed: {e}");
    }
}

/// Watches pods: the first pod of each BatchSandbox is timed and made Ready.
async fn watch_pods(client: Client, book: Book, synced: tokio::sync::mpsc::Sender<()>) {
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let mut events = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(p) | Event::InitApply(p)) => p,
            Ok(Event::InitDone) => {
                let _ = synced.send(()).await;
                continue;
            }
            _ => continue,
        };
        let seen = Instant::now();
        let owner = pod
            .owner_references()
            .iter()
            .find(|o| o.kind == BATCH_SANDBOX_KIND)
            .map(|o| o.name.clone());
        let Some(owner) = owner else {
            continue;
        };
        let first = match book.lock().unwrap().get_mut(&owner) {
            Some(t) if t.pod.is_none() => {
                t.pod = Some(seen);
                true
            }
            _ => false,
        };
        if first {
            tokio::spawn(kubelet(pods.clone(), pod.name_any(), owner, book.clone()));
        }
    }
}

/// Watches BatchSandboxes: the first event with the pod's address published and `ready >= 1`.
async fn watch_boxes(
    client: Client,
    book: Book,
    synced: tokio::sync::mpsc::Sender<()>,
    done: tokio::sync::watch::Sender<usize>,
) {
    let boxes: Api<DynamicObject> = Api::namespaced_with(client, NAMESPACE, &batch_resource());
    let mut events = watcher::watcher(boxes, watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        let obj = match event {
            Ok(Event::Apply(o) | Event::InitApply(o)) => o,
            Ok(Event::InitDone) => {
                let _ = synced.send(()).await;
                continue;
            }
            _ => continue,
        };
        let seen = Instant::now();
        let ready = obj.data["status"]["ready"].as_i64().unwrap_or(0) >= 1;
        let published = obj
            .annotations()
            .get(ANNOTATION_ENDPOINTS)
            .cloned()
            .unwrap_or_default();
        let mut book = book.lock().unwrap();
        if let Some(t) = book.get_mut(&obj.name_any())
            && t.ready.is_none()
            && ready
            && published.contains(&format!("\"{}\"", t.ip))
        {
            t.ready = Some(seen);
            done.send_modify(|n| *n += 1);
        }
    }
}

/// Requests the API server answered for the counted resources, and the time it spent on them.
#[derive(Clone, Copy, Default)]
struct Served {
    count: f64,
    seconds: f64,
}

/// The API server's request counters by `VERB resource[/subresource]`.
async fn requests(client: &Client) -> BTreeMap<String, Served> {
    let request = hyper::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut served: BTreeMap<String, Served> = BTreeMap::new();
    for line in text.lines() {
        let count = line.starts_with("apiserver_request_total{");
        if !count && !line.starts_with("apiserver_request_duration_seconds_sum{") {
            continue;
        }
        let label = |key: &str| {
            let start = line.find(&format!(",{key}=\""))? + key.len() + 3;
            Some(&line[start..start + line[start..].find('"')?])
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
            continue;
        };
        if !COUNTED.contains(&resource) {
            continue;
        }
        let key = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap_or(0.0);
        let entry = served.entry(key).or_default();
        if count {
            entry.count += value;
        } else {
            entry.seconds += value;
        }
    }
    served
}

fn spec_of(k: usize) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": batch_resource().api_version,
        "kind": BATCH_SANDBOX_KIND,
        "metadata": {"name": name(k)},
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "main", "image": "sandbox:bench"}]}}},
    }))
    .unwrap()
}

/// Creates object `k` (timed from just before the request); false when the create failed.
async fn create(api: &Api<DynamicObject>, book: &Book, k: usize) -> bool {
    book.lock().unwrap().get_mut(&name(k)).unwrap().created = Some(Instant::now());
    match tokio::time::timeout(LIMIT, api.create(&PostParams::default(), &spec_of(k))).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            eprintln!("create {} failed: {e}", name(k));
            false
        }
        Err(_) => {
            eprintln!("create {} not answered within {LIMIT:?}", name(k));
            false
        }
    }
}

/// Waits until `want` objects are ready or `deadline` passes.
async fn wait_ready(done: &mut tokio::sync::watch::Receiver<usize>, want: usize, limit: Duration) {
    let _ = tokio::time::timeout(limit, done.wait_for(|n| *n >= want)).await;
}

/// The reference's CRDs (it watches Pools and SandboxSnapshots too), applied and established.
async fn install_crds(client: &Client, dir: &Path) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(crd.name_any());
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let deadline = Instant::now() + LIMIT;
    for name in names {
        loop {
            let established = crds
                .get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .is_some_and(|s| {
                    s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CRD {name} not established within {LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One controller's figures from one round, in milliseconds and seconds.
struct Round {
    label: &'static str,
    pod_p50: Option<f64>,
    pod_p99: Option<f64>,
    endpoints_p50: Option<f64>,
    endpoints_p99: Option<f64>,
    not_ready: usize,
    all_ready: Option<f64>,
    cpu: f64,
    reconciles: Option<f64>,
    /// Per key: the controller's request count, and the server time over all clients' requests.
    requests: BTreeMap<String, Served>,
}

fn run(kind: &Kind, n: usize) -> Round {
    let plane = match kind {
        Kind::Ours(_) => ControlPlane::start(),
        Kind::Reference { crds, .. } => {
            let plane = ControlPlane::start_with_crds(false);
            plane.runtime.block_on(install_crds(&plane.client, crds));
            plane
        }
    };
    plane.create_namespace(NAMESPACE);
    let client = plane.client.clone();
    let book: Book = Arc::new(Mutex::new(
        (0..=n)
            .map(|k| {
                (
                    name(k),
                    Times {
                        ip: ip(k),
                        ..Default::default()
                    },
                )
            })
            .collect(),
    ));
    let (synced_tx, mut synced) = tokio::sync::mpsc::channel(2);
    let (done_tx, mut done) = tokio::sync::watch::channel(0usize);
    let pods_task =
        plane
            .runtime
            .spawn(watch_pods(client.clone(), book.clone(), synced_tx.clone()));
    let boxes_task = plane.runtime.spawn(watch_boxes(
        client.clone(),
        book.clone(),
        synced_tx,
        done_tx,
    ));
    plane.runtime.block_on(async {
        for _ in 0..2 {
            tokio::time::timeout(LIMIT, synced.recv())
                .await
                .expect("bench watches not synced");
        }
    });

    let controller = Running::start(kind, &plane.kubeconfig);
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), NAMESPACE, &batch_resource());
    plane.runtime.block_on(async {
        assert!(create(&api, &book, 0).await, "warm-up create failed");
        wait_ready(&mut done, 1, LIMIT).await;
    });
    assert!(
        *done.borrow() == 1,
        "{}: the warm-up object was not ready within {LIMIT:?}; log:\n{}",
        kind.label(),
        controller.log_tail()
    );

    let reconciles_before = controller.reconciles();
    let requests_before = plane.runtime.block_on(requests(&client));
    let cpu_before = controller.cpu_seconds();
    let first = Instant::now();
    plane.runtime.block_on(async {
        for k in 1..=n {
            create(&api, &book, k).await;
        }
        wait_ready(&mut done, n + 1, LIMIT).await;
    });
    let cpu = controller.cpu_seconds() - cpu_before;
    let requests_after = plane.runtime.block_on(requests(&client));
    let reconciles = controller
        .reconciles()
        .zip(reconciles_before)
        .map(|(after, before)| after - before);
    pods_task.abort();
    boxes_task.abort();

    let book = book.lock().unwrap();
    let counted: Vec<&Times> = (1..=n).map(|k| &book[&name(k)]).collect();
    let mut to_pod: Vec<Duration> = counted
        .iter()
        .filter_map(|t| Some(t.pod? - t.created?))
        .collect();
    let mut to_endpoints: Vec<Duration> = counted
        .iter()
        .filter_map(|t| Some(t.ready? - t.patched?))
        .collect();
    to_pod.sort();
    to_endpoints.sort();
    let not_ready = counted.iter().filter(|t| t.ready.is_none()).count();
    let all_ready = (not_ready == 0)
        .then(|| counted.iter().filter_map(|t| t.ready).max())
        .flatten()
        .map(|last| (last - first).as_secs_f64());
    // The bench's own requests (one create per BatchSandbox, one kubelet patch per pod) are
    // taken out of the counts; the server time stays an average over all clients.
    let own = |key: &str| match key {
        "POST batchsandboxes" => n as f64,
        "PATCH pods/status" => counted.iter().filter(|t| t.patched.is_some()).count() as f64,
        _ => 0.0,
    };
    let requests: BTreeMap<String, Served> = requests_after
        .into_iter()
        .filter_map(|(key, after)| {
            let before = requests_before.get(&key).copied().unwrap_or_default();
            let total = after.count - before.count;
            let served = Served {
                count: total - own(&key),
                seconds: (after.seconds - before.seconds) * (total - own(&key)) / total.max(1.0),
            };
            (served.count > 0.0).then_some((key, served))
        })
        .collect();
    drop(controller);
    Round {
        label: kind.label(),
        pod_p50: percentile_ms(&to_pod, 0.5),
        pod_p99: percentile_ms(&to_pod, 0.99),
        endpoints_p50: percentile_ms(&to_endpoints, 0.5),
        endpoints_p99: percentile_ms(&to_endpoints, 0.99),
        not_ready,
        all_ready,
        cpu,
        reconciles,
        requests,
    }
}

fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(i).map(|d| d.as_secs_f64() * 1000.0)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        len if len % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

/// The median of each figure over one controller's rounds (requests and failures: summed).
fn summary(rounds: &[&Round]) -> Round {
    let of = |f: fn(&Round) -> Option<f64>| median(rounds.iter().filter_map(|r| f(r)).collect());
    let mut requests: BTreeMap<String, Served> = BTreeMap::new();
    for (key, served) in rounds.iter().flat_map(|r| &r.requests) {
        let total = requests.entry(key.clone()).or_default();
        total.count += served.count;
        total.seconds += served.seconds;
    }
    Round {
        label: rounds[0].label,
        pod_p50: of(|r| r.pod_p50),
        pod_p99: of(|r| r.pod_p99),
        endpoints_p50: of(|r| r.endpoints_p50),
        endpoints_p99: of(|r| r.endpoints_p99),
        not_ready: rounds.iter().map(|r| r.not_ready).sum(),
        all_ready: of(|r| r.all_ready),
        cpu: of(|r| Some(r.cpu)).unwrap_or(f64::NAN),
        reconciles: of(|r| r.reconciles).map(|v| v * rounds.len() as f64),
        requests,
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn print_row(name: &str, r: &Round) {
    println!(
        "| {name} | {} | {} | {} | {} | {} | {} | {:.2} |",
        cell(r.pod_p50, 1),
        cell(r.pod_p99, 1),
        cell(r.endpoints_p50, 1),
        cell(r.endpoints_p99, 1),
        r.not_ready,
        cell(r.all_ready, 2),
        r.cpu,
    );
}

/// Each round's row, then the medians, then the API requests each controller made per sandbox.
fn print(n: usize, rounds: &[Round], summaries: &[Round]) {
    println!(
        "| controller, {n} sandboxes | create→pod p50 ms | p99 ms | pod Ready→endpoints p50 ms | p99 ms | not ready in {}s | all ready s | CPU s |",
        LIMIT.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|");
    let per_label = rounds.len() / summaries.len();
    for (i, r) in rounds.iter().enumerate() {
        print_row(
            &format!("{} (round {})", r.label, i / summaries.len() + 1),
            r,
        );
    }
    for s in summaries {
        print_row(&format!("**{}, median of {per_label}**", s.label), s);
    }
    println!();
    print!("| API requests per sandbox (mean server ms) |");
    summaries.iter().for_each(|s| print!(" {} |", s.label));
    println!();
    println!("|---|{}", "---|".repeat(summaries.len()));
    let per = (n * per_label) as f64;
    print!("| reconcile passes |");
    for s in summaries {
        print!(" {} |", cell(s.reconciles.map(|v| v / per), 2));
    }
    println!();
    let keys: std::collections::BTreeSet<&String> =
        summaries.iter().flat_map(|s| s.requests.keys()).collect();
    for key in keys {
        print!("| {key} |");
        for s in summaries {
            let cell = s.requests.get(key).map_or("0".into(), |v| {
                format!("{:.2} ({:.1})", v.count / per, v.seconds * 1000.0 / v.count)
            });
            print!(" {cell} |");
        }
        println!();
    }
}

/// "ours 2.10x lower" / "ours 1.50x higher" for a figure where lower is better.
fn compare(ours: Option<f64>, reference: Option<f64>) -> String {
    match (ours, reference) {
        (Some(o), Some(r)) if o <= r => format!("ours {:.2}x lower", r / o),
        (Some(o), Some(r)) => format!("ours {:.2}x higher", o / r),
        _ => "no comparison".into(),
    }
}

fn verdict(summaries: &[Round]) {
    let ours = &summaries[0];
    match summaries.get(1) {
        Some(reference) => println!(
            "verdict: create→pod p50 ours {} ms vs reference {} ms ({}); pod Ready→endpoints p50 ours {} ms vs reference {} ms ({}); CPU ours {:.2} s vs reference {:.2} s ({}); not ready ours {} vs reference {}",
            cell(ours.pod_p50, 1),
            cell(reference.pod_p50, 1),
            compare(ours.pod_p50, reference.pod_p50),
            cell(ours.endpoints_p50, 1),
            cell(reference.endpoints_p50, 1),
            compare(ours.endpoints_p50, reference.endpoints_p50),
            ours.cpu,
            reference.cpu,
            compare(Some(ours.cpu), Some(reference.cpu)),
            ours.not_ready,
            reference.not_ready,
        ),
        None => println!(
            "verdict: reference controller not available (set REFERENCE_CONTROLLER_BIN and REFERENCE_CONTROLLER_CRDS); ours alone: create→pod p50 {} ms, pod Ready→endpoints p50 {} ms, CPU {:.2} s, not ready {}",
            cell(ours.pod_p50, 1),
            cell(ours.endpoints_p50, 1),
            ours.cpu,
            ours.not_ready,
        ),
    }
}

fn ours_binary() -> PathBuf {
    std::env::var_os("SANDBOX_CONTROLLER_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("sandbox-controller"))
        })
        .expect("set SANDBOX_CONTROLLER_BIN to the sandbox-controller binary")
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args().nth(i).map_or(default, |s| {
            s.parse()
                .expect("arguments: [sandboxes] [rounds], both numbers")
        })
    };
    let (n, rounds) = (arg(1, 200), arg(2, 1).max(1));
    let mut kinds = vec![Kind::Ours(ours_binary())];
    if let (Some(bin), Some(crds)) = (
        std::env::var_os("REFERENCE_CONTROLLER_BIN"),
        std::env::var_os("REFERENCE_CONTROLLER_CRDS"),
    ) {
        kinds.push(Kind::Reference {
            bin: bin.into(),
            crds: crds.into(),
        });
    }
    // One control plane at a time: each is dropped (stopped) before the next starts. The
    // order alternates between rounds so a drift in the machine's load hits both alike.
    let mut results: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..kinds.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut pair: Vec<(usize, Round)> =
            order.into_iter().map(|k| (k, run(&kinds[k], n))).collect();
        pair.sort_by_key(|(k, _)| *k);
        results.extend(pair.into_iter().map(|(_, r)| r));
    }
    let summaries: Vec<Round> = (0..kinds.len())
        .map(|k| {
            summary(
                &results
                    .iter()
                    .skip(k)
                    .step_by(kinds.len())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    print(n, &results, &summaries);
    println!();
    verdict(&summaries);
}
