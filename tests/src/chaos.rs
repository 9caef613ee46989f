//! A model-based chaos run of the worker: keyed upserts, metadata-only changes and tombstones over
//! a few hot ids and many cold ones, on a multi-partition topic, while workers are started,
//! SIGKILLed and SIGTERMed and Bedrock answers with a delay. Afterwards the index must equal the
//! model (for every id the last event wins: nothing lost, no resurrected delete, no stale
//! version, no leftover chunk), the group's commits must reach the end of every partition, and
//! every SIGTERMed worker must have exited 0.
//!
//! Seeded: the same seed produces the same events and the same schedule of worker starts and
//! stops (timing on the machine still varies). The test runs a bounded size in CI;
//! `vectorpipe-bench chaos --seed S --events N` runs it long.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use opensearch::SearchParts;
use opensearch::indices::IndicesRefreshParts;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::bedrock::FakeBedrock;
use crate::worker::Worker;
use crate::{kafka, opensearch as os, unique_name};

/// The size and shape of one run.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// The seed of every random choice.
    pub seed: u64,
    /// Events produced.
    pub events: usize,
    /// Ids that get most of the events.
    pub hot_ids: usize,
    /// Ids that get the rest.
    pub cold_ids: usize,
    /// Source partitions.
    pub partitions: i32,
    /// The worker binary.
    pub worker: PathBuf,
}

/// What a run did.
#[derive(Debug)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Events produced: upserts, metadata-only changes, tombstones.
    pub upserts: usize,
    /// Metadata-only changes.
    pub metadata_only: usize,
    /// Tombstones.
    pub tombstones: usize,
    /// Workers started, SIGKILLed, SIGTERMed.
    pub started: usize,
    /// Workers killed.
    pub killed: usize,
    /// Workers stopped (each exited 0).
    pub stopped: usize,
    /// Ids alive at the end, and their documents.
    pub live_ids: usize,
    /// Documents in the index at the end.
    pub documents: usize,
}

/// The model's view of one id: the text version and likes of its last event, or deleted.
#[derive(Clone, Debug, PartialEq)]
enum State {
    Live {
        version: String,
        sentences: usize,
        likes: i64,
    },
    Deleted,
}

fn sentences(version: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("Version {version} sentence {i} is about vectors."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One worker process and how it ends.
struct Running {
    worker: Worker,
    name: String,
}

/// Runs the chaos scenario against the harness Kafka and OpenSearch with a Bedrock fake in this
/// process; fails with the seed in the message when the index differs from the model.
pub async fn run(config: &ChaosConfig) -> Result<ChaosReport> {
    let seed = config.seed;
    run_inner(config)
        .await
        .with_context(|| format!("chaos run with seed {seed} failed (rerun it with this seed)"))
}

async fn run_inner(config: &ChaosConfig) -> Result<ChaosReport> {
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let topic = unique_name("chaos");
    let group = format!("{topic}-group");
    let index = topic.to_lowercase();
    kafka::create_topic(&topic, config.partitions).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(Duration::from_millis(20));
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        serde_yaml::to_string(&json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": "chaos", "namespace": "tests"},
            "spec": {
                "source": {"kafka": {
                    "bootstrapServers": [kafka::bootstrap()?],
                    "topics": [topic],
                    "groupId": group,
                    "consumerProperties": {"session.timeout.ms": "6000"},
                }},
                "transform": {
                    "idPointer": "/id",
                    "textPointers": ["/text"],
                    "timestampPointer": "/created",
                    "metadata": {"likes": "/likes"},
                },
                "chunking": {"strategy": "recursive", "maxChars": 200, "overlapChars": 20},
                "embedding": {"bedrock": {
                    "modelId": "amazon.titan-embed-text-v2:0",
                    "dimensions": 256,
                    "region": "eu-west-1",
                    "endpointUrl": format!("http://{address}"),
                    "maxInFlight": 16,
                    "retry": {"maxAttempts": 6, "baseDelay": "20ms", "maxDelay": "500ms"},
                }},
                "sink": {"opensearch": {
                    "endpoints": [os::url()?],
                    "index": index,
                    "method": {"engine": "lucene"},
                    "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                    "bulk": {"maxDocs": 100, "flushInterval": "100ms"},
                }},
            }
        }))?,
    )?;

    let ids: Vec<String> = (0..config.hot_ids)
        .map(|i| format!("hot-{i}"))
        .chain((0..config.cold_ids).map(|i| format!("cold-{i}")))
        .collect();
    let mut model: BTreeMap<String, State> = BTreeMap::new();
    let mut report = ChaosReport {
        seed: config.seed,
        upserts: 0,
        metadata_only: 0,
        tombstones: 0,
        started: 0,
        killed: 0,
        stopped: 0,
        live_ids: 0,
        documents: 0,
    };
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "5").create()?;
    let mut workers: Vec<Running> = Vec::new();
    let mut next_worker = 0;
    let mut start = |workers: &mut Vec<Running>, report: &mut ChaosReport| -> Result<()> {
        let name = format!("worker-{next_worker}");
        next_worker += 1;
        let worker =
            Worker::start_binary(&config.worker, &pipeline, &dir.join(format!("{name}.log")))?;
        workers.push(Running { worker, name });
        report.started += 1;
        Ok(())
    };
    start(&mut workers, &mut report)?;

    let bursts = 6;
    let per_burst = config.events.div_ceil(bursts);
    let mut produced = 0;
    for burst in 0..bursts {
        for _ in 0..per_burst.min(config.events - produced) {
            let hot = config.hot_ids > 0 && rng.f64() < 0.5;
            let id = if hot {
                &ids[rng.usize(..config.hot_ids)]
            } else {
                &ids[config.hot_ids + rng.usize(..config.cold_ids.max(1))]
            };
            produced += 1;
            let roll = rng.f64();
            let previous = model.get(id).cloned();
            let (payload, state) = match (&previous, roll) {
                (_, r) if r < 0.15 => {
                    report.tombstones += 1;
                    (None, State::Deleted)
                }
                (
                    Some(State::Live {
                        version,
                        sentences: n,
                        ..
                    }),
                    r,
                ) if r < 0.40 => {
                    // Only the metadata changes.
                    report.metadata_only += 1;
                    let likes = rng.i64(0..1_000_000);
                    (
                        Some((version.clone(), *n, likes)),
                        State::Live {
                            version: version.clone(),
                            sentences: *n,
                            likes,
                        },
                    )
                }
                _ => {
                    report.upserts += 1;
                    let version = format!("{id}-{produced}");
                    // 1 to 14 sentences: one document up to several chunks.
                    let n = 1 + rng.usize(..14);
                    let likes = rng.i64(0..1_000_000);
                    (
                        Some((version.clone(), n, likes)),
                        State::Live {
                            version,
                            sentences: n,
                            likes,
                        },
                    )
                }
            };
            let value = payload.map(|(version, n, likes)| {
                json!({
                    "id": id, "text": sentences(&version, n), "likes": likes,
                    "created": "2026-11-30T10:00:00Z",
                })
                .to_string()
            });
            let mut record: FutureRecord<'_, str, str> = FutureRecord::to(&topic).key(id);
            if let Some(value) = &value {
                record = record.payload(value);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)?;
            model.insert(id.clone(), state);
        }
        // Let the workers get into the burst, then change the group.
        tokio::time::sleep(Duration::from_millis(300 + rng.u64(..1200))).await;
        match burst % 3 {
            0 => start(&mut workers, &mut report)?,
            1 if workers.len() > 1 => {
                let victim = workers.remove(rng.usize(..workers.len()));
                victim.worker.kill()?;
                report.killed += 1;
                start(&mut workers, &mut report)?;
            }
            _ if workers.len() > 1 => {
                let leaving = workers.remove(rng.usize(..workers.len()));
                let log = dir.join(format!("{}.log", leaving.name));
                let status = leaving.worker.stop()?;
                ensure!(
                    status.success(),
                    "{} exited {status} after SIGTERM; log:\n{}",
                    leaving.name,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                report.stopped += 1;
            }
            _ => start(&mut workers, &mut report)?,
        }
    }

    kafka::wait_for_commits_at_end(&topic, &group, config.partitions, Duration::from_secs(180))
        .await?;
    let stored = stored_documents(&index).await?;
    compare(&model, &stored)?;
    report.live_ids = model
        .values()
        .filter(|s| matches!(s, State::Live { .. }))
        .count();
    report.documents = stored.values().map(Vec::len).sum();
    for running in workers {
        let log = dir.join(format!("{}.log", running.name));
        let status = running.worker.stop()?;
        ensure!(
            status.success(),
            "{} exited {status} after SIGTERM; log:\n{}",
            running.name,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        report.stopped += 1;
    }
    Ok(report)
}

/// One stored document: (id, chunk, chunks, text, likes).
type StoredDoc = (String, u64, u64, String, i64);

async fn stored_documents(index: &str) -> Result<BTreeMap<String, Vec<StoredDoc>>> {
    let client = os::client()?;
    client
        .indices()
        .refresh(IndicesRefreshParts::Index(&[index]))
        .send()
        .await?;
    let response: Value = client
        .search(SearchParts::Index(&[index]))
        .body(json!({
            "size": 10000,
            "_source": ["parentId", "chunk", "chunks", "text", "likes"],
            "query": {"match_all": {}}
        }))
        .send()
        .await?
        .json()
        .await?;
    let mut out: BTreeMap<String, Vec<StoredDoc>> = BTreeMap::new();
    for hit in response["hits"]["hits"].as_array().into_iter().flatten() {
        let source = &hit["_source"];
        let parent = source["parentId"]
            .as_str()
            .context("a document without parentId")?;
        out.entry(parent.to_owned()).or_default().push((
            hit["_id"].as_str().unwrap_or_default().to_owned(),
            source["chunk"].as_u64().unwrap_or(u64::MAX),
            source["chunks"].as_u64().unwrap_or(0),
            source["text"].as_str().unwrap_or_default().to_owned(),
            source["likes"].as_i64().unwrap_or(-1),
        ));
    }
    for docs in out.values_mut() {
        docs.sort();
    }
    Ok(out)
}

/// The index must hold, for every live id, exactly its last version's chunks with its last
/// likes, and nothing for deleted ids.
fn compare(
    model: &BTreeMap<String, State>,
    stored: &BTreeMap<String, Vec<StoredDoc>>,
) -> Result<()> {
    let mut problems = Vec::new();
    for (id, state) in model {
        let docs = stored.get(id).map(Vec::as_slice).unwrap_or_default();
        match state {
            State::Deleted => {
                if !docs.is_empty() {
                    problems.push(format!(
                        "{id} was deleted last but has {} documents: {:?}",
                        docs.len(),
                        docs.iter().map(|d| &d.0).collect::<Vec<_>>()
                    ));
                }
            }
            State::Live { version, likes, .. } => {
                if docs.is_empty() {
                    problems.push(format!("{id} (version {version}) is missing"));
                    continue;
                }
                let chunks = docs[0].2 as usize;
                let want_ids: BTreeSet<String> = if chunks == 1 {
                    BTreeSet::from([id.clone()])
                } else {
                    (0..chunks).map(|n| format!("{id}#{n}")).collect()
                };
                let have_ids: BTreeSet<String> = docs.iter().map(|d| d.0.clone()).collect();
                if have_ids != want_ids {
                    problems.push(format!("{id}: documents {have_ids:?}, expected {want_ids:?} (stale or missing chunks)"));
                }
                let marker = format!("Version {version} ");
                for (doc_id, _, n, text, stored_likes) in docs {
                    if !text.contains(&marker) {
                        problems.push(format!(
                            "{doc_id}: holds {:?}, not version {version}",
                            text.chars().take(60).collect::<String>()
                        ));
                    }
                    if stored_likes != likes {
                        problems.push(format!("{doc_id}: likes {stored_likes}, expected {likes}"));
                    }
                    if *n as usize != chunks {
                        problems.push(format!(
                            "{doc_id}: chunk count {n}, its record's first document says {chunks}"
                        ));
                    }
                }
            }
        }
    }
    for id in stored.keys() {
        if !model.contains_key(id) {
            problems.push(format!("{id} was never produced but is stored"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("the index differs from the model:\n{}", problems.join("\n"))
    }
}
