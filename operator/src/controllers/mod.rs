//! The controllers.

pub mod embedding_pipeline;
pub mod scaling_policy;
