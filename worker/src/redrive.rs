//! Dead-letter redrive: once the cause of a failure is fixed, `vectorpipe-worker redrive` reads
//! the pipeline's dead-letter topic, picks the dead letters asked for (by reason, by when they
//! were dead-lettered, by source partition) and writes them back to the partition of the source
//! topic they came from, where the running workers index them like any other record.
//!
//! What keeps it exact:
//! - a redriven record carries where it was first read (`vectorpipe.origin.*`), so its document
//!   ids are the ones it would have had: positional ids come from the origin, keys and id fields
//!   are the record's own; running a redrive twice writes the same documents again, never copies;
//! - a dead letter whose record id was written again later in its source partition (a newer
//!   version, a tombstone) is not redriven: the old version would overwrite the new one;
//! - one source record dead-lettered more than once (read again after a crash) is redriven once;
//! - a dead letter cut to fit the dead-letter topic is not redriven (its value is not the
//!   record's), and neither is one of a topic the pipeline does not read; both are counted;
//! - the redriven record carries its failures in `vectorpipe.history` (a JSON array, oldest
//!   first), so one that fails again reaches the dead-letter topic with every earlier reason.
//!
//! Only dead letters already in the topic when the redrive starts are read, so records that fail
//! again during the redrive are not picked up by the same run.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

use crate::source::{self, TokenContext};
use crate::transform::{self, Outcome, SourceRecord};

/// The header with the topic a redriven record was first read from.
pub const ORIGIN_TOPIC: &str = "vectorpipe.origin.topic";
/// The header with the partition a redriven record was first read from.
pub const ORIGIN_PARTITION: &str = "vectorpipe.origin.partition";
/// The header with the offset a redriven record was first read at.
pub const ORIGIN_OFFSET: &str = "vectorpipe.origin.offset";
/// The header with a redriven record's earlier failures, a JSON array, oldest first.
pub const HISTORY: &str = "vectorpipe.history";
/// The header with the id of the redrive that wrote the record.
pub const REDRIVE: &str = "vectorpipe.redrive";

/// How long one read or metadata call may take before the redrive gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The value of header `name`, as text.
fn header<'a>(headers: Option<&'a impl Headers>, name: &str) -> Option<&'a str> {
    let headers = headers?;
    (0..headers.count())
        .filter_map(|i| headers.try_get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Where a record was first read: its `vectorpipe.origin.*` headers when a redrive wrote it,
/// else its own position.
pub fn origin(message: &impl Message) -> (String, i32, i64) {
    redriven_from(message).unwrap_or_else(|| {
        (
            message.topic().to_owned(),
            message.partition(),
            message.offset(),
        )
    })
}

/// The `vectorpipe.origin.*` headers of a record a redrive wrote.
pub fn redriven_from(message: &impl Message) -> Option<(String, i32, i64)> {
    let headers = message.headers();
    Some((
        header(headers, ORIGIN_TOPIC)?.to_owned(),
        header(headers, ORIGIN_PARTITION)?.parse().ok()?,
        header(headers, ORIGIN_OFFSET)?.parse().ok()?,
    ))
}

/// Which dead letters to redrive; an empty list takes every value.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Reasons (`embedding-rejected`, `index-rejected`, ...).
    pub reasons: Vec<String>,
    /// Dead-lettered at or after, milliseconds since the epoch.
    pub since_ms: Option<i64>,
    /// Dead-lettered before, milliseconds since the epoch.
    pub until_ms: Option<i64>,
    /// Partitions of the source topic the records came from.
    pub partitions: Vec<i32>,
    /// The most records to redrive.
    pub limit: Option<usize>,
}

impl Selection {
    fn takes(&self, letter: &Letter) -> bool {
        (self.reasons.is_empty() || self.reasons.contains(&letter.reason))
            && self.since_ms.is_none_or(|t| letter.time_ms >= t)
            && self.until_ms.is_none_or(|t| letter.time_ms < t)
            && (self.partitions.is_empty() || self.partitions.contains(&letter.origin.1))
    }
}

pub use vectorpipe_crds::redrive::Report;

/// One dead letter as read.
struct Letter {
    message: OwnedMessage,
    reason: String,
    error: String,
    time_ms: i64,
    /// Where the record was first read.
    origin: (String, i32, i64),
    truncated: bool,
}

impl Letter {
    /// Reads the headers a worker writes; `None` for a record that has not got them.
    fn read(message: OwnedMessage) -> Option<Self> {
        let headers = message.headers();
        let reason = header(headers, "vectorpipe.reason")?.to_owned();
        let error = header(headers, "vectorpipe.error")
            .unwrap_or_default()
            .to_owned();
        let time_ms = header(headers, "vectorpipe.time")
            .and_then(|t| t.parse().ok())
            .or_else(|| message.timestamp().to_millis())
            .unwrap_or_default();
        let origin = match redriven_from(&message) {
            Some(origin) => origin,
            None => (
                header(headers, "vectorpipe.source.topic")?.to_owned(),
                header(headers, "vectorpipe.source.partition")?
                    .parse()
                    .ok()?,
                header(headers, "vectorpipe.source.offset")?.parse().ok()?,
            ),
        };
        let truncated = header(headers, "vectorpipe.truncated").is_some();
        Some(Self {
            message,
            reason,
            error,
            time_ms,
            origin,
            truncated,
        })
    }

    /// The failures before this one (from an earlier redrive) and this one.
    fn history(&self) -> Value {
        let mut history = header(self.message.headers(), HISTORY)
            .and_then(|h| serde_json::from_str::<Vec<Value>>(h).ok())
            .unwrap_or_default();
        history.push(serde_json::json!({
            "reason": self.reason,
            "error": self.error,
            "time": self.time_ms,
            "topic": self.message.topic(),
            "partition": self.message.partition(),
            "offset": self.message.offset(),
        }));
        Value::Array(history)
    }

    /// The record as the source topic first had it (its positional id from the origin).
    fn source_record(&self) -> SourceRecord<'_> {
        let (topic, partition, offset) = &self.origin;
        SourceRecord {
            topic,
            partition: *partition,
            offset: *offset,
            key: self.message.key(),
            payload: self.message.payload(),
            timestamp_ms: self.message.timestamp().to_millis(),
            origin: None,
        }
    }
}

/// The record id a record has under this pipeline, if it has one (its documents' parent id, or
/// the id a tombstone deletes).
fn record_id(spec: &EmbeddingPipelineSpec, record: &SourceRecord<'_>) -> Option<String> {
    match transform::transform(spec, record) {
        Outcome::Index(docs) => docs.into_iter().next().map(|d| d.parent_id),
        Outcome::Delete(id) => Some(id),
        Outcome::Skip(_) | Outcome::Reject(_) => None,
    }
}

/// A consumer of the pipeline's cluster that is assigned partitions by hand (no group, no
/// commits).
fn reader(spec: &EmbeddingPipelineSpec) -> anyhow::Result<BaseConsumer<TokenContext>> {
    let kafka = &spec.source.kafka;
    let consumer: BaseConsumer<TokenContext> = source::client_config(kafka)?
        .set("group.id", "vectorpipe-redrive")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(TokenContext {
            msk_iam_region: source::msk_iam_region(kafka),
        })?;
    Ok(consumer)
}

/// Every record of `topic` from `start` (per partition, else its first offset) up to its end
/// as it was when called, in order per partition, to `each`.
fn read_to_end(
    consumer: &BaseConsumer<TokenContext>,
    topic: &str,
    start: &HashMap<i32, i64>,
    mut each: impl FnMut(OwnedMessage),
) -> anyhow::Result<()> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic:?} has no partitions or does not exist; check the pipeline's topics and that the redrive can describe them"
    );
    let mut list = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
        let from = start.get(&partition).copied().unwrap_or(low).max(low);
        if from < high {
            list.add_partition_offset(topic, partition, Offset::Offset(from))?;
            ends.insert(partition, high);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&list)?;
    while !ends.is_empty() {
        let message = match consumer.poll(TIMEOUT) {
            Some(m) => m?,
            None => anyhow::bail!(
                "no record of {topic:?} arrived for {}s while {} partitions were still to read; check that the brokers are reachable",
                TIMEOUT.as_secs(),
                ends.len()
            ),
        };
        let (partition, offset) = (message.partition(), message.offset());
        let Some(end) = ends.get(&partition).copied() else {
            continue;
        };
        if offset < end {
            each(message.detach());
        }
        if offset + 1 >= end {
            ends.remove(&partition);
        }
    }
    consumer.unassign()?;
    Ok(())
}

/// Redrives the dead letters `selection` takes; with `dry_run`, only counts them.
pub async fn redrive(
    spec: &EmbeddingPipelineSpec,
    selection: &Selection,
    dry_run: bool,
) -> anyhow::Result<Report> {
    let dlq = spec
        .dead_letter
        .as_ref()
        .map(|d| d.topic.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "this pipeline has no deadLetter.topic, so there are no dead letters to redrive"
            )
        })?;
    let mut report = Report {
        id: format!("redrive-{}", jiff::Timestamp::now().as_millisecond()),
        dry_run,
        ..Report::default()
    };
    let spec_for_read = spec.clone();
    let selection_for_read = selection.clone();
    // librdkafka's calls block: read on a blocking thread.
    let (letters, mut report) = tokio::task::spawn_blocking(move || {
        let consumer = reader(&spec_for_read)?;
        // The latest dead letter of each source record.
        let mut letters: BTreeMap<(String, i32, i64), Letter> = BTreeMap::new();
        read_to_end(&consumer, &dlq, &HashMap::new(), |message| {
            report.read += 1;
            let Some(letter) = Letter::read(message) else {
                report.unreadable += 1;
                return;
            };
            if !selection_for_read.takes(&letter) {
                return;
            }
            report.selected += 1;
            *report.by_reason.entry(letter.reason.clone()).or_default() += 1;
            if letters.insert(letter.origin.clone(), letter).is_some() {
                report.duplicates += 1;
            }
        })?;
        let letters = superseded(&spec_for_read, &consumer, letters, &mut report)?;
        anyhow::Ok((letters, report))
    })
    .await??;
    let topics = spec.source.kafka.topics.clone();
    let mut chosen = Vec::new();
    for letter in letters {
        if letter.truncated {
            report.truncated += 1;
        } else if topics
            .as_ref()
            .is_some_and(|t| !t.contains(&letter.origin.0))
        {
            report.other_topic += 1;
        } else if selection.limit.is_some_and(|limit| chosen.len() >= limit) {
            report.over_limit += 1;
        } else {
            chosen.push(letter);
        }
    }
    report.chosen = chosen.len() as u64;
    if dry_run {
        return Ok(report);
    }
    report.redriven = send(spec, &chosen, &report.id).await?;
    Ok(report)
}

/// Of one source topic: where to start looking, per partition, and the latest dead-lettered
/// offset of each (partition, record id).
type Looked = (HashMap<i32, i64>, HashMap<(i32, String), i64>);

/// Drops (and counts) the letters whose record id was written again later in its source
/// partition. Positional ids are never written again, so those are kept without a look.
fn superseded(
    spec: &EmbeddingPipelineSpec,
    consumer: &BaseConsumer<TokenContext>,
    letters: BTreeMap<(String, i32, i64), Letter>,
    report: &mut Report,
) -> anyhow::Result<Vec<Letter>> {
    if !spec.id_source().is_stable() {
        return Ok(letters.into_values().collect());
    }
    // Per source topic: the earliest position to look from, per partition, and the letters by
    // (partition, record id).
    let mut by_topic: BTreeMap<String, Looked> = BTreeMap::new();
    for letter in letters.values() {
        let (topic, partition, offset) = &letter.origin;
        let Some(id) = record_id(spec, &letter.source_record()) else {
            continue;
        };
        let (start, ids) = by_topic.entry(topic.clone()).or_default();
        let from = start.entry(*partition).or_insert(offset + 1);
        *from = (*from).min(offset + 1);
        let latest = ids.entry((*partition, id)).or_insert(*offset);
        *latest = (*latest).max(*offset);
    }
    // The latest position each of those ids was written at, later in its partition.
    let mut newer: HashMap<(String, i32, String), i64> = HashMap::new();
    for (topic, (start, ids)) in &by_topic {
        read_to_end(consumer, topic, start, |message| {
            let (first_topic, partition, position) = origin(&message);
            if first_topic != *topic {
                return;
            }
            let record = SourceRecord {
                topic: &first_topic,
                partition,
                offset: position,
                key: message.key(),
                payload: message.payload(),
                timestamp_ms: message.timestamp().to_millis(),
                origin: None,
            };
            let Some(id) = record_id(spec, &record) else {
                return;
            };
            if ids.contains_key(&(partition, id.clone())) {
                let seen = newer
                    .entry((topic.clone(), partition, id))
                    .or_insert(position);
                *seen = (*seen).max(position);
            }
        })?;
    }
    let mut kept = Vec::new();
    for letter in letters.into_values() {
        let (topic, partition, offset) = &letter.origin;
        let later = record_id(spec, &letter.source_record())
            .and_then(|id| newer.get(&(topic.clone(), *partition, id)).copied())
            .is_some_and(|position| position > *offset);
        if later {
            report.superseded += 1;
        } else {
            kept.push(letter);
        }
    }
    Ok(kept)
}

/// Writes the letters back to their source partitions; returns how many the brokers took.
async fn send(spec: &EmbeddingPipelineSpec, letters: &[Letter], id: &str) -> anyhow::Result<u64> {
    let kafka = &spec.source.kafka;
    let producer: FutureProducer<TokenContext> = source::client_config(kafka)?
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", "1000000")
        .set("message.timeout.ms", "60000")
        .create_with_context(TokenContext {
            msk_iam_region: source::msk_iam_region(kafka),
        })?;
    let sends = letters.iter().map(|letter| {
        let producer = &producer;
        async move {
            let (topic, partition, offset) = &letter.origin;
            let (partition_text, offset_text) = (partition.to_string(), offset.to_string());
            let history = letter.history().to_string();
            let mut headers = OwnedHeaders::new();
            // The record's own headers; the dead letter's (and an earlier redrive's) are ours.
            if let Some(theirs) = letter.message.headers() {
                for h in theirs.iter() {
                    if !h.key.starts_with("vectorpipe.") {
                        headers = headers.insert(Header {
                            key: h.key,
                            value: h.value,
                        });
                    }
                }
            }
            for (key, value) in [
                (ORIGIN_TOPIC, topic.as_str()),
                (ORIGIN_PARTITION, partition_text.as_str()),
                (ORIGIN_OFFSET, offset_text.as_str()),
                (HISTORY, history.as_str()),
                (REDRIVE, id),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .partition(*partition)
                .headers(headers);
            if let Some(ms) = letter.message.timestamp().to_millis() {
                record = record.timestamp(ms);
            }
            if let Some(key) = letter.message.key() {
                record = record.key(key);
            }
            if let Some(payload) = letter.message.payload() {
                record = record.payload(payload);
            }
            producer
                .send(record, TIMEOUT)
                .await
                .map(|_| ())
                .map_err(|(e, _)| {
                    anyhow::anyhow!(
                        "cannot write the dead letter of {topic} partition {partition} offset {offset} back to its topic: {e}; grant the redrive write access to {topic:?}, then run it again (records already written are indexed with the same ids)"
                    )
                })
        }
    });
    let results = futures::future::join_all(sends).await;
    let mut written = 0;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(()) => written += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.context(format!(
            "{written} of {} records were redriven",
            letters.len()
        ))),
        None => Ok(written),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn letter(headers: &[(&str, &str)]) -> OwnedMessage {
        let mut h = OwnedHeaders::new();
        for (key, value) in headers {
            h = h.insert(Header {
                key,
                value: Some(*value),
            });
        }
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"k".to_vec()),
            "posts-dlq".to_owned(),
            Timestamp::CreateTime(1_000),
            0,
            7,
            Some(h),
        )
    }

    const FIRST: [(&str, &str); 6] = [
        ("vectorpipe.reason", "embedding-rejected"),
        ("vectorpipe.error", "too long"),
        ("vectorpipe.source.topic", "posts"),
        ("vectorpipe.source.partition", "2"),
        ("vectorpipe.source.offset", "41"),
        ("vectorpipe.time", "5000"),
    ];

    #[test]
    fn a_dead_letter_is_read_from_its_headers_and_an_earlier_redrive_keeps_its_origin() {
        let first = Letter::read(letter(&FIRST)).expect("ours");
        assert_eq!(first.origin, ("posts".to_owned(), 2, 41));
        assert_eq!(
            (first.reason.as_str(), first.time_ms),
            ("embedding-rejected", 5000)
        );
        let history = first.history();
        assert_eq!(history.as_array().map(Vec::len), Some(1));
        assert_eq!(history[0]["reason"], "embedding-rejected");

        // Redriven, it failed again: read at offset 90 of partition 0, first read at 2/41.
        let history_text = history.to_string();
        let mut again = FIRST.to_vec();
        again[3] = ("vectorpipe.source.partition", "0");
        again[4] = ("vectorpipe.source.offset", "90");
        again[0] = ("vectorpipe.reason", "index-rejected");
        again.extend([
            (ORIGIN_TOPIC, "posts"),
            (ORIGIN_PARTITION, "2"),
            (ORIGIN_OFFSET, "41"),
            (HISTORY, history_text.as_str()),
        ]);
        let second = Letter::read(letter(&again)).expect("ours");
        assert_eq!(second.origin, ("posts".to_owned(), 2, 41));
        let history = second.history();
        let reasons: Vec<&str> = history
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["reason"].as_str())
            .collect();
        assert_eq!(reasons, ["embedding-rejected", "index-rejected"]);

        assert!(Letter::read(letter(&[("trace-id", "x")])).is_none());
    }

    #[test]
    fn the_selection_takes_reasons_times_and_source_partitions() {
        let letter = Letter::read(letter(&FIRST)).expect("ours");
        assert!(Selection::default().takes(&letter));
        let by = |s: Selection| s.takes(&letter);
        assert!(by(Selection {
            reasons: vec!["parse".into(), "embedding-rejected".into()],
            ..Selection::default()
        }));
        assert!(!by(Selection {
            reasons: vec!["parse".into()],
            ..Selection::default()
        }));
        assert!(by(Selection {
            since_ms: Some(5000),
            until_ms: Some(5001),
            ..Selection::default()
        }));
        assert!(!by(Selection {
            since_ms: Some(5001),
            ..Selection::default()
        }));
        assert!(!by(Selection {
            until_ms: Some(5000),
            ..Selection::default()
        }));
        assert!(by(Selection {
            partitions: vec![2],
            ..Selection::default()
        }));
        assert!(!by(Selection {
            partitions: vec![0, 1],
            ..Selection::default()
        }));
    }
}
