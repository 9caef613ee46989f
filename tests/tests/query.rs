//! The query side: `vectorpipe-worker serve` answers `POST /v1/search` over the index a
//! pipeline filled, with the pipeline's model (the fake Bedrock), on the harness OpenSearch.
//!
//! The fake Bedrock's vectors are feature hashes of the words (texts that share words are near),
//! so these tests check what the server does with vectors (the k-NN query, its filters, the
//! fusion with full-text scores), not how well a real model understands a question.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::FakeBedrock;
use vectorpipe_tests::worker::{Worker, metric_sum};
use vectorpipe_tests::{eventually, kafka, opensearch as os, unique_name};

const TOPICS: [(&str, &str); 3] = [
    (
        "kafka",
        "kafka consumer group partitions offsets rebalance broker",
    ),
    (
        "opensearch",
        "opensearch index shards replicas mapping cluster",
    ),
    (
        "bedrock",
        "bedrock model embeddings tokens throttling region",
    ),
];

/// The record of post `n`: its topic's words in a different order per post, a topic field, a
/// number of likes and a creation day in January 2026 (post n on day n % 28 + 1).
fn post(n: usize) -> Value {
    let (topic, words) = TOPICS[n % TOPICS.len()];
    let mut words: Vec<&str> = words.split(' ').collect();
    let turn = n % words.len();
    words.rotate_left(turn);
    let mut text = format!("post {n} about {}", words.join(" "));
    if n == 7 {
        // One post of another topic carries a rare word: only full-text search weighs it.
        text.push_str(" zephyrine");
    }
    json!({
        "id": format!("post-{n}"),
        "text": text,
        "topic": topic,
        "likes": n,
        "at": format!("2026-01-{:02}T12:00:00Z", n % 28 + 1),
    })
}

struct Served {
    server: Worker,
    fake: FakeBedrock,
    url: String,
    dir: std::path::PathBuf,
}

impl Served {
    async fn search(&self, body: Value) -> Result<(u16, Value)> {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/search", self.url))
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await?))
    }

    async fn hits(&self, body: Value) -> Result<Vec<Value>> {
        let (status, answer) = self.search(body.clone()).await?;
        ensure!(status == 200, "{body} answered {status}: {answer}");
        Ok(answer["hits"].as_array().cloned().unwrap_or_default())
    }
}

/// Indexes 60 posts with the pipeline's worker (with the model of `embedding`), stops it, and
/// starts the query server.
async fn indexed_and_served(name: &str, embedding: Value) -> Result<Served> {
    indexed_and_served_with(name, embedding, &[]).await
}

/// Like [`indexed_and_served`], with environment variables for the query server.
async fn indexed_and_served_with(
    name: &str,
    embedding: Value,
    env: &[(&str, &str)],
) -> Result<Served> {
    let topic = unique_name(name);
    kafka::create_topic(&topic, 3).await?;
    let (fake, address) = FakeBedrock::start().await?;
    let mut embedding = embedding;
    embedding["region"] = json!("eu-west-1");
    embedding["endpointUrl"] = json!(format!("http://{address}"));
    let dir = std::env::temp_dir().join(&topic);
    std::fs::create_dir_all(&dir)?;
    let index = topic.to_lowercase();
    let pipeline = dir.join("pipeline.yaml");
    let spec = json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "source": {"kafka": {
                "bootstrapServers": [kafka::bootstrap()?],
                "topics": [topic],
                "groupId": format!("{topic}-group"),
            }},
            "transform": {
                "idPointer": "/id",
                "textPointers": ["/text"],
                "timestampPointer": "/at",
                "metadata": {"topic": "/topic", "likes": "/likes"},
            },
            "embedding": {"bedrock": embedding},
            "sink": {"opensearch": {
                "endpoints": [os::url()?],
                "index": index,
                "method": {"engine": "lucene"},
                "indexSettings": {"shards": 1, "replicas": 0, "refreshInterval": "1s"},
                "bulk": {"flushInterval": "200ms"},
            }},
        }
    });
    std::fs::write(&pipeline, serde_yaml::to_string(&spec)?)?;
    let producer: FutureProducer = kafka::config()?.set("linger.ms", "5").create()?;
    for n in 0..60 {
        let record = post(n).to_string();
        let key = format!("post-{n}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&record),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let worker = Worker::start(&pipeline, &dir.join("worker.log"))?;
    eventually("60 posts indexed", Duration::from_secs(90), || async {
        Ok((os::count(&index).await? == 60).then_some(()))
    })
    .await?;
    worker.stop()?;

    let server = Worker::serve(&pipeline, &dir.join("serve.log"), env)?;
    let url = format!("http://{}", server.metrics);
    eventually(
        "the query server ready",
        Duration::from_secs(60),
        || async {
            Ok(reqwest::get(format!("{url}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
                .then_some(()))
        },
    )
    .await
    .with_context(|| std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default())?;
    Ok(Served {
        server,
        fake,
        url,
        dir,
    })
}

fn field<'a>(hits: &'a [Value], name: &str) -> Vec<&'a Value> {
    hits.iter().map(|h| &h["metadata"][name]).collect()
}

fn ids(hits: &[Value]) -> Vec<String> {
    hits.iter()
        .filter_map(|h| h["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn search_finds_the_posts_of_the_question_and_its_filters_really_filter() -> Result<()> {
    let served = indexed_and_served(
        "query-search",
        json!({"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256}),
    )
    .await?;

    // Vector search: the posts of the question's topic come first.
    let question = "how does a consumer group rebalance its partitions";
    let hits = served.hits(json!({"query": question, "k": 10})).await?;
    ensure!(hits.len() == 10, "{hits:?}");
    ensure!(
        field(&hits, "topic").iter().all(|t| *t == "kafka"),
        "not all hits are kafka posts: {:?}",
        field(&hits, "topic")
    );
    ensure!(
        hits.windows(2)
            .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()),
        "hits are not ordered by score"
    );
    let first = &hits[0];
    ensure!(
        first["parentId"].is_string() && first["text"].is_string(),
        "{first}"
    );
    ensure!(
        first["metadata"].get("embedding").is_none(),
        "the vector is returned: {first}"
    );

    // A term filter really filters: the same question, restricted to another topic, answers
    // only posts of that topic, and all 20 of them when k allows.
    let filtered = served
        .hits(json!({"query": question, "k": 50, "filter": {"term": {"topic": "bedrock"}}}))
        .await?;
    ensure!(
        filtered.len() == 20 && field(&filtered, "topic").iter().all(|t| *t == "bedrock"),
        "the topic filter let through {:?}",
        field(&filtered, "topic")
    );
    // A list of values: either topic.
    let either = served
        .hits(json!({"query": question, "k": 50,
            "filter": {"term": {"topic": ["bedrock", "opensearch"]}}}))
        .await?;
    ensure!(either.len() == 40, "{} hits for two topics", either.len());

    // A range on @timestamp and one on a number, together with a term.
    let recent = served
        .hits(json!({"query": question, "k": 50, "filter": {
            "term": {"topic": "kafka"},
            "range": {"@timestamp": {"gte": "2026-01-20T00:00:00Z"}, "likes": {"lt": 40}}}}))
        .await?;
    // Kafka posts are n % 3 == 0; day n % 28 + 1 >= 20 and n < 40: n in {21, 24, 27}.
    let mut got = ids(&recent);
    got.sort();
    ensure!(
        got == ["post-21", "post-24", "post-27"],
        "range filters gave {got:?}"
    );

    // Wrong requests say what to fix.
    let (status, answer) = served.search(json!({"query": question, "k": 500})).await?;
    ensure!(
        status == 400 && answer["error"].as_str().unwrap_or("").contains("1 to 200"),
        "{status} {answer}"
    );
    let (status, answer) = served
        .search(json!({"query": question, "filter": {"term": {"topik": "kafka"}}}))
        .await?;
    let error = answer["error"].as_str().unwrap_or("");
    ensure!(
        status == 400 && error.contains("topik") && error.contains("topic"),
        "{status} {answer}"
    );
    let (status, _) = served.search(json!({"question": question})).await?;
    ensure!(status == 400, "an unknown body field answered {status}");

    let page = reqwest::get(format!("{}/metrics", served.url))
        .await?
        .text()
        .await?;
    let ok = page
        .lines()
        .filter(|l| {
            l.starts_with("vectorpipe_worker_query_requests_total{")
                && l.contains(r#"outcome="ok""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    ensure!(ok >= 4.0, "ok searches counted: {ok}\n{page}");
    ensure!(
        metric_sum(&page, "vectorpipe_worker_query_duration_seconds_count") >= 7.0,
        "{page}"
    );
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_search_weighs_a_rare_keyword_that_vector_search_misses() -> Result<()> {
    // Cohere: documents are embedded as search_document, questions as search_query (three of
    // the searches below embed one).
    let served = indexed_and_served(
        "query-hybrid",
        json!({"modelId": "cohere.embed-english-v3"}),
    )
    .await?;
    // Two kafka words and a rare word that only post-7 (an opensearch post: 7 % 3 = 1) carries.
    // The vectors favour the kafka posts (two shared words against one); full-text scoring
    // weighs the rare word above two common ones.
    let question = "zephyrine kafka consumer";
    let vector = ids(&served.hits(json!({"query": question, "k": 5})).await?);
    let lexical = ids(&served
        .hits(json!({"query": question, "k": 5, "mode": "lexical"}))
        .await?);
    let hybrid = served
        .hits(json!({"query": question, "k": 5, "mode": "hybrid", "weight": 0.3}))
        .await?;
    let hybrid_ids = ids(&hybrid);
    ensure!(
        !vector.contains(&"post-7".to_owned()),
        "vector search already ranks the rare word's post: {vector:?}"
    );
    ensure!(
        lexical.first().map(String::as_str) == Some("post-7"),
        "full-text search does not rank the rare word first: {lexical:?}"
    );
    ensure!(
        hybrid_ids.first().map(String::as_str) == Some("post-7") && hybrid_ids != vector,
        "hybrid {hybrid_ids:?} is vector-only {vector:?}"
    );
    ensure!(
        hybrid
            .iter()
            .all(|h| (0.0..=1.0).contains(&h["score"].as_f64().unwrap_or(-1.0))),
        "fused scores outside 0..1: {hybrid:?}"
    );
    // Weight 1 is vector-only, in the same order.
    let all_vector = ids(&served
        .hits(json!({"query": question, "k": 5, "mode": "hybrid", "weight": 1.0}))
        .await?);
    ensure!(all_vector == vector, "{all_vector:?} vs {vector:?}");
    let stats = served.fake.stats();
    let types = &stats.models["cohere.embed-english-v3"].input_types;
    ensure!(
        types.get("search_document").is_some_and(|n| *n >= 60)
            && types.get("search_query").is_some_and(|n| *n >= 3),
        "Cohere input types: {types:?}"
    );
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ask_answers_from_the_retrieved_posts_and_cites_only_them() -> Result<()> {
    let served = indexed_and_served(
        "query-ask",
        json!({"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256}),
    )
    .await?;
    let ask = |body: Value| {
        let url = format!("{}/v1/ask", served.url);
        async move {
            let response = reqwest::Client::new().post(url).json(&body).send().await?;
            let status = response.status().as_u16();
            anyhow::Ok((status, response.json::<Value>().await?))
        }
    };

    // An answer that cites retrieved posts, by their numbers in the prompt.
    let (status, answer) =
        ask(json!({"question": "how does a consumer group rebalance its partitions?", "k": 5}))
            .await?;
    ensure!(status == 200, "{status} {answer}");
    ensure!(answer["found"] == true, "{answer}");
    let sources = ids(answer["sources"].as_array().context("no sources")?);
    ensure!(sources.len() == 5, "{sources:?}");
    let citations = answer["citations"].as_array().context("no citations")?;
    ensure!(!citations.is_empty(), "no citation: {answer}");
    for citation in citations {
        let n = citation["n"].as_u64().context("no n")? as usize;
        let id = citation["id"].as_str().context("no id")?;
        ensure!(
            sources.get(n - 1).map(String::as_str) == Some(id),
            "citation [{n}] {id} is not source {n} of {sources:?}"
        );
        ensure!(
            answer["answer"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("[{n}]")),
            "the answer does not cite [{n}]: {answer}"
        );
        ensure!(citation["metadata"]["topic"] == "kafka", "{citation}");
    }
    ensure!(
        answer["usage"]["inputTokens"].as_u64() > Some(20)
            && answer["usage"]["outputTokens"].as_u64() > Some(0),
        "{answer}"
    );
    ensure!(
        answer["model"] == "anthropic.claude-3-haiku-20240307-v1:0",
        "{answer}"
    );

    // Nothing retrieved (a filter no post matches): a clear "not found", and no model call.
    let calls = served
        .fake
        .stats()
        .models
        .get("anthropic.claude-3-haiku-20240307-v1:0")
        .map_or(0, |m| m.succeeded);
    let (status, answer) = ask(json!({"question": "consumer groups",
        "filter": {"term": {"topic": "gardening"}}}))
    .await?;
    ensure!(
        status == 200 && answer["found"] == false,
        "{status} {answer}"
    );
    ensure!(
        answer["answer"]
            .as_str()
            .unwrap_or("")
            .contains("Not found in the indexed records"),
        "{answer}"
    );
    ensure!(
        answer["citations"].as_array().is_some_and(Vec::is_empty),
        "{answer}"
    );
    let after = served
        .fake
        .stats()
        .models
        .get("anthropic.claude-3-haiku-20240307-v1:0")
        .map_or(0, |m| m.succeeded);
    ensure!(after == calls, "the model was asked with no source");

    // Retrieved posts that do not answer the question: the model says so, and so does the answer.
    let (status, answer) =
        ask(json!({"question": "will it rain tomorrow in the mountains?", "k": 3})).await?;
    ensure!(
        status == 200 && answer["found"] == false,
        "{status} {answer}"
    );
    ensure!(
        answer["answer"]
            .as_str()
            .unwrap_or("")
            .contains("do not answer it")
            && answer["sources"].as_array().is_some_and(|s| s.len() == 3),
        "{answer}"
    );

    // The tokens are in /metrics.
    let page = reqwest::get(format!("{}/metrics", served.url))
        .await?
        .text()
        .await?;
    ensure!(
        metric_sum(&page, "vectorpipe_worker_query_llm_tokens_total") > 20.0,
        "{page}"
    );
    let (status, answer) = ask(json!({"query": "wrong field"})).await?;
    ensure!(
        status == 400 && answer["error"].as_str().unwrap_or("").contains("question"),
        "{status} {answer}"
    );
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}

/// Renders `url` in headless Chromium (Debian's `chromium`) once its scripts are done: the DOM,
/// and a screenshot at `screenshot`.
fn render(url: &str, screenshot: &std::path::Path) -> Result<String> {
    let chromium = which_chromium()?;
    let profile = tempfile::tempdir()?;
    let run = |extra: &[&str]| -> Result<String> {
        let out = std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1200,1400",
                // Virtual time waits for the page's requests to the server, then runs on.
                "--virtual-time-budget=20000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .output()
            .context("running chromium")?;
        ensure!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let dom = run(&["--dump-dom"])?;
    run(&[&format!("--screenshot={}", screenshot.display())])?;
    Ok(dom)
}

fn which_chromium() -> Result<std::path::PathBuf> {
    let path = std::path::PathBuf::from("/usr/bin/chromium");
    ensure!(
        path.exists(),
        "the page test needs Debian's chromium: apt-get install -y chromium (tests/run-all.sh installs it)"
    );
    Ok(path)
}

/// Where screenshots go: the harness's log directory, kept after the run ($VP_RUN.logs).
fn artifact(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::var("VP_RUN")
        .map(|run| std::path::PathBuf::from(run).join("log/artifacts"))
        .unwrap_or_else(|_| std::env::temp_dir().join("vectorpipe-artifacts"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_the_answer_with_its_cited_sources_in_a_browser() -> Result<()> {
    let served = indexed_and_served(
        "query-page",
        json!({"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256}),
    )
    .await?;
    // One file, nothing from elsewhere.
    let response = reqwest::get(format!("{}/", served.url)).await?;
    ensure!(
        response
            .headers()
            .get("content-security-policy")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("default-src 'self'")),
        "no content security policy"
    );
    let html = response.text().await?;
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        ensure!(!html.contains(external), "the page loads {external}…");
    }

    // A shared link runs its question: the answer, its citations marked among the sources.
    let shot = artifact("query-page-answer.png")?;
    let dom = render(
        &format!(
            "{}/?q=how+does+a+consumer+group+rebalance+its+partitions&k=5",
            served.url
        ),
        &shot,
    )?;
    ensure!(
        dom.contains(r#"data-state="done""#),
        "the page did not finish:\n{dom}"
    );
    ensure!(dom.contains("From the records:"), "no answer shown:\n{dom}");
    let cited = dom.matches(r#"<li class="cited""#).count();
    let sources = dom.matches("<li ").count();
    ensure!(
        sources == 5 && (1..=3).contains(&cited),
        "{sources} sources, {cited} cited:\n{dom}"
    );
    ensure!(dom.contains("topic: kafka"), "no metadata shown:\n{dom}");
    ensure!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        shot.display()
    );

    // Search only, with a filter: the hits of that topic alone, and no answer.
    let shot = artifact("query-page-search.png")?;
    let dom = render(
        &format!(
            "{}/?q=consumer+group+partitions&mode=search&k=6&field=topic&value=bedrock",
            served.url
        ),
        &shot,
    )?;
    ensure!(
        dom.contains(r#"data-state="done""#),
        "the page did not finish:\n{dom}"
    );
    ensure!(
        dom.matches("<li ").count() == 6 && dom.matches("topic: bedrock").count() == 6,
        "the filter did not hold in the page:\n{dom}"
    );
    ensure!(
        !dom.contains("From the records:"),
        "search-only asked the model"
    );
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_the_api_wants_it_and_the_page_and_probes_do_not() -> Result<()> {
    let served = indexed_and_served_with(
        "query-token",
        json!({"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256}),
        &[("VECTORPIPE_QUERY_TOKEN", "tok-3f9a")],
    )
    .await?;
    let client = reqwest::Client::new();
    let search = |token: Option<&'static str>| {
        let mut request = client
            .post(format!("{}/v1/search", served.url))
            .json(&json!({"query": "consumer group", "k": 3}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let refused = search(None).await?;
    ensure!(refused.status() == 401, "no token: {}", refused.status());
    let body: Value = refused.json().await?;
    ensure!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("Authorization: Bearer"),
        "{body}"
    );
    ensure!(
        search(Some("tok-3f9")).await?.status() == 401,
        "a wrong token was let in"
    );
    let allowed = search(Some("tok-3f9a")).await?;
    ensure!(
        allowed.status() == 200,
        "the right token: {}",
        allowed.status()
    );
    let info = client
        .get(format!("{}/v1/info", served.url))
        .send()
        .await?
        .status();
    ensure!(info == 401, "/v1/info without a token: {info}");
    for open in ["/", "/readyz", "/healthz", "/metrics"] {
        let status = reqwest::get(format!("{}{open}", served.url))
            .await?
            .status();
        ensure!(status == 200, "{open} answered {status}");
    }
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}

/// `vectorpipe-worker search --pipeline` and `ask`: the same retrieval and answers from the
/// command line, against the cluster pipeline's index.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_searches_and_asks_a_cluster_pipelines_index() -> Result<()> {
    let served = indexed_and_served(
        "query-cli",
        json!({"modelId": "amazon.titan-embed-text-v2:0", "dimensions": 256}),
    )
    .await?;
    let pipeline = served.dir.join("pipeline.yaml");
    let cli = |args: &[&str]| -> Result<Value> {
        let out =
            std::process::Command::new(vectorpipe_tests::worker::binary("vectorpipe-worker")?)
                .args(args)
                .arg("--pipeline")
                .arg(&pipeline)
                .env(
                    "AWS_ACCESS_KEY_ID",
                    vectorpipe_tests::bedrock::ACCESS_KEY_ID,
                )
                .env(
                    "AWS_SECRET_ACCESS_KEY",
                    vectorpipe_tests::bedrock::SECRET_ACCESS_KEY,
                )
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .output()?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let hits = cli(&[
        "search",
        "consumer group partitions",
        "-k",
        "4",
        "--term",
        "topic=bedrock",
        "--json",
    ])?;
    let hits = hits.as_array().context("not a list of hits")?;
    ensure!(
        hits.len() == 4 && hits.iter().all(|h| h["metadata"]["topic"] == "bedrock"),
        "{hits:?}"
    );
    let answer = cli(&[
        "ask",
        "how does a consumer group rebalance its partitions?",
        "-k",
        "4",
        "--json",
    ])?;
    ensure!(answer["found"] == true, "{answer}");
    let sources = ids(answer["sources"].as_array().context("no sources")?);
    let cited = answer["citations"].as_array().context("no citations")?;
    ensure!(
        !cited.is_empty()
            && cited
                .iter()
                .all(|c| sources.contains(&c["id"].as_str().unwrap_or("").to_owned())),
        "{answer}"
    );
    drop(served.server);
    let _ = std::fs::remove_dir_all(&served.dir);
    Ok(())
}
