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
//! The rules that keep it exact while the assignment changes:
//! - every record carries one [`ack::RecordAck`]; its offset is committed only once every one of
//!   its documents is acknowledged by OpenSearch, or it is in the dead-letter topic, or it was
//!   skipped on purpose, or a newer version of it superseded it;
//! - a write or delete starts only while the record's partition is owned in the epoch it was read
//!   in, and a revoke waits for the writes in flight (see `source::assignment`);
//! - versions of one record id are written in the order they were read: a document waits in the
//!   sink stage while an earlier write of its id is in flight, and an older version that has not
//!   started to be written is skipped (not embedded, not written) when a newer one arrives, so a
//!   hot id never holds up the stream;
//! - the consumer never stops polling: back-pressure pauses the partitions, and a stopping worker
//!   keeps serving the group while it drains.

pub mod ack;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use vectorpipe_crds::v1alpha1::{EmbeddingPipelineSpec, IdSource};

use crate::chunk;
use crate::dead_letter::DeadLetters;
use crate::dedup::{Dedup, record_hash};
use crate::embed::{EmbedError, Embedder};
use crate::health::{Fault, Health};
use crate::metrics::Metrics;
use crate::retry::{RetryPolicy, until_done};
use crate::sink::{IndexRequest, ItemResult, Sink, SinkError};
use crate::source::assignment::{Assignment, Owner};
use crate::source::offsets::{Epoch, Partition};
use crate::source::{self, Context};
use crate::transform::{self, Document, Outcome, Rejection, RejectionKind, SourceRecord};
use ack::{AckHub, RecordAck, Stashed, Versions};

/// How long the next stage may stay full before the consumer pauses its partitions.
const PAUSE_AFTER: Duration = Duration::from_secs(2);
/// How long the embed stage waits to fill a multi-text batch before sending what it has.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// Settings that are not part of the spec.
#[derive(Clone, Debug)]
pub struct Options {
    /// The consumer group.
    pub group_id: String,
    /// How long a stopping worker may take to finish in-flight work (and the longest a revoke
    /// waits for the writes in flight of the partitions leaving).
    pub drain_timeout: Duration,
    /// Commit interval while keeping up.
    pub commit_interval: Duration,
    /// Commit interval while working through a backlog.
    pub max_commit_interval: Duration,
    /// The most bytes the records in flight may hold (their messages, texts, vectors and
    /// encoded documents, estimated when they are read), next to the count bounds.
    pub max_in_flight_bytes: usize,
}

struct EmbedJob {
    ack: Arc<RecordAck>,
    docs: Vec<Document>,
}

enum SinkItem {
    Index {
        ack: Arc<RecordAck>,
        request: IndexRequest,
        bytes: usize,
    },
    Delete {
        ack: Arc<RecordAck>,
        parent_id: String,
    },
}

impl SinkItem {
    fn ack(&self) -> &Arc<RecordAck> {
        match self {
            Self::Index { ack, .. } | Self::Delete { ack, .. } => ack,
        }
    }

    /// The record id whose writes are ordered.
    fn record_id(&self) -> &str {
        match self {
            Self::Index { request, .. } => &request.parent_id,
            Self::Delete { parent_id, .. } => parent_id,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Index { bytes, .. } => *bytes,
            Self::Delete { .. } => 0,
        }
    }
}

/// State shared by the stages.
struct Shared {
    spec: EmbeddingPipelineSpec,
    hub: Arc<AckHub>,
    metrics: Arc<Metrics>,
    dead_letters: DeadLetters,
    /// Record ids with a write (index or delete) in flight: their next documents wait.
    writing: Mutex<HashSet<String>>,
    /// Ids are the same when a record is read again: versions of one id are ordered, stale
    /// chunks are removed and duplicates skipped.
    stable_ids: bool,
    /// A configuration error of the embedder or the sink ends the run instead of holding the
    /// records until a person fixes it (the laptop mode, where nobody else will).
    stop_on_misconfigured: bool,
    /// Why the run must end, once one of its stages hit such an error.
    failure: Mutex<Option<String>>,
    /// Readiness (faults that hold the records) and progress.
    health: Arc<Health>,
    /// Tells a model that refuses everything from records it refuses.
    breaker: Breaker,
    /// The in-flight byte budget (one permit per KiB) and its size in permits.
    budget: Option<(Arc<Semaphore>, u32)>,
}

impl Shared {
    /// Bytes of the budget that records in flight hold.
    fn bytes_in_flight(&self) -> Option<u64> {
        self.budget.as_ref().map(|(budget, total)| {
            u64::from(total.saturating_sub(budget.available_permits() as u32)) * 1024
        })
    }
}

impl Shared {
    fn assignment(&self) -> &Assignment {
        &self.hub.assignment
    }

    fn end_writes<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            writing.remove(id);
        }
        drop(writing);
        self.hub.released.notify_one();
    }

    /// Dead-letters one unit of a record and marks it done.
    /// A record is dead-lettered once, whichever of its documents was refused first.
    async fn reject(&self, ack: &RecordAck, rejection: Rejection) {
        let (first, dropped) = ack.fail();
        if first {
            self.dead_letters
                .send(&ack.message, &rejection, &self.health)
                .await;
            if crate::redrive::redriven_from(&ack.message).is_some() {
                self.metrics.redriven("dead-lettered");
            }
        }
        self.health.progressed();
        ack.done(1 + dropped);
    }

    /// True when this error ends the run (its work is dropped, never marked done, so nothing
    /// after it is committed); false when the caller holds the work and tries again.
    fn gives_up(&self, misconfigured: bool, error: &dyn std::fmt::Display) -> bool {
        if !(self.stop_on_misconfigured && misconfigured) {
            return false;
        }
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert_with(|| error.to_string());
        true
    }

    /// Holds the records while OpenSearch refuses a request for a reason of the index or the
    /// cluster, and clears that hold once a request succeeds.
    fn held_by_opensearch<T>(&self, result: Result<T, SinkError>) -> Result<T, SinkError> {
        match &result {
            Ok(_) => {
                self.health.progressed();
                self.health.clear(Fault::OpenSearch);
            }
            Err(SinkError::Held(reason)) => self.health.hold(Fault::OpenSearch, reason),
            Err(_) => {}
        }
        result
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a pipeline is made of, wherever its records come from.
pub struct Parts<E, S> {
    /// The pipeline.
    pub spec: EmbeddingPipelineSpec,
    /// The model.
    pub embedder: Arc<E>,
    /// Where documents go.
    pub sink: Arc<S>,
    /// The worker's metrics.
    pub metrics: Arc<Metrics>,
    /// Where refused records go.
    pub dead_letters: DeadLetters,
    /// Deduplication, when on.
    pub dedup: Option<Arc<Dedup>>,
    /// See [`Shared::stable_ids`].
    pub stable_ids: bool,
    /// See [`Shared::stop_on_misconfigured`].
    pub stop_on_misconfigured: bool,
    /// See [`Shared::health`].
    pub health: Arc<Health>,
    /// The in-flight byte budget, when records are bounded by bytes too (the Kafka path).
    pub max_in_flight_bytes: Option<usize>,
}

/// Work a record turned into, for the stage that takes it.
enum Work {
    Embed(EmbedJob),
    Write(SinkItem),
    DeadLetter(Arc<RecordAck>, Rejection),
}

impl Work {
    fn ack(&self) -> &Arc<RecordAck> {
        match self {
            Self::Embed(job) => &job.ack,
            Self::Write(item) => item.ack(),
            Self::DeadLetter(ack, _) => ack,
        }
    }

    /// What the record will hold in memory while in flight, estimated: its message, its texts,
    /// and per document the vector and the encoded document.
    fn bytes(&self, dimensions: usize) -> usize {
        let message = &self.ack().message;
        let read = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        match self {
            Self::Embed(job) => {
                let texts: usize = job.docs.iter().map(|d| d.text.len()).sum();
                // A vector as f32 values and again as JSON text, the text again in the document.
                read + texts * 2 + job.docs.len() * (dimensions * 16 + 512)
            }
            Self::Write(_) | Self::DeadLetter(..) => read + 512,
        }
    }
}

/// Dead-letter sends of records refused before embedding, at once at most: with a dead-letter
/// topic that takes nothing, these wait, the queue in front of them fills and the consumer
/// pauses its partitions (memory stays bounded; nothing after them is committed).
const DEAD_LETTER_SENDS: usize = 32;

/// The running embed and sink stages, and the rules that let records into them: the same for
/// the Kafka consumer and the laptop mode's file.
struct Stages<E> {
    shared: Arc<Shared>,
    embedder: Arc<E>,
    embed_tx: mpsc::Sender<EmbedJob>,
    sink_tx: mpsc::Sender<SinkItem>,
    dead_tx: mpsc::Sender<(Arc<RecordAck>, Rejection)>,
    /// The embed, sink and dead-letter stages.
    tasks: JoinSet<()>,
}

impl<E: Embedder> Stages<E> {
    fn start<S: Sink>(parts: Parts<E, S>, assignment: Arc<Assignment>) -> Self {
        let spec = parts.spec;
        let hub = Arc::new(AckHub {
            assignment,
            versions: Versions::default(),
            dedup: parts.dedup,
            released: Notify::new(),
        });
        let shared = Arc::new(Shared {
            spec: spec.clone(),
            hub,
            metrics: parts.metrics,
            dead_letters: parts.dead_letters,
            writing: Mutex::new(HashSet::new()),
            stable_ids: parts.stable_ids,
            stop_on_misconfigured: parts.stop_on_misconfigured,
            failure: Mutex::new(None),
            health: parts.health,
            breaker: Breaker::default(),
            budget: parts.max_in_flight_bytes.map(|bytes| {
                let permits = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
                (Arc::new(Semaphore::new(permits as usize)), permits)
            }),
        });
        let in_flight = spec.embedding.bedrock.max_in_flight.max(1) as usize;
        let batch = parts.embedder.batch_size().max(1);
        let (embed_tx, embed_rx) = mpsc::channel::<EmbedJob>(in_flight * batch);
        let (sink_tx, sink_rx) =
            mpsc::channel::<SinkItem>((spec.sink.opensearch.bulk.max_docs.max(1) as usize) * 2);
        let mut tasks = JoinSet::new();
        tasks.spawn(embed_stage(
            embed_rx,
            parts.embedder.clone(),
            parts.sink.clone(),
            sink_tx.clone(),
            shared.clone(),
        ));
        tasks.spawn(sink_stage(sink_rx, parts.sink, shared.clone()));
        let (dead_tx, dead_rx) = mpsc::channel(DEAD_LETTER_SENDS * 2);
        tasks.spawn(dead_letter_stage(dead_rx, shared.clone()));
        Self {
            shared,
            embedder: parts.embedder,
            embed_tx,
            sink_tx,
            dead_tx,
            tasks,
        }
    }

    /// Lets one record in: transforms it, registers it with the offset tracker and returns the
    /// work for the next stage, or `None` when it is done already (skipped, a duplicate, sent to
    /// the dead-letter topic) or was read while its partition was not owned.
    fn admit(&mut self, message: OwnedMessage, owner: Owner) -> Option<Work> {
        let shared = &self.shared;
        let (spec, hub, metrics) = (&shared.spec, &shared.hub, &shared.metrics);
        let assignment = &hub.assignment;
        let dedup = &hub.dedup;
        let stable = shared.stable_ids;
        let redriven = crate::redrive::redriven_from(&message);
        let record = SourceRecord {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            timestamp_ms: message.timestamp().to_millis(),
            origin: redriven.as_ref().map(|(t, p, o)| (t.as_str(), *p, *o)),
        };
        match transform::transform(spec, &record) {
            Outcome::Skip(reason) => {
                if assignment.start(&owner, false) {
                    metrics.record(&format!("skipped-{}", reason.as_str()));
                    tracing::debug!(topic = %owner.partition.0, partition = owner.partition.1, offset = owner.offset, reason = reason.as_str(), "skipped a record");
                }
                None
            }
            Outcome::Reject(rejection) => {
                if !assignment.start(&owner, true) {
                    return None;
                }
                let ack = RecordAck::new(hub.clone(), owner, message, None, None, 1);
                Some(Work::DeadLetter(ack, rejection))
            }
            Outcome::Delete(parent_id) => {
                if let Some(dedup) = dedup {
                    dedup.forget(&owner.partition, &parent_id);
                }
                if !assignment.start(&owner, true) {
                    return None;
                }
                let version = stable.then(|| (parent_id.clone(), hub.versions.begin(&parent_id)));
                let ack = RecordAck::new(hub.clone(), owner, message, version, None, 1);
                Some(Work::Write(SinkItem::Delete { ack, parent_id }))
            }
            Outcome::Index(docs) => {
                let docs = chunk::fit(docs, |text| self.embedder.split_to_fit(text));
                let Some(first) = docs.first() else {
                    if assignment.start(&owner, false) {
                        metrics.record("skipped-empty-text");
                    }
                    return None;
                };
                // Versions are ordered per Kafka key when the key is not the id: Kafka orders
                // a key's records, and the key's tombstone must come after all of them.
                let id = first
                    .source_key
                    .clone()
                    .unwrap_or_else(|| first.parent_id.clone());
                let hash = dedup
                    .as_ref()
                    .filter(|_| stable)
                    .map(|_| record_hash(&docs));
                if let (Some(dedup), Some(hash)) = (dedup, &hash)
                    && !hub.versions.in_flight(&id)
                    && dedup.is_duplicate(&owner.partition, &id, hash)
                {
                    if assignment.start(&owner, false) {
                        metrics.record("skipped-duplicate");
                        if redriven.is_some() {
                            metrics.redriven("unchanged");
                        }
                    }
                    return None;
                }
                if !assignment.start(&owner, true) {
                    return None;
                }
                let version = stable.then(|| (id.clone(), hub.versions.begin(&id)));
                let ack = RecordAck::new(hub.clone(), owner, message, version, hash, docs.len());
                Some(Work::Embed(EmbedJob { ack, docs }))
            }
        }
    }

    /// No more records: the stages finish what they hold; the returned set ends when they did.
    fn close(self) -> (Arc<Shared>, JoinSet<()>) {
        (self.shared, self.tasks)
    }
}

/// Runs the pipeline until `shutdown` resolves, then drains and commits.
pub async fn run<E: Embedder, S: Sink>(
    spec: EmbeddingPipelineSpec,
    options: Options,
    embedder: Arc<E>,
    sink: Arc<S>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let kafka = &spec.source.kafka;
    let dimensions = spec.embedding.bedrock.vector_dimensions().unwrap_or(1024) as usize;
    let assignment = Arc::new(Assignment::new());
    let dedup = Dedup::from_spec(&spec.dedup).map(Arc::new);
    let stopping = Arc::new(AtomicBool::new(false));
    let rebalanced = Arc::new(Notify::new());
    let context = Context {
        rebalanced: rebalanced.clone(),
        assignment: assignment.clone(),
        dedup: dedup.clone(),
        metrics: metrics.clone(),
        msk_iam_region: source::msk_iam_region(kafka),
        health: health.clone(),
        stopping: stopping.clone(),
        revoke_wait: options.drain_timeout,
    };
    let consumer: Arc<StreamConsumer<Context>> =
        Arc::new(source::consumer_config(kafka, &options.group_id)?.create_with_context(context)?);
    let topics = vectorpipe_kafka::TopicSelection::of(kafka)?;
    if let Some(dead_letter) = &spec.dead_letter
        && topics.matches(&dead_letter.topic)
    {
        anyhow::bail!(
            "deadLetter.topic {:?} is one of the source topics; failed records would be read again: use a topic the source does not select",
            dead_letter.topic
        );
    }
    let subscription = topics.subscription();
    consumer.subscribe(&subscription.iter().map(String::as_str).collect::<Vec<_>>())?;
    let members = embedder.shares_a_budget().then(|| {
        tokio::spawn(count_members(
            Arc::downgrade(&consumer),
            options.group_id.clone(),
            embedder.clone(),
            rebalanced,
        ))
    });
    let parts = Parts {
        dead_letters: DeadLetters::new(&spec, metrics.clone())?,
        stable_ids: spec.id_source().is_stable(),
        spec,
        embedder,
        sink,
        metrics: metrics.clone(),
        dedup,
        stop_on_misconfigured: false,
        health: health.clone(),
        max_in_flight_bytes: Some(options.max_in_flight_bytes),
    };
    let mut stages = Stages::start(parts, assignment.clone());
    let stop_committer = Arc::new(Notify::new());
    let committer = tokio::spawn(commit_loop(
        consumer.clone(),
        stages.shared.clone(),
        options.clone(),
        stop_committer.clone(),
    ));

    tokio::pin!(shutdown);
    // Messages that arrived while consumption was paused, with the epoch they were read in,
    // handled before reading on.
    let mut held: VecDeque<(OwnedMessage, Option<Epoch>)> = VecDeque::new();
    loop {
        let (message, epoch) = match held.pop_front() {
            Some(held) => held,
            None => {
                let received = tokio::select! {
                    () = &mut shutdown => break,
                    message = consumer.recv() => message,
                };
                match received {
                    Ok(m) => {
                        let m = m.detach();
                        let epoch = assignment.epoch(&(m.topic().to_owned(), m.partition()));
                        (m, epoch)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        // Read while its partition was not owned: its owner reads it. (A partition revoked
        // since is caught by `Assignment::start`, which refuses an ended epoch.)
        let Some(epoch) = epoch else {
            continue;
        };
        let owner = Owner {
            partition: (message.topic().to_owned(), message.partition()),
            epoch,
            offset: message.offset(),
        };
        let (consumer, held, metrics) = (&consumer, &mut held, &metrics);
        let work = stages.admit(message, owner);
        if let (Some(work), Some((budget, total))) = (&work, &stages.shared.budget) {
            let bytes = work.bytes(dimensions);
            let budget = (budget, *total);
            let taken = take_bytes(
                budget,
                bytes,
                consumer,
                &assignment,
                held,
                metrics,
                &mut shutdown,
            )
            .await;
            match taken {
                Some(permit) => work.ack().hold_bytes(permit),
                None => break,
            }
        }
        let handed = match work {
            None => true,
            Some(Work::Embed(job)) => {
                let to = &stages.embed_tx;
                hand_over(to, job, consumer, &assignment, held, metrics, &mut shutdown).await
            }
            Some(Work::Write(item)) => {
                let to = &stages.sink_tx;
                hand_over(
                    to,
                    item,
                    consumer,
                    &assignment,
                    held,
                    metrics,
                    &mut shutdown,
                )
                .await
            }
            Some(Work::DeadLetter(ack, rejection)) => {
                let to = &stages.dead_tx;
                let item = (ack, rejection);
                hand_over(
                    to,
                    item,
                    consumer,
                    &assignment,
                    held,
                    metrics,
                    &mut shutdown,
                )
                .await
            }
        };
        if !handed {
            break;
        }
    }

    // Stopping: fetch nothing more, but keep polling, so the group is served (rebalances
    // complete and this member keeps a valid generation for its last commit) while in-flight
    // work finishes.
    tracing::info!("stopping: finishing in-flight work");
    health.joined.store(false, Ordering::SeqCst);
    stopping.store(true, Ordering::SeqCst);
    pause_all(&consumer);
    held.clear();
    let (_, mut stages) = stages.close();
    let started = std::time::Instant::now();
    let deadline = Instant::now() + options.drain_timeout;
    loop {
        tokio::select! {
            joined = stages.join_next() => if joined.is_none() { break },
            message = consumer.recv() => {
                // Fetched before the pause: left for the next owner (never started, so not
                // committed).
                if let Err(e) = message {
                    tracing::debug!(error = %e, "Kafka consumer error while draining");
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(timeout = ?options.drain_timeout, "in-flight work did not finish in time; it will be read again by the next owner");
                stages.abort_all();
                break;
            }
        }
    }
    stop_committer.notify_one();
    let _ = committer.await;
    if let Some(members) = members {
        members.abort();
    }
    let (offsets, open) = assignment.committable(None);
    if !offsets.is_empty() {
        match source::commit_list(&offsets).and_then(|tpl| consumer.commit(&tpl, CommitMode::Sync))
        {
            Ok(()) => {
                assignment.committed(&offsets);
                metrics.commit("ok");
                tracing::info!(?offsets, "final commit");
            }
            Err(e) => {
                // Not a loss: the next owner reads from the previous commit again.
                metrics.commit("error");
                tracing::warn!(error = %e, ?offsets, "final commit failed; the next owner reads these records again");
            }
        }
    }
    tracing::info!(drained = ?started.elapsed(), open, "drained; leaving the group");
    // Closing the consumer leaves the group at once, so the others take the partitions over
    // without waiting for a session timeout.
    drop(consumer);
    Ok(())
}

/// Keeps the embedder's share of the pipeline's budget at 1/N, N the group's live members: read
/// from the broker after every rebalance (and again a second later, once the group has
/// settled), and every 10 s. Holds the consumer only while it asks, so that dropping it still
/// leaves the group.
async fn count_members<E: Embedder>(
    consumer: std::sync::Weak<StreamConsumer<Context>>,
    group: String,
    embedder: Arc<E>,
    rebalanced: Arc<Notify>,
) {
    // The first count waits for this worker's first rebalance: before it has joined, the group
    // does not count it yet, and it reads nothing.
    let mut wait: Option<Duration> = None;
    loop {
        let settle = match wait {
            None => {
                rebalanced.notified().await;
                true
            }
            Some(wait) => tokio::select! {
                () = rebalanced.notified() => true,
                () = tokio::time::sleep(wait) => false,
            },
        };
        let Some(strong) = consumer.upgrade() else {
            return;
        };
        let group_id = group.clone();
        let members = tokio::task::spawn_blocking(move || {
            let list = strong.fetch_group_list(Some(&group_id), Duration::from_secs(2));
            drop(strong);
            list.ok().and_then(|list| {
                list.groups()
                    .first()
                    .map(|g| g.members().len() as u32)
                    .filter(|n| *n > 0)
            })
        })
        .await;
        match members {
            Ok(Some(n)) => embedder.set_group_members(n),
            Ok(None) => {
                tracing::debug!("the group's members could not be read; the budget share stays");
            }
            Err(_) => return,
        }
        wait = Some(if settle {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        });
    }
}

/// Runs the stages over the records of one partition that has no group and no commits (the
/// laptop mode's file), and returns when every record was written, skipped or dead-lettered.
/// The stages, their order and their rules are those of [`run`].
pub async fn run_records<E: Embedder, S: Sink>(
    parts: Parts<E, S>,
    partition: Partition,
    records: impl Iterator<Item = anyhow::Result<OwnedMessage>>,
) -> anyhow::Result<()> {
    let assignment = Arc::new(Assignment::new());
    assignment.assign(std::slice::from_ref(&partition));
    let epoch = assignment
        .epoch(&partition)
        .ok_or_else(|| anyhow::anyhow!("the input's partition was not assigned"))?;
    let mut stages = Stages::start(parts, assignment.clone());
    let mut read_error = None;
    for message in records {
        if stages.shared.failure().is_some() {
            break;
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        let owner = Owner {
            partition: partition.clone(),
            epoch,
            offset: message.offset(),
        };
        let handed = match stages.admit(message, owner) {
            None => true,
            Some(Work::Embed(job)) => stages.embed_tx.send(job).await.is_ok(),
            Some(Work::Write(item)) => stages.sink_tx.send(item).await.is_ok(),
            Some(Work::DeadLetter(ack, rejection)) => {
                stages.dead_tx.send((ack, rejection)).await.is_ok()
            }
        };
        if !handed {
            break;
        }
    }
    let (shared, mut tasks) = stages.close();
    while tasks.join_next().await.is_some() {}
    if let Some(e) = read_error {
        return Err(e);
    }
    if let Some(failure) = shared.failure() {
        anyhow::bail!(failure);
    }
    let (_, open) = assignment.committable(None);
    if open > 0 {
        anyhow::bail!("{open} records were neither written nor dead-lettered");
    }
    Ok(())
}

/// Pauses every assigned partition.
fn pause_all(consumer: &StreamConsumer<Context>) {
    match consumer.assignment() {
        Ok(tpl) => {
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing the partitions failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading the assignment failed"),
    }
}

/// Passes work to the next stage, waiting as [`wait_polling`] does while it is full.
/// False when the stage is gone or the worker is stopping.
async fn hand_over<T, F: std::future::Future<Output = ()>>(
    tx: &mpsc::Sender<T>,
    item: T,
    consumer: &StreamConsumer<Context>,
    assignment: &Assignment,
    held: &mut VecDeque<(OwnedMessage, Option<Epoch>)>,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    let item = match tx.try_send(item) {
        Ok(()) => return true,
        Err(TrySendError::Closed(_)) => return false,
        Err(TrySendError::Full(item)) => item,
    };
    let room = async { tx.reserve().await.ok() };
    match wait_polling(room, consumer, assignment, held, metrics, shutdown).await {
        Some(permit) => {
            permit.send(item);
            true
        }
        None => false,
    }
}

/// Takes `bytes` of the in-flight byte budget (`total` permits of a KiB) for a record, waiting as [`wait_polling`] does
/// while the records in flight hold it all. A record larger than the whole budget takes all of
/// it (it runs alone). `None` when the worker is stopping.
async fn take_bytes<F: std::future::Future<Output = ()>>(
    (budget, total): (&Arc<Semaphore>, u32),
    bytes: usize,
    consumer: &StreamConsumer<Context>,
    assignment: &Assignment,
    held: &mut VecDeque<(OwnedMessage, Option<Epoch>)>,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<OwnedSemaphorePermit> {
    let permits = bytes_to_permits(bytes, total);
    if let Ok(permit) = budget.clone().try_acquire_many_owned(permits) {
        return Some(permit);
    }
    let room = async { budget.clone().acquire_many_owned(permits).await.ok() };
    wait_polling(room, consumer, assignment, held, metrics, shutdown).await
}

/// Permits (KiB, at least one) for `bytes`, at most `total`.
fn bytes_to_permits(bytes: usize, total: u32) -> u32 {
    u32::try_from(bytes.div_ceil(1024))
        .unwrap_or(u32::MAX)
        .clamp(1, total.max(1))
}

/// Waits until `room` resolves (a stage has room, the byte budget has enough). When that takes
/// longer than a moment (a stall, not just a busy backlog), the consumer pauses its partitions
/// and keeps polling until there is room: the group keeps the worker (no max.poll.interval.ms
/// eviction however long Bedrock or OpenSearch stall), rebalances are served, and nothing more
/// is fetched, so memory stays bounded at any lag. Messages that arrive anyway (fetched before
/// the pause, or from partitions assigned meanwhile) are held in order, with the epoch they were
/// read in, and handled next. `None` when `room` gave none or the worker is stopping.
async fn wait_polling<T, R, F>(
    room: R,
    consumer: &StreamConsumer<Context>,
    assignment: &Assignment,
    held: &mut VecDeque<(OwnedMessage, Option<Epoch>)>,
    metrics: &Metrics,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<T>
where
    R: std::future::Future<Output = Option<T>>,
    F: std::future::Future<Output = ()>,
{
    tokio::pin!(room);
    // A full queue is the normal state while working through a backlog, and room comes back
    // within milliseconds. Pausing then would cost a refetch (librdkafka drops what it fetched
    // for paused partitions), so only a wait that lasts PAUSE_AFTER is a stall.
    tokio::select! {
        got = &mut room => return got,
        () = tokio::time::sleep(PAUSE_AFTER) => {}
        () = shutdown.as_mut() => return None,
    }
    pause_all(consumer);
    metrics.consumer_paused.set(1);
    metrics.consumer_pauses.inc();
    let started = std::time::Instant::now();
    let got = loop {
        tokio::select! {
            got = &mut room => break got,
            message = consumer.recv() => match message {
                Ok(message) => {
                    let message = message.detach();
                    let epoch = assignment.epoch(&(message.topic().to_owned(), message.partition()));
                    held.push_back((message, epoch));
                    pause_all(consumer);
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
    got
}

/// Commits what is done, and marks it committed only once the broker took it (a failed commit
/// is offered again at the next interval).
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
        let (offsets, open) = shared.assignment().committable(None);
        shared.metrics.records_in_flight.set(open as i64);
        shared.health.set_waiting(open as u64);
        if let Some(bytes) = shared.bytes_in_flight() {
            shared.metrics.bytes_in_flight.set(bytes as i64);
        }
        if offsets.is_empty() {
            continue;
        }
        let list = match source::commit_list(&offsets) {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the commit request");
                continue;
            }
        };
        let committing = consumer.clone();
        let result =
            tokio::task::spawn_blocking(move || committing.commit(&list, CommitMode::Sync)).await;
        match result {
            Ok(Ok(())) => {
                shared.assignment().committed(&offsets);
                shared.metrics.commit("ok");
                shared.health.progressed();
                tracing::debug!(?offsets, "committed");
            }
            Ok(Err(e)) => {
                shared.metrics.commit("error");
                tracing::warn!(error = %e, "commit failed; retrying at the next interval");
            }
            Err(e) => {
                shared.metrics.commit("error");
                tracing::warn!(error = %e, "the commit task failed; retrying at the next interval");
            }
        }
    }
}

/// Dead-letters the records refused before embedding, [`DEAD_LETTER_SENDS`] at once at most.
async fn dead_letter_stage(
    mut rx: mpsc::Receiver<(Arc<RecordAck>, Rejection)>,
    shared: Arc<Shared>,
) {
    let mut sends = JoinSet::new();
    let mut open = true;
    while open || !sends.is_empty() {
        tokio::select! {
            item = rx.recv(), if open && sends.len() < DEAD_LETTER_SENDS => match item {
                Some((ack, rejection)) => {
                    let shared = shared.clone();
                    sends.spawn(async move { shared.reject(&ack, rejection).await });
                }
                None => open = false,
            },
            Some(_) = sends.join_next(), if !sends.is_empty() => {}
        }
    }
}

/// Batches documents (across records) and embeds them.
async fn embed_stage<E: Embedder, S: Sink>(
    mut rx: mpsc::Receiver<EmbedJob>,
    embedder: Arc<E>,
    sink: Arc<S>,
    sink_tx: mpsc::Sender<SinkItem>,
    shared: Arc<Shared>,
) {
    let batch_size = embedder.batch_size().max(1);
    let max_tasks = shared.spec.embedding.bedrock.max_in_flight.max(1) as usize * 2;
    let mut tasks = JoinSet::new();
    let mut batch: Vec<(Arc<RecordAck>, Document)> = Vec::with_capacity(batch_size);
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
                        (&embedder, &sink),
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
            batch.push((job.ack.clone(), doc));
            if batch.len() >= batch_size {
                dispatch(
                    &mut tasks,
                    max_tasks,
                    std::mem::take(&mut batch),
                    (&embedder, &sink),
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
        dispatch(
            &mut tasks,
            max_tasks,
            batch,
            (&embedder, &sink),
            &sink_tx,
            &shared,
        )
        .await;
    }
    while tasks.join_next().await.is_some() {}
}

async fn dispatch<E: Embedder, S: Sink>(
    tasks: &mut JoinSet<()>,
    max_tasks: usize,
    batch: Vec<(Arc<RecordAck>, Document)>,
    (embedder, sink): (&Arc<E>, &Arc<S>),
    sink_tx: &mpsc::Sender<SinkItem>,
    shared: &Arc<Shared>,
) {
    while tasks.len() >= max_tasks {
        tasks.join_next().await;
    }
    tasks.spawn(embed_batch(
        batch,
        embedder.clone(),
        sink.clone(),
        sink_tx.clone(),
        shared.clone(),
    ));
}

/// Drops the documents whose record was superseded (counted done) or whose partition is gone
/// (left for the next owner).
fn still_wanted(
    batch: Vec<(Arc<RecordAck>, Document)>,
    shared: &Shared,
) -> Vec<(Arc<RecordAck>, Document)> {
    let mut superseded = 0;
    let kept: Vec<_> = batch
        .into_iter()
        .filter(|(ack, _)| {
            if !ack.owned() {
                return false;
            }
            if ack.superseded() {
                superseded += 1;
                ack.done(1 + ack.drop_stash());
                return false;
            }
            true
        })
        .collect();
    if superseded > 0 {
        shared.metrics.superseded("before-embedding", superseded);
    }
    kept
}

/// Embeds one batch; retries while the model is unavailable (nothing is committed meanwhile, so
/// a crash loses nothing); a refused batch is retried text by text so that only the refused
/// records go to the dead-letter topic.
async fn embed_batch<E: Embedder, S: Sink>(
    batch: Vec<(Arc<RecordAck>, Document)>,
    embedder: Arc<E>,
    sink: Arc<S>,
    sink_tx: mpsc::Sender<SinkItem>,
    shared: Arc<Shared>,
) {
    let mut queue = vec![batch];
    while let Some(batch) = queue.pop() {
        let batch = still_wanted(batch, &shared);
        if batch.is_empty() {
            continue;
        }
        let texts: Vec<String> = batch.iter().map(|(_, d)| d.text.clone()).collect();
        let mut pause = 0;
        loop {
            if pause > 0 && !batch.iter().any(|(ack, _)| ack.owned()) {
                // Held until its partition left: the next owner reads it again.
                break;
            }
            match embedder.embed(texts.clone()).await {
                Ok(vectors) => {
                    shared.breaker.succeeded();
                    shared.health.clear(Fault::Embedding);
                    shared
                        .metrics
                        .tokens
                        .inc_by(vectors.iter().map(|e| e.tokens).sum());
                    for ((ack, doc), embedded) in batch.iter().zip(vectors) {
                        let mut request = sink.encode(doc, &embedded.vector);
                        request.stamp = ack.read_at;
                        let bytes = request.source.len() + request.id.len() + 32;
                        let documents = match ack.stash(request, bytes) {
                            Stashed::Waiting => continue,
                            Stashed::Dropped => {
                                ack.done(1 + ack.drop_stash());
                                continue;
                            }
                            Stashed::Complete(documents) => documents,
                        };
                        for (request, bytes) in documents {
                            let item = SinkItem::Index {
                                ack: ack.clone(),
                                request,
                                bytes,
                            };
                            if sink_tx.send(item).await.is_err() {
                                return;
                            }
                        }
                    }
                    break;
                }
                Err(EmbedError::Rejected(message) | EmbedError::Failed { message, .. })
                    if batch.len() > 1 =>
                {
                    tracing::debug!(error = %message, size = batch.len(), "a batch was refused; retrying its texts one by one");
                    queue.extend(batch.iter().map(|item| vec![item.clone()]));
                    break;
                }
                Err(e @ (EmbedError::Rejected(_) | EmbedError::Failed { .. })) => {
                    let (ack, doc) = &batch[0];
                    let (kind, message) = match e {
                        EmbedError::Failed { attempts, message } => (
                            RejectionKind::EmbeddingFailed,
                            format!("failed on all {attempts} attempts: {message}"),
                        ),
                        other => (RejectionKind::EmbeddingRejected, other.to_string()),
                    };
                    if let Some(hold) = shared.breaker.refused(&doc.parent_id, &message) {
                        // The same refusal for record after record: the model or its settings,
                        // not the records. Held, not dead-lettered, until a call succeeds.
                        shared.health.hold(Fault::Embedding, &hold);
                        pause += 1;
                        let wait = shared.spec.embedding.bedrock.retry.max_delay.get();
                        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                        continue;
                    }
                    let rejection = Rejection {
                        kind,
                        message: format!(
                            "chunk {} of record {}: {message}",
                            doc.chunk, doc.parent_id
                        ),
                    };
                    shared.reject(ack, rejection).await;
                    break;
                }
                Err(e) => {
                    if shared.gives_up(matches!(e, EmbedError::Misconfigured(_)), &e) {
                        return;
                    }
                    shared.health.hold(Fault::Embedding, &e.to_string());
                    pause += 1;
                    let wait = shared.spec.embedding.bedrock.retry.max_delay.get();
                    tracing::error!(error = %e, retry_in = ?wait, pause, "embedding is failing; holding these records until it recovers");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// How many distinct records in a row refused with the same error trip the breaker.
const BREAKER_RECORDS: usize = 5;

/// Tells a model that refuses every record apart from records the model refuses: when
/// [`BREAKER_RECORDS`] distinct records in a row are refused with the same error and nothing
/// succeeded in between, the refusals are the model's or its settings' (a wrong model id, a
/// request the model does not take), and the records are held instead of dead-lettered until a
/// call succeeds.
#[derive(Default)]
struct Breaker {
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    message: String,
    records: Vec<String>,
    tripped: bool,
}

impl Breaker {
    /// A record was refused with `message`: `None` to dead-letter it, or why it is held.
    fn refused(&self, record: &str, message: &str) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.message != message {
            if state.tripped {
                // Still failing, now differently: still held.
                state.message = message.to_owned();
                return Some(breaker_hold(message));
            }
            state.message = message.to_owned();
            state.records.clear();
        }
        if !state.records.iter().any(|r| r == record) {
            state.records.push(record.to_owned());
        }
        if state.records.len() >= BREAKER_RECORDS {
            if !state.tripped {
                tracing::error!(records = ?state.records, error = message, "the model refused several records in a row with the same error; holding the records instead of dead-lettering them");
            }
            state.tripped = true;
        }
        state.tripped.then(|| breaker_hold(message))
    }

    /// A call succeeded: refusals count from zero again.
    fn succeeded(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.records.is_empty() || state.tripped {
            *state = BreakerState::default();
        }
    }
}

fn breaker_hold(message: &str) -> String {
    format!(
        "the model refused {BREAKER_RECORDS} different records in a row with the same error, so the fault is the model or its settings, not the records: {message}; check embedding.bedrock.modelId (the exact id with its version, or an inference profile), dimensions, inputType and region (records are held, not dead-lettered, and go on once a call succeeds)"
    )
}

/// Fills and sends `_bulk` requests and tombstone deletes. A document or delete whose record id
/// has a write in flight waits here (and a document of a second record with the same id waits for
/// the first one's request), so versions of one id reach OpenSearch in the order they were read;
/// older versions that have not started to be written are dropped when a newer one came.
async fn sink_stage<S: Sink>(mut rx: mpsc::Receiver<SinkItem>, sink: Arc<S>, shared: Arc<Shared>) {
    let bulk = &shared.spec.sink.opensearch.bulk;
    let max_docs = bulk.max_docs.max(1) as usize;
    let max_bytes = bulk.max_bytes.max(1024) as usize;
    let flush_interval = bulk.flush_interval.get();
    let mut pending: Vec<SinkItem> = Vec::new();
    let mut bytes = 0;
    let mut deadline: Option<Instant> = None;
    let mut flushes = Flushes {
        tasks: JoinSet::new(),
        limit: bulk.concurrency.max(1) as usize,
    };
    let mut open = true;
    // Whether something in `pending` waits for another write of its id to end. Only then does
    // a finished write flush early: flushing on every one made a backlog go out in requests of
    // about ten documents, each finished record flushing what had come since the last.
    let mut held_for_ids = false;
    while open || !pending.is_empty() {
        let due = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let flush = tokio::select! {
            // Always taking more: what waits is bounded (older versions are dropped as newer
            // ones come), and the version being waited for may still be on its way.
            item = rx.recv(), if open => match item {
                None => {
                    open = false;
                    true
                }
                Some(item) => {
                    let deletes = matches!(item, SinkItem::Delete { .. });
                    bytes += item.bytes();
                    pending.push(item);
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + flush_interval);
                    }
                    deletes || pending.len() >= max_docs || bytes >= max_bytes
                }
            },
            () = tokio::time::sleep_until(due), if deadline.is_some() => true,
            () = shared.hub.released.notified(), if held_for_ids && !pending.is_empty() => true,
        };
        if !flush {
            continue;
        }
        let (batch, deletes, waits) = take_ready(&mut pending, &shared, max_docs, max_bytes);
        held_for_ids = waits > 0;
        bytes = pending.iter().map(SinkItem::bytes).sum();
        deadline = (!pending.is_empty()).then(|| Instant::now() + flush_interval);
        if !batch.is_empty() {
            flushes.send(&sink, &shared, Write::Index(batch)).await;
        }
        for (ack, parent_id) in deletes {
            flushes
                .send(&sink, &shared, Write::Delete(ack, parent_id))
                .await;
        }
        if !open && !pending.is_empty() {
            // Waiting for writes in flight to finish before the rest can go.
            flushes.wait_one().await;
        }
    }
    flushes.finish().await;
}

/// Takes from `pending` what may be written now, in order: at most one bulk batch, plus the
/// deletes whose id is free, and says how many items wait for another write of their id.
/// Superseded documents are dropped (done). An item waits while its record id has a request in
/// flight, while another version of its id is being written (until that version is complete),
/// or behind an earlier item of its id that waits. Taking an item starts its record's writing.
fn take_ready(
    pending: &mut Vec<SinkItem>,
    shared: &Shared,
    max_docs: usize,
    max_bytes: usize,
) -> (Vec<Indexing>, Vec<Deleting>, u64) {
    let versions = &shared.hub.versions;
    let mut writing = shared.writing.lock().unwrap_or_else(|e| e.into_inner());
    let mut batch = Vec::new();
    let mut deletes = Vec::new();
    let mut batch_bytes = 0;
    // Record ids taken in this pass, with the record that took them.
    let mut taken: HashMap<String, Arc<RecordAck>> = HashMap::new();
    // Ids behind a waiting item: later items of other versions of the id wait too.
    let mut blocked: HashSet<String> = HashSet::new();
    let mut kept = Vec::new();
    let (mut superseded, mut waits) = (0, 0);
    for item in pending.drain(..) {
        let ack = item.ack();
        if !ack.owned() {
            continue;
        }
        // A tombstone is never superseded: the version after it may still be refused.
        if matches!(item, SinkItem::Index { .. }) && ack.superseded() {
            superseded += 1;
            ack.done(1);
            continue;
        }
        // Versions are ordered by the record's version id (its Kafka key or its id); the record
        // id is held as well, so two keys with one id never write it at once.
        let record_id = item.record_id().to_owned();
        let id = ack
            .version()
            .map_or_else(|| record_id.clone(), |(id, _)| id.to_owned());
        let version = ack.version().map(|(_, v)| v);
        let writer = version.and_then(|_| versions.writer(&id));
        let is_writer = writer.is_some() && writer == version;
        let same_record = taken.get(&id).is_some_and(|r| Arc::ptr_eq(r, ack));
        // The version being written goes first; any other waits for it, and behind an
        // earlier waiting item of its id.
        let turn = is_writer || (writer.is_none() && !blocked.contains(&id));
        let unheld = |key: &str| match taken.get(key) {
            Some(holder) => Arc::ptr_eq(holder, ack),
            None => !writing.contains(key),
        };
        let free = (same_record || turn) && unheld(&id) && unheld(&record_id);
        let full = batch.len() >= max_docs || batch_bytes + item.bytes() > max_bytes.max(1);
        if !free || (matches!(item, SinkItem::Index { .. }) && full && !batch.is_empty()) {
            if !free {
                waits += 1;
            }
            if !is_writer {
                blocked.insert(id);
            }
            kept.push(item);
            continue;
        }
        if !ack.begin_writing() {
            // Superseded since the check above (by the embed stage): none of it is written.
            superseded += 1;
            ack.done(1);
            continue;
        }
        if let Some(version) = version {
            versions.claim_writer(&id, version);
        }
        taken.insert(id.clone(), ack.clone());
        taken.insert(record_id, ack.clone());
        match item {
            SinkItem::Index {
                ack,
                request,
                bytes,
            } => {
                batch_bytes += bytes;
                batch.push((ack, request));
            }
            SinkItem::Delete { ack, parent_id } => {
                // Nothing after a delete of this id goes in this pass.
                blocked.insert(id);
                deletes.push((ack, parent_id));
            }
        }
    }
    for id in taken.keys() {
        writing.insert(id.clone());
    }
    drop(writing);
    *pending = kept;
    if superseded > 0 {
        shared.metrics.superseded("before-writing", superseded);
    }
    if waits > 0 {
        shared.metrics.same_id_waits.inc_by(waits);
    }
    (batch, deletes, waits)
}

/// A document on its way into a `_bulk` request.
type Indexing = (Arc<RecordAck>, IndexRequest);
/// A tombstone on its way to its delete.
type Deleting = (Arc<RecordAck>, String);

/// One write task: a bulk batch or a tombstone's delete.
enum Write {
    Index(Vec<(Arc<RecordAck>, IndexRequest)>),
    Delete(Arc<RecordAck>, String),
}

/// The writes in flight. Several at once are safe: one record id is never in two of them.
struct Flushes {
    tasks: JoinSet<()>,
    limit: usize,
}

impl Flushes {
    /// Starts a write, after waiting for a free slot.
    async fn send<S: Sink>(&mut self, sink: &Arc<S>, shared: &Arc<Shared>, write: Write) {
        while self.tasks.len() >= self.limit {
            self.tasks.join_next().await;
        }
        let (sink, shared) = (sink.clone(), shared.clone());
        self.tasks.spawn(async move {
            match write {
                Write::Index(batch) => flush(sink.as_ref(), &shared, batch).await,
                Write::Delete(ack, parent_id) => {
                    delete(sink.as_ref(), &shared, ack, parent_id).await
                }
            }
        });
    }

    /// Waits for one write to end.
    async fn wait_one(&mut self) {
        self.tasks.join_next().await;
    }

    /// Waits for every write in flight.
    async fn finish(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Deletes every document of a record (a tombstone), as the sink does that. Each attempt runs
/// under a write guard; a revoked record is left alone.
async fn delete<S: Sink>(sink: &S, shared: &Shared, ack: Arc<RecordAck>, parent_id: String) {
    let by_source_key = shared.spec.id_source() == IdSource::Pointer;
    let deleted = until_done("deleting a record's documents", RetryPolicy::WRITES, || {
        let (ack, parent_id) = (&ack, &parent_id);
        async move {
            let (guard, allowed) = shared.assignment().begin_write([&ack.owner]);
            if allowed != [true] {
                return Ok::<_, SinkError>(None);
            }
            let deleted = shared.held_by_opensearch(
                sink.delete_record(parent_id, by_source_key, ack.read_at)
                    .await,
            )?;
            drop(guard);
            Ok(Some(deleted))
        }
    })
    .await;
    if let Some(deleted) = deleted {
        shared.metrics.documents_deleted.inc_by(deleted);
        shared.metrics.record(if deleted > 0 {
            "deleted"
        } else {
            "deleted-nothing-found"
        });
        ack.done(1);
    }
    shared.end_writes([parent_id.as_str()]);
}

/// Deletes what was written of a record one of whose documents was refused, before it is
/// dead-lettered (its ids are held by the caller's write). Retried until it succeeds; a record
/// whose partition left is left to the next owner.
async fn remove_record<S: Sink>(sink: &S, shared: &Shared, ack: &RecordAck, parent_id: &str) {
    let deleted = until_done(
        "deleting the written part of a refused record",
        RetryPolicy::WRITES,
        || async {
            let (guard, allowed) = shared.assignment().begin_write([&ack.owner]);
            if allowed != [true] {
                return Ok::<_, SinkError>(0);
            }
            let deleted = shared
                .held_by_opensearch(sink.delete_record(parent_id, false, ack.read_at + 1).await);
            drop(guard);
            deleted
        },
    )
    .await;
    if deleted > 0 {
        shared.metrics.documents_deleted.inc_by(deleted);
        tracing::info!(
            record = parent_id,
            deleted,
            "deleted the written documents of a record that OpenSearch refused in part"
        );
    }
}

/// Deletes the chunks that records of this batch had before and no longer have (a record that
/// shrank from 5 chunks to 2 leaves `#2`…`#4`, one that became a single document leaves all of
/// `#n`), as the sink does that. Runs before the batch is written, under a write guard; retried
/// until it succeeds.
async fn remove_stale_chunks<S: Sink>(
    sink: &S,
    shared: &Shared,
    batch: &[(Arc<RecordAck>, IndexRequest)],
) {
    let deleted = until_done(
        "looking up or deleting stale chunks",
        RetryPolicy::WRITES,
        || async {
            let (guard, allowed) = shared
                .assignment()
                .begin_write(batch.iter().map(|(a, _)| &a.owner));
            let records: BTreeMap<&str, usize> = batch
                .iter()
                .zip(&allowed)
                .filter(|(_, owned)| **owned)
                .map(|((_, r), _)| (r.parent_id.as_str(), r.chunks))
                .collect();
            let records: Vec<(&str, usize)> = records.into_iter().collect();
            let deleted = shared.held_by_opensearch(sink.remove_stale_chunks(&records).await);
            drop(guard);
            deleted
        },
    )
    .await;
    if deleted > 0 {
        shared.metrics.documents_deleted.inc_by(deleted);
        tracing::debug!(
            deleted,
            "deleted chunks that updated records no longer have"
        );
    }
}

/// Sends documents until each is indexed or refused; refused ones go to the dead-letter topic.
/// Every attempt runs under a write guard: documents whose partition was revoked are dropped
/// unwritten (the next owner reads them again). A refusal of the index rather than the document
/// (a write block, refused credentials) holds the documents, sent again with backoff, and holds
/// the worker's readiness until a write gets through. A request too large for the cluster is
/// split in halves until the document that is too large is alone; that one is dead-lettered.
async fn flush<S: Sink>(sink: &S, shared: &Shared, batch: Vec<Indexing>) {
    // The ids `take_ready` held: record ids and version ids.
    let ids: HashSet<String> = batch
        .iter()
        .flat_map(|(ack, r)| {
            let version = ack.version().map(|(id, _)| id.to_owned());
            std::iter::once(r.parent_id.clone()).chain(version)
        })
        .collect();
    if !batch.is_empty() && shared.stable_ids {
        remove_stale_chunks(sink, shared, &batch).await;
    }
    let mut parts = vec![batch];
    while let Some(mut batch) = parts.pop() {
        let mut attempt = 0;
        while !batch.is_empty() {
            // A record refused in an earlier request (another of its documents): none of the
            // rest is written.
            batch.retain(|(ack, _)| {
                if ack.failed() {
                    ack.done(1);
                }
                !ack.failed()
            });
            if batch.is_empty() {
                break;
            }
            let (guard, allowed) = shared
                .assignment()
                .begin_write(batch.iter().map(|(a, _)| &a.owner));
            if allowed.iter().any(|owned| !owned) {
                let mut owned = allowed.into_iter();
                batch.retain(|_| owned.next().unwrap_or(false));
                if batch.is_empty() {
                    break;
                }
            }
            let requests: Vec<&IndexRequest> = batch.iter().map(|(_, r)| r).collect();
            let started = std::time::Instant::now();
            let results = sink.write(&requests).await;
            drop(guard);
            shared
                .metrics
                .bulk_latency
                .observe(started.elapsed().as_secs_f64());
            match results {
                Ok(results) => {
                    // Records with several documents of which one was refused: what was written
                    // of them is deleted before they count as done (all or nothing).
                    let refused: Vec<Arc<RecordAck>> = batch
                        .iter()
                        .zip(&results)
                        .filter(|((_, r), result)| {
                            r.chunks > 1 && matches!(result, ItemResult::Rejected(_))
                        })
                        .map(|((ack, _), _)| ack.clone())
                        .collect();
                    let is_refused =
                        |ack: &Arc<RecordAck>| refused.iter().any(|r| Arc::ptr_eq(r, ack));
                    let mut deferred: Vec<Arc<RecordAck>> = Vec::new();
                    let mut rejections = Vec::new();
                    let mut retry = Vec::new();
                    let mut held = None;
                    for ((ack, request), result) in batch.into_iter().zip(results) {
                        match result {
                            ItemResult::Ok if is_refused(&ack) => {
                                shared.metrics.bulk_item("ok", 1);
                                deferred.push(ack);
                            }
                            ItemResult::Ok => {
                                shared.metrics.documents_indexed.inc();
                                shared.metrics.bulk_item("ok", 1);
                                shared.health.progressed();
                                if ack.done(1) {
                                    shared.metrics.indexed(
                                        ack.message.timestamp().to_millis(),
                                        crate::redrive::redriven_from(&ack.message).is_some(),
                                    );
                                }
                            }
                            ItemResult::Retry(reason) => {
                                shared.metrics.bulk_item("retried", 1);
                                tracing::debug!(id = %request.id, %reason, "bulk item will be retried");
                                retry.push((ack, request));
                            }
                            ItemResult::Held(reason) => {
                                shared.metrics.bulk_item("held", 1);
                                held.get_or_insert_with(|| {
                                    format!("document {}: {reason}", request.id)
                                });
                                retry.push((ack, request));
                            }
                            ItemResult::Rejected(reason) => {
                                shared.metrics.bulk_item("rejected", 1);
                                let rejection = Rejection {
                                    kind: RejectionKind::IndexRejected,
                                    message: format!("document {}: {reason}", request.id),
                                };
                                if is_refused(&ack) {
                                    rejections.push((ack, request.parent_id.clone(), rejection));
                                } else {
                                    shared.reject(&ack, rejection).await;
                                }
                            }
                        }
                    }
                    for (ack, parent_id, rejection) in rejections {
                        if !ack.failed() {
                            remove_record(sink, shared, &ack, &parent_id).await;
                        }
                        shared.reject(&ack, rejection).await;
                    }
                    for ack in deferred {
                        ack.done(1);
                    }
                    match held {
                        Some(reason) => shared.health.hold(Fault::OpenSearch, &reason),
                        None => shared.health.clear(Fault::OpenSearch),
                    }
                    batch = retry;
                }
                Err(SinkError::TooLarge(reason)) if batch.len() > 1 => {
                    tracing::info!(docs = batch.len(), error = %reason, "the cluster refused a _bulk request as too large; sending it in halves");
                    let second = batch.split_off(batch.len() / 2);
                    parts.push(second);
                    parts.push(std::mem::take(&mut batch));
                    break;
                }
                Err(SinkError::TooLarge(reason)) => {
                    shared.health.clear(Fault::OpenSearch);
                    for (ack, request) in std::mem::take(&mut batch) {
                        shared.metrics.bulk_item("rejected", 1);
                        if request.chunks > 1 && !ack.failed() {
                            remove_record(sink, shared, &ack, &request.parent_id).await;
                        }
                        let rejection = Rejection {
                            kind: RejectionKind::TooLarge,
                            message: format!(
                                "document {} ({} bytes) alone is larger than the cluster accepts in one request: {reason}; lower chunking.maxChars, drop large metadata fields, or raise http.max_content_length",
                                request.id,
                                request.source.len()
                            ),
                        };
                        shared.reject(&ack, rejection).await;
                    }
                }
                Err(e) => {
                    if shared.gives_up(matches!(e, SinkError::Misconfigured(_)), &e) {
                        parts.clear();
                        break;
                    }
                    if let SinkError::Held(reason) = &e {
                        shared.health.hold(Fault::OpenSearch, reason);
                    }
                    tracing::warn!(error = %e, docs = batch.len(), attempt, "bulk request failed; retrying");
                }
            }
            if !batch.is_empty() {
                attempt += 1;
                tokio::time::sleep(RetryPolicy::BULK.wait(attempt)).await;
            }
        }
    }
    shared.end_writes(ids.iter().map(String::as_str));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_trips_on_distinct_records_refused_alike_and_resets_on_success() {
        let breaker = Breaker::default();
        for n in 0..BREAKER_RECORDS - 1 {
            assert_eq!(breaker.refused(&format!("r{n}"), "bad model"), None);
            // The same record again does not count twice.
            assert_eq!(breaker.refused(&format!("r{n}"), "bad model"), None);
        }
        let held = breaker.refused("last", "bad model").expect("tripped");
        assert!(
            held.contains("bad model") && held.contains("modelId"),
            "{held}"
        );
        assert!(
            breaker.refused("other", "another error").is_some(),
            "still held"
        );
        breaker.succeeded();
        assert_eq!(breaker.refused("r0", "bad model"), None);
    }

    #[test]
    fn refusals_that_differ_per_record_never_trip_the_breaker() {
        let breaker = Breaker::default();
        for n in 0..50 {
            let message = format!("input too long: {n} tokens");
            assert_eq!(breaker.refused(&format!("r{n}"), &message), None);
        }
    }
}
