//! The worker's Prometheus metrics (`vectorpipe_worker_*`), labelled with the pipeline.

use std::borrow::Cow;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set with one `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// What happened.
    pub outcome: String,
}

/// A label set naming a topic partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: String,
}

/// A label set naming a fault that holds the records.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabel {
    /// The fault (`opensearch`, `embedding`, `dead-letters`).
    pub fault: String,
}

/// Every metric the worker exports.
pub struct Metrics {
    /// Records read, by outcome (`indexed`, `deleted`, `skipped-*`, `dead-lettered-*`).
    pub records: Family<Outcome, Counter>,
    /// Documents acknowledged by OpenSearch.
    pub documents_indexed: Counter,
    /// Documents deleted by tombstones.
    pub documents_deleted: Counter,
    /// Embedding calls by outcome (`ok`, `throttled`, `error`, `rejected`, `misconfigured`).
    pub embed_calls: Family<Outcome, Counter>,
    /// Seconds per embedding call.
    pub embed_latency: Histogram,
    /// Embedding calls in flight.
    pub embed_in_flight: Gauge,
    /// The adaptive cap on embedding calls in flight.
    pub embed_limit: Gauge,
    /// Input tokens reported by the model.
    pub tokens: Counter,
    /// Seconds per `_bulk` request.
    pub bulk_latency: Histogram,
    /// Bulk items by outcome (`ok`, `retried`, `rejected`).
    pub bulk_items: Family<Outcome, Counter>,
    /// Records read but not yet committed.
    pub records_in_flight: Gauge,
    /// Bytes of the in-flight budget that records in flight hold (estimated when read).
    pub bytes_in_flight: Gauge,
    /// Consumer lag per partition, from librdkafka's statistics.
    pub consumer_lag: Family<TopicPartition, Gauge>,
    /// Consumer lag summed over the worker's partitions.
    pub consumer_lag_total: Gauge,
    /// Offset commits by outcome.
    pub commits: Family<Outcome, Counter>,
    /// 1 while consumption is paused because the embedder or the sink is behind.
    pub consumer_paused: Gauge,
    /// Times consumption was paused.
    pub consumer_pauses: Counter,
    /// Documents held back while an earlier write of their record id was in flight.
    pub same_id_waits: Counter,
    /// Documents not embedded or not written because a newer version (or a tombstone) of their
    /// record arrived first, by stage (`before-embedding` saves an embedding call).
    pub superseded: Family<Outcome, Counter>,
    /// 1 while a fault holds the records (nothing after them is committed), by fault.
    pub held: Family<FaultLabel, Gauge>,
    /// Times a fault started to hold the records, by fault.
    pub holds: Family<FaultLabel, Counter>,
    /// Seconds from a record's Kafka timestamp to OpenSearch acknowledging its last document.
    pub freshness: Histogram,
    /// Live members of the consumer group the Bedrock budget is shared by.
    pub group_members: Gauge,
    /// Records a redrive wrote back from the dead-letter topic, by outcome.
    pub redriven: Family<Outcome, Counter>,
    /// Records with an outcome, all outcomes together (not exported: `records` has them by
    /// outcome); the laptop mode's progress.
    pub records_done: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them under `vectorpipe_worker` with a `pipeline` label.
    pub fn new(pipeline: &str) -> (Self, Registry) {
        let mut registry = Registry::with_prefix_and_labels(
            "vectorpipe_worker",
            [(Cow::Borrowed("pipeline"), Cow::Owned(pipeline.to_owned()))].into_iter(),
        );
        let metrics = Self {
            records: Family::default(),
            documents_indexed: Counter::default(),
            documents_deleted: Counter::default(),
            embed_calls: Family::default(),
            embed_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            embed_in_flight: Gauge::default(),
            embed_limit: Gauge::default(),
            tokens: Counter::default(),
            bulk_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            bulk_items: Family::default(),
            records_in_flight: Gauge::default(),
            bytes_in_flight: Gauge::default(),
            consumer_lag: Family::default(),
            consumer_lag_total: Gauge::default(),
            commits: Family::default(),
            consumer_paused: Gauge::default(),
            consumer_pauses: Counter::default(),
            same_id_waits: Counter::default(),
            superseded: Family::default(),
            held: Family::default(),
            holds: Family::default(),
            // 50 ms to about 55 minutes.
            freshness: Histogram::new(exponential_buckets(0.05, 2.0, 17)),
            group_members: Gauge::default(),
            redriven: Family::default(),
            records_done: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "records",
            "Records read, by outcome",
            metrics.records.clone(),
        );
        r.register(
            "documents_indexed",
            "Documents acknowledged by OpenSearch",
            metrics.documents_indexed.clone(),
        );
        r.register(
            "documents_deleted",
            "Documents deleted by tombstones",
            metrics.documents_deleted.clone(),
        );
        r.register(
            "embed_calls",
            "Embedding calls, by outcome",
            metrics.embed_calls.clone(),
        );
        r.register(
            "embed_latency_seconds",
            "Seconds per embedding call",
            metrics.embed_latency.clone(),
        );
        r.register(
            "embed_in_flight",
            "Embedding calls in flight",
            metrics.embed_in_flight.clone(),
        );
        r.register(
            "embed_concurrency_limit",
            "Adaptive cap on embedding calls in flight",
            metrics.embed_limit.clone(),
        );
        r.register(
            "input_tokens",
            "Input tokens reported by the embedding model",
            metrics.tokens.clone(),
        );
        r.register(
            "bulk_latency_seconds",
            "Seconds per _bulk request",
            metrics.bulk_latency.clone(),
        );
        r.register(
            "bulk_items",
            "Bulk items, by outcome",
            metrics.bulk_items.clone(),
        );
        r.register(
            "consumer_paused",
            "1 while the partitions are paused because the embedder or the sink is behind",
            metrics.consumer_paused.clone(),
        );
        r.register(
            "consumer_pauses",
            "Times the partitions were paused for back-pressure",
            metrics.consumer_pauses.clone(),
        );
        r.register(
            "same_id_waits",
            "Documents held back while an earlier write of their record id was in flight",
            metrics.same_id_waits.clone(),
        );
        r.register(
            "superseded_documents",
            "Documents skipped because a newer version or a tombstone of their record came first, by stage",
            metrics.superseded.clone(),
        );
        r.register(
            "records_in_flight",
            "Records read but not yet done",
            metrics.records_in_flight.clone(),
        );
        r.register(
            "in_flight_bytes",
            "Bytes of the in-flight budget held by records in flight (estimated when read)",
            metrics.bytes_in_flight.clone(),
        );
        r.register(
            "consumer_lag",
            "Records behind the partition's end",
            metrics.consumer_lag.clone(),
        );
        r.register(
            "consumer_lag_total",
            "Records behind the end, all assigned partitions",
            metrics.consumer_lag_total.clone(),
        );
        r.register(
            "commits",
            "Offset commits, by outcome",
            metrics.commits.clone(),
        );
        r.register(
            "held",
            "1 while a fault holds the records and nothing after them is committed, by fault",
            metrics.held.clone(),
        );
        r.register(
            "holds",
            "Times a fault started to hold the records, by fault",
            metrics.holds.clone(),
        );
        r.register(
            "freshness_seconds",
            "Seconds from an indexed record's Kafka timestamp to OpenSearch acknowledging its last document",
            metrics.freshness.clone(),
        );
        r.register(
            "budget_group_members",
            "Workers the pipeline's Bedrock budget (requestsPerSecond, tokensPerMinute) is shared by: this worker takes 1/N of it (1 without a budget)",
            metrics.group_members.clone(),
        );
        r.register(
            "redriven_records",
            "Records a dead-letter redrive wrote back to the source topic, by outcome here (indexed, dead-lettered again, or unchanged: that version was indexed already)",
            metrics.redriven.clone(),
        );
        metrics.start_at_zero();
        (metrics, registry)
    }

    /// Creates the series of every outcome known in advance at 0, so they are exported from the
    /// start: `rate()` and `increase()` then see the first record, call or fault of each kind
    /// (a series that appears at 1 has no earlier sample to count from) and dashboards and
    /// alerts find their metrics before anything happened.
    fn start_at_zero(&self) {
        let outcome = |o: &str| Outcome {
            outcome: o.to_owned(),
        };
        let skipped = crate::transform::SkipReason::ALL.map(|r| format!("skipped-{}", r.as_str()));
        let dead_lettered =
            crate::transform::RejectionKind::ALL.map(|k| format!("dead-lettered-{}", k.as_str()));
        for o in [
            "indexed",
            "deleted",
            "deleted-nothing-found",
            "skipped-duplicate",
        ]
        .into_iter()
        .chain(skipped.iter().map(String::as_str))
        .chain(dead_lettered.iter().map(String::as_str))
        {
            let _ = self.records.get_or_create(&outcome(o));
        }
        for o in ["ok", "throttled", "error", "rejected", "misconfigured"] {
            let _ = self.embed_calls.get_or_create(&outcome(o));
        }
        for o in ["ok", "retried", "held", "rejected"] {
            let _ = self.bulk_items.get_or_create(&outcome(o));
        }
        for o in ["ok", "error"] {
            let _ = self.commits.get_or_create(&outcome(o));
        }
        for o in ["indexed", "dead-lettered", "unchanged"] {
            let _ = self.redriven.get_or_create(&outcome(o));
        }
        for o in ["before-embedding", "before-writing"] {
            let _ = self.superseded.get_or_create(&outcome(o));
        }
        for fault in crate::health::Fault::ALL {
            let label = FaultLabel {
                fault: fault.as_str().to_owned(),
            };
            let _ = self.held.get_or_create(&label);
            let _ = self.holds.get_or_create(&label);
        }
    }

    /// Counts a record indexed; `timestamp_ms` is its Kafka timestamp, when it has one (a
    /// producer clock ahead of this one counts as 0 s). A redriven record is counted as such
    /// and kept out of the freshness histogram: its timestamp is its first arrival's.
    pub fn indexed(&self, timestamp_ms: Option<i64>, redriven: bool) {
        self.record("indexed");
        if redriven {
            self.redriven("indexed");
            return;
        }
        if let Some(at) = timestamp_ms {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            self.freshness.observe((now - at).max(0) as f64 / 1000.0);
        }
    }

    /// Counts a redriven record's outcome (`indexed`, `dead-lettered`, or `unchanged`: the same
    /// version was indexed already).
    pub fn redriven(&self, outcome: &str) {
        self.redriven
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The gauge that is 1 while `fault` holds the records.
    pub fn held(&self, fault: &str) -> Gauge {
        self.held
            .get_or_create(&FaultLabel {
                fault: fault.to_owned(),
            })
            .clone()
    }

    /// The count of times `fault` started to hold the records.
    pub fn holds(&self, fault: &str) -> Counter {
        self.holds
            .get_or_create(&FaultLabel {
                fault: fault.to_owned(),
            })
            .clone()
    }

    /// Counts a record outcome.
    pub fn record(&self, outcome: &str) {
        self.records
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.records_done.inc();
    }

    /// How many records had this outcome.
    pub fn records_with(&self, outcome: &str) -> u64 {
        self.records
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .get()
    }

    /// Counts an embedding call outcome.
    pub fn embed_call(&self, outcome: &str) {
        self.embed_calls
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts bulk item outcomes.
    pub fn bulk_item(&self, outcome: &str, n: u64) {
        self.bulk_items
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts documents superseded at `stage`.
    pub fn superseded(&self, stage: &str, n: u64) {
        self.superseded
            .get_or_create(&Outcome {
                outcome: stage.to_owned(),
            })
            .inc_by(n);
    }

    /// Counts a commit outcome.
    pub fn commit(&self, outcome: &str) {
        self.commits
            .get_or_create(&Outcome {
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}
