//! The OpenSearch sink: creating or checking the k-NN index, encoding documents, `_bulk` with
//! per-item results, deleting all chunks of a record and the chunks an update left behind.

use std::time::{Duration, Instant};

use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{
    IndicesCreateParts, IndicesExistsParts, IndicesGetMappingParts, IndicesRefreshParts,
};
use opensearch::{BulkParts, DeleteByQueryParts, MgetParts, OpenSearch};
use serde_json::{Map, Value, json};
use vectorpipe_crds::index::{check_mapping, space_type_name};
use vectorpipe_crds::v1alpha1::{KnnEngine, OpenSearchSink, SigV4Service};

use super::{
    CHUNK_FIELD, CHUNKS_FIELD, IndexRequest, ItemResult, PARENT_ID_FIELD, SOURCE_KEY_FIELD, Sink,
    SinkError, TIMESTAMP_FIELD, record_ids,
};
use crate::transform::Document;

/// The OpenSearch index of one pipeline.
pub struct OpenSearchIndex {
    client: OpenSearch,
    spec: OpenSearchSink,
    dimensions: i32,
}

fn engine(e: KnnEngine) -> &'static str {
    match e {
        KnnEngine::Lucene => "lucene",
        KnnEngine::Faiss => "faiss",
        KnnEngine::Nmslib => "nmslib",
    }
}

/// The index body (settings and mappings) the pipeline creates.
pub fn index_body(spec: &OpenSearchSink, dimensions: i32) -> Value {
    let method = &spec.method;
    let mut properties = Map::new();
    properties.insert(
        spec.vector_field.clone(),
        json!({
            "type": "knn_vector",
            "dimension": dimensions,
            "method": {
                "name": "hnsw",
                "engine": engine(method.engine),
                "space_type": space_type_name(method.space_type),
                "parameters": {"m": method.m, "ef_construction": method.ef_construction}
            }
        }),
    );
    properties.insert(spec.text_field.clone(), json!({"type": "text"}));
    properties.insert(PARENT_ID_FIELD.into(), json!({"type": "keyword"}));
    properties.insert(CHUNK_FIELD.into(), json!({"type": "integer"}));
    properties.insert(CHUNKS_FIELD.into(), json!({"type": "integer"}));
    properties.insert(TIMESTAMP_FIELD.into(), json!({"type": "date"}));
    properties.insert(SOURCE_KEY_FIELD.into(), json!({"type": "keyword"}));
    json!({
        "settings": {"index": {
            "knn": true,
            "number_of_shards": spec.index_settings.shards,
            "number_of_replicas": spec.index_settings.replicas,
            // OpenSearch takes single-unit times only; milliseconds express any duration.
            "refresh_interval": format!("{}ms", spec.index_settings.refresh_interval.get().as_millis()),
        }},
        "mappings": {"properties": properties}
    })
}

/// The `_source` of a document, serialised. The vector is written straight from its `f32`
/// values (the shortest text that reads back as the same `f32`), not through a tree of JSON
/// numbers: a third of the bytes and much less work per document.
pub fn document_source(spec: &OpenSearchSink, doc: &Document, vector: &[f32]) -> Vec<u8> {
    let mut fields = doc.metadata.clone();
    fields.remove(&spec.vector_field);
    fields.insert(spec.text_field.clone(), json!(doc.text));
    fields.insert(PARENT_ID_FIELD.into(), json!(doc.parent_id));
    fields.insert(CHUNK_FIELD.into(), json!(doc.chunk));
    fields.insert(CHUNKS_FIELD.into(), json!(doc.chunks));
    if let Some(ts) = &doc.timestamp {
        fields.insert(TIMESTAMP_FIELD.into(), ts.clone());
    }
    if let Some(key) = &doc.source_key {
        fields.insert(SOURCE_KEY_FIELD.into(), json!(key));
    }
    // A map of JSON values, strings and floats always serialise (NaN becomes null).
    let mut out = serde_json::to_vec(&fields).unwrap_or_else(|_| b"{}".to_vec());
    out.pop();
    if !fields.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(&serde_json::to_vec(&spec.vector_field).unwrap_or_default());
    out.push(b':');
    out.extend_from_slice(&serde_json::to_vec(vector).unwrap_or_else(|_| b"[]".to_vec()));
    out.push(b'}');
    out
}

/// The document ids of every record found in an `_mget` response for `<id>` and `<id>#0`.
pub fn stored_ids_of(response: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for doc in response["docs"].as_array().into_iter().flatten() {
        if doc["found"] != true {
            continue;
        }
        let source = &doc["_source"];
        let (Some(parent), Some(id)) = (source[PARENT_ID_FIELD].as_str(), doc["_id"].as_str())
        else {
            continue;
        };
        if id == parent {
            ids.push(id.to_owned());
        } else {
            let chunks = source[CHUNKS_FIELD].as_u64().unwrap_or(1).max(1) as usize;
            ids.extend(record_ids(parent, chunks.max(2)));
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

/// The JSON body of a 2xx answer to `what`; anything else is a transient error (retried).
async fn answer(
    what: &str,
    sent: Result<opensearch::http::response::Response, opensearch::Error>,
) -> Result<Value, SinkError> {
    let response = sent.map_err(|e| SinkError::Transient(e.to_string()))?;
    let status = response.status_code().as_u16();
    let value: Value = response
        .json()
        .await
        .map_err(|e| SinkError::Transient(format!("unreadable {what} response: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(SinkError::Transient(format!(
            "{what} answered {status}: {value}"
        )));
    }
    Ok(value)
}

/// Sorts the items of a `_bulk` response.
pub fn item_results(response: &Value, expected: usize) -> Result<Vec<ItemResult>, String> {
    let items = response["items"]
        .as_array()
        .ok_or("the _bulk response has no items")?;
    if items.len() != expected {
        return Err(format!(
            "sent {expected} documents, the _bulk response lists {}",
            items.len()
        ));
    }
    Ok(items
        .iter()
        .map(|item| {
            let op = item
                .as_object()
                .and_then(|o| o.values().next())
                .cloned()
                .unwrap_or_default();
            let status = op["status"].as_u64().unwrap_or(0);
            let reason = || {
                format!(
                    "{} {}: {}",
                    status,
                    op["error"]["type"].as_str().unwrap_or("error"),
                    op["error"]["reason"].as_str().unwrap_or("no reason given")
                )
            };
            match status {
                200..=299 => ItemResult::Ok,
                429 | 500..=599 | 0 => ItemResult::Retry(reason()),
                _ => ItemResult::Rejected(reason()),
            }
        })
        .collect())
}

impl OpenSearchIndex {
    /// Connects to the first endpoint. Basic-auth credentials come from the environment
    /// (`VECTORPIPE_OPENSEARCH_USERNAME` / `_PASSWORD`, which the operator fills from the Secret),
    /// a custom CA from `VECTORPIPE_OPENSEARCH_CA_FILE`, and SigV4 credentials from the AWS
    /// default chain, signed for `es` or `aoss`.
    pub async fn new(
        spec: OpenSearchSink,
        dimensions: i32,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let endpoint = spec.endpoints.first().ok_or_else(|| {
            SinkError::Misconfigured(
                "sink.opensearch.endpoints is empty; list at least one URL".into(),
            )
        })?;
        let url = endpoint.parse().map_err(|e| {
            SinkError::Misconfigured(format!(
                "sink.opensearch.endpoints {endpoint:?} is not a URL: {e}"
            ))
        })?;
        let mut builder =
            TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(timeout);
        let var = |name: &str, why: &str| {
            std::env::var(name)
                .map_err(|_| SinkError::Misconfigured(format!("{name} is not set; {why}")))
        };
        if spec.tls.as_ref().is_some_and(|t| t.ca_secret_ref.is_some()) {
            let path = var(
                "VECTORPIPE_OPENSEARCH_CA_FILE",
                "the operator mounts sink.opensearch.tls.caSecretRef and names the file here",
            )?;
            let pem = std::fs::read(&path).map_err(|e| {
                SinkError::Misconfigured(format!("cannot read the OpenSearch CA {path}: {e}"))
            })?;
            let certificate = opensearch::cert::Certificate::from_pem(&pem).map_err(|e| {
                SinkError::Misconfigured(format!(
                    "the OpenSearch CA {path} is not a PEM certificate: {e}"
                ))
            })?;
            builder =
                builder.cert_validation(opensearch::cert::CertificateValidation::Full(certificate));
        }
        if let Some(auth) = &spec.auth {
            if let Some(sigv4) = &auth.sigv4 {
                // The default credential chain: IRSA or Pod Identity in a cluster, env locally.
                let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_config::Region::new(sigv4.region.clone()))
                    .load()
                    .await;
                let credentials =
                    opensearch::auth::Credentials::try_from(&config).map_err(|e| {
                        SinkError::Misconfigured(format!(
                            "no AWS credentials for SigV4 to OpenSearch ({e}); give the workers an IAM role (IRSA or Pod Identity)"
                        ))
                    })?;
                builder = builder.auth(credentials).service_name(match sigv4.service {
                    SigV4Service::Es => "es",
                    SigV4Service::Aoss => "aoss",
                });
            }
            if auth.basic.is_some() {
                let why = "basic auth reads the username and password from the environment";
                builder = builder.auth(opensearch::auth::Credentials::Basic(
                    var("VECTORPIPE_OPENSEARCH_USERNAME", why)?,
                    var("VECTORPIPE_OPENSEARCH_PASSWORD", why)?,
                ));
            }
        }
        let transport = builder.build().map_err(|e| {
            SinkError::Misconfigured(format!("cannot build the OpenSearch client: {e}"))
        })?;
        Ok(Self {
            client: OpenSearch::new(transport),
            spec,
            dimensions,
        })
    }

    /// Creates the index when missing (and allowed), or checks that the existing one fits.
    pub async fn ensure_index(&self) -> Result<(), SinkError> {
        let index = self.spec.index.as_str();
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[index]))
            .send()
            .await
            .map_err(|e| SinkError::Transient(e.to_string()))?
            .status_code();
        if exists.as_u16() == 404 {
            if !self.spec.create_index {
                return Err(SinkError::Misconfigured(format!(
                    "index {index:?} does not exist and sink.opensearch.createIndex is false; create it or set createIndex: true"
                )));
            }
            let response = self
                .client
                .indices()
                .create(IndicesCreateParts::Index(index))
                .body(index_body(&self.spec, self.dimensions))
                .send()
                .await
                .map_err(|e| SinkError::Transient(e.to_string()))?;
            let status = response.status_code().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                tracing::info!(
                    index,
                    dimensions = self.dimensions,
                    "created the k-NN index"
                );
                return Ok(());
            }
            if !text.contains("resource_already_exists_exception") {
                return Err(SinkError::Misconfigured(format!(
                    "creating index {index:?} failed: {status} {text}"
                )));
            }
        }
        let mapping: Value = self
            .client
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(&[index]))
            .send()
            .await
            .map_err(|e| SinkError::Transient(e.to_string()))?
            .json()
            .await
            .map_err(|e| SinkError::Transient(e.to_string()))?;
        check_mapping(&self.spec, self.dimensions, &mapping)
            .map_err(|e| SinkError::IndexMismatch(e.to_string()))
    }

    /// Sends one `_bulk` request and sorts its items.
    async fn bulk(&self, requests: &[&IndexRequest]) -> Result<Vec<ItemResult>, SinkError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        // Each NDJSON line is serialised once, straight from the request: no copy of the vectors.
        let mut body: Vec<Vec<u8>> = Vec::with_capacity(requests.len() * 2);
        for r in requests {
            let lines = serde_json::to_vec(&json!({"index": {"_id": r.id}}))
                .map(|action| (action, r.source.clone()))
                .map_err(|e| {
                    SinkError::Misconfigured(format!("cannot serialise document {}: {e}", r.id))
                })?;
            body.push(lines.0);
            body.push(lines.1);
        }
        let started = Instant::now();
        let response = self
            .client
            .bulk(BulkParts::Index(&self.spec.index))
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::Transient(e.to_string()))?;
        let status = response.status_code().as_u16();
        if status == 429 || status >= 500 {
            return Err(SinkError::Transient(format!("_bulk answered {status}")));
        }
        let value: Value = response
            .json()
            .await
            .map_err(|e| SinkError::Transient(format!("unreadable _bulk response: {e}")))?;
        tracing::debug!(docs = requests.len(), elapsed = ?started.elapsed(), "bulk request");
        if !(200..300).contains(&status) {
            return Err(SinkError::Misconfigured(format!(
                "_bulk answered {status}: {value}"
            )));
        }
        item_results(&value, requests.len()).map_err(SinkError::Transient)
    }

    /// The ids of every document stored now for these records, read in real time (`_mget` sees
    /// writes that a search would only see after the next refresh). A record's first document
    /// (`<id>` or `<id>#0`) says how many chunks it has.
    async fn stored_ids(&self, parent_ids: &[&str]) -> Result<Vec<String>, SinkError> {
        if parent_ids.is_empty() {
            return Ok(Vec::new());
        }
        let docs: Vec<Value> = parent_ids
            .iter()
            .flat_map(|p| [p.to_string(), format!("{p}#0")])
            .map(|id| json!({"_id": id, "_source": [PARENT_ID_FIELD, CHUNKS_FIELD]}))
            .collect();
        let sent = self
            .client
            .mget(MgetParts::Index(&self.spec.index))
            .body(json!({ "docs": docs }))
            .send()
            .await;
        Ok(stored_ids_of(&answer("_mget", sent).await?))
    }

    /// Deletes documents by id (missing ones are fine). Returns how many existed.
    async fn delete_ids(&self, ids: &[String]) -> Result<u64, SinkError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let body: Vec<String> = ids
            .iter()
            .map(|id| json!({"delete": {"_id": id}}).to_string())
            .collect();
        let sent = self
            .client
            .bulk(BulkParts::Index(&self.spec.index))
            .body(body)
            .send()
            .await;
        let value = answer("deleting by id", sent).await?;
        let mut deleted = 0;
        for item in value["items"].as_array().into_iter().flatten() {
            match item["delete"]["status"].as_u64().unwrap_or(0) {
                200..=299 => deleted += 1,
                404 => {}
                other => {
                    return Err(SinkError::Transient(format!(
                        "deleting {} answered {other}: {}",
                        item["delete"]["_id"], item["delete"]["error"]
                    )));
                }
            }
        }
        Ok(deleted)
    }

    /// Deletes every document whose parent id is one of `parent_ids` (searchable ones only).
    /// Deletes the documents whose source key is `key`. The index is refreshed first: the
    /// records of the key read before its tombstone are acknowledged by now, but may not be
    /// searchable yet. (An index that mapped the field dynamically has it as text with a
    /// `keyword` sub-field; both are asked.)
    async fn delete_by_source_key(&self, key: &str) -> Result<u64, SinkError> {
        let refreshed = self
            .client
            .indices()
            .refresh(IndicesRefreshParts::Index(&[&self.spec.index]))
            .send()
            .await;
        answer("refreshing the index", refreshed).await?;
        let keyword = format!("{SOURCE_KEY_FIELD}.keyword");
        let sent = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[&self.spec.index]))
            .body(json!({"query": {"bool": {"should": [
                {"term": {SOURCE_KEY_FIELD: key}},
                {"term": {keyword: key}}
            ]}}}))
            .conflicts(opensearch::params::Conflicts::Proceed)
            .send()
            .await;
        let value = answer("_delete_by_query", sent).await?;
        Ok(value["deleted"].as_u64().unwrap_or(0))
    }

    async fn delete_by_parent(&self, parent_ids: &[&str]) -> Result<u64, SinkError> {
        let sent = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[&self.spec.index]))
            .body(json!({"query": {"terms": {PARENT_ID_FIELD: parent_ids}}}))
            .conflicts(opensearch::params::Conflicts::Proceed)
            .send()
            .await;
        let value = answer("_delete_by_query", sent).await?;
        Ok(value["deleted"].as_u64().unwrap_or(0))
    }
}

impl Sink for OpenSearchIndex {
    fn encode(&self, doc: &Document, vector: &[f32]) -> IndexRequest {
        IndexRequest {
            id: doc.id.clone(),
            parent_id: doc.parent_id.clone(),
            chunks: doc.chunks,
            source: document_source(&self.spec, doc, vector),
        }
    }

    async fn write(&self, requests: &[&IndexRequest]) -> Result<Vec<ItemResult>, SinkError> {
        self.bulk(requests).await
    }

    /// By id from the first document's chunk count (exact, and in real time), then by query on
    /// the parent id (also finds strays, once they are searchable); with `by_source_key`, after a
    /// refresh (so that documents written a moment ago are searchable), also the documents that
    /// keep this key as their source key.
    async fn delete_record(&self, parent_id: &str, by_source_key: bool) -> Result<u64, SinkError> {
        let ids = self.stored_ids(&[parent_id]).await?;
        let by_id = self.delete_ids(&ids).await?;
        let by_query = self.delete_by_parent(&[parent_id]).await?;
        let by_key = if by_source_key {
            self.delete_by_source_key(parent_id).await?
        } else {
            0
        };
        Ok(by_id + by_query + by_key)
    }

    async fn remove_stale_chunks(&self, records: &[(&str, usize)]) -> Result<u64, SinkError> {
        let current: std::collections::HashSet<String> = records
            .iter()
            .flat_map(|(parent, chunks)| record_ids(parent, *chunks))
            .collect();
        let parents: Vec<&str> = records.iter().map(|(parent, _)| *parent).collect();
        let stale: Vec<String> = self
            .stored_ids(&parents)
            .await?
            .into_iter()
            .filter(|id| !current.contains(id))
            .collect();
        self.delete_ids(&stale).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(extra: Value) -> OpenSearchSink {
        let mut v = json!({"endpoints": ["http://os:9200"], "index": "docs"});
        if let (Value::Object(a), Value::Object(b)) = (&mut v, extra) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_created_index_has_the_knn_mapping_of_the_spec() {
        let spec = sink(
            json!({"method": {"engine": "lucene", "spaceType": "cosinesimil"}, "indexSettings": {"refreshInterval": "1m"}}),
        );
        let body = index_body(&spec, 512);
        assert_eq!(body["settings"]["index"]["knn"], true);
        assert_eq!(body["settings"]["index"]["refresh_interval"], "60000ms");
        let field = &body["mappings"]["properties"]["embedding"];
        assert_eq!(field["dimension"], 512);
        assert_eq!(field["method"]["engine"], "lucene");
        assert_eq!(field["method"]["space_type"], "cosinesimil");
        assert_eq!(field["method"]["parameters"]["ef_construction"], 128);
    }

    #[test]
    fn the_source_holds_the_fields_and_the_vector_as_its_f32_values() {
        let spec = sink(json!({}));
        let doc = Document {
            id: "a#1".into(),
            parent_id: "a".into(),
            chunk: 1,
            chunks: 2,
            text: "hello".into(),
            timestamp: Some(json!("2026-01-01T00:00:00Z")),
            metadata: Map::from_iter([("likes".to_owned(), json!(3))]),
            source_key: None,
        };
        let vector = [0.1f32, -2.5, 1e-8];
        let source: Value = serde_json::from_slice(&document_source(&spec, &doc, &vector)).unwrap();
        assert_eq!(source["text"], "hello");
        assert_eq!(source["parentId"], "a");
        assert_eq!(source["chunk"], 1);
        assert_eq!(source["chunks"], 2);
        assert_eq!(source["likes"], 3);
        assert_eq!(source["@timestamp"], "2026-01-01T00:00:00Z");
        let read: Vec<f32> = serde_json::from_value(source["embedding"].clone()).unwrap();
        assert_eq!(read, vector);
        let empty = Document {
            metadata: Map::new(),
            source_key: None,
            ..doc
        };
        let text = String::from_utf8(document_source(&spec, &empty, &[1.0])).unwrap();
        assert!(text.ends_with(r#","embedding":[1.0]}"#), "{text}");
    }

    #[test]
    fn stored_records_are_expanded_to_all_their_chunk_ids() {
        let response = json!({"docs": [
            {"_id": "a", "found": false},
            {"_id": "a#0", "found": true, "_source": {"parentId": "a", "chunks": 3}},
            {"_id": "b", "found": true, "_source": {"parentId": "b", "chunks": 1}},
            {"_id": "b#0", "found": false},
            {"_id": "c", "found": false},
            {"_id": "c#0", "found": false}
        ]});
        assert_eq!(stored_ids_of(&response), ["a#0", "a#1", "a#2", "b"]);
    }

    #[test]
    fn bulk_items_are_sorted_into_ok_retry_and_rejected() {
        let response = json!({"errors": true, "items": [
            {"index": {"status": 201}},
            {"index": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}},
            {"index": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad field"}}},
            {"index": {"status": 503, "error": {"type": "unavailable_shards_exception", "reason": "x"}}}
        ]});
        let results = item_results(&response, 4).unwrap();
        assert_eq!(results[0], ItemResult::Ok);
        assert!(
            matches!(&results[1], ItemResult::Retry(r) if r.contains("es_rejected_execution_exception"))
        );
        assert!(
            matches!(&results[2], ItemResult::Rejected(r) if r.contains("mapper_parsing_exception"))
        );
        assert!(matches!(results[3], ItemResult::Retry(_)));
        assert!(item_results(&response, 3).is_err());
    }
}
