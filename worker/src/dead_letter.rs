//! Dead letters: records that cannot be indexed go to the dead-letter topic with the reason in
//! their headers, or (the laptop mode) to a JSONL file with the reason, or to the log (and a
//! `skipped-…` count) when the pipeline has neither.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

use crate::health::{Fault, Health};
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::source::{self, SourceError, TokenContext};
use crate::transform::Rejection;

/// Where rejected records go.
pub struct DeadLetters {
    producer: Option<FutureProducer<TokenContext>>,
    topic: Option<String>,
    /// The laptop mode's file, appended to under the lock.
    file: Option<Mutex<PathBuf>>,
    metrics: Arc<Metrics>,
}

/// One line of the dead-letter file: the record and why it was refused.
fn file_entry(message: &OwnedMessage, rejection: &Rejection) -> serde_json::Value {
    serde_json::json!({
        "reason": rejection.kind.as_str(),
        "error": rejection.message,
        "source": message.topic(),
        "line": message.offset(),
        "time": now_millis(),
        "record": String::from_utf8_lossy(message.payload().unwrap_or_default()),
    })
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl DeadLetters {
    /// The producer of the spec's dead-letter topic, if it has one.
    pub fn new(spec: &EmbeddingPipelineSpec, metrics: Arc<Metrics>) -> Result<Self, SourceError> {
        let kafka = &spec.source.kafka;
        let producer = match &spec.dead_letter {
            Some(_) => Some(
                source::client_config(kafka)?
                    // Not idempotent: a dead letter is written at least once either way (a record
                    // read again is dead-lettered again), and MSK IAM would need one more
                    // permission (kafka-cluster:WriteDataIdempotently).
                    .set("acks", "all")
                    .set("linger.ms", "5")
                    .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
                    // Fail a send to a missing topic within seconds, so the hold shows it.
                    .set("message.timeout.ms", "30000")
                    .create_with_context(TokenContext {
                        msk_iam_region: source::msk_iam_region(kafka),
                    })
                    .map_err(|e| {
                        SourceError(format!("cannot create the dead-letter producer: {e}"))
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            producer,
            topic: spec.dead_letter.as_ref().map(|d| d.topic.clone()),
            file: None,
            metrics,
        })
    }

    /// Dead letters appended to a JSONL file (the laptop mode): one line per record with
    /// `reason`, `error`, `source`, `line` (the record's position), `time` and `record`.
    pub fn file(path: PathBuf, metrics: Arc<Metrics>) -> Self {
        Self {
            producer: None,
            topic: None,
            file: Some(Mutex::new(path)),
            metrics,
        }
    }

    /// Appends the record to the file; retries until it is written.
    async fn append(&self, file: &Mutex<PathBuf>, message: &OwnedMessage, rejection: &Rejection) {
        let line = file_entry(message, rejection).to_string();
        let mut attempt = 0;
        loop {
            let written = {
                let path = file.lock().unwrap_or_else(|e| e.into_inner());
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&*path)
                    .and_then(|mut f| writeln!(f, "{line}"))
                    .map_err(|e| format!("writing the dead-letter file {}: {e}", path.display()))
            };
            match written {
                Ok(()) => {
                    self.metrics
                        .record(&format!("dead-lettered-{}", rejection.kind.as_str()));
                    tracing::warn!(
                        source = message.topic(), line = message.offset(),
                        reason = rejection.kind.as_str(), error = %rejection.message,
                        "record written to the dead-letter file"
                    );
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "cannot write a dead letter; retrying");
                    tokio::time::sleep(RetryPolicy::WRITES.wait(attempt)).await;
                }
            }
        }
    }

    /// Writes the record with the reason in its headers, the source record's headers and its
    /// timestamp; retries until the broker takes it. A record larger than the producer or the
    /// topic accepts is written with its value cut to fit and `vectorpipe.truncated` saying so.
    /// While the topic takes nothing, `health` holds the records (not ready).
    pub async fn send(&self, message: &OwnedMessage, rejection: &Rejection, health: &Health) {
        if let Some(file) = &self.file {
            return self.append(file, message, rejection).await;
        }
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let label = format!("dead-lettered-{}", rejection.kind.as_str());
        let (Some(producer), Some(dlq)) = (&self.producer, &self.topic) else {
            self.metrics
                .record(&format!("skipped-{}", rejection.kind.as_str()));
            tracing::warn!(
                topic, partition, offset, reason = rejection.kind.as_str(),
                error = %rejection.message,
                "skipping a record that cannot be indexed (no deadLetter.topic is configured)"
            );
            return;
        };
        let time = now_millis().to_string();
        let partition_text = partition.to_string();
        let offset_text = offset.to_string();
        let payload = message.payload().unwrap_or_default();
        let key = message.key().unwrap_or_default();
        let source_headers: Vec<(String, Option<Vec<u8>>)> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        // What the record may weigh; lowered when the broker refuses it as too large.
        let mut limit = MAX_MESSAGE_BYTES;
        let mut attempt = 0;
        loop {
            let ours = 512 + rejection.message.len() + topic.len() + time.len();
            let theirs: usize = source_headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16)
                .sum();
            let room = limit.saturating_sub(ours + theirs);
            let (key_part, value_part) = fit(key, payload, room);
            let truncated = (value_part.len() < payload.len() || key_part.len() < key.len())
                .then(|| {
                    format!(
                        "value cut from {} to {} bytes, key from {} to {} bytes, to fit the dead-letter topic",
                        payload.len(),
                        value_part.len(),
                        key.len(),
                        key_part.len()
                    )
                });
            let mut headers = OwnedHeaders::new()
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
                    value: Some(topic),
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
            if let Some(truncated) = &truncated {
                headers = headers.insert(Header {
                    key: "vectorpipe.truncated",
                    value: Some(truncated.as_str()),
                });
            }
            for (k, v) in &source_headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: v.as_deref(),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(headers);
            if let Some(ms) = message.timestamp().to_millis() {
                record = record.timestamp(ms);
            }
            if message.key().is_some() {
                record = record.key(key_part);
            }
            if message.payload().is_some() {
                record = record.payload(value_part);
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => {
                    self.metrics.record(&label);
                    health.clear(Fault::DeadLetters);
                    tracing::info!(
                        topic,
                        partition,
                        offset,
                        reason = rejection.kind.as_str(),
                        dead_letter_topic = dlq.as_str(),
                        truncated = truncated.as_deref().unwrap_or("no"),
                        "record sent to the dead-letter topic"
                    );
                    return;
                }
                Err((e, _)) if too_large(&e) && limit > MIN_MESSAGE_BYTES => {
                    // The topic's max.message.bytes is lower than the producer's: try smaller.
                    limit = (limit / 2).max(MIN_MESSAGE_BYTES);
                    tracing::warn!(error = %e, dead_letter_topic = dlq.as_str(), limit, "the dead-letter topic refused the record as too large; cutting its value further");
                }
                Err((e, _)) => {
                    attempt += 1;
                    health.hold(
                        Fault::DeadLetters,
                        &format!(
                            "cannot write to the dead-letter topic {dlq:?}: {e}; create the topic (auto-creation is often off), grant the workers write access to it, or check that the cluster is reachable"
                        ),
                    );
                    tracing::error!(error = %e, dead_letter_topic = dlq.as_str(), attempt, "cannot write to the dead-letter topic; retrying");
                    tokio::time::sleep(RetryPolicy::WRITES.wait(attempt)).await;
                }
            }
        }
    }
}

/// The most a dead letter weighs (the producer's `message.max.bytes`).
const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// The least the limit is lowered to when the topic refuses a record as too large.
const MIN_MESSAGE_BYTES: usize = 1_024;

fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord)
    ) || e.to_string().contains("too large")
}

/// The key and value cut to `room` bytes together: the value first (the key decides the
/// partition and is usually small), text cut on a character boundary.
fn fit<'a>(key: &'a [u8], value: &'a [u8], room: usize) -> (&'a [u8], &'a [u8]) {
    let key = cut(key, room);
    let value = cut(value, room - key.len());
    (key, value)
}

/// At most `room` bytes of `bytes`; a UTF-8 text is cut where a character starts.
fn cut(bytes: &[u8], room: usize) -> &[u8] {
    if bytes.len() <= room {
        return bytes;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &bytes[..end]
        }
        Err(_) => &bytes[..room],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_cut_to_fit_value_first_and_on_a_character_boundary() {
        let (k, v) = fit(b"key", b"hello", 100);
        assert_eq!((k, v), (&b"key"[..], &b"hello"[..]));
        let (k, v) = fit(b"key", "h\u{e9}llo".as_bytes(), 5);
        assert_eq!(k, b"key");
        assert_eq!(v, b"h", "the two bytes of \u{e9} are not split");
        let (k, v) = fit(&[0xff; 10], &[0xfe; 10], 4);
        assert_eq!((k.len(), v.len()), (4, 0));
    }
}
