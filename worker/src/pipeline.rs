//! The running pipeline: Kafka → transform → dedup → embed → bulk index → commit.
//!
//! Four tasks joined by bounded channels, so a slow embedder or sink holds the consumer back and
//! memory stays bounded at any lag:
//! - the consumer reads records, transforms them and registers them with the offset tracker;
//! - the embed stage batches texts (across records, up to the model's batch size) and calls the
//!   embedder, at most `maxInFlight` calls at once (fewer while Bedrock throttles);
//! - the sink stage fills `_bulk` requests (docs, bytes, flush interval), retries 429/5xx items,
//!   and sends refused documents' records to the dead-letter topic;
//! - the committer commits, per partition, everything below the lowest unfinished record.
//!
//! A record's offset is committed only once every one of its documents is acknowledged by
//! OpenSearch, or the record is in the dead-letter topic, or it was skipped on purpose.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

use crate::embed::bedrock::backoff;
use crate::embed::{EmbedError, Embedder};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, Partition};
use crate::sink::opensearch::{IndexRequest, ItemResult, Sink, document_source};
use crate::sink::record_ids;
use crate::source::{self, Context};
use crate::transform::{self, Document, Outcome, Rejection, RejectionKind, SourceRecord};

/// How long the next stage may stay full before the consumer pauses its partitions.
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// How long the embed stage waits to fill a multi-text batch before sending what it has.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// Settings that are not part of the spec.
#[derive(Clone, Debug)]
pub struct Options {
    /// The consumer group.
    pub group_id: String,
    /// How long a stopping worker may take to finish in-flight work.
    pub drain_timeout: Duration,
    /// Commit interval while keeping up.
    pub commit_interval: Duration,
    /// Commit interval while working through a backlog.
    pub max_commit_interval: Duration,
}

/// A record as kept while its documents are in flight (for the dead-letter topic).
#[derive(Debug)]
struct Origin {
    partition: Partition,
    offset: i64,
    /// The record as read (its key and value go to the dead-letter topic as they were).
    message: OwnedMessage,
    /// The record id when records with the same id must be written one after the other.
    parent: Option<String>,
    /// Units of work (documents) not finished yet.
    remaining: AtomicUsize,
}

struct EmbedJob {
    origin: Arc<Origin>,
    docs: Vec<Document>,
}

enum SinkItem {
    Index {
        origin: Arc<Origin>,
        request: IndexRequest,
        bytes: usize,
    },
    Delete {
        origin: Arc<Origin>,
        parent_id: String,
    },
}

/// State shared by the stages.
struct Shared {
    spec: EmbeddingPipelineSpec,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetters,
    /// Record ids with a record in flight: a later record with the same id waits for it, so
    /// versions and tombstones of one record reach OpenSearch in the order they were read.
    active: Mutex<HashSet<String>>,
    /// Signalled when a record id leaves `active`.
    released: Notify,
    /// Asks the sink stage to send what it holds now (someone waits for it).
    flush_now: Notify,
}

impl Shared {
    /// Marks work of a record done; true when the record is complete.
    fn finish(&self, origin: &Origin, units: usize) -> bool {
        let before = origin
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                Some(r.saturating_sub(units))
            })
            .unwrap_or(0);
        if before > 0
            && before <= units
            && let Some(parent) = &origin.parent
        {
            self.active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(parent);
            self.released.notify_waiters();
        }
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(&origin.partition, origin.offset, units)
    }

    /// Waits until no record with this id is in flight and claims the id; false on shutdown.
    async fn claim<F: std::future::Future<Output = ()>>(
        &self,
        parent: &str,
        shutdown: &mut std::pin::Pin<&mut F>,
    ) -> bool {
        let mut waited = false;
        loop {
            let released = self.released.notified();
            if self
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(parent.to_owned())
            {
                return true;
            }
            if !waited {
                waited = true;
                self.metrics.same_id_waits.inc();
            }
            self.flush_now.notify_one();
            tokio::select! {
                () = released => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = shutdown.as_mut() => return false,
            }
        }
    }
}

/// The dead-letter topic, or the log when none is configured.
struct DeadLetters {
    producer: Option<FutureProducer<source::TokenContext>>,
    topic: Option<String>,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// Writes the record with the reason in its headers; retries until the broker takes it.
    async fn send(&self, origin: &Origin, rejection: &Rejection) {
        let (topic, partition) = &origin.partition;
        let label = format!("dead-lettered-{}", rejection.kind.as_str());
        let (Some(producer), Some(dlq)) = (&self.producer, &self.topic) else {
            self.metrics
                .record(&format!("skipped-{}", rejection.kind.as_str()));
            tracing::warn!(
                topic, partition, offset = origin.offset, reason = rejection.kind.as_str(),
                error = %rejection.message,
                "skipping a record that cannot be indexed (no deadLetter.topic is configured)"
            );
            return;
        };
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis().to_string())
            .unwrap_or_default();
        let partition_text = partition.to_string();
        let offset_text = origin.offset.to_string();
        let mut attempt = 0;
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "vectorpipe.reason",
                    value: Some(rejection.kind.as_str()),
                })
                .insert(Header {
                    key: "vectorpipe.error",
                    value: Some(rejection.message.as_str()),
                })
                .insert(Header {
                    key: "vectorpipe.source.topic",
                    value: Some(topic.as_str()),
                })
                .insert(Header {
                    key: "vectorpipe.source.partition",
                    value: Some(partition_text.as_str()),
                })
                .insert(Header {
                    key: "vectorpipe.source.offset",
                    value: Some(offset_text.as_str()),
                })
                .insert(Header {
                    key: "vectorpipe.time",
                    value: Some(time.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(headers);
            if let Some(key) = origin.message.key() {
                record = record.key(key);
            }
            if let Some(payload) = origin.message.payload() {
                record = record.payload(payload);
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => {
                    self.metrics.record(&label);
                    tracing::info!(
                        topic, partition, offset = origin.offset, reason = rejection.kind.as_str(),
                        error = %rejection.message, dead_letter_topic = dlq.as_str(),
                        "record sent to the dead-letter topic"
                    );
                    return;
                }
                Err((e, _)) => {
                    attempt += 1;
                    tracing::error!(error = %e, dead_letter_topic = dlq.as_str(), attempt, "cannot write to the dead-letter topic; retrying");
                    tokio::time::sleep(backoff(
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                        attempt,
                    ))
                    .await;
                }
            }
        }
    }
}

/// The content hash used by deduplication.
fn content_hash(docs: &[Document]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for doc in docs {
        hasher.update(doc.text.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().into()
}

/// Runs the pipeline until `shutdown` resolves, then drains and commits.
pub async fn run<E: Embedder>(
    spec: EmbeddingPipelineSpec,
    options: Options,
    embedder: Arc<E>,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let kafka = &spec.source.kafka;
    let tracker = Arc::new(Mutex::new(OffsetTracker::new()));
    let assigned = Arc::new(Mutex::new(Vec::new()));
    let context = Context {
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        assigned: assigned.clone(),
        msk_iam_region: source::msk_iam_region(kafka),
        ready: ready.clone(),
    };
    let consumer: Arc<StreamConsumer<Context>> =
        Arc::new(source::consumer_config(kafka, &options.group_id)?.create_with_context(context)?);
    match (&kafka.topics, &kafka.topic_pattern) {
        (Some(topics), _) => {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        (None, Some(pattern)) => consumer.subscribe(&[&format!("^{pattern}")])?,
        (None, None) => anyhow::bail!("source.kafka needs topics or topicPattern"),
    }
    let dead_letters = DeadLetters {
        producer: match &spec.dead_letter {
            Some(_) => Some(
                source::client_config(kafka)?
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "5")
                    .create_with_context(source::TokenContext {
                        msk_iam_region: source::msk_iam_region(kafka),
                    })?,
            ),
            None => None,
        },
        topic: spec.dead_letter.as_ref().map(|d| d.topic.clone()),
        metrics: metrics.clone(),
    };
    let dedup: Option<Cache<String, [u8; 32]>> = spec.dedup.enabled.then(|| {
        Cache::builder()
            .max_capacity(spec.dedup.max_entries.max(1) as u64)
            .time_to_live(spec.dedup.ttl.get())
            .build()
    });
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
        dead_letters,
        active: Mutex::new(HashSet::new()),
        released: Notify::new(),
        flush_now: Notify::new(),
    });

    let in_flight = spec.embedding.bedrock.max_in_flight.max(1) as usize;
    let batch = embedder.batch_size().max(1);
    let (embed_tx, embed_rx) = mpsc::channel::<EmbedJob>(in_flight * batch);
    let (sink_tx, sink_rx) =
        mpsc::channel::<SinkItem>((spec.sink.opensearch.bulk.max_docs.max(1) as usize) * 2);

    let mut stages = JoinSet::new();
    stages.spawn(embed_stage(
        embed_rx,
        embedder,
        sink_tx.clone(),
        shared.clone(),
    ));
    stages.spawn(sink_stage(sink_rx, sink, shared.clone()));
    let stop_committer = Arc::new(Notify::new());
    let committer = tokio::spawn(commit_loop(
        consumer.clone(),
        shared.clone(),
        options.clone(),
        stop_committer.clone(),
    ));

    // Ready once the group has assigned this worker its share (see source::Context); the sink
    // was checked before the pipeline started.
    tokio::pin!(shutdown);
    // Messages that arrived while consumption was paused, handled before reading on.
    let mut held: VecDeque<OwnedMessage> = VecDeque::new();
    loop {
        let message = match held.pop_front() {
            Some(message) => {
                let owned = assigned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&(message.topic().to_owned(), message.partition()));
                if !owned {
                    // Its partition was revoked meanwhile: its new owner reads it.
                    continue;
                }
                message
            }
            None => {
                let received = tokio::select! {
                    () = &mut shutdown => break,
                    message = consumer.recv() => message,
                };
                match received {
                    Ok(m) => m.detach(),
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        let partition: Partition = (message.topic().to_owned(), message.partition());
        let record = SourceRecord {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            timestamp_ms: message.timestamp().to_millis(),
        };
        let outcome = transform::transform(&spec, &record);
        // Records with ids of their own (idPointer) can be updated and deleted: one at a time per
        // id. Positional ids are unique, so nothing needs ordering there.
        let parent = match &outcome {
            Outcome::Index(docs) if spec.transform.id_pointer.is_some() => {
                docs.first().map(|d| d.parent_id.clone())
            }
            Outcome::Delete(parent_id) => Some(parent_id.clone()),
            _ => None,
        };
        let origin = Arc::new(Origin {
            partition: partition.clone(),
            offset: message.offset(),
            message,
            parent,
            remaining: AtomicUsize::new(0),
        });
        let start = |units: usize| {
            origin.remaining.store(units, Ordering::SeqCst);
            tracker.lock().unwrap_or_else(|e| e.into_inner()).start(
                &partition,
                origin.offset,
                units,
            );
        };
        match outcome {
            Outcome::Skip(reason) => {
                start(0);
                metrics.record(&format!("skipped-{}", reason.as_str()));
                tracing::debug!(topic = %partition.0, partition = partition.1, offset = origin.offset, reason = reason.as_str(), "skipped a record");
            }
            Outcome::Reject(rejection) => {
                start(1);
                let shared = shared.clone();
                tokio::spawn(async move {
                    shared.dead_letters.send(&origin, &rejection).await;
                    let _ = shared.finish(&origin, 1);
                });
            }
            Outcome::Delete(parent_id) => {
                if !shared.claim(&parent_id, &mut shutdown).await {
                    break;
                }
                start(1);
                if let Some(cache) = &dedup {
                    cache.invalidate(&parent_id);
                }
                let item = SinkItem::Delete { origin, parent_id };
                if !hand_over(
                    &sink_tx,
                    item,
                    &consumer,
                    &mut held,
                    &metrics,
                    &mut shutdown,
                )
                .await
                {
                    break;
                }
            }
            Outcome::Index(docs) => {
                if let Some(cache) = &dedup {
                    let hash = content_hash(&docs);
                    let id = docs[0].parent_id.clone();
                    if cache.get(&id) == Some(hash) {
                        start(0);
                        metrics.record("skipped-duplicate");
                        continue;
                    }
                    cache.insert(id, hash);
                }
                if let Some(parent) = &origin.parent
                    && !shared.claim(parent, &mut shutdown).await
                {
                    break;
                }
                start(docs.len());
                let job = EmbedJob { origin, docs };
                if !hand_over(
                    &embed_tx,
                    job,
                    &consumer,
                    &mut held,
                    &metrics,
                    &mut shutdown,
                )
                .await
                {
                    break;
                }
            }
        }
    }

    tracing::info!("stopping: finishing in-flight work");
    ready.store(false, Ordering::SeqCst);
    drop(embed_tx);
    drop(sink_tx);
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while stages.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?options.drain_timeout, "in-flight work did not finish in time; it will be read again after restart");
        stages.abort_all();
    }
    stop_committer.notify_one();
    let _ = committer.await;
    let offsets = tracker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .committable();
    if !offsets.is_empty() {
        source::commit_list(&offsets)
            .and_then(|tpl| consumer.commit(&tpl, CommitMode::Sync))
            .map_err(|e| anyhow::anyhow!("final commit failed: {e}"))?;
        tracing::info!(?offsets, "final commit");
    }
    Ok(())
}

/// Passes work to the next stage. When that stage stays full (a stall, not just a busy
/// backlog), the consumer pauses its partitions and keeps polling until there is room: the group keeps the worker (no max.poll.interval.ms
/// eviction however long Bedrock or OpenSearch stall), rebalances are served, and nothing more
/// is fetched, so memory stays bounded at any lag. Messages that arrive anyway (fetched before
/// the pause, or from partitions assigned meanwhile) are held in order and handled next.
/// False when the stage is gone or the worker is stopping.
async fn hand_over<T, F: std::future::Future<Output = ()>>(
    tx: &mpsc::Sender<T>,
    item: T,
    consumer: &StreamConsumer<Context>,
    held: &mut VecDeque<OwnedMessage>,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    let item = match tx.try_send(item) {
        Ok(()) => return true,
        Err(TrySendError::Closed(_)) => return false,
        Err(TrySendError::Full(item)) => item,
    };
    // A full queue is the normal state while working through a backlog, and room comes back
    // within milliseconds. Pausing then would cost a refetch (librdkafka drops what it fetched
    // for paused partitions), so only a stage that stays full for PAUSE_AFTER is a stall.
    tokio::select! {
        permit = tx.reserve() => {
            return match permit {
                Ok(permit) => {
                    permit.send(item);
                    true
                }
                Err(_) => false,
            };
        }
        () = tokio::time::sleep(PAUSE_AFTER) => {}
        () = shutdown.as_mut() => return false,
    }
    let pause = || match consumer.assignment() {
        Ok(tpl) => {
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing the partitions failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
    };
    pause();
    metrics.consumer_paused.set(1);
    metrics.consumer_pauses.inc();
    let started = std::time::Instant::now();
    let permit = loop {
        tokio::select! {
            permit = tx.reserve() => break permit.ok(),
            message = consumer.recv() => match message {
                Ok(message) => {
                    held.push_back(message.detach());
                    pause();
                }
                Err(e) => tracing::warn!(error = %e, "Kafka consumer error while paused"),
            },
            () = shutdown.as_mut() => break None,
        }
    };
    match consumer.assignment() {
        Ok(tpl) => {
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resuming the partitions failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
    }
    metrics.consumer_paused.set(0);
    tracing::debug!(paused = ?started.elapsed(), held = held.len(), "consumption resumed");
    match permit {
        Some(permit) => {
            permit.send(item);
            true
        }
        None => false,
    }
}

async fn commit_loop(
    consumer: Arc<StreamConsumer<Context>>,
    shared: Arc<Shared>,
    options: Options,
    stop: Arc<Notify>,
) {
    loop {
        let lag = shared.metrics.consumer_lag_total.get();
        let interval =
            source::commit_interval(lag, options.commit_interval, options.max_commit_interval);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.notified() => return,
        }
        let (offsets, open) = {
            let mut tracker = shared.tracker.lock().unwrap_or_else(|e| e.into_inner());
            (tracker.committable(), tracker.open_records())
        };
        shared.metrics.records_in_flight.set(open as i64);
        if offsets.is_empty() {
            continue;
        }
        match source::commit_list(&offsets).and_then(|tpl| consumer.commit(&tpl, CommitMode::Async))
        {
            Ok(()) => {
                shared.metrics.commit("ok");
                tracing::debug!(?offsets, "committed");
            }
            Err(e) => {
                shared.metrics.commit("error");
                tracing::warn!(error = %e, "commit failed; retrying at the next interval");
            }
        }
    }
}

/// Batches documents (across records) and embeds them.
async fn embed_stage<E: Embedder>(
    mut rx: mpsc::Receiver<EmbedJob>,
    embedder: Arc<E>,
    sink_tx: mpsc::Sender<SinkItem>,
    shared: Arc<Shared>,
) {
    let batch_size = embedder.batch_size().max(1);
    let max_tasks = shared.spec.embedding.bedrock.max_in_flight.max(1) as usize * 2;
    let mut tasks = JoinSet::new();
    let mut batch: Vec<(Arc<Origin>, Document)> = Vec::with_capacity(batch_size);
    let mut linger_until: Option<Instant> = None;
    loop {
        let job = if batch.is_empty() {
            rx.recv().await
        } else {
            let deadline = linger_until.unwrap_or_else(Instant::now);
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    dispatch(
                        &mut tasks,
                        max_tasks,
                        std::mem::take(&mut batch),
                        &embedder,
                        &sink_tx,
                        &shared,
                    )
                    .await;
                    linger_until = None;
                    continue;
                }
            }
        };
        let Some(job) = job else { break };
        for doc in job.docs {
            batch.push((job.origin.clone(), doc));
            if batch.len() >= batch_size {
                dispatch(
                    &mut tasks,
                    max_tasks,
                    std::mem::take(&mut batch),
                    &embedder,
                    &sink_tx,
                    &shared,
                )
                .await;
                linger_until = None;
            }
        }
        if !batch.is_empty() && linger_until.is_none() {
            linger_until = Some(Instant::now() + BATCH_LINGER);
        }
    }
    if !batch.is_empty() {
        dispatch(&mut tasks, max_tasks, batch, &embedder, &sink_tx, &shared).await;
    }
    while tasks.join_next().await.is_some() {}
}

async fn dispatch<E: Embedder>(
    tasks: &mut JoinSet<()>,
    max_tasks: usize,
    batch: Vec<(Arc<Origin>, Document)>,
    embedder: &Arc<E>,
    sink_tx: &mpsc::Sender<SinkItem>,
    shared: &Arc<Shared>,
) {
    while tasks.len() >= max_tasks {
        tasks.join_next().await;
    }
    tasks.spawn(embed_batch(
        batch,
        embedder.clone(),
        sink_tx.clone(),
        shared.clone(),
    ));
}

/// Embeds one batch; retries while the model is unavailable (nothing is committed meanwhile, so
/// a crash loses nothing); a refused batch is retried text by text so that only the refused
/// records go to the dead-letter topic.
async fn embed_batch<E: Embedder>(
    batch: Vec<(Arc<Origin>, Document)>,
    embedder: Arc<E>,
    sink_tx: mpsc::Sender<SinkItem>,
    shared: Arc<Shared>,
) {
    let mut queue = vec![batch];
    while let Some(batch) = queue.pop() {
        let texts: Vec<String> = batch.iter().map(|(_, d)| d.text.clone()).collect();
        let mut pause = 0;
        loop {
            match embedder.embed(texts.clone()).await {
                Ok(vectors) => {
                    for ((origin, doc), embedded) in batch.iter().zip(vectors) {
                        let source =
                            document_source(&shared.spec.sink.opensearch, doc, &embedded.vector);
                        let bytes = source.len() + doc.id.len() + 32;
                        let item = SinkItem::Index {
                            origin: origin.clone(),
                            request: IndexRequest {
                                id: doc.id.clone(),
                                parent_id: doc.parent_id.clone(),
                                chunks: doc.chunks,
                                source,
                            },
                            bytes,
                        };
                        if sink_tx.send(item).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                Err(EmbedError::Rejected(message)) if batch.len() > 1 => {
                    tracing::debug!(error = %message, size = batch.len(), "a batch was refused; retrying its texts one by one");
                    queue.extend(batch.iter().map(|item| vec![item.clone()]));
                    break;
                }
                Err(EmbedError::Rejected(message)) => {
                    let (origin, doc) = &batch[0];
                    let rejection = Rejection {
                        kind: RejectionKind::EmbeddingRejected,
                        message: format!(
                            "chunk {} of record {}: {message}",
                            doc.chunk, doc.parent_id
                        ),
                    };
                    shared.dead_letters.send(origin, &rejection).await;
                    let _ = shared.finish(origin, 1);
                    break;
                }
                Err(e) => {
                    pause += 1;
                    let wait = shared.spec.embedding.bedrock.retry.max_delay.get();
                    tracing::error!(error = %e, retry_in = ?wait, pause, "embedding is failing; holding these records until it recovers");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Fills and sends `_bulk` requests; handles tombstones in order with the documents before them.
async fn sink_stage(mut rx: mpsc::Receiver<SinkItem>, sink: Arc<Sink>, shared: Arc<Shared>) {
    let bulk = &shared.spec.sink.opensearch.bulk;
    let max_docs = bulk.max_docs.max(1) as usize;
    let max_bytes = bulk.max_bytes.max(1024) as usize;
    let flush_interval = bulk.flush_interval.get();
    let mut pending: Vec<(Arc<Origin>, IndexRequest)> = Vec::new();
    let mut bytes = 0;
    let mut deadline: Option<Instant> = None;
    let mut flushes = Flushes {
        tasks: JoinSet::new(),
        limit: bulk.concurrency.max(1) as usize,
    };
    loop {
        let due = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let item = tokio::select! {
            item = rx.recv() => item,
            () = tokio::time::sleep_until(due), if deadline.is_some() => {
                flushes.send(&sink, &shared, std::mem::take(&mut pending)).await;
                bytes = 0;
                deadline = None;
                continue;
            }
            () = shared.flush_now.notified(), if !pending.is_empty() => {
                flushes.send(&sink, &shared, std::mem::take(&mut pending)).await;
                bytes = 0;
                deadline = None;
                continue;
            }
        };
        match item {
            None => break,
            Some(SinkItem::Index {
                origin,
                request,
                bytes: size,
            }) => {
                if !pending.is_empty() && bytes + size > max_bytes {
                    flushes
                        .send(&sink, &shared, std::mem::take(&mut pending))
                        .await;
                    bytes = 0;
                }
                pending.push((origin, request));
                bytes += size;
                if pending.len() >= max_docs {
                    flushes
                        .send(&sink, &shared, std::mem::take(&mut pending))
                        .await;
                    bytes = 0;
                    deadline = None;
                } else if deadline.is_none() {
                    deadline = Some(Instant::now() + flush_interval);
                }
            }
            Some(SinkItem::Delete { origin, parent_id }) => {
                flushes
                    .send(&sink, &shared, std::mem::take(&mut pending))
                    .await;
                bytes = 0;
                deadline = None;
                let deleted = until_done("deleting a record's documents", || {
                    delete_record(&sink, &parent_id)
                })
                .await;
                shared.metrics.documents_deleted.inc_by(deleted);
                shared.metrics.record("deleted");
                let _ = shared.finish(&origin, 1);
            }
        }
    }
    flushes.send(&sink, &shared, pending).await;
    flushes.finish().await;
}

/// The `_bulk` requests in flight. Several at once are safe: records with the same id are never
/// in flight together (see `Shared::claim`), so no two requests hold versions of one record.
struct Flushes {
    tasks: JoinSet<()>,
    limit: usize,
}

impl Flushes {
    /// Starts sending a batch, after waiting for a free slot.
    async fn send(
        &mut self,
        sink: &Arc<Sink>,
        shared: &Arc<Shared>,
        batch: Vec<(Arc<Origin>, IndexRequest)>,
    ) {
        if batch.is_empty() {
            return;
        }
        while self.tasks.len() >= self.limit {
            self.tasks.join_next().await;
        }
        let (sink, shared) = (sink.clone(), shared.clone());
        self.tasks
            .spawn(async move { flush(&sink, &shared, batch).await });
    }

    /// Waits for every request in flight.
    async fn finish(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Deletes every document of a record: by id from its first document's chunk count (exact, and
/// in real time), then by query on the parent id (also finds strays, once they are searchable).
async fn delete_record(
    sink: &Sink,
    parent_id: &str,
) -> Result<u64, crate::sink::opensearch::SinkError> {
    let ids = sink.stored_ids(&[parent_id]).await?;
    let by_id = sink.delete_ids(&ids).await?;
    let by_query = sink.delete_records(&[parent_id.to_owned()]).await?;
    Ok(by_id + by_query)
}

/// Deletes the chunks that records of this batch had before and no longer have (a record that
/// shrank from 5 chunks to 2 leaves `#2`…`#4`, one that became a single document leaves all of
/// `#n`). Runs before the batch is written; retried until it succeeds.
async fn remove_stale_chunks(sink: &Sink, shared: &Shared, batch: &[(Arc<Origin>, IndexRequest)]) {
    let records: BTreeMap<&str, usize> = batch
        .iter()
        .map(|(_, r)| (r.parent_id.as_str(), r.chunks))
        .collect();
    let current: HashSet<String> = records
        .iter()
        .flat_map(|(parent, chunks)| record_ids(parent, *chunks))
        .collect();
    let parents: Vec<&str> = records.keys().copied().collect();
    let deleted = until_done("looking up or deleting stale chunks", || async {
        let stored = sink.stored_ids(&parents).await?;
        let stale: Vec<String> = stored
            .into_iter()
            .filter(|id| !current.contains(id))
            .collect();
        sink.delete_ids(&stale).await
    })
    .await;
    if deleted > 0 {
        shared.metrics.documents_deleted.inc_by(deleted);
        tracing::debug!(
            deleted,
            "deleted chunks that updated records no longer have"
        );
    }
}

/// Runs `op` until it succeeds, with jittered exponential backoff between failures: for work
/// that must happen before a record counts as done (its offset waits meanwhile).
async fn until_done<T, E, F>(what: &str, mut op: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "{what} failed; retrying");
                tokio::time::sleep(backoff(
                    Duration::from_millis(200),
                    Duration::from_secs(30),
                    attempt,
                ))
                .await;
            }
        }
    }
}

/// Sends documents until each is indexed or refused; refused ones go to the dead-letter topic.
async fn flush(sink: &Sink, shared: &Shared, mut batch: Vec<(Arc<Origin>, IndexRequest)>) {
    if batch.is_empty() {
        return;
    }
    if shared.spec.transform.id_pointer.is_some() {
        remove_stale_chunks(sink, shared, &batch).await;
    }
    let mut attempt = 0;
    while !batch.is_empty() {
        let requests: Vec<&IndexRequest> = batch.iter().map(|(_, r)| r).collect();
        let started = std::time::Instant::now();
        let results = sink.bulk(&requests).await;
        shared
            .metrics
            .bulk_latency
            .observe(started.elapsed().as_secs_f64());
        match results {
            Ok(results) => {
                let mut retry = Vec::new();
                for ((origin, request), result) in batch.into_iter().zip(results) {
                    match result {
                        ItemResult::Ok => {
                            shared.metrics.documents_indexed.inc();
                            shared.metrics.bulk_item("ok", 1);
                            if shared.finish(&origin, 1) {
                                shared.metrics.record("indexed");
                            }
                        }
                        ItemResult::Retry(reason) => {
                            shared.metrics.bulk_item("retried", 1);
                            tracing::debug!(id = %request.id, %reason, "bulk item will be retried");
                            retry.push((origin, request));
                        }
                        ItemResult::Rejected(reason) => {
                            shared.metrics.bulk_item("rejected", 1);
                            let rejection = Rejection {
                                kind: RejectionKind::IndexRejected,
                                message: format!("document {}: {reason}", request.id),
                            };
                            shared.dead_letters.send(&origin, &rejection).await;
                            let _ = shared.finish(&origin, 1);
                        }
                    }
                }
                batch = retry;
            }
            Err(e) => {
                tracing::warn!(error = %e, docs = batch.len(), attempt, "bulk request failed; retrying");
            }
        }
        if !batch.is_empty() {
            attempt += 1;
            tokio::time::sleep(backoff(
                Duration::from_millis(100),
                Duration::from_secs(30),
                attempt,
            ))
            .await;
        }
    }
}
