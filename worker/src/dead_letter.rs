//! Dead letters: records that cannot be indexed go to the dead-letter topic with the reason in
//! their headers, or (the laptop mode) to a JSONL file with the reason, or to the log (and a
//! `skipped-…` count) when the pipeline has neither.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use vectorpipe_crds::v1alpha1::EmbeddingPipelineSpec;

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
                    .set("enable.idempotence", "true")
                    .set("linger.ms", "5")
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

    /// Writes the record with the reason in its headers; retries until the broker takes it.
    pub async fn send(&self, message: &OwnedMessage, rejection: &Rejection) {
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
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => {
                    self.metrics.record(&label);
                    tracing::info!(
                        topic,
                        partition,
                        offset,
                        reason = rejection.kind.as_str(),
                        dead_letter_topic = dlq.as_str(),
                        "record sent to the dead-letter topic"
                    );
                    return;
                }
                Err((e, _)) => {
                    attempt += 1;
                    tracing::error!(error = %e, dead_letter_topic = dlq.as_str(), attempt, "cannot write to the dead-letter topic; retrying");
                    tokio::time::sleep(RetryPolicy::WRITES.wait(attempt)).await;
                }
            }
        }
    }
}
