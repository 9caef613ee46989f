//! Writing documents: the OpenSearch sink.

pub mod opensearch;

/// The field holding a document's record id (shared by the chunks of one record).
pub const PARENT_ID_FIELD: &str = "parentId";
/// The field holding a chunk's position in its record.
pub const CHUNK_FIELD: &str = "chunk";
/// The field holding the number of chunks of the record (to find them all by id).
pub const CHUNKS_FIELD: &str = "chunks";
/// The field holding the record's creation time.
pub const TIMESTAMP_FIELD: &str = "@timestamp";

/// The document ids of a record with `chunks` chunks: the record id itself when it has one,
/// else `<id>#0` … `<id>#<chunks - 1>`.
pub fn record_ids(parent_id: &str, chunks: usize) -> Vec<String> {
    if chunks == 1 {
        vec![parent_id.to_owned()]
    } else {
        (0..chunks).map(|n| format!("{parent_id}#{n}")).collect()
    }
}
