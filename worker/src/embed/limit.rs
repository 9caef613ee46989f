//! An adaptive cap on concurrent embedding calls: halved when Bedrock throttles, raised by one
//! after a window of successes, between 1 and the spec's `maxInFlight` (additive increase,
//! multiplicative decrease).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Throttles arriving within this long of a decrease count as the same congestion event.
const DECREASE_HOLDOFF: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    successes: usize,
    last_decrease: Option<Instant>,
}

/// The shared limiter.
#[derive(Clone, Debug)]
pub struct AdaptiveLimit {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    max: usize,
}

/// A slot for one call; freed on drop.
#[derive(Debug)]
pub struct Slot {
    limit: AdaptiveLimit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit.lock().in_flight -= 1;
        self.limit.changed.notify_waiters();
    }
}

impl AdaptiveLimit {
    /// Starts at `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            state: Arc::new(Mutex::new(State {
                limit: max,
                in_flight: 0,
                successes: 0,
                last_decrease: None,
            })),
            changed: Arc::new(Notify::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a free slot under the current limit.
    pub async fn acquire(&self) -> Slot {
        loop {
            let notified = self.changed.notified();
            {
                let mut state = self.lock();
                if state.in_flight < state.limit {
                    state.in_flight += 1;
                    return Slot {
                        limit: self.clone(),
                    };
                }
            }
            notified.await;
        }
    }

    /// A call succeeded: after `limit` successes the limit grows by one.
    pub fn on_success(&self) {
        let mut state = self.lock();
        state.successes += 1;
        if state.successes >= state.limit && state.limit < self.max {
            state.limit += 1;
            state.successes = 0;
            drop(state);
            self.changed.notify_waiters();
        }
    }

    /// A call was throttled: halve the limit (once per congestion event).
    pub fn on_throttle(&self) {
        self.on_throttle_at(Instant::now());
    }

    fn on_throttle_at(&self, now: Instant) {
        let mut state = self.lock();
        if state
            .last_decrease
            .is_some_and(|t| now.duration_since(t) < DECREASE_HOLDOFF)
        {
            return;
        }
        state.limit = (state.limit / 2).max(1);
        state.successes = 0;
        state.last_decrease = Some(now);
    }

    /// The current limit.
    pub fn current(&self) -> usize {
        self.lock().limit
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_halves_and_successes_climb_back() {
        let limit = AdaptiveLimit::new(16);
        let t0 = Instant::now();
        limit.on_throttle_at(t0);
        assert_eq!(limit.current(), 8);
        limit.on_throttle_at(t0 + Duration::from_millis(10));
        assert_eq!(limit.current(), 8, "a burst of throttles is one event");
        limit.on_throttle_at(t0 + Duration::from_secs(1));
        assert_eq!(limit.current(), 4);
        for _ in 0..4 {
            limit.on_success();
        }
        assert_eq!(limit.current(), 5);
        for _ in 0..1000 {
            limit.on_success();
        }
        assert_eq!(limit.current(), 16, "never above the configured maximum");
    }

    #[test]
    fn never_below_one() {
        let limit = AdaptiveLimit::new(2);
        let t0 = Instant::now();
        for i in 0..5 {
            limit.on_throttle_at(t0 + Duration::from_secs(i));
        }
        assert_eq!(limit.current(), 1);
    }

    #[tokio::test]
    async fn acquire_waits_for_a_free_slot() {
        let limit = AdaptiveLimit::new(1);
        let first = limit.acquire().await;
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move {
                let _slot = limit.acquire().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second call must wait");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("released slot wakes the waiter")
            .expect("task ran");
        assert_eq!(limit.in_flight(), 0);
    }
}
