//! Errors of a reconcile, by step. Every reconcile runs the same steps (dereference: all reads;
//! validate; build; apply; status); an error names the step it failed in, and the metric labels
//! are static strings, so the `errors` series stay few whatever the objects are called.

/// The steps of a reconcile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Reading what the object refers to (its target, Secrets, children, metrics).
    Dereference,
    /// Rendering the children.
    Build,
    /// Writing children, finalizers or a scale.
    Apply,
    /// Writing the status.
    Status,
    /// Deleting with the object what it asked to delete (finalizer work).
    Finalize,
}

impl Step {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dereference => "dereference",
            Self::Build => "build",
            Self::Apply => "apply",
            Self::Status => "status",
            Self::Finalize => "finalize",
        }
    }
}

/// Why a reconcile failed (transient errors: the object is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing Kubernetes objects failed.
    #[error("Kubernetes API error while {action}: {source}")]
    Kube {
        /// The step.
        step: Step,
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
    /// The step that failed.
    pub fn step(&self) -> Step {
        match self {
            Self::Kube { step, .. } => *step,
            Self::Render(_) => Step::Build,
            Self::Secret(_) | Self::MissingMetadata(_) => Step::Dereference,
        }
    }

    /// Every (step, kind) an error can have, for the `errors` metric's series that exist at 0
    /// from the start.
    pub const LABELS: [(Step, &'static str); 8] = [
        (Step::Dereference, "kubernetes-api"),
        (Step::Build, "kubernetes-api"),
        (Step::Apply, "kubernetes-api"),
        (Step::Status, "kubernetes-api"),
        (Step::Finalize, "kubernetes-api"),
        (Step::Build, "render"),
        (Step::Dereference, "secret-unreadable"),
        (Step::Dereference, "missing-metadata"),
    ];

    /// What kind of failure, for the `errors` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kubernetes-api",
            Self::Render(_) => "render",
            Self::Secret(_) => "secret-unreadable",
            Self::MissingMetadata(_) => "missing-metadata",
        }
    }
}

/// Attaches the step and what the operator was doing to a kube error.
pub fn kube(step: Step, action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube {
        step,
        action,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_step_and_a_static_kind() {
        let e = kube(Step::Apply, "applying the Deployment")(
            kube::Error::LinesCodecMaxLineLengthExceeded,
        );
        assert_eq!((e.step().as_str(), e.kind()), ("apply", "kubernetes-api"));
        assert!(e.to_string().contains("applying the Deployment"));
        assert_eq!(Error::MissingMetadata("name").step(), Step::Dereference);
    }
}
