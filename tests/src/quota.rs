//! The quota scenario, shared by the end-to-end test and `vectorpipe-bench quota`: a backlog on
//! eight partitions, a Bedrock fake whose requests-per-second quota three workers saturate, and
//! a ScalingPolicy on consumer lag with `maxReplicas: 8`. What one worker does depends on the
//! machine (a debug build on two slow cores stays well below its ceiling), so the scenario first
//! measures one worker without a quota and sets the quota from that. The operator scales the
//! pipeline; real worker processes follow its worker count (KWOK's pods do not consume), scraped
//! by the harness Prometheus.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kube::Api;
use kube::api::PostParams;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};

use crate::bedrock::FakeBedrock;
use crate::worker::Worker;
use crate::{k8s, kafka, prometheus, repo_root, unique_name};

/// The scenario's figures: one worker's ceiling is `MAX_IN_FLIGHT` calls per `LATENCY`, and
/// the quota lets about three workers' worth through (`QUOTA_IN_WORKERS` times what one worker
/// was measured to do).
pub const LATENCY: Duration = Duration::from_millis(100);
/// Embedding calls a worker keeps in flight (Titan embeds one text per call).
pub const MAX_IN_FLIGHT: i32 = 4;
/// The account's quota, in what one worker does alone.
pub const QUOTA_IN_WORKERS: f64 = 2.75;
/// How long the lone worker is measured, after its first call.
const CALIBRATE_FOR: Duration = Duration::from_secs(8);
/// Partitions of the source topic (and `maxReplicas`).
pub const PARTITIONS: i32 = 8;

/// One line of the trace.
#[derive(Clone, Debug)]
pub struct Point {
    /// Seconds since the policy was created.
    pub seconds: f64,
    /// Workers running.
    pub workers: usize,
    /// Embedding calls answered per second since the last point.
    pub answered_per_second: f64,
    /// Calls throttled per second since the last point.
    pub throttled_per_second: f64,
    /// The policy's last decision reason.
    pub reason: String,
}

/// What a run saw.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Every five seconds.
    pub points: Vec<Point>,
    /// The ScalingLimited condition at the end: (status, reason, message).
    pub limited: Option<(String, String, String)>,
    /// The most workers ever run.
    pub most: usize,
    /// Calls per second one worker made alone, without a quota.
    pub one_worker: f64,
    /// The quota the fake enforced, calls per second.
    pub quota: f64,
}

impl Trace {
    /// Answered calls per second over the last `seconds`.
    pub fn answered_over_last(&self, seconds: f64) -> f64 {
        let Some(end) = self.points.last() else {
            return 0.0;
        };
        let recent: Vec<&Point> = self
            .points
            .iter()
            .filter(|p| p.seconds > end.seconds - seconds)
            .collect();
        recent.iter().map(|p| p.answered_per_second).sum::<f64>() / recent.len().max(1) as f64
    }

    /// The workers at each point, as one line.
    pub fn workers_line(&self) -> String {
        self.points
            .iter()
            .map(|p| p.workers.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs the scenario for `run_for` with the worker binary `worker`, with `quotaAware` on or
/// off; `records` must outlast it at the quota.
pub async fn run(
    worker: &std::path::Path,
    quota_aware: bool,
    records: usize,
    run_for: Duration,
) -> Result<Trace> {
    let client = k8s::client().await?;
    let ns = k8s::namespace(if quota_aware { "quota" } else { "quota-plain" })?;
    let topic = unique_name("quota");
    kafka::create_topic(&topic, PARTITIONS).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(LATENCY);

    // The pipeline in the cluster, for the operator to scale.
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut value: Value = serde_yaml::from_str(&text)?;
    value["spec"]["source"]["kafka"] =
        json!({"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]});
    let pipeline: EmbeddingPipeline = serde_json::from_value(value)?;
    Api::<EmbeddingPipeline>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &pipeline)
        .await?;

    // The same pipeline for the worker processes: same name and namespace, so the same group.
    let dir = tempfile_dir(&ns.name)?;
    let file = dir.join("pipeline.yaml");
    let mut manifest = crate::worker::posts_manifest(&ns.name, &topic, &address.to_string())?;
    manifest["spec"]["embedding"]["bedrock"]["maxInFlight"] = json!(MAX_IN_FLIGHT);
    std::fs::write(&file, serde_yaml::to_string(&manifest)?)?;

    produce(&topic, records).await?;

    // One worker alone, without a quota: its rate sets the quota. It stays as the first of the
    // workers that follow the count.
    // A worker process, scraped by the harness Prometheus as one of the namespace's pods.
    let start = |serial: usize| -> Result<(Worker, std::path::PathBuf)> {
        let log = dir.join(format!("worker-{serial}.log"));
        let worker = Worker::start_binary(worker, &file, &log)?;
        let target = prometheus::add_target(
            &format!("{}-{serial}", ns.name),
            &worker.metrics,
            &[("namespace", &ns.name)],
        )?;
        Ok((worker, target))
    };
    let mut serial = 1;
    let mut workers = vec![start(serial)?];
    let waiting = Instant::now();
    while fake.stats().calls == 0 {
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(60),
            "the first worker made no embedding call in 60 s; see {}",
            dir.join("worker-1.log").display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second for the other partitions' first fetches, then the measurement.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = (Instant::now(), fake.stats().calls);
    tokio::time::sleep(CALIBRATE_FOR).await;
    let one_worker = (fake.stats().calls - before.1) as f64 / before.0.elapsed().as_secs_f64();
    let quota = one_worker * QUOTA_IN_WORKERS;
    fake.set_quota(Some(quota));

    let mut spec = json!({
        "targetRef": {"name": "posts"},
        "minReplicas": 1,
        "maxReplicas": PARTITIONS,
        "pollInterval": "1s",
        "metrics": [{"kafkaLag": {"aggregation": "perReplica"}, "scaleOutThreshold": 100}],
        "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "5s"},
        "scaleIn": {"evaluationPeriods": 100, "datapointsToAlarm": 100, "operation": "add", "factor": 1, "cooldown": "600s"}
    });
    if quota_aware {
        spec["quotaAware"] = json!({"settleTime": "6s", "measureWindow": "10s"});
    }
    let policy: ScalingPolicy = serde_json::from_value(json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": "quota"},
        "spec": spec,
    }))?;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    policies.create(&PostParams::default(), &policy).await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);

    // Workers follow the count; a point every five seconds.
    let started = Instant::now();
    let mut trace = Trace {
        one_worker,
        quota,
        ..Trace::default()
    };
    let mut last = (Instant::now(), fake.stats());
    while started.elapsed() < run_for {
        let want = usize::try_from(pipelines.get("posts").await?.spec.workers.replicas)?;
        while workers.len() < want {
            serial += 1;
            workers.push(start(serial)?);
        }
        // Workers leaving stop together, as the pods of a Deployment do.
        let mut stopping = Vec::new();
        while workers.len() > want {
            let (worker, target) = workers.pop().context("a worker to stop")?;
            let _ = std::fs::remove_file(target);
            stopping.push(std::thread::spawn(move || worker.stop()));
        }
        for stop in stopping {
            stop.join()
                .map_err(|_| anyhow::anyhow!("a worker's stop panicked"))??;
        }
        trace.most = trace.most.max(workers.len());
        if last.0.elapsed() >= Duration::from_secs(5) {
            let stats = fake.stats();
            let span = last.0.elapsed().as_secs_f64();
            let throttles = |s: &crate::bedrock::Stats| {
                s.errors.get("ThrottlingException").copied().unwrap_or(0)
            };
            let throttled = throttles(&stats) - throttles(&last.1);
            let answered = (stats.calls - last.1.calls) - throttled;
            let reason = policies
                .get("quota")
                .await?
                .status
                .and_then(|s| s.last_decision)
                .map(|d| d.reason)
                .unwrap_or_default();
            trace.points.push(Point {
                seconds: started.elapsed().as_secs_f64(),
                workers: workers.len(),
                answered_per_second: answered as f64 / span,
                throttled_per_second: throttled as f64 / span,
                reason,
            });
            last = (Instant::now(), stats);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    trace.limited = policies.get("quota").await?.status.and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "ScalingLimited")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    });
    for (worker, target) in workers {
        let _ = std::fs::remove_file(target);
        worker.stop()?;
    }
    drop(ns);
    Ok(trace)
}

fn tempfile_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(unique_name(name));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `records` small records spread over the partitions.
async fn produce(topic: &str, records: usize) -> Result<()> {
    let producer: FutureProducer = kafka::config()?.create()?;
    let sends = (0..records).map(|i| {
        let producer = &producer;
        async move {
            let id = format!("q-{i}");
            let body =
                json!({"id": id, "text": format!("record {i} of the quota scenario")}).to_string();
            producer
                .send(
                    FutureRecord::to(topic).key(&id).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for result in futures::future::join_all(sends).await {
        result?;
    }
    Ok(())
}
