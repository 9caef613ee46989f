//! Builders for tests: a valid object of each kind that a test changes only where it matters,
//! e.g. `EmbeddingPipeline::test("posts").with_model("cohere.embed-english-v3").build()`.
//!
//! The builders keep the object as JSON until `build`, so the API's own defaults fill in every
//! field a test leaves out, exactly as for an object read from the apiserver.

use serde_json::{Value, json};

use super::{EmbeddingPipeline, ScalingPolicy, ScalingPolicySpec};

/// Merges `patch` into `base`: objects key by key, anything else replaced.
fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// An EmbeddingPipeline under construction (see [`EmbeddingPipeline::test`]).
#[derive(Clone, Debug)]
pub struct PipelineBuilder(Value);

impl EmbeddingPipeline {
    /// A valid pipeline named `name` in namespace `data`: one topic `in` on `k:9092`, Titan v2
    /// in `eu-west-1`, index `docs` on `http://os:9200`, generation 1.
    pub fn test(name: &str) -> PipelineBuilder {
        PipelineBuilder(json!({
            "apiVersion": "vectorpipe.io/v1alpha1", "kind": "EmbeddingPipeline",
            "metadata": {"name": name, "namespace": "data", "uid": format!("uid-{name}"), "generation": 1},
            "spec": {
                "source": {"kafka": {"bootstrapServers": ["k:9092"], "topics": ["in"]}},
                "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0", "region": "eu-west-1"}},
                "sink": {"opensearch": {"endpoints": ["http://os:9200"], "index": "docs"}}
            }
        }))
    }
}

impl PipelineBuilder {
    /// Merges `spec` into the spec.
    #[must_use]
    pub fn with_spec(mut self, spec: Value) -> Self {
        merge(&mut self.0["spec"], spec);
        self
    }

    /// Merges `metadata` into the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        merge(&mut self.0["metadata"], metadata);
        self
    }

    /// Sets the status.
    #[must_use]
    pub fn with_status(mut self, status: Value) -> Self {
        self.0["status"] = status;
        self
    }

    /// The Bedrock model id.
    #[must_use]
    pub fn with_model(self, model_id: &str) -> Self {
        self.with_spec(json!({"embedding": {"bedrock": {"modelId": model_id}}}))
    }

    /// The worker count.
    #[must_use]
    pub fn with_replicas(self, replicas: i32) -> Self {
        self.with_spec(json!({"workers": {"replicas": replicas}}))
    }

    /// `spec.suspend`.
    #[must_use]
    pub fn suspended(self, suspend: bool) -> Self {
        self.with_spec(json!({"suspend": suspend}))
    }

    /// A dead-letter topic.
    #[must_use]
    pub fn with_dead_letter(self, topic: &str) -> Self {
        self.with_spec(json!({"deadLetter": {"topic": topic}}))
    }

    /// The namespace.
    #[must_use]
    pub fn in_namespace(self, namespace: &str) -> Self {
        self.with_metadata(json!({"namespace": namespace}))
    }

    /// `metadata.generation`.
    #[must_use]
    pub fn with_generation(self, generation: i64) -> Self {
        self.with_metadata(json!({"generation": generation}))
    }

    /// The pipeline. Panics when the changes made it unreadable (a mistake in the test).
    pub fn build(self) -> EmbeddingPipeline {
        serde_json::from_value(self.0).expect("a test pipeline reads back")
    }
}

/// A ScalingPolicy under construction (see [`ScalingPolicy::test`]).
#[derive(Clone, Debug)]
pub struct PolicyBuilder(Value);

impl ScalingPolicy {
    /// A valid policy named `name` in namespace `data` that scales EmbeddingPipeline `target`
    /// between 1 and 4 workers on Kafka lag (scale out above 100), generation 1.
    pub fn test(name: &str, target: &str) -> PolicyBuilder {
        PolicyBuilder(json!({
            "apiVersion": "vectorpipe.io/v1alpha1", "kind": "ScalingPolicy",
            "metadata": {"name": name, "namespace": "data", "uid": format!("uid-{name}"), "generation": 1},
            "spec": {
                "targetRef": {"name": target},
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 100}]
            }
        }))
    }
}

impl PolicyBuilder {
    /// Merges `spec` into the spec (a list given replaces the list).
    #[must_use]
    pub fn with_spec(mut self, spec: Value) -> Self {
        merge(&mut self.0["spec"], spec);
        self
    }

    /// Merges `metadata` into the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        merge(&mut self.0["metadata"], metadata);
        self
    }

    /// Bounds of the worker count.
    #[must_use]
    pub fn with_bounds(self, min: i32, max: i32) -> Self {
        self.with_spec(json!({"minReplicas": min, "maxReplicas": max}))
    }

    /// `spec.mode`: `active` or `dryRun`.
    #[must_use]
    pub fn with_mode(self, mode: &str) -> Self {
        self.with_spec(json!({"mode": mode}))
    }

    /// `metadata.creationTimestamp` (RFC 3339).
    #[must_use]
    pub fn created_at(self, time: &str) -> Self {
        self.with_metadata(json!({"creationTimestamp": time}))
    }

    /// `metadata.generation`.
    #[must_use]
    pub fn with_generation(self, generation: i64) -> Self {
        self.with_metadata(json!({"generation": generation}))
    }

    /// The policy. Panics when the changes made it unreadable (a mistake in the test).
    pub fn build(self) -> ScalingPolicy {
        serde_json::from_value(self.0).expect("a test policy reads back")
    }

    /// Only the spec.
    pub fn spec(self) -> ScalingPolicySpec {
        self.build().spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_change_only_what_they_are_told() {
        let p = EmbeddingPipeline::test("posts")
            .with_model("cohere.embed-english-v3")
            .with_replicas(3)
            .with_generation(4)
            .build();
        assert_eq!(p.spec.embedding.bedrock.model_id, "cohere.embed-english-v3");
        assert_eq!(
            p.spec.embedding.bedrock.region.as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(p.spec.workers.replicas, 3);
        assert_eq!(p.metadata.generation, Some(4));
        assert!(!p.spec.suspend);
        let policy = ScalingPolicy::test("scale", "posts")
            .with_bounds(2, 8)
            .build();
        assert_eq!((policy.spec.min_replicas, policy.spec.max_replicas), (2, 8));
        assert_eq!(policy.spec.target_ref.name, "posts");
    }
}
