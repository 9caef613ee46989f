//! The controllers.

pub mod embedding_pipeline;
