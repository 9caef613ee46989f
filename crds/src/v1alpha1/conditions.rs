//! Condition types, reasons and the rule for updating a condition list.
//!
//! Conditions follow the Kubernetes API conventions: one entry per `type`, CamelCase reasons,
//! `lastTransitionTime` changes only when `status` flips, and every entry carries the generation
//! it was computed from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The pipeline's workers are running the current spec and are ready.
pub const READY: &str = "Ready";
/// The pipeline's workers are being created, rolled or scaled.
pub const PROGRESSING: &str = "Progressing";
/// Something needs a person: an invalid reference, a failed rollout, an unusable sink.
pub const DEGRADED: &str = "Degraded";
/// An EmbeddingPipeline with `spec.query.enabled`: its query server answers.
pub const QUERY_READY: &str = "QueryReady";
/// The pipeline's daily embedding budget is used up (`spec.budget`).
pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";
/// The policy is being evaluated against its target.
pub const ACTIVE: &str = "Active";
/// The policy can read its metrics and change its target.
pub const ABLE_TO_SCALE: &str = "AbleToScale";
/// The desired count was clipped by a bound (min, max, partitions, schedule).
pub const SCALING_LIMITED: &str = "ScalingLimited";
/// Someone other than the policy changed the target's worker count.
pub const CONFLICTING_WRITER: &str = "ConflictingWriter";

/// `status` of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

impl ConditionStatus {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// A condition as computed by a controller, before timestamps are filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionUpdate {
    /// The condition type, e.g. [`READY`].
    pub type_: &'static str,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase reason.
    pub reason: String,
    /// What happened and what to do about it.
    pub message: String,
}

impl ConditionUpdate {
    /// A new update.
    pub fn new(
        type_: &'static str,
        status: impl Into<ConditionStatus>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Writes `update` into `conditions`, keeping `lastTransitionTime` when the status is unchanged.
///
/// Returns true when anything in the list changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate,
    observed_generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = update.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != status {
                existing.status = status.to_owned();
                existing.last_transition_time = now.clone();
            }
            existing.reason = update.reason;
            existing.message = update.message;
            existing.observed_generation = observed_generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_owned(),
                status: status.to_owned(),
                reason: update.reason,
                message: update.message,
                observed_generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// The condition of a type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    holds(conditions, type_, ConditionStatus::True)
}

/// True when the condition of `type_` is present with `status`.
pub fn holds(conditions: &[Condition], type_: &str, status: ConditionStatus) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == status.as_str())
}

/// True when the condition of `type_` is present with `status` and `reason`.
pub fn holds_for(
    conditions: &[Condition],
    type_: &str,
    status: ConditionStatus,
    reason: &str,
) -> bool {
    find_condition(conditions, type_)
        .is_some_and(|c| c.status == status.as_str() && c.reason == reason)
}

/// The reason of the condition of `type_`, if present.
pub fn reason_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    find_condition(conditions, type_).map(|c| c.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn first_sight_adds_the_condition_with_the_current_time() {
        let mut conditions = Vec::new();
        let changed = set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, ConditionStatus::Unknown, "Reconciling", "first look"),
            Some(1),
            &at(100),
        );
        assert!(changed);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "Unknown");
        assert_eq!(conditions[0].last_transition_time, at(100));
        assert_eq!(conditions[0].observed_generation, Some(1));
    }

    #[test]
    fn same_status_keeps_the_transition_time_but_takes_the_new_reason() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, false, "A", "a"),
            Some(1),
            &at(100),
        );
        let changed = set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, false, "B", "b"),
            Some(2),
            &at(200),
        );
        assert!(changed);
        assert_eq!(conditions[0].last_transition_time, at(100));
        assert_eq!(conditions[0].reason, "B");
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn a_status_flip_moves_the_transition_time() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, false, "A", "a"),
            Some(1),
            &at(100),
        );
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, true, "A", "a"),
            Some(1),
            &at(300),
        );
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].last_transition_time, at(300));
    }

    #[test]
    fn an_identical_update_reports_no_change() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, true, "A", "a"),
            Some(1),
            &at(100),
        );
        let changed = set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, true, "A", "a"),
            Some(1),
            &at(500),
        );
        assert!(!changed);
        assert_eq!(conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn types_are_kept_apart() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, true, "A", "a"),
            None,
            &at(1),
        );
        set_condition(
            &mut conditions,
            ConditionUpdate::new(DEGRADED, false, "B", "b"),
            None,
            &at(1),
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(reason_of(&conditions, DEGRADED), Some("B"));
        assert!(is_true(&conditions, READY));
        assert!(!is_true(&conditions, DEGRADED));
        assert!(holds_for(
            &conditions,
            DEGRADED,
            ConditionStatus::False,
            "B"
        ));
        assert!(!holds_for(
            &conditions,
            DEGRADED,
            ConditionStatus::True,
            "B"
        ));
        assert!(
            !holds(&conditions, ACTIVE, ConditionStatus::False),
            "absent holds nothing"
        );
    }
}
