//! The scaling decision: a pure function of the policy, a window of metric samples, the current
//! worker count, the partition count, the time and the policy's history. No I/O, so every rule is
//! covered by table tests and a property test.
//!
//! Rules, in order:
//! 1. Metrics unreadable: `fallbackReplicas` if set, else keep the current count.
//! 2. Scale to zero: with `scaleToZero.enabled`, zero workers once the lag has been 0 for
//!    `idleAfter`; from zero, wake up (to `max(minReplicas, 1)`) when the lag reaches
//!    `activationThreshold`.
//! 3. Scale-out alarm: for any metric, at least `datapointsToAlarm` of the last
//!    `evaluationPeriods` samples are above its `scaleOutThreshold` (missing samples do not
//!    breach). Step up by `add` or `multiply`, unless the scale-out cooldown (since the last
//!    scale-out) is still running.
//! 4. Scale-in alarm: every metric with a `scaleInThreshold` has its samples below it in the same
//!    way. Step down, unless the scale-in cooldown (since the last change either way) is running,
//!    or a backlog is still draining (the lag fell at every sample of the window and is not 0).
//! 5. Bounds: `[minReplicas, maxReplicas]`; with `capAtPartitionCount`, never more workers than
//!    partitions (the cap wins over `minReplicas`: extra consumers would idle), and a scale-out
//!    never goes past the partitions that have lag.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use vectorpipe_crds::v1alpha1::{MetricSpec, ScalingOperation, ScalingPolicySpec};

/// The name a metric's values go by in samples, status and events.
pub fn metric_name(index: usize, metric: &MetricSpec) -> String {
    if metric.kafka_lag.is_some() {
        "kafkaLag".into()
    } else if metric.time_lag.is_some() {
        "timeLag".into()
    } else if metric.cpu.is_some() {
        "cpu".into()
    } else if metric.memory.is_some() {
        "memory".into()
    } else if metric.freshness.is_some() {
        "freshness".into()
    } else {
        metric
            .prometheus
            .as_ref()
            .and_then(|p| p.name.clone())
            .unwrap_or_else(|| format!("prometheus{index}"))
    }
}

/// One poll's metric values, by [`metric_name`]; a metric that could not be read is absent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Values by metric name.
    pub values: BTreeMap<String, f64>,
    /// The consumer lag summed over all partitions, when read.
    pub total_lag: Option<f64>,
}

/// What the decision looks at.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The policy.
    pub spec: &'a ScalingPolicySpec,
    /// Recent samples, oldest first.
    pub window: &'a [Sample],
    /// Whether the latest poll could read the metrics.
    pub metrics_available: bool,
    /// Polls in a row, up to and including this one, whose metrics could not all be read.
    pub failed_polls: u32,
    /// The target's worker count now.
    pub current: i32,
    /// Partitions of the source topics, when known.
    pub partitions: Option<i32>,
    /// Partitions with lag, when known.
    pub partitions_with_lag: Option<i32>,
    /// Now.
    pub now: Timestamp,
    /// When the policy last scaled out.
    pub last_scale_out: Option<Timestamp>,
    /// When the policy last scaled in.
    pub last_scale_in: Option<Timestamp>,
    /// Since when the lag has been 0 (kept by the controller).
    pub idle_since: Option<Timestamp>,
}

/// Why the count is what it is (the status reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A scale-out alarm fired.
    ScaleOutAlarm,
    /// A scale-in alarm fired.
    ScaleInAlarm,
    /// No alarm; the count stays (within bounds).
    WithinThresholds,
    /// An alarm fired but its cooldown is running.
    CoolingDown,
    /// Scale-in held back while the backlog drains.
    BacklogDraining,
    /// Idle long enough: zero workers.
    ScaledToZero,
    /// Woken from zero by lag.
    Activated,
    /// Metrics could not be read.
    MetricsUnavailable,
    /// A scale-out alarm, held (or undone) because the embedding API's quota bounds throughput.
    QuotaBound,
    /// A scale-out alarm, held until the last scale-out's throughput is measured.
    MeasuringThroughput,
}

impl Reason {
    /// The CamelCase form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleOutAlarm => "ScaleOutAlarm",
            Self::ScaleInAlarm => "ScaleInAlarm",
            Self::WithinThresholds => "WithinThresholds",
            Self::CoolingDown => "CoolingDown",
            Self::BacklogDraining => "BacklogDraining",
            Self::ScaledToZero => "ScaledToZero",
            Self::Activated => "Activated",
            Self::MetricsUnavailable => "MetricsUnavailable",
            Self::QuotaBound => "QuotaBound",
            Self::MeasuringThroughput => "MeasuringThroughput",
        }
    }
}

/// A bound that clipped the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `minReplicas`.
    Min,
    /// `maxReplicas`.
    Max,
    /// The partition count.
    Partitions,
    /// The partitions with lag.
    PartitionsWithLag,
    /// The embedding API's quota: more workers only add throttling.
    Quota,
}

impl Limit {
    /// The CamelCase form for the ScalingLimited condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Min => "AtMinReplicas",
            Self::Max => "AtMaxReplicas",
            Self::Partitions => "CappedAtPartitions",
            Self::PartitionsWithLag => "CappedAtPartitionsWithLag",
            Self::Quota => "QuotaBound",
        }
    }
}

/// The outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The worker count wanted.
    pub desired: i32,
    /// Why.
    pub reason: Reason,
    /// Why, for people.
    pub message: String,
    /// The bound that clipped it, if any.
    pub limited_by: Option<Limit>,
}

fn elapsed(since: Option<Timestamp>, now: Timestamp) -> Duration {
    since
        .map(|t| now.duration_since(t))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::MAX)
}

/// How many of the last `periods` samples of `name` satisfy `breach`.
fn breaching(
    window: &[Sample],
    name: &str,
    periods: usize,
    breach: impl Fn(f64) -> bool,
) -> Option<usize> {
    if window.len() < periods {
        return None; // not enough data to judge
    }
    Some(
        window[window.len() - periods..]
            .iter()
            .filter(|s| s.values.get(name).is_some_and(|v| breach(*v)))
            .count(),
    )
}

/// One step of a scaling rule: how it changes the count and by what.
#[derive(Clone, Copy, Debug)]
struct Step {
    operation: ScalingOperation,
    factor: f64,
}

fn step_out(current: i32, rule: Step) -> i32 {
    let next = match rule.operation {
        ScalingOperation::Add => f64::from(current) + rule.factor.ceil(),
        ScalingOperation::Multiply => (f64::from(current) * rule.factor).ceil(),
    };
    (next.min(f64::from(i32::MAX)) as i32).max(current + 1)
}

fn step_in(current: i32, rule: Step) -> i32 {
    let next = match rule.operation {
        ScalingOperation::Add => f64::from(current) - rule.factor.ceil(),
        ScalingOperation::Multiply => (f64::from(current) / rule.factor).floor(),
    };
    (next.max(0.0) as i32).min(current - 1).max(0)
}

/// Clamps to the policy's bounds; returns the count and the bound that clipped it.
fn bound(
    inputs: &Inputs<'_>,
    wanted: i32,
    scaling_out: bool,
    allow_zero: bool,
) -> (i32, Option<Limit>) {
    let spec = inputs.spec;
    let mut limit = None;
    let mut max = spec.max_replicas;
    let mut max_limit = Limit::Max;
    // A count of 0 partitions means the topic could not be seen, never "run no workers".
    if spec.cap_at_partition_count
        && let Some(p) = inputs.partitions
        && p > 0
        && p < max
    {
        max = p;
        max_limit = Limit::Partitions;
    }
    let min = if allow_zero {
        0
    } else {
        spec.min_replicas.min(max)
    };
    if scaling_out
        && spec.cap_at_partition_count
        && let Some(lagging) = inputs.partitions_with_lag
    {
        // More workers than lagging partitions would not drain faster; never below the floor.
        let cap = lagging.max(inputs.current).max(min);
        if cap < max {
            max = cap;
            max_limit = Limit::PartitionsWithLag;
        }
    }
    let mut desired = wanted;
    if desired > max {
        desired = max;
        limit = Some(max_limit);
    }
    if desired < min {
        desired = min;
        limit = Some(Limit::Min);
    }
    (desired, limit)
}

/// Bounds a count that a schedule set: the policy's min/max and the partition cap still apply;
/// zero stays zero only with scale-to-zero enabled.
pub fn bound_scheduled(inputs: &Inputs<'_>, wanted: i32) -> (i32, Option<Limit>) {
    let allow_zero = wanted == 0
        && inputs
            .spec
            .scale_to_zero
            .as_ref()
            .is_some_and(|z| z.enabled);
    bound(inputs, wanted, false, allow_zero)
}

/// Decides the worker count.
pub fn decide(inputs: &Inputs<'_>) -> Decision {
    let spec = inputs.spec;
    let current = inputs.current;
    let latest_lag = inputs.window.last().and_then(|s| s.total_lag);

    let zero = spec.scale_to_zero.as_ref().filter(|z| z.enabled);
    // At zero workers with scale-to-zero, worker metrics (CPU, memory, worker PromQL) have no
    // series at all: only the lag can wake the pipeline, so an unreadable rest is no reason to.
    let asleep = current == 0 && zero.is_some();
    let lag_decides = asleep && latest_lag.is_some();
    if !inputs.metrics_available && !lag_decides {
        let threshold = u32::try_from(spec.fallback_failure_threshold.max(1)).unwrap_or(1);
        let fallback = spec
            .fallback_replicas
            .filter(|_| inputs.failed_polls >= threshold && !asleep);
        let wanted = fallback.unwrap_or(current);
        let (desired, limited_by) = bound(inputs, wanted, false, asleep);
        return Decision {
            desired,
            reason: Reason::MetricsUnavailable,
            message: match (spec.fallback_replicas, fallback) {
                (_, Some(f)) => format!(
                    "metrics cannot be read ({} polls in a row); running fallbackReplicas ({f})",
                    inputs.failed_polls
                ),
                (Some(_), None) if !asleep => format!(
                    "metrics cannot be read ({} of {threshold} polls in a row before fallbackReplicas applies); keeping the current count",
                    inputs.failed_polls
                ),
                _ => "metrics cannot be read; keeping the current count".into(),
            },
            limited_by,
        };
    }

    if let Some(zero) = zero {
        let lag = latest_lag.unwrap_or(0.0);
        if current == 0 {
            if lag >= zero.activation_threshold as f64 {
                let (desired, limited_by) = bound(inputs, spec.min_replicas.max(1), true, false);
                return Decision {
                    desired,
                    reason: Reason::Activated,
                    message: format!(
                        "lag {lag} reached the activation threshold {}",
                        zero.activation_threshold
                    ),
                    limited_by,
                };
            }
            return Decision {
                desired: 0,
                reason: Reason::ScaledToZero,
                message: format!(
                    "lag {lag} is below the activation threshold {}",
                    zero.activation_threshold
                ),
                limited_by: None,
            };
        }
        if lag == 0.0
            && elapsed(inputs.idle_since, inputs.now) >= zero.idle_after.get()
            && inputs.idle_since.is_some()
        {
            return Decision {
                desired: 0,
                reason: Reason::ScaledToZero,
                message: format!("no lag for {} or more", zero.idle_after),
                limited_by: None,
            };
        }
    }

    let names: Vec<(String, &MetricSpec)> = spec
        .metrics
        .iter()
        .enumerate()
        .map(|(i, m)| (metric_name(i, m), m))
        .collect();
    let out_periods = spec.scale_out.evaluation_periods.max(1) as usize;
    let out_needed = spec.scale_out.datapoints_to_alarm.max(1) as usize;
    let out_alarm: Vec<&str> = names
        .iter()
        .filter(|(name, m)| {
            m.out_threshold().is_some_and(|t| {
                breaching(inputs.window, name, out_periods, |v| v > t)
                    .is_some_and(|n| n >= out_needed)
            })
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let in_periods = spec.scale_in.evaluation_periods.max(1) as usize;
    let in_needed = spec.scale_in.datapoints_to_alarm.max(1) as usize;
    let judged_in: Vec<&(String, &MetricSpec)> = names
        .iter()
        .filter(|(_, m)| m.in_threshold().is_some())
        .collect();
    let in_alarm = !judged_in.is_empty()
        && judged_in.iter().all(|(name, m)| {
            let t = m.in_threshold().unwrap_or(f64::MIN);
            breaching(inputs.window, name, in_periods, |v| v < t).is_some_and(|n| n >= in_needed)
        });

    if !out_alarm.is_empty() {
        let since = elapsed(inputs.last_scale_out, inputs.now);
        if since < spec.scale_out.cooldown.get() {
            let (desired, limited_by) = bound(inputs, current, false, false);
            return Decision {
                desired,
                reason: Reason::CoolingDown,
                message: format!(
                    "scale-out alarm on {} during the {} scale-out cooldown",
                    out_alarm.join(", "),
                    spec.scale_out.cooldown
                ),
                limited_by,
            };
        }
        // The lagging-partitions cap only binds a lag-driven scale-out: a CPU or PromQL alarm
        // may need more workers even while commits keep the lag near zero.
        let lag_driven = names
            .iter()
            .filter(|(name, _)| out_alarm.contains(&name.as_str()))
            .all(|(_, m)| m.kafka_lag.is_some() || m.time_lag.is_some());
        let (desired, limited_by) = bound(
            inputs,
            step_out(
                current,
                Step {
                    operation: spec.scale_out.operation,
                    factor: spec.scale_out.factor,
                },
            ),
            lag_driven,
            false,
        );
        return Decision {
            desired,
            reason: Reason::ScaleOutAlarm,
            message: format!("{} above the scale-out threshold", out_alarm.join(", ")),
            limited_by,
        };
    }

    if in_alarm {
        let last_change = match (inputs.last_scale_out, inputs.last_scale_in) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if elapsed(last_change, inputs.now) < spec.scale_in.cooldown.get() {
            let (desired, limited_by) = bound(inputs, current, false, false);
            return Decision {
                desired,
                reason: Reason::CoolingDown,
                message: format!(
                    "scale-in alarm during the {} scale-in cooldown",
                    spec.scale_in.cooldown
                ),
                limited_by,
            };
        }
        let lags: Vec<f64> = inputs.window.iter().filter_map(|s| s.total_lag).collect();
        let draining = lags.len() >= 2
            && lags.windows(2).all(|w| w[1] < w[0])
            && lags.last().is_some_and(|l| *l > 0.0);
        if draining {
            let (desired, limited_by) = bound(inputs, current, false, false);
            return Decision {
                desired,
                reason: Reason::BacklogDraining,
                message: format!(
                    "below the scale-in thresholds, but the backlog ({} records) is still draining",
                    lags.last().copied().unwrap_or_default()
                ),
                limited_by,
            };
        }
        let (desired, limited_by) = bound(
            inputs,
            step_in(
                current,
                Step {
                    operation: spec.scale_in.operation,
                    factor: spec.scale_in.factor,
                },
            ),
            false,
            false,
        );
        return Decision {
            desired,
            reason: Reason::ScaleInAlarm,
            message: "every metric is below its scale-in threshold".into(),
            limited_by,
        };
    }

    let (desired, limited_by) = bound(inputs, current, false, false);
    Decision {
        desired,
        reason: Reason::WithinThresholds,
        message: "no alarm".into(),
        limited_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use vectorpipe_crds::v1alpha1::ScalingPolicy;

    fn policy(extra: serde_json::Value) -> ScalingPolicySpec {
        ScalingPolicy::test("scale", "p")
            .with_spec(json!({
                "maxReplicas": 10,
                "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 1000, "scaleInThreshold": 100}],
                "scaleOut": {"evaluationPeriods": 3, "datapointsToAlarm": 2, "operation": "multiply", "factor": 2, "cooldown": "60s"},
                "scaleIn": {"evaluationPeriods": 3, "datapointsToAlarm": 3, "operation": "add", "factor": 1, "cooldown": "300s"}
            }))
            .with_spec(extra)
            .spec()
    }

    fn lag(values: &[f64]) -> Vec<Sample> {
        values
            .iter()
            .map(|v| Sample {
                values: BTreeMap::from([("kafkaLag".to_owned(), *v)]),
                total_lag: Some(*v),
            })
            .collect()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn inputs<'a>(spec: &'a ScalingPolicySpec, window: &'a [Sample], current: i32) -> Inputs<'a> {
        Inputs {
            spec,
            window,
            metrics_available: true,
            failed_polls: 0,
            current,
            partitions: Some(12),
            partitions_with_lag: None,
            now: at(10_000),
            last_scale_out: None,
            last_scale_in: None,
            idle_since: None,
        }
    }

    #[test]
    fn alarms_need_their_datapoints() {
        let spec = policy(json!({}));
        let cases = [
            // window, current, desired, reason
            (vec![2000.0, 2000.0, 2000.0], 2, 4, Reason::ScaleOutAlarm),
            (vec![10.0, 2000.0, 2000.0], 2, 4, Reason::ScaleOutAlarm),
            (vec![2000.0, 10.0, 500.0], 2, 2, Reason::WithinThresholds),
            (vec![2000.0, 2000.0], 2, 2, Reason::WithinThresholds), // fewer samples than periods
            (vec![50.0, 50.0, 50.0], 4, 3, Reason::ScaleInAlarm),
            (vec![50.0, 150.0, 50.0], 4, 4, Reason::WithinThresholds), // 2 of 3 is not 3 of 3
            (vec![500.0, 500.0, 500.0], 4, 4, Reason::WithinThresholds),
        ];
        for (window, current, want, reason) in cases {
            let window = lag(&window);
            let d = decide(&inputs(&spec, &window, current));
            assert_eq!(
                (d.desired, d.reason),
                (want, reason),
                "{window:?} from {current}"
            );
        }
    }

    #[test]
    fn freshness_scales_out_above_its_target_and_in_below_half_of_it() {
        let spec = policy(json!({"metrics": [{"freshness": {"targetSeconds": 60}}]}));
        let fresh = |values: &[f64]| -> Vec<Sample> {
            values
                .iter()
                .map(|v| Sample {
                    values: BTreeMap::from([("freshness".to_owned(), *v)]),
                    total_lag: Some(0.0),
                })
                .collect()
        };
        let cases = [
            // p95 seconds, current, desired, reason
            (vec![90.0, 120.0, 75.0], 2, 4, Reason::ScaleOutAlarm),
            (vec![55.0, 59.0, 40.0], 2, 2, Reason::WithinThresholds),
            (vec![20.0, 10.0, 0.0], 4, 3, Reason::ScaleInAlarm),
            (vec![20.0, 35.0, 0.0], 4, 4, Reason::WithinThresholds),
        ];
        for (window, current, want, reason) in cases {
            let window = fresh(&window);
            let d = decide(&inputs(&spec, &window, current));
            assert_eq!(
                (d.desired, d.reason),
                (want, reason),
                "{window:?} from {current}"
            );
        }
        // Thresholds given explicitly win over the target's.
        let strict = policy(json!({"metrics": [{"freshness": {"targetSeconds": 60},
            "scaleOutThreshold": 30, "scaleInThreshold": 5}]}));
        let window = fresh(&[40.0, 40.0, 40.0]);
        assert_eq!(decide(&inputs(&strict, &window, 2)).desired, 4);
    }

    #[test]
    fn flapping_metrics_do_not_alarm() {
        let spec = policy(
            json!({"scaleOut": {"evaluationPeriods": 4, "datapointsToAlarm": 3, "operation": "add", "factor": 1, "cooldown": "0s"}}),
        );
        let window = lag(&[2000.0, 10.0, 2000.0, 10.0]);
        assert_eq!(
            decide(&inputs(&spec, &window, 2)).reason,
            Reason::WithinThresholds
        );
    }

    #[test]
    fn missing_samples_do_not_breach() {
        let spec = policy(json!({}));
        let mut window = lag(&[2000.0, 2000.0, 2000.0]);
        window[1].values.clear();
        window[2].values.clear();
        assert_eq!(
            decide(&inputs(&spec, &window, 2)).reason,
            Reason::WithinThresholds
        );
    }

    #[test]
    fn add_and_multiply_steps_both_ways() {
        let out_add = Step {
            operation: ScalingOperation::Add,
            factor: 3.0,
        };
        let out_mul = Step {
            operation: ScalingOperation::Multiply,
            factor: 1.5,
        };
        assert_eq!(step_out(2, out_add), 5);
        assert_eq!(step_out(2, out_mul), 3);
        assert_eq!(
            step_out(0, out_mul),
            1,
            "from zero, multiplying still adds one"
        );
        assert_eq!(step_in(5, out_add), 2);
        assert_eq!(step_in(5, out_mul), 3);
        assert_eq!(step_in(1, out_mul), 0);
    }

    #[test]
    fn cooldowns_hold_each_direction() {
        let spec = policy(json!({}));
        let high = lag(&[2000.0, 2000.0, 2000.0]);
        let mut i = inputs(&spec, &high, 2);
        i.last_scale_out = Some(at(10_000 - 30));
        assert_eq!(decide(&i).reason, Reason::CoolingDown);
        i.last_scale_out = Some(at(10_000 - 61));
        assert_eq!(decide(&i).reason, Reason::ScaleOutAlarm);

        let low = lag(&[50.0, 50.0, 50.0]);
        let mut i = inputs(&spec, &low, 4);
        i.last_scale_out = Some(at(10_000 - 200));
        assert_eq!(
            decide(&i).reason,
            Reason::CoolingDown,
            "scale-in waits 300 s after any change"
        );
        i.last_scale_out = Some(at(10_000 - 301));
        assert_eq!(decide(&i).reason, Reason::ScaleInAlarm);
    }

    #[test]
    fn no_scale_in_while_the_backlog_drains() {
        let spec = policy(json!({}));
        let window = lag(&[90.0, 60.0, 30.0]);
        assert_eq!(
            decide(&inputs(&spec, &window, 4)).reason,
            Reason::BacklogDraining
        );
        let steady = lag(&[30.0, 30.0, 30.0]);
        assert_eq!(
            decide(&inputs(&spec, &steady, 4)).reason,
            Reason::ScaleInAlarm
        );
    }

    #[test]
    fn bounds_and_partition_caps() {
        let spec = policy(json!({"maxReplicas": 20}));
        let high = lag(&[5000.0, 5000.0, 5000.0]);
        let mut i = inputs(&spec, &high, 8);
        let d = decide(&i);
        assert_eq!((d.desired, d.limited_by), (12, Some(Limit::Partitions)));
        i.partitions_with_lag = Some(9);
        let d = decide(&i);
        assert_eq!(
            (d.desired, d.limited_by),
            (9, Some(Limit::PartitionsWithLag))
        );
        i.partitions = None;
        i.partitions_with_lag = None;
        let d = decide(&i);
        assert_eq!((d.desired, d.limited_by), (16, None));
        let spec = policy(json!({"maxReplicas": 5}));
        let d = decide(&inputs(&spec, &high, 4));
        assert_eq!((d.desired, d.limited_by), (5, Some(Limit::Max)));
        let spec = policy(json!({"minReplicas": 3}));
        let low = lag(&[0.0, 0.0, 0.0]);
        let d = decide(&inputs(&spec, &low, 3));
        assert_eq!((d.desired, d.limited_by), (3, Some(Limit::Min)));
    }

    #[test]
    fn zero_partitions_never_scale_a_pipeline_to_nothing() {
        // 0 partitions means the topic could not be seen (missing, unauthorized): the workers
        // that run stay, and the floor holds.
        let spec = policy(json!({"minReplicas": 1}));
        let steady = lag(&[500.0, 500.0, 500.0]);
        let mut i = inputs(&spec, &steady, 3);
        i.partitions = Some(0);
        i.partitions_with_lag = Some(0);
        let d = decide(&i);
        assert_eq!(d.desired, 3, "{d:?}");
        assert_ne!(d.limited_by, Some(Limit::Partitions));
        i.current = 0;
        assert_eq!(decide(&i).desired, 1, "minReplicas holds");
    }

    #[test]
    fn only_lag_alarms_are_capped_at_the_partitions_with_lag() {
        let spec = policy(json!({
            "maxReplicas": 20,
            "metrics": [{"cpu": {}, "scaleOutThreshold": 80}]
        }));
        let hot: Vec<Sample> = (0..3)
            .map(|_| Sample {
                values: BTreeMap::from([("cpu".to_owned(), 95.0)]),
                total_lag: Some(0.0),
            })
            .collect();
        let mut i = inputs(&spec, &hot, 2);
        i.partitions_with_lag = Some(0);
        let d = decide(&i);
        assert_eq!(
            (d.desired, d.reason),
            (4, Reason::ScaleOutAlarm),
            "busy CPUs need workers even when commits keep the lag at zero"
        );
        i.current = 10;
        assert_eq!(
            decide(&i).limited_by,
            Some(Limit::Partitions),
            "the partition count still caps"
        );
    }

    #[test]
    fn fallback_when_metrics_are_unreadable() {
        let spec = policy(json!({"fallbackReplicas": 3}));
        let mut i = inputs(&spec, &[], 7);
        i.metrics_available = false;
        i.failed_polls = 3;
        let d = decide(&i);
        assert_eq!((d.desired, d.reason), (3, Reason::MetricsUnavailable));
        let spec = policy(json!({}));
        let mut i = inputs(&spec, &[], 7);
        i.metrics_available = false;
        assert_eq!(decide(&i).desired, 7);
    }

    #[test]
    fn one_failed_read_never_applies_the_fallback() {
        // A Prometheus blip during a backlog must not drop 10 workers to the fallback count.
        let spec = policy(json!({"fallbackReplicas": 2, "fallbackFailureThreshold": 3}));
        for (failed, want) in [(1, 10), (2, 10), (3, 2), (7, 2)] {
            let mut i = inputs(&spec, &[], 10);
            i.metrics_available = false;
            i.failed_polls = failed;
            let d = decide(&i);
            assert_eq!(
                (d.desired, d.reason),
                (want, Reason::MetricsUnavailable),
                "{failed} failed polls"
            );
        }
    }

    #[test]
    fn worker_metrics_missing_at_zero_workers_do_not_wake_the_pipeline() {
        // At 0 workers a CPU query has no series; only the lag decides whether to wake up.
        let spec = policy(json!({
            "minReplicas": 0,
            "scaleToZero": {"enabled": true, "activationThreshold": 10, "idleAfter": "5m"},
            "fallbackReplicas": 2,
            "metrics": [{"cpu": {}, "scaleOutThreshold": 80}]
        }));
        let quiet = lag(&[0.0, 0.0, 0.0]);
        let mut i = inputs(&spec, &quiet, 0);
        i.metrics_available = false;
        i.failed_polls = 5;
        assert_eq!(decide(&i).desired, 0, "{:?}", decide(&i));
        let busy = lag(&[0.0, 0.0, 50.0]);
        let mut i = inputs(&spec, &busy, 0);
        i.metrics_available = false;
        i.failed_polls = 5;
        assert_eq!(
            (decide(&i).desired, decide(&i).reason),
            (1, Reason::Activated)
        );
        // Nothing readable at all: stay asleep rather than start the fallback.
        let mut i = inputs(&spec, &[], 0);
        i.metrics_available = false;
        i.failed_polls = 5;
        assert_eq!(decide(&i).desired, 0);
    }

    #[test]
    fn scale_to_zero_and_activation() {
        let spec = policy(
            json!({"minReplicas": 0, "scaleToZero": {"enabled": true, "activationThreshold": 10, "idleAfter": "5m"}}),
        );
        let idle = lag(&[0.0, 0.0, 0.0]);
        let mut i = inputs(&spec, &idle, 2);
        i.idle_since = Some(at(10_000 - 301));
        assert_eq!(decide(&i).reason, Reason::ScaledToZero);
        i.idle_since = Some(at(10_000 - 60));
        assert_ne!(decide(&i).desired, 0, "not idle long enough");
        let quiet = lag(&[0.0, 0.0, 5.0]);
        let d = decide(&inputs(&spec, &quiet, 0));
        assert_eq!((d.desired, d.reason), (0, Reason::ScaledToZero));
        let busy = lag(&[0.0, 0.0, 50.0]);
        let d = decide(&inputs(&spec, &busy, 0));
        assert_eq!((d.desired, d.reason), (1, Reason::Activated));
    }

    proptest::proptest! {
        #[test]
        fn desired_is_always_within_bounds(
            min in 0i32..8, extra in 0i32..20, current in 0i32..40, partitions in proptest::option::of(1i32..30),
            lagging in proptest::option::of(0i32..30), values in proptest::collection::vec(proptest::option::of(0.0f64..10_000.0), 0..8),
            available in proptest::bool::ANY, out_factor in 1.0f64..4.0, multiply in proptest::bool::ANY,
        ) {
            let max = (min + extra).max(1);
            let spec = policy(json!({
                "minReplicas": min, "maxReplicas": max,
                "scaleToZero": {"enabled": min == 0, "activationThreshold": 1},
                "scaleOut": {"evaluationPeriods": 2, "datapointsToAlarm": 1, "operation": if multiply { "multiply" } else { "add" }, "factor": if multiply { out_factor.max(1.01) } else { out_factor.ceil() }, "cooldown": "0s"},
                "scaleIn": {"evaluationPeriods": 2, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "0s"}
            }));
            let window: Vec<Sample> = values.iter().map(|v| Sample {
                values: v.map(|v| BTreeMap::from([("kafkaLag".to_owned(), v)])).unwrap_or_default(),
                total_lag: *v,
            }).collect();
            let mut i = inputs(&spec, &window, current);
            i.partitions = partitions;
            i.partitions_with_lag = lagging;
            i.metrics_available = available;
            let d = decide(&i);
            let cap = partitions.unwrap_or(i32::MAX);
            proptest::prop_assert!(d.desired <= max, "{d:?} above max {max}");
            proptest::prop_assert!(d.desired <= cap, "{d:?} above the partition cap {cap}");
            proptest::prop_assert!(d.desired >= 0);
            if d.reason != Reason::ScaledToZero {
                proptest::prop_assert!(d.desired >= min.min(cap), "{d:?} below min {min}");
            }
        }
    }
}
