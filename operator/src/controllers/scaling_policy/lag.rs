//! Consumer lag read from the brokers, without joining the group: the group's committed offsets
//! against each partition's watermarks.

use std::time::Duration;

use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use vectorpipe_crds::v1alpha1::{KafkaSource, StartingOffset};

/// Why the lag could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// The brokers did not answer or refused.
    #[error("reading consumer lag from Kafka failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A credential the spec names is missing.
    #[error("{0}")]
    MissingCredential(String),
    /// The topics cannot be selected (a bad pattern).
    #[error("{0}")]
    Topics(#[from] vectorpipe_kafka::TopicError),
    /// A source topic is missing, not visible to the operator, or in error: its lag is unknown
    /// (never "no partitions", which would scale the pipeline to nothing).
    #[error(
        "topic \"{topic}\" {problem}; create the topic, or let the operator's identity describe it"
    )]
    Topic {
        /// The topic.
        topic: String,
        /// What the brokers said.
        problem: String,
    },
    /// No topic matches the pattern yet.
    #[error(
        "no topic matches source.kafka.topicPattern \"{0}\" (or the operator may not describe them); create one, or fix the pattern"
    )]
    NoTopicMatches(String),
}

/// What a topic's metadata says is wrong with it, if anything.
fn topic_problem(topic: &rdkafka::metadata::MetadataTopic) -> Option<String> {
    match topic.error() {
        Some(code) => Some(match rdkafka::types::RDKafkaErrorCode::from(code) {
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition => "does not exist".into(),
            rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed => {
                "may not be described by the operator (not authorized)".into()
            }
            other => format!("is in error ({other})"),
        }),
        None if topic.partitions().is_empty() => Some("has no partitions".into()),
        None => None,
    }
}

/// One partition's positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset, if it committed one.
    pub committed: Option<i64>,
    /// The oldest retained offset.
    pub low: i64,
    /// One past the newest offset.
    pub high: i64,
}

impl PartitionLag {
    /// Records behind: from the committed offset, or, for a group that never committed, from
    /// where it will start (`earliest`: the oldest retained record; `latest`: nothing).
    pub fn lag(&self, starting: StartingOffset) -> i64 {
        let from = match (self.committed, starting) {
            (Some(c), _) => c.max(self.low),
            (None, StartingOffset::Earliest) => self.low,
            (None, StartingOffset::Latest) => self.high,
        };
        (self.high - from).max(0)
    }
}

/// Lag over all partitions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LagSummary {
    /// All partitions added up.
    pub sum: i64,
    /// The partition with the most.
    pub max: i64,
    /// Partitions of the source topics.
    pub partitions: i32,
    /// Partitions with any lag.
    pub partitions_with_lag: i32,
    /// Where the group stands, added over partitions (high watermark minus lag): its growth over
    /// time is the consume rate.
    pub position: i64,
}

/// Adds up per-partition lag.
pub fn summarize(partitions: &[PartitionLag], starting: StartingOffset) -> LagSummary {
    let lags: Vec<i64> = partitions.iter().map(|p| p.lag(starting)).collect();
    LagSummary {
        sum: lags.iter().sum(),
        max: lags.iter().copied().max().unwrap_or(0),
        partitions: partitions.len() as i32,
        partitions_with_lag: lags.iter().filter(|l| **l > 0).count() as i32,
        position: partitions
            .iter()
            .zip(&lags)
            .map(|(p, lag)| p.high - lag)
            .sum(),
    }
}

/// What the lag reader needs from the pipeline's Secrets (PEM text and SCRAM credentials), the
/// same Secrets the worker mounts.
pub use vectorpipe_kafka::Credentials as KafkaCredentials;

/// The lag reader's client context: makes MSK IAM tokens when the source uses MSK IAM.
pub struct LagContext {
    msk_iam_region: Option<String>,
}

impl ClientContext for LagContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let region = self
            .msk_iam_region
            .as_deref()
            .ok_or("no MSK IAM region for an OAUTHBEARER token")?;
        vectorpipe_kafka::msk_iam_token(region, "vectorpipe-operator")
    }
}

impl ConsumerContext for LagContext {}

/// The lag reader's consumer.
pub type LagConsumer = BaseConsumer<LagContext>;

/// A consumer that reads `group`'s committed offsets without joining the group, authenticated
/// as the pipeline's workers are (MSK IAM with the operator's own AWS credentials).
pub fn consumer(
    kafka: &KafkaSource,
    group: &str,
    credentials: &KafkaCredentials,
) -> Result<LagConsumer, LagError> {
    let context = LagContext {
        msk_iam_region: vectorpipe_kafka::msk_iam_region(kafka),
    };
    Ok(client_config(kafka, group, credentials)?.create_with_context(context)?)
}

/// The lag reader's client settings (brokers, group, auth).
pub fn client_config(
    kafka: &KafkaSource,
    group: &str,
    credentials: &KafkaCredentials,
) -> Result<ClientConfig, LagError> {
    let mut config = vectorpipe_kafka::client_config(kafka, credentials)
        .map_err(|e| LagError::MissingCredential(format!("reading consumer lag: {e}")))?;
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // Unreachable brokers surface as a failed read (MetricsUnavailable), once per poll;
        // librdkafka's own connection chatter would repeat it in the operator's log.
        .set_log_level(RDKafkaLogLevel::Critical);
    Ok(config)
}

/// Reads every partition's positions for `group` (blocking; run it on a blocking thread).
pub fn read(
    kafka: &KafkaSource,
    group: &str,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, LagError> {
    read_with(
        &consumer(kafka, group, &KafkaCredentials::default())?,
        kafka,
        timeout,
    )
}

/// Like [`read`], with a consumer made by [`consumer`] (kept between polls to save connections).
pub fn read_with(
    consumer: &LagConsumer,
    kafka: &KafkaSource,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, LagError> {
    let mut list = TopicPartitionList::new();
    let mut add = |topic: &rdkafka::metadata::MetadataTopic| {
        for partition in topic.partitions() {
            list.add_partition(topic.name(), partition.id());
        }
    };
    match (&kafka.topics, &kafka.topic_pattern) {
        (Some(topics), _) => {
            // One metadata request per named topic: a request for all topics silently leaves
            // out the ones the operator may not describe (and MSK IAM filters them too).
            for name in topics {
                let metadata = consumer.fetch_metadata(Some(name), timeout)?;
                let topic = metadata.topics().iter().find(|t| t.name() == name);
                let problem = match topic {
                    None => Some("does not exist".to_owned()),
                    Some(t) => topic_problem(t),
                };
                if let Some(problem) = problem {
                    return Err(LagError::Topic {
                        topic: name.clone(),
                        problem,
                    });
                }
                if let Some(t) = topic {
                    add(t);
                }
            }
        }
        (None, Some(pattern)) => {
            let selection = vectorpipe_kafka::TopicSelection::of(kafka)?;
            let metadata = consumer.fetch_metadata(None, timeout)?;
            let mut matched = 0;
            for topic in metadata
                .topics()
                .iter()
                .filter(|t| selection.matches(t.name()))
            {
                if let Some(problem) = topic_problem(topic) {
                    return Err(LagError::Topic {
                        topic: topic.name().to_owned(),
                        problem,
                    });
                }
                matched += 1;
                add(topic);
            }
            if matched == 0 {
                return Err(LagError::NoTopicMatches(pattern.clone()));
            }
        }
        (None, None) => {}
    }
    let committed = consumer.committed_offsets(list.clone(), timeout)?;
    let mut out = Vec::new();
    for element in list.elements() {
        let (low, high) =
            consumer.fetch_watermarks(element.topic(), element.partition(), timeout)?;
        let committed = committed
            .find_partition(element.topic(), element.partition())
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        out.push(PartitionLag {
            topic: element.topic().to_owned(),
            partition: element.partition(),
            committed,
            low,
            high,
        });
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(committed: Option<i64>, low: i64, high: i64) -> PartitionLag {
        PartitionLag {
            topic: "t".into(),
            partition: 0,
            committed,
            low,
            high,
        }
    }

    #[test]
    fn lag_counts_from_the_commit_or_the_starting_policy() {
        assert_eq!(part(Some(40), 0, 100).lag(StartingOffset::Earliest), 60);
        assert_eq!(part(None, 10, 100).lag(StartingOffset::Earliest), 90);
        assert_eq!(part(None, 10, 100).lag(StartingOffset::Latest), 0);
        assert_eq!(
            part(Some(5), 10, 100).lag(StartingOffset::Earliest),
            90,
            "a commit below retention counts from the oldest record"
        );
        assert_eq!(part(Some(100), 0, 100).lag(StartingOffset::Earliest), 0);
    }

    #[test]
    fn msk_iam_sources_use_oauthbearer_over_tls() {
        // Only the settings: creating the client would ask the AWS credential chain for a
        // token at once.
        let source: KafkaSource = serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["b-1.msk.eu-west-1.amazonaws.com:9098"],
            "topics": ["t"],
            "auth": {"mskIam": {"region": "eu-west-1"}},
        }))
        .unwrap();
        let config = client_config(&source, "g", &KafkaCredentials::default()).unwrap();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("OAUTHBEARER"));
    }

    #[test]
    fn scram_needs_its_credentials() {
        let source: KafkaSource = serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["k:9092"],
            "topics": ["t"],
            "auth": {"scram": {"secretRef": {"name": "s"}}},
        }))
        .unwrap();
        let err = client_config(&source, "g", &KafkaCredentials::default()).unwrap_err();
        assert!(err.to_string().contains("SCRAM username"), "{err}");
    }

    #[test]
    fn summaries_add_up_and_count_lagging_partitions() {
        let parts = [
            part(Some(0), 0, 10),
            part(Some(10), 0, 10),
            part(Some(5), 0, 30),
        ];
        assert_eq!(
            summarize(&parts, StartingOffset::Earliest),
            LagSummary {
                sum: 35,
                max: 25,
                partitions: 3,
                partitions_with_lag: 2,
                position: 15
            }
        );
    }
}
