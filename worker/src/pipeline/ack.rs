//! One acknowledgement per record: the only count of a record's open work.
//!
//! A record read from Kafka becomes a [`RecordAck`] with one unit per piece of work (a document to
//! index, a delete, a dead-letter send). Stages carry it along with the work and call
//! [`RecordAck::done`]; the last unit finishes the record in the offset tracker (under the epoch it
//! was read in), remembers it for deduplication when every unit succeeded, and, when the last
//! reference goes, releases its id in [`Versions`].
//!
//! Versions: with record ids of their own (`idPointer`), each record read takes a new version of
//! its id. A record whose id got a newer version before any of its documents started to be
//! written is superseded: its remaining work is skipped (and counted done, so its offset can be
//! committed; the newer version, read later, is not committed before it is written). Once one of
//! its documents is being written, it is no longer superseded, so a record is either written whole
//! or not at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::message::OwnedMessage;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::dedup::{Dedup, Hash};
use crate::sink::IndexRequest;
use crate::source::assignment::{Assignment, Owner};

/// Per record id with work in flight: its newest version read, and the version being written
/// (one that started to be written and is not complete yet; nothing newer of that id is written
/// before it is complete, so a record is never overtaken by its successor or its tombstone).
///
/// The newest version is remembered for as long as any version of the id is alive, so an older
/// version still on its way (say, being embedded) stays superseded even after a newer version or
/// a tombstone that overtook it was applied and is gone.
#[derive(Debug, Default)]
pub struct Versions {
    /// Id → (newest version read, versions alive).
    latest: Mutex<HashMap<String, (u64, usize)>>,
    writers: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl Versions {
    /// A new version of `id`, newer than every earlier one. Every version begun is ended once
    /// (its [`RecordAck`] does so when dropped).
    pub fn begin(&self, id: &str) -> u64 {
        let version = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let entry = latest.entry(id.to_owned()).or_insert((0, 0));
        *entry = (version, entry.1 + 1);
        version
    }

    /// True when no newer version of `id` was read.
    pub fn is_latest(&self, id: &str, version: u64) -> bool {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_none_or(|(v, _)| *v == version)
    }

    /// True while some version of `id` has work in flight.
    pub fn in_flight(&self, id: &str) -> bool {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
            || self
                .writers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(id)
    }

    /// The version of `id` being written, if any.
    pub fn writer(&self, id: &str) -> Option<u64> {
        self.writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// `version` of `id` starts to be written; false when another version is being written.
    pub fn claim_writer(&self, id: &str, version: u64) -> bool {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        match writers.get(id) {
            Some(v) => *v == version,
            None => {
                writers.insert(id.to_owned(), version);
                true
            }
        }
    }

    /// The version's writes are over (it is complete, or dropped with its partition).
    fn end_writer(&self, id: &str, version: u64) -> bool {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        if writers.get(id) == Some(&version) {
            writers.remove(id);
            return true;
        }
        false
    }

    /// The version's work is over (done, or dropped with its partition).
    pub fn end(&self, id: &str, version: u64) -> bool {
        let released = self.end_writer(id, version);
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = latest.get_mut(id) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                latest.remove(id);
            }
        }
        released
    }

    /// Ids with work in flight.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.writers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// What the acknowledgements of one pipeline report to.
pub struct AckHub {
    /// The partitions, their epochs and offsets.
    pub assignment: Arc<Assignment>,
    /// Versions of record ids in flight.
    pub versions: Versions,
    /// Deduplication, when on.
    pub dedup: Option<Arc<Dedup>>,
    /// Signalled when a write ends or a version being written is complete (waiting documents
    /// may go).
    pub released: Notify,
}

static LAST_STAMP: AtomicU64 = AtomicU64::new(0);

/// Microseconds since the epoch, strictly increasing within the process: when a record was read.
/// Later versions of a record get larger stamps (also across restarts, as far as the clocks of
/// the workers agree).
pub fn stamp() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default();
    let mut last = LAST_STAMP.load(Ordering::SeqCst);
    loop {
        let next = now.max(last + 1);
        match LAST_STAMP.compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

const OPEN: u8 = 0;
const WRITING: u8 = 1;
const SUPERSEDED: u8 = 2;

/// One record's open work.
pub struct RecordAck {
    /// Where the record came from.
    pub owner: Owner,
    /// The record as read (its key, value and headers go to the dead-letter topic).
    pub message: OwnedMessage,
    /// When it was read ([`stamp`]).
    pub read_at: u64,
    /// The record id and its version, when versions of one id are ordered.
    version: Option<(String, u64)>,
    /// The content hash to remember once the record is written, when deduplicating.
    hash: Option<Hash>,
    remaining: AtomicUsize,
    /// Its documents: none is written before all of them are embedded.
    documents: usize,
    /// Documents embedded, waiting for the rest of the record's (with their sizes).
    stash: Mutex<Vec<(IndexRequest, usize)>>,
    state: AtomicU8,
    failed: AtomicBool,
    /// Its share of the in-flight byte budget, given back when it completes.
    bytes: Mutex<Option<OwnedSemaphorePermit>>,
    hub: Arc<AckHub>,
}

/// What became of an embedded document handed to [`RecordAck::stash`].
pub enum Stashed {
    /// Kept until the record's other documents are embedded.
    Waiting,
    /// The record's last document: all of them, to be written together.
    Complete(Vec<(IndexRequest, usize)>),
    /// The record failed (another of its documents was refused): not written; count it done.
    Dropped,
}

impl std::fmt::Debug for RecordAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordAck")
            .field("owner", &self.owner)
            .field("version", &self.version)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl RecordAck {
    /// A record with `units` pieces of work; `version` from [`Versions::begin`].
    pub fn new(
        hub: Arc<AckHub>,
        owner: Owner,
        message: OwnedMessage,
        version: Option<(String, u64)>,
        hash: Option<Hash>,
        units: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            owner,
            message,
            read_at: stamp(),
            version,
            hash,
            remaining: AtomicUsize::new(units),
            documents: units,
            stash: Mutex::new(Vec::new()),
            state: AtomicU8::new(OPEN),
            failed: AtomicBool::new(false),
            bytes: Mutex::new(None),
            hub,
        })
    }

    /// The record id and version, when versions of its id are ordered.
    pub fn version(&self) -> Option<(&str, u64)> {
        self.version.as_ref().map(|(id, v)| (id.as_str(), *v))
    }

    /// True when this record's partition is still owned in the epoch it was read in.
    pub fn owned(&self) -> bool {
        self.hub.assignment.owns(&self.owner)
    }

    /// True when a newer version of the record came first and none of its documents has
    /// started to be written; from then on, its work is skipped.
    pub fn superseded(&self) -> bool {
        match self.state.load(Ordering::SeqCst) {
            SUPERSEDED => true,
            WRITING => false,
            _ => {
                let Some((id, version)) = &self.version else {
                    return false;
                };
                if self.hub.versions.is_latest(id, *version) {
                    return false;
                }
                match self.state.compare_exchange(
                    OPEN,
                    SUPERSEDED,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => true,
                    Err(state) => state == SUPERSEDED,
                }
            }
        }
    }

    /// About to write one of its documents; false when the record was superseded (skip it).
    pub fn begin_writing(&self) -> bool {
        match self
            .state
            .compare_exchange(OPEN, WRITING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(state) => state == WRITING,
        }
    }

    /// Some of its work failed for good (dead-lettered): it is not remembered as written, and
    /// its documents embedded so far are dropped unwritten. Returns whether this was the first
    /// failure (the record is dead-lettered then, once) and how many dropped documents to count
    /// done.
    pub fn fail(&self) -> (bool, usize) {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        let first = !self.failed.swap(true, Ordering::SeqCst);
        let dropped = stash.len();
        stash.clear();
        (first, dropped)
    }

    /// Drops the documents embedded so far (the record was superseded); returns how many, to
    /// count done.
    pub fn drop_stash(&self) -> usize {
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = stash.len();
        stash.clear();
        dropped
    }

    /// An embedded document of this record: written once all of its documents are embedded,
    /// so a record whose other document the model refuses leaves nothing half written.
    pub fn stash(&self, request: IndexRequest, bytes: usize) -> Stashed {
        if self.documents <= 1 {
            return if self.failed() {
                Stashed::Dropped
            } else {
                Stashed::Complete(vec![(request, bytes)])
            };
        }
        let mut stash = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        if self.failed() || self.superseded() {
            return Stashed::Dropped;
        }
        stash.push((request, bytes));
        if stash.len() < self.documents {
            return Stashed::Waiting;
        }
        Stashed::Complete(std::mem::take(&mut *stash))
    }

    /// True once some of its work failed for good.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Holds `permit` (its share of the in-flight byte budget) until the record completes.
    pub fn hold_bytes(&self, permit: OwnedSemaphorePermit) {
        *self.bytes.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
    }

    /// Marks `units` pieces done; true when that completed the record.
    pub fn done(&self, units: usize) -> bool {
        let before = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                Some(r.saturating_sub(units))
            })
            .unwrap_or(0);
        if before == 0 || before > units {
            return false;
        }
        self.hub.assignment.finish(&self.owner);
        drop(self.bytes.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some((id, version)) = &self.version
            && self.hub.versions.end_writer(id, *version)
        {
            self.hub.released.notify_one();
        }
        if let (Some(dedup), Some((id, _))) = (&self.hub.dedup, &self.version) {
            let written = self.state.load(Ordering::SeqCst) == WRITING;
            match (self.hash, written && !self.failed.load(Ordering::SeqCst)) {
                (Some(hash), true) if self.owned() => {
                    dedup.remember(&self.owner.partition, id, hash)
                }
                (_, true) => {}
                // Superseded records leave the entry to the newer version; failed ones leave
                // the index in doubt.
                (_, false) if self.failed.load(Ordering::SeqCst) => {
                    dedup.forget(&self.owner.partition, id)
                }
                (_, false) => {}
            }
        }
        true
    }
}

impl Drop for RecordAck {
    fn drop(&mut self) {
        if let Some((id, version)) = &self.version
            && self.hub.versions.end(id, *version)
        {
            self.hub.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use vectorpipe_crds::v1alpha1::Dedup as DedupSpec;

    fn hub() -> Arc<AckHub> {
        let assignment = Arc::new(Assignment::new());
        assignment.assign(&[("t".to_owned(), 0)]);
        Arc::new(AckHub {
            assignment,
            versions: Versions::default(),
            dedup: Dedup::from_spec(&DedupSpec::default()).map(Arc::new),
            released: Notify::new(),
        })
    }

    fn read(hub: &Arc<AckHub>, id: &str, offset: i64, units: usize) -> Arc<RecordAck> {
        let partition = ("t".to_owned(), 0);
        let owner = Owner {
            epoch: hub.assignment.epoch(&partition).unwrap(),
            partition,
            offset,
        };
        assert!(hub.assignment.start(&owner, true));
        let message = OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        );
        let version = hub.versions.begin(id);
        RecordAck::new(
            hub.clone(),
            owner,
            message,
            Some((id.to_owned(), version)),
            Some([offset as u8; 32]),
            units,
        )
    }

    fn committable(hub: &AckHub) -> Vec<i64> {
        hub.assignment
            .committable(None)
            .0
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }

    #[test]
    fn a_record_is_done_once_with_its_last_unit() {
        let hub = hub();
        let ack = read(&hub, "x", 4, 3);
        assert!(ack.begin_writing());
        assert!(!ack.done(1));
        assert!(!ack.done(1));
        assert_eq!(committable(&hub), [4]);
        assert!(ack.done(1));
        assert!(!ack.done(1), "a record completes once");
        assert_eq!(committable(&hub), [5]);
        let dedup = hub.dedup.as_ref().unwrap();
        assert!(dedup.is_duplicate(&("t".to_owned(), 0), "x", &[4; 32]));
    }

    #[test]
    fn a_newer_version_supersedes_an_older_one_not_yet_written() {
        let hub = hub();
        let v1 = read(&hub, "x", 1, 2);
        assert!(!v1.superseded());
        let v2 = read(&hub, "x", 2, 1);
        assert!(v1.superseded());
        assert!(!v1.begin_writing(), "a superseded record is never written");
        assert!(!v2.superseded());
        assert!(v1.done(2));
        assert_eq!(
            committable(&hub),
            [2],
            "the newer version still holds the commit"
        );
        drop(v1);
        assert!(
            hub.versions.in_flight("x"),
            "the newer version is in flight"
        );
        assert!(v2.begin_writing());
        v2.done(1);
        drop(v2);
        assert_eq!(hub.versions.len(), 0);
    }

    #[test]
    fn a_record_being_written_is_written_whole() {
        let hub = hub();
        let v1 = read(&hub, "x", 1, 2);
        assert!(v1.begin_writing());
        let _v2 = read(&hub, "x", 2, 1);
        assert!(!v1.superseded(), "half a record is never left behind");
    }

    #[test]
    fn a_newer_version_that_finished_first_still_supersedes_the_older_one() {
        // The tombstone overtook the older version (still being embedded), was applied and is
        // gone; the older version must not come back afterwards.
        let hub = hub();
        let v1 = read(&hub, "x", 1, 3);
        let tombstone = read(&hub, "x", 2, 1);
        assert!(tombstone.begin_writing());
        assert!(tombstone.done(1));
        drop(tombstone);
        assert!(v1.superseded(), "a resurrected delete");
        assert!(!v1.begin_writing());
        drop(v1);
        assert_eq!(
            hub.versions.len(),
            0,
            "nothing left once every version is gone"
        );
    }

    #[test]
    fn nothing_newer_is_written_while_a_version_of_the_id_is_being_written() {
        let hub = hub();
        let v1 = read(&hub, "x", 1, 2);
        let tombstone = read(&hub, "x", 2, 1);
        let (_, first) = v1.version().unwrap();
        let (_, second) = tombstone.version().unwrap();
        assert!(v1.begin_writing() && hub.versions.claim_writer("x", first));
        assert!(
            !hub.versions.claim_writer("x", second),
            "the tombstone waits"
        );
        v1.done(1);
        assert_eq!(hub.versions.writer("x"), Some(first), "half written still");
        v1.done(1);
        assert_eq!(hub.versions.writer("x"), None);
        assert!(hub.versions.claim_writer("x", second));
    }

    #[test]
    fn failed_records_are_not_remembered_as_written() {
        let hub = hub();
        let ack = read(&hub, "x", 7, 1);
        assert!(ack.begin_writing());
        assert!(ack.fail().0);
        ack.done(1);
        let dedup = hub.dedup.as_ref().unwrap();
        assert!(!dedup.is_duplicate(&("t".to_owned(), 0), "x", &[7; 32]));
    }
}
