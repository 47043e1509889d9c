//! Kubernetes events, recorded off the reconcile path: a pass queues its event and goes on, a
//! few workers post them. When the API server falls behind and the queue is full, events are
//! dropped and counted rather than slowing every pass down.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;

use crate::metrics::metrics;

/// Events waiting to be posted before new ones are dropped.
const QUEUE: usize = 1024;
/// Events posted at once.
const WORKERS: usize = 4;
/// Longest note the API server accepts on an event.
const NOTE_LIMIT: usize = 1024;

#[derive(Clone)]
pub struct Events {
    queue: mpsc::Sender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the workers on the current runtime.
    pub fn start(recorder: Recorder) -> Self {
        let (queue, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let recorder = Arc::new(recorder);
        tokio::spawn(async move {
            futures::stream::poll_fn(|cx| rx.poll_recv(cx))
                .for_each_concurrent(WORKERS, |(event, reference)| {
                    let recorder = recorder.clone();
                    async move {
                        if let Err(e) = recorder.publish(&event, &reference).await {
                            tracing::warn!(error = %e, reason = %event.reason, "could not record event");
                        }
                    }
                })
                .await;
        });
        Events { queue }
    }

    /// Queues an event about `obj`; never waits.
    pub fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        text: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note(text)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if self.queue.try_send((event, obj.object_ref(&()))).is_err() {
            metrics().events_dropped.inc();
        }
    }
}

fn note(text: &str) -> String {
    let mut end = text.len().min(NOTE_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_event_limit() {
        assert_eq!(note("short"), "short");
        let long = "é".repeat(NOTE_LIMIT);
        let cut = note(&long);
        assert!(cut.len() <= NOTE_LIMIT && cut.chars().all(|c| c == 'é'));
    }
}
