//! Writing documents: the OpenSearch sink.

pub mod opensearch;

/// The field holding a document's record id (shared by the chunks of one record).
pub const PARENT_ID_FIELD: &str = "parentId";
/// The field holding a chunk's position in its record.
pub const CHUNK_FIELD: &str = "chunk";
/// The field holding the record's creation time.
pub const TIMESTAMP_FIELD: &str = "@timestamp";
