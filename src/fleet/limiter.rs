//! The fleet's rate limit: at most N calls of a command reach Chat in any one-second
//! window, whichever gateways sent them, with callers served in order on the smooth
//! schedule of [`crate::upstream::ratelimit`].
//!
//! ## How
//!
//! Each command has one log in Redis (a ZSET, [`super::keys`]): the slots granted to
//! the fleet, scored by Redis time. A gateway does not ask Redis per call: its callers
//! queue per command, and one lease request at a time asks an atomic Lua script
//! ([`LEASE`]) for a slot for each caller waiting (at most N). The script reads Redis's
//! own clock (`TIME`, so the gateways' clocks do not matter) and runs the schedule of
//! the local limiter over the fleet's window `W`: a burst after idle goes at once
//! (the gateway says whether its callers are part of one), other slots are paced and
//! spread over the window, and no window of length W ever holds more than N slots. It
//! grants the slots within the callers' longest wait (at most [`MAX_HORIZON`]) and
//! says how far the next one is; the gateway hands them out in order, and refuses a
//! caller (429) whose slot is further than its wait. A permit is usable for
//! `redis.lease_ms` (v) from its slot only.
//!
//! ## Why N holds at arrival (the window proof)
//!
//! Let the script run at Redis time R and grant a slot s ≥ R. Every lease brackets
//! R in the gateway's own time: it was sent at `t_sent` and answered at `t_recv`, so
//! the offset θ between the clocks (Redis time = local time + θ) lies within
//! `[R − t_recv, R − t_sent]`. The gateway intersects the brackets of its recent
//! leases (each widened by 0.1% of its age, the most the clocks may drift apart), so
//! θ is known to within `[lo, hi]`, as tightly as its fastest recent round trip: a
//! slow answer does not eat the permit. It lets a call leave only within
//! `[s − lo, s − hi + v]` in local time (widened inwards by the drift until then). So
//! a call leaves at a real instant `d` with `s ≤ d ≤ s + v`. It reaches Chat at
//! `a = d + L`, where the one-way latency `L` (connection set-up and scheduling
//! included) lies in `[L0, L0 + J]`, J being `redis.latency_allowance_ms`. So
//! `s + L0 ≤ a ≤ s + v + L0 + J`. (Like the log's window itself, this relies on
//! Redis's clock not being stepped; a step makes the brackets disagree, and then
//! only the newest counts.)
//!
//! Take any one-second window `[x, x + 1 s)` of arrivals. The slots of its calls
//! satisfy `x − v − L0 − J ≤ s < x + 1 s − L0`: they lie in one window of length
//! `W = 1 s + v + J`. The script never lets any window of length W hold more than N
//! slots (each new slot is at or after the newest, and is granted only while the log
//! holds fewer than N in `(s − W, s]`). Hence at most N calls arrive in any second.
//! The price is throughput: the fleet sends at most N per W (with the defaults,
//! v = 20 ms and J = 40 ms, 0.94·N per second at saturation).
//!
//! A call that wakes too late for its permit does not go: its permit is moved to the
//! present if the log allows ([`RETIME`]: its caller keeps its turn), otherwise it
//! asks again.
//!
//! ## When Redis is lost, and when it comes back
//!
//! Calls go through a [`LocalRateLimiter`] limited to N / G, G being the larger of
//! `redis.expected_gateways` and the live gateways last seen by the heartbeat: never
//! unlimited. Exactness across the switch rests on three rules.
//!
//! **1. A lost Redis counts as a full window.** A gateway that loses Redis (refused,
//! reset, timed out) cannot know what the others were granted since it last asked. The
//! fleet's slots were granted at most `H` = [`FleetLimiter::hold`] ahead (the lease
//! horizon), so fleet calls arrive by `t_loss + H + v + L0 + J`. The local share counts
//! its span as full until then: its first call leaves a span after, and arrives more
//! than a second after the last fleet call could. So no one-second window holds both,
//! and the local shares add up to at most N. The cost is about `H + 1.1 s` without
//! calls after Redis dies (callers are refused meanwhile, or served stale).
//!
//! **2. A log that may have lost calls counts as full.** When Redis restarted or failed
//! over (the connection's [`super::conn::Session::restarted`]), or a gateway sent calls
//! on its local share, the first lease of each command in the new session is
//! *suspect*; and a lease whose log was born after the one the gateway knew (the key
//! was evicted or flushed: every log has a birth member) has lost calls. Either way, unless
//! the log already holds such a fill, the script adds one: N slots at `now + H`. That
//! covers every slot granted before the loss (at most `H` ahead), and every call sent
//! on a local share by a gateway that has not reconnected yet: reconnection attempts
//! are at most [`super::conn::MAX_BACKOFF`] (+25% jitter) apart, shorter than `H + W`,
//! and a gateway writes the calls it sent locally into the log ([`REPLAY`]) before it
//! leases again. The logs never expire, so `volatile-*` eviction policies cannot take
//! them; under `allkeys-*` the birth check turns an eviction into a full window.
//!
//! **3. Partitions.** A gateway cut off from a Redis the others still reach adds up to
//! its N/G, for as long as the partition lasts: nothing can be known about the others
//! then. Making even that strictly N would mean sending nothing without Redis.
//!
//! ## Pauses
//!
//! Chat's throttling answers pause the command for the whole fleet: a `pause` member
//! in the same key (one key per script, so this works on Redis Cluster), which every
//! lease's slots respect. Locally, the command's unused permits are dropped.
//!
//! ## What the Redis user needs
//!
//! `EVALSHA`, `EVAL` and `SCRIPT LOAD`; inside the scripts `TIME`, `ZADD`, `ZREM`,
//! `ZSCORE`, `ZRANGEBYSCORE`, `ZREMRANGEBYSCORE` and `PERSIST`. None is in `@dangerous`. A denied
//! one is logged once, and the gateway keeps to its local share.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use metrics::counter;
use tokio::sync::oneshot;

use super::conn::{FleetError, Op, Redis, MAX_BACKOFF};
use super::keys::Keys;
use crate::config::settings::RateLimitSettings;
use crate::config::RedisSettings;
use crate::metrics::names;
use crate::upstream::command_label;
use crate::upstream::ratelimit::{
    burst_of, pace, LocalRateLimiter, RateLimiter, Throttled, MAX_LATE, WINDOW,
};

/// Commands with a state of their own at most; past it, unknown commands share one.
const MAX_COMMANDS: usize = 4096;
/// The shared state's name.
const OVERFLOW: &str = "(other)";
/// A permit with less than this left is not used.
const MIN_USABLE: Duration = Duration::from_millis(1);
/// A leased permit with less than this left stays in the pool (to expire): the
/// caller taking it could not be sure to go in time.
const MIN_HANDED: Duration = Duration::from_millis(5);
/// The furthest ahead a lease reserves slots: callers that may wait longer (retries,
/// which wait up to their deadline) ask again when their turn is nearer.
pub const MAX_HORIZON: Duration = Duration::from_secs(1);
/// The shortest hold after a loss: long enough that every gateway reconnects (its
/// attempts are at most [`MAX_BACKOFF`] + 25% apart) and writes its local calls into
/// the log before the first slot after the hold (`hold + W`, W ≥ 1 s).
const MIN_HOLD: Duration =
    Duration::from_millis(MAX_BACKOFF.as_millis() as u64 * 5 / 4 + 150).saturating_sub(WINDOW);
/// How long after a suspect session starts its first lease of a command still fills:
/// past it, calls from before the loss are out of every window, and every gateway has
/// reconnected and written its local calls.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// Grants slots to waiting callers. `KEYS[1]`: the log. ARGV: 1 limit N, 2 window W
/// (µs), 3 want, 4 how many of them may go at once as a burst, 5 burst size B,
/// 6 horizon (µs), 7 nonce, 8 the log's birth as the gateway knows it (0: never
/// seen), 9 suspect (1: the log may have lost calls), 10 hold (µs).
///
/// Log members: `b|<birth µs>` (score 0), `pause` (scored by its end), and
/// `<count>|<tag>` (scored by its slot; tag `fill:…` for a fill).
///
/// Returns {birth, leases, wait until the first slot not granted (µs; 0 if all
/// were), now (Redis µs), then per lease (slot − now µs, count)}.
pub const LEASE: &str = r#"
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local bsize = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', key, '(0', now - win)
local birth = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, 0, 0)) do
  local v = string.match(m, '^b|(%d+)$')
  if v then birth = tonumber(v) end
end
if birth == 0 then
  birth = now
  redis.call('ZADD', key, 0, 'b|' .. string.format('%.0f', birth))
end
redis.call('PERSIST', key)
local pause = tonumber(redis.call('ZSCORE', key, 'pause') or '0')
local items = redis.call('ZRANGEBYSCORE', key, '(0', '+inf', 'WITHSCORES')
local scores, counts, n, filled = {}, {}, 0, false
for k = 1, #items, 2 do
  local c, tag = string.match(items[k], '^(%d+)|(.*)$')
  if c then
    n = n + 1
    scores[n] = tonumber(items[k + 1])
    counts[n] = tonumber(c)
    if string.sub(tag, 1, 5) == 'fill:' then filled = true end
  end
end
local known = tonumber(ARGV[8])
if (ARGV[9] == '1' or (known ~= 0 and known ~= birth)) and not filled then
  -- Calls may be missing: count the window as full.
  local f = now + tonumber(ARGV[10])
  redis.call('ZADD', key, f, limit .. '|fill:' .. ARGV[7])
  local p = n + 1
  while p > 1 and scores[p - 1] > f do
    scores[p] = scores[p - 1]
    counts[p] = counts[p - 1]
    p = p - 1
  end
  scores[p] = f
  counts[p] = limit
  n = n + 1
end
-- (i .. n, total): the log's slots in the window ending at the newest one.
local total = 0
for k = 1, n do total = total + counts[k] end
local i = 1
local function advance(to)
  while i <= n and scores[i] <= to - win do
    total = total - counts[i]
    i = i + 1
  end
end
local last = nil
if n > 0 then
  last = scores[n]
  advance(last)
end
local pace = win / limit
local out, leases, granted, retry = {}, 0, 0, 0
while granted < want do
  local s = now
  if granted < burst and (last == nil or last <= now) and total < bsize and pause <= now then
    s = now
  else
    if last then
      local gap = pace
      local room = limit - total
      if room >= 1 and i <= n then
        local spread = (scores[i] + win - last) / (room + 1)
        if spread > gap then gap = spread end
      end
      if last + gap > s then s = last + gap end
    end
    if pause > s then s = pause end
    advance(s)
    while total >= limit and i <= n do
      if scores[i] + win > s then s = scores[i] + win end
      advance(s)
    end
  end
  if s - now > horizon then
    retry = s - now
    break
  end
  if leases > 0 and scores[n] == s then
    counts[n] = counts[n] + 1
    out[2 * leases] = out[2 * leases] + 1
  else
    n = n + 1
    scores[n] = s
    counts[n] = 1
    leases = leases + 1
    out[2 * leases - 1] = s
    out[2 * leases] = 1
  end
  total = total + 1
  last = s
  granted = granted + 1
end
local reply = {birth, leases, math.floor(retry), now}
for k = 1, leases do
  local s = out[2 * k - 1]
  local c = out[2 * k]
  redis.call('ZADD', key, s, c .. '|' .. ARGV[7] .. ':' .. k)
  reply[#reply + 1] = math.floor(s - now)
  reply[#reply + 1] = c
end
return reply
"#;

/// Pauses a command fleet-wide. `KEYS[1]`: the log. ARGV: pause (µs).
pub const PAUSE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], 'pause') or '0')
if untl > cur then redis.call('ZADD', KEYS[1], untl, 'pause') end
return 1
"#;

/// Writes calls sent on the local share into the log. `KEYS[1]`: the log. ARGV:
/// window (µs), nonce, then each call's age (µs).
pub const REPLAY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local win = tonumber(ARGV[1])
local added = 0
for i = 3, #ARGV do
  local at = now - tonumber(ARGV[i])
  if at > now - win then
    redis.call('ZADD', KEYS[1], at, '1|' .. ARGV[2] .. ':' .. i)
    added = added + 1
  end
end
return added
"#;

/// Moves one permit of a lease that its caller could not use in time to just after
/// now, if no window would then hold more than N. `KEYS[1]`: the log. ARGV: limit N,
/// the lease's slot (µs, to the microsecond below), its tag, a nonce, how far after
/// now (µs). Returns {moved (1/0), now, the new slot}.
///
/// Why it is safe: a window that holds the new slot s' > s but not the old one s
/// ends at or after s + W, so it holds nothing before s; if the log holds fewer than N
/// slots after s, it has room. Every other window holds both, or only the old one.
pub const RETIME: &str = r#"
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local s = tonumber(ARGV[2])
local found, fc, fs = nil, 0, 0
local near = redis.call('ZRANGEBYSCORE', key, s - 1, s + 2, 'WITHSCORES')
for k = 1, #near, 2 do
  local c, tag = string.match(near[k], '^(%d+)|(.*)$')
  if c and tag == ARGV[3] then
    found = near[k]
    fc = tonumber(c)
    fs = tonumber(near[k + 1])
  end
end
if not found or now < fs then return {0, now, 0} end
if tonumber(redis.call('ZSCORE', key, 'pause') or '0') > now then return {0, now, 0} end
local after = 0
local items = redis.call('ZRANGEBYSCORE', key, '(' .. string.format('%.17g', fs), '+inf')
for k = 1, #items do
  local c = string.match(items[k], '^(%d+)|')
  if c then after = after + tonumber(c) end
end
if after + 1 > limit then return {0, now, 0} end
local target = now + tonumber(ARGV[5])
redis.call('ZREM', key, found)
if fc > 1 then redis.call('ZADD', key, fs, (fc - 1) .. '|' .. ARGV[3]) end
redis.call('ZADD', key, target, '1|' .. ARGV[4])
return {1, now, target}
"#;

pub(crate) static RETIME_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(RETIME));
pub(crate) static LEASE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(LEASE));
pub(crate) static PAUSE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PAUSE));
pub(crate) static REPLAY_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(REPLAY));

/// The lease script's answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct LeaseReply {
    /// The log's birth.
    birth: i64,
    /// (slot − now µs, permits), earliest first.
    leases: Vec<(i64, u32)>,
    /// How far the first slot not granted is (µs); 0 when every caller got one.
    retry_us: i64,
    /// Redis's clock when the script ran (µs).
    now: i64,
}

impl LeaseReply {
    fn parse(v: &[i64]) -> LeaseReply {
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        let nl = get(1).max(0) as usize;
        LeaseReply {
            birth: get(0),
            leases: (0..nl)
                .map(|k| (get(4 + 2 * k), get(5 + 2 * k).max(0) as u32))
                .collect(),
            retry_us: get(2).max(0),
            now: get(3),
        }
    }
}

/// What a queued caller gets.
#[derive(Debug)]
enum Grant {
    /// Go within `[from, until)`.
    Permit {
        from: Instant,
        until: Instant,
        mark: Mark,
    },
    /// The next slot is further than the caller may wait.
    Refused(Duration),
    /// Redis failed: use the local share.
    Fallback,
}

/// Permits leased together: usable within `[from, until)`.
#[derive(Debug)]
struct Lease {
    /// The slot as early as it can be in local time (for "may the caller wait that
    /// long"): `t_sent + (s − R)`.
    slot: Instant,
    from: Instant,
    until: Instant,
    left: u32,
    /// Where its permits are in the log, to move one that was not used in time.
    mark: Mark,
}

/// A lease's entry in the log: its slot (Redis µs, to the microsecond below) and tag.
#[derive(Debug, Clone)]
struct Mark {
    slot: i64,
    tag: Arc<str>,
}

#[derive(Debug)]
struct Waiter {
    /// How far its slot may be from when Redis grants it (the time spent asking is
    /// not waiting for a slot).
    max_wait: Duration,
    tx: oneshot::Sender<Grant>,
}

/// One command's permits and queue, in this gateway.
#[derive(Debug)]
struct CommandState {
    /// The command's name in Redis (the command, or [`OVERFLOW`]).
    name: String,
    /// Its limit, N.
    limit: u32,
    /// Leased permits not yet used, earliest first.
    pool: VecDeque<Lease>,
    /// Callers waiting for a lease, oldest first.
    waiters: VecDeque<Waiter>,
    /// Whether a lease task runs.
    leasing: bool,
    /// Chat asked us to pause until then.
    paused_until: Option<Instant>,
    /// The lost session for which the local share was counted as full.
    filled_for: u64,
    /// This gateway's callers are part of a burst after idle: no call it admitted
    /// since it was idle has come back.
    burst_open: bool,
    /// The latest slot this gateway was granted (local time).
    last_slot: Option<Instant>,
    /// The log's birth as last seen (0: never).
    birth: i64,
    /// The session in which this command last leased.
    leased_in: u64,
}

impl CommandState {
    /// Takes one permit usable before `deadline`, if the pool has one.
    fn take(&mut self, now: Instant, deadline: Instant) -> Option<Grant> {
        while self
            .pool
            .front()
            .is_some_and(|l| l.until <= now + MIN_HANDED || l.left == 0)
        {
            self.pool.pop_front();
        }
        let lease = self.pool.front_mut()?;
        if lease.slot > deadline {
            return None;
        }
        lease.left -= 1;
        let g = Grant::Permit {
            from: lease.from,
            until: lease.until,
            mark: lease.mark.clone(),
        };
        if lease.left == 0 {
            self.pool.pop_front();
        }
        Some(g)
    }
}

/// How fast Redis's clock may run against ours, at most: 0.1%.
const DRIFT_PER_MILLION: i64 = 1000;
/// Lease round trips remembered to bound Redis's clock.
const CLOCK_SAMPLES: usize = 64;
/// ... and for how long.
const CLOCK_SAMPLE_AGE: Duration = Duration::from_secs(5);

/// Recent lease round trips, which bound Redis's clock in this gateway's time: each
/// one saw Redis read R between sending at `t_sent` and receiving at `t_recv`, so the
/// offset θ (Redis time = local time + θ) was within `[R − t_recv, R − t_sent]`. The
/// intersection over recent round trips, each widened by the drift since, is as
/// tight as the fastest of them, not as loose as the current one.
#[derive(Debug)]
struct ClockSync {
    base: Instant,
    /// (sent µs, received µs, Redis µs), oldest first.
    samples: Mutex<VecDeque<(i64, i64, i64)>>,
}

impl ClockSync {
    fn new() -> Self {
        ClockSync {
            base: Instant::now(),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    fn us(&self, t: Instant) -> i64 {
        t.saturating_duration_since(self.base).as_micros() as i64
    }

    fn at(&self, us: i64) -> Instant {
        self.base + Duration::from_micros(us.max(0) as u64)
    }

    /// Adds a round trip; returns the bounds `(lo, hi)` of θ now.
    fn add(&self, sent: Instant, recv: Instant, redis_us: i64) -> (i64, i64) {
        let (s, r) = (self.us(sent), self.us(recv));
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((s, r, redis_us));
        let max_age = CLOCK_SAMPLE_AGE.as_micros() as i64;
        while q.len() > CLOCK_SAMPLES || q.front().is_some_and(|x| r - x.1 > max_age) {
            q.pop_front();
        }
        loop {
            let (mut lo, mut hi) = (i64::MIN, i64::MAX);
            for &(si, ri, ti) in q.iter() {
                let widen = (r - ri).max(0) * DRIFT_PER_MILLION / 1_000_000;
                lo = lo.max(ti - ri - widen);
                hi = hi.min(ti - si + widen);
            }
            if lo <= hi || q.len() <= 1 {
                return (lo, hi);
            }
            // The samples disagree (a clock stepped): trust the newest.
            q.pop_front();
        }
    }

    /// The longest recent round trip (µs), 0 when none is known.
    fn slowest_recent(&self) -> i64 {
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().map(|(s, r, _)| r - s).max().unwrap_or(0)
    }

    /// Forgets every round trip (a new server has a clock of its own).
    fn clear(&self) {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// A call this gateway sent on its local share, for writing into the fleet's log.
type Departures = HashMap<String, VecDeque<Instant>>;

/// The fleet limiter. Implements [`RateLimiter`].
pub struct FleetLimiter {
    redis: Arc<Redis>,
    keys: Keys,
    default_rate: u32,
    overrides: BTreeMap<String, u32>,
    burst_percent: u32,
    /// v: how long a lease is usable.
    lease: Duration,
    /// J: the latency spread budgeted.
    allowance: Duration,
    /// W in µs: 1 s + v + J.
    window_us: u64,
    /// The furthest ahead a lease reserves.
    horizon: Duration,
    /// H: how far ahead a fill after a loss is placed (≥ the horizon).
    hold: Duration,
    /// The local share is N / max(this, live gateways).
    expected: u32,
    /// The local share, used while Redis is unusable.
    fallback: LocalRateLimiter,
    states: RwLock<HashMap<String, Arc<Mutex<CommandState>>>>,
    /// Calls sent on the local share in the last window, per command.
    departures: Mutex<Departures>,
    /// The session whose log has our local calls; fleet mode only then.
    synced: AtomicU64,
    /// A session whose first leases are suspect, and when it started.
    suspect: Mutex<(u64, Instant)>,
    /// Redis's clock in ours.
    clock: ClockSync,
    /// Unique per lease, with the gateway id.
    nonce: AtomicU64,
    id: String,
    /// Whether a denied Redis command was logged.
    denied_logged: AtomicBool,
    /// Whether "never reached Redis" was logged.
    alone_logged: AtomicBool,
    this: Weak<FleetLimiter>,
}

impl std::fmt::Debug for FleetLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLimiter")
            .field("default_rate", &self.default_rate)
            .field("window_us", &self.window_us)
            .finish_non_exhaustive()
    }
}

impl FleetLimiter {
    /// The fleet's limiter for `[ratelimit]`, with leases and windows from `[redis]`.
    pub fn start(
        redis: Arc<Redis>,
        keys: Keys,
        id: String,
        rl: &RateLimitSettings,
        r: &RedisSettings,
    ) -> Arc<FleetLimiter> {
        let window = WINDOW + r.lease + r.latency_allowance;
        let horizon = rl.max_wait.clamp(r.lease, MAX_HORIZON);
        let fallback = LocalRateLimiter::new(
            rl.per_command_per_sec,
            rl.commands.clone(),
            rl.burst_percent,
        );
        fallback.set_share(r.expected_gateways);
        let l = Arc::new_cyclic(|this| FleetLimiter {
            redis,
            keys,
            default_rate: rl.per_command_per_sec.max(1),
            fallback,
            overrides: rl.commands.clone(),
            burst_percent: rl.burst_percent,
            lease: r.lease,
            allowance: r.latency_allowance,
            window_us: window.as_micros() as u64,
            horizon,
            hold: horizon.max(MIN_HOLD),
            expected: r.expected_gateways.max(1),
            states: RwLock::new(HashMap::new()),
            departures: Mutex::new(HashMap::new()),
            synced: AtomicU64::new(0),
            suspect: Mutex::new((0, Instant::now())),
            clock: ClockSync::new(),
            nonce: AtomicU64::new(0),
            id,
            denied_logged: AtomicBool::new(false),
            alone_logged: AtomicBool::new(false),
            this: this.clone(),
        });
        let weak = Arc::downgrade(&l);
        let sessions = l.redis.sessions();
        tokio::spawn(sync_loop(weak, sessions));
        l
    }

    /// The window W every fleet limit is counted over.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }

    /// H: how far ahead of a loss the fleet's log counts as full.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Sets G, the live gateways: the local share is N / max(G, expected).
    pub fn set_live_gateways(&self, g: u32) {
        self.fallback.set_share(g.max(self.expected));
    }

    /// The limit of `command`.
    pub fn rate_of(&self, command: &str) -> u32 {
        self.overrides
            .get(command)
            .copied()
            .unwrap_or(self.default_rate)
            .max(1)
    }

    /// Whether leases come from Redis now (up, and our local calls replayed).
    pub fn fleet_mode(&self) -> bool {
        self.redis.is_up() && self.synced.load(Ordering::Acquire) == self.redis.session_seq()
    }

    fn state(&self, command: &str) -> Arc<Mutex<CommandState>> {
        if let Some(s) = self
            .states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(command)
        {
            return s.clone();
        }
        let mut map = self.states.write().unwrap_or_else(|p| p.into_inner());
        let name = if map.len() >= MAX_COMMANDS && !map.contains_key(command) {
            OVERFLOW
        } else {
            command
        };
        let limit = self.rate_of(name);
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(CommandState {
                    name: name.to_string(),
                    limit,
                    pool: VecDeque::new(),
                    waiters: VecDeque::new(),
                    leasing: false,
                    paused_until: None,
                    filled_for: 0,
                    burst_open: false,
                    last_slot: None,
                    birth: 0,
                    leased_in: 0,
                }))
            })
            .clone()
    }

    /// Records a call that leaves now.
    fn departed(&self, command: &str, local: bool) {
        if !local {
            counter!(names::PERMITS_USED, "command" => command_label(command)).increment(1);
            return;
        }
        let now = Instant::now();
        let window = self.window();
        let limit = self.rate_of(command) as usize;
        let mut deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        if deps.len() >= MAX_COMMANDS && !deps.contains_key(command) {
            return;
        }
        let q = deps.entry(command.to_string()).or_default();
        while q.front().is_some_and(|d| *d + window <= now) || q.len() >= limit {
            q.pop_front();
        }
        q.push_back(now);
    }

    /// Whether this gateway sent calls on its local share within the last window.
    fn sent_locally(&self) -> bool {
        let now = Instant::now();
        let window = self.window();
        let deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        deps.values()
            .any(|q| q.back().is_some_and(|d| *d + window > now))
    }

    /// Whether the next lease of a command last leased in `leased_in` is suspect.
    fn suspect(&self, leased_in: u64) -> bool {
        let seq = self.redis.session_seq();
        let (s, since) = *self.suspect.lock().unwrap_or_else(|p| p.into_inner());
        s == seq && leased_in != seq && since.elapsed() < SUSPECT_FOR
    }

    /// A permit from the pool, or a place in the queue.
    async fn take_or_wait(&self, command: &str, max_wait: Duration) -> Grant {
        let st = self.state(command);
        let rx = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some(g) = s.take(now, now + max_wait) {
                return g;
            }
            let pace = pace(self.window(), s.limit as usize);
            if s.waiters.is_empty()
                && s.pool.is_empty()
                && s.last_slot.is_none_or(|l| l + pace <= now)
            {
                s.burst_open = true;
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(Waiter { max_wait, tx });
            if !s.leasing {
                s.leasing = true;
                if let Some(me) = self.this.upgrade() {
                    let st = st.clone();
                    tokio::spawn(async move { me.lease_loop(st).await });
                } else {
                    s.leasing = false;
                }
            }
            rx
        };
        rx.await.unwrap_or(Grant::Fallback)
    }

    /// Leases slots for the queued callers of one command until none is left.
    async fn lease_loop(self: Arc<Self>, st: Arc<Mutex<CommandState>>) {
        loop {
            let now = Instant::now();
            let (key, limit, burst, want, horizon, pause, known, suspect) = {
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                s.waiters.retain(|w| !w.tx.is_closed());
                if s.waiters.is_empty() {
                    s.leasing = false;
                    return;
                }
                let longest = s
                    .waiters
                    .iter()
                    .map(|w| w.max_wait)
                    .max()
                    .unwrap_or_default();
                let pause = s.paused_until.filter(|p| *p > now);
                if let Some(p) = pause {
                    // Chat asked us to wait: refuse those who cannot wait that long.
                    let retry = p - now;
                    let mut kept = VecDeque::new();
                    for w in s.waiters.drain(..) {
                        if now + w.max_wait < p {
                            let _ = w.tx.send(Grant::Refused(retry));
                        } else {
                            kept.push_back(w);
                        }
                    }
                    s.waiters = kept;
                }
                let want = (s.waiters.len() as u32).clamp(1, s.limit);
                (
                    self.keys.limiter(&s.name),
                    s.limit,
                    if s.burst_open { want } else { 0 },
                    want,
                    longest.min(self.horizon),
                    pause,
                    s.birth,
                    self.suspect(s.leased_in),
                )
            };
            if let Some(p) = pause {
                tokio::time::sleep_until(p.into()).await;
                continue;
            }
            let nonce = format!("{}:{}", self.id, self.nonce.fetch_add(1, Ordering::Relaxed));
            let tag = nonce.clone();
            let session = self.redis.session_seq();
            let (window_us, hold_us) = (self.window_us, self.hold.as_micros() as u64);
            let burst_size = burst_of(limit as usize, self.burst_percent);
            let horizon_us = horizon.as_micros() as u64;
            let t_sent = Instant::now();
            let res = self
                .redis
                .run(Op::Ratelimit, |mut c| async move {
                    let r = LEASE_SCRIPT
                        .key(key)
                        .arg(limit)
                        .arg(window_us)
                        .arg(want)
                        .arg(burst)
                        .arg(burst_size)
                        .arg(horizon_us)
                        .arg(nonce)
                        .arg(known)
                        .arg(u8::from(suspect))
                        .arg(hold_us)
                        .invoke_async::<Vec<i64>>(&mut c)
                        .await;
                    r
                })
                .await;
            let t_recv = Instant::now();
            let reply = match res {
                Ok(v) => LeaseReply::parse(&v),
                Err(e) => {
                    self.denied(&e);
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    for w in s.waiters.drain(..) {
                        let _ = w.tx.send(Grant::Fallback);
                    }
                    s.leasing = false;
                    return;
                }
            };
            let (lo, hi) = self.clock.add(t_sent, t_recv, reply.now);
            let nap = {
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                s.birth = reply.birth;
                s.leased_in = session;
                let granted: u64 = reply.leases.iter().map(|(_, g)| u64::from(*g)).sum();
                counter!(names::PERMITS_LEASED, "command" => command_label(&s.name))
                    .increment(granted);
                for (k, (offset, g)) in reply.leases.into_iter().enumerate() {
                    let wait = Duration::from_micros(offset.max(0) as u64);
                    let slot = reply.now + offset.max(0);
                    let drift = offset.max(0) * DRIFT_PER_MILLION / 1_000_000;
                    let mut lease = Lease {
                        slot: self.clock.at(slot - hi),
                        from: self.clock.at(slot - lo + drift),
                        until: self
                            .clock
                            .at(slot - hi - drift + self.lease.as_micros() as i64),
                        left: g,
                        mark: Mark {
                            slot,
                            tag: format!("{tag}:{}", k + 1).into(),
                        },
                    };
                    s.last_slot = Some(s.last_slot.map_or(lease.slot, |l| l.max(lease.slot)));
                    if lease.until <= lease.from + MIN_USABLE {
                        // The clocks are not known well enough; nothing usable.
                        tracing::debug!(
                            rtt_us = (t_recv - t_sent).as_micros() as u64,
                            width_us = hi - lo,
                            "lease unusable"
                        );
                        continue;
                    }
                    while lease.left > 0 {
                        let Some(w) = s.waiters.pop_front() else {
                            break;
                        };
                        if w.max_wait < wait {
                            let _ = w.tx.send(Grant::Refused(wait));
                            continue;
                        }
                        let g = Grant::Permit {
                            from: lease.from,
                            until: lease.until,
                            mark: lease.mark.clone(),
                        };
                        if w.tx.send(g).is_ok() {
                            lease.left -= 1;
                        }
                    }
                    if lease.left > 0 {
                        s.pool.push_back(lease);
                    }
                }
                if reply.retry_us > 0 {
                    // No slot within the horizon for the rest: refuse those who cannot
                    // wait that long; the others (retries) ask again nearer their turn.
                    let retry = Duration::from_micros(reply.retry_us as u64);
                    let mut kept = VecDeque::new();
                    for w in s.waiters.drain(..) {
                        if w.max_wait < retry {
                            let _ = w.tx.send(Grant::Refused(retry));
                        } else {
                            kept.push_back(w);
                        }
                    }
                    let later = !kept.is_empty();
                    s.waiters = kept;
                    // Ask again when three quarters of a horizon's worth of slots
                    // are in reach: a batch, not one slot per lease.
                    later.then(|| {
                        retry
                            .saturating_sub(self.horizon / 4)
                            .max(Duration::from_millis(5))
                    })
                } else {
                    None
                }
            };
            if let Some(nap) = nap {
                tokio::time::sleep(nap).await;
            }
        }
    }

    /// Moves a permit its caller woke too late for to now, if the log allows: the
    /// caller keeps its turn and the slot is not wasted. Returns whether it may go.
    async fn retime(&self, command: &str, mark: &Mark) -> bool {
        if !self.fleet_mode() {
            tracing::debug!("could not move a permit: Redis unusable");
            return false;
        }
        let (name, limit) = {
            let st = self.state(command);
            let s = st.lock().unwrap_or_else(|p| p.into_inner());
            (s.name.clone(), s.limit)
        };
        let key = self.keys.limiter(&name);
        let nonce = format!(
            "{}:t{}",
            self.id,
            self.nonce.fetch_add(1, Ordering::Relaxed)
        );
        let (slot, tag) = (mark.slot, mark.tag.to_string());
        // Far enough ahead that the answer is back before the new slot.
        let ahead = self.clock.slowest_recent().clamp(2_500, 50_000) * 2;
        let t_sent = Instant::now();
        let res = self
            .redis
            .run(Op::Ratelimit, |mut c| async move {
                let r = RETIME_SCRIPT
                    .key(key)
                    .arg(limit)
                    .arg(slot)
                    .arg(tag)
                    .arg(nonce)
                    .arg(ahead)
                    .invoke_async::<Vec<i64>>(&mut c)
                    .await;
                r
            })
            .await;
        let t_recv = Instant::now();
        let v = match res {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "could not move a permit");
                return false;
            }
        };
        let (moved, now, target) = (
            v.first().copied() == Some(1),
            v.get(1).copied().unwrap_or(0),
            v.get(2).copied().unwrap_or(0),
        );
        tracing::debug!(moved, "permit moved to the present");
        if !moved {
            return false;
        }
        let (lo, hi) = self.clock.add(t_sent, t_recv, now);
        let from = self.clock.at(target - lo);
        let until = self.clock.at(target - hi + self.lease.as_micros() as i64);
        if from > Instant::now() {
            tokio::time::sleep_until(from.into()).await;
        }
        Instant::now() + MIN_USABLE <= until
    }

    /// Logs, once, that the Redis user may not run what the limiter needs.
    fn denied(&self, e: &FleetError) {
        if let FleetError::Redis(msg) = e {
            if msg.contains("NOPERM") && !self.denied_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    error = %msg,
                    "the Redis user may not run the rate limiter's commands (EVALSHA, EVAL, SCRIPT LOAD; in scripts TIME, ZADD, ZREM, ZSCORE, ZRANGEBYSCORE, ZREMRANGEBYSCORE, PERSIST): the rate limit runs at this gateway's share"
                );
            }
        }
    }

    /// Before a call goes on the local share: after a loss, the share counts the
    /// fleet's window as full ([module doc](self), rule 1), once per lost session.
    fn before_local(&self, command: &str) {
        let seq = self.redis.session_seq();
        if seq == 0 {
            if !self.alone_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    share = self.fallback.share(),
                    "Redis not reached yet: the rate limit runs at N divided by max(redis.expected_gateways, live gateways) at this gateway"
                );
            }
            return;
        }
        let st = self.state(command);
        let name = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            if s.filled_for == seq {
                return;
            }
            s.filled_for = seq;
            s.name.clone()
        };
        self.fallback.fill(
            &name,
            Instant::now() + self.hold + self.lease + self.allowance,
        );
    }

    /// Writes the calls sent on the local share into the logs.
    async fn replay(&self) -> bool {
        let now = Instant::now();
        let window = self.window();
        let batches: Vec<(String, Vec<u64>)> = {
            let mut deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
            deps.retain(|_, q| {
                while q.front().is_some_and(|d| *d + window <= now) {
                    q.pop_front();
                }
                !q.is_empty()
            });
            deps.iter()
                .map(|(cmd, q)| {
                    let ages = q
                        .iter()
                        .map(|d| now.saturating_duration_since(*d).as_micros() as u64)
                        .collect();
                    (cmd.clone(), ages)
                })
                .collect()
        };
        for (cmd, ages) in batches {
            let name = self
                .state(&cmd)
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .name
                .clone();
            let key = self.keys.limiter(&name);
            let nonce = format!(
                "{}:r{}",
                self.id,
                self.nonce.fetch_add(1, Ordering::Relaxed)
            );
            let window_us = self.window_us;
            let res = self
                .redis
                .run(Op::Ratelimit, |mut c| async move {
                    let mut inv = REPLAY_SCRIPT.key(key);
                    inv.arg(window_us).arg(nonce);
                    for a in ages {
                        inv.arg(a);
                    }
                    let r = inv.invoke_async::<i64>(&mut c).await;
                    r
                })
                .await;
            if let Err(e) = res {
                self.denied(&e);
                return false;
            }
        }
        self.departures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        true
    }
}

/// Marks every new session's first leases suspect when Redis restarted or this
/// gateway sent calls on its local share, writes those calls into the logs, then
/// lets leasing resume for that session.
async fn sync_loop(
    weak: Weak<FleetLimiter>,
    mut sessions: tokio::sync::watch::Receiver<super::conn::Session>,
) {
    loop {
        let session = sessions.borrow_and_update().clone();
        if session.seq > 0 {
            let Some(l) = weak.upgrade() else { return };
            l.clock.clear();
            if session.restarted || l.sent_locally() {
                *l.suspect.lock().unwrap_or_else(|p| p.into_inner()) =
                    (session.seq, Instant::now());
            }
            // Until replayed, calls keep to the local share.
            let mut tries = 0u32;
            while !l.replay().await {
                tries += 1;
                if tries > 50 || sessions.has_changed().unwrap_or(true) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !sessions.has_changed().unwrap_or(true) {
                l.synced.store(session.seq, Ordering::Release);
            }
        }
        if sessions.changed().await.is_err() {
            return;
        }
    }
}

/// A local slot that goes back to the share unless it was used.
struct LocalSlot<'a> {
    share: &'a LocalRateLimiter,
    command: &'a str,
    slot: Option<Instant>,
}

impl Drop for LocalSlot<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if slot > Instant::now() {
                self.share.release(self.command, slot);
            }
        }
    }
}

impl RateLimiter for FleetLimiter {
    fn acquire<'a>(
        &'a self,
        command: &'a str,
        max_wait: Duration,
    ) -> BoxFuture<'a, Result<(), Throttled>> {
        Box::pin(async move {
            let deadline = Instant::now() + max_wait;
            'call: loop {
                // The local share is only for when Redis fails: a permit that is void
                // (we woke past its end) is wasted capacity, never a reason to go local.
                while self.fleet_mode() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.take_or_wait(command, left).await {
                        Grant::Permit { from, until, mark } => {
                            if from > Instant::now() {
                                tokio::time::sleep_until(from.into()).await;
                            }
                            if Instant::now() + MIN_USABLE <= until {
                                self.departed(command, false);
                                return Ok(());
                            }
                            tracing::debug!(
                                late_us = Instant::now().saturating_duration_since(from).as_micros()
                                    as u64,
                                "permit void"
                            );
                            // Woken too late: move the permit to now if the log allows,
                            // rather than losing the caller's turn.
                            if self.retime(command, &mark).await {
                                self.departed(command, false);
                                return Ok(());
                            }
                        }
                        Grant::Refused(retry_after) => return Err(Throttled { retry_after }),
                        // Redis failed this lease but is not (yet) declared unusable:
                        // ask it again.
                        Grant::Fallback if self.fleet_mode() => {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        Grant::Fallback => break,
                    }
                    if Instant::now() >= deadline {
                        return Err(Throttled {
                            retry_after: self.lease,
                        });
                    }
                }
                self.before_local(command);
                let left = deadline.saturating_duration_since(Instant::now());
                let mut slot = LocalSlot {
                    share: &self.fallback,
                    command,
                    slot: Some(self.fallback.reserve(command, left)?),
                };
                let at = slot.slot.unwrap_or_else(Instant::now);
                // Wait for the local slot; Redis coming back decides instead. Nothing
                // goes on the local share while Redis is up (the log would not count
                // it): a reconnection being synced is waited for.
                loop {
                    let now = Instant::now();
                    if self.fleet_mode() {
                        drop(slot);
                        continue 'call;
                    }
                    if now >= at && !self.redis.is_up() {
                        slot.slot = None;
                        if now > at + MAX_LATE {
                            // Woken too late for the slot: ask again.
                            continue 'call;
                        }
                        self.departed(command, true);
                        return Ok(());
                    }
                    if now >= deadline {
                        return Err(Throttled {
                            retry_after: at.saturating_duration_since(now).max(self.lease),
                        });
                    }
                    let nap = at
                        .saturating_duration_since(now)
                        .clamp(Duration::from_millis(1), Duration::from_millis(10));
                    tokio::time::sleep(nap).await;
                }
            }
        })
    }

    fn pause(&self, command: &str, pause: Duration) {
        self.fallback.pause(command, pause);
        let st = self.state(command);
        let name = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            let until = Instant::now() + pause;
            s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
            s.pool.clear();
            s.name.clone()
        };
        let Some(me) = self.this.upgrade() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.keys.limiter(&name);
        let pause_us = pause.as_micros() as u64;
        rt.spawn(async move {
            let _ = me
                .redis
                .run(Op::Ratelimit, |mut c| async move {
                    let r = PAUSE_SCRIPT
                        .key(key)
                        .arg(pause_us)
                        .invoke_async::<i64>(&mut c)
                        .await;
                    r
                })
                .await;
        });
    }

    fn returned(&self, command: &str) {
        self.fallback.returned(command);
        let st = self.state(command);
        st.lock().unwrap_or_else(|p| p.into_inner()).burst_open = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_replies_parse() {
        assert_eq!(
            LeaseReply::parse(&[1_700_000_000_000_000, 0, 700_000, 1_800_000_000_000_000]),
            LeaseReply {
                birth: 1_700_000_000_000_000,
                leases: vec![],
                retry_us: 700_000,
                now: 1_800_000_000_000_000,
            }
        );
        // Two leases (now, 30; in 0.4 s, 1), and the next slot beyond the horizon.
        let r = LeaseReply::parse(&[7, 2, 900_000, 9, 0, 30, 400_000, 1]);
        assert_eq!(r.birth, 7);
        assert_eq!(r.leases, vec![(0, 30), (400_000, 1)]);
        assert_eq!(r.retry_us, 900_000);
        assert_eq!(r.now, 9);
    }

    #[test]
    fn the_clock_is_known_as_well_as_the_fastest_recent_round_trip() {
        let c = ClockSync::new();
        let t0 = c.base + Duration::from_secs(1);
        let ms = |n: u64| Duration::from_millis(n);
        // Redis is 5 s ahead of our base (θ = 5 s). A fast round trip: 1 ms.
        let theta = 5_000_000i64;
        let redis_at = |t: Instant| c.us(t) + theta;
        let (lo, hi) = c.add(t0, t0 + ms(1), redis_at(t0) + 500);
        assert!(lo <= theta && theta <= hi && hi - lo <= 1_000, "{lo} {hi}");
        // A slow one (40 ms) later does not widen what is known.
        let t1 = t0 + ms(100);
        let (lo, hi) = c.add(t1, t1 + ms(40), redis_at(t1) + 20_000);
        assert!(lo <= theta && theta <= hi, "{lo} {hi}");
        // Its bracket, widened by 0.1% of the 140 ms since on each side.
        assert!(hi - lo <= 1_300, "{}", hi - lo);
        // A stepped clock contradicts the samples: only the newest is kept.
        let t2 = t1 + ms(100);
        let (lo, hi) = c.add(t2, t2 + ms(2), redis_at(t2) + 10_000_000);
        assert!(lo <= theta + 10_000_000 && theta + 10_000_000 <= hi + 2_000);
        assert_eq!(c.samples.lock().unwrap().len(), 1);
        c.clear();
        assert!(c.samples.lock().unwrap().is_empty());
    }

    #[test]
    fn the_hold_outlasts_the_slowest_reconnection() {
        // A gateway still on its local share reconnects at most MAX_BACKOFF + 25%
        // after the first: before the first slot after a fill (hold + W, W ≥ 1 s).
        assert!(MIN_HOLD + WINDOW >= MAX_BACKOFF * 5 / 4 + Duration::from_millis(100));
    }
}
