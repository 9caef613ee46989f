//! One poll of a policy's metrics: reads Kafka lag and every PromQL metric at once and turns them
//! into a [`Sample`] for the decision. Read failures are collected, never raised.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::jiff::Timestamp;
use vectorpipe_crds::v1alpha1::{
    EmbeddingPipelineSpec, LagAggregation, ScalingPolicySpec, TimeLagMetric,
};

use super::decide::{Sample, metric_name};
use super::lag::{self, KafkaCredentials, LagSummary};
use super::promql;
use super::readers::MetricReaders;

/// The time lag reported while records wait and nothing is being consumed: one year, so any
/// `timeLag` threshold fires.
pub const NO_PROGRESS_SECONDS: f64 = 31_536_000.0;

/// What a poll found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Metric values for the decision.
    pub sample: Sample,
    /// The consumer lag, when it could be read.
    pub lag: Option<LagSummary>,
    /// Metrics the policy judges that could not be read, with the reason.
    pub errors: Vec<String>,
    /// The pipeline's freshness p50 and p95 over the last five minutes, when Prometheus has it.
    pub freshness: Option<(f64, f64)>,
    /// For quota-aware policies: the workers' records per second and the share of embedding
    /// calls throttled over the measure window, or why they could not be read.
    pub quota: Option<Result<QuotaReading, String>>,
}

/// What quota-aware scaling reads each poll, over its measure window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuotaReading {
    /// Records the workers finished per second (indexed, deleted, skipped or dead-lettered).
    pub throughput: f64,
    /// The share of embedding calls Bedrock throttled, 0 to 1.
    pub throttled_share: f64,
}

/// The window of the freshness the pipeline's status shows.
pub const STATUS_FRESHNESS_WINDOW: Duration = Duration::from_secs(300);

/// The group's position over time, for the consume rate behind `timeLag`.
#[derive(Clone, Debug, Default)]
pub struct Positions(VecDeque<(Timestamp, i64)>);

impl Positions {
    /// Records the position at `now` and forgets what is older than `keep`.
    pub fn record(&mut self, now: Timestamp, position: i64, keep: Duration) {
        self.0.push_back((now, position));
        while self
            .0
            .front()
            .is_some_and(|(t, _)| seconds_between(*t, now) > keep.as_secs_f64())
        {
            self.0.pop_front();
        }
    }

    /// Seconds to drain `lag` at the rate seen over the last `window`; None until two positions
    /// are known.
    pub fn time_lag(&self, lag: i64, window: Duration) -> Option<f64> {
        let (now, latest) = *self.0.back()?;
        if lag == 0 {
            return Some(0.0);
        }
        let (then, earliest) = *self
            .0
            .iter()
            .find(|(t, _)| seconds_between(*t, now) <= window.as_secs_f64())?;
        let span = seconds_between(then, now);
        if span <= 0.0 {
            return None;
        }
        let rate = (latest - earliest).max(0) as f64 / span;
        Some(if rate > 0.0 {
            (lag as f64 / rate).min(NO_PROGRESS_SECONDS)
        } else {
            NO_PROGRESS_SECONDS
        })
    }
}

fn seconds_between(a: Timestamp, b: Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64()
}

/// How long each read may take: the poll interval, within 2–10 seconds.
pub fn read_timeout(poll_interval: Duration) -> Duration {
    poll_interval.clamp(Duration::from_secs(2), Duration::from_secs(10))
}

/// Reads everything a policy judges, for the pipeline `pipeline_name` in `namespace`.
#[allow(clippy::too_many_arguments)]
pub async fn observe(
    policy: &ScalingPolicySpec,
    pipeline: &EmbeddingPipelineSpec,
    namespace: &str,
    pipeline_name: &str,
    current: i32,
    readers: &dyn MetricReaders,
    credentials: Result<&KafkaCredentials, &str>,
    default_prometheus: Option<&str>,
    positions: &mut Positions,
    now: Timestamp,
) -> Observation {
    let timeout = read_timeout(policy.poll_interval.get());
    let kafka = &pipeline.source.kafka;
    let group = kafka.consumer_group(namespace, pipeline_name);
    let needs_lag = policy
        .metrics
        .iter()
        .any(|m| m.kafka_lag.is_some() || m.time_lag.is_some())
        || policy.scale_to_zero.as_ref().is_some_and(|z| z.enabled);
    let address = policy
        .prometheus
        .as_ref()
        .map(|p| p.address.as_str())
        .or(default_prometheus);

    // The lag is always read (for status.consumerLag and the partition cap), even by policies
    // that do not judge it; it only counts as a failure for those that do.
    let lag_read = async {
        match credentials {
            Ok(credentials) => readers.kafka_lag(kafka, &group, credentials, timeout).await,
            Err(e) => Err(e.to_owned()),
        }
    };
    let queries: Vec<_> = policy
        .metrics
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let query = promql::query_for(m, namespace, pipeline_name)?;
            let name = metric_name(i, m);
            Some(async move {
                let value = match address {
                    Some(address) => readers.promql(address, &query, timeout).await,
                    None => Err(
                        "no Prometheus server is configured: set spec.prometheus.address or start the operator with --prometheus-url"
                            .to_owned(),
                    ),
                };
                (name, value)
            })
        })
        .collect();
    // The freshness for the pipeline's status, whatever the policy judges; not a failure of
    // the policy when it cannot be read.
    let status_freshness = async {
        let address = address?;
        let read = |percentile: f64| {
            let query = promql::freshness_query(percentile, STATUS_FRESHNESS_WINDOW)
                .replace("$namespace", namespace)
                .replace("$pipeline", pipeline_name);
            async move { readers.promql(address, &query, timeout).await }
        };
        match futures::join!(read(50.0), read(95.0)) {
            (Ok(p50), Ok(p95)) => Some((p50, p95)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "freshness not read for the pipeline's status");
                None
            }
        }
    };
    let quota = policy.quota_aware.as_ref().filter(|q| q.enabled);
    let quota_read = async {
        let quota = quota?;
        let Some(address) = address else {
            return Some(Err("no Prometheus server is configured for quotaAware: set spec.prometheus.address or start the operator with --prometheus-url".to_owned()));
        };
        let (throughput, share) = promql::quota_queries(quota.measure_window.get());
        let fill = |q: String| {
            q.replace("$namespace", namespace)
                .replace("$pipeline", pipeline_name)
        };
        let (throughput, share) = (fill(throughput), fill(share));
        let (throughput, share) = futures::join!(
            readers.promql(address, &throughput, timeout),
            readers.promql(address, &share, timeout)
        );
        Some(throughput.and_then(|throughput| {
            Ok(QuotaReading {
                throughput,
                throttled_share: share?,
            })
        }))
    };
    let (lag_result, values, freshness, quota) =
        futures::join!(lag_read, join_all(queries), status_freshness, quota_read);

    let mut observation = Observation {
        freshness,
        quota,
        ..Observation::default()
    };
    for (name, value) in values {
        match value {
            Ok(v) => {
                observation.sample.values.insert(name, v);
            }
            Err(e) => observation.errors.push(format!("{name}: {e}")),
        }
    }
    match lag_result {
        Ok(partitions) => {
            let summary = lag::summarize(&partitions, kafka.starting_offset);
            let keep = policy
                .metrics
                .iter()
                .filter_map(|m| m.time_lag.as_ref().map(|t| t.rate_window.get()))
                .max()
                .unwrap_or(Duration::from_secs(60));
            positions.record(now, summary.position, keep);
            for (i, m) in policy.metrics.iter().enumerate() {
                let name = metric_name(i, m);
                if let Some(agg) = m.kafka_lag.as_ref().map(|k| k.aggregation) {
                    let value = match agg {
                        LagAggregation::Sum => summary.sum as f64,
                        LagAggregation::Max => summary.max as f64,
                        LagAggregation::PerReplica => {
                            summary.sum as f64 / f64::from(current.max(1))
                        }
                    };
                    observation.sample.values.insert(name, value);
                } else if let Some(TimeLagMetric { rate_window }) = &m.time_lag
                    && let Some(seconds) = positions.time_lag(summary.sum, rate_window.get())
                {
                    observation.sample.values.insert(name, seconds);
                }
            }
            observation.sample.total_lag = Some(summary.sum as f64);
            observation.lag = Some(summary);
        }
        Err(e) if needs_lag => observation.errors.push(format!("kafkaLag: {e}")),
        Err(e) => {
            tracing::debug!(error = %e, "consumer lag not read (the policy does not judge it)")
        }
    }
    observation
}

/// The values a decision used, for its record in the status.
pub fn inputs_of(observation: &Observation) -> BTreeMap<String, f64> {
    let mut inputs = observation.sample.values.clone();
    if let Some(lag) = &observation.lag {
        inputs.insert("partitions".into(), f64::from(lag.partitions));
        inputs.insert(
            "partitionsWithLag".into(),
            f64::from(lag.partitions_with_lag),
        );
        inputs.entry("kafkaLag".into()).or_insert(lag.sum as f64);
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn time_lag_is_lag_over_the_consume_rate() {
        let mut p = Positions::default();
        let keep = Duration::from_secs(60);
        p.record(at(0), 1000, keep);
        assert_eq!(
            p.time_lag(500, keep),
            None,
            "one position gives no rate yet"
        );
        p.record(at(10), 2000, keep); // 100 records/s
        assert_eq!(p.time_lag(500, keep), Some(5.0));
        assert_eq!(p.time_lag(0, keep), Some(0.0));
    }

    #[test]
    fn no_progress_with_records_waiting_counts_as_stuck() {
        let mut p = Positions::default();
        let keep = Duration::from_secs(60);
        p.record(at(0), 1000, keep);
        p.record(at(5), 1000, keep);
        assert_eq!(p.time_lag(10, keep), Some(NO_PROGRESS_SECONDS));
    }

    #[test]
    fn the_rate_window_forgets_old_positions() {
        let mut p = Positions::default();
        let keep = Duration::from_secs(30);
        p.record(at(0), 0, keep); // fast start, then slow
        p.record(at(20), 10_000, keep);
        p.record(at(40), 10_100, keep);
        // Only 20 s and 40 s remain: 100 records in 20 s = 5/s.
        assert_eq!(p.time_lag(50, keep), Some(10.0));
        // A shorter window for the same positions.
        assert_eq!(p.time_lag(50, Duration::from_secs(10)), None);
    }

    #[test]
    fn timeouts_follow_the_poll_interval_within_bounds() {
        assert_eq!(read_timeout(Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(read_timeout(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(
            read_timeout(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
    }
}
