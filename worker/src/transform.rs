//! From a Kafka record to the documents it becomes (or the reason it becomes none).
//!
//! Pure functions: no I/O, so every rule is covered by table tests.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use vectorpipe_crds::v1alpha1::{
    ChunkingStrategy, EmbeddingPipelineSpec, IdSource, OnMissingField, RecordFormat,
};

use crate::chunk;

/// OpenSearch refuses `_id`s over 512 bytes; ids longer than this (leaving room for a chunk
/// suffix) are replaced by their hash.
pub const MAX_ID_BYTES: usize = 480;
/// A record that splits into more chunks than this goes to the dead-letter topic as too large.
pub const MAX_CHUNKS_PER_RECORD: usize = 1024;

/// A record as read from Kafka.
#[derive(Clone, Debug)]
pub struct SourceRecord<'a> {
    /// Its topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, if any.
    pub key: Option<&'a [u8]>,
    /// Its value; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// The Kafka timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Where a redriven record was first read (topic, partition, offset): its positional id is
    /// that position's, so a redrive writes the ids the record would have had.
    pub origin: Option<(&'a str, i32, i64)>,
}

/// One text to embed and index.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// The OpenSearch `_id`: the record id, or `<id>#<n>` for chunk `n` of a split record.
    pub id: String,
    /// The record id, shared by all chunks of a record.
    pub parent_id: String,
    /// The chunk's position in the record.
    pub chunk: usize,
    /// How many chunks the record has (all its ids follow from this and the parent id).
    pub chunks: usize,
    /// The text to embed.
    pub text: String,
    /// The `@timestamp` value.
    pub timestamp: Option<Value>,
    /// Extra fields from the spec's `transform.metadata`.
    pub metadata: Map<String, Value>,
    /// The record's Kafka key, when ids come from `idPointer` and the key differs from the id:
    /// stored with the document so that the key's tombstone finds it.
    pub source_key: Option<String>,
}

/// Why a record goes to the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectionKind {
    /// The value is not valid JSON / UTF-8, or not an object.
    Parse,
    /// A field the transform needs is missing.
    MissingField,
    /// The embedding model refused the text.
    EmbeddingRejected,
    /// The embedding model failed on the text on every attempt (a model error, an answer that
    /// cannot be read).
    EmbeddingFailed,
    /// OpenSearch refused the document.
    IndexRejected,
    /// The record is too large to process.
    TooLarge,
    /// A tombstone that cannot find its documents (ids are not keys in this pipeline).
    UnresolvableTombstone,
}

impl RejectionKind {
    /// Every kind.
    pub const ALL: [Self; 7] = [
        Self::Parse,
        Self::MissingField,
        Self::EmbeddingRejected,
        Self::EmbeddingFailed,
        Self::IndexRejected,
        Self::TooLarge,
        Self::UnresolvableTombstone,
    ];

    /// The value of the `vectorpipe.reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parse => "parse",
            Self::MissingField => "missing-field",
            Self::EmbeddingRejected => "embedding-rejected",
            Self::EmbeddingFailed => "embedding-failed",
            Self::IndexRejected => "index-rejected",
            Self::TooLarge => "too-large",
            Self::UnresolvableTombstone => "unresolvable-tombstone",
        }
    }
}

/// A record that cannot be indexed, with what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The reason class.
    pub kind: RejectionKind,
    /// What went wrong, for people.
    pub message: String,
}

/// Why a record was skipped on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Its text is empty or only whitespace.
    EmptyText,
    /// A filter matched.
    Filtered,
    /// A field was missing and the spec says to skip such records.
    MissingField,
    /// A tombstone without a key: nothing to delete.
    TombstoneWithoutKey,
}

impl SkipReason {
    /// Every reason.
    pub const ALL: [Self; 4] = [
        Self::EmptyText,
        Self::Filtered,
        Self::MissingField,
        Self::TombstoneWithoutKey,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyText => "empty-text",
            Self::Filtered => "filtered",
            Self::MissingField => "missing-field",
            Self::TombstoneWithoutKey => "tombstone-without-key",
        }
    }
}

/// What a record becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Documents to embed and index (one per chunk).
    Index(Vec<Document>),
    /// A tombstone: delete every document whose parent id is this.
    Delete(String),
    /// Nothing, on purpose.
    Skip(SkipReason),
    /// The dead-letter topic.
    Reject(Rejection),
}

fn reject(kind: RejectionKind, message: impl Into<String>) -> Outcome {
    Outcome::Reject(Rejection {
        kind,
        message: message.into(),
    })
}

/// The record id used when the spec has no `idPointer`.
pub fn positional_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}-{partition}-{offset}")
}

/// Keeps ids within OpenSearch's limit: long ids become `sha256-<hex>` of themselves.
pub fn bounded_id(id: String) -> String {
    if id.len() <= MAX_ID_BYTES {
        id
    } else {
        format!("sha256-{}", hex::encode(Sha256::digest(id.as_bytes())))
    }
}

/// A JSON value as text: strings as they are, numbers and booleans in their JSON form.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The record's key as text, when it has a non-empty one.
pub fn key_text(record: &SourceRecord<'_>) -> Option<String> {
    record
        .key
        .filter(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
}

/// The record id from the key (`transform.idFromKey`), or what a missing key becomes.
fn id_from_key(
    spec: &EmbeddingPipelineSpec,
    record: &SourceRecord<'_>,
    positional: impl FnOnce() -> String,
) -> Result<String, Outcome> {
    match key_text(record) {
        Some(key) => Ok(key),
        None => match spec.transform.on_missing_field {
            OnMissingField::Skip => Err(Outcome::Skip(SkipReason::MissingField)),
            OnMissingField::DeadLetter => Err(reject(
                RejectionKind::MissingField,
                "the record has no key, and transform.idFromKey takes the id from the key; key the record, or unset idFromKey",
            )),
            OnMissingField::EmbedWholeRecord => Ok(positional()),
        },
    }
}

/// Turns one record into its outcome.
pub fn transform(spec: &EmbeddingPipelineSpec, record: &SourceRecord<'_>) -> Outcome {
    let ids = spec.id_source();
    let Some(payload) = record.payload else {
        return match key_text(record) {
            None => Outcome::Skip(SkipReason::TombstoneWithoutKey),
            // Ids are positions, so no document has this key as its id: say so instead of
            // counting a delete that can never find anything.
            Some(key) if ids == IdSource::Position => reject(
                RejectionKind::UnresolvableTombstone,
                format!(
                    "a tombstone for key {key:?} cannot be applied: this pipeline's document ids are <topic>-<partition>-<offset>, not record keys; set transform.idFromKey: true (ids are the record keys) or transform.idPointer to the field that holds the same id as the key"
                ),
            ),
            Some(key) => Outcome::Delete(bounded_id(key)),
        };
    };
    let Ok(text) = std::str::from_utf8(payload) else {
        return reject(
            RejectionKind::Parse,
            "the record value is not valid UTF-8; producers must write UTF-8 JSON or text",
        );
    };
    let t = &spec.transform;
    let positional = || match record.origin {
        Some((topic, partition, offset)) => positional_id(topic, partition, offset),
        None => positional_id(record.topic, record.partition, record.offset),
    };
    let (parent_id, body, timestamp, metadata) = match spec.source.kafka.format {
        RecordFormat::Text => (
            match ids {
                IdSource::Key => match id_from_key(spec, record, positional) {
                    Ok(id) => id,
                    Err(outcome) => return outcome,
                },
                IdSource::Pointer | IdSource::Position => positional(),
            },
            text.to_owned(),
            record.timestamp_ms.map(Value::from),
            Map::new(),
        ),
        RecordFormat::Json => {
            let value: Value = match serde_json::from_str(text) {
                Ok(v @ Value::Object(_)) => v,
                Ok(other) => {
                    return reject(
                        RejectionKind::Parse,
                        format!(
                            "the record value is JSON but not an object (found {}); records must be JSON objects",
                            kind_of(&other)
                        ),
                    );
                }
                Err(e) => {
                    return reject(
                        RejectionKind::Parse,
                        format!("the record value is not valid JSON: {e}"),
                    );
                }
            };
            for filter in &t.filters {
                let field = value.pointer(&filter.pointer);
                let skip = if let Some(exists) = filter.exists {
                    field.is_some() == exists
                } else if let Some(equals) = &filter.equals {
                    field.and_then(scalar_text).as_deref() == Some(equals.as_str())
                } else if let Some(not_equals) = &filter.not_equals {
                    field.and_then(scalar_text).as_deref() != Some(not_equals.as_str())
                } else {
                    false
                };
                if skip {
                    return Outcome::Skip(SkipReason::Filtered);
                }
            }
            let parent_id = match &t.id_pointer {
                None if ids == IdSource::Key => match id_from_key(spec, record, positional) {
                    Ok(id) => id,
                    Err(outcome) => return outcome,
                },
                None => positional(),
                Some(pointer) => match value.pointer(pointer).and_then(scalar_text) {
                    Some(id) if !id.is_empty() => id,
                    _ => match t.on_missing_field {
                        OnMissingField::Skip => return Outcome::Skip(SkipReason::MissingField),
                        OnMissingField::DeadLetter => {
                            return reject(
                                RejectionKind::MissingField,
                                format!(
                                    "the id field {pointer} is missing, empty or not a string/number"
                                ),
                            );
                        }
                        OnMissingField::EmbedWholeRecord => positional(),
                    },
                },
            };
            let mut parts = Vec::with_capacity(t.text_pointers.len());
            let mut missing = None;
            for pointer in &t.text_pointers {
                match value.pointer(pointer).and_then(scalar_text) {
                    Some(part) => parts.push(part),
                    None => missing = missing.or(Some(pointer.as_str())),
                }
            }
            let body = match (missing, t.on_missing_field) {
                (None, _) => parts.join("\n\n"),
                (Some(_), OnMissingField::Skip) => return Outcome::Skip(SkipReason::MissingField),
                (Some(pointer), OnMissingField::DeadLetter) => {
                    return reject(
                        RejectionKind::MissingField,
                        format!("the text field {pointer} is missing or not a string/number"),
                    );
                }
                (Some(_), OnMissingField::EmbedWholeRecord) => text.to_owned(),
            };
            let timestamp = t
                .timestamp_pointer
                .as_ref()
                .and_then(|p| value.pointer(p).cloned())
                .filter(|v| v.is_string() || v.is_number())
                .or_else(|| record.timestamp_ms.map(Value::from));
            let metadata = t
                .metadata
                .iter()
                .filter_map(|(field, pointer)| {
                    value.pointer(pointer).map(|v| (field.clone(), v.clone()))
                })
                .collect();
            (parent_id, body, timestamp, metadata)
        }
    };
    if t.skip_empty_text && body.trim().is_empty() {
        return Outcome::Skip(SkipReason::EmptyText);
    }
    let parent_id = bounded_id(parent_id);
    // A text longer than the largest chunk times the chunk limit can only split into too many
    // chunks: refuse it before spending time splitting it.
    let chars = body.chars().count();
    let max_chunk = spec.chunking.max_chars.max(1) as usize;
    if spec.chunking.strategy != ChunkingStrategy::None && chars > max_chunk * MAX_CHUNKS_PER_RECORD
    {
        return reject(
            RejectionKind::TooLarge,
            format!(
                "the text has {chars} characters, more than {MAX_CHUNKS_PER_RECORD} chunks of chunking.maxChars ({max_chunk}); raise chunking.maxChars or split the record upstream"
            ),
        );
    }
    let model_limit = spec.embedding.bedrock.family().max_input_chars();
    let chunks = chunk::split(&body, &spec.chunking, model_limit);
    if chunks.len() > MAX_CHUNKS_PER_RECORD {
        return reject(
            RejectionKind::TooLarge,
            format!(
                "the text splits into {} chunks, more than the {MAX_CHUNKS_PER_RECORD} allowed per record; raise chunking.maxChars or split the record upstream",
                chunks.len()
            ),
        );
    }
    if chunks.is_empty() {
        // Only whitespace (kept by skipEmptyText: false) that the splitter trimmed away.
        return Outcome::Skip(SkipReason::EmptyText);
    }
    let source_key = (ids == IdSource::Pointer)
        .then(|| key_text(record).map(bounded_id))
        .flatten()
        .filter(|key| *key != parent_id);
    let single = chunks.len() == 1;
    let count = chunks.len();
    let documents = chunks
        .into_iter()
        .enumerate()
        .map(|(n, text)| Document {
            id: if single {
                parent_id.clone()
            } else {
                format!("{parent_id}#{n}")
            },
            parent_id: parent_id.clone(),
            chunk: n,
            chunks: count,
            text,
            timestamp: timestamp.clone(),
            metadata: metadata.clone(),
            source_key: source_key.clone(),
        })
        .collect();
    Outcome::Index(documents)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: Value) -> EmbeddingPipelineSpec {
        let mut base = json!({
            "source": {"kafka": {"bootstrapServers": ["k:9092"], "topics": ["posts"]}},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0"}},
            "sink": {"opensearch": {"endpoints": ["http://os:9200"], "index": "docs"}},
            "chunking": {"strategy": "none"}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut Value, extra: Value) {
        if let (Value::Object(b), Value::Object(e)) = (base, extra) {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
    }

    fn record(payload: Option<&str>) -> SourceRecord<'_> {
        SourceRecord {
            topic: "posts",
            partition: 2,
            offset: 41,
            key: Some(b"k-1"),
            payload: payload.map(str::as_bytes),
            timestamp_ms: Some(1_700_000_000_000),
            origin: None,
        }
    }

    #[test]
    fn whitespace_that_chunks_into_nothing_is_skipped_not_indexed() {
        // skipEmptyText: false keeps whitespace-only texts, and the splitters trim them to no
        // chunks at all: the record is skipped with a reason (it used to crash the worker).
        for strategy in ["recursive", "sentences"] {
            let spec = spec(json!({
                "transform": {"textPointers": ["/text"], "skipEmptyText": false},
                "chunking": {"strategy": strategy, "maxChars": 200, "overlapChars": 0}
            }));
            let text = json!({"text": " ".repeat(3000)}).to_string();
            assert_eq!(
                transform(&spec, &record(Some(&text))),
                Outcome::Skip(SkipReason::EmptyText),
                "{strategy}"
            );
        }
    }

    fn documents(outcome: Outcome) -> Vec<Document> {
        match outcome {
            Outcome::Index(docs) => docs,
            other => panic!("expected documents, got {other:?}"),
        }
    }

    #[test]
    fn a_json_record_becomes_one_document_with_its_fields() {
        let spec = spec(json!({"transform": {
            "idPointer": "/id",
            "textPointers": ["/title", "/body"],
            "timestampPointer": "/created_at",
            "metadata": {"likes": "/metrics/likes", "absent": "/nope"}
        }}));
        let payload = r#"{"id": 7, "title": "Hello", "body": "world", "created_at": "2026-11-27T08:00:00Z", "metrics": {"likes": 3}}"#;
        let docs = documents(transform(&spec, &record(Some(payload))));
        assert_eq!(docs.len(), 1);
        let doc = &docs[0];
        assert_eq!(doc.id, "7");
        assert_eq!(doc.parent_id, "7");
        assert_eq!(doc.text, "Hello\n\nworld");
        assert_eq!(doc.timestamp, Some(json!("2026-11-27T08:00:00Z")));
        assert_eq!(doc.metadata.get("likes"), Some(&json!(3)));
        assert!(!doc.metadata.contains_key("absent"));
    }

    #[test]
    fn without_an_id_pointer_the_id_is_topic_partition_offset() {
        let docs = documents(transform(
            &spec(json!({})),
            &record(Some(r#"{"text": "x"}"#)),
        ));
        assert_eq!(docs[0].id, "posts-2-41");
        // A redriven copy, read elsewhere, keeps the id of where the record was first read.
        let mut redriven = record(Some(r#"{"text": "x"}"#));
        (redriven.partition, redriven.offset) = (0, 9_000);
        redriven.origin = Some(("posts", 2, 41));
        let docs = documents(transform(&spec(json!({})), &redriven));
        assert_eq!(docs[0].id, "posts-2-41");
        assert_eq!(docs[0].timestamp, Some(json!(1_700_000_000_000i64)));
    }

    #[test]
    fn bad_values_are_rejected_with_their_reason() {
        let spec = spec(json!({}));
        let cases: [(&[u8], RejectionKind, &str); 4] = [
            (b"{not json", RejectionKind::Parse, "not valid JSON"),
            (
                b"[1, 2]",
                RejectionKind::Parse,
                "not an object (found an array)",
            ),
            (b"\xff\xfe{}", RejectionKind::Parse, "not valid UTF-8"),
            (
                br#"{"body": "no text field"}"#,
                RejectionKind::MissingField,
                "/text",
            ),
        ];
        for (payload, kind, message) in cases {
            let mut r = record(None);
            r.payload = Some(payload);
            match transform(&spec, &r) {
                Outcome::Reject(rejection) => {
                    assert_eq!(rejection.kind, kind);
                    assert!(rejection.message.contains(message), "{}", rejection.message);
                }
                other => panic!("{payload:?}: expected a rejection, got {other:?}"),
            }
        }
    }

    #[test]
    fn on_missing_field_chooses_skip_dead_letter_or_whole_record() {
        let payload = r#"{"body": "only a body"}"#;
        let skip = spec(json!({"transform": {"onMissingField": "skip"}}));
        assert_eq!(
            transform(&skip, &record(Some(payload))),
            Outcome::Skip(SkipReason::MissingField)
        );
        let whole = spec(json!({"transform": {"onMissingField": "embedWholeRecord"}}));
        assert_eq!(
            documents(transform(&whole, &record(Some(payload))))[0].text,
            payload
        );
    }

    #[test]
    fn filters_and_empty_texts_skip_records() {
        let spec = spec(json!({"transform": {"filters": [
            {"pointer": "/retweet", "equals": "true"},
            {"pointer": "/lang", "notEquals": "en"},
            {"pointer": "/deleted", "exists": true}
        ]}}));
        let cases = [
            (
                r#"{"text": "a", "lang": "en", "retweet": true}"#,
                Some(SkipReason::Filtered),
            ),
            (r#"{"text": "a", "lang": "fr"}"#, Some(SkipReason::Filtered)),
            (r#"{"text": "a"}"#, Some(SkipReason::Filtered)),
            (
                r#"{"text": "a", "lang": "en", "deleted": null}"#,
                Some(SkipReason::Filtered),
            ),
            (
                r#"{"text": "   ", "lang": "en"}"#,
                Some(SkipReason::EmptyText),
            ),
            (r#"{"text": "a", "lang": "en", "retweet": false}"#, None),
        ];
        for (payload, want) in cases {
            let got = transform(&spec, &record(Some(payload)));
            match want {
                Some(reason) => assert_eq!(got, Outcome::Skip(reason), "{payload}"),
                None => assert!(matches!(got, Outcome::Index(_)), "{payload}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_tombstone_deletes_by_key() {
        for transform_spec in [json!({"idPointer": "/id"}), json!({"idFromKey": true})] {
            let spec = spec(json!({ "transform": transform_spec }));
            assert_eq!(
                transform(&spec, &record(None)),
                Outcome::Delete("k-1".into())
            );
            let mut keyless = record(None);
            keyless.key = None;
            assert_eq!(
                transform(&spec, &keyless),
                Outcome::Skip(SkipReason::TombstoneWithoutKey)
            );
        }
    }

    #[test]
    fn documents_keep_their_key_when_it_is_not_their_id() {
        let spec = spec(json!({"transform": {"idPointer": "/id"}}));
        let by_id = |id: &str| json!({"id": id, "text": "hello"}).to_string();
        let other = documents(transform(&spec, &record(Some(&by_id("doc-9")))));
        assert_eq!(other[0].id, "doc-9");
        assert_eq!(other[0].source_key.as_deref(), Some("k-1"));
        let same = documents(transform(&spec, &record(Some(&by_id("k-1")))));
        assert_eq!(same[0].source_key, None, "the id is the key already");
        let keys = spec_with_key_ids();
        let from_key = documents(transform(&keys, &record(Some(&by_id("doc-9")))));
        assert_eq!(
            from_key[0].source_key, None,
            "ids from keys need no source key"
        );
    }

    fn spec_with_key_ids() -> EmbeddingPipelineSpec {
        spec(json!({"transform": {"idFromKey": true}}))
    }

    #[test]
    fn a_tombstone_that_can_find_nothing_is_a_dead_letter_that_says_what_to_set() {
        // Positional ids: no document ever has the key as its id.
        for spec in [
            spec(json!({})),
            spec(
                json!({"source": {"kafka": {"format": "text"}}, "transform": {"idPointer": "/id"}}),
            ),
        ] {
            match transform(&spec, &record(None)) {
                Outcome::Reject(r) => {
                    assert_eq!(r.kind, RejectionKind::UnresolvableTombstone);
                    assert!(r.message.contains("transform.idFromKey"), "{}", r.message);
                }
                other => panic!("a delete that finds nothing: {other:?}"),
            }
        }
    }

    #[test]
    fn with_id_from_key_the_key_is_the_id() {
        let json_spec = spec(json!({"transform": {"idFromKey": true}}));
        let text_spec = spec(
            json!({"source": {"kafka": {"format": "text"}}, "transform": {"idFromKey": true}}),
        );
        let payload = json!({"text": "hello"}).to_string();
        for (spec, payload) in [(&json_spec, payload.as_str()), (&text_spec, "hello")] {
            let docs = documents(transform(spec, &record(Some(payload))));
            assert_eq!(docs[0].id, "k-1");
            assert_eq!(docs[0].parent_id, "k-1");
            let mut keyless = record(Some(payload));
            keyless.key = None;
            match transform(spec, &keyless) {
                Outcome::Reject(r) => {
                    assert_eq!(r.kind, RejectionKind::MissingField);
                    assert!(r.message.contains("no key"), "{}", r.message);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn long_ids_are_hashed_deterministically() {
        let long = "x".repeat(600);
        let a = bounded_id(long.clone());
        assert!(a.starts_with("sha256-") && a.len() < MAX_ID_BYTES);
        assert_eq!(a, bounded_id(long));
        assert_eq!(bounded_id("short".into()), "short");
    }

    #[test]
    fn split_records_get_numbered_chunk_ids() {
        let spec = spec(json!({
            "transform": {"idPointer": "/id"},
            "chunking": {"strategy": "characters", "maxChars": 20, "overlapChars": 0}
        }));
        let payload = json!({"id": "a", "text": "x".repeat(50)}).to_string();
        let docs = documents(transform(&spec, &record(Some(&payload))));
        let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a#0", "a#1", "a#2"]);
        assert!(docs.iter().all(|d| d.parent_id == "a"));
    }

    #[test]
    fn texts_too_long_to_chunk_are_refused_before_splitting() {
        let spec = spec(
            json!({"chunking": {"strategy": "recursive", "maxChars": 100, "overlapChars": 0}}),
        );
        let payload = json!({"text": "word ".repeat(30_000)}).to_string();
        match transform(&spec, &record(Some(&payload))) {
            Outcome::Reject(r) => {
                assert_eq!(r.kind, RejectionKind::TooLarge);
                // The length check, not the splitter, refused it.
                assert!(
                    r.message
                        .contains("150000 characters, more than 1024 chunks"),
                    "{}",
                    r.message
                );
            }
            other => panic!("expected too-large, got {other:?}"),
        }
    }

    #[test]
    fn text_format_embeds_the_whole_value() {
        let mut spec = spec(json!({}));
        spec.source.kafka.format = RecordFormat::Text;
        let docs = documents(transform(&spec, &record(Some("plain words"))));
        assert_eq!(docs[0].text, "plain words");
    }
}
