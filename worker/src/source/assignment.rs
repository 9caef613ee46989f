//! Which partitions this worker owns, and the rule that keeps a revoked partition's old work from
//! reaching OpenSearch after its new owner started.
//!
//! Why it is safe: every write or delete is made under a [`WriteGuard`], taken only for records
//! whose partition is still owned in the epoch the record was read in, and counted per partition
//! while the request is in flight. When partitions are revoked, the rebalance callback first ends
//! their epoch (no new guard can be taken for their records), then waits until the guards already
//! taken for them are released, and only then returns to librdkafka. With the cooperative
//! protocol a revoked partition is handed to its next owner only after this member finished its
//! revoke callback and rejoined, so by the time the new owner reads the partition, no request
//! from the old owner's work for it is in flight or can still start: a tombstone or a newer
//! version applied by the new owner always wins, for index writes, stale-chunk deletes and
//! tombstone deletes alike. Work that was queued is dropped unwritten (it is not committed; the new
//! owner reads it again). The wait is bounded by the drain time; a request still in flight then
//! is logged, as it has outlived its own timeout.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::offsets::{Epoch, OffsetTracker, Partition};

#[derive(Debug, Default)]
struct State {
    tracker: OffsetTracker,
    /// Guards in flight, per partition.
    writes: HashMap<Partition, usize>,
    /// Partitions being revoked: their records may no longer be written, but their writes in
    /// flight still finish and count for the last commit.
    closing: HashSet<Partition>,
}

impl State {
    fn owns(&self, owner: &Owner) -> bool {
        !self.closing.contains(&owner.partition)
            && self.tracker.epoch(&owner.partition) == Some(owner.epoch)
    }
}

/// The partitions owned, their offsets and their writes in flight.
#[derive(Debug, Default)]
pub struct Assignment {
    state: Mutex<State>,
    released: Condvar,
}

/// Where a record came from: its partition, the epoch it was read in, its offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The partition.
    pub partition: Partition,
    /// The assignment it was read in.
    pub epoch: Epoch,
    /// Its offset.
    pub offset: i64,
}

/// Writes in flight for some partitions; dropping it releases them.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    assignment: &'a Assignment,
    partitions: Vec<Partition>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.assignment.lock();
        for p in &self.partitions {
            if let Some(n) = state.writes.get_mut(p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.writes.remove(p);
                }
            }
        }
        drop(state);
        self.assignment.released.notify_all();
    }
}

impl Assignment {
    /// Nothing assigned yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions were assigned: each starts a new epoch.
    pub fn assign(&self, partitions: &[Partition]) {
        let mut state = self.lock();
        for p in partitions {
            state.tracker.assign(p);
        }
    }

    /// The current epoch of a partition, if this worker owns it.
    pub fn epoch(&self, partition: &Partition) -> Option<Epoch> {
        let state = self.lock();
        if state.closing.contains(partition) {
            return None;
        }
        state.tracker.epoch(partition)
    }

    /// True while the record's partition is owned in the epoch it was read in.
    pub fn owns(&self, owner: &Owner) -> bool {
        self.lock().owns(owner)
    }

    /// Registers a record read now; false when its partition is no longer owned in that epoch.
    pub fn start(&self, owner: &Owner, open: bool) -> bool {
        self.lock()
            .tracker
            .start(&owner.partition, owner.epoch, owner.offset, open)
    }

    /// A record is done (ignored when its epoch is over).
    pub fn finish(&self, owner: &Owner) {
        self.lock()
            .tracker
            .finish(&owner.partition, owner.epoch, owner.offset);
    }

    /// The offsets to commit now (see [`OffsetTracker::committable`]), optionally only of some
    /// partitions, and the number of records in flight.
    pub fn committable(&self, only: Option<&[Partition]>) -> (Vec<(Partition, i64)>, usize) {
        let state = self.lock();
        let mut offsets = state.tracker.committable();
        if let Some(only) = only {
            offsets.retain(|(p, _)| only.contains(p));
        }
        (offsets, state.tracker.open_records())
    }

    /// The broker acknowledged these commits.
    pub fn committed(&self, offsets: &[(Partition, i64)]) {
        self.lock().tracker.committed(offsets);
    }

    /// Takes a write guard for the records of `owners` that are still owned in their epoch.
    /// Returns the guard and, per owner, whether it may be written.
    pub fn begin_write<'a, 'o>(
        &'a self,
        owners: impl IntoIterator<Item = &'o Owner>,
    ) -> (WriteGuard<'a>, Vec<bool>) {
        let mut state = self.lock();
        let mut allowed = Vec::new();
        let mut partitions: Vec<Partition> = Vec::new();
        for owner in owners {
            let owned = state.owns(owner);
            allowed.push(owned);
            if owned && !partitions.contains(&owner.partition) {
                partitions.push(owner.partition.clone());
            }
        }
        for p in &partitions {
            *state.writes.entry(p.clone()).or_default() += 1;
        }
        (
            WriteGuard {
                assignment: self,
                partitions,
            },
            allowed,
        )
    }

    /// Step 1 of a revoke: no record of these partitions may start a write from now on.
    pub fn close(&self, partitions: &[Partition]) {
        self.lock().closing.extend(partitions.iter().cloned());
    }

    /// Step 2 of a revoke: waits up to `limit` for the writes in flight of closed partitions
    /// (their completions still count). Returns the partitions still busy when time was up.
    pub fn wait_for_writes(&self, partitions: &[Partition], limit: Duration) -> Vec<Partition> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            let busy: Vec<Partition> = partitions
                .iter()
                .filter(|p| state.writes.contains_key(*p))
                .cloned()
                .collect();
            let now = Instant::now();
            if busy.is_empty() || now >= deadline {
                return busy;
            }
            state = self
                .released
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Step 3 of a revoke, after the last commit: forgets the partitions.
    pub fn forget(&self, partitions: &[Partition]) {
        let mut state = self.lock();
        state.tracker.revoke(partitions);
        for p in partitions {
            state.closing.remove(p);
        }
    }

    /// All three steps at once, without a commit.
    #[cfg(test)]
    pub fn revoke(&self, partitions: &[Partition], limit: Duration) -> Vec<Partition> {
        self.close(partitions);
        let busy = self.wait_for_writes(partitions, limit);
        self.forget(partitions);
        busy
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_owned(), n)
    }

    fn owner(a: &Assignment, n: i32, offset: i64) -> Owner {
        Owner {
            partition: p(n),
            epoch: a.epoch(&p(n)).unwrap(),
            offset,
        }
    }

    #[test]
    fn records_of_a_revoked_partition_are_never_written() {
        let a = Assignment::new();
        a.assign(&[p(0), p(1)]);
        let (r0, r1) = (owner(&a, 0, 5), owner(&a, 1, 5));
        assert!(a.revoke(&[p(0)], Duration::ZERO).is_empty());
        let (_guard, allowed) = a.begin_write([&r0, &r1]);
        assert_eq!(allowed, [false, true]);
        // Re-assigned: the old record still may not be written; one read again may.
        a.assign(&[p(0)]);
        let again = owner(&a, 0, 5);
        let (_guard, allowed) = a.begin_write([&r0, &again]);
        assert_eq!(allowed, [false, true]);
    }

    #[test]
    fn a_revoke_waits_for_the_writes_in_flight_and_no_longer() {
        let a = Arc::new(Assignment::new());
        a.assign(&[p(0), p(1)]);
        let (r0, r1) = (owner(&a, 0, 1), owner(&a, 1, 1));
        let writing = Arc::new(std::sync::Barrier::new(2));
        let writer = {
            let (a, writing) = (a.clone(), writing.clone());
            std::thread::spawn(move || {
                let (guard, allowed) = a.begin_write([&r0]);
                assert_eq!(allowed, [true]);
                writing.wait();
                std::thread::sleep(Duration::from_millis(300));
                drop(guard);
            })
        };
        writing.wait();
        // Another partition's write does not hold the revoke up.
        let (_other, _) = a.begin_write([&r1]);
        let started = Instant::now();
        let busy = a.revoke(&[p(0)], Duration::from_secs(10));
        let waited = started.elapsed();
        assert!(busy.is_empty(), "{busy:?}");
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        writer.join().unwrap();
    }

    #[test]
    fn a_revoke_gives_up_after_its_limit_and_names_the_busy_partitions() {
        let a = Assignment::new();
        a.assign(&[p(0)]);
        let r0 = owner(&a, 0, 1);
        let (_stuck, _) = a.begin_write([&r0]);
        assert_eq!(a.revoke(&[p(0)], Duration::from_millis(50)), [p(0)]);
    }
}
