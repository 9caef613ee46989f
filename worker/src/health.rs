//! What `/readyz` and `/healthz` report.
//!
//! Ready: the consumer joined its group and no fault holds the records. A fault that a retry
//! cannot fix by itself soon (an index write block, a refused credential, a model that refuses
//! every record, a dead-letter topic that takes nothing) *holds*: the records wait, nothing after
//! them is committed, the worker turns not ready and says what to fix, and the hold clears by
//! itself once a write or call gets through again.
//!
//! Live: unless records wait, no hold explains it, and nothing has progressed for the stall
//! timeout (a hung connection or a bug; a restart is the fix for those, not for a held fault,
//! where it would only move the partitions to workers that meet the same fault).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// A fault that holds the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// OpenSearch refuses writes for a reason the documents cannot fix (a write block, missing
    /// permissions, a missing index, a refused request).
    OpenSearch,
    /// The embedding model refuses or cannot be called (credentials, a model that refuses every
    /// record, an outage that outlasted the retries).
    Embedding,
    /// The dead-letter topic takes nothing.
    DeadLetters,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Self; 3] = [Self::OpenSearch, Self::Embedding, Self::DeadLetters];

    /// The `fault` label and the name in `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenSearch => "opensearch",
            Self::Embedding => "embedding",
            Self::DeadLetters => "dead-letters",
        }
    }
}

/// The worker's readiness and liveness.
pub struct Health {
    /// The consumer joined its group (cleared while stopping).
    pub joined: AtomicBool,
    holds: Mutex<BTreeMap<Fault, String>>,
    /// Milliseconds since `started` of the last progress.
    progress: AtomicU64,
    /// Records read and not finished.
    waiting: AtomicU64,
    started: Instant,
    stall_after: Duration,
    metrics: Arc<Metrics>,
}

impl Health {
    /// Not joined, nothing held; `/healthz` fails after `stall_after` without progress while
    /// records wait.
    pub fn new(metrics: Arc<Metrics>, stall_after: Duration) -> Self {
        for fault in Fault::ALL {
            metrics.held(fault.as_str()).set(0);
        }
        Self {
            joined: AtomicBool::new(false),
            holds: Mutex::new(BTreeMap::new()),
            progress: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            started: Instant::now(),
            stall_after,
            metrics,
        }
    }

    /// `fault` holds the records; `what` says what is wrong and what to fix. Logged when the
    /// hold starts or its reason changes.
    pub fn hold(&self, fault: Fault, what: &str) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        let changed = holds.get(&fault).is_none_or(|old| old != what);
        if !holds.contains_key(&fault) {
            self.metrics.holds(fault.as_str()).inc();
            self.metrics.held(fault.as_str()).set(1);
        }
        holds.insert(fault, what.to_owned());
        drop(holds);
        if changed {
            tracing::error!(
                fault = fault.as_str(),
                error = what,
                "holding the records (nothing after them is committed) until this is fixed; not ready meanwhile"
            );
        }
    }

    /// `fault` no longer holds the records.
    pub fn clear(&self, fault: Fault) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if holds.remove(&fault).is_some() {
            drop(holds);
            self.metrics.held(fault.as_str()).set(0);
            tracing::info!(
                fault = fault.as_str(),
                "the fault cleared; the held records go on"
            );
        }
    }

    /// Something was written, deleted, dead-lettered or committed.
    pub fn progressed(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.progress.fetch_max(now, Ordering::Relaxed);
    }

    /// Records read and not finished, as the committer counted them.
    pub fn set_waiting(&self, records: u64) {
        if records == 0 {
            // Nothing waits: the stall clock starts when something does.
            self.progressed();
        }
        self.waiting.store(records, Ordering::Relaxed);
    }

    /// `None` when ready; otherwise why not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.joined.load(Ordering::SeqCst) {
            return Some(
                "the consumer has not joined its group yet (or the worker is stopping)".into(),
            );
        }
        let holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        if holds.is_empty() {
            return None;
        }
        Some(
            holds
                .iter()
                .map(|(fault, what)| format!("{}: {what}", fault.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    /// `None` when live; otherwise why not.
    pub fn stalled(&self) -> Option<String> {
        let waiting = self.waiting.load(Ordering::Relaxed);
        if waiting == 0
            || !self
                .holds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            return None;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let idle = Duration::from_millis(now.saturating_sub(self.progress.load(Ordering::Relaxed)));
        (idle > self.stall_after).then(|| {
            format!(
                "{waiting} records wait and nothing was written, dead-lettered or committed for {}s (the stall timeout is {}s)",
                idle.as_secs(),
                self.stall_after.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(stall: Duration) -> Health {
        let (metrics, _) = Metrics::new("p");
        Health::new(Arc::new(metrics), stall)
    }

    #[test]
    fn ready_once_joined_and_while_nothing_holds() {
        let h = health(Duration::from_secs(60));
        assert!(h.not_ready().is_some());
        h.joined.store(true, Ordering::SeqCst);
        assert_eq!(h.not_ready(), None);
        h.hold(Fault::OpenSearch, "the index has a write block");
        h.hold(Fault::Embedding, "the model refuses every record");
        let why = h.not_ready().unwrap();
        assert!(
            why.contains("opensearch: the index has a write block"),
            "{why}"
        );
        assert!(why.contains("embedding: the model"), "{why}");
        h.clear(Fault::OpenSearch);
        h.clear(Fault::Embedding);
        assert_eq!(h.not_ready(), None);
    }

    #[test]
    fn stalled_only_when_records_wait_without_progress_and_no_hold_explains_it() {
        let h = health(Duration::from_millis(30));
        h.set_waiting(5);
        assert_eq!(h.stalled(), None, "progress at start");
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.stalled().unwrap().contains("5 records wait"));
        h.hold(Fault::OpenSearch, "blocked");
        assert_eq!(h.stalled(), None, "a held fault is not a stall");
        h.clear(Fault::OpenSearch);
        h.progressed();
        assert_eq!(h.stalled(), None);
        std::thread::sleep(Duration::from_millis(60));
        h.set_waiting(0);
        assert_eq!(h.stalled(), None, "nothing waits");
    }
}
