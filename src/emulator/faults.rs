//! Fault injection: the live settings (changeable at run time without locks on the
//! hot path), the random draws that decide each call's fate, and Chat's per-command
//! rate limit.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::config::FaultSettings;
use super::rng::{mix64, unit_f64};

/// What happens to one call, decided when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Run normally.
    Normal,
    /// Answer this code (50004 or 50005) instead of running the command.
    Fail(i64),
}

/// The settings in force, readable from any thread without locking.
pub(crate) struct LiveFaults {
    fail_50004: AtomicU64,
    fail_50005: AtomicU64,
    drop_rate: AtomicU64,
    latency_ms: AtomicU64,
    jitter_ms: AtomicU64,
    rate_limit: AtomicU32,
    /// Serializes updates so that a partial update never mixes with another.
    update: Mutex<()>,
    /// Draw counter: draws are `mix64(seed + n)`, so a sequential client sees the
    /// same faults on every run with the same seed.
    draws: AtomicU64,
    seed: u64,
}

/// A partial update from `POST /__emulator/faults`: only the fields present change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultUpdate {
    fail_50004: Option<f64>,
    fail_50005: Option<f64>,
    drop_rate: Option<f64>,
    latency_ms: Option<u64>,
    jitter_ms: Option<u64>,
    rate_limit: Option<u32>,
}

impl LiveFaults {
    /// Live settings starting at `s`; draws seeded with `seed`.
    pub(crate) fn new(s: FaultSettings, seed: u64) -> LiveFaults {
        let live = LiveFaults {
            fail_50004: AtomicU64::new(0),
            fail_50005: AtomicU64::new(0),
            drop_rate: AtomicU64::new(0),
            latency_ms: AtomicU64::new(0),
            jitter_ms: AtomicU64::new(0),
            rate_limit: AtomicU32::new(0),
            update: Mutex::new(()),
            draws: AtomicU64::new(0),
            seed: mix64(seed ^ 0xFA17),
        };
        live.store(&s);
        live
    }

    fn store(&self, s: &FaultSettings) {
        self.fail_50004
            .store(s.fail_50004.to_bits(), Ordering::Relaxed);
        self.fail_50005
            .store(s.fail_50005.to_bits(), Ordering::Relaxed);
        self.drop_rate
            .store(s.drop_rate.to_bits(), Ordering::Relaxed);
        self.latency_ms.store(s.latency_ms, Ordering::Relaxed);
        self.jitter_ms.store(s.jitter_ms, Ordering::Relaxed);
        self.rate_limit.store(s.rate_limit, Ordering::Relaxed);
    }

    /// The settings in force.
    pub(crate) fn get(&self) -> FaultSettings {
        FaultSettings {
            fail_50004: f64::from_bits(self.fail_50004.load(Ordering::Relaxed)),
            fail_50005: f64::from_bits(self.fail_50005.load(Ordering::Relaxed)),
            drop_rate: f64::from_bits(self.drop_rate.load(Ordering::Relaxed)),
            latency_ms: self.latency_ms.load(Ordering::Relaxed),
            jitter_ms: self.jitter_ms.load(Ordering::Relaxed),
            rate_limit: self.rate_limit.load(Ordering::Relaxed),
        }
    }

    /// Applies a partial update after validating the result; returns the new settings.
    pub(crate) fn update(&self, u: &FaultUpdate) -> Result<FaultSettings, String> {
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = self.get();
        if let Some(v) = u.fail_50004 {
            s.fail_50004 = v;
        }
        if let Some(v) = u.fail_50005 {
            s.fail_50005 = v;
        }
        if let Some(v) = u.drop_rate {
            s.drop_rate = v;
        }
        if let Some(v) = u.latency_ms {
            s.latency_ms = v;
        }
        if let Some(v) = u.jitter_ms {
            s.jitter_ms = v;
        }
        if let Some(v) = u.rate_limit {
            s.rate_limit = v;
        }
        s.validate()?;
        self.store(&s);
        Ok(s)
    }

    /// The next draw in `[0, 1)`.
    fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        unit_f64(mix64(self.seed.wrapping_add(n)))
    }

    /// The delay to add to a call (fixed plus uniform jitter), if any.
    pub(crate) fn delay(&self, s: &FaultSettings) -> Option<Duration> {
        if s.latency_ms == 0 && s.jitter_ms == 0 {
            return None;
        }
        let jitter = if s.jitter_ms == 0 {
            0
        } else {
            (self.draw() * (s.jitter_ms + 1) as f64) as u64
        };
        Some(Duration::from_millis(
            s.latency_ms.saturating_add(jitter.min(s.jitter_ms)),
        ))
    }

    /// Whether this call's connection is dropped after the command ran.
    pub(crate) fn drops(&self, s: &FaultSettings) -> bool {
        s.drop_rate > 0.0 && self.draw() < s.drop_rate
    }

    /// Whether this call is answered 50004 / 50005 instead of running.
    pub(crate) fn fate(&self, s: &FaultSettings) -> Fate {
        if s.fail_50004 <= 0.0 && s.fail_50005 <= 0.0 {
            return Fate::Normal;
        }
        let r = self.draw();
        if r < s.fail_50004 {
            Fate::Fail(50004)
        } else if r < s.fail_50004 + s.fail_50005 {
            Fate::Fail(50005)
        } else {
            Fate::Normal
        }
    }
}

/// Chat's per-command call frequency limit: a fixed one-second window per command
/// (windows start at whole seconds since the emulator started). Lock free: each
/// command's window is one atomic word, `second << 32 | calls`.
pub(crate) struct RateLimiter {
    start: Instant,
    windows: Vec<AtomicU64>,
}

impl RateLimiter {
    /// A limiter for `commands` commands.
    pub(crate) fn new(commands: usize, start: Instant) -> RateLimiter {
        RateLimiter {
            start,
            windows: (0..commands).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts a call of `command` at `now`; false when it is over `limit` in the
    /// current window (0 disables the limit; refused calls are not counted).
    pub(crate) fn admit(&self, command: usize, limit: u32, now: Instant) -> bool {
        if limit == 0 {
            return true;
        }
        let Some(slot) = self.windows.get(command) else {
            return true;
        };
        let sec = now.saturating_duration_since(self.start).as_secs() & 0xFFFF_FFFF;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (window, calls) = (cur >> 32, cur & 0xFFFF_FFFF);
            let next = if window == sec {
                if calls >= u64::from(limit) {
                    return false;
                }
                cur + 1
            } else {
                (sec << 32) | 1
            };
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_per_window_and_per_command() {
        let t0 = Instant::now();
        let l = RateLimiter::new(2, t0);
        let ok = (0..300).filter(|_| l.admit(0, 200, t0)).count();
        assert_eq!(ok, 200);
        assert!(l.admit(1, 200, t0), "another command has its own window");
        let t1 = t0 + Duration::from_millis(1000);
        assert!(l.admit(0, 200, t1), "a new second starts a new window");
        assert!((0..1000).all(|_| l.admit(0, 0, t1)), "0 disables");
    }

    #[test]
    fn fates_follow_the_rates() {
        let f = LiveFaults::new(
            FaultSettings {
                fail_50004: 0.1,
                fail_50005: 0.3,
                ..FaultSettings::default()
            },
            1,
        );
        let s = f.get();
        let n = 20_000;
        let (mut a, mut b) = (0, 0);
        for _ in 0..n {
            match f.fate(&s) {
                Fate::Fail(50004) => a += 1,
                Fate::Fail(_) => b += 1,
                Fate::Normal => {}
            }
        }
        assert!((a as f64 / n as f64 - 0.1).abs() < 0.01, "{a}");
        assert!((b as f64 / n as f64 - 0.3).abs() < 0.015, "{b}");
    }

    #[test]
    fn updates_are_partial_and_validated() {
        let f = LiveFaults::new(FaultSettings::default(), 1);
        let u: FaultUpdate = serde_json::from_str(r#"{"latency_ms": 5}"#).unwrap();
        let s = f.update(&u).unwrap();
        assert_eq!(s.latency_ms, 5);
        assert_eq!(s.rate_limit, 200);
        let bad: FaultUpdate = serde_json::from_str(r#"{"drop_rate": 2.0}"#).unwrap();
        assert!(f.update(&bad).is_err());
        assert_eq!(f.get().drop_rate, 0.0);
        assert!(serde_json::from_str::<FaultUpdate>(r#"{"nope": 1}"#).is_err());
        let d = f.delay(&f.get()).unwrap();
        assert_eq!(d, Duration::from_millis(5));
    }
}
