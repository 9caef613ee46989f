//! What `source.kafka.topics` / `topicPattern` select, defined once for the worker's subscription,
//! the operator's lag reader and validation: a list of exact names, or a regular expression that
//! must match the whole topic name (`posts` selects `posts`, never `posts-dlq`).

use crate::v1alpha1::KafkaSource;

/// The source topics of a pipeline.
#[derive(Clone, Debug)]
pub enum TopicSelection {
    /// Exact names.
    Names(Vec<String>),
    /// A pattern over whole names.
    Pattern {
        /// As written in the spec.
        pattern: String,
        /// Anchored at both ends.
        regex: regex::Regex,
    },
}

/// Why the topics cannot be selected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Neither or both fields are set.
    #[error("set exactly one of source.kafka.topics or source.kafka.topicPattern")]
    Unset,
    /// The pattern is not a regular expression.
    #[error("source.kafka.topicPattern {pattern:?} is not a valid regular expression: {error}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What the parser said.
        error: String,
    },
}

impl TopicSelection {
    /// The selection of a source.
    pub fn of(kafka: &KafkaSource) -> Result<Self, TopicError> {
        match (&kafka.topics, &kafka.topic_pattern) {
            (Some(names), None) => Ok(Self::Names(names.clone())),
            (None, Some(pattern)) => regex::Regex::new(&format!("^(?:{pattern})$"))
                .map(|regex| Self::Pattern {
                    pattern: pattern.clone(),
                    regex,
                })
                .map_err(|e| TopicError::Pattern {
                    pattern: pattern.clone(),
                    error: e.to_string(),
                }),
            _ => Err(TopicError::Unset),
        }
    }

    /// What the consumer subscribes to: the names, or the pattern as a librdkafka regular
    /// expression (a leading `^`), anchored and grouped so that it matches whole names only.
    pub fn subscription(&self) -> Vec<String> {
        match self {
            Self::Names(names) => names.clone(),
            Self::Pattern { pattern, .. } => vec![format!("^({pattern})$")],
        }
    }

    /// True when `topic` is one of the source topics.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Names(names) => names.iter().any(|n| n == topic),
            Self::Pattern { regex, .. } => regex.is_match(topic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(extra: serde_json::Value) -> KafkaSource {
        let mut v = serde_json::json!({"bootstrapServers": ["k:9092"]});
        if let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (&mut v, extra) {
            a.extend(b);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_pattern_matches_whole_names_only() {
        let cases = [
            // pattern, topic, selected
            ("posts", "posts", true),
            ("posts", "posts-dlq", false),
            ("posts", "old-posts", false),
            ("posts.*", "posts-eu", true),
            ("a|b", "a", true),
            ("a|b", "xbx", false),
            ("events-(eu|us)", "events-eu", true),
            ("events-(eu|us)", "events-eu-dlq", false),
        ];
        for (pattern, topic, selected) in cases {
            let s =
                TopicSelection::of(&source(serde_json::json!({"topicPattern": pattern}))).unwrap();
            assert_eq!(s.matches(topic), selected, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn the_subscription_is_anchored_for_librdkafka() {
        let s = TopicSelection::of(&source(serde_json::json!({"topicPattern": "a|b"}))).unwrap();
        assert_eq!(s.subscription(), ["^(a|b)$"]);
        let s = TopicSelection::of(&source(serde_json::json!({"topics": ["x", "y"]}))).unwrap();
        assert_eq!(s.subscription(), ["x", "y"]);
        assert!(s.matches("x") && !s.matches("xy"));
    }

    #[test]
    fn a_bad_pattern_says_what_is_wrong() {
        let e =
            TopicSelection::of(&source(serde_json::json!({"topicPattern": "(posts"}))).unwrap_err();
        assert!(e.to_string().contains("(posts"), "{e}");
    }
}
