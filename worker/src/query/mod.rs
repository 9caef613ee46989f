//! The query side of a pipeline: `vectorpipe-worker serve` answers searches over the pipeline's
//! index. A question is embedded with the pipeline's own model and settings (as a search query
//! for models that tell queries from documents), then searched as a k-NN query, as a full-text
//! query, or as both with the scores fused. Metadata filters narrow the candidates inside the
//! k-NN search where the engine allows it.
//!
//! This module holds what does not talk to a server: the request, its checks, the filters, the
//! [`Backend`] a search runs on and the fusion of two ranked lists. `opensearch` searches a
//! cluster pipeline's index, `local` the laptop mode's store, `server` serves either over HTTP.

pub mod ask;
pub mod local;
pub mod opensearch;
pub mod server;

use std::future::Future;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most hits one search may ask for.
pub const MAX_K: usize = 200;

/// A search.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SearchRequest {
    /// The question or text to search for.
    pub query: String,
    /// How many hits (1 to [`MAX_K`]; default 10).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Metadata filters; a hit matches all of them.
    #[serde(default)]
    pub filter: Filter,
    /// vector (default), lexical or hybrid.
    #[serde(default)]
    pub mode: Mode,
    /// Hybrid only: the share of the vector score in the fused score, 0 to 1 (default 0.5).
    #[serde(default)]
    pub weight: Option<f64>,
}

fn default_k() -> usize {
    10
}

/// How a search ranks documents.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nearest vectors of the embedded query.
    #[default]
    Vector,
    /// Full-text relevance (BM25) of the query's words in the text field.
    Lexical,
    /// Both, each list's scores scaled to 0..1 and summed with `weight`.
    Hybrid,
}

/// Metadata filters. Field names are the index's: metadata fields as the transform names them,
/// and `@timestamp`, `parentId`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Field → a value, or a list of values of which one must match exactly.
    #[serde(default)]
    pub term: BTreeMap<String, Value>,
    /// Field → bounds (`gt`, `gte`, `lt`, `lte`): dates (e.g. `2026-01-01`, `now-7d`) or numbers.
    #[serde(default)]
    pub range: BTreeMap<String, Range>,
}

/// Bounds of a range filter.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gt: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gte: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lt: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lte: Option<Value>,
}

/// A search the server will not run: what to change.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request is wrong; the message says what to fix (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The model or the index cannot answer now; the message says which and why (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The model or the cluster refuses the pipeline's settings or credentials: a person must
    /// fix them (HTTP 503; the server does not become ready).
    #[error("{0}")]
    Misconfigured(String),
}

impl SearchRequest {
    /// Checks the request; the error says what to fix.
    pub fn check(&self) -> Result<(), QueryError> {
        if self.query.trim().is_empty() {
            return Err(QueryError::Invalid(
                "query is empty; send the question or text to search for".into(),
            ));
        }
        if !(1..=MAX_K).contains(&self.k) {
            return Err(QueryError::Invalid(format!(
                "k is {}; ask for 1 to {MAX_K} hits",
                self.k
            )));
        }
        if let Some(w) = self.weight {
            if self.mode != Mode::Hybrid {
                return Err(QueryError::Invalid(
                    "weight applies to mode hybrid only; drop it or set mode: hybrid".into(),
                ));
            }
            if !(0.0..=1.0).contains(&w) {
                return Err(QueryError::Invalid(format!(
                    "weight is {w}; give the vector score's share, from 0 (lexical only) to 1 (vector only)"
                )));
            }
        }
        for (field, value) in &self.filter.term {
            let ok = match value {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => true,
                Value::Array(values) => {
                    !values.is_empty()
                        && values.iter().all(|v| {
                            matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
                        })
                }
                _ => false,
            };
            if !ok {
                return Err(QueryError::Invalid(format!(
                    "filter.term.{field} must be a string, number or boolean, or a non-empty list of them"
                )));
            }
        }
        for (field, range) in &self.filter.range {
            if range.gt.is_none()
                && range.gte.is_none()
                && range.lt.is_none()
                && range.lte.is_none()
            {
                return Err(QueryError::Invalid(format!(
                    "filter.range.{field} has no bound; give gt, gte, lt or lte"
                )));
            }
        }
        Ok(())
    }

    /// The share of the vector score in a hybrid search.
    pub fn vector_weight(&self) -> f64 {
        self.weight.unwrap_or(0.5)
    }
}

/// Where searches run: a pipeline's OpenSearch index, or the laptop mode's store.
pub trait Backend: Send + Sync + 'static {
    /// A request's filter, checked against the index and made ready to run.
    type Filter: Clone + Send + Sync;

    /// The index searched (for logs and `/v1/info`).
    fn name(&self) -> &str;

    /// Ok once the index can answer searches; [`QueryError::Unavailable`] with the reason while
    /// it cannot yet (missing, empty, unreachable).
    fn prepare(&self) -> impl Future<Output = Result<(), QueryError>> + Send;

    /// Checks `filter` against the index's fields; the error says what to fix.
    fn filter(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Self::Filter, QueryError>> + Send;

    /// The `k` documents nearest to `vector` that match `filter`, best first.
    fn nearest(
        &self,
        vector: Vec<f32>,
        k: usize,
        filter: &Self::Filter,
    ) -> impl Future<Output = Result<Vec<Hit>, QueryError>> + Send;

    /// The `k` documents whose text best matches `text` (BM25) that match `filter`.
    fn lexical(
        &self,
        text: &str,
        k: usize,
        filter: &Self::Filter,
    ) -> impl Future<Output = Result<Vec<Hit>, QueryError>> + Send;
}

/// One hit: a stored document (a chunk of a record).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    /// The document id (`<record id>` or `<record id>#<chunk>`).
    pub id: String,
    /// The record's id.
    pub parent_id: String,
    /// The chunk's number within its record.
    pub chunk: u64,
    /// The score: the engine's for vector and lexical searches, the fused score for hybrid.
    pub score: f64,
    /// The embedded text.
    pub text: String,
    /// The document's other fields (the transform's metadata, `@timestamp`).
    pub metadata: Map<String, Value>,
}

/// The answer to a search.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchResponse {
    pub mode: Mode,
    pub hits: Vec<Hit>,
    /// Milliseconds spent, embedding included.
    pub took_ms: u64,
}

/// Fuses a vector and a lexical ranking: each list's scores are scaled to 0..1 (the best hit 1,
/// the worst 0; a list whose scores are all equal scores 1), a document missing from a list
/// counts 0 there, and the fused score is `weight × vector + (1 − weight) × lexical`. The best
/// `k`; equal scores keep the order the engines gave (the better rank in either list first).
pub fn fuse(vector: Vec<Hit>, lexical: Vec<Hit>, weight: f64, k: usize) -> Vec<Hit> {
    // id → (fused score, best rank in either list, hit)
    let mut fused: BTreeMap<String, (f64, usize, Hit)> = BTreeMap::new();
    for (hits, share) in [(vector, weight), (lexical, 1.0 - weight)] {
        let (low, high) = hits
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), hit| {
                (l.min(hit.score), h.max(hit.score))
            });
        for (rank, hit) in hits.into_iter().enumerate() {
            let scaled = if high > low {
                (hit.score - low) / (high - low)
            } else {
                1.0
            };
            fused
                .entry(hit.id.clone())
                .and_modify(|(score, best, _)| {
                    *score += share * scaled;
                    *best = (*best).min(rank);
                })
                .or_insert((share * scaled, rank, hit));
        }
    }
    let mut hits: Vec<(f64, usize, Hit)> = fused.into_values().collect();
    hits.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| a.1.cmp(&b.1))
            .then_with(|| a.2.id.cmp(&b.2.id))
    });
    hits.into_iter()
        .take(k)
        .map(|(score, _, mut hit)| {
            hit.score = score;
            hit
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hit(id: &str, score: f64) -> Hit {
        Hit {
            id: id.into(),
            parent_id: id.into(),
            chunk: 0,
            score,
            text: String::new(),
            metadata: Map::new(),
        }
    }

    fn request(body: Value) -> SearchRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn requests_out_of_bounds_say_what_to_fix() {
        let error = |body: Value| request(body).check().unwrap_err().to_string();
        assert!(error(json!({"query": " "})).contains("query is empty"));
        assert!(error(json!({"query": "q", "k": 0})).contains("ask for 1 to 200"));
        assert!(error(json!({"query": "q", "k": 201})).contains("k is 201"));
        assert!(error(json!({"query": "q", "weight": 0.3})).contains("mode hybrid only"));
        assert!(error(json!({"query": "q", "mode": "hybrid", "weight": 2})).contains("from 0"));
        assert!(
            error(json!({"query": "q", "filter": {"term": {"topic": {"a": 1}}}}))
                .contains("filter.term.topic")
        );
        assert!(
            error(json!({"query": "q", "filter": {"range": {"@timestamp": {}}}}))
                .contains("has no bound")
        );
        request(
            json!({"query": "q", "k": 200, "mode": "hybrid", "weight": 1,
            "filter": {"term": {"topic": ["a", "b"]}, "range": {"@timestamp": {"gte": "now-1d"}}}}),
        )
        .check()
        .unwrap();
        assert!(
            serde_json::from_value::<SearchRequest>(json!({"query": "q", "size": 3})).is_err(),
            "unknown fields are refused, not ignored"
        );
    }

    #[test]
    fn fusion_scales_each_list_and_weighs_them() {
        let vector = vec![hit("a", 0.9), hit("b", 0.8), hit("c", 0.7)];
        let lexical = vec![hit("c", 12.0), hit("d", 3.0)];
        // Vector only: the vector order.
        let ids = |hits: Vec<Hit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(
            ids(fuse(vector.clone(), lexical.clone(), 1.0, 10))[..3],
            ["a", "b", "c"]
        );
        // Lexical only: c first (the documents only the vector list has count 0, like d).
        let lexical_only = fuse(vector.clone(), lexical.clone(), 0.0, 4);
        assert_eq!(lexical_only[0].id, "c");
        assert!(lexical_only[1..].iter().all(|h| h.score == 0.0));
        // Half and half: a = 0.5·1 = 0.5, c = 0.5·0 + 0.5·1 = 0.5, b = 0.5·0.5 = 0.25, d = 0.
        // a and c tie, both first in a list; then by id.
        let fused = fuse(vector, lexical, 0.5, 4);
        assert_eq!(ids(fused.clone()), ["a", "c", "b", "d"]);
        assert!((fused[0].score - 0.5).abs() < 1e-9);
        assert!((fused[2].score - 0.25).abs() < 1e-9);
        assert_eq!(fused[3].score, 0.0);
    }

    #[test]
    fn equal_scores_keep_the_engines_order() {
        let vector = vec![hit("z", 0.5), hit("m", 0.5), hit("a", 0.5)];
        let ids: Vec<String> = fuse(vector, vec![], 1.0, 3)
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(ids, ["z", "m", "a"]);
    }

    #[test]
    fn a_list_of_one_counts_as_the_best() {
        let fused = fuse(vec![hit("a", 0.3)], vec![], 0.5, 5);
        assert_eq!(fused.len(), 1);
        assert!((fused[0].score - 0.5).abs() < 1e-9);
    }
}
