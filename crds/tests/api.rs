//! The API as users meet it: the generated CRDs on disk, the examples, and the CEL rules.

// Helpers outside #[test] functions fail loudly too; that is what a test wants.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};
use vectorpipe_crds::v1alpha1::{EmbeddingPipeline, ScalingPolicy};
use vectorpipe_crds::validate;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document under `examples/`, with the file it came from.
fn example_documents() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("examples"), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

fn schema_of<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .unwrap(),
    )
    .unwrap()
}

fn cel_errors<K: CustomResourceExt>(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema_of::<K>(), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn crd_yaml_on_disk_is_current() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The API's own copy and the Helm chart's copy.
    for dir in [here.to_path_buf(), here.join("../charts/vectorpipe/crds")] {
        for (name, want) in vectorpipe_crds::crd_yaml() {
            let path = dir.join(name);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale: run `cargo run -p vectorpipe-crds --features kube --bin crdgen` and commit the result",
                path.display()
            );
        }
    }
}

#[test]
fn crds_carry_scale_subresource_printer_columns_and_cel_rules() {
    let ep = EmbeddingPipeline::crd();
    let version = &ep.spec.versions[0];
    let scale = version
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.workers.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Ready",
            "Replicas",
            "Lag",
            "Fresh-P95",
            "Model",
            "Index",
            "Age"
        ]
    );
    assert_eq!(
        ep.spec.names.short_names,
        Some(vec!["vp".to_owned(), "vpipe".to_owned()])
    );
    let yaml = serde_yaml::to_string(&ep).unwrap();
    assert!(
        yaml.matches("x-kubernetes-validations").count() >= 6,
        "{yaml}"
    );
    let sp = ScalingPolicy::crd();
    assert_eq!(sp.spec.names.short_names, Some(vec!["sp".to_owned()]));
    assert!(
        serde_yaml::to_string(&sp)
            .unwrap()
            .contains("self.minReplicas <= self.maxReplicas")
    );
}

#[test]
fn every_example_parses_validates_and_passes_the_cel_rules() {
    let docs = example_documents();
    let mut pipelines = 0;
    let mut policies = 0;
    for (file, doc) in &docs {
        let file = file.display();
        match doc["kind"].as_str() {
            Some("EmbeddingPipeline") => {
                let ep: EmbeddingPipeline =
                    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                validate::pipeline(&ep.spec).unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(
                    cel_errors::<EmbeddingPipeline>(doc),
                    Vec::<String>::new(),
                    "{file}"
                );
                pipelines += 1;
            }
            Some("ScalingPolicy") => {
                let sp: ScalingPolicy =
                    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
                validate::scaling_policy(&sp.spec).unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(
                    cel_errors::<ScalingPolicy>(doc),
                    Vec::<String>::new(),
                    "{file}"
                );
                policies += 1;
            }
            _ => {}
        }
    }
    assert!(
        pipelines >= 3,
        "expected at least 3 example pipelines, found {pipelines}"
    );
    assert!(
        policies >= 3,
        "expected at least 3 example scaling policies, found {policies}"
    );
}

fn minimal_pipeline() -> Value {
    json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "EmbeddingPipeline",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {
            "source": {"kafka": {"bootstrapServers": ["k:9092"], "topics": ["in"]}},
            "embedding": {"bedrock": {"modelId": "amazon.titan-embed-text-v2:0"}},
            "sink": {"opensearch": {"endpoints": ["http://os:9200"], "index": "docs"}}
        }
    })
}

fn minimal_policy() -> Value {
    json!({
        "apiVersion": "vectorpipe.io/v1alpha1",
        "kind": "ScalingPolicy",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {
            "targetRef": {"name": "t"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [{"kafkaLag": {}, "scaleOutThreshold": 100}]
        }
    })
}

/// Sets `value` at a JSON pointer, creating objects on the way.
fn with(mut doc: Value, pointer: &str, value: Value) -> Value {
    let mut target = &mut doc;
    for part in pointer.trim_start_matches('/').split('/') {
        if target.get(part).is_none() {
            target[part] = json!({});
        }
        target = target.get_mut(part).unwrap();
    }
    *target = value;
    doc
}

#[test]
fn the_minimal_objects_are_valid() {
    assert_eq!(
        cel_errors::<EmbeddingPipeline>(&minimal_pipeline()),
        Vec::<String>::new()
    );
    assert_eq!(
        cel_errors::<ScalingPolicy>(&minimal_policy()),
        Vec::<String>::new()
    );
}

#[test]
fn cel_rules_refuse_bad_pipelines_with_a_message_that_says_what_to_fix() {
    let cases = [
        (
            "/spec/source/kafka/topicPattern",
            json!("in.*"),
            "exactly one of source.kafka.topics or source.kafka.topicPattern",
        ),
        (
            "/spec/source/kafka/auth",
            json!({"tls": {}, "mskIam": {"region": "eu-west-1"}}),
            "exactly one of tls, scram or mskIam",
        ),
        (
            "/spec/source/kafka/auth",
            json!({}),
            "exactly one of tls, scram or mskIam",
        ),
        (
            "/spec/source/kafka/consumerProperties",
            json!({"enable.auto.commit": "true"}),
            "may not set keys the worker manages",
        ),
        (
            "/spec/source/kafka/consumerProperties",
            json!({"ssl.key.password": "hunter2"}),
            "keys that carry secrets",
        ),
        (
            "/spec/source/kafka/consumerProperties",
            json!({"sasl.oauthbearer.client.secret": "s"}),
            "keys that carry secrets",
        ),
        (
            "/spec/embedding/bedrock/dimensions",
            json!(768),
            "256, 512 or 1024",
        ),
        (
            "/spec/embedding/bedrock/batchSize",
            json!(8),
            "only Cohere embed models",
        ),
        (
            "/spec/embedding/bedrock/inputType",
            json!("search_document"),
            "only to Cohere",
        ),
        (
            "/spec/chunking",
            json!({"maxChars": 100, "overlapChars": 100}),
            "overlapChars must be smaller",
        ),
        (
            "/spec/sink/opensearch/auth",
            json!({}),
            "exactly one of basic or sigv4",
        ),
        (
            "/spec/deadLetter",
            json!({"topic": "in"}),
            "must differ from the source topics",
        ),
        (
            "/spec/transform/filters",
            json!([{"pointer": "/x"}]),
            "exactly one of exists, equals or notEquals",
        ),
        (
            "/spec/transform",
            json!({"idPointer": "/id", "idFromKey": true}),
            "set idPointer or idFromKey, not both",
        ),
    ];
    for (pointer, value, want) in cases {
        let errors =
            cel_errors::<EmbeddingPipeline>(&with(minimal_pipeline(), pointer, value.clone()));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{pointer} = {value}: expected an error containing {want:?}, got {errors:?}"
        );
    }
}

#[test]
fn cel_rules_refuse_bad_scaling_policies() {
    let cases = [
        (
            "/spec/minReplicas",
            json!(9),
            "minReplicas must not exceed maxReplicas",
        ),
        ("/spec/minReplicas", json!(0), "needs scaleToZero.enabled"),
        (
            "/spec/metrics",
            json!([]),
            "at least one entry in metrics or schedules",
        ),
        (
            "/spec/metrics",
            json!([{"kafkaLag": {}, "cpu": {}, "scaleOutThreshold": 1}]),
            "exactly one of kafkaLag",
        ),
        (
            "/spec/metrics",
            json!([{"kafkaLag": {}}]),
            "needs scaleOutThreshold, scaleInThreshold or both",
        ),
        (
            "/spec/metrics",
            json!([{"cpu": {}, "scaleOutThreshold": 50, "scaleInThreshold": 60}]),
            "would flap",
        ),
        (
            "/spec/scaleOut",
            json!({"evaluationPeriods": 2, "datapointsToAlarm": 3, "operation": "add", "factor": 1, "cooldown": "1m"}),
            "datapointsToAlarm must not exceed",
        ),
        (
            "/spec/scaleOut",
            json!({"evaluationPeriods": 2, "datapointsToAlarm": 2, "operation": "multiply", "factor": 1, "cooldown": "1m"}),
            "factor above 1",
        ),
        (
            "/spec/schedules",
            json!([{"name": "x", "cron": "0 8 * * *", "duration": "1h", "desiredReplicas": 2, "minReplicas": 1}]),
            "either desiredReplicas",
        ),
        (
            "/spec/schedules",
            json!([{"name": "x", "cron": "0 8 * * *", "duration": "1h", "desiredReplicas": 9}]),
            "must not exceed maxReplicas",
        ),
        (
            "/spec/fallbackReplicas",
            json!(7),
            "between minReplicas and maxReplicas",
        ),
    ];
    for (pointer, value, want) in cases {
        let errors = cel_errors::<ScalingPolicy>(&with(minimal_policy(), pointer, value.clone()));
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{pointer} = {value}: expected an error containing {want:?}, got {errors:?}"
        );
    }
}

#[test]
fn validate_catches_what_cel_cannot() {
    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec.embedding.bedrock.model_id = "acme.custom-embedder".into();
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(err.contains("set embedding.bedrock.dimensions"), "{err}");

    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec.embedding.bedrock.model_id = "cohere.embed-english-v3".into();
    ep.spec.chunking.max_chars = 4000;
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(
        err.contains("chunking.maxChars") && err.contains("2048"),
        "{err}"
    );

    // The worker reads its file without the apiserver's CEL rules.
    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec.transform.id_pointer = Some("/id".into());
    ep.spec.transform.id_from_key = true;
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(err.contains("idPointer or idFromKey"), "{err}");

    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec.embedding.bedrock.retry.base_delay = "30s".parse().unwrap();
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(err.contains("baseDelay must not exceed maxDelay"), "{err}");

    // Secrets never go into the spec (its rendered file is a ConfigMap).
    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec
        .source
        .kafka
        .consumer_properties
        .insert("ssl.keystore.password".into(), "hunter2".into());
    ep.spec
        .source
        .kafka
        .consumer_properties
        .insert("fetch.max.bytes".into(), "1048576".into());
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(
        err.contains("ssl.keystore.password") && err.contains("Secret") && !err.contains("fetch"),
        "{err}"
    );

    // A dead-letter topic that the topic pattern selects would be read again, forever.
    let mut ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    ep.spec.source.kafka.topics = None;
    ep.spec.source.kafka.topic_pattern = Some("posts.*".into());
    ep.spec.dead_letter = serde_json::from_value(json!({"topic": "posts-dlq"})).unwrap();
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(
        err.contains("deadLetter.topic") && err.contains("posts-dlq"),
        "{err}"
    );
    // A whole-name pattern leaves the dead-letter topic out.
    ep.spec.source.kafka.topic_pattern = Some("posts".into());
    validate::pipeline(&ep.spec).unwrap();
    ep.spec.source.kafka.topic_pattern = Some("(posts".into());
    let err = validate::pipeline(&ep.spec).unwrap_err().to_string();
    assert!(err.contains("topicPattern"), "{err}");
}

#[test]
fn serde_defaults_match_the_documented_ones() {
    let ep: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    let spec = &ep.spec;
    assert_eq!(spec.transform.text_pointers, ["/text"]);
    assert!(spec.transform.skip_empty_text);
    assert_eq!(spec.dedup.ttl.get().as_secs(), 7 * 86_400);
    assert_eq!(spec.dedup.ttl.as_str(), "7d");
    assert_eq!(spec.embedding.bedrock.max_in_flight, 64);
    assert_eq!(spec.embedding.bedrock.timeout.as_str(), "15s");
    assert_eq!(spec.sink.opensearch.vector_field, "embedding");
    assert!(spec.sink.opensearch.create_index);
    assert_eq!(spec.sink.opensearch.method.m, 24);
    assert_eq!(spec.sink.opensearch.method.ef_construction, 128);
    assert_eq!(spec.sink.opensearch.index_settings.shards, 5);
    assert_eq!(spec.workers.replicas, 1);
    assert_eq!(spec.workers.metrics_port, 9090);
    assert!(!spec.suspend);
    assert!(spec.dead_letter.is_none());
    // Serialising a parsed spec writes back every default, so the apiserver and the worker agree.
    let round: EmbeddingPipeline =
        serde_json::from_value(serde_json::to_value(&ep).unwrap()).unwrap();
    assert_eq!(round, ep);

    let sp: ScalingPolicy = serde_json::from_value(minimal_policy()).unwrap();
    assert!(sp.spec.cap_at_partition_count);
    assert_eq!(sp.spec.poll_interval.as_str(), "10s");
    assert_eq!(sp.spec.scale_in.cooldown.as_str(), "5m");
    assert_eq!(sp.spec.history_limit, 10);
}

#[test]
fn partial_scaling_rules_and_unnamed_schedules_take_their_defaults() {
    // `scaleOut: {operation: multiply, factor: 3}` must not need the other fields, and a schedule
    // needs no name: the schema gives every nested field its own default, the same as serde.
    let policy = with(
        with(
            minimal_policy(),
            "/spec/scaleOut",
            json!({"operation": "multiply", "factor": 3}),
        ),
        "/spec/schedules",
        json!([{"cron": "0 8 * * MON-FRI", "duration": "10h", "desiredReplicas": 2}]),
    );
    let schema = schema_of::<ScalingPolicy>();
    let spec = &schema["properties"]["spec"]["properties"];
    for rule in ["scaleOut", "scaleIn"] {
        let required = spec[rule].get("required");
        assert!(
            required.is_none_or(|r| r.as_array().is_some_and(Vec::is_empty)),
            "{rule} requires {required:?}"
        );
    }
    let schedule = &spec["schedules"]["items"];
    assert!(
        !schedule["required"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r == "name"),
        "{schedule}"
    );
    let defaulted = kube::core::cel::apply_defaults(&schema, &policy);
    assert_eq!(defaulted["spec"]["scaleOut"]["evaluationPeriods"], 2);
    assert_eq!(defaulted["spec"]["scaleIn"]["evaluationPeriods"], 5);
    let from_schema: ScalingPolicy = serde_json::from_value(defaulted.clone()).unwrap();
    let from_serde: ScalingPolicy = serde_json::from_value(policy).unwrap();
    assert_eq!(from_schema, from_serde);
    assert_eq!(from_serde.spec.scale_out.factor, 3.0);
    assert_eq!(from_serde.spec.scale_out.datapoints_to_alarm, 2);
    assert_eq!(
        from_serde.spec.scale_out.cooldown,
        vectorpipe_crds::v1alpha1::ScaleOutRule::default().cooldown
    );
    assert_eq!(from_serde.spec.schedules[0].display_name(0), "schedule-0");
    assert_eq!(
        cel_errors::<ScalingPolicy>(&defaulted),
        Vec::<String>::new()
    );
}

#[test]
fn schema_defaults_agree_with_serde_defaults() {
    // The apiserver fills defaults from the schema; the worker from serde. Both must agree:
    // a spec defaulted by the schema must deserialize to the same value as the raw spec.
    let schema = schema_of::<EmbeddingPipeline>();
    let defaulted = kube::core::cel::apply_defaults(&schema, &minimal_pipeline());
    let from_schema: EmbeddingPipeline = serde_json::from_value(defaulted).unwrap();
    let from_serde: EmbeddingPipeline = serde_json::from_value(minimal_pipeline()).unwrap();
    assert_eq!(from_schema, from_serde);
}
