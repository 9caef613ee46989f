//! A pipeline's daily embedding budget end to end: a real worker spends tokens at the fake
//! Bedrock, the harness Prometheus scrapes its token counter, and the operator (reading it from
//! there) suspends the workers once `maxTokensPerDay` is used, resumes them when the budget is
//! raised, and throttles them to one worker at `throttleTokensPerMinute` once an estimated cost
//! limit is reached.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::worker::Worker;
use vectorpipe_tests::{eventually, k8s, kafka, prometheus, repo_root, unique_name};

const LIMIT: Duration = Duration::from_secs(120);

/// The pipeline's BudgetExceeded condition: (status, reason, message).
fn budget_condition(p: &EmbeddingPipeline) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "BudgetExceeded")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn deployment_replicas(client: &kube::Client, ns: &str) -> Result<Option<i32>> {
    Ok(Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt("posts-worker")
        .await?
        .and_then(|d| d.spec.replicas))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_budget_suspends_the_workers_and_a_cost_limit_throttles_them() -> Result<()> {
    k8s::install_crds()?;
    let dir = tempfile::tempdir()?;
    let operator = Operator::start(&dir.path().join("operator.log"))?;
    let result = scenario(dir.path(), &operator).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", operator.log_text());
    }
    result
}

async fn scenario(dir: &std::path::Path, operator: &Operator) -> Result<()> {
    let client = k8s::client().await?;
    let ns = k8s::namespace("budget")?;
    let topic = unique_name("budget");
    kafka::create_topic(&topic, 2).await?;

    // The pipeline in the cluster: two workers wanted, 200 input tokens a day.
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut value: Value = serde_yaml::from_str(&text)?;
    value["spec"]["source"]["kafka"] =
        json!({"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]});
    value["spec"]["workers"]["replicas"] = json!(2);
    value["spec"]["budget"] = json!({"maxTokensPerDay": 200, "timeZone": "Europe/Paris"});
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    pipelines
        .create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?;
    let within = eventually("BudgetExceeded=False", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok(budget_condition(&p)
            .filter(|(s, _, _)| s == "False")
            .map(|c| (c, p)))
    })
    .await?;
    ensure!(
        within.0.1 == "WithinBudget" && within.0.2.contains("not scraped"),
        "before any worker ran, the condition says no token series exists: {:?}",
        within.0
    );
    ensure!(
        within
            .1
            .status
            .as_ref()
            .and_then(|s| s.usage.as_ref())
            .map(|u| u.tokens)
            == Some(0),
        "nothing spent yet: {:?}",
        within.1.status
    );
    ensure!(deployment_replicas(&client, &ns.name).await? == Some(2));

    // A real worker of the same pipeline (KWOK's pods do not consume), scraped by Prometheus.
    let (fake, address) = FakeBedrock::start().await?;
    let file = dir.join("pipeline.yaml");
    let manifest =
        vectorpipe_tests::worker::posts_manifest(&ns.name, &topic, &address.to_string())?;
    std::fs::write(&file, serde_yaml::to_string(&manifest)?)?;
    let worker = Worker::start(&file, &dir.join("worker.log"))?;
    let scraped = prometheus::add_target(&ns.name, &worker.metrics, &[("namespace", &ns.name)])?;
    // Prometheus has the worker's counter (at 0) before it spends: increase() cannot count
    // what a series held at its first scrape.
    eventually("the worker's token counter scraped", LIMIT, || async {
        let query = format!(
            r#"vectorpipe_worker_input_tokens_total{{namespace="{}"}}"#,
            ns.name
        );
        let url = format!("{}/api/v1/query", prometheus::url()?);
        let body: Value = reqwest::Client::new()
            .get(url)
            .query(&[("query", query)])
            .send()
            .await?
            .json()
            .await?;
        let found = body["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty());
        Ok(found.then_some(()))
    })
    .await?;
    let producer: FutureProducer = kafka::config()?.create()?;
    for n in 0..40 {
        let id = format!("b-{n}");
        let body = json!({"id": id, "text": format!("record {n} spends a few tokens of the daily budget at the fake")}).to_string();
        producer
            .send(
                FutureRecord::to(&topic).key(&id).payload(&body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    // Over 200 tokens: suspended, the Deployment at 0, and the operator says so.
    let (status, reason, message) = eventually("BudgetExceeded=True", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok(budget_condition(&p).filter(|(s, _, _)| s == "True"))
    })
    .await?;
    ensure!(
        reason == "Suspended"
            && message.contains("the budget is 200")
            && message.contains("raise spec.budget"),
        "{status} {reason}: {message}"
    );
    eventually("the workers stopped", LIMIT, || async {
        Ok((deployment_replicas(&client, &ns.name).await? == Some(0)).then_some(()))
    })
    .await?;
    let p = pipelines.get("posts").await?;
    let usage = p.status.as_ref().and_then(|s| s.usage.clone());
    ensure!(
        usage
            .as_ref()
            .is_some_and(|u| u.tokens >= 200 && u.estimated_cost_usd.is_some_and(|c| c > 0.0)),
        "usage {usage:?}"
    );
    let ready = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
    ensure!(
        ready
            .as_ref()
            .is_some_and(|c| c.status == "False" && c.reason == "BudgetExceeded"),
        "Ready says why the workers stopped: {ready:?}"
    );
    ensure!(p.spec.workers.replicas == 2, "the wanted count is kept");
    let page = operator.metrics_text().await?;
    let ours = |name: &str| {
        page.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("namespace=\"{}\"", ns.name)))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    ensure!(
        ours("vectorpipe_operator_budget_exceeded{") == Some(1.0)
            && ours("vectorpipe_operator_budget_tokens{").is_some_and(|t| t >= 200.0)
            && ours("vectorpipe_operator_budget_estimated_cost_usd{").is_some_and(|c| c > 0.0),
        "{page}"
    );

    // The budget raised: the workers come back.
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"budget": {"maxTokensPerDay": 1_000_000_000}}})),
        )
        .await?;
    eventually("the workers back", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        let within = budget_condition(&p).is_some_and(|(s, _, _)| s == "False");
        Ok((within && deployment_replicas(&client, &ns.name).await? == Some(2)).then_some(()))
    })
    .await?;

    // A cost limit already passed, with throttle: one worker at 600 tokens a minute.
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"budget": {"maxTokensPerDay": null, "maxCostPerDay": 0.000001,
                "action": "throttle", "throttleTokensPerMinute": 600}}}),
            ),
        )
        .await?;
    let (_, reason, message) = eventually("throttled", LIMIT, || async {
        let p = pipelines.get("posts").await?;
        Ok(budget_condition(&p).filter(|(s, r, _)| s == "True" && r == "Throttled"))
    })
    .await?;
    ensure!(
        message.contains("spent today, the budget is $0.0000")
            && message.contains("one worker runs at 600 tokens per minute"),
        "{reason}: {message}"
    );
    eventually("one throttled worker", LIMIT, || async {
        let one = deployment_replicas(&client, &ns.name).await? == Some(1);
        let config = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .get_opt("posts-worker")
            .await?
            .and_then(|c| c.data)
            .map(|d| d.values().cloned().collect::<String>())
            .unwrap_or_default();
        Ok((one && config.contains("tokensPerMinute: 600")).then_some(()))
    })
    .await?;
    let _ = std::fs::remove_file(scraped);
    drop(worker);
    drop(fake);
    Ok(())
}
