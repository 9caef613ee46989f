//! Amazon Bedrock `InvokeModel` for Titan Text Embeddings v1/v2 and Cohere Embed v3.
//!
//! The SDK's own retries are turned off: this module retries throttling, timeouts and 5xx with
//! jittered exponential backoff from the spec, and feeds the adaptive in-flight limit, so the
//! worker backs off a quota instead of hammering it.

use std::sync::Arc;
use std::time::Instant;

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_bedrockruntime::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_bedrockruntime::error::{BoxError, SdkError};
use aws_sdk_bedrockruntime::operation::invoke_model::InvokeModelError;
use aws_sdk_bedrockruntime::primitives::Blob;
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{BedrockEmbedding, CohereInputType, CohereTruncate, ModelFamily};

use super::limit::AdaptiveLimit;
use super::{EmbedError, Embedded, Embedder};
use crate::metrics::Metrics;

/// The request body for a batch of texts.
pub fn request_body(spec: &BedrockEmbedding, texts: &[String]) -> Value {
    match spec.family() {
        ModelFamily::CohereEmbedV3 => {
            let mut body = json!({
                "texts": texts,
                "input_type": match spec.input_type.unwrap_or(CohereInputType::SearchDocument) {
                    CohereInputType::SearchDocument => "search_document",
                    CohereInputType::SearchQuery => "search_query",
                    CohereInputType::Classification => "classification",
                    CohereInputType::Clustering => "clustering",
                },
            });
            if let Some(truncate) = spec.truncate {
                body["truncate"] = json!(match truncate {
                    CohereTruncate::None => "NONE",
                    CohereTruncate::Start => "START",
                    CohereTruncate::End => "END",
                });
            }
            body
        }
        ModelFamily::TitanTextV2 => {
            let mut body = json!({ "inputText": texts.first().cloned().unwrap_or_default() });
            if let Some(d) = spec.dimensions {
                body["dimensions"] = json!(d);
            }
            if let Some(n) = spec.normalize {
                body["normalize"] = json!(n);
            }
            body
        }
        // Titan v1 and models vectorpipe does not know take the Titan v1 shape.
        ModelFamily::TitanTextV1 | ModelFamily::Unknown => {
            json!({ "inputText": texts.first().cloned().unwrap_or_default() })
        }
    }
}

/// What the worker reads of a Titan answer. Parsed straight into this, the vector's values go
/// from the text to `f32` without a `serde_json::Value` for each of them, and what the worker
/// does not read (`embeddingsByType`) is skipped.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct TitanResponse {
    embedding: Vec<f32>,
    input_text_token_count: Option<Value>,
}

/// Reads the vectors (and token counts) out of a response body.
pub fn parse_response(
    family: ModelFamily,
    body: &[u8],
    expected: usize,
) -> Result<Vec<Embedded>, String> {
    let out = match family {
        ModelFamily::CohereEmbedV3 => parse_cohere(body)?,
        _ => vec![parse_titan(body)?],
    };
    if out.len() != expected {
        return Err(format!(
            "asked for {expected} embeddings, got {}",
            out.len()
        ));
    }
    Ok(out)
}

/// A Titan answer: one vector and its token count.
fn parse_titan(body: &[u8]) -> Result<Embedded, String> {
    let titan: TitanResponse = serde_json::from_slice(body)
        .map_err(|e| format!("the response is not a Titan embedding: {e}"))?;
    Ok(Embedded {
        vector: titan.embedding,
        tokens: titan
            .input_text_token_count
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
    })
}

/// A Cohere answer: one vector a text, as a list of floats or under `float` of the by-type form.
fn parse_cohere(body: &[u8]) -> Result<Vec<Embedded>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the response is not JSON: {e}"))?;
    let embeddings = match &value["embeddings"] {
        Value::Array(list) => list,
        Value::Object(by_type) => by_type
            .get("float")
            .and_then(Value::as_array)
            .ok_or("the response has no float embeddings")?,
        _ => return Err("the response has no embeddings".into()),
    };
    embeddings
        .iter()
        .map(|e| {
            let vector = e
                .as_array()
                .ok_or("an embedding is not an array")?
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|f| f as f32)
                        .ok_or("an embedding value is not a number")
                })
                .collect::<Result<_, _>>()?;
            Ok(Embedded { vector, tokens: 0 })
        })
        .collect::<Result<Vec<_>, &str>>()
        .map_err(str::to_owned)
}

/// Reads the `X-Amzn-Bedrock-Input-Token-Count` header of an InvokeModel response: the only
/// token count Bedrock gives for Cohere models, whose body has none.
#[derive(Clone, Debug, Default)]
struct TokenCountHeader(Arc<std::sync::atomic::AtomicU64>);

impl Intercept for TokenCountHeader {
    fn name(&self) -> &'static str {
        "vectorpipe-input-token-count"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(count) = context
            .response()
            .headers()
            .get("x-amzn-bedrock-input-token-count")
            .and_then(|v| v.parse().ok())
        {
            self.0.store(count, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Where the body reported no token counts (Cohere), shares the header's count out over the
/// texts of the call (the remainder to the first), so the per-pipeline total is exact.
pub fn spread_header_tokens(embedded: &mut [Embedded], header_tokens: u64) {
    if header_tokens == 0 || embedded.is_empty() || embedded.iter().any(|e| e.tokens > 0) {
        return;
    }
    let n = embedded.len() as u64;
    for e in embedded.iter_mut() {
        e.tokens = header_tokens / n;
    }
    embedded[0].tokens += header_tokens % n;
}

/// How one failed call should be handled.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Quota exceeded: back off and lower the in-flight limit.
    Throttled(String),
    /// Timeouts, 5xx, network: back off and retry.
    Transient(String),
    /// The model refused the input.
    Rejected(String),
    /// The model failed on the input (a model error, an unreadable answer): retried, and
    /// dead-lettered if it keeps failing for one text.
    Failed(String),
    /// Credentials, permissions, unknown model.
    Misconfigured(String),
}

fn classify(err: SdkError<InvokeModelError>) -> Failure {
    match err {
        SdkError::ServiceError(context) => {
            let err = context.into_err();
            let message = err.to_string();
            match err {
                InvokeModelError::ThrottlingException(_)
                | InvokeModelError::ServiceQuotaExceededException(_) => Failure::Throttled(message),
                InvokeModelError::ModelNotReadyException(_)
                | InvokeModelError::ServiceUnavailableException(_)
                | InvokeModelError::InternalServerException(_)
                | InvokeModelError::ModelTimeoutException(_) => Failure::Transient(message),
                InvokeModelError::ModelErrorException(_) => Failure::Failed(message),
                InvokeModelError::ValidationException(_) => Failure::Rejected(message),
                InvokeModelError::AccessDeniedException(_) => Failure::Misconfigured(format!(
                    "Bedrock denied access ({message}); grant the workers' role bedrock:InvokeModel on the model"
                )),
                InvokeModelError::ResourceNotFoundException(_) => Failure::Misconfigured(format!(
                    "Bedrock does not know the model ({message}); check embedding.bedrock.modelId and region, and that the model is enabled in the account"
                )),
                other => Failure::Transient(other.to_string()),
            }
        }
        SdkError::TimeoutError(_) => Failure::Transient("the call timed out".into()),
        SdkError::DispatchFailure(e) => {
            Failure::Transient(format!("could not reach Bedrock: {e:?}"))
        }
        SdkError::ResponseError(e) => Failure::Transient(format!("unreadable response: {e:?}")),
        other => Failure::Misconfigured(format!("the call could not be built: {other}")),
    }
}

/// The Bedrock embedder.
pub struct BedrockEmbedder {
    client: Client,
    spec: BedrockEmbedding,
    limit: AdaptiveLimit,
    /// The pipeline's `requestsPerSecond` / `tokensPerMinute`, shared by the group's members.
    budget: Option<super::budget::Budget>,
    metrics: Arc<Metrics>,
}

impl BedrockEmbedder {
    /// Builds the client from the default AWS credential chain (IRSA / Pod Identity / env), the
    /// spec's region and endpoint, and the spec's per-call timeout.
    pub async fn new(spec: BedrockEmbedding, metrics: Arc<Metrics>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(spec.timeout.get())
                    .build(),
            );
        if let Some(region) = &spec.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &spec.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        let limit = AdaptiveLimit::new(spec.max_in_flight.max(1) as usize);
        metrics.embed_limit.set(limit.current() as i64);
        let budget = super::budget::Budget::new(spec.requests_per_second, spec.tokens_per_minute);
        metrics.group_members.set(1);
        Self {
            client: Client::new(&config),
            spec,
            limit,
            budget,
            metrics,
        }
    }

    /// The Bedrock client (its region, endpoint and credentials), for other calls to Bedrock.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One InvokeModel call: the response body and the input tokens Bedrock reported in the
    /// token-count header. Only Cohere calls read that header: Titan's body has the count, and
    /// the per-call interceptor costs every call a layer of SDK configuration (in the worker
    /// bench's profile, merging it showed at about 1 % of the worker's CPU).
    async fn call(&self, body: &Value) -> Result<(Vec<u8>, u64), SdkError<InvokeModelError>> {
        let request = self
            .client
            .invoke_model()
            .model_id(&self.spec.model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body.to_string()));
        if self.spec.family() != ModelFamily::CohereEmbedV3 {
            return Ok((request.send().await?.body.into_inner(), 0));
        }
        let tokens = TokenCountHeader::default();
        let out = request
            .customize()
            .interceptor(tokens.clone())
            .send()
            .await?;
        Ok((
            out.body.into_inner(),
            tokens.0.load(std::sync::atomic::Ordering::SeqCst),
        ))
    }
}

impl Embedder for BedrockEmbedder {
    fn batch_size(&self) -> usize {
        self.spec.effective_batch_size()
    }

    fn set_group_members(&self, members: u32) {
        if let Some(budget) = &self.budget {
            budget.set_members(members);
            self.metrics.group_members.set(i64::from(budget.members()));
        }
    }

    fn shares_a_budget(&self) -> bool {
        self.budget.is_some()
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>, EmbedError> {
        let body = request_body(&self.spec, &texts);
        let family = self.spec.family();
        let max_attempts = self.spec.retry.max_attempts.max(1) as u32;
        let estimated = super::budget::estimate_tokens(&texts);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Every attempt, retries too, counts against the pipeline's budget.
            if let Some(budget) = &self.budget {
                budget.before_call(estimated).await;
            }
            let slot = self.limit.acquire().await;
            self.metrics
                .embed_in_flight
                .set(self.limit.in_flight() as i64);
            let started = Instant::now();
            let result = self.call(&body).await;
            self.metrics
                .embed_latency
                .observe(started.elapsed().as_secs_f64());
            drop(slot);
            self.metrics
                .embed_in_flight
                .set(self.limit.in_flight() as i64);
            let failure = match result {
                Ok((bytes, header_tokens)) => match parse_response(family, &bytes, texts.len()) {
                    Ok(mut embedded) => {
                        spread_header_tokens(&mut embedded, header_tokens);
                        if let Some(budget) = &self.budget {
                            let counted = embedded.iter().map(|e| e.tokens).sum();
                            budget.after_call(estimated, counted).await;
                        }
                        self.limit.on_success();
                        self.metrics.embed_limit.set(self.limit.current() as i64);
                        self.metrics.embed_call("ok");
                        return Ok(embedded);
                    }
                    Err(e) => Failure::Failed(format!("unexpected response from Bedrock: {e}")),
                },
                Err(e) => classify(e),
            };
            let message = match failure {
                Failure::Rejected(m) => {
                    self.metrics.embed_call("rejected");
                    return Err(EmbedError::Rejected(m));
                }
                Failure::Misconfigured(m) => {
                    self.metrics.embed_call("misconfigured");
                    return Err(EmbedError::Misconfigured(m));
                }
                Failure::Throttled(m) => {
                    self.metrics.embed_call("throttled");
                    self.limit.on_throttle();
                    self.metrics.embed_limit.set(self.limit.current() as i64);
                    (m, false)
                }
                Failure::Transient(m) => {
                    self.metrics.embed_call("error");
                    (m, false)
                }
                Failure::Failed(m) => {
                    self.metrics.embed_call("error");
                    (m, true)
                }
            };
            let (message, failed) = message;
            if attempt >= max_attempts {
                return Err(if failed {
                    EmbedError::Failed {
                        attempts: attempt,
                        message,
                    }
                } else {
                    EmbedError::Unavailable {
                        attempts: attempt,
                        message,
                    }
                });
            }
            let wait = crate::retry::backoff(
                self.spec.retry.base_delay.get(),
                self.spec.retry.max_delay.get(),
                attempt - 1,
            );
            tracing::debug!(attempt, ?wait, error = %message, "retrying an embedding call");
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_count_is_shared_out_only_where_the_body_had_none() {
        let texts = |tokens: &[u64]| -> Vec<Embedded> {
            tokens
                .iter()
                .map(|t| Embedded {
                    vector: vec![0.0],
                    tokens: *t,
                })
                .collect()
        };
        let mut cohere = texts(&[0, 0, 0]);
        spread_header_tokens(&mut cohere, 10);
        assert_eq!(
            cohere.iter().map(|e| e.tokens).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        let mut titan = texts(&[7]);
        spread_header_tokens(&mut titan, 9);
        assert_eq!(titan[0].tokens, 7, "the body's count wins");
        let mut none = texts(&[0, 0]);
        spread_header_tokens(&mut none, 0);
        assert_eq!(none.iter().map(|e| e.tokens).sum::<u64>(), 0);
    }

    fn spec(model: &str, extra: Value) -> BedrockEmbedding {
        let mut v = json!({ "modelId": model });
        if let (Value::Object(a), Value::Object(b)) = (&mut v, extra) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn request_bodies_follow_each_model_family() {
        let texts = vec!["hello".to_owned()];
        assert_eq!(
            request_body(
                &spec(
                    "amazon.titan-embed-text-v2:0",
                    json!({"dimensions": 512, "normalize": true})
                ),
                &texts
            ),
            json!({"inputText": "hello", "dimensions": 512, "normalize": true})
        );
        assert_eq!(
            request_body(&spec("amazon.titan-embed-text-v1", json!({})), &texts),
            json!({"inputText": "hello"})
        );
        assert_eq!(
            request_body(
                &spec("cohere.embed-english-v3", json!({"truncate": "END"})),
                &["a".into(), "b".into()]
            ),
            json!({"texts": ["a", "b"], "input_type": "search_document", "truncate": "END"})
        );
    }

    #[test]
    fn responses_are_parsed_per_family() {
        let titan = parse_response(
            ModelFamily::TitanTextV2,
            br#"{"embedding":[0.5,-1],"inputTextTokenCount":3}"#,
            1,
        )
        .unwrap();
        assert_eq!(
            titan,
            [Embedded {
                vector: vec![0.5, -1.0],
                tokens: 3
            }]
        );
        let cohere = parse_response(ModelFamily::CohereEmbedV3, br#"{"id":"x","texts":["a","b"],"embeddings":[[1],[2]],"response_type":"embeddings_floats"}"#, 2).unwrap();
        assert_eq!(cohere.len(), 2);
        let by_type = parse_response(
            ModelFamily::CohereEmbedV3,
            br#"{"embeddings":{"float":[[1]]},"response_type":"embeddings_by_type"}"#,
            1,
        )
        .unwrap();
        assert_eq!(by_type[0].vector, [1.0]);
        assert!(parse_response(ModelFamily::CohereEmbedV3, br#"{"embeddings":[[1]]}"#, 2).is_err());
        assert!(parse_response(ModelFamily::TitanTextV1, b"not json", 1).is_err());
        let with_types = parse_response(
            ModelFamily::TitanTextV2,
            br#"{"embedding":[0.25],"inputTextTokenCount":1,"embeddingsByType":{"float":[0.25],"binary":[1]}}"#,
            1,
        )
        .unwrap();
        assert_eq!(with_types[0].vector, [0.25]);
        assert_eq!(with_types[0].tokens, 1);
        assert!(parse_response(ModelFamily::TitanTextV2, br#"{"embedding":["x"]}"#, 1).is_err());
        assert!(
            parse_response(ModelFamily::TitanTextV2, br#"{"inputTextTokenCount":1}"#, 1).is_err()
        );
        assert!(parse_response(ModelFamily::TitanTextV2, br#"{"embedding":[1]}"#, 2).is_err());
    }
}
