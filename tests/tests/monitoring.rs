//! The chart's monitoring: the alerts pass `promtool check rules` and their unit tests
//! (tests/monitoring/alerts.test.yaml), every metric the dashboards and alerts name is one a
//! live worker, query server or operator exports, and the PodMonitor selects the pods the
//! operator makes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::k8s;
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::worker::Worker;
use vectorpipe_tests::{eventually, kafka, opensearch as os, repo_root, unique_name};

/// The chart rendered with its monitoring objects on, as YAML documents.
fn rendered() -> Result<Vec<Value>> {
    k8s::chart_template(&[
        "metrics.prometheusRule.enabled=true",
        "metrics.dashboards.enabled=true",
        "metrics.podMonitor.enabled=true",
    ])
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

fn promtool(args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("promtool (Debian's prometheus package; tests/run-all.sh installs it)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn the_alerts_pass_promtool_and_each_fires_only_when_it_should() -> Result<()> {
    let docs = rendered()?;
    let groups = &find(&docs, "PrometheusRule")?["spec"]["groups"];
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&json!({ "groups": groups }))?,
    )?;
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path())?;
    ensure!(checked.contains("SUCCESS"), "{checked}");

    // Every alert says what to check first.
    let mut runbooks = std::collections::BTreeMap::new();
    for rule in groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        let name = rule["alert"]
            .as_str()
            .context("a rule without an alert name")?;
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
        ensure!(runbook.len() > 40, "{name} has no runbook annotation");
        ensure!(
            rule["annotations"]["summary"].is_string(),
            "{name} has no summary"
        );
        runbooks.insert(name.to_owned(), runbook.to_owned());
    }

    // The unit tests, with each expected alert's runbook taken from the rule itself.
    let text = std::fs::read_to_string(repo_root().join("tests/monitoring/alerts.test.yaml"))?;
    let mut tests: Value = serde_yaml::from_str(&text)?;
    let mut tested = BTreeSet::new();
    for case in tests["tests"].as_array_mut().context("no tests")? {
        for check in case["alert_rule_test"]
            .as_array_mut()
            .context("a case without alert_rule_test")?
        {
            let name = check["alertname"].as_str().unwrap_or_default().to_owned();
            let runbook = runbooks
                .get(&name)
                .with_context(|| format!("the tests name an alert the chart lacks: {name}"))?;
            let alerts = check["exp_alerts"].as_array_mut().context("exp_alerts")?;
            if !alerts.is_empty() {
                tested.insert(name.clone());
            }
            for alert in alerts {
                alert["exp_annotations"]["runbook"] = json!(runbook);
            }
        }
    }
    let untested: Vec<&String> = runbooks.keys().filter(|n| !tested.contains(*n)).collect();
    ensure!(
        untested.is_empty(),
        "alerts with no case where they fire: {untested:?}"
    );
    std::fs::write(
        dir.path().join("alerts.test.yaml"),
        serde_yaml::to_string(&tests)?,
    )?;
    let result = promtool(&["test", "rules", "alerts.test.yaml"], dir.path())?;
    ensure!(result.contains("SUCCESS"), "{result}");
    Ok(())
}

/// Every metric name a PromQL text names: `vectorpipe_…` anywhere, and any other name used as a
/// selector (followed by `{` or `[`).
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            let next = expr[i..].trim_start().chars().next();
            let selector = matches!(next, Some('{') | Some('['))
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if name.starts_with("vectorpipe_") || selector {
                out.insert(name.to_owned());
            }
        } else {
            i += 1;
        }
    }
}

/// The sample names a `/metrics` page can have, from its `# TYPE` lines.
fn exported(page: &str, out: &mut BTreeSet<String>) {
    for line in page.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("#") || parts.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
}

/// Every PromQL expression of the rendered dashboards (panel targets and variable queries) and
/// alerts.
fn expressions(docs: &[Value]) -> Result<Vec<(String, String)>> {
    let mut exprs = Vec::new();
    let dashboards = find(docs, "ConfigMap").and_then(|_| {
        docs.iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with("-dashboards"))
            })
            .context("no dashboards ConfigMap")
    })?;
    let data = dashboards["data"].as_object().context("no data")?;
    ensure!(
        data.contains_key("vectorpipe-pipelines.json")
            && data.contains_key("vectorpipe-operator.json"),
        "the dashboards are {:?}",
        data.keys().collect::<Vec<_>>()
    );
    for (file, text) in data {
        let dashboard: Value = serde_json::from_str(text.as_str().unwrap_or_default())
            .with_context(|| format!("{file} is not JSON"))?;
        let panels = dashboard["panels"].as_array().context("no panels")?;
        for panel in panels.iter().filter(|p| p["type"] != "row") {
            let title = panel["title"].as_str().unwrap_or_default();
            let targets = panel["targets"].as_array().context("no targets")?;
            ensure!(!targets.is_empty(), "{file}: panel {title:?} has no query");
            for target in targets {
                let expr = target["expr"].as_str().context("a target without expr")?;
                exprs.push((format!("{file}: {title}"), expr.to_owned()));
            }
        }
        for variable in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(query) = variable["query"]["query"].as_str() {
                exprs.push((
                    format!("{file}: variable {}", variable["name"]),
                    query.to_owned(),
                ));
            }
        }
    }
    let groups = &find(docs, "PrometheusRule")?["spec"]["groups"];
    for rule in groups
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
    {
        exprs.push((
            format!("alert {}", rule["alert"].as_str().unwrap_or_default()),
            rule["expr"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(exprs)
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_alerts_name_only_metrics_the_binaries_export() -> Result<()> {
    let docs = rendered()?;
    let exprs = expressions(&docs)?;

    // A worker, a query server and the operator, as they run.
    let topic = unique_name("monitoring");
    kafka::create_topic(&topic, 1).await?;
    let (_fake, address) = FakeBedrock::start().await?;
    let dir = tempfile::tempdir()?;
    let pipeline = dir.path().join("pipeline.yaml");
    let spec = json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "monitoring", "namespace": "default"},
        "spec": {
            "source": {"kafka": {"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]}},
            "transform": {"textPointers": ["/text"]},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0",
                "dimensions": 256, "region": "eu-west-1",
                "endpointUrl": format!("http://{address}")}},
            "sink": {"opensearch": {"endpoints": [os::url()?], "index": topic.to_lowercase()}},
        }
    });
    std::fs::write(&pipeline, serde_yaml::to_string(&spec)?)?;
    let worker = Worker::start(&pipeline, &dir.path().join("worker.log"))?;
    let server = Worker::serve(&pipeline, &dir.path().join("serve.log"), &[])?;
    let operator = Operator::start(&dir.path().join("operator.log"))?;
    // A pipeline with a query server and a lag policy, so the operator reconciles, scales and
    // reads lag (its per-pipeline and per-policy series appear then).
    k8s::install_crds()?;
    let client = k8s::client().await?;
    let ns = k8s::namespace("monitoring")?;
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut manifest: Value = serde_yaml::from_str(&text)?;
    manifest["spec"]["source"]["kafka"] =
        json!({"bootstrapServers": [kafka::bootstrap()?], "topics": [topic]});
    manifest["spec"]["query"] = json!({"enabled": true});
    let applied: EmbeddingPipeline = serde_json::from_value(manifest)?;
    Api::<EmbeddingPipeline>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &applied)
        .await?;
    let policy: ScalingPolicy = serde_json::from_value(json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": "lag"},
        "spec": {
            "targetRef": {"name": applied.metadata.name},
            "minReplicas": 1,
            "maxReplicas": 2,
            "pollInterval": "1s",
            "metrics": [{"kafkaLag": {"aggregation": "sum"}, "scaleOutThreshold": 100}],
        }
    }))?;
    Api::<ScalingPolicy>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &policy)
        .await?;

    let mut names = BTreeSet::new();
    for (what, address) in [
        ("worker", &worker.metrics),
        ("query server", &server.metrics),
        ("operator", &operator.metrics),
    ] {
        let url = format!("http://{address}/metrics");
        let page = eventually(what, Duration::from_secs(60), || {
            let url = url.clone();
            async move {
                let page = reqwest::get(url).await?.error_for_status()?.text().await?;
                // The operator's page once the policy was judged.
                let judged = what != "operator"
                    || page.contains("vectorpipe_operator_scaling_desired_replicas{");
                Ok(judged.then_some(page))
            }
        })
        .await?;
        exported(&page, &mut names);
    }
    ensure!(
        names.contains("vectorpipe_worker_freshness_seconds_bucket")
            && names.contains("vectorpipe_worker_query_requests_total")
            && names.contains("vectorpipe_operator_reconciles_total"),
        "the scrapes lack metrics every binary has: {names:?}"
    );
    let mut missing = Vec::new();
    for (place, expr) in &exprs {
        let mut used = BTreeSet::new();
        metric_names(expr, &mut used);
        ensure!(!used.is_empty(), "{place}: no metric in {expr:?}");
        for name in used.difference(&names) {
            missing.push(format!("{place}: {name}"));
        }
    }
    ensure!(
        missing.is_empty(),
        "metrics no binary exports:\n{}",
        missing.join("\n")
    );

    // The PodMonitor selects the worker and query pods the operator makes, by their ports.
    let monitor = find(&docs, "PodMonitor")?;
    let deployments: Api<Deployment> = Api::namespaced(client, &ns.name);
    let made = eventually(
        "the worker and query Deployments",
        Duration::from_secs(60),
        || {
            let deployments = deployments.clone();
            async move {
                let list = deployments.list(&ListParams::default()).await?;
                Ok((list.items.len() == 2).then_some(list.items))
            }
        },
    )
    .await?;
    let selector = &monitor["spec"]["selector"];
    let ports: BTreeSet<&str> = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["port"].as_str())
        .collect();
    for deployment in &made {
        let template = &deployment.spec.template;
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let name = deployment.metadata.name.clone().unwrap_or_default();
        for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
            ensure!(
                labels.get(key).map(String::as_str) == value.as_str(),
                "{name}'s pods lack {key}={value}: {labels:?}"
            );
        }
        for expression in selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = expression["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = expression["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            ensure!(
                labels
                    .get(key)
                    .is_some_and(|v| values.contains(&v.as_str())),
                "{name}'s pods have {key}={:?}, not one of {values:?}",
                labels.get(key)
            );
        }
        let named: Vec<String> = template
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.name)
            .collect();
        ensure!(
            named.iter().any(|p| ports.contains(p.as_str())),
            "{name}'s pods expose {named:?}, and the PodMonitor scrapes {ports:?}"
        );
    }
    drop(operator);
    drop(server);
    drop(worker);
    Ok(())
}
