//! The operator's Prometheus metrics (`vectorpipe_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `embeddingpipeline` or `scalingpolicy`.
    pub controller: String,
}

/// Labels naming a controller, the reconcile step that failed and the kind of failure (all
/// static strings: see [`crate::error::Error`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller.
    pub controller: &'static str,
    /// The step: dereference, build, apply, status or finalize.
    pub step: &'static str,
    /// What failed, e.g. `kubernetes-api`.
    pub kind: &'static str,
}

impl ErrorLabels {
    /// The labels of `error` in `controller`.
    pub fn of(controller: &'static str, error: &crate::error::Error) -> Self {
        Self {
            controller,
            step: error.step().as_str(),
            kind: error.kind(),
        }
    }
}

/// Labels naming a pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pipeline: String,
}

/// Labels naming a scaling policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub policy: String,
}

/// Labels of a scale change.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy.
    pub policy: String,
    /// `out` or `in`.
    pub direction: String,
}

/// Labels naming a metric source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `kafka` or `prometheus`.
    pub source: String,
}

/// Operator metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconcile failures by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Seconds per reconcile.
    pub duration: Family<ControllerLabel, Histogram>,
    /// Consumer lag of each scaled pipeline, as the scaling controller last read it.
    pub consumer_lag: Family<PipelineLabels, Gauge>,
    /// The worker count each policy wants.
    pub desired_replicas: Family<PolicyLabels, Gauge>,
    /// Scale changes made, by direction.
    pub scale_changes: Family<ScaleLabels, Counter>,
    /// Metric reads that failed, by source.
    pub metric_read_errors: Family<SourceLabel, Counter>,
    /// Input tokens each pipeline with a budget spent since its budget day began.
    pub budget_tokens: Family<PipelineLabels, Gauge>,
    /// Their estimated cost in US dollars.
    pub budget_cost: Family<PipelineLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while a pipeline's daily budget is used up.
    pub budget_exceeded: Family<PipelineLabels, Gauge>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> (Self, Registry) {
        let mut registry = Registry::with_prefix("vectorpipe_operator");
        let metrics = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            consumer_lag: Family::default(),
            desired_replicas: Family::default(),
            scale_changes: Family::default(),
            metric_read_errors: Family::default(),
            budget_tokens: Family::default(),
            budget_cost: Family::default(),
            budget_exceeded: Family::default(),
        };
        registry.register("reconciles", "Reconciles run", metrics.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile failures, by kind",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Seconds per reconcile",
            metrics.duration.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records behind of each scaled pipeline's consumer group, as last read",
            metrics.consumer_lag.clone(),
        );
        registry.register(
            "scaling_desired_replicas",
            "The worker count each ScalingPolicy wants",
            metrics.desired_replicas.clone(),
        );
        registry.register(
            "scaling_changes",
            "Worker count changes made by ScalingPolicies, by direction",
            metrics.scale_changes.clone(),
        );
        registry.register(
            "budget_tokens",
            "Input tokens each pipeline with spec.budget spent since its budget day began",
            metrics.budget_tokens.clone(),
        );
        registry.register(
            "budget_estimated_cost_usd",
            "The estimated cost of those tokens in US dollars, from the price table",
            metrics.budget_cost.clone(),
        );
        registry.register(
            "budget_exceeded",
            "1 while a pipeline's daily embedding budget is used up",
            metrics.budget_exceeded.clone(),
        );
        registry.register(
            "scaling_metric_read_errors",
            "Metric reads that failed, by source",
            metrics.metric_read_errors.clone(),
        );
        // Series known in advance exist at 0 from the start: increase() and rate() then see
        // the first reconcile error or failed read, and dashboards find them before it.
        for controller in [
            crate::controllers::embedding_pipeline::CONTROLLER,
            crate::controllers::scaling_policy::CONTROLLER,
        ] {
            let label = ControllerLabel {
                controller: controller.into(),
            };
            let _ = metrics.reconciles.get_or_create(&label);
            let _ = metrics.duration.get_or_create(&label);
            for (step, kind) in crate::error::Error::LABELS {
                let _ = metrics.errors.get_or_create(&ErrorLabels {
                    controller,
                    step: step.as_str(),
                    kind,
                });
            }
        }
        for source in ["kafka", "prometheus"] {
            let _ = metrics.metric_read_errors.get_or_create(&SourceLabel {
                source: source.into(),
            });
        }
        (metrics, registry)
    }
}
