//! What every reconcile shares.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::controllers::embedding_pipeline::build::Defaults;
use crate::metrics::Metrics;

/// Shared state of the controllers.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// Settings that shape the children.
    pub defaults: Defaults,
    /// Metrics.
    pub metrics: Metrics,
    /// Who reports events.
    pub reporter: Reporter,
    /// Recent checks of pipelines' OpenSearch indices.
    pub index_checks: crate::controllers::embedding_pipeline::index::Cache,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A new context.
    pub fn new(client: kube::Client, defaults: Defaults, metrics: Metrics) -> Self {
        Self {
            client,
            defaults,
            metrics,
            reporter: Reporter {
                controller: "vectorpipe-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            index_checks: Default::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure of `key` and returns how long to wait before the next try:
    /// 1 s, 2 s, 4 s … up to 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_owned()).or_default();
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// Publishes a Kubernetes Event about `object`; a failure is logged, never raised.
    pub async fn publish(
        &self,
        object: ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &object).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }

    /// Forgets the failures of `key` after a success.
    pub fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}
