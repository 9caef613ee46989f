//! Zero-downtime model migration on the real node: the chart's operator and real worker pods.
//! A pipeline on Titan v2 at 256 dimensions changes to 1024 while records keep arriving; a
//! reader searches the alias all along. The new generation is built by backfill workers, the
//! alias flips once it caught up, every record ends up in it with 1024-dimension vectors, no
//! search fails, and the old generation is deleted once its retention is over.
//! Its own test binary: no other test's operator runs beside the chart's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use opensearch::SearchParts;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::k8s::{self, helm, kubectl};
use vectorpipe_tests::{eventually, harness_var, kafka, opensearch as os, unique_name};

async fn produce(topic: &str, ids: std::ops::Range<usize>, pause: Duration) -> Result<()> {
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "5").create()?;
    for n in ids {
        let id = format!("post-{n}");
        let payload =
            json!({"id": id, "text": format!("a post about migrations number {n}")}).to_string();
        producer
            .send(
                FutureRecord::to(topic).key(&id).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(())
}

/// The pipeline's `status.index`.
fn index_status(namespace: &str) -> Result<Value> {
    let pipeline: Value = serde_json::from_str(&kubectl(&[
        "get", "vp", "posts", "-n", namespace, "-o", "json",
    ])?)?;
    Ok(pipeline["status"]["index"].clone())
}

/// The ids in `index` (an alias or an index) and the length of one document's vector.
async fn ids_and_dimensions(index: &str) -> Result<(std::collections::BTreeSet<String>, usize)> {
    let body: Value = os::client()?
        .search(SearchParts::Index(&[index]))
        .body(json!({"size": 10000, "_source": ["embedding"], "query": {"match_all": {}}}))
        .send()
        .await?
        .json()
        .await?;
    let hits = body["hits"]["hits"].as_array().context("no hits")?;
    let ids = hits
        .iter()
        .filter_map(|h| h["_id"].as_str().map(str::to_owned))
        .collect();
    let dims = hits
        .first()
        .and_then(|h| h["_source"]["embedding"].as_array())
        .map_or(0, Vec::len);
    Ok((ids, dims))
}

async fn index_exists(index: &str) -> Result<bool> {
    let status = reqwest::Client::new()
        .head(format!("{}/{index}", os::url()?))
        .send()
        .await?
        .status();
    Ok(status.is_success())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_change_migrates_to_a_new_generation_without_a_failed_search() -> Result<()> {
    harness_var("VP_REAL_NODE").context("the real node is not up: tests/harness/up.sh ... node")?;
    k8s::install_crds()?;
    let ns = k8s::namespace("vp-migrate")?;
    let release = unique_name("vp");
    k8s::install_operator_on_the_real_node(&ns.name, &release)?;

    let topic = unique_name("migrate");
    kafka::create_topic(&topic, 3).await?;
    let (fake, address) = FakeBedrock::start().await?;
    k8s::create_aws_secret(&ns.name)?;
    let alias = topic.to_lowercase();
    let workers = k8s::real_node_workers();
    let mut pipeline = json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "posts", "namespace": ns.name},
        "spec": {
            "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]}},
            "transform": {"idPointer": "/id", "textPointers": ["/text"]},
            "embedding": {"bedrock": {
                "modelId": "amazon.titan-embed-text-v2:0",
                "dimensions": 256,
                "region": "eu-west-1",
                "endpointUrl": format!("http://{address}"),
            }},
            "sink": {"opensearch": {
                "endpoints": [os::url()?],
                "index": alias,
                "method": {"engine": "lucene"},
                "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                "bulk": {"flushInterval": "200ms"},
            }},
            "workers": workers,
            "migration": {"retainPrevious": "30s", "catchUpLag": 0},
        }
    });
    let apply = |pipeline: &Value| -> Result<()> {
        let file = std::env::temp_dir().join(format!("{release}-pipeline.yaml"));
        std::fs::write(&file, serde_yaml::to_string(pipeline)?)?;
        kubectl(&["apply", "-f", &file.to_string_lossy()])?;
        Ok(())
    };
    apply(&pipeline)?;
    produce(&topic, 0..300, Duration::ZERO).await?;
    eventually(
        "300 documents through the alias",
        Duration::from_secs(180),
        || async { Ok((os::count(&alias).await? == 300).then_some(())) },
    )
    .await?;
    // A new pipeline's index is its first generation, behind the alias.
    let first = index_status(&ns.name)?;
    assert_eq!(first["serving"]["index"], format!("{alias}-g1"), "{first}");
    assert!(index_exists(&format!("{alias}-g1")).await?);

    // A reader searching the alias all along, and records arriving all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (searches, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = tokio::spawn({
        let (stop, searches, failures, alias) = (
            stop.clone(),
            searches.clone(),
            failures.clone(),
            alias.clone(),
        );
        async move {
            let http = reqwest::Client::new();
            let url = format!("{}/{alias}/_search", os::url()?);
            let mut first_failure = None;
            while !stop.load(Ordering::SeqCst) {
                let answer = http
                    .post(&url)
                    .json(&json!({"size": 1, "query": {"match": {"text": "migrations"}}}))
                    .send()
                    .await;
                searches.fetch_add(1, Ordering::SeqCst);
                let ok = match answer {
                    Ok(r) if r.status().is_success() => {
                        let body: Value = r.json().await.unwrap_or_default();
                        body["hits"]["total"]["value"].as_u64().unwrap_or(0) >= 300
                    }
                    _ => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::SeqCst);
                    first_failure.get_or_insert_with(std::time::Instant::now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    });
    let producing = tokio::spawn({
        let topic = topic.clone();
        async move { produce(&topic, 300..600, Duration::from_millis(100)).await }
    });

    pipeline["spec"]["embedding"]["bedrock"]["dimensions"] = json!(1024);
    apply(&pipeline)?;
    let started = eventually(
        "the migration to start",
        Duration::from_secs(60),
        || async {
            let status = index_status(&ns.name)?;
            Ok(status["migration"].is_object().then_some(status))
        },
    )
    .await?;
    assert_eq!(
        started["migration"]["target"]["index"],
        format!("{alias}-g2")
    );
    assert_eq!(
        started["serving"]["index"],
        format!("{alias}-g1"),
        "readers stay"
    );
    let backfill = kubectl(&[
        "get",
        "deployment",
        "posts-backfill-worker",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.spec.template.spec.nodeSelector}",
    ])?;
    assert!(backfill.contains("127.0.0.1"), "{backfill}");
    // `kubectl vectorpipe migrate status` shows it.
    let shown = k8s::kubectl_plugin(&["migrate", "status", "posts", "-n", &ns.name])?;
    ensure!(
        shown.contains("migration: Backfilling to generation 2")
            && shown.contains("serving:   generation 1"),
        "{shown}"
    );

    producing.await??;
    let switched = eventually("the alias to switch", Duration::from_secs(240), || async {
        let status = index_status(&ns.name)?;
        Ok((status["serving"]["generation"] == 2).then_some(status))
    })
    .await?;
    assert!(switched["migration"].is_null(), "{switched}");
    assert_eq!(switched["previous"][0]["index"], format!("{alias}-g1"));

    // Every record in the new generation, with the new model's vectors; the live workers write
    // it now.
    produce(&topic, 600..620, Duration::ZERO).await?;
    let expected: std::collections::BTreeSet<String> =
        (0..620).map(|n| format!("post-{n}")).collect();
    eventually(
        "every record through the alias",
        Duration::from_secs(120),
        || async {
            let (ids, dims) = ids_and_dimensions(&alias).await?;
            Ok((ids == expected && dims == 1024).then_some(()))
        },
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    reader.await??;
    let (done, failed) = (
        searches.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst),
    );
    ensure!(done > 100, "the reader ran only {done} searches");
    assert_eq!(
        failed, 0,
        "{failed} of {done} searches through the alias failed"
    );
    ensure!(
        fake.stats().calls > 620,
        "the fake Bedrock saw too few calls"
    );

    // The backfill workers are gone, and the old generation once its retention is over.
    eventually(
        "the backfill workers to go",
        Duration::from_secs(60),
        || async {
            let left = kubectl(&["get", "deployments", "-n", &ns.name, "-o", "name"])?;
            Ok((!left.contains("posts-backfill-worker")).then_some(()))
        },
    )
    .await?;
    eventually(
        "the old generation to be deleted",
        Duration::from_secs(120),
        || async { Ok((!index_exists(&format!("{alias}-g1")).await?).then_some(())) },
    )
    .await?;
    let events = kubectl(&["get", "events", "-n", &ns.name, "-o", "json"])?;
    for reason in [
        "MigrationStarted",
        "MigrationCompleted",
        "GenerationDeleted",
    ] {
        ensure!(events.contains(reason), "no {reason} Event");
    }

    let _ = helm(&["uninstall", &release, "-n", &ns.name]);
    Ok(())
}
