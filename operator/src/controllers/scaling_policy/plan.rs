//! The pure middle of a poll: from what was read (the policy, its target, the observation and
//! what the controller remembers) to the count to set and why. No I/O and no clock: `now` is
//! passed in, so every rule here is tested by a table.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingMode, ScalingPolicy};

use super::decide::{self, Decision, Inputs, Limit, Reason, Sample};
use super::observe::{self, Observation, Positions};
use super::quota::{self, Verdict};
use super::status::Outcome;
use super::{schedule, writers};
use crate::labels::SCALING_FIELD_MANAGER;

/// What the controller remembers about a policy between polls (lost on restart: the window
/// refills within `evaluationPeriods` polls; cooldowns survive through `status.history`).
#[derive(Default)]
pub struct PolicyState {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
    /// The target pipeline's name.
    pub pipeline: String,
    /// The generation last polled.
    pub generation: Option<i64>,
    /// When the last poll started.
    pub last_poll: Option<Instant>,
    /// The samples the alarms look at.
    pub window: VecDeque<Sample>,
    /// The group's positions, for the consume rate.
    pub positions: Positions,
    /// Since when the lag has been zero.
    pub idle_since: Option<Timestamp>,
    /// The last scale-out (this process's or the recorded history's).
    pub last_scale_out: Option<Timestamp>,
    /// The last scale-in.
    pub last_scale_in: Option<Timestamp>,
    /// Polls in a row whose metrics could not all be read.
    pub failed_polls: u32,
    /// Another writer of the worker count, while it is active.
    pub conflict: Option<writers::Conflict>,
    /// The count the last poll left the pipeline at (the policy's cached status may lag).
    pub left_at: Option<i32>,
    /// When the pipeline's consumerLag was last written.
    pub lag_written: Option<Instant>,
    /// The freshness (p50, p95) last written to the pipeline's status, and when.
    pub freshness_written: Option<((f64, f64), Instant)>,
    /// Throughput and throttling by worker count, for quota-aware policies.
    pub quota: quota::Ledger,
}

impl PolicyState {
    /// A first state for `policy`, with the cooldowns its recorded history implies.
    pub fn first(policy: &ScalingPolicy, namespace: &str, name: &str) -> Self {
        let (out, inn) = last_changes(policy);
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            last_scale_out: out,
            last_scale_in: inn,
            ..Self::default()
        }
    }
}

/// What a poll will do.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The outcome for the status (from, to, applied, why).
    pub outcome: Outcome,
}

impl Plan {
    /// The count to set, when the poll changes it.
    pub fn scale_to(&self) -> Option<i32> {
        self.outcome.applied.then_some(self.outcome.to)
    }
}

/// When the policy last scaled out and in, from its recorded history (dry-run decisions count
/// in dry-run mode, so its cooldowns behave as they would for real).
pub fn last_changes(policy: &ScalingPolicy) -> (Option<Timestamp>, Option<Timestamp>) {
    let dry_run = policy.spec.mode == ScalingMode::DryRun;
    let mut out = None;
    let mut inn = None;
    for h in policy
        .status
        .iter()
        .flat_map(|s| &s.history)
        .filter(|h| h.applied || dry_run)
    {
        let slot = if h.to_replicas > h.from_replicas {
            &mut out
        } else {
            &mut inn
        };
        if slot.is_none_or(|t: Timestamp| h.time.0 > t) {
            *slot = Some(h.time.0);
        }
    }
    (out, inn)
}

fn latest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Applies the open schedule windows to a decision and bounds the result again.
pub fn with_schedules(
    inputs: &Inputs<'_>,
    decision: Decision,
    open: &[schedule::OpenWindow],
) -> (i32, String, String, Option<Limit>) {
    let (scheduled, by) = schedule::apply(open, decision.desired);
    let Some(window) = by else {
        return (
            decision.desired,
            decision.reason.as_str().to_owned(),
            decision.message,
            decision.limited_by,
        );
    };
    let (desired, limit) = decide::bound_scheduled(inputs, scheduled);
    let exact = open.iter().any(|w| w.desired.is_some());
    let reason = if exact {
        "ScheduleDesired"
    } else if scheduled > decision.desired {
        "ScheduleFloor"
    } else {
        "ScheduleCeiling"
    };
    let message = format!(
        "schedule {window} sets {scheduled} workers (the metrics alone would give {}: {})",
        decision.desired, decision.message
    );
    (desired, reason.to_owned(), message, limit)
}

/// The condition message of a bound that clipped the count.
pub fn limit_text(limit: Limit, desired: i32, inputs: &Inputs<'_>) -> String {
    match limit {
        Limit::Min => format!("held at minReplicas ({})", inputs.spec.min_replicas),
        Limit::Max => format!("held at maxReplicas ({})", inputs.spec.max_replicas),
        Limit::Partitions => format!(
            "capped at {desired}: the source has {} partitions, and more workers would idle",
            inputs.partitions.unwrap_or(desired)
        ),
        Limit::PartitionsWithLag => format!(
            "capped at {desired}: only {} partitions have lag",
            inputs.partitions_with_lag.unwrap_or(desired)
        ),
        Limit::Quota => format!("held at {desired}: Bedrock's quota bounds throughput"),
    }
}

/// The cooldown between two set-backs of another writer's count: the longer of the two.
pub fn fight_cooldown(policy: &ScalingPolicy) -> Duration {
    let spec = &policy.spec;
    spec.scale_out
        .cooldown
        .get()
        .max(spec.scale_in.cooldown.get())
}

/// Decides one poll: feeds the observation into the window, runs the alarms and the schedules,
/// and holds the count when another writer changed it and was set back less than a cooldown
/// ago. Updates `state` for the next poll.
pub fn plan(
    policy: &ScalingPolicy,
    pipeline: &EmbeddingPipeline,
    state: &mut PolicyState,
    observation: &Observation,
    now: Timestamp,
) -> Plan {
    let spec = &policy.spec;
    let current = pipeline.spec.workers.replicas;
    let keep = spec
        .scale_out
        .evaluation_periods
        .max(spec.scale_in.evaluation_periods)
        .max(1) as usize;
    state.window.push_back(observation.sample.clone());
    while state.window.len() > keep {
        state.window.pop_front();
    }
    state.idle_since = match observation.lag.as_ref().map(|l| l.sum) {
        Some(0) => state.idle_since.or(Some(now)),
        Some(_) => None,
        None => state.idle_since,
    };
    let (out, inn) = last_changes(policy);
    state.last_scale_out = latest(state.last_scale_out, out);
    state.last_scale_in = latest(state.last_scale_in, inn);
    state.failed_polls = if observation.errors.is_empty() {
        0
    } else {
        state.failed_polls.saturating_add(1)
    };

    let window: Vec<Sample> = state.window.iter().cloned().collect();
    let inputs = Inputs {
        spec,
        window: &window,
        metrics_available: observation.errors.is_empty(),
        failed_polls: state.failed_polls,
        current,
        partitions: observation.lag.as_ref().map(|l| l.partitions),
        partitions_with_lag: observation.lag.as_ref().map(|l| l.partitions_with_lag),
        now,
        last_scale_out: state.last_scale_out,
        last_scale_in: state.last_scale_in,
        idle_since: state.idle_since,
    };
    let mut decision = decide::decide(&inputs);
    let mut quota_message = None;
    let quota_config = spec.quota_aware.as_ref().filter(|q| q.enabled);
    if let Some(config) = quota_config {
        let reading = match &observation.quota {
            Some(Ok(reading)) => Some(*reading),
            Some(Err(error)) => {
                tracing::debug!(%error, "quota figures not read: quota-aware scaling waits");
                // Said in the decision: without its figures the policy scales as a plain one.
                decision.message = format!(
                    "{}; quotaAware cannot judge this poll ({error}), so scale-outs are not checked against the quota",
                    decision.message
                );
                None
            }
            None => None,
        };
        let share = reading.map(|r| r.throttled_share);
        state
            .quota
            .observe(config, current, now, reading.map(|r| r.throughput), share);
        // An alarm held at maxReplicas (or the partitions) is judged too: the quota may show
        // only once the count is there, and then fewer workers do as much.
        let adds = decision.desired > current;
        let capped = decision.desired == current
            && matches!(
                decision.limited_by,
                Some(Limit::Max | Limit::Partitions | Limit::PartitionsWithLag)
            );
        if decision.reason == Reason::ScaleOutAlarm && (adds || capped) {
            let floor = spec.min_replicas.max(1);
            decision = match state.quota.judge(config, current, share, floor, now) {
                Verdict::Proceed => decision,
                // At the cap nothing is added anyway: the cap stays the reason.
                Verdict::Measuring(_) if !adds => decision,
                Verdict::Measuring(message) => Decision {
                    desired: current,
                    reason: Reason::MeasuringThroughput,
                    message: format!("{}; {message}", decision.message),
                    limited_by: None,
                },
                Verdict::Bound(at, why) => {
                    let (desired, limited_by) = decide::bound_scheduled(&inputs, at);
                    let message = format!("{}; {why}", decision.message);
                    quota_message = Some(why);
                    Decision {
                        desired,
                        reason: Reason::QuotaBound,
                        message,
                        limited_by: limited_by.or(Some(Limit::Quota)),
                    }
                }
            };
        }
    }
    let cooling_down = matches!(
        decision.reason,
        Reason::CoolingDown | Reason::MeasuringThroughput
    );
    let open = schedule::open_windows(&spec.schedules, now).unwrap_or_default();
    let (mut desired, mut reason, mut message, limit) = with_schedules(&inputs, decision, &open);
    let dry_run = spec.mode == ScalingMode::DryRun;

    // Another writer of the count: said in the status, and fought at most once per cooldown.
    let cooldown = fight_cooldown(policy);
    let changed_by = writers::changed_by_other(
        state
            .left_at
            .or_else(|| policy.status.as_ref().and_then(|s| s.current_replicas)),
        current,
        &writers::replica_writers(pipeline, SCALING_FIELD_MANAGER),
    );
    state.conflict = writers::track(state.conflict.take(), changed_by, current, now, cooldown);
    if let Some(conflict) = &state.conflict
        && desired != current
        && !dry_run
        && !conflict.may_fight(now, cooldown)
    {
        message = format!(
            "would set {desired} workers, but {} changed the count and this policy set it back less than a cooldown ago; holding {current}",
            conflict.manager
        );
        reason = "ConflictingWriter".into();
        desired = current;
    }
    let applied = !dry_run && desired != current;
    if applied {
        if let Some(conflict) = &mut state.conflict {
            conflict.last_fight = Some(now);
        }
        if desired > current {
            state.last_scale_out = Some(now);
        } else {
            state.last_scale_in = Some(now);
        }
    }
    state.left_at = Some(if applied { desired } else { current });

    let metrics_error = (!observation.errors.is_empty()).then(|| observation.errors.join("; "));
    let mut inputs_used = observe::inputs_of(observation);
    if quota_config.is_some()
        && let Some(Ok(reading)) = &observation.quota
    {
        inputs_used.insert(
            "throughput".into(),
            (reading.throughput * 10.0).round() / 10.0,
        );
        inputs_used.insert(
            "throttledShare".into(),
            (reading.throttled_share * 1000.0).round() / 1000.0,
        );
    }
    let limit = limit.map(|l| {
        let text = match (l, &quota_message) {
            (Limit::Quota, Some(message)) => message.clone(),
            _ => limit_text(l, desired, &inputs),
        };
        (l.as_str().to_owned(), text)
    });
    Plan {
        outcome: Outcome {
            from: current,
            to: desired,
            applied,
            dry_run,
            reason,
            message,
            inputs: inputs_used,
            metrics_error,
            limit,
            cooling_down,
            conflict: state.conflict.as_ref().map(|c| c.message(cooldown)),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::controllers::scaling_policy::lag::LagSummary;
    use crate::controllers::scaling_policy::observe::QuotaReading;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn lag(sum: i64) -> Observation {
        Observation {
            sample: Sample {
                values: BTreeMap::from([("kafkaLag".to_owned(), sum as f64)]),
                total_lag: Some(sum as f64),
            },
            lag: Some(LagSummary {
                sum,
                partitions: 8,
                partitions_with_lag: 8,
                ..LagSummary::default()
            }),
            errors: vec![],
            freshness: None,
            quota: None,
        }
    }

    fn scaled_by(manager: &str, replicas: i32) -> EmbeddingPipeline {
        EmbeddingPipeline::test("posts")
            .with_replicas(replicas)
            .with_metadata(json!({"managedFields": [{
                "manager": manager, "operation": "Update", "apiVersion": "vectorpipe.io/v1alpha1",
                "time": "2027-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:workers": {"f:replicas": {}}}}
            }]}))
            .build()
    }

    #[test]
    fn a_backlog_scales_out_and_the_state_remembers_it() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(json!({"scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1}}))
            .build();
        let pipeline = EmbeddingPipeline::test("posts").with_replicas(1).build();
        let mut state = PolicyState::first(&policy, "data", "scale");
        let plan = plan(&policy, &pipeline, &mut state, &lag(10_000), at(0));
        assert!(plan.outcome.to > 1, "{plan:?}");
        assert_eq!(plan.scale_to(), Some(plan.outcome.to));
        assert_eq!(state.last_scale_out, Some(at(0)));
        assert_eq!(state.left_at, Some(plan.outcome.to));
    }

    #[test]
    fn another_writer_is_set_back_once_then_held_for_a_cooldown() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(2, 2)
            .with_spec(json!({"scaleOut": {"cooldown": "60s"}, "scaleIn": {"cooldown": "60s"}}))
            .build();
        let mut state = PolicyState::first(&policy, "data", "scale");
        state.left_at = Some(2);
        // kubectl set 5: the policy names it and sets 2 back once.
        let first = plan(
            &policy,
            &scaled_by("kubectl", 5),
            &mut state,
            &lag(0),
            at(0),
        );
        assert_eq!(first.scale_to(), Some(2), "{first:?}");
        assert!(
            first
                .outcome
                .conflict
                .as_deref()
                .is_some_and(|m| m.contains("kubectl"))
        );
        // It sets 5 again within the cooldown: held, not fought.
        let second = plan(
            &policy,
            &scaled_by("kubectl", 5),
            &mut state,
            &lag(0),
            at(10),
        );
        assert_eq!(second.scale_to(), None, "{second:?}");
        assert_eq!(second.outcome.reason, "ConflictingWriter");
        // A cooldown later the policy may set it back once more.
        let third = plan(
            &policy,
            &scaled_by("kubectl", 5),
            &mut state,
            &lag(0),
            at(70),
        );
        assert_eq!(third.scale_to(), Some(2), "{third:?}");
    }

    /// Polls a policy every 5 s for 10 minutes against a backlog that never drains, where
    /// `count` workers process min(100 × count, 300) records/s and the calls beyond the quota
    /// are throttled. Returns the counts it ran, poll by poll.
    fn trace(policy: &ScalingPolicy) -> Vec<i32> {
        trace_with_quota(policy, 300.0)
    }

    /// As `trace`, with the quota at `quota` records/s (100 per worker below it).
    fn trace_with_quota(policy: &ScalingPolicy, quota: f64) -> Vec<i32> {
        let mut state = PolicyState::first(policy, "data", "scale");
        let (mut count, mut counts) = (1, vec![]);
        for poll in 0..120 {
            let now = at(poll * 5);
            let throughput = (100.0 * f64::from(count)).min(quota);
            let mut observation = lag(1_000_000);
            observation.quota = Some(Ok(QuotaReading {
                throughput,
                throttled_share: 1.0 - throughput / f64::from(100 * count),
            }));
            let pipeline = EmbeddingPipeline::test("posts")
                .with_replicas(count)
                .build();
            let plan = plan(policy, &pipeline, &mut state, &observation, now);
            if let Some(to) = plan.scale_to() {
                count = to;
            }
            counts.push(count);
        }
        counts
    }

    #[test]
    fn a_quota_aware_policy_settles_where_the_quota_is_and_a_plain_one_runs_to_max() {
        let spec = json!({
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "5s"},
            "scaleIn": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "cooldown": "5s"}
        });
        let plain = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(spec.clone())
            .build();
        let mut aware_spec = spec;
        aware_spec["quotaAware"] = json!({"settleTime": "10s", "measureWindow": "20s"});
        let aware = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(aware_spec)
            .build();
        let plain = trace(&plain);
        assert_eq!(*plain.last().unwrap(), 8, "{plain:?}");
        let aware = trace(&aware);
        assert!(
            aware.iter().all(|c| *c <= 5),
            "never past two steps over the quota: {aware:?}"
        );
        assert!(
            aware[60..].iter().all(|c| *c == 3),
            "settles at three: {aware:?}"
        );
    }

    /// The quota lets 6.5 workers' worth through and maxReplicas is 8: the scale-outs run
    /// into maxReplicas before the figures show the bound, and the check must still run there
    /// (it once ran only for alarms that could add a worker, so the policy sat at 8 for good).
    #[test]
    fn a_quota_reached_only_at_max_replicas_still_brings_the_count_back() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(json!({
                "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "5s"},
                "scaleIn": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "cooldown": "5s"},
                "quotaAware": {"settleTime": "10s", "measureWindow": "20s"}
            }))
            .build();
        let counts = trace_with_quota(&policy, 650.0);
        assert!(counts.contains(&8), "it reaches maxReplicas: {counts:?}");
        assert!(
            counts[60..].iter().all(|c| (6..=7).contains(c)),
            "back from maxReplicas to where the quota is: {counts:?}"
        );
    }

    #[test]
    fn a_quota_bound_is_in_the_status_with_its_figures() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(json!({
                "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "5s"},
                "quotaAware": {"settleTime": "10s", "measureWindow": "20s"}
            }))
            .build();
        let mut state = PolicyState::first(&policy, "data", "scale");
        let mut last = None;
        for (poll, count) in [
            (0, 3),
            (1, 3),
            (2, 3),
            (3, 3),
            (4, 3),
            (5, 3),
            (6, 3),
            (7, 4),
            (8, 4),
            (9, 4),
            (10, 4),
            (11, 4),
            (12, 4),
            (13, 4),
        ] {
            let now = at(poll * 5);
            let mut observation = lag(1_000_000);
            observation.quota = Some(Ok(QuotaReading {
                throughput: 300.0,
                throttled_share: if count > 3 { 0.25 } else { 0.0 },
            }));
            let pipeline = EmbeddingPipeline::test("posts")
                .with_replicas(count)
                .build();
            last = Some(plan(&policy, &pipeline, &mut state, &observation, now));
        }
        let outcome = last.unwrap().outcome;
        assert_eq!(
            (outcome.from, outcome.to, outcome.reason.as_str()),
            (4, 3, "QuotaBound"),
            "{outcome:?}"
        );
        let (reason, message) = outcome.limit.clone().expect("ScalingLimited");
        assert_eq!(reason, "QuotaBound");
        assert!(
            message.contains("4 workers process 300.0 records/s with 25 %"),
            "{message}"
        );
        assert_eq!(
            outcome.inputs.get("throughput"),
            Some(&300.0),
            "{outcome:?}"
        );
    }

    #[test]
    fn unreadable_quota_figures_are_said_in_the_decision() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(1, 8)
            .with_spec(json!({"quotaAware": {}}))
            .build();
        let pipeline = EmbeddingPipeline::test("posts").with_replicas(2).build();
        let mut state = PolicyState::first(&policy, "data", "scale");
        let mut observation = lag(0);
        observation.quota = Some(Err(
            "no Prometheus server is configured for quotaAware".into()
        ));
        let plan = plan(&policy, &pipeline, &mut state, &observation, at(0));
        assert!(
            plan.outcome
                .message
                .contains("quotaAware cannot judge this poll (no Prometheus server is configured"),
            "{plan:?}"
        );
    }

    #[test]
    fn a_dry_run_changes_nothing() {
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(3, 8)
            .with_mode("dryRun")
            .build();
        let pipeline = EmbeddingPipeline::test("posts").with_replicas(1).build();
        let mut state = PolicyState::first(&policy, "data", "scale");
        let plan = plan(&policy, &pipeline, &mut state, &lag(0), at(0));
        assert_eq!((plan.outcome.to, plan.scale_to()), (3, None), "{plan:?}");
        assert!(plan.outcome.dry_run);
    }
}
