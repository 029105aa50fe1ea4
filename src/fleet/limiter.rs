//! The fleet's rate limit: at most N calls of a command reach Chat in any one-second
//! window, whichever gateways sent them.
//!
//! ## How
//!
//! Each command has one sliding-window log in Redis (a ZSET, [`super::keys`]). A
//! gateway does not ask Redis per call: its callers queue per command, and one lease
//! request at a time asks an atomic Lua script ([`LEASE`]) for as many permits as there
//! are callers waiting (at most N). The script reads Redis's own clock (`TIME`, so the
//! gateways' clocks do not matter), finds the earliest slot `s` at or after now (and
//! after any pause, and never before the newest slot of the log) at which the log holds
//! fewer than N permits in the window `(s − W, s]`, grants as many as fit there, and
//! goes on to the next slot where permits leave the window until the callers are
//! served or the slots are further than the longest of their waits. With no slot in
//! reach it grants nothing and says how far the next slot is (the callers are refused
//! with that `retry_after`, as the local limiter refuses). Unused permits simply
//! expire: a lease is usable for `redis.lease_ms` (v) only.
//!
//! At saturation a lease carries many permits, so the Redis operations per admitted
//! call stay far below one (measured in the README); an idle gateway asks once per call.
//!
//! ## Why N holds at arrival (the window proof)
//!
//! Let the script run at Redis time R and grant a slot s ≥ R. The gateway sent the
//! request at local instant `t_sent` and got the answer at `t_recv`; in real time
//! `t_sent ≤ R ≤ t_recv`. The gateway lets a call leave only within
//! `[t_recv + (s − R), t_sent + (s − R) + v]` (only the difference `s − R` is used, so
//! Redis's clock offset does not matter). So a call leaves at a real instant `d` with
//! `s ≤ d ≤ s + v`. It reaches Chat at `a = d + L`, where the one-way latency `L`
//! (connection set-up and scheduling included) lies in `[L0, L0 + J]`, J being
//! `redis.latency_allowance_ms`. So `s + L0 ≤ a ≤ s + v + L0 + J`.
//!
//! Take any one-second window `[x, x + 1 s)` of arrivals. The slots of its calls
//! satisfy `x − v − L0 − J ≤ s < x + 1 s − L0`: they lie in one window of length
//! `W = 1 s + v + J`. The script never lets any window of length W hold more than N
//! permits (each new slot is at or after the newest, and is granted only while the
//! log's permits in `(s − W, s]` plus the new ones are at most N). Hence at most N
//! calls arrive in any second. The price is throughput: the fleet sends at most
//! N per W (with the defaults, v = J = 50 ms, 0.91·N per second at saturation).
//!
//! A call that wakes too late for its permit (past `t_sent + (s − R) + v`) does not go:
//! it asks again. Retries take a permit like any call.
//!
//! ## When Redis is unusable
//!
//! Calls go through a [`LocalRateLimiter`] limited to N / G, G being the number of live
//! gateways last seen by the heartbeat (1 if this gateway never saw Redis): never
//! unlimited.
//!
//! **Fleet → local.** Every lease answer carries the command's log as Redis holds it
//! (each lease's slot and size), and the local limiter is re-seeded with it: of the
//! fleet's permits, ordered by time and each placed as late as its call can reach Chat
//! (slot + v + J), every G-th from the newest. So a gateway that takes over counts
//! 1/G of whatever the fleet sent in any window reaching back from now, and sends at
//! most `(N − U)/G` of its own in a window where the fleet had sent U. When Redis goes
//! away for all gateways at once (it died or restarted), each
//! gateway's view is as fresh as its last lease, and the sum stays at N: at
//! saturation the views are fresh (leases are frequent); a gateway that leased long
//! ago sees its stale, smaller U, so the fleet may exceed N by at most what the other
//! gateways leased since that gateway last looked, divided by G, for one window.
//!
//! **Slow is not gone.** A Redis that times out may be slow for this gateway only (its
//! host starved of CPU, a congested link) while the others keep leasing: then no view
//! is safe. So when a lease times out, or Redis is declared unusable after timeouts or
//! errors in a row, the local share counts the fleet's whole window as used (nothing
//! goes locally for a window), and a caller waiting for a local slot goes back to the
//! fleet as soon as Redis answers again. Only a Redis that is gone (connection refused
//! or reset, as when it dies or restarts) lets the local share start at once from the
//! last view.
//!
//! **Local → fleet.** On reconnecting, before leasing again, a gateway writes the calls
//! it sent locally in the last window into the command's log (all its calls of the
//! last window if Redis restarted empty), so the fleet's log counts them. Until every
//! gateway has reconnected (at most [`super::conn::MAX_BACKOFF`] apart), those still
//! local add at most their N/G each.
//!
//! **Partitions.** A gateway cut off from a Redis the others still reach (connection
//! errors on its side only) adds up to its N/G, less its view of the window, for as
//! long as the partition lasts: nothing can be known about the others then. Making
//! even that strictly N would mean sending nothing without Redis.
//!
//! ## Pauses
//!
//! Chat's throttling answers pause the command for the whole fleet: a `pause` member
//! in the same key (one key per script, so this works on Redis Cluster), which every
//! lease's earliest slot respects. Locally, the command's unused permits are dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use metrics::counter;
use tokio::sync::oneshot;

use super::conn::{Op, Redis};
use super::keys::Keys;
use crate::metrics::names;
use crate::upstream::command_label;
use crate::upstream::ratelimit::{LocalRateLimiter, RateLimiter, Throttled, WINDOW};

/// Commands with a state of their own at most; past it, unknown commands share one.
const MAX_COMMANDS: usize = 4096;
/// The shared state's name.
const OVERFLOW: &str = "(other)";
/// A permit with less than this left is not used.
const MIN_USABLE: Duration = Duration::from_millis(1);
/// A leased permit with less than this left stays in the pool (to expire): the
/// caller taking it could not be sure to go in time.
const MIN_HANDED: Duration = Duration::from_millis(5);

/// Grants up to `want` permits, at the earliest slots within `horizon`: as many as
/// fit at the earliest slot, then at the next slot where permits leave the window,
/// and so on (one call, however fragmented the log).
///
/// `KEYS[1]`: the log. ARGV: limit, window (µs), want, horizon (µs), nonce.
/// Returns {leases, log entries, then per lease (slot − now µs, permits), then per
/// log entry (slot − now µs, permits)}; with no lease, {0, 0, wait until the next
/// slot (µs)}.
pub const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
local left = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
local base = now
local pause = tonumber(redis.call('ZSCORE', KEYS[1], 'pause') or '0')
if pause > base then base = pause end
local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local scores, counts, n, total = {}, {}, 0, 0
for i = 1, #items, 2 do
  local c = tonumber(string.match(items[i], '^(%d+)|'))
  if c then
    n = n + 1
    scores[n] = tonumber(items[i + 1])
    counts[n] = c
    total = total + c
    if scores[n] > base then base = scores[n] end
  end
end
local s = base
local i = 1
local leases = {}
while left > 0 do
  -- The earliest slot at or after s whose window (s - win, s] has room.
  while i <= n and scores[i] <= s - win do total = total - counts[i]; i = i + 1 end
  while total >= limit and i <= n do
    if scores[i] + win > s then s = scores[i] + win end
    total = total - counts[i]; i = i + 1
    while i <= n and scores[i] <= s - win do total = total - counts[i]; i = i + 1 end
  end
  if s - now > horizon then break end
  local g = limit - total
  if g > left then g = left end
  redis.call('ZADD', KEYS[1], s, g .. '|' .. ARGV[5] .. ':' .. #leases)
  n = n + 1
  scores[n] = s
  counts[n] = g
  total = total + g
  left = left - g
  leases[#leases + 1] = s - now
  leases[#leases + 1] = g
end
if #leases == 0 then return {0, 0, s - now} end
local ttl = math.floor((s - now + win) / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
local out = {#leases / 2, n}
for j = 1, #leases do out[#out + 1] = leases[j] end
for j = 1, n do
  out[#out + 1] = scores[j] - now
  out[#out + 1] = counts[j]
end
return out
"#;

/// Pauses a command fleet-wide. `KEYS[1]`: the log. ARGV: pause (µs), window (µs).
pub const PAUSE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('ZSCORE', KEYS[1], 'pause') or '0')
if untl > cur then redis.call('ZADD', KEYS[1], untl, 'pause') end
local ttl = math.floor((untl - now + tonumber(ARGV[2])) / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#;

/// Writes calls sent without Redis into the log. `KEYS[1]`: the log. ARGV: window
/// (µs), nonce, then each call's age (µs).
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
local ttl = math.floor(win / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return added
"#;

pub(crate) static LEASE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(LEASE));
pub(crate) static PAUSE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PAUSE));
pub(crate) static REPLAY_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(REPLAY));

/// The lease script's answer.
#[derive(Debug, Default, PartialEq, Eq)]
struct LeaseReply {
    /// (slot − now µs, permits), earliest first.
    leases: Vec<(i64, u32)>,
    /// The command's log after the grant: (slot − now µs, permits).
    log: Vec<(i64, u32)>,
    /// With no lease: how far the next slot is (µs).
    retry_us: i64,
}

impl LeaseReply {
    fn parse(v: &[i64]) -> LeaseReply {
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        let (nl, nlog) = (get(0).max(0) as usize, get(1).max(0) as usize);
        if nl == 0 {
            return LeaseReply {
                retry_us: get(2),
                ..LeaseReply::default()
            };
        }
        let pairs = |from: usize, count: usize| -> Vec<(i64, u32)> {
            (0..count)
                .map(|k| (get(from + 2 * k), get(from + 2 * k + 1).max(0) as u32))
                .collect()
        };
        LeaseReply {
            leases: pairs(2, nl),
            log: pairs(2 + 2 * nl, nlog),
            retry_us: 0,
        }
    }
}

/// What a queued caller gets.
#[derive(Debug)]
enum Grant {
    /// Go within `[from, until)`.
    Permit { from: Instant, until: Instant },
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
    /// The Redis loss for which the local share was last counted as full.
    quiet_for: u64,
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
        };
        if lease.left == 0 {
            self.pool.pop_front();
        }
        Some(g)
    }
}

/// A call this gateway sent, for replaying into a log that did not see it.
#[derive(Debug, Clone, Copy)]
struct Departure {
    at: Instant,
    /// Sent on the local share (not in Redis's log).
    local: bool,
}

/// The fleet limiter. Implements [`RateLimiter`].
pub struct FleetLimiter {
    redis: Arc<Redis>,
    keys: Keys,
    default_rate: u32,
    overrides: BTreeMap<String, u32>,
    /// v: how long a lease is usable.
    lease: Duration,
    /// J: the latency spread budgeted.
    allowance: Duration,
    /// W in µs: 1 s + v + J.
    window_us: u64,
    /// The local share, used while Redis is unusable.
    fallback: LocalRateLimiter,
    states: RwLock<HashMap<String, Arc<Mutex<CommandState>>>>,
    /// This gateway's calls of the last window, per command.
    departures: Mutex<HashMap<String, VecDeque<Departure>>>,
    /// The session whose log has our local calls; fleet mode only then.
    synced: AtomicU64,
    /// Unique per lease, with the gateway id.
    nonce: AtomicU64,
    id: String,
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
    /// A limiter of `default_rate` (and `overrides`) calls per second per command for
    /// the whole fleet, with leases usable for `lease` and `latency_allowance` of
    /// latency spread budgeted in the window.
    pub fn start(
        redis: Arc<Redis>,
        keys: Keys,
        id: String,
        default_rate: u32,
        overrides: BTreeMap<String, u32>,
        lease: Duration,
        latency_allowance: Duration,
    ) -> Arc<FleetLimiter> {
        let window = WINDOW + lease + latency_allowance;
        let l = Arc::new_cyclic(|this| FleetLimiter {
            redis,
            keys,
            default_rate: default_rate.max(1),
            fallback: LocalRateLimiter::new(default_rate, overrides.clone()),
            overrides,
            lease,
            allowance: latency_allowance,
            window_us: window.as_micros() as u64,
            states: RwLock::new(HashMap::new()),
            departures: Mutex::new(HashMap::new()),
            synced: AtomicU64::new(0),
            nonce: AtomicU64::new(0),
            id,
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

    /// Sets G, the live gateways: the local share is N / G.
    pub fn set_live_gateways(&self, g: u32) {
        self.fallback.set_share(g);
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
                    quiet_for: 0,
                }))
            })
            .clone()
    }

    /// Records a call that leaves now.
    fn departed(&self, command: &str, local: bool) {
        let now = Instant::now();
        if !local {
            counter!(names::PERMITS_USED, "command" => command_label(command)).increment(1);
        }
        let window = self.window();
        let limit = self.rate_of(command) as usize;
        let mut deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        if deps.len() >= MAX_COMMANDS && !deps.contains_key(command) {
            return;
        }
        let q = deps.entry(command.to_string()).or_default();
        while q.front().is_some_and(|d| d.at + window <= now) || q.len() >= limit {
            q.pop_front();
        }
        q.push_back(Departure { at: now, local });
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

    /// Leases permits for the queued callers of one command until none is left.
    async fn lease_loop(self: Arc<Self>, st: Arc<Mutex<CommandState>>) {
        loop {
            let now = Instant::now();
            let (key, limit, want, horizon, pause) = {
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
                (
                    self.keys.limiter(&s.name),
                    s.limit,
                    (s.waiters.len() as u32).clamp(1, s.limit),
                    longest,
                    pause,
                )
            };
            if let Some(p) = pause {
                tokio::time::sleep_until(p.into()).await;
                continue;
            }
            let nonce = format!("{}:{}", self.id, self.nonce.fetch_add(1, Ordering::Relaxed));
            let window_us = self.window_us;
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
                        .arg(horizon_us)
                        .arg(nonce)
                        .invoke_async::<Vec<i64>>(&mut c)
                        .await;
                    r
                })
                .await;
            let t_recv = Instant::now();
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            let reply = res.map(|v| LeaseReply::parse(&v));
            match reply {
                Ok(r) if !r.leases.is_empty() => {
                    // Should Redis go away now, the local share starts with this
                    // gateway's share of the fleet's window, each permit counted as
                    // late as its call can reach Chat.
                    let late = self.lease + self.allowance;
                    let at = |offset: i64| -> Instant {
                        if offset >= 0 {
                            t_recv + Duration::from_micros(offset as u64)
                        } else {
                            t_recv
                                .checked_sub(Duration::from_micros(offset.unsigned_abs()))
                                .unwrap_or(t_recv)
                        }
                    };
                    let seen: Vec<(Instant, u32)> =
                        r.log.iter().map(|(o, c)| (at(*o) + late, *c)).collect();
                    self.fallback.seed(&s.name, &seen);
                    let granted: u64 = r.leases.iter().map(|(_, g)| u64::from(*g)).sum();
                    counter!(names::PERMITS_LEASED, "command" => command_label(&s.name))
                        .increment(granted);
                    for (offset, g) in r.leases {
                        let wait = Duration::from_micros(offset.max(0) as u64);
                        let mut lease = Lease {
                            slot: t_sent + wait,
                            from: t_recv + wait,
                            until: t_sent + wait + self.lease,
                            left: g,
                        };
                        if lease.until <= lease.from + MIN_USABLE {
                            // The round trip ate the lease; nothing usable.
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
                            };
                            if w.tx.send(g).is_ok() {
                                lease.left -= 1;
                            }
                        }
                        if lease.left > 0 {
                            s.pool.push_back(lease);
                        }
                    }
                }
                Ok(r) => {
                    let retry = Duration::from_micros(r.retry_us.max(0) as u64);
                    for w in s.waiters.drain(..) {
                        let _ = w.tx.send(Grant::Refused(retry));
                    }
                }
                Err(e) => {
                    if matches!(e, super::conn::FleetError::Timeout) {
                        // Redis did not answer in time: maybe only for us, while the
                        // others keep leasing. Count the fleet's window as full.
                        self.fallback
                            .fill(&s.name, Instant::now() + self.lease + self.allowance);
                    }
                    for w in s.waiters.drain(..) {
                        let _ = w.tx.send(Grant::Fallback);
                    }
                    s.leasing = false;
                    return;
                }
            }
        }
    }

    /// Writes the calls Redis's log does not have (all of the last window if Redis
    /// restarted, else those sent on the local share) into the logs.
    async fn replay(&self, restarted: bool) -> bool {
        let now = Instant::now();
        let window = self.window();
        let batches: Vec<(String, Vec<u64>)> = {
            let mut deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
            deps.retain(|_, q| {
                while q.front().is_some_and(|d| d.at + window <= now) {
                    q.pop_front();
                }
                !q.is_empty()
            });
            deps.iter()
                .map(|(cmd, q)| {
                    let ages = q
                        .iter()
                        .filter(|d| restarted || d.local)
                        .map(|d| now.saturating_duration_since(d.at).as_micros() as u64)
                        .collect();
                    (cmd.clone(), ages)
                })
                .filter(|(_, ages): &(String, Vec<u64>)| !ages.is_empty())
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
            if res.is_err() {
                return false;
            }
        }
        let mut deps = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        for q in deps.values_mut() {
            for d in q.iter_mut() {
                d.local = false;
            }
        }
        true
    }
}

/// Replays local calls into Redis after every (re)connection, then lets leasing
/// resume for that session.
async fn sync_loop(
    weak: Weak<FleetLimiter>,
    mut sessions: tokio::sync::watch::Receiver<super::conn::Session>,
) {
    loop {
        let session = sessions.borrow_and_update().clone();
        if session.seq > 0 {
            let Some(l) = weak.upgrade() else { return };
            // Until replayed, calls keep to the local share.
            let mut tries = 0u32;
            while !l.replay(session.restarted).await {
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
                        Grant::Permit { from, until } => {
                            if from > Instant::now() {
                                tokio::time::sleep_until(from.into()).await;
                            }
                            if Instant::now() + MIN_USABLE <= until {
                                self.departed(command, false);
                                return Ok(());
                            }
                            if Instant::now() >= deadline {
                                return Err(Throttled {
                                    retry_after: self.lease,
                                });
                            }
                        }
                        Grant::Refused(retry_after) => return Err(Throttled { retry_after }),
                        Grant::Fallback => break,
                    }
                }
                // Redis failed. If it was slow rather than gone, it may be slow for this
                // gateway only while the others lease on: count the fleet's window as
                // full, once per loss (a lease that timed out did so already).
                let (loss, slow) = self.redis.last_loss();
                if slow && !self.redis.is_up() {
                    let st = self.state(command);
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    if s.quiet_for != loss {
                        s.quiet_for = loss;
                        self.fallback
                            .fill(&s.name, Instant::now() + self.lease + self.allowance);
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let slot = Instant::now() + self.fallback.reserve(command, left)?;
                // Wait for the local slot, unless Redis comes back first: then the
                // fleet decides.
                loop {
                    let now = Instant::now();
                    if now >= slot {
                        self.departed(command, true);
                        return Ok(());
                    }
                    if self.fleet_mode() {
                        continue 'call;
                    }
                    tokio::time::sleep((slot - now).min(Duration::from_millis(10))).await;
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
        let window_us = self.window_us;
        rt.spawn(async move {
            let _ = me
                .redis
                .run(Op::Ratelimit, |mut c| async move {
                    let r = PAUSE_SCRIPT
                        .key(key)
                        .arg(pause_us)
                        .arg(window_us)
                        .invoke_async::<i64>(&mut c)
                        .await;
                    r
                })
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_replies_parse() {
        assert_eq!(
            LeaseReply::parse(&[0, 0, 700_000]),
            LeaseReply {
                retry_us: 700_000,
                ..LeaseReply::default()
            }
        );
        // Two leases (now, 30; in 0.4 s, 20) and a log of three entries.
        let r = LeaseReply::parse(&[2, 3, 0, 30, 400_000, 20, -600_000, 50, 0, 30, 400_000, 20]);
        assert_eq!(r.leases, vec![(0, 30), (400_000, 20)]);
        assert_eq!(r.log, vec![(-600_000, 50), (0, 30), (400_000, 20)]);
    }
}
