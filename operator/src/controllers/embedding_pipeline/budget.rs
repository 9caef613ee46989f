//! The daily embedding budget of a pipeline (`spec.budget`): the price table, the budget day's
//! boundaries in its time zone, and whether the day's spend is over the limit. Pure, with the
//! clock passed in; the tokens come from the workers' `vectorpipe_worker_input_tokens_total` in
//! Prometheus.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use vectorpipe_crds::v1alpha1::{Budget, BudgetAction, EmbeddingPipeline};

/// US dollars per 1,000 input tokens, by Bedrock model id (or a prefix of one ending in `*`).
#[derive(Clone, Debug, PartialEq)]
pub struct PriceTable(BTreeMap<String, f64>);

impl Default for PriceTable {
    /// Bedrock's on-demand prices for the embedding models vectorpipe supports (us-east-1, as
    /// published when this table was written; override them with `--price-table`).
    fn default() -> Self {
        Self(BTreeMap::from([
            ("amazon.titan-embed-text-v1".to_owned(), 0.0001),
            ("amazon.titan-embed-text-v2:0".to_owned(), 0.00002),
            ("cohere.embed-english-v3".to_owned(), 0.0001),
            ("cohere.embed-multilingual-v3".to_owned(), 0.0001),
        ]))
    }
}

impl PriceTable {
    /// The defaults with the entries of a YAML map (`model id: dollars per 1,000 tokens`) on
    /// top. Err says what is wrong with the text.
    pub fn with_overrides(text: &str) -> Result<Self, String> {
        let overrides: BTreeMap<String, f64> = serde_yaml::from_str(text).map_err(|e| {
            format!("the price table must map model ids to US dollars per 1,000 input tokens, e.g. `amazon.titan-embed-text-v2:0: 0.00002`: {e}")
        })?;
        if let Some((model, price)) = overrides.iter().find(|(_, p)| !p.is_finite() || **p < 0.0) {
            return Err(format!(
                "the price of {model} is {price}; prices are US dollars per 1,000 input tokens, 0 or more"
            ));
        }
        let mut table = Self::default();
        table.0.extend(overrides);
        Ok(table)
    }

    /// The price of `model_id` per 1,000 input tokens: an exact entry, else the longest `*`
    /// prefix entry, else the entry for the id without its `:N` version suffix.
    pub fn price(&self, model_id: &str) -> Option<f64> {
        if let Some(p) = self.0.get(model_id) {
            return Some(*p);
        }
        let prefixed = self
            .0
            .iter()
            .filter_map(|(k, p)| Some((k.strip_suffix('*')?, p)))
            .filter(|(prefix, _)| model_id.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, p)| *p);
        prefixed.or_else(|| {
            let (base, _) = model_id.rsplit_once(':')?;
            self.0.get(base).copied()
        })
    }
}

/// When the budget day that holds `now` began and when it ends. Err names the bad time zone
/// or reset time.
pub fn day(budget: &Budget, now: Timestamp) -> Result<(Timestamp, Timestamp), String> {
    let zone = TimeZone::get(&budget.time_zone).map_err(|_| {
        format!(
            "spec.budget.timeZone {:?} is not an IANA time zone; use a name such as Europe/Paris or UTC",
            budget.time_zone
        )
    })?;
    let (hour, minute) = budget
        .reset_at
        .split_once(':')
        .and_then(|(h, m)| Some((h.parse::<i8>().ok()?, m.parse::<i8>().ok()?)))
        .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m))
        .ok_or_else(|| {
            format!(
                "spec.budget.resetAt {:?} must be HH:MM, e.g. 00:00",
                budget.reset_at
            )
        })?;
    let local: Zoned = now.to_zoned(zone);
    let boundary = |date: jiff::civil::Date| -> Result<Timestamp, String> {
        date.at(hour, minute, 0, 0)
            .to_zoned(local.time_zone().clone())
            .map(|z| z.timestamp())
            .map_err(|e| format!("the budget day boundary cannot be placed: {e}"))
    };
    let today = boundary(local.date())?;
    if today <= now {
        let tomorrow = local
            .date()
            .tomorrow()
            .map_err(|e| format!("the budget day boundary cannot be placed: {e}"))?;
        Ok((today, boundary(tomorrow)?))
    } else {
        let yesterday = local
            .date()
            .yesterday()
            .map_err(|e| format!("the budget day boundary cannot be placed: {e}"))?;
        Ok((boundary(yesterday)?, today))
    }
}

/// The PromQL range of a budget day so far: whole seconds since it began, at least one.
pub fn range_since(start: Timestamp, now: Timestamp) -> Duration {
    let seconds = now.duration_since(start).as_secs().max(1);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(1))
}

/// The day's spend against the budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Input tokens since the day began.
    pub tokens: i64,
    /// Their estimated cost, when the model has a price.
    pub cost: Option<f64>,
    /// Over a limit: what to say.
    pub exceeded: Option<String>,
    /// A cost limit that cannot be judged (the model has no price): what to fix.
    pub problem: Option<String>,
}

/// Dollars with enough digits to tell small sums apart.
fn dollars(amount: f64) -> String {
    if amount >= 1.0 {
        format!("{amount:.2}")
    } else if amount >= 0.01 {
        format!("{amount:.4}")
    } else {
        format!("{amount:.6}")
    }
}

/// Judges `tokens` spent since `since` on `model_id` against `budget`; `until` is the reset.
pub fn judge(
    budget: &Budget,
    prices: &PriceTable,
    model_id: &str,
    tokens: i64,
    until: Timestamp,
) -> Verdict {
    let price = prices.price(model_id);
    let cost = price.map(|p| tokens as f64 / 1000.0 * p);
    let action = match budget.action {
        BudgetAction::Suspend => "the workers are stopped".to_owned(),
        BudgetAction::Throttle => format!(
            "one worker runs at {} tokens per minute",
            budget.throttle_tokens_per_minute.unwrap_or(1)
        ),
    };
    let over_tokens = budget
        .max_tokens_per_day
        .filter(|max| tokens >= *max)
        .map(|max| format!("{tokens} input tokens used today, the budget is {max}"));
    let over_cost = match (budget.max_cost_per_day, cost) {
        (Some(max), Some(cost)) if cost >= max => Some(format!(
            "an estimated ${} spent today, the budget is ${}",
            dollars(cost),
            dollars(max)
        )),
        _ => None,
    };
    let problem = (budget.max_cost_per_day.is_some() && price.is_none()).then(|| {
        format!(
            "maxCostPerDay needs a price for {model_id}: add it to the operator's price table (--price-table, chart value pricing), in US dollars per 1,000 input tokens"
        )
    });
    let exceeded = over_tokens.or(over_cost).map(|why| {
        format!(
            "{why}; {action} until the day resets at {until}; raise spec.budget to resume sooner"
        )
    });
    Verdict {
        tokens,
        cost,
        exceeded,
        problem,
    }
}

/// What a reconcile found of a budgeted pipeline's spend.
#[derive(Clone, Debug, PartialEq)]
pub enum Spent {
    /// The spend since the day began, judged.
    Judged {
        /// When the budget day began.
        since: Timestamp,
        /// The judgement.
        verdict: Verdict,
        /// Whether Prometheus has any token series of the pipeline's workers since then (none:
        /// nothing ran, or the workers are not scraped).
        seen: bool,
    },
    /// The spend could not be read: why, and what to fix.
    Unreadable(String),
}

/// The pipeline as its workers should run given the day's spend: suspended, or one worker at
/// the throttle rate, once the budget is used; as it is otherwise (also when the spend cannot be
/// read: a missing reading never stops a pipeline).
pub fn effect<'a>(
    pipeline: &'a EmbeddingPipeline,
    spent: Option<&Spent>,
) -> Cow<'a, EmbeddingPipeline> {
    let (Some(budget), Some(Spent::Judged { verdict, .. })) = (&pipeline.spec.budget, spent) else {
        return Cow::Borrowed(pipeline);
    };
    if verdict.exceeded.is_none() {
        return Cow::Borrowed(pipeline);
    }
    let mut limited = pipeline.clone();
    match budget.action {
        BudgetAction::Suspend => limited.spec.suspend = true,
        BudgetAction::Throttle => {
            let spec = &mut limited.spec;
            spec.workers.replicas = spec.workers.replicas.min(1);
            let rate = budget.throttle_tokens_per_minute.unwrap_or(1);
            let own = &mut spec.embedding.bedrock.tokens_per_minute;
            *own = Some(own.map_or(rate, |r| r.min(rate)));
        }
    }
    Cow::Owned(limited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(v: serde_json::Value) -> Budget {
        serde_json::from_value(v).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn the_day_begins_at_the_reset_time_in_its_zone_across_dst() {
        let paris =
            budget(json!({"maxTokensPerDay": 1, "resetAt": "06:00", "timeZone": "Europe/Paris"}));
        // Winter: 06:00 in Paris is 05:00 UTC.
        assert_eq!(
            day(&paris, at("2026-12-04T12:00:00Z")).unwrap(),
            (at("2026-12-04T05:00:00Z"), at("2026-12-05T05:00:00Z"))
        );
        // Before the reset: the day began yesterday.
        assert_eq!(
            day(&paris, at("2026-12-04T04:59:59Z")).unwrap().0,
            at("2026-12-03T05:00:00Z")
        );
        // The day over the night summer time ends (25 October 2026) lasts 25 hours.
        let (start, end) = day(&paris, at("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(
            (start, end),
            (at("2026-10-24T04:00:00Z"), at("2026-10-25T05:00:00Z"))
        );
        let utc = budget(json!({"maxTokensPerDay": 1}));
        assert_eq!(
            day(&utc, at("2026-12-04T00:00:00Z")).unwrap().0,
            at("2026-12-04T00:00:00Z")
        );
        let wrong = budget(json!({"maxTokensPerDay": 1, "timeZone": "Mars/Olympus"}));
        assert!(
            day(&wrong, at("2026-12-04T00:00:00Z"))
                .unwrap_err()
                .contains("IANA")
        );
    }

    #[test]
    fn prices_come_from_the_table_with_overrides_and_prefixes() {
        let table = PriceTable::default();
        assert_eq!(table.price("amazon.titan-embed-text-v2:0"), Some(0.00002));
        assert_eq!(
            table.price("amazon.titan-embed-text-v1:2"),
            Some(0.0001),
            "the base id"
        );
        assert_eq!(table.price("someone.else-v1"), None);
        let table =
            PriceTable::with_overrides("amazon.titan-embed-text-v2:0: 0.00005\n'someone.*': 0.3\n")
                .unwrap();
        assert_eq!(table.price("amazon.titan-embed-text-v2:0"), Some(0.00005));
        assert_eq!(table.price("someone.else-v1"), Some(0.3));
        assert_eq!(
            table.price("cohere.embed-english-v3"),
            Some(0.0001),
            "defaults stay"
        );
        assert!(
            PriceTable::with_overrides("x: -1")
                .unwrap_err()
                .contains("0 or more")
        );
        assert!(
            PriceTable::with_overrides("[1, 2]")
                .unwrap_err()
                .contains("model ids")
        );
    }

    #[test]
    fn the_spend_is_judged_against_tokens_and_cost() {
        let until = at("2026-12-05T00:00:00Z");
        let prices = PriceTable::default();
        let titan = "amazon.titan-embed-text-v2:0";
        let tokens = budget(json!({"maxTokensPerDay": 1000}));
        assert_eq!(judge(&tokens, &prices, titan, 999, until).exceeded, None);
        let over = judge(&tokens, &prices, titan, 1000, until);
        let message = over.exceeded.unwrap();
        assert!(
            message.contains("1000 input tokens used today, the budget is 1000")
                && message.contains(
                    "the workers are stopped until the day resets at 2026-12-05T00:00:00Z"
                ),
            "{message}"
        );
        // 5 million Titan v2 tokens cost $0.10.
        let cost = budget(
            json!({"maxCostPerDay": 0.1, "action": "throttle", "throttleTokensPerMinute": 600}),
        );
        let under = judge(&cost, &prices, titan, 4_000_000, until);
        assert_eq!((under.cost, under.exceeded), (Some(0.08), None));
        let over = judge(&cost, &prices, titan, 5_000_000, until);
        let message = over.exceeded.unwrap();
        assert!(
            message.contains("$0.1000 spent today")
                && message.contains("one worker runs at 600 tokens per minute"),
            "{message}"
        );
        // A cost limit without a price is a problem to fix, never a silent pass.
        let unknown = judge(&cost, &prices, "someone.else-v1", 5_000_000, until);
        assert!(unknown.problem.unwrap().contains("--price-table"));
        assert_eq!(unknown.exceeded, None);
    }

    #[test]
    fn a_used_budget_suspends_or_throttles_and_an_unread_one_changes_nothing() {
        let pipeline = |budget: serde_json::Value| {
            EmbeddingPipeline::test("posts")
                .with_replicas(4)
                .with_spec(json!({"budget": budget}))
                .build()
        };
        let over = Spent::Judged {
            since: at("2026-12-04T00:00:00Z"),
            seen: true,
            verdict: Verdict {
                tokens: 10,
                cost: None,
                exceeded: Some("over".into()),
                problem: None,
            },
        };
        let suspend = pipeline(json!({"maxTokensPerDay": 1}));
        let limited = effect(&suspend, Some(&over));
        assert!(limited.spec.suspend);
        assert_eq!(limited.spec.workers.replicas, 4, "the wanted count is kept");
        let throttle = pipeline(
            json!({"maxTokensPerDay": 1, "action": "throttle", "throttleTokensPerMinute": 600}),
        );
        let limited = effect(&throttle, Some(&over));
        assert!(!limited.spec.suspend);
        assert_eq!(limited.spec.workers.replicas, 1);
        assert_eq!(limited.spec.embedding.bedrock.tokens_per_minute, Some(600));
        let unread = Spent::Unreadable("no Prometheus".into());
        assert!(matches!(effect(&suspend, Some(&unread)), Cow::Borrowed(_)));
        let within = Spent::Judged {
            since: at("2026-12-04T00:00:00Z"),
            seen: true,
            verdict: Verdict {
                tokens: 0,
                cost: None,
                exceeded: None,
                problem: None,
            },
        };
        assert!(matches!(effect(&suspend, Some(&within)), Cow::Borrowed(_)));
    }

    use serde_json::json;
}
