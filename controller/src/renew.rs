//! OSEP-0009, the consuming side: renew intents that gateways push onto a Redis list extend
//! the expiry of BatchSandboxes that opted in with `opensandbox.io/access-renew-extend-seconds`.
//!
//! Only the leader consumes (`BRPOP`, oldest first). For each intent: skip it when malformed,
//! older than five minutes, for no known sandbox (or for a name in two namespaces), for a sandbox
//! that did not opt in or has no expiry; else set `spec.expireTime` to
//! `max(current, observed_at + extend)`, never earlier, guarded by the object's resource version.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use prometheus::{IntCounterVec, IntGauge};
use redis::aio::MultiplexedConnection;
use sandbox_api::renew::{self, ANNOTATION_EXTEND_SECONDS, Intent};
use serde_json::json;

use crate::events::Events;
use crate::metrics::metrics;
use crate::object::BatchSandbox;

/// How long one `BRPOP` waits before asking again (and noticing a dead connection).
const POP_WAIT_SECONDS: f64 = 5.0;
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An intent is a hundred bytes or so; anything far larger on the list is not one.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Conflicting writers are rare; after this many 409s the intent is given up (counted).
const ATTEMPTS: usize = 3;

pub struct Consumer {
    pub client: redis::Client,
    pub queue_key: String,
    pub sandboxes: Store<BatchSandbox>,
    pub kube: Client,
    pub events: Events,
}

/// What became of one intent, as the metric's labels.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Renewed,
    Malformed,
    Ignored(&'static str),
}

impl Consumer {
    /// Takes intents until the process ends.
    pub async fn run(self) {
        let up: IntGauge = metrics().renew_redis_up.clone();
        let counts: IntCounterVec = metrics().renew_intents.clone();
        let mut backoff = BACKOFF_FIRST;
        // Whether the last attempt failed, so an outage is logged once.
        let mut was_up = None;
        loop {
            let mut conn = match self.connect().await {
                Ok(c) => c,
                Err(error) => {
                    up.set(0);
                    if was_up != Some(false) {
                        tracing::warn!(%error, "renew intents: Redis unavailable; retrying");
                    }
                    was_up = Some(false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            up.set(1);
            tracing::info!(queue_key = %self.queue_key, "renew intents: consuming");
            backoff = BACKOFF_FIRST;
            loop {
                let popped = tokio::time::timeout(
                    REDIS_TIMEOUT,
                    redis::cmd("BRPOP")
                        .arg(&self.queue_key)
                        .arg(POP_WAIT_SECONDS)
                        .query_async::<Option<(String, Vec<u8>)>>(&mut conn),
                )
                .await;
                let payload = match popped {
                    Ok(Ok(Some((_, payload)))) => payload,
                    Ok(Ok(None)) => continue,
                    Ok(Err(e)) => {
                        up.set(0);
                        tracing::warn!(error = %e, "renew intents: Redis failed; reconnecting");
                        was_up = Some(false);
                        break;
                    }
                    Err(_) => {
                        up.set(0);
                        tracing::warn!("renew intents: Redis did not answer; reconnecting");
                        was_up = Some(false);
                        break;
                    }
                };
                let outcome = self.handle(&payload, Timestamp::now()).await;
                let (label, reason) = match &outcome {
                    Outcome::Renewed => ("renewed", ""),
                    Outcome::Malformed => ("malformed", ""),
                    Outcome::Ignored(reason) => ("ignored", *reason),
                };
                counts.with_label_values(&[label, reason]).inc();
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        // BRPOP holds the connection for its wait: the response timeout must outlast it.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(None);
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => Ok(c),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn handle(&self, payload: &[u8], now: Timestamp) -> Outcome {
        if payload.len() > MAX_PAYLOAD {
            return Outcome::Malformed;
        }
        let intent = match renew::decode(payload) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "renew intents: skipped a malformed entry");
                return Outcome::Malformed;
            }
        };
        let Ok(observed) = intent.observed_at.parse::<Timestamp>() else {
            tracing::debug!(observed_at = %intent.observed_at, "renew intents: observed_at is not RFC 3339");
            return Outcome::Malformed;
        };
        // An intent from the future (a skewed clock, a forged entry) counts as seen now.
        let observed = observed.min(now);
        if now.duration_since(observed)
            > SignedDuration::try_from(renew::MAX_AGE).unwrap_or_default()
        {
            return Outcome::Ignored("stale");
        }
        let matches = self
            .sandboxes
            .state_filter(|o| o.metadata.name.as_deref() == Some(intent.sandbox_id.as_str()));
        let obj = match matches.as_slice() {
            [] => return Outcome::Ignored("unknown_sandbox"),
            [one] => one.clone(),
            _ => return Outcome::Ignored("ambiguous_sandbox"),
        };
        let Some(annotation) = obj.annotation(ANNOTATION_EXTEND_SECONDS) else {
            return Outcome::Ignored("not_opted_in");
        };
        let extend = match renew::extend_seconds(annotation) {
            Ok(s) => s,
            Err(message) => {
                self.events.publish(
                    obj.as_ref(),
                    EventType::Warning,
                    "InvalidRenewExtension",
                    &format!("{message}; access does not renew this sandbox"),
                );
                return Outcome::Ignored("invalid_annotation");
            }
        };
        self.extend(&obj, &intent, observed, extend).await
    }

    /// Moves `spec.expireTime` to `observed + extend` when that is later, re-reading the object
    /// when someone else wrote it in between.
    async fn extend(
        &self,
        cached: &BatchSandbox,
        intent: &Intent,
        observed: Timestamp,
        extend: i64,
    ) -> Outcome {
        let Some(namespace) = cached.metadata.namespace.as_deref() else {
            return Outcome::Ignored("unknown_sandbox");
        };
        let api: Api<BatchSandbox> = Api::namespaced(self.kube.clone(), namespace);
        let Ok(target) = observed.checked_add(SignedDuration::from_secs(extend)) else {
            return Outcome::Ignored("invalid_annotation");
        };
        // Whole seconds, rounded up: never earlier than asked.
        let target = match Timestamp::from_second(
            target.as_second() + i64::from(target.subsec_nanosecond() > 0),
        ) {
            Ok(t) => t,
            Err(_) => return Outcome::Ignored("invalid_annotation"),
        };
        let mut current = cached.clone();
        for _ in 0..ATTEMPTS {
            let Some(expire) = current.spec.expire_time.as_deref() else {
                return Outcome::Ignored("no_expiry");
            };
            let Ok(expire) = expire.parse::<Timestamp>() else {
                // The reconciler reports the bad field; nothing to extend from.
                return Outcome::Ignored("no_expiry");
            };
            if target <= expire {
                return Outcome::Ignored("already_later");
            }
            let patch = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "spec": {"expireTime": target.to_string()},
            });
            match api
                .patch(
                    &current.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(
                        %namespace,
                        sandbox = %intent.sandbox_id,
                        from = %expire,
                        to = %target,
                        observed_at = %intent.observed_at,
                        "renewed on access"
                    );
                    return Outcome::Renewed;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    match api.get(&current.name_any()).await {
                        Ok(fresh) => current = fresh,
                        Err(_) => return Outcome::Ignored("conflict"),
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Outcome::Ignored("unknown_sandbox");
                }
                Err(e) => {
                    tracing::warn!(error = %e, %namespace, sandbox = %intent.sandbox_id, "renew intents: patch failed");
                    return Outcome::Ignored("api_error");
                }
            }
        }
        Outcome::Ignored("conflict")
    }
}
