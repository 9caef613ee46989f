//! The operator end to end on the harness control plane: the operator runs as a process with a
//! kubeconfig, KWOK makes worker pods Ready, kube-controller-manager collects garbage.
//!
//! One test walks through the whole life of a pipeline, so that a single operator process
//! watches the cluster (two would race on the same objects).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, kubectl};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, repo_root};

// Generous: on a loaded 2-core machine kube-controller-manager sometimes takes tens of seconds
// to report a ReplicaSet ready ("read version is not as new as written version" retries).
const LIMIT: Duration = Duration::from_secs(150);

fn condition(ep: &EmbeddingPipeline, type_: &str) -> Option<(String, String)> {
    ep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn wait_condition(
    api: &Api<EmbeddingPipeline>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<EmbeddingPipeline> {
    eventually(
        &format!("{name}: {type_}={status} ({reason})"),
        LIMIT,
        || async {
            let ep = api.get(name).await?;
            let current =
                ep.status.as_ref().and_then(|s| s.observed_generation) == ep.metadata.generation;
            Ok(
                (current && condition(&ep, type_) == Some((status.into(), reason.into())))
                    .then_some(ep),
            )
        },
    )
    .await
}

fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("vectorpipe.io/config-hash")
        .cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_runs_a_pipeline_through_its_whole_life() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("operator")?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let operator = Operator::start(&dir.join("operator.log"))?;
    let client = k8s::client().await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);

    // 1. Apply an example: its children appear, owned by the pipeline, and it becomes Ready.
    let applied = Instant::now();
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
    let deployment = eventually("the worker Deployment", LIMIT, || async {
        Ok(deployments.get_opt("posts-worker").await?)
    })
    .await?;
    let time_to_deployment = applied.elapsed();
    println!("time from kubectl apply to the Deployment existing: {time_to_deployment:?}");
    let uid = pipelines.get("posts").await?.metadata.uid.context("uid")?;
    let owned_by =
        |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.unwrap_or_default()
                .iter()
                .any(|r| r.uid == uid && r.controller == Some(true))
        };
    assert!(owned_by(deployment.metadata.owner_references.clone()));
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .get("posts-worker")
        .await?;
    assert!(owned_by(config_map.metadata.owner_references.clone()));
    assert!(
        config_map.data.unwrap_or_default()["pipeline.yaml"]
            .contains("amazon.titan-embed-text-v2:0")
    );
    // The Service is applied right after the Deployment.
    let services = Api::<Service>::namespaced(client.clone(), &ns.name);
    let service = eventually("the metrics Service", LIMIT, || async {
        Ok(services.get_opt("posts-worker").await?)
    })
    .await?;
    assert!(owned_by(service.metadata.owner_references.clone()));
    let ep = wait_condition(&pipelines, "posts", "Ready", "True", "WorkersReady").await?;
    assert_eq!(ep.status.as_ref().and_then(|s| s.ready_replicas), Some(1));
    let printed = kubectl(&["get", "vp", "posts", "-n", &ns.name])?;
    assert!(
        printed.contains("READY")
            && printed.contains("True")
            && printed.contains("amazon.titan-embed-text-v2:0"),
        "{printed}"
    );
    // Normal events tell the story: the spec was applied, the workers became ready.
    eventually("SpecApplied and WorkersReady events", LIMIT, || async {
        let events: serde_json::Value =
            serde_json::from_str(&kubectl(&["get", "events", "-n", &ns.name, "-o", "json"])?)?;
        let reasons: Vec<String> = events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["involvedObject"]["name"] == "posts" && e["type"] == "Normal")
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect();
        Ok((reasons.iter().any(|r| r == "SpecApplied")
            && reasons.iter().any(|r| r == "WorkersReady"))
        .then_some(()))
    })
    .await?;

    // 2. A spec change rolls the pods (new config hash) and observedGeneration follows.
    let hash_before = template_hash(&deployment);
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sink": {"opensearch": {"index": "posts-v2"}}}})),
        )
        .await?;
    let rolled = eventually("a new config hash", LIMIT, || async {
        let d = deployments.get("posts-worker").await?;
        Ok((template_hash(&d) != hash_before).then_some(d))
    })
    .await?;
    assert!(template_hash(&rolled).is_some());
    wait_condition(&pipelines, "posts", "Ready", "True", "WorkersReady").await?;

    // 3. kubectl scale reaches the Deployment and only adds or removes pods: the running pod,
    //    the pod template and the ReplicaSet stay (a scale never restarts workers); a PDB
    //    appears above one replica.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns.name);
    let workers = ListParams::default().labels("vectorpipe.io/pipeline=posts");
    let running_pods = || async {
        let list = pods.list(&workers).await?;
        let uids: Vec<String> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.uid)
            .collect();
        anyhow::Ok(uids)
    };
    let first_pod = eventually("one worker pod", LIMIT, || async {
        let uids = running_pods().await?;
        Ok((uids.len() == 1).then(|| uids[0].clone()))
    })
    .await?;
    let template_before = deployments.get("posts-worker").await?.spec.template;
    kubectl(&["scale", "-n", &ns.name, "vp/posts", "--replicas=3"])?;
    eventually("3 replicas", LIMIT, || async {
        Ok((deployments.get("posts-worker").await?.spec.replicas == Some(3)).then_some(()))
    })
    .await?;
    let scaled_out = eventually("3 worker pods", LIMIT, || async {
        let uids = running_pods().await?;
        Ok((uids.len() == 3).then_some(uids))
    })
    .await?;
    assert!(
        scaled_out.contains(&first_pod),
        "scaling out replaced the running worker pod {first_pod}: {scaled_out:?}"
    );
    assert_eq!(
        deployments.get("posts-worker").await?.spec.template,
        template_before,
        "scaling changed the pod template"
    );
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    eventually("a PodDisruptionBudget", LIMIT, || async {
        Ok(pdbs.get_opt("posts-worker").await?)
    })
    .await?;
    let ep = wait_condition(&pipelines, "posts", "Ready", "True", "WorkersReady").await?;
    assert_eq!(ep.status.as_ref().and_then(|s| s.replicas), Some(3));
    kubectl(&["scale", "-n", &ns.name, "vp/posts", "--replicas=1"])?;
    let scaled_in = eventually("1 worker pod", LIMIT, || async {
        let uids = running_pods().await?;
        Ok((uids.len() == 1).then_some(uids))
    })
    .await?;
    // Which pod goes is the ReplicaSet controller's choice (pods ready at about the same time
    // rank equal); what matters is that scale-in only removes pods and never replaces one.
    assert!(
        scaled_out.contains(&scaled_in[0]),
        "scaling in replaced the worker pods: {scaled_in:?} is not one of {scaled_out:?}"
    );
    let sets = replica_sets.list(&workers).await?.items;
    let live: Vec<_> = sets
        .iter()
        .filter(|rs| rs.spec.replicas.unwrap_or(0) > 0)
        .collect();
    assert_eq!(live.len(), 1, "more than one live ReplicaSet after scaling");
    wait_condition(&pipelines, "posts", "Ready", "True", "WorkersReady").await?;

    // 4. suspend: zero workers, no PDB, and the status says why.
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await?;
    wait_condition(&pipelines, "posts", "Ready", "False", "Suspended").await?;
    assert_eq!(
        deployments.get("posts-worker").await?.spec.replicas,
        Some(0)
    );
    eventually("the PDB removed", LIMIT, || async {
        Ok(pdbs.get_opt("posts-worker").await?.is_none().then_some(()))
    })
    .await?;

    // 5. A missing Secret is reported, then the pipeline becomes Ready once it exists.
    let with_secrets = repo_root().join("examples/pipelines/cohere-chunked-dlq.yaml");
    kubectl(&[
        "apply",
        "-n",
        &ns.name,
        "-f",
        &with_secrets.to_string_lossy(),
    ])?;
    let ep = wait_condition(
        &pipelines,
        "support-articles",
        "Degraded",
        "True",
        "SecretNotFound",
    )
    .await?;
    assert_eq!(
        condition(&ep, "Ready").map(|c| c.1).as_deref(),
        Some("SecretNotFound")
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for (name, keys) in [
        ("kafka-scram", &["username", "password"][..]),
        ("kafka-ca", &["ca.crt"][..]),
        ("opensearch-writer", &["username", "password"][..]),
        ("opensearch-ca", &["ca.crt"][..]),
    ] {
        // Not labeled vectorpipe.io/credentials yet: reported, then labeled below.
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                keys.iter()
                    .map(|k| ((*k).to_owned(), ByteString(b"test".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &secret).await?;
    }
    wait_condition(
        &pipelines,
        "support-articles",
        "Degraded",
        "True",
        "SecretNotLabeled",
    )
    .await?;
    for name in [
        "kafka-scram",
        "kafka-ca",
        "opensearch-writer",
        "opensearch-ca",
    ] {
        secrets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"vectorpipe.io/credentials": "true"}}}),
                ),
            )
            .await?;
    }
    wait_condition(
        &pipelines,
        "support-articles",
        "Ready",
        "True",
        "WorkersReady",
    )
    .await?;

    // 6. What CEL cannot check gets a condition: an unknown model needs its dimensions.
    let mut unknown: EmbeddingPipeline = serde_yaml::from_str(&std::fs::read_to_string(&example)?)?;
    unknown.metadata.name = Some("unknown-model".into());
    unknown.spec.embedding.bedrock.model_id = "acme.custom-embedder".into();
    pipelines.create(&PostParams::default(), &unknown).await?;
    let ep = wait_condition(
        &pipelines,
        "unknown-model",
        "Degraded",
        "True",
        "InvalidSpec",
    )
    .await?;
    let message = ep
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Degraded")
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(
        message.contains("set embedding.bedrock.dimensions"),
        "{message}"
    );
    assert!(
        deployments.get_opt("unknown-model-worker").await?.is_none(),
        "an invalid pipeline gets no workers"
    );

    // 7. spec.query.enabled runs the query server next to the workers: its Deployment and
    //    Service appear, QueryReady turns True, and the workers' template stays as it was (a
    //    query change restarts no worker). Disabling it removes both and the condition.
    let workers_before = deployments.get("posts-worker").await?.spec.template;
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"query": {"enabled": true, "port": 8081}}})),
        )
        .await?;
    let query = eventually("the query server Deployment", LIMIT, || async {
        Ok(deployments.get_opt("posts-query").await?)
    })
    .await?;
    let container = &query
        .spec
        .template
        .spec
        .as_ref()
        .context("no pod spec")?
        .containers[0];
    assert_eq!(container.args.as_deref(), Some(&["serve".to_owned()][..]));
    assert!(owned_by(query.metadata.owner_references.clone()));
    let query_service = eventually("the query server Service", LIMIT, || async {
        Ok(services.get_opt("posts-query").await?)
    })
    .await?;
    assert_eq!(
        query_service.spec.and_then(|s| s.ports).unwrap_or_default()[0].port,
        8081
    );
    let ep = wait_condition(&pipelines, "posts", "QueryReady", "True", "Serving").await?;
    // The workers are still suspended (step 4): the query server answers from the index anyway.
    assert_eq!(
        condition(&ep, "Ready"),
        Some(("False".to_owned(), "Suspended".to_owned())),
        "the query server changed the workers' state"
    );
    assert_eq!(
        deployments.get("posts-worker").await?.spec.template,
        workers_before,
        "enabling the query server changed the workers' pod template"
    );
    pipelines
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"query": {"enabled": false}}})),
        )
        .await?;
    eventually("the query server removed", LIMIT, || async {
        let gone = deployments.get_opt("posts-query").await?.is_none()
            && services.get_opt("posts-query").await?.is_none();
        let ep = pipelines.get("posts").await?;
        Ok((gone && condition(&ep, "QueryReady").is_none()).then_some(()))
    })
    .await?;

    // 8. Deleting the pipeline removes its children (garbage collection through owner references).
    pipelines.delete("posts", &Default::default()).await?;
    eventually("the children collected", LIMIT, || async {
        Ok(deployments
            .get_opt("posts-worker")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    let metrics = operator.metrics_text().await?;
    assert!(
        vectorpipe_tests::worker::metric_sum(&metrics, "vectorpipe_operator_reconciles_total")
            > 0.0,
        "{metrics}"
    );
    assert!(
        !operator.log_text().contains("panicked"),
        "{}",
        operator.log_text()
    );
    Ok(())
}
