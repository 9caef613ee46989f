//! The laptop mode end to end: `vectorpipe-worker local` indexes the sample posts with the real
//! local model (all-MiniLM-L6-v2, installed by tests/run-all.sh) into the embedded store, and
//! `vectorpipe-worker search` finds posts about what a question is about.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
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
