//! Which offsets may be committed: per partition, everything below the lowest record still in
//! flight. A record is done when all its documents are acknowledged by OpenSearch, or it is in the
//! dead-letter topic, or it was skipped.

use std::collections::{BTreeMap, HashMap};

/// A topic partition.
pub type Partition = (String, i32);

#[derive(Debug, Default)]
struct PartitionState {
    /// Records in flight: offset → units of work still open.
    open: BTreeMap<i64, usize>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The offset last handed out for commit.
    committed: Option<i64>,
}

/// Tracks records from the moment they are read until they are done.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a record with `units` pieces of work (0: already done, e.g. skipped).
    pub fn start(&mut self, partition: &Partition, offset: i64, units: usize) {
        let state = self.partitions.entry(partition.clone()).or_default();
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if units > 0 {
            *state.open.entry(offset).or_default() += units;
        }
    }

    /// Marks `units` pieces of a record's work as done; true when that completes the record.
    /// Unknown records (of a partition revoked meanwhile) are ignored.
    pub fn finish(&mut self, partition: &Partition, offset: i64, units: usize) -> bool {
        if let Some(state) = self.partitions.get_mut(partition)
            && let Some(open) = state.open.get_mut(&offset)
        {
            *open = open.saturating_sub(units);
            if *open == 0 {
                state.open.remove(&offset);
                return true;
            }
        }
        false
    }

    /// The offset to commit for each partition whose position moved since the last call: the
    /// lowest open record, or one past the highest seen when nothing is open.
    pub fn committable(&mut self) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (partition, state) in &mut self.partitions {
            let position = match (state.open.keys().next(), state.next) {
                (Some(lowest), _) => *lowest,
                (None, Some(next)) => next,
                (None, None) => continue,
            };
            if state.committed != Some(position) {
                state.committed = Some(position);
                out.push((partition.clone(), position));
            }
        }
        out.sort();
        out
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

    #[test]
    fn commits_stop_at_the_lowest_unfinished_record() {
        let mut t = OffsetTracker::new();
        t.start(&p(0), 10, 1);
        t.start(&p(0), 11, 2);
        t.start(&p(0), 12, 1);
        assert_eq!(t.committable(), [(p(0), 10)]);
        t.finish(&p(0), 12, 1);
        t.finish(&p(0), 11, 1);
        assert_eq!(
            t.committable(),
            [],
            "offset 10 is still open: nothing moved"
        );
        t.finish(&p(0), 10, 1);
        assert_eq!(t.committable(), [(p(0), 11)], "11 has one chunk still open");
        t.finish(&p(0), 11, 1);
        assert_eq!(t.committable(), [(p(0), 13)]);
        assert_eq!(t.open_records(), 0);
    }

    #[test]
    fn skipped_records_advance_the_position_at_once() {
        let mut t = OffsetTracker::new();
        t.start(&p(1), 5, 0);
        t.start(&p(1), 6, 0);
        assert_eq!(t.committable(), [(p(1), 7)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.start(&p(0), 0, 1);
        t.start(&p(1), 0, 1);
        t.finish(&p(1), 0, 1);
        assert_eq!(t.committable(), [(p(0), 0), (p(1), 1)]);
    }

    #[test]
    fn revoked_partitions_are_forgotten_and_late_completions_ignored() {
        let mut t = OffsetTracker::new();
        t.start(&p(0), 3, 1);
        t.revoke(&[p(0)]);
        t.finish(&p(0), 3, 1);
        assert_eq!(t.committable(), []);
    }
}
