//! `kubectl vectorpipe`: the kubectl plugin. What each command prints is made here from the
//! objects as read, so the same text comes from a live cluster and from a test's fixtures.
//!
//! - `status <pipeline>`: the pipeline's model and index, workers, lag, freshness, usage, its
//!   conditions and the last scaling decisions of the policy that scales it;
//! - `explain <policy>`: why the policy chose the current count: the last decision with its
//!   inputs, and the rules it applies;
//! - `redrive <pipeline>`: runs `vectorpipe-worker redrive` as a Job made from the pipeline's
//!   worker pod template (its image, config, credentials and placement), waits for it and
//!   prints its report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use vectorpipe_crds::redrive::Report;
use vectorpipe_crds::v1alpha1::{
    EmbeddingPipeline, LagAggregation, MigrationStatus, ScalingDecision, ScalingMode,
    ScalingOperation, ScalingPolicy, ScalingPolicySpec,
};

use crate::controllers::embedding_pipeline::build::child_name;
use crate::controllers::scaling_policy::decide::metric_name;
use crate::labels::PIPELINE_LABEL;

/// The name label of redrive Jobs and their pods (not the workers', so nothing that selects
/// worker pods counts them).
pub const REDRIVE_NAME: &str = "vectorpipe-redrive";

/// A duration as people say it: `45s`, `12m`, `3h`, `2d`.
pub fn age(now: jiff::Timestamp, then: &Time) -> String {
    let seconds = (now.as_second() - then.0.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// A count with thousands separated: `12,345`.
fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// A number of an input, as short as it reads well.
fn figure(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        count(x as i64)
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Rows as columns padded to their widest cell (the last column is not padded).
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len() - 1;
        let mut text = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                text.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn conditions_table(now: jiff::Timestamp, conditions: &[Condition]) -> String {
    let rows: Vec<Vec<String>> = conditions
        .iter()
        .map(|c| {
            vec![
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                age(now, &c.last_transition_time),
                c.message.clone(),
            ]
        })
        .collect();
    table(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], &rows)
}

fn decisions_table(now: jiff::Timestamp, decisions: &[ScalingDecision]) -> String {
    let rows: Vec<Vec<String>> = decisions
        .iter()
        .map(|d| {
            vec![
                age(now, &d.time),
                d.from_replicas.to_string(),
                d.to_replicas.to_string(),
                d.reason.clone(),
                if d.applied { "yes" } else { "no" }.to_owned(),
                d.message.clone(),
            ]
        })
        .collect();
    table(
        &["AGE", "FROM", "TO", "REASON", "APPLIED", "MESSAGE"],
        &rows,
    )
}

/// The first line of a pipeline's texts: `pipeline <namespace>/<name>`.
fn heading(pipeline: &EmbeddingPipeline) -> String {
    format!(
        "pipeline {}/{}\n",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    )
}

/// `status <pipeline>`: `policy` is the ScalingPolicy that targets it, if one does.
pub fn status_text(
    now: jiff::Timestamp,
    pipeline: &EmbeddingPipeline,
    policy: Option<&ScalingPolicy>,
) -> String {
    let spec = &pipeline.spec;
    let status = pipeline.status.clone().unwrap_or_default();
    let bedrock = &spec.embedding.bedrock;
    let mut out = heading(pipeline);
    let mut facts: Vec<(&str, String)> = vec![
        (
            "model",
            match bedrock.vector_dimensions() {
                Ok(n) => format!("{}, {n} dimensions", bedrock.model_id),
                Err(_) => bedrock.model_id.clone(),
            },
        ),
        ("index", index_line(&status)),
    ];
    let desired = status.replicas.unwrap_or(spec.workers.replicas);
    let mut workers = format!(
        "{} ready of {desired}",
        status.ready_replicas.unwrap_or_default()
    );
    if spec.suspend {
        workers.push_str(" (suspended)");
    }
    if let Some(policy) = policy {
        let _ = write!(
            workers,
            ", scaled by {} ({} to {})",
            policy.name_any(),
            policy.spec.min_replicas,
            policy.spec.max_replicas
        );
    }
    facts.push(("workers", workers));
    facts.push((
        "lag",
        status
            .consumer_lag
            .map_or("not read yet".to_owned(), |lag| {
                format!("{} records", count(lag))
            }),
    ));
    if let Some(f) = &status.freshness {
        facts.push((
            "freshness",
            format!(
                "p50 {:.1}s, p95 {:.1}s (last 5 minutes)",
                f.p50_seconds, f.p95_seconds
            ),
        ));
    }
    if let Some(u) = &status.usage {
        let mut usage = format!(
            "{} input tokens since {}",
            count(u.tokens),
            u.since.0.strftime("%Y-%m-%d %H:%M UTC")
        );
        if let Some(cost) = u.estimated_cost_usd {
            let _ = write!(usage, ", about ${cost:.4}");
        }
        facts.push(("usage", usage));
    }
    if let Some(m) = status.index.as_ref().and_then(|i| i.migration.as_ref()) {
        facts.push(("migration", migration_line(now, m)));
    }
    for (name, value) in facts {
        let _ = writeln!(out, "  {:<11}{value}", format!("{name}:"));
    }
    out.push_str("conditions:\n");
    out.push_str(&conditions_table(now, &status.conditions));
    match policy {
        Some(policy) => {
            let history = policy
                .status
                .as_ref()
                .map(|s| s.history.clone())
                .unwrap_or_default();
            if history.is_empty() {
                out.push_str("scaling decisions: none that changed the count yet\n");
            } else {
                out.push_str("scaling decisions (newest first):\n");
                out.push_str(&decisions_table(now, &history[..history.len().min(5)]));
            }
        }
        None => out.push_str("scaling: no ScalingPolicy targets this pipeline\n"),
    }
    out
}

/// Where readers search: the alias and the generation behind it.
fn index_line(status: &vectorpipe_crds::v1alpha1::EmbeddingPipelineStatus) -> String {
    match &status.index {
        Some(index) if index.serving.index != index.alias => format!(
            "{} (alias of {}, generation {})",
            index.alias, index.serving.index, index.serving.generation
        ),
        Some(index) => format!("{} (generation 0: an index, not an alias)", index.alias),
        None => "not looked at yet".to_owned(),
    }
}

fn migration_line(now: jiff::Timestamp, m: &MigrationStatus) -> String {
    let mut line = format!(
        "{} to generation {} ({}) for {}",
        m.phase,
        m.target.generation,
        m.target.index,
        age(now, &m.started_at)
    );
    if m.phase != "Blocked" {
        let _ = write!(line, ": {} records done", count(m.records));
        if let Some(lag) = m.lag {
            let _ = write!(line, ", {} behind", count(lag));
        }
        if let Some(eta) = m.eta_seconds {
            let _ = write!(line, ", about {eta}s to go");
        }
    }
    line
}

/// `migrate status <pipeline>`: the generations, the migration under way and the kept ones.
pub fn migrate_status_text(now: jiff::Timestamp, pipeline: &EmbeddingPipeline) -> String {
    let mut out = heading(pipeline);
    let Some(index) = pipeline.status.as_ref().and_then(|s| s.index.as_ref()) else {
        out.push_str("  no index generations: the operator has not looked at the index yet, or cannot (SigV4)
");
        return out;
    };
    let model = |m: &vectorpipe_crds::v1alpha1::IndexModel| {
        format!(
            "{}{}",
            m.model_id,
            m.dimensions
                .map(|d| format!(", {d} dimensions"))
                .unwrap_or_default()
        )
    };
    let _ = writeln!(
        out,
        "  serving:   generation {} ({}) behind {}, {}, group {}",
        index.serving.generation,
        index.serving.index,
        index.alias,
        model(&index.serving.model),
        index.serving.consumer_group
    );
    match &index.migration {
        Some(m) => {
            let _ = writeln!(out, "  migration: {}", migration_line(now, m));
            let _ = writeln!(
                out,
                "             {}, group {}",
                model(&m.target.model),
                m.target.consumer_group
            );
            // The figures are on the line above; the message adds what they cannot say.
            if m.phase == "Blocked" || m.lag.is_none() {
                let _ = writeln!(out, "             {}", m.message);
            }
        }
        None => out.push_str(
            "  migration: none
",
        ),
    }
    for p in &index.previous {
        let _ = writeln!(
            out,
            "  kept:      generation {} ({}), {}, left {} ago, deleted in {}",
            p.generation.generation,
            p.generation.index,
            model(&p.generation.model),
            age(now, &p.retired_at),
            age(p.delete_after.0, &Time(now)),
        );
    }
    out
}

/// `explain <policy>`.
pub fn explain_text(now: jiff::Timestamp, policy: &ScalingPolicy) -> String {
    let spec = &policy.spec;
    let status = policy.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {}/{} scales pipeline {}: {} workers now, wants {} (min {}, max {}{})",
        policy.namespace().unwrap_or_default(),
        policy.name_any(),
        spec.target_ref.name,
        status
            .current_replicas
            .map_or("?".to_owned(), |n| n.to_string()),
        status
            .desired_replicas
            .map_or("?".to_owned(), |n| n.to_string()),
        spec.min_replicas,
        spec.max_replicas,
        if spec.mode == ScalingMode::DryRun {
            ", dry run"
        } else {
            ""
        }
    );
    match &status.last_decision {
        None => out.push_str("no decision yet: the policy has not been judged\n"),
        Some(d) => {
            let _ = writeln!(
                out,
                "last decision, {} ago: {} -> {}, {}{}",
                age(now, &d.time),
                d.from_replicas,
                d.to_replicas,
                d.reason,
                if d.applied { ", applied" } else { "" }
            );
            let _ = writeln!(out, "  {}", d.message);
            if !d.inputs.is_empty() {
                out.push_str("inputs:\n");
                let width = d.inputs.keys().map(String::len).max().unwrap_or(0);
                for (name, value) in &d.inputs {
                    let _ = writeln!(out, "  {name:<width$}  {}", figure(*value));
                }
            }
        }
    }
    let limited: Vec<&Condition> = status
        .conditions
        .iter()
        .filter(|c| c.status == "True" && c.type_ == "ScalingLimited")
        .collect();
    for c in limited {
        let _ = writeln!(out, "limited: {} ({})", c.message, c.reason);
    }
    for c in status
        .conditions
        .iter()
        .filter(|c| c.status == "False" && (c.type_ == "AbleToScale" || c.type_ == "Active"))
    {
        let _ = writeln!(out, "{}: no, {} ({})", c.type_, c.message, c.reason);
    }
    out.push_str("rules:\n");
    for rule in rules(spec) {
        let _ = writeln!(out, "  {rule}");
    }
    out
}

/// A step as people say it: `multiply by 2`, `remove 1`.
fn step(operation: ScalingOperation, factor: f64, out: bool) -> String {
    match (operation, out) {
        (ScalingOperation::Multiply, true) => format!("multiply by {}", figure(factor)),
        (ScalingOperation::Multiply, false) => format!("divide by {}", figure(factor)),
        (ScalingOperation::Add, true) => format!("add {}", figure(factor)),
        (ScalingOperation::Add, false) => format!("remove {}", figure(factor)),
    }
}

/// The policy's rules, a line each, in the words of its spec's fields.
fn rules(spec: &ScalingPolicySpec) -> Vec<String> {
    let (o, i) = (&spec.scale_out, &spec.scale_in);
    let mut lines = vec![
        format!(
            "scale out when a metric is above its threshold in {} of the last {} polls (every {}): {}, then wait {}",
            o.datapoints_to_alarm,
            o.evaluation_periods,
            spec.poll_interval,
            step(o.operation, o.factor, true),
            o.cooldown,
        ),
        format!(
            "scale in when every metric is below its threshold in {} of the last {} polls: {}, then wait {}",
            i.datapoints_to_alarm,
            i.evaluation_periods,
            step(i.operation, i.factor, false),
            i.cooldown,
        ),
    ];
    for (index, metric) in spec.metrics.iter().enumerate() {
        let mut name = metric_name(index, metric);
        if let Some(lag) = &metric.kafka_lag {
            name.push_str(match lag.aggregation {
                LagAggregation::PerReplica => " per worker",
                LagAggregation::Max => " of the partition with the most",
                LagAggregation::Sum => " summed over the partitions",
            });
        }
        let bound = |word: &str, value: Option<f64>| value.map(|v| format!("{word} {}", figure(v)));
        let bounds: Vec<String> = [
            bound("out above", metric.scale_out_threshold),
            bound("in below", metric.scale_in_threshold),
        ]
        .into_iter()
        .flatten()
        .collect();
        lines.push(format!("{name}: {}", bounds.join(", ")));
    }
    let mut range = format!(
        "between {} and {} workers",
        spec.min_replicas, spec.max_replicas
    );
    if spec.cap_at_partition_count {
        range.push_str(", never more than the topic has partitions");
    }
    lines.push(range);
    for schedule in &spec.schedules {
        let mut bounds = Vec::new();
        if let Some(n) = schedule.min_replicas {
            bounds.push(format!("at least {n}"));
        }
        if let Some(n) = schedule.max_replicas {
            bounds.push(format!("at most {n}"));
        }
        if let Some(n) = schedule.desired_replicas {
            bounds.push(format!("exactly {n}"));
        }
        lines.push(format!(
            "schedule {}\"{}\" ({}) for {}: {} workers",
            schedule
                .name
                .as_ref()
                .map(|n| format!("{n} "))
                .unwrap_or_default(),
            schedule.cron,
            schedule.time_zone,
            schedule.duration,
            bounds.join(", ")
        ));
    }
    if let Some(zero) = spec.scale_to_zero.as_ref().filter(|z| z.enabled) {
        lines.push(format!(
            "to zero workers after {} without lag",
            zero.idle_after
        ));
    }
    if let Some(fallback) = spec.fallback_replicas {
        lines.push(format!(
            "{fallback} workers after {} polls in a row whose metrics cannot be read",
            spec.fallback_failure_threshold
        ));
    }
    if let Some(q) = spec.quota_aware.as_ref().filter(|q| q.enabled) {
        lines.push(format!(
            "quota-aware: no scale-out that gains under {}% while over {}% of embedding calls are throttled",
            figure(q.min_gain_percent),
            figure(q.throttled_share_percent)
        ));
    }
    if spec.mode == ScalingMode::DryRun {
        lines.push("dry run: decisions are recorded, the count is left alone".to_owned());
    }
    lines
}

/// The ScalingPolicy of `namespace` that targets `pipeline`, if any (the first by name).
pub async fn policy_of(
    client: &Client,
    namespace: &str,
    pipeline: &str,
) -> Result<Option<ScalingPolicy>> {
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), namespace);
    let mut list: Vec<ScalingPolicy> = policies
        .list(&ListParams::default())
        .await
        .context("listing ScalingPolicies")?
        .items
        .into_iter()
        .filter(|p| p.spec.target_ref.name == pipeline)
        .collect();
    list.sort_by_key(ResourceExt::name_any);
    Ok(list.into_iter().next())
}

/// What to redrive, as given on the command line (passed on to `vectorpipe-worker redrive`).
#[derive(Clone, Debug, Default)]
pub struct RedriveRequest {
    /// `--reason` values.
    pub reasons: Vec<String>,
    /// `--since`.
    pub since: Option<String>,
    /// `--until`.
    pub until: Option<String>,
    /// `--partition` values.
    pub partitions: Vec<i32>,
    /// `--limit`.
    pub limit: Option<usize>,
    /// `--dry-run`.
    pub dry_run: bool,
}

impl RedriveRequest {
    /// The worker's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["redrive".to_owned()];
        if !self.reasons.is_empty() {
            args.extend(["--reason".to_owned(), self.reasons.join(",")]);
        }
        for (flag, value) in [("--since", &self.since), ("--until", &self.until)] {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value.clone()]);
            }
        }
        if !self.partitions.is_empty() {
            let list: Vec<String> = self.partitions.iter().map(i32::to_string).collect();
            args.extend(["--partition".to_owned(), list.join(",")]);
        }
        if let Some(limit) = self.limit {
            args.extend(["--limit".to_owned(), limit.to_string()]);
        }
        if self.dry_run {
            args.push("--dry-run".to_owned());
        }
        args.extend([
            "--termination-log".to_owned(),
            "/dev/termination-log".to_owned(),
        ]);
        args
    }
}

/// The redrive Job: the worker pod template of the pipeline's Deployment, running `redrive`
/// once, with no probes, labelled as a redrive, owned by the pipeline.
pub fn redrive_job(
    pipeline: &EmbeddingPipeline,
    workers: &Deployment,
    request: &RedriveRequest,
    name: &str,
    deadline: Duration,
) -> Result<Job> {
    let mut template = workers.spec.template.clone();
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), REDRIVE_NAME.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "kubectl-vectorpipe".to_owned(),
        ),
        (PIPELINE_LABEL.to_owned(), pipeline.name_any()),
    ]);
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let pod_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    // Keep what placement needs (labels an admission policy keys on), drop what selects workers.
    pod_labels.remove("app.kubernetes.io/instance");
    pod_labels.extend(labels.clone());
    let pod = template
        .spec
        .as_mut()
        .context("the worker pod template has no spec")?;
    pod.restart_policy = Some("Never".to_owned());
    let container = pod
        .containers
        .first_mut()
        .context("the worker pod template has no container")?;
    container.args = Some(request.args());
    container.liveness_probe = None;
    container.readiness_probe = None;
    container.startup_probe = None;
    container.lifecycle = None;
    container.termination_message_policy = Some("FallbackToLogsOnError".to_owned());
    let owner = OwnerReference {
        api_version: EmbeddingPipeline::api_version(&()).into_owned(),
        kind: EmbeddingPipeline::kind(&()).into_owned(),
        name: pipeline.name_any(),
        uid: pipeline
            .uid()
            .context("the pipeline has no uid; read it from the cluster")?,
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: pipeline.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(deadline.as_secs().max(1) as i64),
            ttl_seconds_after_finished: Some(86_400),
            template,
            ..JobSpec::default()
        }),
        status: None,
    })
}

/// A Job name for a redrive of `pipeline` at `now` (within the 63 characters a label holds).
pub fn redrive_job_name(pipeline: &str, now: jiff::Timestamp) -> String {
    let suffix = format!("-redrive-{}", now.as_second());
    let room = 63 - suffix.len();
    let base: String = pipeline.chars().take(room).collect();
    format!("{}{suffix}", base.trim_end_matches('-'))
}

/// Creates the redrive Job, waits for it and returns the report its pod wrote.
pub async fn redrive(
    client: &Client,
    namespace: &str,
    pipeline: &str,
    request: &RedriveRequest,
    deadline: Duration,
    progress: impl Fn(&str),
) -> Result<Report> {
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), namespace);
    let pipeline = pipelines
        .get(pipeline)
        .await
        .with_context(|| format!("reading EmbeddingPipeline {namespace}/{pipeline}"))?;
    if pipeline.spec.dead_letter.is_none() {
        bail!(
            "pipeline {namespace}/{} has no deadLetter.topic, so there are no dead letters to redrive",
            pipeline.name_any()
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let workers = deployments
        .get(&child_name(&pipeline))
        .await
        .with_context(|| {
            format!(
                "reading the worker Deployment {namespace}/{} (the operator creates it; is it running?)",
                child_name(&pipeline)
            )
        })?;
    let name = redrive_job_name(&pipeline.name_any(), jiff::Timestamp::now());
    let job = redrive_job(&pipeline, &workers, request, &name, deadline)?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    jobs.create(&PostParams::default(), &job)
        .await
        .with_context(|| format!("creating the Job {namespace}/{name}"))?;
    progress(&format!(
        "job {namespace}/{name} created; waiting for it (up to {}s)",
        deadline.as_secs()
    ));
    let started = tokio::time::Instant::now();
    let succeeded = loop {
        let job = jobs.get(&name).await?;
        let status = job.status.unwrap_or_default();
        if status.succeeded.unwrap_or_default() > 0 {
            break true;
        }
        if status.failed.unwrap_or_default() > 0 {
            break false;
        }
        if started.elapsed() > deadline + Duration::from_secs(30) {
            bail!(
                "the Job {namespace}/{name} did not finish in {}s; see `kubectl describe job -n {namespace} {name}`",
                deadline.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await?;
    let message = list
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .next()
        .unwrap_or_default();
    if !succeeded {
        bail!(
            "the redrive Job {namespace}/{name} failed: {}",
            message.trim()
        );
    }
    serde_json::from_str(message.trim()).with_context(|| {
        format!("the redrive Job {namespace}/{name} succeeded but left no report it could read: {message:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ages_and_tables_read_well() {
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(-12), "-12");
        assert_eq!(count(999), "999");
        let now: jiff::Timestamp = "2026-12-04T12:00:00Z".parse().unwrap();
        let at = |s: &str| Time(s.parse().unwrap());
        assert_eq!(age(now, &at("2026-12-04T11:59:15Z")), "45s");
        assert_eq!(age(now, &at("2026-12-04T11:00:00Z")), "60m");
        assert_eq!(age(now, &at("2026-12-04T06:00:00Z")), "6h");
        assert_eq!(age(now, &at("2026-11-30T12:00:00Z")), "4d");
        let t = table(
            &["A", "BB", "C"],
            &[vec!["long".into(), "x".into(), "end".into()]],
        );
        assert_eq!(t, "  A     BB  C\n  long  x   end\n");
    }

    #[test]
    fn a_long_pipeline_name_still_gives_a_valid_job_name() {
        let now: jiff::Timestamp = "2026-12-04T12:00:00Z".parse().unwrap();
        assert_eq!(redrive_job_name("posts", now), "posts-redrive-1796385600");
        let long = "p".repeat(80);
        assert!(redrive_job_name(&long, now).len() <= 63);
    }

    #[test]
    fn the_request_becomes_the_workers_arguments() {
        let request = RedriveRequest {
            reasons: vec!["embedding-rejected".into(), "index-rejected".into()],
            since: Some("6h".into()),
            partitions: vec![0, 2],
            dry_run: true,
            ..RedriveRequest::default()
        };
        assert_eq!(
            request.args().join(" "),
            "redrive --reason embedding-rejected,index-rejected --since 6h --partition 0,2 --dry-run --termination-log /dev/termination-log"
        );
    }
}
