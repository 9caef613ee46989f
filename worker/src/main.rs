//! `vectorpipe-worker`: the data plane of one EmbeddingPipeline.
//!
//! `run` consumes the pipeline's Kafka topics, embeds the records with Bedrock and indexes them
//! into OpenSearch; `check` reads and checks a pipeline file without connecting anywhere;
//! `local` and `search` are the laptop mode (a JSONL file, a local model, an embedded store).

mod chunk;
mod config;
mod dead_letter;
mod dedup;
mod embed;
mod health;
mod http;
mod local;
mod metrics;
mod pipeline;
mod query;
mod redrive;
mod retry;
mod sink;
mod source;
mod transform;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

/// mimalloc instead of glibc's malloc: see the workspace's Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(name = "vectorpipe-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and check a pipeline file (an EmbeddingPipeline manifest or its spec).
    Check {
        /// The pipeline file.
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: PathBuf,
    },
    /// Run the pipeline until SIGTERM/SIGINT, then drain, commit and exit.
    Run {
        /// The pipeline file.
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: PathBuf,
        /// The pipeline's name (labels, default group id). Default: the manifest's, else the file name.
        #[arg(long, env = "VECTORPIPE_PIPELINE_NAME")]
        name: Option<String>,
        /// The pipeline's namespace (default group id). Default: the manifest's, else `default`.
        #[arg(long, env = "VECTORPIPE_PIPELINE_NAMESPACE")]
        namespace: Option<String>,
        /// Address of /metrics, /healthz, /readyz. Default: 0.0.0.0:<spec.workers.metricsPort>.
        #[arg(long, env = "VECTORPIPE_METRICS_ADDRESS")]
        metrics_address: Option<SocketAddr>,
        /// A Unix socket that serves the same endpoints, for `probe` (the operator puts it in
        /// the pod's scratch directory).
        #[arg(long, env = "VECTORPIPE_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
        /// Seconds allowed to finish in-flight work after SIGTERM.
        #[arg(long, env = "VECTORPIPE_DRAIN_SECONDS", default_value_t = 25)]
        drain_seconds: u64,
        /// Seconds without progress (nothing written, dead-lettered or committed) while records
        /// wait, and no known fault holds them, after which /healthz fails (the kubelet restarts
        /// a hung worker).
        #[arg(long, env = "VECTORPIPE_STALL_SECONDS", default_value_t = 300)]
        stall_seconds: u64,
        /// The most bytes the records in flight may hold (messages, texts, vectors, encoded
        /// documents; estimated as they are read): when it is reached, reading waits.
        /// Default: a quarter of --memory-request-bytes, else 256 MiB.
        #[arg(long, env = "VECTORPIPE_MAX_IN_FLIGHT_BYTES")]
        max_in_flight_bytes: Option<usize>,
        /// The container's memory request (the operator fills it from the pod spec).
        #[arg(long, env = "VECTORPIPE_MEMORY_REQUEST_BYTES")]
        memory_request_bytes: Option<u64>,
        /// Log as JSON lines (the default in containers) or as text.
        #[arg(long, env = "VECTORPIPE_LOG_FORMAT", default_value = "json")]
        log_format: LogFormat,
    },
    /// Ask the worker running in this pod for `/healthz` or `/readyz` over its admin socket:
    /// exit 0 when it answers 200, else 1 with its answer (the kubelet's exec probes; they need
    /// no TCP port, so worker pods on the host network never clash).
    Probe {
        /// The endpoint: /healthz or /readyz.
        path: String,
        /// The worker's admin socket.
        #[arg(long, env = "VECTORPIPE_ADMIN_SOCKET")]
        socket: PathBuf,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_seconds: u64,
    },
    /// Answer searches over the pipeline's index: `POST /v1/search` embeds the query with the
    /// pipeline's model and searches by vector, by full text, or both; `POST /v1/ask` answers a
    /// question from the retrieved records with an LLM on Bedrock, citing them; a web page at
    /// `/`; plus /metrics, /healthz and /readyz. Without --pipeline: the same over the laptop
    /// mode's store with the local model (answers written by Bedrock when AWS credentials are
    /// configured, else the retrieved passages).
    Serve {
        /// A cluster pipeline file: serve its OpenSearch index. Without it, the laptop store.
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: Option<PathBuf>,
        /// Where to listen. Default: 0.0.0.0:8080 for a cluster pipeline, 127.0.0.1:8080 for
        /// the laptop store.
        #[arg(long, env = "VECTORPIPE_QUERY_ADDRESS")]
        address: Option<SocketAddr>,
        /// A Unix socket that serves the same endpoints, for `probe`.
        #[arg(long, env = "VECTORPIPE_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
        /// A bearer token every `/v1` request must carry (the operator fills it from the Secret
        /// named by spec.query.authSecretRef). Unset: no token needed.
        #[arg(long, env = "VECTORPIPE_QUERY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The Bedrock model that answers `/v1/ask` (Converse): in the embedding model's region
        /// for a cluster pipeline, in the AWS configuration's region on a laptop.
        #[arg(long, env = "VECTORPIPE_LLM_MODEL_ID", default_value = query::ask::DEFAULT_LLM_MODEL_ID)]
        llm_model_id: String,
        /// Log as JSON lines (the default in containers) or as text.
        #[arg(long, env = "VECTORPIPE_LOG_FORMAT", default_value = "json")]
        log_format: LogFormat,
        #[command(flatten)]
        laptop: LaptopArgs,
    },
    /// Send dead letters back through the pipeline once their cause is fixed: reads the
    /// dead-letter topic, takes those the options select, and writes each back to the source
    /// partition it came from with the same document ids; a record that fails again returns to
    /// the dead-letter topic with its earlier failures in `vectorpipe.history`.
    Redrive {
        /// The pipeline file.
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: PathBuf,
        #[command(flatten)]
        args: RedriveArgs,
    },
    /// The laptop mode: index a JSONL file (or stdin) with a local model into an embedded store.
    Local {
        /// The pipeline whose transform and chunking apply. Default: examples/laptop/pipeline.yaml
        /// (built in).
        #[arg(long, env = "VECTORPIPE_PIPELINE_FILE")]
        pipeline: Option<PathBuf>,
        /// The JSONL file, one record per line; `-` for stdin.
        #[arg(long, default_value = "-")]
        input: PathBuf,
        #[command(flatten)]
        laptop: LaptopArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Search the laptop mode's store, or with --pipeline a cluster pipeline's OpenSearch index:
    /// prints the best documents with their scores.
    Search {
        /// The question or text to search for.
        query: String,
        /// A cluster pipeline file: search its index with its model instead of the laptop store.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        options: QueryOptions,
        #[command(flatten)]
        laptop: LaptopArgs,
        /// Print the hits as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Answer a question from the retrieved records with an LLM on Bedrock, citing them (what
    /// `POST /v1/ask` of `serve` answers): from the laptop store, or with --pipeline from a
    /// cluster pipeline's index. On a laptop without AWS credentials: the retrieved passages.
    Ask {
        /// The question.
        question: String,
        /// A cluster pipeline file: answer from its index instead of the laptop store.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// The Bedrock model that answers.
        #[arg(long, env = "VECTORPIPE_LLM_MODEL_ID", default_value = query::ask::DEFAULT_LLM_MODEL_ID)]
        llm_model_id: String,
        #[command(flatten)]
        options: QueryOptions,
        #[command(flatten)]
        laptop: LaptopArgs,
        /// Print the whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How `search` and `ask` retrieve.
#[derive(clap::Args, Debug)]
struct QueryOptions {
    /// How many documents (hits, or sources of an answer).
    #[arg(short, long, default_value_t = 5)]
    k: usize,
    /// vector, lexical (BM25 on the words) or hybrid (both, fused).
    #[arg(long, value_enum, default_value = "vector")]
    mode: query::Mode,
    /// Only documents whose FIELD is VALUE (repeatable).
    #[arg(long, value_name = "FIELD=VALUE")]
    term: Vec<String>,
    /// Only documents from this time on (`@timestamp`, e.g. 2026-11-01 or now-7d).
    #[arg(long)]
    since: Option<String>,
    /// Only documents up to this time.
    #[arg(long)]
    until: Option<String>,
}

/// Settings of the laptop mode (not used with --pipeline, except by `local`).
#[derive(clap::Args, Debug)]
struct LaptopArgs {
    /// The laptop store's directory (created when missing).
    #[arg(long, env = "VECTORPIPE_STORE", default_value = ".vectorpipe/store")]
    store: PathBuf,
    /// The local model's directory (config.json, tokenizer.json, model.onnx, libonnxruntime.so).
    /// Default: where examples/laptop/install-model.sh puts all-MiniLM-L6-v2.
    #[arg(long, env = "VECTORPIPE_MODEL_DIR")]
    model: Option<PathBuf>,
}

impl LaptopArgs {
    fn model(&self) -> anyhow::Result<local::model::LocalModel> {
        let dir = self.model.clone().unwrap_or_else(local::default_model_dir);
        Ok(local::model::LocalModel::load(&dir)?)
    }

    fn open(&self) -> anyhow::Result<(local::model::LocalModel, local::store::Store)> {
        let model = self.model()?;
        let store = local::store::Store::open(&self.store, model.name(), model.dimensions())?;
        Ok((model, store))
    }
}

fn laptop_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn local_ingest(
    pipeline: Option<PathBuf>,
    input: PathBuf,
    laptop: LaptopArgs,
    json: bool,
) -> anyhow::Result<()> {
    let spec = match &pipeline {
        Some(path) => config::load(path)?,
        None => config::parse(
            local::DEFAULT_PIPELINE,
            std::path::Path::new("examples/laptop/pipeline.yaml"),
        )?,
    };
    // One writer at a time; held until this run ends.
    let _writer = local::store::lock_for_writing(&laptop.store)?;
    let (model, store) = laptop.open()?;
    let model_name = model.name().to_owned();
    let started = std::time::Instant::now();
    let (summary, source) = if input.as_os_str() == "-" {
        let stdin = std::io::stdin().lock();
        let summary =
            local::ingest(&spec, stdin, "stdin", None, model, store, &laptop.store).await?;
        (summary, "stdin".to_owned())
    } else {
        let file = std::fs::File::open(&input)
            .map_err(|e| anyhow::anyhow!("cannot open --input {}: {e}", input.display()))?;
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "input".to_owned());
        let reader = std::io::BufReader::new(file);
        // A first pass counts the records, for the progress's total and time left.
        let total = local::count_records(&input).ok();
        let summary =
            local::ingest(&spec, reader, &name, total, model, store, &laptop.store).await?;
        (summary, input.display().to_string())
    };
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{source}: {} records → {} documents embedded with {} into {} in {:.1} s \
             ({} unchanged, {} skipped, {} left-over chunks deleted, {} dead-lettered{}); \
             {} documents in the store",
            summary.records,
            summary.indexed,
            model_name,
            laptop.store.display(),
            started.elapsed().as_secs_f64(),
            summary.unchanged,
            summary.skipped,
            summary.deleted,
            summary.dead_lettered,
            if summary.dead_lettered > 0 {
                format!(
                    ", see {}",
                    laptop.store.join("dead-letters.jsonl").display()
                )
            } else {
                String::new()
            },
            summary.stored,
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn init_logging(spec: &EmbeddingPipelineSpec, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&spec.workers.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[allow(clippy::too_many_arguments)]
async fn run(
    pipeline: PathBuf,
    name: Option<String>,
    namespace: Option<String>,
    (metrics_address, admin_socket): (Option<SocketAddr>, Option<PathBuf>),
    drain_seconds: u64,
    stall_seconds: u64,
    (max_in_flight_bytes, memory_request_bytes): (Option<usize>, Option<u64>),
    log_format: LogFormat,
) -> anyhow::Result<()> {
    let spec = config::load(&pipeline)?;
    init_logging(&spec, log_format);
    let identity = config::identity(&pipeline);
    let name = name.or(identity.name).unwrap_or_else(|| {
        pipeline
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".to_owned())
    });
    let namespace = namespace
        .or(identity.namespace)
        .unwrap_or_else(|| "default".to_owned());
    let group_id = spec.source.kafka.consumer_group(&namespace, &name);
    let dimensions = spec.embedding.bedrock.vector_dimensions()?;

    let (metrics, registry) = metrics::Metrics::new(&name);
    let metrics = Arc::new(metrics);
    let health = Arc::new(health::Health::new(
        metrics.clone(),
        Duration::from_secs(stall_seconds),
    ));
    let address = metrics_address.unwrap_or_else(|| {
        SocketAddr::from((
            [0, 0, 0, 0],
            spec.workers.metrics_port.clamp(1, 65535) as u16,
        ))
    });
    let bound = http::serve(address, admin_socket.as_deref(), registry, health.clone()).await?;
    tracing::info!(pipeline = %name, %namespace, group_id, metrics = %bound, "starting");

    let sink = sink::opensearch::OpenSearchIndex::new(
        spec.sink.opensearch.clone(),
        dimensions,
        Duration::from_secs(60),
    )
    .await?;
    // The sink must be usable before any record is read: a wrong mapping stops the worker
    // instead of filling the dead-letter topic. Unreachable clusters are retried.
    let mut attempt = 0;
    loop {
        match sink.ensure_index().await {
            Ok(()) => break,
            Err(sink::SinkError::Transient(e)) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "OpenSearch is not reachable yet; retrying");
                tokio::time::sleep(retry::RetryPolicy::STARTUP.wait(attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let embedder =
        embed::bedrock::BedrockEmbedder::new(spec.embedding.bedrock.clone(), metrics.clone()).await;
    check_embedder(&embedder, dimensions as usize, &health, &metrics).await?;
    let options = pipeline::Options {
        group_id,
        drain_timeout: Duration::from_secs(drain_seconds),
        commit_interval: Duration::from_secs(1),
        max_commit_interval: Duration::from_secs(5),
        max_in_flight_bytes: in_flight_budget(max_in_flight_bytes, memory_request_bytes),
    };
    pipeline::run(
        spec,
        options,
        Arc::new(embedder),
        Arc::new(sink),
        metrics,
        health,
        shutdown_signal(),
    )
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The in-flight byte budget: as set, else a quarter of the memory request, else 256 MiB; never
/// below 16 MiB (a record larger than the budget still goes, alone).
fn in_flight_budget(set: Option<usize>, memory_request: Option<u64>) -> usize {
    let budget = set.unwrap_or_else(|| match memory_request {
        Some(bytes) if bytes > 0 => usize::try_from(bytes / 4).unwrap_or(usize::MAX),
        _ => 256 << 20,
    });
    budget.max(16 << 20)
}

/// One embedding call before any record is read: a model id, region, permission or request the
/// model does not take fails the start with what to fix, instead of refusing (and dead-lettering)
/// record after record. An outage is waited out (not ready meanwhile).
async fn check_embedder(
    embedder: &impl embed::Embedder,
    dimensions: usize,
    health: &health::Health,
    metrics: &metrics::Metrics,
) -> anyhow::Result<()> {
    let text = "vectorpipe start-up check: can the model embed this text?".to_owned();
    let mut attempt = 0;
    loop {
        match embedder.embed(vec![text.clone()]).await {
            Ok(vectors) => {
                // Billed like any other call.
                metrics
                    .tokens
                    .inc_by(vectors.iter().map(|v| v.tokens).sum());
                let got = vectors.first().map_or(0, |v| v.vector.len());
                anyhow::ensure!(
                    got == dimensions,
                    "the embedding model answered with {got} dimensions, the pipeline expects {dimensions}; set embedding.bedrock.dimensions to what the model returns"
                );
                health.clear(health::Fault::Embedding);
                tracing::info!(
                    dimensions,
                    "the embedding model answered the start-up check"
                );
                return Ok(());
            }
            Err(e @ (embed::EmbedError::Rejected(_) | embed::EmbedError::Failed { .. })) => {
                anyhow::bail!(
                    "the embedding model refused a start-up check call, so no record was read: {e}; check embedding.bedrock.modelId (the exact id with its version suffix such as amazon.titan-embed-text-v2:0, or an inference profile id), and that its dimensions and inputType are ones the model takes"
                );
            }
            Err(e @ embed::EmbedError::Misconfigured(_)) => {
                anyhow::bail!("the embedding model cannot be called, so no record was read: {e}");
            }
            Err(e @ embed::EmbedError::Unavailable { .. }) => {
                attempt += 1;
                let what = format!(
                    "the start-up check call to the embedding model failed: {e}; if this lasts, check embedding.bedrock.region and endpointUrl and the network path to Bedrock"
                );
                health.hold(health::Fault::Embedding, &what);
                tokio::time::sleep(retry::RetryPolicy::STARTUP.wait(attempt)).await;
            }
        }
    }
}

/// A searcher, the metrics registry it counts in, and what `/v1/info` says.
type Served<E, B> = (
    Arc<query::server::Searcher<E, B>>,
    prometheus_client::registry::Registry,
    serde_json::Value,
);

/// The searcher of a cluster pipeline: its OpenSearch index, its model (queries embedded as
/// queries) and the answering model.
async fn cluster_searcher(
    spec: &EmbeddingPipelineSpec,
    name: &str,
    llm_model_id: String,
) -> anyhow::Result<Served<embed::bedrock::BedrockEmbedder, query::opensearch::OpenSearchBackend>> {
    let dimensions = spec.embedding.bedrock.vector_dimensions()?;
    let (metrics, mut registry) = metrics::Metrics::new(name);
    let query_metrics = query::server::QueryMetrics::new(&mut registry);
    let index = sink::opensearch::OpenSearchIndex::new(
        spec.sink.opensearch.clone(),
        dimensions,
        Duration::from_secs(30),
    )
    .await?;
    // The query is embedded as a query: models that tell the two apart (Cohere) want it so.
    let mut model = spec.embedding.bedrock.clone();
    model.input_type = Some(vectorpipe_crds::v1alpha1::CohereInputType::SearchQuery);
    let embedder = embed::bedrock::BedrockEmbedder::new(model, Arc::new(metrics)).await;
    let info = serde_json::json!({
        "pipeline": name,
        "index": spec.sink.opensearch.index,
        "model": spec.embedding.bedrock.model_id,
        "llmModel": llm_model_id,
    });
    let llm = query::ask::Llm::new(embedder.client(), llm_model_id);
    let searcher = Arc::new(query::server::Searcher::new(
        query::opensearch::OpenSearchBackend::new(spec.sink.opensearch.clone(), index),
        embedder,
        Ok(llm),
        query_metrics,
    ));
    Ok((searcher, registry, info))
}

/// The searcher of the laptop store: the local model, and Bedrock as the answering model when
/// AWS credentials are configured (else answers are the retrieved passages).
async fn laptop_searcher(
    laptop: &LaptopArgs,
    llm_model_id: Option<String>,
) -> anyhow::Result<Served<local::model::LocalModel, query::local::LocalBackend>> {
    let model = laptop.model()?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("vectorpipe_worker");
    let query_metrics = query::server::QueryMetrics::new(&mut registry);
    let llm = match llm_model_id {
        Some(id) => query::ask::Llm::from_environment(id).await,
        None => Err("not asked for".to_owned()),
    };
    let info = serde_json::json!({
        "pipeline": "laptop",
        "index": laptop.store.display().to_string(),
        "model": model.name(),
        "llmModel": llm.as_ref().map(|l| l.model_id().to_owned()).unwrap_or_default(),
    });
    let backend =
        query::local::LocalBackend::new(laptop.store.clone(), model.name(), model.dimensions());
    let searcher = Arc::new(query::server::Searcher::new(
        backend,
        model,
        llm,
        query_metrics,
    ));
    Ok((searcher, registry, info))
}

/// The query server of a pipeline, or of the laptop store, until SIGTERM/SIGINT.
async fn serve(
    pipeline: Option<PathBuf>,
    (address, admin_socket): (Option<SocketAddr>, Option<PathBuf>),
    (llm_model_id, token): (String, Option<String>),
    log_format: LogFormat,
    laptop: LaptopArgs,
) -> anyhow::Result<()> {
    let Some(pipeline) = pipeline else {
        let served = laptop_searcher(&laptop, Some(llm_model_id)).await?;
        let address = address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        return serve_until_stopped(served, token, (address, admin_socket), |bound| {
            eprintln!(
                "serving the store {} at http://{bound}/ (search and ask there, or POST /v1/search and /v1/ask); Ctrl-C stops",
                laptop.store.display()
            );
        })
        .await;
    };
    let spec = config::load(&pipeline)?;
    init_logging(&spec, log_format);
    let name = config::identity(&pipeline)
        .name
        .unwrap_or_else(|| "pipeline".to_owned());
    let served = cluster_searcher(&spec, &name, llm_model_id).await?;
    let address = address.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    serve_until_stopped(served, token, (address, admin_socket), |bound| {
        tracing::info!(pipeline = %name, address = %bound, index = %spec.sink.opensearch.index, "serving searches");
    })
    .await
}

/// Serves the searcher on `address` (`announce` is told where), gets it ready (not ready
/// meanwhile), then serves until SIGTERM/SIGINT.
async fn serve_until_stopped<E: embed::Embedder, B: query::Backend>(
    (searcher, registry, info): Served<E, B>,
    token: Option<String>,
    (address, admin_socket): (SocketAddr, Option<PathBuf>),
    announce: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let bound = query::server::serve(
        searcher.clone(),
        registry,
        info,
        token,
        (address, admin_socket.as_deref()),
    )
    .await?;
    announce(bound);
    tokio::select! {
        started = searcher.start() => started?,
        () = shutdown_signal() => return Ok(()),
    }
    shutdown_signal().await;
    tracing::info!("stopped");
    Ok(())
}

/// Filters from the command line: `--term FIELD=VALUE` (repeated: every one must match) and
/// `--since` / `--until` on `@timestamp`.
fn cli_filter(
    terms: &[String],
    since: Option<String>,
    until: Option<String>,
) -> anyhow::Result<query::Filter> {
    let mut filter = query::Filter::default();
    for term in terms {
        let (field, value) = term
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--term {term:?} is not FIELD=VALUE"))?;
        filter.term.insert(
            field.to_owned(),
            serde_json::Value::String(value.to_owned()),
        );
    }
    if since.is_some() || until.is_some() {
        filter.range.insert(
            "@timestamp".to_owned(),
            query::Range {
                gte: since.map(serde_json::Value::String),
                lte: until.map(serde_json::Value::String),
                ..query::Range::default()
            },
        );
    }
    Ok(filter)
}

/// Prints ranked hits: rank, score, id, the metadata fields but `hide`, and the text's start.
fn print_ranked(hits: &[query::Hit], hide: &[&str]) {
    for (rank, hit) in hits.iter().enumerate() {
        let fields: Vec<String> = hit
            .metadata
            .iter()
            .filter(|(name, _)| !hide.contains(&name.as_str()))
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => format!("{name}={s}"),
                other => format!("{name}={other}"),
            })
            .collect();
        let start: String = hit.text.chars().take(160).collect();
        let ellipsis = if hit.text.chars().count() > 160 {
            "…"
        } else {
            ""
        };
        println!(
            "{:>2}. {:.3}  {}  [{}]\n    {start}{ellipsis}",
            rank + 1,
            hit.score,
            hit.id,
            fields.join(", ")
        );
    }
}

/// What `search` and `ask` print.
struct Printing {
    json: bool,
    /// Metadata fields left out of the text output.
    hide: &'static [&'static str],
}

/// `search` and `ask`: one search or one question (`ask` names the answering model), printed.
async fn query_once<E: embed::Embedder, B: query::Backend>(
    searcher: &query::server::Searcher<E, B>,
    question: String,
    options: QueryOptions,
    ask: bool,
    printing: Printing,
) -> anyhow::Result<()> {
    let filter = cli_filter(&options.term, options.since, options.until)?;
    if ask {
        let request = query::ask::AskRequest {
            question,
            k: options.k,
            filter,
            mode: options.mode,
            weight: None,
            min_score: None,
        };
        let answer = searcher.ask(&request).await?;
        if printing.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(());
        }
        println!("{}\n", answer.answer);
        if answer.found {
            println!("Cited:");
            for citation in &answer.citations {
                println!("  [{}] {}", citation.n, citation.hit.id);
            }
        } else if !answer.sources.is_empty() && answer.retrieval_only.is_some() {
            print_ranked(&answer.sources, printing.hide);
        }
        match &answer.retrieval_only {
            Some(why) => println!(
                "\n{} passages; no answering model: {why}",
                answer.sources.len()
            ),
            None => println!(
                "\n{} sources; {} ({} input, {} output tokens)",
                answer.sources.len(),
                if answer.model.is_empty() {
                    "no model asked"
                } else {
                    &answer.model
                },
                answer.usage.input_tokens,
                answer.usage.output_tokens
            ),
        }
        return Ok(());
    }
    let request = query::SearchRequest {
        query: question,
        k: options.k,
        filter,
        mode: options.mode,
        weight: None,
    };
    let hits = searcher.search(&request).await?;
    if printing.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
    } else if hits.is_empty() {
        println!("No document matched the query and its filters.");
    } else {
        print_ranked(&hits, printing.hide);
    }
    Ok(())
}

/// `search --pipeline` and `ask --pipeline`: against a cluster pipeline's index.
async fn cluster_query(
    pipeline: PathBuf,
    question: String,
    (options, json): (QueryOptions, bool),
    ask: Option<String>,
) -> anyhow::Result<()> {
    let spec = config::load(&pipeline)?;
    let name = config::identity(&pipeline)
        .name
        .unwrap_or_else(|| "pipeline".to_owned());
    let llm_model_id = ask
        .clone()
        .unwrap_or_else(|| query::ask::DEFAULT_LLM_MODEL_ID.to_owned());
    let (searcher, _, _) = cluster_searcher(&spec, &name, llm_model_id).await?;
    tokio::time::timeout(Duration::from_secs(60), searcher.start())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "not ready after 60 s: {}",
                searcher.not_ready().unwrap_or_default()
            )
        })??;
    let printing = Printing { json, hide: &[] };
    query_once(&searcher, question, options, ask.is_some(), printing).await
}

/// `search` and `ask` without --pipeline: against the laptop store.
async fn laptop_query(
    laptop: LaptopArgs,
    question: String,
    (options, json): (QueryOptions, bool),
    ask: Option<String>,
) -> anyhow::Result<()> {
    let asking = ask.is_some();
    let (searcher, _, _) = laptop_searcher(&laptop, ask).await?;
    // One try: an empty store is said at once, not waited for.
    searcher.start_once().await?;
    // The title repeats the text's first sentence.
    let printing = Printing {
        json,
        hide: &["title"],
    };
    query_once(&searcher, question, options, asking, printing).await
}

/// Runs a long-lived command (`run`, `serve`) on the full runtime; its error is logged and
/// printed.
fn service(what: &str, command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    execute(tokio::runtime::Runtime::new(), command, Some(what))
}

/// Runs a laptop-mode command on a small runtime and reports its error.
fn laptop(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    laptop_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    execute(runtime, command, None)
}

/// Runs `command` to its end on `runtime`: exit 0, or 1 with the error printed (and logged as
/// what stopped, when `logged` names it).
fn execute(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    command: impl std::future::Future<Output = anyhow::Result<()>>,
    logged: Option<&str>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(what) = logged {
                tracing::error!(error = %format!("{e:#}"), "{what} stopped on an error");
            }
            eprintln!("vectorpipe-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A time given as RFC 3339 or as an age before now (`2h`, `3d`), in milliseconds since the
/// epoch.
fn time_or_age(text: &str) -> anyhow::Result<i64> {
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Ok(at.as_millisecond());
    }
    match text.parse::<jiff::SignedDuration>() {
        Ok(age) => Ok(jiff::Timestamp::now().as_millisecond() - age.as_millis() as i64),
        Err(_) => anyhow::bail!(
            "{text:?} is neither a time (2026-12-01T08:00:00Z) nor an age (90m, 2h, 3d)"
        ),
    }
}

/// What `redrive` selects and how it reports.
#[derive(clap::Args, Debug)]
struct RedriveArgs {
    /// Only dead letters of this reason (repeatable or comma-separated): parse,
    /// missing-field, embedding-rejected, embedding-failed, index-rejected, too-large,
    /// unresolvable-tombstone.
    #[arg(long, value_delimiter = ',')]
    reason: Vec<String>,
    /// Only dead letters written since: a time (2026-12-01T08:00:00Z) or an age (2h, 3d).
    #[arg(long)]
    since: Option<String>,
    /// Only dead letters written before: a time or an age.
    #[arg(long)]
    until: Option<String>,
    /// Only records from this partition of the source topic (repeatable or
    /// comma-separated).
    #[arg(long, value_delimiter = ',')]
    partition: Vec<i32>,
    /// The most records to redrive.
    #[arg(long)]
    limit: Option<usize>,
    /// Count what would be redriven; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (a Job's /dev/termination-log, where
    /// `kubectl vectorpipe redrive` reads it).
    #[arg(long, env = "VECTORPIPE_TERMINATION_LOG")]
    termination_log: Option<PathBuf>,
}

async fn redrive(pipeline: PathBuf, args: RedriveArgs) -> anyhow::Result<()> {
    let spec = config::load(&pipeline)?;
    for reason in &args.reason {
        anyhow::ensure!(
            transform::RejectionKind::ALL
                .iter()
                .any(|k| k.as_str() == reason),
            "{reason:?} is not a dead-letter reason; use one of {}",
            transform::RejectionKind::ALL.map(|k| k.as_str()).join(", ")
        );
    }
    let selection = redrive::Selection {
        reasons: args.reason,
        since_ms: args.since.as_deref().map(time_or_age).transpose()?,
        until_ms: args.until.as_deref().map(time_or_age).transpose()?,
        partitions: args.partition,
        limit: args.limit,
    };
    let report = redrive::redrive(&spec, &selection, args.dry_run).await?;
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &args.termination_log
        && let Err(e) = std::fs::write(path, &json)
    {
        eprintln!("cannot write the report to {}: {e}", path.display());
    }
    if args.json {
        println!("{json}");
        return Ok(());
    }
    for line in report.lines() {
        println!("{line}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Redrive { pipeline, args } => laptop(redrive(pipeline, args)),
        Command::Local {
            pipeline,
            input,
            laptop: args,
            json,
        } => laptop(local_ingest(pipeline, input, args, json)),
        Command::Search {
            query,
            pipeline: Some(pipeline),
            options,
            json,
            ..
        } => laptop(cluster_query(pipeline, query, (options, json), None)),
        Command::Search {
            query,
            pipeline: None,
            options,
            laptop: args,
            json,
        } => laptop(laptop_query(args, query, (options, json), None)),
        Command::Ask {
            question,
            pipeline: Some(pipeline),
            llm_model_id,
            options,
            json,
            ..
        } => laptop(cluster_query(
            pipeline,
            question,
            (options, json),
            Some(llm_model_id),
        )),
        Command::Ask {
            question,
            pipeline: None,
            llm_model_id,
            options,
            laptop: args,
            json,
        } => laptop(laptop_query(
            args,
            question,
            (options, json),
            Some(llm_model_id),
        )),
        Command::Probe {
            path,
            socket,
            timeout_seconds,
        } => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let timeout = Duration::from_secs(timeout_seconds);
            match runtime.block_on(http::probe(&socket, &path, timeout)) {
                Ok((200, body)) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Ok((status, body)) => {
                    print!("{status}: {body}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    println!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            pipeline,
            address,
            admin_socket,
            token,
            llm_model_id,
            log_format,
            laptop: args,
        } => {
            let command = serve(
                pipeline.clone(),
                (address, admin_socket),
                (llm_model_id, token),
                log_format,
                args,
            );
            if pipeline.is_some() {
                service("the query server", command)
            } else {
                laptop_logging();
                execute(tokio::runtime::Runtime::new(), command, None)
            }
        }
        Command::Check { pipeline } => match config::load(&pipeline) {
            Ok(spec) => {
                println!(
                    "{}: ok (model {}, index {})",
                    pipeline.display(),
                    spec.embedding.bedrock.model_id,
                    spec.sink.opensearch.index
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            pipeline,
            name,
            namespace,
            metrics_address,
            admin_socket,
            drain_seconds,
            stall_seconds,
            max_in_flight_bytes,
            memory_request_bytes,
            log_format,
        } => service(
            "the worker",
            run(
                pipeline,
                name,
                namespace,
                (metrics_address, admin_socket),
                drain_seconds,
                stall_seconds,
                (max_in_flight_bytes, memory_request_bytes),
                log_format,
            ),
        ),
    }
}
