//! Searches of a pipeline's OpenSearch index: the query bodies, the filters resolved against
//! the index's mapping, and the hits read back.

use serde_json::{Map, Value, json};
use tokio::sync::RwLock;
use vectorpipe_crds::v1alpha1::{KnnEngine, OpenSearchSink};

use super::{Backend, Filter, Hit, QueryError};
use crate::sink::opensearch::OpenSearchIndex;
use crate::sink::{
    CHUNK_FIELD, CHUNKS_FIELD, DOC_ID_FIELD, PARENT_ID_FIELD, SOURCE_KEY_FIELD, SinkError,
    WRITTEN_AT_FIELD,
};

/// A cluster pipeline's OpenSearch index as a search [`Backend`].
pub struct OpenSearchBackend {
    spec: OpenSearchSink,
    index: OpenSearchIndex,
    /// The index's fields, read when the server starts and again when a filter names a field
    /// they lack (documents with a new metadata field add it to the mapping).
    fields: RwLock<Option<Fields>>,
}

impl OpenSearchBackend {
    /// Searches `index`, the pipeline's sink `spec`.
    pub fn new(spec: OpenSearchSink, index: OpenSearchIndex) -> Self {
        Self {
            spec,
            index,
            fields: RwLock::new(None),
        }
    }

    async fn reload_fields(&self) -> Result<Fields, QueryError> {
        let (status, text) = self.index.mapping().await.map_err(unreachable)?;
        match status {
            200..=299 => {}
            404 => {
                return Err(QueryError::Unavailable(format!(
                    "the index {:?} does not exist yet; the pipeline's workers create it with their first documents",
                    self.spec.index
                )));
            }
            status => return Err(refused("reading the mapping", status, &text)),
        }
        let answer: Value = serde_json::from_str(&text).map_err(|e| {
            QueryError::Unavailable(format!("OpenSearch answered an unreadable mapping: {e}"))
        })?;
        let fields = Fields::from_mapping(&answer, &self.spec.index);
        *self.fields.write().await = Some(fields.clone());
        Ok(fields)
    }

    async fn run(&self, body: Value) -> Result<Vec<Hit>, QueryError> {
        let (status, text) = self.index.search(body).await.map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(refused("the search", status, &text));
        }
        let answer: Value = serde_json::from_str(&text).map_err(|e| {
            QueryError::Unavailable(format!("OpenSearch answered an unreadable search: {e}"))
        })?;
        Ok(hits_of(&self.spec, &answer))
    }
}

impl Backend for OpenSearchBackend {
    type Filter = Vec<Value>;

    fn name(&self) -> &str {
        &self.spec.index
    }

    async fn prepare(&self) -> Result<(), QueryError> {
        self.reload_fields().await.map(|_| ())
    }

    /// The filter clauses; the mapping is read again when the filter names a field it lacks.
    async fn filter(&self, filter: &Filter) -> Result<Vec<Value>, QueryError> {
        let known = self.fields.read().await.clone().filter(|fields| {
            filter
                .term
                .keys()
                .chain(filter.range.keys())
                .all(|name| fields.knows(name))
        });
        let fields = match known {
            Some(fields) => fields,
            None => self.reload_fields().await?,
        };
        filter_clauses(filter, &fields)
    }

    async fn nearest(
        &self,
        vector: Vec<f32>,
        k: usize,
        filter: &Vec<Value>,
    ) -> Result<Vec<Hit>, QueryError> {
        self.run(knn_body(&self.spec, &vector, k, filter.clone()))
            .await
    }

    async fn lexical(
        &self,
        text: &str,
        k: usize,
        filter: &Vec<Value>,
    ) -> Result<Vec<Hit>, QueryError> {
        self.run(lexical_body(&self.spec, text, k, filter.clone()))
            .await
    }
}

fn unreachable(e: SinkError) -> QueryError {
    QueryError::Unavailable(format!("OpenSearch cannot be reached: {e}"))
}

/// An OpenSearch answer other than 2xx: the request's fault for a 400, else the cluster's.
fn refused(what: &str, status: u16, text: &str) -> QueryError {
    let reason = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            let root = &v["error"]["root_cause"][0];
            let cause = if root.is_object() { root } else { &v["error"] };
            cause["reason"].as_str().map(str::to_owned)
        })
        .unwrap_or_else(|| text.chars().take(300).collect());
    match status {
        400 => QueryError::Invalid(format!("OpenSearch refused {what}: {reason}")),
        401 | 403 => QueryError::Misconfigured(format!(
            "OpenSearch refused {what} ({status}: {reason}): give the query server's credentials read access to the index"
        )),
        _ => QueryError::Unavailable(format!(
            "OpenSearch answered {what} with {status}: {reason}"
        )),
    }
}

/// What a filter needs to know of a field of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// Exact values: keyword, numbers, dates, booleans, ip.
    Exact,
    /// Full text with an exact sub-field (dynamic mapping gives strings `.keyword`).
    TextWithKeyword(String),
    /// Full text only: no exact match possible.
    Text,
    /// Anything else (objects, vectors).
    Other(String),
}

/// The fields of an index's mapping by dotted path (`GET /<index>/_mapping`).
#[derive(Clone, Debug, Default)]
pub struct Fields(pub std::collections::BTreeMap<String, FieldKind>);

impl Fields {
    /// Reads the fields of `index` from a `_mapping` answer.
    pub fn from_mapping(answer: &Value, index: &str) -> Self {
        // The answer is keyed by the concrete index (an alias answers with the index behind it).
        let mappings = answer
            .get(index)
            .or_else(|| answer.as_object().and_then(|o| o.values().next()))
            .map(|i| &i["mappings"]["properties"]);
        let mut fields = std::collections::BTreeMap::new();
        if let Some(Value::Object(properties)) = mappings {
            collect(properties, "", &mut fields);
        }
        Self(fields)
    }

    /// The field a term filter on `name` must use.
    fn exact(&self, name: &str) -> Result<String, QueryError> {
        match self.0.get(name) {
            Some(FieldKind::Exact) => Ok(name.to_owned()),
            Some(FieldKind::TextWithKeyword(sub)) => Ok(sub.clone()),
            Some(FieldKind::Text) => Err(QueryError::Invalid(format!(
                "filter.term.{name}: the field is full text without a keyword sub-field, so no value matches it exactly; filter on a keyword field, or map {name} as keyword"
            ))),
            Some(FieldKind::Other(kind)) => Err(QueryError::Invalid(format!(
                "filter.term.{name}: the field is of type {kind}, which a term filter cannot match"
            ))),
            None => Err(self.unknown(name, "term")),
        }
    }

    fn unknown(&self, name: &str, filter: &str) -> QueryError {
        let known: Vec<&str> = self
            .0
            .iter()
            .filter(|(_, kind)| !matches!(kind, FieldKind::Other(_)))
            .map(|(name, _)| name.as_str())
            .collect();
        QueryError::Invalid(format!(
            "filter.{filter}.{name}: the index has no such field (it has: {}); check the name against the pipeline's transform.metadata",
            known.join(", ")
        ))
    }

    /// Whether the mapping knows `name` (a new metadata field may appear after it was read).
    pub fn knows(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

fn collect(
    properties: &Map<String, Value>,
    prefix: &str,
    out: &mut std::collections::BTreeMap<String, FieldKind>,
) {
    for (name, field) in properties {
        let path = format!("{prefix}{name}");
        if let Some(Value::Object(inner)) = field.get("properties") {
            collect(inner, &format!("{path}."), out);
            continue;
        }
        let kind = match field["type"].as_str().unwrap_or("object") {
            "keyword" | "constant_keyword" | "long" | "integer" | "short" | "byte" | "double"
            | "float" | "half_float" | "scaled_float" | "unsigned_long" | "date" | "date_nanos"
            | "boolean" | "ip" => FieldKind::Exact,
            "text" | "match_only_text" => {
                let keyword = field["fields"].as_object().and_then(|subs| {
                    subs.iter()
                        .find(|(_, sub)| sub["type"] == "keyword")
                        .map(|(sub, _)| format!("{path}.{sub}"))
                });
                match keyword {
                    Some(sub) => FieldKind::TextWithKeyword(sub),
                    None => FieldKind::Text,
                }
            }
            other => FieldKind::Other(other.to_owned()),
        };
        out.insert(path, kind);
    }
}

/// The filter clauses of `filter` for this index (every clause must match).
pub fn filter_clauses(filter: &Filter, fields: &Fields) -> Result<Vec<Value>, QueryError> {
    let mut clauses = Vec::new();
    for (name, value) in &filter.term {
        let field = fields.exact(name)?;
        clauses.push(match value {
            Value::Array(values) => json!({"terms": {field: values}}),
            value => json!({"term": {field: value}}),
        });
    }
    for (name, range) in &filter.range {
        match fields.0.get(name) {
            Some(FieldKind::Exact) => {}
            Some(_) => {
                return Err(QueryError::Invalid(format!(
                    "filter.range.{name}: the field is not a date or a number; range filters need one"
                )));
            }
            None => return Err(fields.unknown(name, "range")),
        }
        clauses.push(json!({"range": {name: range}}));
    }
    Ok(clauses)
}

/// Fields of a stored document that are not its metadata.
fn internal(spec: &OpenSearchSink, name: &str) -> bool {
    name == spec.vector_field
        || name == spec.text_field
        || [
            PARENT_ID_FIELD,
            CHUNK_FIELD,
            CHUNKS_FIELD,
            SOURCE_KEY_FIELD,
            DOC_ID_FIELD,
            WRITTEN_AT_FIELD,
        ]
        .contains(&name)
}

/// The fewest candidates a k-NN search walks the graph for. Lucene's HNSW search keeps only
/// `k` candidates while it walks, so a small `k` can stop in a cluster of near-duplicates that
/// is not the nearest one (seen with 60 posts and `k: 4`). More candidates cost little; `size`
/// still returns `k` hits.
pub const MIN_KNN_CANDIDATES: usize = 100;

/// The k-NN search of `vector` with the filter clauses. Lucene and Faiss filter while they
/// search (the `k` nearest among the matching documents); nmslib cannot, so its filter runs
/// after the search and may leave fewer than `k` hits (fewer, with more candidates).
pub fn knn_body(spec: &OpenSearchSink, vector: &[f32], k: usize, filters: Vec<Value>) -> Value {
    let source = json!({"excludes": [spec.vector_field]});
    let field = spec.vector_field.as_str();
    let candidates = k.max(MIN_KNN_CANDIDATES);
    if filters.is_empty() {
        return json!({"size": k, "_source": source,
            "query": {"knn": {field: {"vector": vector, "k": candidates}}}});
    }
    match spec.method.engine {
        KnnEngine::Lucene | KnnEngine::Faiss => json!({"size": k, "_source": source,
            "query": {"knn": {field: {"vector": vector, "k": candidates,
                "filter": {"bool": {"filter": filters}}}}}}),
        KnnEngine::Nmslib => json!({"size": k, "_source": source,
        "query": {"bool": {
            "must": [{"knn": {field: {"vector": vector, "k": candidates}}}],
            "filter": filters,
        }}}),
    }
}

/// The full-text search of `query` in the text field with the filter clauses.
pub fn lexical_body(spec: &OpenSearchSink, query: &str, k: usize, filters: Vec<Value>) -> Value {
    json!({"size": k, "_source": {"excludes": [spec.vector_field]},
    "query": {"bool": {
        "must": [{"match": {spec.text_field.as_str(): {"query": query}}}],
        "filter": filters,
    }}})
}

/// The hits of a `_search` answer.
pub fn hits_of(spec: &OpenSearchSink, answer: &Value) -> Vec<Hit> {
    let Some(hits) = answer["hits"]["hits"].as_array() else {
        return Vec::new();
    };
    hits.iter()
        .map(|hit| {
            let source = &hit["_source"];
            // With ids picked by OpenSearch (Serverless) the document keeps its own in docId.
            let id = source[DOC_ID_FIELD]
                .as_str()
                .or_else(|| hit["_id"].as_str())
                .unwrap_or_default()
                .to_owned();
            let metadata = source
                .as_object()
                .map(|fields| {
                    fields
                        .iter()
                        .filter(|(name, _)| !internal(spec, name))
                        .map(|(name, value)| (name.clone(), value.clone()))
                        .collect()
                })
                .unwrap_or_default();
            Hit {
                parent_id: source[PARENT_ID_FIELD]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| id.clone()),
                id,
                chunk: source[CHUNK_FIELD].as_u64().unwrap_or_default(),
                score: hit["_score"].as_f64().unwrap_or_default(),
                text: source[spec.text_field.as_str()]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                metadata,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Range;

    fn spec(engine: KnnEngine) -> OpenSearchSink {
        let mut spec: OpenSearchSink =
            serde_json::from_value(json!({"endpoints": ["http://x"], "index": "posts"})).unwrap();
        spec.method.engine = engine;
        spec
    }

    fn mapping() -> Value {
        json!({"posts-v1": {"mappings": {"properties": {
            "embedding": {"type": "knn_vector", "dimension": 4},
            "text": {"type": "text"},
            "parentId": {"type": "keyword"},
            "@timestamp": {"type": "date"},
            "likes": {"type": "long"},
            "topic": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
            "author": {"properties": {"name": {"type": "keyword"}}}
        }}}})
    }

    #[test]
    fn term_filters_use_the_exact_field_and_unknown_fields_name_the_known_ones() {
        let fields = Fields::from_mapping(&mapping(), "posts");
        let filter = Filter {
            term: [
                ("topic".to_owned(), json!("rust")),
                ("author.name".to_owned(), json!(["ann", "bo"])),
            ]
            .into(),
            range: [(
                "@timestamp".to_owned(),
                Range {
                    gte: Some(json!("2026-01-01")),
                    ..Range::default()
                },
            )]
            .into(),
        };
        let clauses = filter_clauses(&filter, &fields).unwrap();
        assert_eq!(
            clauses,
            [
                json!({"terms": {"author.name": ["ann", "bo"]}}),
                json!({"term": {"topic.keyword": "rust"}}),
                json!({"range": {"@timestamp": {"gte": "2026-01-01"}}}),
            ]
        );
        let unknown = Filter {
            term: [("topik".to_owned(), json!("rust"))].into(),
            ..Filter::default()
        };
        let error = filter_clauses(&unknown, &fields).unwrap_err().to_string();
        assert!(
            error.contains("topik") && error.contains("likes, parentId"),
            "{error}"
        );
        let text = Filter {
            term: [("text".to_owned(), json!("rust"))].into(),
            ..Filter::default()
        };
        assert!(
            filter_clauses(&text, &fields)
                .unwrap_err()
                .to_string()
                .contains("without a keyword sub-field")
        );
        let range_on_text = Filter {
            range: [(
                "topic".to_owned(),
                Range {
                    lt: Some(json!(3)),
                    ..Range::default()
                },
            )]
            .into(),
            ..Filter::default()
        };
        assert!(filter_clauses(&range_on_text, &fields).is_err());
    }

    /// Seven hits, found among at least a hundred candidates, for every engine and with or
    /// without filters.
    #[test]
    fn a_small_k_still_searches_many_candidates() {
        let filters = vec![json!({"term": {"likes": 3}})];
        for engine in [KnnEngine::Lucene, KnnEngine::Faiss, KnnEngine::Nmslib] {
            for filters in [vec![], filters.clone()] {
                let body = knn_body(&spec(engine), &[0.5], 7, filters);
                let knn = body["query"]["knn"]["embedding"].clone();
                let knn = if knn.is_null() {
                    body["query"]["bool"]["must"][0]["knn"]["embedding"].clone()
                } else {
                    knn
                };
                assert_eq!(
                    (body["size"].as_u64(), knn["k"].as_u64()),
                    (Some(7), Some(MIN_KNN_CANDIDATES as u64)),
                    "{body}"
                );
            }
        }
        let large = knn_body(&spec(KnnEngine::Lucene), &[0.5], 500, vec![]);
        assert_eq!(large["query"]["knn"]["embedding"]["k"], 500);
    }

    #[test]
    fn lucene_filters_inside_the_knn_search_and_nmslib_after_it() {
        let filters = vec![json!({"term": {"likes": 3}})];
        let lucene = knn_body(&spec(KnnEngine::Lucene), &[0.5], 7, filters.clone());
        assert_eq!(
            lucene["query"]["knn"]["embedding"]["filter"]["bool"]["filter"][0],
            filters[0]
        );
        assert_eq!(lucene["_source"]["excludes"][0], "embedding");
        let nmslib = knn_body(&spec(KnnEngine::Nmslib), &[0.5], 7, filters.clone());
        assert_eq!(nmslib["query"]["bool"]["filter"][0], filters[0]);
        let plain = knn_body(&spec(KnnEngine::Lucene), &[0.5], 7, vec![]);
        assert!(plain["query"]["knn"]["embedding"].get("filter").is_none());
    }

    #[test]
    fn hits_carry_ids_text_and_only_the_metadata() {
        let answer = json!({"hits": {"hits": [
            {"_id": "a#1", "_score": 0.8, "_source": {"text": "hello", "parentId": "a",
                "chunk": 1, "chunks": 2, "likes": 3, "@timestamp": "2026-01-01T00:00:00Z"}},
            {"_id": "generated", "_score": 0.5, "_source": {"text": "x", "parentId": "b",
                "docId": "b", "writtenAt": 5}}
        ]}});
        let hits = hits_of(&spec(KnnEngine::Lucene), &answer);
        assert_eq!(hits[0].id, "a#1");
        assert_eq!(hits[0].parent_id, "a");
        assert_eq!(hits[0].chunk, 1);
        assert_eq!(hits[0].text, "hello");
        assert_eq!(
            hits[0].metadata.keys().collect::<Vec<_>>(),
            ["@timestamp", "likes"]
        );
        assert_eq!(hits[1].id, "b", "Serverless: the document's own id");
        assert!(hits[1].metadata.is_empty());
    }
}
