//! The Events of a poll, derived from the change of the policy's status alone (pure).

use vectorpipe_crds::v1alpha1::ScalingPolicyStatus;
use vectorpipe_crds::v1alpha1::conditions::{
    ABLE_TO_SCALE, ACTIVE, CONFLICTING_WRITER, ConditionStatus, SCALING_LIMITED, find_condition,
    holds_for, is_true,
};

/// One Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// Also published on the target pipeline (a scale is news there too).
    pub on_target: bool,
}

fn warning(reason: &str, message: String) -> Note {
    Note {
        warning: true,
        reason: reason.to_owned(),
        message,
        on_target: false,
    }
}

/// The Events for a status change from `before` to `after` of a policy on `target`:
/// - Active became false, or false for another reason: a Warning with that reason;
/// - AbleToScale became MetricsUnavailable: a Warning with the error;
/// - ConflictingWriter became true: a Warning naming the other writer;
/// - ScalingLimited became true for QuotaBound: a Warning with the figures (on the pipeline too);
/// - a new entry in the history: `ScaledOut`/`ScaledIn` (on the policy and the pipeline), or
///   `WouldScale` for a dry-run decision.
pub fn derive(
    target: &str,
    before: Option<&ScalingPolicyStatus>,
    after: &ScalingPolicyStatus,
) -> Vec<Note> {
    use ConditionStatus::False;
    let old = before.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let mut notes = Vec::new();
    let newly = |type_: &str, status: ConditionStatus| {
        find_condition(&after.conditions, type_)
            .filter(|c| c.status == status.as_str())
            .filter(|c| !holds_for(old, type_, status, &c.reason))
    };
    if let Some(active) = newly(ACTIVE, False) {
        notes.push(warning(&active.reason, active.message.clone()));
        return notes;
    }
    if let Some(able) = newly(ABLE_TO_SCALE, False).filter(|c| c.reason == "MetricsUnavailable") {
        notes.push(warning("MetricsUnavailable", able.message.clone()));
    }
    if let Some(limited) =
        newly(SCALING_LIMITED, ConditionStatus::True).filter(|c| c.reason == "QuotaBound")
    {
        notes.push(Note {
            on_target: true,
            ..warning("QuotaBound", limited.message.clone())
        });
    }
    if let Some(conflict) = find_condition(&after.conditions, CONFLICTING_WRITER)
        && is_true(&after.conditions, CONFLICTING_WRITER)
        && !is_true(old, CONFLICTING_WRITER)
    {
        notes.push(warning("ConflictingWriter", conflict.message.clone()));
    }
    let head = after.history.first();
    if let Some(decision) = head
        && before.and_then(|s| s.history.first()) != Some(decision)
    {
        let (from, to) = (decision.from_replicas, decision.to_replicas);
        if decision.applied {
            notes.push(Note {
                warning: false,
                reason: if to > from { "ScaledOut" } else { "ScaledIn" }.to_owned(),
                message: format!(
                    "Scaled EmbeddingPipeline {target} from {from} to {to} workers: {}",
                    decision.message
                ),
                on_target: true,
            });
        } else {
            notes.push(Note {
                warning: false,
                reason: "WouldScale".to_owned(),
                message: format!(
                    "dry run: would scale EmbeddingPipeline {target} from {from} to {to} workers: {}",
                    decision.message
                ),
                on_target: false,
            });
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use vectorpipe_crds::v1alpha1::ScalingDecision;
    use vectorpipe_crds::v1alpha1::conditions::{ConditionUpdate, set_condition};

    use super::*;

    fn status(
        conditions: &[(&'static str, bool, &str)],
        history: &[(i32, i32, bool)],
    ) -> ScalingPolicyStatus {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        let mut status = ScalingPolicyStatus::default();
        for (type_, value, reason) in conditions {
            set_condition(
                &mut status.conditions,
                ConditionUpdate::new(type_, *value, *reason, format!("{reason} message")),
                Some(1),
                &now,
            );
        }
        status.history = history
            .iter()
            .map(|(from, to, applied)| ScalingDecision {
                time: now.clone(),
                from_replicas: *from,
                to_replicas: *to,
                reason: "Alarm".into(),
                message: "lag".into(),
                inputs: Default::default(),
                applied: *applied,
            })
            .collect();
        status
    }

    fn reasons(notes: &[Note]) -> Vec<(bool, &str, bool)> {
        notes
            .iter()
            .map(|n| (n.warning, n.reason.as_str(), n.on_target))
            .collect()
    }

    #[test]
    fn events_follow_the_status() {
        let steady = status(
            &[
                (ACTIVE, true, "Evaluating"),
                (ABLE_TO_SCALE, true, "ReadyForNewScale"),
                (CONFLICTING_WRITER, false, "NoOtherWriter"),
            ],
            &[],
        );
        let scaled = status(
            &[
                (ACTIVE, true, "Evaluating"),
                (ABLE_TO_SCALE, false, "CoolingDown"),
                (CONFLICTING_WRITER, false, "NoOtherWriter"),
            ],
            &[(1, 3, true)],
        );
        let broken = status(
            &[
                (ACTIVE, true, "Evaluating"),
                (ABLE_TO_SCALE, false, "MetricsUnavailable"),
                (CONFLICTING_WRITER, true, "OtherWriter"),
            ],
            &[(1, 3, true)],
        );
        let gone = status(&[(ACTIVE, false, "TargetNotFound")], &[(1, 3, true)]);
        let would = status(&[(ACTIVE, true, "DryRun")], &[(1, 2, false)]);

        assert_eq!(reasons(&derive("posts", Some(&steady), &steady)), []);
        assert_eq!(
            reasons(&derive("posts", Some(&steady), &scaled)),
            [(false, "ScaledOut", true)]
        );
        assert_eq!(
            reasons(&derive("posts", Some(&scaled), &broken)),
            [
                (true, "MetricsUnavailable", false),
                (true, "ConflictingWriter", false)
            ]
        );
        assert_eq!(
            reasons(&derive("posts", Some(&broken), &broken)),
            [],
            "said once"
        );
        assert_eq!(
            reasons(&derive("posts", Some(&broken), &gone)),
            [(true, "TargetNotFound", false)]
        );
        assert_eq!(reasons(&derive("posts", Some(&gone), &gone)), []);
        assert_eq!(
            reasons(&derive("posts", None, &would)),
            [(false, "WouldScale", false)]
        );
        let note = &derive("posts", Some(&steady), &scaled)[0];
        assert!(note.message.contains("from 1 to 3"), "{}", note.message);
    }

    #[test]
    fn a_learned_quota_bound_is_a_warning_on_the_policy_and_the_pipeline_once() {
        let free = status(&[(SCALING_LIMITED, false, "DesiredWithinRange")], &[]);
        let bound = status(&[(SCALING_LIMITED, true, "QuotaBound")], &[(5, 3, true)]);
        let capped = status(&[(SCALING_LIMITED, true, "AtMaxReplicas")], &[]);
        assert_eq!(
            reasons(&derive("posts", Some(&free), &bound)),
            [(true, "QuotaBound", true), (false, "ScaledIn", true)]
        );
        assert_eq!(reasons(&derive("posts", Some(&bound), &bound)), []);
        assert_eq!(reasons(&derive("posts", Some(&free), &capped)), []);
    }
}
