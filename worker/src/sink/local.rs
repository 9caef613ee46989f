//! The laptop mode's embedded store as a [`Sink`]: the same stages write to it that write to
//! OpenSearch on a cluster.

use std::sync::{Mutex, MutexGuard};

use super::{IndexRequest, ItemResult, Sink, SinkError, TIMESTAMP_FIELD, record_ids};
use crate::dedup::{Hash, document_hash};
use crate::local::store::{Store, StoreError, StoredDocument};
use crate::transform::Document;

/// A [`Store`] shared by the sink stage's writes.
pub struct LocalStore {
    store: Mutex<Store>,
}

fn failed(e: StoreError) -> SinkError {
    SinkError::Misconfigured(e.to_string())
}

impl LocalStore {
    /// Writes go to `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store: Mutex::new(store),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The content hash of every record stored (what deduplication starts from).
    pub fn record_hashes(&self) -> Result<Vec<(String, Hash)>, StoreError> {
        self.lock().record_hashes()
    }

    /// The store back, to save and count it.
    pub fn into_inner(self) -> Store {
        self.store.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sink for LocalStore {
    fn encode(&self, doc: &Document, vector: &[f32]) -> IndexRequest {
        let mut metadata = doc.metadata.clone();
        if let Some(ts) = &doc.timestamp {
            metadata.insert(TIMESTAMP_FIELD.into(), ts.clone());
        }
        let stored = StoredDocument {
            id: doc.id.clone(),
            parent_id: doc.parent_id.clone(),
            chunk: doc.chunk,
            text: doc.text.clone(),
            metadata,
            content_hash: hex::encode(document_hash(doc)),
            vector: vector.to_vec(),
        };
        IndexRequest {
            id: doc.id.clone(),
            parent_id: doc.parent_id.clone(),
            chunks: doc.chunks,
            // Serialising a struct of strings, maps and floats cannot fail.
            source: serde_json::to_vec(&stored).unwrap_or_default(),
            stamp: 0,
        }
    }

    async fn write(&self, requests: &[&IndexRequest]) -> Result<Vec<ItemResult>, SinkError> {
        let mut documents = Vec::with_capacity(requests.len());
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            match serde_json::from_slice::<StoredDocument>(&request.source) {
                Ok(doc) => {
                    documents.push(doc);
                    results.push(ItemResult::Ok);
                }
                Err(e) => results.push(ItemResult::Rejected(format!("not a stored document: {e}"))),
            }
        }
        self.lock().upsert(&documents).map_err(failed)?;
        Ok(results)
    }

    /// Lines of a file have no keys: only the record id counts.
    async fn delete_record(&self, parent_id: &str, _: bool, _: u64) -> Result<u64, SinkError> {
        let deleted = self.lock().retain_chunks(parent_id, &[]).map_err(failed)?;
        Ok(deleted as u64)
    }

    async fn remove_stale_chunks(&self, records: &[(&str, usize)]) -> Result<u64, SinkError> {
        let mut store = self.lock();
        let mut deleted = 0;
        for (parent_id, chunks) in records {
            let ids = record_ids(parent_id, *chunks);
            let keep: Vec<&str> = ids.iter().map(String::as_str).collect();
            deleted += store.retain_chunks(parent_id, &keep).map_err(failed)? as u64;
        }
        Ok(deleted)
    }
}
