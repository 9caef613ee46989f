//! `POST /v1/ask`: retrieval, then an answer from an LLM on Bedrock (Converse) that cites the
//! retrieved records. The chunks go into the prompt as numbered sources; the model is told to
//! answer from them only, to cite them as `[n]`, and to say [`NOT_FOUND_MARK`] when they do not
//! answer the question. Citations in the answer map back to record ids.

use std::time::Duration;

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ConversationRole, ConverseOutput, InferenceConfiguration, Message,
    SystemContentBlock,
};
use serde::{Deserialize, Serialize};

use super::{Filter, Hit, Mode, QueryError, SearchRequest};

/// The model asked when the server is given none: Claude 3 Haiku, on demand in most regions.
pub const DEFAULT_LLM_MODEL_ID: &str = "anthropic.claude-3-haiku-20240307-v1:0";

/// What the model is told to answer when the sources do not answer the question.
pub const NOT_FOUND_MARK: &str = "NOT_FOUND";

/// Characters of one source's text put into the prompt.
const SOURCE_CHARS: usize = 2000;

/// A question.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AskRequest {
    /// The question.
    pub question: String,
    /// Chunks retrieved as sources (1 to 200; default 8).
    #[serde(default = "default_k")]
    pub k: usize,
    /// Metadata filters of the retrieval, as for `/v1/search`.
    #[serde(default)]
    pub filter: Filter,
    /// How the sources are retrieved, as for `/v1/search` (default vector).
    #[serde(default)]
    pub mode: Mode,
    /// Hybrid only: the vector score's share.
    #[serde(default)]
    pub weight: Option<f64>,
    /// Sources scoring below this are left out (the engine's score, or the fused one).
    #[serde(default)]
    pub min_score: Option<f64>,
}

fn default_k() -> usize {
    8
}

impl AskRequest {
    /// The retrieval this question needs.
    pub fn retrieval(&self) -> SearchRequest {
        SearchRequest {
            query: self.question.clone(),
            k: self.k,
            filter: self.filter.clone(),
            mode: self.mode,
            weight: self.weight,
        }
    }
}

/// A source the answer cites.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Citation {
    /// Its number in the prompt (the `[n]` of the answer).
    pub n: usize,
    #[serde(flatten)]
    pub hit: Hit,
}

/// Tokens the model counted.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The answer to a question.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AskResponse {
    /// The model's answer, or why there is none.
    pub answer: String,
    /// False when the indexed records do not answer the question (nothing retrieved, or the
    /// model said so).
    pub found: bool,
    /// The sources the answer cites, in the order it first cites them.
    pub citations: Vec<Citation>,
    /// Every source given to the model, numbered from 1.
    pub sources: Vec<Hit>,
    /// The model asked (empty when none was).
    pub model: String,
    pub usage: Usage,
    /// Set when no answering model is configured (the laptop mode without AWS credentials):
    /// why, and how to configure one. `sources` are then the retrieved passages, uncited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval_only: Option<String>,
    /// Milliseconds spent, retrieval included.
    pub took_ms: u64,
}

/// The instruction the model gets.
pub const SYSTEM_PROMPT: &str = "You answer questions using only the numbered sources in the user's message. \
After each statement, cite the sources it comes from as [n], using their numbers. \
Do not use knowledge from outside the sources. \
If the sources do not contain the answer, reply with exactly NOT_FOUND and nothing else.";

/// The user message: the numbered sources, then the question.
pub fn user_prompt(question: &str, sources: &[Hit]) -> String {
    let mut prompt = String::from("Sources:\n");
    for (i, hit) in sources.iter().enumerate() {
        let text: String = hit
            .text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(SOURCE_CHARS)
            .collect();
        prompt.push_str(&format!("[{}] {text}\n", i + 1));
    }
    prompt.push_str(&format!("\nQuestion: {}\n", question.trim()));
    prompt
}

/// The source numbers an answer cites (`[2]`, `[1, 3]`, `[1][4]`), first citation first, each
/// once; numbers outside 1..=`sources` are not citations.
pub fn cited(answer: &str, sources: usize) -> Vec<usize> {
    let mut numbers = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']') else { break };
        for part in rest[..close].split(',') {
            if let Ok(n) = part.trim().parse::<usize>()
                && (1..=sources).contains(&n)
                && !numbers.contains(&n)
            {
                numbers.push(n);
            }
        }
        rest = &rest[close + 1..];
    }
    numbers
}

/// The answer for a question whose retrieval found nothing to give the model.
pub fn nothing_retrieved() -> String {
    "Not found in the indexed records: no document matched the question and its filters.".into()
}

/// The answer for a question the retrieved records do not answer.
pub fn not_answered() -> String {
    "Not found in the indexed records: the documents retrieved for the question do not answer it."
        .into()
}

/// The answer when no model writes one: the passages are what the search found.
pub fn passages_only(passages: usize) -> String {
    format!(
        "No answering model is configured, so these are the {passages} passages the search retrieved for the question, best first."
    )
}

/// Claude (or another chat model) on Bedrock, through Converse.
pub struct Llm {
    client: Client,
    model_id: String,
}

impl Llm {
    /// A Converse client with the embedding client's region, endpoint and credentials, a
    /// longer timeout (answers take seconds) and the SDK's standard retries.
    pub fn new(embedding_client: &Client, model_id: String) -> Self {
        let config = embedding_client
            .config()
            .to_builder()
            .retry_config(aws_sdk_bedrockruntime::config::retry::RetryConfig::standard())
            .timeout_config(
                aws_sdk_bedrockruntime::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            )
            .build();
        Self {
            client: Client::from_conf(config),
            model_id,
        }
    }

    /// The laptop mode's answering model: Bedrock in the region and with the credentials the
    /// AWS configuration gives (environment variables, `~/.aws/config` and its profiles), or
    /// why there is none. `AWS_ENDPOINT_URL_BEDROCK_RUNTIME` points it elsewhere.
    pub async fn from_environment(model_id: String) -> Result<Self, String> {
        use aws_credential_types::provider::ProvideCredentials;
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        if config.region().is_none() {
            return Err(
                "no AWS region is configured: set AWS_REGION (or a region in ~/.aws/config) and AWS credentials to get written answers from Bedrock"
                    .into(),
            );
        }
        let Some(provider) = config.credentials_provider() else {
            return Err("no AWS credentials provider is configured".into());
        };
        match tokio::time::timeout(Duration::from_secs(10), provider.provide_credentials()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(format!(
                    "no AWS credentials were found ({e}): set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, to get written answers from Bedrock"
                ));
            }
            Err(_) => {
                return Err(
                    "looking for AWS credentials took over 10 s: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, to get written answers from Bedrock"
                        .into(),
                );
            }
        }
        Ok(Self::new(&Client::new(&config), model_id))
    }

    /// The model id.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// One Converse call: the answer's text and the tokens used.
    pub async fn answer(&self, system: &str, user: String) -> Result<(String, Usage), QueryError> {
        let message = Message::builder()
            .role(ConversationRole::User)
            .content(ContentBlock::Text(user))
            .build()
            .map_err(|e| QueryError::Unavailable(format!("cannot build the prompt: {e}")))?;
        let sent = self
            .client
            .converse()
            .model_id(&self.model_id)
            .system(SystemContentBlock::Text(system.to_owned()))
            .messages(message)
            .inference_config(
                InferenceConfiguration::builder()
                    .max_tokens(1024)
                    .temperature(0.0)
                    .build(),
            )
            .send()
            .await;
        let output = match sent {
            Ok(output) => output,
            Err(e) => {
                use aws_sdk_bedrockruntime::error::ProvideErrorMetadata;
                let code = e.code().unwrap_or("").to_owned();
                let message = e.message().map(str::to_owned).unwrap_or_else(|| {
                    aws_sdk_bedrockruntime::error::DisplayErrorContext(&e).to_string()
                });
                let what = format!(
                    "the answering model {} refused or failed ({code}): {message}",
                    self.model_id
                );
                return Err(match code.as_str() {
                    "AccessDeniedException" | "ResourceNotFoundException" => {
                        QueryError::Misconfigured(format!(
                            "{what}; check --llm-model-id (VECTORPIPE_LLM_MODEL_ID), that the model is enabled in this region and that the server's role may call bedrock:InvokeModel on it"
                        ))
                    }
                    "ValidationException" => QueryError::Invalid(what),
                    _ => QueryError::Unavailable(what),
                });
            }
        };
        let text = match output.output() {
            Some(ConverseOutput::Message(message)) => message
                .content()
                .iter()
                .filter_map(|block| block.as_text().ok().cloned())
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        };
        let usage = output
            .usage()
            .map(|u| Usage {
                input_tokens: u.input_tokens().max(0) as u64,
                output_tokens: u.output_tokens().max(0) as u64,
            })
            .unwrap_or_default();
        Ok((text, usage))
    }
}

/// True when the model said the sources do not answer the question.
pub fn says_not_found(answer: &str) -> bool {
    let trimmed = answer
        .trim()
        .trim_matches(|c: char| !c.is_alphanumeric() && c != '_');
    trimmed.eq_ignore_ascii_case(NOT_FOUND_MARK)
}

/// Keeps the hits scoring at least `min_score`.
pub fn above(hits: Vec<Hit>, min_score: Option<f64>) -> Vec<Hit> {
    match min_score {
        Some(min) => hits.into_iter().filter(|h| h.score >= min).collect(),
        None => hits,
    }
}

/// The citations of `answer` among `sources`.
pub fn citations(answer: &str, sources: &[Hit]) -> Vec<Citation> {
    cited(answer, sources.len())
        .into_iter()
        .map(|n| Citation {
            n,
            hit: sources[n - 1].clone(),
        })
        .collect()
}

/// Checks an ask request; the error says what to fix.
pub fn check(request: &AskRequest) -> Result<(), QueryError> {
    if request.question.trim().is_empty() {
        return Err(QueryError::Invalid(
            "question is empty; send the question to answer".into(),
        ));
    }
    request.retrieval().check()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    fn hit(id: &str, text: &str) -> Hit {
        Hit {
            id: id.into(),
            parent_id: id.into(),
            chunk: 0,
            score: 0.5,
            text: text.into(),
            metadata: Map::new(),
        }
    }

    #[test]
    fn citations_are_read_in_order_once_and_only_within_the_sources() {
        assert_eq!(
            cited("A [2]. B [1, 3]. C [2][4]. D [9] [x] [0]", 4),
            [2, 1, 3, 4]
        );
        assert_eq!(cited("no citation", 4), Vec::<usize>::new());
        assert_eq!(cited("unclosed [1", 4), Vec::<usize>::new());
        let sources = [hit("a", "x"), hit("b", "y")];
        let found = citations("from [2] and [1]", &sources);
        assert_eq!(found[0].n, 2);
        assert_eq!(found[0].hit.id, "b");
        assert_eq!(found[1].hit.id, "a");
    }

    #[test]
    fn the_prompt_numbers_the_sources_and_ends_with_the_question() {
        let prompt = user_prompt(" why? ", &[hit("a", "first\n text"), hit("b", "second")]);
        assert_eq!(
            prompt,
            "Sources:\n[1] first text\n[2] second\n\nQuestion: why?\n"
        );
        let long = "word ".repeat(1000);
        let prompt = user_prompt("q", &[hit("a", &long)]);
        assert!(prompt.len() < SOURCE_CHARS + 40, "{}", prompt.len());
    }

    #[test]
    fn not_found_is_recognised_with_punctuation_but_not_inside_an_answer() {
        assert!(says_not_found("NOT_FOUND"));
        assert!(says_not_found(" not_found. "));
        assert!(!says_not_found(
            "The sources say X [1]; NOT_FOUND elsewhere"
        ));
    }

    #[test]
    fn ask_requests_are_checked_like_searches() {
        let request: AskRequest = serde_json::from_value(json!({"question": "q", "k": 0})).unwrap();
        assert!(
            check(&request)
                .unwrap_err()
                .to_string()
                .contains("1 to 200")
        );
        let request: AskRequest = serde_json::from_value(json!({"question": " "})).unwrap();
        assert!(
            check(&request)
                .unwrap_err()
                .to_string()
                .contains("question is empty")
        );
        assert!(serde_json::from_value::<AskRequest>(json!({"query": "q"})).is_err());
    }
}
