//! Other writers of a pipeline's worker count (an HPA, `kubectl scale`, Argo CD with the count in
//! Git), found in the pipeline's managedFields. Pure.
//!
//! The rule: the policy remembers in `status.currentReplicas` the count it left the pipeline at
//! on its last poll. When the count differs at the next poll and a field manager other than the
//! scaling controller owns `spec.workers.replicas`, someone else changed it. The policy then says
//! so in its `ConflictingWriter` condition and sets the count back at most once per cooldown (the
//! longer of the scale-out and scale-in cooldowns), instead of fighting on every poll.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;

/// Field managers other than `ours` that own `spec.workers.replicas`, the most recent first.
pub fn replica_writers(pipeline: &EmbeddingPipeline, ours: &str) -> Vec<String> {
    let mut owners: Vec<(Option<Timestamp>, String)> = pipeline
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| entry.manager.as_deref() != Some(ours))
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .is_some_and(|fields| fields.0["f:spec"]["f:workers"].get("f:replicas").is_some())
        })
        .map(|entry| {
            let mut name = entry.manager.clone().unwrap_or_else(|| "unknown".into());
            if let Some(sub) = entry.subresource.as_deref().filter(|s| !s.is_empty()) {
                name = format!("{name} (through /{sub})");
            }
            (entry.time.as_ref().map(|t| t.0), name)
        })
        .collect();
    owners.sort_by_key(|owner| std::cmp::Reverse(owner.0));
    owners.into_iter().map(|(_, name)| name).collect()
}

/// Who changed the count since the last poll, if someone other than this policy did.
pub fn changed_by_other(previous: Option<i32>, current: i32, writers: &[String]) -> Option<String> {
    match previous {
        Some(left_at) if left_at != current && !writers.is_empty() => Some(writers.join(", ")),
        _ => None,
    }
}

/// What the policy knows about another writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other field manager(s).
    pub manager: String,
    /// The count they set.
    pub set_to: i32,
    /// When a change by them was last seen.
    pub seen: Timestamp,
    /// When this policy last set the count back.
    pub last_fight: Option<Timestamp>,
}

fn since(then: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

impl Conflict {
    /// Whether the policy may set the count now: once at first, then once per `cooldown`.
    pub fn may_fight(&self, now: Timestamp, cooldown: Duration) -> bool {
        self.last_fight.is_none_or(|at| since(at, now) >= cooldown)
    }

    /// Whether it is over: no change by the other writer and no fight for a whole cooldown.
    pub fn is_over(&self, now: Timestamp, cooldown: Duration) -> bool {
        since(self.seen, now) >= cooldown && self.may_fight(now, cooldown)
    }

    /// The condition message.
    pub fn message(&self, cooldown: Duration) -> String {
        format!(
            "spec.workers.replicas was set to {} by {}, not by this policy; it sets the count back at most once per cooldown ({}s) while another writer changes it. Leave one writer: delete the other autoscaler, stop scaling by hand, or leave workers.replicas out of Git (or ignore /spec/workers/replicas in Argo CD)",
            self.set_to,
            self.manager,
            cooldown.as_secs()
        )
    }
}

/// Carries a conflict from one poll to the next: a new change by another writer starts or
/// renews it, and one that is over is dropped.
pub fn track(
    known: Option<Conflict>,
    changed_by: Option<String>,
    current: i32,
    now: Timestamp,
    cooldown: Duration,
) -> Option<Conflict> {
    match (known, changed_by) {
        (known, Some(manager)) => Some(Conflict {
            manager,
            set_to: current,
            seen: now,
            last_fight: known.and_then(|k| k.last_fight),
        }),
        (Some(known), None) if known.is_over(now, cooldown) => None,
        (known, None) => known,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(managed: serde_json::Value) -> EmbeddingPipeline {
        EmbeddingPipeline::test("posts")
            .with_metadata(json!({ "managedFields": managed }))
            .build()
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn owners_of_the_count_other_than_the_policy_are_writers() {
        let replicas = json!({"f:spec": {"f:workers": {"f:replicas": {}}}});
        let model = json!({"f:spec": {"f:embedding": {"f:bedrock": {"f:modelId": {}}}}});
        let p = pipeline(json!([
            {"manager": "vectorpipe-operator-scaling", "operation": "Update", "subresource": "scale",
             "time": "2027-01-15T08:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": replicas},
            {"manager": "argocd-controller", "operation": "Apply",
             "time": "2027-01-15T07:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": model},
            {"manager": "kubectl", "operation": "Update", "subresource": "scale",
             "time": "2027-01-15T09:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": replicas},
            {"manager": "horizontal-pod-autoscaler", "operation": "Update",
             "time": "2027-01-15T06:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": replicas}
        ]));
        assert_eq!(
            replica_writers(&p, "vectorpipe-operator-scaling"),
            vec![
                "kubectl (through /scale)".to_owned(),
                "horizontal-pod-autoscaler".to_owned()
            ]
        );
        assert!(replica_writers(&pipeline(json!([])), "x").is_empty());
    }

    #[test]
    fn only_a_change_since_the_last_poll_is_a_conflict() {
        let kubectl = vec!["kubectl".to_owned()];
        assert_eq!(
            changed_by_other(Some(2), 5, &kubectl).as_deref(),
            Some("kubectl")
        );
        // Unchanged: whoever created the pipeline with its count is no conflict.
        assert_eq!(changed_by_other(Some(2), 2, &kubectl), None);
        // Never polled before.
        assert_eq!(changed_by_other(None, 5, &kubectl), None);
        // Changed, but the policy owns the field alone (its own write).
        assert_eq!(changed_by_other(Some(2), 3, &[]), None);
    }

    #[test]
    fn the_policy_fights_at_most_once_per_cooldown() {
        let cooldown = Duration::from_secs(300);
        let mut conflict = track(None, Some("kubectl".into()), 1, at(0), cooldown).unwrap();
        assert!(
            conflict.may_fight(at(0), cooldown),
            "the first time it sets the count back"
        );
        conflict.last_fight = Some(at(0));
        // The other writer changes it again a minute later: renewed, the fight remembered.
        let conflict = track(Some(conflict), Some("kubectl".into()), 1, at(60), cooldown).unwrap();
        assert_eq!(conflict.last_fight, Some(at(0)));
        assert!(!conflict.may_fight(at(60), cooldown));
        assert!(!conflict.may_fight(at(299), cooldown));
        assert!(conflict.may_fight(at(300), cooldown));
        // Quiet polls keep it until a whole cooldown passed since the last change.
        let kept = track(Some(conflict.clone()), None, 1, at(200), cooldown);
        assert_eq!(kept.as_ref(), Some(&conflict));
        assert_eq!(
            track(Some(conflict.clone()), None, 1, at(360), cooldown),
            None
        );
        assert!(conflict.message(cooldown).contains("by kubectl"));
        assert!(conflict.message(cooldown).contains("300s"));
    }
}
