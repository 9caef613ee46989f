//! Which offsets may be committed: per partition, everything below the lowest record still in
//! flight. A record is done when all its documents are acknowledged by OpenSearch, or it is in the
//! dead-letter topic, or it was skipped (see `pipeline::ack`).
//!
//! Every assignment of a partition gets a new epoch. A record carries the epoch it was read in,
//! and a completion from an older epoch (work that was in flight when the partition was revoked,
//! finishing after it came back) never credits the copy read again under the new one.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
pub type Partition = (String, i32);

/// One assignment of a partition to this worker.
pub type Epoch = u64;

#[derive(Debug)]
struct PartitionState {
    epoch: Epoch,
    /// Offsets of records in flight.
    open: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The offset the broker acknowledged as committed.
    committed: Option<i64>,
}

/// Tracks records from the moment they are read until they are done.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
    last_epoch: Epoch,
}

impl OffsetTracker {
    /// An empty tracker.
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new assignment of `partition`; returns its epoch.
    pub fn assign(&mut self, partition: &Partition) -> Epoch {
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        self.partitions.insert(
            partition.clone(),
            PartitionState {
                epoch,
                open: BTreeSet::new(),
                next: None,
                committed: None,
            },
        );
        epoch
    }

    /// The current epoch of `partition`, if it is assigned.
    pub fn epoch(&self, partition: &Partition) -> Option<Epoch> {
        self.partitions.get(partition).map(|s| s.epoch)
    }

    fn current(&mut self, partition: &Partition, epoch: Epoch) -> Option<&mut PartitionState> {
        self.partitions
            .get_mut(partition)
            .filter(|s| s.epoch == epoch)
    }

    /// Registers a record read in `epoch`; `open` is false for records already done (skipped).
    /// False when that assignment is over (the record must not be processed).
    pub fn start(&mut self, partition: &Partition, epoch: Epoch, offset: i64, open: bool) -> bool {
        let Some(state) = self.current(partition, epoch) else {
            return false;
        };
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if open {
            state.open.insert(offset);
        }
        true
    }

    /// Marks a record done. Completions from an earlier assignment are ignored.
    pub fn finish(&mut self, partition: &Partition, epoch: Epoch, offset: i64) {
        if let Some(state) = self.current(partition, epoch) {
            state.open.remove(&offset);
        }
    }

    fn position(state: &PartitionState) -> Option<i64> {
        state.open.first().copied().or(state.next)
    }

    /// The offset to commit for each partition whose position moved past its last acknowledged
    /// commit: the lowest open record, or one past the highest seen when nothing is open.
    /// Changes nothing: call [`Self::committed`] once the broker took the commit.
    pub fn committable(&self) -> Vec<(Partition, i64)> {
        let mut out: Vec<(Partition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(p, s)| {
                let position = Self::position(s)?;
                (s.committed != Some(position)).then(|| (p.clone(), position))
            })
            .collect();
        out.sort();
        out
    }

    /// Records that the broker acknowledged these commits.
    pub fn committed(&mut self, offsets: &[(Partition, i64)]) {
        for (partition, offset) in offsets {
            if let Some(state) = self.partitions.get_mut(partition) {
                state.committed = Some(*offset);
            }
        }
    }

    /// Forgets partitions that were taken away by a rebalance; their open records will be read
    /// again by the new owner from the last committed offset.
    pub fn revoke(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.partitions.remove(p);
        }
    }

    /// Records still in flight, all partitions.
    pub fn open_records(&self) -> usize {
        self.partitions.values().map(|s| s.open.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_owned(), n)
    }

    /// Commits what `committable` offers, as the committer does after the broker's answer.
    fn commit(t: &mut OffsetTracker) -> Vec<(Partition, i64)> {
        let offsets = t.committable();
        t.committed(&offsets);
        offsets
    }

    #[test]
    fn commits_stop_at_the_lowest_unfinished_record() {
        let mut t = OffsetTracker::new();
        let e = t.assign(&p(0));
        t.start(&p(0), e, 10, true);
        t.start(&p(0), e, 11, true);
        t.start(&p(0), e, 12, true);
        assert_eq!(commit(&mut t), [(p(0), 10)]);
        t.finish(&p(0), e, 12);
        t.finish(&p(0), e, 11);
        assert_eq!(commit(&mut t), [], "offset 10 is still open: nothing moved");
        t.finish(&p(0), e, 10);
        assert_eq!(commit(&mut t), [(p(0), 13)]);
        assert_eq!(t.open_records(), 0);
    }

    #[test]
    fn skipped_records_advance_the_position_at_once() {
        let mut t = OffsetTracker::new();
        let e = t.assign(&p(1));
        t.start(&p(1), e, 5, false);
        t.start(&p(1), e, 6, false);
        assert_eq!(commit(&mut t), [(p(1), 7)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        let (e0, e1) = (t.assign(&p(0)), t.assign(&p(1)));
        t.start(&p(0), e0, 0, true);
        t.start(&p(1), e1, 0, true);
        t.finish(&p(1), e1, 0);
        assert_eq!(commit(&mut t), [(p(0), 0), (p(1), 1)]);
    }

    #[test]
    fn revoked_partitions_are_forgotten_and_late_completions_ignored() {
        let mut t = OffsetTracker::new();
        let e = t.assign(&p(0));
        t.start(&p(0), e, 3, true);
        t.revoke(&[p(0)]);
        t.finish(&p(0), e, 3);
        assert_eq!(t.committable(), []);
        assert!(
            !t.start(&p(0), e, 4, true),
            "a revoked epoch takes no records"
        );
    }

    #[test]
    fn work_from_before_a_revoke_never_credits_the_copy_read_again() {
        // Record 10 was in flight when partition 0 was revoked, then the partition came back
        // and record 10 was read again: the old copy finishing must not let 11 be committed.
        let mut t = OffsetTracker::new();
        let old = t.assign(&p(0));
        t.start(&p(0), old, 10, true);
        t.revoke(&[p(0)]);
        let new = t.assign(&p(0));
        assert_ne!(old, new);
        t.start(&p(0), new, 10, true);
        t.finish(&p(0), old, 10);
        assert_eq!(t.committable(), [(p(0), 10)]);
        t.finish(&p(0), new, 10);
        assert_eq!(t.committable(), [(p(0), 11)]);
    }

    #[test]
    fn offering_a_commit_changes_nothing_until_the_broker_took_it() {
        // A commit offered for one partition (say, on revoke) and never made for another must
        // still be offered later for that other one.
        let mut t = OffsetTracker::new();
        let (e0, e1) = (t.assign(&p(0)), t.assign(&p(1)));
        t.start(&p(0), e0, 100, false);
        t.start(&p(1), e1, 7, false);
        let revoked: Vec<_> = t
            .committable()
            .into_iter()
            .filter(|(partition, _)| *partition == p(1))
            .collect();
        t.committed(&revoked);
        t.revoke(&[p(1)]);
        assert_eq!(t.committable(), [(p(0), 101)]);
        // A failed commit (never acknowledged) is offered again.
        assert_eq!(t.committable(), [(p(0), 101)]);
    }
}
