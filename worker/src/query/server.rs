//! `vectorpipe-worker serve`: the query server of one pipeline. `POST /v1/search`,
//! `POST /v1/ask`, and `/metrics`, `/healthz`, `/readyz` (ready once the index's mapping was read
//! and one query was embedded, so a wrong model id or a missing index shows before the first user
//! does).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::ask::{self, AskRequest, AskResponse, Llm};
use super::{Backend, Hit, Mode, QueryError, SearchRequest, SearchResponse, fuse};
use crate::embed::{EmbedError, Embedder};

/// Labels of a query request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    /// The endpoint (`search`, `ask`).
    pub endpoint: String,
    /// `ok`, `invalid` (400) or `unavailable` (503).
    pub outcome: String,
}

/// Labels naming an endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Endpoint {
    /// The endpoint (`search`).
    pub endpoint: String,
}

/// Labels of LLM tokens.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenKind {
    /// `input` or `output`.
    pub kind: String,
}

/// The query server's metrics (`vectorpipe_worker_query_*`).
pub struct QueryMetrics {
    requests: Family<Request, Counter>,
    seconds: Family<Endpoint, Histogram>,
    llm_tokens: Family<TokenKind, Counter>,
}

impl QueryMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.002, 2.0, 14))
            }),
            llm_tokens: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("query");
        r.register(
            "requests",
            "Query requests, by endpoint and outcome",
            metrics.requests.clone(),
        );
        r.register(
            "duration_seconds",
            "Seconds per query request, embedding included",
            metrics.seconds.clone(),
        );
        r.register(
            "llm_tokens",
            "Tokens the answering model counted for /v1/ask, by kind (input, output)",
            metrics.llm_tokens.clone(),
        );
        // Every series exists at 0 from the start (see `Metrics::start_at_zero`).
        for endpoint in ["search", "ask"] {
            for outcome in ["ok", "invalid", "unavailable"] {
                let _ = metrics.requests.get_or_create(&Request {
                    endpoint: endpoint.into(),
                    outcome: outcome.into(),
                });
            }
            let _ = metrics.seconds.get_or_create(&Endpoint {
                endpoint: endpoint.into(),
            });
        }
        for kind in ["input", "output"] {
            let _ = metrics
                .llm_tokens
                .get_or_create(&TokenKind { kind: kind.into() });
        }
        metrics
    }

    fn tokens(&self, usage: ask::Usage) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            self.llm_tokens
                .get_or_create(&TokenKind { kind: kind.into() })
                .inc_by(n);
        }
    }

    fn observe(&self, endpoint: &str, outcome: &str, took: Duration) {
        self.requests
            .get_or_create(&Request {
                endpoint: endpoint.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.seconds
            .get_or_create(&Endpoint {
                endpoint: endpoint.into(),
            })
            .observe(took.as_secs_f64());
    }
}

/// Searches one pipeline's index with the pipeline's model, and answers questions from it.
pub struct Searcher<E, B> {
    backend: B,
    embedder: E,
    /// The answering model, or why there is none (the laptop mode without AWS credentials):
    /// `/v1/ask` then returns the retrieved passages only.
    llm: Result<Llm, String>,
    /// Why the server is not ready yet; `None` once it is.
    not_ready: std::sync::Mutex<Option<String>>,
    metrics: QueryMetrics,
}

impl<E: Embedder, B: Backend> Searcher<E, B> {
    /// A searcher that is not ready until [`Searcher::start`] succeeded.
    pub fn new(backend: B, embedder: E, llm: Result<Llm, String>, metrics: QueryMetrics) -> Self {
        Self {
            backend,
            embedder,
            llm,
            not_ready: std::sync::Mutex::new(Some(
                "starting: reading the index and checking the model".into(),
            )),
            metrics,
        }
    }

    fn set_not_ready(&self, why: Option<String>) {
        *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the server is not ready, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        self.not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Prepares the index and embeds one query, waiting out a missing index or an unreachable
    /// cluster or model (not ready meanwhile, with the reason); a model that refuses the
    /// pipeline's settings is an error, the message says what to fix.
    pub async fn start(&self) -> Result<(), QueryError> {
        let mut attempt = 0u32;
        loop {
            match self.start_once().await {
                Ok(()) => {
                    tracing::info!(index = %self.backend.name(), "ready to answer searches");
                    return Ok(());
                }
                Err(QueryError::Unavailable(why)) => {
                    attempt += 1;
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        tracing::warn!(reason = %why, attempt, "not ready yet; trying again");
                    }
                    self.set_not_ready(Some(why));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    self.set_not_ready(Some(e.to_string()));
                    return Err(e);
                }
            }
        }
    }

    /// One try of [`Searcher::start`]: ready, or the reason it is not.
    pub async fn start_once(&self) -> Result<(), QueryError> {
        self.backend.prepare().await?;
        self.embed("vectorpipe start-up check").await?;
        self.set_not_ready(None);
        Ok(())
    }

    async fn embed(&self, query: &str) -> Result<Vec<f32>, QueryError> {
        match self.embedder.embed(vec![query.to_owned()]).await {
            Ok(mut embedded) => embedded.pop().map(|e| e.vector).ok_or_else(|| {
                QueryError::Unavailable("the model answered no vector for the query".into())
            }),
            Err(EmbedError::Misconfigured(why)) => Err(QueryError::Misconfigured(format!(
                "the model refuses the pipeline's settings: {why}"
            ))),
            Err(EmbedError::Rejected(why)) => Err(QueryError::Invalid(format!(
                "the model refused the query: {why}"
            ))),
            Err(e) => Err(QueryError::Unavailable(format!(
                "the model cannot embed the query now: {e}"
            ))),
        }
    }

    /// Runs one search.
    pub async fn search(&self, request: &SearchRequest) -> Result<Vec<Hit>, QueryError> {
        request.check()?;
        if let Some(why) = self.not_ready() {
            return Err(QueryError::Unavailable(format!("not ready: {why}")));
        }
        // A filter the index cannot run is refused before the model is called.
        let filter = self.backend.filter(&request.filter).await?;
        let k = request.k;
        match request.mode {
            Mode::Vector => {
                let vector = self.embed(&request.query).await?;
                self.backend.nearest(vector, k, &filter).await
            }
            Mode::Lexical => self.backend.lexical(&request.query, k, &filter).await,
            Mode::Hybrid => {
                let vector = self.embed(&request.query).await?;
                let (near, lexical) = tokio::try_join!(
                    self.backend.nearest(vector, k, &filter),
                    self.backend.lexical(&request.query, k, &filter),
                )?;
                Ok(fuse(near, lexical, request.vector_weight(), k))
            }
        }
    }

    /// Answers one question from the retrieved records (with no answering model: the
    /// retrieved passages, and why no answer was written).
    pub async fn ask(&self, request: &AskRequest) -> Result<AskResponse, QueryError> {
        ask::check(request)?;
        let started = Instant::now();
        let sources = ask::above(self.search(&request.retrieval()).await?, request.min_score);
        let mut response = AskResponse {
            answer: ask::nothing_retrieved(),
            found: false,
            citations: Vec::new(),
            sources,
            model: String::new(),
            usage: ask::Usage::default(),
            retrieval_only: None,
            took_ms: 0,
        };
        if !response.sources.is_empty() {
            match &self.llm {
                Err(why) => {
                    response.answer = ask::passages_only(response.sources.len());
                    response.retrieval_only = Some(why.clone());
                }
                Ok(llm) => {
                    let prompt = ask::user_prompt(&request.question, &response.sources);
                    let (text, usage) = llm.answer(ask::SYSTEM_PROMPT, prompt).await?;
                    self.metrics.tokens(usage);
                    response.model = llm.model_id().to_owned();
                    response.usage = usage;
                    if ask::says_not_found(&text) {
                        response.answer = ask::not_answered();
                    } else {
                        response.citations = ask::citations(&text, &response.sources);
                        response.found = true;
                        response.answer = text;
                    }
                }
            }
        }
        response.took_ms = started.elapsed().as_millis() as u64;
        Ok(response)
    }
}

struct App<E, B> {
    searcher: Arc<Searcher<E, B>>,
    registry: Arc<Registry>,
    info: Arc<Value>,
}

impl<E, B> Clone for App<E, B> {
    fn clone(&self) -> Self {
        Self {
            searcher: self.searcher.clone(),
            registry: self.registry.clone(),
            info: self.info.clone(),
        }
    }
}

/// The page at `/`: a question box, the answer with its cited sources, filters, and a
/// search-only mode. One file, no external assets.
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page uses comes from this server.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

async fn about<E: Embedder, B: Backend>(State(app): State<App<E, B>>) -> Json<Value> {
    Json(app.info.as_ref().clone())
}

fn error_response(e: &QueryError) -> Response {
    let status = match e {
        QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
        QueryError::Unavailable(_) | QueryError::Misconfigured(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    (status, Json(json!({"error": e.to_string()}))).into_response()
}

/// The answer to a request, counted by endpoint and outcome.
fn respond<T: serde::Serialize>(
    metrics: &QueryMetrics,
    endpoint: &str,
    started: Instant,
    outcome: Result<T, QueryError>,
) -> Response {
    let took = started.elapsed();
    match outcome {
        Ok(answer) => {
            metrics.observe(endpoint, "ok", took);
            Json(answer).into_response()
        }
        Err(e) => {
            let label = match e {
                QueryError::Invalid(_) => "invalid",
                _ => "unavailable",
            };
            metrics.observe(endpoint, label, took);
            error_response(&e)
        }
    }
}

/// A body that is not the request: what to send instead.
fn not_a_request(e: &axum::extract::rejection::JsonRejection, example: &str) -> QueryError {
    QueryError::Invalid(format!(
        "the body is not a request of this endpoint: {}; send JSON like {example}",
        e.body_text()
    ))
}

async fn search<E: Embedder, B: Backend>(
    State(app): State<App<E, B>>,
    body: Result<Json<SearchRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let started = Instant::now();
    let outcome = match body {
        Err(e) => Err(not_a_request(&e, r#"{"query": "...", "k": 10}"#)),
        Ok(Json(request)) => app
            .searcher
            .search(&request)
            .await
            .map(|hits| SearchResponse {
                mode: request.mode,
                hits,
                took_ms: started.elapsed().as_millis() as u64,
            }),
    };
    respond(&app.searcher.metrics, "search", started, outcome)
}

async fn answer<E: Embedder, B: Backend>(
    State(app): State<App<E, B>>,
    body: Result<Json<AskRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let started = Instant::now();
    let outcome = match body {
        Err(e) => Err(not_a_request(&e, r#"{"question": "...", "k": 8}"#)),
        Ok(Json(request)) => app.searcher.ask(&request).await,
    };
    respond(&app.searcher.metrics, "ask", started, outcome)
}

async fn ready<E: Embedder, B: Backend>(State(app): State<App<E, B>>) -> (StatusCode, String) {
    match app.searcher.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics<E: Embedder, B: Backend>(State(app): State<App<E, B>>) -> impl IntoResponse {
    crate::http::metrics_page(&app.registry)
}

/// True when the request carries `Authorization: Bearer <token>`; compared in constant time.
fn authorized(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Serves the searcher on `address` (and the admin socket); returns the bound address. `info`
/// is what `GET /v1/info` answers (the pipeline, its index and models). With a `token`, every
/// `/v1` request must carry it as a bearer token (the page, the probes and /metrics need none).
pub async fn serve<E: Embedder, B: Backend>(
    searcher: Arc<Searcher<E, B>>,
    registry: Registry,
    info: Value,
    token: Option<String>,
    (address, socket): (SocketAddr, Option<&Path>),
) -> anyhow::Result<SocketAddr> {
    let app = App {
        searcher,
        registry: Arc::new(registry),
        info: Arc::new(info),
    };
    let mut api = Router::new()
        .route("/v1/info", get(about::<E, B>))
        .route("/v1/search", post(search::<E, B>))
        .route("/v1/ask", post(answer::<E, B>));
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let token = Arc::new(token);
        api = api.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let token = token.clone();
                async move {
                    if authorized(request.headers(), &token) {
                        next.run(request).await
                    } else {
                        (
                            StatusCode::UNAUTHORIZED,
                            [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                            Json(json!({"error": "this query server needs a bearer token: send Authorization: Bearer <token> (the token is in the Secret named by spec.query.authSecretRef)"})),
                        )
                            .into_response()
                    }
                }
            },
        ));
    }
    let router = Router::new()
        .route("/", get(page))
        .merge(api)
        .route("/metrics", get(metrics::<E, B>))
        .route("/healthz", get(|| async { "live\n" }))
        .route("/readyz", get(ready::<E, B>))
        .with_state(app);
    crate::http::serve_app(
        router,
        address,
        socket,
        "--address (VECTORPIPE_QUERY_ADDRESS)",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(!authorized(&headers, "s3cret"));
        headers.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(authorized(&headers, "s3cret"));
        headers.insert("authorization", "Bearer s3cre".parse().unwrap());
        assert!(!authorized(&headers, "s3cret"));
        headers.insert("authorization", "Basic s3cret".parse().unwrap());
        assert!(!authorized(&headers, "s3cret"));
    }
}
