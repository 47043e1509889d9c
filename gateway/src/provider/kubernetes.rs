//! Watching `BatchSandbox` and agent-sandbox `Sandbox` objects through the Kubernetes API.
//! Each watch is one table source: its initial list (and every relist after a 410 Gone or a
//! reconnect) replaces the source's objects atomically; single events update one object. The
//! watch never ends on an error: it backs off and retries while the table keeps serving.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::ApiResource;
use kube::core::DynamicResourceScope;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sandbox_api::names;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::config::InitialList;
use crate::metrics::metrics;
use crate::objects::{Metadata, Object, Sandbox, Status, Target};
use crate::provider::resolve;
use crate::table::{Record, RouteTable, TableWriter};
use crate::upstream::UpstreamPolicy;

const NAME_TTL: Duration = Duration::from_secs(30);
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(4);

/// Retry delays for a failing watch: 250 ms doubling to 4 s, with ±25% jitter so a fleet of
/// gateways does not reconnect in lockstep. Short, because a gateway serving from a stale table
/// should catch up within seconds of the API server coming back.
struct Reconnect {
    next: Duration,
}

impl Iterator for Reconnect {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = 0.75 + f64::from(nanos % 1000) / 2000.0;
        Some(delay.mul_f64(jitter))
    }
}

impl Backoff for Reconnect {
    fn reset(&mut self) {
        self.next = RECONNECT_MIN;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BatchSandbox,
    AgentSandbox,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::BatchSandbox => "batchsandbox",
            Kind::AgentSandbox => "agent-sandbox",
        }
    }

    fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = match self {
            Kind::BatchSandbox => (
                names::BATCH_SANDBOX_GROUP,
                names::BATCH_SANDBOX_VERSION,
                names::BATCH_SANDBOX_KIND,
                "batchsandboxes",
            ),
            Kind::AgentSandbox => (
                names::AGENT_SANDBOX_GROUP,
                names::AGENT_SANDBOX_VERSION,
                names::AGENT_SANDBOX_KIND,
                "sandboxes",
            ),
        };
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

/// What a watch keeps of each object: metadata and status, never the (large) spec.
#[derive(Debug, Clone, Deserialize)]
pub struct Watched {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    status: Status,
}

impl Resource for Watched {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Watched {
    fn to_sandbox(&self, resource: &ApiResource) -> Option<Sandbox> {
        let object = Object {
            api_version: resource.api_version.clone(),
            kind: resource.kind.clone(),
            metadata: Metadata {
                name: self.metadata.name.clone().unwrap_or_default(),
                namespace: self.metadata.namespace.clone(),
                annotations: self.metadata.annotations.clone().unwrap_or_default(),
            },
            status: self.status.clone(),
            items: Default::default(),
        };
        object.to_sandbox()
    }

    /// Seconds since the object was last written, by the API server's clock (whole seconds).
    fn age_of_last_write(&self) -> Option<f64> {
        let last = self
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|f| f.time.as_ref())
            .map(|t| t.0)
            .max()?;
        let now = k8s_openapi::jiff::Timestamp::now();
        Some(now.duration_since(last).as_secs_f64().max(0.0))
    }
}

/// Explains a watch failure, naming what an operator must fix.
/// The API server's answer inside a watch error, when the error is one.
fn api_status(e: &watcher::Error) -> Option<&kube::core::Status> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    }
}

/// Whether the API server refused a streaming list (`sendInitialEvents`), as servers without
/// the WatchList feature do.
fn refuses_streaming(e: &watcher::Error) -> bool {
    api_status(e).is_some_and(|s| s.message.contains("sendInitialEvents"))
}

pub fn explain(kind: Kind, e: &watcher::Error) -> String {
    let r = kind.resource();
    let what = format!("{}.{}", r.plural, r.group);
    match api_status(e).map(|s| (s.code, s.message.as_str())) {
        Some((404, _)) => format!(
            "the API server does not serve {}/{} {} : is the CRD {what} installed?",
            r.group, r.version, r.plural
        ),
        Some((403, msg)) => {
            format!("forbidden: RBAC must allow get, list and watch on {what} ({msg})")
        }
        Some((401, msg)) => {
            format!("unauthorized: the API server rejected the gateway's credentials ({msg})")
        }
        _ => format!("API server unreachable or failing: {e}"),
    }
}

pub struct KubeProvider {
    pub kind: Kind,
    pub client: kube::Config,
    /// `None`: all namespaces.
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
    pub initial_list: InitialList,
    pub writer: Arc<Mutex<TableWriter>>,
    pub table: Arc<RouteTable>,
    pub policy: Arc<UpstreamPolicy>,
}

impl KubeProvider {
    /// This watch's source name in the table.
    pub fn source(&self) -> String {
        source_name(self.kind, self.namespace.as_deref())
    }
}

pub fn source_name(kind: Kind, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{}/{ns}", kind.label()),
        None => kind.label().to_owned(),
    }
}

type Key = (String, String);
type Lookup = (String, Result<Vec<IpAddr>, String>);

/// Per-watch state: names to resolve and the objects that use them.
struct Watch<'a> {
    provider: &'a KubeProvider,
    source: String,
    resource: ApiResource,
    /// Objects listed so far during a (re)list.
    listing: Option<Vec<Sandbox>>,
    /// Objects whose upstream is a DNS name, by (namespace, name).
    named: HashMap<Key, Sandbox>,
    resolved: HashMap<String, (Result<Vec<IpAddr>, String>, Instant)>,
    in_flight: std::collections::HashSet<String>,
    lookups: mpsc::UnboundedSender<Lookup>,
    last_error: Option<String>,
}

impl Watch<'_> {
    fn record(&mut self, sandbox: &Sandbox) -> Record {
        let upstream = match &sandbox.target {
            Target::Addresses(a) => resolve::usable(a, &self.provider.policy),
            Target::Unavailable(reason) => Err(reason.clone()),
            Target::Name(name) => match self.resolved.get(name) {
                Some((result, at)) if at.elapsed() < NAME_TTL => result
                    .clone()
                    .and_then(|a| resolve::usable(&a, &self.provider.policy)),
                cached => {
                    let stale = cached.map(|(r, _)| r.clone());
                    self.lookup(name);
                    // Keep serving the last answer while a refresh is under way.
                    stale
                        .unwrap_or_else(|| Err(format!("resolving {name}")))
                        .and_then(|a| resolve::usable(&a, &self.provider.policy))
                }
            },
        };
        Record::of(sandbox, upstream)
    }

    fn lookup(&mut self, name: &str) {
        if !self.in_flight.insert(name.to_owned()) {
            return;
        }
        let tx = self.lookups.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let _ = tx.send(resolve::lookup(name).await);
        });
    }

    fn track(&mut self, sandbox: &Sandbox) {
        let key = (sandbox.namespace.clone(), sandbox.name.clone());
        if matches!(sandbox.target, Target::Name(_)) {
            self.named.insert(key, sandbox.clone());
        } else {
            self.named.remove(&key);
        }
    }

    fn with_writer(&self, f: impl FnOnce(&mut TableWriter)) {
        if let Ok(mut w) = self.provider.writer.lock() {
            f(&mut w);
            w.publish();
        }
    }

    fn connected(&mut self) {
        if self.last_error.take().is_some() {
            tracing::info!(source = %self.source, "watch reconnected");
        }
        self.provider.table.note(&self.source, None);
        metrics()
            .provider_connected
            .with_label_values(&[self.provider.kind.label()])
            .set(1);
    }

    fn handle(&mut self, event: watcher::Event<Watched>) {
        let kind = self.provider.kind.label();
        let count = |t: &str| metrics().watch_events.with_label_values(&[kind, t]).inc();
        self.connected();
        match event {
            watcher::Event::Init => {
                count("init");
                self.listing = Some(Vec::new());
            }
            watcher::Event::InitApply(obj) => {
                count("init_apply");
                if let (Some(list), Some(s)) =
                    (self.listing.as_mut(), obj.to_sandbox(&self.resource))
                {
                    list.push(s);
                }
            }
            watcher::Event::InitDone => {
                count("init_done");
                let listed = self.listing.take().unwrap_or_default();
                self.named.clear();
                for s in &listed {
                    self.track(s);
                }
                let records: Vec<Record> = listed.iter().map(|s| self.record(s)).collect();
                let n = records.len();
                let source = self.source.clone();
                self.with_writer(|w| w.replace_source(&source, &records));
                metrics()
                    .last_sync
                    .set(k8s_openapi::jiff::Timestamp::now().as_second());
                metrics().provider_loads.with_label_values(&[kind]).inc();
                tracing::info!(source = %self.source, sandboxes = n, "initial list loaded");
            }
            watcher::Event::Apply(obj) => {
                count("apply");
                let Some(s) = obj.to_sandbox(&self.resource) else {
                    return;
                };
                self.track(&s);
                let record = self.record(&s);
                let source = self.source.clone();
                self.with_writer(|w| w.upsert(&source, record));
                if let Some(age) = obj.age_of_last_write() {
                    metrics().propagation.observe(age);
                }
            }
            watcher::Event::Delete(obj) => {
                count("delete");
                let Some(s) = obj.to_sandbox(&self.resource) else {
                    return;
                };
                self.named.remove(&(s.namespace.clone(), s.name.clone()));
                let source = self.source.clone();
                self.with_writer(|w| w.remove(&source, &s.namespace, &s.name));
            }
        }
    }

    fn failed(&mut self, e: &watcher::Error) {
        let kind = self.provider.kind;
        metrics()
            .watch_events
            .with_label_values(&[kind.label(), "error"])
            .inc();
        metrics()
            .provider_connected
            .with_label_values(&[kind.label()])
            .set(0);
        metrics()
            .provider_errors
            .with_label_values(&[kind.label()])
            .inc();
        let message = explain(kind, e);
        let serving = if self.provider.table.is_ready() {
            "serving the last table"
        } else {
            "not ready yet"
        };
        self.provider.table.note(
            &self.source,
            Some(format!("watch failing, {serving}: {message}")),
        );
        if self.last_error.as_deref() != Some(message.as_str()) {
            tracing::error!(source = %self.source, error = %message, "watch failed; retrying with backoff");
            self.last_error = Some(message);
        }
    }

    fn resolved(&mut self, (name, result): Lookup) {
        self.in_flight.remove(&name);
        if let Err(e) = &result {
            tracing::warn!(name = %name, error = %e, "sandbox service name does not resolve");
        }
        self.resolved.insert(name.clone(), (result, Instant::now()));
        let users: Vec<Sandbox> = self
            .named
            .values()
            .filter(|s| matches!(&s.target, Target::Name(n) if *n == name))
            .cloned()
            .collect();
        if users.is_empty() {
            return;
        }
        let records: Vec<Record> = users.iter().map(|s| self.record(s)).collect();
        let source = self.source.clone();
        self.with_writer(|w| records.into_iter().for_each(|r| w.upsert(&source, r)));
    }

    fn refresh_names(&mut self) {
        let names: Vec<String> = self
            .named
            .values()
            .filter_map(|s| match &s.target {
                Target::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        for n in names {
            self.lookup(&n);
        }
    }
}

#[async_trait]
impl BackgroundService for KubeProvider {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let source = self.source();
        let client = match Client::try_from(self.client.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(source = %source, error = %e, "cannot create a Kubernetes client");
                self.table
                    .note(&source, Some(format!("no Kubernetes client: {e}")));
                return;
            }
        };
        let resource = self.kind.resource();
        let api: Api<Watched> = match &self.namespace {
            Some(ns) => Api::namespaced_with(client, ns, &resource),
            None => Api::all_with(client, &resource),
        };
        let mut streaming = self.initial_list == InitialList::Streaming;
        let events_for = |streaming: bool| {
            let mut config = watcher::Config::default();
            if let Some(selector) = &self.label_selector {
                config = config.labels(selector);
            }
            if streaming {
                config = config.streaming_lists();
            }
            watcher(api.clone(), config)
                .backoff(Reconnect {
                    next: RECONNECT_MIN,
                })
                .boxed()
        };
        let mut events = events_for(streaming);
        let (tx, mut lookups) = mpsc::unbounded_channel();
        let mut watch = Watch {
            provider: self,
            source,
            resource,
            listing: None,
            named: HashMap::new(),
            resolved: HashMap::new(),
            in_flight: Default::default(),
            lookups: tx,
            last_error: None,
        };
        let mut refresh = tokio::time::interval(NAME_TTL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                event = events.next() => match event {
                    Some(Ok(e)) => watch.handle(e),
                    Some(Err(e)) if streaming && refuses_streaming(&e) => {
                        tracing::warn!(source = %watch.source, error = %e, "the API server does not offer streaming lists; loading with paged lists");
                        streaming = false;
                        events = events_for(false);
                    }
                    Some(Err(e)) => watch.failed(&e),
                    None => return,
                },
                Some(result) = lookups.recv() => watch.resolved(result),
                _ = refresh.tick() => watch.refresh_names(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code, "message": message})).unwrap();
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn only_a_refused_streaming_list_falls_back() {
        // What an API server without the WatchList feature answers.
        let refused =
            "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled";
        assert!(refuses_streaming(&watcher::Error::WatchStartFailed(
            api_error(422, refused)
        )));
        assert!(refuses_streaming(&watcher::Error::WatchFailed(api_error(
            400, refused
        ))));
        // Anything else is an ordinary watch failure, retried as it is.
        assert!(!refuses_streaming(&watcher::Error::WatchStartFailed(
            api_error(403, "batchsandboxes is forbidden")
        )));
        assert!(!refuses_streaming(&watcher::Error::InitialListFailed(
            api_error(404, "the server could not find the requested resource")
        )));
    }
}
