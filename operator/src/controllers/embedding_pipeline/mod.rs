//! The EmbeddingPipeline controller. Each reconcile runs the same five steps: dereference (every
//! read), validate (pure), build (pure), apply, status (with the Events derived from the status
//! change).

pub mod budget;
pub mod build;
pub mod events;
pub mod generations;
pub mod index;
pub mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};
use vectorpipe_crds::v1alpha1::conditions::{READY, is_true};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, EmbeddingPipelineStatus};
use vectorpipe_crds::validate;

use crate::blocked::Blocked;
use crate::context::{Context, api, apply_status, slim};
use crate::error::{Error, Step, kube as kerr};
use crate::labels::FIELD_MANAGER;
use crate::metrics::{ControllerLabel, ErrorLabels};
use crate::secrets::{SecretProblem, Secrets};

pub(crate) const CONTROLLER: &str = "embeddingpipeline";
/// How often a healthy pipeline is looked at even without changes.
const RESYNC: Duration = Duration::from_secs(300);
/// How often a pipeline whose workers are not ready yet is looked at again.
const PROGRESS_RECHECK: Duration = Duration::from_secs(30);
/// How often a pipeline waiting for a Secret is looked at again.
const SECRET_RECHECK: Duration = Duration::from_secs(10);
/// How often the spend of a pipeline with a budget is read.
const BUDGET_RECHECK: Duration = Duration::from_secs(30);
/// How often a migration's progress is read.
const MIGRATION_RECHECK: Duration = Duration::from_secs(5);

/// The day's spend of a pipeline with `spec.budget`, from the workers' token counters in
/// Prometheus; None without a budget.
async fn spend(
    ctx: &Context,
    pipeline: &EmbeddingPipeline,
    namespace: &str,
    name: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<budget::Spent> {
    let labels = crate::metrics::PipelineLabels {
        namespace: namespace.to_owned(),
        pipeline: name.to_owned(),
    };
    let Some(limits) = pipeline.spec.budget.as_ref() else {
        // A budget removed: its series go too, so no alert fires on a stale 1.
        let metrics = &ctx.metrics;
        metrics.budget_tokens.remove(&labels);
        metrics.budget_cost.remove(&labels);
        metrics.budget_exceeded.remove(&labels);
        return None;
    };
    let read = async {
        let (since, until) = budget::day(limits, now)?;
        let url = ctx.spend.prometheus.as_deref().ok_or_else(|| {
            "the operator has no Prometheus server to read the workers' token counters from: start it with --prometheus-url (chart value prometheus.url)".to_owned()
        })?;
        let range = budget::range_since(since, now);
        // -1 stands for "no worker series since the day began" (a sum over none has no sample).
        let query = format!(
            r#"sum(increase(vectorpipe_worker_input_tokens_total{{namespace="{namespace}",pipeline="{name}"}}[{}s])) or vector(-1)"#,
            range.as_secs()
        );
        let tokens = ctx
            .spend
            .readers
            .promql(url, &query, Duration::from_secs(10))
            .await
            .map_err(|e| format!("reading the day's tokens from Prometheus: {e}"))?;
        // None scraped: no scraped worker spent anything.
        let seen = tokens >= 0.0;
        let tokens = if seen { tokens.round() as i64 } else { 0 };
        let verdict = budget::judge(
            limits,
            &ctx.spend.prices,
            &pipeline.spec.embedding.bedrock.model_id,
            tokens,
            until,
        );
        Ok::<_, String>(budget::Spent::Judged {
            since,
            verdict,
            seen,
        })
    };
    let spent = read.await.unwrap_or_else(budget::Spent::Unreadable);
    if let budget::Spent::Judged { verdict, .. } = &spent {
        let metrics = &ctx.metrics;
        metrics
            .budget_tokens
            .get_or_create(&labels)
            .set(verdict.tokens);
        if let Some(cost) = verdict.cost {
            metrics.budget_cost.get_or_create(&labels).set(cost);
        }
        metrics
            .budget_exceeded
            .get_or_create(&labels)
            .set(i64::from(verdict.exceeded.is_some()));
    }
    Some(spent)
}

/// What a reconcile read about the world, before it decides anything.
struct World {
    /// The first Secret the spec names that cannot be used (an unreadable one is an error).
    secret: Option<SecretProblem>,
    /// What the pipeline's index looks like; None when not looked at (an invalid spec or an
    /// unusable Secret names no endpoint worth calling).
    index: Option<index::Finding>,
    /// The worker Deployment as it is.
    deployment: Option<Deployment>,
}

/// Step 1, every read: the Secrets the spec names, the index's mapping, the worker Deployment.
async fn dereference(
    ctx: &Context,
    namespace: &str,
    pipeline: &EmbeddingPipeline,
) -> Result<World, Error> {
    let client = &ctx.client;
    let mut secrets = Secrets::new(client, namespace);
    let mut secret = None;
    for (name, keys) in build::referenced_secrets(pipeline) {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        match secrets.check(&name, &keys).await {
            Ok(()) => {}
            Err(problem) if problem.is_transient() => return Err(problem.into()),
            Err(problem) => {
                secret = Some(problem);
                break;
            }
        }
    }
    let index = if secret.is_none() && validate::pipeline(&pipeline.spec).is_ok() {
        // With generations, the index in service is checked against its own model: a changed
        // model is a migration to a new generation, not a mismatch.
        let checked = match generations::current(pipeline) {
            Some(status) => generations::pipeline_for(pipeline, &status.serving),
            None => pipeline.clone(),
        };
        Some(index::check(&ctx.index_checks, &mut secrets, &checked).await)
    } else {
        None
    };
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(&build::child_name(pipeline))
        .await
        .map_err(kerr(Step::Dereference, "reading the Deployment"))?;
    Ok(World {
        secret,
        index,
        deployment,
    })
}

/// Step 2, pure: what stops the pipeline from running, if anything. The spec's own rules first,
/// then its references.
fn validate(pipeline: &EmbeddingPipeline, world: &World) -> Option<Blocked> {
    if let Err(problems) = validate::pipeline(&pipeline.spec) {
        return Some(Blocked::invalid_spec(problems.to_string()));
    }
    if let Some(problem) = &world.secret {
        return Some(problem.into());
    }
    match &world.index {
        Some(index::Finding::Mismatch(blocked)) => Some(blocked.clone()),
        Some(index::Finding::Fine | index::Finding::Unchecked(_)) | None => None,
    }
}

/// Step 4: server-side applies every child and removes the PDB and the query server when they
/// are no longer wanted. Returns the workers' and the query server's Deployments as the
/// apiserver holds them after the apply.
async fn apply(
    client: &kube::Client,
    namespace: &str,
    children: &build::Children,
) -> Result<(Deployment, Option<Deployment>), Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = children
        .deployment
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(&name, &params, &Patch::Apply(&children.config_map))
        .await
        .map_err(kerr(Step::Apply, "applying the ConfigMap"))?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(&name, &params, &Patch::Apply(&children.deployment))
        .await
        .map_err(kerr(Step::Apply, "applying the Deployment"))?;
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(&name, &params, &Patch::Apply(&children.service))
        .await
        .map_err(kerr(Step::Apply, "applying the Service"))?;
    let query_name = &children.query_name;
    let query_deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let query_services = Api::<Service>::namespaced(client.clone(), namespace);
    let query = match &children.query {
        Some((deployment, service)) => {
            let applied = query_deployments
                .patch(query_name, &params, &Patch::Apply(deployment))
                .await
                .map_err(kerr(Step::Apply, "applying the query server's Deployment"))?;
            query_services
                .patch(query_name, &params, &Patch::Apply(service))
                .await
                .map_err(kerr(Step::Apply, "applying the query server's Service"))?;
            Some(applied)
        }
        None => {
            for deleted in [
                query_deployments
                    .delete(query_name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                query_services
                    .delete(query_name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            ] {
                match deleted {
                    Ok(()) => {}
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => {
                        return Err(kerr(Step::Apply, "deleting the query server")(e));
                    }
                }
            }
            None
        }
    };
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace);
    match &children.pdb {
        Some(pdb) => {
            pdbs.patch(&name, &params, &Patch::Apply(pdb))
                .await
                .map_err(kerr(Step::Apply, "applying the PodDisruptionBudget"))?;
        }
        None => match pdbs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(kerr(Step::Apply, "deleting the PodDisruptionBudget")(e)),
        },
    }
    Ok((deployment, query))
}

/// Step 5: writes `status` when it differs from the cached one, by server-side apply as the
/// pipeline controller, then publishes the Events the change calls for. Returns whether it
/// wrote.
async fn write_status(
    ctx: &Context,
    pipeline: &EmbeddingPipeline,
    name: &str,
    namespace: &str,
    status: &EmbeddingPipelineStatus,
) -> Result<bool, Error> {
    if pipeline.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let api: Api<EmbeddingPipeline> = Api::namespaced(ctx.client.clone(), namespace);
    // consumerLag and lastScaleTime belong to the scaling controller: left out, so this manager
    // never owns them and an older cached value never overwrites a newer one.
    let mut owned = status.clone();
    owned.consumer_lag = None;
    owned.last_scale_time = None;
    apply_status(&api, name, FIELD_MANAGER, owned)
        .await
        .map_err(kerr(Step::Status, "writing the status"))?;
    for note in events::derive(pipeline, pipeline.status.as_ref(), status) {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, pipeline, type_, &note.reason, &note.message).await;
    }
    Ok(true)
}

/// One reconcile of one pipeline. Level-based: it looks at the world, not at why it was woken.
#[instrument(skip(pipeline, ctx), fields(namespace = pipeline.namespace().as_deref(), name = %pipeline.name_any()))]
pub async fn reconcile(
    pipeline: Arc<EmbeddingPipeline>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let label = ControllerLabel {
        controller: CONTROLLER.into(),
    };
    ctx.metrics.reconciles.get_or_create(&label).inc();
    let result = reconcile_inner(&pipeline, &ctx).await;
    ctx.metrics
        .duration
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Dereference → validate → build → apply → status. A blocked pipeline is not built or
/// applied: its workers stay as they are until the problem is fixed.
async fn reconcile_inner(pipeline: &EmbeddingPipeline, ctx: &Context) -> Result<Action, Error> {
    let namespace = pipeline
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let name = pipeline
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingMetadata("name"))?;

    if let Some(action) = finalize(pipeline, ctx, &namespace, &name).await? {
        return Ok(action);
    }
    let world = dereference(ctx, &namespace, pipeline).await?;
    let blocked = validate(pipeline, &world);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let spent = match &blocked {
        None => spend(ctx, pipeline, &namespace, &name, now.0).await,
        Some(_) => None,
    };
    // What the workers run: the spec, suspended or throttled by a used-up budget.
    let effective = budget::effect(pipeline, spent.as_ref());
    let layout = match &blocked {
        None => generations::layout(ctx, &effective, &namespace, &now).await,
        Some(_) => {
            let mut plain = generations::Layout::plain(&effective);
            plain.status = generations::current(pipeline).cloned();
            plain
        }
    };
    let (deployment, query) = match &blocked {
        None => {
            let mut children = build::build(&layout.live, &ctx.defaults)?;
            if let Some(alias) = &layout.alias_for_workers {
                build::set_env(&mut children.deployment, "VECTORPIPE_INDEX_ALIAS", alias);
            }
            let (workers, query) = apply(&ctx.client, &namespace, &children).await?;
            apply_backfill(ctx, &namespace, pipeline, layout.backfill.as_ref()).await?;
            (Some(workers), query)
        }
        Some(_) => (world.deployment, None),
    };
    let mut status = status::compute(&effective, blocked.as_ref(), deployment.as_ref(), &now);
    if blocked.is_none() {
        status::query_condition(pipeline, query.as_ref(), &mut status, &now);
        status::budget_condition(pipeline, spent.as_ref(), &mut status, &now);
    }
    status.index = layout.status.clone();
    write_status(ctx, pipeline, &name, &namespace, &status).await?;
    for note in &layout.notes {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, pipeline, type_, note.reason, &note.message).await;
    }
    let index_recheck = status.index.as_ref().and_then(|index| {
        if index.migration.is_some() {
            return Some(MIGRATION_RECHECK);
        }
        index
            .previous
            .iter()
            .map(|p| {
                let left = p.delete_after.0.as_second() - now.0.as_second();
                Duration::from_secs(left.max(1) as u64)
            })
            .min()
    });
    ctx.reset_backoff(&format!("{namespace}/{name}"));
    Ok(match blocked {
        Some(blocked) if blocked.needs_spec_change() => Action::await_change(),
        Some(_) => Action::requeue(SECRET_RECHECK),
        // Deployment events drive a rollout; a look every few seconds covers a missed one.
        None if !is_true(&status.conditions, READY) && !effective.spec.suspend => {
            Action::requeue(PROGRESS_RECHECK)
        }
        None => {
            let mut next = RESYNC;
            if pipeline.spec.budget.is_some() {
                next = next.min(BUDGET_RECHECK);
            }
            if let Some(index) = index_recheck {
                next = next.min(index);
            }
            Action::requeue(next)
        }
    })
}

/// Applies the backfill workers of a migration (their ConfigMap and Deployment, owned by the
/// pipeline), or removes them when no migration runs.
async fn apply_backfill(
    ctx: &Context,
    namespace: &str,
    pipeline: &EmbeddingPipeline,
    backfill: Option<&EmbeddingPipeline>,
) -> Result<(), Error> {
    let name = format!("{}-worker", generations::backfill_name(pipeline));
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), namespace);
    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace);
    let Some(backfill) = backfill else {
        for deleted in [
            deployments
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
            config_maps
                .delete(&name, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match deleted {
                Ok(()) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(kerr(Step::Apply, "deleting the backfill workers")(e)),
            }
        }
        return Ok(());
    };
    let mut children = build::build(backfill, &ctx.defaults)?;
    // Owned by the real pipeline, and counted under its name in the workers' metrics.
    let real = pipeline.name_any();
    for meta in [
        &mut children.deployment.metadata,
        &mut children.config_map.metadata,
    ] {
        for owner in meta.owner_references.iter_mut().flatten() {
            owner.name = real.clone();
        }
    }
    build::set_env(&mut children.deployment, "VECTORPIPE_PIPELINE_NAME", &real);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    config_maps
        .patch(&name, &params, &Patch::Apply(&children.config_map))
        .await
        .map_err(kerr(
            Step::Apply,
            "applying the backfill workers' ConfigMap",
        ))?;
    deployments
        .patch(&name, &params, &Patch::Apply(&children.deployment))
        .await
        .map_err(kerr(
            Step::Apply,
            "applying the backfill workers' Deployment",
        ))?;
    Ok(())
}

/// The finalizer that deletes the OpenSearch index with the pipeline (`deleteIndexOnDelete`).
pub const INDEX_FINALIZER: &str = "vectorpipe.io/delete-index";

/// Writes the finalizer list, failing on a concurrent change (the reconcile then retries).
async fn set_finalizers(
    api: &Api<EmbeddingPipeline>,
    pipeline: &EmbeddingPipeline,
    name: &str,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": pipeline.metadata.resource_version,
        }})),
    )
    .await
    .map_err(kerr(Step::Apply, "updating the finalizers"))?;
    Ok(())
}

/// How often a deleted pipeline looks again whether its workers are gone.
const WORKERS_GONE_RECHECK: Duration = Duration::from_secs(2);

/// Deletes the worker Deployment in the foreground and tells whether it still exists. With
/// foreground deletion the Deployment goes only after its ReplicaSets, and they only after their
/// pods, so "gone" means no worker process is left that could write to the index again (a worker
/// still draining would otherwise recreate the index the finalizer just deleted).
async fn workers_still_running(
    ctx: &Context,
    namespace: &str,
    pipeline: &EmbeddingPipeline,
) -> Result<bool, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let mut running = false;
    // The live workers and, during a migration, the backfill workers.
    for name in [
        build::child_name(pipeline),
        format!("{}-worker", generations::backfill_name(pipeline)),
    ] {
        let Some(deployment) = deployments
            .get_opt(&name)
            .await
            .map_err(kerr(Step::Finalize, "reading the Deployment"))?
        else {
            continue;
        };
        running = true;
        if deployment.metadata.deletion_timestamp.is_none() {
            match deployments.delete(&name, &DeleteParams::foreground()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(kerr(Step::Finalize, "deleting the Deployment")(e)),
            }
        }
    }
    Ok(running)
}

/// Adds or removes the index finalizer as the spec asks, and on deletion deletes the index
/// before letting the pipeline go. Some(action) ends the reconcile.
async fn finalize(
    pipeline: &EmbeddingPipeline,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Action>, Error> {
    let api: Api<EmbeddingPipeline> = Api::namespaced(ctx.client.clone(), namespace);
    let finalizers = pipeline.finalizers().to_vec();
    let has = finalizers.iter().any(|f| f == INDEX_FINALIZER);
    let wanted = pipeline.spec.sink.opensearch.delete_index_on_delete;
    let without: Vec<String> = finalizers
        .iter()
        .filter(|f| *f != INDEX_FINALIZER)
        .cloned()
        .collect();
    if pipeline.metadata.deletion_timestamp.is_some() {
        if !has {
            return Ok(Some(Action::await_change()));
        }
        let index = &pipeline.spec.sink.opensearch.index;
        if wanted && workers_still_running(ctx, namespace, pipeline).await? {
            info!(%index, "waiting for the workers to stop before deleting the index");
            return Ok(Some(Action::requeue(WORKERS_GONE_RECHECK)));
        }
        if wanted {
            match index::delete_index(&ctx.client, namespace, pipeline).await {
                Ok(()) => {
                    info!(%index, "deleted the index with the pipeline");
                    publish(
                        ctx,
                        pipeline,
                        EventType::Normal,
                        "IndexDeleted",
                        &format!("deleted OpenSearch index {index} (deleteIndexOnDelete)"),
                    )
                    .await;
                }
                Err(e) => {
                    let note = format!(
                        "could not delete OpenSearch index {index}: {e}; retrying. To let the pipeline go without deleting the index, remove the finalizer {INDEX_FINALIZER}"
                    );
                    warn!(%note);
                    publish(
                        ctx,
                        pipeline,
                        EventType::Warning,
                        "IndexDeleteFailed",
                        &note,
                    )
                    .await;
                    return Ok(Some(Action::requeue(
                        ctx.backoff(&format!("{namespace}/{name}/delete")),
                    )));
                }
            }
        }
        set_finalizers(&api, pipeline, name, without).await?;
        return Ok(Some(Action::await_change()));
    }
    if wanted && !has {
        let mut with = finalizers;
        with.push(INDEX_FINALIZER.to_owned());
        set_finalizers(&api, pipeline, name, with).await?;
    } else if !wanted && has {
        set_finalizers(&api, pipeline, name, without).await?;
    }
    Ok(None)
}

async fn publish(
    ctx: &Context,
    pipeline: &EmbeddingPipeline,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    ctx.publish(pipeline.object_ref(&()), type_, reason, "Reconcile", note)
        .await;
}

/// Transient failures: retried with per-object exponential backoff.
pub fn error_policy(pipeline: Arc<EmbeddingPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabels::of(CONTROLLER, error))
        .inc();
    let key = format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    );
    let wait = ctx.backoff(&key);
    warn!(%error, object = key, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// What triggers a reconcile of a pipeline itself: a new generation (spec change), the start of
/// its deletion, or a change of its finalizers. Status writes do not.
fn spec_or_deletion(pipeline: &EmbeddingPipeline) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    pipeline.metadata.generation.hash(&mut hasher);
    pipeline
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    pipeline.metadata.finalizers.hash(&mut hasher);
    Some(hasher.finish())
}

/// Runs the controller until the process is told to stop: one watch for the whole cluster, or
/// one per watched namespace.
pub async fn run(ctx: Arc<Context>) {
    let watches = ctx.scope.watches();
    futures::future::join_all(
        watches
            .iter()
            .map(|namespace| run_in(ctx.clone(), namespace.as_deref())),
    )
    .await;
}

async fn run_in(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let pipelines: Api<EmbeddingPipeline> = api(&client, namespace);
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=vectorpipe-operator");
    // Only spec changes (a new generation) of a pipeline trigger a reconcile: status writes, by
    // this controller or the scaling controller, do not. Changes of the children still do.
    let (reader, writer) = reflector::store();
    // The cache keeps what reconciles read: no managedFields and no client-side apply copy of
    // the spec (the two largest parts of a pipeline object at thousands of pipelines).
    let trigger = watcher(pipelines, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(slim::<EmbeddingPipeline>)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_deletion, Default::default());
    // Children only wake their pipeline: their metadata (owner references) is all that is
    // needed, so the watches ask for nothing else.
    Controller::for_stream(trigger, reader)
        .owns_stream(
            watcher(api::<PartialObjectMeta<Deployment>>(&client, namespace), owned.clone())
                .default_backoff()
                .touched_objects(),
        )
        .owns_stream(
            watcher(api::<PartialObjectMeta<ConfigMap>>(&client, namespace), owned.clone())
                .default_backoff()
                .touched_objects(),
        )
        .owns_stream(
            watcher(api::<PartialObjectMeta<Service>>(&client, namespace), owned)
                .default_backoff()
                .touched_objects(),
        )
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(crate::context::RECONCILE_CONCURRENCY),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => info!(object = %object.name, namespace = object.namespace.as_deref(), "reconciled"),
                Err(e) => warn!(error = %e, "controller error"),
            }
        })
        .await;
}
