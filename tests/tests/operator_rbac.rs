//! The operator works with exactly the RBAC in operator/rbac/clusterrole.yaml (run as a
//! ServiceAccount bound to it, by impersonation) and fails visibly without it.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;
use vectorpipe_tests::k8s::{self, kubectl};
use vectorpipe_tests::operator::Operator;
use vectorpipe_tests::{eventually, repo_root, unique_name};

fn bind(service_account_ns: &str, service_account: &str, role: &str) -> Result<()> {
    kubectl(&[
        "create",
        "serviceaccount",
        service_account,
        "-n",
        service_account_ns,
    ])?;
    kubectl(&[
        "create",
        "clusterrolebinding",
        &unique_name(service_account),
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={service_account_ns}:{service_account}"),
    ])?;
    Ok(())
}

/// Applies operator/rbac/leader-election.yaml in `namespace`, binding its Role to a
/// ServiceAccount there (the RoleBinding renamed after the account, so several can be bound).
fn bind_leader_election(
    namespace: &str,
    service_account: &str,
    dir: &std::path::Path,
) -> Result<()> {
    let file = std::fs::read_to_string(repo_root().join("operator/rbac/leader-election.yaml"))?;
    let (role, binding) = file
        .split_once("\n---\n")
        .context("leader-election.yaml holds a Role and a RoleBinding")?;
    let binding = binding
        .replacen(
            "name: vectorpipe-operator-leader-election",
            &format!("name: {service_account}-leader-election"),
            1,
        )
        .replace(
            "    name: vectorpipe-operator\n    namespace: vectorpipe-system",
            &format!("    name: {service_account}\n    namespace: {namespace}"),
        );
    let path = dir.join(format!("{service_account}-leader-election.yaml"));
    std::fs::write(&path, format!("{role}\n---\n{binding}"))?;
    kubectl(&["apply", "-n", namespace, "-f", &path.to_string_lossy()])?;
    Ok(())
}

/// `kubectl auth can-i` as a user.
fn can_i(user: &str, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--as", user]);
    kubectl(&all).is_ok_and(|out| out.trim() == "yes")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_declared_rbac_is_enough_and_less_is_visible() -> Result<()> {
    k8s::install_crds()?;
    let system = k8s::namespace("vp-system")?;
    let dir = std::env::temp_dir().join(&system.name);
    std::fs::create_dir_all(&dir)?;
    let rbac = repo_root().join("operator/rbac/clusterrole.yaml");
    kubectl(&["apply", "-f", &rbac.to_string_lossy()])?;
    bind(&system.name, "vectorpipe-operator", "vectorpipe-operator")?;
    bind_leader_election(&system.name, "vectorpipe-operator", &dir)?;
    let user = format!("system:serviceaccount:{}:vectorpipe-operator", system.name);
    // Leases only in its own namespace: never another component's (kube-system's included).
    assert!(can_i(&user, &["update", "leases", "-n", &system.name]));
    assert!(
        !can_i(&user, &["update", "leases", "-n", "kube-system"]),
        "the operator's account must not write Leases outside its namespace"
    );
    let kubeconfig = k8s::impersonating_kubeconfig(&user, &dir.join("operator.kubeconfig"))?;
    // The impersonated identity really is limited: it may not list Secrets.
    let denied = kubectl(&[
        "--kubeconfig",
        &kubeconfig.to_string_lossy(),
        "get",
        "secrets",
        "-A",
    ]);
    assert!(
        denied.is_err(),
        "the operator's account must not list secrets"
    );

    let client = k8s::client().await?;
    {
        let operator = Operator::start_in(
            &dir.join("operator.log"),
            &kubeconfig,
            &system.name,
            &unique_name("rbac-lease"),
        )?;
        let ns = k8s::namespace("rbac-ok")?;
        let example = repo_root().join("examples/pipelines/minimal.yaml");
        kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
        let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &ns.name);
        k8s::wait_ready(&pipelines, "posts", "Ready with the declared RBAC").await?;
        // The scaling controller too: a policy with unreadable metrics sets its fallback count
        // through the scale subresource, writes both statuses and publishes events.
        k8s::create_fallback_policy(&client, &ns.name).await?;
        eventually(
            "2 workers set by the scaling controller",
            Duration::from_secs(150),
            || async {
                let ep = pipelines.get("posts").await?;
                Ok((ep.spec.workers.replicas == 2
                    && ep.status.and_then(|s| s.last_scale_time).is_some())
                .then_some(()))
            },
        )
        .await?;
        assert!(
            !operator.log_text().contains("forbidden: User"),
            "{}",
            operator.log_text()
        );
        operator.kill()?;
    }

    // A role without Deployments: the operator cannot create workers, and says so.
    let crippled = std::fs::read_to_string(&rbac)?
        .replace(
            "name: vectorpipe-operator\n",
            "name: vectorpipe-operator-no-deployments\n",
        )
        .replace(
            "resources: [\"deployments\"]",
            "resources: [\"replicasets\"]",
        );
    let crippled_path = dir.join("crippled.yaml");
    std::fs::write(&crippled_path, crippled)?;
    kubectl(&["apply", "-f", &crippled_path.to_string_lossy()])?;
    bind(
        &system.name,
        "crippled",
        "vectorpipe-operator-no-deployments",
    )?;
    bind_leader_election(&system.name, "crippled", &dir)?;
    let user = format!("system:serviceaccount:{}:crippled", system.name);
    let kubeconfig = k8s::impersonating_kubeconfig(&user, &dir.join("crippled.kubeconfig"))?;
    let operator = Operator::start_in(
        &dir.join("crippled.log"),
        &kubeconfig,
        &system.name,
        &unique_name("rbac-lease"),
    )?;
    let ns = k8s::namespace("rbac-denied")?;
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
    eventually(
        "the operator reporting the missing permission",
        Duration::from_secs(60),
        || async {
            let log = operator.log_text();
            let metrics = operator.metrics_text().await.unwrap_or_default();
            // The Deployment is read first (the dereference step) and that is refused.
            let counted = metrics.lines().any(|line| {
                line.starts_with("vectorpipe_operator_reconcile_errors_total{")
                    && line.contains("controller=\"embeddingpipeline\"")
                    && line.contains("step=\"dereference\"")
                    && line.contains("kind=\"kubernetes-api\"")
                    // The series exists at 0 from the start: it must have counted.
                    && line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
            });
            Ok((log.contains("forbidden: User")
                && log.contains("reading the Deployment")
                && counted)
                .then_some(()))
        },
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(deployments.get_opt("posts-worker").await?.is_none());
    Ok(())
}

/// With `--watch-namespaces` (the chart's `watchNamespaces`) the operator needs the same rules
/// only as a Role in each watched namespace: it may read no Secret elsewhere, and it runs the
/// pipelines there with nothing cluster-wide.
#[tokio::test(flavor = "multi_thread")]
async fn a_namespaced_operator_needs_a_role_only_in_each_watched_namespace() -> Result<()> {
    k8s::install_crds()?;
    let system = k8s::namespace("vp-scoped")?;
    let watched = k8s::namespace("scoped-in")?;
    let other = k8s::namespace("scoped-out")?;
    let dir = std::env::temp_dir().join(&system.name);
    std::fs::create_dir_all(&dir)?;
    // operator/rbac/clusterrole.yaml's rules as a Role in the watched namespace, as the chart
    // renders them for watchNamespaces.
    let rules = std::fs::read_to_string(repo_root().join("operator/rbac/clusterrole.yaml"))?;
    let role = rules
        .replacen("kind: ClusterRole\n", "kind: Role\n", 1)
        .replacen(
            "  name: vectorpipe-operator\n",
            &format!(
                "  name: vectorpipe-operator\n  namespace: {}\n",
                watched.name
            ),
            1,
        );
    let role_path = dir.join("role.yaml");
    std::fs::write(&role_path, role)?;
    kubectl(&["apply", "-f", &role_path.to_string_lossy()])?;
    kubectl(&[
        "create",
        "serviceaccount",
        "vectorpipe-operator",
        "-n",
        &system.name,
    ])?;
    kubectl(&[
        "create",
        "rolebinding",
        "vectorpipe-operator",
        "-n",
        &watched.name,
        "--role=vectorpipe-operator",
        &format!("--serviceaccount={}:vectorpipe-operator", system.name),
    ])?;
    bind_leader_election(&system.name, "vectorpipe-operator", &dir)?;
    let user = format!("system:serviceaccount:{}:vectorpipe-operator", system.name);
    assert!(can_i(&user, &["get", "secrets", "-n", &watched.name]));
    for namespace in ["kube-system", other.name.as_str(), system.name.as_str()] {
        assert!(
            !can_i(&user, &["get", "secrets", "-n", namespace]),
            "a namespaced operator must not read Secrets in {namespace}"
        );
    }
    assert!(!can_i(
        &user,
        &[
            "list",
            "embeddingpipelines.vectorpipe.io",
            "--all-namespaces"
        ]
    ));

    let kubeconfig = k8s::impersonating_kubeconfig(&user, &dir.join("scoped.kubeconfig"))?;
    let operator = Operator::start_watching(
        &dir.join("operator.log"),
        &kubeconfig,
        &system.name,
        &unique_name("scoped-lease"),
        &[&watched.name],
    )?;
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    for ns in [&watched.name, &other.name] {
        kubectl(&["apply", "-n", ns, "-f", &example.to_string_lossy()])?;
    }
    let client = k8s::client().await?;
    let pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &watched.name);
    k8s::wait_ready(
        &pipelines,
        "posts",
        "Ready with a Role in its namespace only",
    )
    .await?;
    let log = operator.log_text();
    assert!(!log.contains("forbidden"), "{log}");
    assert!(
        log.contains("watching only these namespaces"),
        "the operator must say what it watches: {log}"
    );
    // Other operators of the suite may run the other namespace; this one never looked at it.
    assert!(
        !log.contains(&other.name),
        "a namespaced operator reconciled a namespace it does not watch: {log}"
    );
    operator.kill()?;
    Ok(())
}
