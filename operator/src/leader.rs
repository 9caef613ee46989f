//! Leader election on a coordination.k8s.io Lease: only the holder runs the controllers, so two
//! operator replicas never both write.
//!
//! Holding the Lease is not enough on its own: a leader that was paused (SIGSTOP, a long GC-like
//! stall, a frozen VM) wakes up still believing it leads, while another replica has taken over.
//! So every write of the controllers passes a [`Fence`]: a deadline, by this process's own clock,
//! of `renewTime + LEASE_SECONDS - FENCE_MARGIN` of the last renewal it saw in the Lease. Past it,
//! the client refuses to send anything but reads, and the process exits to restart as a follower.
//! The other replica may take the Lease only after `renewTime + LEASE_SECONDS`, so the old leader
//! has stopped writing before the new one starts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::LeaseManagerBuilder;

use crate::labels::FIELD_MANAGER;

/// Seconds a Lease stays held without renewal.
const LEASE_SECONDS: u64 = 30;
/// Seconds before expiry when the holder renews (so it renews 10 s after the last renewal, and
/// a renewal may take up to 18 s on a loaded apiserver before the fence closes).
const GRACE_SECONDS: u64 = 20;
/// The fence closes this long before the Lease expires.
const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// How often the holder reads its Lease to move the fence.
const OBSERVE_EVERY: Duration = Duration::from_millis(500);

/// Where the Lease lives.
#[derive(Clone, Debug)]
pub struct Election {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The deadline after which this process may not write. Shared by the client middleware and
/// the election.
#[derive(Clone, Debug)]
pub struct Fence(Arc<AtomicI64>);

/// The error of a write refused by the fence.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused a {method} {path}: this operator is not, or no longer surely, the leader (its Lease was not renewed in time by its own clock)"
)]
pub struct Fenced {
    method: http::Method,
    path: String,
}

impl Fence {
    /// A fence that never closes (leader election turned off).
    pub fn open() -> Self {
        Self(Arc::new(AtomicI64::new(i64::MAX)))
    }

    /// A fence that is closed until a renewal is seen.
    pub fn closed() -> Self {
        Self(Arc::new(AtomicI64::new(0)))
    }

    /// Opens the fence until `deadline` (never moves it back).
    pub fn extend_to(&self, deadline: SystemTime) {
        self.0.fetch_max(millis(deadline), Ordering::SeqCst);
    }

    /// Closes the fence at once (the Lease is held by another replica).
    pub fn close(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// Whether writes may go out now.
    pub fn is_open(&self) -> bool {
        self.is_open_at(SystemTime::now())
    }

    fn is_open_at(&self, now: SystemTime) -> bool {
        millis(now) < self.0.load(Ordering::SeqCst)
    }

    /// Lets `request` through if it only reads, or while the fence is open.
    pub fn check<B>(&self, request: http::Request<B>) -> Result<http::Request<B>, Fenced> {
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if reads || self.is_open() {
            Ok(request)
        } else {
            Err(Fenced {
                method: request.method().clone(),
                path: request.uri().path().to_owned(),
            })
        }
    }

    /// A kube client whose writes pass this fence.
    pub fn client(&self, config: kube::Config) -> anyhow::Result<kube::Client> {
        let fence = self.clone();
        let layer =
            tower::filter::FilterLayer::new(move |request: http::Request<kube::client::Body>| {
                fence.check(request)
            });
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&layer)
            .build())
    }
}

/// This replica's identity in the Lease: the pod name in a cluster, else host and process.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        format!("{host}-{}", std::process::id())
    })
}

/// The fence deadline a Lease gives `identity`, if it holds it.
fn deadline(lease: &Lease, identity: &str) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed: SystemTime = spec.renew_time.as_ref()?.0.into();
    let held =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    Some(renewed + held.saturating_sub(FENCE_MARGIN))
}

/// Reads the Lease and moves the fence; returns whether it still holds it. A Lease held by
/// another identity closes the fence at once, whatever the deadline said.
async fn observe(leases: &Api<Lease>, name: &str, identity: &str, fence: &Fence) -> bool {
    match leases.get_opt(name).await {
        Ok(Some(lease)) => match deadline(&lease, identity) {
            Some(until) => {
                fence.extend_to(until);
                true
            }
            None => {
                fence.close();
                false
            }
        },
        Ok(None) => {
            fence.close();
            false
        }
        // Unknown: the fence closes by itself if this lasts.
        Err(e) => {
            tracing::debug!(error = %e, "reading the leader Lease failed");
            true
        }
    }
}

/// Waits for the Lease, runs `work` while holding it, and returns when `work` ends. Losing the
/// Lease, or passing the fence deadline, is an error: the process exits and restarts as a
/// follower rather than risk two writers. `client` must not pass through `fence`.
pub async fn run_as_leader(
    client: kube::Client,
    election: Election,
    fence: Fence,
    work: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let identity = identity();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
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
    // Open the fence from the Lease the election just wrote before any controller runs.
    let opened = async {
        while !(observe(&leases, &election.name, &identity, &fence).await && fence.is_open()) {
            tokio::time::sleep(OBSERVE_EVERY).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(LEASE_SECONDS), opened)
        .await
        .is_err()
    {
        anyhow::bail!(
            "became the leader but could not read the Lease {}/{} back; exiting",
            election.namespace,
            election.name
        );
    }
    tracing::info!(%identity, "became the leader; starting the controllers");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return format!(
                    "lost the leader Lease {}/{}",
                    election.namespace, election.name
                );
            }
        }
    };
    let fenced = async {
        loop {
            tokio::time::sleep(OBSERVE_EVERY).await;
            // The clock first: after a pause the deadline may be long gone.
            if !fence.is_open() {
                return format!(
                    "the leader Lease {}/{} was not renewed before its deadline by this process's clock",
                    election.namespace, election.name
                );
            }
            if !observe(&leases, &election.name, &identity, &fence).await {
                return format!(
                    "the leader Lease {}/{} is held by another replica",
                    election.namespace, election.name
                );
            }
        }
    };
    let outcome = tokio::select! {
        () = work => Ok(()),
        why = lost => Err(anyhow::anyhow!("{why}; exiting so that one leader acts")),
        why = fenced => Err(anyhow::anyhow!("{why}; refusing every write and exiting so that one leader acts")),
    };
    // Closing the channel releases the Lease (if still ours), so a follower takes over at once.
    drop(leading);
    if let Ok(Err(e)) = task.await {
        tracing::warn!(error = %e, "releasing the Lease failed; it expires by itself");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_stop_at_the_deadline_and_reads_go_on() {
        let fence = Fence::closed();
        let request = |method: http::Method| {
            http::Request::builder()
                .method(method)
                .uri("/apis/apps/v1/namespaces/data/deployments/posts-worker")
                .body(())
                .unwrap()
        };
        assert!(fence.check(request(http::Method::GET)).is_ok());
        let refused = fence.check(request(http::Method::PATCH)).unwrap_err();
        assert!(
            refused.to_string().contains("PATCH /apis/apps/v1"),
            "{refused}"
        );
        let now = SystemTime::now();
        fence.extend_to(now + Duration::from_secs(10));
        assert!(fence.check(request(http::Method::PATCH)).is_ok());
        assert!(fence.check(request(http::Method::DELETE)).is_ok());
        // An older renewal never moves the deadline back.
        fence.extend_to(now);
        assert!(fence.is_open_at(now + Duration::from_secs(9)));
        assert!(!fence.is_open_at(now + Duration::from_secs(10)));
        assert!(Fence::open().is_open_at(now + Duration::from_secs(1_000_000)));
    }

    #[test]
    fn the_deadline_comes_from_the_holders_last_renewal() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "vectorpipe-operator"},
            "spec": {"holderIdentity": "op-0", "leaseDurationSeconds": 15,
                     "renewTime": "2027-01-15T08:00:00.000000Z"}
        }))
        .unwrap();
        let renewed: SystemTime = "2027-01-15T08:00:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .into();
        assert_eq!(
            deadline(&lease, "op-0"),
            Some(renewed + Duration::from_secs(13))
        );
        assert_eq!(deadline(&lease, "op-1"), None, "held by another replica");
    }
}
