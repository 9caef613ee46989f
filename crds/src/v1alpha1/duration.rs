//! Durations written as strings in specs: `"500ms"`, `"15s"`, `"5m"`, `"1h30m"`, `"7d"`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern every duration in the API matches: one or more `<integer><unit>` groups, with units
/// `ms`, `s`, `m`, `h` and `d` (a day is 24 hours).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// A span of time given in a spec as text such as `"15s"` or `"7d"`.
///
/// The text is kept as written, so serialising a spec gives back exactly what the user wrote and a
/// GitOps tool sees no drift.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration {text:?}: {reason}; write an integer followed by a unit (ms, s, m, h or d), for example \"15s\", \"5m\" or \"7d\""
)]
pub struct DurationError {
    text: String,
    reason: String,
}

impl Duration {
    /// The duration as a standard library value.
    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    /// The duration as the user wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Builds a duration from a whole number of seconds (written back as `"<n>s"`).
    pub fn from_secs(secs: u64) -> Self {
        Self {
            text: format!("{secs}s"),
            value: std::time::Duration::from_secs(secs),
        }
    }

    /// Builds a duration from a whole number of minutes (written back as `"<n>m"`).
    pub fn from_minutes(minutes: u64) -> Self {
        Self {
            text: format!("{minutes}m"),
            value: std::time::Duration::from_secs(minutes * 60),
        }
    }

    /// Builds a duration from a whole number of days (written back as `"<n>d"`).
    pub fn from_days(days: u64) -> Self {
        Self {
            text: format!("{days}d"),
            value: std::time::Duration::from_secs(days * 86_400),
        }
    }

    /// Builds a duration from a whole number of milliseconds (written back as `"<n>ms"`).
    pub fn from_millis(millis: u64) -> Self {
        Self {
            text: format!("{millis}ms"),
            value: std::time::Duration::from_millis(millis),
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refuse = |reason: &str| DurationError {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(refuse("it is empty"));
        }
        // The schema pattern is the contract; humantime does the arithmetic. Checking the shape
        // first keeps the two in step (humantime alone also takes "15 seconds" or "1.5h").
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits == 0 {
                return Err(refuse("each part must start with a whole number"));
            }
            let after = &rest[digits..];
            let unit = ["ms", "s", "m", "h", "d"]
                .into_iter()
                .find(|u| after.starts_with(u))
                .ok_or_else(|| refuse("each number needs a unit"))?;
            rest = &after[unit.len()..];
        }
        let value = humantime::parse_duration(text).map_err(|e| refuse(&e.to_string()))?;
        Ok(Self {
            text: text.to_owned(),
            value,
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as Std;

    #[test]
    fn parses_every_unit_and_combinations() {
        let cases = [
            ("500ms", Std::from_millis(500)),
            ("15s", Std::from_secs(15)),
            ("5m", Std::from_secs(300)),
            ("2h", Std::from_secs(7200)),
            ("7d", Std::from_secs(7 * 86_400)),
            ("1h30m", Std::from_secs(5400)),
            ("1m30s500ms", Std::from_millis(90_500)),
            ("0s", Std::ZERO),
        ];
        for (text, want) in cases {
            let got: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got.get(), want, "{text}");
            assert_eq!(got.to_string(), text);
        }
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        for text in [
            "", "15", "s", "1.5h", "15 s", "15sec", "-1s", "15S", "1w", "ms15",
        ] {
            let err = text.parse::<Duration>().expect_err(text);
            assert!(err.to_string().contains("for example"), "{err}");
        }
    }

    #[test]
    fn round_trips_through_yaml_unchanged() {
        let d: Duration = serde_yaml::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_yaml::to_string(&d).unwrap().trim(), "1h30m");
    }

    #[test]
    fn schema_pattern_agrees_with_the_parser() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for text in ["500ms", "15s", "1h30m", "7d", "1m30s500ms"] {
            assert!(pattern.is_match(text), "{text}");
            assert!(text.parse::<Duration>().is_ok(), "{text}");
        }
        for text in ["", "15", "1.5h", "15 s", "15sec", "1w", "ms15"] {
            assert!(!pattern.is_match(text), "{text}");
            assert!(text.parse::<Duration>().is_err(), "{text}");
        }
    }
}
