//! `vectorpipe.io/v1alpha1`.

pub mod conditions;
pub mod duration;
pub mod embedding_pipeline;
pub mod migration;
pub mod models;
pub mod scaling_policy;
#[cfg(feature = "testing")]
pub mod testing;

pub use duration::Duration;
pub use embedding_pipeline::*;
pub use migration::*;
pub use models::ModelFamily;
pub use scaling_policy::*;
