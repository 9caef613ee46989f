//! `kubectl vectorpipe` against the harness cluster: `status` and `explain` print what the
//! README shows, read from a pipeline and a policy whose status is set here (this binary runs no
//! operator, so nothing overwrites it), at a fixed time. The README's blocks are the expected
//! text: a change to the plugin's output fails here until the README shows it.
//! (`redrive` runs a Job, so it is tested on the real node: `real_node.rs`.)

use anyhow::Result;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
use vectorpipe_tests::k8s::{self, kubectl};

/// When the README's examples were made.
const NOW: &str = "2026-12-04T12:00:00Z";
/// The namespace the README shows (the test's own is put in its place).
const SHOWN_NAMESPACE: &str = "shop";

fn pipeline() -> Value {
    json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "posts"},
        "spec": {
            "source": {"kafka": {"bootstrapServers": ["kafka.kafka.svc:9092"], "topics": ["posts"]}},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 1024, "region": "eu-west-1"}},
            "sink": {"opensearch": {"endpoints": ["http://opensearch.search.svc:9200"], "index": "posts"}},
            "deadLetter": {"topic": "posts-dlq"},
        }
    })
}

fn pipeline_status() -> Value {
    let condition = |type_: &str, status: &str, reason: &str, at: &str, message: &str| json!({"type": type_, "status": status, "reason": reason, "lastTransitionTime": at, "message": message});
    json!({
        "observedGeneration": 1,
        "replicas": 4,
        "readyReplicas": 4,
        "consumerLag": 18_240,
        "freshness": {"p50Seconds": 0.82, "p95Seconds": 2.4},
        "usage": {"since": "2026-12-04T00:00:00Z", "tokens": 1_482_113, "estimatedCostUsd": 0.0296},
        "index": {
            "alias": "posts",
            "serving": {
                "generation": 1, "index": "posts-g1", "consumerGroup": "vectorpipe-shop-posts",
                "model": {"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256,
                          "chunking": {"strategy": "recursive", "maxChars": 2000, "overlapChars": 200}},
            },
            "migration": {
                "target": {
                    "generation": 2, "index": "posts-g2", "consumerGroup": "vectorpipe-shop-posts-g2",
                    "model": {"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 1024,
                              "chunking": {"strategy": "recursive", "maxChars": 2000, "overlapChars": 200}},
                },
                "phase": "Backfilling",
                "startedAt": "2026-12-04T11:40:00Z",
                "records": 1_204_330,
                "lag": 395_112,
                "etaSeconds": 412,
                "observedAt": "2026-12-04T11:59:58Z",
                "message": "generation 2 (posts-g2): 1204330 records done, 395112 behind, about 412s to go",
            },
        },
        "conditions": [
            condition("Ready", "True", "WorkersReady", "2026-12-04T09:12:03Z", "4 of 4 workers ready"),
            condition("Progressing", "True", "RolloutComplete", "2026-12-04T09:12:03Z", "the workers run the current spec"),
            condition("Degraded", "False", "AsExpected", "2026-12-04T08:40:00Z", "no problem found"),
        ],
    })
}

fn policy() -> Value {
    json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": "posts-lag"},
        "spec": {
            "targetRef": {"name": "posts"},
            "minReplicas": 1,
            "maxReplicas": 12,
            "capAtPartitionCount": true,
            "metrics": [{"kafkaLag": {"aggregation": "perReplica"}, "scaleOutThreshold": 5000, "scaleInThreshold": 500}],
            "scaleOut": {"evaluationPeriods": 3, "datapointsToAlarm": 2, "operation": "multiply", "factor": 2, "cooldown": "1m"},
            "scaleIn": {"evaluationPeriods": 5, "datapointsToAlarm": 5, "operation": "add", "factor": 1, "cooldown": "5m"},
        }
    })
}

fn policy_status() -> Value {
    let decision = |time: &str, from: i32, to: i32, reason: &str, message: &str, lag: f64| {
        json!({
            "time": time, "fromReplicas": from, "toReplicas": to, "reason": reason,
            "message": message, "applied": true,
            "inputs": {"kafkaLag": lag, "partitions": 12.0, "partitionsWithLag": 12.0},
        })
    };
    let out = decision(
        "2026-12-04T11:58:30Z",
        2,
        4,
        "ScaleOutAlarm",
        "kafkaLag above the scale-out threshold",
        22_410.0,
    );
    json!({
        "observedGeneration": 1,
        "currentReplicas": 4,
        "desiredReplicas": 4,
        "lastScaleTime": "2026-12-04T11:58:30Z",
        "conditions": [
            {"type": "Active", "status": "True", "reason": "Evaluating", "lastTransitionTime": "2026-12-04T08:40:00Z", "message": "judging the metrics every pollInterval and scaling the target"},
            {"type": "AbleToScale", "status": "False", "reason": "CoolingDown", "lastTransitionTime": "2026-12-04T11:58:30Z", "message": "scaled out 1m30s ago; the next scale-out may come after the 1m cooldown, a scale-in after 5m"},
            {"type": "ScalingLimited", "status": "False", "reason": "DesiredWithinRange", "lastTransitionTime": "2026-12-04T08:40:00Z", "message": "the desired count is within every bound"},
        ],
        "lastDecision": out,
        "history": [
            out,
            decision("2026-12-04T11:57:10Z", 1, 2, "ScaleOutAlarm", "kafkaLag above the scale-out threshold", 9_020.0),
        ],
    })
}

/// Runs `kubectl vectorpipe ARGS -n NAMESPACE` with the README's time; the namespace in the
/// output is the one the README shows.
fn plugin(namespace: &str, args: &[&str]) -> Result<String> {
    let mut all = args.to_vec();
    all.extend(["-n", namespace]);
    let out = k8s::kubectl_plugin_with(&all, &[("VECTORPIPE_PLUGIN_NOW", NOW)])?;
    Ok(out.replace(namespace, SHOWN_NAMESPACE))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_explain_print_what_the_readme_shows() -> Result<()> {
    k8s::install_crds()?;
    let namespace = k8s::namespace("plugin")?;
    let ns = namespace.name.as_str();
    for object in [pipeline(), policy()] {
        let file = std::env::temp_dir().join(format!(
            "{ns}-{}.json",
            object["kind"].as_str().unwrap_or("object")
        ));
        std::fs::write(&file, object.to_string())?;
        kubectl(&["apply", "-n", ns, "-f", &file.to_string_lossy()])?;
    }
    let client = k8s::client().await?;
    let params = PatchParams::default();
    Api::<EmbeddingPipeline>::namespaced(client.clone(), ns)
        .patch_status(
            "posts",
            &params,
            &Patch::Merge(json!({"status": pipeline_status()})),
        )
        .await?;
    Api::<ScalingPolicy>::namespaced(client.clone(), ns)
        .patch_status(
            "posts-lag",
            &params,
            &Patch::Merge(json!({"status": policy_status()})),
        )
        .await?;

    let status = plugin(ns, &["status", "posts"])?;
    assert_eq!(
        status,
        vectorpipe_tests::readme_block("kubectl vectorpipe status posts")?,
        "the README's status block:\n{status}"
    );
    let migrating = plugin(ns, &["migrate", "status", "posts"])?;
    assert_eq!(
        migrating,
        vectorpipe_tests::readme_block("kubectl vectorpipe migrate status posts")?,
        "the README's migrate status block:\n{migrating}"
    );
    let explain = plugin(ns, &["explain", "posts-lag"])?;
    assert_eq!(
        explain,
        vectorpipe_tests::readme_block("kubectl vectorpipe explain posts-lag")?,
        "the README's explain block:\n{explain}"
    );

    // A pipeline no policy scales, and a policy not judged yet, say so.
    kubectl(&["delete", "scalingpolicy", "-n", ns, "posts-lag"])?;
    let alone = plugin(ns, &["status", "posts"])?;
    assert!(
        alone.contains("scaling: no ScalingPolicy targets this pipeline"),
        "{alone}"
    );
    let missing = k8s::kubectl_plugin(&["status", "nothing", "-n", ns])
        .expect_err("a pipeline that does not exist");
    assert!(
        format!("{missing:#}").contains(&format!("reading EmbeddingPipeline {ns}/nothing")),
        "{missing:#}"
    );
    Ok(())
}
