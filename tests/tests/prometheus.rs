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
