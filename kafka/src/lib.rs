//! Kafka client settings shared by the worker (its consumer and dead-letter producer) and the
//! operator (its lag reader): brokers and authentication from a pipeline's `source.kafka`, and
//! MSK IAM tokens. No kube dependency.
//!
//! Secrets never come from the spec: the worker passes the files and environment its pod got
//! from the pipeline's Secrets, the operator the PEM text it read from the same Secrets.

use std::path::PathBuf;

use rdkafka::client::OAuthToken;
use rdkafka::config::ClientConfig;
use vectorpipe_crds::v1alpha1::{KafkaSource, ScramMechanism};

pub use vectorpipe_crds::topics::{TopicError, TopicSelection};

/// A certificate or key: a mounted file, or its PEM text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Material {
    /// A file path (the worker's mounted Secrets).
    File(PathBuf),
    /// PEM text (read from a Secret by the operator).
    Pem(String),
}

/// The secrets a client needs, as far as the spec's auth asks for them.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// The CA bundle that signed the brokers' certificates.
    pub ca: Option<Material>,
    /// A client certificate (mutual TLS).
    pub cert: Option<Material>,
    /// Its key.
    pub key: Option<Material>,
    /// The SCRAM user.
    pub username: Option<String>,
    /// The SCRAM password.
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints a secret.
        f.debug_struct("Credentials")
            .field("ca", &self.ca.is_some())
            .field("cert", &self.cert.is_some())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A credential the spec's auth needs is missing.
#[derive(Debug, thiserror::Error)]
#[error("the {0} is missing; it comes from the Secret named in source.kafka.auth")]
pub struct MissingCredential(pub &'static str);

fn set_material(config: &mut ClientConfig, what: &str, material: &Material) {
    match material {
        Material::File(path) => {
            config.set(format!("{what}.location"), path.to_string_lossy());
        }
        Material::Pem(text) => {
            config.set(format!("{what}.pem"), text);
        }
    }
}

/// The client settings of a source: brokers and authentication.
pub fn client_config(
    kafka: &KafkaSource,
    credentials: &Credentials,
) -> Result<ClientConfig, MissingCredential> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", kafka.bootstrap_servers.join(","));
    let Some(auth) = &kafka.auth else {
        return Ok(config);
    };
    if let Some(tls) = &auth.tls {
        config.set("security.protocol", "ssl");
        if tls.client_cert_secret_ref.is_some() {
            let cert = credentials
                .cert
                .as_ref()
                .ok_or(MissingCredential("client certificate"))?;
            let key = credentials
                .key
                .as_ref()
                .ok_or(MissingCredential("client key"))?;
            set_material(&mut config, "ssl.certificate", cert);
            set_material(&mut config, "ssl.key", key);
        }
    } else if let Some(scram) = &auth.scram {
        config
            .set(
                "security.protocol",
                if scram.tls {
                    "sasl_ssl"
                } else {
                    "sasl_plaintext"
                },
            )
            .set(
                "sasl.mechanisms",
                match scram.mechanism {
                    ScramMechanism::Sha256 => "SCRAM-SHA-256",
                    ScramMechanism::Sha512 => "SCRAM-SHA-512",
                },
            )
            .set(
                "sasl.username",
                credentials
                    .username
                    .as_deref()
                    .ok_or(MissingCredential("SCRAM username"))?,
            )
            .set(
                "sasl.password",
                credentials
                    .password
                    .as_deref()
                    .ok_or(MissingCredential("SCRAM password"))?,
            );
    } else if auth.msk_iam.is_some() {
        // Amazon MSK IAM: SASL/OAUTHBEARER over TLS with a signed token from the client's
        // context (see `msk_iam_token`), refreshed by librdkafka before it expires.
        config
            .set("security.protocol", "sasl_ssl")
            .set("sasl.mechanism", "OAUTHBEARER");
    }
    if let Some(ca) = &credentials.ca {
        set_material(&mut config, "ssl.ca", ca);
    }
    Ok(config)
}

/// The region whose MSK IAM tokens a client needs, if the source uses MSK IAM.
pub fn msk_iam_region(kafka: &KafkaSource) -> Option<String> {
    kafka
        .auth
        .as_ref()
        .and_then(|a| a.msk_iam.as_ref())
        .map(|m| m.region.clone())
}

/// An MSK IAM auth token (a SigV4-presigned `kafka-cluster:Connect` URL) for `region`, signed
/// with the default credential chain (IRSA or Pod Identity in a cluster). librdkafka asks from
/// whichever thread polls, possibly inside a Tokio runtime, so the signer runs on a plain thread
/// with a small runtime of its own and never blocks the caller's runtime.
pub fn msk_iam_token(
    region: &str,
    principal: &str,
) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    let region = aws_config::Region::new(region.to_owned());
    let (token, lifetime_ms) = std::thread::spawn(move || -> Result<(String, i64), String> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(aws_msk_iam_sasl_signer::generate_auth_token(region))
            .map_err(|e| format!("signing an MSK IAM token failed: {e}"))
    })
    .join()
    .map_err(|_| "the MSK IAM signer panicked (are AWS credentials available?)")??;
    tracing::debug!(lifetime_ms, "new MSK IAM token");
    Ok(OAuthToken {
        token,
        principal_name: principal.to_owned(),
        lifetime_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(auth: &str) -> KafkaSource {
        // JSON is YAML.
        let text =
            format!(r#"{{"bootstrapServers": ["a:9092", "b:9092"], "topics": ["t"]{auth}}}"#);
        serde_yaml::from_str(&text).unwrap()
    }

    #[test]
    fn files_and_pem_text_reach_the_same_settings() {
        let tls = source(
            r#", "auth": {"tls": {"caSecretRef": {"name": "ca"}, "clientCertSecretRef": {"name": "c"}}}"#,
        );
        let files = Credentials {
            ca: Some(Material::File("/ca.crt".into())),
            cert: Some(Material::File("/tls.crt".into())),
            key: Some(Material::File("/tls.key".into())),
            ..Credentials::default()
        };
        let config = client_config(&tls, &files).unwrap();
        assert_eq!(config.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(config.get("security.protocol"), Some("ssl"));
        assert_eq!(config.get("ssl.ca.location"), Some("/ca.crt"));
        assert_eq!(config.get("ssl.key.location"), Some("/tls.key"));
        let pem = Credentials {
            ca: Some(Material::Pem("CA".into())),
            cert: Some(Material::Pem("CERT".into())),
            key: Some(Material::Pem("KEY".into())),
            ..Credentials::default()
        };
        let config = client_config(&tls, &pem).unwrap();
        assert_eq!(config.get("ssl.ca.pem"), Some("CA"));
        assert_eq!(config.get("ssl.certificate.pem"), Some("CERT"));
        let missing = client_config(&tls, &Credentials::default()).unwrap_err();
        assert!(
            missing.to_string().contains("client certificate"),
            "{missing}"
        );
    }

    #[test]
    fn scram_and_msk_iam_settings() {
        let scram = source(r#", "auth": {"scram": {"secretRef": {"name": "s"}, "tls": false}}"#);
        let err = client_config(&scram, &Credentials::default()).unwrap_err();
        assert!(err.to_string().contains("SCRAM username"), "{err}");
        let creds = Credentials {
            username: Some("u".into()),
            password: Some("p".into()),
            ..Credentials::default()
        };
        let config = client_config(&scram, &creds).unwrap();
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        let iam = source(r#", "auth": {"mskIam": {"region": "eu-west-1"}}"#);
        let config = client_config(&iam, &Credentials::default()).unwrap();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("OAUTHBEARER"));
        assert_eq!(msk_iam_region(&iam).as_deref(), Some("eu-west-1"));
    }
}
