//! The OpenSearch sink: creating or checking the k-NN index, encoding documents, `_bulk` with
//! per-item results, deleting all chunks of a record and the chunks an update left behind.

use std::time::{Duration, Instant};

use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{
    IndicesCreateParts, IndicesExistsParts, IndicesGetMappingParts, IndicesRefreshParts,
};
use opensearch::{BulkParts, DeleteByQueryParts, MgetParts, OpenSearch, SearchParts};
use serde_json::{Map, Value, json};
use vectorpipe_crds::index::{check_mapping, space_type_name};
use vectorpipe_crds::v1alpha1::{KnnEngine, OpenSearchSink, SigV4Service};

use super::{
    CHUNK_FIELD, CHUNKS_FIELD, DOC_ID_FIELD, IndexRequest, ItemResult, PARENT_ID_FIELD,
    SOURCE_KEY_FIELD, Sink, SinkError, TIMESTAMP_FIELD, WRITTEN_AT_FIELD, record_ids,
};
use crate::transform::Document;

/// The OpenSearch index of one pipeline.
pub struct OpenSearchIndex {
    nodes: Nodes,
    spec: OpenSearchSink,
    dimensions: i32,
    ids: IdMode,
    /// Deletes of older documents to run again later ([`IdMode::Generated`]), to the sweeper.
    sweeps: Option<tokio::sync::mpsc::UnboundedSender<Value>>,
}

/// How documents are found again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdMode {
    /// A document's id is its `_id`: a new version overwrites in place, a tombstone deletes by
    /// id, and everything is exact.
    Own,
    /// OpenSearch picks `_id` (Serverless vector collections refuse a custom one): a document
    /// keeps its id in `docId` and when its record was read in `writtenAt`; a version, once
    /// written, deletes by query the older documents of its record (and so its stale chunks), a
    /// tombstone deletes those older than itself, and each such delete runs again
    /// [`SWEEP_AFTER`] later for documents that were not searchable yet. Weaker: searches can
    /// see an older version next to the new one until then, a crash between the write and the
    /// second delete can leave the older one until the record's next write, and the order of
    /// versions read by different workers rests on their clocks.
    Generated,
}

impl IdMode {
    /// Generated for OpenSearch Serverless (`sigv4.service: aoss`), own ids otherwise.
    pub fn of(spec: &OpenSearchSink) -> Self {
        let serverless = spec
            .auth
            .as_ref()
            .and_then(|a| a.sigv4.as_ref())
            .is_some_and(|s| s.service == SigV4Service::Aoss);
        if serverless {
            Self::Generated
        } else {
            Self::Own
        }
    }
}

/// When the deletes of older documents run again, with ids picked by OpenSearch: longer than
/// OpenSearch Serverless takes to make a write searchable.
pub const SWEEP_AFTER: Duration = Duration::from_secs(20);

/// The query for the documents of `records` (parent id, stamp) older than their stamp.
fn older_than(records: &[(&str, u64)]) -> Value {
    let should: Vec<Value> = records
        .iter()
        .map(|(parent, stamp)| {
            json!({"bool": {"filter": [
                {"term": {PARENT_ID_FIELD: parent}},
                {"range": {WRITTEN_AT_FIELD: {"lt": stamp}}}
            ]}})
        })
        .collect();
    json!({"query": {"bool": {"should": should, "minimum_should_match": 1}}})
}

/// The source with the `writtenAt` field added (the source is a JSON object).
fn with_written_at(source: &[u8], stamp: u64) -> Vec<u8> {
    let mut out = source.to_vec();
    if out.last() == Some(&b'}') {
        out.pop();
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"{WRITTEN_AT_FIELD}\":{stamp}}}").as_bytes());
    }
    out
}

/// How long an endpoint that failed to answer is left out.
const NODE_DOWN_FOR: Duration = Duration::from_secs(10);

/// The endpoints, taken in turn; one that failed to answer is left out for a while.
struct Nodes {
    clients: Vec<OpenSearch>,
    urls: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
    down_until: std::sync::Mutex<Vec<Option<Instant>>>,
}

impl Nodes {
    fn new(clients: Vec<OpenSearch>, urls: Vec<String>) -> Self {
        let down_until = std::sync::Mutex::new(vec![None; clients.len()]);
        Self {
            clients,
            urls,
            next: std::sync::atomic::AtomicUsize::new(0),
            down_until,
        }
    }

    /// The next endpoint that is not left out (or, when all are, the next one).
    fn pick(&self) -> (usize, &OpenSearch) {
        let n = self.clients.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let node = (0..n)
            .map(|i| (start + i) % n)
            .find(|k| down[*k].is_none_or(|until| until <= now))
            .unwrap_or(start % n);
        (node, &self.clients[node])
    }

    /// Notes how `node` answered: left out for a while when it did not.
    fn note(
        &self,
        node: usize,
        sent: &Result<opensearch::http::response::Response, opensearch::Error>,
    ) {
        let failed = match sent {
            Err(e) => Some(e.to_string()),
            Ok(r) if [502, 503, 504].contains(&r.status_code().as_u16()) => {
                Some(format!("answered {}", r.status_code()))
            }
            Ok(_) => None,
        };
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match failed {
            Some(error) if self.clients.len() > 1 => {
                if down[node].is_none() {
                    tracing::warn!(endpoint = %self.urls[node], %error, left_out = ?NODE_DOWN_FOR, "an OpenSearch endpoint failed; the others take its requests");
                }
                down[node] = Some(Instant::now() + NODE_DOWN_FOR);
            }
            Some(_) => {}
            None => {
                if down[node].take().is_some() {
                    tracing::info!(endpoint = %self.urls[node], "an OpenSearch endpoint answers again");
                }
            }
        }
    }
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
    let generated = IdMode::of(spec) == IdMode::Generated;
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
    if generated {
        properties.insert(DOC_ID_FIELD.into(), json!({"type": "keyword"}));
        properties.insert(WRITTEN_AT_FIELD.into(), json!({"type": "long"}));
        // Serverless manages shards, replicas and refreshes itself and refuses those settings.
        return json!({
            "settings": {"index": {"knn": true}},
            "mappings": {"properties": properties}
        });
    }
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
    if IdMode::of(spec) == IdMode::Generated {
        fields.insert(DOC_ID_FIELD.into(), json!(doc.id));
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

/// The JSON body of a 2xx answer to `what`; anything else is an error as [`refused`] sorts it.
async fn answer(
    what: &str,
    sent: Result<opensearch::http::response::Response, opensearch::Error>,
) -> Result<Value, SinkError> {
    let (status, text) = status_and_text(what, sent).await?;
    if !(200..300).contains(&status) {
        return Err(refused(what, status, &text));
    }
    serde_json::from_str(&text)
        .map_err(|e| SinkError::Transient(format!("unreadable {what} response: {e}")))
}

/// The status and the body text of an answer to `what`; only a failure to get one is an error.
async fn status_and_text(
    what: &str,
    sent: Result<opensearch::http::response::Response, opensearch::Error>,
) -> Result<(u16, String), SinkError> {
    let response = sent.map_err(|e| SinkError::Transient(e.to_string()))?;
    let status = response.status_code().as_u16();
    let text = response
        .text()
        .await
        .map_err(|e| SinkError::Transient(format!("unreadable {what} response: {e}")))?;
    Ok((status, text))
}

/// Error types of a `_bulk` item that the document itself caused: sending it again cannot help,
/// so its record goes to the dead-letter topic.
const DOCUMENT_ERRORS: [&str; 7] = [
    "mapper_parsing_exception",
    "strict_dynamic_mapping_exception",
    "document_parsing_exception",
    "illegal_argument_exception",
    "x_content_parse_exception",
    "json_parse_exception",
    "parse_exception",
];

/// What to do about a refusal that holds the records, by its status and error type.
fn advice(status: u64, kind: &str, reason: &str) -> &'static str {
    match (status, kind) {
        (_, "cluster_block_exception")
            if reason.contains("disk") || reason.contains("read-only / allow delete") =>
        {
            "the cluster blocked writes because a disk is nearly full: free disk space or add nodes; the block lifts by itself once usage falls below the flood-stage watermark"
        }
        (_, "cluster_block_exception") => {
            "the index or the cluster has a write block (a snapshot, shrink or reindex in progress, or set by hand): lift it with PUT /<index>/_settings {\"index.blocks.write\": false}"
        }
        (_, "index_closed_exception") => "the index is closed: open it with POST /<index>/_open",
        (_, "index_not_found_exception") | (404, _) => {
            "the index does not exist (deleted while the worker runs, and action.auto_create_index is off): restart the worker to create it, or create it with the pipeline's mapping"
        }
        (401, _) => {
            "OpenSearch does not accept the worker's credentials: check sink.opensearch.auth and the Secret or IAM role it names"
        }
        (403, _) | (_, "security_exception") => {
            "the worker's user or IAM role may not write to this index: grant it the index and bulk write permissions (OpenSearch security role mapping, or the IAM or collection data-access policy)"
        }
        (400, "illegal_argument_exception") => {
            "the index name points at an alias with no write index: set is_write_index on one of its indices"
        }
        _ => {
            "OpenSearch refuses the document for a reason of the index or the cluster: fix what the error says"
        }
    }
}

/// True when a refused item is the document's own fault (it goes to the dead-letter topic),
/// not the index's (the records are held). A 400 of these types is; an `illegal_argument` about
/// the index's alias is not.
fn document_fault(status: u64, kind: &str, reason: &str) -> bool {
    status == 400
        && DOCUMENT_ERRORS.contains(&kind)
        && !(kind == "illegal_argument_exception"
            && (reason.contains("write index") || reason.contains("alias")))
}

/// Sorts the items of a `_bulk` response: 2xx indexed; 429, 5xx and a missing status sent
/// again; document-level 400s refused (dead letters); everything else held (a write block,
/// refused credentials, a missing or closed index), with what to fix.
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
            let kind = op["error"]["type"].as_str().unwrap_or("error");
            let reason = op["error"]["reason"].as_str().unwrap_or("no reason given");
            let text = format!("{status} {kind}: {reason}");
            match status {
                200..=299 => ItemResult::Ok,
                _ if kind == "cluster_block_exception" => {
                    ItemResult::Held(format!("{text}; {}", advice(status, kind, reason)))
                }
                429 | 500..=599 | 0 => ItemResult::Retry(text),
                _ if document_fault(status, kind, reason) => ItemResult::Rejected(text),
                _ => ItemResult::Held(format!("{text}; {}", advice(status, kind, reason))),
            }
        })
        .collect())
}

/// The error of a whole request that OpenSearch refused with `status` (not 2xx): 413 too
/// large, 429 and 5xx transient, any other 4xx held with what to fix.
fn refused(what: &str, status: u16, body: &str) -> SinkError {
    let parsed: Value = serde_json::from_str(body).unwrap_or_default();
    let kind = parsed["error"]["type"].as_str().unwrap_or_default();
    let reason = parsed["error"]["reason"].as_str().unwrap_or_default();
    let shown: String = body.chars().take(500).collect();
    match status {
        413 => SinkError::TooLarge(format!(
            "{what} answered 413 (the request is larger than the cluster accepts, http.max_content_length): {shown}"
        )),
        429 | 500..=599 => SinkError::Transient(format!("{what} answered {status}: {shown}")),
        _ => SinkError::Held(format!(
            "{what} answered {status}: {shown}; {}",
            advice(u64::from(status), kind, reason)
        )),
    }
}

impl OpenSearchIndex {
    /// Connects to every endpoint of the spec: requests go round the endpoints in turn, and one
    /// that fails to answer (a connection error, a timeout, 502/503/504) is left out for
    /// [`NODE_DOWN_FOR`] while the others take its share. Basic-auth credentials come from the
    /// environment (`VECTORPIPE_OPENSEARCH_USERNAME` / `_PASSWORD`, which the operator fills from
    /// the Secret), a custom CA from `VECTORPIPE_OPENSEARCH_CA_FILE`, and SigV4 credentials from
    /// the AWS default chain, signed for `es` or `aoss`.
    pub async fn new(
        spec: OpenSearchSink,
        dimensions: i32,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        if spec.endpoints.is_empty() {
            return Err(SinkError::Misconfigured(
                "sink.opensearch.endpoints is empty; list at least one URL".into(),
            ));
        }
        let var = |name: &str, why: &str| {
            std::env::var(name)
                .map_err(|_| SinkError::Misconfigured(format!("{name} is not set; {why}")))
        };
        let mut ca = None;
        if spec.tls.as_ref().is_some_and(|t| t.ca_secret_ref.is_some()) {
            let path = var(
                "VECTORPIPE_OPENSEARCH_CA_FILE",
                "the operator mounts sink.opensearch.tls.caSecretRef and names the file here",
            )?;
            let pem = std::fs::read(&path).map_err(|e| {
                SinkError::Misconfigured(format!("cannot read the OpenSearch CA {path}: {e}"))
            })?;
            opensearch::cert::Certificate::from_pem(&pem).map_err(|e| {
                SinkError::Misconfigured(format!(
                    "the OpenSearch CA {path} is not a PEM certificate: {e}"
                ))
            })?;
            ca = Some(pem);
        }
        let mut credentials = Vec::new();
        let mut service = None;
        if let Some(auth) = &spec.auth {
            if let Some(sigv4) = &auth.sigv4 {
                // The default credential chain: IRSA or Pod Identity in a cluster, env locally.
                let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_config::Region::new(sigv4.region.clone()))
                    .load()
                    .await;
                credentials.push(opensearch::auth::Credentials::try_from(&config).map_err(
                    |e| {
                        SinkError::Misconfigured(format!(
                            "no AWS credentials for SigV4 to OpenSearch ({e}); give the workers an IAM role (IRSA or Pod Identity)"
                        ))
                    },
                )?);
                service = Some(match sigv4.service {
                    SigV4Service::Es => "es",
                    SigV4Service::Aoss => "aoss",
                });
            }
            if auth.basic.is_some() {
                let why = "basic auth reads the username and password from the environment";
                credentials.push(opensearch::auth::Credentials::Basic(
                    var("VECTORPIPE_OPENSEARCH_USERNAME", why)?,
                    var("VECTORPIPE_OPENSEARCH_PASSWORD", why)?,
                ));
            }
        }
        let mut clients = Vec::new();
        for endpoint in &spec.endpoints {
            let url = endpoint.parse().map_err(|e| {
                SinkError::Misconfigured(format!(
                    "sink.opensearch.endpoints {endpoint:?} is not a URL: {e}"
                ))
            })?;
            let mut builder =
                TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(timeout);
            if let Some(pem) = &ca {
                let certificate = opensearch::cert::Certificate::from_pem(pem).map_err(|e| {
                    SinkError::Misconfigured(format!("the OpenSearch CA is not usable: {e}"))
                })?;
                builder = builder
                    .cert_validation(opensearch::cert::CertificateValidation::Full(certificate));
            }
            for credentials in &credentials {
                builder = builder.auth(credentials.clone());
            }
            if let Some(service) = service {
                builder = builder.service_name(service);
            }
            let transport = builder.build().map_err(|e| {
                SinkError::Misconfigured(format!("cannot build the OpenSearch client: {e}"))
            })?;
            clients.push(OpenSearch::new(transport));
        }
        let ids = IdMode::of(&spec);
        let sweeps = (ids == IdMode::Generated).then(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(sweeper(rx, clients[0].clone(), spec.index.clone()));
            tx
        });
        if ids == IdMode::Generated {
            tracing::info!(
                "OpenSearch Serverless: documents get ids from OpenSearch; versions replace and tombstones delete by query (see the README for what is weaker)"
            );
        }
        Ok(Self {
            nodes: Nodes::new(clients, spec.endpoints.clone()),
            spec,
            dimensions,
            ids,
            sweeps,
        })
    }

    /// Sends a request built on the next endpoint, and notes how that endpoint answered.
    async fn send<'s, F, Fut>(
        &'s self,
        request: F,
    ) -> Result<opensearch::http::response::Response, opensearch::Error>
    where
        F: FnOnce(&'s OpenSearch) -> Fut,
        Fut: Future<Output = Result<opensearch::http::response::Response, opensearch::Error>>,
    {
        let (node, client) = self.nodes.pick();
        let sent = request(client).await;
        self.nodes.note(node, &sent);
        sent
    }

    /// Runs a `_search` of the pipeline's index, for the query server: the status and the body
    /// of the answer (only a failure to reach any endpoint is an error).
    pub async fn search(&self, body: Value) -> Result<(u16, String), SinkError> {
        let indices = [self.spec.index.as_str()];
        let sent = self
            .send(|client| {
                client
                    .search(SearchParts::Index(&indices))
                    .body(body)
                    .send()
            })
            .await;
        status_and_text("search", sent).await
    }

    /// The index's mapping (`GET /<index>/_mapping`): the status and the body of the answer.
    pub async fn mapping(&self) -> Result<(u16, String), SinkError> {
        let indices = [self.spec.index.as_str()];
        let indices = &indices;
        let sent = self
            .send(|client| async move {
                client
                    .indices()
                    .get_mapping(IndicesGetMappingParts::Index(indices))
                    .send()
                    .await
            })
            .await;
        status_and_text("mapping", sent).await
    }

    /// `VECTORPIPE_INDEX_ALIAS` (set by the operator for a pipeline's index generations), when
    /// neither an index nor an alias of that name exists yet.
    async fn alias_to_create(&self) -> Result<Option<String>, SinkError> {
        let Some(alias) = std::env::var("VECTORPIPE_INDEX_ALIAS")
            .ok()
            .filter(|a| !a.is_empty() && *a != self.spec.index)
        else {
            return Ok(None);
        };
        Ok((!self.exists(&alias).await?).then_some(alias))
    }

    /// Whether an index or an alias of that name exists.
    async fn exists(&self, name: &str) -> Result<bool, SinkError> {
        let names = [name];
        let status = {
            let (node, client) = self.nodes.pick();
            let sent = client
                .indices()
                .exists(IndicesExistsParts::Index(&names))
                .send()
                .await;
            self.nodes.note(node, &sent);
            sent
        }
        .map_err(|e| SinkError::Transient(e.to_string()))?
        .status_code();
        Ok(status.as_u16() != 404)
    }

    /// Creates the index when missing (and allowed), or checks that the existing one fits.
    pub async fn ensure_index(&self) -> Result<(), SinkError> {
        let index = self.spec.index.as_str();
        if !self.exists(index).await? {
            if !self.spec.create_index {
                return Err(SinkError::Misconfigured(format!(
                    "index {index:?} does not exist and sink.opensearch.createIndex is false; create it or set createIndex: true"
                )));
            }
            let mut body = index_body(&self.spec, self.dimensions);
            // The first generation of an operator-managed pipeline: the index readers search is
            // an alias over it, made in the same request so that it never answers 404 between.
            let alias = self.alias_to_create().await?;
            if let Some(alias) = &alias {
                body["aliases"] = json!({ alias: {} });
            }
            let response = {
                let (node, client) = self.nodes.pick();
                let sent = client
                    .indices()
                    .create(IndicesCreateParts::Index(index))
                    .body(body)
                    .send()
                    .await;
                self.nodes.note(node, &sent);
                sent
            }
            .map_err(|e| SinkError::Transient(e.to_string()))?;
            let status = response.status_code().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) {
                tracing::info!(
                    index,
                    alias = alias.as_deref().unwrap_or(""),
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
        let (_, text) = self.mapping().await?;
        let mapping: Value = serde_json::from_str(&text)
            .map_err(|e| SinkError::Transient(format!("unreadable mapping response: {e}")))?;
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
        let generated = self.ids == IdMode::Generated;
        for r in requests {
            let action = if generated {
                json!({"index": {}})
            } else {
                json!({"index": {"_id": r.id}})
            };
            let lines = serde_json::to_vec(&action)
                .map(|action| {
                    let source = if generated {
                        with_written_at(&r.source, r.stamp)
                    } else {
                        r.source.clone()
                    };
                    (action, source)
                })
                .map_err(|e| {
                    SinkError::Misconfigured(format!("cannot serialise document {}: {e}", r.id))
                })?;
            body.push(lines.0);
            body.push(lines.1);
        }
        let started = Instant::now();
        let sent = self
            .send(|c| c.bulk(BulkParts::Index(&self.spec.index)).body(body).send())
            .await;
        let (status, text) = status_and_text("_bulk", sent).await?;
        tracing::debug!(docs = requests.len(), elapsed = ?started.elapsed(), "bulk request");
        if !(200..300).contains(&status) {
            return Err(refused("_bulk", status, &text));
        }
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| SinkError::Transient(format!("unreadable _bulk response: {e}")))?;
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
            .send(|c| {
                c.mget(MgetParts::Index(&self.spec.index))
                    .body(json!({ "docs": docs }))
                    .send()
            })
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
            .send(|c| c.bulk(BulkParts::Index(&self.spec.index)).body(body).send())
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
        let indices = [self.spec.index.as_str()];
        let refreshed = {
            let (node, client) = self.nodes.pick();
            let sent = client
                .indices()
                .refresh(IndicesRefreshParts::Index(&indices))
                .send()
                .await;
            self.nodes.note(node, &sent);
            sent
        };
        answer("refreshing the index", refreshed).await?;
        let keyword = format!("{SOURCE_KEY_FIELD}.keyword");
        let sent = self
            .send(|c| {
                c.delete_by_query(DeleteByQueryParts::Index(&indices))
                    .body(json!({"query": {"bool": {"should": [
                        {"term": {SOURCE_KEY_FIELD: key}},
                        {"term": {keyword: key}}
                    ]}}}))
                    .conflicts(opensearch::params::Conflicts::Proceed)
                    .send()
            })
            .await;
        let value = answer("_delete_by_query", sent).await?;
        Ok(value["deleted"].as_u64().unwrap_or(0))
    }

    async fn delete_by_parent(&self, parent_ids: &[&str]) -> Result<u64, SinkError> {
        let indices = [self.spec.index.as_str()];
        let sent = self
            .send(|c| {
                c.delete_by_query(DeleteByQueryParts::Index(&indices))
                    .body(json!({"query": {"terms": {PARENT_ID_FIELD: parent_ids}}}))
                    .conflicts(opensearch::params::Conflicts::Proceed)
                    .send()
            })
            .await;
        let value = answer("_delete_by_query", sent).await?;
        Ok(value["deleted"].as_u64().unwrap_or(0))
    }
}

/// Runs each delete again [`SWEEP_AFTER`] after it was asked for (best effort: logged when it
/// fails).
async fn sweeper(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Value>,
    client: OpenSearch,
    index: String,
) {
    let mut queue: std::collections::VecDeque<(Instant, Value)> = Default::default();
    loop {
        let next = queue.front().map(|(at, _)| *at);
        tokio::select! {
            query = rx.recv() => match query {
                Some(query) => queue.push_back((Instant::now() + SWEEP_AFTER, query)),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)).into()), if next.is_some() => {
                let Some((_, query)) = queue.pop_front() else { continue };
                let indices = [index.as_str()];
                let sent = client
                    .delete_by_query(DeleteByQueryParts::Index(&indices))
                    .body(query)
                    .conflicts(opensearch::params::Conflicts::Proceed)
                    .send()
                    .await;
                match answer("_delete_by_query", sent).await {
                    Ok(value) => {
                        let deleted = value["deleted"].as_u64().unwrap_or(0);
                        if deleted > 0 {
                            tracing::debug!(deleted, "the second delete found older documents");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "the second delete of older documents failed; they stay until their record is written again"),
                }
            }
        }
    }
}

impl OpenSearchIndex {
    /// Deletes the documents `query` matches now, and again [`SWEEP_AFTER`] later.
    async fn delete_matching(&self, query: Value) -> Result<u64, SinkError> {
        let indices = [self.spec.index.as_str()];
        let body = query.clone();
        let sent = self
            .send(|c| {
                c.delete_by_query(DeleteByQueryParts::Index(&indices))
                    .body(body)
                    .conflicts(opensearch::params::Conflicts::Proceed)
                    .send()
            })
            .await;
        let value = answer("_delete_by_query", sent).await?;
        if let Some(sweeps) = &self.sweeps {
            let _ = sweeps.send(query);
        }
        Ok(value["deleted"].as_u64().unwrap_or(0))
    }

    /// With ids picked by OpenSearch: deletes the older documents of the records that this
    /// write stored some of.
    async fn delete_older(
        &self,
        requests: &[&IndexRequest],
        results: &[ItemResult],
    ) -> Result<u64, SinkError> {
        let mut records: Vec<(&str, u64)> = requests
            .iter()
            .zip(results)
            .filter(|(_, r)| **r == ItemResult::Ok)
            .map(|(r, _)| (r.parent_id.as_str(), r.stamp))
            .collect();
        records.sort_unstable();
        records.dedup();
        let mut deleted = 0;
        for part in records.chunks(200) {
            deleted += self.delete_matching(older_than(part)).await?;
        }
        Ok(deleted)
    }
}

impl Sink for OpenSearchIndex {
    fn encode(&self, doc: &Document, vector: &[f32]) -> IndexRequest {
        IndexRequest {
            id: doc.id.clone(),
            parent_id: doc.parent_id.clone(),
            chunks: doc.chunks,
            source: document_source(&self.spec, doc, vector),
            stamp: 0,
        }
    }

    async fn write(&self, requests: &[&IndexRequest]) -> Result<Vec<ItemResult>, SinkError> {
        let results = self.bulk(requests).await?;
        if self.ids == IdMode::Generated {
            // Not done before the older versions are gone (as far as they are searchable).
            // Retried here, not by sending the documents again: they are stored, and a second
            // copy would get ids of its own.
            crate::retry::until_done(
                "deleting the older documents of written records",
                crate::retry::RetryPolicy::WRITES,
                || self.delete_older(requests, &results),
            )
            .await;
        }
        Ok(results)
    }

    /// By id from the first document's chunk count (exact, and in real time), then by query on
    /// the parent id (also finds strays, once they are searchable); with `by_source_key`, after a
    /// refresh (so that documents written a moment ago are searchable), also the documents that
    /// keep this key as their source key.
    async fn delete_record(
        &self,
        parent_id: &str,
        by_source_key: bool,
        stamp: u64,
    ) -> Result<u64, SinkError> {
        if self.ids == IdMode::Generated {
            let mut deleted = self
                .delete_matching(older_than(&[(parent_id, stamp)]))
                .await?;
            if by_source_key {
                let keyword = format!("{SOURCE_KEY_FIELD}.keyword");
                deleted += self
                    .delete_matching(json!({"query": {"bool": {
                        "should": [
                            {"term": {SOURCE_KEY_FIELD: parent_id}},
                            {"term": {keyword: parent_id}}
                        ],
                        "minimum_should_match": 1,
                        "filter": [{"range": {WRITTEN_AT_FIELD: {"lt": stamp}}}]
                    }}}))
                    .await?;
            }
            return Ok(deleted);
        }
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
        if self.ids == IdMode::Generated {
            // Each write deletes every older document of its records, stale chunks included.
            return Ok(0);
        }
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

    #[test]
    fn refusals_of_the_index_hold_the_records_and_only_the_documents_own_are_dead_letters() {
        let item = |status: u64, kind: &str, reason: &str| json!({"index": {"status": status, "error": {"type": kind, "reason": reason}}});
        let response = json!({"errors": true, "items": [
            item(403, "cluster_block_exception", "index [docs] blocked by: [FORBIDDEN/8/index write (api)];"),
            item(429, "cluster_block_exception", "index [docs] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block];"),
            item(404, "index_not_found_exception", "no such index [docs]"),
            item(403, "security_exception", "no permissions for [indices:data/write/bulk[s]]"),
            item(400, "illegal_argument_exception", "no write index is defined for alias [docs]"),
            item(400, "index_closed_exception", "closed"),
            item(400, "strict_dynamic_mapping_exception", "mapping set to strict, dynamic introduction of [x] is not allowed"),
            item(400, "illegal_argument_exception", "field [likes] of type [long] cannot take [abc]"),
        ]});
        let results = item_results(&response, 8).unwrap();
        for (n, result) in results.iter().enumerate().take(6) {
            assert!(matches!(result, ItemResult::Held(_)), "{n}: {result:?}");
        }
        assert!(matches!(&results[0], ItemResult::Held(r) if r.contains("index.blocks.write")));
        assert!(matches!(&results[1], ItemResult::Held(r) if r.contains("disk")));
        assert!(matches!(&results[2], ItemResult::Held(r) if r.contains("does not exist")));
        assert!(matches!(&results[3], ItemResult::Held(r) if r.contains("permissions")));
        assert!(matches!(results[6], ItemResult::Rejected(_)));
        assert!(matches!(results[7], ItemResult::Rejected(_)));
    }

    #[test]
    fn whole_requests_are_sorted_too_large_transient_or_held() {
        assert!(matches!(
            refused("_bulk", 413, "<html>too large</html>"),
            SinkError::TooLarge(_)
        ));
        assert!(matches!(
            refused("_bulk", 503, "{}"),
            SinkError::Transient(_)
        ));
        assert!(matches!(
            refused("_bulk", 429, "{}"),
            SinkError::Transient(_)
        ));
        let held = refused(
            "_bulk",
            401,
            r#"{"error": {"type": "security_exception", "reason": "missing authentication credentials"}}"#,
        );
        assert!(
            matches!(&held, SinkError::Held(m) if m.contains("credentials")),
            "{held}"
        );
    }

    #[test]
    fn with_generated_ids_a_write_deletes_the_older_documents_of_its_records() {
        assert_eq!(
            with_written_at(br#"{"a":1}"#, 7),
            br#"{"a":1,"writtenAt":7}"#
        );
        assert_eq!(with_written_at(b"{}", 7), br#"{"writtenAt":7}"#);
        let query = older_than(&[("r", 42)]);
        let clause = &query["query"]["bool"]["should"][0]["bool"]["filter"];
        assert_eq!(clause[0]["term"]["parentId"], "r");
        assert_eq!(clause[1]["range"]["writtenAt"]["lt"], 42);
        let serverless =
            sink(json!({"auth": {"sigv4": {"region": "eu-west-1", "service": "aoss"}}}));
        assert_eq!(IdMode::of(&serverless), IdMode::Generated);
        assert_eq!(IdMode::of(&sink(json!({}))), IdMode::Own);
        let body = index_body(&serverless, 256);
        assert!(body["settings"]["index"].get("number_of_shards").is_none());
        assert_eq!(body["mappings"]["properties"]["docId"]["type"], "keyword");
    }
}
