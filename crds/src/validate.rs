//! Checks of a spec that need no server.
//!
//! The apiserver enforces the schema and CEL rules of the CRDs; these functions repeat the rules a
//! worker must not run without (it can read a spec from a file, where no apiserver looked at it)
//! and add the ones CEL cannot express. Every problem names the field and says what to change.

use std::fmt;

use crate::v1alpha1::{
    ChunkingStrategy, EmbeddingPipelineSpec, ScalingOperation, ScalingPolicySpec,
    refused_consumer_property,
};

/// One thing wrong with a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The field, as a dotted path from `spec`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems of a spec, joined for an error message or a condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Problems(pub Vec<Problem>);

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Checks an EmbeddingPipeline spec.
pub fn pipeline(spec: &EmbeddingPipelineSpec) -> Result<(), Problems> {
    let mut found = Vec::new();
    let kafka = &spec.source.kafka;
    if kafka.bootstrap_servers.iter().all(|s| s.trim().is_empty()) {
        found.push(problem(
            "source.kafka.bootstrapServers",
            "list at least one broker as host:port",
        ));
    }
    match (&kafka.topics, &kafka.topic_pattern) {
        (Some(t), None) if !t.is_empty() && t.iter().all(|t| !t.is_empty()) => {}
        (None, Some(p)) if !p.is_empty() => {}
        _ => found.push(problem(
            "source.kafka",
            "set exactly one of topics (a non-empty list) or topicPattern",
        )),
    }
    if let Some(auth) = &kafka.auth {
        let kinds = [
            auth.tls.is_some(),
            auth.scram.is_some(),
            auth.msk_iam.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            found.push(problem(
                "source.kafka.auth",
                "set exactly one of tls, scram or mskIam (omit auth for a plaintext broker)",
            ));
        }
    }
    for key in kafka.consumer_properties.keys() {
        if let Some(why) = refused_consumer_property(key) {
            found.push(problem(
                "source.kafka.consumerProperties",
                format!("{key:?} {why}"),
            ));
        }
    }
    if spec.transform.id_from_key && spec.transform.id_pointer.is_some() {
        found.push(problem(
            "transform",
            "set idPointer or idFromKey, not both: a record has one id",
        ));
    }
    if spec.transform.text_pointers.is_empty() {
        found.push(problem(
            "transform.textPointers",
            "name at least one JSON pointer, e.g. /text",
        ));
    }
    for pointer in spec
        .transform
        .text_pointers
        .iter()
        .chain(&spec.transform.id_pointer)
        .chain(&spec.transform.timestamp_pointer)
        .chain(spec.transform.metadata.values())
        .chain(spec.transform.filters.iter().map(|f| &f.pointer))
    {
        if !pointer.is_empty() && !pointer.starts_with('/') {
            found.push(problem(
                "transform",
                format!("{pointer:?} is not a JSON pointer; start it with '/', e.g. /{pointer}"),
            ));
        }
    }
    for (i, filter) in spec.transform.filters.iter().enumerate() {
        let set = [
            filter.exists.is_some(),
            filter.equals.is_some(),
            filter.not_equals.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            found.push(problem(
                &format!("transform.filters[{i}]"),
                "set exactly one of exists, equals or notEquals",
            ));
        }
    }
    let chunking = &spec.chunking;
    if chunking.strategy != ChunkingStrategy::None && chunking.overlap_chars >= chunking.max_chars {
        found.push(problem(
            "chunking.overlapChars",
            format!(
                "{} must be smaller than chunking.maxChars ({})",
                chunking.overlap_chars, chunking.max_chars
            ),
        ));
    }
    let bedrock = &spec.embedding.bedrock;
    if let Err(e) = bedrock.vector_dimensions() {
        found.push(problem("embedding.bedrock.dimensions", e.to_string()));
    }
    let family = bedrock.family();
    if chunking.strategy != ChunkingStrategy::None
        && let Some(limit) = family.max_input_chars()
        && chunking.max_chars as usize > limit
    {
        found.push(problem(
            "chunking.maxChars",
            format!(
                "{} is longer than {} accepts ({limit} characters); lower chunking.maxChars",
                chunking.max_chars, bedrock.model_id
            ),
        ));
    }
    if bedrock.batch_size.is_some_and(|b| b > 1) && family.max_batch() == 1 {
        found.push(problem(
            "embedding.bedrock.batchSize",
            format!(
                "{} takes one text per call; remove batchSize or set it to 1",
                bedrock.model_id
            ),
        ));
    }
    if bedrock.retry.base_delay.get() > bedrock.retry.max_delay.get() {
        found.push(problem(
            "embedding.bedrock.retry",
            "baseDelay must not exceed maxDelay",
        ));
    }
    if bedrock.timeout.get().is_zero() {
        found.push(problem(
            "embedding.bedrock.timeout",
            "must be above zero, e.g. 15s",
        ));
    }
    let sink = &spec.sink.opensearch;
    if sink.endpoints.is_empty() {
        found.push(problem(
            "sink.opensearch.endpoints",
            "list at least one URL",
        ));
    }
    if let Some(auth) = &sink.auth
        && auth.basic.is_some() == auth.sigv4.is_some()
    {
        found.push(problem(
            "sink.opensearch.auth",
            "set exactly one of basic or sigv4 (omit auth for anonymous access)",
        ));
    }
    if sink.vector_field == sink.text_field {
        found.push(problem(
            "sink.opensearch.textField",
            "must differ from vectorField",
        ));
    }
    match crate::topics::TopicSelection::of(kafka) {
        Ok(selection) => {
            if let Some(dl) = &spec.dead_letter
                && selection.matches(&dl.topic)
            {
                found.push(problem(
                    "deadLetter.topic",
                    format!(
                        "{:?} is one of the source topics (or matches topicPattern); failed records would be read again: use a topic the source does not select",
                        dl.topic
                    ),
                ));
            }
        }
        Err(crate::topics::TopicError::Pattern { error, .. }) => found.push(problem(
            "source.kafka.topicPattern",
            format!("is not a valid regular expression: {error}"),
        )),
        // Reported above.
        Err(crate::topics::TopicError::Unset) => {}
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Problems(found))
    }
}

/// Checks a ScalingPolicy spec (cron expressions and time zones are checked by the operator,
/// which has the parsers).
pub fn scaling_policy(spec: &ScalingPolicySpec) -> Result<(), Problems> {
    let mut found = Vec::new();
    if spec.min_replicas > spec.max_replicas {
        found.push(problem("minReplicas", "must not exceed maxReplicas"));
    }
    let scale_to_zero = spec.scale_to_zero.as_ref().is_some_and(|s| s.enabled);
    if spec.min_replicas == 0 && !scale_to_zero {
        found.push(problem(
            "minReplicas",
            "0 needs scaleToZero.enabled: true, so that the pipeline wakes up again when records arrive",
        ));
    }
    if spec.metrics.is_empty() && spec.schedules.is_empty() {
        found.push(problem("metrics", "add at least one metric or schedule"));
    }
    for (i, m) in spec.metrics.iter().enumerate() {
        let kinds = [
            m.kafka_lag.is_some(),
            m.time_lag.is_some(),
            m.cpu.is_some(),
            m.memory.is_some(),
            m.prometheus.is_some(),
            m.freshness.is_some(),
        ];
        let field = format!("metrics[{i}]");
        if kinds.iter().filter(|k| **k).count() != 1 {
            found.push(problem(
                &field,
                "set exactly one of kafkaLag, timeLag, cpu, memory, prometheus or freshness",
            ));
        }
        if let Some(f) = &m.freshness
            && (!(1.0..=99.9).contains(&f.percentile) || f.target_seconds < 0.1)
        {
            found.push(problem(
                &format!("{field}.freshness"),
                "percentile must lie between 1 and 99.9 and targetSeconds be at least 0.1",
            ));
        }
        match (m.out_threshold(), m.in_threshold()) {
            (None, None) => found.push(problem(
                &field,
                "set scaleOutThreshold, scaleInThreshold or both",
            )),
            (Some(out), Some(inn)) if inn >= out => found.push(problem(
                &field,
                "scaleInThreshold must be below scaleOutThreshold, or the policy would flap",
            )),
            _ => {}
        }
    }
    let rules = [
        (
            "scaleOut",
            spec.scale_out.evaluation_periods,
            spec.scale_out.datapoints_to_alarm,
            spec.scale_out.operation,
            spec.scale_out.factor,
        ),
        (
            "scaleIn",
            spec.scale_in.evaluation_periods,
            spec.scale_in.datapoints_to_alarm,
            spec.scale_in.operation,
            spec.scale_in.factor,
        ),
    ];
    for (name, evaluation_periods, datapoints_to_alarm, operation, factor) in rules {
        if datapoints_to_alarm > evaluation_periods {
            found.push(problem(
                name,
                "datapointsToAlarm must not exceed evaluationPeriods",
            ));
        }
        match operation {
            ScalingOperation::Multiply if factor <= 1.0 => {
                found.push(problem(name, "a multiply step needs a factor above 1"))
            }
            ScalingOperation::Add if factor < 1.0 => {
                found.push(problem(name, "an add step needs a factor of at least 1"))
            }
            _ => {}
        }
    }
    for (i, s) in spec.schedules.iter().enumerate() {
        let field = format!("schedules[{i}]");
        if s.desired_replicas.is_some() == (s.min_replicas.is_some() || s.max_replicas.is_some()) {
            found.push(problem(
                &field,
                "set either desiredReplicas, or minReplicas and/or maxReplicas",
            ));
        }
        if let (Some(lo), Some(hi)) = (s.min_replicas, s.max_replicas)
            && lo > hi
        {
            found.push(problem(&field, "minReplicas must not exceed maxReplicas"));
        }
        if s.duration.get().is_zero() {
            found.push(problem(&field, "duration must be above zero"));
        }
    }
    if let Some(f) = spec.fallback_replicas
        && (f < spec.min_replicas || f > spec.max_replicas)
    {
        found.push(problem(
            "fallbackReplicas",
            "must lie between minReplicas and maxReplicas",
        ));
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Problems(found))
    }
}
