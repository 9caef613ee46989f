//! Writing documents. The record path talks to a [`Sink`]: it owns how a document is encoded,
//! written, and deleted with its record, and how the chunks an update no longer has are removed.
//! The pipeline decides when (ownership, order, retries); the sink decides how.

pub mod local;
pub mod opensearch;

use crate::transform::Document;

/// The field holding a document's record id (shared by the chunks of one record).
pub const PARENT_ID_FIELD: &str = "parentId";
/// The field holding a chunk's position in its record.
pub const CHUNK_FIELD: &str = "chunk";
/// The field holding the number of chunks of the record (to find them all by id).
pub const CHUNKS_FIELD: &str = "chunks";
/// The field holding the record's creation time.
pub const TIMESTAMP_FIELD: &str = "@timestamp";
/// The field holding the record's Kafka key, when ids come from `idPointer` and the key is not
/// the id (its tombstone finds the document by it).
pub const SOURCE_KEY_FIELD: &str = "sourceKey";
/// The field holding a document's id where OpenSearch picks `_id` itself (Serverless).
pub const DOC_ID_FIELD: &str = "docId";
/// The field holding when a document's record was read (microseconds since the epoch), where
/// OpenSearch picks `_id` itself: a version deletes the older documents of its record by it.
pub const WRITTEN_AT_FIELD: &str = "writtenAt";

/// The document ids of a record with `chunks` chunks: the record id itself when it has one,
/// else `<id>#0` … `<id>#<chunks - 1>`.
pub fn record_ids(parent_id: &str, chunks: usize) -> Vec<String> {
    if chunks == 1 {
        vec![parent_id.to_owned()]
    } else {
        (0..chunks).map(|n| format!("{parent_id}#{n}")).collect()
    }
}

/// Why the sink failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The index exists with a mapping the pipeline cannot write.
    #[error("{0}")]
    IndexMismatch(String),
    /// The cluster answered with an error that a retry may fix.
    #[error("OpenSearch request failed: {0}")]
    Transient(String),
    /// Configuration that a person must fix.
    #[error("{0}")]
    Misconfigured(String),
    /// The cluster refuses the request for a reason the documents cannot fix (a write block,
    /// refused credentials, a missing index): the records are held until it accepts them.
    #[error("{0}")]
    Held(String),
    /// The request is larger than the cluster accepts (413): fewer documents per request, or
    /// the one document alone, is what can go.
    #[error("{0}")]
    TooLarge(String),
}

/// What happened to one document of a bulk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemResult {
    /// Indexed.
    Ok,
    /// Rejected for now (429, 5xx): send again later.
    Retry(String),
    /// Refused for good because of the document itself (a mapping conflict, a malformed
    /// field): its record goes to the dead-letter topic.
    Rejected(String),
    /// Refused because of the index or the cluster (a write block, missing permissions, a
    /// missing index): held and sent again until it is accepted; the string says what to fix.
    Held(String),
}

/// A document with its vector, ready for `_bulk`.
#[derive(Clone, Debug)]
pub struct IndexRequest {
    /// The `_id`.
    pub id: String,
    /// The record id.
    pub parent_id: String,
    /// The number of chunks of the record.
    pub chunks: usize,
    /// The `_source`, serialised.
    pub source: Vec<u8>,
    /// When its record was read ([`crate::pipeline::ack::stamp`]): later versions of a record
    /// have larger stamps.
    pub stamp: u64,
}

/// Where documents go.
pub trait Sink: Send + Sync + 'static {
    /// Turns an embedded document into what [`Sink::write`] sends (called by the embed stage, so
    /// encoding runs in parallel).
    fn encode(&self, doc: &Document, vector: &[f32]) -> IndexRequest;

    /// Writes documents: one result per request, in order.
    fn write(
        &self,
        requests: &[&IndexRequest],
    ) -> impl Future<Output = Result<Vec<ItemResult>, SinkError>> + Send;

    /// Deletes every document of the record `parent_id` (a tombstone of that key, read at
    /// `stamp`); with `by_source_key`, also those whose record had this Kafka key (ids from
    /// `idPointer`). Returns how many existed.
    fn delete_record(
        &self,
        parent_id: &str,
        by_source_key: bool,
        stamp: u64,
    ) -> impl Future<Output = Result<u64, SinkError>> + Send;

    /// Deletes the documents that these records (parent id, new chunk count) had before and no
    /// longer have. Returns how many it deleted.
    fn remove_stale_chunks(
        &self,
        records: &[(&str, usize)],
    ) -> impl Future<Output = Result<u64, SinkError>> + Send;
}
