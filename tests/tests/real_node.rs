//! The user's path on a real kubelet (`up.sh node`): `helm install` runs the operator image as a
//! real pod, a pipeline applied with kubectl gets a real worker pod (the worker image, the
//! operator's security context, its mounts and probes) that indexes from the harness Kafka
//! through the fake Bedrock into OpenSearch; a `kubectl delete pod` (SIGTERM from the kubelet)
//! loses nothing, a changed spec rolls the pod, and two worker pods of one pipeline run side by
//! side on the one node and share the partitions.
//!
//! Pods reach the real node only when they ask: they tolerate its taint, select it, and carry the
//! label the harness' admission policy puts on the host network (servers here listen on
//! 127.0.0.0/8 only). This file is its own test binary, so no other test's operator runs beside
//! the one the chart installs.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use opensearch::SearchParts;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::{FakeBedrock, Fault};
use vectorpipe_tests::k8s::{self, helm, kubectl};
use vectorpipe_tests::{eventually, harness_var, kafka, opensearch as os, unique_name};

/// The worker pods of the pipeline, oldest first: name, ready, terminating. A container restart
/// fails the test: the liveness probe killed a worker, or a worker crashed.
fn worker_pods(namespace: &str, pipeline: &str) -> Result<Vec<(String, bool, bool)>> {
    let text = kubectl(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        &format!("app.kubernetes.io/name=vectorpipe-worker,vectorpipe.io/pipeline={pipeline}"),
        "--sort-by=.metadata.creationTimestamp",
        "-o",
        "json",
    ])?;
    let list: Value = serde_json::from_str(&text)?;
    Ok(list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|pod| {
                    let name = pod["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let deleting = pod["metadata"]["deletionTimestamp"].is_string();
                    let ready = pod["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    });
                    let restarts: u64 = pod["status"]["containerStatuses"]
                        .as_array()
                        .map(|c| c.iter().filter_map(|c| c["restartCount"].as_u64()).sum())
                        .unwrap_or_default();
                    ensure!(
                        restarts == 0,
                        "{name} restarted {restarts} times: {}",
                        pod["status"]["containerStatuses"]
                    );
                    Ok((name, ready, deleting))
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default())
}

/// Follows a pod's log (`kubectl logs -f`) until the container ends; the whole log.
fn follow_logs(namespace: &str, pod: &str) -> Result<std::thread::JoinHandle<Result<String>>> {
    let child = std::process::Command::new(harness_var("VP_KUBECTL")?)
        .arg(format!("--kubeconfig={}", k8s::kubeconfig()?.display()))
        .args(["logs", "-f", pod, "-n", namespace])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kubectl logs -f")?;
    Ok(std::thread::spawn(move || {
        let out = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr))
    }))
}

/// Waits until exactly `n` worker pods are ready and none is terminating; their names.
async fn wait_ready_pods(namespace: &str, pipeline: &str, n: usize) -> Result<Vec<String>> {
    eventually(
        &format!("{n} ready worker pods on the real node"),
        Duration::from_secs(180),
        || async {
            let pods = worker_pods(namespace, pipeline)?;
            let ready: Vec<String> = pods
                .iter()
                .filter(|(_, ready, deleting)| *ready && !deleting)
                .map(|(name, ..)| name.clone())
                .collect();
            Ok((ready.len() == n && pods.len() == n).then_some(ready))
        },
    )
    .await
}

async fn produce(topic: &str, ids: std::ops::Range<usize>) -> Result<()> {
    produce_text(topic, ids, "real pods index post number").await
}

/// Waits until the index holds exactly the documents of `ids` (ids are the record ids, so a lost
/// record shows as a missing id, and no other document may be there).
async fn wait_indexed(index: &str, ids: std::ops::Range<usize>) -> Result<()> {
    let want = ids.len() as u64;
    eventually(
        &format!("{want} documents in {index}"),
        Duration::from_secs(180),
        || async { Ok((os::count(index).await? == want).then_some(())) },
    )
    .await?;
    let body: Value = os::client()?
        .search(SearchParts::Index(&[index]))
        .body(json!({"size": 10000, "_source": false, "query": {"match_all": {}}}))
        .send()
        .await?
        .json()
        .await?;
    let found: std::collections::BTreeSet<String> = body["hits"]["hits"]
        .as_array()
        .context("no hits")?
        .iter()
        .filter_map(|h| h["_id"].as_str().map(str::to_owned))
        .collect();
    let expected: std::collections::BTreeSet<String> = ids.map(|n| format!("post-{n}")).collect();
    ensure!(
        found == expected,
        "missing {:?}, unexpected {:?}",
        expected.difference(&found).collect::<Vec<_>>(),
        found.difference(&expected).collect::<Vec<_>>()
    );
    Ok(())
}

/// `kubectl scale` of a pipeline (its scale subresource), as a user or an HPA would.
fn scale(namespace: &str, pipeline: &str, replicas: u32) -> Result<()> {
    kubectl(&[
        "scale",
        "embeddingpipeline",
        pipeline,
        "-n",
        namespace,
        &format!("--replicas={replicas}"),
    ])?;
    Ok(())
}

/// Records one worker pod has indexed, read from its `/metrics` over its admin socket (with
/// `kubectl exec`: the pods on the host network bind their metrics port to a free one).
fn indexed_by(namespace: &str, pod: &str) -> Result<f64> {
    let page = kubectl(&[
        "exec",
        pod,
        "-n",
        namespace,
        "--",
        "/usr/local/bin/vectorpipe-worker",
        "probe",
        "/metrics",
    ])?;
    Ok(page
        .lines()
        .filter(|l| {
            l.starts_with("vectorpipe_worker_records_total{") && l.contains(r#"outcome="indexed""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_and_a_pipeline_run_as_real_pods_and_survive_deletes_rollouts_and_scaling()
-> Result<()> {
    harness_var("VP_REAL_NODE").context("the real node is not up: tests/harness/up.sh ... node")?;
    k8s::install_crds()?;
    let ns = k8s::namespace("vp-real")?;
    let release = unique_name("vp");
    k8s::install_operator_on_the_real_node(&ns.name, &release)?;
    let operator_pod = kubectl(&[
        "get",
        "pods",
        "-n",
        &ns.name,
        "-l",
        "app.kubernetes.io/name=vectorpipe-operator",
        "-o",
        "jsonpath={.items[0].metadata.name} {.items[0].spec.nodeName}",
    ])?;
    ensure!(
        operator_pod.ends_with(" 127.0.0.1"),
        "the operator is not on the real node: {operator_pod}"
    );

    // A pipeline, applied as a user would, with the AWS keys from a Secret.
    let topic = unique_name("real-node");
    kafka::create_topic(&topic, 6).await?;
    let (fake, address) = FakeBedrock::start().await?;
    k8s::create_aws_secret(&ns.name)?;
    let index = topic.to_lowercase();
    let group = format!("{topic}-group");
    let workers = k8s::real_node_workers();
    let mut pipeline = json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "posts", "namespace": ns.name},
        "spec": {
            "source": {"kafka": {
                "bootstrapServers": [kafka::bootstrap()?],
                "topics": [topic],
                "groupId": group,
            }},
            "transform": {"idPointer": "/id", "textPointers": ["/text"]},
            "embedding": {"bedrock": {
                "modelId": "amazon.titan-embed-text-v2:0",
                "dimensions": 256,
                "region": "eu-west-1",
                "endpointUrl": format!("http://{address}"),
            }},
            "sink": {"opensearch": {
                "endpoints": [os::url()?],
                "index": index,
                "method": {"engine": "lucene"},
                "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                "bulk": {"flushInterval": "200ms"},
            }},
            "workers": workers,
        }
    });
    let apply = |pipeline: &Value| -> Result<()> {
        let file = std::env::temp_dir().join(format!("{release}-pipeline.yaml"));
        std::fs::write(&file, serde_yaml::to_string(pipeline)?)?;
        kubectl(&["apply", "-f", &file.to_string_lossy()])?;
        Ok(())
    };
    apply(&pipeline)?;
    let first = wait_ready_pods(&ns.name, "posts", 1).await?;
    produce(&topic, 0..200).await?;
    wait_indexed(&index, 0..200).await?;
    ensure!(fake.stats().calls > 0, "the fake Bedrock saw no call");

    // The pod as the operator rendered it, running for real: read-only root, non-root, its
    // probes (the pod is Ready only once the readiness probe passed), and its logs.
    let pod: Value = serde_json::from_str(&kubectl(&[
        "get", "pod", &first[0], "-n", &ns.name, "-o", "json",
    ])?)?;
    assert_eq!(pod["spec"]["nodeName"], "127.0.0.1");
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(
        container["readinessProbe"]["exec"].is_object(),
        "{container}"
    );
    let logs = kubectl(&["logs", &first[0], "-n", &ns.name])?;
    assert!(logs.contains("starting"), "{logs}");
    let probe = kubectl(&[
        "exec",
        &first[0],
        "-n",
        &ns.name,
        "--",
        "/usr/local/bin/vectorpipe-worker",
        "probe",
        "/readyz",
    ])?;
    assert!(probe.contains("ready"), "{probe}");

    // kubectl delete pod: the kubelet sends SIGTERM, the worker drains and commits; records
    // produced meanwhile are indexed by the replacement, and none is lost.
    let producing = tokio::spawn({
        let topic = topic.clone();
        async move { produce(&topic, 200..600).await }
    });
    let log = follow_logs(&ns.name, &first[0])?;
    kubectl(&["delete", "pod", &first[0], "-n", &ns.name, "--wait=true"])?;
    let log = log.join().expect("the log reader panicked")?;
    // The worker got the SIGTERM, finished what it had read and left the group, all within the
    // grace period (a SIGKILL would end the log before "stopped").
    for line in [
        "stopping: finishing in-flight work",
        "drained; leaving the group",
        "\"stopped\"",
    ] {
        ensure!(
            log.contains(line),
            "the deleted pod's log has no {line}:\n{log}"
        );
    }
    ensure!(
        !log.contains("did not finish in time"),
        "the deleted pod did not drain in time:\n{log}"
    );
    producing.await??;
    let second = wait_ready_pods(&ns.name, "posts", 1).await?;
    ensure!(second != first, "the deleted pod was not replaced");
    wait_indexed(&index, 0..600).await?;
    kafka::wait_for_commits_at_end(&topic, &group, 6, Duration::from_secs(120)).await?;

    // A changed spec rolls the pod (maxSurge 1: the new pod runs beside the old one on the same
    // node until it is ready) and indexing goes on.
    pipeline["spec"]["sink"]["opensearch"]["bulk"]["flushInterval"] = json!("300ms");
    apply(&pipeline)?;
    let rolled = eventually(
        "the rollout to a new pod",
        Duration::from_secs(180),
        || async {
            let pods = worker_pods(&ns.name, "posts")?;
            Ok((pods.len() == 1 && pods[0].1 && pods[0].0 != second[0]).then(|| pods[0].0.clone()))
        },
    )
    .await?;
    produce(&topic, 600..800).await?;
    wait_indexed(&index, 0..800).await?;

    // Scale 1 → 2 → 1: both pods run on the one node (no port of theirs clashes), both hold
    // partitions, the first survives the scale-out, and the one left after the scale-in is one
    // of the two (neither restarted).
    scale(&ns.name, "posts", 2)?;
    let two = wait_ready_pods(&ns.name, "posts", 2).await?;
    ensure!(
        two.contains(&rolled),
        "the first pod did not survive the scale-out: {two:?}"
    );
    let before: Vec<f64> = two
        .iter()
        .map(|pod| indexed_by(&ns.name, pod))
        .collect::<Result<_>>()?;
    produce(&topic, 800..1000).await?;
    wait_indexed(&index, 0..1000).await?;
    for (pod, before) in two.iter().zip(&before) {
        let after = indexed_by(&ns.name, pod)?;
        ensure!(
            after > *before,
            "{pod} indexed nothing of the last 200 records (its partitions?)"
        );
    }
    scale(&ns.name, "posts", 1)?;
    let one = wait_ready_pods(&ns.name, "posts", 1).await?;
    produce(&topic, 1000..1100).await?;
    wait_indexed(&index, 0..1100).await?;
    kafka::wait_for_commits_at_end(&topic, &group, 6, Duration::from_secs(120)).await?;
    ensure!(
        two.contains(&one[0]),
        "the pod left is not one of the two: {one:?} {two:?}"
    );

    // The query server as a real pod: spec.query runs `serve` from the worker image next to the
    // worker (its probes through the admin socket too), and it answers searches of the index.
    let query_port = vectorpipe_tests::worker::free_port()?;
    pipeline["spec"]["query"] = json!({"enabled": true, "port": query_port});
    apply(&pipeline)?;
    eventually(
        "QueryReady on the real node",
        Duration::from_secs(180),
        || async {
            let ep: Value = serde_json::from_str(&kubectl(&[
                "get", "vp", "posts", "-n", &ns.name, "-o", "json",
            ])?)?;
            Ok(ep["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "QueryReady" && c["status"] == "True")
                .then_some(()))
        },
    )
    .await?;
    let answer: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{query_port}/v1/search"))
        .json(&json!({"query": "real pods index post number 42", "k": 3}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let hits = answer["hits"].as_array().context("no hits")?;
    ensure!(hits.len() == 3, "{answer}");
    let page = reqwest::get(format!("http://127.0.0.1:{query_port}/"))
        .await?
        .text()
        .await?;
    ensure!(page.contains("Ask the index"), "no page");
    // The worker kept running through it: the query server is a pod of its own.
    ensure!(
        wait_ready_pods(&ns.name, "posts", 1).await? == one,
        "enabling the query server touched the worker pod"
    );

    // `kubectl vectorpipe redrive` (the plugin found on PATH by kubectl): records the model
    // refused are dead letters; once it takes them, the redrive runs as a Job made from the
    // worker pods (on the real node, with their config and credentials) and the worker indexes
    // them.
    let dead_letters = format!("{topic}-dlq");
    kafka::create_topic(&dead_letters, 1).await?;
    pipeline["spec"]["deadLetter"] = json!({"topic": dead_letters});
    apply(&pipeline)?;
    fake.poison("cursed", Fault::ValidationException);
    eventually(
        "the rollout with the dead-letter topic",
        Duration::from_secs(180),
        || async {
            let pods = worker_pods(&ns.name, "posts")?;
            Ok((pods.len() == 1 && pods[0].1 && pods[0].0 != one[0]).then_some(()))
        },
    )
    .await?;
    produce_text(&topic, 1100..1103, "a cursed post").await?;
    kafka::wait_for_commits_at_end(&topic, &group, 6, Duration::from_secs(120)).await?;
    ensure!(
        os::count(&index).await? == 1100,
        "a refused record was indexed"
    );
    fake.cure("cursed");
    let said = k8s::kubectl_plugin(&[
        "redrive",
        "posts",
        "-n",
        &ns.name,
        "--reason",
        "embedding-rejected",
        "--since",
        "1h",
        "--timeout",
        "3m",
    ])?;
    // What the README shows, but for the redrive's id (made from the time) and the Job's line
    // (on stderr).
    let shown = vectorpipe_tests::readme_block(
        "kubectl vectorpipe redrive posts --reason embedding-rejected --since 6h",
    )?;
    let report = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with("job "))
            .map(|l| match l.split_once(": ") {
                Some((id, rest)) if id.starts_with("redrive-") => format!("<id>: {rest}"),
                _ => l.to_owned(),
            })
            .collect()
    };
    assert_eq!(report(&said), report(&shown), "the README's redrive block");
    wait_indexed(&index, 0..1103).await?;
    let job: Value = serde_json::from_str(&kubectl(&[
        "get",
        "pods",
        "-n",
        &ns.name,
        "-l",
        "app.kubernetes.io/name=vectorpipe-redrive",
        "-o",
        "json",
    ])?)?;
    assert_eq!(
        job["items"][0]["spec"]["nodeName"], "127.0.0.1",
        "the redrive ran off the real node: {job}"
    );
    // The Job's pod is not a worker: the worker pods are the one they were.
    ensure!(
        worker_pods(&ns.name, "posts")?.len() == 1,
        "the redrive pod counted as a worker"
    );

    let _ = helm(&["uninstall", &release, "-n", &ns.name]);
    Ok(())
}

async fn produce_text(topic: &str, ids: std::ops::Range<usize>, text: &str) -> Result<()> {
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "5").create()?;
    for n in ids {
        let id = format!("post-{n}");
        let payload = json!({"id": id, "text": format!("{text} {n}")}).to_string();
        producer
            .send(
                FutureRecord::to(topic).key(&id).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}
