//! The status of a pipeline from what was observed. Pure, with the clock passed in.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use vectorpipe_crds::v1alpha1::conditions::{
    BUDGET_EXCEEDED, ConditionStatus, ConditionUpdate, DEGRADED, PROGRESSING, QUERY_READY, READY,
    set_condition,
};
use vectorpipe_crds::v1alpha1::{BudgetAction, EmbeddingPipeline, EmbeddingPipelineStatus, Usage};

use super::budget::Spent;
use super::build::{query_name, selector_string};
use crate::blocked::Blocked;

/// Sets `BudgetExceeded` and `status.usage` from the day's spend, or removes both without a
/// budget. A budget that suspends also says so in `Ready` and `Progressing`.
pub fn budget_condition(
    pipeline: &EmbeddingPipeline,
    spent: Option<&Spent>,
    status: &mut EmbeddingPipelineStatus,
    now: &Time,
) {
    let Some(budget) = &pipeline.spec.budget else {
        status.conditions.retain(|c| c.type_ != BUDGET_EXCEEDED);
        status.usage = None;
        return;
    };
    let generation = pipeline.metadata.generation;
    let mut set = |type_: &'static str, value: ConditionStatus, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            ConditionUpdate::new(type_, value, reason, message),
            generation,
            now,
        );
    };
    use ConditionStatus::{False, True, Unknown};
    match spent {
        None => {}
        Some(Spent::Unreadable(why)) => set(
            BUDGET_EXCEEDED,
            Unknown,
            "UsageUnavailable",
            format!("{why}; the workers keep running until the spend can be read"),
        ),
        Some(Spent::Judged { verdict, seen, .. }) => match (&verdict.exceeded, &verdict.problem) {
            (Some(message), _) => {
                let reason = match budget.action {
                    BudgetAction::Suspend => "Suspended",
                    BudgetAction::Throttle => "Throttled",
                };
                set(BUDGET_EXCEEDED, True, reason, message.clone());
                if budget.action == BudgetAction::Suspend {
                    set(READY, False, "BudgetExceeded", message.clone());
                    set(PROGRESSING, False, "BudgetExceeded", message.clone());
                }
            }
            (None, Some(problem)) => set(BUDGET_EXCEEDED, Unknown, "NoPrice", problem.clone()),
            (None, None) => set(
                BUDGET_EXCEEDED,
                False,
                "WithinBudget",
                if *seen {
                    "the spend since the budget day began is within spec.budget (see status.usage)"
                        .into()
                } else {
                    "Prometheus has no vectorpipe_worker_input_tokens_total of this pipeline since the budget day began: nothing ran, or the workers are not scraped (install the chart's PodMonitor); 0 tokens counted".into()
                },
            ),
        },
    }
    if let Some(Spent::Judged { since, verdict, .. }) = spent {
        status.usage = Some(Usage {
            since: Time(*since),
            tokens: verdict.tokens,
            estimated_cost_usd: verdict.cost.map(|c| (c * 1e6).round() / 1e6),
        });
    }
}

/// Sets `QueryReady` from the query server's Deployment (`query`, as applied), or removes it
/// when the query server is disabled.
pub fn query_condition(
    pipeline: &EmbeddingPipeline,
    query: Option<&Deployment>,
    status: &mut EmbeddingPipelineStatus,
    now: &Time,
) {
    if !pipeline.spec.query.enabled {
        status.conditions.retain(|c| c.type_ != QUERY_READY);
        return;
    }
    use ConditionStatus::{False, True, Unknown};
    let name = query_name(pipeline);
    let desired = pipeline.spec.query.replicas;
    let (value, reason, message) = match query {
        None => (
            Unknown,
            "Creating",
            format!("creating the query server Deployment {name}"),
        ),
        Some(_) if desired == 0 => (
            False,
            "ScaledToZero",
            "spec.query.replicas is 0; no query server runs".to_owned(),
        ),
        Some(d) => {
            let st = d.status.clone().unwrap_or_default();
            let current = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
            let available = st.available_replicas.unwrap_or(0);
            if current && available >= 1 {
                (
                    True,
                    "Serving",
                    format!(
                        "{available} of {desired} query server pods answer on Service {name} port {} (the page at /, POST /v1/search, POST /v1/ask)",
                        pipeline.spec.query.port
                    ),
                )
            } else {
                (
                    False,
                    "Starting",
                    format!(
                        "no query server pod is ready yet ({available} of {desired}); a pod is ready once it read the index's mapping and embedded a test question: see kubectl logs deploy/{name}"
                    ),
                )
            }
        }
    };
    set_condition(
        &mut status.conditions,
        ConditionUpdate::new(QUERY_READY, value, reason, message),
        pipeline.metadata.generation,
        now,
    );
}

/// The status the pipeline should have.
pub fn compute(
    pipeline: &EmbeddingPipeline,
    blocked: Option<&Blocked>,
    deployment: Option<&Deployment>,
    now: &Time,
) -> EmbeddingPipelineStatus {
    let generation = pipeline.metadata.generation;
    let mut status = pipeline.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.selector = Some(selector_string(pipeline));
    let serverless = pipeline
        .spec
        .sink
        .opensearch
        .auth
        .as_ref()
        .and_then(|a| a.sigv4.as_ref())
        .is_some_and(|s| s.service == vectorpipe_crds::v1alpha1::SigV4Service::Aoss);
    let dead_letter_note = format!(
        "{}{}",
        if pipeline.spec.dead_letter.is_none() {
            "; no deadLetter.topic is configured, so records that cannot be indexed are skipped and counted"
        } else {
            ""
        },
        if serverless {
            "; OpenSearch Serverless picks document ids, so a new version replaces and a tombstone deletes by query: a search can see the older version next to the new one for up to about 20 s, and a worker crash in that time can leave it until the record's next write"
        } else {
            ""
        }
    );
    let mut set = |type_: &'static str, value: ConditionStatus, reason: &str, message: String| {
        set_condition(
            &mut status.conditions,
            ConditionUpdate::new(type_, value, reason, message),
            generation,
            now,
        );
    };
    use ConditionStatus::{False, True, Unknown};

    if let Some(problem) = blocked {
        set(READY, False, problem.reason, problem.message.clone());
        set(
            PROGRESSING,
            False,
            problem.reason,
            "waiting for the problem to be fixed".into(),
        );
        set(DEGRADED, True, problem.reason, problem.message.clone());
    } else if pipeline.spec.suspend {
        set(
            READY,
            False,
            "Suspended",
            "spec.suspend is true; the workers are stopped and offsets stay committed".into(),
        );
        set(
            PROGRESSING,
            False,
            "Suspended",
            "spec.suspend is true".into(),
        );
        set(DEGRADED, False, "AsExpected", "no problem found".into());
    } else {
        let desired = pipeline.spec.workers.replicas;
        match deployment {
            None => {
                set(
                    READY,
                    Unknown,
                    "Creating",
                    "creating the worker Deployment".into(),
                );
                set(
                    PROGRESSING,
                    True,
                    "Creating",
                    "creating the worker Deployment".into(),
                );
                set(DEGRADED, False, "AsExpected", "no problem found".into());
            }
            Some(d) => {
                let st = d.status.clone().unwrap_or_default();
                let current_generation =
                    st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
                let updated = st.updated_replicas.unwrap_or(0);
                let total = st.replicas.unwrap_or(0);
                let available = st.available_replicas.unwrap_or(0);
                let ready = st.ready_replicas.unwrap_or(0);
                let stuck = st.conditions.iter().flatten().any(|c| {
                    c.type_.as_deref() == Some("Progressing")
                        && c.status.as_deref() == Some("False")
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                });
                let rolled_out = current_generation
                    && updated == desired
                    && total == desired
                    && available == desired;
                if rolled_out {
                    set(
                        PROGRESSING,
                        False,
                        "RolloutComplete",
                        format!("{desired} workers run the current spec"),
                    );
                } else {
                    set(
                        PROGRESSING,
                        True,
                        "RollingOut",
                        format!("{updated} of {desired} workers updated, {available} available"),
                    );
                }
                if stuck {
                    set(DEGRADED, True, "RolloutStuck", "the worker Deployment exceeded its progress deadline; check the worker pods' events and logs (kubectl describe pods -l vectorpipe.io/pipeline=<name>)".into());
                } else {
                    set(DEGRADED, False, "AsExpected", "no problem found".into());
                }
                if desired == 0 {
                    set(
                        READY,
                        True,
                        "ScaledToZero",
                        format!("no workers are wanted{dead_letter_note}"),
                    );
                } else if rolled_out && ready >= desired {
                    set(
                        READY,
                        True,
                        "WorkersReady",
                        format!("{ready} of {desired} workers ready{dead_letter_note}"),
                    );
                } else {
                    set(
                        READY,
                        False,
                        "WorkersUnavailable",
                        format!("{ready} of {desired} workers ready"),
                    );
                }
                status.replicas = Some(total);
                status.ready_replicas = Some(ready);
            }
        }
    }
    if deployment.is_none() {
        status.replicas = status.replicas.or(Some(0));
        status.ready_replicas = status.ready_replicas.or(Some(0));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vectorpipe_crds::v1alpha1::conditions::find_condition;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn pipeline(replicas: i32, suspend: bool) -> EmbeddingPipeline {
        EmbeddingPipeline::test("p")
            .with_generation(2)
            .with_replicas(replicas)
            .suspended(suspend)
            .build()
    }

    fn deployment(
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
        ready: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "p-worker", "generation": generation},
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                       "availableReplicas": ready, "readyReplicas": ready}
        }))
        .unwrap()
    }

    fn condition(status: &EmbeddingPipelineStatus, type_: &str) -> (String, String) {
        let c = find_condition(&status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// (name, pipeline, problem, deployment, expected [Ready, Progressing, Degraded]).
    type Case<'a> = (
        &'a str,
        EmbeddingPipeline,
        Option<&'a Blocked>,
        Option<Deployment>,
        [(&'a str, &'a str); 3],
    );

    #[test]
    fn table() {
        let invalid = Blocked::new("SecretNotFound", "Secret x not found");
        let cases: Vec<Case<'_>> = vec![
            (
                "no deployment yet",
                pipeline(2, false),
                None,
                None,
                [
                    ("Unknown", "Creating"),
                    ("True", "Creating"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "rolling out",
                pipeline(2, false),
                None,
                Some(deployment(3, 3, 2, 1, 1)),
                [
                    ("False", "WorkersUnavailable"),
                    ("True", "RollingOut"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "old generation not observed",
                pipeline(2, false),
                None,
                Some(deployment(4, 3, 2, 2, 2)),
                [
                    ("False", "WorkersUnavailable"),
                    ("True", "RollingOut"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "all ready",
                pipeline(2, false),
                None,
                Some(deployment(3, 3, 2, 2, 2)),
                [
                    ("True", "WorkersReady"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "old pods still terminating",
                pipeline(2, false),
                None,
                Some(deployment(3, 3, 3, 2, 2)),
                [
                    ("False", "WorkersUnavailable"),
                    ("True", "RollingOut"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "suspended",
                pipeline(2, true),
                None,
                Some(deployment(3, 3, 0, 0, 0)),
                [
                    ("False", "Suspended"),
                    ("False", "Suspended"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "scaled to zero",
                pipeline(0, false),
                None,
                Some(deployment(3, 3, 0, 0, 0)),
                [
                    ("True", "ScaledToZero"),
                    ("False", "RolloutComplete"),
                    ("False", "AsExpected"),
                ],
            ),
            (
                "missing secret",
                pipeline(2, false),
                Some(&invalid),
                None,
                [
                    ("False", "SecretNotFound"),
                    ("False", "SecretNotFound"),
                    ("True", "SecretNotFound"),
                ],
            ),
        ];
        for (name, p, problem, d, want) in cases {
            let status = compute(&p, problem, d.as_ref(), &at(100));
            for (type_, (s, r)) in [READY, PROGRESSING, DEGRADED].into_iter().zip(want) {
                assert_eq!(
                    condition(&status, type_),
                    (s.to_owned(), r.to_owned()),
                    "{name}: {type_}"
                );
            }
            assert_eq!(status.observed_generation, Some(2), "{name}");
            assert!(
                status
                    .conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(2)),
                "{name}"
            );
        }
    }

    #[test]
    fn recomputing_an_unchanged_world_changes_nothing() {
        let mut p = pipeline(1, false);
        let d = deployment(1, 1, 1, 1, 1);
        p.status = Some(compute(&p, None, Some(&d), &at(100)));
        let again = compute(&p, None, Some(&d), &at(999));
        assert_eq!(
            Some(&again),
            p.status.as_ref(),
            "same inputs, same status: no write, no hot loop"
        );
    }

    #[test]
    fn the_selector_and_replica_counts_feed_the_scale_subresource() {
        let status = compute(
            &pipeline(3, false),
            None,
            Some(&deployment(1, 1, 3, 3, 2)),
            &at(1),
        );
        assert_eq!(status.replicas, Some(3));
        assert_eq!(status.ready_replicas, Some(2));
        assert!(
            status
                .selector
                .unwrap()
                .contains("vectorpipe.io/pipeline=p")
        );
    }

    #[test]
    fn a_missing_dead_letter_topic_is_mentioned() {
        let status = compute(
            &pipeline(1, false),
            None,
            Some(&deployment(1, 1, 1, 1, 1)),
            &at(1),
        );
        let ready = find_condition(&status.conditions, READY).unwrap();
        assert!(
            ready.message.contains("no deadLetter.topic"),
            "{}",
            ready.message
        );
    }
}
