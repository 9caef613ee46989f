//! GitOps with Argo CD: the Lua health checks against their fixtures (run by Debian's lua5.1, the
//! dialect of Argo CD's gopher-lua), the argocd-cm copy of the scripts, the Application example
//! against Argo CD's real Application CRD, and the operator leaving a pipeline's spec alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kube::Api;
use serde_json::Value;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, kubectl};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, repo_root};

fn argocd_dir() -> PathBuf {
    repo_root().join("examples/argocd")
}

/// A JSON value as a Lua table constructor (null fields are left out, as gopher-lua sees them).
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs a health script on an object; returns (status, message).
fn health(script: &Path, object: &Value) -> Result<(String, String)> {
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nprint(hs.status)\nprint(hs.message)\n",
        lua_literal(object),
        lua_string(&script.to_string_lossy())
    );
    let out = Command::new("lua5.1")
        .args(["-e", &program])
        .output()
        .context("lua5.1 is missing: install Debian's lua5.1 (tests/run-all.sh does)")?;
    if !out.status.success() {
        bail!(
            "lua5.1 failed on {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    Ok((
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    ))
}

#[test]
fn health_checks_give_the_expected_health_for_every_fixture() -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for kind in ["EmbeddingPipeline", "ScalingPolicy"] {
        let dir = argocd_dir()
            .join("resource_customizations/vectorpipe.io")
            .join(kind);
        // Argo CD's own layout: health.lua, health_test.yaml, testdata/.
        let tests: Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("health_test.yaml"))?)?;
        let cases = tests["tests"].as_array().context("tests")?;
        ensure!(cases.len() >= 5, "{kind}: too few fixtures");
        for case in cases {
            let input = dir.join(case["inputPath"].as_str().context("inputPath")?);
            let object: Value = serde_yaml::from_str(&std::fs::read_to_string(&input)?)?;
            let (status, message) = health(&dir.join("health.lua"), &object)?;
            assert_eq!(
                status,
                case["healthStatus"]["status"].as_str().unwrap_or_default(),
                "{}",
                input.display()
            );
            assert_eq!(
                message,
                case["healthStatus"]["message"].as_str().unwrap_or_default(),
                "{}",
                input.display()
            );
            seen.insert((kind, status));
        }
    }
    for kind in ["EmbeddingPipeline", "ScalingPolicy"] {
        for status in ["Healthy", "Progressing", "Degraded", "Suspended"] {
            ensure!(
                seen.contains(&(kind, status.to_owned())),
                "no {kind} fixture is {status}"
            );
        }
    }
    Ok(())
}

#[test]
fn argocd_cm_carries_the_same_scripts() -> Result<()> {
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(
        argocd_dir().join("argocd-cm.yaml"),
    )?)?;
    for kind in ["EmbeddingPipeline", "ScalingPolicy"] {
        let key = format!("resource.customizations.health.vectorpipe.io_{kind}");
        let embedded = cm["data"][&key].as_str().context(key.clone())?;
        let file = std::fs::read_to_string(
            argocd_dir()
                .join("resource_customizations/vectorpipe.io")
                .join(kind)
                .join("health.lua"),
        )?;
        assert_eq!(
            embedded, file,
            "{key} in examples/argocd/argocd-cm.yaml differs from {kind}/health.lua; copy it over"
        );
    }
    Ok(())
}

#[test]
fn the_application_example_is_valid_against_argo_cds_crd() -> Result<()> {
    let out = Command::new(repo_root().join("tests/harness/argocd-crd.sh")).output()?;
    ensure!(
        out.status.success(),
        "argocd-crd.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crd = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    kubectl(&["apply", "--server-side", "-f", &crd])?;
    k8s::wait_established("applications.argoproj.io")?;
    let _ = kubectl(&["create", "namespace", "argocd"]);
    let app = argocd_dir().join("application.yaml");
    // Accepted by the apiserver against Argo CD's schema (no Argo CD runs here to act on it).
    kubectl(&["apply", "-f", &app.to_string_lossy()])?;

    // The health fixtures are valid objects too: the real CRDs (schema and CEL rules) accept
    // them, in the namespace they name.
    k8s::install_crds()?;
    let _ = kubectl(&["create", "namespace", "data"]);
    for kind in ["EmbeddingPipeline", "ScalingPolicy"] {
        let testdata = argocd_dir()
            .join("resource_customizations/vectorpipe.io")
            .join(kind)
            .join("testdata");
        kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &testdata.to_string_lossy(),
        ])?;
    }

    // The argocd-cm with the health checks is a valid ConfigMap (applied to a scratch namespace).
    let scratch = k8s::namespace("argocd-cm")?;
    let cm = argocd_dir().join("argocd-cm.yaml");
    kubectl(&["apply", "-n", &scratch.name, "-f", &cm.to_string_lossy()])?;

    // The folder and patterns it syncs select the example pipelines and policies.
    let value: Value = serde_yaml::from_str(&std::fs::read_to_string(&app)?)?;
    let path = value["spec"]["source"]["path"].as_str().context("path")?;
    for sub in ["pipelines", "scaling"] {
        let dir = repo_root().join(path).join(sub);
        let yamls = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
            .count();
        ensure!(yamls > 0, "{} has no YAML to sync", dir.display());
    }
    assert_eq!(
        value["spec"]["ignoreDifferences"][0]["jsonPointers"][0],
        "/spec/workers/replicas"
    );
    Ok(())
}

/// What Argo CD would see: the pipeline applied server-side by "argocd-controller" has no field
/// of its spec owned by anyone else after the operator reconciled it, and a server-side diff is
/// empty.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_never_changes_a_pipeline_spec() -> Result<()> {
    k8s::install_crds()?;
    let ns = k8s::namespace("argocd-drift")?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let operator = Operator::start(&dir.join("operator.log"))?;
    let files = [
        repo_root().join("examples/pipelines/minimal.yaml"),
        repo_root().join("examples/pipelines/cohere-chunked-dlq.yaml"),
    ];
    for file in &files {
        kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=argocd-controller",
            "-n",
            &ns.name,
            "-f",
            &file.to_string_lossy(),
        ])?;
    }
    let client = k8s::client().await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client, &ns.name);
    // Both get a status (Ready, or Degraded for the missing Secrets of the second).
    eventually(
        "both pipelines reconciled",
        Duration::from_secs(60),
        || async {
            let list = pipelines.list(&Default::default()).await?;
            Ok((list.items.len() == 2
                && list
                    .items
                    .iter()
                    .all(|p| p.status.as_ref().and_then(|s| s.observed_generation) == Some(1)))
            .then_some(list))
        },
    )
    .await?;
    // A few more reconciles' worth of time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in pipelines.list(&Default::default()).await?.items {
        assert_eq!(p.metadata.generation, Some(1), "the spec changed");
        for entry in p.metadata.managed_fields.iter().flatten() {
            let fields = entry
                .fields_v1
                .as_ref()
                .map(|f| serde_json::to_string(&f.0))
                .transpose()?
                .unwrap_or_default();
            if entry.manager.as_deref() != Some("argocd-controller") {
                assert!(
                    !fields.contains("\"f:spec\""),
                    "{:?} owns spec fields of {}: {fields}",
                    entry.manager,
                    p.metadata.name.as_deref().unwrap_or_default()
                );
            }
        }
    }
    for file in &files {
        let diff = Command::new(vectorpipe_tests::harness_var("VP_KUBECTL")?)
            .arg(format!("--kubeconfig={}", k8s::kubeconfig()?.display()))
            .args(["diff", "--server-side", "--field-manager=argocd-controller"])
            .args(["-n", &ns.name, "-f"])
            .arg(file)
            .output()?;
        assert!(
            diff.status.success(),
            "drift on {}: {}{}",
            file.display(),
            String::from_utf8_lossy(&diff.stdout),
            String::from_utf8_lossy(&diff.stderr)
        );
    }
    drop(operator);
    Ok(())
}
