//! `vectorpipe-bench`: measures the real worker against the harness Kafka and OpenSearch and the
//! Bedrock fake at a set latency. Prints figures; asserts nothing.
//!
//! Three scenarios run in one command, so their figures can be compared:
//! - the embedder answering at once: how fast documents go into the sink, per CPU second;
//! - the embedder answering after `--latency-ms`: records/s next to the ceiling
//!   maxInFlight × batch ÷ latency;
//! - the same latency with updates over `--hot-ids` record ids (every record is a new version of
//!   one of them): what ordering versions of one id costs next to the unique-id run.
//!
//! Each scenario drains a backlog of `--records` records (throughput, CPU seconds, peak RSS;
//! done when every document is searchable, or, for updates, when the group's commits reach the
//! end), then measures produce-to-searchable latency on records produced one at a time.
//!
//! usage: start the harness (`tests/harness/up.sh kafka opensearch`, then source `$VP_RUN/env`),
//! build the worker (`cargo build --release -p vectorpipe-worker` for meaningful numbers), then
//! `cargo run --release -p vectorpipe-tests --bin vectorpipe-bench -- worker [--records N] [--latency-ms MS]`;
//! `vectorpipe-bench operator [--pipelines N]` (needs `up.sh k8s`) reconciles N pipelines from cold;
//! `vectorpipe-bench scale-in [--latency-ms MS]` times removing one of three busy workers;
//! `vectorpipe-bench quota [--seconds S]` traces a quota-aware and a plain lag policy.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use opensearch::SearchParts;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::worker::{Worker, metric_sum};
use vectorpipe_tests::{kafka, opensearch as os, unique_name};

/// Benchmarks of vectorpipe against the harness servers.
#[derive(Parser, Debug)]
#[command(name = "vectorpipe-bench")]
enum Bench {
    /// The worker: throughput, CPU, memory and latency against Kafka, the Bedrock fake and
    /// OpenSearch (needs `up.sh kafka opensearch`).
    Worker(Args),
    /// The operator: reconciling many pipelines from cold (needs `up.sh k8s`).
    Operator(OperatorArgs),
    /// Scaling reaction time: from a lag threshold being met on the broker to the pipeline's
    /// worker count changing (needs `up.sh k8s kafka`).
    Scaling(ScalingArgs),
    /// Scale-in: one of three workers is sent SIGTERM while the other two keep a backlog going
    /// at a Bedrock latency, next to the same stop with nothing in flight (needs `up.sh kafka
    /// opensearch`).
    ScaleIn(ScaleInArgs),
    /// Memory: a backlog of large records (1.5 MB of text each) embedded with Cohere batches of
    /// 96 at a slow Bedrock, once with the in-flight byte budget and once with it out of reach;
    /// peak RSS of each (needs `up.sh kafka opensearch`).
    Memory(MemoryArgs),
    /// The chaos run of the worker tests, long: keyed updates and tombstones while workers are
    /// started, killed and stopped; fails when the index differs from the model (needs `up.sh
    /// kafka opensearch`).
    Chaos(ChaosArgs),
    /// The query server: `/v1/search` latency (p50, p99) and requests/s at 1, 8 and 32
    /// concurrent clients, next to the same k-NN query sent to OpenSearch directly (needs
    /// `up.sh kafka opensearch`).
    Query(QueryArgs),
    /// Quota-aware scaling: the same backlog, Bedrock quota and lag policy with `maxReplicas:
    /// 8`, once with `quotaAware` and once without; prints both replica and throughput traces
    /// (needs `up.sh k8s kafka prometheus opensearch`).
    Quota(QuotaArgs),
    /// The worker next to the loop people write in Python (confluent-kafka, boto3 InvokeModel
    /// from a thread pool, opensearch-py bulk, a commit after each bulk) on the same servers and
    /// records, at each Bedrock latency; needs `up.sh kafka opensearch` and, for the Python
    /// side, `pip install confluent-kafka boto3 opensearch-py` (said and skipped without).
    Compare(CompareArgs),
    /// The laptop mode: `vectorpipe-worker local` indexing the sample posts into a new store,
    /// next to sentence-transformers on PyTorch embedding the same texts with the same weights
    /// (`tests/bench/sentence_transformers_encode.py`; run when `--python` can import
    /// sentence_transformers, said and skipped otherwise). Needs no server, only the model of
    /// `examples/laptop/install-model.sh`.
    Laptop(LaptopArgs),
}

/// Laptop bench settings.
#[derive(clap::Args, Debug)]
struct LaptopArgs {
    /// The records (JSONL with the text at `/text`).
    #[arg(long, default_value = "examples/laptop/posts.jsonl")]
    input: PathBuf,
    /// Runs of each side; the best is shown.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// The model directory (default: what install-model.sh prints).
    #[arg(long, env = "VECTORPIPE_MODEL_DIR")]
    model: Option<PathBuf>,
    /// The Python interpreter with sentence-transformers.
    #[arg(long, default_value = "python3")]
    python: String,
}

/// Compare bench settings.
#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// Records of each run.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Bedrock latencies to run at, milliseconds, comma-separated.
    #[arg(long, default_value = "0,50", value_delimiter = ',')]
    latencies_ms: Vec<u64>,
    /// Calls in flight: the worker's maxInFlight and the Python thread pool.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Topic partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// The Python interpreter.
    #[arg(long, default_value = "python3")]
    python: String,
}

/// One side of a comparison: seconds from launch until every record was searchable, and the
/// process' CPU seconds and peak RSS.
struct Side {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
}

/// The pipeline of a bench worker: `topic` read by `group`, Titan v2 at 256 dimensions from the
/// fake at `address` with `max_in_flight` calls, ids from `/id`, no chunking, into the index
/// `topic` (lowercased) on the harness OpenSearch with lucene and a 1 s refresh.
fn bench_manifest(
    topic: &str,
    group: &str,
    address: std::net::SocketAddr,
    max_in_flight: usize,
) -> Result<Value> {
    Ok(json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic], "groupId": group}},
            "transform": {"idPointer": "/id", "textPointers": ["/text"]},
            "chunking": {"strategy": "none"},
            "embedding": {"bedrock": {
                "modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256, "region": "eu-west-1",
                "endpointUrl": format!("http://{address}"), "maxInFlight": max_in_flight,
            }},
            "sink": {"opensearch": {
                "endpoints": [os::url()?], "index": topic.to_lowercase(),
                "method": {"engine": "lucene"},
                "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
            }},
        }
    }))
}

/// A topic holding `records` posts with ids `r<i>`, keyed by id; `hot`: ids repeat modulo it.
async fn produce_backlog(
    topic: &str,
    partitions: i32,
    records: usize,
    hot: Option<usize>,
) -> Result<()> {
    kafka::create_topic(topic, partitions).await?;
    let text =
        "Fresh vectors keep retrieval honest: this post talks about kafka, embeddings and search.";
    let producer: FutureProducer = kafka::config()?
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()?;
    let mut pending = Vec::with_capacity(records.min(5000));
    let producer_ref = &producer;
    for i in 0..records {
        let id = match hot {
            Some(hot) => format!("r{}", i % hot.max(1)),
            None => format!("r{i}"),
        };
        let payload =
            json!({"id": id, "text": format!("{text} #{i}"), "producedAt": 0}).to_string();
        pending.push(async move { send_keyed(producer_ref, topic, &id, &payload).await });
        if pending.len() >= 5000 {
            futures::future::try_join_all(pending.drain(..)).await?;
        }
    }
    futures::future::try_join_all(pending).await?;
    Ok(())
}

/// Waits until `index` holds `records` documents; `alive` fails when the process under test
/// ended early.
async fn wait_for_documents(
    index: &str,
    records: usize,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    loop {
        alive()?;
        if os::count(index).await.unwrap_or(0) >= records as u64 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn compare_worker(
    args: &CompareArgs,
    latency: Duration,
    binary: &std::path::Path,
) -> Result<Side> {
    let topic = unique_name("compare-worker");
    produce_backlog(&topic, args.partitions, args.records, None).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(latency);
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    let index = topic.to_lowercase();
    let mut manifest = bench_manifest(
        &topic,
        &format!("{topic}-group"),
        address,
        args.max_in_flight,
    )?;
    manifest["spec"]["sink"]["opensearch"]["bulk"] =
        json!({"maxDocs": 500, "flushInterval": "200ms"});
    std::fs::write(&pipeline, serde_yaml::to_string(&manifest)?)?;
    let mut worker = Worker::start_binary(binary, &pipeline, &dir.join("worker.log"))?;
    let launched = Instant::now();
    wait_for_documents(&index, args.records, || worker.assert_running()).await?;
    let seconds = launched.elapsed().as_secs_f64();
    let (cpu_seconds, peak_rss_mib) = process_usage(worker.pid())?;
    worker.stop()?;
    Ok(Side {
        seconds,
        cpu_seconds,
        peak_rss_mib,
    })
}

async fn compare_python(args: &CompareArgs, latency: Duration) -> Result<Side> {
    let topic = unique_name("compare-python");
    produce_backlog(&topic, args.partitions, args.records, None).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(latency);
    let index = topic.to_lowercase();
    let script = vectorpipe_tests::repo_root().join("tests/bench/python_loop.py");
    let log = std::env::temp_dir().join(format!("{topic}.log"));
    let mut child = std::process::Command::new(&args.python)
        .arg(&script)
        .args(["--bootstrap", &kafka::bootstrap()?, "--topic", &topic])
        .args(["--group", &format!("{topic}-group")])
        .args(["--bedrock", &format!("http://{address}")])
        .args(["--opensearch", &os::url()?, "--index", &index])
        .args(["--records", &args.records.to_string()])
        .args(["--threads", &args.max_in_flight.to_string()])
        .args(["--access-key-id", vectorpipe_tests::bedrock::ACCESS_KEY_ID])
        .args([
            "--secret-access-key",
            vectorpipe_tests::bedrock::SECRET_ACCESS_KEY,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let launched = Instant::now();
    wait_for_documents(&index, args.records, || match child.try_wait()? {
        None => Ok(()),
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!(
            "the Python loop exited with {status}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    })
    .await?;
    let seconds = launched.elapsed().as_secs_f64();
    let output = child.wait_with_output()?;
    let said: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the Python loop printed no report: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    Ok(Side {
        seconds,
        cpu_seconds: said["cpuSeconds"].as_f64().unwrap_or(f64::NAN),
        peak_rss_mib: said["peakRssMiB"].as_f64().unwrap_or(f64::NAN),
    })
}

async fn compare_bench(args: CompareArgs) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    let python_ready = std::process::Command::new(&args.python)
        .args(["-c", "import confluent_kafka, boto3, opensearchpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    println!("worker binary: {}", worker.display());
    println!(
        "records per run: {}, calls in flight: {}, partitions: {}, Titan v2 256 dims, bulk 500, refresh 1 s",
        args.records, args.max_in_flight, args.partitions
    );
    if !python_ready {
        println!(
            "the Python baseline needs confluent-kafka, boto3 and opensearch-py ({} -m pip install confluent-kafka boto3 opensearch-py): only the worker runs",
            args.python
        );
    }
    if python_ready {
        println!(
            "(ratio: the worker's records/s over the Python loop's, and the Python loop's CPU seconds over the worker's; both from launch, start-up included)"
        );
    }
    println!(
        "\n{:<16} {:<8} {:>9} {:>10} {:>7} {:>11} {:>9}",
        "Bedrock latency", "loop", "seconds", "records/s", "cpu s", "docs/cpu-s", "rss MiB"
    );
    let row = |latency: u64, name: &str, side: &Side| {
        println!(
            "{:<16} {:<8} {:>9.1} {:>10.0} {:>7.1} {:>11.0} {:>9.0}",
            format!("{latency} ms"),
            name,
            side.seconds,
            args.records as f64 / side.seconds,
            side.cpu_seconds,
            args.records as f64 / side.cpu_seconds.max(0.001),
            side.peak_rss_mib
        );
    };
    for &latency_ms in &args.latencies_ms {
        let latency = Duration::from_millis(latency_ms);
        let ours = compare_worker(&args, latency, &worker).await?;
        row(latency_ms, "worker", &ours);
        if python_ready {
            let theirs = compare_python(&args, latency).await?;
            row(latency_ms, "python", &theirs);
            println!(
                "{:<16} {:<8} {:>9} {:>9.2}x {:>7} {:>10.2}x",
                "",
                "ratio",
                "",
                theirs.seconds / ours.seconds,
                "",
                theirs.cpu_seconds / ours.cpu_seconds.max(0.001),
            );
        }
    }
    Ok(())
}

/// Quota bench settings.
#[derive(clap::Args, Debug)]
struct QuotaArgs {
    /// Seconds each policy runs.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// Records of the backlog (each run has its own topic).
    #[arg(long, default_value_t = 40_000)]
    records: usize,
    /// The operator binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    operator: Option<PathBuf>,
}

/// Query bench settings.
#[derive(clap::Args, Debug)]
struct QueryArgs {
    /// Documents in the index.
    #[arg(long, default_value_t = 5000)]
    documents: usize,
    /// Requests per concurrency level (and per target).
    #[arg(long, default_value_t = 800)]
    requests: usize,
    /// Hits per search.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Concurrent clients, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    clients: Vec<usize>,
    /// The worker binary (default: the release build next to this one, else the debug build).
    #[arg(long)]
    worker: Option<PathBuf>,
}

/// Words the bench's posts and questions are made of.
const QUERY_WORDS: [&str; 24] = [
    "kafka",
    "consumer",
    "group",
    "partition",
    "offset",
    "rebalance",
    "broker",
    "index",
    "shard",
    "replica",
    "mapping",
    "cluster",
    "model",
    "embedding",
    "token",
    "throttle",
    "region",
    "vector",
    "search",
    "filter",
    "latency",
    "memory",
    "schedule",
    "scale",
];

/// `count` requests from `clients` concurrent loops; the latencies (ms, sorted) and the seconds
/// it took. `send(i)` sends request `i`.
async fn load<F, Fut>(clients: usize, count: usize, send: F) -> Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let send = Arc::new(send);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..clients {
        let (send, next) = (send.clone(), next.clone());
        loops.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let at = Instant::now();
                send(i).await?;
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for l in loops {
        latencies.extend(l.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok((latencies, seconds))
}

async fn query_bench(args: QueryArgs) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    let topic = unique_name("bench-query");
    kafka::create_topic(&topic, 3).await?;
    let (fake, address) = FakeBedrock::start().await?;
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let index = topic.to_lowercase();
    let pipeline = dir.join("pipeline.yaml");
    let spec = json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "bench-query", "namespace": "bench"},
        "spec": {
            "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic],
                "groupId": format!("{topic}-group")}},
            "transform": {"idPointer": "/id", "textPointers": ["/text"],
                "metadata": {"topic": "/topic"}},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256,
                "region": "eu-west-1", "endpointUrl": format!("http://{address}"), "maxInFlight": 32}},
            "sink": {"opensearch": {"endpoints": [os::url()?], "index": index,
                "method": {"engine": "lucene"},
                "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                "bulk": {"flushInterval": "200ms"}}},
        }
    });
    std::fs::write(&pipeline, serde_yaml::to_string(&spec)?)?;
    let words = |n: usize, len: usize| -> String {
        (0..len)
            .map(|i| QUERY_WORDS[(n * 7 + i * 13 + n / 5) % QUERY_WORDS.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "20").create()?;
    let mut sends = Vec::new();
    for n in 0..args.documents {
        let record =
            json!({"id": format!("doc-{n}"), "text": format!("document {n}: {}", words(n, 40)),
            "topic": QUERY_WORDS[n % 6]})
            .to_string();
        sends.push(
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key(&format!("doc-{n}"))
                        .payload(&record),
                )
                .map_err(|(e, _)| e)?,
        );
    }
    for send in sends {
        send.await?.map_err(|(e, _)| e)?;
    }
    let indexing = Worker::start_binary(&worker, &pipeline, &dir.join("worker.log"))?;
    let want = args.documents as u64;
    while os::count(&index).await? < want {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    indexing.stop()?;
    println!(
        "{} documents indexed (Titan v2 256 dimensions, lucene HNSW, 1 shard)",
        args.documents
    );

    let server = Worker::serve_binary(&worker, &pipeline, &dir.join("serve.log"), &[])?;
    let url = format!("http://{}", server.metrics);
    let client = reqwest::Client::new();
    let started = Instant::now();
    while !client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the query server never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let questions: Arc<Vec<String>> =
        Arc::new((0..args.requests).map(|n| words(n * 31 + 3, 6)).collect());
    // The baseline: the same k-NN query with the vector computed beforehand, straight to
    // OpenSearch (no embedding call, no query server).
    let vectors: Arc<Vec<Vec<f32>>> = Arc::new(
        questions
            .iter()
            .map(|q| vectorpipe_tests::bedrock::embed(q, 256, true))
            .collect(),
    );
    println!(
        "\n{:<10} {:>8} {:>10} {:>9} {:>9} {:>12} {:>9} {:>9} {:>12}",
        "clients",
        "requests",
        "server r/s",
        "p50 ms",
        "p99 ms",
        "direct r/s",
        "p50 ms",
        "p99 ms",
        "server/direct"
    );
    for &clients in &args.clients {
        let (server_latencies, server_seconds) = {
            let (client, url, questions, k) =
                (client.clone(), url.clone(), questions.clone(), args.k);
            load(clients, args.requests, move |i| {
                let (client, url, questions) = (client.clone(), url.clone(), questions.clone());
                async move {
                    let response = client
                        .post(format!("{url}/v1/search"))
                        .json(&json!({"query": questions[i], "k": k}))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status() == 200,
                        "search answered {}",
                        response.status()
                    );
                    response.bytes().await?;
                    Ok(())
                }
            })
            .await?
        };
        let (direct_latencies, direct_seconds) = {
            let (client, base, index, vectors, k) = (
                client.clone(),
                os::url()?,
                index.clone(),
                vectors.clone(),
                args.k,
            );
            load(clients, args.requests, move |i| {
                let (client, base, index, vectors) =
                    (client.clone(), base.clone(), index.clone(), vectors.clone());
                async move {
                    let response = client
                        .post(format!("{base}/{index}/_search"))
                        .json(&json!({"size": k, "_source": {"excludes": ["embedding"]},
                            "query": {"knn": {"embedding": {"vector": vectors[i], "k": k}}}}))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status() == 200,
                        "OpenSearch answered {}",
                        response.status()
                    );
                    response.bytes().await?;
                    Ok(())
                }
            })
            .await?
        };
        let server_rate = args.requests as f64 / server_seconds;
        let direct_rate = args.requests as f64 / direct_seconds;
        println!(
            "{:<10} {:>8} {:>10.0} {:>9.1} {:>9.1} {:>12.0} {:>9.1} {:>9.1} {:>11.0}%",
            clients,
            args.requests,
            server_rate,
            percentile(&server_latencies, 50.0),
            percentile(&server_latencies, 99.0),
            direct_rate,
            percentile(&direct_latencies, 50.0),
            percentile(&direct_latencies, 99.0),
            100.0 * server_rate / direct_rate,
        );
    }
    let calls = fake.stats().calls;
    println!(
        "embedding calls the server made: {calls} (one per search, plus the start-up check and the indexing)"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Memory bench settings.
#[derive(clap::Args, Debug)]
struct MemoryArgs {
    /// Records in the backlog.
    #[arg(long, default_value_t = 60)]
    records: usize,
    /// Bytes of text per record.
    #[arg(long, default_value_t = 1_500_000)]
    record_bytes: usize,
    /// Bedrock latency per call.
    #[arg(long, default_value_t = 2000)]
    latency_ms: u64,
    /// The pipeline's embedding.bedrock.maxInFlight.
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,
    /// The in-flight byte budget of the bounded run, MiB.
    #[arg(long, default_value_t = 128)]
    budget_mib: usize,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
}

/// Peak RSS of a worker draining a backlog of large records with a given byte budget, and how
/// long it took.
async fn memory_run(
    args: &MemoryArgs,
    worker: &std::path::Path,
    budget: usize,
) -> Result<(f64, f64)> {
    let topic = unique_name("bench-memory");
    kafka::create_topic_with(&topic, 2, &[("max.message.bytes", "8388608")]).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(Duration::from_millis(args.latency_ms));
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    let group = format!("{topic}-group");
    std::fs::write(
        &pipeline,
        serde_yaml::to_string(&json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": "bench-memory", "namespace": "bench"},
            "spec": {
                "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic], "groupId": group}},
                "transform": {"idPointer": "/id", "textPointers": ["/text"]},
                "dedup": {"enabled": false},
                "embedding": {"bedrock": {
                    "modelId": "cohere.embed-english-v3", "region": "eu-west-1",
                    "endpointUrl": format!("http://{address}"), "maxInFlight": args.max_in_flight,
                }},
                "sink": {"opensearch": {
                    "endpoints": [os::url()?], "index": topic.to_lowercase(),
                    "method": {"engine": "lucene"},
                    "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "30s"},
                }},
            }
        }))?,
    )?;
    let producer: FutureProducer = kafka::config()?
        .set("message.max.bytes", "8000000")
        .create()?;
    let sentence = "Large records test the byte budget of the worker, sentence after sentence. ";
    for i in 0..args.records {
        let text = sentence.repeat(args.record_bytes / sentence.len() + 1);
        let payload = json!({"id": format!("big-{i}"), "text": text}).to_string();
        send_keyed(&producer, &topic, &format!("big-{i}"), &payload).await?;
    }
    let mut worker = Worker::start_with_env_binary(
        worker,
        &pipeline,
        &dir.join("worker.log"),
        &[("VECTORPIPE_MAX_IN_FLIGHT_BYTES", &budget.to_string())],
    )?;
    let started = Instant::now();
    let mut peak: f64 = 0.0;
    loop {
        worker.assert_running()?;
        peak = peak.max(process_usage(worker.pid())?.1);
        if kafka::commits_at_end(&topic, &group, 2)? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    peak = peak.max(process_usage(worker.pid())?.1);
    worker.stop()?;
    Ok((peak, seconds))
}

async fn memory_bench(args: MemoryArgs) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    println!(
        "{} records of {} bytes, Cohere English v3 (batches of 96), maxInFlight {}, Bedrock latency {} ms",
        args.records, args.record_bytes, args.max_in_flight, args.latency_ms
    );
    let budget = args.budget_mib << 20;
    let (bounded, bounded_s) = memory_run(&args, &worker, budget).await?;
    let (unbounded, unbounded_s) = memory_run(&args, &worker, 64 << 30).await?;
    println!("\n{:<34} {:>12} {:>10}", "run", "peak RSS MiB", "seconds");
    println!(
        "{:<34} {:>12.0} {:>10.1}",
        format!("budget {} MiB", args.budget_mib),
        bounded,
        bounded_s
    );
    println!(
        "{:<34} {:>12.0} {:>10.1}",
        "budget out of reach (64 GiB)", unbounded, unbounded_s
    );
    println!(
        "peak RSS with the budget / without: {:.0}%; over the budget: {:.0} MiB",
        100.0 * bounded / unbounded.max(1.0),
        bounded - args.budget_mib as f64
    );
    Ok(())
}

/// Chaos run settings.
#[derive(clap::Args, Debug)]
struct ChaosArgs {
    /// The seed (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// Events produced.
    #[arg(long, default_value_t = 5000)]
    events: usize,
    /// Runs, with seeds seed, seed+1, ...
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
}

async fn chaos_bench(args: ChaosArgs) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    let first = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    for seed in first..first + args.runs {
        println!("chaos: seed {seed}, {} events", args.events);
        let report = vectorpipe_tests::chaos::run(&vectorpipe_tests::chaos::ChaosConfig {
            seed,
            events: args.events,
            hot_ids: 5,
            cold_ids: (args.events / 4).max(10),
            partitions: 6,
            worker: worker.clone(),
        })
        .await?;
        println!("{report:?}");
    }
    Ok(())
}

/// Scale-in benchmark settings.
#[derive(clap::Args, Debug)]
struct ScaleInArgs {
    /// Bedrock latency while a worker is removed.
    #[arg(long, default_value_t = 1000)]
    latency_ms: u64,
    /// Records in the backlog.
    #[arg(long, default_value_t = 3000)]
    records: usize,
    /// The pipeline's embedding.bedrock.maxInFlight.
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,
    /// Topic partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Rounds of each scenario.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Runs only the mid-rebalance scenario (next to the idle baseline), for more rounds of it.
    #[arg(long)]
    mid_rebalance_only: bool,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
}

/// What removing one worker took.
struct Removal {
    /// SIGTERM to exit.
    exit_seconds: f64,
    /// SIGTERM to the group being stable with the members that stay, after the exit.
    stable_seconds: f64,
    /// The exit code.
    code: Option<i32>,
}

/// The group's state and member count, as the broker reports it.
fn group_state(group: &str) -> Result<(String, usize)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = kafka::config()?.create()?;
    let list = client.fetch_group_list(Some(group), Duration::from_secs(5))?;
    Ok(list
        .groups()
        .first()
        .map(|g| (g.state().to_owned(), g.members().len()))
        .unwrap_or_default())
}

/// Starts three workers on a topic with a backlog at `latency`, waits until each owns partitions
/// (and, when `idle`, until the backlog is done), then sends one of them SIGTERM and times its
/// exit and the group's settling on two. Checks that every record is indexed and committed
/// afterwards.
async fn remove_one_of_three(
    args: &ScaleInArgs,
    worker_binary: &std::path::Path,
    latency: Duration,
    backlog: usize,
    idle: bool,
    joining: Option<Duration>,
) -> Result<Removal> {
    let topic = unique_name("bench-scale-in");
    let group = format!("{topic}-group");
    kafka::create_topic(&topic, args.partitions).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(latency);
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    let index = topic.to_lowercase();
    let manifest = bench_manifest(&topic, &group, address, args.max_in_flight)?;
    std::fs::write(&pipeline, serde_yaml::to_string(&manifest)?)?;
    let mut workers = (0..3)
        .map(|n| Worker::start_binary(worker_binary, &pipeline, &dir.join(format!("w{n}.log"))))
        .collect::<Result<Vec<_>>>()?;
    // The group settles on three first (the cooperative protocol takes two rounds), then the
    // backlog arrives, so every worker has records of its own.
    let started = Instant::now();
    let mut stable_since: Option<Instant> = None;
    while stable_since.is_none_or(|at| at.elapsed() < Duration::from_secs(5)) {
        let (state, members) = group_state(&group)?;
        if state == "Stable" && members == 3 {
            stable_since.get_or_insert_with(Instant::now);
        } else {
            stable_since = None;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "three workers did not form a stable group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "20").create()?;
    let sends = (0..backlog).map(|i| {
        let (id, payload) = (
            format!("r{i}"),
            json!({"id": format!("r{i}"), "text": format!("scale-in record {i}")}).to_string(),
        );
        let (producer, topic) = (&producer, topic.as_str());
        async move { send_keyed(producer, topic, &id, &payload).await }
    });
    futures::future::try_join_all(sends).await?;
    // All three members in a stable group, each owning partitions (each has indexed something:
    // the cooperative protocol reaches "Stable" once before the second round hands partitions
    // to the new members). Idle: the whole backlog indexed, nothing in flight.
    let started = Instant::now();
    loop {
        let mut each_indexed = true;
        for w in &mut workers {
            w.assert_running()?;
            let page = w.metrics_text().await.unwrap_or_default();
            each_indexed &= metric_sum(&page, "vectorpipe_worker_documents_indexed_total") > 0.0;
        }
        let (state, members) = group_state(&group)?;
        let settled = !idle || os::count(&index).await? >= backlog as u64;
        if state == "Stable" && members == 3 && each_indexed && settled {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "three workers did not form a stable group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Mid-rebalance: a fourth worker joins and the first is stopped while the group works the
    // join out (the cooperative protocol's two rounds), the timing of a rolling update.
    let remaining = if let Some(after) = joining {
        workers.push(Worker::start_binary(
            worker_binary,
            &pipeline,
            &dir.join("w3.log"),
        )?);
        tokio::time::sleep(after).await;
        3
    } else {
        2
    };
    let leaving = workers.remove(0);
    let signalled = Instant::now();
    // The group counts as settled only after the stopped worker exited (before that, a stable
    // group of the right size may still be the old one).
    let exited = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gone = exited.clone();
    let (exit, stable) = tokio::join!(
        tokio::task::spawn_blocking(move || {
            let status = leaving.stop();
            gone.store(true, std::sync::atomic::Ordering::SeqCst);
            (signalled.elapsed().as_secs_f64(), status)
        }),
        async {
            loop {
                if exited.load(std::sync::atomic::Ordering::SeqCst)
                    && let Ok((state, members)) = group_state(&group)
                    && state == "Stable"
                    && members == remaining
                {
                    return signalled.elapsed().as_secs_f64();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    );
    let (exit_seconds, status) = exit?;
    let code = status?.code();
    // Nothing lost: every record indexed and committed by the two that stayed.
    let deadline = Instant::now() + Duration::from_secs(600);
    while os::count(&index).await? < backlog as u64
        || !kafka::commits_at_end(&topic, &group, args.partitions)?
    {
        anyhow::ensure!(Instant::now() < deadline, "the backlog was not finished");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in workers {
        w.stop()?;
    }
    Ok(Removal {
        exit_seconds,
        stable_seconds: stable,
        code,
    })
}

async fn scale_in_bench(args: ScaleInArgs) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    let latency = Duration::from_millis(args.latency_ms);
    let mut rows: Vec<(&str, Vec<Removal>)> = Vec::new();
    for (name, latency, backlog, idle, joining) in [
        ("idle (baseline)", Duration::ZERO, 300, true, false),
        ("backlog at latency", latency, args.records, false, false),
        ("backlog, mid-rebalance", latency, args.records, false, true),
    ] {
        if args.mid_rebalance_only && !idle && !joining {
            continue;
        }
        let mut runs = Vec::new();
        for round in 0..args.rounds {
            // Mid-rebalance: the stop lands at a different point of the join in each round.
            let after = joining.then(|| Duration::from_millis(200 + 500 * round as u64));
            runs.push(remove_one_of_three(&args, &worker, latency, backlog, idle, after).await?);
        }
        rows.push((name, runs));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let baseline = median(rows[0].1.iter().map(|r| r.exit_seconds).collect());
    println!(
        "removing one of three workers ({} rounds each; Bedrock latency {} ms, maxInFlight {}, {} records, {} partitions)",
        args.rounds, args.latency_ms, args.max_in_flight, args.records, args.partitions
    );
    println!(
        "{:<24} {:>14} {:>16} {:>12} {:>12} {:>14}",
        "scenario", "exit s (med)", "stable s (med)", "exit codes", "vs baseline", "stable s (max)"
    );
    for (name, runs) in &rows {
        let exit = median(runs.iter().map(|r| r.exit_seconds).collect());
        let stable = median(runs.iter().map(|r| r.stable_seconds).collect());
        let worst = runs.iter().map(|r| r.stable_seconds).fold(0.0, f64::max);
        let codes: Vec<String> = runs
            .iter()
            .map(|r| r.code.map_or("signal".into(), |c| c.to_string()))
            .collect();
        println!(
            "{name:<24} {exit:>14.2} {stable:>16.2} {:>12} {:>11.2}x {worst:>14.2}",
            codes.join(","),
            exit / baseline
        );
    }
    Ok(())
}

/// Scaling benchmark settings.
#[derive(clap::Args, Debug)]
struct ScalingArgs {
    /// Scale-out/scale-in rounds per poll interval.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Rounds of the baseline (a 30 s poll interval, KEDA's default polling).
    #[arg(long, default_value_t = 2)]
    baseline_rounds: usize,
    /// The operator binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    operator: Option<PathBuf>,
}

/// Operator benchmark settings.
#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// Pipelines to create.
    #[arg(long, default_value_t = 1000)]
    pipelines: usize,
    /// The operator binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// How long to wait for every pipeline to be Ready before reporting how many are.
    #[arg(long, default_value_t = 300)]
    ready_timeout_secs: u64,
}

/// Worker benchmark settings.
#[derive(clap::Args, Debug)]
struct Args {
    /// Records in the backlog of each scenario.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Embedding latency of the second scenario.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// The pipeline's embedding.bedrock.maxInFlight.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Records produced one at a time for the latency figures.
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Topic partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Record ids of the update-heavy scenario.
    #[arg(long, default_value_t = 20)]
    hot_ids: usize,
    /// The pipeline's sink.opensearch.bulk.concurrency (default: the pipeline's default).
    #[arg(long)]
    bulk_concurrency: Option<i32>,
    /// The worker binary (default: the release build, else the debug build, next to this one).
    #[arg(long)]
    worker: Option<PathBuf>,
}

struct Figures {
    name: String,
    records: usize,
    total: usize,
    startup: f64,
    seconds: f64,
    ceiling: Option<f64>,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU seconds spent on the whole machine, by the worker, and by this process (the fake
    /// Bedrock runs in it) between the first and the last acknowledged document.
    window: CpuWindow,
}

/// CPU seconds at one instant: every core's busy time (from `/proc/stat`), the worker's, and
/// this process'.
#[derive(Clone, Copy, Default)]
struct CpuSample {
    machine: f64,
    worker: f64,
    bench: f64,
}

impl CpuSample {
    fn now(worker_pid: u32) -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // The first line sums every core: user nice system idle iowait irq softirq steal, in
        // ticks of 1/100 s; busy is all but idle and iowait.
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        let busy = ticks.iter().sum::<f64>()
            - ticks.get(3).copied().unwrap_or(0.0)
            - ticks.get(4).copied().unwrap_or(0.0);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        Self {
            machine: busy / 100.0,
            worker: process_usage(worker_pid).map_or(0.0, |(cpu, _)| cpu),
            bench: stat_ticks(&own, 11) / 100.0,
        }
    }
}

/// The CPU seconds between two samples.
#[derive(Clone, Copy, Default)]
struct CpuWindow {
    machine: f64,
    worker: f64,
    bench: f64,
}

impl CpuWindow {
    fn between(from: CpuSample, to: CpuSample) -> Self {
        Self {
            machine: to.machine - from.machine,
            worker: to.worker - from.worker,
            bench: to.bench - from.bench,
        }
    }
}

/// The sum of two fields of `/proc/<pid>/stat` counted after the command name (`utime` and
/// `stime` are 11 and 12, `cutime` and `cstime` 13 and 14), in clock ticks.
fn stat_ticks(stat: &str, first: usize) -> f64 {
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    fields
        .get(first)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
        + fields
            .get(first + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from /proc. CPU seconds cover
/// the whole backlog including start-up, so docs/cpu-s is records over all CPU spent.
fn process_usage(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = stat_ticks(&stat, 11);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // Linux reports CPU time in clock ticks of 1/100 s on every platform Rust targets here.
    Ok((ticks / 100.0, hwm_kib / 1024.0))
}

/// Sends one keyed record and waits for the broker's acknowledgement.
async fn send_keyed(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &str,
) -> Result<()> {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| anyhow::anyhow!(e))
}

/// Moves the produced records that are now searchable from `produced` to `latencies` (ms).
async fn collect_searchable(
    client: &opensearch::OpenSearch,
    index: &str,
    produced: &mut HashMap<String, Instant>,
    latencies: &mut Vec<f64>,
) -> Result<()> {
    let waiting: Vec<&String> = produced.keys().collect();
    let found: Value = client
        .search(SearchParts::Index(&[index]))
        .body(json!({"size": 200, "_source": false, "query": {"ids": {"values": waiting}}}))
        .send()
        .await?
        .json()
        .await?;
    for hit in found["hits"]["hits"].as_array().into_iter().flatten() {
        if let Some(at) = hit["_id"].as_str().and_then(|id| produced.remove(id)) {
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One backlog scenario; `hot_ids`: every record is a version of one of that many ids.
async fn scenario(
    args: &Args,
    name: &str,
    latency: Duration,
    worker_binary: &std::path::Path,
    hot_ids: Option<usize>,
) -> Result<Figures> {
    let topic = unique_name("bench");
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(latency);
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    let mut manifest = bench_manifest(
        &topic,
        &format!("{topic}-group"),
        address,
        args.max_in_flight,
    )?;
    let spec = &mut manifest["spec"];
    spec["transform"]["metadata"] = json!({"producedAt": "/producedAt"});
    spec["dedup"] = json!({"enabled": false});
    spec["sink"]["opensearch"]["bulk"] = json!({"maxDocs": 500, "flushInterval": "200ms"});
    if let Some(concurrency) = args.bulk_concurrency {
        spec["sink"]["opensearch"]["bulk"]["concurrency"] = json!(concurrency);
    }
    std::fs::write(&pipeline, serde_yaml::to_string(&manifest)?)?;
    let index = topic.to_lowercase();
    let text =
        "Fresh vectors keep retrieval honest: this post talks about kafka, embeddings and search.";
    produce_backlog(&topic, args.partitions, args.records, hot_ids).await?;

    // Backlog phase.
    // The clock starts at the first document OpenSearch acknowledged, so start-up (index check,
    // group join) is reported apart from throughput, and stops at the last one. Both come from
    // the worker's documents_indexed counter, read every 50 ms. Counting documents in the index
    // instead forces a refresh per count, and a refresh every poll filled the index with tiny
    // segments whose merges and graphs then competed with the worker for the CPU.
    let mut worker = Worker::start_binary(worker_binary, &pipeline, &dir.join("worker.log"))?;
    let launched = Instant::now();
    let mut first = None;
    let mut at_first = 0;
    let mut cpu_at_first = CpuSample::default();
    let indexed = |page: &str| metric_sum(page, "vectorpipe_worker_documents_indexed_total") as u64;
    let last = loop {
        worker.assert_running()?;
        let n = match worker.metrics_text().await {
            Ok(page) => indexed(&page),
            Err(_) => 0, // not listening yet
        };
        if first.is_none() && n > 0 {
            first = Some(Instant::now());
            at_first = n;
            cpu_at_first = CpuSample::now(worker.pid());
        }
        let done = match hot_ids {
            None => n >= args.records as u64,
            Some(_) => {
                n > 0 && kafka::commits_at_end(&topic, &format!("{topic}-group"), args.partitions)?
            }
        };
        if done {
            break (Instant::now(), CpuSample::now(worker.pid()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (last, cpu_at_last) = last;
    let window = CpuWindow::between(cpu_at_first, cpu_at_last);
    let first = first.unwrap_or(launched);
    let startup = first.duration_since(launched).as_secs_f64();
    let seconds = last.duration_since(first).as_secs_f64();
    let measured = args.records - (at_first as usize).min(args.records);
    let (cpu_seconds, peak_rss_mib) = process_usage(worker.pid())?;
    if hot_ids.is_none() {
        let all = args.records as u64;
        vectorpipe_tests::eventually("every document searchable", Duration::from_secs(60), || {
            let index = &index;
            async move { Ok((os::count(index).await? >= all).then_some(())) }
        })
        .await?;
    }

    // Latency phase: one record at a time, each timed from produce to searchable.
    let client = os::client()?;
    let mut produced: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let sample_producer: FutureProducer = kafka::config()?.set("linger.ms", "0").create()?;
    for i in 0..args.latency_samples {
        let id = format!("lat{i}");
        let payload =
            json!({"id": id, "text": format!("{text} latency {i}"), "producedAt": 1}).to_string();
        sample_producer
            .send(
                FutureRecord::to(&topic).key(&id).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        produced.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
        collect_searchable(&client, &index, &mut produced, &mut latencies).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !produced.is_empty() && Instant::now() < deadline {
        collect_searchable(&client, &index, &mut produced, &mut latencies).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    worker.stop()?;
    // The next scenario gets a node without this one's 20,000 vectors in its heap and caches.
    os::delete_index(&index).await?;
    let ceiling = (!latency.is_zero()).then(|| args.max_in_flight as f64 / latency.as_secs_f64());
    Ok(Figures {
        name: name.to_owned(),
        records: measured,
        total: args.records,
        startup,
        seconds,
        ceiling,
        cpu_seconds,
        peak_rss_mib,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        window,
    })
}

/// A workspace binary: the given path, else the release build, else the one next to this bench
/// (this binary sits in target/<profile>/).
fn workspace_binary(given: Option<&PathBuf>, name: &str) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.clone());
    }
    let here = std::env::current_exe()?;
    let dir = here.parent().context("no target directory")?;
    let release = dir
        .parent()
        .context("no target directory")?
        .join("release")
        .join(name);
    Ok(if release.exists() {
        release
    } else {
        dir.join(name)
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    match Bench::parse() {
        Bench::Worker(args) => worker_bench(args).await,
        Bench::Operator(args) => operator_bench(args).await,
        Bench::Scaling(args) => scaling_bench(args).await,
        Bench::Chaos(args) => chaos_bench(args).await,
        Bench::ScaleIn(args) => scale_in_bench(args).await,
        Bench::Memory(args) => memory_bench(args).await,
        Bench::Query(args) => query_bench(args).await,
        Bench::Quota(args) => quota_bench(args).await,
        Bench::Compare(args) => compare_bench(args).await,
        Bench::Laptop(args) => laptop_bench(args),
    }
}

/// Runs the quota scenario with and without `quotaAware` and prints the traces next to each
/// other.
async fn quota_bench(args: QuotaArgs) -> Result<()> {
    use vectorpipe_tests::{k8s, quota};
    let binary = workspace_binary(args.operator.as_ref(), "vectorpipe-operator")?;
    println!("operator binary: {}", binary.display());
    println!(
        "scenario: {} partitions, maxReplicas {}, Bedrock quota {} times what one worker does alone, {} ms per call, maxInFlight {} per worker (one worker's ceiling {:.0} calls/s)",
        quota::PARTITIONS,
        quota::PARTITIONS,
        quota::QUOTA_IN_WORKERS,
        quota::LATENCY.as_millis(),
        quota::MAX_IN_FLIGHT,
        f64::from(quota::MAX_IN_FLIGHT) / quota::LATENCY.as_secs_f64()
    );
    k8s::install_crds()?;
    let dir = std::env::temp_dir().join(unique_name("bench-quota"));
    std::fs::create_dir_all(&dir)?;
    let operator = vectorpipe_tests::operator::Operator::start_binary(
        &binary,
        &dir.join("operator.log"),
        &k8s::kubeconfig()?,
        &unique_name("lease"),
    )?;
    let run_for = Duration::from_secs(args.seconds);
    let worker = workspace_binary(None, "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    let aware = quota::run(&worker, true, args.records, run_for).await?;
    let plain = quota::run(&worker, false, args.records, run_for).await?;
    drop(operator);
    println!(
        "\nquotaAware: time workers answered/s throttled/s | plain lag: time workers answered/s throttled/s"
    );
    for (a, p) in aware.points.iter().zip(&plain.points) {
        println!(
            "{:>5.0} s {:>7} {:>10.1} {:>11.1} | {:>5.0} s {:>7} {:>10.1} {:>11.1}",
            a.seconds,
            a.workers,
            a.answered_per_second,
            a.throttled_per_second,
            p.seconds,
            p.workers,
            p.answered_per_second,
            p.throttled_per_second
        );
    }
    let last_minute = |t: &quota::Trace| {
        let end = t.points.last().map_or(0.0, |p| p.seconds);
        let tail: Vec<&quota::Point> = t.points.iter().filter(|p| p.seconds > end - 60.0).collect();
        let n = tail.len().max(1) as f64;
        (
            tail.iter().map(|p| p.workers as f64).sum::<f64>() / n,
            tail.iter().map(|p| p.answered_per_second).sum::<f64>() / n,
            tail.iter().map(|p| p.throttled_per_second).sum::<f64>() / n,
        )
    };
    let (aw, aa, at) = last_minute(&aware);
    let (pw, pa, pt) = last_minute(&plain);
    println!(
        "\nlast minute, mean: quotaAware {aw:.1} workers, {aa:.1} answered/s, {at:.1} throttled/s; plain {pw:.1} workers, {pa:.1} answered/s, {pt:.1} throttled/s"
    );
    println!(
        "ratios (quotaAware / plain): workers {:.2}, answered {:.2}, throttled {:.2}; most workers {} / {}",
        aw / pw.max(f64::MIN_POSITIVE),
        aa / pa.max(f64::MIN_POSITIVE),
        at / pt.max(f64::MIN_POSITIVE),
        aware.most,
        plain.most
    );
    println!(
        "one worker alone: {:.1} and {:.1} calls/s; quota {:.1} and {:.1} calls/s",
        aware.one_worker, plain.one_worker, aware.quota, plain.quota
    );
    if let Some((status, reason, message)) = &aware.limited {
        println!("quotaAware ScalingLimited: {status} {reason}: {message}");
    }
    Ok(())
}

/// Seconds of a `<n>s` duration.
fn humantime_secs(text: &str) -> f64 {
    text.trim_end_matches('s').parse().unwrap_or(1.0)
}

/// Times one reaction: from `start` until the pipeline runs `want` workers.
async fn time_until_replicas(
    pipelines: &kube::Api<vectorpipe_crds::v1alpha1::EmbeddingPipeline>,
    want: i32,
    start: Instant,
) -> Result<Duration> {
    loop {
        if pipelines.get("posts").await?.spec.workers.replicas == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("the pipeline did not reach {want} workers within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scaling_bench(args: ScalingArgs) -> Result<()> {
    use kube::Api;
    use kube::api::{Patch, PatchParams, PostParams};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
    use vectorpipe_tests::k8s;

    let binary = workspace_binary(args.operator.as_ref(), "vectorpipe-operator")?;
    println!("operator binary: {}", binary.display());
    k8s::install_crds()?;
    let ns = k8s::namespace("bench-scaling")?;
    let client = k8s::client().await?;
    let topic = unique_name("bench-scaling");
    kafka::create_topic(&topic, 4).await?;
    let mut pipeline: Value = serde_yaml::from_str(&std::fs::read_to_string(
        vectorpipe_tests::repo_root().join("examples/pipelines/minimal.yaml"),
    )?)?;
    pipeline["spec"]["source"]["kafka"]["bootstrapServers"] = json!([kafka::bootstrap()?]);
    pipeline["spec"]["source"]["kafka"]["topics"] = json!([topic]);
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    pipelines
        .create(&PostParams::default(), &serde_json::from_value(pipeline)?)
        .await?;
    let policies: Api<ScalingPolicy> = Api::namespaced(client.clone(), &ns.name);
    let spec = |poll: &str| {
        json!({
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 2,
            "pollInterval": poll,
            "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 100, "scaleInThreshold": 1}],
            "scaleOut": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "0s"},
            "scaleIn": {"evaluationPeriods": 1, "datapointsToAlarm": 1, "operation": "add", "factor": 1, "cooldown": "0s"}
        })
    };
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "vectorpipe.io/v1alpha1",
                "kind": "ScalingPolicy",
                "metadata": {"name": "bench"},
                "spec": spec("1s"),
            }))?,
        )
        .await?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let _operator = vectorpipe_tests::operator::Operator::start_binary(
        &binary,
        &dir.join("operator.log"),
        &k8s::kubeconfig()?,
        &unique_name("bench-lease"),
    )?;
    let producer: FutureProducer = kafka::config()?.create()?;
    let group = format!("vectorpipe-{}-posts", ns.name);
    let committer: BaseConsumer = kafka::config()?.set("group.id", &group).create()?;

    let mut rows = Vec::new();
    for (poll, rounds) in [
        ("1s", args.rounds),
        ("2s", args.rounds),
        ("30s", args.baseline_rounds),
    ] {
        policies
            .patch(
                "bench",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec(poll) })),
            )
            .await?;
        time_until_replicas(&pipelines, 1, Instant::now()).await?;
        let (mut outs, mut ins) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Start each round at a different point of the poll cycle (golden-ratio steps), so
            // the figures cover the whole cycle rather than one phase of it.
            let poll_secs = humantime_secs(poll);
            let phase = |k: usize| (k as f64 * 0.618_034).fract() * poll_secs;
            tokio::time::sleep(Duration::from_secs_f64(phase(round + 1))).await;
            let sends = (0..4).flat_map(|partition| {
                let producer = &producer;
                let topic = &topic;
                (0..50).map(move |_| async move {
                    producer
                        .send(
                            FutureRecord::to(topic)
                                .partition(partition)
                                .key("k")
                                .payload("{\"text\": \"x\"}"),
                            Duration::from_secs(10),
                        )
                        .await
                        .map_err(|(e, _)| e)
                })
            });
            for r in futures::future::join_all(sends).await {
                r?;
            }
            // 200 records wait: the threshold (100) is met on the broker from here.
            outs.push(
                time_until_replicas(&pipelines, 2, Instant::now())
                    .await?
                    .as_secs_f64(),
            );
            tokio::time::sleep(Duration::from_secs_f64(phase(round + 7))).await;
            let mut done = TopicPartitionList::new();
            for partition in 0..4 {
                let (_, high) =
                    committer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
                done.add_partition_offset(&topic, partition, Offset::Offset(high))?;
            }
            committer.commit(&done, CommitMode::Sync)?;
            // The backlog is consumed: lag 0, below the scale-in threshold from here.
            ins.push(
                time_until_replicas(&pipelines, 1, Instant::now())
                    .await?
                    .as_secs_f64(),
            );
        }
        outs.sort_by(f64::total_cmp);
        ins.sort_by(f64::total_cmp);
        rows.push((poll, rounds, outs, ins));
    }
    println!(
        "\n{:<14} {:>7} {:>16} {:>16} {:>16} {:>16}",
        "pollInterval",
        "rounds",
        "scale-out p50 s",
        "scale-out max s",
        "scale-in p50 s",
        "scale-in max s"
    );
    let baseline = rows
        .last()
        .map(|(_, _, outs, _)| percentile(outs, 50.0))
        .unwrap_or(f64::NAN);
    for (poll, rounds, outs, ins) in &rows {
        println!(
            "{:<14} {:>7} {:>16.2} {:>16.2} {:>16.2} {:>16.2}   scale-out p50 = {:.2} × the 30 s baseline",
            poll,
            rounds,
            percentile(outs, 50.0),
            outs.last().copied().unwrap_or(f64::NAN),
            percentile(ins, 50.0),
            ins.last().copied().unwrap_or(f64::NAN),
            percentile(outs, 50.0) / baseline,
        );
    }
    println!(
        "(one datapoint to alarm, no cooldowns: the pure reaction time. KEDA's defaults for comparison: \
         30 s pollingInterval, then the HPA's 15 s sync period; scale-in waits out the HPA's 300 s \
         stabilization window.)"
    );
    Ok(())
}

async fn operator_bench(args: OperatorArgs) -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::Api;
    use kube::api::{ListParams, PostParams};
    use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
    use vectorpipe_tests::k8s;

    let binary = workspace_binary(args.operator.as_ref(), "vectorpipe-operator")?;
    println!("operator binary: {}", binary.display());
    k8s::install_crds()?;
    let ns = k8s::namespace("bench-operator")?;
    let client = k8s::client().await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let template: EmbeddingPipeline = serde_yaml::from_str(&std::fs::read_to_string(
        vectorpipe_tests::repo_root().join("examples/pipelines/minimal.yaml"),
    )?)?;

    // The pipelines exist before the operator starts: a cold start with a full backlog.
    let created = Instant::now();
    let mut pending = Vec::new();
    for i in 0..args.pipelines {
        let mut p = template.clone();
        p.metadata.name = Some(format!("p{i:04}"));
        let api = pipelines.clone();
        pending.push(async move { api.create(&PostParams::default(), &p).await.map(|_| ()) });
        if pending.len() >= 50 {
            futures::future::try_join_all(pending.drain(..)).await?;
        }
    }
    futures::future::try_join_all(pending).await?;
    println!(
        "created {} pipelines in {:.1} s",
        args.pipelines,
        created.elapsed().as_secs_f64()
    );

    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let operator = vectorpipe_tests::operator::Operator::start_binary(
        &binary,
        &dir.join("operator.log"),
        &k8s::kubeconfig()?,
        &unique_name("bench-lease"),
    )?;
    let started = Instant::now();
    let mut all_deployments = None;
    let all_ready;
    let ready_count;
    loop {
        let n = deployments
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len();
        if all_deployments.is_none() && n >= args.pipelines {
            all_deployments = Some(started.elapsed());
        }
        let ready = pipelines
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|p| k8s::is_ready(p))
            .count();
        if ready >= args.pipelines
            || started.elapsed() > Duration::from_secs(args.ready_timeout_secs)
        {
            all_ready = started.elapsed();
            ready_count = ready;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (cpu, rss) = process_usage(operator.pid())?;
    println!(
        "\n{:<12} {:>22} {:>14} {:>16} {:>12} {:>12}",
        "pipelines", "all Deployments (s)", "Ready", "at (s)", "cpu s", "peak rss MiB"
    );
    println!(
        "{:<12} {:>22} {:>14} {:>16.1} {:>12.1} {:>12.0}",
        args.pipelines,
        all_deployments
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .unwrap_or_else(|| "not reached".into()),
        format!("{ready_count} of {}", args.pipelines),
        all_ready.as_secs_f64(),
        cpu,
        rss
    );
    println!(
        "(Ready includes kube-controller-manager creating the pods and KWOK marking them ready.)"
    );
    Ok(())
}

async fn worker_bench(args: Args) -> Result<()> {
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    println!(
        "records per scenario: {}, maxInFlight: {}, partitions: {}, Titan v2 256 dims, refresh interval 1 s",
        args.records, args.max_in_flight, args.partitions
    );
    let mut rows = Vec::new();
    rows.push(
        scenario(
            &args,
            "embedder answers at once",
            Duration::ZERO,
            &worker,
            None,
        )
        .await?,
    );
    let latency = Duration::from_millis(args.latency_ms);
    let unique = format!("embedder at {} ms", args.latency_ms);
    rows.push(scenario(&args, &unique, latency, &worker, None).await?);
    let hot = format!("{} hot ids at {} ms", args.hot_ids, args.latency_ms);
    rows.push(scenario(&args, &hot, latency, &worker, Some(args.hot_ids)).await?);
    println!(
        "\n{:<28} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>7} {:>11} {:>9} {:>8} {:>8}",
        "scenario",
        "records",
        "start s",
        "seconds",
        "records/s",
        "ceiling/s",
        "of ceil",
        "cpu s",
        "docs/cpu-s",
        "rss MiB",
        "p50 ms",
        "p99 ms"
    );
    let rate_of = |r: &Figures| r.records as f64 / r.seconds;
    // From process start as well: the clock of the table starts at the first searchable
    // document, by which time the update-heavy scenario has read most of its records.
    let total_rate_of = |r: &Figures| r.total as f64 / (r.startup + r.seconds);
    println!(
        "update-heavy throughput / unique-id throughput at the same latency: {:.0}% ({:.0}% from process start)",
        100.0 * rate_of(&rows[2]) / rate_of(&rows[1]),
        100.0 * total_rate_of(&rows[2]) / total_rate_of(&rows[1])
    );
    for r in &rows {
        let rate = rate_of(r);
        println!(
            "{:<28} {:>8} {:>8.1} {:>8.1} {:>10.0} {:>10} {:>8} {:>7.1} {:>11.0} {:>9.0} {:>8.0} {:>8.0}",
            r.name,
            r.records,
            r.startup,
            r.seconds,
            rate,
            r.ceiling.map_or("-".into(), |c| format!("{c:.0}")),
            r.ceiling
                .map_or("-".into(), |c| format!("{:.0}%", 100.0 * rate / c)),
            r.cpu_seconds,
            r.total as f64 / r.cpu_seconds.max(0.001),
            r.peak_rss_mib,
            r.p50_ms,
            r.p99_ms,
        );
    }
    // Where the machine's CPU went while the clock ran: the worker, the fake Bedrock (this
    // process), and everything else (Kafka, OpenSearch, the kernel's share of their traffic).
    println!(
        "\n{:<28} {:>11} {:>12} {:>12} {:>12} {:>12}",
        "CPU while clocked", "cores busy", "µs/doc all", "worker", "fake+bench", "other"
    );
    for r in &rows {
        let w = r.window;
        let per_doc = |cpu: f64| 1e6 * cpu / r.records.max(1) as f64;
        println!(
            "{:<28} {:>11.2} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            r.name,
            w.machine / r.seconds.max(0.001),
            per_doc(w.machine),
            per_doc(w.worker),
            per_doc(w.bench),
            per_doc(w.machine - w.worker - w.bench),
        );
    }
    Ok(())
}

/// Texts per second of the best of `runs`, with that run's seconds and CPU seconds.
struct LaptopSide {
    texts: u64,
    seconds: f64,
    cpu_seconds: f64,
}

fn laptop_bench(args: LaptopArgs) -> Result<()> {
    let root = vectorpipe_tests::repo_root();
    let input = root.join(&args.input);
    let model = match args.model {
        Some(dir) => dir,
        None => {
            let out = std::process::Command::new(root.join("examples/laptop/install-model.sh"))
                .output()
                .context("running examples/laptop/install-model.sh")?;
            anyhow::ensure!(out.status.success(), "install-model.sh failed");
            PathBuf::from(String::from_utf8(out.stdout)?.trim())
        }
    };
    let worker = workspace_binary(args.worker.as_ref(), "vectorpipe-worker")?;
    println!("worker binary: {}", worker.display());
    println!("model: {}", model.display());
    println!(
        "input: {}, best of {} runs each",
        input.display(),
        args.repeat
    );
    let store = tempfile_dir("vectorpipe-bench-laptop")?;
    let mut best: Option<LaptopSide> = None;
    for _ in 0..args.repeat.max(1) {
        let _ = std::fs::remove_dir_all(&store);
        let child = std::process::Command::new(&worker)
            .args(["local", "--json", "--input"])
            .arg(&input)
            .arg("--store")
            .arg(&store)
            .env("VECTORPIPE_MODEL_DIR", &model)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the worker")?;
        let pid = child.id();
        let before = children_cpu_seconds();
        let out = child.wait_with_output()?;
        let cpu_seconds = children_cpu_seconds() - before;
        anyhow::ensure!(
            out.status.success(),
            "worker {pid} failed: {:?}",
            out.status
        );
        let summary: Value = serde_json::from_slice(&out.stdout).context("the worker's summary")?;
        let side = LaptopSide {
            texts: summary["indexed"].as_u64().unwrap_or(0),
            seconds: summary["seconds"].as_f64().unwrap_or(f64::NAN),
            cpu_seconds,
        };
        if best.as_ref().is_none_or(|b| side.seconds < b.seconds) {
            best = Some(side);
        }
    }
    let _ = std::fs::remove_dir_all(&store);
    let ours = best.context("no run")?;
    let script = root.join("tests/bench/sentence_transformers_encode.py");
    let probe = std::process::Command::new(&args.python)
        .args(["-c", "import sentence_transformers"])
        .output();
    let python = match probe {
        Ok(out) if out.status.success() => {
            let out = std::process::Command::new(&args.python)
                .arg(&script)
                .arg("--model")
                .arg(&model)
                .arg("--input")
                .arg(&input)
                .args(["--repeat", &args.repeat.max(1).to_string()])
                .stderr(std::process::Stdio::null())
                .output()
                .context("running the sentence-transformers baseline")?;
            anyhow::ensure!(
                out.status.success(),
                "the sentence-transformers baseline failed"
            );
            let line = String::from_utf8(out.stdout)?;
            let figures: Value = serde_json::from_str(line.lines().last().unwrap_or_default())
                .context("the baseline's JSON line")?;
            Some(LaptopSide {
                texts: figures["texts"].as_u64().unwrap_or(0),
                seconds: figures["encode_seconds"].as_f64().unwrap_or(f64::NAN),
                cpu_seconds: figures["cpu_seconds_per_encode"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            })
        }
        _ => {
            println!(
                "sentence-transformers is not importable by {}: the baseline is skipped \
                 (pip install sentence-transformers, or pass --python)",
                args.python
            );
            None
        }
    };
    println!(
        "\nlocal: texts embedded and stored, from the first record read to the store saved (model load excluded);"
    );
    println!(
        "sentence-transformers: model.encode of the same texts, batch 32 (model load excluded);"
    );
    println!(
        "cpu s: the worker process' whole run (model load included), the encode call's for Python\n"
    );
    println!(
        "{:<24} {:>6} {:>9} {:>8} {:>7} {:>11}",
        "side", "texts", "seconds", "texts/s", "cpu s", "texts/cpu-s"
    );
    let row = |name: &str, side: &LaptopSide| {
        println!(
            "{:<24} {:>6} {:>9.2} {:>8.1} {:>7.2} {:>11.1}",
            name,
            side.texts,
            side.seconds,
            side.texts as f64 / side.seconds,
            side.cpu_seconds,
            side.texts as f64 / side.cpu_seconds
        );
    };
    row("vectorpipe local", &ours);
    if let Some(python) = &python {
        row("sentence-transformers", python);
        let rate = |s: &LaptopSide| s.texts as f64 / s.seconds;
        println!(
            "\nlocal / sentence-transformers throughput: {:.2}x",
            rate(&ours) / rate(python)
        );
    }
    Ok(())
}

/// A path for a scratch directory (not created).
fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    Ok(std::env::temp_dir().join(format!("{prefix}-{}", std::process::id())))
}

/// CPU seconds of this process' waited-for children.
fn children_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // cutime and cstime, in ticks of 1/100 s (see process_usage).
    stat_ticks(&stat, 13) / 100.0
}
