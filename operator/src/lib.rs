//! The vectorpipe operator: controllers for EmbeddingPipeline and ScalingPolicy, and the pure
//! domain logic they use (building children, computing status, deciding scale). `main.rs` only
//! parses arguments and starts them.

pub mod blocked;
pub mod context;
pub mod controllers;
pub mod error;
pub mod http;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod secrets;
