//! The per-command rate limit towards Chat: at most N calls of a command in **any**
//! one-second window (Chat allows 200 per second per command), with callers served in
//! order on a smooth schedule instead of being refused while a window drains.
//!
//! ## The schedule
//!
//! Each command has a log of the slots it granted (admission instants, earliest first;
//! slots in the future are reserved for callers waiting for them). A new call gets
//! the earliest slot that satisfies, in this order:
//!
//! 1. **Burst after idle.** When the limiter is idle (nothing reserved ahead, and the
//!    last slot is at least one pace `T = span / N` old) a *burst* opens: calls that
//!    arrive while it is open go **at once**, as long as the span holds fewer than
//!    `B = ratelimit.burst_percent` % of N. The burst closes when the first call
//!    admitted since it opened comes back from Chat ([`RateLimiter::returned`]): what
//!    arrives within one round trip of idle is concurrent demand; callers that come
//!    back for more are paced. (Without that rule a few callers in a closed loop would
//!    use the whole burst within milliseconds, and pay for it with a long pause.)
//! 2. **Pace, spread over the window.** Otherwise a slot is at least `T` after the
//!    last one, and further apart when the window is partly used: when the span ending
//!    at the last slot holds M calls, the R = N − M that are left are spread evenly
//!    until the oldest of them leaves the span. So after a burst of B the remaining
//!    N − B go one every `span / (N − B + 1)`, and the schedule never stalls waiting
//!    for a window to roll over; with no burst in the window the pace is `T`.
//! 3. **Exactness.** Whatever the above say, a slot is never earlier than one span
//!    after the N-th newest slot (a sliding-window log), nor before a pause Chat asked
//!    for. So any span holds at most N slots.
//!
//! A caller whose slot is further than its wait allows (`ratelimit.max_wait_ms`, or its
//! deadline) is refused at once and reserves nothing; a caller that gives up while
//! waiting gives its slot back. Waiters are served in the order they asked.
//!
//! The span is the window plus [`ARRIVAL_MARGIN`]: calls admitted a little apart can
//! reach Chat closer together (a new connection's set-up delays one, scheduling
//! another), so what *arrives* at Chat still holds N in any second. A caller woken
//! more than [`MAX_LATE`] after its slot has its slot moved to now when every span
//! still holds at most N with it there (it keeps its turn), and asks again otherwise
//! (a busy machine costs waits, never the limit). The cost: at
//! saturation N calls go per 1.06 s (188/s for N = 200), and after a burst of B the
//! rest of that window is paced at (N − B) per span.
//!
//! The fleet's limiter ([`crate::fleet::limiter`]) runs the same schedule in a Redis
//! script, on Redis's clock, over the fleet's window.
//!
//! [`RateLimiter`] is the small interface the upstream uses; the local limiter and the
//! fleet's implement it.

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
/// cost of 6% of the rate. It covers waking up to [`MAX_LATE`] late and 40 ms on the
/// way to Chat (the fleet budgets the same: `redis.lease_ms` and
/// `redis.latency_allowance_ms`).
pub const ARRIVAL_MARGIN: Duration = Duration::from_millis(60);
/// The span admissions are counted over.
pub const SPAN: Duration = WINDOW.saturating_add(ARRIVAL_MARGIN);
/// A caller woken later than this after its slot does not go: it asks again. So a
/// call leaves within this of its slot, and the rest of the margin covers the way to
/// Chat.
pub const MAX_LATE: Duration = Duration::from_millis(20);
/// Commands with a log of their own at most; past it, unknown commands share one.
const MAX_BUCKETS: usize = 4096;
/// The shared log's name.
const OVERFLOW: &str = "(other)";

/// A go-ahead for one call: it must leave before [`Permit::until`]. Dropped unused,
/// its slot goes back (to the next waiting caller, or the schedule).
pub struct Permit {
    until: Instant,
    /// Called once: with `true` when the call leaves (returns whether it may), with
    /// `false` when the permit is dropped unused.
    settle: Option<Box<dyn FnOnce(bool) -> bool + Send + Sync>>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// A permit valid until `until`; `settle` is told whether it was used.
    pub fn new(until: Instant, settle: impl FnOnce(bool) -> bool + Send + Sync + 'static) -> Self {
        Permit {
            until,
            settle: Some(Box::new(settle)),
        }
    }

    /// When it stops being valid.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// The call leaves now. Returns false (and the permit is gone) when it is no
    /// longer valid: the caller must ask again.
    pub fn go(mut self) -> bool {
        let settle = self.settle.take();
        if Instant::now() >= self.until {
            if let Some(f) = settle {
                f(false);
            }
            return false;
        }
        settle.is_none_or(|f| f(true))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(f) = self.settle.take() {
            f(false);
        }
    }
}

/// A refusal: the command's next free slot is `retry_after` away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// How long until the command's next free slot.
    pub retry_after: Duration,
}

/// What the upstream needs from a rate limiter.
pub trait RateLimiter: Send + Sync + 'static {
    /// Waits for one call of `command`'s slot, for at most `max_wait`; refuses at once
    /// (without waiting) when the slot would be further away. The permit is valid
    /// when it is returned; the call leaves with [`Permit::go`]. Dropping the future
    /// before it finishes, or the permit unused, gives the slot back.
    fn acquire<'a>(
        &'a self,
        command: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Permit, Throttled>>;
    /// Chat throttled `command`: no call before `pause` from now. The future ends once
    /// the pause holds wherever it must (for a fleet, once Redis has it or could not
    /// take it in time), so that the caller is answered after, not before.
    fn pause<'a>(&'a self, command: &'a str, pause: Duration) -> BoxFuture<'a, ()>;
    /// A call of `command` came back from Chat (whatever the outcome): the burst that
    /// opened when the limiter was idle is over (see the module doc).
    fn returned(&self, command: &str);
}

/// The pace at limit `n`: `span / n`.
pub fn pace(span: Duration, n: usize) -> Duration {
    span / (n.clamp(1, u32::MAX as usize) as u32)
}

/// The burst size at limit `n`: `percent` % of it, at least 1.
pub fn burst_of(n: usize, percent: u32) -> usize {
    (n * percent as usize / 100).clamp(1, n.max(1))
}

/// One command's log and schedule.
#[derive(Debug)]
struct Log {
    /// Calls allowed in any span, N.
    limit: usize,
    /// Calls a burst may admit at once, B.
    burst: usize,
    /// Slots granted and still within the span, earliest first (future ones are
    /// reserved for waiting callers). Non-decreasing: a new slot is never before the
    /// newest.
    admitted: VecDeque<Instant>,
    /// No call before this (Chat asked us to pause).
    paused_until: Option<Instant>,
    /// Count the span up to this instant as full (the fleet's calls it cannot see).
    full_until: Option<Instant>,
    /// A burst is open: the limiter was idle when it began and no call admitted since
    /// has come back.
    burst_open: bool,
    /// The span calls are counted over.
    span: Duration,
    /// Seeded from a frozen view of the fleet's log: the fleet's calls (each as the
    /// interval it may leave within), the fleet's limit N and this gateway's weight G.
    /// Any span then holds at most N counting the fleet's calls once and this
    /// gateway's G times (see [`LocalRateLimiter::seed`]).
    seeded: Option<Seed>,
}

/// A frozen view of the fleet's log (see [`Log::seeded`]).
#[derive(Debug, Clone)]
pub struct Seed {
    /// Each fleet call as `[from, until]`: it leaves within it.
    pub calls: Vec<(Instant, Instant)>,
    /// The fleet's limit, N.
    pub limit: usize,
    /// This gateway's calls count this many times (the gateways sharing the fleet).
    pub weight: usize,
}

impl Log {
    fn new(limit: usize, burst: usize, span: Duration) -> Self {
        Log {
            limit: limit.max(1),
            burst: burst.clamp(1, limit.max(1)),
            admitted: VecDeque::new(),
            paused_until: None,
            full_until: None,
            burst_open: false,
            span,
            seeded: None,
        }
    }

    /// With a seed, the earliest instant at or after `s` at which one more call keeps
    /// every span within N: the fleet's calls once, ours `weight` times.
    fn seeded_slot(&self, mut s: Instant) -> Instant {
        let Some(seed) = &self.seeded else {
            return s;
        };
        let span = self.span;
        // Never before a fleet call may leave: then the span ending at s is the fullest
        // of those holding s.
        if let Some(last) = seed.calls.iter().map(|c| c.0).max() {
            s = s.max(last);
        }
        loop {
            let fleet = seed.calls.iter().filter(|c| c.1 + span > s).count();
            let ours = self.admitted.iter().filter(|t| **t + span > s).count();
            if fleet + seed.weight.max(1) * (ours + 1) <= seed.limit {
                return s;
            }
            // The earliest instant one of them leaves the span.
            let next = seed
                .calls
                .iter()
                .map(|c| c.1 + span)
                .chain(self.admitted.iter().map(|t| *t + span))
                .filter(|t| *t > s)
                .min();
            match next {
                Some(n) => s = n,
                None => return s,
            }
        }
    }

    /// Reserves the earliest slot the schedule allows at `now`, if it is within
    /// `max_wait`.
    fn reserve(&mut self, now: Instant, max_wait: Duration) -> Result<Instant, Throttled> {
        let span = self.span;
        while self.admitted.front().is_some_and(|t| *t + span <= now) {
            self.admitted.pop_front();
        }
        let pace = pace(span, self.limit);
        let last = self.admitted.back().copied();
        let full = self.full_until.map(|f| f + span).filter(|f| *f > now);
        if full.is_none() && last.is_none_or(|l| l + pace <= now) {
            self.burst_open = true;
        }
        let mut slot = match last {
            _ if self.burst_open
                && full.is_none()
                && last.is_none_or(|l| l <= now)
                && self.admitted.len() < self.burst =>
            {
                now
            }
            None => now,
            Some(last) => {
                // The span ending at the last slot: M calls, the oldest at e0.
                let first = self.admitted.partition_point(|t| *t + span <= last);
                let room = self.limit.saturating_sub(self.admitted.len() - first);
                let mut gap = pace;
                if room >= 1 {
                    let e0 = self.admitted[first];
                    let spread = (e0 + span).saturating_duration_since(last) / (room as u32 + 1);
                    gap = gap.max(spread);
                }
                now.max(last + gap)
            }
        };
        if let Some(p) = self.paused_until {
            slot = slot.max(p);
        }
        if let Some(f) = full {
            slot = slot.max(f);
        }
        let n = self.admitted.len();
        if n >= self.limit {
            // The N-th newest must be a span old.
            slot = slot.max(self.admitted[n - self.limit] + span);
        }
        let slot = self.seeded_slot(slot);
        let wait = slot - now;
        if wait > max_wait {
            return Err(Throttled { retry_after: wait });
        }
        self.admitted.push_back(slot);
        Ok(slot)
    }

    /// Gives back a reserved slot that was not used.
    fn release(&mut self, slot: Instant) {
        let i = self.admitted.partition_point(|t| *t < slot);
        if self.admitted.get(i) == Some(&slot) {
            self.admitted.remove(i);
        }
    }

    /// Moves `slot` (its caller woke too late for it) to `now`, if every span keeps at
    /// most N: a span that holds `now` but not `slot` begins after `slot`, so it holds
    /// only slots after it; with fewer than N of them there is room. Every other span
    /// holds both or only the old one. Not while paused, counting a full window or
    /// seeded (the seed's own rule decides there).
    fn move_to(&mut self, slot: Instant, now: Instant) -> bool {
        if self.seeded.is_some()
            || self.paused_until.is_some_and(|p| p > now)
            || self.full_until.is_some_and(|f| f + self.span > now)
        {
            return false;
        }
        let i = self.admitted.partition_point(|t| *t < slot);
        if self.admitted.get(i) != Some(&slot) {
            return false;
        }
        let after = self.admitted.iter().filter(|t| **t > slot).count();
        if after + 1 > self.limit {
            return false;
        }
        self.admitted.remove(i);
        let j = self.admitted.partition_point(|t| *t <= now);
        self.admitted.insert(j, now);
        true
    }
}

/// Per-command logs in this process.
#[derive(Debug)]
pub struct LocalRateLimiter {
    /// Calls per second for commands without an override.
    default_rate: u32,
    /// Per-command rates.
    overrides: BTreeMap<String, u32>,
    /// The burst after idle, in percent of a command's rate.
    burst_percent: u32,
    /// command → log, created on first use.
    logs: RwLock<HashMap<String, Arc<Mutex<Log>>>>,
    /// Every rate is divided by this (1 alone; a fleet's share when Redis is away).
    share: AtomicU32,
    /// The span calls are counted over ([`SPAN`] alone; the fleet's window as a
    /// fleet's share).
    span: Duration,
}

impl LocalRateLimiter {
    /// Chat throttled `command`: no call before `pause` from now.
    pub fn pause_now(&self, command: &str, pause: Duration) {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + pause;
        log.paused_until = Some(log.paused_until.map_or(until, |p| p.max(until)));
    }

    /// A limiter with `default_rate` calls per second per command, overrides, and
    /// bursts after idle of `burst_percent` % of a command's rate.
    pub fn new(default_rate: u32, overrides: BTreeMap<String, u32>, burst_percent: u32) -> Self {
        Self::with_span(default_rate, overrides, burst_percent, SPAN)
    }

    /// Like [`LocalRateLimiter::new`], counting calls over `span` instead of [`SPAN`].
    pub fn with_span(
        default_rate: u32,
        overrides: BTreeMap<String, u32>,
        burst_percent: u32,
        span: Duration,
    ) -> Self {
        LocalRateLimiter {
            default_rate: default_rate.max(1),
            overrides,
            burst_percent: burst_percent.clamp(1, 100),
            logs: RwLock::new(HashMap::new()),
            share: AtomicU32::new(1),
            span: span.max(Duration::from_millis(1)),
        }
    }

    /// The span calls are counted over.
    pub fn span(&self) -> Duration {
        self.span
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

    /// The share every rate is divided by.
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed).max(1)
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
            let rate = self.rate_of(name) as usize;
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.limit = rate;
            log.burst = burst_of(rate, self.burst_percent);
        }
    }

    /// Counts `command`'s span up to `until` as full: nothing goes until a span after
    /// it (calls made elsewhere that this limiter cannot see).
    pub fn fill(&self, command: &str, until: Instant) {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.full_until = Some(log.full_until.map_or(until, |f| f.max(until)));
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
        let rate = self.rate_of(name) as usize;
        let burst = burst_of(rate, self.burst_percent);
        let span = self.span;
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(Log::new(rate, burst, span))))
            .clone()
    }

    /// Seeds `command`'s log with a frozen view of the fleet's (Redis holds writes:
    /// nobody adds to it): from now on any span holds at most `seed.limit` counting
    /// the fleet's calls once and this gateway's `seed.weight` times, so gateways that
    /// each keep to it add up to at most N with the fleet's calls.
    pub fn seed(&self, command: &str, seed: Seed) {
        let log = self.log(command);
        log.lock().unwrap_or_else(|p| p.into_inner()).seeded = Some(seed);
    }

    /// Whether `command`'s log is seeded.
    pub fn is_seeded(&self, command: &str) -> bool {
        let log = self.log(command);
        let seeded = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seeded
            .is_some();
        seeded
    }

    /// Drops every seed (the fleet's log is live again).
    pub fn unseed_all(&self) {
        let logs = self.logs.read().unwrap_or_else(|p| p.into_inner());
        for log in logs.values() {
            log.lock().unwrap_or_else(|p| p.into_inner()).seeded = None;
        }
    }

    /// Reserves the earliest slot for one call of `command`: the instant it may go,
    /// or a refusal when that is further than `max_wait`. A slot that is not used
    /// must be given back ([`LocalRateLimiter::release`]).
    pub fn reserve(&self, command: &str, max_wait: Duration) -> Result<Instant, Throttled> {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.reserve(Instant::now(), max_wait)
    }

    /// Gives back a slot [`LocalRateLimiter::reserve`] granted and nobody used.
    pub fn release(&self, command: &str, slot: Instant) {
        let log = self.log(command);
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.release(slot);
    }
}

/// A reserved slot that goes back to its log unless it was used.
struct Reserved<'a> {
    limiter: &'a LocalRateLimiter,
    command: &'a str,
    slot: Instant,
    used: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.used && self.slot > Instant::now() {
            self.limiter.release(self.command, self.slot);
        }
    }
}

impl RateLimiter for LocalRateLimiter {
    fn acquire<'a>(
        &'a self,
        command: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<Permit, Throttled>> {
        let deadline = Instant::now() + max_wait;
        let reserved = self.reserve(command, max_wait);
        Box::pin(async move {
            let mut slot = reserved?;
            loop {
                let mut r = Reserved {
                    limiter: self,
                    command,
                    slot,
                    used: false,
                };
                if slot > Instant::now() {
                    tokio::time::sleep_until(slot.into()).await;
                }
                r.used = true;
                let now = Instant::now();
                if now <= slot + MAX_LATE {
                    // Unused, the slot goes back (the call did not leave).
                    let log = self.log(command);
                    return Ok(Permit::new(slot + MAX_LATE, move |used| {
                        if !used {
                            log.lock().unwrap_or_else(|p| p.into_inner()).release(slot);
                        }
                        true
                    }));
                }
                // Woken too late: going now could bring this call within a second of
                // one a span later, unless the slot moves to now (the caller keeps its
                // turn). Otherwise ask again.
                let moved = {
                    let log = self.log(command);
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.move_to(slot, now)
                };
                if moved {
                    slot = now;
                    continue;
                }
                let left = deadline.saturating_duration_since(now);
                slot = self.reserve(command, left)?;
            }
        })
    }

    fn pause<'a>(&'a self, command: &'a str, pause: Duration) -> BoxFuture<'a, ()> {
        self.pause_now(command, pause);
        Box::pin(std::future::ready(()))
    }

    fn returned(&self, command: &str) {
        let log = self.log(command);
        log.lock().unwrap_or_else(|p| p.into_inner()).burst_open = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most `limit` slots in any span.
    fn assert_window(slots: &[Instant], limit: usize) {
        for (i, a) in slots.iter().enumerate() {
            let within = slots[i..].iter().take_while(|b| **b < *a + SPAN).count();
            assert!(
                within <= limit,
                "{within} slots in one span (limit {limit})"
            );
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_after_idle_goes_at_once_and_the_rest_is_spread_over_the_window() {
        let t0 = Instant::now();
        let mut log = Log::new(200, 150, SPAN);
        // 150 concurrent calls: all at once.
        for _ in 0..150 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(t0));
        }
        // The 151st is paced: the 50 left are spread until the burst leaves the span.
        let s = log.reserve(t0, Duration::from_secs(2)).unwrap();
        let gap = s - t0;
        assert!(gap >= SPAN / 52 && gap <= SPAN / 50, "{gap:?}");
        // Calls arriving now are queued behind, each one gap further; none waits for
        // a new window.
        let mut slots = vec![t0; 150];
        slots.push(s);
        for _ in 0..49 {
            slots.push(log.reserve(t0, Duration::from_secs(2)).unwrap());
        }
        assert!(
            *slots.last().unwrap() < t0 + SPAN,
            "200 within the first span"
        );
        // The 201st waits for the burst to leave the span: not a second more.
        let next = log.reserve(t0, Duration::from_secs(2)).unwrap();
        assert!(
            next >= t0 + SPAN && next < t0 + SPAN + ms(30),
            "{:?}",
            next - t0
        );
        slots.push(next);
        assert_window(&slots, 200);
    }

    #[test]
    fn callers_that_come_back_are_paced_not_given_the_burst() {
        let t0 = Instant::now();
        let mut log = Log::new(200, 150, SPAN);
        for _ in 0..20 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(t0));
        }
        // The first call returns: the burst is over.
        log.burst_open = false;
        let s = log.reserve(t0 + ms(1), Duration::from_secs(1)).unwrap();
        let gap = s - t0;
        // 180 left over the span: one every ~5.6 ms.
        assert!(gap >= ms(5) && gap <= ms(6), "{gap:?}");
    }

    #[test]
    fn twenty_closed_loop_callers_never_wait_long_and_hold_the_limit() {
        // Twenty callers, each asking again 1 ms after its slot, for 4 s of
        // simulated time.
        let t0 = Instant::now();
        let mut log = Log::new(200, 150, SPAN);
        let mut next_ask: Vec<Instant> = vec![t0; 20];
        let mut slots = Vec::new();
        let mut worst = Duration::ZERO;
        let mut returned_once = false;
        while slots.len() < 1000 {
            // The caller that asks first.
            let (i, asked) = next_ask
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| **t)
                .map(|(i, t)| (i, *t))
                .unwrap();
            if !returned_once && asked > t0 {
                log.burst_open = false;
                returned_once = true;
            }
            let s = log.reserve(asked, ms(500)).expect("never refused");
            worst = worst.max(s - asked);
            slots.push(s);
            next_ask[i] = s + ms(1);
        }
        slots.sort();
        assert_window(&slots, 200);
        assert!(worst < ms(200), "a caller waited {worst:?}");
        let span = *slots.last().unwrap() - slots[0];
        let rate = slots.len() as f64 / span.as_secs_f64();
        assert!(rate > 185.0, "{rate:.1}/s");
    }

    #[test]
    fn any_span_holds_at_most_the_limit_under_random_demand() {
        let t0 = Instant::now();
        let mut log = Log::new(20, 15, SPAN);
        let mut slots = Vec::new();
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut now = t0;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += Duration::from_micros(x % 20_000);
            if x.is_multiple_of(7) {
                log.burst_open = false;
            }
            if let Ok(s) = log.reserve(now, ms(x % 1500)) {
                slots.push(s);
            }
        }
        slots.sort();
        assert_window(&slots, 20);
        assert!(slots.len() > 400, "{}", slots.len());
    }

    #[test]
    fn refusals_reserve_nothing_and_released_slots_are_reused() {
        let t0 = Instant::now();
        let mut log = Log::new(5, 5, SPAN);
        for _ in 0..5 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(t0));
        }
        log.burst_open = false;
        let t = log.reserve(t0 + ms(300), ms(100)).unwrap_err();
        assert_eq!(t.retry_after, SPAN - ms(300));
        let s = log.reserve(t0 + ms(300), Duration::from_secs(1)).unwrap();
        assert_eq!(s, t0 + SPAN);
        log.release(s);
        assert_eq!(log.admitted.len(), 5);
        assert_eq!(log.reserve(t0 + ms(300), Duration::from_secs(1)), Ok(s));
    }

    #[test]
    fn a_share_divides_the_rate_and_a_fill_holds_a_span() {
        let l = LocalRateLimiter::new(50, BTreeMap::new(), 100);
        l.set_share(3);
        assert_eq!(l.rate_of("a/b"), 16);
        l.fill("a/b", Instant::now() + ms(100));
        let t = l.reserve("a/b", Duration::ZERO).unwrap_err();
        assert!(t.retry_after > ms(1100), "{t:?}");
        l.set_share(100);
        assert_eq!(l.rate_of("a/b"), 1, "never below one");
    }

    #[test]
    fn pause_defers_every_slot_and_overrides_apply() {
        let l = LocalRateLimiter::new(10, BTreeMap::from([("a/fast".to_string(), 1000)]), 100);
        assert_eq!(l.rate_of("a/fast"), 1000);
        assert_eq!(l.rate_of("a/b"), 10);
        for _ in 0..10 {
            assert!(l.reserve("a/b", Duration::ZERO).is_ok());
        }
        assert!(l.reserve("a/b", Duration::ZERO).is_err());
        // Another command has its own log.
        assert!(l.reserve("c/d", Duration::ZERO).is_ok());
        l.pause_now("c/d", Duration::from_secs(60));
        let t = l.reserve("c/d", Duration::from_secs(1)).unwrap_err();
        assert!(t.retry_after > Duration::from_secs(59));
    }

    #[test]
    fn a_seeded_share_counts_the_frozen_fleet_once_and_itself_g_times() {
        let t0 = Instant::now();
        // N = 10 for the fleet, two gateways: a share of 5. The frozen log holds 4
        // calls leaving within 20 ms of t0.
        let mut log = Log::new(5, 5, SPAN);
        log.seeded = Some(Seed {
            calls: vec![(t0, t0 + ms(20)); 4],
            limit: 10,
            weight: 2,
        });
        // 4 + 2 × 3 = 10: three go at once, the fourth when ours leave the span.
        for _ in 0..3 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(t0));
        }
        let fourth = log.reserve(t0, Duration::from_secs(2)).unwrap();
        assert!(fourth >= t0 + SPAN, "{:?}", fourth - t0);
        // A fleet call still to leave (granted ahead) comes first.
        let mut log = Log::new(5, 5, SPAN);
        log.seeded = Some(Seed {
            calls: vec![(t0 + ms(300), t0 + ms(320))],
            limit: 10,
            weight: 2,
        });
        assert_eq!(log.reserve(t0, Duration::from_secs(1)), Ok(t0 + ms(300)));
    }

    #[test]
    fn a_slot_woken_too_late_for_moves_to_now_only_if_every_span_keeps_n() {
        let t0 = Instant::now();
        let mut log = Log::new(3, 3, SPAN);
        for _ in 0..3 {
            assert_eq!(log.reserve(t0, Duration::ZERO), Ok(t0));
        }
        // The fourth's slot is a span later; woken 100 ms past it, it moves there.
        let s = log.reserve(t0, Duration::from_secs(2)).unwrap();
        assert_eq!(s, t0 + SPAN);
        let late = s + ms(100);
        assert!(log.move_to(s, late));
        assert_eq!(log.admitted.back(), Some(&late));
        // Three slots after the first one: moving it would put four in one span.
        let mut log = Log::new(3, 3, SPAN);
        let a = log.reserve(t0, Duration::ZERO).unwrap();
        for k in 1..=3 {
            log.admitted.push_back(t0 + ms(10 * k));
        }
        assert!(!log.move_to(a, t0 + ms(50)));
        // Paused: no move.
        let mut log = Log::new(3, 3, SPAN);
        let a = log.reserve(t0, Duration::ZERO).unwrap();
        log.paused_until = Some(t0 + ms(500));
        assert!(!log.move_to(a, t0 + ms(100)));
    }

    #[tokio::test]
    async fn an_unused_permit_gives_its_slot_back() {
        let l = LocalRateLimiter::new(2, BTreeMap::new(), 100);
        let p = l.acquire("a/b", Duration::ZERO).await.unwrap();
        assert!(p.until() > Instant::now());
        drop(p);
        let log = l.log("a/b");
        assert_eq!(log.lock().unwrap().admitted.len(), 0);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_gives_its_slot_back() {
        let l = LocalRateLimiter::new(2, BTreeMap::new(), 100);
        assert!(l.acquire("a/b", Duration::ZERO).await.unwrap().go());
        assert!(l.acquire("a/b", Duration::ZERO).await.unwrap().go());
        l.returned("a/b");
        // The third waits a span; it is dropped before its slot.
        let waiting = l.acquire("a/b", Duration::from_secs(2));
        let _ = tokio::time::timeout(ms(10), waiting).await;
        let log = l.log("a/b");
        assert_eq!(log.lock().unwrap().admitted.len(), 2);
    }
}
