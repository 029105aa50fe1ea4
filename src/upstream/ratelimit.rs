//! The per-command rate limit towards Chat: at most N calls of a command in **any**
//! one-second window (Chat allows 200 per second per command), bursts of up to N at
//! once allowed.
//!
//! [`LocalRateLimiter`] keeps, per command, the admission instants of its calls of the
//! last second (a sliding-window log, oldest first). A call is admitted at once while
//! fewer than N calls were admitted in the last second; otherwise its slot is one
//! second after the oldest of the last N, and it waits for that slot if it may wait
//! that long. A slot is reserved when it is granted, so waiters never overtake each
//! other's slots. The log holds at most N instants per command and only those of the
//! last second, so its memory follows the calls actually made.
//!
//! [`RateLimiter`] is the small interface the upstream uses: a fleet of gateways
//! shares one limit through Redis behind the same interface.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

/// The window every limit is counted over.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Calls admitted a little apart can reach Chat closer together (a new connection's
/// set-up delays one, scheduling another), so admissions are spaced over the window
/// plus this margin: what *arrives* at Chat still holds N in any one second, at the
/// cost of 2.5% of the rate.
pub const ARRIVAL_MARGIN: Duration = Duration::from_millis(25);
/// The span admissions are counted over.
const SPAN: Duration = WINDOW.saturating_add(ARRIVAL_MARGIN);
/// Commands with a log of their own at most; past it, unknown commands share one.
const MAX_BUCKETS: usize = 4096;
/// The shared log's name.
const OVERFLOW: &str = "(other)";

/// A refusal: the command's next free slot is `retry_after` away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// How long until the command's next free slot.
    pub retry_after: Duration,
}

/// What the upstream needs from a rate limiter.
pub trait RateLimiter: Send + Sync + 'static {
    /// Waits until one call of `command` may go, for at most `max_wait`; refuses at
    /// once (without waiting) when the command's next free slot is further away.
    fn acquire<'a>(
        &'a self,
        command: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<(), Throttled>>;
    /// Chat throttled `command`: no call before `pause` from now.
    fn pause(&self, command: &str, pause: Duration);
}

/// One command's sliding-window log.
#[derive(Debug)]
struct Log {
    /// Calls allowed in any window.
    limit: usize,
    /// Admission instants of the calls of the last window, oldest first; never more
    /// than `limit`. Non-decreasing: a new slot is never before the newest.
    admitted: VecDeque<Instant>,
    /// No call before this (Chat asked us to pause).
    paused_until: Option<Instant>,
}

impl Log {
    fn new(limit: u32) -> Self {
        Log {
            limit: limit.max(1) as usize,
            admitted: VecDeque::new(),
            paused_until: None,
        }
    }

    /// Grants the earliest slot at or after `now`, if it is within `max_wait`.
    fn reserve(&mut self, now: Instant, max_wait: Duration) -> Result<Duration, Throttled> {
        while self.admitted.front().is_some_and(|t| *t + SPAN <= now) {
            self.admitted.pop_front();
        }
        let mut slot = now;
        if let Some(p) = self.paused_until {
            slot = slot.max(p);
        }
        if self.admitted.len() >= self.limit {
            // The oldest of the last `limit` leaves the span (a second and the margin)
            // after it.
            if let Some(oldest) = self.admitted.get(self.admitted.len() - self.limit) {
                slot = slot.max(*oldest + SPAN);
            }
        }
        let wait = slot - now;
        if wait > max_wait {
            return Err(Throttled { retry_after: wait });
        }
        if self.admitted.len() >= self.limit {
            self.admitted.pop_front();
        }
        // In order: a seeded log ([`Log::seed`]) may hold instants past `slot`.
        let pos = self.admitted.partition_point(|t| *t <= slot);
        self.admitted.insert(pos, slot);
        Ok(wait)
    }

    /// Replaces the log with `calls` (sorted instants): what this process must count
    /// as its share of calls made elsewhere. Keeps the newest `limit`.
    fn seed(&mut self, calls: impl Iterator<Item = Instant>) {
        self.admitted.clear();
        self.admitted.extend(calls);
        while self.admitted.len() > self.limit {
            self.admitted.pop_front();
        }
    }

    /// Makes the log full until a second after `until`: as if `limit` calls went
    /// then (keeping any later ones).
    fn fill(&mut self, until: Instant) {
        self.admitted.extend(std::iter::repeat_n(until, self.limit));
        self.admitted.make_contiguous().sort();
        while self.admitted.len() > self.limit {
            self.admitted.pop_front();
        }
    }

    /// Changes the limit; the log keeps the newest `limit` instants.
    fn set_limit(&mut self, limit: u32) {
        self.limit = limit.max(1) as usize;
        while self.admitted.len() > self.limit {
            self.admitted.pop_front();
        }
    }
}

/// Sliding-window logs in this process.
#[derive(Debug)]
pub struct LocalRateLimiter {
    /// Calls per second for commands without an override.
    default_rate: u32,
    /// Per-command rates.
    overrides: BTreeMap<String, u32>,
    /// command → log, created on first use.
    logs: RwLock<HashMap<String, Arc<Mutex<Log>>>>,
    /// Every rate is divided by this (1 alone; a fleet's share when Redis is away).
    share: AtomicU32,
}

impl LocalRateLimiter {
    /// A limiter with `default_rate` calls per second per command and overrides.
    pub fn new(default_rate: u32, overrides: BTreeMap<String, u32>) -> Self {
        LocalRateLimiter {
            default_rate: default_rate.max(1),
            overrides,
            logs: RwLock::new(HashMap::new()),
            share: AtomicU32::new(1),
        }
    }

    /// The limit of `command`: its override or the default, divided by the share
    /// (never below 1).
    pub fn rate_of(&self, command: &str) -> u32 {
        let rate = self
            .overrides
            .get(command)
            .copied()
            .unwrap_or(self.default_rate);
        (rate / self.share.load(Ordering::Relaxed).max(1)).max(1)
    }

    /// Divides every rate by `share` from now on (a fleet's gateways when Redis is
    /// away: each keeps to N / share).
    pub fn set_share(&self, share: u32) {
        let share = share.max(1);
        if self.share.swap(share, Ordering::Relaxed) == share {
            return;
        }
        let logs = self.logs.read().unwrap_or_else(|p| p.into_inner());
        for (name, log) in logs.iter() {
            let rate = self.rate_of(name);
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_limit(rate);
        }
    }

    /// Counts `command` as used up to its limit at `until`: nothing goes until a
    /// second after it (the fleet may have used everything, and nobody can say).
    pub fn fill(&self, command: &str, until: Instant) {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.fill(until);
    }

    /// The fleet's recent calls of `command` (instants with counts, in any order): this
    /// limiter, should it take over, counts its share of them. Of the calls sorted by
    /// time it keeps every `share`-th from the newest, so any window reaching to the
    /// present holds `1/share` of the fleet's calls in it, rounded up. Replaces what
    /// the log held (an earlier view of the same window).
    pub fn seed(&self, command: &str, fleet_calls: &[(Instant, u32)]) {
        let share = self.share.load(Ordering::Relaxed).max(1) as usize;
        let mut all: Vec<Instant> = fleet_calls
            .iter()
            .flat_map(|(t, n)| std::iter::repeat_n(*t, *n as usize))
            .collect();
        all.sort();
        let mine: Vec<Instant> = all.iter().rev().step_by(share).rev().copied().collect();
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.seed(mine.into_iter());
    }

    fn log(&self, command: &str) -> Arc<Mutex<Log>> {
        if let Some(b) = self
            .logs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(command)
        {
            return b.clone();
        }
        let mut map = self.logs.write().unwrap_or_else(|p| p.into_inner());
        let name = if map.len() >= MAX_BUCKETS && !map.contains_key(command) {
            OVERFLOW
        } else {
            command
        };
        let rate = self.rate_of(name);
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Log::new(rate))))
            .clone()
    }

    /// Reserves the earliest slot for one call of `command`: how long to wait for it,
    /// or a refusal when that is longer than `max_wait`.
    pub fn reserve(&self, command: &str, max_wait: Duration) -> Result<Duration, Throttled> {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.reserve(Instant::now(), max_wait)
    }
}

impl RateLimiter for LocalRateLimiter {
    fn acquire<'a>(
        &'a self,
        command: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<(), Throttled>> {
        let reserved = self.reserve(command, max_wait);
        Box::pin(async move {
            let wait = reserved?;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            Ok(())
        })
    }

    fn pause(&self, command: &str, pause: Duration) {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + pause;
        log.paused_until = Some(log.paused_until.map_or(until, |p| p.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most `limit` slots in any window of one second and the margin.
    fn assert_window(slots: &[Instant], limit: usize) {
        for (i, a) in slots.iter().enumerate() {
            let within = slots[i..].iter().take_while(|b| **b < *a + SPAN).count();
            assert!(
                within <= limit,
                "{within} slots in one second (limit {limit})"
            );
        }
    }

    #[test]
    fn bursts_up_to_the_limit_then_one_second_after_the_oldest() {
        let t0 = Instant::now();
        let mut log = Log::new(5);
        // A burst of five goes at once.
        for _ in 0..5 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(Duration::ZERO));
        }
        // The sixth must wait a full second (and the margin) after the first.
        let later = t0 + Duration::from_millis(300);
        assert_eq!(
            log.reserve(later, Duration::from_millis(100)),
            Err(Throttled {
                retry_after: Duration::from_millis(725)
            })
        );
        assert_eq!(
            log.reserve(later, Duration::from_secs(1)),
            Ok(Duration::from_millis(725))
        );
        // A refused call reserved nothing; past a second the window is free again.
        let much_later = t0 + Duration::from_secs(3);
        for _ in 0..5 {
            assert_eq!(log.reserve(much_later, Duration::ZERO), Ok(Duration::ZERO));
        }
        assert!(
            log.admitted.len() <= 5,
            "the log never holds more than the limit"
        );
    }

    #[test]
    fn a_call_just_past_one_second_still_keeps_the_margin() {
        let t0 = Instant::now();
        let mut log = Log::new(1);
        assert_eq!(log.reserve(t0, Duration::ZERO), Ok(Duration::ZERO));
        // 1.010 s later the first call is still within the span: wait 15 ms.
        assert_eq!(
            log.reserve(t0 + Duration::from_millis(1010), Duration::from_secs(1)),
            Ok(Duration::from_millis(15))
        );
    }

    #[test]
    fn any_one_second_window_holds_at_most_the_limit() {
        let t0 = Instant::now();
        let mut log = Log::new(20);
        let mut slots = Vec::new();
        // Calls arriving every 7 ms for 3 s, each willing to wait up to 2 s.
        for i in 0..430u64 {
            let now = t0 + Duration::from_millis(7 * i);
            if let Ok(w) = log.reserve(now, Duration::from_secs(2)) {
                slots.push(now + w);
            }
        }
        slots.sort();
        assert_window(&slots, 20);
        // ... and the limit is used: 20 per 1.025 s over the 3 s plus the waiting tail.
        assert!(slots.len() >= 58, "{} slots", slots.len());
    }

    #[test]
    fn a_share_divides_the_rate_and_seeded_calls_count() {
        let l = LocalRateLimiter::new(50, BTreeMap::new());
        l.set_share(3);
        assert_eq!(l.rate_of("a/b"), 16);
        // The fleet counted 30 calls: this gateway's share of them is 10.
        let until = Instant::now() + Duration::from_millis(100);
        l.seed(
            "a/b",
            &[(until, 20), (until - Duration::from_millis(50), 10)],
        );
        for _ in 0..6 {
            assert_eq!(l.reserve("a/b", Duration::ZERO), Ok(Duration::ZERO));
        }
        let t = l.reserve("a/b", Duration::ZERO).unwrap_err();
        assert!(
            t.retry_after > Duration::from_millis(900),
            "10 seeded + 6 = 16: the next slot is a second after the oldest"
        );
        l.set_share(100);
        assert_eq!(l.rate_of("a/b"), 1, "never below one");
    }

    #[test]
    fn pause_defers_every_slot_and_overrides_apply() {
        let l = LocalRateLimiter::new(10, BTreeMap::from([("a/fast".to_string(), 1000)]));
        assert_eq!(l.rate_of("a/fast"), 1000);
        assert_eq!(l.rate_of("a/b"), 10);
        for _ in 0..10 {
            assert_eq!(l.reserve("a/b", Duration::ZERO), Ok(Duration::ZERO));
        }
        assert!(l.reserve("a/b", Duration::ZERO).is_err());
        // Another command has its own log.
        assert_eq!(l.reserve("c/d", Duration::ZERO), Ok(Duration::ZERO));
        l.pause("c/d", Duration::from_secs(60));
        let t = l.reserve("c/d", Duration::from_secs(1)).unwrap_err();
        assert!(t.retry_after > Duration::from_secs(59));
    }
}
