//! One idempotent pass over a BatchSandbox: expiry, access token, egress token, pods, endpoints
//! annotation (before status, so `ready` is never seen without an endpoint), then status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use sandbox_api::{endpoints, names, policy};
use serde_json::{Value, json};

use crate::metrics::metrics;
use crate::pod::{self, Egress, LABEL_INDEX, LABEL_NAME, Owner};
use crate::status::{self, Observed};
use crate::tokens;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    Missing(&'static str),
}

pub struct Context {
    pub client: Client,
    pub resource: ApiResource,
    pub recorder: Recorder,
    pub egress_image: String,
    pub egress_mode: String,
    pub max_replicas: u32,
}

fn now() -> String {
    Timestamp::now().to_string()
}

fn annotation<'a>(obj: &'a DynamicObject, key: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

/// Result of looking at `spec.expireTime`.
enum Expiry {
    None,
    Due,
    In(Duration),
    Invalid(String),
}

fn expiry(spec: &Value) -> Expiry {
    let Some(raw) = spec.get("expireTime").filter(|v| !v.is_null()) else {
        return Expiry::None;
    };
    let Some(text) = raw.as_str() else {
        return Expiry::Invalid(format!("spec.expireTime {raw} is not a string"));
    };
    match text.parse::<Timestamp>() {
        Ok(at) => {
            let left = at.duration_since(Timestamp::now());
            if left.is_negative() || left.is_zero() {
                Expiry::Due
            } else {
                Expiry::In(Duration::try_from(left).unwrap_or(Duration::from_secs(1)))
            }
        }
        Err(e) => Expiry::Invalid(format!("spec.expireTime {text:?} is not RFC 3339: {e}")),
    }
}

pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&obj, &ctx).await;
    let m = metrics();
    m.reconciles.inc();
    m.duration.observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.errors.inc();
    }
    result
}

async fn reconcile_inner(obj: &DynamicObject, ctx: &Context) -> Result<Action, Error> {
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = obj
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let namespace = obj
        .metadata
        .namespace
        .clone()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let uid = obj
        .metadata
        .uid
        .clone()
        .ok_or(Error::Missing("metadata.uid"))?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &ctx.resource);
    let spec = obj.data.get("spec").cloned().unwrap_or(Value::Null);
    let previous = obj.data.get("status").cloned().unwrap_or_else(|| json!({}));

    let mut problem: Option<(&str, String)> = None;
    let mut requeue = None;
    match expiry(&spec) {
        Expiry::Due => {
            tracing::info!(%namespace, %name, "expired; deleting");
            api.delete(&name, &DeleteParams::background()).await?;
            return Ok(Action::await_change());
        }
        Expiry::In(left) => requeue = Some(left),
        Expiry::Invalid(message) => problem = Some(("InvalidExpireTime", message)),
        Expiry::None => {}
    }

    // Tokens are written to the object first; the resulting change triggers the next pass.
    let mut add: BTreeMap<String, String> = BTreeMap::new();
    if annotation(obj, names::ANNOTATION_SECURE_ACCESS) == Some("true")
        && annotation(obj, names::ANNOTATION_SECURE_ACCESS_TOKEN).is_none()
    {
        add.insert(
            names::ANNOTATION_SECURE_ACCESS_TOKEN.into(),
            tokens::generate(),
        );
    }
    let policy_text = annotation(obj, names::ANNOTATION_NETWORK_POLICY);
    if let Some(text) = policy_text {
        match policy::parse(text) {
            Ok(_) if annotation(obj, names::ANNOTATION_EGRESS_AUTH_TOKEN).is_none() => {
                add.insert(
                    names::ANNOTATION_EGRESS_AUTH_TOKEN.into(),
                    tokens::generate(),
                );
            }
            Ok(_) => {}
            Err(e) => {
                problem = problem.or(Some((
                    "InvalidNetworkPolicy",
                    format!("{}: {e}", names::ANNOTATION_NETWORK_POLICY),
                )))
            }
        }
    }
    if !add.is_empty() {
        let patch = Patch::Merge(json!({"metadata": {"annotations": add}}));
        api.patch(&name, &PatchParams::default(), &patch).await?;
        return Ok(Action::requeue(Duration::from_millis(10)));
    }

    let desired = spec
        .get("replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .clamp(0, i64::from(ctx.max_replicas)) as u32;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("{LABEL_NAME}={name}");
    let listed = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?;
    let owned: Vec<&Pod> = listed
        .items
        .iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect();
    let index_of = |p: &Pod| {
        p.labels()
            .get(LABEL_INDEX)
            .and_then(|i| i.parse::<u32>().ok())
    };
    let mut by_index: BTreeMap<u32, &Pod> = owned
        .iter()
        .filter_map(|p| Some((index_of(p)?, *p)))
        .collect();

    // Scale in, highest index first.
    for (index, pod) in by_index
        .clone()
        .into_iter()
        .rev()
        .filter(|(i, _)| *i >= desired)
    {
        if pod.metadata.deletion_timestamp.is_none() {
            pods_api
                .delete(&pod.name_any(), &DeleteParams::default())
                .await?;
        }
        by_index.remove(&index);
    }

    let mut created = 0u32;
    if problem.is_none() {
        let owner = Owner {
            api_version: &ctx.resource.api_version,
            kind: &ctx.resource.kind,
            name: &name,
            namespace: &namespace,
            uid: &uid,
            template: spec.get("template"),
            secure_token: annotation(obj, names::ANNOTATION_SECURE_ACCESS_TOKEN),
            egress: policy_text.map(|policy| Egress {
                policy,
                token: annotation(obj, names::ANNOTATION_EGRESS_AUTH_TOKEN).unwrap_or(""),
                mode: &ctx.egress_mode,
                image: &ctx.egress_image,
            }),
        };
        let raw_pods: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &namespace,
            &ApiResource::erase::<Pod>(&()),
        );
        for index in (0..desired).filter(|i| !by_index.contains_key(i)) {
            let body: DynamicObject = match serde_json::from_value(pod::build(&owner, index)) {
                Ok(b) => b,
                Err(e) => {
                    problem = Some((
                        "FailedCreate",
                        format!("template is not a pod template: {e}"),
                    ));
                    break;
                }
            };
            match raw_pods.create(&PostParams::default(), &body).await {
                Ok(_) => {
                    tracing::debug!(%namespace, pod = %pod::pod_name(&name, index), "created pod");
                    created += 1;
                    metrics().pods_created.inc();
                    publish(
                        ctx,
                        obj,
                        EventType::Normal,
                        "SuccessfulCreate",
                        format!("Created pod {}", pod::pod_name(&name, index)),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                    let message = format!(
                        "pod {} refused by the API server: {}",
                        pod::pod_name(&name, index),
                        s.message
                    );
                    publish(
                        ctx,
                        obj,
                        EventType::Warning,
                        "FailedCreate",
                        message.clone(),
                    )
                    .await;
                    problem = Some(("FailedCreate", message));
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    // Endpoints first: the gateway must never see `ready` without an address to route to.
    let ips: Vec<String> = (0..desired)
        .map(|i| {
            by_index
                .get(&i)
                .and_then(|p| status::pod_ip(p))
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    let encoded = endpoints::encode(&ips);
    if annotation(obj, names::ANNOTATION_ENDPOINTS) != Some(encoded.as_str()) {
        let patch = Patch::Merge(
            json!({"metadata": {"annotations": {names::ANNOTATION_ENDPOINTS: encoded}}}),
        );
        api.patch(&name, &PatchParams::default(), &patch).await?;
    }

    let pods: Vec<&Pod> = by_index.values().copied().collect();
    let observed = Observed {
        generation: obj.metadata.generation.unwrap_or(0),
        desired,
        pods: &pods,
        problem: problem.clone(),
    };
    let next = status::compute(&observed, &previous, &now());
    if status::differs(&next, &previous) {
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": next})),
        )
        .await?;
    }

    Ok(match (problem, created, requeue) {
        // A refused template or bad annotation will not fix itself: wait for a change, with a
        // slow retry in case the cause was outside the object (a quota, a missing service account).
        (Some(_), _, _) => Action::requeue(Duration::from_secs(15)),
        (None, _, Some(left)) => Action::requeue(left),
        (None, _, None) => Action::await_change(),
    })
}

async fn publish(ctx: &Context, obj: &DynamicObject, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &obj.object_ref(&ctx.resource))
        .await
    {
        tracing::warn!(error = %e, "could not record event");
    }
}

pub fn error_policy(obj: Arc<DynamicObject>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %obj.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_forms() {
        assert!(matches!(expiry(&json!({})), Expiry::None));
        assert!(matches!(
            expiry(&json!({"expireTime": "2000-01-01T00:00:00Z"})),
            Expiry::Due
        ));
        assert!(matches!(
            expiry(&json!({"expireTime": "2999-06-15T10:00:00.123456+02:00"})),
            Expiry::In(_)
        ));
        assert!(
            matches!(expiry(&json!({"expireTime": "tomorrow"})), Expiry::Invalid(m) if m.contains("spec.expireTime"))
        );
    }
}
