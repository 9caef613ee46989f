//! The worker end to end: real Kafka and OpenSearch from the harness, the Bedrock fake in this
//! process, and `vectorpipe-worker run` as a separate process.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use opensearch::indices::IndicesRefreshParts;
use opensearch::{CountParts, SearchParts};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::{self, FakeBedrock, Fault};
use vectorpipe_tests::worker::Worker;
use vectorpipe_tests::{eventually, kafka, opensearch as os, unique_name};

const PARTITIONS: i32 = 3;
const DIMENSIONS: usize = 256;

/// One test's topics, index, group and files.
struct Setup {
    topic: String,
    dead_letter: String,
    index: String,
    group: String,
    dir: PathBuf,
    pipeline: PathBuf,
    fake: FakeBedrock,
}

impl Setup {
    async fn new(name: &str) -> Result<Self> {
        let topic = unique_name(name);
        let dead_letter = format!("{topic}-dlq");
        kafka::create_topic(&topic, PARTITIONS).await?;
        kafka::create_topic(&dead_letter, 1).await?;
        let (fake, address) = FakeBedrock::start().await?;
        let dir = std::env::temp_dir().join(&topic);
        std::fs::create_dir_all(&dir)?;
        let setup = Self {
            index: topic.to_lowercase(),
            group: format!("{topic}-group"),
            pipeline: dir.join("pipeline.yaml"),
            topic,
            dead_letter,
            dir,
            fake,
        };
        let pipeline = json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": name, "namespace": "tests"},
            "spec": {
                "source": {"kafka": {
                    "bootstrapServers": [kafka::bootstrap()?],
                    "topics": [setup.topic],
                    "groupId": setup.group,
                }},
                "transform": {
                    "idPointer": "/id",
                    "textPointers": ["/text"],
                    "metadata": {"likes": "/likes"},
                },
                "chunking": {"strategy": "recursive", "maxChars": 200, "overlapChars": 20},
                "embedding": {"bedrock": {
                    "modelId": "amazon.titan-embed-text-v2:0",
                    "dimensions": DIMENSIONS,
                    "region": "eu-west-1",
                    "endpointUrl": format!("http://{address}"),
                    "maxInFlight": 16,
                    "retry": {"maxAttempts": 6, "baseDelay": "20ms", "maxDelay": "500ms"},
                }},
                "sink": {"opensearch": {
                    "endpoints": [os::url()?],
                    "index": setup.index,
                    "method": {"engine": "lucene"},
                    "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                    "bulk": {"maxDocs": 100, "flushInterval": "200ms"},
                }},
                "deadLetter": {"topic": setup.dead_letter},
            }
        });
        std::fs::write(&setup.pipeline, serde_yaml::to_string(&pipeline)?)?;
        Ok(setup)
    }

    /// Changes the pipeline file before a worker starts.
    fn edit_pipeline(&self, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let mut pipeline: Value = serde_yaml::from_str(&std::fs::read_to_string(&self.pipeline)?)?;
        edit(&mut pipeline);
        std::fs::write(&self.pipeline, serde_yaml::to_string(&pipeline)?)?;
        Ok(())
    }

    fn start_worker(&self, name: &str) -> Result<Worker> {
        Worker::start(&self.pipeline, &self.dir.join(format!("{name}.log")))
    }

    async fn produce(&self, records: &[(Option<&str>, Option<Vec<u8>>)]) -> Result<()> {
        let producer: FutureProducer = kafka::config()?.set("linger.ms", "5").create()?;
        for (key, payload) in records {
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(payload) = payload {
                record = record.payload(payload.as_slice());
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    async fn count(&self, query: Value) -> Result<u64> {
        let client = os::client()?;
        client
            .indices()
            .refresh(IndicesRefreshParts::Index(&[&self.index]))
            .send()
            .await?;
        let response: Value = client
            .count(CountParts::Index(&[&self.index]))
            .body(json!({ "query": query }))
            .send()
            .await?
            .json()
            .await?;
        Ok(response["count"].as_u64().unwrap_or(0))
    }

    async fn wait_for_count(&self, query: Value, want: u64, limit: Duration) -> Result<()> {
        eventually(&format!("{want} documents matching {query}"), limit, || {
            let query = query.clone();
            async move { Ok((self.count(query).await? == want).then_some(())) }
        })
        .await
    }

    async fn ids(&self) -> Result<BTreeSet<String>> {
        let response: Value = os::client()?
            .search(SearchParts::Index(&[&self.index]))
            .body(json!({"size": 10000, "_source": false, "query": {"match_all": {}}}))
            .send()
            .await?
            .json()
            .await?;
        Ok(response["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["_id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until the group's committed offsets reach the end of every partition.
    async fn wait_for_commits_at_end(&self, limit: Duration) -> Result<()> {
        kafka::wait_for_commits_at_end(&self.topic, &self.group, PARTITIONS, limit).await
    }

    /// Waits until exactly the records 0..n are indexed (by id), then until the group's commits
    /// reach the end of every partition.
    async fn assert_exactly_indexed(&self, n: usize, limit: Duration) -> Result<()> {
        self.wait_for_count(json!({"match_all": {}}), n as u64, limit)
            .await?;
        assert_eq!(self.ids().await?, expected_ids(0..n));
        self.wait_for_commits_at_end(Duration::from_secs(30)).await
    }

    /// Reads every record of the dead-letter topic: (reason header, source offset header, payload).
    async fn dead_letters(&self, want: usize) -> Result<Vec<(String, String, Vec<u8>)>> {
        let consumer: StreamConsumer = kafka::config()?
            .set("group.id", unique_name("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&self.dead_letter])?;
        let mut out = Vec::new();
        while out.len() < want {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .context("dead-letter records missing")??;
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == name))
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push((
                header("vectorpipe.reason"),
                header("vectorpipe.source.offset"),
                message.payload().unwrap_or_default().to_vec(),
            ));
        }
        Ok(out)
    }
}

/// A group that evicts a member which does not poll for 7 s, and one embedding call at a time
/// that may take a minute: the settings of the stall tests.
fn evicted_without_polling_for_7s(pipeline: &mut Value) {
    pipeline["spec"]["source"]["kafka"]["consumerProperties"] = json!({
        "session.timeout.ms": "6000",
        "max.poll.interval.ms": "7000",
    });
    pipeline["spec"]["embedding"]["bedrock"]["maxInFlight"] = json!(1);
    pipeline["spec"]["embedding"]["bedrock"]["timeout"] = json!("60s");
}

fn post(i: usize) -> (String, Vec<u8>) {
    let topics = [
        "cats and kittens",
        "interest rates and inflation",
        "football scores",
    ];
    let id = format!("post-{i}");
    let text = format!("post {i} about {}", topics[i % topics.len()]);
    (
        id.clone(),
        json!({"id": id, "text": text, "likes": i})
            .to_string()
            .into_bytes(),
    )
}

fn posts(range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range.map(post).collect()
}

fn as_records(posts: &[(String, Vec<u8>)]) -> Vec<(Option<&str>, Option<Vec<u8>>)> {
    posts
        .iter()
        .map(|(id, p)| (Some(id.as_str()), Some(p.clone())))
        .collect()
}

fn expected_ids(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|i| format!("post-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_becomes_exactly_one_document_and_offsets_reach_the_end() -> Result<()> {
    let setup = Setup::new("e2e-exact").await?;
    let n = 200;
    setup.produce(&as_records(&posts(0..n))).await?;
    let mut worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), n as u64, Duration::from_secs(90))
        .await?;
    worker.assert_running()?;
    assert_eq!(setup.ids().await?, expected_ids(0..n));

    // The stored vector is the fake model's embedding of the text, and the fields came along.
    let response: Value = os::client()?
        .search(SearchParts::Index(&[&setup.index]))
        .body(json!({"query": {"ids": {"values": ["post-7"]}}}))
        .send()
        .await?
        .json()
        .await?;
    let source = &response["hits"]["hits"][0]["_source"];
    let text = source["text"].as_str().context("text field")?;
    assert_eq!(text, "post 7 about interest rates and inflation");
    assert_eq!(source["likes"], 7);
    assert_eq!(source["parentId"], "post-7");
    let stored: Vec<f32> = serde_json::from_value(source["embedding"].clone())?;
    let want = bedrock::embed(text, DIMENSIONS, true);
    assert_eq!(stored.len(), DIMENSIONS);
    assert!(stored.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));

    setup
        .wait_for_commits_at_end(Duration::from_secs(30))
        .await?;
    let metrics = worker.metrics_text().await?;
    assert!(
        metrics.contains("vectorpipe_worker_documents_indexed_total"),
        "{metrics}"
    );
    let status = worker.stop()?;
    assert!(
        status.success(),
        "the worker exits 0 after SIGTERM, got {status}"
    );
    // One call per record, and the start-up check.
    assert_eq!(
        setup.fake.stats().models["amazon.titan-embed-text-v2:0"].succeeded,
        n as u64 + 1
    );
    Ok(())
}

/// A backlog goes to OpenSearch in full `_bulk` requests: 1,000 records at `maxDocs: 100`, with
/// a flush interval longer than the backlog lasts, take about ten requests. Every finished
/// record used to flush what had arrived since the last request: about ten documents each.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_written_in_full_bulk_requests() -> Result<()> {
    let setup = Setup::new("e2e-full-bulks").await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["bulk"] =
            json!({"maxDocs": 100, "flushInterval": "5s"});
    })?;
    let n = 1000;
    setup.produce(&as_records(&posts(0..n))).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(90))
        .await?;
    let page = worker.metrics_text().await?;
    let requests =
        vectorpipe_tests::worker::metric_sum(&page, "vectorpipe_worker_bulk_latency_seconds_count");
    let documents =
        vectorpipe_tests::worker::metric_sum(&page, "vectorpipe_worker_documents_indexed_total");
    ensure!(
        documents == n as f64 && requests <= 20.0,
        "{documents} documents in {requests} _bulk requests; a backlog should fill them to maxDocs (100)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn freshness_is_measured_from_the_record_timestamp_to_the_acknowledgement() -> Result<()> {
    let setup = Setup::new("e2e-fresh").await?;
    // 20 records stamped 40 s ago by their producer, and 20 stamped now.
    let stale_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 40_000;
    let producer: FutureProducer = kafka::config()?.create()?;
    for (n, (key, payload)) in posts(0..40).iter().enumerate() {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&setup.topic)
            .key(key.as_str())
            .payload(payload.as_slice());
        if n < 20 {
            record = record.timestamp(stale_at);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(40, Duration::from_secs(90))
        .await?;
    let page = worker.metrics_text().await?;
    let name = "vectorpipe_worker_freshness_seconds";
    assert_eq!(
        vectorpipe_tests::worker::metric_sum(&page, &format!("{name}_count")),
        40.0,
        "one observation per indexed record: {page}"
    );
    // Buckets double from 50 ms: 25.6 s holds the fresh records and none of the stale ones.
    assert_eq!(
        labelled_sum(&page, &format!("{name}_bucket"), "le=\"25.6\""),
        20.0,
        "{page}"
    );
    let sum = vectorpipe_tests::worker::metric_sum(&page, &format!("{name}_sum"));
    ensure!(
        sum >= 20.0 * 40.0,
        "the stale records count from their own timestamp: {sum}"
    );
    Ok(())
}

/// `requestsPerSecond` holds for the whole pipeline: two workers each take half of it, so
/// together they stay under an account quota that either of them alone at the full rate, or
/// both without a budget, would exceed.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_share_the_pipelines_request_budget_and_stay_under_the_quota() -> Result<()> {
    let setup = Setup::new("e2e-budget").await?;
    setup.edit_pipeline(|p| {
        p["spec"]["embedding"]["bedrock"]["requestsPerSecond"] = json!(16);
        p["spec"]["embedding"]["bedrock"]["maxInFlight"] = json!(64);
    })?;
    // The account's quota: 20 calls a second, throttled above.
    setup.fake.set_quota(Some(20.0));
    let n = 200;
    setup.produce(&as_records(&posts(0..n))).await?;
    let first = setup.start_worker("first")?;
    let second = setup.start_worker("second")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(120))
        .await?;
    let stats = setup.fake.stats();
    assert_eq!(
        stats
            .errors
            .get("ThrottlingException")
            .copied()
            .unwrap_or(0),
        0,
        "the workers together went over the quota: {:?}",
        stats.errors
    );
    for worker in [&first, &second] {
        let page = worker.metrics_text().await?;
        assert_eq!(
            vectorpipe_tests::worker::metric_sum(&page, "vectorpipe_worker_budget_group_members"),
            2.0,
            "each worker counted the other: {page}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_restarts_without_losing_or_duplicating_records() -> Result<()> {
    let setup = Setup::new("e2e-crash").await?;
    let n = 600;
    setup.fake.set_latency(Duration::from_millis(10));
    setup.produce(&as_records(&posts(0..n))).await?;
    let first = setup.start_worker("first")?;
    eventually(
        "some documents before the crash",
        Duration::from_secs(60),
        || async { Ok((setup.count(json!({"match_all": {}})).await? >= 50).then_some(())) },
    )
    .await?;
    first.kill()?;
    let before = setup.count(json!({"match_all": {}})).await?;
    assert!(
        before < n as u64,
        "the crash must come mid-stream ({before} of {n} indexed)"
    );

    let second = setup.start_worker("second")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(120))
        .await?;
    assert!(second.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_records_go_to_the_dead_letter_topic_and_good_ones_around_them_are_indexed()
-> Result<()> {
    let setup = Setup::new("e2e-bad").await?;
    let good = posts(0..3);
    let huge = json!({"id": "huge", "text": "word ".repeat(60_000)})
        .to_string()
        .into_bytes();
    let records: Vec<(Option<&str>, Option<Vec<u8>>)> = vec![
        (Some(good[0].0.as_str()), Some(good[0].1.clone())),
        (Some("bad-json"), Some(b"{not json".to_vec())),
        (Some("bad-utf8"), Some(b"\xff\xfe\xfd".to_vec())),
        (
            Some("no-text"),
            Some(br#"{"id": "no-text", "body": "x"}"#.to_vec()),
        ),
        (Some(good[1].0.as_str()), Some(good[1].1.clone())),
        (Some("array"), Some(b"[1, 2, 3]".to_vec())),
        (
            Some("empty"),
            Some(br#"{"id": "empty", "text": "   "}"#.to_vec()),
        ),
        (Some("huge"), Some(huge)),
        (Some(good[2].0.as_str()), Some(good[2].1.clone())),
    ];
    // One partition key per record spreads them; order within a partition is what matters.
    setup.produce(&records).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), 3, Duration::from_secs(60))
        .await?;
    assert_eq!(setup.ids().await?, expected_ids(0..3));

    let dead = setup.dead_letters(5).await?;
    let mut reasons: Vec<&str> = dead.iter().map(|(r, _, _)| r.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        ["missing-field", "parse", "parse", "parse", "too-large"]
    );
    assert!(
        dead.iter()
            .all(|(_, offset, _)| offset.parse::<i64>().is_ok())
    );
    assert!(
        dead.iter()
            .any(|(_, _, payload)| payload.as_slice() == b"{not json"),
        "the original bytes are kept"
    );
    setup
        .wait_for_commits_at_end(Duration::from_secs(30))
        .await?;
    let metrics = worker.metrics_text().await?;
    // Every outcome's series exists from the start (at 0): the count is what tells.
    assert_eq!(
        labelled_sum(
            &metrics,
            "vectorpipe_worker_records_total",
            r#"outcome="skipped-empty-text""#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        labelled_sum(
            &metrics,
            "vectorpipe_worker_records_total",
            r#"outcome="dead-lettered-parse""#
        ),
        3.0,
        "{metrics}"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tombstone_deletes_every_chunk_of_its_record() -> Result<()> {
    let setup = Setup::new("e2e-tombstone").await?;
    let long = (0..40)
        .map(|i| format!("Sentence number {i} talks about vectors."))
        .collect::<Vec<_>>()
        .join(" ");
    let record = json!({"id": "long", "text": long}).to_string().into_bytes();
    setup
        .produce(&[
            (Some("long"), Some(record)),
            (Some("post-0"), Some(post(0).1)),
        ])
        .await?;
    let worker = setup.start_worker("worker")?;
    eventually(
        "the long record's chunks",
        Duration::from_secs(60),
        || async {
            Ok((setup.count(json!({"term": {"parentId": "long"}})).await? >= 5).then_some(()))
        },
    )
    .await?;
    setup.produce(&[(Some("long"), None)]).await?;
    setup
        .wait_for_count(
            json!({"term": {"parentId": "long"}}),
            0,
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(setup.ids().await?, expected_ids(0..1), "other records stay");
    assert!(worker.stop()?.success());
    Ok(())
}

/// `transform.idFromKey`: records keyed by id with no id field in the value. A newer record of a
/// key replaces the documents of the older one, and the key's tombstone deletes them. With
/// positional ids (no idPointer, no idFromKey) a tombstone can find nothing: it reaches the
/// dead-letter topic with a reason that says what to set, instead of being counted as a delete.
/// (Before idFromKey such a topic got one document per record and tombstones were counted as
/// `deleted-nothing-found`.)
#[tokio::test(flavor = "multi_thread")]
async fn with_id_from_key_updates_replace_and_tombstones_delete_by_key() -> Result<()> {
    let setup = Setup::new("e2e-idkey").await?;
    setup.edit_pipeline(|p| {
        p["spec"]["transform"] = json!({"idFromKey": true, "textPointers": ["/text"]});
    })?;
    let text = |t: &str| Some(json!({ "text": t }).to_string().into_bytes());
    setup
        .produce(&[
            (Some("a"), text("first version of a")),
            (Some("b"), text("only version of b")),
            (Some("c"), text("first version of c")),
            (Some("a"), text("second version of a")),
            (Some("c"), None),
        ])
        .await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    setup
        .wait_for_count(json!({"match_all": {}}), 2, Duration::from_secs(30))
        .await?;
    assert_eq!(
        setup.ids().await?,
        BTreeSet::from(["a".to_owned(), "b".to_owned()]),
        "one document per key, c deleted"
    );
    assert_eq!(
        setup
            .count(json!({"match_phrase": {"text": "second version of a"}}))
            .await?,
        1,
        "the newer version of a won"
    );
    assert!(worker.stop()?.success());

    // Positional ids: the tombstone is a dead letter that names the settings.
    let positional = Setup::new("e2e-idpos").await?;
    positional.edit_pipeline(|p| {
        p["spec"]["transform"] = json!({"textPointers": ["/text"]});
    })?;
    positional
        .produce(&[(Some("a"), text("a record")), (Some("a"), None)])
        .await?;
    let worker = positional.start_worker("worker")?;
    let dead = positional.dead_letters(1).await?;
    assert_eq!(dead[0].0, "unresolvable-tombstone", "{dead:?}");
    positional
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    // The record stays indexed (count refreshes the index first).
    positional
        .wait_for_count(json!({"match_all": {}}), 1, Duration::from_secs(30))
        .await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// Ids from `idPointer` and Kafka keys that differ from them: a tombstone deletes what the
/// records of its key produced (the documents keep their source key), also a multi-chunk record
/// right in front of its tombstone, while a key equal to the id keeps working. (Before, the
/// tombstone looked for documents whose id is the key, found none, and the documents stayed.)
#[tokio::test(flavor = "multi_thread")]
async fn with_id_pointer_a_tombstone_deletes_what_its_key_produced() -> Result<()> {
    let setup = Setup::new("e2e-idptr-key").await?;
    let record =
        |id: &str, text: &str| Some(json!({"id": id, "text": text}).to_string().into_bytes());
    setup
        .produce(&[
            (Some("k-a"), record("doc-a", "the record of key k-a")),
            (Some("k-b"), record("doc-b", "the record of key k-b")),
            (Some("doc-c"), record("doc-c", "a record keyed by its id")),
        ])
        .await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), 3, Duration::from_secs(90))
        .await?;
    setup
        .produce(&[
            (Some("k-a"), None),
            (Some("doc-c"), None),
            (Some("k-d"), record("doc-d", &sentences("d", 12))),
            (Some("k-d"), None),
        ])
        .await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    // Counting refreshes the index first.
    setup
        .wait_for_count(json!({"match_all": {}}), 1, Duration::from_secs(30))
        .await?;
    assert_eq!(
        setup.ids().await?,
        BTreeSet::from(["doc-b".to_owned()]),
        "the tombstones of k-a, doc-c and k-d deleted their documents"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

/// A record text of `sentences` sentences (about 40 characters each; chunks hold 200).
fn sentences(version: &str, sentences: usize) -> String {
    (0..sentences)
        .map(|i| format!("Version {version} sentence {i} is about vectors."))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_replace_all_chunks_of_a_record_and_a_tombstone_right_behind_wins() -> Result<()> {
    let setup = Setup::new("e2e-updates").await?;
    let version = |v: &str, n: usize| {
        Some(
            json!({"id": "doc", "text": sentences(v, n)})
                .to_string()
                .into_bytes(),
        )
    };
    let stored = || async {
        let response: Value = os::client()?
            .search(SearchParts::Index(&[&setup.index]))
            .body(json!({"size": 100, "_source": ["text"], "query": {"term": {"parentId": "doc"}}}))
            .send()
            .await?
            .json()
            .await?;
        let mut docs: Vec<(String, String)> = response["hits"]["hits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h["_id"].as_str().unwrap_or_default().to_owned(),
                    h["_source"]["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        docs.sort();
        anyhow::Ok(docs)
    };
    let worker = setup.start_worker("worker")?;

    // Ten chunks, then the same record as one document, then three chunks: each version replaces
    // the whole previous one, even when it is written right behind it.
    setup
        .produce(&[
            (Some("doc"), version("a", 40)),
            (Some("doc"), version("b", 2)),
        ])
        .await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    setup.count(json!({"match_all": {}})).await?;
    let docs = stored().await?;
    assert_eq!(
        docs.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["doc"],
        "only the single-document version is left: {docs:?}"
    );
    assert!(docs[0].1.starts_with("Version b"), "{docs:?}");

    setup.produce(&[(Some("doc"), version("c", 12))]).await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    setup.count(json!({"match_all": {}})).await?;
    let docs = stored().await?;
    let ids: Vec<&str> = docs.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["doc#0", "doc#1", "doc#2"], "{docs:?}");
    assert!(
        docs.iter().all(|(_, text)| text.contains("Version c")),
        "{docs:?}"
    );

    // A new version and its tombstone back to back: the tombstone is applied after the version
    // was written, so nothing of the record is left.
    setup
        .produce(&[(Some("doc"), version("d", 30)), (Some("doc"), None)])
        .await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    setup.count(json!({"match_all": {}})).await?;
    assert_eq!(stored().await?, [], "the tombstone deleted every chunk");

    // Back-to-back versions of one id were ordered: the older one either waited for the newer
    // one's write or was skipped because the newer one came first.
    let metrics = worker.metrics_text().await?;
    let ordered =
        vectorpipe_tests::worker::metric_sum(&metrics, "vectorpipe_worker_same_id_waits_total")
            + vectorpipe_tests::worker::metric_sum(
                &metrics,
                "vectorpipe_worker_superseded_documents_total",
            );
    assert!(
        ordered > 0.0,
        "versions of one record were not ordered: {metrics}"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

/// The sum of a metric's samples that carry `label` (e.g. `outcome="indexed"`).
fn labelled_sum(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Titan calls the fake answered with a result.
fn titan_calls(setup: &Setup) -> u64 {
    setup
        .fake
        .stats()
        .models
        .get("amazon.titan-embed-text-v2:0")
        .map_or(0, |m| m.succeeded)
}

/// The stored `_source` of one document.
async fn stored_source(setup: &Setup, id: &str) -> Result<Value> {
    setup.count(json!({"match_all": {}})).await?;
    let response: Value = os::client()?
        .search(SearchParts::Index(&[&setup.index]))
        .body(json!({"query": {"ids": {"values": [id]}}}))
        .send()
        .await?
        .json()
        .await?;
    response["hits"]["hits"][0]["_source"]
        .as_object()
        .map(|s| Value::Object(s.clone()))
        .with_context(|| format!("document {id} is not stored: {response}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_of_metadata_only_is_written_not_dropped_as_a_duplicate() -> Result<()> {
    let setup = Setup::new("e2e-dedup-meta").await?;
    // The record's own creation time is its @timestamp (else each send's Kafka timestamp would
    // make every re-send a different document).
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["transform"]["timestampPointer"] = json!("/created");
    })?;
    let worker = setup.start_worker("worker")?;
    let version = |likes: i64| {
        Some(
            json!({"id": "m", "text": "the same text every time", "likes": likes, "created": "2026-11-30T10:00:00Z"})
                .to_string()
                .into_bytes(),
        )
    };
    setup.produce(&[(Some("m"), version(1))]).await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    // Deduplication is on (the default): the text is unchanged but the metadata is not.
    setup.produce(&[(Some("m"), version(2))]).await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    assert_eq!(stored_source(&setup, "m").await?["likes"], 2);
    // The very same record again is a duplicate: skipped, not embedded.
    let calls = titan_calls(&setup);
    setup.produce(&[(Some("m"), version(2))]).await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    let metrics = worker.metrics_text().await?;
    assert_eq!(
        labelled_sum(
            &metrics,
            "vectorpipe_worker_records_total",
            r#"outcome="skipped-duplicate""#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(titan_calls(&setup), calls, "a duplicate was embedded");
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_ids_never_stop_the_consumer_and_the_last_version_of_each_wins() -> Result<()> {
    let setup = Setup::new("e2e-hot").await?;
    // The group evicts a member that does not poll for 7 s; Bedrock answers after 10 s.
    setup.edit_pipeline(evicted_without_polling_for_7s)?;
    setup.fake.set_latency(Duration::from_secs(10));
    // 60 versions of three hot ids, each keyed by its id (so one id stays in one partition).
    let n = 60;
    let records: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            let id = format!("hot-{}", i % 3);
            let value = json!({"id": id, "text": format!("version {i} of {id}"), "likes": i});
            (id, value.to_string().into_bytes())
        })
        .collect();
    setup.produce(&as_records(&records)).await?;
    let worker = setup.start_worker("worker")?;
    // Longer than max.poll.interval.ms: a consumer that waits for an earlier version of its
    // id without polling is evicted now.
    tokio::time::sleep(Duration::from_secs(15)).await;
    setup.fake.set_latency(Duration::ZERO);
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    assert_eq!(setup.count(json!({"match_all": {}})).await?, 3);
    for (id, last) in [("hot-0", 57), ("hot-1", 58), ("hot-2", 59)] {
        assert_eq!(stored_source(&setup, id).await?["likes"], last, "{id}");
    }
    let log = std::fs::read_to_string(setup.dir.join("worker.log"))?;
    assert!(
        !log.contains("partitions revoked") && !log.contains("MAX_POLL_EXCEEDED"),
        "the worker kept its partitions: {log}"
    );
    let metrics = worker.metrics_text().await?;
    let saved = labelled_sum(
        &metrics,
        "vectorpipe_worker_superseded_documents_total",
        r#"outcome="before-embedding""#,
    );
    assert!(saved > 0.0, "no embedding call was saved: {metrics}");
    assert!(
        titan_calls(&setup) < n as u64,
        "every version was embedded: {}",
        titan_calls(&setup)
    );
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_drains_while_the_group_rebalances_and_exits_zero() -> Result<()> {
    use vectorpipe_tests::worker::metric_sum;
    let setup = Setup::new("e2e-drain").await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["source"]["kafka"]["consumerProperties"] =
            json!({"session.timeout.ms": "6000"});
        pipeline["spec"]["embedding"]["bedrock"]["maxInFlight"] = json!(4);
    })?;
    // Longer than the dead member's session timeout: the group rebalances while the stopping
    // worker still has embedding calls in flight.
    setup.fake.set_latency(Duration::from_secs(8));
    let n = 300;
    setup.produce(&as_records(&posts(0..n))).await?;
    let first = setup.start_worker("first")?;
    let second = setup.start_worker("second")?;
    eventually("both workers indexing", Duration::from_secs(90), || async {
        let a = metric_sum(
            &first.metrics_text().await?,
            "vectorpipe_worker_documents_indexed_total",
        );
        let b = metric_sum(
            &second.metrics_text().await?,
            "vectorpipe_worker_documents_indexed_total",
        );
        Ok((a > 0.0 && b > 0.0).then_some(()))
    })
    .await?;
    // One member dies, and the other is told to stop at once: it drains while the group
    // rebalances around it, and still commits and exits cleanly.
    second.kill()?;
    let stopping = std::time::Instant::now();
    let status = first.stop()?;
    let drained = stopping.elapsed();
    let log = std::fs::read_to_string(setup.dir.join("first.log"))?;
    assert!(status.success(), "exit {status} after {drained:?}: {log}");
    assert!(
        !log.contains("final commit failed"),
        "the final commit failed: {log}"
    );
    println!("SIGTERM to exit, with a member gone and Bedrock at 8 s: {drained:?}");
    setup.fake.set_latency(Duration::ZERO);
    let third = setup.start_worker("third")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(120))
        .await?;
    assert!(third.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_embedder_pauses_the_partitions_and_the_worker_keeps_them() -> Result<()> {
    let setup = Setup::new("e2e-pause").await?;
    // The group evicts a member that does not poll for 7 s; Bedrock answers after 10 s.
    setup.edit_pipeline(evicted_without_polling_for_7s)?;
    setup.fake.set_latency(Duration::from_secs(10));
    let n = 60;
    setup.produce(&as_records(&posts(0..n))).await?;
    let worker = setup.start_worker("worker")?;
    eventually("consumption paused", Duration::from_secs(30), || async {
        let metrics = worker.metrics_text().await?;
        Ok(metrics
            .lines()
            .any(|l| l.starts_with("vectorpipe_worker_consumer_paused{") && l.ends_with(" 1"))
            .then_some(()))
    })
    .await?;
    // Longer than max.poll.interval.ms: a consumer blocked on the embedder would be evicted now.
    tokio::time::sleep(Duration::from_secs(12)).await;
    setup.fake.set_latency(Duration::ZERO);
    setup
        .assert_exactly_indexed(n, Duration::from_secs(90))
        .await?;
    let log = std::fs::read_to_string(setup.dir.join("worker.log"))?;
    assert!(
        !log.contains("partitions revoked") && !log.contains("MAX_POLL_EXCEEDED"),
        "the worker kept its partitions while paused: {log}"
    );
    let metrics = worker.metrics_text().await?;
    let pauses = metrics
        .lines()
        .find(|l| l.starts_with("vectorpipe_worker_consumer_pauses_total"))
        .context("no pause counter in /metrics")?;
    assert!(!pauses.ends_with(" 0"), "{pauses}");
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cohere_batches_are_indexed_and_their_tokens_counted_from_the_header() -> Result<()> {
    let setup = Setup::new("e2e-cohere").await?;
    let model = "cohere.embed-english-v3";
    setup.edit_pipeline(|pipeline| {
        let bedrock = &mut pipeline["spec"]["embedding"]["bedrock"];
        bedrock["modelId"] = json!(model);
        bedrock["batchSize"] = json!(16);
        if let Some(b) = bedrock.as_object_mut() {
            b.remove("dimensions");
        }
    })?;
    let n = 50;
    setup.produce(&as_records(&posts(0..n))).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(90))
        .await?;
    let stats = setup.fake.stats();
    let answered = stats.models.get(model).context("no Cohere calls")?;
    // Every record's text, and the start-up check's.
    assert_eq!(answered.texts, n as u64 + 1);
    assert!(
        answered.succeeded < n as u64,
        "texts were sent in batches: {} calls for {n} records",
        answered.succeeded
    );
    // Cohere's response body has no token counts: they come from Bedrock's response header.
    let metrics = worker.metrics_text().await?;
    let tokens = metrics
        .lines()
        .find(|l| l.starts_with("vectorpipe_worker_input_tokens_total"))
        .context("no token counter in /metrics")?;
    assert!(answered.input_tokens > 0);
    assert!(
        tokens.ends_with(&format!(" {}", answered.input_tokens)),
        "{tokens} (the fake answered {} tokens)",
        answered.input_tokens
    );
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn opensearch_429s_lose_nothing_and_show_in_the_metrics() -> Result<()> {
    let setup = Setup::new("e2e-os429").await?;
    let (proxy, rejections) = os::rejecting_proxy(3, 40).await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["endpoints"] = json!([proxy]);
    })?;
    let n = 150;
    setup.produce(&as_records(&posts(0..n))).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(n, Duration::from_secs(90))
        .await?;
    use std::sync::atomic::Ordering;
    assert_eq!(rejections.requests.load(Ordering::SeqCst), 3);
    assert_eq!(rejections.documents.load(Ordering::SeqCst), 40);
    let metrics = worker.metrics_text().await?;
    let retried = metrics
        .lines()
        .find(|l| {
            l.starts_with("vectorpipe_worker_bulk_items_total")
                && l.contains(r#"outcome="retried""#)
        })
        .context("no retried bulk items in /metrics")?;
    assert!(retried.ends_with(" 40"), "{retried}");
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_loses_nothing_and_shows_in_the_metrics() -> Result<()> {
    let setup = Setup::new("e2e-throttle").await?;
    let n = 100;
    setup.fake.inject(Fault::ThrottlingException, 40);
    setup.fake.inject(Fault::ServiceUnavailableException, 5);
    setup.produce(&as_records(&posts(0..n))).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), n as u64, Duration::from_secs(90))
        .await?;
    assert_eq!(setup.ids().await?, expected_ids(0..n));
    let metrics = worker.metrics_text().await?;
    let throttled = metrics
        .lines()
        .find(|l| {
            l.starts_with("vectorpipe_worker_embed_calls_total")
                && l.contains(r#"outcome="throttled""#)
        })
        .context("no throttled calls in /metrics")?;
    assert!(throttled.ends_with(" 40"), "{throttled}");
    assert!(
        metrics.contains("vectorpipe_worker_embed_concurrency_limit"),
        "{metrics}"
    );
    assert_eq!(
        setup.fake.stats().errors.get("ThrottlingException"),
        Some(&40)
    );
    setup
        .wait_for_commits_at_end(Duration::from_secs(30))
        .await?;
    assert!(worker.stop()?.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_split_the_partitions_and_a_rebalance_loses_nothing() -> Result<()> {
    use vectorpipe_tests::worker::metric_sum;
    let setup = Setup::new("e2e-rebalance").await?;
    let n = 900;
    setup.fake.set_latency(Duration::from_millis(5));
    setup.produce(&as_records(&posts(0..n / 2))).await?;
    let first = setup.start_worker("first")?;
    eventually(
        "the first worker indexing",
        Duration::from_secs(60),
        || async { Ok((setup.count(json!({"match_all": {}})).await? >= 50).then_some(())) },
    )
    .await?;
    // The second worker joins mid-stream: a cooperative rebalance moves partitions to it.
    let second = setup.start_worker("second")?;
    setup.produce(&as_records(&posts(n / 2..n))).await?;
    eventually("both workers indexing", Duration::from_secs(60), || async {
        let a = metric_sum(
            &first.metrics_text().await?,
            "vectorpipe_worker_documents_indexed_total",
        );
        let b = metric_sum(
            &second.metrics_text().await?,
            "vectorpipe_worker_documents_indexed_total",
        );
        Ok((a > 0.0 && b > 0.0).then_some(()))
    })
    .await?;
    // The first leaves mid-stream too: its partitions go back to the second.
    assert!(first.stop()?.success());
    setup
        .assert_exactly_indexed(n, Duration::from_secs(120))
        .await?;
    assert!(second.stop()?.success());
    Ok(())
}

/// The worker reads through SASL/SCRAM-SHA-512 (the broker's second listener) with the
/// credentials a pod gets from its Secret, and commits what it indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_reads_through_scram() -> Result<()> {
    let setup = Setup::new("e2e-scram").await?;
    let bootstrap = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_BOOTSTRAP")?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["source"]["kafka"]["bootstrapServers"] = json!([bootstrap]);
        pipeline["spec"]["source"]["kafka"]["auth"] = json!({"scram": {
            "mechanism": "SHA-512", "secretRef": {"name": "kafka-user"}, "tls": false
        }});
    })?;
    let n = 30;
    setup.produce(&as_records(&posts(0..n))).await?;
    let user = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_USERNAME")?;
    let password = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_PASSWORD")?;
    let mut worker = Worker::start_with_env(
        &setup.pipeline,
        &setup.dir.join("worker.log"),
        &[
            ("VECTORPIPE_KAFKA_USERNAME", user.as_str()),
            ("VECTORPIPE_KAFKA_PASSWORD", password.as_str()),
        ],
    )?;
    setup
        .wait_for_count(json!({"match_all": {}}), n as u64, Duration::from_secs(90))
        .await?;
    worker.assert_running()?;
    assert_eq!(setup.ids().await?, expected_ids(0..n));
    setup
        .wait_for_commits_at_end(Duration::from_secs(30))
        .await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// With `auth.sigv4`, every OpenSearch request is signed with the workers' AWS credentials: a
/// proxy that refuses unsigned or wrongly signed requests (as Amazon OpenSearch Service does)
/// lets the whole flow through.
#[tokio::test(flavor = "multi_thread")]
async fn opensearch_requests_are_signed_with_sigv4() -> Result<()> {
    let setup = Setup::new("e2e-sigv4").await?;
    let (proxy, counts) = os::signing_proxy("es").await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["endpoints"] = json!([proxy]);
        pipeline["spec"]["sink"]["opensearch"]["auth"] =
            json!({"sigv4": {"region": "eu-west-1", "service": "es"}});
    })?;
    let n = 25;
    setup.produce(&as_records(&posts(0..n))).await?;
    let mut worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), n as u64, Duration::from_secs(90))
        .await?;
    worker.assert_running()?;
    use std::sync::atomic::Ordering;
    assert!(
        counts.verified.load(Ordering::SeqCst) >= 2,
        "index check and _bulk go through the proxy"
    );
    assert_eq!(
        counts.refused.load(Ordering::SeqCst),
        0,
        "every request was signed right"
    );
    // An unsigned request is refused, so the proxy really checks.
    let unsigned = reqwest::get(format!("{proxy}/_cluster/health")).await?;
    assert_eq!(unsigned.status().as_u16(), 403);
    assert!(worker.stop()?.success());
    Ok(())
}

/// Waits until `url` answers 2xx.
async fn answers_ok(url: &str, limit_secs: u64) -> Result<()> {
    eventually(
        &format!("{url} answering OK"),
        Duration::from_secs(limit_secs),
        || async {
            Ok(reqwest::get(url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        },
    )
    .await
}

/// `/readyz` turns ready once a worker has joined its group, also with nothing to read: with
/// more workers than partitions the spare ones are ready too (else rollouts of such a pipeline
/// would never finish).
#[tokio::test(flavor = "multi_thread")]
async fn every_worker_is_ready_once_it_joined_even_without_partitions() -> Result<()> {
    let setup = Setup::new("e2e-ready").await?;
    let workers: Vec<Worker> = (0..PARTITIONS + 1)
        .map(|i| setup.start_worker(&format!("worker-{i}")))
        .collect::<Result<_>>()?;
    for worker in &workers {
        answers_ok(&format!("http://{}/readyz", worker.metrics), 90).await?;
    }
    for worker in workers {
        assert!(worker.stop()?.success());
    }

    // A worker whose brokers do not answer never joins: alive, but not ready.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut pipeline: Value = serde_yaml::from_str(&std::fs::read_to_string(&setup.pipeline)?)?;
    pipeline["spec"]["source"]["kafka"]["bootstrapServers"] = json!([closed.to_string()]);
    let lonely = setup.dir.join("lonely.yaml");
    std::fs::write(&lonely, serde_yaml::to_string(&pipeline)?)?;
    let mut worker = Worker::start(&lonely, &setup.dir.join("lonely.log"))?;
    answers_ok(&format!("http://{}/healthz", worker.metrics), 60).await?;
    for _ in 0..10 {
        let ready = reqwest::get(format!("http://{}/readyz", worker.metrics)).await?;
        assert_eq!(ready.status().as_u16(), 503, "ready without a group");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    worker.assert_running()?;
    Ok(())
}

/// The model-based chaos run (see `vectorpipe_tests::chaos`) at a size CI can afford; the seed
/// comes from `VP_CHAOS_SEED` or the clock and is printed, and a failure names it.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_the_index_equals_the_model_through_restarts_kills_and_rebalances() -> Result<()> {
    let seed = std::env::var("VP_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    println!("chaos seed {seed} (rerun with VP_CHAOS_SEED={seed})");
    let report = vectorpipe_tests::chaos::run(&vectorpipe_tests::chaos::ChaosConfig {
        seed,
        events: 400,
        hot_ids: 3,
        cold_ids: 40,
        partitions: 3,
        worker: vectorpipe_tests::worker::binary("vectorpipe-worker")?,
    })
    .await?;
    println!("{report:?}");
    assert!(report.killed >= 1 && report.stopped >= 1, "{report:?}");
    Ok(())
}

/// Ownership across a revoke (DL-4): one worker's writes are held by a slow proxy while a second
/// worker joins and takes a partition over, and tombstones follow. The held writes must never
/// land after the new owner applied the tombstones: nothing may come back.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_held_across_a_revoke_never_undoes_the_new_owners_tombstone() -> Result<()> {
    let setup = Setup::new("e2e-held").await?;
    let (proxy, held) = os::holding_proxy(Duration::from_secs(15)).await?;
    // The first worker writes through the holding proxy, the second straight to OpenSearch.
    let mut slow: Value = serde_yaml::from_str(&std::fs::read_to_string(&setup.pipeline)?)?;
    slow["spec"]["sink"]["opensearch"]["endpoints"] = json!([proxy]);
    let slow_pipeline = setup.dir.join("slow.yaml");
    std::fs::write(&slow_pipeline, serde_yaml::to_string(&slow)?)?;
    let first = Worker::start(&slow_pipeline, &setup.dir.join("first.log"))?;
    let log = |name: &str| std::fs::read_to_string(setup.dir.join(format!("{name}.log")));
    eventually(
        "the first worker owning the partitions",
        Duration::from_secs(60),
        || async { Ok(log("first")?.contains("partitions assigned").then_some(())) },
    )
    .await?;
    // One record per partition, so whichever partition moves carries one.
    let producer: FutureProducer = kafka::config()?.create()?;
    let send = |id: String, partition: i32, value: Option<String>| {
        let producer = &producer;
        let topic = &setup.topic;
        async move {
            let mut record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
                .key(id.as_str())
                .partition(partition);
            if let Some(value) = &value {
                record = record.payload(value.as_str());
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!(e))
        }
    };
    for p in 0..PARTITIONS {
        let value = json!({"id": format!("x{p}"), "text": format!("record x{p}"), "likes": p});
        send(format!("x{p}"), p, Some(value.to_string())).await?;
    }
    eventually(
        "the first worker's writes held",
        Duration::from_secs(30),
        || async { Ok((held.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())) },
    )
    .await?;
    // A second member: the cooperative rebalance moves a partition to it.
    let second = setup.start_worker("second")?;
    eventually(
        "a partition moved to the second worker",
        Duration::from_secs(90),
        || async {
            let text = log("second")?;
            Ok(text
                .lines()
                .any(|l| l.contains("partitions assigned") && l.contains(&setup.topic))
                .then_some(()))
        },
    )
    .await?;
    for p in 0..PARTITIONS {
        send(format!("x{p}"), p, None).await?;
    }
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    // Longer than the proxy holds a request: a write that outlived its owner would land now.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        setup.count(json!({"match_all": {}})).await?,
        0,
        "a record came back after its tombstone: {:?}",
        setup.ids().await?
    );
    assert!(first.stop()?.success());
    assert!(second.stop()?.success());
    Ok(())
}

/// `/readyz`: its status and its text.
async fn readyz(worker: &Worker) -> Result<(u16, String)> {
    let response = reqwest::get(format!("http://{}/readyz", worker.metrics)).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// Waits until `/readyz` answers 503 with a text that holds `needle`.
async fn wait_not_ready(worker: &Worker, needle: &str, limit: Duration) -> Result<String> {
    eventually(
        &format!("/readyz not ready for {needle:?}"),
        limit,
        || async {
            let (status, text) = readyz(worker).await?;
            Ok((status == 503 && text.contains(needle)).then_some(text))
        },
    )
    .await
}

fn without_dead_letter_topic(pipeline: &mut Value) {
    if let Some(spec) = pipeline["spec"].as_object_mut() {
        spec.remove("deadLetter");
    }
}

/// Sets or lifts `index.blocks.write` on the test's index.
async fn set_write_block(setup: &Setup, blocked: bool) -> Result<()> {
    let response = reqwest::Client::new()
        .put(format!("{}/{}/_settings", os::url()?, setup.index))
        .json(&json!({"index.blocks.write": blocked}))
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.text().await?);
    Ok(())
}

/// A write block (a snapshot, a shrink) is the index's fault, not the documents': the records
/// are held (not dead-lettered, not skipped, not committed), the worker says so in `/readyz`, and
/// once the block is lifted every record is indexed.
#[tokio::test(flavor = "multi_thread")]
async fn an_index_write_block_holds_the_records_until_lifted_and_loses_nothing() -> Result<()> {
    let setup = Setup::new("e2e-block").await?;
    setup.edit_pipeline(without_dead_letter_topic)?;
    let worker = setup.start_worker("worker")?;
    setup.produce(&as_records(&posts(0..50))).await?;
    setup
        .wait_for_count(json!({"match_all": {}}), 50, Duration::from_secs(90))
        .await?;
    set_write_block(&setup, true).await?;
    setup.produce(&as_records(&posts(50..200))).await?;
    let why = wait_not_ready(&worker, "opensearch", Duration::from_secs(60)).await?;
    assert!(
        why.contains("index.blocks.write"),
        "says what to fix: {why}"
    );
    // Held a while: nothing is committed past the held records meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!kafka::commits_at_end(
        &setup.topic,
        &setup.group,
        PARTITIONS
    )?);
    set_write_block(&setup, false).await?;
    setup
        .assert_exactly_indexed(200, Duration::from_secs(120))
        .await?;
    let (status, _) = readyz(&worker).await?;
    assert_eq!(status, 200, "ready again once the block is lifted");
    let metrics = worker.metrics_text().await?;
    assert!(!metrics.contains("skipped-index-rejected"), "{metrics}");
    assert!(
        labelled_sum(
            &metrics,
            "vectorpipe_worker_holds_total",
            r#"fault="opensearch""#
        ) >= 1.0,
        "{metrics}"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

/// A `_bulk` request the cluster refuses as too large (413) is split until the document that is
/// too large is alone: that one is dead-lettered as `too-large`, every other record is indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_refused_as_too_large_is_split_and_only_its_document_dead_lettered() -> Result<()>
{
    let setup = Setup::new("e2e-413").await?;
    let (proxy, refused) = os::too_large_proxy(r#""_id":"poison""#).await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["endpoints"] = json!([proxy]);
    })?;
    let mut records = posts(0..100);
    records.insert(
        40,
        (
            "poison".to_owned(),
            json!({"id": "poison", "text": "a post the cluster refuses"})
                .to_string()
                .into_bytes(),
        ),
    );
    setup.produce(&as_records(&records)).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(100, Duration::from_secs(90))
        .await?;
    let dead = setup.dead_letters(1).await?;
    assert_eq!(dead[0].0, "too-large");
    assert!(dead[0].2.starts_with(br#"{"id":"poison""#));
    assert!(refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_no_more_dead_letters(&setup, 1).await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// Fails unless the dead-letter topic holds exactly `n` records.
async fn assert_no_more_dead_letters(setup: &Setup, n: usize) -> Result<()> {
    let consumer: StreamConsumer = kafka::config()?
        .set("group.id", unique_name("dlq-count"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&setup.dead_letter])?;
    let mut seen = 0;
    while let Ok(message) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
        message?;
        seen += 1;
    }
    assert_eq!(seen, n, "dead letters");
    Ok(())
}

/// A model id Bedrock does not know (here without its `:0`) fails the start with what to fix,
/// before any record is read: nothing is dead-lettered, skipped or committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_model_id_fails_the_start_with_what_to_fix_and_commits_nothing() -> Result<()> {
    let setup = Setup::new("e2e-model-id").await?;
    setup.edit_pipeline(|pipeline| {
        without_dead_letter_topic(pipeline);
        pipeline["spec"]["embedding"]["bedrock"]["modelId"] = json!("amazon.titan-embed-text-v2");
    })?;
    setup.produce(&as_records(&posts(0..10))).await?;
    let mut worker = setup.start_worker("worker")?;
    let status = eventually("the worker exiting", Duration::from_secs(60), || {
        let exited = worker.try_exit();
        async move { exited }
    })
    .await?;
    assert!(!status.success());
    let log = std::fs::read_to_string(&worker.log)?;
    assert!(
        log.contains("The provided model identifier is invalid"),
        "{log}"
    );
    assert!(log.contains("embedding.bedrock.modelId"), "{log}");
    assert!(!kafka::commits_at_end(
        &setup.topic,
        &setup.group,
        PARTITIONS
    )?);
    assert_eq!(setup.count(json!({"match_all": {}})).await?, 0);
    Ok(())
}

/// A model that starts refusing every record with the same error (its settings, not the records)
/// trips the breaker: a few records are dead-lettered, then the rest are held, the worker is not
/// ready, and once the model takes texts again every held record is indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_refusing_every_record_holds_them_instead_of_dead_lettering_the_stream()
-> Result<()> {
    let setup = Setup::new("e2e-breaker").await?;
    let worker = setup.start_worker("worker")?;
    answers_ok(&format!("http://{}/readyz", worker.metrics), 60).await?;
    setup.fake.inject(Fault::ValidationException, 100_000);
    setup.produce(&as_records(&posts(0..30))).await?;
    let why = wait_not_ready(&worker, "embedding", Duration::from_secs(60)).await?;
    assert!(why.contains("Malformed input request"), "{why}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!kafka::commits_at_end(
        &setup.topic,
        &setup.group,
        PARTITIONS
    )?);
    setup.fake.clear_faults();
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    // Counting refreshes the index, so the last writes are searchable.
    setup.count(json!({"match_all": {}})).await?;
    let indexed = setup.ids().await?;
    let metrics = worker.metrics_text().await?;
    let dead = labelled_sum(
        &metrics,
        "vectorpipe_worker_records_total",
        r#"outcome="dead-lettered-embedding-rejected""#,
    );
    assert!(
        dead < 5.0,
        "at most the breaker's count before it tripped: {dead}"
    );
    assert_eq!(indexed.len() as f64 + dead, 30.0, "{indexed:?}");
    assert!(worker.stop()?.success());
    Ok(())
}

/// A text the model fails on every time (ModelErrorException) reaches the dead-letter topic after
/// its attempts, as `embedding-failed`; the records around it are indexed.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_model_keeps_failing_on_is_dead_lettered_after_its_attempts() -> Result<()> {
    let setup = Setup::new("e2e-model-error").await?;
    setup.fake.poison("cursed", Fault::ModelErrorException);
    let mut records = posts(0..20);
    records.push((
        "cursed".to_owned(),
        json!({"id": "cursed", "text": "a cursed text"})
            .to_string()
            .into_bytes(),
    ));
    setup.produce(&as_records(&records)).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(20, Duration::from_secs(90))
        .await?;
    let dead = setup.dead_letters(1).await?;
    assert_eq!(dead[0].0, "embedding-failed");
    assert_no_more_dead_letters(&setup, 1).await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// A record of 2.5 MB with the default chunking is too large to embed and larger than the
/// dead-letter producer takes: it is dead-lettered with its value cut to fit and a header that
/// says so, with the source record's headers and timestamp, and the partition goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_larger_than_the_dead_letter_topic_takes_is_dead_lettered_cut_to_fit() -> Result<()>
{
    let setup = Setup::new("e2e-huge").await?;
    let big_topic = format!("{}-big", setup.topic);
    kafka::create_topic_with(&big_topic, 1, &[("max.message.bytes", "8388608")]).await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["source"]["kafka"]["topics"] = json!([big_topic]);
        pipeline["spec"]["chunking"] = json!({});
    })?;
    let huge = json!({"id": "huge", "text": "a ".repeat(1_250_000)}).to_string();
    let producer: FutureProducer = kafka::config()?
        .set("message.max.bytes", "8000000")
        .create()?;
    let timestamp = 1_700_000_000_000;
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "trace-id",
        value: Some("abc-123"),
    });
    producer
        .send(
            FutureRecord::to(&big_topic)
                .key("huge")
                .payload(huge.as_bytes())
                .headers(headers)
                .timestamp(timestamp),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    for (id, payload) in posts(0..3) {
        producer
            .send(
                FutureRecord::to(&big_topic).key(&id).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), 3, Duration::from_secs(90))
        .await?;
    let consumer: StreamConsumer = kafka::config()?
        .set("group.id", unique_name("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&setup.dead_letter])?;
    let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .context("no dead letter")??;
    let header = |name: &str| {
        message
            .headers()
            .and_then(|h| h.iter().find(|x| x.key == name))
            .and_then(|x| x.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("vectorpipe.reason").as_deref(), Some("too-large"));
    let truncated = header("vectorpipe.truncated").context("no vectorpipe.truncated header")?;
    assert!(truncated.contains(&huge.len().to_string()), "{truncated}");
    assert_eq!(header("trace-id").as_deref(), Some("abc-123"));
    assert_eq!(message.timestamp().to_millis(), Some(timestamp));
    let payload = message.payload().unwrap_or_default();
    assert!(payload.len() < 1_000_000 && huge.as_bytes().starts_with(payload));
    kafka::wait_for_commits_at_end(&big_topic, &setup.group, 1, Duration::from_secs(60)).await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// The in-flight byte budget bounds what the worker holds, whatever the count bounds allow: with
/// a budget of 16 MiB, records of 1.5 MB and queues that would take every record of the backlog,
/// never more records are open (read, not yet committed) than the budget holds at twice a
/// record's size (its message and its text), plus the one waiting for room; every record is
/// still indexed. The count comes from the commit tracker, not from the budget's own gauge, so a
/// budget that is not applied shows (without it, 14 of the 20 records were open at once).
#[tokio::test(flavor = "multi_thread")]
async fn the_byte_budget_bounds_the_records_in_flight_and_every_record_is_indexed() -> Result<()> {
    const RECORDS: usize = 20;
    const RECORD_BYTES: usize = 1_500_000;
    const BUDGET: usize = 16 << 20;
    let setup = Setup::new("e2e-budget").await?;
    let big_topic = format!("{}-big", setup.topic);
    kafka::create_topic_with(&big_topic, PARTITIONS, &[("max.message.bytes", "8388608")]).await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["source"]["kafka"]["topics"] = json!([big_topic]);
        pipeline["spec"]["chunking"] =
            json!({"strategy": "recursive", "maxChars": 20000, "overlapChars": 0});
    })?;
    setup.fake.set_latency(Duration::from_millis(200));
    let producer: FutureProducer = kafka::config()?
        .set("message.max.bytes", "8000000")
        .create()?;
    let sentence = "Large records test the byte budget of the worker, sentence after sentence. ";
    for n in 0..RECORDS {
        let id = format!("big-{n}");
        let text = sentence.repeat(RECORD_BYTES / sentence.len() + 1);
        let payload = json!({"id": id, "text": text}).to_string();
        producer
            .send(
                FutureRecord::to(&big_topic).key(&id).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let worker = Worker::start_with_env(
        &setup.pipeline,
        &setup.dir.join("worker.log"),
        &[("VECTORPIPE_MAX_IN_FLIGHT_BYTES", &BUDGET.to_string())],
    )?;
    let (mut most_open, mut most_bytes) = (0.0_f64, 0.0_f64);
    let started = std::time::Instant::now();
    while !kafka::commits_at_end(&big_topic, &setup.group, PARTITIONS)? {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(240),
            "the backlog was not committed in 240 s; most records open at once: {most_open}"
        );
        if let Ok(page) = worker.metrics_text().await {
            let open =
                vectorpipe_tests::worker::metric_sum(&page, "vectorpipe_worker_records_in_flight");
            let bytes =
                vectorpipe_tests::worker::metric_sum(&page, "vectorpipe_worker_in_flight_bytes");
            most_open = most_open.max(open);
            most_bytes = most_bytes.max(bytes);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each record holds at least its message and the text taken from it; one more may be open
    // while it waits for room.
    let bound = (BUDGET / (2 * RECORD_BYTES) + 1) as f64;
    assert!(
        most_open <= bound,
        "{most_open} records were open at once; a budget of {BUDGET} bytes holds at most {bound} records of {RECORD_BYTES} bytes"
    );
    assert!(most_open >= 1.0, "the records in flight were never seen");
    // The budget was in use (its gauge is what `/metrics` shows an SRE).
    assert!(
        most_bytes > 0.0,
        "vectorpipe_worker_in_flight_bytes stayed at 0"
    );
    let page = worker.metrics_text().await?;
    assert_eq!(
        labelled_sum(
            &page,
            "vectorpipe_worker_records_total",
            r#"outcome="indexed""#
        ),
        RECORDS as f64,
        "{page}"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

/// A dead-letter topic that does not exist (auto-creation off) takes nothing: the refused
/// record waits, nothing after it is committed, the worker is not ready and says why; once the
/// topic exists, the record is dead-lettered and the commits reach the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_dead_letter_topic_holds_the_records_until_it_exists() -> Result<()> {
    let setup = Setup::new("e2e-no-dlq").await?;
    let missing = format!("{}-missing", setup.dead_letter);
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["deadLetter"]["topic"] = json!(missing);
    })?;
    let good = posts(0..10);
    let mut records = as_records(&good);
    for n in 0..200 {
        records.push((Some("bad"), Some(format!("{{not json {n}").into_bytes())));
    }
    setup.produce(&records).await?;
    let worker = setup.start_worker("worker")?;
    let why = wait_not_ready(&worker, "dead-letters", Duration::from_secs(120)).await?;
    assert!(why.contains(&missing), "{why}");
    assert!(!kafka::commits_at_end(
        &setup.topic,
        &setup.group,
        PARTITIONS
    )?);
    kafka::create_topic(&missing, 1).await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(180))
        .await?;
    setup.count(json!({"match_all": {}})).await?;
    assert_eq!(setup.ids().await?, expected_ids(0..10));
    let (status, _) = readyz(&worker).await?;
    assert_eq!(status, 200);
    assert!(worker.stop()?.success());
    Ok(())
}

/// A record of four chunks whose first chunk the model refuses is dead-lettered once and leaves
/// nothing of itself in the index; its next version (two chunks) is indexed whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_with_one_refused_chunk_is_dead_lettered_once_and_not_half_indexed() -> Result<()>
{
    let setup = Setup::new("e2e-chunk-refused").await?;
    setup
        .fake
        .poison("forbidden-word", Fault::ValidationException);
    let long = |first: &str, sentences: usize| {
        let mut text = format!("{first} opens the record. ");
        for n in 0..sentences {
            text.push_str(&format!(
                "Sentence number {n} of a long record about cats. "
            ));
        }
        json!({"id": "long", "text": text}).to_string().into_bytes()
    };
    // 200-character chunks: about four for 12 sentences, two for 4.
    setup
        .produce(&[(Some("long"), Some(long("forbidden-word", 12)))])
        .await?;
    let worker = setup.start_worker("worker")?;
    let dead = setup.dead_letters(1).await?;
    assert_eq!(dead[0].0, "embedding-rejected");
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    assert_eq!(setup.count(json!({"term": {"parentId": "long"}})).await?, 0);
    assert_no_more_dead_letters(&setup, 1).await?;
    setup
        .produce(&[(Some("long"), Some(long("Fine", 4)))])
        .await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    let chunks = setup.count(json!({"term": {"parentId": "long"}})).await?;
    let first = stored_source(&setup, "long#0").await?;
    assert!(chunks >= 2, "{chunks}");
    assert_eq!(Some(chunks), first["chunks"].as_u64(), "{first}");
    assert!(worker.stop()?.success());
    Ok(())
}

/// Every endpoint takes a share of the writes, and one that does not answer is left out: the
/// first endpoint listed here is a closed port.
#[tokio::test(flavor = "multi_thread")]
async fn writes_spread_over_every_endpoint_and_fail_over_from_one_that_is_down() -> Result<()> {
    let setup = Setup::new("e2e-endpoints").await?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (first, first_count) = os::holding_proxy(Duration::ZERO).await?;
    let (second, second_count) = os::holding_proxy(Duration::ZERO).await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["endpoints"] =
            json!([format!("http://{closed}"), first, second]);
        pipeline["spec"]["sink"]["opensearch"]["bulk"]["maxDocs"] = json!(5);
    })?;
    setup.produce(&as_records(&posts(0..100))).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .assert_exactly_indexed(100, Duration::from_secs(90))
        .await?;
    use std::sync::atomic::Ordering;
    let (a, b) = (
        first_count.load(Ordering::SeqCst),
        second_count.load(Ordering::SeqCst),
    );
    assert!(
        a >= 3 && b >= 3,
        "both live endpoints took writes: {a} and {b}"
    );
    assert!(worker.stop()?.success());
    Ok(())
}

/// `/healthz` fails when records wait and nothing progressed for the stall timeout (here an
/// embedding call that hangs), and passes again once work goes on.
#[tokio::test(flavor = "multi_thread")]
async fn healthz_fails_when_records_wait_and_nothing_progresses() -> Result<()> {
    let setup = Setup::new("e2e-stall").await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["embedding"]["bedrock"]["timeout"] = json!("120s");
        pipeline["spec"]["embedding"]["bedrock"]["maxInFlight"] = json!(1);
    })?;
    let worker = Worker::start_with_env(
        &setup.pipeline,
        &setup.dir.join("worker.log"),
        &[("VECTORPIPE_STALL_SECONDS", "3")],
    )?;
    answers_ok(&format!("http://{}/readyz", worker.metrics), 60).await?;
    setup.fake.set_latency(Duration::from_secs(40));
    setup.produce(&as_records(&posts(0..5))).await?;
    let url = format!("http://{}/healthz", worker.metrics);
    let text = eventually("/healthz failing", Duration::from_secs(30), || async {
        let response = reqwest::get(&url).await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((status == 503).then_some(text))
    })
    .await?;
    assert!(text.contains("records wait"), "{text}");
    setup.fake.set_latency(Duration::ZERO);
    setup
        .assert_exactly_indexed(5, Duration::from_secs(90))
        .await?;
    answers_ok(&url, 30).await?;
    assert!(worker.stop()?.success());
    Ok(())
}

async fn parent_count(setup: &Setup, id: &str) -> Result<u64> {
    setup.count(json!({"term": {"parentId": id}})).await
}

/// OpenSearch Serverless vector collections refuse a custom `_id`: with `sigv4.service: aoss`
/// the worker lets OpenSearch pick ids, and a new version of a record replaces the older one
/// (chunks and all) and a tombstone deletes it, by query.
#[tokio::test(flavor = "multi_thread")]
async fn on_serverless_ids_are_picked_by_opensearch_and_versions_replace_by_query() -> Result<()> {
    let setup = Setup::new("e2e-aoss").await?;
    let (proxy, counts) = os::serverless_proxy().await?;
    setup.edit_pipeline(|pipeline| {
        pipeline["spec"]["sink"]["opensearch"]["endpoints"] = json!([proxy]);
        pipeline["spec"]["sink"]["opensearch"]["auth"] =
            json!({"sigv4": {"region": "eu-west-1", "service": "aoss"}});
    })?;
    setup.produce(&as_records(&posts(0..20))).await?;
    let long = json!({"id": "long", "text": sentences("v1", 20)}).to_string();
    setup
        .produce(&[(Some("long"), Some(long.into_bytes()))])
        .await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(90))
        .await?;
    let first_chunks = parent_count(&setup, "long").await?;
    assert!(first_chunks >= 3, "{first_chunks}");
    assert_eq!(
        setup.count(json!({"match_all": {}})).await?,
        20 + first_chunks
    );

    // A new version of post-3, a shorter version of "long", a tombstone of post-4.
    let updated = json!({"id": "post-3", "text": "post 3 rewritten about dogs", "likes": 99});
    let short = json!({"id": "long", "text": "v2 is short now"});
    setup
        .produce(&[
            (Some("post-3"), Some(updated.to_string().into_bytes())),
            (Some("long"), Some(short.to_string().into_bytes())),
            (Some("post-4"), None),
        ])
        .await?;
    setup
        .wait_for_commits_at_end(Duration::from_secs(60))
        .await?;
    // The deletes reach documents once they are searchable (here at once, the harness index
    // refreshes each second; the second delete catches later ones).
    eventually(
        "the older versions gone",
        Duration::from_secs(60),
        || async {
            let post3 = parent_count(&setup, "post-3").await?;
            let long = parent_count(&setup, "long").await?;
            let post4 = parent_count(&setup, "post-4").await?;
            Ok((post3 == 1 && long == 1 && post4 == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        stored_source(&setup, "post-3").await.ok(),
        None,
        "ids are OpenSearch's"
    );
    let client = os::client()?;
    let hit: Value = client
        .search(SearchParts::Index(&[&setup.index]))
        .body(json!({"query": {"term": {"docId": "post-3"}}}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(hit["hits"]["hits"][0]["_source"]["likes"], 99, "{hit}");
    use std::sync::atomic::Ordering;
    assert_eq!(
        counts.custom_ids.load(Ordering::SeqCst),
        0,
        "never a custom _id"
    );
    assert_eq!(counts.unsupported.load(Ordering::SeqCst), 0);
    assert!(counts.verified.load(Ordering::SeqCst) > 2);
    assert!(worker.stop()?.success());
    Ok(())
}

/// Every dead letter of the pipeline, in order: its headers and its value.
async fn dead_letters_with_headers(
    setup: &Setup,
    want: usize,
) -> Result<Vec<(std::collections::BTreeMap<String, String>, Vec<u8>)>> {
    let consumer: StreamConsumer = kafka::config()?
        .set("group.id", unique_name("dlq-headers"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&setup.dead_letter])?;
    let mut out = Vec::new();
    while out.len() < want {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| format!("{} of {want} dead letters arrived", out.len()))??;
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_owned(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((headers, message.payload().unwrap_or_default().to_vec()));
    }
    Ok(out)
}

/// Runs `vectorpipe-worker redrive` on the setup's pipeline; returns its JSON report.
fn redrive(setup: &Setup, args: &[&str]) -> Result<Value> {
    let output = std::process::Command::new(vectorpipe_tests::worker::binary("vectorpipe-worker")?)
        .args(["redrive", "--json", "--pipeline"])
        .arg(&setup.pipeline)
        .args(args)
        .output()?;
    ensure!(
        output.status.success(),
        "redrive failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// With positional ids (`<topic>-<partition>-<offset>`), records the model refused are
/// redriven once it takes them: they are indexed under the ids of where they were first read
/// (not of the copies), a redrive run twice adds no document, a record that fails again is back
/// in the dead-letter topic with its first failure in `vectorpipe.history`, and the workers
/// count the redriven records by outcome.
#[tokio::test(flavor = "multi_thread")]
async fn refused_records_redriven_after_the_fix_are_indexed_under_their_first_ids() -> Result<()> {
    let setup = Setup::new("e2e-redrive").await?;
    setup.edit_pipeline(|p| {
        p["spec"]["transform"] = json!({"textPointers": ["/text"]});
    })?;
    setup.fake.poison("cursed", Fault::ValidationException);
    setup.fake.poison("doomed", Fault::ValidationException);
    let mut records = posts(0..20);
    for (id, text) in [
        ("c1", "a cursed text"),
        ("c2", "another cursed text"),
        ("c3", "a third cursed text"),
        ("c4", "a cursed and doomed text"),
    ] {
        records.push((
            id.to_owned(),
            json!({"id": id, "text": text}).to_string().into_bytes(),
        ));
    }
    // One more that another reason holds: a redrive of embedding-rejected leaves it.
    records.push(("bad".to_owned(), b"not json".to_vec()));
    setup.produce(&as_records(&records)).await?;
    let worker = setup.start_worker("worker")?;
    setup
        .wait_for_count(json!({"match_all": {}}), 20, Duration::from_secs(90))
        .await?;
    let first = dead_letters_with_headers(&setup, 5).await?;
    let first_ids: BTreeSet<String> = first
        .iter()
        .filter(|(h, _)| h["vectorpipe.reason"] == "embedding-rejected")
        .filter(|(_, value)| !value.windows(6).any(|w| w == b"doomed"))
        .map(|(h, _)| {
            format!(
                "{}-{}-{}",
                h["vectorpipe.source.topic"],
                h["vectorpipe.source.partition"],
                h["vectorpipe.source.offset"]
            )
        })
        .collect();
    assert_eq!(first_ids.len(), 3, "{first:?}");
    let before = setup.ids().await?;

    setup.fake.cure("cursed");
    let report = redrive(&setup, &["--reason", "embedding-rejected", "--since", "1h"])?;
    assert_eq!(report["selected"], 4, "{report}");
    assert_eq!(report["redriven"], 4, "{report}");
    assert_eq!(report["byReason"]["embedding-rejected"], 4, "{report}");
    setup
        .wait_for_count(json!({"match_all": {}}), 23, Duration::from_secs(60))
        .await?;
    let after: BTreeSet<String> = setup.ids().await?;
    let added: BTreeSet<String> = after.difference(&before).cloned().collect();
    assert_eq!(
        added, first_ids,
        "the redriven records keep their first ids"
    );

    // The doomed one failed again: back with its history.
    let letters = dead_letters_with_headers(&setup, 6).await?;
    let (again, value) = &letters[5];
    assert!(value.windows(6).any(|w| w == b"doomed"), "{letters:?}");
    assert_eq!(again["vectorpipe.reason"], "embedding-rejected");
    let history: Value = serde_json::from_str(&again["vectorpipe.history"])?;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history[0]["reason"], "embedding-rejected");
    assert_eq!(history[0]["topic"], json!(setup.dead_letter));
    assert_eq!(again["vectorpipe.origin.topic"], setup.topic);
    assert!(again.contains_key("vectorpipe.redrive"), "{again:?}");

    // Run again: the doomed record has two dead letters now and goes once; the others are
    // written again under the same ids, so no document is added.
    let report = redrive(&setup, &["--reason", "embedding-rejected"])?;
    assert_eq!(report["duplicates"], 1, "{report}");
    assert_eq!(report["redriven"], 4, "{report}");
    let metrics = eventually(
        "the redriven records counted",
        Duration::from_secs(60),
        || async {
            let page = worker.metrics_text().await?;
            let indexed = labelled_sum(
                &page,
                "vectorpipe_worker_redriven_records_total",
                r#"outcome="indexed""#,
            );
            let again = labelled_sum(
                &page,
                "vectorpipe_worker_redriven_records_total",
                r#"outcome="dead-lettered""#,
            );
            Ok((indexed == 6.0 && again == 2.0).then_some((indexed, again)))
        },
    )
    .await?;
    assert_eq!(metrics, (6.0, 2.0));
    assert_eq!(setup.ids().await?, after, "a second redrive adds nothing");
    setup
        .wait_for_commits_at_end(Duration::from_secs(30))
        .await?;
    assert!(worker.stop()?.success());
    Ok(())
}

/// With ids from a field, a dead letter whose record was written again later (a newer version)
/// is not redriven: the old version would overwrite the new one. A dry run writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_leaves_dead_letters_whose_record_has_a_newer_version() -> Result<()> {
    let setup = Setup::new("e2e-redrive-newer").await?;
    setup.fake.poison("cursed", Fault::ValidationException);
    let old = |id: &str| {
        (
            id.to_owned(),
            json!({"id": id, "text": format!("{id}: a cursed first version")})
                .to_string()
                .into_bytes(),
        )
    };
    let mut records = posts(0..5);
    records.extend([old("a"), old("b")]);
    setup.produce(&as_records(&records)).await?;
    let worker = setup.start_worker("worker")?;
    dead_letters_with_headers(&setup, 2).await?;
    // A newer version of a, keyed the same (so in the same partition), that the model takes.
    let newer = json!({"id": "a", "text": "a: the fixed second version"}).to_string();
    setup
        .produce(&[(Some("a"), Some(newer.into_bytes()))])
        .await?;
    setup
        .wait_for_count(json!({"match_all": {}}), 6, Duration::from_secs(60))
        .await?;
    setup.fake.cure("cursed");

    let dry = redrive(&setup, &["--dry-run"])?;
    assert_eq!(
        (dry["chosen"].as_u64(), dry["redriven"].as_u64()),
        (Some(1), Some(0)),
        "{dry}"
    );
    assert_eq!(dry["superseded"], 1, "{dry}");
    let report = redrive(&setup, &[])?;
    assert_eq!(report["superseded"], 1, "{report}");
    assert_eq!(report["redriven"], 1, "{report}");
    setup
        .wait_for_count(json!({"match_all": {}}), 7, Duration::from_secs(60))
        .await?;
    setup
        .wait_for_count(
            json!({"match_phrase": {"text": "fixed second version"}}),
            1,
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(
        setup
            .count(json!({"match_phrase": {"text": "cursed first version"}}))
            .await?,
        1,
        "b is back; a keeps its newer version"
    );
    assert!(worker.stop()?.success());
    Ok(())
}
