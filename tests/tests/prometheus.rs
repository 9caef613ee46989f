//! The harness Prometheus scrapes a target the test serves and answers PromQL about it.

use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::routing::get;
use prometheus_http_query::Client;
use vectorpipe_tests::{eventually, prometheus, unique_name};

#[tokio::test]
async fn prometheus_scrapes_a_target_and_answers_a_query() -> Result<()> {
    // A value no other run could have produced, so the answer can only come from this scrape.
    let value = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos()
        % 1_000_000;
    let body = format!(
        "# HELP vectorpipe_probe_value A value set by the test.\n# TYPE vectorpipe_probe_value gauge\nvectorpipe_probe_value {value}\n"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let app = Router::new().route("/metrics", get(move || std::future::ready(body.clone())));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let name = unique_name("probe");
    let target = prometheus::add_target(&name, &address, &[("probe", &name)])?;
    let client = Client::try_from(prometheus::url()?)?;
    let query = format!(r#"vectorpipe_probe_value{{probe="{name}"}}"#);
    let seen = eventually(
        "the probe sample in Prometheus",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let query = query.clone();
            async move {
                let response = client.query(query).get().await?;
                let sample = response
                    .data()
                    .as_vector()
                    .and_then(|v| v.first())
                    .map(|s| s.sample().value());
                Ok(sample)
            }
        },
    )
    .await?;
    std::fs::remove_file(target)?;
    assert_eq!(seen, f64::from(value));
    Ok(())
}

#[tokio::test]
async fn the_operator_reads_one_value_from_promql() -> Result<()> {
    use vectorpipe_operator::controllers::scaling_policy::promql;
    let body = "# TYPE vectorpipe_worker_embed_in_flight gauge\nvectorpipe_worker_embed_in_flight{pipeline=\"posts\"} 12\n# TYPE vectorpipe_worker_embed_concurrency_limit gauge\nvectorpipe_worker_embed_concurrency_limit{pipeline=\"posts\"} 16\n";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let app = Router::new().route("/metrics", get(move || std::future::ready(body)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let name = unique_name("ratio");
    let target = prometheus::add_target(&name, &address, &[("namespace", &name)])?;
    let client = Client::try_from(prometheus::url()?)?;
    let metric: vectorpipe_crds::v1alpha1::MetricSpec = serde_json::from_value(
        serde_json::json!({
            "prometheus": {"query": "sum(vectorpipe_worker_embed_in_flight{namespace=\"$namespace\",pipeline=\"$pipeline\"}) / sum(vectorpipe_worker_embed_concurrency_limit{namespace=\"$namespace\",pipeline=\"$pipeline\"})"},
            "scaleOutThreshold": 0.9
        }),
    )?;
    let query = promql::query_for(&metric, &name, "posts").expect("a PromQL metric has a query");
    let ratio = eventually("the ratio from Prometheus", Duration::from_secs(60), || {
        let (client, query) = (client.clone(), query.clone());
        async move {
            Ok(promql::value(&client, &query, Duration::from_secs(5))
                .await
                .ok())
        }
    })
    .await?;
    assert_eq!(ratio, 0.75);
    let missing = promql::value(
        &client,
        "absent_metric_that_nobody_exports",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(missing, Err(promql::PromqlError::Empty(_))),
        "{missing:?}"
    );
    std::fs::remove_file(target)?;
    Ok(())
}
