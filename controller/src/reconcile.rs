//! One idempotent pass over a BatchSandbox, in steps: expiry → access and egress tokens → the
//! egress fence and token Secret → pods → endpoints annotation (before status, so `ready` is
//! never seen without an endpoint) → status. Pods and Secrets are read from the controller's
//! watch caches; events are queued, not awaited. [`next`] alone decides when to come back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use sandbox_api::{egress, endpoints, names, policy};
use serde_json::{Value, json};

use crate::cache::Pods;
use crate::error::Error;
use crate::events::Events;
use crate::metrics::metrics;
use crate::object::BatchSandbox;
use crate::pod::{self, Owner};
use crate::recent::{Recent, Written};
use crate::secret::Secrets;
use crate::sidecar::Egress;
use crate::status::{self, Observed, Problem};
use crate::{fence, tokens};

pub struct Context {
    pub client: Client,
    pub pods: Pods,
    pub secrets: Secrets,
    pub events: Events,
    pub recent: Recent,
    pub egress_image: String,
    pub egress_mode: String,
    pub max_replicas: u32,
}

fn now() -> String {
    Timestamp::now().to_string()
}

/// Result of looking at `spec.expireTime`.
enum Expiry {
    None,
    Due,
    In(Duration),
    Invalid(String),
}

fn expiry(expire_time: Option<&str>) -> Expiry {
    let Some(text) = expire_time else {
        return Expiry::None;
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

/// How a pass ended; [`next`] alone turns it into a requeue.
enum Outcome {
    /// Being deleted, or just deleted for expiry.
    Gone,
    /// Tokens were written to the object; its change brings the next pass.
    Annotated,
    /// Reconciled, perhaps stopped by a problem, perhaps with an expiry ahead.
    Done {
        problem: bool,
        expires_in: Option<Duration>,
    },
    /// The pass failed (the API server did not answer as expected).
    Failed,
}

/// A problem (refused template, bad annotation, foreign Secret) will not fix itself: the object's
/// next change brings a pass; the slow retry covers causes outside the object (a quota, a
/// missing service account, a foreign Secret removed).
const PROBLEM_RETRY: Duration = Duration::from_secs(15);

fn next(outcome: Outcome) -> Action {
    match outcome {
        Outcome::Gone => Action::await_change(),
        Outcome::Annotated => Action::requeue(Duration::from_millis(10)),
        Outcome::Done {
            problem: true,
            expires_in,
        } => Action::requeue(expires_in.map_or(PROBLEM_RETRY, |l| l.min(PROBLEM_RETRY))),
        Outcome::Done {
            problem: false,
            expires_in: Some(left),
        } => Action::requeue(left),
        Outcome::Done { .. } => Action::await_change(),
        Outcome::Failed => Action::requeue(Duration::from_secs(2)),
    }
}

pub async fn reconcile(obj: Arc<BatchSandbox>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&obj, &ctx).await;
    let m = metrics();
    m.reconciles.inc();
    m.duration.observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.errors.inc();
    }
    result.map(next)
}

pub fn error_policy(obj: Arc<BatchSandbox>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %obj.name_any(), %error, "reconcile failed; retrying");
    next(Outcome::Failed)
}

/// The policy annotation's text when it is valid JSON policy; a problem when it is not.
fn egress_policy(obj: &BatchSandbox) -> Result<Option<&str>, Problem> {
    let Some(text) = obj.annotation(names::ANNOTATION_NETWORK_POLICY) else {
        return Ok(None);
    };
    match policy::parse(text) {
        Ok(_) => Ok(Some(text)),
        Err(e) => Err(Problem {
            reason: "InvalidNetworkPolicy",
            message: format!("{}: {e}", names::ANNOTATION_NETWORK_POLICY),
        }),
    }
}

/// Token annotations still to be written: a secure-access token when asked for, an egress
/// token when a valid policy asks for a sidecar. Existing tokens are never replaced.
fn missing_tokens(obj: &BatchSandbox, egress: bool) -> BTreeMap<&'static str, String> {
    let mut add = BTreeMap::new();
    if obj.annotation(names::ANNOTATION_SECURE_ACCESS) == Some("true")
        && obj
            .annotation(names::ANNOTATION_SECURE_ACCESS_TOKEN)
            .is_none()
    {
        add.insert(names::ANNOTATION_SECURE_ACCESS_TOKEN, tokens::generate());
    }
    if egress
        && obj
            .annotation(names::ANNOTATION_EGRESS_AUTH_TOKEN)
            .is_none()
    {
        add.insert(names::ANNOTATION_EGRESS_AUTH_TOKEN, tokens::generate());
    }
    add
}

/// The problem of a template that would let the sandbox undo the fence: the first violation's
/// reason, every violation in the message.
fn fence_problem(template: Option<&Value>) -> Option<Problem> {
    let found = fence::violations(template);
    let first = found.first()?;
    Some(Problem {
        reason: first.kind.reason(),
        message: found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The endpoints annotation to write, if it must change: one entry per wanted replica, empty
/// where the pod has no address yet. Nothing is written while there is nothing to publish and
/// nothing was published.
fn endpoints_update(
    current: Option<&str>,
    pods: &BTreeMap<u32, Arc<Pod>>,
    desired: u32,
) -> Option<String> {
    let ips: Vec<String> = (0..desired)
        .map(|i| {
            pods.get(&i)
                .and_then(|p| status::pod_ip(p))
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    if current.is_none() && ips.iter().all(String::is_empty) {
        return None;
    }
    let encoded = endpoints::encode(&ips);
    (current != Some(encoded.as_str())).then_some(encoded)
}

async fn reconcile_inner(obj: &BatchSandbox, ctx: &Context) -> Result<Outcome, Error> {
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Outcome::Gone);
    }
    let name = obj
        .metadata
        .name
        .as_deref()
        .ok_or(Error::Missing("metadata.name"))?;
    let namespace = obj
        .metadata
        .namespace
        .as_deref()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let uid = obj
        .metadata
        .uid
        .as_deref()
        .ok_or(Error::Missing("metadata.uid"))?;
    let api: Api<BatchSandbox> = Api::namespaced(ctx.client.clone(), namespace);
    let spec = &obj.spec;
    let version = obj.metadata.resource_version.as_deref();
    // Status and endpoints as last written, when the cache does not show them yet.
    let ahead = ctx.recent.ahead_of(uid, version).unwrap_or_default();
    let empty = json!({});
    let previous = ahead
        .status
        .as_ref()
        .or(obj.status.as_ref())
        .unwrap_or(&empty);

    // Expiry.
    let mut problem = spec.invalid.as_ref().map(|message| Problem {
        reason: "InvalidSpec",
        message: message.clone(),
    });
    if problem.is_none() && !spec.unsupported.is_empty() {
        problem = Some(Problem {
            reason: "UnsupportedFeature",
            message: format!(
                "{} not supported by this controller; no pods are made for this sandbox",
                spec.unsupported.join(", ")
            ),
        });
    }
    let expires_in = match expiry(spec.expire_time.as_deref()) {
        Expiry::Due => {
            tracing::info!(%namespace, %name, "expired; deleting");
            ctx.recent.forget(uid);
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(Outcome::Gone);
        }
        Expiry::In(left) => Some(left),
        Expiry::Invalid(message) => {
            problem = problem.or(Some(Problem {
                reason: "InvalidExpireTime",
                message,
            }));
            None
        }
        Expiry::None => None,
    };

    // Access and egress tokens: written to the object first; the change brings the next pass.
    let policy = egress_policy(obj).unwrap_or_else(|p| {
        problem = problem.take().or(Some(p));
        None
    });
    let add = missing_tokens(obj, policy.is_some());
    if !add.is_empty() {
        // Only onto the version this pass read: tokens written by a pass the cache does not
        // show yet are never replaced (the API server answers 409 and the next pass sees them).
        let patch =
            Patch::Merge(json!({"metadata": {"resourceVersion": version, "annotations": add}}));
        match api.patch(name, &PatchParams::default(), &patch).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Outcome::Annotated);
    }

    // The egress fence and the token Secret.
    let secret_name = egress::secret_name(name);
    let mut owner = Owner {
        api_version: &BatchSandbox::api_version(&()),
        kind: &BatchSandbox::kind(&()),
        name,
        namespace,
        uid,
        template: spec.template.as_ref(),
        egress: None,
    };
    if let Some(policy) = policy
        && problem.is_none()
    {
        problem = fence_problem(owner.template);
        if problem.is_none() {
            let token = obj
                .annotation(names::ANNOTATION_EGRESS_AUTH_TOKEN)
                .ok_or(Error::Missing("egress token annotation"))?;
            problem = ctx.secrets.ensure(&ctx.client, &owner, token).await?;
        }
        owner.egress = Some(Egress {
            policy,
            secret: &secret_name,
            mode: &ctx.egress_mode,
            image: &ctx.egress_image,
            sandbox: name,
        });
    }

    // Pods.
    let desired = spec
        .replicas
        .unwrap_or(1)
        .clamp(0, i64::from(ctx.max_replicas)) as u32;
    let (pods, refused) = sync_pods(ctx, obj, &owner, desired, problem.is_none()).await?;
    problem = problem.or(refused);

    // Endpoints, then status. Each write is remembered with the versions it made out of date.
    let mut versions: Vec<String> = ahead.behind;
    versions.extend(ahead.latest);
    versions.extend(version.map(str::to_owned));
    let before = versions.len();
    let mut written = Written {
        behind: Vec::new(),
        latest: None,
        status: ahead.status.clone(),
        endpoints: ahead.endpoints,
    };
    let published = written
        .endpoints
        .as_deref()
        .or(obj.annotation(names::ANNOTATION_ENDPOINTS));
    if let Some(encoded) = endpoints_update(published, &pods, desired) {
        let patch = Patch::Merge(
            json!({"metadata": {"annotations": {names::ANNOTATION_ENDPOINTS: encoded}}}),
        );
        let after = api.patch(name, &PatchParams::default(), &patch).await?;
        versions.extend(after.metadata.resource_version);
        written.endpoints = Some(encoded);
    }
    if let Some(p) = problem.as_ref().filter(|p| !status::reports(previous, p)) {
        ctx.events
            .publish(obj, EventType::Warning, p.reason, &p.message);
    }
    let pods: Vec<&Pod> = pods.values().map(AsRef::as_ref).collect();
    let observed = Observed {
        generation: obj.metadata.generation.unwrap_or(0),
        desired,
        pods: &pods,
        problem: problem.clone(),
    };
    let next = status::compute(&observed, previous, &now());
    if status::differs(&next, previous) {
        let after = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": next})),
            )
            .await?;
        versions.extend(after.metadata.resource_version);
        written.status = Some(next);
    }
    if versions.len() > before {
        // The last version holds every write; the ones before it do not.
        written.latest = versions.pop();
        versions.sort_unstable();
        versions.dedup();
        written.behind = versions;
        ctx.recent.remember(uid, written);
    }
    Ok(Outcome::Done {
        problem: problem.is_some(),
        expires_in,
    })
}

/// Deletes pods beyond `desired` (highest index first) and, when `create`, creates the missing
/// ones. Returns the pods by index (those just made included) and the problem of a pod the API
/// server refused.
async fn sync_pods(
    ctx: &Context,
    obj: &BatchSandbox,
    owner: &Owner<'_>,
    desired: u32,
    create: bool,
) -> Result<(BTreeMap<u32, Arc<Pod>>, Option<Problem>), Error> {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), owner.namespace);
    let mut by_index = ctx.pods.owned(owner.uid);

    let extra: Vec<u32> = by_index.range(desired..).rev().map(|(i, _)| *i).collect();
    for index in extra {
        if let Some(pod) = by_index.remove(&index)
            && pod.metadata.deletion_timestamp.is_none()
        {
            match pods_api
                .delete(&pod.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                // Already gone; the cache has not heard yet.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !create {
        return Ok((by_index, None));
    }

    let raw_pods: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        owner.namespace,
        &ApiResource::erase::<Pod>(&()),
    );
    let missing: Vec<u32> = (0..desired).filter(|i| !by_index.contains_key(i)).collect();
    for index in missing {
        let pod_name = pod::pod_name(owner.name, index);
        let body: DynamicObject = match serde_json::from_value(pod::build(owner, index)) {
            Ok(b) => b,
            Err(e) => {
                let message = format!("template is not a pod template: {e}");
                return Ok((by_index, Some(failed_create(message))));
            }
        };
        match raw_pods.create(&PostParams::default(), &body).await {
            Ok(made) => {
                tracing::debug!(namespace = %owner.namespace, pod = %pod_name, "created pod");
                metrics().pods_created.inc();
                if let Ok(made) = made.try_parse::<Pod>() {
                    by_index.insert(index, Arc::new(made));
                }
                let note = format!("Created pod {pod_name}");
                ctx.events
                    .publish(obj, EventType::Normal, "SuccessfulCreate", &note);
            }
            // Made by an earlier pass; the cache has not heard yet.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                let message = format!("pod {pod_name} refused by the API server: {}", s.message);
                return Ok((by_index, Some(failed_create(message))));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((by_index, None))
}

fn failed_create(message: String) -> Problem {
    Problem {
        reason: "FailedCreate",
        message,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn object(annotations: Value) -> BatchSandbox {
        serde_json::from_value(json!({
            "apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
            "metadata": {"name": "bs", "annotations": annotations},
        }))
        .unwrap()
    }

    #[test]
    fn one_place_decides_requeues() {
        let secs = next;
        assert_eq!(secs(Outcome::Gone), Action::await_change());
        assert_eq!(
            secs(Outcome::Done {
                problem: false,
                expires_in: None
            }),
            Action::await_change()
        );
        let left = Duration::from_secs(40);
        assert_eq!(
            secs(Outcome::Done {
                problem: false,
                expires_in: Some(left)
            }),
            Action::requeue(left)
        );
        assert_eq!(
            secs(Outcome::Done {
                problem: true,
                expires_in: Some(left)
            }),
            Action::requeue(PROBLEM_RETRY),
            "a problem is retried slowly, never in a hot loop"
        );
        assert_eq!(
            secs(Outcome::Done {
                problem: true,
                expires_in: Some(Duration::from_secs(3))
            }),
            Action::requeue(Duration::from_secs(3)),
            "a refused sandbox still expires on time"
        );
        assert_eq!(
            secs(Outcome::Failed),
            Action::requeue(Duration::from_secs(2))
        );
    }

    #[test]
    fn tokens_are_asked_for_once() {
        let add = missing_tokens(
            &object(json!({"opensandbox.io/secure-access": "true"})),
            true,
        );
        assert_eq!(
            add.keys().copied().collect::<Vec<_>>(),
            [
                names::ANNOTATION_EGRESS_AUTH_TOKEN,
                names::ANNOTATION_SECURE_ACCESS_TOKEN
            ]
        );
        let done = object(json!({
            "opensandbox.io/secure-access": "true",
            "opensandbox.io/secure-access-token": "a",
            "opensandbox.io/egress-auth-token": "b",
        }));
        assert!(missing_tokens(&done, true).is_empty());
        assert!(missing_tokens(&object(json!({})), false).is_empty());
    }

    #[test]
    fn policy_annotation() {
        assert_eq!(egress_policy(&object(json!({}))), Ok(None));
        let ok = r#"{"defaultAction":"deny"}"#;
        let obj = object(json!({"opensandbox.io/network-policy": ok}));
        assert_eq!(egress_policy(&obj), Ok(Some(ok)));
        let bad = object(json!({"opensandbox.io/network-policy": "{not json"}));
        assert_eq!(
            egress_policy(&bad).unwrap_err().reason,
            "InvalidNetworkPolicy"
        );
    }

    #[test]
    fn fence_problem_names_every_field() {
        assert_eq!(
            fence_problem(Some(&json!({"spec": {"containers": [{"name": "main"}]}}))),
            None
        );
        let template = json!({"spec": {"hostPID": true, "containers": [{"name": "egress"}]}});
        let p = fence_problem(Some(&template)).unwrap();
        assert_eq!(p.reason, "HostPID");
        assert!(
            p.message.contains("spec.template.spec.hostPID: true"),
            "{}",
            p.message
        );
        assert!(
            p.message
                .contains("; spec.template.spec.containers[0].name: \"egress\""),
            "{}",
            p.message
        );
    }

    #[test]
    fn endpoints_written_only_when_there_is_news() {
        let pod = |ip: Option<&str>| -> Arc<Pod> {
            Arc::new(serde_json::from_value(json!({"status": {"podIP": ip}})).unwrap())
        };
        let none = BTreeMap::from([(0, pod(None))]);
        let one = BTreeMap::from([(0, pod(Some("10.0.0.1"))), (1, pod(None))]);
        assert_eq!(
            endpoints_update(None, &none, 1),
            None,
            "nothing to publish yet"
        );
        assert_eq!(
            endpoints_update(None, &one, 2).as_deref(),
            Some(r#"["10.0.0.1",""]"#)
        );
        assert_eq!(endpoints_update(Some(r#"["10.0.0.1",""]"#), &one, 2), None);
        assert_eq!(
            endpoints_update(Some(r#"["10.0.0.1"]"#), &BTreeMap::new(), 1).as_deref(),
            Some(r#"[""]"#),
            "a published address whose pod is gone is withdrawn"
        );
    }

    #[test]
    fn expiry_forms() {
        assert!(matches!(expiry(None), Expiry::None));
        assert!(matches!(expiry(Some("2000-01-01T00:00:00Z")), Expiry::Due));
        assert!(matches!(
            expiry(Some("2999-06-15T10:00:00.123456+02:00")),
            Expiry::In(_)
        ));
        assert!(
            matches!(expiry(Some("tomorrow")), Expiry::Invalid(m) if m.contains("spec.expireTime"))
        );
    }
}
