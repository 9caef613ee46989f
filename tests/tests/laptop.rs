//! The laptop mode end to end: `vectorpipe-worker local` indexes the sample posts with the real
//! local model (all-MiniLM-L6-v2, installed by tests/run-all.sh) into the embedded store, and
//! `vectorpipe-worker search` finds posts about what a question is about.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use vectorpipe_tests::worker::binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// Runs the worker with `args`; fails with its stderr when it fails.
fn worker(args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
    let mut child = Command::new(binary("vectorpipe-worker")?)
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().context("stdin")?.write_all(input)?;
    }
    drop(child.stdin.take());
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "vectorpipe-worker {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Runs `local` into `store` on the sample posts (`stdin` None) or on `stdin`; its JSON summary.
fn ingest(store: &str, stdin: Option<&[u8]>) -> Result<Value> {
    let mut args = vec!["local", "--store", store, "--json"];
    if stdin.is_none() {
        args.extend(["--input", "examples/laptop/posts.jsonl"]);
    }
    let output = worker(&args, stdin)?;
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "not a JSON summary: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn search(store: &str, query: &str, k: usize) -> Result<Vec<Value>> {
    let output = worker(
        &[
            "search",
            query,
            "-k",
            &k.to_string(),
            "--store",
            store,
            "--json",
        ],
        None,
    )?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn indexing_shows_its_progress_as_plain_lines_off_a_terminal_and_as_a_bar_on_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("plain");
    let output = worker(
        &[
            "local",
            "--store",
            store.to_str().context("path")?,
            "--input",
            "examples/laptop/posts.jsonl",
        ],
        None,
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("indexing: 300/300 records (100 %)") && stderr.contains("records/s"),
        "{stderr}"
    );
    // From stdin the total is unknown: a count and a rate.
    let posts = std::fs::read_to_string(repo().join("examples/laptop/posts.jsonl"))?;
    let ten: String = posts.lines().take(10).map(|l| format!("{l}\n")).collect();
    let piped = dir.path().join("piped");
    let output = worker(
        &["local", "--store", piped.to_str().context("path")?],
        Some(ten.as_bytes()),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr
            .lines()
            .any(|l| l.starts_with("indexing: 10 records, ")),
        "{stderr}"
    );
    // On a terminal (a pseudo-terminal from script(1)): the bar, with the rate and time left.
    let terminal = dir.path().join("terminal");
    let command = format!(
        "{} local --store {} --input examples/laptop/posts.jsonl",
        binary("vectorpipe-worker")?.display(),
        terminal.display()
    );
    let output = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .context("script(1), from util-linux")?;
    let screen = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "{screen}");
    ensure!(
        screen.contains("/300 records")
            && screen.contains(" left")
            && !screen.contains("indexing: 300/300"),
        "the bar, not plain lines: {screen}"
    );
    Ok(())
}

#[test]
fn the_sample_posts_are_indexed_and_questions_find_posts_on_their_topic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store = store.to_str().context("path")?;
    let first = ingest(store, None)?;
    assert_eq!(first["records"], 300, "{first}");
    assert_eq!(first["indexed"], 300, "{first}");
    assert_eq!(first["stored"], 300, "{first}");
    assert_eq!(first["dead_lettered"], 0, "{first}");

    // Questions in other words than the posts: the three nearest posts share the topic.
    for (question, topic) in [
        ("bread dough that stays heavy and does not rise", "baking"),
        ("rebalancing partitions between consumers", "kafka"),
        ("looking at planets through a telescope", "astronomy"),
        ("my young dog destroys the sofa", "dogs"),
        ("saving money and paying off debt", "finance"),
        ("sore feet and blisters on a mountain trail", "hiking"),
        ("grinding beans for a better espresso", "coffee"),
        ("fixing the gears on my bicycle", "cycling"),
    ] {
        let hits = search(store, question, 3)?;
        ensure!(hits.len() == 3, "{question}: {hits:?}");
        let topics: Vec<&str> = hits
            .iter()
            .map(|h| h["metadata"]["topic"].as_str().unwrap_or_default())
            .collect();
        ensure!(
            topics.iter().all(|t| *t == topic),
            "{question:?} should find {topic} posts, found {topics:?}: {hits:#?}"
        );
        let scores: Vec<f64> = hits.iter().filter_map(|h| h["score"].as_f64()).collect();
        ensure!(
            scores.windows(2).all(|w| w[0] >= w[1]) && scores[0] > 0.3,
            "{question}: scores {scores:?}"
        );
    }

    // Running again embeds nothing: every document is stored with the same content.
    let again = ingest(store, None)?;
    assert_eq!(again["indexed"], 0, "{again}");
    assert_eq!(again["unchanged"], 300, "{again}");
    assert_eq!(again["stored"], 300, "{again}");
    Ok(())
}

#[test]
fn bad_lines_go_to_the_dead_letter_file_and_good_ones_around_them_are_indexed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store_arg = store.to_str().context("path")?;
    let long_text = "The harbour crane lifts containers all night long. ".repeat(60);
    let mut input = Vec::new();
    input.extend_from_slice(br#"{"id": "good-1", "topic": "t", "title": "x", "author": "a", "created": "2026-01-01T00:00:00Z", "text": "Ships unload containers at the harbour."}"#);
    input.extend_from_slice(b"\n{not json\n");
    input.extend_from_slice(b"{\"id\": \"latin1\", \"text\": \"caf\xe9\"}\n");
    input.extend_from_slice(br#"{"id": "no-text", "topic": "t", "title": "x", "author": "a", "created": "2026-01-01T00:00:00Z"}"#);
    input.extend_from_slice(b"\n[1, 2, 3]\n\n");
    input.extend_from_slice(
        serde_json::json!({"id": "long", "topic": "t", "title": "x", "author": "a",
            "created": "2026-01-01T00:00:00Z", "text": long_text})
        .to_string()
        .as_bytes(),
    );
    input.extend_from_slice(b"\n");
    input.extend_from_slice(br#"{"id": "good-2", "topic": "t", "title": "x", "author": "a", "created": "2026-01-01T00:00:00Z", "text": "Cranes at the port work through the night."}"#);
    input.push(b'\n');

    let run = ingest(store_arg, Some(&input))?;
    assert_eq!(run["records"], 7, "blank lines are not records: {run}");
    assert_eq!(run["dead_lettered"], 4, "{run}");
    let chunks = run["stored"].as_u64().unwrap_or_default() - 2;
    assert!(
        chunks >= 3,
        "the long record is split into chunks of at most 800 characters: {run}"
    );

    let dead: Vec<Value> = std::fs::read_to_string(store.join("dead-letters.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // Dead letters are written concurrently: their order in the file is not the input's.
    let mut reasons: Vec<(u64, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap_or_default(),
                d["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            (2, "parse"),
            (3, "parse"),
            (4, "missing-field"),
            (5, "parse")
        ]
    );
    let line_2 = dead
        .iter()
        .find(|d| d["line"] == 2)
        .context("no dead letter for line 2")?;
    assert!(
        line_2["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid JSON"),
        "{dead:?}"
    );
    assert_eq!(line_2["record"], "{not json");

    let hits = search(store_arg, "containers in a port at night", 3)?;
    let ids: Vec<&str> = hits.iter().filter_map(|h| h["id"].as_str()).collect();
    assert!(
        ids.contains(&"good-1") && ids.contains(&"good-2"),
        "{ids:?}"
    );

    // The long record shrinks to one chunk: its left-over chunks are removed.
    let shrunk = serde_json::json!({"id": "long", "topic": "t", "title": "x", "author": "a",
        "created": "2026-01-01T00:00:00Z", "text": "A short text now."})
    .to_string();
    let run = ingest(store_arg, Some(shrunk.as_bytes()))?;
    assert_eq!(
        run["deleted"].as_u64(),
        Some(chunks),
        "every chunk id is gone: {run}"
    );
    assert_eq!(run["stored"], 3, "{run}");
    Ok(())
}

#[test]
fn texts_longer_than_the_model_reads_are_split_by_its_word_pieces_not_truncated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store_arg = store.to_str().context("path")?;
    // 700 characters (one chunk for the spec's 800-character chunking) of rare letter groups: far
    // more than the model's 256 word pieces.
    let dense: String = (0..175)
        .map(|i| format!("q{}x{} ", (b'a' + (i % 26) as u8) as char, i % 10))
        .collect();
    let record = serde_json::json!({"id": "dense", "topic": "t", "title": "x", "author": "a",
        "created": "2026-01-01T00:00:00Z", "text": dense.trim()})
    .to_string();
    let run = ingest(store_arg, Some(record.as_bytes()))?;
    let pieces = run["indexed"].as_u64().unwrap_or_default();
    assert!(
        pieces >= 2,
        "split into pieces the model reads whole: {run}"
    );
    assert_eq!(run["stored"].as_u64(), Some(pieces), "{run}");
    let hits = search(store_arg, "qax0 qbx1 qcx2", pieces as usize)?;
    let mut ids: Vec<&str> = hits.iter().filter_map(|h| h["id"].as_str()).collect();
    ids.sort();
    let expected: Vec<String> = (0..pieces).map(|n| format!("dense#{n}")).collect();
    assert_eq!(ids, expected, "{hits:?}");
    let text: String = hits
        .iter()
        .filter_map(|h| h["text"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains("qax0") && text.contains(&dense.trim()[dense.trim().len() - 6..]),
        "the first and the last words are indexed"
    );
    Ok(())
}

#[test]
fn a_record_updated_later_in_the_same_input_leaves_nothing_of_its_earlier_version() -> Result<()> {
    // The laptop mode runs the cluster's stages: the older version of an id is superseded (or
    // written first and then cleaned up), never written after the newer one's clean-up.
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store_arg = store.to_str().context("path")?;
    let post = |text: &str| {
        serde_json::json!({"id": "x", "topic": "t", "title": "x", "author": "a",
            "created": "2026-01-01T00:00:00Z", "text": text})
        .to_string()
    };
    let long = "Tugboats push the freighter into its berth at dawn. ".repeat(60);
    let input = format!(
        "{}\n{}\n",
        post(&long),
        post("The freighter is berthed now.")
    );
    let run = ingest(store_arg, Some(input.as_bytes()))?;
    assert_eq!(run["records"], 2, "{run}");
    assert_eq!(
        run["stored"], 1,
        "only the newer version's one document: {run}"
    );
    let hits = search(store_arg, "tugboats and a freighter", 5)?;
    let found: Vec<(&str, &str)> = hits
        .iter()
        .filter_map(|h| Some((h["id"].as_str()?, h["text"].as_str()?)))
        .collect();
    assert_eq!(found, [("x", "The freighter is berthed now.")]);
    Ok(())
}

#[test]
fn two_runs_on_one_store_take_turns_and_every_document_stays_searchable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store_arg = store.to_str().context("path")?;
    let posts = std::fs::read_to_string(repo().join("examples/laptop/posts.jsonl"))?;
    let lines: Vec<&str> = posts.lines().filter(|l| !l.trim().is_empty()).collect();
    let (first, second) = lines.split_at(lines.len() / 2);
    let inputs = [(1, first), (2, second)].map(|(n, half)| {
        let path = dir.path().join(format!("half-{n}.jsonl"));
        std::fs::write(&path, half.join("\n") + "\n").map(|()| path)
    });
    let mut runs = Vec::new();
    for input in &inputs {
        let input = input.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        runs.push(
            Command::new(binary("vectorpipe-worker")?)
                .args(["local", "--store", store_arg, "--json", "--input"])
                .arg(input)
                .current_dir(repo())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
    }
    let mut stderr = String::new();
    for run in runs {
        let output = run.wait_with_output()?;
        stderr.push_str(&String::from_utf8_lossy(&output.stderr));
        ensure!(output.status.success(), "a run failed: {stderr}");
    }
    // Documents of both runs are in the graph that search uses.
    for line in first.iter().take(3).chain(second.iter().take(3)) {
        let post: Value = serde_json::from_str(line)?;
        let hits = search(store_arg, post["text"].as_str().context("text")?, 1)?;
        assert_eq!(hits[0]["id"], post["id"], "{line}: {hits:?}");
    }
    let again = ingest(store_arg, Some(b""))?;
    assert_eq!(again["stored"], lines.len(), "{again}");
    ensure!(
        stderr.contains("is writing to the store"),
        "the second run says that it waits for the first: {stderr}"
    );
    Ok(())
}

/// `vectorpipe-worker serve` over a laptop store; killed when dropped.
struct LaptopServer {
    child: std::process::Child,
    url: String,
    log: PathBuf,
}

impl Drop for LaptopServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LaptopServer {
    /// Serves `store` with no AWS configuration but `env`, and waits until it is ready.
    async fn start(store: &str, log: PathBuf, env: &[(&str, String)]) -> Result<Self> {
        let mut command = Command::new(binary("vectorpipe-worker")?);
        command
            .args(["serve", "--store", store, "--address", "127.0.0.1:0"])
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        // Nothing of the machine's AWS setup, and no instance metadata lookups.
        for name in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ] {
            command.env_remove(name);
        }
        command
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent/vectorpipe")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/vectorpipe");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut server = Self {
            child: command.spawn()?,
            url: String::new(),
            log,
        };
        // The server picks its port and says where it listens.
        for _ in 0..240 {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find(|l| l.starts_with("serving the store"))
                .and_then(|l| l.split(" at ").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
            {
                server.url = url.trim_end_matches('/').to_owned();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        ensure!(
            !server.url.is_empty(),
            "the laptop query server did not say where it listens: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        let client = reqwest::Client::new();
        for _ in 0..240 {
            if let Ok(r) = client.get(format!("{}/readyz", server.url)).send().await
                && r.status() == 200
            {
                return Ok(server);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        bail!(
            "the laptop query server was not ready in 60 s: {}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        )
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let answer: Value = response.json().await?;
        ensure!(status == 200, "{path} {body} answered {status}: {answer}");
        Ok(answer)
    }

    async fn hits(&self, body: Value) -> Result<Vec<Value>> {
        Ok(self.post("/v1/search", body).await?["hits"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

fn ids(hits: &[Value]) -> Vec<&str> {
    hits.iter().filter_map(|h| h["id"].as_str()).collect()
}

/// The sample posts as JSON.
fn posts() -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(repo().join("examples/laptop/posts.jsonl"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_laptop_query_server_finds_by_meaning_filters_exactly_and_sees_new_records()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store = store.to_str().context("path")?;
    ingest(store, None)?;
    let server = LaptopServer::start(store, dir.path().join("serve.log"), &[]).await?;

    // Questions worded unlike the posts find posts of their topic.
    for (question, topic) in [
        ("my loaf comes out flat and heavy", "baking"),
        (
            "members of a consumer group keep getting new partitions",
            "kafka",
        ),
        ("seeing the rings of Saturn at night", "astronomy"),
    ] {
        let hits = server.hits(json!({"query": question, "k": 3})).await?;
        let topics: Vec<&str> = hits
            .iter()
            .filter_map(|h| h["metadata"]["topic"].as_str())
            .collect();
        ensure!(
            topics == [topic; 3],
            "{question:?} should find {topic} posts: {hits:#?}"
        );
    }

    // A term filter keeps only its topic, even for a question about another one.
    let baking = server
        .hits(
            json!({"query": "rebalancing partitions between consumers", "k": 5,
            "filter": {"term": {"topic": "baking"}}}),
        )
        .await?;
    ensure!(baking.len() == 5, "{baking:#?}");
    ensure!(
        baking.iter().all(|h| h["metadata"]["topic"] == "baking"),
        "{baking:#?}"
    );

    // A time range returns exactly the posts inside it, none short, none outside.
    let since = "2026-11-01";
    let expected: std::collections::BTreeSet<String> = posts()?
        .iter()
        .filter(|p| p["created"].as_str().is_some_and(|c| c >= since))
        .filter_map(|p| p["id"].as_str().map(str::to_owned))
        .collect();
    ensure!(!expected.is_empty() && expected.len() < 300);
    let recent = server
        .hits(json!({"query": "anything at all", "k": 200,
            "filter": {"range": {"@timestamp": {"gte": since}}}}))
        .await?;
    let got: std::collections::BTreeSet<String> =
        ids(&recent).into_iter().map(str::to_owned).collect();
    assert_eq!(got, expected, "the posts since {since}");

    // Full text: every post with the words, and only those; hybrid weighs them in.
    let with_words = posts()?
        .iter()
        .filter(|p| {
            p["text"]
                .as_str()
                .is_some_and(|t| t.to_lowercase().contains("dutch oven"))
        })
        .count();
    ensure!(with_words == 5, "the sample has five posts on Dutch ovens");
    let has_words = |hits: &[Value]| {
        hits.iter()
            .filter(|h| {
                h["text"]
                    .as_str()
                    .is_some_and(|t| t.to_lowercase().contains("dutch oven"))
            })
            .count()
    };
    let lexical = server
        .hits(json!({"query": "Dutch oven", "k": 5, "mode": "lexical"}))
        .await?;
    assert_eq!(has_words(&lexical), 5, "{lexical:#?}");
    let vector = server.hits(json!({"query": "Dutch oven", "k": 5})).await?;
    let hybrid = server
        .hits(json!({"query": "Dutch oven", "k": 5, "mode": "hybrid"}))
        .await?;
    ensure!(
        has_words(&hybrid) > has_words(&vector),
        "hybrid should find more of the posts naming the words than vector search: hybrid {:?}, vector {:?}",
        ids(&hybrid),
        ids(&vector)
    );

    // Without AWS credentials, ask answers with the retrieved passages and says why.
    let question = "how do I get a mirror edge on a chisel";
    let asked = server
        .post("/v1/ask", json!({"question": question, "k": 3}))
        .await?;
    let searched = server.hits(json!({"query": question, "k": 3})).await?;
    ensure!(
        asked["retrievalOnly"]
            .as_str()
            .is_some_and(|why| why.contains("AWS_REGION")),
        "{asked:#}"
    );
    assert_eq!(asked["found"], false);
    assert_eq!(
        ids(asked["sources"].as_array().context("sources")?),
        ids(&searched)
    );

    // The command line takes the same filters and modes.
    let out = worker(
        &[
            "search",
            "dough",
            "--store",
            store,
            "--mode",
            "hybrid",
            "--term",
            "topic=baking",
            "--since",
            "2026-06-01",
            "-k",
            "10",
            "--json",
        ],
        None,
    )?;
    let hits: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    ensure!(!hits.is_empty(), "no hits");
    ensure!(
        hits.iter().all(|h| h["metadata"]["topic"] == "baking"
            && h["metadata"]["@timestamp"].as_str() >= Some("2026-06-01")),
        "{hits:#?}"
    );
    // Searching where no store is says so, and creates none.
    let nowhere = dir.path().join("no-store");
    let Err(e) = worker(
        &["search", "q", "--store", nowhere.to_str().context("path")?],
        None,
    ) else {
        bail!("a search without a store succeeded");
    };
    ensure!(e.to_string().contains("there is no store"), "{e}");
    ensure!(
        !nowhere.exists(),
        "the search created {}",
        nowhere.display()
    );

    // A record indexed while the server runs is found without a restart.
    let new = json!({"id": "post-9001", "author": "zoe", "topic": "gardening",
        "title": "Tomato seedlings", "created": "2026-12-01T10:00:00Z",
        "text": "My tomato seedlings on the windowsill grow tall, thin and pale."});
    ingest(store, Some(format!("{new}\n").as_bytes()))?;
    let hits = server
        .hits(json!({"query": "leggy tomato plants indoors", "k": 1}))
        .await?;
    assert_eq!(ids(&hits), ["post-9001"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_aws_credentials_the_laptop_asks_bedrock_and_cites_the_retrieved_posts() -> Result<()>
{
    use vectorpipe_tests::bedrock::{ACCESS_KEY_ID, FakeBedrock, SECRET_ACCESS_KEY};
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store = store.to_str().context("path")?;
    ingest(store, None)?;
    let (fake, address) = FakeBedrock::start().await?;
    let env = [
        ("AWS_REGION", "eu-west-1".to_owned()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
        (
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
            format!("http://{address}"),
        ),
    ];
    let server = LaptopServer::start(store, dir.path().join("serve.log"), &env).await?;
    let answer = server
        .post(
            "/v1/ask",
            json!({"question": "how do I sharpen chisels to a mirror edge", "k": 4}),
        )
        .await?;
    ensure!(answer["found"] == true, "{answer:#}");
    ensure!(answer.get("retrievalOnly").is_none(), "{answer:#}");
    let sources = ids(answer["sources"].as_array().context("sources")?);
    let cited = ids(answer["citations"].as_array().context("citations")?);
    ensure!(!cited.is_empty(), "{answer:#}");
    ensure!(
        cited.iter().all(|id| sources.contains(id)),
        "citations must be retrieved ids: {cited:?} of {sources:?}"
    );
    ensure!(
        answer["citations"]
            .as_array()
            .context("citations")?
            .iter()
            .all(|c| c["metadata"]["topic"] == "woodworking"),
        "{answer:#}"
    );
    ensure!(
        answer["usage"]["inputTokens"].as_u64() > Some(0),
        "{answer:#}"
    );
    assert_eq!(answer["model"], "anthropic.claude-3-haiku-20240307-v1:0");
    ensure!(fake.stats().calls >= 1, "the fake was asked");
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains("vectorpipe_worker_query_llm_tokens_total{kind=\"input\"}"),
        "{metrics}"
    );
    Ok(())
}
