//! The Helm chart: lint, template, values schema, RBAC equal to the operator's declared rules, and
//! an install into the harness cluster whose ServiceAccount runs the operator (by impersonation;
//! the operator image cannot be pulled here, so the operator runs as a process).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::Api;
use serde::Deserialize;
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, helm, kubectl};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, repo_root, unique_name};

fn chart() -> String {
    repo_root()
        .join("charts/vectorpipe")
        .to_string_lossy()
        .into_owned()
}

/// `helm template` with extra `--set`s, as YAML documents.
fn template(sets: &[&str]) -> Result<Vec<Value>> {
    k8s::chart_template(sets)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

/// Every (group, resource, verb) a list of RBAC rules grants.
fn grants(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        for group in rule["apiGroups"].as_array().into_iter().flatten() {
            for resource in rule["resources"].as_array().into_iter().flatten() {
                for verb in rule["verbs"].as_array().into_iter().flatten() {
                    out.insert((
                        group.as_str().unwrap_or_default().to_owned(),
                        resource.as_str().unwrap_or_default().to_owned(),
                        verb.as_str().unwrap_or_default().to_owned(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn the_chart_lints_and_renders() -> Result<()> {
    let lint = helm(&["lint", "--strict", &chart()])?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let docs = template(&[])?;
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        ensure!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    ensure!(
        !kinds.contains("ServiceMonitor"),
        "the ServiceMonitor is off by default"
    );

    // The operator Deployment: restricted security, probes, leader election in its namespace.
    let deployment = find(&docs, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["image"],
        "ghcr.io/vectorpipe/vectorpipe-operator:0.1.0"
    );
    let env: Vec<(&str, &Value)> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e)))
        .collect();
    let var = |name: &str| env.iter().find(|(n, _)| *n == name).map(|(_, e)| *e);
    assert_eq!(
        var("POD_NAMESPACE").context("POD_NAMESPACE")?["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        var("VECTORPIPE_LEADER_ELECTION").context("leader election")?["value"],
        "true"
    );
    assert_eq!(
        var("VECTORPIPE_WORKER_IMAGE").context("worker image")?["value"],
        "ghcr.io/vectorpipe/vectorpipe-worker:0.1.0"
    );
    assert!(var("VECTORPIPE_PROMETHEUS_URL").is_none());

    // The chart's RBAC grants exactly operator/rbac/clusterrole.yaml, the Lease only in its own
    // namespace.
    let declared: Value = serde_yaml::from_str(&std::fs::read_to_string(
        repo_root().join("operator/rbac/clusterrole.yaml"),
    )?)?;
    let leader_election =
        std::fs::read_to_string(repo_root().join("operator/rbac/leader-election.yaml"))?;
    let declared_role: Value = serde_yaml::Deserializer::from_str(&leader_election)
        .map(Value::deserialize)
        .find(|doc| doc.as_ref().is_ok_and(|d| d["kind"] == "Role"))
        .context("operator/rbac/leader-election.yaml has no Role")??;
    let cluster = grants(&find(&docs, "ClusterRole")?["rules"]);
    let role = find(&docs, "Role")?;
    assert_eq!(role["metadata"]["namespace"], "vp-system");
    assert_eq!(cluster, grants(&declared["rules"]));
    assert_eq!(grants(&role["rules"]), grants(&declared_role["rules"]));
    assert!(
        cluster
            .iter()
            .all(|(group, _, _)| group != "coordination.k8s.io"),
        "Leases belong in the namespaced Role"
    );

    // watchNamespaces: the same rules as a Role in each watched namespace, nothing cluster-wide.
    let scoped = template(&["watchNamespaces={team-a,team-b}"])?;
    assert!(
        scoped
            .iter()
            .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding"),
        "watchNamespaces must not render cluster-wide RBAC"
    );
    for namespace in ["team-a", "team-b"] {
        let role = scoped
            .iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == namespace)
            .with_context(|| format!("no Role in {namespace}"))?;
        assert_eq!(grants(&role["rules"]), grants(&declared["rules"]));
        let binding = scoped
            .iter()
            .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == namespace)
            .with_context(|| format!("no RoleBinding in {namespace}"))?;
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "vp-system");
    }
    let text = serde_json::to_string(find(&scoped, "Deployment")?)?;
    assert!(
        text.contains(r#"{"name":"VECTORPIPE_WATCH_NAMESPACES","value":"team-a,team-b"}"#),
        "{text}"
    );
    let err = template(&["watchNamespaces={Team_A}"])
        .expect_err("an invalid namespace name")
        .to_string();
    assert!(err.contains("watchNamespaces"), "{err}");

    // Options render what they say.
    let docs = template(&[
        "metrics.serviceMonitor.enabled=true",
        "replicaCount=2",
        "prometheus.url=http://prometheus.monitoring:9090",
        "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::123456789012:role/vp",
    ])?;
    let monitor = find(&docs, "ServiceMonitor")?;
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(find(&docs, "Deployment")?["spec"]["replicas"], 2);
    assert_eq!(
        find(&docs, "ServiceAccount")?["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/vp"
    );
    let text = serde_json::to_string(find(&docs, "Deployment")?)?;
    assert!(text.contains("http://prometheus.monitoring:9090"), "{text}");

    // Bad values are refused with a message that names them.
    for (set, expect) in [
        ("replicaCount=two", "replicaCount"),
        ("logFormat=xml", "logFormat"),
        ("metrics.port=80", "port"),
        ("prometheus.url=prometheus:9090", "url"),
        ("replicas=2", "replicas"),
    ] {
        let err = template(&[set]).expect_err(set).to_string();
        assert!(err.contains(expect), "{set}: {err}");
    }
    let err = template(&["replicaCount=2", "leaderElection.enabled=false"])
        .expect_err("two writers")
        .to_string();
    assert!(err.contains("leaderElection"), "{err}");
    Ok(())
}

#[test]
fn a_price_table_in_the_values_reaches_the_operator() -> Result<()> {
    let plain = template(&[])?;
    ensure!(
        !plain.iter().any(|d| d["kind"] == "ConfigMap"),
        "no price table by default"
    );
    let docs = template(&["pricing.someone-model=2"])?;
    let prices = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("the price table's ConfigMap")?;
    let table: std::collections::BTreeMap<String, f64> =
        serde_yaml::from_str(prices["data"]["prices.yaml"].as_str().unwrap_or_default())?;
    ensure!(table.get("someone-model") == Some(&2.0), "{prices}");
    let deployment = find(&docs, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = container["env"].as_array().cloned().unwrap_or_default();
    let path = env
        .iter()
        .find(|e| e["name"] == "VECTORPIPE_PRICE_TABLE")
        .and_then(|e| e["value"].as_str())
        .context("VECTORPIPE_PRICE_TABLE")?;
    let mount = container["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        path.starts_with(mount) && !mount.is_empty(),
        "{path} under {mount}"
    );
    ensure!(
        pod["volumes"][0]["configMap"]["name"] == prices["metadata"]["name"],
        "{pod}"
    );
    ensure!(
        deployment["spec"]["template"]["metadata"]["annotations"]["vectorpipe.io/prices-hash"]
            .is_string(),
        "a changed table restarts the operator"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_chart_runs_the_operator_with_its_own_permissions() -> Result<()> {
    k8s::install_crds()?;
    let release = unique_name("vp");
    let system = k8s::namespace("vp-chart")?;
    // The objects the chart renders are accepted by the apiserver (the CRDs already exist, so
    // Helm skips its crds/ folder, as on every upgrade).
    let chart = chart();
    helm(&[
        "install",
        &release,
        &chart,
        "-n",
        &system.name,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    let uninstall = scopeguard(&release, &system.name);
    let status = helm(&["status", &release, "-n", &system.name])?;
    assert!(status.contains("STATUS: deployed"), "{status}");
    let fullname = format!("{release}-vectorpipe");

    // The chart's ServiceAccount, and only its grants.
    let user = format!("system:serviceaccount:{}:{fullname}", system.name);
    // `kubectl auth can-i` prints yes or no (and exits 1 on no).
    let can = |args: &[&str]| -> Result<bool> {
        let out = std::process::Command::new(vectorpipe_tests::harness_var("VP_KUBECTL")?)
            .arg(format!("--kubeconfig={}", k8s::kubeconfig()?.display()))
            .args(["auth", "can-i"])
            .args(args)
            .args(["--as", user.as_str()])
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            answer == "yes" || answer == "no",
            "kubectl auth can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(answer == "yes")
    };
    assert!(can(&[
        "patch",
        "embeddingpipelines.vectorpipe.io",
        "--subresource=scale",
        "-A"
    ])?);
    assert!(can(&[
        "patch",
        "scalingpolicies.vectorpipe.io",
        "--subresource=status",
        "-A"
    ])?);
    assert!(can(&[
        "create",
        "leases.coordination.k8s.io",
        "-n",
        &system.name
    ])?);
    assert!(!can(&[
        "create",
        "leases.coordination.k8s.io",
        "-n",
        "default"
    ])?);
    assert!(!can(&["list", "secrets", "-A"])?);
    assert!(!can(&["create", "embeddingpipelines.vectorpipe.io", "-A"])?);
    assert!(!can(&["delete", "embeddingpipelines.vectorpipe.io", "-A"])?);

    // The operator, as that ServiceAccount, with its Lease where the chart puts it.
    let dir = std::env::temp_dir().join(&system.name);
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = k8s::impersonating_kubeconfig(&user, &dir.join("chart.kubeconfig"))?;
    let operator = Operator::start_in(
        &dir.join("operator.log"),
        &kubeconfig,
        &system.name,
        &fullname,
    )?;
    let ns = k8s::namespace("vp-chart-data")?;
    let client = k8s::client().await?;
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
    k8s::create_fallback_policy(&client, &ns.name).await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
    eventually(
        "Ready at 2 workers under the chart's ServiceAccount",
        Duration::from_secs(150),
        || async {
            let ep = pipelines.get("posts").await?;
            Ok(
                (k8s::is_ready(&ep)
                    && ep.status.as_ref().and_then(|s| s.ready_replicas) == Some(2))
                .then_some(()),
            )
        },
    )
    .await?;
    let lease = kubectl(&["get", "lease", &fullname, "-n", &system.name, "-o", "name"])?;
    assert!(lease.contains(&fullname), "{lease}");
    let log = operator.log_text();
    // An RBAC denial names the user; namespaces of other tests being deleted also say "forbidden".
    assert!(!log.contains("forbidden: User"), "{log}");
    drop(uninstall);
    Ok(())
}

/// Uninstalls the release when the test ends, pass or fail.
fn scopeguard(release: &str, namespace: &str) -> impl Drop {
    struct Uninstall(String, String);
    impl Drop for Uninstall {
        fn drop(&mut self) {
            let _ = helm(&["uninstall", &self.0, "-n", &self.1]);
        }
    }
    Uninstall(release.to_owned(), namespace.to_owned())
}
