//! The per-command rate limit towards Chat (200 calls per second per command).
//!
//! Each command has a GCRA bucket with no burst: calls are spaced at least `1/rate`
//! apart, so any one-second window holds at most `rate + 1` calls. A caller reserves its
//! slot and sleeps until it; if the slot is further away than it may wait, it is refused
//! at once (and reserves nothing). Chat's throttling answers pause a command's bucket.
//!
//! [`RateLimiter`] is the small interface the upstream uses, so a limiter shared by many
//! sidecars (Redis) can replace [`LocalRateLimiter`] later.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Commands with a bucket of their own at most; past it, unknown commands share one.
const MAX_BUCKETS: usize = 4096;
/// The shared bucket's name.
const OVERFLOW: &str = "(other)";

/// A refusal: the next free slot is `retry_after` away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// How long until the command's next free slot.
    pub retry_after: Duration,
}

/// What the upstream needs from a rate limiter.
pub trait RateLimiter: Send + Sync + 'static {
    /// Reserves a slot for one call of `command`; returns how long to wait for it, or
    /// refuses when that is longer than `max_wait`.
    fn reserve(&self, command: &str, max_wait: Duration) -> Result<Duration, Throttled>;
    /// Chat throttled `command`: no call before `pause` from now.
    fn pause(&self, command: &str, pause: Duration);
}

/// One command's bucket.
#[derive(Debug)]
struct Gcra {
    /// Time between two calls.
    interval: Duration,
    /// The earliest time the next call may go.
    next_free: Instant,
}

/// Buckets in this process.
#[derive(Debug)]
pub struct LocalRateLimiter {
    /// Calls per second for commands without an override.
    default_rate: u32,
    /// Per-command rates.
    overrides: BTreeMap<String, u32>,
    /// command → bucket, created on first use.
    buckets: RwLock<HashMap<String, Arc<Mutex<Gcra>>>>,
}

impl LocalRateLimiter {
    /// A limiter with `default_rate` calls per second per command and overrides.
    pub fn new(default_rate: u32, overrides: BTreeMap<String, u32>) -> Self {
        LocalRateLimiter {
            default_rate: default_rate.max(1),
            overrides,
            buckets: RwLock::new(HashMap::new()),
        }
    }

    fn bucket(&self, command: &str) -> Arc<Mutex<Gcra>> {
        if let Some(b) = self
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(command)
        {
            return b.clone();
        }
        let mut map = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        let name = if map.len() >= MAX_BUCKETS && !map.contains_key(command) {
            OVERFLOW
        } else {
            command
        };
        let rate = self
            .overrides
            .get(name)
            .copied()
            .unwrap_or(self.default_rate)
            .max(1);
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Gcra {
                    interval: Duration::from_secs(1) / rate,
                    next_free: Instant::now(),
                }))
            })
            .clone()
    }
}

impl RateLimiter for LocalRateLimiter {
    fn reserve(&self, command: &str, max_wait: Duration) -> Result<Duration, Throttled> {
        let bucket = self.bucket(command);
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let slot = b.next_free.max(now);
        let wait = slot - now;
        if wait > max_wait {
            return Err(Throttled { retry_after: wait });
        }
        b.next_free = slot + b.interval;
        Ok(wait)
    }

    fn pause(&self, command: &str, pause: Duration) {
        let bucket = self.bucket(command);
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.next_free = b.next_free.max(Instant::now() + pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_calls_and_refuses_past_the_wait() {
        let l = LocalRateLimiter::new(10, BTreeMap::from([("a/fast".to_string(), 1000)]));
        let max = Duration::from_millis(250);
        let mut waits = Vec::new();
        while let Ok(w) = l.reserve("a/b", max) {
            waits.push(w);
        }
        // 100 ms apart within 250 ms of waiting: slots at 0, 100 and 200 ms.
        assert_eq!(waits.len(), 3, "{waits:?}");
        assert!(waits[2] >= Duration::from_millis(150), "{waits:?}");
        let t = l.reserve("a/b", max).unwrap_err();
        assert!(t.retry_after > max);
        // Another command has its own bucket; an override its own rate.
        assert_eq!(l.reserve("c/d", Duration::ZERO), Ok(Duration::ZERO));
        assert_eq!(l.reserve("a/fast", Duration::ZERO), Ok(Duration::ZERO));
        assert!(l.reserve("a/fast", Duration::from_millis(1)).is_ok());
        l.pause("c/d", Duration::from_secs(60));
        assert!(l.reserve("c/d", Duration::from_secs(1)).is_err());
    }
}
