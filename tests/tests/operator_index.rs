//! The operator checks an existing OpenSearch index against the pipeline's model before it starts
//! workers: a k-NN field of another dimension gives Degraded=True `IndexDimensionMismatch` and no
//! workers; a fresh index name (which the worker will create) makes the pipeline Ready.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
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
    // Workers that take their time to stop. Foreground deletion keeps a Deployment until its
    // ReplicaSets are gone, and a ReplicaSet until its pods are gone (blockOwnerDeletion); kwok's
    // pods ignore finalizers, so a finalizer on the ReplicaSet stands for a worker still draining.
    // The index must outlive it, or that worker would write into a deleted index and recreate it.
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let workers = ListParams::default().labels("vectorpipe.io/pipeline=posts");
    let held: Vec<String> = eventually(
        "the worker ReplicaSets",
        Duration::from_secs(120),
        || async {
            let names: Vec<String> = replica_sets
                .list(&workers)
                .await?
                .items
                .into_iter()
                .filter_map(|rs| rs.metadata.name)
                .collect();
            Ok((!names.is_empty()).then_some(names))
        },
    )
    .await?;
    for name in &held {
        replica_sets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["vectorpipe.io/test-hold"]}})),
            )
            .await?;
    }
    pipelines.delete("posts", &Default::default()).await?;
    eventually("the workers stopping", Duration::from_secs(60), || async {
        Ok(replica_sets
            .get_opt(&held[0])
            .await?
            .and_then(|rs| rs.metadata.deletion_timestamp)
            .map(|_| ()))
    })
    .await?;
    // Several rechecks of the finalizer later, the index is still there.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = http
        .head(format!("{}/{owned}", opensearch::url()?))
        .send()
        .await?
        .status();
    assert_eq!(
        status.as_u16(),
        200,
        "the index {owned} was deleted while the workers were still stopping"
    );
    for name in &held {
        replica_sets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await?;
    }
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

/// A Secret that did not opt in with `vectorpipe.io/credentials: "true"` is never read: the
/// pipeline says so, and the endpoint its spec names receives no credentials from it. Once the
/// Secret is labeled, the same endpoint does receive them (so the first check could see them).
#[tokio::test(flavor = "multi_thread")]
async fn an_unlabeled_secret_is_never_sent_anywhere() -> Result<()> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    k8s::install_crds()?;
    let ns = k8s::namespace("secret-label")?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let (endpoint, captured) = opensearch::capturing_server().await?;
    let client = k8s::client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "someone-elses"},
                "data": {
                    "username": ByteString(b"admin".to_vec()),
                    "password": ByteString(b"not-for-you".to_vec()),
                }
            }))?,
        )
        .await?;
    let _operator = Operator::start(&dir.join("operator.log"))?;
    let text = std::fs::read_to_string(repo_root().join("examples/pipelines/minimal.yaml"))?;
    let mut value: Value = serde_yaml::from_str(&text)?;
    value["spec"]["sink"]["opensearch"]["endpoints"] = json!([endpoint]);
    value["spec"]["sink"]["opensearch"]["auth"] =
        json!({"basic": {"secretRef": {"name": "someone-elses"}}});
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    pipelines
        .create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?;
    let message = eventually(
        "Degraded=True SecretNotLabeled",
        Duration::from_secs(60),
        || async {
            let ep = pipelines.get("posts").await?;
            Ok(condition(&ep, "Degraded")
                .filter(|c| c.0 == "True" && c.1 == "SecretNotLabeled")
                .map(|c| c.2))
        },
    )
    .await?;
    assert!(
        message.contains("kubectl label secret") && message.contains("vectorpipe.io/credentials"),
        "{message}"
    );
    // Several reconciles later (the pipeline is rechecked every 10 s), still nothing was sent.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let sent = captured.lock().map(|c| c.clone()).unwrap_or_default();
    assert!(
        sent.iter().all(|(_, _, auth)| auth.is_none()),
        "credentials from an unlabeled Secret reached the endpoint: {sent:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments.get_opt("posts-worker").await?.is_none(),
        "no worker may mount a Secret that did not opt in"
    );

    // The Secret's owner opts in: now the index check sends them, and the pipeline runs.
    secrets
        .patch(
            "someone-elses",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"vectorpipe.io/credentials": "true"}}})),
        )
        .await?;
    eventually(
        "the labeled Secret's credentials used",
        Duration::from_secs(60),
        || async {
            let sent = captured.lock().map(|c| c.clone()).unwrap_or_default();
            Ok(sent
                .iter()
                .any(|(_, path, auth)| path.ends_with("/_mapping") && auth.is_some())
                .then_some(()))
        },
    )
    .await?;
    eventually("a worker Deployment", Duration::from_secs(60), || async {
        Ok(deployments.get_opt("posts-worker").await?.map(|_| ()))
    })
    .await?;
    Ok(())
}
