//! An adaptive cap on concurrent embedding calls: halved when Bedrock throttles, raised by one
//! after a window of successes, between 1 and the spec's `maxInFlight` (additive increase,
//! multiplicative decrease).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Throttles arriving within this long of a decrease count as the same congestion event.
const DECREASE_HOLDOFF: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct State {
    limit: usize,
    successes: usize,
    last_decrease: Option<Instant>,
    /// Permits still to take out of circulation after a decrease: slots in use when the limit
    /// fell are not given back when they are freed, until this is paid.
    debt: usize,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// One permit per call allowed now. Tokio's semaphore is fair and wakes one waiter per
    /// freed permit: a call that ends starts exactly one waiting call (waking every waiter
    /// instead cost a wake-up per waiting call, hundreds per call at a high `maxInFlight`).
    permits: Arc<Semaphore>,
    in_flight: AtomicUsize,
}

/// The shared limiter.
#[derive(Clone, Debug)]
pub struct AdaptiveLimit {
    inner: Arc<Inner>,
    max: usize,
}

/// A slot for one call; freed on drop.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Inner>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut state = self.inner.lock();
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        } else {
            drop(state);
            drop(permit);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AdaptiveLimit {
    /// Starts at `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    limit: max,
                    successes: 0,
                    last_decrease: None,
                    debt: 0,
                }),
                permits: Arc::new(Semaphore::new(max)),
                in_flight: AtomicUsize::new(0),
            }),
            max,
        }
    }

    /// Waits for a free slot under the current limit, in the order the callers asked.
    pub async fn acquire(&self) -> Slot {
        // The semaphore is never closed, so the permit is always there.
        let permit = self.inner.permits.clone().acquire_owned().await.ok();
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        Slot {
            inner: self.inner.clone(),
            permit,
        }
    }

    /// A call succeeded: after `limit` successes the limit grows by one.
    pub fn on_success(&self) {
        let mut state = self.inner.lock();
        state.successes += 1;
        if state.successes >= state.limit && state.limit < self.max {
            state.limit += 1;
            state.successes = 0;
            if state.debt > 0 {
                state.debt -= 1;
            } else {
                self.inner.permits.add_permits(1);
            }
        }
    }

    /// A call was throttled: halve the limit (once per congestion event).
    pub fn on_throttle(&self) {
        self.on_throttle_at(Instant::now());
    }

    fn on_throttle_at(&self, now: Instant) {
        let mut state = self.inner.lock();
        if state
            .last_decrease
            .is_some_and(|t| now.duration_since(t) < DECREASE_HOLDOFF)
        {
            return;
        }
        let lower = (state.limit / 2).max(1);
        let remove = state.limit - lower;
        // Free permits go at once; the rest as the calls holding them end.
        let forgotten = self.inner.permits.forget_permits(remove);
        state.debt += remove - forgotten;
        state.limit = lower;
        state.successes = 0;
        state.last_decrease = Some(now);
    }

    /// The current limit.
    pub fn current(&self) -> usize {
        self.inner.lock().limit
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
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

    /// Halving while every slot is in use: the freed slots are not handed out again until the
    /// calls in flight fit under the new limit, and a raise lets exactly one more call start.
    #[tokio::test]
    async fn a_decrease_with_every_slot_taken_holds_new_calls_until_they_fit() {
        let limit = AdaptiveLimit::new(4);
        let mut slots = Vec::new();
        for _ in 0..4 {
            slots.push(limit.acquire().await);
        }
        limit.on_throttle_at(Instant::now());
        assert_eq!((limit.current(), limit.in_flight()), (2, 4));
        let try_one = |limit: &AdaptiveLimit| {
            let limit = limit.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(30), limit.acquire())
                    .await
                    .ok()
            }
        };
        slots.pop();
        slots.pop();
        assert_eq!(limit.in_flight(), 2);
        assert!(
            try_one(&limit).await.is_none(),
            "2 in flight at a limit of 2"
        );
        slots.pop();
        let third = try_one(&limit).await;
        assert!(third.is_some(), "1 in flight at a limit of 2");
        assert!(try_one(&limit).await.is_none(), "2 in flight again");
        // Two successes at a limit of 2 raise it to 3: one more call may start, not two.
        limit.on_success();
        limit.on_success();
        assert_eq!(limit.current(), 3);
        let fourth = try_one(&limit).await;
        assert!(fourth.is_some(), "3 allowed");
        assert!(try_one(&limit).await.is_none(), "never more than the limit");
        drop((third, fourth, slots));
        assert_eq!(limit.in_flight(), 0);
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
