//! Metric readers behind a trait, so that the poll → decide → status flow can run against fixed
//! values in unit tests and against Kafka and Prometheus in the operator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use vectorpipe_crds::v1alpha1::KafkaSource;

use super::lag::{self, KafkaCredentials, LagConsumer, PartitionLag};
use super::promql;

/// A read's result; the error says what failed and what to check.
pub type Read<T> = BoxFuture<'static, Result<T, String>>;

/// Where the scaling controller gets its numbers.
pub trait MetricReaders: Send + Sync + 'static {
    /// Every partition's positions for a consumer group.
    fn kafka_lag(
        &self,
        source: &KafkaSource,
        group: &str,
        credentials: &KafkaCredentials,
        timeout: Duration,
    ) -> Read<Vec<PartitionLag>>;
    /// One PromQL instant query's value.
    fn promql(&self, address: &str, query: &str, timeout: Duration) -> Read<f64>;
}

/// How long an unused Kafka client is kept.
const IDLE_CLIENT: Duration = Duration::from_secs(600);

/// Brokers, group and a hash of the credentials (a rotated Secret gets a new client).
type ConsumerKey = (Vec<String>, String, u64);
type Consumers = HashMap<ConsumerKey, (Arc<LagConsumer>, Instant)>;

/// The real readers: rdkafka against the pipeline's brokers, HTTP against Prometheus. Clients are
/// kept between polls (one Kafka client per brokers and group, one HTTP client per server).
#[derive(Default)]
pub struct LiveReaders {
    consumers: Mutex<Consumers>,
    prometheus: Mutex<HashMap<String, prometheus_http_query::Client>>,
}

impl LiveReaders {
    fn key(source: &KafkaSource, group: &str, credentials: &KafkaCredentials) -> ConsumerKey {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut hasher = DefaultHasher::new();
        credentials.hash(&mut hasher);
        source.auth.is_some().hash(&mut hasher);
        (
            source.bootstrap_servers.clone(),
            group.to_owned(),
            hasher.finish(),
        )
    }

    fn consumer(
        &self,
        source: &KafkaSource,
        group: &str,
        credentials: &KafkaCredentials,
    ) -> Result<Arc<LagConsumer>, String> {
        let key = Self::key(source, group, credentials);
        let mut consumers = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        consumers.retain(|_, (_, used)| used.elapsed() < IDLE_CLIENT);
        if let Some((consumer, used)) = consumers.get_mut(&key) {
            *used = Instant::now();
            return Ok(consumer.clone());
        }
        let consumer =
            Arc::new(lag::consumer(source, group, credentials).map_err(|e| e.to_string())?);
        consumers.insert(key, (consumer.clone(), Instant::now()));
        Ok(consumer)
    }

    fn forget(&self, source: &KafkaSource, group: &str, credentials: &KafkaCredentials) {
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&Self::key(source, group, credentials));
    }
}

impl MetricReaders for Arc<LiveReaders> {
    fn kafka_lag(
        &self,
        source: &KafkaSource,
        group: &str,
        credentials: &KafkaCredentials,
        timeout: Duration,
    ) -> Read<Vec<PartitionLag>> {
        let this = self.clone();
        let source = source.clone();
        let group = group.to_owned();
        let credentials = credentials.clone();
        Box::pin(async move {
            let consumer = this.consumer(&source, &group, &credentials)?;
            let (source_for_read, consumer_for_read) = (source.clone(), consumer);
            let read = tokio::task::spawn_blocking(move || {
                lag::read_with(&consumer_for_read, &source_for_read, timeout)
            });
            // The blocking call has its own timeouts; this bounds the whole read.
            let result = match tokio::time::timeout(timeout * 3, read).await {
                Err(_) => Err(format!(
                    "reading consumer lag from {} took longer than {:?}; check that the brokers are reachable from the operator",
                    source.bootstrap_servers.join(","),
                    timeout * 3
                )),
                Ok(Err(join)) => Err(format!("the lag reader stopped: {join}")),
                Ok(Ok(Err(e))) => Err(format!(
                    "{e} (brokers {}, group {group})",
                    source.bootstrap_servers.join(",")
                )),
                Ok(Ok(Ok(partitions))) => Ok(partitions),
            };
            if result.is_err() {
                // A fresh client next time, in case this one is stuck on dead connections.
                this.forget(&source, &group, &credentials);
            }
            result
        })
    }

    fn promql(&self, address: &str, query: &str, timeout: Duration) -> Read<f64> {
        let client = {
            let mut clients = self.prometheus.lock().unwrap_or_else(|e| e.into_inner());
            match clients.get(address) {
                Some(c) => Ok(c.clone()),
                None => match prometheus_http_query::Client::try_from(address) {
                    Ok(c) => {
                        clients.insert(address.to_owned(), c.clone());
                        Ok(c)
                    }
                    Err(e) => Err(format!(
                        "the Prometheus address {address:?} is not a URL ({e}); write e.g. http://prometheus.monitoring:9090"
                    )),
                },
            }
        };
        let query = query.to_owned();
        let address = address.to_owned();
        Box::pin(async move {
            promql::value(&client?, &query, timeout)
                .await
                .map_err(|e| format!("{e} (server {address})"))
        })
    }
}
