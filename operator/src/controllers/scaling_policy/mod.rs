//! The ScalingPolicy controller: every `pollInterval` it reads the policy's metrics, decides the
//! worker count (a pure function), sets it through the pipeline's scale subresource, and reports
//! the decision in the policy's status, in Events and in the operator's metrics.

pub mod decide;
pub mod lag;
pub mod observe;
pub mod promql;
pub mod readers;
pub mod schedule;
pub mod status;
pub mod writers;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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
use vectorpipe_crds::v1alpha1::conditions::{ABLE_TO_SCALE, ACTIVE, find_condition};
use vectorpipe_crds::v1alpha1::{
    EmbeddingPipeline, ScalingMode, ScalingPolicy, ScalingPolicyStatus,
};
use vectorpipe_crds::validate;

use crate::context::Context;
use crate::error::{Error, kube as kerr};
use crate::labels::SCALING_FIELD_MANAGER;
use crate::metrics::{
    ControllerLabel, ErrorLabels, PipelineLabels, PolicyLabels, ScaleLabels, SourceLabel,
};
use decide::{Decision, Inputs, Reason, Sample};
use observe::Positions;
use readers::MetricReaders;
use status::{Inactive, Judgement, Outcome};

const CONTROLLER: &str = "scalingpolicy";
/// The shortest poll interval honoured.
const MIN_POLL: Duration = Duration::from_millis(500);
/// How often state of deleted policies is dropped.
const CLEANUP_EVERY: Duration = Duration::from_secs(30);

/// What the controller remembers about a policy between polls (lost on restart: the window
/// refills within `evaluationPeriods` polls; cooldowns survive through `status.history`).
#[derive(Default)]
struct PolicyState {
    namespace: String,
    name: String,
    pipeline: String,
    generation: Option<i64>,
    last_poll: Option<Instant>,
    window: VecDeque<Sample>,
    positions: Positions,
    idle_since: Option<Timestamp>,
    last_scale_out: Option<Timestamp>,
    last_scale_in: Option<Timestamp>,
    /// Polls in a row whose metrics could not all be read.
    failed_polls: u32,
    /// Another writer of the worker count, while it is active.
    conflict: Option<writers::Conflict>,
    /// The count the last poll left the pipeline at (the policy's cached status may lag).
    left_at: Option<i32>,
    /// When the pipeline's consumerLag was last written.
    lag_written: Option<Instant>,
}

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
fn owner_of_target(store: &Store<ScalingPolicy>, policy: &ScalingPolicy) -> Option<String> {
    if policy.spec.mode == ScalingMode::DryRun {
        return None;
    }
    let namespace = policy.namespace();
    let order = |p: &ScalingPolicy| (p.metadata.creation_timestamp.clone(), p.name_any());
    store
        .state()
        .into_iter()
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

/// When the policy last scaled out and in, from its recorded history (dry-run decisions count
/// in dry-run mode, so its cooldowns behave as they would for real).
fn last_changes(policy: &ScalingPolicy) -> (Option<Timestamp>, Option<Timestamp>) {
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
fn with_schedules(
    inputs: &Inputs<'_>,
    decision: Decision,
    open: &[schedule::OpenWindow],
) -> (i32, String, String, Option<decide::Limit>) {
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

fn limit_text(limit: decide::Limit, desired: i32, inputs: &Inputs<'_>) -> String {
    use decide::Limit;
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
    }
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
        }
        keep
    });
}

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

    if let Some(message) = policy_problem(spec) {
        let inactive = Inactive {
            reason: "InvalidSpec",
            message,
        };
        write_status(ctx, policy, &Judgement::Inactive(inactive), &time).await?;
        ctx.base.reset_backoff(&key);
        return Ok(Action::await_change());
    }

    let target = &spec.target_ref.name;
    let inactive = owner_of_target(&ctx.store, policy).map(|owner| Inactive {
        reason: "ConflictingPolicy",
        message: format!(
            "ScalingPolicy {namespace}/{owner} already scales EmbeddingPipeline {target}; delete or retarget one of the two"
        ),
    });
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(ctx.base.client.clone(), &namespace);
    let pipeline = match inactive {
        Some(_) => None,
        None => pipelines
            .get_opt(target)
            .await
            .map_err(kerr("reading the target pipeline"))?,
    };
    let inactive = inactive.or_else(|| match &pipeline {
        None => Some(Inactive {
            reason: "TargetNotFound",
            message: format!(
                "EmbeddingPipeline {namespace}/{target} does not exist; create it or fix spec.targetRef.name"
            ),
        }),
        Some(p) if p.spec.suspend => Some(Inactive {
            reason: "TargetSuspended",
            message: format!(
                "EmbeddingPipeline {namespace}/{target} is suspended (spec.suspend: true); scaling resumes when it is not"
            ),
        }),
        Some(_) => None,
    });
    let (Some(pipeline), None) = (pipeline, inactive.clone()) else {
        if let Some(inactive) = inactive {
            write_status(ctx, policy, &Judgement::Inactive(inactive), &time).await?;
        }
        ctx.base.reset_backoff(&key);
        return Ok(Action::requeue(interval));
    };

    // Take the state out of the map while reading, so no lock is held across awaits.
    let mut state = ctx
        .states
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key)
        .unwrap_or_else(|| {
            let (out, inn) = last_changes(policy);
            PolicyState {
                namespace: namespace.clone(),
                name: name.clone(),
                last_scale_out: out,
                last_scale_in: inn,
                ..PolicyState::default()
            }
        });
    let result = poll(ctx, policy, &pipeline, &mut state, now, &time).await;
    state.generation = policy.metadata.generation;
    state.pipeline = target.clone();
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
async fn kafka_credentials(
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

/// Reads, decides, scales and reports.
async fn poll(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    pipeline: &EmbeddingPipeline,
    state: &mut PolicyState,
    now: Timestamp,
    time: &Time,
) -> Result<(), Error> {
    let spec = &policy.spec;
    let namespace = state.namespace.clone();
    let policy_name = state.name.clone();
    let target = pipeline.name_any();
    let current = pipeline.spec.workers.replicas;
    state.last_poll = Some(Instant::now());

    let credentials = kafka_credentials(&ctx.base.client, &namespace, &pipeline.spec)
        .await
        .map_err(|e| e.to_string());
    let observation = observe::observe(
        spec,
        &pipeline.spec,
        &namespace,
        &target,
        current,
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
    let decision = decide::decide(&inputs);
    let cooling_down = decision.reason == Reason::CoolingDown;
    let open = schedule::open_windows(&spec.schedules, now).unwrap_or_default();
    let (mut desired, mut reason, mut message, limit) = with_schedules(&inputs, decision, &open);
    let dry_run = spec.mode == ScalingMode::DryRun;

    // Another writer of the count: said in the status, and fought at most once per cooldown.
    let fight_cooldown = spec
        .scale_out
        .cooldown
        .get()
        .max(spec.scale_in.cooldown.get());
    let changed_by = writers::changed_by_other(
        state
            .left_at
            .or_else(|| policy.status.as_ref().and_then(|s| s.current_replicas)),
        current,
        &writers::replica_writers(pipeline, SCALING_FIELD_MANAGER),
    );
    if let Some(manager) = &changed_by
        && state.conflict.is_none()
    {
        let note = format!(
            "spec.workers.replicas of EmbeddingPipeline {target} was set to {current} by {manager}; this policy sets it back at most once per {}s",
            fight_cooldown.as_secs()
        );
        warn!(pipeline = %target, %manager, "another writer changed the worker count");
        ctx.base
            .publish(
                policy.object_ref(&()),
                EventType::Warning,
                "ConflictingWriter",
                "Poll",
                &note,
            )
            .await;
    }
    state.conflict = writers::track(
        state.conflict.take(),
        changed_by,
        current,
        now,
        fight_cooldown,
    );
    if let Some(conflict) = &state.conflict
        && desired != current
        && !dry_run
        && !conflict.may_fight(now, fight_cooldown)
    {
        message = format!(
            "would set {desired} workers, but {} changed the count and this policy set it back less than a cooldown ago; holding {current}",
            conflict.manager
        );
        reason = "ConflictingWriter".into();
        desired = current;
    }
    let applied = !dry_run && desired != current;
    if applied && let Some(conflict) = &mut state.conflict {
        conflict.last_fight = Some(now);
    }
    state.left_at = Some(if applied { desired } else { current });

    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(ctx.base.client.clone(), &namespace);
    if applied {
        pipelines
            .patch_scale(
                &target,
                &PatchParams {
                    field_manager: Some(SCALING_FIELD_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({ "spec": { "replicas": desired } })),
            )
            .await
            .map_err(kerr("scaling the target pipeline"))?;
        let direction = if desired > current { "out" } else { "in" };
        if desired > current {
            state.last_scale_out = Some(now);
        } else {
            state.last_scale_in = Some(now);
        }
        info!(pipeline = %target, from = current, to = desired, %reason, "scaled");
        ctx.base
            .metrics
            .scale_changes
            .get_or_create(&ScaleLabels {
                namespace: namespace.clone(),
                policy: policy_name.clone(),
                direction: direction.into(),
            })
            .inc();
        let note = format!(
            "Scaled EmbeddingPipeline {target} from {current} to {desired} workers: {message}"
        );
        let event_reason = if desired > current {
            "ScaledOut"
        } else {
            "ScaledIn"
        };
        ctx.base
            .publish(
                policy.object_ref(&()),
                EventType::Normal,
                event_reason,
                "Scale",
                &note,
            )
            .await;
        ctx.base
            .publish(
                pipeline.object_ref(&()),
                EventType::Normal,
                event_reason,
                "Scale",
                &note,
            )
            .await;
    } else if dry_run && desired != current {
        debug!(pipeline = %target, from = current, to = desired, %reason, "dry run: would scale");
    }

    // The lag (and the scale time) also go to the pipeline's status, for `kubectl get vp`.
    let lag = observation.lag.as_ref().map(|l| l.sum);
    if let Some(lag) = lag {
        ctx.base
            .metrics
            .consumer_lag
            .get_or_create(&PipelineLabels {
                namespace: namespace.clone(),
                pipeline: target.clone(),
            })
            .set(lag);
    }
    // Written by server-side apply as the scaling controller, only on a scale or a meaningful
    // change of the lag. Both fields are always sent: a field this manager leaves out of an
    // apply would be removed.
    let current_lag = pipeline.status.as_ref().and_then(|s| s.consumer_lag);
    let lag_due = match (current_lag, lag) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(old), Some(new)) => {
            status::lag_changed_meaningfully(old, new, state.lag_written.map(|at| at.elapsed()))
        }
    };
    if applied || lag_due {
        let last_scale_time = if applied {
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
        let body = json!({
            "apiVersion": EmbeddingPipeline::api_version(&()),
            "kind": EmbeddingPipeline::kind(&()),
            "status": owned,
        });
        pipelines
            .patch_status(
                &target,
                &PatchParams::apply(SCALING_FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(kerr("writing the pipeline's consumerLag"))?;
        state.lag_written = Some(Instant::now());
    }
    ctx.base
        .metrics
        .desired_replicas
        .get_or_create(&PolicyLabels {
            namespace: namespace.clone(),
            policy: policy_name.clone(),
        })
        .set(i64::from(desired));

    let metrics_error = (!observation.errors.is_empty()).then(|| observation.errors.join("; "));
    let outcome = Outcome {
        from: current,
        to: desired,
        applied,
        dry_run,
        reason,
        message,
        inputs: observe::inputs_of(&observation),
        metrics_error: metrics_error.clone(),
        limit: limit.map(|l| (l.as_str().to_owned(), limit_text(l, desired, &inputs))),
        cooling_down,
        conflict: state.conflict.as_ref().map(|c| c.message(fight_cooldown)),
    };
    let was_able = condition_reason(policy, ABLE_TO_SCALE);
    if let Some(error) = &metrics_error
        && was_able.as_deref() != Some("MetricsUnavailable")
    {
        warn!(%error, "metrics cannot be read");
        ctx.base
            .publish(
                policy.object_ref(&()),
                EventType::Warning,
                "MetricsUnavailable",
                "Poll",
                &format!("{error}; {}", outcome.message),
            )
            .await;
    }
    let message = outcome.message.clone();
    let written = write_status(ctx, policy, &Judgement::Judged(outcome), time).await?;
    // status::compute adds a dry-run decision to the history once per distinct would-be change;
    // the event follows the history.
    let recorded =
        written.history.first() != policy.status.as_ref().and_then(|s| s.history.first());
    if dry_run && recorded {
        ctx.base
            .publish(
                policy.object_ref(&()),
                EventType::Normal,
                "WouldScale",
                "Scale",
                &format!(
                    "dry run: would scale EmbeddingPipeline {target} from {current} to {desired} workers: {message}"
                ),
            )
            .await;
    }
    Ok(())
}

/// The reason of a condition of the policy's current status.
fn condition_reason(policy: &ScalingPolicy, type_: &str) -> Option<String> {
    policy
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
        .map(|c| c.reason.clone())
}

/// Writes the status `judgement` gives (only when it changed) and returns it.
async fn write_status(
    ctx: &ScalingContext,
    policy: &ScalingPolicy,
    judgement: &Judgement,
    time: &Time,
) -> Result<ScalingPolicyStatus, Error> {
    let new_status = status::compute(policy, judgement, time);
    if policy.status.as_ref() == Some(&new_status) {
        return Ok(new_status);
    }
    let api: Api<ScalingPolicy> = Api::namespaced(
        ctx.base.client.clone(),
        &policy.namespace().unwrap_or_default(),
    );
    let was = condition_reason(policy, ACTIVE);
    // Server-side apply as the scaling controller: the whole status is this manager's.
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(SCALING_FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": ScalingPolicy::api_version(&()),
            "kind": ScalingPolicy::kind(&()),
            "status": new_status,
        })),
    )
    .await
    .map_err(kerr("writing the policy status"))?;
    if let Judgement::Inactive(inactive) = judgement
        && was.as_deref() != Some(inactive.reason)
    {
        ctx.base
            .publish(
                policy.object_ref(&()),
                EventType::Warning,
                inactive.reason,
                "Poll",
                &inactive.message,
            )
            .await;
    }
    Ok(new_status)
}

/// Transient failures: retried with per-object exponential backoff.
pub fn error_policy(policy: Arc<ScalingPolicy>, error: &Error, ctx: Arc<ScalingContext>) -> Action {
    ctx.base
        .metrics
        .errors
        .get_or_create(&ErrorLabels {
            controller: CONTROLLER.into(),
            error: error.metric_label().into(),
        })
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
        let mut spec = json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 100}]
        });
        if let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (&mut spec, extra) {
            a.extend(b);
        }
        serde_json::from_value(json!({
            "apiVersion": "vectorpipe.io/v1alpha1", "kind": "ScalingPolicy",
            "metadata": {"name": name, "namespace": "data", "creationTimestamp": created},
            "spec": spec
        }))
        .unwrap()
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
            owner_of_target(&store, &valid),
            None,
            "the invalid one holds nothing"
        );
        // Two valid policies: the older one owns the pipeline.
        let older = policy("older", "2025-12-31T00:00:00Z", json!({}));
        writer.apply_watcher_event(&watcher::Event::Apply(older));
        assert_eq!(owner_of_target(&store, &valid).as_deref(), Some("older"));
    }
}
