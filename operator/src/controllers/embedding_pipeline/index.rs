//! The check CEL cannot make: when the pipeline's OpenSearch index already exists and answers, its
//! k-NN field must fit the model (dimension, space type). An unreachable cluster or a missing index
//! is not a problem here: the worker creates the index, and reports what it cannot reach.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use vectorpipe_crds::index::check_mapping;
use vectorpipe_crds::v1alpha1::EmbeddingPipeline;

use crate::blocked::Blocked;
use crate::secrets::Secrets;

/// How long one answer is trusted (per pipeline generation).
const TTL: Duration = Duration::from_secs(30);
/// How long a failed check is trusted.
const UNCHECKED_TTL: Duration = Duration::from_secs(300);
/// How long the operator waits for OpenSearch.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What the check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The index exists and fits, or does not exist yet.
    Fine,
    /// The index exists and does not fit.
    Mismatch(Blocked),
    /// The check could not run; why (logged, not a status problem).
    Unchecked(String),
}

/// A finding with the generation it was made for and when.
type Entry = (Option<i64>, Instant, Finding);

/// Recent findings per pipeline, so that every reconcile does not call OpenSearch.
#[derive(Default)]
pub struct Cache(Mutex<HashMap<String, Entry>>);

impl Cache {
    fn get(&self, key: &str, generation: Option<i64>) -> Option<Finding> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|(g, at, finding)| {
                // An unreachable cluster is asked again less often: the worker reports it too.
                let ttl = match finding {
                    Finding::Unchecked(_) => UNCHECKED_TTL,
                    _ => TTL,
                };
                *g == generation && at.elapsed() < ttl
            })
            .map(|(_, _, f)| f.clone())
    }

    fn put(&self, key: String, generation: Option<i64>, finding: Finding) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, (_, at, _)| at.elapsed() < UNCHECKED_TTL * 2);
        map.insert(key, (generation, Instant::now(), finding));
    }
}

fn shared_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(TIMEOUT)
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A request to the pipeline's first OpenSearch endpoint at `path`, with the CA and basic
/// credentials from the Secrets the spec names. Err says why it cannot be made.
async fn request(
    secrets: &mut Secrets,
    pipeline: &EmbeddingPipeline,
    method: reqwest::Method,
    path: &str,
) -> Result<reqwest::RequestBuilder, String> {
    let sink = &pipeline.spec.sink.opensearch;
    if sink.auth.as_ref().is_some_and(|a| a.sigv4.is_some()) {
        return Err("the operator does not sign SigV4 requests yet".into());
    }
    let endpoint = sink.endpoints.first().ok_or("no endpoint")?;
    let http = match sink.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref()) {
        Some(ca) => {
            let pem = secrets
                .value(&ca.name, &ca.key)
                .await
                .map_err(|e| e.to_string())?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("the CA in Secret {}: {e}", ca.name))?;
            reqwest::Client::builder()
                .timeout(TIMEOUT)
                .add_root_certificate(cert)
                .build()
                .map_err(|e| e.to_string())?
        }
        // One client for every pipeline that trusts the system roots: building a TLS client
        // per reconcile costs CPU and memory at thousands of pipelines.
        None => shared_client()?.clone(),
    };
    let url = format!("{}/{path}", endpoint.trim_end_matches('/'));
    let mut request = http.request(method, url);
    if let Some(basic) = sink.auth.as_ref().and_then(|a| a.basic.as_ref()) {
        let name = &basic.secret_ref.name;
        let user = secrets
            .text(name, "username")
            .await
            .map_err(|e| e.to_string())?;
        let password = secrets
            .text(name, "password")
            .await
            .map_err(|e| e.to_string())?;
        request = request.basic_auth(user, Some(password));
    }
    Ok(request)
}

async fn run(secrets: &mut Secrets, pipeline: &EmbeddingPipeline) -> Finding {
    let sink = &pipeline.spec.sink.opensearch;
    let Ok(dimensions) = pipeline.spec.embedding.bedrock.vector_dimensions() else {
        return Finding::Unchecked("the model's dimension is unknown".into());
    };
    let path = format!("{}/_mapping", sink.index);
    let request = match request(secrets, pipeline, reqwest::Method::GET, &path).await {
        Ok(r) => r,
        Err(why) => return Finding::Unchecked(why),
    };
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return Finding::Unchecked(format!("GET {path}: {e}")),
    };
    match response.status().as_u16() {
        404 => Finding::Fine,
        200 => match response.json::<serde_json::Value>().await {
            Ok(mapping) => match check_mapping(sink, dimensions, &mapping) {
                Ok(()) => Finding::Fine,
                Err(mismatch) => {
                    Finding::Mismatch(Blocked::new(mismatch.reason(), mismatch.to_string()))
                }
            },
            Err(e) => Finding::Unchecked(format!("GET {path}: {e}")),
        },
        status => Finding::Unchecked(format!("GET {path}: HTTP {status}")),
    }
}

/// What the name readers search stands for in OpenSearch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AliasLook {
    /// An alias over these indices.
    Alias(Vec<String>),
    /// An index of that name (made before generations).
    Index,
    /// Nothing yet.
    Missing,
}

/// Looks up the pipeline's `sink.opensearch.index` name: an alias, an index, or nothing.
pub async fn look_up_alias(
    secrets: &mut Secrets,
    pipeline: &EmbeddingPipeline,
) -> Result<AliasLook, String> {
    let name = &pipeline.spec.sink.opensearch.index;
    let path = format!("_alias/{name}");
    let response = request(secrets, pipeline, reqwest::Method::GET, &path)
        .await?
        .send()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    match response.status().as_u16() {
        200 => {
            let body: serde_json::Value = response
                .json()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let indices = body
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            Ok(AliasLook::Alias(indices))
        }
        404 => {
            let head = request(secrets, pipeline, reqwest::Method::HEAD, name)
                .await?
                .send()
                .await
                .map_err(|e| format!("HEAD {name}: {e}"))?;
            match head.status().as_u16() {
                200 => Ok(AliasLook::Index),
                404 => Ok(AliasLook::Missing),
                status => Err(format!("HEAD {name}: HTTP {status}")),
            }
        }
        status => Err(format!("GET {path}: HTTP {status}")),
    }
}

/// Points the alias at `to` instead of `from`, in one `_aliases` request (readers see one or
/// the other, never neither). `from_is_index`: `from` is an index named like the alias
/// (generation 0), removed in the same request, since an alias cannot share an index's name.
/// Idempotent: an alias that already points at `to` alone is left as it is.
pub async fn switch_alias(
    secrets: &mut Secrets,
    pipeline: &EmbeddingPipeline,
    from: &str,
    to: &str,
    from_is_index: bool,
) -> Result<(), String> {
    let alias = &pipeline.spec.sink.opensearch.index;
    // Already done (the status that should have recorded the switch was not written): a second
    // `remove` would fail for good on an alias that no longer points at `from`.
    if look_up_alias(secrets, pipeline).await? == AliasLook::Alias(vec![to.to_owned()]) {
        return Ok(());
    }
    // Everything the new generation's workers acknowledged is searchable before readers move.
    let path = format!("{to}/_refresh");
    let refreshed = request(secrets, pipeline, reqwest::Method::POST, &path)
        .await?
        .send()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    if !refreshed.status().is_success() {
        return Err(format!("POST {path}: HTTP {}", refreshed.status()));
    }
    let actions = if from_is_index {
        serde_json::json!([
            {"add": {"index": to, "alias": alias}},
            {"remove_index": {"index": from}},
        ])
    } else {
        serde_json::json!([
            {"remove": {"index": from, "alias": alias}},
            {"add": {"index": to, "alias": alias}},
        ])
    };
    let response = request(secrets, pipeline, reqwest::Method::POST, "_aliases")
        .await?
        .json(&serde_json::json!({ "actions": actions }))
        .send()
        .await
        .map_err(|e| format!("POST _aliases: {e}"))?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    Err(format!(
        "POST _aliases (alias {alias}: {from} -> {to}): HTTP {status}: {}",
        response.text().await.unwrap_or_default()
    ))
}

/// Deletes the index `index` of the pipeline's cluster; a missing one counts as deleted.
pub async fn delete_named(
    secrets: &mut Secrets,
    pipeline: &EmbeddingPipeline,
    index: &str,
) -> Result<(), String> {
    let response = request(secrets, pipeline, reqwest::Method::DELETE, index)
        .await?
        .send()
        .await
        .map_err(|e| format!("DELETE {index}: {e}"))?;
    match response.status().as_u16() {
        200 | 404 => Ok(()),
        status => Err(format!(
            "DELETE {index}: HTTP {status}: {}",
            response.text().await.unwrap_or_default()
        )),
    }
}

/// Deletes the pipeline's index (`deleteIndexOnDelete`), every generation of it; a missing
/// index counts as deleted.
pub async fn delete_index(
    client: &kube::Client,
    namespace: &str,
    pipeline: &EmbeddingPipeline,
) -> Result<(), String> {
    let mut secrets = Secrets::new(client, namespace);
    if let Some(status) = super::generations::current(pipeline) {
        let generations = std::iter::once(&status.serving)
            .chain(status.previous.iter().map(|p| &p.generation))
            .chain(status.migration.iter().map(|m| &m.target));
        for generation in generations {
            delete_named(&mut secrets, pipeline, &generation.index).await?;
        }
        return Ok(());
    }
    delete_named(&mut secrets, pipeline, &pipeline.spec.sink.opensearch.index).await
}

/// Checks the pipeline's index (with the credentials `secrets` reads), or returns the recent
/// answer for this generation.
pub async fn check(cache: &Cache, secrets: &mut Secrets, pipeline: &EmbeddingPipeline) -> Finding {
    let key = pipeline.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            pipeline.namespace().unwrap_or_default(),
            pipeline.name_any()
        )
    });
    let generation = pipeline.metadata.generation;
    if let Some(found) = cache.get(&key, generation) {
        return found;
    }
    let found = run(secrets, pipeline).await;
    if let Finding::Unchecked(why) = &found {
        tracing::debug!(%why, "the index was not checked");
    }
    cache.put(key, generation, found.clone());
    found
}
