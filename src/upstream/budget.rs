//! Retry throttling: a token bucket that lets retries through while Chat mostly works
//! and shuts them off when it mostly fails (in the manner of gRPC's retry throttling
//! and the AWS SDKs' adaptive retry mode).
//!
//! - A retry takes one token; with less than one token left it is not made (the
//!   caller gets the error at hand, counted in `chat_gateway_retry_budget_exhausted_total`).
//! - Every caller request adds `retry.budget_percent` / 100 of a token.
//! - Every call Chat answers (an envelope that is neither a transient failure nor
//!   throttling) adds [`ANSWER_CREDIT`] of a token.
//! - `retry.budget_min_per_sec` tokens are added per second (0 by default).
//! - The bucket holds at most [`CAPACITY`] tokens and starts full.
//!
//! So retries can never exceed half the calls Chat answered, plus `budget_percent` %
//! of the requests, plus `budget_min_per_sec` per second, plus the bucket. When Chat
//! fails every call nothing is answered: the calls per request converge to
//! 1 + `budget_percent`/100 (1.05 with the defaults). When faults are sporadic (30% of
//! calls failing at random), each request adds about half a token for the answer it
//! gets and needs about 0.4 of one for its retries, so the bucket stays full and every
//! retry is made. In between, retries are throttled smoothly: at most
//! 1.5 + `budget_percent`/100 calls per request however badly Chat fails (a request
//! gets at most one answer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Tokens the bucket holds at most (and starts with).
pub const CAPACITY: u64 = 20;
/// Thousandths of a token, the bucket's unit.
const MILLI: u64 = 1000;
/// What an answered call adds, in thousandths of a token (one half).
pub const ANSWER_CREDIT: u64 = MILLI / 2;

/// The retry bucket, lock-free.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    tokens: AtomicU64,
    /// Milliseconds since `start` up to which the per-second refill was added.
    refilled_ms: AtomicU64,
    start: Instant,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryBudget {
    /// A full bucket.
    pub fn new() -> Self {
        RetryBudget {
            tokens: AtomicU64::new(CAPACITY * MILLI),
            refilled_ms: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn add(&self, milli: u64) {
        if milli == 0 {
            return;
        }
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t + milli).min(CAPACITY * MILLI))
            });
    }

    /// Counts one caller request: `percent` / 100 of a token.
    pub fn record_request(&self, percent: u32) {
        self.add(u64::from(percent) * MILLI / 100);
    }

    /// Counts a call Chat answered.
    pub fn answered(&self) {
        self.add(ANSWER_CREDIT);
    }

    /// Tokens left (for tests and metrics).
    pub fn tokens(&self) -> f64 {
        self.tokens.load(Ordering::Acquire) as f64 / MILLI as f64
    }

    /// Takes one token for a retry if there is one, after adding `min_per_sec` tokens
    /// per second since the last refill; returns whether the retry may be made.
    pub fn try_retry(&self, min_per_sec: u32) -> bool {
        if min_per_sec > 0 {
            let now = self.start.elapsed().as_millis() as u64;
            let last = self.refilled_ms.swap(now, Ordering::AcqRel);
            self.add(now.saturating_sub(last) * u64::from(min_per_sec));
        }
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                t.checked_sub(MILLI)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_failure_converges_to_the_percentage() {
        let b = RetryBudget::new();
        let mut calls = 0u64;
        for _ in 0..10_000 {
            b.record_request(5);
            calls += 1;
            // Every call fails; up to two retries.
            for _ in 0..2 {
                if b.try_retry(0) {
                    calls += 1;
                } else {
                    break;
                }
            }
        }
        let per_request = calls as f64 / 10_000.0;
        assert!(
            (1.049..=1.053).contains(&per_request),
            "{per_request} calls per request"
        );
    }

    #[test]
    fn sporadic_faults_are_always_retried() {
        let b = RetryBudget::new();
        let mut x = 0x9E3779B97F4A7C15u64;
        let mut fail = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % 10 < 3
        };
        let (mut ok, mut denied) = (0, 0);
        for _ in 0..100_000 {
            b.record_request(5);
            for attempt in 1..=4 {
                if !fail() {
                    b.answered();
                    ok += 1;
                    break;
                }
                if attempt == 4 {
                    break;
                }
                if !b.try_retry(0) {
                    denied += 1;
                    break;
                }
            }
        }
        assert_eq!(denied, 0, "{ok} ok");
        assert!(ok > 99_000, "{ok}");
    }

    #[test]
    fn heavy_failure_is_throttled_to_half_the_answers() {
        let b = RetryBudget::new();
        let (mut calls, mut answers) = (0u64, 0u64);
        for i in 0..10_000u64 {
            b.record_request(0);
            // 70% of calls fail.
            for attempt in 0..3u64 {
                calls += 1;
                if (i * 3 + attempt) % 10 < 3 {
                    b.answered();
                    answers += 1;
                    break;
                }
                if attempt == 2 || !b.try_retry(0) {
                    break;
                }
            }
        }
        let retries = calls - 10_000;
        assert!(
            retries <= answers / 2 + CAPACITY,
            "{retries} retries, {answers} answers"
        );
    }

    #[test]
    fn a_reserve_per_second_refills() {
        let Some(start) = Instant::now().checked_sub(std::time::Duration::from_secs(1)) else {
            return;
        };
        let b = RetryBudget {
            tokens: AtomicU64::new(0),
            refilled_ms: AtomicU64::new(0),
            start,
        };
        assert!(!b.try_retry(0));
        // A second has passed since the last refill: ten tokens at 10 per second.
        assert!(b.try_retry(10));
        assert!(b.tokens() >= 8.9, "{}", b.tokens());
    }
}
