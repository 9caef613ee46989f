//! The ScalingPolicy controller: every `pollInterval` it runs the steps every reconcile runs:
//! dereference (the target pipeline, then the metrics), validate (pure), plan the worker count
//! (pure, `plan` on top of `decide`), apply it through the pipeline's scale subresource, and
//! write the status, with the Events derived from the status change.

pub mod decide;
pub mod events;
pub mod lag;
pub mod observe;
pub mod plan;
pub mod promql;
pub mod quota;
pub mod readers;
pub mod schedule;
pub mod status;
pub mod writers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument, warn};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingMode, ScalingPolicy};
use vectorpipe_crds::validate;

use crate::blocked::Blocked;
use crate::context::{Context, apply_status};
use crate::error::{Error, Step, kube as kerr};
use crate::labels::SCALING_FIELD_MANAGER;
use crate::metrics::{
    ControllerLabel, ErrorLabels, PipelineLabels, PolicyLabels, ScaleLabels, SourceLabel,
};
use plan::PolicyState;
use readers::MetricReaders;
use status::Judgement;

pub(crate) const CONTROLLER: &str = "scalingpolicy";
/// The shortest poll interval honoured.
const MIN_POLL: Duration = Duration::from_millis(500);
/// How often state of deleted policies is dropped.
const CLEANUP_EVERY: Duration = Duration::from_secs(30);

/// Shared state of the scaling controller.
pub struct ScalingContext {
    /// What both controllers share.
    pub base: Arc<Context>,
    /// Where metrics come from.
    pub readers: Arc<dyn MetricReaders>,
    /// The Prometheus server for policies that name none.
    pub default_prometheus: Option<String>,
    store: Store<ScalingPolicy>,
    states: Mutex<HashMap<String, PolicyState>>,
    last_cleanup: Mutex<Instant>,
}

fn key_of(policy: &ScalingPolicy) -> String {
    policy.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            policy.namespace().unwrap_or_default(),
            policy.name_any()
        )
    })
}

/// What is wrong with a policy's spec (CRD rules the apiserver may not have run, cron
/// expressions and time zones), if anything.
fn policy_problem(spec: &vectorpipe_crds::v1alpha1::ScalingPolicySpec) -> Option<String> {
    validate::scaling_policy(spec)
        .err()
        .map(|p| p.to_string())
        .or_else(|| {
            schedule::validate(&spec.schedules)
                .err()
                .map(|e| e.to_string())
        })
}

/// The policy that owns `policy`'s target when several active ones point at it: the oldest, then
/// by name. A dry-run policy changes nothing, so it never conflicts: it can shadow a live one. An
/// invalid policy scales nothing, so it never holds a pipeline either.
fn owner_of_target(policies: &[Arc<ScalingPolicy>], policy: &ScalingPolicy) -> Option<String> {
    if policy.spec.mode == ScalingMode::DryRun {
        return None;
    }
    let namespace = policy.namespace();
    let order = |p: &ScalingPolicy| (p.metadata.creation_timestamp.clone(), p.name_any());
    policies
        .iter()
        .filter(|p| {
            p.namespace() == namespace
                && p.spec.target_ref.name == policy.spec.target_ref.name
                && p.spec.mode == ScalingMode::Active
                && p.metadata.deletion_timestamp.is_none()
                && (p.name_any() == policy.name_any() || policy_problem(&p.spec).is_none())
        })
        .min_by(|a, b| order(a).cmp(&order(b)))
        .map(|p| p.name_any())
        .filter(|owner| *owner != policy.name_any())
}

/// One reconcile of one policy.
#[instrument(skip(policy, ctx), fields(namespace = policy.namespace().as_deref(), name = %policy.name_any()))]
pub async fn reconcile(
    policy: Arc<ScalingPolicy>,
    ctx: Arc<ScalingContext>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let label = ControllerLabel {
        controller: CONTROLLER.into(),
    };
    ctx.base.metrics.reconciles.get_or_create(&label).inc();
    cleanup(&ctx);
    let result = reconcile_inner(&policy, &ctx).await;
    ctx.base
        .metrics
        .duration
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Forgets policies that are gone (their metrics series too).
fn cleanup(ctx: &ScalingContext) {
    {
        let mut last = ctx.last_cleanup.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < CLEANUP_EVERY {
            return;
        }
        *last = Instant::now();
    }
    let live: std::collections::HashSet<String> =
        ctx.store.state().iter().map(|p| key_of(p)).collect();
    let mut states = ctx.states.lock().unwrap_or_else(|e| e.into_inner());
    states.retain(|key, state| {
        let keep = live.contains(key);
        if !keep {
            let metrics = &ctx.base.metrics;
            metrics.desired_replicas.remove(&PolicyLabels {
                namespace: state.namespace.clone(),
                policy: state.name.clone(),
            });
            metrics.consumer_lag.remove(&PipelineLabels {
                namespace: state.namespace.clone(),
                pipeline: state.pipeline.clone(),
            });
            for direction in ["out", "in"] {
                metrics.scale_changes.remove(&ScaleLabels {
                    namespace: state.namespace.clone(),
                    policy: state.name.clone(),
                    direction: direction.into(),
                });
            }
        }
        keep
    });
}

/// Step 2 for a policy, pure: what keeps it from scaling its target, if anything. Its own spec
/// first, then an older policy on the same target, then the target itself.
fn validate<'a>(
    policy: &ScalingPolicy,
    policies: &[Arc<ScalingPolicy>],
    namespace: &str,
    pipeline: Option<&'a EmbeddingPipeline>,
) -> Result<&'a EmbeddingPipeline, Blocked> {
    if let Some(message) = policy_problem(&policy.spec) {
        return Err(Blocked::invalid_spec(message));
    }
    let target = &policy.spec.target_ref.name;
    if let Some(owner) = owner_of_target(policies, policy) {
        return Err(Blocked::new(
            "ConflictingPolicy",
            format!(
                "ScalingPolicy {namespace}/{owner} already scales EmbeddingPipeline {target}; delete or retarget one of the two"
            ),
        ));
    }
    match pipeline {
        None => Err(Blocked::new(
            "TargetNotFound",
            format!(
                "EmbeddingPipeline {namespace}/{target} does not exist; create it or fix spec.targetRef.name"
            ),
        )),
        Some(p) if p.spec.suspend => Err(Blocked::new(
            "TargetSuspended",
            format!(
                "EmbeddingPipeline {namespace}/{target} is suspended (spec.suspend: true); scaling resumes when it is not"
            ),
        )),
        Some(p) => Ok(p),
    }
}

/// Dereference (the target) → validate → poll (metrics → plan → scale → status).
async fn reconcile_inner(policy: &ScalingPolicy, ctx: &ScalingContext) -> Result<Action, Error> {
    let namespace = policy
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let name = policy
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingMetadata("name"))?;
    let spec = &policy.spec;
    let interval = spec.poll_interval.get().max(MIN_POLL);
    let key = key_of(policy);

    // Woken early (e.g. by its own status write): wait for the rest of the interval.
    {
        let states = ctx.states.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = states.get(&key)
            && state.generation == policy.metadata.generation
            && let Some(last) = state.last_poll
            && last.elapsed() < interval.mul_f64(0.9)
        {
            return Ok(Action::requeue(interval - last.elapsed()));
        }
    }
    let now = Timestamp::now();
    let time = Time(now);

    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(ctx.base.client.clone(), &namespace);
    let pipeline = pipelines
        .get_opt(&spec.target_ref.name)
        .await
        .map_err(kerr(Step::Dereference, "reading the target pipeline"))?;
    let pipeline = match validate(policy, &ctx.store.state(), &namespace, pipeline.as_ref()) {
        Ok(pipeline) => pipeline,
        Err(blocked) => {
            let wait_for_change = blocked.needs_spec_change();
            write_status(ctx, policy, &Judgement::Blocked(blocked), &time).await?;
            ctx.base.reset_backoff(&key);
            return Ok(if wait_for_change {
                Action::await_change()
            } else {
                Action::requeue(interval)
            });
        }
    };

    // Take the state out of the map while reading, so no lock is held across awaits.
    let mut state = ctx
        .states
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key)
        .unwrap_or_else(|| PolicyState::first(policy, &namespace, &name));
    let result = poll(ctx, policy, pipeline, &mut state, now, &time).await;
    state.generation = policy.metadata.generation;
    state.pipeline = pipeline.name_any();
    ctx.states
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone(), state);
    result?;
    ctx.base.reset_backoff(&key);
    Ok(Action::requeue(interval))
}

/// Reads the Kafka credentials of a pipeline from the Secrets its spec names (the ones its
/// workers mount). Err says which Secret or key is missing, or that a Secret did not opt in.
pub(crate) async fn kafka_credentials(
    client: &kube::Client,
    namespace: &str,
    pipeline: &vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec,
) -> Result<lag::KafkaCredentials, crate::secrets::SecretProblem> {
    use vectorpipe_kafka::Material;
    let mut credentials = lag::KafkaCredentials::default();
    let Some(auth) = &pipeline.source.kafka.auth else {
        return Ok(credentials);
    };
    let mut secrets = crate::secrets::Secrets::new(client, namespace);
    let ca_ref = auth
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret_ref.as_ref())
        .or_else(|| auth.scram.as_ref().and_then(|s| s.ca_secret_ref.as_ref()));
    if let Some(ca) = ca_ref {
        credentials.ca = Some(Material::Pem(secrets.text(&ca.name, &ca.key).await?));
    }
    if let Some(cert) = auth
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_secret_ref.as_ref())
    {
        credentials.cert = Some(Material::Pem(secrets.text(&cert.name, "tls.crt").await?));
        credentials.key = Some(Material::Pem(secrets.text(&cert.name, "tls.key").await?));
    }
    if let Some(scram) = &auth.scram {
        let name = &scram.secret_ref.name;
        credentials.username = Some(secrets.text(name, "username").await?);
        credentials.password = Some(secrets.text(name, "password").await?);
    }
    Ok(credentials)
}

/// Step 1 of a poll, every metric read: the Kafka credentials, the consumer lag and the
/// Prometheus queries. A read that fails is in `errors`, never a zero.
async fn read_metrics(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    pipeline: &EmbeddingPipeline,
    state: &mut PolicyState,
    now: Timestamp,
) -> observe::Observation {
    let namespace = &state.namespace;
    let credentials = kafka_credentials(&ctx.base.client, namespace, &pipeline.spec)
        .await
        .map_err(|e| e.to_string());
    // The lag is the live workers' group: after a model migration, its generation's own.
    let live = match crate::controllers::embedding_pipeline::generations::current(pipeline) {
        Some(index) => {
            crate::controllers::embedding_pipeline::generations::pipeline_for(
                pipeline,
                &index.serving,
            )
            .spec
        }
        None => pipeline.spec.clone(),
    };
    let observation = observe::observe(
        &policy.spec,
        &live,
        namespace,
        &pipeline.name_any(),
        pipeline.spec.workers.replicas,
        ctx.readers.as_ref(),
        credentials.as_ref().map_err(String::as_str),
        ctx.default_prometheus.as_deref(),
        &mut state.positions,
        now,
    )
    .await;
    for error in &observation.errors {
        let source = if error.starts_with("kafkaLag") {
            "kafka"
        } else {
            "prometheus"
        };
        ctx.base
            .metrics
            .metric_read_errors
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
    }
    observation
}

/// Step 4 of a poll: sets the worker count through the pipeline's scale subresource, as the
/// scaling controller's field manager.
async fn scale(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    pipeline: &EmbeddingPipeline,
    to: i32,
) -> Result<(), Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let target = pipeline.name_any();
    let from = pipeline.spec.workers.replicas;
    Api::<EmbeddingPipeline>::namespaced(ctx.base.client.clone(), &namespace)
        .patch_scale(
            &target,
            &PatchParams {
                field_manager: Some(SCALING_FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({ "spec": { "replicas": to } })),
        )
        .await
        .map_err(kerr(Step::Apply, "scaling the target pipeline"))?;
    info!(pipeline = %target, from, to, "scaled");
    ctx.base
        .metrics
        .scale_changes
        .get_or_create(&ScaleLabels {
            namespace,
            policy: policy.name_any(),
            direction: if to > from { "out" } else { "in" }.into(),
        })
        .inc();
    Ok(())
}

/// Step 5 for the pipeline: its consumerLag (and lastScaleTime), written by server-side apply
/// as the scaling controller, only on a scale or a meaningful change of the lag. Both fields are
/// always sent: a field this manager leaves out of an apply would be removed.
async fn write_pipeline_lag(
    ctx: &ScalingContext,
    pipeline: &EmbeddingPipeline,
    state: &mut PolicyState,
    Observed { lag, freshness }: Observed,
    scaled: bool,
    time: &Time,
) -> Result<(), Error> {
    let target = pipeline.name_any();
    if let Some(lag) = lag {
        ctx.base
            .metrics
            .consumer_lag
            .get_or_create(&PipelineLabels {
                namespace: state.namespace.clone(),
                pipeline: target.clone(),
            })
            .set(lag);
    }
    let current_lag = pipeline.status.as_ref().and_then(|s| s.consumer_lag);
    let lag_due = match (current_lag, lag) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(old), Some(new)) => {
            status::lag_changed_meaningfully(old, new, state.lag_written.map(|at| at.elapsed()))
        }
    };
    let written = state.freshness_written;
    let freshness_due = freshness.is_some_and(|new| {
        status::freshness_changed_meaningfully(
            written.map(|(old, _)| old),
            new,
            written.map(|(_, at)| at.elapsed()),
        )
    });
    if !scaled && !lag_due && !freshness_due {
        return Ok(());
    }
    let last_scale_time = if scaled {
        Some(time.clone())
    } else {
        pipeline
            .status
            .as_ref()
            .and_then(|s| s.last_scale_time.clone())
    };
    let mut owned = serde_json::Map::new();
    if let Some(lag) = lag.or(current_lag) {
        owned.insert("consumerLag".into(), json!(lag));
    }
    if let Some(time) = last_scale_time {
        owned.insert("lastScaleTime".into(), json!(time));
    }
    // The freshness read now, else the one written before (a field left out would be removed).
    let shown = freshness.or(written.map(|(f, _)| f));
    if let Some((p50, p95)) = shown {
        owned.insert(
            "freshness".into(),
            json!({"p50Seconds": round_to_ms(p50), "p95Seconds": round_to_ms(p95)}),
        );
    }
    let pipelines = Api::<EmbeddingPipeline>::namespaced(ctx.base.client.clone(), &state.namespace);
    apply_status(&pipelines, &target, SCALING_FIELD_MANAGER, owned)
        .await
        .map_err(kerr(Step::Status, "writing the pipeline's consumerLag"))?;
    let now = Instant::now();
    state.lag_written = Some(now);
    if let Some(f) = freshness {
        state.freshness_written = Some((f, now));
    }
    Ok(())
}

/// What a poll read for the pipeline's status.
struct Observed {
    lag: Option<i64>,
    freshness: Option<(f64, f64)>,
}

/// Seconds to the millisecond: the status shows no float noise.
fn round_to_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// One poll: read the metrics → plan (pure) → scale → write the statuses (and the Events the
/// status change calls for).
async fn poll(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    pipeline: &EmbeddingPipeline,
    state: &mut PolicyState,
    now: Timestamp,
    time: &Time,
) -> Result<(), Error> {
    state.last_poll = Some(Instant::now());
    let observation = read_metrics(ctx, policy, pipeline, state, now).await;
    let plan = plan::plan(policy, pipeline, state, &observation, now);
    let outcome = &plan.outcome;
    if let Some(to) = plan.scale_to() {
        scale(ctx, policy, pipeline, to).await?;
    } else if outcome.dry_run && outcome.to != outcome.from {
        debug!(pipeline = %pipeline.name_any(), from = outcome.from, to = outcome.to, reason = %outcome.reason, "dry run: would scale");
    }
    if let Some(error) = &outcome.metrics_error {
        debug!(%error, "metrics cannot be read");
    }
    let lag = observation.lag.as_ref().map(|l| l.sum);
    let observed = Observed {
        lag,
        freshness: observation.freshness,
    };
    write_pipeline_lag(
        ctx,
        pipeline,
        state,
        observed,
        plan.scale_to().is_some(),
        time,
    )
    .await?;
    ctx.base
        .metrics
        .desired_replicas
        .get_or_create(&PolicyLabels {
            namespace: state.namespace.clone(),
            policy: state.name.clone(),
        })
        .set(i64::from(outcome.to));
    // The policy's scale changes exist at 0 before the first one, so increase() sees it.
    for direction in ["out", "in"] {
        let _ = ctx.base.metrics.scale_changes.get_or_create(&ScaleLabels {
            namespace: state.namespace.clone(),
            policy: state.name.clone(),
            direction: direction.into(),
        });
    }
    write_status(ctx, policy, &Judgement::Judged(plan.outcome), time).await?;
    Ok(())
}

/// Step 5 for the policy: writes the status `judgement` gives (only when it changed), by
/// server-side apply as the scaling controller (the whole status is its own), and publishes the
/// Events derived from the change.
async fn write_status(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    judgement: &Judgement,
    time: &Time,
) -> Result<(), Error> {
    let new_status = status::compute(policy, judgement, time);
    if policy.status.as_ref() == Some(&new_status) {
        return Ok(());
    }
    let namespace = policy.namespace().unwrap_or_default();
    let api: Api<ScalingPolicy> = Api::namespaced(ctx.base.client.clone(), &namespace);
    apply_status(&api, &policy.name_any(), SCALING_FIELD_MANAGER, &new_status)
        .await
        .map_err(kerr(Step::Status, "writing the policy status"))?;
    let target = &policy.spec.target_ref.name;
    for note in events::derive(target, policy.status.as_ref(), &new_status) {
        let type_ = if note.warning {
            warn!(reason = %note.reason, message = %note.message, "policy event");
            EventType::Warning
        } else {
            EventType::Normal
        };
        let action = if note.reason.starts_with("Scaled") || note.reason == "WouldScale" {
            "Scale"
        } else {
            "Poll"
        };
        ctx.base
            .publish(
                policy.object_ref(&()),
                type_,
                &note.reason,
                action,
                &note.message,
            )
            .await;
        if note.on_target {
            let pipeline = ObjectReference {
                api_version: Some(EmbeddingPipeline::api_version(&()).into_owned()),
                kind: Some(EmbeddingPipeline::kind(&()).into_owned()),
                name: Some(target.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectReference::default()
            };
            ctx.base
                .publish(pipeline, type_, &note.reason, action, &note.message)
                .await;
        }
    }
    Ok(())
}

/// Transient failures: retried with per-object exponential backoff.
pub fn error_policy(policy: Arc<ScalingPolicy>, error: &Error, ctx: Arc<ScalingContext>) -> Action {
    ctx.base
        .metrics
        .errors
        .get_or_create(&ErrorLabels::of(CONTROLLER, error))
        .inc();
    let key = key_of(&policy);
    let wait = ctx
        .base
        .backoff(&key)
        .min(policy.spec.poll_interval.get().max(MIN_POLL) * 4);
    warn!(%error, policy = %policy.name_any(), retry_in = ?wait, "poll failed");
    Action::requeue(wait)
}

/// Runs the controller until the process is told to stop: one watch for the whole cluster, or
/// one per watched namespace.
pub async fn run(
    base: Arc<Context>,
    readers: Arc<dyn MetricReaders>,
    default_prometheus: Option<String>,
) {
    let watches = base.scope.watches();
    futures::future::join_all(watches.iter().map(|namespace| {
        run_in(
            base.clone(),
            readers.clone(),
            default_prometheus.clone(),
            namespace.as_deref(),
        )
    }))
    .await;
}

async fn run_in(
    base: Arc<Context>,
    readers: Arc<dyn MetricReaders>,
    default_prometheus: Option<String>,
    namespace: Option<&str>,
) {
    use kube::runtime::{WatchStreamExt, reflector};
    let policies: Api<ScalingPolicy> = crate::context::api(&base.client, namespace);
    // The cache keeps no managedFields or client-side apply copy (see `slim`).
    let (store, writer) = reflector::store();
    let trigger = watcher(policies, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(crate::context::slim::<ScalingPolicy>)
        .reflect(writer)
        .applied_objects();
    let controller = Controller::for_stream(trigger, store.clone());
    let ctx = Arc::new(ScalingContext {
        base,
        readers,
        default_prometheus,
        store,
        states: Mutex::new(HashMap::new()),
        last_cleanup: Mutex::new(Instant::now()),
    });
    controller
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(crate::context::RECONCILE_CONCURRENCY),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "scaling controller error");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};
    use serde_json::json;

    use super::*;

    fn policy(name: &str, created: &str, extra: serde_json::Value) -> ScalingPolicy {
        ScalingPolicy::test(name, "posts")
            .created_at(created)
            .with_spec(extra)
            .build()
    }

    #[test]
    fn an_invalid_policy_never_holds_a_pipeline() {
        let (store, mut writer) = reflector::store();
        let invalid = policy(
            "broken",
            "2026-01-01T00:00:00Z",
            json!({"schedules": [{"name": "peak", "cron": "not a cron at all", "duration": "1h", "desiredReplicas": 2}]}),
        );
        let valid = policy("good", "2026-01-02T00:00:00Z", json!({}));
        writer.apply_watcher_event(&watcher::Event::Apply(invalid.clone()));
        writer.apply_watcher_event(&watcher::Event::Apply(valid.clone()));
        assert!(policy_problem(&invalid.spec).is_some());
        assert_eq!(
            owner_of_target(&store.state(), &valid),
            None,
            "the invalid one holds nothing"
        );
        // Two valid policies: the older one owns the pipeline.
        let older = policy("older", "2025-12-31T00:00:00Z", json!({}));
        writer.apply_watcher_event(&watcher::Event::Apply(older));
        assert_eq!(
            owner_of_target(&store.state(), &valid).as_deref(),
            Some("older")
        );
    }
}
