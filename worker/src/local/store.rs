//! The embedded vector store of the laptop mode.
//!
//! SQLite (one file, transactional) holds every document with its vector; an in-memory HNSW graph
//! from usearch answers k-NN queries. SQLite is the truth: the graph is saved next to it after each
//! run and reused only when it matches the database's write counter, else rebuilt from the rows.
//! An FTS5 table over the texts, kept in step by triggers, answers full-text (BM25) searches.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::dedup::{Hash, combine_hashes};

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("the store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// The HNSW index failed.
    #[error("the store's vector index: {0}")]
    Index(String),
    /// The store was built with another model.
    #[error(
        "the store {path} holds vectors of the model {stored} ({stored_dimensions} dimensions), \
         not of {model} ({dimensions}); use another --store directory or delete this one"
    )]
    OtherModel {
        /// The database file.
        path: PathBuf,
        /// The model it was built with.
        stored: String,
        /// Its dimensions.
        stored_dimensions: usize,
        /// The model in use now.
        model: String,
        /// Its dimensions.
        dimensions: usize,
    },
    /// A file or directory could not be created.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// One document to store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoredDocument {
    /// The document id (`<id>` or `<id>#<n>`).
    pub id: String,
    /// The record id.
    pub parent_id: String,
    /// The chunk number.
    pub chunk: usize,
    /// The embedded text.
    pub text: String,
    /// The spec's metadata fields and the timestamp.
    pub metadata: Map<String, Value>,
    /// A hash of what was embedded, to skip unchanged documents.
    pub content_hash: String,
    /// The vector.
    pub vector: Vec<f32>,
}

/// A search result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hit {
    /// Cosine similarity to the query, 1 = same direction.
    pub score: f32,
    /// The document id.
    pub id: String,
    /// The record id.
    pub parent_id: String,
    /// The chunk number.
    pub chunk: usize,
    /// The embedded text.
    pub text: String,
    /// The metadata fields.
    pub metadata: Map<String, Value>,
}

/// The database's file name in the store directory.
pub const DATABASE_FILE: &str = "documents.sqlite";

/// What filters look at of one document.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its key in the graph and the database.
    pub key: u64,
    /// The record id.
    pub parent_id: String,
    /// The chunk number.
    pub chunk: usize,
    /// The metadata fields.
    pub metadata: Map<String, Value>,
}

/// The store: a directory with `documents.sqlite` and `vectors.usearch`.
pub struct Store {
    db: Connection,
    db_path: PathBuf,
    index_path: PathBuf,
    index: Index,
    dimensions: usize,
    dirty: bool,
}

fn index_options(dimensions: usize) -> IndexOptions {
    IndexOptions {
        dimensions,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        ..Default::default()
    }
}

fn to_bytes(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Holds the store in `dir` for one writer (a `local` run) until dropped. A second writer waits
/// for the first with a message that says so: two runs writing at once would each save a graph
/// that lacks the other's documents, and those would vanish from search.
pub fn lock_for_writing(dir: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join("writer.lock");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "another `vectorpipe-worker local` run is writing to the store {}; waiting for it to finish (stop it, or give this run its own --store)",
                dir.display()
            );
            file.lock().map_err(io)?;
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` for vectors of `model` with `dimensions`.
    pub fn open(dir: &Path, model: &str, dimensions: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let db_path = dir.join(DATABASE_FILE);
        let sql = sqlite_error(&db_path);
        let mut db = Connection::open(&db_path).map_err(&sql)?;
        // A query server reads while a `local` run writes: wait for its short transactions.
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(&sql)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS documents (
                 key INTEGER PRIMARY KEY,
                 id TEXT NOT NULL UNIQUE,
                 parent_id TEXT NOT NULL,
                 chunk INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 metadata TEXT NOT NULL,
                 content_hash TEXT NOT NULL,
                 vector BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS documents_by_parent ON documents (parent_id, chunk);",
        )
        .map_err(&sql)?;
        add_full_text(&mut db).map_err(&sql)?;
        let meta = |key: &str| -> Result<Option<String>, StoreError> {
            db.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(&sql)
        };
        match (meta("model")?, meta("dimensions")?) {
            (Some(stored), Some(stored_dimensions)) => {
                let stored_dimensions = stored_dimensions.parse().unwrap_or(0);
                if stored != model || stored_dimensions != dimensions {
                    return Err(StoreError::OtherModel {
                        path: db_path.clone(),
                        stored,
                        stored_dimensions,
                        model: model.to_owned(),
                        dimensions,
                    });
                }
            }
            _ => {
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('model', ?1), ('dimensions', ?2)",
                    params![model, dimensions.to_string()],
                )
                .map_err(&sql)?;
            }
        }
        let version = meta("version")?;
        let index_version = meta("index_version")?;
        let index_path = dir.join("vectors.usearch");
        let index = Index::new(&index_options(dimensions)).map_err(index_error)?;
        drop(sql);
        let mut store = Self {
            db,
            db_path,
            index_path,
            index,
            dimensions,
            dirty: false,
        };
        let saved_matches = version.is_some() && version == index_version;
        let loaded = saved_matches
            && store.index_path.exists()
            && store
                .index
                .load(&store.index_path.to_string_lossy())
                .is_ok()
            && store.index.dimensions() == dimensions;
        if !loaded {
            store.rebuild()?;
        }
        Ok(store)
    }

    /// Fills the HNSW graph from the documents table.
    fn rebuild(&mut self) -> Result<(), StoreError> {
        let index = Index::new(&index_options(self.dimensions)).map_err(index_error)?;
        let count: i64 = self
            .db
            .query_row("SELECT count(*) FROM documents", [], |r| r.get(0))
            .map_err(sqlite_error(&self.db_path))?;
        index
            .reserve((count as usize).max(64))
            .map_err(index_error)?;
        let mut statement = self
            .db
            .prepare("SELECT key, vector FROM documents")
            .map_err(sqlite_error(&self.db_path))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .map_err(sqlite_error(&self.db_path))?;
        for row in rows {
            let (key, vector) = row.map_err(sqlite_error(&self.db_path))?;
            index
                .add(key as u64, &from_bytes(&vector))
                .map_err(index_error)?;
        }
        drop(statement);
        self.index = index;
        self.dirty = true;
        Ok(())
    }

    /// The number of documents.
    pub fn len(&self) -> usize {
        self.index.size()
    }

    /// True when the store holds no documents.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The content hash of each stored record (see [`crate::dedup::record_hash`]), from its
    /// documents' hashes in chunk order.
    pub fn record_hashes(&self) -> Result<Vec<(String, Hash)>, StoreError> {
        let error = sqlite_error(&self.db_path);
        let mut statement = self
            .db
            .prepare("SELECT parent_id, id, content_hash FROM documents ORDER BY parent_id, chunk")
            .map_err(&error)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(&error)?;
        let mut records: Vec<(String, Vec<(String, Hash)>)> = Vec::new();
        for row in rows {
            let (parent, id, hash) = row.map_err(&error)?;
            // A hash that does not decode matches nothing: the record is embedded again.
            let mut decoded = [0; 32];
            if hex::decode_to_slice(&hash, &mut decoded).is_err() {
                decoded = [0xff; 32];
            }
            match records.last_mut() {
                Some((p, docs)) if *p == parent => docs.push((id, decoded)),
                _ => records.push((parent, vec![(id, decoded)])),
            }
        }
        Ok(records
            .into_iter()
            .map(|(parent, docs)| {
                let chunks = docs.len();
                let hash = combine_hashes(docs.iter().map(|(id, h)| (id.as_str(), chunks, *h)));
                (parent, hash)
            })
            .collect())
    }

    fn make_room(&self, more: usize) -> Result<(), StoreError> {
        let needed = self.index.size() + more;
        if needed > self.index.capacity() {
            self.index
                .reserve(needed.next_power_of_two().max(64))
                .map_err(index_error)?;
        }
        Ok(())
    }

    /// Writes documents, replacing those with the same id (one transaction).
    pub fn upsert(&mut self, documents: &[StoredDocument]) -> Result<(), StoreError> {
        self.make_room(documents.len())?;
        let tx = self.db.transaction().map_err(sqlite_error(&self.db_path))?;
        let mut keys = Vec::with_capacity(documents.len());
        {
            let mut upsert = tx
                .prepare(
                    "INSERT INTO documents (id, parent_id, chunk, text, metadata, content_hash, vector)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (id) DO UPDATE SET parent_id = excluded.parent_id,
                         chunk = excluded.chunk, text = excluded.text,
                         metadata = excluded.metadata, content_hash = excluded.content_hash,
                         vector = excluded.vector
                     RETURNING key",
                )
                .map_err(sqlite_error(&self.db_path))?;
            for d in documents {
                let metadata = Value::Object(d.metadata.clone()).to_string();
                let key: i64 = upsert
                    .query_row(
                        params![
                            d.id,
                            d.parent_id,
                            d.chunk as i64,
                            d.text,
                            metadata,
                            d.content_hash,
                            to_bytes(&d.vector)
                        ],
                        |r| r.get(0),
                    )
                    .map_err(sqlite_error(&self.db_path))?;
                keys.push(key as u64);
            }
        }
        bump_version(&tx).map_err(sqlite_error(&self.db_path))?;
        tx.commit().map_err(sqlite_error(&self.db_path))?;
        for (key, d) in keys.into_iter().zip(documents) {
            if self.index.contains(key) {
                self.index.remove(key).map_err(index_error)?;
            }
            self.index.add(key, &d.vector).map_err(index_error)?;
        }
        self.dirty = true;
        Ok(())
    }

    /// Deletes the documents of a record whose ids are not in `keep`: the chunks a record no
    /// longer has after it changed (all of them with an empty `keep`). Returns how many.
    pub fn retain_chunks(&mut self, parent_id: &str, keep: &[&str]) -> Result<usize, StoreError> {
        let error = sqlite_error(&self.db_path);
        let tx = self.db.transaction().map_err(&error)?;
        let stale: Vec<(i64, String)> = {
            let mut statement = tx
                .prepare("SELECT key, id FROM documents WHERE parent_id = ?1")
                .map_err(&error)?;
            let rows = statement
                .query_map([parent_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(&error)?;
            rows.filter(|row| {
                row.as_ref()
                    .map_or(true, |(_, id): &(i64, String)| !keep.contains(&id.as_str()))
            })
            .collect::<Result<_, _>>()
            .map_err(&error)?
        };
        for (key, _) in &stale {
            tx.execute("DELETE FROM documents WHERE key = ?1", [key])
                .map_err(&error)?;
        }
        if !stale.is_empty() {
            bump_version(&tx).map_err(&error)?;
        }
        tx.commit().map_err(&error)?;
        for (key, _) in &stale {
            self.index.remove(*key as u64).map_err(index_error)?;
        }
        self.dirty |= !stale.is_empty();
        Ok(stale.len())
    }

    /// The `k` documents nearest to `query`, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>, StoreError> {
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let matches = self.index.search(query, k).map_err(index_error)?;
        self.hits(
            matches
                .keys
                .iter()
                .zip(&matches.distances)
                .map(|(key, d)| (*key, 1.0 - d)),
        )
    }

    /// The `k` documents nearest to `query` among the keys in `allowed`, best first. Exact (every
    /// allowed vector is compared) when the filter leaves few documents, else a filtered walk of
    /// the graph, so a narrow filter never comes back short.
    pub fn search_among(
        &self,
        query: &[f32],
        k: usize,
        allowed: &std::collections::HashSet<u64>,
    ) -> Result<Vec<Hit>, StoreError> {
        if allowed.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        if allowed.len() > EXACT_SEARCH_LIMIT {
            let matches = self
                .index
                .filtered_search(query, k, |key| allowed.contains(&key))
                .map_err(index_error)?;
            return self.hits(
                matches
                    .keys
                    .iter()
                    .zip(&matches.distances)
                    .map(|(key, d)| (*key, 1.0 - d)),
            );
        }
        let mut vector = vec![0f32; self.dimensions];
        let mut scored: Vec<(u64, f32)> = Vec::with_capacity(allowed.len());
        for &key in allowed {
            if self.index.get(key, &mut vector).map_err(index_error)? == 0 {
                continue;
            }
            scored.push((key, cosine(query, &vector)));
        }
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        self.hits(scored.into_iter())
    }

    /// The `k` documents whose text best matches the words of `text` (BM25 over the FTS5
    /// table, English stemming), among those `allowed` passes; best first, the score the
    /// negated BM25 rank (higher is better).
    pub fn lexical(
        &self,
        text: &str,
        k: usize,
        allowed: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, StoreError> {
        let Some(expression) = match_expression(text) else {
            return Ok(Vec::new());
        };
        let error = sqlite_error(&self.db_path);
        let mut statement = self
            .db
            .prepare_cached(
                "SELECT rowid, bm25(documents_fts) FROM documents_fts
                 WHERE documents_fts MATCH ?1 ORDER BY bm25(documents_fts), rowid",
            )
            .map_err(&error)?;
        let rows = statement
            .query_map([expression], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
            })
            .map_err(&error)?;
        let mut found = Vec::with_capacity(k);
        for row in rows {
            let (key, rank) = row.map_err(&error)?;
            if allowed(key as u64) {
                found.push((key as u64, -rank as f32));
                if found.len() == k {
                    break;
                }
            }
        }
        drop(statement);
        self.hits(found.into_iter())
    }

    /// Every document's key, record id, chunk and metadata (what filters look at).
    pub fn catalog(&self) -> Result<Vec<Entry>, StoreError> {
        let error = sqlite_error(&self.db_path);
        let mut statement = self
            .db
            .prepare("SELECT key, parent_id, chunk, metadata FROM documents")
            .map_err(&error)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(&error)?;
        rows.map(|row| {
            let (key, parent, chunk, metadata) = row.map_err(&error)?;
            Ok(Entry {
                key: key as u64,
                parent_id: parent,
                chunk: chunk as usize,
                metadata: parse_metadata(&metadata),
            })
        })
        .collect()
    }

    /// The database's write counter: it changes with every write, also another process's.
    pub fn version(&self) -> Result<Option<String>, StoreError> {
        self.db
            .query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sqlite_error(&self.db_path))
    }

    /// The hits of `(key, score)` pairs, in their order; keys no longer stored are left out.
    fn hits(&self, scored: impl Iterator<Item = (u64, f32)>) -> Result<Vec<Hit>, StoreError> {
        let mut statement = self
            .db
            .prepare_cached(
                "SELECT id, parent_id, chunk, text, metadata FROM documents WHERE key = ?1",
            )
            .map_err(sqlite_error(&self.db_path))?;
        let mut hits = Vec::new();
        for (key, score) in scored {
            let row = statement
                .query_row([key as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .optional()
                .map_err(sqlite_error(&self.db_path))?;
            if let Some((id, parent_id, chunk, text, metadata)) = row {
                hits.push(Hit {
                    score,
                    id,
                    parent_id,
                    chunk: chunk as usize,
                    text,
                    metadata: parse_metadata(&metadata),
                });
            }
        }
        Ok(hits)
    }

    /// Saves the HNSW graph next to the database (atomically), so the next open skips the rebuild.
    pub fn save(&mut self) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        let partial = self.index_path.with_extension("usearch.partial");
        self.index
            .save(&partial.to_string_lossy())
            .map_err(index_error)?;
        std::fs::rename(&partial, &self.index_path).map_err(|source| StoreError::Io {
            path: self.index_path.clone(),
            source,
        })?;
        self.db
            .execute(
                "INSERT OR REPLACE INTO meta (key, value)
                 SELECT 'index_version', value FROM meta WHERE key = 'version'",
                [],
            )
            .map_err(sqlite_error(&self.db_path))?;
        self.dirty = false;
        Ok(())
    }
}

/// Filters that leave at most this many documents are searched exactly.
const EXACT_SEARCH_LIMIT: usize = 20_000;

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut aa, mut bb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

fn parse_metadata(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// An FTS5 query that matches documents holding any word of `text` (each word quoted, so
/// nothing the user types is read as query syntax); `None` when `text` has no word.
fn match_expression(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{w}\""))
        .collect();
    (!words.is_empty()).then(|| words.join(" OR "))
}

/// The full-text table over the documents' texts and the triggers that keep it in step; a
/// store made before it existed gets it filled from the documents once.
fn add_full_text(db: &mut Connection) -> rusqlite::Result<()> {
    let exists: bool = db.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'documents_fts'",
        [],
        |r| r.get(0),
    )?;
    if exists {
        return Ok(());
    }
    let tx = db.transaction()?;
    tx.execute_batch(
        "CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
             text, content = 'documents', content_rowid = 'key',
             tokenize = 'porter unicode61 remove_diacritics 2'
         );
         CREATE TRIGGER IF NOT EXISTS documents_fts_insert AFTER INSERT ON documents BEGIN
             INSERT INTO documents_fts (rowid, text) VALUES (new.key, new.text);
         END;
         CREATE TRIGGER IF NOT EXISTS documents_fts_delete AFTER DELETE ON documents BEGIN
             INSERT INTO documents_fts (documents_fts, rowid, text) VALUES ('delete', old.key, old.text);
         END;
         CREATE TRIGGER IF NOT EXISTS documents_fts_update AFTER UPDATE ON documents BEGIN
             INSERT INTO documents_fts (documents_fts, rowid, text) VALUES ('delete', old.key, old.text);
             INSERT INTO documents_fts (rowid, text) VALUES (new.key, new.text);
         END;
         INSERT INTO documents_fts (documents_fts) VALUES ('rebuild');",
    )?;
    tx.commit()
}

fn index_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Index(e.to_string())
}

fn sqlite_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + use<'_> {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// Counts writes, so a saved graph can tell whether it is current.
fn bump_version(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('version', '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        [],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit vector along axis `i` (of 4), slightly tilted towards axis `j`.
    fn vector(i: usize, j: usize, tilt: f32) -> Vec<f32> {
        let mut v = [0.0; 4];
        v[i] = 1.0;
        v[j] += tilt;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    fn doc(id: &str, parent: &str, chunk: usize, v: Vec<f32>) -> StoredDocument {
        StoredDocument {
            id: id.into(),
            parent_id: parent.into(),
            chunk,
            text: format!("text of {id}"),
            metadata: Map::from_iter([("n".to_owned(), Value::from(chunk))]),
            content_hash: format!("hash-{id}"),
            vector: v,
        }
    }

    #[test]
    fn nearest_documents_come_first_with_cosine_scores() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        store.upsert(&[
            doc("a", "a", 0, vector(0, 1, 0.0)),
            doc("b", "b", 0, vector(1, 0, 0.0)),
            doc("c", "c", 0, vector(0, 1, 0.5)),
        ])?;
        let hits = store.search(&vector(0, 1, 0.1), 3)?;
        let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "b"]);
        assert!((hits[0].score - 0.995).abs() < 0.01, "{hits:?}");
        assert!(hits[2].score.abs() < 0.2, "{hits:?}");
        assert_eq!(hits[0].text, "text of a");
        assert_eq!(hits[0].metadata["n"], 0);
        Ok(())
    }

    #[test]
    fn the_same_id_is_replaced_not_duplicated() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        store.upsert(&[doc("a", "a", 0, vector(0, 1, 0.0))])?;
        let first = store.record_hashes()?;
        let mut moved = doc("a", "a", 0, vector(2, 1, 0.0));
        moved.content_hash = hex::encode([2; 32]);
        store.upsert(&[moved])?;
        assert_eq!(store.len(), 1);
        let hits = store.search(&vector(2, 1, 0.0), 1)?;
        assert_eq!(hits[0].id, "a");
        assert!(hits[0].score > 0.99, "the vector was replaced: {hits:?}");
        assert_ne!(
            store.record_hashes()?,
            first,
            "the record's hash follows its content"
        );
        Ok(())
    }

    #[test]
    fn record_hashes_are_those_of_the_documents_the_pipeline_made() -> anyhow::Result<()> {
        use crate::dedup::{document_hash, record_hash};
        use crate::transform::Document;
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        let docs: Vec<Document> = (0..3)
            .map(|n| Document {
                id: format!("r#{n}"),
                parent_id: "r".into(),
                chunk: n,
                chunks: 3,
                text: format!("part {n}"),
                timestamp: Some(Value::from(7)),
                metadata: Map::new(),
                source_key: None,
            })
            .collect();
        let stored: Vec<StoredDocument> = docs
            .iter()
            .rev()
            .map(|d| StoredDocument {
                content_hash: hex::encode(document_hash(d)),
                ..doc(&d.id, "r", d.chunk, vector(0, 1, 0.0))
            })
            .collect();
        store.upsert(&stored)?;
        store.upsert(&[doc("s", "s", 0, vector(1, 0, 0.0))])?;
        let hashes = store.record_hashes()?;
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[0], ("r".to_owned(), record_hash(&docs)));
        Ok(())
    }

    #[test]
    fn left_over_chunks_of_a_shrunk_record_are_deleted() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        store.upsert(&[
            doc("r#0", "r", 0, vector(0, 1, 0.0)),
            doc("r#1", "r", 1, vector(1, 0, 0.0)),
            doc("r#2", "r", 2, vector(2, 0, 0.0)),
            doc("s", "s", 0, vector(3, 0, 0.0)),
        ])?;
        assert_eq!(store.retain_chunks("r", &["r#0", "s"])?, 2);
        assert_eq!(store.len(), 2);
        let ids: Vec<String> = store
            .search(&vector(1, 0, 0.0), 4)?
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert!(ids.contains(&"r#0".to_owned()) && ids.contains(&"s".to_owned()));
        assert!(!ids.iter().any(|id| id == "r#1" || id == "r#2"), "{ids:?}");
        assert_eq!(store.retain_chunks("r", &[])?, 1);
        assert_eq!(store.retain_chunks("nothing", &[])?, 0);
        assert_eq!(store.len(), 1);
        Ok(())
    }

    #[test]
    fn a_reopened_store_has_its_documents_with_or_without_the_saved_graph() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = Store::open(dir.path(), "test-model", 4)?;
            store.upsert(&[
                doc("a", "a", 0, vector(0, 1, 0.0)),
                doc("b", "b", 0, vector(1, 0, 0.0)),
            ])?;
            store.save()?;
            // Written after the save: the saved graph is stale and must not be used.
            store.upsert(&[doc("c", "c", 0, vector(2, 0, 0.0))])?;
        }
        let store = Store::open(dir.path(), "test-model", 4)?;
        assert_eq!(store.len(), 3, "rebuilt from the database");
        assert_eq!(store.search(&vector(2, 0, 0.0), 1)?[0].id, "c");
        let mut store = store;
        store.save()?;
        drop(store);
        let store = Store::open(dir.path(), "test-model", 4)?;
        assert_eq!(store.len(), 3, "loaded from the saved graph");
        assert_eq!(store.search(&vector(1, 0, 0.0), 1)?[0].id, "b");
        Ok(())
    }

    #[test]
    fn a_store_of_another_model_is_refused_with_what_to_do() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        drop(Store::open(dir.path(), "test-model", 4)?);
        let Err(e) = Store::open(dir.path(), "other-model", 8) else {
            anyhow::bail!("opened a store of another model");
        };
        let message = e.to_string();
        assert!(message.contains("test-model") && message.contains("other-model"));
        assert!(
            message.contains("use another --store directory"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn full_text_search_follows_inserts_updates_and_deletes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        let mut bread = doc("a", "a", 0, vector(0, 1, 0.0));
        bread.text = "Sourdough bread rises slowly in a cold kitchen".into();
        let mut kafka = doc("b", "b", 0, vector(1, 0, 0.0));
        kafka.text = "Consumers rebalance when a partition moves".into();
        store.upsert(&[bread.clone(), kafka])?;
        let ids = |hits: Vec<Hit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
        // Stemmed: "rising" finds "rises"; punctuation is not query syntax.
        assert_eq!(ids(store.lexical("rising (bread)?", 5, |_| true)?), ["a"]);
        assert_eq!(ids(store.lexical("partitions", 5, |_| true)?), ["b"]);
        assert!(store.lexical("\"*:-", 5, |_| true)?.is_empty());
        bread.text = "Pizza dough in a hot oven".into();
        store.upsert(&[bread])?;
        assert!(
            store.lexical("sourdough", 5, |_| true)?.is_empty(),
            "the old text is gone"
        );
        assert_eq!(ids(store.lexical("oven", 5, |_| true)?), ["a"]);
        store.retain_chunks("a", &[])?;
        assert!(store.lexical("oven", 5, |_| true)?.is_empty(), "deleted");
        Ok(())
    }

    #[test]
    fn a_store_made_before_full_text_gets_it_filled_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut store = Store::open(dir.path(), "test-model", 4)?;
            store.upsert(&[doc("a", "a", 0, vector(0, 1, 0.0))])?;
            store.db.execute_batch(
                "DROP TRIGGER documents_fts_insert; DROP TRIGGER documents_fts_delete;
                 DROP TRIGGER documents_fts_update; DROP TABLE documents_fts;",
            )?;
        }
        let store = Store::open(dir.path(), "test-model", 4)?;
        let hits = store.lexical("text", 5, |_| true)?;
        assert_eq!(hits.len(), 1, "{hits:?}");
        Ok(())
    }

    #[test]
    fn a_filtered_search_ranks_only_the_allowed_documents() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = Store::open(dir.path(), "test-model", 4)?;
        store.upsert(&[
            doc("a", "a", 0, vector(0, 1, 0.0)),
            doc("b", "b", 0, vector(0, 1, 0.3)),
            doc("c", "c", 0, vector(1, 0, 0.0)),
        ])?;
        let keys: std::collections::HashMap<String, u64> = store
            .catalog()?
            .into_iter()
            .map(|entry| (entry.parent_id, entry.key))
            .collect();
        let allowed = std::collections::HashSet::from([keys["b"], keys["c"]]);
        let hits = store.search_among(&vector(0, 1, 0.0), 3, &allowed)?;
        let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"], "a is nearest but not allowed");
        assert!(hits[0].score > 0.9 && hits[0].score < 1.0, "{hits:?}");
        assert!(
            store
                .search_among(&vector(0, 1, 0.0), 3, &Default::default())?
                .is_empty()
        );
        Ok(())
    }
}
