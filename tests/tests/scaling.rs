//! The ScalingPolicy controller end to end: the operator runs as a process against the harness
//! apiserver, reads consumer lag from the real Kafka broker and PromQL from the real Prometheus,
//! and scales pipelines through their scale subresource. KWOK's worker pods do not consume, so
//! the tests drive the lag by producing and by committing offsets for the pipeline's group.
//!
//! One operator process serves all scenarios (each in its own namespace), run at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
use vectorpipe_tests::k8s;
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, kafka, prometheus, repo_root, unique_name};

const LIMIT: Duration = Duration::from_secs(90);

/// The minimal example pipeline, pointed at `topic` on the harness broker.
async fn create_pipeline(client: &kube::Client, ns: &str, topic: &str) -> Result<()> {
    let source = json!({"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]});
    create_pipeline_from(client, ns, source).await
}

/// The minimal example pipeline `posts` with the given `spec.source.kafka`.
async fn create_pipeline_from(client: &kube::Client, ns: &str, source: Value) -> Result<()> {
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut value: Value = serde_yaml::from_str(&text)?;
    value["spec"]["source"]["kafka"] = source;
    let pipeline: EmbeddingPipeline = serde_json::from_value(value)?;
    Api::<EmbeddingPipeline>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pipeline)
        .await?;
    Ok(())
}

async fn create_policy(client: &kube::Client, ns: &str, name: &str, spec: Value) -> Result<()> {
    let policy: ScalingPolicy = serde_json::from_value(json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    Api::<ScalingPolicy>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &policy)
        .await?;
    Ok(())
}

async fn replicas(client: &kube::Client, ns: &str) -> Result<i32> {
    Ok(Api::<EmbeddingPipeline>::namespaced(client.clone(), ns)
        .get("posts")
        .await?
        .spec
        .workers
        .replicas)
}

/// Waits until the pipeline runs `want` workers, remembering the most it ever had.
async fn wait_replicas(client: &kube::Client, ns: &str, want: i32, most: &AtomicI32) -> Result<()> {
    eventually(&format!("{ns}: {want} workers"), LIMIT, || async {
        let n = replicas(client, ns).await?;
        most.fetch_max(n, Ordering::SeqCst);
        Ok((n == want).then_some(()))
    })
    .await
}

fn condition(policy: &ScalingPolicy, type_: &str) -> Option<(String, String, String)> {
    policy
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_policy<T>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&ScalingPolicy) -> Option<T>,
) -> Result<T> {
    let api: Api<ScalingPolicy> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{ns}/{name}: {what}"), LIMIT, || async {
        Ok(check(&api.get(name).await?))
    })
    .await
}

async fn produce(topic: &str, partitions: i32, per_partition: usize) -> Result<()> {
    let producer: FutureProducer = kafka::config()?.create()?;
    // All sends at once, so the backlog appears on every partition together.
    let sends = (0..partitions).flat_map(|partition| {
        let producer = &producer;
        (0..per_partition).map(move |i| async move {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(partition)
                        .key("k")
                        .payload(&format!("{{\"text\": \"record {i}\"}}")),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        })
    });
    for result in futures::future::join_all(sends).await {
        result?;
    }
    Ok(())
}

/// Commits the end of every partition for `group`, as workers that caught up would.
fn commit_all(topic: &str, partitions: i32, group: &str) -> Result<()> {
    let consumer: BaseConsumer = kafka::config()?.set("group.id", group).create()?;
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        list.add_partition_offset(topic, partition, Offset::Offset(high))?;
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(())
}

/// Serves one gauge for Prometheus to scrape, and registers it as a target.
async fn serve_gauge(ns: &str, value: f64) -> Result<std::path::PathBuf> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let body =
        format!("# TYPE vectorpipe_test_queue_depth gauge\nvectorpipe_test_queue_depth {value}\n");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    prometheus::add_target(ns, &address, &[("scenario", ns)])
}

/// 1 and 2: a backlog on 4 partitions scales out to 4 workers and no further; once the backlog
/// is consumed the workers go back to 1, each step only after the scale-in cooldown.
async fn lag_scales_out_to_the_partitions_and_back_in(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-lag")?;
    let topic = unique_name("scale-lag");
    kafka::create_topic(&topic, 4).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    create_policy(
        client,
        &ns.name,
        "lag",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 10,
            "pollInterval": "1s",
            "metrics": [{"kafkaLag": {"aggregation": "sum"}, "scaleOutThreshold": 100, "scaleInThreshold": 10}],
            "scaleOut": {"evaluationPeriods": 2, "datapointsToAlarm": 2, "operation": "multiply", "factor": 2, "cooldown": "2s"},
            "scaleIn": {"evaluationPeriods": 3, "datapointsToAlarm": 3, "operation": "add", "factor": 1, "cooldown": "6s"}
        }),
    )
    .await?;
    wait_policy(client, &ns.name, "lag", "Active", |p| {
        (condition(p, "Active")?.0 == "True").then_some(())
    })
    .await?;
    let most = AtomicI32::new(0);
    ensure!(
        replicas(client, &ns.name).await? == 1,
        "no lag must keep 1 worker"
    );

    produce(&topic, 4, 100).await?;
    wait_replicas(client, &ns.name, 4, &most).await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    eventually("status.consumerLag = 400", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok((p.status.and_then(|s| s.consumer_lag) == Some(400)).then_some(()))
    })
    .await?;
    // The alarm keeps firing, but 4 partitions cap the count.
    let capped = wait_policy(client, &ns.name, "lag", "capped at the partitions", |p| {
        let c = condition(p, "ScalingLimited")?;
        (c.0 == "True" && c.1 == "CappedAtPartitions").then_some(c.2)
    })
    .await?;
    assert!(capped.contains("4 partitions"), "{capped}");
    ensure!(replicas(client, &ns.name).await? == 4);

    // The workers caught up: scale in, one step per cooldown, down to minReplicas.
    let group = format!("vectorpipe-{}-posts", ns.name);
    let (t, g) = (topic.clone(), group.clone());
    tokio::task::spawn_blocking(move || commit_all(&t, 4, &g)).await??;
    let drained_at = Timestamp::now();
    wait_replicas(client, &ns.name, 1, &most).await?;
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "never more workers than partitions"
    );

    // The status (with the last history entry) is written right after the scale itself.
    let mut history = wait_policy(client, &ns.name, "lag", "the scale-in to 1 recorded", |p| {
        let history = p.status.as_ref()?.history.clone();
        (history.first()?.to_replicas == 1).then_some(history)
    })
    .await?;
    history.reverse(); // oldest first
    // Scale-outs up to the 4 partitions, then scale-ins one worker at a time, each only after
    // the backlog was consumed and after the cooldown since the previous change.
    let turn = history
        .iter()
        .position(|h| h.to_replicas < h.from_replicas)
        .context("no scale-in recorded")?;
    assert!(
        history[..turn]
            .iter()
            .all(|h| h.to_replicas > h.from_replicas),
        "{history:#?}"
    );
    assert_eq!(history[turn - 1].to_replicas, 4, "{history:#?}");
    assert!(history.iter().all(|h| h.applied && h.to_replicas <= 4));
    for pair in history[turn - 1..].windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert_eq!(after.from_replicas - after.to_replicas, 1, "{history:#?}");
        let gap = after.time.0.duration_since(before.time.0).as_secs_f64();
        assert!(
            gap >= 6.0,
            "scale-in {}→{} came {gap} s after the previous change, inside the 6 s cooldown",
            after.from_replicas,
            after.to_replicas
        );
        assert!(
            after.time.0
                >= drained_at.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1))?,
            "scale-in before the backlog was consumed"
        );
    }
    assert_eq!(history.last().map(|h| h.to_replicas), Some(1));
    assert_eq!(history[0].reason, "ScaleOutAlarm");
    assert!(
        history[0]
            .inputs
            .get("kafkaLag")
            .is_some_and(|v| *v >= 100.0)
    );
    Ok(())
}

/// 3: a schedule window open now sets the floor; once it is closed the floor is gone.
async fn a_schedule_sets_a_floor_while_open(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-cron")?;
    let topic = unique_name("scale-cron");
    kafka::create_topic(&topic, 4).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    let spec = |cron: &str| {
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 6,
            "pollInterval": "1s",
            "metrics": [{"kafkaLag": {}, "scaleInThreshold": 1}],
            "scaleIn": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "1s"},
            "schedules": [{"name": "peak", "cron": cron, "timeZone": "Europe/Paris", "duration": "2h", "minReplicas": 3}]
        })
    };
    // Opened at the start of this minute: open for the next two hours.
    create_policy(client, &ns.name, "cron", spec("* * * * *")).await?;
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 3, &most).await?;
    wait_policy(client, &ns.name, "cron", "ScheduleFloor", |p| {
        let d = p.status.as_ref()?.last_decision.clone()?;
        (d.reason == "ScheduleFloor" && d.message.contains("peak")).then_some(())
    })
    .await?;
    // A window that opens at 12 hours from now's hour has been closed for 10 hours.
    let hour = (Timestamp::now()
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::get("Europe/Paris")?)
        .hour()
        + 12)
        % 24;
    Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name)
        .patch(
            "cron",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec(&format!("0 {hour} * * *"))})),
        )
        .await?;
    wait_replicas(client, &ns.name, 1, &most).await?;
    ensure!(most.load(Ordering::SeqCst) == 3);
    Ok(())
}

/// 4: a policy on a PromQL query over a series Prometheus scraped. The query names no server,
/// so the operator's --prometheus-url is used.
async fn a_prometheus_metric_scales_out(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-prom")?;
    let topic = unique_name("scale-prom");
    kafka::create_topic(&topic, 8).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    let target = serve_gauge(&ns.name, 250.0).await?;
    create_policy(
        client,
        &ns.name,
        "prom",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "pollInterval": "1s",
            "metrics": [{
                "prometheus": {"name": "queueDepth", "query": "max(vectorpipe_test_queue_depth{scenario=\"$namespace\"})"},
                "scaleOutThreshold": 100
            }],
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "1s"}
        }),
    )
    .await?;
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 3, &most).await?;
    let policy = wait_policy(client, &ns.name, "prom", "held at maxReplicas", |p| {
        let c = condition(p, "ScalingLimited")?;
        (c.1 == "AtMaxReplicas").then(|| p.clone())
    })
    .await?;
    let status = policy.status.context("status")?;
    let first = status.history.last().context("history")?;
    assert_eq!(first.reason, "ScaleOutAlarm");
    assert_eq!(first.inputs.get("queueDepth"), Some(&250.0), "{first:?}");
    let _ = std::fs::remove_file(target);
    Ok(())
}

/// A freshness objective: a real worker indexes records stamped five minutes before they were
/// produced, Prometheus scrapes its freshness histogram, and the policy scales out on the
/// percentile being above its target.
async fn freshness_above_its_target_scales_out(client: &kube::Client) -> Result<()> {
    use vectorpipe_tests::bedrock::FakeBedrock;
    use vectorpipe_tests::worker::Worker;
    let ns = k8s::namespace("scale-fresh")?;
    let topic = unique_name("scale-fresh");
    kafka::create_topic(&topic, 2).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    // The worker runs as a process (KWOK's pods do not consume), as pipeline `posts`.
    let (_fake, address) = FakeBedrock::start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    let manifest =
        vectorpipe_tests::worker::posts_manifest(&ns.name, &topic, &address.to_string())?;
    std::fs::write(&file, serde_yaml::to_string(&manifest)?)?;
    let worker = Worker::start(&file, &dir.path().join("worker.log"))?;
    let scraped = prometheus::add_target(&ns.name, &worker.metrics, &[("namespace", &ns.name)])?;
    create_policy(
        client,
        &ns.name,
        "fresh",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 2,
            "pollInterval": "1s",
            "metrics": [{"freshness": {"percentile": 95, "targetSeconds": 60, "window": "30s"}}],
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "1s"},
            "scaleIn": {"evaluationPeriods": 100, "datapointsToAlarm": 100, "operation": "add", "factor": 1, "cooldown": "600s"}
        }),
    )
    .await?;
    // Fresh records first: the objective holds and the count stays.
    let producer: FutureProducer = kafka::config()?.create()?;
    let send = |n: usize, stamp: Option<i64>| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let id = format!("fresh-{n}");
            let body = json!({"id": id, "text": format!("record {n}")}).to_string();
            let mut record = FutureRecord::to(&topic).key(&id).payload(&body);
            if let Some(at) = stamp {
                record = record.timestamp(at);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)?;
            anyhow::Ok(())
        }
    };
    for n in 0..40 {
        send(n, None).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let judged = wait_policy(client, &ns.name, "fresh", "a freshness reading", |p| {
        let last = p.status.as_ref()?.last_decision.clone()?;
        last.inputs.contains_key("freshness").then_some(last)
    })
    .await?;
    ensure!(
        replicas(client, &ns.name).await? == 1,
        "fresh records must keep 1 worker: {judged:?}"
    );
    // Records stamped five minutes ago: searchable far later than the target.
    let stale = Timestamp::now().as_millisecond() - 300_000;
    for n in 40..120 {
        send(n, Some(stale)).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 2, &most).await?;
    let policy = wait_policy(client, &ns.name, "fresh", "the scale-out recorded", |p| {
        let status = p.status.as_ref()?;
        status
            .history
            .iter()
            .find(|d| d.reason == "ScaleOutAlarm")
            .cloned()
    })
    .await?;
    ensure!(
        judged.inputs["freshness"] < 60.0,
        "fresh records read as fresh: {judged:?}"
    );
    let seen = policy.inputs.get("freshness").copied().unwrap_or_default();
    ensure!(
        seen > 60.0,
        "the scale-out saw freshness p95 {seen} s: {policy:?}"
    );
    // The pipeline's status shows the freshness the readers see.
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    let shown = eventually("status.freshness", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok(p.status
            .and_then(|s| s.freshness)
            .filter(|f| f.p95_seconds > 60.0))
    })
    .await?;
    ensure!(
        shown.p50_seconds <= shown.p95_seconds,
        "p50 above p95: {shown:?}"
    );
    let _ = std::fs::remove_file(scraped);
    drop(worker);
    Ok(())
}

/// 5: dry-run decides and records, and the worker count stays.
async fn dry_run_changes_nothing(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-dry")?;
    let topic = unique_name("scale-dry");
    kafka::create_topic(&topic, 8).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    let target = serve_gauge(&ns.name, 250.0).await?;
    create_policy(
        client,
        &ns.name,
        "dry",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "pollInterval": "1s",
            "mode": "dryRun",
            "prometheus": {"address": prometheus::url()?},
            "metrics": [{
                "prometheus": {"name": "queueDepth", "query": "max(vectorpipe_test_queue_depth{scenario=\"$namespace\"})"},
                "scaleOutThreshold": 100
            }],
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "1s"}
        }),
    )
    .await?;
    let status = wait_policy(client, &ns.name, "dry", "a recorded decision", |p| {
        let s = p.status.clone()?;
        (s.last_decision.as_ref()?.to_replicas == 2 && !s.history.is_empty()).then_some(s)
    })
    .await?;
    let decision = status.last_decision.context("decision")?;
    assert!(!decision.applied, "{decision:?}");
    assert_eq!(
        (decision.from_replicas, decision.reason.as_str()),
        (1, "ScaleOutAlarm")
    );
    assert_eq!(status.current_replicas, Some(1));
    assert_eq!(
        condition(
            &Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name)
                .get("dry")
                .await?,
            "Active"
        )
        .map(|c| c.1),
        Some("DryRun".into())
    );
    // Several more polls: still one worker, and one history entry for the same would-be change.
    // The inputs do not change, so neither may the policy: a status written on every poll
    // would move its resourceVersion (one write per poll per policy adds up at scale).
    let policies = Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name);
    let settle = |p: &ScalingPolicy| {
        let able = condition(p, "AbleToScale").map(|c| c.1);
        (able.as_deref() == Some("ReadyForNewScale")).then(|| p.resource_version())
    };
    let before = wait_policy(client, &ns.name, "dry", "the cooldown over", settle).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(
        replicas(client, &ns.name).await? == 1,
        "dry-run changed the count"
    );
    let again = policies.get("dry").await?;
    assert_eq!(
        again.resource_version(),
        before,
        "four polls with the same inputs wrote the policy's status: {:?}",
        again.status
    );
    assert_eq!(again.status.context("status")?.history.len(), 1);
    let _ = std::fs::remove_file(target);
    Ok(())
}

/// 6: a Prometheus that does not answer: fallbackReplicas and MetricsUnavailable.
async fn unreadable_metrics_fall_back(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-fallback")?;
    let topic = unique_name("scale-fallback");
    kafka::create_topic(&topic, 8).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    create_policy(
        client,
        &ns.name,
        "fallback",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "fallbackReplicas": 2,
            "pollInterval": "1s",
            "prometheus": {"address": format!("http://{closed}")},
            "metrics": [{"prometheus": {"query": "vector(1)"}, "scaleOutThreshold": 10}]
        }),
    )
    .await?;
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 2, &most).await?;
    let message = wait_policy(client, &ns.name, "fallback", "MetricsUnavailable", |p| {
        let c = condition(p, "AbleToScale")?;
        (c.0 == "False" && c.1 == "MetricsUnavailable").then_some(c.2)
    })
    .await?;
    assert!(message.contains(&closed.to_string()), "{message}");
    assert!(message.contains("fallbackReplicas"), "{message}");
    Ok(())
}

/// Lag read through the broker's SCRAM listener with the credentials from the pipeline's Secret
/// (the same Secret its workers mount).
async fn lag_through_scram_scales_out(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-scram")?;
    let topic = unique_name("scale-scram");
    kafka::create_topic(&topic, 2).await?;
    let user = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_USERNAME")?;
    let password = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_PASSWORD")?;
    k8s::kubectl(&[
        "create",
        "secret",
        "generic",
        "kafka-user",
        "-n",
        &ns.name,
        &format!("--from-literal=username={user}"),
        &format!("--from-literal=password={password}"),
    ])?;
    k8s::kubectl(&[
        "label",
        "secret",
        "kafka-user",
        "-n",
        &ns.name,
        "vectorpipe.io/credentials=true",
    ])?;
    let source = json!({
        "bootstrapServers": [vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_BOOTSTRAP")?],
        "topics": [topic],
        "auth": {"scram": {"mechanism": "SHA-512", "secretRef": {"name": "kafka-user"}, "tls": false}}
    });
    create_pipeline_from(client, &ns.name, source).await?;
    create_policy(
        client,
        &ns.name,
        "scram",
        json!({
            "targetRef": {"name": "posts"},
            "maxReplicas": 6,
            "pollInterval": "1s",
            "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 50}],
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "1s"}
        }),
    )
    .await?;
    produce(&topic, 2, 50).await?;
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 2, &most).await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    eventually("status.consumerLag = 100", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok((p.status.and_then(|s| s.consumer_lag) == Some(100)).then_some(()))
    })
    .await?;
    ensure!(
        most.load(Ordering::SeqCst) <= 2,
        "more workers than the 2 partitions"
    );
    Ok(())
}

/// A policy whose target does not exist says so, and a second policy on one pipeline is refused.
async fn missing_and_conflicting_targets_are_reported(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-misc")?;
    let spec = json!({
        "targetRef": {"name": "posts"},
        "maxReplicas": 2,
        "pollInterval": "1s",
        "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 10}]
    });
    create_policy(client, &ns.name, "first", spec.clone()).await?;
    wait_policy(client, &ns.name, "first", "TargetNotFound", |p| {
        (condition(p, "Active")?.1 == "TargetNotFound").then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp
    create_policy(client, &ns.name, "second", spec).await?;
    let message = wait_policy(client, &ns.name, "second", "ConflictingPolicy", |p| {
        let c = condition(p, "Active")?;
        (c.1 == "ConflictingPolicy").then_some(c.2)
    })
    .await?;
    assert!(message.contains("first"), "{message}");
    Ok(())
}

/// 8: someone else changes the worker count (`kubectl scale` through the scale subresource): the
/// policy names them in ConflictingWriter, sets the count back once, and then leaves it alone for
/// the rest of its cooldown instead of fighting on every poll.
async fn another_writer_is_named_and_fought_once_per_cooldown(client: &kube::Client) -> Result<()> {
    let ns = k8s::namespace("scale-writer")?;
    let topic = unique_name("scale-writer");
    kafka::create_topic(&topic, 4).await?;
    create_pipeline(client, &ns.name, &topic).await?;
    create_policy(
        client,
        &ns.name,
        "floor",
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 2,
            "maxReplicas": 4,
            "pollInterval": "1s",
            "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 1000}],
            "scaleOut": {"cooldown": "1s"},
            "scaleIn": {"cooldown": "10m"}
        }),
    )
    .await?;
    let most = AtomicI32::new(0);
    wait_replicas(client, &ns.name, 2, &most).await?;
    let scale_by_hand = || {
        k8s::kubectl(&[
            "scale",
            "embeddingpipeline/posts",
            "--replicas=1",
            "-n",
            &ns.name,
        ])
    };
    scale_by_hand()?;
    // Who the apiserver recorded as the writer of the count.
    let pipeline = Api::<EmbeddingPipeline>::namespaced(client.clone(), &ns.name)
        .get("posts")
        .await?;
    let manager = pipeline
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| {
            e.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:spec"]["f:workers"].get("f:replicas").is_some())
        })
        .find_map(|e| e.manager.clone().filter(|m| !m.starts_with("vectorpipe")))
        .context("no other manager owns spec.workers.replicas after kubectl scale")?;
    let message = wait_policy(client, &ns.name, "floor", "ConflictingWriter", |p| {
        condition(p, "ConflictingWriter")
            .filter(|c| c.0 == "True" && c.1 == "OtherWriter")
            .map(|c| c.2)
    })
    .await?;
    ensure!(
        message.contains(&manager) && message.contains("set to 1"),
        "{message}"
    );
    // Set back once.
    wait_replicas(client, &ns.name, 2, &most).await?;
    // Changed by hand again within the cooldown: left alone, poll after poll.
    scale_by_hand()?;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = replicas(client, &ns.name).await?;
        ensure!(
            n == 1,
            "the policy fought the other writer again within its cooldown ({n} workers)"
        );
    }
    let decision = wait_policy(client, &ns.name, "floor", "held decision", |p| {
        p.status
            .as_ref()?
            .last_decision
            .clone()
            .filter(|d| d.reason == "ConflictingWriter")
    })
    .await?;
    ensure!(
        decision.message.contains("holding 1"),
        "{}",
        decision.message
    );

    // Each controller writes its part of the status by server-side apply as its own manager.
    let applied_status = |entries: &[ManagedFieldsEntry], manager: &str, field: &str| {
        entries.iter().any(|e| {
            e.manager.as_deref() == Some(manager)
                && e.operation.as_deref() == Some("Apply")
                && e.subresource.as_deref() == Some("status")
                && e.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0["f:status"].get(field).is_some())
        })
    };
    let pipeline = Api::<EmbeddingPipeline>::namespaced(client.clone(), &ns.name)
        .get("posts")
        .await?;
    let entries = pipeline.metadata.managed_fields.clone().unwrap_or_default();
    ensure!(
        applied_status(&entries, "vectorpipe-operator", "f:conditions")
            && applied_status(&entries, "vectorpipe-operator-scaling", "f:consumerLag")
            && !applied_status(&entries, "vectorpipe-operator", "f:consumerLag"),
        "status managers of the pipeline: {entries:?}"
    );
    let policy = Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name)
        .get("floor")
        .await?;
    let entries = policy.metadata.managed_fields.clone().unwrap_or_default();
    ensure!(
        applied_status(&entries, "vectorpipe-operator-scaling", "f:conditions"),
        "status managers of the policy: {entries:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn scaling_policies_act_on_real_lag_schedules_and_promql() -> Result<()> {
    k8s::install_crds()?;
    let dir = std::env::temp_dir().join(unique_name("scaling"));
    std::fs::create_dir_all(&dir)?;
    let operator = Arc::new(Operator::start(&dir.join("operator.log"))?);
    let client = k8s::client().await?;
    let result = tokio::try_join!(
        lag_scales_out_to_the_partitions_and_back_in(&client),
        a_schedule_sets_a_floor_while_open(&client),
        a_prometheus_metric_scales_out(&client),
        freshness_above_its_target_scales_out(&client),
        dry_run_changes_nothing(&client),
        unreadable_metrics_fall_back(&client),
        missing_and_conflicting_targets_are_reported(&client),
        lag_through_scram_scales_out(&client),
        another_writer_is_named_and_fought_once_per_cooldown(&client),
    );
    if result.is_err() {
        let log = operator.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "operator log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    result?;
    let metrics = operator.metrics_text().await?;
    // Each policy's series exist at 0 once it is judged: the scenarios above scaled.
    assert!(
        vectorpipe_tests::worker::metric_sum(&metrics, "vectorpipe_operator_scaling_changes_total")
            > 0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("vectorpipe_operator_consumer_lag"),
        "{metrics}"
    );
    Ok(())
}
