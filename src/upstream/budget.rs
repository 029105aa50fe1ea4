//! The retry budget: retries across all commands stay within `retry.budget_percent` of
//! the requests of the last ten seconds, plus `retry.budget_min_per_sec` per second,
//! plus the retries of the last ten seconds that succeeded.
//!
//! A retry that succeeds earns its place back, so retries keep flowing while they
//! work (Chat failing now and then: 30% transient faults with four attempts still
//! serve over 98.5% of requests); when retries are futile (Chat failing completely)
//! nothing is earned and the load on Chat stays within 1 + `budget_percent`/100 of
//! the requests plus the small per-second reserve.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Seconds of history the budget looks at.
pub const WINDOW_SECS: u64 = 10;

/// Requests and retries in one second.
#[derive(Debug, Default)]
struct Slot {
    /// Which second (since the budget's start) the counts are for.
    second: AtomicU64,
    /// Caller requests counted in that second.
    requests: AtomicU64,
    /// Retries taken from the budget in that second.
    retries: AtomicU64,
    /// Retries in that second that got a real answer.
    successes: AtomicU64,
}

/// A sliding ten-second window of requests and retries, lock-free.
#[derive(Debug)]
pub struct RetryBudget {
    /// One slot per second of the window, reused round-robin.
    slots: [Slot; WINDOW_SECS as usize],
    /// The budget's time origin.
    start: Instant,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryBudget {
    /// An empty budget.
    pub fn new() -> Self {
        RetryBudget {
            slots: Default::default(),
            start: Instant::now(),
        }
    }

    fn slot(&self) -> (&Slot, u64) {
        // +1 so that second 0 differs from a never-used slot's 0.
        let sec = self.start.elapsed().as_secs() + 1;
        let slot = &self.slots[(sec % WINDOW_SECS) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != sec
            && slot
                .second
                .compare_exchange(seen, sec, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
            slot.successes.store(0, Ordering::Release);
        }
        (slot, sec)
    }

    /// Counts one caller request.
    pub fn record_request(&self) {
        self.slot().0.requests.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a retry that got a real answer: it earns its place back.
    pub fn retry_succeeded(&self) {
        self.slot().0.successes.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget if there is room; returns whether it may retry.
    pub fn try_retry(&self, percent: u32, min_per_sec: u32) -> bool {
        let (slot, now) = self.slot();
        let (mut requests, mut retries, mut successes) = (0u64, 0u64, 0u64);
        for s in &self.slots {
            let sec = s.second.load(Ordering::Acquire);
            if sec + WINDOW_SECS > now {
                requests += s.requests.load(Ordering::Acquire);
                retries += s.retries.load(Ordering::Acquire);
                successes += s.successes.load(Ordering::Acquire);
            }
        }
        let allowed =
            requests * u64::from(percent) / 100 + u64::from(min_per_sec) * WINDOW_SECS + successes;
        if retries < allowed {
            slot.retries.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_percent_plus_reserve() {
        let b = RetryBudget::new();
        for _ in 0..1000 {
            b.record_request();
        }
        let granted = (0..10_000).filter(|_| b.try_retry(20, 1)).count();
        assert_eq!(granted, 200 + 10);
        let b = RetryBudget::new();
        assert_eq!((0..100).filter(|_| b.try_retry(20, 0)).count(), 0);
    }

    #[test]
    fn successful_retries_earn_their_place_back() {
        let b = RetryBudget::new();
        for _ in 0..100 {
            b.record_request();
        }
        // 20 retries from the percentage; each success allows one more.
        let mut granted = 0;
        while b.try_retry(20, 0) {
            granted += 1;
            if granted <= 30 {
                b.retry_succeeded();
            }
        }
        assert_eq!(granted, 20 + 30);
    }
}
