//! `vectorpipe-bench`: measures the real worker against the harness Kafka and OpenSearch and the
//! Bedrock fake at a set latency. Prints figures; asserts nothing.
//!
//! Two scenarios run in one command, so their figures can be compared:
//! - the embedder answering at once: how fast documents go into the sink, per CPU second;
//! - the embedder answering after `--latency-ms`: records/s next to the ceiling
//!   maxInFlight × batch ÷ latency.
//!
//! Each scenario drains a backlog of `--records` records (throughput, CPU seconds, peak RSS),
//! then measures produce-to-searchable latency on records produced one at a time.
//!
//! usage: start the harness (`tests/harness/up.sh kafka opensearch`, then source `$VP_RUN/env`),
//! build the worker (`cargo build --release -p vectorpipe-worker` for meaningful numbers), then
//! `cargo run --release -p vectorpipe-tests --bin vectorpipe-bench -- [--records N] [--latency-ms MS]`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use opensearch::indices::IndicesRefreshParts;
use opensearch::{CountParts, SearchParts};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::worker::Worker;
use vectorpipe_tests::{kafka, opensearch as os, unique_name};

/// Benchmark settings.
#[derive(Parser, Debug)]
#[command(name = "vectorpipe-bench")]
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
}

/// CPU seconds (user + system) and peak RSS (MiB) of a process, from /proc. CPU seconds cover
/// the whole backlog including start-up, so docs/cpu-s is records over all CPU spent.
fn process_usage(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
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

async fn count(index: &str) -> Result<u64> {
    let client = os::client()?;
    client
        .indices()
        .refresh(IndicesRefreshParts::Index(&[index]))
        .send()
        .await?;
    let response: Value = client
        .count(CountParts::Index(&[index]))
        .send()
        .await?
        .json()
        .await?;
    Ok(response["count"].as_u64().unwrap_or(0))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn scenario(
    args: &Args,
    name: &str,
    latency: Duration,
    worker_binary: &std::path::Path,
) -> Result<Figures> {
    let topic = unique_name("bench");
    kafka::create_topic(&topic, args.partitions).await?;
    let (fake, address) = FakeBedrock::start().await?;
    fake.set_latency(latency);
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let pipeline = dir.join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        serde_yaml::to_string(&json!({
            "apiVersion": "vectorpipe.io/v1alpha1",
            "kind": "EmbeddingPipeline",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {
                "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic], "groupId": format!("{topic}-group")}},
                "transform": {"idPointer": "/id", "textPointers": ["/text"], "metadata": {"producedAt": "/producedAt"}},
                "chunking": {"strategy": "none"},
                "dedup": {"enabled": false},
                "embedding": {"bedrock": {
                    "modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256, "region": "eu-west-1",
                    "endpointUrl": format!("http://{address}"), "maxInFlight": args.max_in_flight,
                }},
                "sink": {"opensearch": {
                    "endpoints": [os::url()?], "index": topic.to_lowercase(),
                    "method": {"engine": "lucene"},
                    "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                    "bulk": {"maxDocs": 500, "flushInterval": "200ms"},
                }},
            }
        }))?,
    )?;
    let index = topic.to_lowercase();
    let text =
        "Fresh vectors keep retrieval honest: this post talks about kafka, embeddings and search.";
    let producer: FutureProducer = kafka::config()?
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()?;
    let mut pending = Vec::with_capacity(args.records);
    let (producer_ref, topic_ref) = (&producer, topic.as_str());
    for i in 0..args.records {
        let payload =
            json!({"id": format!("r{i}"), "text": format!("{text} #{i}"), "producedAt": 0})
                .to_string();
        let key = format!("r{i}");
        pending.push(async move {
            producer_ref
                .send(
                    FutureRecord::to(topic_ref).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!(e))
        });
        if pending.len() >= 5000 {
            futures::future::try_join_all(pending.drain(..)).await?;
        }
    }
    futures::future::try_join_all(pending).await?;

    // Backlog phase.
    // The clock starts at the first indexed document, so start-up (index check, group join) is
    // reported apart from throughput.
    let mut worker = Worker::start_binary(worker_binary, &pipeline, &dir.join("worker.log"))?;
    let launched = Instant::now();
    let mut first = None;
    let mut at_first = 0;
    loop {
        worker.assert_running()?;
        let n = count(&index).await?;
        if first.is_none() && n > 0 {
            first = Some(Instant::now());
            at_first = n;
        }
        if n >= args.records as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.unwrap_or(launched);
    let startup = first.duration_since(launched).as_secs_f64();
    let seconds = first.elapsed().as_secs_f64();
    let measured = args.records - at_first as usize;
    let (cpu_seconds, peak_rss_mib) = process_usage(worker.pid())?;

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
        let waiting: Vec<&String> = produced.keys().collect();
        let found: Value = client
            .search(SearchParts::Index(&[&index]))
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
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !produced.is_empty() && Instant::now() < deadline {
        let waiting: Vec<&String> = produced.keys().collect();
        let found: Value = client
            .search(SearchParts::Index(&[&index]))
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    worker.stop()?;
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
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let worker = match &args.worker {
        Some(path) => path.clone(),
        None => {
            // This binary sits in target/<profile>/; prefer the release worker next to it.
            let here = std::env::current_exe()?;
            let dir = here.parent().context("no target directory")?;
            let release = dir
                .parent()
                .context("no target directory")?
                .join("release/vectorpipe-worker");
            if release.exists() {
                release
            } else {
                dir.join("vectorpipe-worker")
            }
        }
    };
    println!("worker binary: {}", worker.display());
    println!(
        "records per scenario: {}, maxInFlight: {}, partitions: {}, Titan v2 256 dims, refresh interval 1 s",
        args.records, args.max_in_flight, args.partitions
    );
    let mut rows = Vec::new();
    rows.push(scenario(&args, "embedder answers at once", Duration::ZERO, &worker).await?);
    rows.push(
        scenario(
            &args,
            &format!("embedder at {} ms", args.latency_ms),
            Duration::from_millis(args.latency_ms),
            &worker,
        )
        .await?,
    );
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
    for r in &rows {
        let rate = r.records as f64 / r.seconds;
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
    Ok(())
}
