//! What every reconcile shares.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::controllers::embedding_pipeline::build::Defaults;
use crate::metrics::Metrics;

/// Reconciles of one controller at a time (each object is reconciled by one at most). A bound
/// keeps a cold start with thousands of pipelines from flooding the apiserver, which would delay
/// the leader's Lease renewals and so close its write fence, and it bounds memory.
pub const RECONCILE_CONCURRENCY: u16 = 16;

/// The namespaces the operator watches (chart value `watchNamespaces`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (the operator needs cluster-wide RBAC).
    #[default]
    Cluster,
    /// Only these (a Role per namespace is enough).
    Namespaces(Vec<String>),
}

impl Scope {
    /// A comma-separated list; empty means the whole cluster.
    pub fn parse(list: &str) -> Self {
        let mut namespaces: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            Self::Cluster
        } else {
            Self::Namespaces(namespaces)
        }
    }

    /// One entry per watch: `None` for the whole cluster, else each namespace.
    pub fn watches(&self) -> Vec<Option<String>> {
        match self {
            Self::Cluster => vec![None],
            Self::Namespaces(list) => list.iter().cloned().map(Some).collect(),
        }
    }
}

/// What pipeline budgets need: the Prometheus server with the workers' token counters, the
/// readers that query it (shared with the scaling controller, which keeps its clients) and the
/// price table.
#[derive(Clone)]
pub struct Spend {
    /// The Prometheus server (the operator's `--prometheus-url`).
    pub prometheus: Option<String>,
    /// How Prometheus is queried.
    pub readers: std::sync::Arc<dyn crate::controllers::scaling_policy::readers::MetricReaders>,
    /// US dollars per 1,000 input tokens, by model.
    pub prices: crate::controllers::embedding_pipeline::budget::PriceTable,
}

impl Default for Spend {
    fn default() -> Self {
        use crate::controllers::scaling_policy::readers::LiveReaders;
        Self {
            prometheus: None,
            readers: std::sync::Arc::new(std::sync::Arc::new(LiveReaders::default())),
            prices: Default::default(),
        }
    }
}

/// An Api over one namespace, or all of them.
pub fn api<K>(client: &kube::Client, namespace: Option<&str>) -> kube::Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    }
}

/// Writes `status` of the object `name` by server-side apply as `manager` (forced: each manager
/// owns its fields). A field the manager owned and leaves out of `status` is removed.
pub async fn apply_status<K>(
    api: &kube::Api<K>,
    name: &str,
    manager: &str,
    status: impl serde::Serialize,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let dynamic = K::DynamicType::default();
    let body = serde_json::json!({
        "apiVersion": K::api_version(&dynamic),
        "kind": K::kind(&dynamic),
        "status": status,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(manager).force(),
        &kube::api::Patch::Apply(body),
    )
    .await
    .map(|_| ())
}

/// Drops what no reconcile reads from a cached object: managedFields and the client-side apply
/// annotation (a second copy of the spec).
pub fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Shared state of the controllers.
pub struct Context {
    /// The Kubernetes client.
    pub client: kube::Client,
    /// The namespaces it watches.
    pub scope: Scope,
    /// Settings that shape the children.
    pub defaults: Defaults,
    /// Metrics.
    pub metrics: Metrics,
    /// Who reports events.
    pub reporter: Reporter,
    /// Recent checks of pipelines' OpenSearch indices.
    pub index_checks: crate::controllers::embedding_pipeline::index::Cache,
    /// Where budgets read the workers' token counters, and what tokens cost.
    pub spend: Spend,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A new context.
    pub fn new(client: kube::Client, scope: Scope, defaults: Defaults, metrics: Metrics) -> Self {
        Self {
            client,
            scope,
            defaults,
            metrics,
            reporter: Reporter {
                controller: "vectorpipe-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            index_checks: Default::default(),
            spend: Spend::default(),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context with the budget settings.
    pub fn with_spend(mut self, spend: Spend) -> Self {
        self.spend = spend;
        self
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

#[cfg(test)]
mod tests {
    use super::Scope;

    #[test]
    fn an_empty_list_is_the_whole_cluster() {
        assert_eq!(Scope::parse(""), Scope::Cluster);
        assert_eq!(Scope::parse(" , "), Scope::Cluster);
        assert_eq!(Scope::Cluster.watches(), vec![None]);
        let scope = Scope::parse("team-b, team-a,team-b");
        assert_eq!(
            scope,
            Scope::Namespaces(vec!["team-a".into(), "team-b".into()])
        );
        assert_eq!(
            scope.watches(),
            vec![Some("team-a".to_owned()), Some("team-b".to_owned())]
        );
    }
}
