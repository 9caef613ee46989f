//! The status of a ScalingPolicy from one judgement. Pure, with the clock passed in.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vectorpipe_crds::v1alpha1::conditions::{
    ABLE_TO_SCALE, ACTIVE, CONFLICTING_WRITER, ConditionStatus, ConditionUpdate, SCALING_LIMITED,
    set_condition,
};
use vectorpipe_crds::v1alpha1::{ScalingDecision, ScalingPolicy, ScalingPolicyStatus};

use crate::blocked::Blocked;

/// What one poll concluded.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The target's count before.
    pub from: i32,
    /// The count chosen.
    pub to: i32,
    /// Whether the target was changed.
    pub applied: bool,
    /// Whether the policy is in dry-run mode.
    pub dry_run: bool,
    /// Why, in CamelCase.
    pub reason: String,
    /// Why, for people.
    pub message: String,
    /// The values used.
    pub inputs: BTreeMap<String, f64>,
    /// Metrics that could not be read.
    pub metrics_error: Option<String>,
    /// A bound that clipped the count: (reason, message).
    pub limit: Option<(String, String)>,
    /// An alarm is waiting for its cooldown.
    pub cooling_down: bool,
    /// Another writer of the worker count: the condition message.
    pub conflict: Option<String>,
}

/// The two kinds of poll result.
#[derive(Clone, Debug, PartialEq)]
pub enum Judgement {
    /// The policy could not act.
    Blocked(Blocked),
    /// The policy decided.
    Judged(Outcome),
}

/// Within 10 % of each other (or both zero): not worth a status write on its own.
fn close(a: f64, b: f64) -> bool {
    (a == 0.0) == (b == 0.0) && (a - b).abs() * 10.0 <= a.abs().max(b.abs())
}

/// How long a changed lag may stay unwritten when every change is small.
pub const LAG_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a new consumer lag is worth writing to the pipeline's status: it reached or left
/// zero, moved by more than 10 %, or changed at all and the written value is older than
/// [`LAG_REFRESH`] (`written_ago` None: unknown, so due).
pub fn lag_changed_meaningfully(
    old: i64,
    new: i64,
    written_ago: Option<std::time::Duration>,
) -> bool {
    #[allow(clippy::cast_precision_loss)] // lags far below 2^52
    let near = close(old as f64, new as f64);
    old != new && (!near || written_ago.is_none_or(|ago| ago >= LAG_REFRESH))
}

/// Whether a new freshness (p50, p95) is worth writing to the pipeline's status: none was
/// written, either percentile moved by more than 10 % or reached or left zero, or it changed
/// and the written value is older than [`LAG_REFRESH`].
pub fn freshness_changed_meaningfully(
    old: Option<(f64, f64)>,
    new: (f64, f64),
    written_ago: Option<std::time::Duration>,
) -> bool {
    let Some(old) = old else { return true };
    let near = close(old.0, new.0) && close(old.1, new.1);
    old != new && (!near || written_ago.is_none_or(|ago| ago >= LAG_REFRESH))
}

/// The same decision for the status: the same change for the same reason, from inputs within
/// 10 % (metric values move a little on every poll; rewriting the status for that is noise).
fn same_decision(a: &ScalingDecision, b: &ScalingDecision) -> bool {
    a.from_replicas == b.from_replicas
        && a.to_replicas == b.to_replicas
        && a.reason == b.reason
        && a.applied == b.applied
        && a.inputs.len() == b.inputs.len()
        && a.inputs.iter().all(|(name, value)| {
            b.inputs
                .get(name)
                .is_some_and(|other| close(*value, *other))
        })
}

/// The status the policy should have after `judgement`.
pub fn compute(policy: &ScalingPolicy, judgement: &Judgement, now: &Time) -> ScalingPolicyStatus {
    let generation = policy.metadata.generation;
    let mut status = policy.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut set = |type_: &'static str, value: ConditionStatus, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            ConditionUpdate::new(type_, value, reason, message),
            generation,
            now,
        );
    };
    use ConditionStatus::{False, True};
    let outcome = match judgement {
        Judgement::Blocked(inactive) => {
            set(ACTIVE, False, inactive.reason, inactive.message.clone());
            set(
                ABLE_TO_SCALE,
                False,
                inactive.reason,
                "the policy is not being evaluated".into(),
            );
            set(
                SCALING_LIMITED,
                False,
                inactive.reason,
                "the policy is not being evaluated".into(),
            );
            return status;
        }
        Judgement::Judged(outcome) => outcome,
    };
    if outcome.dry_run {
        set(
            ACTIVE,
            True,
            "DryRun",
            "judging the metrics and recording decisions; spec.mode is dryRun, so the worker count is left alone".into(),
        );
    } else {
        set(
            ACTIVE,
            True,
            "Evaluating",
            "judging the metrics every pollInterval and scaling the target".into(),
        );
    }
    match (&outcome.metrics_error, outcome.cooling_down) {
        (Some(error), _) => set(
            ABLE_TO_SCALE,
            False,
            "MetricsUnavailable",
            format!("{error}; {}", outcome.message),
        ),
        (None, true) => set(ABLE_TO_SCALE, False, "CoolingDown", outcome.message.clone()),
        (None, false) => set(
            ABLE_TO_SCALE,
            True,
            "ReadyForNewScale",
            "the metrics are readable and no cooldown is running".into(),
        ),
    }
    match &outcome.limit {
        Some((reason, message)) => set(SCALING_LIMITED, True, reason, message.clone()),
        None => set(
            SCALING_LIMITED,
            False,
            "DesiredWithinRange",
            "the desired count is within every bound".into(),
        ),
    }

    match &outcome.conflict {
        Some(message) => set(CONFLICTING_WRITER, True, "OtherWriter", message.clone()),
        None => set(
            CONFLICTING_WRITER,
            False,
            "NoOtherWriter",
            "only this policy changed spec.workers.replicas since its last poll".into(),
        ),
    }

    status.current_replicas = Some(if outcome.applied {
        outcome.to
    } else {
        outcome.from
    });
    status.desired_replicas = Some(outcome.to);
    let decision = ScalingDecision {
        time: now.clone(),
        from_replicas: outcome.from,
        to_replicas: outcome.to,
        reason: outcome.reason.clone(),
        message: outcome.message.clone(),
        inputs: outcome.inputs.clone(),
        applied: outcome.applied,
    };
    // An unchanged decision keeps its time, so a steady policy writes no status.
    if !status
        .last_decision
        .as_ref()
        .is_some_and(|d| same_decision(d, &decision))
    {
        status.last_decision = Some(decision.clone());
    }
    let record = if outcome.applied {
        true
    } else {
        // Dry-run: each distinct would-be change once, not once per poll.
        outcome.dry_run
            && outcome.to != outcome.from
            && !status.history.first().is_some_and(|h| {
                h.from_replicas == decision.from_replicas
                    && h.to_replicas == decision.to_replicas
                    && h.reason == decision.reason
            })
    };
    if record {
        status.history.insert(0, decision);
        status
            .history
            .truncate(usize::try_from(policy.spec.history_limit.max(1)).unwrap_or(1));
    }
    if outcome.applied {
        status.last_scale_time = Some(now.clone());
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vectorpipe_crds::v1alpha1::conditions::find_condition;

    fn policy(mode: &str, history_limit: i32) -> ScalingPolicy {
        ScalingPolicy::test("p", "t")
            .with_generation(3)
            .with_mode(mode)
            .with_spec(json!({
                "maxReplicas": 8,
                "historyLimit": history_limit,
                "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 10}]
            }))
            .build()
    }

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn outcome(from: i32, to: i32, applied: bool, dry_run: bool) -> Outcome {
        Outcome {
            from,
            to,
            applied,
            dry_run,
            reason: "ScaleOutAlarm".into(),
            message: "kafkaLag above the scale-out threshold".into(),
            inputs: BTreeMap::from([("kafkaLag".into(), 500.0)]),
            metrics_error: None,
            limit: None,
            cooling_down: false,
            conflict: None,
        }
    }

    fn condition(status: &ScalingPolicyStatus, type_: &str) -> (String, String) {
        let c = find_condition(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn freshness_is_written_when_it_moves_not_for_noise() {
        let minute = std::time::Duration::from_secs(60);
        let second = std::time::Duration::from_secs(1);
        assert!(freshness_changed_meaningfully(None, (1.0, 2.0), None));
        assert!(!freshness_changed_meaningfully(
            Some((1.0, 2.0)),
            (1.0, 2.0),
            Some(minute)
        ));
        assert!(!freshness_changed_meaningfully(
            Some((1.0, 2.0)),
            (1.05, 2.1),
            Some(second)
        ));
        assert!(freshness_changed_meaningfully(
            Some((1.0, 2.0)),
            (1.05, 2.1),
            Some(minute)
        ));
        assert!(freshness_changed_meaningfully(
            Some((1.0, 2.0)),
            (1.0, 30.0),
            Some(second)
        ));
        assert!(freshness_changed_meaningfully(
            Some((1.0, 2.0)),
            (0.0, 0.0),
            Some(second)
        ));
    }

    #[test]
    fn small_moves_of_the_lag_and_the_inputs_write_nothing() {
        let minute = Some(std::time::Duration::from_secs(10));
        assert!(!lag_changed_meaningfully(1000, 1000, None));
        assert!(!lag_changed_meaningfully(1000, 1050, minute));
        assert!(lag_changed_meaningfully(1000, 1200, minute));
        assert!(lag_changed_meaningfully(3, 0, minute), "reaching zero");
        assert!(lag_changed_meaningfully(0, 1, minute), "leaving zero");
        assert!(lag_changed_meaningfully(1000, 1050, Some(LAG_REFRESH)));
        assert!(lag_changed_meaningfully(1000, 1050, None));

        let p = policy("active", 10);
        let first = compute(
            &p,
            &Judgement::Judged(outcome(2, 2, false, false)),
            &at(100),
        );
        let mut moved = outcome(2, 2, false, false);
        moved.inputs = BTreeMap::from([("kafkaLag".into(), 520.0)]);
        moved.message = "kafkaLag 520 within the thresholds".into();
        let mut next_policy = p.clone();
        next_policy.status = Some(first.clone());
        let next = compute(&next_policy, &Judgement::Judged(moved.clone()), &at(200));
        assert_eq!(next, first, "a 4 % move of one input rewrites nothing");
        moved.inputs = BTreeMap::from([("kafkaLag".into(), 900.0)]);
        let next = compute(&next_policy, &Judgement::Judged(moved), &at(200));
        assert_ne!(next.last_decision, first.last_decision);
    }

    #[test]
    fn an_applied_scale_is_recorded_with_its_time() {
        let mut p = policy("active", 10);
        let status = compute(&p, &Judgement::Judged(outcome(1, 2, true, false)), &at(100));
        assert_eq!(status.current_replicas, Some(2));
        assert_eq!(status.desired_replicas, Some(2));
        assert_eq!(status.last_scale_time, Some(at(100)));
        assert_eq!(status.history.len(), 1);
        assert!(status.history[0].applied);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            condition(&status, ACTIVE),
            ("True".into(), "Evaluating".into())
        );
        assert_eq!(
            condition(&status, ABLE_TO_SCALE),
            ("True".into(), "ReadyForNewScale".into())
        );
        // The next poll at the new count changes nothing but the decision.
        p.status = Some(status);
        let steady = Outcome {
            reason: "WithinThresholds".into(),
            message: "no alarm".into(),
            ..outcome(2, 2, false, false)
        };
        let next = compute(&p, &Judgement::Judged(steady.clone()), &at(101));
        assert_eq!(next.history.len(), 1, "no change, no history entry");
        assert_eq!(next.last_scale_time, Some(at(100)));
        // A third identical poll writes exactly the same status (no status churn).
        p.status = Some(next.clone());
        assert_eq!(compute(&p, &Judgement::Judged(steady), &at(102)), next);
    }

    #[test]
    fn dry_run_records_each_would_be_change_once_and_changes_nothing() {
        let mut p = policy("dryRun", 10);
        let first = compute(&p, &Judgement::Judged(outcome(1, 2, false, true)), &at(100));
        assert_eq!(first.current_replicas, Some(1));
        assert_eq!(first.desired_replicas, Some(2));
        assert_eq!(first.history.len(), 1);
        assert!(!first.history[0].applied);
        assert_eq!(first.last_scale_time, None);
        assert_eq!(condition(&first, ACTIVE), ("True".into(), "DryRun".into()));
        p.status = Some(first);
        let second = compute(&p, &Judgement::Judged(outcome(1, 2, false, true)), &at(105));
        assert_eq!(second.history.len(), 1);
    }

    #[test]
    fn history_is_bounded_newest_first() {
        let mut p = policy("active", 3);
        for i in 0..5 {
            let s = compute(
                &p,
                &Judgement::Judged(outcome(i + 1, i + 2, true, false)),
                &at(100 + i64::from(i)),
            );
            p.status = Some(s);
        }
        let history = &p.status.as_ref().unwrap().history;
        assert_eq!(history.len(), 3);
        assert_eq!(history[0].to_replicas, 6);
        assert_eq!(history[2].to_replicas, 4);
    }

    #[test]
    fn unreadable_metrics_cooldowns_and_limits_show_in_conditions() {
        let p = policy("active", 10);
        let failing = Outcome {
            metrics_error: Some("kafkaLag: brokers unreachable".into()),
            reason: "MetricsUnavailable".into(),
            message: "running fallbackReplicas (2)".into(),
            ..outcome(1, 2, true, false)
        };
        let s = compute(&p, &Judgement::Judged(failing), &at(100));
        let able = find_condition(&s.conditions, ABLE_TO_SCALE).unwrap();
        assert_eq!(
            (able.status.as_str(), able.reason.as_str()),
            ("False", "MetricsUnavailable")
        );
        assert!(
            able.message.contains("brokers unreachable"),
            "{}",
            able.message
        );
        let cooling = Outcome {
            cooling_down: true,
            limit: Some(("CappedAtPartitions".into(), "4 partitions".into())),
            ..outcome(4, 4, false, false)
        };
        let s = compute(&p, &Judgement::Judged(cooling), &at(100));
        assert_eq!(
            condition(&s, ABLE_TO_SCALE),
            ("False".into(), "CoolingDown".into())
        );
        assert_eq!(
            condition(&s, CONFLICTING_WRITER),
            ("False".into(), "NoOtherWriter".into())
        );
        let fought = Outcome {
            conflict: Some("spec.workers.replicas was set to 1 by kubectl".into()),
            ..outcome(1, 1, false, false)
        };
        let conflicted = compute(&p, &Judgement::Judged(fought), &at(100));
        assert_eq!(
            condition(&conflicted, CONFLICTING_WRITER),
            ("True".into(), "OtherWriter".into())
        );
        assert_eq!(
            condition(&s, SCALING_LIMITED),
            ("True".into(), "CappedAtPartitions".into())
        );
    }

    #[test]
    fn an_inactive_policy_says_why() {
        let p = policy("active", 10);
        let s = compute(
            &p,
            &Judgement::Blocked(Blocked::new(
                "TargetNotFound",
                "EmbeddingPipeline n/t does not exist",
            )),
            &at(100),
        );
        assert_eq!(
            condition(&s, ACTIVE),
            ("False".into(), "TargetNotFound".into())
        );
        assert_eq!(s.desired_replicas, None);
    }
}
