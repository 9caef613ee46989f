//! Builders for tests: a valid object of each kind that a test changes only where it matters,
//! e.g. `EmbeddingPipeline::test("posts").with_model("cohere.embed-english-v3").build()`.
//!
//! The builders keep the object as JSON until `build`, so the API's own defaults fill in every
//! field a test leaves out, exactly as for an object read from the apiserver.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
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

/// An object of kind `K` under construction (see [`EmbeddingPipeline::test`] and
/// [`ScalingPolicy::test`]).
#[derive(Clone, Debug)]
pub struct Builder<K>(Value, PhantomData<K>);

/// An EmbeddingPipeline under construction.
pub type PipelineBuilder = Builder<EmbeddingPipeline>;
/// A ScalingPolicy under construction.
pub type PolicyBuilder = Builder<ScalingPolicy>;

impl<K: DeserializeOwned> Builder<K> {
    fn new(object: Value) -> Self {
        Self(object, PhantomData)
    }

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

    /// `metadata.generation`.
    #[must_use]
    pub fn with_generation(self, generation: i64) -> Self {
        self.with_metadata(json!({ "generation": generation }))
    }

    /// The object. Panics when the changes made it unreadable (a mistake in the test).
    pub fn build(self) -> K {
        serde_json::from_value(self.0).expect("a test object reads back")
    }
}

impl EmbeddingPipeline {
    /// A valid pipeline named `name` in namespace `data`: one topic `in` on `k:9092`, Titan v2
    /// in `eu-west-1`, index `docs` on `http://os:9200`, generation 1.
    pub fn test(name: &str) -> PipelineBuilder {
        Builder::new(json!({
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
}

impl ScalingPolicy {
    /// A valid policy named `name` in namespace `data` that scales EmbeddingPipeline `target`
    /// between 1 and 4 workers on Kafka lag (scale out above 100), generation 1.
    pub fn test(name: &str, target: &str) -> PolicyBuilder {
        Builder::new(json!({
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
