//! `EmbeddingPipeline`: read a Kafka topic, embed a field with a Bedrock model, index the vectors
//! into an OpenSearch k-NN index.
//!
//! The spec types are plain serde/schemars structs so the worker can read the same spec from a file
//! without depending on kube; the `kube` feature adds the `CustomResource` derive on top.

// Each `printcolumn(...)` of the kube derive repeats `type_ = ...`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;

/// Consumer properties that the worker sets itself; a spec may not override them.
pub const WORKER_OWNED_CONSUMER_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "enable.partition.eof",
];

/// Parts of a librdkafka property name that mark a secret (a password, a key, a keytab, PEM
/// text). Such values belong in a Secret referenced by `auth`, never in the spec, whose rendered
/// file is a ConfigMap anyone who reads ConfigMaps can see.
pub const SECRET_CONSUMER_PROPERTY_MARKERS: &[&str] = &[
    "password", "secret", ".pem", "keystore", "keytab", "ssl.key.",
];

/// Why a `consumerProperties` key is refused, if it is.
pub fn refused_consumer_property(key: &str) -> Option<&'static str> {
    if WORKER_OWNED_CONSUMER_PROPERTIES.contains(&key) {
        return Some("is managed by the worker; use groupId, startingOffset and auth instead");
    }
    SECRET_CONSUMER_PROPERTY_MARKERS
        .iter()
        .any(|m| key.contains(m))
        .then_some("carries a secret, which would be readable in the worker's ConfigMap; put it in a Secret and reference it from source.kafka.auth")
}

/// The CEL rule of `consumerProperties`, generated from the two lists above.
fn consumer_properties_rule(schema: &mut schemars::Schema) {
    let quoted = |keys: &[&str]| {
        keys.iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let markers = SECRET_CONSUMER_PROPERTY_MARKERS
        .iter()
        .map(|m| format!("!k.contains('{m}')"))
        .collect::<Vec<_>>()
        .join(" && ");
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([{
            "rule": format!(
                "self.all(k, !(k in [{}]) && {markers})",
                quoted(WORKER_OWNED_CONSUMER_PROPERTIES)
            ),
            "message": "consumerProperties may not set keys the worker manages (group, offsets, security; use groupId, startingOffset and auth) or keys that carry secrets (passwords, keys, PEM text; put them in a Secret referenced from auth)"
        }]),
    );
}

/// The desired state of an embedding pipeline.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "vectorpipe.io",
        version = "v1alpha1",
        kind = "EmbeddingPipeline",
        plural = "embeddingpipelines",
        shortname = "vp",
        shortname = "vpipe",
        category = "vectorpipe",
        namespaced,
        status = "EmbeddingPipelineStatus",
        derive = "PartialEq",
        doc = "A pipeline that consumes a Kafka topic, embeds each record with an Amazon Bedrock model and indexes the vectors into an OpenSearch k-NN index.",
        scale(
            spec_replicas_path = ".spec.workers.replicas",
            status_replicas_path = ".status.replicas",
            label_selector_path = ".status.selector"
        ),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
        printcolumn(name = "Lag", type_ = "integer", json_path = ".status.consumerLag"),
        printcolumn(
            name = "Fresh-P95",
            type_ = "number",
            json_path = ".status.freshness.p95Seconds"
        ),
        printcolumn(
            name = "Model",
            type_ = "string",
            json_path = ".spec.embedding.bedrock.modelId"
        ),
        printcolumn(
            name = "Index",
            type_ = "string",
            json_path = ".spec.sink.opensearch.index"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.deadLetter) || !has(self.source.kafka.topics) || !(self.deadLetter.topic in self.source.kafka.topics)",
        "message": "deadLetter.topic must differ from the source topics, or failed records would be read again"
    }
]))]
pub struct EmbeddingPipelineSpec {
    /// Where records come from.
    pub source: Source,
    /// How a record becomes the text to embed, its id and its metadata.
    #[serde(default)]
    pub transform: Transform,
    /// How long texts are split before embedding.
    #[serde(default)]
    pub chunking: Chunking,
    /// Skipping records whose id and content were already indexed recently.
    #[serde(default)]
    pub dedup: Dedup,
    /// The embedding model.
    pub embedding: Embedding,
    /// Where the documents go.
    pub sink: Sink,
    /// Where records that cannot be indexed go. When unset, such records are skipped, counted and
    /// logged, and the pipeline's status says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// The worker pods.
    #[serde(default)]
    pub workers: Workers,
    /// Stops all workers (replicas 0) without deleting anything; offsets stay committed.
    #[serde(default)]
    pub suspend: bool,
    /// A query server over the pipeline's index (`vectorpipe-worker serve`: search, answers
    /// that cite the records, a web page), run next to the workers.
    #[serde(default, skip_serializing_if = "Query::is_default")]
    pub query: Query,
    /// A daily limit on the embedding spend (tokens or estimated cost), checked by the operator
    /// from the workers' token counters in Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// How a change of the model or the chunking is carried out: a new index generation is
    /// built beside the one readers search, which switch to it once it caught up.
    #[serde(default, skip_serializing_if = "super::Migration::is_default")]
    pub migration: super::Migration,
}

/// A daily embedding budget for the whole pipeline.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.maxTokensPerDay) || has(self.maxCostPerDay)",
        "message": "a budget needs maxTokensPerDay, maxCostPerDay or both"
    },
    {
        "rule": "self.action != 'throttle' || has(self.throttleTokensPerMinute)",
        "message": "action: throttle needs throttleTokensPerMinute, the rate the pipeline may spend once the budget is used"
    }
]))]
pub struct Budget {
    /// Input tokens per day, all workers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens_per_day: Option<i64>,
    /// Estimated cost per day in US dollars, from the operator's price table (input tokens
    /// times the model's price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.000001))]
    pub max_cost_per_day: Option<f64>,
    /// What happens once the day's budget is used, until the day resets: `suspend` stops the
    /// workers (offsets stay committed, nothing is lost); `throttle` runs one worker at
    /// `throttleTokensPerMinute`.
    #[serde(default)]
    pub action: BudgetAction,
    /// The rate, in input tokens per minute, while throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub throttle_tokens_per_minute: Option<i64>,
    /// When the day starts, `HH:MM` in `timeZone`.
    #[serde(default = "default_reset_at")]
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub reset_at: String,
    /// The IANA time zone of the day boundary (`Europe/Paris`, `UTC`).
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
}

fn default_reset_at() -> String {
    "00:00".into()
}

fn default_time_zone() -> String {
    "UTC".into()
}

/// What a used-up budget does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BudgetAction {
    /// No workers until the day resets.
    #[default]
    Suspend,
    /// One worker at `throttleTokensPerMinute` until the day resets.
    Throttle,
}

/// The query server of a pipeline: a Deployment and a Service `<name>-query`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Query {
    /// Run the query server.
    pub enabled: bool,
    /// Query server pods.
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,
    /// The Bedrock model that answers questions (Converse), e.g.
    /// `anthropic.claude-3-haiku-20240307-v1:0` (the default) or an inference profile id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub llm_model_id: Option<String>,
    /// A Secret key holding a bearer token: when set, every `/v1` request must carry
    /// `Authorization: Bearer <token>` (the page asks for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_secret_ref: Option<TokenSecretRef>,
    /// CPU and memory of each query server container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The port serving the page, `/v1/search`, `/v1/ask`, `/metrics`, `/healthz`, `/readyz`.
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
}

impl Default for Query {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: 1,
            llm_model_id: None,
            auth_secret_ref: None,
            resources: None,
            port: 8080,
        }
    }
}

impl Query {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// A Secret key holding a token.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenSecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_token_key() -> String {
    "token".into()
}

/// The record source. Kafka is the only kind today.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// An Apache Kafka or Amazon MSK cluster.
    pub kafka: KafkaSource,
}

/// A Kafka consumer-group source.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.topics) != has(self.topicPattern)",
        "message": "set exactly one of source.kafka.topics or source.kafka.topicPattern"
    }
]))]
pub struct KafkaSource {
    /// Broker addresses, `host:port`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 512)))]
    pub bootstrap_servers: Vec<String>,
    /// Topics to consume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))
    )]
    pub topics: Option<Vec<String>>,
    /// A regular expression of topics to consume (librdkafka syntax, without the leading `^`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub topic_pattern: Option<String>,
    /// The consumer group. Default: `vectorpipe-<namespace>-<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub group_id: Option<String>,
    /// Where a group without committed offsets starts reading.
    #[serde(default)]
    pub starting_offset: StartingOffset,
    /// How the worker authenticates. When unset: plaintext, no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<KafkaAuth>,
    /// Extra librdkafka consumer properties, e.g. `fetch.max.bytes`. Keys the worker manages
    /// (group, offsets, security) and keys that carry secrets are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64), transform = consumer_properties_rule)]
    pub consumer_properties: BTreeMap<String, String>,
    /// How record values are decoded.
    #[serde(default)]
    pub format: RecordFormat,
}

/// Where a consumer group with no committed offset starts.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StartingOffset {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records produced after the group first joins.
    Latest,
}

/// How a record's value is decoded.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RecordFormat {
    /// A JSON object; fields are picked with JSON pointers.
    #[default]
    Json,
    /// UTF-8 text; the whole value is the text to embed.
    Text,
}

/// Kafka authentication: exactly one kind.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.tls) ? 1 : 0) + (has(self.scram) ? 1 : 0) + (has(self.mskIam) ? 1 : 0) == 1",
        "message": "source.kafka.auth must set exactly one of tls, scram or mskIam (omit auth for a plaintext broker)"
    }
]))]
pub struct KafkaAuth {
    /// TLS, with a client certificate for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTls>,
    /// SASL/SCRAM username and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram: Option<KafkaScram>,
    /// Amazon MSK IAM (SASL/OAUTHBEARER signed with the pod's AWS credentials, over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msk_iam: Option<MskIam>,
}

/// TLS to the brokers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTls {
    /// A CA bundle to trust instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) presented to the brokers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// SASL/SCRAM authentication.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaScram {
    /// The SCRAM hash.
    #[serde(default)]
    pub mechanism: ScramMechanism,
    /// A Secret with the keys `username` and `password`.
    pub secret_ref: SecretRef,
    /// Use TLS (SASL_SSL). Turn off only for a broker that offers SASL without TLS.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// A CA bundle to trust instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// SCRAM hash functions.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ScramMechanism {
    /// SCRAM-SHA-256.
    #[serde(rename = "SHA-256")]
    Sha256,
    /// SCRAM-SHA-512 (what Amazon MSK uses).
    #[default]
    #[serde(rename = "SHA-512")]
    Sha512,
}

/// Amazon MSK IAM authentication.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MskIam {
    /// The cluster's AWS region, e.g. `eu-west-1`.
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
}

/// A whole Secret in the pipeline's namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// One key of a Secret in the pipeline's namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the Secret.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

/// How a record becomes a document.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.idPointer) || !has(self.idFromKey) || !self.idFromKey",
        "message": "set idPointer or idFromKey, not both: a record has one id"
    }
]))]
pub struct Transform {
    /// JSON pointer to the record's id. When unset (and `idFromKey` is false), the id is
    /// `<topic>-<partition>-<offset>`. A tombstone (a record with a key and no value) deletes the
    /// documents whose id is its key, so producers should key records by this id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/.*)?$"))]
    pub id_pointer: Option<String>,
    /// The Kafka record key is the record's id: a new record with the same key replaces the
    /// documents of the previous one, and a tombstone deletes them. For keyed topics whose value
    /// carries no id field (also with `format: text`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub id_from_key: bool,
    /// JSON pointers to the text fields to embed; several are joined with a blank line.
    #[schemars(length(min = 1, max = 16), inner(regex(pattern = r"^(/.*)?$")))]
    pub text_pointers: Vec<String>,
    /// JSON pointer to the record's creation time (RFC 3339 or epoch milliseconds), written as
    /// `@timestamp`. When unset, the Kafka record timestamp is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/.*)?$"))]
    pub timestamp_pointer: Option<String>,
    /// Extra document fields: output field name → JSON pointer into the record.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub metadata: BTreeMap<String, String>,
    /// Skip records whose text is empty or only whitespace.
    pub skip_empty_text: bool,
    /// Skip records that match any of these conditions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub filters: Vec<Filter>,
    /// What to do when a text or id pointer is missing from a record.
    pub on_missing_field: OnMissingField,
}

impl KafkaSource {
    /// The consumer group the workers join: `groupId`, else `vectorpipe-<namespace>-<pipeline>`.
    /// The worker and the operator's lag reader both use this, so they always agree.
    pub fn consumer_group(&self, namespace: &str, pipeline: &str) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("vectorpipe-{namespace}-{pipeline}"))
    }
}

impl EmbeddingPipelineSpec {
    /// Where record ids come from, and so whether a tombstone can find the documents of its key.
    pub fn id_source(&self) -> IdSource {
        let t = &self.transform;
        if t.id_from_key {
            IdSource::Key
        } else if t.id_pointer.is_some() && self.source.kafka.format == RecordFormat::Json {
            IdSource::Pointer
        } else {
            IdSource::Position
        }
    }
}

/// Where a record's id comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSource {
    /// `transform.idFromKey`: the Kafka key.
    Key,
    /// `transform.idPointer`: a field of the JSON value.
    Pointer,
    /// Neither: `<topic>-<partition>-<offset>`, so no two records share an id.
    Position,
}

impl IdSource {
    /// True when records with one id can arrive again (updates, tombstones), so their versions
    /// must be ordered.
    pub fn is_stable(self) -> bool {
        self != Self::Position
    }
}

impl Default for Transform {
    fn default() -> Self {
        Self {
            id_pointer: None,
            id_from_key: false,
            text_pointers: vec!["/text".to_owned()],
            timestamp_pointer: None,
            metadata: BTreeMap::new(),
            skip_empty_text: true,
            filters: Vec::new(),
            on_missing_field: OnMissingField::DeadLetter,
        }
    }
}

/// A condition that makes a record be skipped.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.exists) ? 1 : 0) + (has(self.equals) ? 1 : 0) + (has(self.notEquals) ? 1 : 0) == 1",
        "message": "a filter sets exactly one of exists, equals or notEquals"
    }
]))]
pub struct Filter {
    /// JSON pointer to the field the condition looks at.
    #[schemars(length(max = 1024), regex(pattern = r"^/.*$"))]
    pub pointer: String,
    /// Skip when the field is present (`true`) or absent (`false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// Skip when the field equals this value (numbers and booleans compare by their JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub equals: Option<String>,
    /// Skip when the field is absent or differs from this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub not_equals: Option<String>,
}

/// What happens to a record that lacks a field the transform needs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OnMissingField {
    /// Send the record to the dead-letter topic (or skip it when none is configured).
    #[default]
    DeadLetter,
    /// Skip the record, count it and log its offset.
    Skip,
    /// Embed the whole record as text.
    EmbedWholeRecord,
}

/// Splitting long texts into chunks before embedding.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.overlapChars < self.maxChars",
        "message": "chunking.overlapChars must be smaller than chunking.maxChars"
    }
]))]
pub struct Chunking {
    /// How texts are split.
    pub strategy: ChunkingStrategy,
    /// The largest chunk, in characters.
    #[schemars(range(min = 16, max = 50000))]
    pub max_chars: i32,
    /// Characters shared by consecutive chunks.
    #[schemars(range(min = 0, max = 49999))]
    pub overlap_chars: i32,
}

impl Default for Chunking {
    fn default() -> Self {
        Self {
            strategy: ChunkingStrategy::Recursive,
            max_chars: 2000,
            overlap_chars: 200,
        }
    }
}

/// Chunking strategies.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ChunkingStrategy {
    /// Never split; texts longer than the model accepts are truncated.
    None,
    /// Fixed windows of characters.
    Characters,
    /// Paragraphs, then sentences, then words, then characters: the largest unit that fits.
    #[default]
    Recursive,
    /// Whole sentences packed up to the limit.
    Sentences,
}

/// Deduplication of records by id and content.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Dedup {
    /// Skip a record whose id and content hash were indexed within `ttl`.
    pub enabled: bool,
    /// How long an indexed record is remembered.
    pub ttl: Duration,
    /// The most records remembered per worker; the oldest are forgotten first.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_entries: i64,
}

impl Default for Dedup {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_days(7),
            max_entries: 1_000_000,
        }
    }
}

/// The embedding model.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Embedding {
    /// An Amazon Bedrock model.
    pub bedrock: BedrockEmbedding,
}

/// An Amazon Bedrock embedding model and how to call it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.dimensions) || !self.modelId.startsWith('amazon.titan-embed-text-v2') || self.dimensions in [256, 512, 1024]",
        "message": "amazon.titan-embed-text-v2 produces 256, 512 or 1024 dimensions; set embedding.bedrock.dimensions to one of them"
    },
    {
        "rule": "!has(self.dimensions) || !self.modelId.startsWith('amazon.titan-embed-text-v1') || self.dimensions == 1536",
        "message": "amazon.titan-embed-text-v1 always produces 1536 dimensions; remove embedding.bedrock.dimensions or set it to 1536"
    },
    {
        "rule": "!has(self.dimensions) || !self.modelId.startsWith('cohere.embed-') || self.dimensions == 1024",
        "message": "Cohere embed v3 models produce 1024 dimensions; remove embedding.bedrock.dimensions or set it to 1024"
    },
    {
        "rule": "!has(self.batchSize) || self.batchSize == 1 || self.modelId.startsWith('cohere.embed-')",
        "message": "only Cohere embed models take several texts per call; remove embedding.bedrock.batchSize or set it to 1"
    },
    {
        "rule": "(!has(self.inputType) && !has(self.truncate)) || self.modelId.startsWith('cohere.embed-')",
        "message": "inputType and truncate apply only to Cohere embed models"
    },
    {
        "rule": "!has(self.normalize) || self.modelId.startsWith('amazon.titan-embed-text-v2')",
        "message": "normalize applies only to amazon.titan-embed-text-v2"
    }
]))]
pub struct BedrockEmbedding {
    /// The model id, e.g. `amazon.titan-embed-text-v2:0`, `amazon.titan-embed-text-v1`,
    /// `cohere.embed-english-v3`, or an inference profile / provisioned model ARN.
    #[schemars(length(min = 1, max = 2048))]
    pub model_id: String,
    /// The AWS region of the endpoint. Default: the pod's `AWS_REGION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: Option<String>,
    /// The vector size. Required for models vectorpipe does not know; for Titan v2 one of
    /// 256, 512, 1024 (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16000))]
    pub dimensions: Option<i32>,
    /// Titan v2: ask the model for unit-length vectors (the model's default is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Cohere: what the texts are used for; documents being indexed are `search_document`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_type: Option<CohereInputType>,
    /// Cohere: how the model shortens texts longer than it accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<CohereTruncate>,
    /// Overrides the Bedrock runtime endpoint (a VPC endpoint, or a test server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint_url: Option<String>,
    /// The most calls in flight per worker; completed in any order.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_in_flight: i32,
    /// Texts per call (Cohere takes up to 96).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 96))]
    pub batch_size: Option<i32>,
    /// Time allowed for one call, retries excluded.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// Retries of throttled and failed calls.
    #[serde(default)]
    pub retry: Retry,
    /// A ceiling on Bedrock calls per second for the whole pipeline (retries included): each
    /// worker takes an equal share, from the live members of the consumer group, and the share
    /// follows the worker count without a restart. Set it below the account's quota for the
    /// model, and all workers together stay under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub requests_per_second: Option<i32>,
    /// A ceiling on input tokens per minute for the whole pipeline, shared like
    /// `requestsPerSecond` (a call waits for its estimated tokens, a quarter of its characters,
    /// and what the model counted beyond that is taken after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<i64>,
}

/// Cohere `input_type` values.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CohereInputType {
    /// Texts stored for retrieval.
    SearchDocument,
    /// Questions asked against stored texts.
    SearchQuery,
    /// Texts fed to a classifier.
    Classification,
    /// Texts grouped by similarity.
    Clustering,
}

/// Cohere `truncate` values.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum CohereTruncate {
    /// Refuse texts that are too long.
    None,
    /// Drop the start of a text that is too long.
    Start,
    /// Drop the end of a text that is too long.
    End,
}

/// Retries with jittered exponential backoff.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Retry {
    /// Attempts per call, the first one included.
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
    /// The first backoff.
    pub base_delay: Duration,
    /// The longest backoff.
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
        }
    }
}

/// The document sink.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sink {
    /// An OpenSearch cluster or Amazon OpenSearch Service / Serverless collection.
    pub opensearch: OpenSearchSink,
}

/// An OpenSearch k-NN index.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OpenSearchSink {
    /// Cluster URLs, e.g. `https://search-x.eu-west-1.es.amazonaws.com`.
    #[schemars(
        length(min = 1, max = 32),
        inner(length(max = 2048), regex(pattern = r"^https?://"))
    )]
    pub endpoints: Vec<String>,
    /// The index name.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[a-z0-9][a-z0-9._-]*$"))]
    pub index: String,
    /// How requests are authenticated. When unset: anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<OpenSearchAuth>,
    /// TLS settings for `https` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OpenSearchTls>,
    /// Create the index with a k-NN mapping when it does not exist.
    #[serde(default = "default_true")]
    pub create_index: bool,
    /// Settings for an index the pipeline creates.
    #[serde(default)]
    pub index_settings: IndexSettings,
    /// The `knn_vector` field.
    #[serde(default = "default_vector_field")]
    #[schemars(length(min = 1, max = 255))]
    pub vector_field: String,
    /// The field holding the embedded text.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1, max = 255))]
    pub text_field: String,
    /// The k-NN method of an index the pipeline creates.
    #[serde(default)]
    pub method: KnnMethod,
    /// Bulk request limits.
    #[serde(default)]
    pub bulk: Bulk,
    /// Delete the index when the pipeline is deleted.
    #[serde(default)]
    pub delete_index_on_delete: bool,
}

/// OpenSearch authentication: exactly one kind.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.basic) != has(self.sigv4)",
        "message": "sink.opensearch.auth must set exactly one of basic or sigv4 (omit auth for anonymous access)"
    }
]))]
pub struct OpenSearchAuth {
    /// HTTP basic auth from a Secret with the keys `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuth>,
    /// AWS SigV4 request signing with the pod's AWS credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigv4: Option<SigV4>,
}

/// HTTP basic authentication.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuth {
    /// A Secret with the keys `username` and `password`.
    pub secret_ref: SecretRef,
}

/// AWS SigV4 signing.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigV4 {
    /// The domain's or collection's region.
    #[schemars(regex(pattern = r"^[a-z]{2}(-[a-z]+)+-[0-9]+$"))]
    pub region: String,
    /// `es` for Amazon OpenSearch Service, `aoss` for OpenSearch Serverless.
    #[serde(default)]
    pub service: SigV4Service,
}

/// The AWS service a request is signed for.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SigV4Service {
    /// Amazon OpenSearch Service.
    #[default]
    Es,
    /// Amazon OpenSearch Serverless.
    Aoss,
}

/// TLS to OpenSearch.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OpenSearchTls {
    /// A CA bundle to trust instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// Settings of an index the pipeline creates.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct IndexSettings {
    /// Primary shards.
    #[schemars(range(min = 1, max = 1024))]
    pub shards: i32,
    /// Replicas of each shard.
    #[schemars(range(min = 0, max = 16))]
    pub replicas: i32,
    /// How often new documents become searchable.
    pub refresh_interval: Duration,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            shards: 5,
            replicas: 1,
            refresh_interval: Duration::from_secs(1),
        }
    }
}

/// The `knn_vector` method.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct KnnMethod {
    /// The k-NN library.
    pub engine: KnnEngine,
    /// The distance function.
    pub space_type: SpaceType,
    /// HNSW: links per node.
    #[schemars(range(min = 2, max = 512))]
    pub m: i32,
    /// HNSW: candidate list size while building the graph.
    #[schemars(range(min = 2, max = 4096))]
    pub ef_construction: i32,
}

impl Default for KnnMethod {
    fn default() -> Self {
        Self {
            engine: KnnEngine::Faiss,
            space_type: SpaceType::L2,
            m: 24,
            ef_construction: 128,
        }
    }
}

/// k-NN engines.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KnnEngine {
    /// Lucene's HNSW (pure Java, no native library).
    Lucene,
    /// Faiss.
    #[default]
    Faiss,
    /// NMSLIB (deprecated in OpenSearch 2.19).
    Nmslib,
}

/// k-NN distance functions.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SpaceType {
    /// Euclidean distance.
    #[default]
    L2,
    /// Cosine similarity.
    Cosinesimil,
    /// Inner product.
    Innerproduct,
}

/// Limits of one `_bulk` request.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Bulk {
    /// Documents per request.
    #[schemars(range(min = 1, max = 10000))]
    pub max_docs: i32,
    /// Bytes per request body (Amazon OpenSearch refuses bodies over 10 MiB on small instances).
    #[schemars(range(min = 1024, max = 104_857_600))]
    pub max_bytes: i64,
    /// The longest a document waits for a request to fill.
    pub flush_interval: Duration,
    /// `_bulk` requests in flight at once per worker (while one is answered the next is sent).
    #[schemars(range(min = 1, max = 16))]
    pub concurrency: i32,
}

impl Default for Bulk {
    fn default() -> Self {
        Self {
            max_docs: 500,
            max_bytes: 5 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            concurrency: 2,
        }
    }
}

/// The dead-letter topic.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// A topic on the source cluster that receives failed records with their reason in headers.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
}

/// The worker pods.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Workers {
    /// Worker pods; the scale subresource and ScalingPolicies set this.
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// The worker image. Default: the operator's own version of the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// CPU and memory of each worker container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The pods' ServiceAccount (annotate it for IRSA, or bind it with EKS Pod Identity).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
    /// Node labels the pods require.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Pod affinity and anti-affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra pod annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Extra pod labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra environment variables of the worker container.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// A log filter such as `info` or `info,vectorpipe_worker=debug`.
    #[schemars(length(min = 1, max = 1024))]
    pub log_level: String,
    /// The port serving `/metrics`, `/healthz` and `/readyz`.
    #[schemars(range(min = 1024, max = 65535))]
    pub metrics_port: i32,
}

impl Default for Workers {
    fn default() -> Self {
        Self {
            replicas: 1,
            image: None,
            image_pull_policy: None,
            resources: None,
            service_account_name: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            pod_annotations: BTreeMap::new(),
            pod_labels: BTreeMap::new(),
            env: Vec::new(),
            log_level: "info".to_owned(),
            metrics_port: 9090,
        }
    }
}

/// Container image pull policies.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// The observed state of an embedding pipeline.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddingPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Worker pods that exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Worker pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The worker pods' label selector, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Records produced but not yet committed by the pipeline's consumer group, all partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_lag: Option<i64>,
    /// When the worker count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// How fresh the index is, from the workers' freshness histogram in Prometheus (written
    /// while a ScalingPolicy scales the pipeline and a Prometheus server is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Freshness>,
    /// The embedding spend of the current budget day (with `spec.budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The index generations: the one readers search, a migration under way, the ones kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<super::IndexStatus>,
}

/// What the pipeline spent on embeddings since the budget day began.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// When the budget day began.
    pub since: Time,
    /// Input tokens since then, all workers together.
    pub tokens: i64,
    /// The estimated cost of those tokens in US dollars (absent when the model has no price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_cost_usd: Option<f64>,
}

/// Seconds from a record's Kafka timestamp to OpenSearch acknowledging it, over the last five
/// minutes (0 when no record was indexed in them).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Freshness {
    /// The median.
    pub p50_seconds: f64,
    /// The 95th percentile.
    pub p95_seconds: f64,
}

fn default_true() -> bool {
    true
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

fn default_max_in_flight() -> i32 {
    64
}

fn default_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_vector_field() -> String {
    "embedding".to_owned()
}

fn default_text_field() -> String {
    "text".to_owned()
}
