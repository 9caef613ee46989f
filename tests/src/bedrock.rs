//! A fake of the Amazon Bedrock runtime for tests and benchmarks.
//!
//! Bedrock itself cannot run on our machines, so this server speaks its wire format to the real
//! `aws-sdk-bedrockruntime` client: `InvokeModel` for Titan Text Embeddings v1/v2 and Cohere Embed
//! v3, and `Converse` with a canned answer. It verifies the SigV4 signature of every call (service
//! `bedrock`) against the static test credentials, answers errors the way Bedrock does (status,
//! `x-amzn-ErrorType` header, `{"message"}` body), and injects faults, latency and a request-rate
//! quota on demand.
//!
//! Embeddings are deterministic and meaningful enough for nearest-neighbour assertions: each word
//! of the text is hashed to a signed dimension (feature hashing), so texts that share words point
//! the same way.
//!
//! Control endpoints (no signature needed), for tests and for the `fake-bedrock` binary:
//! - `GET /_fake/stats`: calls, failures, texts and input tokens, per model;
//! - `POST /_fake/faults` `{"fault": "ThrottlingException", "count": 3}`: fail the next calls;
//! - `PUT /_fake/latency` `{"millis": 50}`: delay every model call;
//! - `PUT /_fake/quota` `{"requestsPerSecond": 100}` (or `null`): throttle above that rate.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The access key the fake accepts.
pub const ACCESS_KEY_ID: &str = "AKIDVECTORPIPETEST";
/// The secret key the fake verifies signatures with.
pub const SECRET_ACCESS_KEY: &str = "vectorpipe-test-secret-key";

/// A Bedrock error the fake can be told to return.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Fault {
    /// 429: the account's quota is exhausted for now.
    ThrottlingException,
    /// 429: the model is not ready to serve yet.
    ModelNotReadyException,
    /// 503: the service cannot take the call.
    ServiceUnavailableException,
    /// 408: the model took too long.
    ModelTimeoutException,
    /// 400: the request is malformed.
    ValidationException,
    /// 500: an internal error.
    InternalServerException,
    /// 424: the model failed on the input.
    ModelErrorException,
}

impl Fault {
    fn status(self) -> StatusCode {
        match self {
            Self::ThrottlingException | Self::ModelNotReadyException => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::ServiceUnavailableException => StatusCode::SERVICE_UNAVAILABLE,
            Self::ModelTimeoutException => StatusCode::REQUEST_TIMEOUT,
            Self::ValidationException => StatusCode::BAD_REQUEST,
            Self::InternalServerException => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ModelErrorException => StatusCode::FAILED_DEPENDENCY,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::ThrottlingException => "ThrottlingException",
            Self::ModelNotReadyException => "ModelNotReadyException",
            Self::ServiceUnavailableException => "ServiceUnavailableException",
            Self::ModelTimeoutException => "ModelTimeoutException",
            Self::ValidationException => "ValidationException",
            Self::InternalServerException => "InternalServerException",
            Self::ModelErrorException => "ModelErrorException",
        }
    }

    fn default_message(self) -> &'static str {
        match self {
            Self::ThrottlingException => "Too many requests, please wait before trying again.",
            Self::ModelNotReadyException => "Model is not ready to serve inference requests.",
            Self::ServiceUnavailableException => "Service is temporarily unavailable.",
            Self::ModelTimeoutException => "Model has timed out in processing the request.",
            Self::ValidationException => "Malformed input request.",
            Self::InternalServerException => "An internal server error occurred.",
            Self::ModelErrorException => "The model encountered an error processing the request.",
        }
    }
}

/// Per-model counters.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStats {
    /// Calls answered with a result.
    pub succeeded: u64,
    /// Calls answered with an error.
    pub failed: u64,
    /// Texts embedded.
    pub texts: u64,
    /// Input tokens counted.
    pub input_tokens: u64,
    /// Texts embedded per Cohere `input_type` (`search_document`, `search_query`, ...).
    pub input_types: BTreeMap<String, u64>,
}

/// Everything the fake counted.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Model calls received, answered either way.
    pub calls: u64,
    /// Calls refused for a missing or wrong signature.
    pub unsigned: u64,
    /// Errors returned, by error code.
    pub errors: BTreeMap<String, u64>,
    /// Counters per model id.
    pub models: BTreeMap<String, ModelStats>,
}

#[derive(Default)]
struct Inner {
    faults: VecDeque<Fault>,
    /// Calls whose body holds one of these texts fail with its fault, every time.
    poison: Vec<(String, Fault)>,
    latency: Duration,
    quota: Option<Quota>,
    stats: Stats,
}

struct Quota {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl Quota {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The fake's shared state.
#[derive(Clone, Default)]
pub struct FakeBedrock {
    inner: Arc<Mutex<Inner>>,
}

impl FakeBedrock {
    /// A fake with no latency, no faults and no quota.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `count` responses of `fault` for the next model calls.
    pub fn inject(&self, fault: Fault, count: usize) {
        let mut inner = self.lock();
        inner.faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Drops the queued faults.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Fails every call whose input holds `marker` with `fault`, for good (a text the model
    /// cannot take).
    pub fn poison(&self, marker: &str, fault: Fault) {
        self.lock().poison.push((marker.to_owned(), fault));
    }

    /// Takes back [`FakeBedrock::poison`] for `marker`: the model takes those texts from now on.
    pub fn cure(&self, marker: &str) {
        self.lock().poison.retain(|(m, _)| m != marker);
    }

    /// Delays every model call.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Throttles calls above `per_second` (None: no quota).
    pub fn set_quota(&self, per_second: Option<f64>) {
        self.lock().quota = per_second.map(|per_second| Quota {
            per_second,
            tokens: per_second.max(1.0),
            refilled: Instant::now(),
        });
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters inconsistent in a way that
        // matters to a test; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/model/{model_id}/invoke", post(invoke))
            .route("/model/{model_id}/converse", post(converse))
            .route("/_fake/stats", get(stats))
            .route("/_fake/faults", post(add_faults).delete(clear_faults))
            .route("/_fake/latency", put(set_latency))
            .route("/_fake/quota", put(set_quota))
            .with_state(self.clone())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Starts the fake on a free loopback port in the background; returns it and its address.
    pub async fn start() -> std::io::Result<(Self, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let fake = Self::new();
        tokio::spawn(fake.clone().serve(listener));
        Ok((fake, address))
    }

    /// Decides whether a model call fails before it is looked at (queued fault, quota).
    fn admit(&self, model_id: &str) -> Result<Duration, Fault> {
        let mut inner = self.lock();
        inner.stats.calls += 1;
        let fault = inner.faults.pop_front().or_else(|| {
            inner
                .quota
                .as_mut()
                .and_then(|q| (!q.take()).then_some(Fault::ThrottlingException))
        });
        match fault {
            Some(fault) => {
                record_failure(&mut inner.stats, model_id, fault.name());
                Err(fault)
            }
            None => Ok(inner.latency),
        }
    }

    /// What every model call goes through before its body is looked at: the signature check,
    /// queued faults and the quota, then the configured latency. Returns the latency waited.
    async fn accept(
        &self,
        model_id: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Duration, Response> {
        // Bedrock's latency counts from the request's arrival, so the checks below are in it.
        let arrived = Instant::now();
        if let Err(reason) = verify_signature(method, uri, headers, body) {
            self.lock().stats.unsigned += 1;
            return Err(error(
                StatusCode::FORBIDDEN,
                "InvalidSignatureException",
                &reason,
            ));
        }
        let poisoned = self
            .lock()
            .poison
            .iter()
            .find(|(marker, _)| body.windows(marker.len()).any(|w| w == marker.as_bytes()))
            .map(|(_, fault)| *fault);
        if let Some(fault) = poisoned {
            let mut inner = self.lock();
            inner.stats.calls += 1;
            record_failure(&mut inner.stats, model_id, fault.name());
            return Err(fault_response(fault));
        }
        let latency = self.admit(model_id).map_err(fault_response)?;
        if !latency.is_zero() {
            sleep_until(arrived + latency).await;
        }
        Ok(latency)
    }

    fn record_success(&self, model_id: &str, texts: u64, tokens: u64) {
        let mut inner = self.lock();
        let model = inner.stats.models.entry(model_id.to_owned()).or_default();
        model.succeeded += 1;
        model.texts += texts;
        model.input_tokens += tokens;
    }

    fn record_error(&self, model_id: &str, code: &str) {
        record_failure(&mut self.lock().stats, model_id, code);
    }
}

fn record_failure(stats: &mut Stats, model_id: &str, code: &str) {
    *stats.errors.entry(code.to_owned()).or_default() += 1;
    stats.models.entry(model_id.to_owned()).or_default().failed += 1;
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [
            (
                "x-amzn-ErrorType",
                format!("{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
            ),
            ("x-amzn-RequestId", request_id()),
            ("content-type", "application/json".to_owned()),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

fn fault_response(fault: Fault) -> Response {
    error(fault.status(), fault.name(), fault.default_message())
}

fn validation(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

fn ok_json(body: &Value, headers: &[(&'static str, String)]) -> Response {
    ok_body(body.to_string(), headers)
}

/// A 200 with a JSON body already written.
fn ok_body(body: String, headers: &[(&'static str, String)]) -> Response {
    let mut response = (
        StatusCode::OK,
        [
            ("content-type", "application/json".to_owned()),
            ("x-amzn-RequestId", request_id()),
        ],
        body,
    )
        .into_response();
    for (name, value) in headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

fn request_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:08x}-fake-{:012x}", nanos >> 64, nanos & 0xffff_ffff_ffff)
}

/// Checks the request's SigV4 signature for Bedrock.
fn verify_signature(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    verify_sigv4(method, uri, headers, body, "bedrock")
}

/// Checks a request's SigV4 signature for `service`: re-signs the same request with the test
/// credentials at the request's own timestamp and compares the signatures.
pub fn verify_sigv4(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    service: &str,
) -> Result<(), String> {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("the request is not signed (no Authorization header)")?;
    let parsed = sigv4::parse_authorization(authorization)?;
    if parsed.access_key != ACCESS_KEY_ID {
        return Err(format!("unknown access key {}", parsed.access_key));
    }
    if parsed.service != service {
        return Err(format!(
            "the request is signed for service {:?}, not {service:?}",
            parsed.service
        ));
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or("x-amz-date is missing")?;
    let expected = sigv4::signature(&sigv4::Request {
        method: method.as_str(),
        uri,
        headers,
        signed_headers: &parsed.signed_headers,
        body,
        amz_date,
        region: &parsed.region,
        service: &parsed.service,
        secret_key: SECRET_ACCESS_KEY,
    })?;
    if expected != parsed.signature {
        return Err(
            "the request signature does not match the one computed with the test secret key".into(),
        );
    }
    Ok(())
}

/// Approximate token count: about four characters a token, as Bedrock documents.
fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// A deterministic embedding: each word adds ±1 to a dimension chosen by its hash.
pub fn embed(text: &str, dimensions: usize, normalize: bool) -> Vec<f32> {
    let mut vector = vec![0.0f32; dimensions];
    let mut any = false;
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let hash = fnv1a(word.to_lowercase().as_bytes());
        let index = (hash % dimensions as u64) as usize;
        vector[index] += if hash >> 63 == 0 { 1.0 } else { -1.0 };
        any = true;
    }
    if !any {
        let hash = fnv1a(text.as_bytes());
        vector[(hash % dimensions as u64) as usize] = 1.0;
    }
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if normalize && norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    } else if !normalize {
        // Unnormalised vectors, as Titan v1 returns, have a length other than 1.
        vector.iter_mut().for_each(|v| *v *= 0.37);
    }
    vector
}

/// A call waiting for its answer time: when, a serial that keeps equal times apart, and whom to
/// wake.
type Due = ((Instant, u64), tokio::sync::oneshot::Sender<()>);

/// Waits until `at`, to within about a tenth of a millisecond. Tokio's timer rounds a deadline
/// up to its next millisecond tick and fires at its driver's next wake-up, which made a "50 ms"
/// call take about 51.5 ms and put the worker benchmark's ceiling out of reach by 3 %. One
/// thread, shared by every fake in the process, sleeps until the earliest deadline instead.
async fn sleep_until(at: Instant) {
    use std::sync::mpsc::RecvTimeoutError;
    static TIMER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Due>>> =
        std::sync::OnceLock::new();
    let timer = TIMER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Due>();
        let waker = move || {
            let mut due: BTreeMap<(Instant, u64), tokio::sync::oneshot::Sender<()>> =
                BTreeMap::new();
            loop {
                let now = Instant::now();
                while let Some(entry) = due.first_entry().filter(|e| e.key().0 <= now) {
                    let _ = entry.remove().send(());
                }
                let next = match due.first_key_value() {
                    Some(((at, _), _)) => rx.recv_timeout(at.saturating_duration_since(now)),
                    None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok((key, wake)) => {
                        due.insert(key, wake);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        let thread = std::thread::Builder::new().name("fake-bedrock-timer".into());
        thread.spawn(waker).ok().map(|_| tx)
    });
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (wake, woken) = tokio::sync::oneshot::channel();
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sent = timer
        .as_ref()
        .is_some_and(|tx| tx.send(((at, serial), wake)).is_ok());
    if !sent || woken.await.is_err() {
        // No timer thread: tokio's timer, coarser but still a wait.
        tokio::time::sleep_until(at.into()).await;
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn binary(vector: &[f32]) -> Vec<u8> {
    vector.iter().map(|v| u8::from(*v > 0.0)).collect()
}

fn int8(vector: &[f32]) -> Vec<i8> {
    vector
        .iter()
        .map(|v| (v * 127.0).round().clamp(-128.0, 127.0) as i8)
        .collect()
}

fn uint8(vector: &[f32]) -> Vec<u8> {
    vector
        .iter()
        .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect()
}

fn packed_bits(vector: &[f32], signed: bool) -> Vec<i32> {
    vector
        .chunks(8)
        .map(|chunk| {
            let byte = chunk
                .iter()
                .enumerate()
                .fold(0u8, |b, (i, v)| if *v > 0.0 { b | (0x80 >> i) } else { b });
            if signed {
                i32::from(byte as i8)
            } else {
                i32::from(byte)
            }
        })
        .collect()
}

enum Family {
    TitanV1,
    TitanV2,
    Cohere,
}

fn family(model_id: &str) -> Option<Family> {
    let base = model_id.rsplit('/').next().unwrap_or(model_id);
    let base = ["us.", "eu.", "apac.", "global."]
        .iter()
        .find_map(|p| base.strip_prefix(p))
        .unwrap_or(base);
    // Bedrock knows exact ids (with their version suffix), not prefixes: an id without its
    // `:0` is "The provided model identifier is invalid."
    match base {
        "amazon.titan-embed-text-v2:0" => Some(Family::TitanV2),
        "amazon.titan-embed-text-v1" | "amazon.titan-embed-text-v1:2:8k" => Some(Family::TitanV1),
        "cohere.embed-english-v3"
        | "cohere.embed-multilingual-v3"
        | "cohere.embed-english-v3:0:512"
        | "cohere.embed-multilingual-v3:0:512" => Some(Family::Cohere),
        _ => None,
    }
}

async fn invoke(
    State(fake): State<FakeBedrock>,
    Path(model_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = fake.accept(&model_id, &method, &uri, &headers, &body).await {
        return refusal;
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => {
            fake.record_error(&model_id, "ValidationException");
            return validation(
                "Malformed input request: the body is not a JSON object, please reformat your input and try again.",
            );
        }
    };
    let result = match family(&model_id) {
        Some(Family::TitanV1) => titan(&request, false),
        Some(Family::TitanV2) => titan(&request, true),
        Some(Family::Cohere) => {
            cohere(&request).map(|(body, texts, tokens)| (body.to_string(), texts, tokens))
        }
        None => Err("The provided model identifier is invalid.".to_owned()),
    };
    match result {
        Ok((body, texts, tokens)) => {
            fake.record_success(&model_id, texts, tokens);
            if let Some(input_type) = request["input_type"].as_str() {
                let mut inner = fake.lock();
                let model = inner.stats.models.entry(model_id.clone()).or_default();
                *model.input_types.entry(input_type.to_owned()).or_default() += texts;
            }
            ok_body(
                body,
                &[("x-amzn-bedrock-input-token-count", tokens.to_string())],
            )
        }
        Err(message) => {
            fake.record_error(&model_id, "ValidationException");
            validation(&message)
        }
    }
}

fn extraneous(request: &Value, allowed: &[&str]) -> Result<(), String> {
    let extra: Vec<&String> = request
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .collect()
        })
        .unwrap_or_default();
    match extra.first() {
        None => Ok(()),
        Some(key) => Err(format!(
            "Malformed input request: #: extraneous key [{key}] is not permitted, please reformat your input and try again."
        )),
    }
}

/// A Titan answer as Bedrock writes it. Serialised straight from `f32`, each value is the
/// shortest decimal that reads back as the same `f32` (about ten characters), like Bedrock's own;
/// through `serde_json::Value` every value was widened to `f64` and written with up to 17 digits,
/// which made the fake's (sparse) bodies about half as long again as Bedrock's.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TitanAnswer<'a> {
    embedding: &'a [f32],
    input_text_token_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    embeddings_by_type: Option<TitanByType<'a>>,
}

/// Titan v2's `embeddingsByType`: the kinds the request asked for.
#[derive(Default, Serialize)]
struct TitanByType<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    float: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    binary: Option<Vec<u8>>,
}

/// Titan Text Embeddings: one text per call. Returns the response body.
fn titan(request: &Value, v2: bool) -> Result<(String, u64, u64), String> {
    let allowed: &[&str] = if v2 {
        &["inputText", "dimensions", "normalize", "embeddingTypes"]
    } else {
        &["inputText"]
    };
    extraneous(request, allowed)?;
    let text = request["inputText"].as_str().ok_or(
        "Malformed input request: #: required key [inputText] not found, please reformat your input and try again.",
    )?;
    if text.is_empty() {
        return Err("Malformed input request: #/inputText: expected minLength: 1, actual: 0, please reformat your input and try again.".into());
    }
    if text.chars().count() > 50_000 {
        return Err("Malformed input request: #/inputText: expected maxLength: 50000, please reformat your input and try again.".into());
    }
    let (dimensions, normalize) = if v2 {
        let dimensions = match &request["dimensions"] {
            Value::Null => 1024,
            Value::Number(n) if [256, 512, 1024].contains(&n.as_u64().unwrap_or(0)) => {
                n.as_u64().unwrap_or(1024) as usize
            }
            other => {
                return Err(format!(
                    "Malformed input request: #/dimensions: {other} is not a valid enum value, please reformat your input and try again."
                ));
            }
        };
        let normalize = match &request["normalize"] {
            Value::Null => true,
            Value::Bool(b) => *b,
            _ => return Err("Malformed input request: #/normalize: expected type: Boolean, please reformat your input and try again.".into()),
        };
        (dimensions, normalize)
    } else {
        (1536, false)
    };
    let vector = embed(text, dimensions, normalize);
    let count = tokens(text);
    let mut answer = TitanAnswer {
        embedding: &vector,
        input_text_token_count: count,
        embeddings_by_type: None,
    };
    if v2 && let Some(types) = request["embeddingTypes"].as_array() {
        let mut by_type = TitanByType::default();
        for kind in types {
            match kind.as_str() {
                Some("float") => by_type.float = Some(&vector),
                Some("binary") => by_type.binary = Some(binary(&vector)),
                _ => {
                    return Err(format!(
                        "Malformed input request: #/embeddingTypes: {kind} is not a valid enum value, please reformat your input and try again."
                    ));
                }
            }
        }
        answer.embeddings_by_type = Some(by_type);
    }
    let body = serde_json::to_string(&answer).map_err(|e| e.to_string())?;
    Ok((body, 1, count))
}

/// Cohere Embed v3: up to 96 texts per call.
fn cohere(request: &Value) -> Result<(Value, u64, u64), String> {
    extraneous(
        request,
        &[
            "texts",
            "input_type",
            "truncate",
            "embedding_types",
            "images",
        ],
    )?;
    let texts: Vec<&str> = request["texts"]
        .as_array()
        .ok_or("Malformed input request: #: required key [texts] not found, please reformat your input and try again.")?
        .iter()
        .map(|t| t.as_str().ok_or("Malformed input request: #/texts: expected type: String, please reformat your input and try again."))
        .collect::<Result<_, _>>()?;
    if texts.len() > 96 {
        return Err(format!(
            "Malformed input request: #/texts: expected maxItems: 96, actual: {}, please reformat your input and try again.",
            texts.len()
        ));
    }
    match request["input_type"].as_str() {
        Some("search_document" | "search_query" | "classification" | "clustering") => {}
        Some(other) => return Err(format!("Malformed input request: #/input_type: {other} is not a valid enum value, please reformat your input and try again.")),
        None => return Err("Malformed input request: #: required key [input_type] not found, please reformat your input and try again.".into()),
    }
    let truncate = request["truncate"].as_str().unwrap_or("NONE");
    if truncate == "NONE" && texts.iter().any(|t| t.chars().count() > 2048) {
        return Err("Malformed input request: #/texts: a text is longer than 2048 characters; shorten it or set truncate, please reformat your input and try again.".into());
    }
    let vectors: Vec<Vec<f32>> = texts.iter().map(|t| embed(t, 1024, true)).collect();
    let count: u64 = texts.iter().map(|t| tokens(t)).sum();
    let id = request_id();
    let body = match request["embedding_types"].as_array() {
        None => json!({
            "id": id,
            "texts": texts,
            "embeddings": vectors,
            "response_type": "embeddings_floats",
        }),
        Some(types) => {
            let mut by_type = serde_json::Map::new();
            for kind in types {
                let value = match kind.as_str() {
                    Some("float") => json!(vectors),
                    Some("int8") => json!(vectors.iter().map(|v| int8(v)).collect::<Vec<_>>()),
                    Some("uint8") => json!(vectors.iter().map(|v| uint8(v)).collect::<Vec<_>>()),
                    Some("binary") => json!(
                        vectors
                            .iter()
                            .map(|v| packed_bits(v, true))
                            .collect::<Vec<_>>()
                    ),
                    Some("ubinary") => json!(
                        vectors
                            .iter()
                            .map(|v| packed_bits(v, false))
                            .collect::<Vec<_>>()
                    ),
                    _ => {
                        return Err(format!(
                            "Malformed input request: #/embedding_types: {kind} is not a valid enum value, please reformat your input and try again."
                        ));
                    }
                };
                by_type.insert(kind.as_str().unwrap_or_default().to_owned(), value);
            }
            json!({
                "id": id,
                "texts": texts,
                "embeddings": by_type,
                "response_type": "embeddings_by_type",
            })
        }
    };
    Ok((body, texts.len() as u64, count))
}

/// The answer a Converse call gets when its prompt carries no numbered sources.
pub const CANNED_ANSWER: &str =
    "This is the fake Bedrock server's canned answer; it cites no records.";

/// What the fake answers, as it was told to, when no source answers the question.
pub const NOT_FOUND: &str = "NOT_FOUND";

/// Words that say nothing about a topic, left out when the fake compares a question with sources.
const STOP_WORDS: [&str; 12] = [
    "what", "which", "when", "where", "does", "with", "that", "this", "from", "about", "have",
    "post",
];

fn content_words(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 4)
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .collect()
}

/// The fake model's reading of a retrieval prompt: the user text holds sources on lines that
/// start with `[n]` and the question after a last line starting with `Question:`. Like a model
/// told to answer from the sources and cite them, it cites (best first, at most three) the
/// sources that share a content word with the question and quotes their start; when none does
/// it answers [`NOT_FOUND`]. `None` when the prompt has no numbered sources.
pub fn answer_from_sources(user_text: &str) -> Option<String> {
    let question = user_text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Question:"))?;
    let question_words = content_words(question);
    let mut sources: Vec<(usize, usize, String)> = Vec::new();
    for line in user_text.lines() {
        let line = line.trim();
        let Some((number, text)) = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(n, text)| Some((n.parse::<usize>().ok()?, text.trim())))
        else {
            continue;
        };
        let shared = content_words(text).intersection(&question_words).count();
        sources.push((number, shared, text.to_owned()));
    }
    if sources.is_empty() {
        return None;
    }
    sources.retain(|(_, shared, _)| *shared > 0);
    if sources.is_empty() {
        return Some(NOT_FOUND.to_owned());
    }
    sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let sentences: Vec<String> = sources
        .iter()
        .take(3)
        .map(|(number, _, text)| {
            let quote: Vec<&str> = text.split_whitespace().take(12).collect();
            format!("{} [{number}].", quote.join(" "))
        })
        .collect();
    Some(format!("From the records: {}", sentences.join(" ")))
}

async fn converse(
    State(fake): State<FakeBedrock>,
    Path(model_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = match fake.accept(&model_id, &method, &uri, &headers, &body).await {
        Ok(latency) => latency,
        Err(refusal) => return refusal,
    };
    // Converse takes chat models: an embedding model, or an id of no known provider, is refused
    // as Bedrock refuses them.
    if family(&model_id).is_some() {
        fake.record_error(&model_id, "ValidationException");
        return validation(
            "This action doesn't support the model that you provided. Try again with a supported text or chat model.",
        );
    }
    let chat = [
        "anthropic.",
        "amazon.nova",
        "meta.",
        "mistral.",
        "cohere.command",
    ];
    let unprefixed = model_id
        .split_once('.')
        .filter(|(geo, _)| ["us", "eu", "apac", "global"].contains(geo))
        .map_or(model_id.as_str(), |(_, rest)| rest);
    if !chat.iter().any(|p| unprefixed.starts_with(p)) {
        fake.record_error(&model_id, "ValidationException");
        return validation("The provided model identifier is invalid.");
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(messages) = request["messages"].as_array().filter(|m| !m.is_empty()) else {
        fake.record_error(&model_id, "ValidationException");
        return validation("A conversation must start with a user message.");
    };
    let texts = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["text"].as_str().map(str::to_owned))
            .collect()
    };
    let system: u64 = texts(&request["system"]).iter().map(|t| tokens(t)).sum();
    let input: u64 = system
        + messages
            .iter()
            .flat_map(|m| texts(&m["content"]))
            .map(|t| tokens(&t))
            .sum::<u64>();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| texts(&m["content"]).join("\n"))
        .unwrap_or_default();
    let answer = answer_from_sources(&last_user).unwrap_or_else(|| CANNED_ANSWER.to_owned());
    let output = tokens(&answer);
    fake.record_success(&model_id, messages.len() as u64, input);
    ok_json(
        &json!({
            "output": {"message": {"role": "assistant", "content": [{"text": answer}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": input, "outputTokens": output, "totalTokens": input + output},
            "metrics": {"latencyMs": latency.as_millis() as u64},
        }),
        &[],
    )
}

async fn stats(State(fake): State<FakeBedrock>) -> impl IntoResponse {
    axum::Json(fake.stats())
}

#[derive(Deserialize)]
struct FaultRequest {
    fault: Fault,
    #[serde(default = "one")]
    count: usize,
}

fn one() -> usize {
    1
}

async fn add_faults(
    State(fake): State<FakeBedrock>,
    axum::Json(request): axum::Json<FaultRequest>,
) -> StatusCode {
    fake.inject(request.fault, request.count);
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(fake): State<FakeBedrock>) -> StatusCode {
    fake.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct LatencyRequest {
    millis: u64,
}

async fn set_latency(
    State(fake): State<FakeBedrock>,
    axum::Json(request): axum::Json<LatencyRequest>,
) -> StatusCode {
    fake.set_latency(Duration::from_millis(request.millis));
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QuotaRequest {
    requests_per_second: Option<f64>,
}

async fn set_quota(
    State(fake): State<FakeBedrock>,
    axum::Json(request): axum::Json<QuotaRequest>,
) -> StatusCode {
    fake.set_quota(request.requests_per_second);
    StatusCode::NO_CONTENT
}

/// SigV4 verification: parsing the Authorization header and recomputing the signature with the
/// `aws-sigv4` crate (the signer the SDK itself uses).
mod sigv4 {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4::SigningParams;

    pub(super) struct Authorization {
        pub access_key: String,
        pub region: String,
        pub service: String,
        pub signed_headers: Vec<String>,
        pub signature: String,
    }

    /// `AWS4-HMAC-SHA256 Credential=AKID/20261127/us-east-1/bedrock/aws4_request,
    /// SignedHeaders=host;x-amz-date, Signature=abcd…`
    pub(super) fn parse_authorization(header: &str) -> Result<Authorization, String> {
        let rest = header
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or("the Authorization header is not AWS4-HMAC-SHA256")?;
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for part in rest.split(',').map(str::trim) {
            if let Some(v) = part.strip_prefix("Credential=") {
                credential = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed_headers = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let credential: Vec<&str> = credential
            .ok_or("Credential= is missing")?
            .split('/')
            .collect();
        let [access_key, _date, region, service, "aws4_request"] = credential[..] else {
            return Err("the Credential scope is malformed".into());
        };
        Ok(Authorization {
            access_key: access_key.to_owned(),
            region: region.to_owned(),
            service: service.to_owned(),
            signed_headers: signed_headers
                .ok_or("SignedHeaders= is missing")?
                .split(';')
                .map(str::to_owned)
                .collect(),
            signature: signature.ok_or("Signature= is missing")?.to_owned(),
        })
    }

    pub(super) struct Request<'a> {
        pub method: &'a str,
        pub uri: &'a Uri,
        pub headers: &'a HeaderMap,
        pub signed_headers: &'a [String],
        pub body: &'a [u8],
        pub amz_date: &'a str,
        pub region: &'a str,
        pub service: &'a str,
        pub secret_key: &'a str,
    }

    pub(super) fn signature(request: &Request<'_>) -> Result<String, String> {
        let time = parse_time(request.amz_date)?;
        let identity =
            Credentials::new(ACCESS_KEY_ID, request.secret_key, None, None, "fake").into();
        let params = SigningParams::builder()
            .identity(&identity)
            .region(request.region)
            .name(request.service)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| e.to_string())?;
        let headers: Vec<(&str, &str)> = request
            .signed_headers
            .iter()
            .filter(|name| name.as_str() != "x-amz-date")
            .filter_map(|name| {
                request
                    .headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(|v| (name.as_str(), v))
            })
            .collect();
        let host = request
            .headers
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let url = format!("http://{host}{}", request.uri);
        let signable = SignableRequest::new(
            request.method,
            url,
            headers.into_iter(),
            SignableBody::Bytes(request.body),
        )
        .map_err(|e| e.to_string())?;
        let (instructions, signature) = sign(signable, &params.into())
            .map_err(|e| e.to_string())?
            .into_parts();
        drop(instructions);
        Ok(signature)
    }

    /// Parses `20261127T040512Z`.
    pub(super) fn parse_time(amz_date: &str) -> Result<SystemTime, String> {
        let bad = || format!("x-amz-date {amz_date:?} is not YYYYMMDDTHHMMSSZ");
        if amz_date.len() != 16 || !amz_date.ends_with('Z') || amz_date.as_bytes()[8] != b'T' {
            return Err(bad());
        }
        let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
            amz_date[range].parse().map_err(|_| bad())
        };
        let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
        let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
        // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
        u64::try_from(secs)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_and_share_direction_with_shared_words() {
        let a = embed("the cat sat on the mat", 256, true);
        assert_eq!(a, embed("the cat sat on the mat", 256, true));
        let b = embed("a cat on a mat", 256, true);
        let c = embed("quarterly revenue grew in europe", 256, true);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        assert!(
            dot(&a, &b) > dot(&a, &c),
            "shared words must bring vectors closer"
        );
        let norm = dot(&a, &a).sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn titan_v2_refuses_unknown_dimensions_and_extra_keys() {
        assert!(titan(&json!({"inputText": "x", "dimensions": 768}), true).is_err());
        assert!(titan(&json!({"inputText": "x", "bogus": 1}), true).is_err());
        assert!(titan(&json!({"inputText": ""}), true).is_err());
        let (body, _, _) = titan(&json!({"inputText": "hello", "dimensions": 256}), true).unwrap();
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["embedding"].as_array().map(Vec::len), Some(256));
        assert_eq!(parsed["inputTextTokenCount"], 2);
        assert!(parsed.get("embeddingsByType").is_none());
        let (body, _, _) = titan(
            &json!({"inputText": "hello world", "embeddingTypes": ["float", "binary"]}),
            true,
        )
        .unwrap();
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["embeddingsByType"]["float"], parsed["embedding"]);
        assert_eq!(
            parsed["embeddingsByType"]["binary"]
                .as_array()
                .map(Vec::len),
            Some(1024)
        );
    }

    /// Each value is written as the shortest decimal of its `f32`, as Bedrock does: 1/√3 is
    /// 0.57735026, not the 0.5773502588272095 its widening to `f64` would print.
    #[test]
    fn titan_writes_each_value_as_its_shortest_f32_decimal() {
        let (body, _, _) = titan(&json!({"inputText": "a b c", "dimensions": 256}), true).unwrap();
        let parsed: Value = serde_json::from_str(&body).unwrap();
        let values = parsed["embedding"].as_array().unwrap();
        let nonzero: Vec<&Value> = values.iter().filter(|v| v.as_f64() != Some(0.0)).collect();
        assert!(!nonzero.is_empty());
        for value in nonzero {
            let written = value.to_string();
            let as_f32 = value.as_f64().unwrap() as f32;
            assert_eq!(written, format!("{as_f32:?}"), "in {body}");
        }
    }

    #[test]
    fn cohere_answers_floats_or_by_type() {
        let (body, texts, _) =
            cohere(&json!({"texts": ["a", "b"], "input_type": "search_document"})).unwrap();
        assert_eq!(texts, 2);
        assert_eq!(body["response_type"], "embeddings_floats");
        assert_eq!(body["embeddings"].as_array().map(Vec::len), Some(2));
        let (body, _, _) = cohere(&json!({
            "texts": ["a"], "input_type": "search_query", "embedding_types": ["float", "int8"]
        }))
        .unwrap();
        assert_eq!(body["response_type"], "embeddings_by_type");
        assert_eq!(
            body["embeddings"]["int8"][0].as_array().map(Vec::len),
            Some(1024)
        );
        let too_many: Vec<String> = (0..97).map(|i| i.to_string()).collect();
        assert!(cohere(&json!({"texts": too_many, "input_type": "search_document"})).is_err());
    }

    /// 2026-11-27T04:05:12Z as Unix seconds.
    const EPOCH_2026_11_27_040512: u64 = 1_795_752_312;

    #[test]
    fn amz_dates_parse_to_the_right_instant() {
        let t = sigv4::parse_time("20261127T040512Z").unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, EPOCH_2026_11_27_040512);
        assert!(sigv4::parse_time("2026-11-27").is_err());
    }

    #[test]
    fn authorization_headers_are_parsed() {
        let parsed = sigv4::parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AKID/20261127/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=00ff",
        )
        .unwrap();
        assert_eq!(parsed.access_key, "AKID");
        assert_eq!(parsed.region, "us-east-1");
        assert_eq!(parsed.service, "bedrock");
        assert_eq!(parsed.signed_headers, ["host", "x-amz-date"]);
        assert_eq!(parsed.signature, "00ff");
        assert!(sigv4::parse_authorization("Bearer x").is_err());
    }
}
