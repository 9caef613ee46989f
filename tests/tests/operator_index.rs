//! The operator checks an existing OpenSearch index against the pipeline's model before it starts
//! workers: a k-NN field of another dimension gives Degraded=True `IndexDimensionMismatch` and no
//! workers; a fresh index name (which the worker will create) makes the pipeline Ready.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s;
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, opensearch, repo_root, unique_name};

fn condition(ep: &EmbeddingPipeline, type_: &str) -> Option<(String, String, String)> {
    ep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_of_another_dimension_is_reported_before_workers_start() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("index-check")?;
    let index = unique_name("dim768");
    // An index made by someone else for a 768-dimension model.
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{}/{index}", opensearch::url()?))
        .json(&json!({
            "settings": {"index": {"knn": true, "number_of_replicas": 0}},
            "mappings": {"properties": {"embedding": {
                "type": "knn_vector", "dimension": 768,
                "method": {"name": "hnsw", "engine": "lucene", "space_type": "l2"}
            }}}
        }))
        .send()
        .await?;
    ensure!(
        created.status().is_success(),
        "creating {index}: {}",
        created.text().await?
    );

    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let _operator = Operator::start(&dir.join("operator.log"))?;
    let client = k8s::client().await?;
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut value: Value = serde_yaml::from_str(&text)?;
    value["spec"]["sink"]["opensearch"]["endpoints"] = json!([opensearch::url()?]);
    value["spec"]["sink"]["opensearch"]["index"] = json!(index);
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    pipelines
        .create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?;

    let message = eventually(
        "Degraded=True IndexDimensionMismatch",
        Duration::from_secs(60),
        || async {
            let ep = pipelines.get("posts").await?;
            Ok(condition(&ep, "Degraded")
                .filter(|c| c.0 == "True" && c.1 == "IndexDimensionMismatch")
                .map(|c| c.2))
        },
    )
    .await?;
    assert!(
        message.contains("has dimension 768") && message.contains("configured for 1024"),
        "{message}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments.get_opt("posts-worker").await?.is_none(),
        "no workers may start against an index they cannot write"
    );

    // Pointing the pipeline at a new index name fixes it.
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"sink": {"opensearch": {"index": unique_name("fresh")}}}}),
            ),
        )
        .await?;
    eventually("Ready after the fix", Duration::from_secs(150), || async {
        let ep = pipelines.get("posts").await?;
        Ok(condition(&ep, "Ready")
            .filter(|c| c.0 == "True")
            .map(|_| ()))
    })
    .await?;
    let _ = http
        .delete(format!("{}/{index}", opensearch::url()?))
        .send()
        .await;

    // deleteIndexOnDelete: a finalizer while it is set; deleting the pipeline deletes the index.
    let owned = unique_name("owned");
    let created = http
        .put(format!("{}/{owned}", opensearch::url()?))
        .json(&json!({
            "settings": {"index": {"knn": true, "number_of_replicas": 0}},
            "mappings": {"properties": {"embedding": {
                "type": "knn_vector", "dimension": 1024,
                "method": {"name": "hnsw", "engine": "lucene", "space_type": "l2"}
            }}}
        }))
        .send()
        .await?;
    ensure!(created.status().is_success(), "creating {owned}");
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sink": {"opensearch": {
                "index": owned, "deleteIndexOnDelete": true
            }}}})),
        )
        .await?;
    let has_finalizer = |ep: &EmbeddingPipeline| {
        ep.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "vectorpipe.io/delete-index")
    };
    eventually("the finalizer added", Duration::from_secs(60), || async {
        Ok(has_finalizer(&pipelines.get("posts").await?).then_some(()))
    })
    .await?;
    // Turned off again: the finalizer goes; on again: it comes back.
    for (on, what) in [(false, "removed"), (true, "back")] {
        pipelines
            .patch(
                "posts",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"spec": {"sink": {"opensearch": {"deleteIndexOnDelete": on}}}}),
                ),
            )
            .await?;
        eventually(
            &format!("the finalizer {what}"),
            Duration::from_secs(60),
            || async { Ok((has_finalizer(&pipelines.get("posts").await?) == on).then_some(())) },
        )
        .await?;
    }
    pipelines.delete("posts", &Default::default()).await?;
    eventually("the pipeline gone", Duration::from_secs(60), || async {
        Ok(pipelines.get_opt("posts").await?.is_none().then_some(()))
    })
    .await?;
    let status = http
        .head(format!("{}/{owned}", opensearch::url()?))
        .send()
        .await?
        .status();
    assert_eq!(status.as_u16(), 404, "the index {owned} must be deleted");
    Ok(())
}
