//! The BatchSandbox status, computed from the pods that exist.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// Waiting reasons that mean a sandbox pod will not come up by itself.
const FAILING_REASONS: [&str; 4] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
];

/// Why a pod is failing, if it is.
pub fn pod_failure(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "pod {name} terminated: {}",
            status.reason.as_deref().unwrap_or("Failed")
        ));
    }
    let containers = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    for c in containers {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(reason) = waiting
            .and_then(|w| w.reason.as_deref())
            .filter(|r| FAILING_REASONS.contains(r))
        {
            let message = waiting.and_then(|w| w.message.as_deref()).unwrap_or("");
            return Some(
                format!("pod {name} container {}: {reason} {message}", c.name)
                    .trim_end()
                    .to_owned(),
            );
        }
    }
    None
}

pub fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod_ip(pod).is_some()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// One condition; `lastTransitionTime` is kept from `previous` when the status did not change.
fn condition(
    previous: &Value,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let old = previous
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_));
    let since = match old {
        Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    json!({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
}

/// Something that stops the controller itself from making the sandbox (a refused template, a
/// bad annotation, a pod the API server refuses); it will not go away without a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Condition and event reason, e.g. `ForbiddenCapability`.
    pub reason: &'static str,
    /// Names the field or object at fault.
    pub message: String,
}

/// Whether `previous` already reports `problem`, so it has been announced.
pub fn reports(previous: &Value, problem: &Problem) -> bool {
    previous
        .get("conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "PodFailed"
                    && c["status"] == "True"
                    && c["reason"] == problem.reason
                    && c["message"] == problem.message.as_str()
            })
        })
}

pub struct Observed<'a> {
    pub generation: i64,
    pub desired: u32,
    /// Pods that exist, by index.
    pub pods: &'a [&'a Pod],
    /// A problem that stops the controller itself (pod creation refused, bad policy, bad
    /// expireTime, a template that breaks the egress fence).
    pub problem: Option<Problem>,
}

/// The status to write, given what was observed and the previous status.
pub fn compute(observed: &Observed<'_>, previous: &Value, now: &str) -> Value {
    let replicas = observed.pods.len();
    let allocated = observed.pods.iter().filter(|p| pod_ip(p).is_some()).count();
    let ready = observed.pods.iter().filter(|p| pod_ready(p)).count();
    let failure = observed.problem.clone().or_else(|| {
        observed
            .pods
            .iter()
            .find_map(|p| pod_failure(p))
            .map(|message| Problem {
                reason: "PodFailed",
                message,
            })
    });
    let all_ready = ready >= observed.desired as usize;
    let phase = if failure.is_some() {
        "Failed"
    } else if all_ready {
        "Succeed"
    } else {
        "Pending"
    };
    let mut conditions = vec![
        condition(
            previous,
            "Ready",
            all_ready && failure.is_none(),
            if all_ready {
                "PodsReady"
            } else {
                "PodsNotReady"
            },
            &format!("{ready}/{} pods ready", observed.desired),
            now,
        ),
        condition(
            previous,
            "Progressing",
            !all_ready && failure.is_none(),
            "Creating",
            &format!("{replicas}/{} pods created", observed.desired),
            now,
        ),
    ];
    if let Some(p) = &failure {
        conditions.push(condition(
            previous,
            "PodFailed",
            true,
            p.reason,
            &p.message,
            now,
        ));
    }
    json!({
        "observedGeneration": observed.generation,
        "replicas": replicas,
        "allocated": allocated,
        "ready": ready,
        "taskRunning": 0, "taskSucceed": 0, "taskFailed": 0, "taskPending": 0, "taskUnknown": 0,
        "phase": phase,
        "conditions": conditions,
    })
}

/// Whether two statuses differ in anything but condition timestamps.
pub fn differs(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs {
                if let Some(m) = c.as_object_mut() {
                    m.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: Option<&str>, ready: bool, waiting: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{"name": "main", "image": "i", "imageID": "", "ready": ready, "restartCount": 3,
                    "state": waiting.map_or(json!({"running": {}}), |r| json!({"waiting": {"reason": r, "message": "back-off"}}))}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_problem_fails_the_sandbox_and_is_reported_once() {
        let problem = Problem {
            reason: "HostNetwork",
            message: "spec.template.spec.hostNetwork: true would put the sandbox outside the egress fence".into(),
        };
        let observed = Observed {
            generation: 1,
            desired: 1,
            pods: &[],
            problem: Some(problem.clone()),
        };
        let s = compute(&observed, &json!({}), "t0");
        assert_eq!(s["phase"], "Failed");
        assert_eq!(
            (
                s["conditions"][2]["type"].as_str(),
                s["conditions"][2]["reason"].as_str()
            ),
            (Some("PodFailed"), Some("HostNetwork"))
        );
        assert!(!reports(&json!({}), &problem));
        assert!(reports(&s, &problem));
        let other = Problem {
            reason: "HostNetwork",
            message: "spec.template.spec.hostNetwork: true (changed)".into(),
        };
        assert!(!reports(&s, &other), "a changed message is news");
    }

    #[test]
    fn phases_and_conditions() {
        let (a, b) = (
            pod("bs-0", Some("10.0.0.1"), true, None),
            pod("bs-1", None, false, None),
        );
        let pods = [&a, &b];
        let s = compute(
            &Observed {
                generation: 2,
                desired: 2,
                pods: &pods,
                problem: None,
            },
            &json!({}),
            "t0",
        );
        assert_eq!(
            (
                s["ready"].as_i64(),
                s["allocated"].as_i64(),
                s["phase"].as_str()
            ),
            (Some(1), Some(1), Some("Pending"))
        );
        let c = pod("bs-1", Some("10.0.0.2"), true, None);
        let pods = [&a, &c];
        let done = compute(
            &Observed {
                generation: 2,
                desired: 2,
                pods: &pods,
                problem: None,
            },
            &s,
            "t1",
        );
        assert_eq!(done["phase"], "Succeed");
        assert_eq!(done["conditions"][0]["reason"], "PodsReady");
        let crash = pod("bs-1", Some("10.0.0.2"), false, Some("CrashLoopBackOff"));
        let pods = [&a, &crash];
        let failed = compute(
            &Observed {
                generation: 2,
                desired: 2,
                pods: &pods,
                problem: None,
            },
            &done,
            "t2",
        );
        assert_eq!(failed["phase"], "Failed");
        assert!(
            failed["conditions"][2]["message"]
                .as_str()
                .unwrap()
                .contains("CrashLoopBackOff")
        );
        assert!(!differs(
            &done,
            &compute(
                &Observed {
                    generation: 2,
                    desired: 2,
                    pods: &[&a, &c],
                    problem: None
                },
                &done,
                "t9"
            )
        ));
    }
}
