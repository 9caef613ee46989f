//! Kafka: the consumer (group, offsets, auth, rebalances, lag statistics) and the dead-letter
//! producer's client settings. `assignment` keeps partition ownership and `offsets` what may be
//! committed.

pub mod assignment;
pub mod offsets;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use vectorpipe_crds::v1alpha1::{KafkaSource, StartingOffset};
use vectorpipe_kafka::{Credentials, Material};

use crate::dedup::Dedup;
use crate::metrics::{Metrics, TopicPartition};
use assignment::Assignment;
use offsets::Partition;

/// Why the Kafka client cannot be configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

fn env(name: &str, what: &str) -> Result<String, SourceError> {
    std::env::var(name).map_err(|_| {
        SourceError(format!(
            "{name} is not set; {what} (the operator sets it from the Secret named in the spec)"
        ))
    })
}

/// The secrets the source's auth needs, from the files and environment the operator gave the
/// worker's pod (never from the spec).
fn credentials(kafka: &KafkaSource) -> Result<Credentials, SourceError> {
    let mut credentials = Credentials::default();
    let Some(auth) = &kafka.auth else {
        return Ok(credentials);
    };
    let file = |name: &str, what: &str| env(name, what).map(|p| Material::File(p.into()));
    let ca_ref = auth
        .tls
        .as_ref()
        .and_then(|t| t.ca_secret_ref.as_ref())
        .or_else(|| auth.scram.as_ref().and_then(|s| s.ca_secret_ref.as_ref()));
    if ca_ref.is_some() {
        credentials.ca = Some(file(
            "VECTORPIPE_KAFKA_CA_FILE",
            "the Kafka CA bundle is mounted at this path",
        )?);
    }
    if auth
        .tls
        .as_ref()
        .is_some_and(|t| t.client_cert_secret_ref.is_some())
    {
        credentials.cert = Some(file(
            "VECTORPIPE_KAFKA_CERT_FILE",
            "the client certificate is mounted at this path",
        )?);
        credentials.key = Some(file(
            "VECTORPIPE_KAFKA_KEY_FILE",
            "the client key is mounted at this path",
        )?);
    }
    if auth.scram.is_some() {
        credentials.username = Some(env("VECTORPIPE_KAFKA_USERNAME", "SCRAM needs a username")?);
        credentials.password = Some(env("VECTORPIPE_KAFKA_PASSWORD", "SCRAM needs a password")?);
    }
    Ok(credentials)
}

/// The client settings shared by the consumer and the dead-letter producer: brokers and auth.
pub fn client_config(kafka: &KafkaSource) -> Result<ClientConfig, SourceError> {
    vectorpipe_kafka::client_config(kafka, &credentials(kafka)?)
        .map_err(|e| SourceError(e.to_string()))
}

pub use vectorpipe_kafka::msk_iam_region;

/// MSK IAM tokens for this worker's clients (consumer and dead-letter producer).
fn msk_iam_token(region: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    match region {
        Some(region) => vectorpipe_kafka::msk_iam_token(region, "vectorpipe-worker"),
        None => Err("no OAUTHBEARER token source is configured".into()),
    }
}

/// The context of the dead-letter producer: MSK IAM tokens when the source uses them.
pub struct TokenContext {
    /// The MSK region, for MSK IAM.
    pub msk_iam_region: Option<String>,
}

impl rdkafka::consumer::ConsumerContext for TokenContext {}

impl ClientContext for TokenContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        msk_iam_token(self.msk_iam_region.as_deref())
    }
}

/// The consumer settings: manual commits, cooperative rebalancing, lag statistics.
pub fn consumer_config(kafka: &KafkaSource, group_id: &str) -> Result<ClientConfig, SourceError> {
    let mut config = client_config(kafka)?;
    for (key, value) in &kafka.consumer_properties {
        config.set(key, value);
    }
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            match kafka.starting_offset {
                StartingOffset::Earliest => "earliest",
                StartingOffset::Latest => "latest",
            },
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false");
    // librdkafka's default max.poll.interval.ms (5 min) stays: a worker whose embedder or sink
    // is behind pauses its partitions and keeps polling, so only a truly stuck worker is evicted.
    Ok(config)
}

/// Hooks the worker into librdkafka: partition ownership on rebalances (see `assignment`), the
/// last commit of revoked partitions, and consumer lag from the statistics.
pub struct Context {
    /// Owned partitions, their offsets and writes in flight.
    pub assignment: Arc<Assignment>,
    /// Deduplication entries, dropped with their partition.
    pub dedup: Option<Arc<Dedup>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The MSK region, for MSK IAM tokens.
    pub msk_iam_region: Option<String>,
    /// `/readyz`: set once the consumer has joined its group (its first assignment, which may
    /// be empty when there are more workers than partitions), cleared when it stops.
    pub health: Arc<crate::health::Health>,
    /// Set while the worker drains before exiting: new assignments are paused at once.
    pub stopping: Arc<AtomicBool>,
    /// The longest a revoke waits for writes in flight of the partitions leaving.
    pub revoke_wait: Duration,
    /// Told of every rebalance (the group's member count may have changed).
    pub rebalanced: Arc<tokio::sync::Notify>,
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// Builds the commit request for `offsets`.
pub fn commit_list(offsets: &[(Partition, i64)]) -> KafkaResult<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    Ok(tpl)
}

impl ClientContext for Context {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        msk_iam_token(self.msk_iam_region.as_deref())
    }

    fn stats(&self, statistics: Statistics) {
        let mut total = 0;
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .get_or_create(&TopicPartition {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                    })
                    .set(p.consumer_lag);
                total += p.consumer_lag;
            }
        }
        self.metrics.consumer_lag_total.set(total);
    }
}

/// Runs a blocking wait from inside a librdkafka callback, which runs on the task polling the
/// consumer: on a multi-threaded runtime the other tasks (the writes being waited for) move to
/// other threads meanwhile.
fn block_on_callback<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalanced.notify_one();
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked = partitions_of(tpl);
        // 1. No write of these partitions' records starts from now on; 2. the writes already in
        // flight finish (their records still count); 3. what is done is committed; 4. the
        // partitions are forgotten. Only then does librdkafka hand them to their next owner, so
        // nothing this worker still had queued for them can overwrite what the next owner writes.
        self.assignment.close(&revoked);
        let started = std::time::Instant::now();
        let busy =
            block_on_callback(|| self.assignment.wait_for_writes(&revoked, self.revoke_wait));
        if !busy.is_empty() {
            tracing::warn!(?busy, waited = ?started.elapsed(), "writes of revoked partitions are still in flight after the drain time; letting the partitions go");
        }
        let (done, _) = self.assignment.committable(Some(&revoked));
        if !done.is_empty() {
            match commit_list(&done).and_then(|tpl| consumer.commit(&tpl, CommitMode::Sync)) {
                Ok(()) => {
                    self.assignment.committed(&done);
                    self.metrics.commit("ok");
                    tracing::info!(?done, "committed revoked partitions");
                }
                Err(e) => {
                    self.metrics.commit("error");
                    tracing::warn!(error = %e, "commit on revoke failed; the next owner replays from the previous commit");
                }
            }
        }
        self.assignment.forget(&revoked);
        if let Some(dedup) = &self.dedup {
            dedup.revoke(&revoked);
        }
        tracing::info!(?revoked, waited = ?started.elapsed(), "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalanced.notify_one();
        if let Rebalance::Assign(tpl) = rebalance {
            let added = partitions_of(tpl);
            self.assignment.assign(&added);
            if self.stopping.load(Ordering::SeqCst) {
                // Draining: serve the group, fetch nothing new.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions failed");
                }
            } else {
                self.health.joined.store(true, Ordering::SeqCst);
            }
            tracing::info!(?added, "partitions assigned");
        }
    }
}

/// How often offsets are committed: every `base` normally, stretched up to `max` while the
/// consumer works through a backlog (fewer commits, more throughput), as Flink does for
/// checkpoints.
pub fn commit_interval(lag: i64, base: Duration, max: Duration) -> Duration {
    const BACKLOG: i64 = 10_000;
    if lag > BACKLOG { max } else { base }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kafka(extra: serde_json::Value) -> KafkaSource {
        let mut v = json!({"bootstrapServers": ["a:9092", "b:9092"], "topics": ["t"]});
        if let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (&mut v, extra) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_consumer_owns_commits_and_rebalancing() {
        let config = consumer_config(
            &kafka(json!({"consumerProperties": {"fetch.max.bytes": "1024"}})),
            "g",
        )
        .unwrap();
        assert_eq!(config.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(config.get("group.id"), Some("g"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(
            config.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(config.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(config.get("fetch.max.bytes"), Some("1024"));
    }

    #[test]
    fn the_bundled_librdkafka_speaks_tls_and_scram() {
        // librdkafka refuses these settings at client creation when it was built without
        // OpenSSL (rdkafka's `ssl` feature), so every auth mode the API offers is checked here.
        for (protocol, mechanism) in [
            ("ssl", None),
            ("sasl_ssl", Some("SCRAM-SHA-512")),
            ("sasl_plaintext", Some("SCRAM-SHA-256")),
        ] {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("group.id", "g")
                .set("security.protocol", protocol);
            if let Some(mechanism) = mechanism {
                config
                    .set("sasl.mechanisms", mechanism)
                    .set("sasl.username", "u")
                    .set("sasl.password", "p");
            }
            let created: KafkaResult<rdkafka::consumer::BaseConsumer> = config.create();
            assert!(created.is_ok(), "{protocol}: {:?}", created.err());
        }
    }

    #[test]
    fn msk_iam_is_oauthbearer_over_tls_with_tokens_from_the_context() {
        let source = kafka(json!({"auth": {"mskIam": {"region": "eu-west-1"}}}));
        let config = consumer_config(&source, "g").unwrap();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("OAUTHBEARER"));
        assert_eq!(msk_iam_region(&source).as_deref(), Some("eu-west-1"));
        // (No client is created here: that would ask the AWS credential chain for a token.)
    }

    #[tokio::test]
    async fn msk_iam_tokens_are_presigned_connect_urls() {
        use aws_credential_types::Credentials;
        use aws_credential_types::provider::SharedCredentialsProvider;
        use base64::Engine;
        let provider = SharedCredentialsProvider::new(Credentials::new(
            "AKIDEXAMPLE",
            "secret",
            None,
            None,
            "test",
        ));
        let (token, expires_ms) =
            aws_msk_iam_sasl_signer::generate_auth_token_from_credentials_provider(
                aws_config::Region::new("eu-west-1"),
                provider,
            )
            .await
            .unwrap();
        let url = String::from_utf8(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&token)
                .unwrap(),
        )
        .unwrap();
        assert!(
            url.starts_with("https://kafka.eu-west-1.amazonaws.com/"),
            "{url}"
        );
        assert!(url.contains("Action=kafka-cluster%3AConnect"), "{url}");
        assert!(url.contains("X-Amz-Signature="), "{url}");
        assert!(expires_ms > 0);
    }

    #[test]
    fn backlogs_stretch_the_commit_interval() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(5);
        assert_eq!(commit_interval(0, base, max), base);
        assert_eq!(commit_interval(1_000_000, base, max), max);
    }
}
