//! Index generations and model migration: a change of the model (its id, dimensions,
//! normalisation, input type, truncation) or of the chunking of a running pipeline builds a new
//! index generation beside the one readers use, and the alias readers search flips to it once it
//! has caught up.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BedrockEmbedding, Chunking, CohereInputType, CohereTruncate, Duration, EmbeddingPipelineSpec,
};

/// How a model change is carried out.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Migration {
    /// How long the generation readers used before a migration is kept (not written to) after
    /// the switch, so that going back is one spec change that only has to catch up.
    pub retain_previous: Duration,
    /// Workers that build the new generation. Default: as many as the pipeline runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub backfill_replicas: Option<i32>,
    /// The new generation has caught up, and readers are switched to it, once its consumer group
    /// is at most this many records behind, all partitions together.
    #[schemars(range(min = 0))]
    pub catch_up_lag: i64,
    /// Build the new generation even when Kafka no longer holds the first records of the source
    /// (retention deleted them): the documents they made are then missing from it.
    pub allow_incomplete_history: bool,
}

impl Default for Migration {
    fn default() -> Self {
        Self {
            retain_previous: Duration::from_secs(24 * 3600),
            backfill_replicas: None,
            catch_up_lag: 100,
            allow_incomplete_history: false,
        }
    }
}

impl Migration {
    /// True when the settings are the defaults (left out of the rendered spec).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What of the spec decides the vectors of an index: a change of it needs a new generation.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IndexModel {
    /// `embedding.bedrock.modelId`.
    pub model_id: String,
    /// `embedding.bedrock.dimensions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<i32>,
    /// `embedding.bedrock.normalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// `embedding.bedrock.inputType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_type: Option<CohereInputType>,
    /// `embedding.bedrock.truncate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<CohereTruncate>,
    /// `chunking`.
    pub chunking: Chunking,
}

impl IndexModel {
    /// The model of a spec.
    pub fn of(spec: &EmbeddingPipelineSpec) -> Self {
        let b = &spec.embedding.bedrock;
        Self {
            model_id: b.model_id.clone(),
            dimensions: b.dimensions,
            normalize: b.normalize,
            input_type: b.input_type,
            truncate: b.truncate,
            chunking: spec.chunking.clone(),
        }
    }

    /// The spec with this model in place of its own (everything else stays).
    pub fn apply_to(&self, spec: &mut EmbeddingPipelineSpec) {
        let b: &mut BedrockEmbedding = &mut spec.embedding.bedrock;
        b.model_id = self.model_id.clone();
        b.dimensions = self.dimensions;
        b.normalize = self.normalize;
        b.input_type = self.input_type;
        b.truncate = self.truncate;
        spec.chunking = self.chunking.clone();
    }

    /// Says what differs from `other`, for people (`dimensions 256 -> 1024`).
    pub fn changes_from(&self, other: &Self) -> String {
        let mut changes = Vec::new();
        let mut note = |name: &str, a: String, b: String| {
            if a != b {
                changes.push(format!("{name} {b} -> {a}"));
            }
        };
        let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
        note("modelId", self.model_id.clone(), other.model_id.clone());
        note(
            "dimensions",
            show(&self.dimensions),
            show(&other.dimensions),
        );
        note("normalize", show(&self.normalize), show(&other.normalize));
        note("inputType", show(&self.input_type), show(&other.input_type));
        note("truncate", show(&self.truncate), show(&other.truncate));
        note("chunking", show(&self.chunking), show(&other.chunking));
        changes.join(", ")
    }
}

/// One generation of the pipeline's index.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IndexGeneration {
    /// Its number (0: an index made before generations, named like the alias).
    pub generation: i64,
    /// The OpenSearch index.
    pub index: String,
    /// The consumer group that writes it.
    pub consumer_group: String,
    /// The model its vectors come from.
    pub model: IndexModel,
}

/// A generation kept after readers left it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetainedGeneration {
    /// The generation.
    #[serde(flatten)]
    pub generation: IndexGeneration,
    /// When readers left it.
    pub retired_at: Time,
    /// When it is deleted.
    pub delete_after: Time,
}

/// A migration under way.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The generation being built.
    pub target: IndexGeneration,
    /// `Backfilling` (its workers read the source from the start), or `Blocked` (it cannot
    /// start; `message` says why and what to do).
    pub phase: String,
    /// When it started.
    pub started_at: Time,
    /// Records the new generation's workers have finished.
    #[serde(default)]
    pub records: i64,
    /// Records they are behind, all partitions together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Seconds until they catch up, at the rate since the last look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// When `records` and `lag` were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// What is going on, for people.
    pub message: String,
}

/// The pipeline's index generations.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    /// The name readers search (`sink.opensearch.index`): an alias over the serving generation,
    /// or, for generation 0, the index itself.
    pub alias: String,
    /// The generation readers search and the workers write.
    pub serving: IndexGeneration,
    /// The migration under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// Generations readers left, kept until `deleteAfter`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<RetainedGeneration>,
}
