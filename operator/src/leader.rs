//! Leader election on a coordination.k8s.io Lease: only the holder runs the controllers, so two
//! operator replicas never both write.

use std::future::Future;

use kube_lease_manager::LeaseManagerBuilder;

use crate::labels::FIELD_MANAGER;

/// Seconds a Lease stays held without renewal.
const LEASE_SECONDS: u64 = 15;
/// Seconds before expiry when the holder renews.
const GRACE_SECONDS: u64 = 5;

/// Where the Lease lives.
#[derive(Clone, Debug)]
pub struct Election {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// This replica's identity in the Lease: the pod name in a cluster, else host and process.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Waits for the Lease, runs `work` while holding it, and returns when `work` ends. Losing the
/// Lease is an error: the process exits and restarts as a follower rather than risk two writers.
pub async fn run_as_leader(
    client: kube::Client,
    election: Election,
    work: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = identity();
    let manager = LeaseManagerBuilder::new(client, &election.name)
        .with_namespace(&election.namespace)
        .with_identity(&identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    tracing::info!(lease = %election.name, namespace = %election.namespace, %identity, "waiting to become the leader");
    while !*leading.borrow_and_update() {
        leading.changed().await?;
    }
    tracing::info!(%identity, "became the leader; starting the controllers");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    let outcome = tokio::select! {
        () = work => Ok(()),
        () = lost => Err(anyhow::anyhow!("lost the leader Lease {}/{}; exiting so that one leader acts", election.namespace, election.name)),
    };
    // Closing the channel releases the Lease, so a follower takes over at once.
    drop(leading);
    if let Ok(Err(e)) = task.await {
        tracing::warn!(error = %e, "releasing the Lease failed; it expires by itself");
    }
    outcome
}
