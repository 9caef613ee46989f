//! The operator's Prometheus metrics (`vectorpipe_operator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `embeddingpipeline` or `scalingpolicy`.
    pub controller: String,
}

/// Labels naming a controller and an error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The controller.
    pub controller: String,
    /// What failed.
    pub error: String,
}

/// Operator metrics.
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconcile failures by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Seconds per reconcile.
    pub duration: Family<ControllerLabel, Histogram>,
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
        (metrics, registry)
    }
}
