//! Searches of the laptop mode's store: the same requests as on a cluster, answered by the
//! store's HNSW graph (k-NN), its FTS5 table (BM25) and filters on the documents' metadata.
//!
//! The store is read by this process while `vectorpipe-worker local` runs may write it: every
//! search first compares the store's write counter with the one it opened, and opens it again
//! when they differ, so newly indexed records are found without a restart.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::{Backend, Filter, Hit, QueryError};
use crate::local::store::{self, Store, StoreError};
use crate::sink::{CHUNK_FIELD, PARENT_ID_FIELD, TIMESTAMP_FIELD};

/// The laptop store as a search [`Backend`].
pub struct LocalBackend {
    dir: PathBuf,
    name: String,
    model: String,
    dimensions: usize,
    opened: Arc<Mutex<Option<Opened>>>,
}

/// The store as last opened, with the fields filters look at.
struct Opened {
    store: Store,
    version: Option<String>,
    /// Each document's metadata with `parentId` and `chunk`, by key.
    fields: HashMap<u64, Map<String, Value>>,
}

impl LocalBackend {
    /// Searches the store in `dir`, made with `model` (`dimensions` long vectors).
    pub fn new(dir: PathBuf, model: &str, dimensions: usize) -> Self {
        Self {
            name: dir.display().to_string(),
            dir,
            model: model.to_owned(),
            dimensions,
            opened: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs `f` on the current store, off the async threads.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Opened) -> Result<T, QueryError> + Send + 'static,
    ) -> Result<T, QueryError> {
        let opened = self.opened.clone();
        let (dir, model, dimensions) = (self.dir.clone(), self.model.clone(), self.dimensions);
        tokio::task::spawn_blocking(move || {
            let mut guard = opened.lock().unwrap_or_else(|e| e.into_inner());
            let current = match guard.as_ref() {
                Some(o) => o.store.version().map_err(store_error)? == o.version,
                None => false,
            };
            if !current {
                // Closed first: the graph of a large store is not held twice.
                *guard = None;
                // A search does not create a store where none is.
                if !dir.join(store::DATABASE_FILE).exists() {
                    return Err(QueryError::Unavailable(format!(
                        "there is no store in {}; index records into it with `vectorpipe-worker local --input FILE --store {}`",
                        dir.display(),
                        dir.display()
                    )));
                }
                let store = Store::open(&dir, &model, dimensions).map_err(store_error)?;
                let version = store.version().map_err(store_error)?;
                let mut fields = HashMap::new();
                for entry in store.catalog().map_err(store_error)? {
                    let mut metadata = entry.metadata;
                    metadata.insert(PARENT_ID_FIELD.into(), Value::String(entry.parent_id));
                    metadata.insert(CHUNK_FIELD.into(), Value::from(entry.chunk));
                    fields.insert(entry.key, metadata);
                }
                *guard = Some(Opened {
                    store,
                    version,
                    fields,
                });
            }
            match guard.as_ref() {
                Some(o) => f(o),
                None => Err(QueryError::Unavailable("the store is not open".into())),
            }
        })
        .await
        .map_err(|e| QueryError::Unavailable(format!("the store search stopped: {e}")))?
    }
}

fn store_error(e: StoreError) -> QueryError {
    match e {
        StoreError::OtherModel { .. } => QueryError::Misconfigured(e.to_string()),
        e => QueryError::Unavailable(e.to_string()),
    }
}

fn hits(found: Vec<store::Hit>) -> Vec<Hit> {
    found
        .into_iter()
        .map(|h| Hit {
            id: h.id,
            parent_id: h.parent_id,
            chunk: h.chunk as u64,
            score: f64::from(h.score),
            text: h.text,
            metadata: h.metadata,
        })
        .collect()
}

impl Backend for LocalBackend {
    type Filter = Arc<LocalFilter>;

    fn name(&self) -> &str {
        &self.name
    }

    async fn prepare(&self) -> Result<(), QueryError> {
        let dir = self.dir.clone();
        self.with_store(move |o| {
            if o.store.is_empty() {
                return Err(QueryError::Unavailable(format!(
                    "the store {} is empty; index records into it with `vectorpipe-worker local --input FILE --store {}`",
                    dir.display(),
                    dir.display()
                )));
            }
            Ok(())
        })
        .await
    }

    async fn filter(&self, filter: &Filter) -> Result<Arc<LocalFilter>, QueryError> {
        let compiled = LocalFilter::new(filter)?;
        if compiled.is_empty() {
            return Ok(Arc::new(compiled));
        }
        let names: Vec<String> = compiled.names().map(str::to_owned).collect();
        self.with_store(move |o| {
            for name in &names {
                if !o.fields.values().any(|fields| fields.contains_key(name)) {
                    let known: BTreeSet<&str> = o
                        .fields
                        .values()
                        .flat_map(|fields| fields.keys().map(String::as_str))
                        .collect();
                    let kind = if compiled.terms.iter().any(|(n, _)| n == name) {
                        "term"
                    } else {
                        "range"
                    };
                    return Err(QueryError::Invalid(format!(
                        "filter.{kind}.{name}: no document in the store has such a field (they have: {}); check the name against the pipeline's transform.metadata",
                        known.into_iter().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            Ok(Arc::new(compiled))
        })
        .await
    }

    async fn nearest(
        &self,
        vector: Vec<f32>,
        k: usize,
        filter: &Arc<LocalFilter>,
    ) -> Result<Vec<Hit>, QueryError> {
        let filter = filter.clone();
        self.with_store(move |o| {
            let found = if filter.is_empty() {
                o.store.search(&vector, k)
            } else {
                let allowed: HashSet<u64> = o
                    .fields
                    .iter()
                    .filter(|(_, fields)| filter.matches(fields))
                    .map(|(key, _)| *key)
                    .collect();
                o.store.search_among(&vector, k, &allowed)
            };
            found.map(hits).map_err(store_error)
        })
        .await
    }

    async fn lexical(
        &self,
        text: &str,
        k: usize,
        filter: &Arc<LocalFilter>,
    ) -> Result<Vec<Hit>, QueryError> {
        let (text, filter) = (text.to_owned(), filter.clone());
        self.with_store(move |o| {
            o.store
                .lexical(&text, k, |key| {
                    filter.is_empty() || o.fields.get(&key).is_some_and(|f| filter.matches(f))
                })
                .map(hits)
                .map_err(store_error)
        })
        .await
    }
}

/// A comparison of a range filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Gt,
    Gte,
    Lt,
    Lte,
}

/// A range bound, read once: a point in time, a number or a text (compared as the index would:
/// dates as dates, numbers as numbers, keywords by their bytes).
#[derive(Clone, Debug, PartialEq)]
enum Bound {
    /// Milliseconds since the epoch.
    Instant(i64),
    Number(f64),
    Text(String),
}

/// A request's filter, checked and ready to test documents.
#[derive(Debug, Default)]
pub struct LocalFilter {
    terms: Vec<(String, Vec<Value>)>,
    ranges: Vec<(String, Vec<(Op, Bound)>)>,
}

impl LocalFilter {
    fn new(filter: &Filter) -> Result<Self, QueryError> {
        let terms = filter
            .term
            .iter()
            .map(|(name, value)| {
                let values = match value {
                    Value::Array(values) => values.clone(),
                    value => vec![value.clone()],
                };
                (name.clone(), values)
            })
            .collect();
        let mut ranges = Vec::new();
        for (name, range) in &filter.range {
            let mut bounds = Vec::new();
            for (op, value) in [
                (Op::Gt, &range.gt),
                (Op::Gte, &range.gte),
                (Op::Lt, &range.lt),
                (Op::Lte, &range.lte),
            ] {
                if let Some(value) = value {
                    bounds.push((op, bound(name, op, value)?));
                }
            }
            ranges.push((name.clone(), bounds));
        }
        Ok(Self { terms, ranges })
    }

    fn is_empty(&self) -> bool {
        self.terms.is_empty() && self.ranges.is_empty()
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.terms
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.ranges.iter().map(|(n, _)| n.as_str()))
    }

    /// Whether a document with these fields passes every term and range (a list value passes
    /// when one of its items does, as in OpenSearch).
    fn matches(&self, fields: &Map<String, Value>) -> bool {
        let terms = self.terms.iter().all(|(name, wanted)| {
            fields
                .get(name)
                .is_some_and(|stored| items(stored).any(|s| wanted.iter().any(|w| equal(s, w))))
        });
        terms
            && self.ranges.iter().all(|(name, bounds)| {
                fields.get(name).is_some_and(|stored| {
                    items(stored).any(|s| {
                        bounds.iter().all(|(op, bound)| {
                            compare(s, bound).is_some_and(|order| match op {
                                Op::Gt => order == Ordering::Greater,
                                Op::Gte => order != Ordering::Less,
                                Op::Lt => order == Ordering::Less,
                                Op::Lte => order != Ordering::Greater,
                            })
                        })
                    })
                })
            })
    }
}

fn items(value: &Value) -> Box<dyn Iterator<Item = &Value> + '_> {
    match value {
        Value::Array(values) => Box::new(values.iter()),
        value => Box::new(std::iter::once(value)),
    }
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Term equality: strings exactly, numbers by value (also a number stored as a string).
fn equal(stored: &Value, wanted: &Value) -> bool {
    match (stored, wanted) {
        (Value::String(a), Value::String(b)) => a == b,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Number(_), _) | (_, Value::Number(_)) => {
            matches!((number(stored), number(wanted)), (Some(a), Some(b)) if a == b)
        }
        _ => false,
    }
}

/// How a stored value compares with a bound; `None` when it is not of the bound's kind.
fn compare(stored: &Value, bound: &Bound) -> Option<Ordering> {
    match bound {
        Bound::Instant(at) => {
            let value = match stored {
                Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
                Value::String(s) => instant(s)?,
                _ => return None,
            };
            Some(value.cmp(at))
        }
        Bound::Number(n) => number(stored)?.partial_cmp(n),
        Bound::Text(t) => stored.as_str().map(|s| s.cmp(t.as_str())),
    }
}

/// Reads one bound; `@timestamp` bounds must be times.
fn bound(field: &str, op: Op, value: &Value) -> Result<Bound, QueryError> {
    let name = match op {
        Op::Gt => "gt",
        Op::Gte => "gte",
        Op::Lt => "lt",
        Op::Lte => "lte",
    };
    let is_time = field == TIMESTAMP_FIELD;
    match value {
        Value::Number(n) if is_time => n
            .as_i64()
            .map(Bound::Instant)
            .ok_or_else(|| not_a_time(field, name, &value.to_string())),
        Value::Number(n) => n.as_f64().map(Bound::Number).ok_or_else(|| {
            QueryError::Invalid(format!("filter.range.{field}.{name} is not a number"))
        }),
        Value::String(s) => {
            if let Some(at) = instant(s) {
                Ok(Bound::Instant(at))
            } else if is_time {
                Err(not_a_time(field, name, s))
            } else if let Ok(n) = s.trim().parse::<f64>() {
                Ok(Bound::Number(n))
            } else {
                Ok(Bound::Text(s.clone()))
            }
        }
        _ => Err(QueryError::Invalid(format!(
            "filter.range.{field}.{name} must be a date, a number or a text"
        ))),
    }
}

fn not_a_time(field: &str, name: &str, given: &str) -> QueryError {
    QueryError::Invalid(format!(
        "filter.range.{field}.{name} is {given:?}, which the laptop store cannot read as a time; give an RFC 3339 time (2026-11-01T08:00:00Z), a date (2026-11-01, midnight UTC), milliseconds since the epoch, or now with offsets (now-7d, now-12h, now-1M)"
    ))
}

/// Milliseconds since the epoch of an RFC 3339 time, a date or time without offset (UTC), or
/// `now` with offsets such as `-7d`, `+1h`, `-1M` (units y, M, w, d, h, m, s).
fn instant(text: &str) -> Option<i64> {
    use jiff::tz::TimeZone;
    let text = text.trim();
    if let Some(math) = text.strip_prefix("now") {
        let mut at = jiff::Zoned::now().with_time_zone(TimeZone::UTC);
        let mut rest = math;
        while !rest.is_empty() {
            let sign: i64 = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            rest = &rest[1..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let n: i64 = rest[..digits].parse().ok()?;
            let unit = rest[digits..].chars().next()?;
            rest = &rest[digits + unit.len_utf8()..];
            let n = sign * n;
            let span = match unit {
                'y' => jiff::Span::new().try_years(n),
                'M' => jiff::Span::new().try_months(n),
                'w' => jiff::Span::new().try_weeks(n),
                'd' => jiff::Span::new().try_days(n),
                'h' | 'H' => jiff::Span::new().try_hours(n),
                'm' => jiff::Span::new().try_minutes(n),
                's' => jiff::Span::new().try_seconds(n),
                _ => return None,
            }
            .ok()?;
            at = at.checked_add(span).ok()?;
        }
        return Some(at.timestamp().as_millisecond());
    }
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Some(at.as_millisecond());
    }
    if let Ok(at) = text.parse::<jiff::civil::DateTime>() {
        return at
            .to_zoned(TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp().as_millisecond());
    }
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| d.to_zoned(TimeZone::UTC).ok())
        .map(|z| z.timestamp().as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Range;
    use serde_json::json;

    fn filter(body: Value) -> LocalFilter {
        let filter: Filter = serde_json::from_value(body).unwrap();
        LocalFilter::new(&filter).unwrap()
    }

    fn fields(body: Value) -> Map<String, Value> {
        body.as_object().cloned().unwrap()
    }

    #[test]
    fn terms_match_exact_values_lists_and_numbers() {
        let doc = fields(json!({"topic": "baking", "likes": 3, "tags": ["a", "b"], "ok": true}));
        assert!(filter(json!({"term": {"topic": "baking"}})).matches(&doc));
        assert!(!filter(json!({"term": {"topic": "Baking"}})).matches(&doc));
        assert!(filter(json!({"term": {"topic": ["kafka", "baking"]}})).matches(&doc));
        assert!(filter(json!({"term": {"likes": 3}})).matches(&doc));
        assert!(filter(json!({"term": {"likes": "3"}})).matches(&doc));
        assert!(filter(json!({"term": {"tags": "b"}})).matches(&doc));
        assert!(filter(json!({"term": {"ok": true}})).matches(&doc));
        assert!(!filter(json!({"term": {"topic": "baking", "likes": 4}})).matches(&doc));
        assert!(!filter(json!({"term": {"missing": "x"}})).matches(&doc));
    }

    #[test]
    fn time_ranges_read_dates_times_epoch_milliseconds_and_now() {
        let doc = fields(json!({"@timestamp": "2026-10-06T15:52:00Z"}));
        let range = |r: Value| filter(json!({"range": {"@timestamp": r}})).matches(&doc);
        assert!(range(json!({"gte": "2026-10-06"})));
        assert!(!range(json!({"gte": "2026-10-07"})));
        assert!(range(
            json!({"gt": "2026-10-06T15:51:59Z", "lt": "2026-10-06T17:52:00+01:00"})
        ));
        assert!(
            !range(json!({"lt": "2026-10-06T17:52:00+02:00"})),
            "offsets count"
        );
        assert!(range(json!({"lte": 1_791_301_920_000i64})));
        assert!(!range(json!({"lt": 1_791_301_920_000i64})));
        assert!(range(json!({"lte": "now"})));
        assert!(!range(json!({"gte": "now-1d"})));
        assert!(range(json!({"gte": "now-100y"})));
        let epoch = fields(json!({"@timestamp": 1_791_301_920_000i64}));
        assert!(filter(json!({"range": {"@timestamp": {"gte": "2026-10-06"}}})).matches(&epoch));
        let error = LocalFilter::new(&Filter {
            range: [(
                "@timestamp".to_owned(),
                Range {
                    gte: Some(json!("last tuesday")),
                    ..Range::default()
                },
            )]
            .into(),
            ..Filter::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("now-7d") && error.contains("last tuesday"),
            "{error}"
        );
    }

    #[test]
    fn number_and_text_ranges_compare_as_their_kind() {
        let doc = fields(json!({"likes": 12, "author": "lena"}));
        assert!(
            filter(json!({"range": {"likes": {"gt": 9}}})).matches(&doc),
            "12 > 9, not '12' < '9'"
        );
        assert!(!filter(json!({"range": {"likes": {"gt": 12}}})).matches(&doc));
        assert!(filter(json!({"range": {"author": {"gte": "l", "lt": "m"}}})).matches(&doc));
        assert!(!filter(json!({"range": {"author": {"gte": "m"}}})).matches(&doc));
    }
}
