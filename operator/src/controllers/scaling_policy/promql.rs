//! Metrics from Prometheus: CPU and memory of a pipeline's workers, and any PromQL query.

use std::time::Duration;

use prometheus_http_query::Client;
use prometheus_http_query::response::Data;
use vectorpipe_crds::v1alpha1::MetricSpec;

/// Why a query gave no number.
#[derive(Debug, thiserror::Error)]
pub enum PromqlError {
    /// The server could not be reached or refused the query.
    #[error("Prometheus query failed: {0}")]
    Query(#[from] prometheus_http_query::Error),
    /// The query took too long.
    #[error("Prometheus did not answer within {0:?}")]
    Timeout(Duration),
    /// The query returned nothing to scale on.
    #[error(
        "the query {0:?} returned no sample; check its labels against the series Prometheus has"
    )]
    Empty(String),
}

/// Worker CPU use in percent of the requested CPU (cAdvisor and kube-state-metrics series).
pub const DEFAULT_CPU_QUERY: &str = r#"100 * sum(rate(container_cpu_usage_seconds_total{namespace="$namespace",pod=~"$pipeline-worker-.*",container="worker"}[2m])) / sum(kube_pod_container_resource_requests{namespace="$namespace",pod=~"$pipeline-worker-.*",container="worker",resource="cpu"})"#;
/// Worker memory use in percent of the requested memory.
pub const DEFAULT_MEMORY_QUERY: &str = r#"100 * sum(container_memory_working_set_bytes{namespace="$namespace",pod=~"$pipeline-worker-.*",container="worker"}) / sum(kube_pod_container_resource_requests{namespace="$namespace",pod=~"$pipeline-worker-.*",container="worker",resource="memory"})"#;

/// A percentile of the workers' freshness over a window. With no record indexed in the window
/// the percentile is 0 (nothing waits to be searchable); with no freshness series at all (the
/// workers are not scraped) the query returns nothing, which is an error.
pub fn freshness_query(percentile: f64, window: Duration) -> String {
    let selector = r#"{namespace="$namespace",pipeline="$pipeline"}"#;
    let window = format!("{}s", window.as_secs().max(1));
    format!(
        "(histogram_quantile({q}, sum by (le) (rate(vectorpipe_worker_freshness_seconds_bucket{selector}[{window}]))) >= 0) or (sum(rate(vectorpipe_worker_freshness_seconds_count{selector}[{window}])) * 0)",
        q = percentile / 100.0,
    )
}

/// The two queries of quota-aware scaling over a window: the records the workers finished per
/// second, and the share (0 to 1) of their embedding calls that Bedrock throttled (0 with no
/// calls). Neither has a sample when the workers are not scraped.
pub fn quota_queries(window: Duration) -> (String, String) {
    let selector = r#"namespace="$namespace",pipeline="$pipeline""#;
    let window = format!("{}s", window.as_secs().max(1));
    let calls = format!("vectorpipe_worker_embed_calls_total{{{selector}");
    (
        format!("sum(rate(vectorpipe_worker_records_total{{{selector}}}[{window}]))"),
        format!(
            r#"sum(rate({calls},outcome="throttled"}}[{window}])) / clamp_min(sum(rate({calls}}}[{window}])), 1e-9)"#
        ),
    )
}

/// The query a metric runs, with `$namespace` and `$pipeline` filled in; None for Kafka metrics.
pub fn query_for(metric: &MetricSpec, namespace: &str, pipeline: &str) -> Option<String> {
    let freshness;
    let template = if let Some(f) = &metric.freshness {
        freshness = freshness_query(f.percentile, f.window.get());
        freshness.as_str()
    } else if let Some(cpu) = &metric.cpu {
        cpu.query.as_deref().unwrap_or(DEFAULT_CPU_QUERY)
    } else if let Some(memory) = &metric.memory {
        memory.query.as_deref().unwrap_or(DEFAULT_MEMORY_QUERY)
    } else {
        metric.prometheus.as_ref()?.query.as_str()
    };
    Some(
        template
            .replace("$namespace", namespace)
            .replace("$pipeline", pipeline),
    )
}

/// Runs an instant query and returns its single value (a scalar, or the first vector sample).
pub async fn value(client: &Client, query: &str, timeout: Duration) -> Result<f64, PromqlError> {
    let response = tokio::time::timeout(timeout, client.query(query).get())
        .await
        .map_err(|_| PromqlError::Timeout(timeout))??;
    let value = match response.data() {
        Data::Scalar(s) => Some(s.value()),
        Data::Vector(v) => v.first().map(|s| s.sample().value()),
        _ => None,
    };
    value
        .filter(|v| v.is_finite())
        .ok_or_else(|| PromqlError::Empty(query.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metric(v: serde_json::Value) -> MetricSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn queries_are_filled_in_per_pipeline() {
        let cpu = query_for(
            &metric(json!({"cpu": {}, "scaleOutThreshold": 80})),
            "data",
            "posts",
        )
        .unwrap();
        assert!(
            cpu.contains(r#"namespace="data""#) && cpu.contains(r#"pod=~"posts-worker-.*""#),
            "{cpu}"
        );
        let custom = query_for(
            &metric(json!({"prometheus": {"query": "sum(x{ns=\"$namespace\",p=\"$pipeline\"})"}, "scaleOutThreshold": 1})),
            "a",
            "b",
        )
        .unwrap();
        assert_eq!(custom, r#"sum(x{ns="a",p="b"})"#);
        let freshness = query_for(
            &metric(json!({"freshness": {"percentile": 99, "targetSeconds": 30, "window": "5m"}})),
            "data",
            "posts",
        )
        .unwrap();
        assert!(
            freshness.starts_with("(histogram_quantile(0.99, ")
                && freshness.contains(r#"vectorpipe_worker_freshness_seconds_bucket{namespace="data",pipeline="posts"}[300s]"#)
                && freshness.contains("or (sum(rate(vectorpipe_worker_freshness_seconds_count"),
            "{freshness}"
        );
        let (throughput, share) = quota_queries(Duration::from_secs(60));
        assert_eq!(
            throughput,
            r#"sum(rate(vectorpipe_worker_records_total{namespace="$namespace",pipeline="$pipeline"}[60s]))"#
        );
        assert_eq!(
            share,
            r#"sum(rate(vectorpipe_worker_embed_calls_total{namespace="$namespace",pipeline="$pipeline",outcome="throttled"}[60s])) / clamp_min(sum(rate(vectorpipe_worker_embed_calls_total{namespace="$namespace",pipeline="$pipeline"}[60s])), 1e-9)"#
        );
        assert!(
            query_for(
                &metric(json!({"kafkaLag": {}, "scaleOutThreshold": 1})),
                "a",
                "b"
            )
            .is_none()
        );
    }
}
