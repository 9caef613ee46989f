//! Embedding texts: the `Embedder` trait and its Bedrock implementation.

pub mod bedrock;
pub mod budget;
pub mod limit;

use std::future::Future;

/// One embedded text.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    /// The vector.
    pub vector: Vec<f32>,
    /// Input tokens the model reported for this text (0 when it reports none).
    pub tokens: u64,
}

/// Why texts could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model refused these texts; retrying will not help (they go to the dead-letter topic).
    #[error("the model refused the input: {0}")]
    Rejected(String),
    /// Throttling, timeouts, 5xx or network errors outlasted the retries; try again later.
    #[error("the model is unavailable after {attempts} attempts: {message}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// The model failed on these texts on every attempt with an error that may be theirs (a
    /// model error, an answer that cannot be read): alone, a text that keeps failing goes to
    /// the dead-letter topic.
    #[error("the model failed on the input after {attempts} attempts: {message}")]
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// A configuration problem (credentials, permissions, unknown model): a person must act.
    #[error("{0}")]
    Misconfigured(String),
}

/// Something that turns texts into vectors.
pub trait Embedder: Send + Sync + 'static {
    /// Embeds `texts` (at most the model's batch size), in order.
    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Embedded>, EmbedError>> + Send;

    /// Texts per call.
    fn batch_size(&self) -> usize;

    /// The pieces to embed instead of `text` when it is longer than the model reads, or `None`
    /// when it fits. The spec's chunking counts characters; a model with a small window (the
    /// laptop mode's) splits further by its own tokens, so nothing is silently truncated.
    fn split_to_fit(&self, _text: &str) -> Option<Vec<String>> {
        None
    }

    /// The consumer group has `members` live members: a model with a pipeline-wide budget
    /// takes its share of it.
    fn set_group_members(&self, _members: u32) {}

    /// Whether the model has a pipeline-wide budget to share (the group's members are then
    /// counted).
    fn shares_a_budget(&self) -> bool {
        false
    }
}
