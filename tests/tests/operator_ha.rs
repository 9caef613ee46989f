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
    // Both watch only this test's namespace: the other test of this file needs namespaces that
    // only its own operator watches.
    let start = |name: &str| {
        Operator::start_watching(
            &dir.join(format!("{name}.log")),
            &kubeconfig,
            "default",
            &lease,
            &[&ns.name],
        )
    };
    let (mut a, mut b) = (start("a")?, start("b")?);

    // The leader is the one that opened its fence and started its controllers.
    let leads = |o: &Operator| {
        o.log_text()
            .contains("became the leader; starting the controllers")
    };
    // Two operators started at once can both be told by the election that they lead; the one
    // whose Lease write lost never opens its fence, exits before acting, and on a cluster is
    // restarted by the kubelet. The test restarts it the same way.
    let waiting = std::time::Instant::now();
    let mut restarts = 0;
    let a_leads = loop {
        for (operator, name) in [(&mut a, "a"), (&mut b, "b")] {
            if operator.exited()? {
                restarts += 1;
                *operator = start(&format!("{name}-restart-{restarts}"))?;
            }
        }
        match (leads(&a), leads(&b)) {
            (true, false) => break true,
            (false, true) => break false,
            _ => {}
        }
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(60),
            "not exactly one leader within 60 s:\na:\n{}\nb:\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (leader, mut follower) = if a_leads { (a, b) } else { (b, a) };

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
    // A follower that lost the start-up race may still be on its way out: restart it too.
    let waiting = std::time::Instant::now();
    while deployments.get("posts-worker").await?.spec.replicas != Some(2) {
        if follower.exited()? {
            restarts += 1;
            follower = start(&format!("follower-restart-{restarts}"))?;
        }
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(90),
            "the follower did not apply the change within 90 s:\n{}",
            follower.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(leads(&follower), "{}", follower.log_text());

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

/// A leader that is paused past its Lease (SIGSTOP, as a frozen node or a long stall would) and
/// then resumes must not act once another replica has taken over: its writes stop at its own
/// fence deadline, and it exits. Pipelines created meanwhile in a namespace that only the paused
/// leader watches show it: any object there after the resume was written by the old leader.
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_never_acts_after_the_takeover() -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    k8s::install_crds()?;
    let shared = k8s::namespace("fence-both")?;
    let only_a = k8s::namespace("fence-a")?;
    let dir = std::env::temp_dir().join(&shared.name);
    std::fs::create_dir_all(&dir)?;
    let lease = unique_name("fence-lease");
    let kubeconfig = k8s::kubeconfig()?;
    let mut a = Operator::start_watching(
        &dir.join("a.log"),
        &kubeconfig,
        "default",
        &lease,
        &[&shared.name, &only_a.name],
    )?;
    eventually("a leading", Duration::from_secs(60), || async {
        Ok(a.log_text().contains("became the leader").then_some(()))
    })
    .await?;
    let b = Operator::start_watching(
        &dir.join("b.log"),
        &kubeconfig,
        "default",
        &lease,
        &[&shared.name],
    )?;
    let client = k8s::client().await?;
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&[
        "apply",
        "-n",
        &shared.name,
        "-f",
        &example.to_string_lossy(),
    ])?;
    let shared_deployments: Api<Deployment> = Api::namespaced(client.clone(), &shared.name);
    eventually("a's Deployment", Duration::from_secs(60), || async {
        Ok(shared_deployments.get_opt("posts-worker").await?)
    })
    .await?;

    // Pause a past its Lease; b takes over.
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &a.pid().to_string()])
        .status()?;
    anyhow::ensure!(stop.success(), "kill -STOP failed");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let b_identity = format!("-{}", b.pid());
    let took_over = eventually("b holding the Lease", Duration::from_secs(90), || async {
        let holder = leases
            .get_opt(&lease)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        Ok(holder.ends_with(&b_identity).then_some(()))
    })
    .await;
    if took_over.is_err() {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &a.pid().to_string()])
            .status();
    }
    took_over?;
    // Work that only a could do, waiting in its watch streams.
    let text = std::fs::read_to_string(&example)?;
    let base: serde_json::Value = serde_yaml::from_str(&text)?;
    let only_a_pipelines: Api<EmbeddingPipeline> = Api::namespaced(client.clone(), &only_a.name);
    for i in 0..5 {
        let mut value = base.clone();
        value["metadata"]["name"] = json!(format!("posts-{i}"));
        value["spec"]["sink"]["opensearch"]["endpoints"] =
            json!([vectorpipe_tests::opensearch::url()?]);
        only_a_pipelines
            .create(&Default::default(), &serde_json::from_value(value)?)
            .await?;
    }
    // b acts meanwhile on what it watches.
    Api::<EmbeddingPipeline>::namespaced(client.clone(), &shared.name)
        .patch(
            "posts",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 2}}})),
        )
        .await?;
    eventually("b applying the change", Duration::from_secs(60), || async {
        Ok((shared_deployments.get("posts-worker").await?.spec.replicas == Some(2)).then_some(()))
    })
    .await?;

    let resume = std::process::Command::new("kill")
        .args(["-CONT", &a.pid().to_string()])
        .status()?;
    anyhow::ensure!(resume.success(), "kill -CONT failed");
    let exit = a.wait_exit(Duration::from_secs(30))?;
    let log = a.log_text();
    assert!(
        exit.is_some_and(|status| !status.success()),
        "the old leader must exit after losing the Lease ({exit:?}):\n{log}"
    );
    // Whatever a did after the resume never reached the apiserver.
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=vectorpipe-operator");
    let written = Api::<ConfigMap>::namespaced(client.clone(), &only_a.name)
        .list(&selector)
        .await?
        .items
        .len()
        + Api::<Deployment>::namespaced(client.clone(), &only_a.name)
            .list(&selector)
            .await?
            .items
            .len();
    let statuses = only_a_pipelines
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|p| p.status.is_some())
        .count();
    assert_eq!(
        (written, statuses),
        (0, 0),
        "the paused leader wrote after another replica took over:\n{log}"
    );
    drop(b);
    Ok(())
}

/// A leader whose Lease another replica took (as one does when it judged the Lease expired)
/// stops writing as soon as it sees the Lease, not only at its next renewal: the Lease is taken
/// right after a renewal, so the next renewal is seconds away, and a pipeline created a little
/// later in a namespace only this leader watches must stay untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_lease_was_taken_stops_writing_at_once() -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    k8s::install_crds()?;
    let ns = k8s::namespace("fence-taken")?;
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir)?;
    let lease = unique_name("taken-lease");
    let mut a = Operator::start_watching(
        &dir.join("a.log"),
        &k8s::kubeconfig()?,
        "default",
        &lease,
        &[&ns.name],
    )?;
    eventually("a leading", Duration::from_secs(60), || async {
        Ok(a.log_text().contains("became the leader").then_some(()))
    })
    .await?;
    let client = k8s::client().await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let renewed = |l: Option<Lease>| l.and_then(|l| l.spec).and_then(|s| s.renew_time);
    let first = renewed(leases.get_opt(&lease).await?);
    eventually("a renewal", Duration::from_secs(30), || async {
        let now = renewed(leases.get_opt(&lease).await?);
        Ok((now.is_some() && now != first).then_some(()))
    })
    .await?;
    let taken_at = k8s_openapi::jiff::Timestamp::now();
    leases
        .patch(
            &lease,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": "another-replica",
                "renewTime": taken_at.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            }})),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let example = repo_root().join("examples/pipelines/minimal.yaml");
    kubectl(&["apply", "-n", &ns.name, "-f", &example.to_string_lossy()])?;
    // a's next renewal is due 10 s after the last one: look before that.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=vectorpipe-operator");
    let written = Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
        .list(&selector)
        .await?
        .items
        .len();
    let log = a.log_text();
    assert_eq!(
        written, 0,
        "the old leader wrote after its Lease was taken:\n{log}"
    );
    let exit = a.wait_exit(Duration::from_secs(20))?;
    assert!(
        exit.is_some_and(|status| !status.success()),
        "the old leader must exit ({exit:?}):\n{}",
        a.log_text()
    );
    Ok(())
}
