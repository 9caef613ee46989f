//! The harness control plane is a real Kubernetes API: CRDs install, CEL rules run, the scale
//! subresource works, and KWOK makes Deployments ready.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, kubectl};
use vectorpipe_tests::{eventually, repo_root};

fn pipeline(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": name},
        "spec": {
            "source": {"kafka": {"bootstrapServers": ["k:9092"], "topics": ["in"]}},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0"}},
            "sink": {"opensearch": {"endpoints": ["http://os:9200"], "index": "docs"}}
        }
    })
}

#[tokio::test]
async fn the_apiserver_serves_the_crds_and_enforces_their_cel_rules() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("cel")?;
    let client = k8s::client().await?;
    let api: Api<EmbeddingPipeline> = Api::namespaced(client, &ns.name);

    let good: EmbeddingPipeline = serde_json::from_value(pipeline("good"))?;
    let created = api.create(&PostParams::default(), &good).await?;
    // Defaults from the schema are applied by the apiserver itself.
    assert_eq!(created.spec.embedding.bedrock.max_in_flight, 64);
    assert_eq!(created.spec.dedup.ttl.as_str(), "7d");

    let mut bad = pipeline("bad");
    bad["spec"]["embedding"]["bedrock"]["dimensions"] = json!(768);
    let bad: EmbeddingPipeline = serde_json::from_value(bad)?;
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("the apiserver must refuse 768 dimensions for Titan v2");
    let message = err.to_string();
    assert!(
        message.contains("256, 512 or 1024"),
        "unexpected refusal: {message}"
    );

    let mut bad = pipeline("bad-auth");
    bad["spec"]["source"]["kafka"]["auth"] = json!({"tls": {}, "mskIam": {"region": "eu-west-1"}});
    let err = api
        .create(&PostParams::default(), &serde_json::from_value(bad)?)
        .await
        .expect_err("two auth kinds must be refused");
    assert!(
        err.to_string()
            .contains("exactly one of tls, scram or mskIam"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn every_example_applies_cleanly() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("examples")?;
    let examples = repo_root().join("examples");
    for dir in ["pipelines", "scaling", "laptop/pipeline.yaml"] {
        let path = examples.join(dir);
        let out = kubectl(&["apply", "-n", &ns.name, "-f", &path.to_string_lossy()])?;
        assert!(out.contains("created"), "{out}");
    }
    let listed = kubectl(&["get", "vp,sp", "-n", &ns.name, "-o", "name"])?;
    assert_eq!(listed.lines().count(), 14, "{listed}");
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_sets_the_pipeline_worker_count() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("scale")?;
    let client = k8s::client().await?;
    let api: Api<EmbeddingPipeline> = Api::namespaced(client, &ns.name);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(pipeline("p"))?,
    )
    .await?;
    kubectl(&["scale", "-n", &ns.name, "vp/p", "--replicas=3"])?;
    assert_eq!(api.get("p").await?.spec.workers.replicas, 3);
    Ok(())
}

#[tokio::test]
async fn a_deployment_becomes_ready_on_the_kwok_node() -> Result<()> {
    let ns = k8s::namespace("kwok")?;
    let client = k8s::client().await?;
    let api: Api<Deployment> = Api::namespaced(client, &ns.name);
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "probe"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "probe"}},
            "template": {
                "metadata": {"labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/probe:1"}]}
            }
        }
    }))?;
    api.patch(
        "probe",
        &PatchParams::apply("vectorpipe-tests").force(),
        &Patch::Apply(&deployment),
    )
    .await?;
    let ready = eventually("2 ready replicas", Duration::from_secs(60), || async {
        let d = api.get("probe").await?;
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        Ok((ready == 2).then_some(ready))
    })
    .await?;
    assert_eq!(ready, 2);
    Ok(())
}
