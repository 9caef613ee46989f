//! Deduplication: a record whose documents would come out exactly as they are already stored is
//! not embedded again.
//!
//! The rule, the same in the Kafka path and the laptop mode:
//! - the hash covers everything a stored document holds except its vector (id, text, metadata,
//!   timestamp, chunk layout), so a metadata-only or timestamp-only update is written;
//! - an id is remembered only after its write succeeded (a refused or dead-lettered version never
//!   makes a corrected re-send look like a duplicate);
//! - entries belong to the partition the record was read from and are dropped when that
//!   partition is revoked (another worker may change the record meanwhile);
//! - a record whose id has a version in flight is never skipped (it supersedes that version).

use moka::sync::Cache;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vectorpipe_crds::v1alpha1::Dedup as DedupSpec;

use crate::source::offsets::Partition;
use crate::transform::Document;

/// A content hash.
pub type Hash = [u8; 32];

/// The hash of one stored document's content, without its vector.
pub fn document_hash(doc: &Document) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(doc.text.as_bytes());
    hasher.update([0]);
    hasher.update(Value::Object(doc.metadata.clone()).to_string().as_bytes());
    hasher.update([0]);
    if let Some(ts) = &doc.timestamp {
        hasher.update(ts.to_string().as_bytes());
    }
    if let Some(key) = &doc.source_key {
        hasher.update([0]);
        hasher.update(key.as_bytes());
    }
    hasher.finalize().into()
}

/// The hash of all documents of a record (ids and chunk layout included).
pub fn record_hash(docs: &[Document]) -> Hash {
    combine_hashes(
        docs.iter()
            .map(|d| (d.id.as_str(), d.chunks, document_hash(d))),
    )
}

/// The hash of a record from its documents' ids, chunk count and [`document_hash`]es, in chunk
/// order (what a store that keeps each document's hash can compute again).
pub fn combine_hashes<'a>(docs: impl Iterator<Item = (&'a str, usize, Hash)>) -> Hash {
    let mut hasher = Sha256::new();
    for (id, chunks, hash) in docs {
        hasher.update(id.as_bytes());
        hasher.update([0]);
        hasher.update(chunks.to_le_bytes());
        hasher.update(hash);
    }
    hasher.finalize().into()
}

/// Records written recently, by partition and id.
pub struct Dedup {
    cache: Cache<(Partition, String), Hash>,
}

impl Dedup {
    /// A cache as the spec sets it, or none when deduplication is off.
    pub fn from_spec(spec: &DedupSpec) -> Option<Self> {
        spec.enabled.then(|| Self {
            cache: Cache::builder()
                .max_capacity(spec.max_entries.max(1) as u64)
                .time_to_live(spec.ttl.get())
                .support_invalidation_closures()
                .build(),
        })
    }

    /// A cache as the spec sets it that starts out knowing these records of `partition` as
    /// written (what a persistent store holds), with room for all of them.
    pub fn seeded(
        spec: &DedupSpec,
        partition: &Partition,
        records: Vec<(String, Hash)>,
    ) -> Option<Self> {
        let room = spec.max_entries.max(1) as u64 + records.len() as u64;
        let dedup = Self::from_spec(&DedupSpec {
            max_entries: i64::try_from(room).unwrap_or(i64::MAX),
            ..spec.clone()
        })?;
        for (id, hash) in records {
            dedup.remember(partition, &id, hash);
        }
        Some(dedup)
    }

    /// True when this record, read from `partition`, was written with this content before.
    pub fn is_duplicate(&self, partition: &Partition, id: &str, hash: &Hash) -> bool {
        self.cache.get(&(partition.clone(), id.to_owned())).as_ref() == Some(hash)
    }

    /// The record was written with this content.
    pub fn remember(&self, partition: &Partition, id: &str, hash: Hash) {
        self.cache.insert((partition.clone(), id.to_owned()), hash);
    }

    /// The record was deleted, or its write is in doubt.
    pub fn forget(&self, partition: &Partition, id: &str) {
        self.cache.invalidate(&(partition.clone(), id.to_owned()));
    }

    /// Drops every entry of these partitions.
    pub fn revoke(&self, partitions: &[Partition]) {
        let partitions = partitions.to_vec();
        if let Err(e) = self
            .cache
            .invalidate_entries_if(move |(p, _), _| partitions.contains(p))
        {
            // Only when invalidation closures are off, which from_spec turns on; clear all.
            tracing::warn!(error = %e, "dropping the whole dedup cache");
            self.cache.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;

    fn doc(text: &str, likes: i64, ts: Option<i64>) -> Document {
        let mut metadata = Map::new();
        metadata.insert("likes".into(), json!(likes));
        Document {
            id: "x".into(),
            parent_id: "x".into(),
            chunk: 0,
            chunks: 1,
            text: text.into(),
            timestamp: ts.map(Value::from),
            metadata,
            source_key: None,
        }
    }

    fn dedup() -> Dedup {
        Dedup::from_spec(&DedupSpec::default()).unwrap()
    }

    #[test]
    fn the_hash_covers_text_metadata_and_timestamp() {
        let base = record_hash(&[doc("t", 1, Some(1))]);
        assert_eq!(base, record_hash(&[doc("t", 1, Some(1))]));
        assert_ne!(base, record_hash(&[doc("t", 2, Some(1))]), "metadata");
        assert_ne!(base, record_hash(&[doc("t", 1, Some(2))]), "timestamp");
        assert_ne!(base, record_hash(&[doc("u", 1, Some(1))]), "text");
        let mut keyed = doc("t", 1, Some(1));
        keyed.source_key = Some("k".into());
        assert_ne!(base, record_hash(&[keyed]), "source key");
        let mut split = doc("t", 1, Some(1));
        split.chunks = 2;
        assert_ne!(base, record_hash(&[split]), "chunk layout");
    }

    #[test]
    fn entries_belong_to_their_partition_and_go_with_it() {
        let d = dedup();
        let (p0, p1) = (("t".to_owned(), 0), ("t".to_owned(), 1));
        let h = record_hash(&[doc("t", 1, None)]);
        d.remember(&p0, "x", h);
        d.remember(&p1, "y", h);
        assert!(d.is_duplicate(&p0, "x", &h));
        assert!(!d.is_duplicate(&p1, "x", &h), "another partition's entry");
        d.revoke(std::slice::from_ref(&p0));
        assert!(!d.is_duplicate(&p0, "x", &h), "revoked partitions forget");
        assert!(d.is_duplicate(&p1, "y", &h));
        d.forget(&p1, "y");
        assert!(!d.is_duplicate(&p1, "y", &h));
    }

    #[test]
    fn nothing_is_remembered_when_dedup_is_off() {
        let off = DedupSpec {
            enabled: false,
            ..DedupSpec::default()
        };
        assert!(Dedup::from_spec(&off).is_none());
    }
}
