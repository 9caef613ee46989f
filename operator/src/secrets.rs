//! The one way the operator reads a Secret. It reads only Secrets in the pipeline's own namespace
//! that opt in with the label `vectorpipe.io/credentials: "true"`. Someone who may create
//! pipelines but not read Secrets therefore cannot make the operator (or the workers it starts)
//! send an arbitrary Secret to an endpoint of their choosing: the owner of a Secret decides that
//! vectorpipe may use it.

use std::collections::HashMap;
use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

/// The label a Secret needs before the operator reads it or mounts it into workers.
pub const CREDENTIALS_LABEL: &str = "vectorpipe.io/credentials";

/// Why a Secret named by a spec cannot be used. Each message says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretProblem {
    /// No Secret of that name in the namespace.
    NotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The keys the spec needs from it.
        keys: Vec<String>,
    },
    /// It exists but does not carry [`CREDENTIALS_LABEL`].
    NotLabeled {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// It lacks a key the spec needs.
    KeyMissing {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The missing key.
        key: String,
    },
    /// The apiserver did not answer (transient: retried).
    Unreadable {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The apiserver's error.
        error: String,
    },
}

impl SecretProblem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "SecretNotFound",
            Self::NotLabeled { .. } => "SecretNotLabeled",
            Self::KeyMissing { .. } => "SecretKeyMissing",
            Self::Unreadable { .. } => "SecretUnreadable",
        }
    }

    /// True when waiting may fix it without anyone acting (an apiserver hiccup).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreadable { .. })
    }
}

impl fmt::Display for SecretProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound {
                namespace,
                name,
                keys,
            } => write!(
                f,
                "Secret {namespace}/{name} does not exist; create it with the keys {} and the label {CREDENTIALS_LABEL}=true",
                keys.join(", ")
            ),
            Self::NotLabeled { namespace, name } => write!(
                f,
                "Secret {namespace}/{name} is not labeled {CREDENTIALS_LABEL}=true, so vectorpipe does not use it; if it is meant for this pipeline, run: kubectl label secret -n {namespace} {name} {CREDENTIALS_LABEL}=true"
            ),
            Self::KeyMissing {
                namespace,
                name,
                key,
            } => write!(f, "Secret {namespace}/{name} has no key {key:?}; add it"),
            Self::Unreadable {
                namespace,
                name,
                error,
            } => write!(f, "reading Secret {namespace}/{name}: {error}"),
        }
    }
}

impl std::error::Error for SecretProblem {}

/// True when `secret` opted in to being used by vectorpipe.
pub fn opted_in(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(CREDENTIALS_LABEL))
        .is_some_and(|value| value == "true")
}

/// The value of `key` in `secret`, from `data` or `stringData`.
fn value_of(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| v.clone().into_bytes())
        })
}

/// Reads the Secrets of one namespace for one reconcile; each Secret is fetched once.
pub struct Secrets {
    api: Api<Secret>,
    namespace: String,
    fetched: HashMap<String, Option<Secret>>,
}

impl Secrets {
    /// A reader for `namespace`.
    pub fn new(client: &kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_owned(),
            fetched: HashMap::new(),
        }
    }

    /// The Secret `name` if it exists and opted in. `keys` only shapes the message when it does
    /// not exist.
    async fn get(&mut self, name: &str, keys: &[&str]) -> Result<&Secret, SecretProblem> {
        if !self.fetched.contains_key(name) {
            let secret = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| SecretProblem::Unreadable {
                    namespace: self.namespace.clone(),
                    name: name.to_owned(),
                    error: e.to_string(),
                })?;
            self.fetched.insert(name.to_owned(), secret);
        }
        match self.fetched.get(name).and_then(Option::as_ref) {
            None => Err(SecretProblem::NotFound {
                namespace: self.namespace.clone(),
                name: name.to_owned(),
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            }),
            Some(secret) if !opted_in(secret) => Err(SecretProblem::NotLabeled {
                namespace: self.namespace.clone(),
                name: name.to_owned(),
            }),
            Some(secret) => Ok(secret),
        }
    }

    /// Checks that `name` exists, opted in and has every one of `keys`.
    pub async fn check(&mut self, name: &str, keys: &[&str]) -> Result<(), SecretProblem> {
        let namespace = self.namespace.clone();
        let secret = self.get(name, keys).await?;
        match keys.iter().find(|k| value_of(secret, k).is_none()) {
            Some(key) => Err(SecretProblem::KeyMissing {
                namespace,
                name: name.to_owned(),
                key: (*key).to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// The bytes of `key` in the Secret `name`.
    pub async fn value(&mut self, name: &str, key: &str) -> Result<Vec<u8>, SecretProblem> {
        let namespace = self.namespace.clone();
        let secret = self.get(name, &[key]).await?;
        value_of(secret, key).ok_or_else(|| SecretProblem::KeyMissing {
            namespace,
            name: name.to_owned(),
            key: key.to_owned(),
        })
    }

    /// [`Secrets::value`] as text.
    pub async fn text(&mut self, name: &str, key: &str) -> Result<String, SecretProblem> {
        Ok(String::from_utf8_lossy(&self.value(name, key).await?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_label_value_opts_in() {
        let secret = |labels: &[(&str, &str)]| Secret {
            metadata: kube::api::ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(opted_in(&secret(&[(CREDENTIALS_LABEL, "true")])));
        assert!(!opted_in(&secret(&[(CREDENTIALS_LABEL, "yes")])));
        assert!(!opted_in(&secret(&[("app", "kafka")])));
        assert!(!opted_in(&Secret::default()));
    }

    #[test]
    fn every_message_says_what_to_do() {
        let not_labeled = SecretProblem::NotLabeled {
            namespace: "data".into(),
            name: "os".into(),
        };
        assert_eq!(not_labeled.reason(), "SecretNotLabeled");
        assert!(
            not_labeled
                .to_string()
                .contains("kubectl label secret -n data os vectorpipe.io/credentials=true")
        );
        let missing = SecretProblem::NotFound {
            namespace: "data".into(),
            name: "os".into(),
            keys: vec!["username".into(), "password".into()],
        };
        assert!(missing.to_string().contains("username, password"));
        assert!(missing.to_string().contains(CREDENTIALS_LABEL));
    }
}
