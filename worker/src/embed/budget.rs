//! The pipeline's Bedrock budget: `requestsPerSecond` and `tokensPerMinute` hold for all of a
//! pipeline's workers together. Each worker takes an equal share, from the live member count of
//! the consumer group. When that count changes, the share changes with it, and the worker does
//! not restart. N workers together therefore stay under the account's quota however many there
//! are.
//!
//! The rates are enforced with GCRA limiters from `governor`. A call first waits for a request
//! cell and for its estimated tokens (a quarter of its characters). Once the model has counted
//! the tokens, whatever the estimate missed is taken too, and the next calls wait for it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The limiters of one share.
struct Limiters {
    requests: Option<DefaultDirectRateLimiter>,
    /// The token limiter and its burst (the most tokens one wait may ask for).
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

/// A pipeline-wide budget and this worker's share of it.
pub struct Budget {
    requests_per_second: Option<f64>,
    tokens_per_minute: Option<f64>,
    members: AtomicU32,
    limiters: RwLock<Arc<Limiters>>,
}

/// A limiter of `per_second` cells per second, with a burst of one second's worth (at least 1).
fn limiter(per_second: f64) -> (DefaultDirectRateLimiter, NonZeroU32) {
    let burst = NonZeroU32::new(per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
        .unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs_f64(1.0 / per_second.max(1e-9));
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    (RateLimiter::direct(quota), burst)
}

impl Budget {
    /// The budget of `requests_per_second` and `tokens_per_minute` (each for the whole
    /// pipeline); `None` when neither is set.
    pub fn new(requests_per_second: Option<i32>, tokens_per_minute: Option<i64>) -> Option<Self> {
        if requests_per_second.is_none() && tokens_per_minute.is_none() {
            return None;
        }
        let budget = Self {
            requests_per_second: requests_per_second.map(f64::from),
            tokens_per_minute: tokens_per_minute.map(|t| t as f64),
            members: AtomicU32::new(1),
            limiters: RwLock::new(Arc::new(Limiters {
                requests: None,
                tokens: None,
            })),
        };
        budget.rebuild(1);
        Some(budget)
    }

    fn rebuild(&self, members: u32) {
        let n = f64::from(members.max(1));
        let limiters = Limiters {
            requests: self.requests_per_second.map(|r| limiter(r / n).0),
            tokens: self.tokens_per_minute.map(|t| limiter(t / n / 60.0)),
        };
        *self.limiters.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limiters);
    }

    /// The consumer group has `members` live members now; the share follows.
    pub fn set_members(&self, members: u32) {
        let members = members.max(1);
        if self.members.swap(members, Ordering::SeqCst) != members {
            self.rebuild(members);
            tracing::info!(
                members,
                requests_per_second = self.requests_per_second.map(|r| r / f64::from(members)),
                tokens_per_minute = self.tokens_per_minute.map(|t| t / f64::from(members)),
                "the pipeline's Bedrock budget is shared by a new number of workers"
            );
        }
    }

    /// The member count the share is taken from.
    pub fn members(&self) -> u32 {
        self.members.load(Ordering::SeqCst)
    }

    fn current(&self) -> Arc<Limiters> {
        self.limiters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until this worker's share allows one call of about `tokens` input tokens. A call
    /// that waited on limiters replaced meanwhile (the share changed) waits again on the new
    /// ones: callers queued at the old rate would otherwise keep it after the share dropped.
    pub async fn before_call(&self, tokens: u64) {
        loop {
            let limiters = self.current();
            if let Some(requests) = &limiters.requests {
                requests.until_ready().await;
            }
            take_tokens(&limiters, tokens).await;
            if Arc::ptr_eq(&limiters, &self.current()) {
                return;
            }
        }
    }

    /// Takes the tokens a call used beyond what was taken before it.
    pub async fn after_call(&self, estimated: u64, counted: u64) {
        if counted > estimated {
            take_tokens(&self.current(), counted - estimated).await;
        }
    }
}

/// Waits for `tokens` from the token limiter, in bursts it can give.
async fn take_tokens(limiters: &Limiters, mut tokens: u64) {
    let Some((limiter, burst)) = &limiters.tokens else {
        return;
    };
    while tokens > 0 {
        let n = tokens.min(u64::from(burst.get())) as u32;
        let Some(n) = NonZeroU32::new(n) else { return };
        // `n` is at most the burst, so the limiter can always give it.
        if limiter.until_n_ready(n).await.is_err() {
            return;
        }
        tokens -= u64::from(n.get());
    }
}

/// The input tokens a call of `texts` is estimated to use before the model counts them: a
/// quarter of the characters, at least one per text.
pub fn estimate_tokens(texts: &[String]) -> u64 {
    texts
        .iter()
        .map(|t| (t.chars().count() as u64).div_ceil(4).max(1))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_share_follows_the_member_count() {
        let budget = Budget::new(Some(20), None).unwrap();
        // Alone: 20 calls a second, a burst of 20 at once.
        let started = tokio::time::Instant::now();
        for _ in 0..20 {
            budget.before_call(1).await;
        }
        assert!(started.elapsed() < Duration::from_millis(200));
        // Four members: 5 a second each; after a burst of 5, the next ones wait 200 ms apart.
        budget.set_members(4);
        assert_eq!(budget.members(), 4);
        let started = tokio::time::Instant::now();
        for _ in 0..7 {
            budget.before_call(1).await;
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn callers_queued_before_the_share_dropped_wait_at_the_new_rate() {
        // 40 a second alone; 64 callers queue, then a second member halves the share.
        let budget = Arc::new(Budget::new(Some(40), None).unwrap());
        for _ in 0..40 {
            budget.before_call(1).await;
        }
        let started = tokio::time::Instant::now();
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move { budget.before_call(1).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        budget.set_members(2);
        for caller in callers {
            caller.await.unwrap();
        }
        // At 40 a second the 64 would pass in 1.6 s; at 20 a second (after a fresh burst of
        // 20) they need about 2.2 s.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }

    #[tokio::test]
    async fn tokens_wait_for_the_minute_share_and_big_calls_take_bursts() {
        // 600 tokens a minute: 10 a second, bursts of 10.
        let budget = Budget::new(None, Some(600)).unwrap();
        let started = tokio::time::Instant::now();
        budget.before_call(10).await;
        assert!(started.elapsed() < Duration::from_millis(100));
        // 15 more: 1.5 s of refill.
        budget.before_call(15).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1200) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn no_budget_without_limits_and_estimates_count_characters() {
        assert!(Budget::new(None, None).is_none());
        assert_eq!(estimate_tokens(&["abcdefgh".into(), "".into()]), 3);
    }
}
