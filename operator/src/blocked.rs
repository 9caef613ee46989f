//! The one "blocked because" type: why a controller cannot act on an object now, in words a user
//! can act on. A pipeline that is blocked keeps its workers as they are and says why in its
//! conditions; a policy that is blocked scales nothing and says why in `Active`.

use crate::secrets::SecretProblem;

/// The reason of a spec that breaks a rule of the API.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Why an object cannot be acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// A CamelCase reason, e.g. `InvalidSpec`, `SecretNotFound`, `TargetNotFound`.
    pub reason: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl Blocked {
    /// A blocker with `reason`.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The spec breaks a rule (the message lists which).
    pub fn invalid_spec(message: impl Into<String>) -> Self {
        Self::new(INVALID_SPEC, message)
    }

    /// True when only a change of the object itself can lift it: there is nothing to look at
    /// again until the spec changes.
    pub fn needs_spec_change(&self) -> bool {
        self.reason == INVALID_SPEC
    }
}

impl From<&SecretProblem> for Blocked {
    fn from(problem: &SecretProblem) -> Self {
        Self::new(problem.reason(), problem.to_string())
    }
}
