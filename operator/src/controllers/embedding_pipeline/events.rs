//! The Events of a reconcile, derived from the change of the status alone (pure): what a person
//! watching `kubectl get events` should learn is exactly what changed in the conditions.

use vectorpipe_crds::v1alpha1::conditions::{
    BUDGET_EXCEEDED, ConditionStatus, DEGRADED, READY, find_condition, holds_for, is_true,
};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, EmbeddingPipelineStatus};

/// One Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub message: String,
}

/// The Events for a status change from `before` to `after` of `pipeline`:
/// - Degraded became true, or true for another reason: a Warning with that reason;
/// - a new generation was applied while not Degraded: `SpecApplied`;
/// - Ready became true: a Normal Event with the Ready reason;
/// - BudgetExceeded became true: a Warning `BudgetExceeded` with what was spent and done.
pub fn derive(
    pipeline: &EmbeddingPipeline,
    before: Option<&EmbeddingPipelineStatus>,
    after: &EmbeddingPipelineStatus,
) -> Vec<Note> {
    let mut notes = Vec::new();
    let old = before.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let degraded = find_condition(&after.conditions, DEGRADED)
        .filter(|c| c.status == ConditionStatus::True.as_str());
    match degraded {
        Some(now) => {
            if !holds_for(old, DEGRADED, ConditionStatus::True, &now.reason) {
                notes.push(Note {
                    warning: true,
                    reason: now.reason.clone(),
                    message: now.message.clone(),
                });
            }
        }
        None => {
            if before.and_then(|s| s.observed_generation) != after.observed_generation {
                let workers = if pipeline.spec.suspend {
                    0
                } else {
                    pipeline.spec.workers.replicas
                };
                notes.push(Note {
                    warning: false,
                    reason: "SpecApplied".into(),
                    message: format!(
                        "applied generation {} to the worker Deployment ({workers} workers)",
                        after.observed_generation.unwrap_or_default()
                    ),
                });
            }
        }
    }
    if let Some(ready) = find_condition(&after.conditions, READY)
        && is_true(&after.conditions, READY)
        && !is_true(old, READY)
    {
        notes.push(Note {
            warning: false,
            reason: ready.reason.clone(),
            message: ready.message.clone(),
        });
    }
    if let Some(budget) = find_condition(&after.conditions, BUDGET_EXCEEDED)
        && is_true(&after.conditions, BUDGET_EXCEEDED)
        && !is_true(old, BUDGET_EXCEEDED)
    {
        notes.push(Note {
            warning: true,
            reason: "BudgetExceeded".into(),
            message: budget.message.clone(),
        });
    }
    notes
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use vectorpipe_crds::v1alpha1::conditions::{ConditionUpdate, set_condition};

    use super::*;

    fn status(
        generation: i64,
        conditions: &[(&'static str, bool, &str)],
    ) -> EmbeddingPipelineStatus {
        let mut status = EmbeddingPipelineStatus {
            observed_generation: Some(generation),
            ..Default::default()
        };
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        for (type_, value, reason) in conditions {
            set_condition(
                &mut status.conditions,
                ConditionUpdate::new(type_, *value, *reason, format!("{reason} message")),
                Some(generation),
                &now,
            );
        }
        status
    }

    fn reasons(notes: &[Note]) -> Vec<(bool, &str)> {
        notes
            .iter()
            .map(|n| (n.warning, n.reason.as_str()))
            .collect()
    }

    #[test]
    fn a_used_budget_is_a_warning_once() {
        let p = EmbeddingPipeline::test("posts").build();
        let within = status(1, &[(BUDGET_EXCEEDED, false, "WithinBudget")]);
        let over = status(1, &[(BUDGET_EXCEEDED, true, "Suspended")]);
        assert_eq!(
            reasons(&derive(&p, Some(&within), &over)),
            [(true, "BudgetExceeded")]
        );
        assert_eq!(reasons(&derive(&p, Some(&over), &over)), []);
    }

    #[test]
    fn events_follow_the_conditions() {
        let p = EmbeddingPipeline::test("posts").with_replicas(2).build();
        let creating = status(
            1,
            &[(READY, false, "Creating"), (DEGRADED, false, "AsExpected")],
        );
        let ready = status(
            1,
            &[
                (READY, true, "WorkersReady"),
                (DEGRADED, false, "AsExpected"),
            ],
        );
        let missing = status(
            2,
            &[
                (READY, false, "SecretNotFound"),
                (DEGRADED, true, "SecretNotFound"),
            ],
        );
        let unlabeled = status(
            2,
            &[
                (READY, false, "SecretNotLabeled"),
                (DEGRADED, true, "SecretNotLabeled"),
            ],
        );
        let fixed = status(
            3,
            &[
                (READY, true, "WorkersReady"),
                (DEGRADED, false, "AsExpected"),
            ],
        );

        assert_eq!(
            reasons(&derive(&p, None, &creating)),
            [(false, "SpecApplied")]
        );
        assert_eq!(
            reasons(&derive(&p, Some(&creating), &ready)),
            [(false, "WorkersReady")]
        );
        assert_eq!(
            reasons(&derive(&p, Some(&ready), &ready)),
            [],
            "no change, no event"
        );
        assert_eq!(
            reasons(&derive(&p, Some(&ready), &missing)),
            [(true, "SecretNotFound")]
        );
        assert_eq!(
            reasons(&derive(&p, Some(&missing), &missing)),
            [],
            "the same problem once"
        );
        assert_eq!(
            reasons(&derive(&p, Some(&missing), &unlabeled)),
            [(true, "SecretNotLabeled")]
        );
        assert_eq!(
            reasons(&derive(&p, Some(&unlabeled), &fixed)),
            [(false, "SpecApplied"), (false, "WorkersReady")]
        );
        let message = &derive(&p, None, &creating)[0].message;
        assert!(
            message.contains("generation 1") && message.contains("2 workers"),
            "{message}"
        );
    }
}
