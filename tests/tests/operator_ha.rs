//! Two operator processes at once: only the Lease holder acts; killing it mid-work hands over to
//! the other, which converges without duplicate objects.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, kubectl};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, repo_root, unique_name};

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_acts_and_a_follower_takes_over() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("ha")?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let lease = unique_name("ha-lease");
    let kubeconfig = k8s::kubeconfig()?;
    let a = Operator::start_with(&dir.join("a.log"), &kubeconfig, &lease)?;
    let b = Operator::start_with(&dir.join("b.log"), &kubeconfig, &lease)?;

    let leader_of = |a: &Operator, b: &Operator| -> Option<bool> {
        let (la, lb) = (
            a.log_text().contains("became the leader"),
            b.log_text().contains("became the leader"),
        );
        match (la, lb) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    };
    let a_leads = eventually("exactly one leader", Duration::from_secs(60), || async {
        Ok(leader_of(&a, &b))
    })
    .await?;
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };

    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
    let client = k8s::client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("the Deployment", Duration::from_secs(60), || async {
        Ok(deployments.get_opt("posts-worker").await?)
    })
    .await?;
    assert!(
        !follower.log_text().contains("reconciled"),
        "the follower must not act:\n{}",
        follower.log_text()
    );

    // Kill the leader without warning, then change the pipeline: the follower must take over.
    leader.kill()?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 2}}})),
        )
        .await?;
    eventually(
        "the follower applying the change",
        Duration::from_secs(90),
        || async {
            Ok((deployments.get("posts-worker").await?.spec.replicas == Some(2)).then_some(()))
        },
    )
    .await?;
    assert!(follower.log_text().contains("became the leader"));

    // No duplicates: one of each child for the pipeline.
    let selector = ListParams::default().labels("vectorpipe.io/pipeline=posts");
    assert_eq!(deployments.list(&selector).await?.items.len(), 1);
    assert_eq!(
        Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
            .list(&selector)
            .await?
            .items
            .len(),
        1
    );
    assert_eq!(
        Api::<Service>::namespaced(client.clone(), &ns.name)
            .list(&selector)
            .await?
            .items
            .len(),
        1
    );
    Ok(())
}
