//! Index generations and zero-downtime model migration.
//!
//! Readers search `sink.opensearch.index`, which the operator keeps as an alias over the
//! generation in service (`<index>-g<N>`; generation 0 is an index made before generations, named
//! like the alias). The workers write the generation in service with its own consumer group.
//!
//! When the spec's model (id, dimensions, normalisation, input type, truncation) or chunking
//! changes, the live workers keep the model of the generation in service and a second worker
//! group (`<name>-backfill-worker`) builds the next generation with the new model: a new
//! consumer group that reads the source from the earliest retained record and then keeps up
//! with new ones. Once that group is at most `migration.catchUpLag` records behind, one
//! `_aliases` request moves the alias (readers see the old generation or the new, never
//! neither), the live workers move to the new generation and its group (continuing from its
//! commits), and the backfill group goes. The old generation is kept, not written to, for
//! `migration.retainPrevious`: going back is a spec change whose migration only catches up from
//! where that generation's group stopped. Changing the spec back during a migration cancels it.
//!
//! Before a new generation is built, the source partitions' first retained offsets are read: a
//! partition that no longer starts at 0 lost records to retention, whose documents the new
//! generation would lack; the migration then waits for `migration.allowIncompleteHistory`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use vectorpipe_crds::v1alpha1::{
    EmbeddingPipeline, IndexGeneration, IndexModel, IndexStatus, MigrationStatus,
    RetainedGeneration, StartingOffset,
};

use super::index::{self, AliasLook};
use crate::context::Context;
use crate::controllers::scaling_policy::lag;
use crate::secrets::Secrets;

/// The pipeline's generations as its status last had them, unless the spec now names another
/// index (a renamed index starts over from what that name stands for).
pub fn current(pipeline: &EmbeddingPipeline) -> Option<&IndexStatus> {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.index.as_ref())
        .filter(|i| i.alias == pipeline.spec.sink.opensearch.index)
}

/// The name of the generation `n` of the index readers know as `alias`.
pub fn generation_index(alias: &str, n: i64) -> String {
    if n == 0 {
        alias.to_owned()
    } else {
        format!("{alias}-g{n}")
    }
}

/// The generation number in an index name made by [`generation_index`] (0 for another name).
pub fn generation_of(alias: &str, index: &str) -> i64 {
    index
        .strip_prefix(alias)
        .and_then(|rest| rest.strip_prefix("-g"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The pipeline as the workers of `generation` run it: its model, index and consumer group in
/// place of the spec's (the group only when it is not the spec's own, so that a pipeline's
/// first generation renders as before).
pub fn pipeline_for(
    pipeline: &EmbeddingPipeline,
    generation: &IndexGeneration,
) -> EmbeddingPipeline {
    let mut out = pipeline.clone();
    let spec = &mut out.spec;
    generation.model.apply_to(spec);
    spec.sink.opensearch.index = generation.index.clone();
    let namespace = pipeline.namespace().unwrap_or_default();
    let base = spec
        .source
        .kafka
        .consumer_group(&namespace, &pipeline.name_any());
    if generation.consumer_group != base {
        spec.source.kafka.group_id = Some(generation.consumer_group.clone());
    }
    out
}

/// The pipeline the backfill workers run: the target generation from the earliest record, with
/// the object renamed `<name>-backfill` (so its children are `<name>-backfill-worker`, selected
/// apart from the live workers), no query server and no budget of its own.
pub fn backfill_pipeline(
    pipeline: &EmbeddingPipeline,
    target: &IndexGeneration,
    replicas: i32,
) -> EmbeddingPipeline {
    let mut out = pipeline_for(pipeline, target);
    out.spec.source.kafka.group_id = Some(target.consumer_group.clone());
    out.spec.source.kafka.starting_offset = StartingOffset::Earliest;
    out.spec.workers.replicas = replicas;
    out.spec.suspend = false;
    out.spec.query = Default::default();
    out.spec.budget = None;
    out.metadata.name = Some(backfill_name(pipeline));
    out
}

/// The name the backfill pipeline's children are made under.
pub fn backfill_name(pipeline: &EmbeddingPipeline) -> String {
    format!("{}-backfill", pipeline.name_any())
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning or Normal.
    pub warning: bool,
    /// CamelCase.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

fn note(warning: bool, reason: &'static str, message: String) -> Note {
    Note {
        warning,
        reason,
        message,
    }
}

/// What one reconcile does about generations.
#[derive(Clone, Debug)]
pub struct Layout {
    /// What the live workers run.
    pub live: EmbeddingPipeline,
    /// What the backfill workers run, while a migration builds a generation.
    pub backfill: Option<EmbeddingPipeline>,
    /// The alias the first generation's workers create with their index (none for generation 0).
    pub alias_for_workers: Option<String>,
    /// `status.index`; None while the operator cannot see the cluster's indices (SigV4, or not
    /// reachable yet): the pipeline then runs on the index named in the spec, as before.
    pub status: Option<IndexStatus>,
    /// Events.
    pub notes: Vec<Note>,
}

impl Layout {
    /// The pipeline on the index its spec names, without generations.
    pub fn plain(pipeline: &EmbeddingPipeline) -> Self {
        Self {
            live: pipeline.clone(),
            backfill: None,
            alias_for_workers: None,
            status: None,
            notes: Vec::new(),
        }
    }
}

/// What the reconcile read of the backfill's consumer group: per partition.
pub type GroupRead = Result<Vec<lag::PartitionLag>, String>;

/// Reads that the decisions below need, passed in so that they stay pure.
pub struct Reads<'a> {
    /// The backfill group's positions (lag, retained history).
    pub target_group: Option<&'a GroupRead>,
    /// Ready backfill workers.
    pub backfill_ready: i32,
}

/// The generations of the pipeline as they are when status has none yet: adopted from what the
/// alias points at, an index made before generations (0), or a first generation (1).
pub fn first_status(pipeline: &EmbeddingPipeline, look: &AliasLook) -> Result<IndexStatus, String> {
    let alias = pipeline.spec.sink.opensearch.index.clone();
    let namespace = pipeline.namespace().unwrap_or_default();
    let group = pipeline
        .spec
        .source
        .kafka
        .consumer_group(&namespace, &pipeline.name_any());
    let index = match look {
        AliasLook::Alias(indices) => match indices.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(format!(
                    "the alias {alias:?} points at {} indices ({}); point it at one, the generation readers should search",
                    indices.len(),
                    indices.join(", ")
                ));
            }
        },
        AliasLook::Index => alias.clone(),
        AliasLook::Missing => generation_index(&alias, 1),
    };
    Ok(IndexStatus {
        serving: IndexGeneration {
            generation: generation_of(&alias, &index),
            index,
            consumer_group: group,
            model: IndexModel::of(&pipeline.spec),
        },
        alias,
        migration: None,
        previous: Vec::new(),
    })
}

/// Partitions that no longer hold their first records, as `topic/partition@offset`.
fn lost_history(partitions: &[lag::PartitionLag]) -> Vec<String> {
    partitions
        .iter()
        .filter(|p| p.low > 0)
        .map(|p| format!("{}/{}@{}", p.topic, p.partition, p.low))
        .collect()
}

/// The next step of the generations, from `status` (as last written) and the spec.
/// `switched`: called to move the alias when the migration caught up; Err keeps it running.
pub fn step(
    pipeline: &EmbeddingPipeline,
    mut status: IndexStatus,
    reads: &Reads<'_>,
    now: &Time,
) -> Step {
    let model = IndexModel::of(&pipeline.spec);
    let settings = &pipeline.spec.migration;
    let mut notes = Vec::new();
    let mut cancel = Vec::new();
    // Retained generations whose time is up.
    let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut status.previous)
        .into_iter()
        .partition(|p| p.delete_after.0 <= now.0);
    status.previous = kept;
    let expired: Vec<String> = expired.into_iter().map(|p| p.generation.index).collect();
    let to_delete = |cancel: Vec<String>| expired.iter().cloned().chain(cancel).collect();

    if model == status.serving.model {
        if let Some(migration) = status.migration.take() {
            notes.push(note(
                false,
                "MigrationCancelled",
                format!(
                    "the spec's model is the one of generation {} again: stopped building generation {} ({})",
                    status.serving.generation, migration.target.generation, migration.target.index
                ),
            ));
            if !status
                .previous
                .iter()
                .any(|p| p.generation.index == migration.target.index)
            {
                cancel.push(migration.target.index.clone());
            }
        }
        return Step {
            status,
            backfill: false,
            switch: false,
            delete: to_delete(cancel),
            notes,
        };
    }

    // A migration to this model: the one under way, a retained generation, or a new one.
    let same_target = status
        .migration
        .as_ref()
        .is_some_and(|m| m.target.model == model);
    if !same_target {
        if let Some(old) = status.migration.take() {
            notes.push(note(
                false,
                "MigrationCancelled",
                format!(
                    "the spec's model changed again: stopped building generation {} ({})",
                    old.target.generation, old.target.index
                ),
            ));
            if !status
                .previous
                .iter()
                .any(|p| p.generation.index == old.target.index)
            {
                cancel.push(old.target.index);
            }
        }
        let retained = status
            .previous
            .iter()
            .find(|p| p.generation.model == model)
            .map(|p| p.generation.clone());
        let target = retained.clone().unwrap_or_else(|| {
            let highest = std::iter::once(status.serving.generation)
                .chain(status.previous.iter().map(|p| p.generation.generation))
                .chain(cancel.iter().map(|i| generation_of(&status.alias, i)))
                .max()
                .unwrap_or(0);
            let n = highest + 1;
            let namespace = pipeline.namespace().unwrap_or_default();
            let base = pipeline
                .spec
                .source
                .kafka
                .consumer_group(&namespace, &pipeline.name_any());
            IndexGeneration {
                generation: n,
                index: generation_index(&status.alias, n),
                consumer_group: format!("{base}-g{n}"),
                model: model.clone(),
            }
        });
        let what = model.changes_from(&status.serving.model);
        let message = match &retained {
            Some(_) => format!(
                "back to generation {} ({}), kept since the last migration: {what}; it catches up from where it stopped, readers stay on {} until then",
                target.generation, target.index, status.serving.index
            ),
            None => format!(
                "building generation {} ({}) for {what}; readers stay on {} until it has caught up",
                target.generation, target.index, status.serving.index
            ),
        };
        notes.push(note(false, "MigrationStarted", message.clone()));
        status.migration = Some(MigrationStatus {
            target,
            phase: "Backfilling".into(),
            started_at: now.clone(),
            records: 0,
            lag: None,
            eta_seconds: None,
            observed_at: None,
            message,
        });
    }
    let Some(mut migration) = status.migration.take() else {
        unreachable!("a migration was set above");
    };
    let rebuilding = !status
        .previous
        .iter()
        .any(|p| p.generation.index == migration.target.index);

    let mut switch = false;
    match reads.target_group {
        Some(Ok(partitions)) => {
            let lost = lost_history(partitions);
            let committed = partitions.iter().any(|p| p.committed.is_some());
            if rebuilding && !committed && !lost.is_empty() && !settings.allow_incomplete_history {
                let message = format!(
                    "generation {} cannot be built from the whole history: the source no longer holds the first records of {} partitions ({}), deleted by retention, so their documents would be missing from it. Raise the topics' retention.ms before the next migration, or set spec.migration.allowIncompleteHistory: true to build it from what Kafka still has",
                    migration.target.generation,
                    lost.len(),
                    lost.join(", ")
                );
                if migration.phase != "Blocked" {
                    notes.push(note(true, "MigrationBlocked", message.clone()));
                }
                migration.phase = "Blocked".into();
                migration.message = message;
                status.migration = Some(migration);
                return Step {
                    status,
                    backfill: false,
                    switch: false,
                    delete: to_delete(cancel),
                    notes,
                };
            }
            let summary = lag::summarize(partitions, StartingOffset::Earliest);
            let done: i64 = partitions
                .iter()
                .map(|p| p.high - p.lag(StartingOffset::Earliest) - p.low)
                .sum();
            if let Some(at) = &migration.observed_at {
                let seconds = (now.0.as_second() - at.0.as_second()) as f64;
                let rate = (done - migration.records) as f64 / seconds.max(1.0);
                migration.eta_seconds = (rate > 0.0 && summary.sum > 0)
                    .then(|| (summary.sum as f64 / rate).ceil() as i64)
                    .or((summary.sum == 0).then_some(0));
            }
            migration.records = done;
            migration.lag = Some(summary.sum);
            migration.observed_at = Some(now.clone());
            migration.phase = "Backfilling".into();
            migration.message = format!(
                "generation {} ({}): {} records done, {} behind{}",
                migration.target.generation,
                migration.target.index,
                done,
                summary.sum,
                migration
                    .eta_seconds
                    .map(|s| format!(", about {s}s to go"))
                    .unwrap_or_default()
            );
            switch = committed && reads.backfill_ready > 0 && summary.sum <= settings.catch_up_lag;
        }
        Some(Err(e)) => {
            migration.message = format!(
                "generation {} ({}): its consumer group's progress cannot be read: {e}",
                migration.target.generation, migration.target.index
            );
        }
        None => {}
    }
    status.migration = Some(migration);
    Step {
        status,
        backfill: true,
        switch,
        delete: to_delete(cancel),
        notes,
    }
}

/// What [`step`] decided.
#[derive(Clone, Debug)]
pub struct Step {
    /// The status after it (the switch not applied yet).
    pub status: IndexStatus,
    /// Run the backfill workers.
    pub backfill: bool,
    /// The migration caught up: switch readers to it.
    pub switch: bool,
    /// Indices to delete: retained generations whose time is up, cancelled ones.
    pub delete: Vec<String>,
    /// Events.
    pub notes: Vec<Note>,
}

/// The status once the alias points at the migration's target: the old generation is kept for
/// `retainPrevious` (generation 0 is gone: the alias took its name).
pub fn switched(
    pipeline: &EmbeddingPipeline,
    mut status: IndexStatus,
    now: &Time,
) -> (IndexStatus, Note) {
    let Some(migration) = status.migration.take() else {
        return (
            status,
            note(false, "MigrationCompleted", "nothing to switch".into()),
        );
    };
    let old = std::mem::replace(&mut status.serving, migration.target);
    status
        .previous
        .retain(|p| p.generation.index != status.serving.index);
    let retain = pipeline.spec.migration.retain_previous.get();
    let kept = if old.generation == 0 {
        format!(
            "{} was removed in the same request (an alias cannot share its name with an index)",
            old.index
        )
    } else {
        let until = now.0 + retain;
        status.previous.push(RetainedGeneration {
            generation: old.clone(),
            retired_at: now.clone(),
            delete_after: Time(until),
        });
        format!(
            "{} is kept until {} (spec.migration.retainPrevious), for going back",
            old.index,
            until.strftime("%Y-%m-%d %H:%M:%S UTC")
        )
    };
    let message = format!(
        "readers now search generation {} ({}) through {}; {kept}",
        status.serving.generation, status.serving.index, status.alias
    );
    (status, note(false, "MigrationCompleted", message))
}

/// How long a read of the backfill group's positions may take.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One reconcile's generations of `pipeline` (as the workers run it: the budget applied):
/// reads, decides, moves the alias and deletes what is to go.
pub async fn layout(
    ctx: &Context,
    pipeline: &EmbeddingPipeline,
    namespace: &str,
    now: &Time,
) -> Layout {
    let sink = &pipeline.spec.sink.opensearch;
    if sink.auth.as_ref().is_some_and(|a| a.sigv4.is_some()) {
        // The operator cannot sign OpenSearch requests yet: no alias to move.
        return Layout::plain(pipeline);
    }
    let mut secrets = Secrets::new(&ctx.client, namespace);
    let status = match current(pipeline).cloned() {
        Some(status) => status,
        None => {
            let look = match index::look_up_alias(&mut secrets, pipeline).await {
                Ok(look) => look,
                Err(why) => {
                    tracing::debug!(%why, "index generations not set up yet: OpenSearch not readable");
                    return Layout::plain(pipeline);
                }
            };
            match first_status(pipeline, &look) {
                Ok(status) => status,
                Err(why) => {
                    tracing::warn!(%why, "index generations not set up");
                    return Layout::plain(pipeline);
                }
            }
        }
    };
    let none = Reads {
        target_group: None,
        backfill_ready: 0,
    };
    let mut decided = step(pipeline, status.clone(), &none, now);
    if let Some(target) = decided.status.migration.as_ref().map(|m| m.target.clone()) {
        let credentials = crate::controllers::scaling_policy::kafka_credentials(
            &ctx.client,
            namespace,
            &pipeline.spec,
        )
        .await
        .map_err(|e| e.to_string());
        let read: GroupRead = match credentials {
            Ok(credentials) => {
                ctx.spend
                    .readers
                    .kafka_lag(
                        &pipeline.spec.source.kafka,
                        &target.consumer_group,
                        &credentials,
                        READ_TIMEOUT,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        let ready = kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
            ctx.client.clone(),
            namespace,
        )
        .get_opt(&format!("{}-worker", backfill_name(pipeline)))
        .await
        .ok()
        .flatten()
        .and_then(|d| d.status?.ready_replicas)
        .unwrap_or_default();
        let reads = Reads {
            target_group: Some(&read),
            backfill_ready: ready,
        };
        decided = step(pipeline, status, &reads, now);
    }
    let Step {
        mut status,
        backfill,
        switch,
        delete,
        mut notes,
    } = decided;
    let mut backfilling = backfill;
    if switch && let Some(migration) = &status.migration {
        let (from, to) = (status.serving.index.clone(), migration.target.index.clone());
        match index::switch_alias(
            &mut secrets,
            pipeline,
            &from,
            &to,
            status.serving.generation == 0,
        )
        .await
        {
            Ok(()) => {
                let (after, said) = switched(pipeline, status, now);
                status = after;
                notes.push(said);
                backfilling = false;
            }
            Err(e) => notes.push(note(
                true,
                "MigrationSwitchFailed",
                format!(
                    "moving the alias {} from {from} to {to} failed: {e}; trying again",
                    status.alias
                ),
            )),
        }
    }
    for index_name in delete {
        match index::delete_named(&mut secrets, pipeline, &index_name).await {
            Ok(()) => notes.push(note(
                false,
                "GenerationDeleted",
                format!("deleted the index {index_name}, a generation no reader searches"),
            )),
            Err(e) => notes.push(note(
                true,
                "GenerationNotDeleted",
                format!("could not delete the index {index_name} (delete it by hand): {e}"),
            )),
        }
    }
    let backfill = backfilling
        .then(|| status.migration.as_ref().map(|m| m.target.clone()))
        .flatten()
        .map(|target| {
            let settings = &pipeline.spec.migration;
            let replicas = if pipeline.spec.suspend {
                0
            } else {
                settings
                    .backfill_replicas
                    .unwrap_or(pipeline.spec.workers.replicas.max(1))
            };
            backfill_pipeline(pipeline, &target, replicas)
        });
    Layout {
        live: pipeline_for(pipeline, &status.serving),
        backfill,
        alias_for_workers: (status.serving.generation != 0).then(|| status.alias.clone()),
        status: Some(status),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dimensions: i32) -> EmbeddingPipeline {
        let mut p: EmbeddingPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": "posts", "namespace": "shop", "uid": "u-1"},
            "spec": {
                "source": {"kafka": {"bootstrapServers": ["k:9092"], "topics": ["posts"]}},
                "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0", "dimensions": dimensions}},
                "sink": {"opensearch": {"endpoints": ["http://o:9200"], "index": "posts"}},
                "migration": {"retainPrevious": "1h"},
            }
        }))
        .unwrap();
        p.metadata.generation = Some(1);
        p
    }

    fn at(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn partitions(committed: Option<i64>, low: i64, high: i64) -> Vec<lag::PartitionLag> {
        vec![lag::PartitionLag {
            topic: "posts".into(),
            partition: 0,
            committed,
            low,
            high,
        }]
    }

    #[test]
    fn a_new_pipeline_starts_on_generation_one_and_an_old_index_is_generation_zero() {
        let p = pipeline(256);
        let new = first_status(&p, &AliasLook::Missing).unwrap();
        assert_eq!(
            (new.serving.generation, new.serving.index.as_str()),
            (1, "posts-g1")
        );
        assert_eq!(new.serving.consumer_group, "vectorpipe-shop-posts");
        let old = first_status(&p, &AliasLook::Index).unwrap();
        assert_eq!(
            (old.serving.generation, old.serving.index.as_str()),
            (0, "posts")
        );
        let adopted = first_status(&p, &AliasLook::Alias(vec!["posts-g7".into()])).unwrap();
        assert_eq!(adopted.serving.generation, 7);
        assert!(first_status(&p, &AliasLook::Alias(vec!["a".into(), "b".into()])).is_err());
        // The first generation renders as before but for its index.
        let live = pipeline_for(&p, &new.serving);
        assert_eq!(live.spec.source.kafka.group_id, None);
        assert_eq!(live.spec.sink.opensearch.index, "posts-g1");
    }

    #[test]
    fn a_model_change_builds_the_next_generation_and_switches_once_caught_up() {
        let before = pipeline(256);
        let status = first_status(&before, &AliasLook::Missing).unwrap();
        let after = pipeline(1024);
        let none = Reads {
            target_group: None,
            backfill_ready: 0,
        };
        let started = step(&after, status, &none, &at("2026-12-04T12:00:00Z"));
        assert!(started.backfill && !started.switch);
        let m = started.status.migration.clone().unwrap();
        assert_eq!(m.target.index, "posts-g2");
        assert_eq!(m.target.consumer_group, "vectorpipe-shop-posts-g2");
        assert_eq!(started.notes[0].reason, "MigrationStarted");
        assert!(
            started.notes[0]
                .message
                .contains("dimensions Some(256) -> Some(1024)"),
            "{:?}",
            started.notes
        );
        // The live workers keep the old model; the backfill runs the new one from the start.
        let live = pipeline_for(&after, &started.status.serving);
        assert_eq!(live.spec.embedding.bedrock.dimensions, Some(256));
        let backfill = backfill_pipeline(&after, &m.target, 2);
        assert_eq!(backfill.spec.embedding.bedrock.dimensions, Some(1024));
        assert_eq!(backfill.name_any(), "posts-backfill");
        assert_eq!(
            backfill.spec.source.kafka.starting_offset,
            StartingOffset::Earliest
        );

        // Halfway: progress and an ETA; not switched.
        let read = Ok(partitions(Some(500), 0, 1000));
        let reads = Reads {
            target_group: Some(&read),
            backfill_ready: 2,
        };
        let first = step(&after, started.status, &reads, &at("2026-12-04T12:00:10Z"));
        let m = first.status.migration.clone().unwrap();
        assert_eq!((m.records, m.lag), (500, Some(500)));
        assert!(!first.switch);
        let read = Ok(partitions(Some(750), 0, 1000));
        let reads = Reads {
            target_group: Some(&read),
            backfill_ready: 2,
        };
        let second = step(&after, first.status, &reads, &at("2026-12-04T12:00:20Z"));
        let m = second.status.migration.clone().unwrap();
        assert_eq!(m.eta_seconds, Some(10), "250 left at 25 records/s");
        // Caught up (within catchUpLag 100): switch.
        let read = Ok(partitions(Some(960), 0, 1000));
        let reads = Reads {
            target_group: Some(&read),
            backfill_ready: 2,
        };
        let third = step(&after, second.status, &reads, &at("2026-12-04T12:00:30Z"));
        assert!(third.switch);
        let (done, said) = switched(&after, third.status, &at("2026-12-04T12:00:31Z"));
        assert_eq!(done.serving.index, "posts-g2");
        assert!(done.migration.is_none());
        assert_eq!(done.previous[0].generation.index, "posts-g1");
        assert_eq!(done.previous[0].delete_after, at("2026-12-04T13:00:31Z"));
        assert_eq!(said.reason, "MigrationCompleted");

        // Back to 256 within the hour: generation 1 again, catching up with its own group.
        let back = step(&before, done.clone(), &none, &at("2026-12-04T12:10:00Z"));
        let m = back.status.migration.clone().unwrap();
        assert_eq!(
            (m.target.index.as_str(), m.target.consumer_group.as_str()),
            ("posts-g1", "vectorpipe-shop-posts")
        );
        // After the hour, generation 1 is deleted.
        let later = step(&after, done, &none, &at("2026-12-04T13:00:32Z"));
        assert_eq!(later.delete, vec!["posts-g1".to_owned()]);
        assert!(later.status.previous.is_empty());
    }

    #[test]
    fn lost_history_blocks_a_new_generation_until_allowed_and_a_revert_cancels() {
        let status = first_status(&pipeline(256), &AliasLook::Missing).unwrap();
        let after = pipeline(1024);
        let read = Ok(partitions(None, 1200, 5000));
        let reads = Reads {
            target_group: Some(&read),
            backfill_ready: 0,
        };
        let blocked = step(&after, status, &reads, &at("2026-12-04T12:00:00Z"));
        let m = blocked.status.migration.clone().unwrap();
        assert_eq!(m.phase, "Blocked");
        assert!(!blocked.backfill);
        assert!(m.message.contains("posts/0@1200"), "{}", m.message);
        assert!(
            blocked
                .notes
                .iter()
                .any(|n| n.reason == "MigrationBlocked" && n.warning)
        );
        let mut allowed = after.clone();
        allowed.spec.migration.allow_incomplete_history = true;
        let going = step(
            &allowed,
            blocked.status.clone(),
            &reads,
            &at("2026-12-04T12:00:05Z"),
        );
        assert!(going.backfill);
        // The spec goes back: the migration stops and its index goes.
        let reverted = step(
            &pipeline(256),
            going.status,
            &reads,
            &at("2026-12-04T12:00:10Z"),
        );
        assert!(reverted.status.migration.is_none() && !reverted.backfill);
        assert_eq!(reverted.delete, vec!["posts-g2".to_owned()]);
        assert_eq!(reverted.notes[0].reason, "MigrationCancelled");
    }
}
