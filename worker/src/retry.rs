//! Waiting between attempts: one backoff rule and one "until it works" loop for the whole worker.

use std::time::Duration;

/// Full-jitter exponential backoff: a random wait up to `base * 2^attempt`, capped at `max`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

/// The waits of one kind of retried work.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// The first wait's ceiling.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl RetryPolicy {
    /// Writes to OpenSearch and Kafka that a record's commit waits for.
    pub const WRITES: Self = Self {
        base: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };
    /// `_bulk` items that OpenSearch pushed back (429, 5xx).
    pub const BULK: Self = Self {
        base: Duration::from_millis(100),
        max: Duration::from_secs(30),
    };
    /// Reaching OpenSearch before the worker starts.
    pub const STARTUP: Self = Self {
        base: Duration::from_millis(500),
        max: Duration::from_secs(15),
    };

    /// The wait before attempt `attempt` (1 after the first failure).
    pub fn wait(&self, attempt: u32) -> Duration {
        backoff(self.base, self.max, attempt)
    }
}

/// Runs `op` until it succeeds, waiting by `policy` between failures: for work that must happen
/// before a record counts as done (its offset waits meanwhile).
pub async fn until_done<T, E, F>(what: &str, policy: RetryPolicy, mut op: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "{what} failed; retrying");
                tokio::time::sleep(policy.wait(attempt)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            assert!(backoff(base, max, attempt) <= max);
        }
        assert!(backoff(base, max, 0) <= base);
    }
}
