//! Errors of a reconcile, by step.

/// Why a reconcile failed (transient errors: the object is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing Kubernetes objects failed.
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        /// What the operator was doing.
        action: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The pipeline's spec could not be written as the worker's file.
    #[error("rendering the worker's pipeline file failed: {0}")]
    Render(#[from] serde_yaml::Error),
    /// A Secret could not be read (the apiserver did not answer).
    #[error("{0}")]
    Secret(#[from] crate::secrets::SecretProblem),
    /// The object lacks a name or namespace (never for objects from the apiserver).
    #[error("the object has no {0}")]
    MissingMetadata(&'static str),
}

impl Error {
    /// A short label for the `errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { action, .. } => action,
            Self::Render(_) => "render",
            Self::Secret(_) => "reading secrets",
            Self::MissingMetadata(_) => "missing-metadata",
        }
    }
}

/// Attaches what the operator was doing to a kube error.
pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}
