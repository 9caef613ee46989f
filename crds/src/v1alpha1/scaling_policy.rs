//! `ScalingPolicy`: how many workers an EmbeddingPipeline runs, from consumer lag, CPU, memory,
//! any PromQL query and cron schedules.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;

/// The desired scaling behaviour of one pipeline.
///
/// Metric alarms follow the usual alarm model: a scale-out alarm fires when at least
/// `datapointsToAlarm` of the last `evaluationPeriods` samples of any metric are above that
/// metric's `scaleOutThreshold`; a scale-in alarm fires when that holds below `scaleInThreshold`
/// for every metric. Schedules then bound the result, and `minReplicas`/`maxReplicas` bound
/// everything.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "vectorpipe.io",
        version = "v1alpha1",
        kind = "ScalingPolicy",
        plural = "scalingpolicies",
        shortname = "sp",
        category = "vectorpipe",
        namespaced,
        status = "ScalingPolicyStatus",
        derive = "PartialEq",
        doc = "Scales an EmbeddingPipeline's workers on consumer lag, CPU, memory, PromQL queries and cron schedules.",
        printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
        printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
        printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
        printcolumn(
            name = "Current",
            type_ = "integer",
            json_path = ".status.currentReplicas"
        ),
        printcolumn(
            name = "Desired",
            type_ = "integer",
            json_path = ".status.desiredReplicas"
        ),
        printcolumn(
            name = "Active",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Active")].status"#
        ),
        printcolumn(
            name = "Mode",
            type_ = "string",
            json_path = ".spec.mode",
            priority = 1
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must not exceed maxReplicas"
    },
    {
        "rule": "self.minReplicas > 0 || (has(self.scaleToZero) && self.scaleToZero.enabled)",
        "message": "minReplicas: 0 needs scaleToZero.enabled: true, so that the pipeline wakes up again when records arrive"
    },
    {
        "rule": "(has(self.metrics) && size(self.metrics) > 0) || (has(self.schedules) && size(self.schedules) > 0)",
        "message": "a ScalingPolicy needs at least one entry in metrics or schedules"
    },
    {
        "rule": "!has(self.fallbackReplicas) || (self.fallbackReplicas >= self.minReplicas && self.fallbackReplicas <= self.maxReplicas)",
        "message": "fallbackReplicas must lie between minReplicas and maxReplicas"
    },
    {
        "rule": "!has(self.schedules) || self.schedules.all(s, !has(s.desiredReplicas) || s.desiredReplicas <= self.maxReplicas)",
        "message": "a schedule's desiredReplicas must not exceed maxReplicas"
    }
]))]
pub struct ScalingPolicySpec {
    /// The pipeline to scale, in the policy's namespace.
    pub target_ref: TargetRef,
    /// The fewest workers.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: i32,
    /// The most workers.
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// Never run more workers than the source topics have partitions (extra consumers would idle).
    #[serde(default = "default_true")]
    pub cap_at_partition_count: bool,
    /// The metrics judged by the alarms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub metrics: Vec<MetricSpec>,
    /// When and how the worker count grows.
    #[serde(default)]
    pub scale_out: ScaleOutRule,
    /// When and how the worker count shrinks; slower than scale-out by default.
    #[serde(default)]
    pub scale_in: ScaleInRule,
    /// Time windows with their own bounds or counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub schedules: Vec<Schedule>,
    /// Going to zero workers when there is nothing to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<ScaleToZero>,
    /// The worker count while metrics cannot be read. When unset, the count is left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub fallback_replicas: Option<i32>,
    /// Polls in a row whose metrics could not be read before `fallbackReplicas` applies (a
    /// single failed read keeps the count as it is).
    #[serde(default = "default_fallback_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub fallback_failure_threshold: i32,
    /// `active` scales; `dryRun` decides and records the decision but changes nothing.
    #[serde(default)]
    pub mode: ScalingMode,
    /// How often metrics are read and the policy is judged.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Where cpu, memory and prometheus metrics are queried. Default: the operator's
    /// `--prometheus-url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusServer>,
    /// Learn whether a scale-out raised throughput, and hold the count when the embedding API's
    /// quota (throttling), not the worker count, bounds it. Reads the workers' records/s and
    /// throttled calls from Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_aware: Option<QuotaAware>,
    /// Decisions kept in `status.history`.
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: i32,
}

/// The pipeline a policy scales.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// The EmbeddingPipeline's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One metric and its alarm thresholds.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.kafkaLag) ? 1 : 0) + (has(self.timeLag) ? 1 : 0) + (has(self.cpu) ? 1 : 0) + (has(self.memory) ? 1 : 0) + (has(self.prometheus) ? 1 : 0) + (has(self.freshness) ? 1 : 0) == 1",
        "message": "a metric sets exactly one of kafkaLag, timeLag, cpu, memory, prometheus or freshness"
    },
    {
        "rule": "has(self.scaleOutThreshold) || has(self.scaleInThreshold) || has(self.freshness)",
        "message": "a metric needs scaleOutThreshold, scaleInThreshold or both (freshness has its targetSeconds)"
    },
    {
        "rule": "!has(self.scaleOutThreshold) || !has(self.scaleInThreshold) || self.scaleInThreshold < self.scaleOutThreshold",
        "message": "scaleInThreshold must be below scaleOutThreshold, or the policy would flap"
    }
]))]
pub struct MetricSpec {
    /// Records not yet committed by the pipeline's consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_lag: Option<KafkaLagMetric>,
    /// Seconds needed to drain the lag at the observed consume rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_lag: Option<TimeLagMetric>,
    /// Worker CPU use, percent of the requested CPU (averaged over the workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<ResourceMetric>,
    /// Worker memory use, percent of the requested memory (averaged over the workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ResourceMetric>,
    /// Any PromQL query that returns one number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusMetric>,
    /// How fresh the index is: a percentile of the seconds from a record's Kafka timestamp to
    /// OpenSearch acknowledging it, read from Prometheus (the workers'
    /// `vectorpipe_worker_freshness_seconds`). Scales out above `targetSeconds` and in below half
    /// of it, unless the thresholds say otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<FreshnessMetric>,
    /// Scale out while the metric is above this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_out_threshold: Option<f64>,
    /// Scale in while the metric is below this value (for every metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_in_threshold: Option<f64>,
}

impl MetricSpec {
    /// The value above which the metric asks for more workers: `scaleOutThreshold`, else a
    /// freshness metric's target.
    pub fn out_threshold(&self) -> Option<f64> {
        self.scale_out_threshold
            .or_else(|| self.freshness.as_ref().map(|f| f.target_seconds))
    }

    /// The value below which the metric allows fewer workers: `scaleInThreshold`, else half a
    /// freshness metric's target.
    pub fn in_threshold(&self) -> Option<f64> {
        self.scale_in_threshold
            .or_else(|| self.freshness.as_ref().map(|f| f.target_seconds / 2.0))
    }
}

/// An index freshness objective.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FreshnessMetric {
    /// The percentile of records judged, e.g. 95: 95 % of records are searchable within
    /// `targetSeconds` of their Kafka timestamp.
    #[serde(default = "default_freshness_percentile")]
    #[schemars(range(min = 1, max = 99.9))]
    pub percentile: f64,
    /// The objective, in seconds.
    #[schemars(range(min = 0.1))]
    pub target_seconds: f64,
    /// The window the percentile is taken over (a PromQL range: at least four scrape intervals).
    #[serde(default = "default_freshness_window")]
    pub window: Duration,
}

fn default_freshness_percentile() -> f64 {
    95.0
}

fn default_freshness_window() -> Duration {
    Duration::from_minutes(2)
}

/// Consumer lag in records.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct KafkaLagMetric {
    /// How partition lags are combined.
    pub aggregation: LagAggregation,
}

/// Ways to combine per-partition lag.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LagAggregation {
    /// All partitions added up.
    Sum,
    /// The partition with the most lag.
    Max,
    /// The sum divided by the current worker count.
    #[default]
    PerReplica,
}

/// Time to drain the backlog.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TimeLagMetric {
    /// The window over which the consume rate is measured.
    pub rate_window: Duration,
}

impl Default for TimeLagMetric {
    fn default() -> Self {
        Self {
            rate_window: Duration::from_minutes(1),
        }
    }
}

/// CPU or memory of the worker pods, read from Prometheus (cAdvisor / kubelet metrics).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceMetric {
    /// Overrides the PromQL query; `$namespace` and `$pipeline` are replaced. The query must
    /// return a percentage.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub query: Option<String>,
}

/// A custom PromQL metric.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusMetric {
    /// The query; it must return a single sample. `$namespace` and `$pipeline` are replaced.
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
    /// A name for the value in status and events. Default: `prometheus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z][a-zA-Z0-9_]{0,62}$"))]
    pub name: Option<String>,
}

/// A Prometheus server.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusServer {
    /// The server's base URL, e.g. `http://prometheus-operated.monitoring:9090`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub address: String,
}

/// Declares a scaling rule type whose every field has its own default (so a partial rule such as
/// `{operation: multiply, factor: 3}` takes the rest from the defaults): scale-out and scale-in
/// share the shape but not the defaults.
macro_rules! scaling_rule {
    ($(#[$doc:meta])* $name:ident {
        evaluation_periods: $periods:expr,
        datapoints_to_alarm: $datapoints:expr,
        operation: $operation:expr,
        factor: $factor:expr,
        cooldown: $cooldown:expr $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
        #[serde(rename_all = "camelCase", default)]
        #[schemars(extend("x-kubernetes-validations" = [
            {
                "rule": "self.datapointsToAlarm <= self.evaluationPeriods",
                "message": "datapointsToAlarm must not exceed evaluationPeriods"
            },
            {
                "rule": "self.operation != 'multiply' || self.factor > 1.0",
                "message": "a multiply step needs a factor above 1"
            },
            {
                "rule": "self.operation != 'add' || self.factor >= 1.0",
                "message": "an add step needs a factor of at least 1"
            }
        ]))]
        pub struct $name {
            /// Samples looked at.
            #[schemars(range(min = 1, max = 100))]
            pub evaluation_periods: i32,
            /// Samples among them that must breach the threshold.
            #[schemars(range(min = 1, max = 100))]
            pub datapoints_to_alarm: i32,
            /// `add` adds (or removes) `factor` workers; `multiply` multiplies (or divides) by
            /// `factor`.
            pub operation: ScalingOperation,
            /// The step size.
            #[schemars(range(min = 1.0, max = 1024.0))]
            pub factor: f64,
            /// The wait after a change in this direction before the alarm is judged again.
            pub cooldown: Duration,
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    evaluation_periods: $periods,
                    datapoints_to_alarm: $datapoints,
                    operation: $operation,
                    factor: $factor,
                    cooldown: $cooldown,
                }
            }
        }
    };
}

scaling_rule!(
    /// How the worker count grows when the scale-out alarm fires. Default: double after 2 of 2
    /// samples, then wait a minute.
    ScaleOutRule {
        evaluation_periods: 2,
        datapoints_to_alarm: 2,
        operation: ScalingOperation::Multiply,
        factor: 2.0,
        cooldown: Duration::from_secs(60),
    }
);

scaling_rule!(
    /// How the worker count shrinks when the scale-in alarm fires. Default: one fewer after 5 of
    /// 5 samples, then wait five minutes.
    ScaleInRule {
        evaluation_periods: 5,
        datapoints_to_alarm: 5,
        operation: ScalingOperation::Add,
        factor: 1.0,
        cooldown: Duration::from_minutes(5),
    }
);

/// Step kinds.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ScalingOperation {
    /// Add or subtract `factor` workers.
    Add,
    /// Multiply or divide by `factor`, rounding away from the current count.
    Multiply,
}

/// A recurring time window.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.desiredReplicas) != (has(self.minReplicas) || has(self.maxReplicas))",
        "message": "a schedule sets either desiredReplicas, or minReplicas and/or maxReplicas"
    },
    {
        "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
        "message": "a schedule's minReplicas must not exceed its maxReplicas"
    }
]))]
pub struct Schedule {
    /// A name for status and events. Default: `schedule-<position>` (from 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: Option<String>,
    /// When the window opens: a five-field cron expression (minute hour day-of-month month
    /// day-of-week), e.g. `0 8 * * MON-FRI`.
    #[schemars(regex(pattern = r"^\S+( +\S+){4}$"))]
    pub cron: String,
    /// The IANA time zone of `cron`, e.g. `Europe/Paris`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// How long the window stays open.
    pub duration: Duration,
    /// The exact worker count while open (still within the policy's min and max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub desired_replicas: Option<i32>,
    /// A floor while open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: Option<i32>,
    /// A ceiling while open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1024))]
    pub max_replicas: Option<i32>,
}

impl Schedule {
    /// The name shown in status and events: its own, or `schedule-<index>`.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("schedule-{index}"))
    }
}

/// Quota-aware scaling: a scale-out that raised the records/s by less than `minGainPercent`
/// while embedding calls were throttled is undone, down to the fewest workers that reach the
/// same rate, and further scale-outs wait for `relearnAfter`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct QuotaAware {
    /// Judge scale-outs by their effect on throughput.
    pub enabled: bool,
    /// A scale-out that raised throughput by less than this many percent did not help.
    #[schemars(range(min = 1, max = 100))]
    pub min_gain_percent: f64,
    /// The share of embedding calls throttled, in percent, from which the API counts as
    /// throttling.
    #[schemars(range(min = 0.1, max = 100))]
    pub throttled_share_percent: f64,
    /// Time after a change of the count before measuring (workers start and the group
    /// rebalances).
    pub settle_time: Duration,
    /// The window throughput and throttling are measured over (a PromQL range: at least four
    /// scrape intervals).
    pub measure_window: Duration,
    /// How long a learned quota bound holds before a scale-out is tried again (a raised quota is
    /// found within this time).
    pub relearn_after: Duration,
}

impl Default for QuotaAware {
    fn default() -> Self {
        Self {
            enabled: true,
            min_gain_percent: 10.0,
            throttled_share_percent: 5.0,
            settle_time: Duration::from_secs(30),
            measure_window: Duration::from_minutes(1),
            relearn_after: Duration::from_minutes(30),
        }
    }
}

impl QuotaAware {
    /// Time from a change of the count to its first measurement.
    pub fn measure_after(&self) -> std::time::Duration {
        self.settle_time.get() + self.measure_window.get()
    }
}

/// Scaling to zero workers.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ScaleToZero {
    /// Allow zero workers when the consumer lag is zero.
    pub enabled: bool,
    /// The lag that wakes a pipeline at zero workers.
    #[schemars(range(min = 1))]
    pub activation_threshold: i64,
    /// How long the lag must stay at zero before the last worker stops.
    pub idle_after: Duration,
}

impl Default for ScaleToZero {
    fn default() -> Self {
        Self {
            enabled: false,
            activation_threshold: 1,
            idle_after: Duration::from_minutes(5),
        }
    }
}

/// Whether a policy changes anything.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMode {
    /// Decide and scale.
    #[default]
    Active,
    /// Decide and record only.
    DryRun,
}

/// The observed state of a scaling policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Active`, `AbleToScale` and `ScalingLimited`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The target's worker count when last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// The worker count the policy wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the policy last changed the worker count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The latest decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<ScalingDecision>,
    /// Recent decisions that changed (or, in dry-run, would have changed) the count, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ScalingDecision>,
}

/// One judgement of a policy.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    /// When it was made.
    pub time: Time,
    /// The count before.
    pub from_replicas: i32,
    /// The count chosen.
    pub to_replicas: i32,
    /// Why, in CamelCase (e.g. `ScaleOutAlarm`, `ScheduleFloor`, `CoolingDown`).
    pub reason: String,
    /// Why, for people.
    pub message: String,
    /// The metric values it used, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, f64>,
    /// Whether the count was changed (false in dry-run or when nothing changed).
    pub applied: bool,
}

fn default_true() -> bool {
    true
}

fn default_min_replicas() -> i32 {
    1
}

fn default_fallback_failure_threshold() -> i32 {
    3
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_history_limit() -> i32 {
    10
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}
