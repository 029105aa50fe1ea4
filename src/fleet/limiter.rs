//! The fleet's rate limit: at most N calls of a command reach Chat in any one-second
//! window, whichever gateways sent them, with callers served in order on the smooth
//! schedule of [`crate::upstream::ratelimit`] — and what the limiter does through each
//! Redis incident.
//!
//! ## How
//!
//! Each command has one log in Redis (a ZSET, [`super::keys`]): the slots granted to
//! the fleet, scored by Redis time. A gateway does not ask Redis per call: its callers
//! queue per command, and one lease request at a time asks an atomic Lua script
//! ([`LEASE`]) for a slot for each caller waiting (at most N). The script reads Redis's
//! own clock (`TIME`, so the gateways' clocks do not matter) and runs the schedule of
//! the local limiter over the fleet's window `W` = 1 s + v + J: a burst after idle goes
//! at once, other slots are paced and spread over the window, and no window of length
//! `W + u` ever holds more than N slots (u below). It grants the slots within the
//! callers' longest wait (at most [`MAX_HORIZON`]) and says how far the next one is;
//! the gateway hands them out in order, and refuses a caller (429) whose slot is
//! further than its wait. A fleet miss asks for its slot together with its L2 lookup
//! (one round trip), and time spent waiting on both counts once against the request's
//! Redis budget.
//!
//! ## Why N holds at arrival (the window proof)
//!
//! Let the script run at Redis time R and grant a slot s ≥ R. Every round trip that
//! reads Redis's clock brackets R in the gateway's own time: sent at `t_sent`,
//! answered at `t_recv`, so the offset θ (Redis time = local time + θ) lies within
//! `[R − t_recv, R − t_sent]`. The gateway intersects the brackets of its recent round
//! trips ([`ClockSync`], each widened by 0.1% of its age, the most clocks drift), so θ
//! is known within `[lo, hi]`, as tightly as its fastest recent round trip. The lease
//! carries u ≥ hi − lo (its clock uncertainty, capped at `redis.timeout_ms`), and the
//! log counts the lease's calls as leaving anywhere in `[s, s + v + u]`, v being
//! `redis.lease_ms`; the gateway lets a call leave only within `[s − lo, s − hi + v +
//! u]` in local time, which is inside it. A call that reaches Chat at `a = d + L`, L
//! in `[L0, L0 + J]` (J = `redis.latency_allowance_ms`), has `s + L0 ≤ a ≤ s + v + u +
//! L0 + J`; so the calls arriving in any one-second window have slots within one
//! window of length `W + u`, which the script never lets hold more than N. The price is
//! throughput: N per W at saturation (0.94·N per second with the defaults). The lease
//! asks for its slots to begin when its answer is back (the lead: the slowest recent
//! answer), so slots are not past on arrival.
//!
//! A caller that wakes too late for its permit does not go: its permit is moved to
//! the present if the log allows ([`RETIME`]: a window that holds the new slot but not
//! the old one holds only slots after the old one), and it keeps its turn; otherwise it
//! asks again at the head of the queue.
//!
//! ## Through Redis incidents
//!
//! Without Redis, calls go through a [`LocalRateLimiter`] limited to N / G, G being
//! the larger of `redis.expected_gateways` and the live gateways last seen by the
//! heartbeat: never unlimited. Before Redis is first reached there is nothing to count
//! but the share. Otherwise what a gateway cannot see it counts as used:
//!
//! **1. Redis lost** (refused, reset, closed, timing out, refusing writes). The fleet
//! granted slots at most `H` = [`FleetLimiter::hold`] ahead, so fleet calls arrive by
//! `t_loss + H + v + u + L0 + J` (u at most `redis.timeout_ms`). The local share counts
//! its span as full until then: its first call leaves a span later
//! ([`FleetLimiter::local_fill`], 1.67 s with the defaults), so no one-second window
//! holds both, and the shares add up to at most N.
//!
//! **2. Writes held** (`CLIENT PAUSE WRITE`, as during a failover). Told from a slow
//! Redis by two side connections: a `PING` answered while a no-op script sent before it
//! is not. Nobody can add to the log then, and reads still run: the gateway reads the
//! frozen log and seeds its share with it ([`Seed`]: in any span the fleet's calls once
//! plus this gateway's G times stay within N, so G gateways doing the same stay within
//! N together). Before its first local call it sends a marker ([`MARK`]) on the held
//! connection: it runs when the pause ends, before any lease sent after it, and tells
//! the others to count this gateway's share until it is back. No full window, no 429
//! storm: a paused Redis costs only the wait for the marker (`redis.timeout_ms`).
//!
//! **3. Coming back.** On every new session a gateway writes the calls it sent in the
//! last window (+ 1 s) into the logs ([`REPLAY`]) before it leases again: after a
//! restart or failover (the connection's [`super::conn::Session::restarted`]) all of
//! them, since the new log may lack any; its permits from before are void. After an
//! incident it also writes a return marker: until the other gateways have checked in
//! since their own loss (or since this one's), they are counted as a full window while
//! their calls from before a restart may still be in a window (`H + W + 1 s` after it),
//! and as their shares after that, for at most [`MARKER_LIFE`]. Every gateway
//! reconnects within [`super::conn::MAX_BACKOFF`] (+25%) and writes back at once, so
//! the count lasts one reconnection, not a window.
//!
//! **4. Eviction.** The logs never expire, so `volatile-*` policies cannot take them;
//! under `allkeys-*` a log born after the one the gateway knew (its birth member) has
//! lost calls, and the script counts a full window at `now + H`.
//!
//! **5. Partitions** are where it stops: a gateway cut off from a Redis the others
//! still reach adds up to its N / G for as long as it lasts; making even that exact
//! would mean sending nothing without Redis.
//!
//! ## Pauses
//!
//! Chat's throttling answers pause the command for the whole fleet: a `pause` member
//! in the same key (one key per script, so this works on Redis Cluster), which every
//! lease's slots respect. Locally, the command's unused permits are dropped.
//!
//! ## What the Redis user needs
//!
//! `EVALSHA` and `SCRIPT LOAD`; `TIME` and `ZRANGEBYSCORE` (the frozen log, read while
//! writes are held); inside the scripts `TIME`, `ZADD`, `ZREM`, `ZSCORE`,
//! `ZRANGEBYSCORE` and `ZREMRANGEBYSCORE`. None is in `@dangerous`. A denied one is
//! logged once, and the gateway keeps to its local share.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use metrics::counter;
use tokio::sync::oneshot;

use super::conn::{FleetError, LossKind, Op, Redis, Session};
use super::keys::Keys;
use crate::config::settings::RateLimitSettings;
use crate::config::RedisSettings;
use crate::metrics::names;
use crate::upstream::command_label;
use crate::upstream::ratelimit::{
    burst_of, pace, LocalRateLimiter, Permit, RateLimiter, Seed, Throttled, MAX_LATE, WINDOW,
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
/// How long a marker counts (a gateway that may be sending on its local share, or a
/// gateway back from an incident waiting for the others): a gateway away longer is
/// taken to be gone (or cut off: see "Where it stops").
pub const MARKER_LIFE: Duration = Duration::from_secs(5);
/// The largest clock uncertainty a lease carries; the log keeps slots this much
/// longer than the window.
pub const MAX_UNCERTAINTY: Duration = Duration::from_secs(1);
/// While the log counts gateways that may be on a local share as a full window,
/// leases ask again this often.
const PHANTOM_POLL: Duration = Duration::from_millis(20);
/// Logs written back per pipeline on coming back.
const REPLAY_CHUNK: usize = 64;

/// Lua shared by the limiter's scripts: Redis's clock, and one pass over a log.
///
/// Log members (one ZSET per command, see [`super::keys`]):
/// - `<count>|<u>|<tag>` scored by a slot (Redis µs): `count` calls that leave within
///   `[slot, slot + v + u]`, `u` being the clock uncertainty of the lease (µs; 0 for
///   calls written back after they left); tag `fill:…` for a full window counted after
///   the log was lost;
/// - `b|<birth>` (score 0): when the log was made;
/// - `pause` scored by the end of a pause Chat asked for;
/// - `r|<gateway>` scored by its check-in + life: the gateway's calls are in the log
///   (its last lease or write-back);
/// - `l|<gateway>|<share>` scored by expiry: the gateway may be sending on its local
///   share (Redis held writes when it left);
/// - `m|<gateway>|<ref>|<G>|<wait>|<full until>` scored by expiry: the gateway came
///   back from an incident that began at `ref` in a fleet of G; gateways not checked
///   in since (since `now − wait` when `wait` > 0) may be on their local shares, each
///   counted as its share, or as a full window before `full until` (their calls before
///   a restart are lost). A gateway with a marker of its own from a loss at most 2 s
///   before `ref` (the same incident, seen a little earlier) that checked in since
///   its own loss is back too: its write-back came after it.
const LUA_LOG: &str = r#"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(n) return string.format('%.0f', n) end
-- How far apart two gateways may see one incident begin (µs): a heartbeat and a
-- reconnection.
local SPREAD = 2000000
local function scan(key, now, id, drop_mark, life)
  local items = redis.call('ZRANGEBYSCORE', key, '(0', '+inf', 'WITHSCORES')
  local scores, counts, n, filled, umax = {}, {}, 0, false, 0
  local seen, marks, lph, own = {}, {}, 0, {}
  if id ~= '' then seen[id] = now end
  for k = 1, #items, 2 do
    local m = items[k]
    local sc = tonumber(items[k + 1])
    local c, u, tag = string.match(m, '^(%d+)|(%d+)|(.*)$')
    if not c then
      c, tag = string.match(m, '^(%d+)|(.*)$')
      u = '0'
    end
    if c then
      n = n + 1
      scores[n] = sc
      counts[n] = tonumber(c)
      if tonumber(u) > umax then umax = tonumber(u) end
      if string.sub(tag, 1, 5) == 'fill:' then filled = true end
    else
      local kind, who, rest = string.match(m, '^([rml])|([^|]+)(.*)$')
      if kind == 'l' and who == id then
        redis.call('ZREM', key, m)
      elseif kind == 'm' and who == id and drop_mark then
        redis.call('ZREM', key, m)
      elseif kind and sc > now then
        if kind == 'r' then
          if who ~= id then seen[who] = sc - life end
        elseif kind == 'l' then
          lph = lph + (tonumber(string.match(rest, '^|(%d+)$')) or 0)
        else
          local ref, g, w, fu = string.match(rest, '^|(%d+)|(%d+)|(%d+)|(%d+)$')
          if ref then
            marks[#marks + 1] = {tonumber(ref), tonumber(g), tonumber(w), tonumber(fu)}
            if not own[who] or tonumber(ref) > own[who] then own[who] = tonumber(ref) end
          end
        end
      end
    end
  end
  return scores, counts, n, filled, umax, seen, marks, lph, own
end
local function phantom(now, limit, seen, marks, lph, own)
  local ph = 0
  for _, mk in ipairs(marks) do
    local thr = mk[1]
    if mk[3] > 0 and now - mk[3] < thr then thr = now - mk[3] end
    local present = 0
    for who, t in pairs(seen) do
      -- Checked in since the incident began here; or back from the same incident as
      -- it saw it (its own marker, from a loss at most SPREAD before this one) and
      -- checked in since: its calls are written back either way.
      local o = own[who]
      if t >= thr or (o and o >= thr - SPREAD and t >= o) then present = present + 1 end
    end
    local absent = mk[2] - present
    if absent > 0 then
      local p = absent * math.floor(limit / mk[2])
      if now < mk[4] then p = limit end
      if p > ph then ph = p end
    end
  end
  if lph > ph then ph = lph end
  return ph
end
local function new_mark(now, args, at)
  local age = tonumber(args[at])
  if age <= 0 then return nil end
  local ref = now - age
  local fu = 0
  if tonumber(args[at + 3]) > 0 then fu = ref + tonumber(args[at + 3]) end
  return {ref, tonumber(args[at + 1]), tonumber(args[at + 2]), fu}
end
local function check_in(key, now, id, life, mark)
  redis.call('ZADD', key, now + life, 'r|' .. id)
  if mark then
    redis.call('ZADD', key, now + life, 'm|' .. id .. '|' .. fmt(mark[1]) .. '|' .. mark[2]
      .. '|' .. fmt(mark[3]) .. '|' .. fmt(mark[4]))
  end
end
"#;

/// Grants slots to waiting callers. `KEYS[1]`: the log. ARGV: 1 limit N, 2 window W
/// (µs), 3 want, 4 how many of them may go at once as a burst, 5 burst size B,
/// 6 horizon (µs), 7 nonce, 8 the log's birth as the gateway knows it (0: never
/// seen), 9 hold H (µs), 10 the lease's clock uncertainty u (µs), 11 gateway id,
/// 12 marker life (µs), 13–16 this gateway's return marker (age of its incident's
/// start µs, or 0 for none; G; wait µs; full span µs), 17 how long past the window
/// slots are kept (µs), 18 the lead (µs): no slot before now + lead, when the answer
/// is back at the gateway.
///
/// Returns {birth, leases, wait until the first slot not granted (µs; 0 if all
/// were), now (Redis µs), phantom, then per lease (slot − now µs, count)}.
const LEASE: &str = r#"
local key = KEYS[1]
local now = now_us()
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local bsize = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
local id = ARGV[11]
local life = tonumber(ARGV[12])
redis.call('ZREMRANGEBYSCORE', key, '(0', now - tonumber(ARGV[2]) - tonumber(ARGV[17]))
local birth = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, 0, 0)) do
  local v = string.match(m, '^b|(%d+)$')
  if v then birth = tonumber(v) end
end
if birth == 0 then
  birth = now
  redis.call('ZADD', key, 0, 'b|' .. fmt(birth))
end
local mark = new_mark(now, ARGV, 13)
local scores, counts, n, filled, umax, seen, marks, lph, own = scan(key, now, id, mark ~= nil, life)
if mark then marks[#marks + 1] = mark end
check_in(key, now, id, life, mark)
local ph = phantom(now, limit, seen, marks, lph, own)
local eff = limit - ph
local u = tonumber(ARGV[10])
if u > umax then umax = u end
local win = tonumber(ARGV[2]) + umax
local pause = tonumber(redis.call('ZSCORE', key, 'pause') or '0')
local known = tonumber(ARGV[8])
if known ~= 0 and known ~= birth and not filled then
  -- The log was lost (evicted) since this gateway saw it: count a full window.
  local f = now + tonumber(ARGV[9])
  redis.call('ZADD', key, f, limit .. '|0|fill:' .. ARGV[7])
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
if eff <= 0 then
  return {birth, 0, 20000, now, ph}
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
local bcap = bsize
if eff < bcap then bcap = eff end
-- Slots begin once the answer is back at the gateway.
local start = now + tonumber(ARGV[18])
local out, leases, granted, retry = {}, 0, 0, 0
while granted < want do
  local s = start
  if granted < burst and (last == nil or last <= start) and total < bcap and pause <= start then
    s = start
  else
    if last then
      local gap = pace
      local room = eff - total
      if room >= 1 and i <= n then
        local spread = (scores[i] + win - last) / (room + 1)
        if spread > gap then gap = spread end
      end
      if last + gap > s then s = last + gap end
    end
    if pause > s then s = pause end
    advance(s)
    while total >= eff and i <= n do
      if scores[i] + win > s then s = scores[i] + win end
      advance(s)
    end
  end
  if s - start > horizon then
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
local reply = {birth, leases, math.floor(retry), now, ph}
for k = 1, leases do
  local s = out[2 * k - 1]
  local c = out[2 * k]
  redis.call('ZADD', key, s, c .. '|' .. ARGV[10] .. '|' .. ARGV[7] .. ':' .. k)
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

/// A gateway's return to the log: writes the calls it sent that the log may lack
/// (on its local share, or before a restart), removes its own marker, checks in,
/// and notes its return marker. `KEYS[1]`: the log. ARGV: 1 nonce, 2 gateway id,
/// 3 marker life (µs), 4 how long past now a call still matters (µs), 5–8 the
/// return marker (as for [`LEASE`]), then each call's age (µs). Returns Redis's
/// time (µs).
const REPLAY: &str = r#"
local key = KEYS[1]
local now = now_us()
local id = ARGV[2]
local life = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local mark = new_mark(now, ARGV, 5)
scan(key, now, id, mark ~= nil, life)
check_in(key, now, id, life, mark)
for i = 9, #ARGV do
  local age = tonumber(ARGV[i])
  if age < keep then
    redis.call('ZADD', key, now - age, '1|0|' .. ARGV[1] .. ':' .. i)
  end
end
return fmt(now)
"#;

/// Marks a gateway as possibly sending on its local share (sent while Redis holds
/// writes: it runs when the pause ends, before any lease sent after it).
/// `KEYS[1]`: the log. ARGV: gateway id, its share, marker life (µs). Returns Redis's
/// time (µs).
const MARK: &str = r#"
local key = KEYS[1]
local now = now_us()
scan(key, now, ARGV[1], false, tonumber(ARGV[3]))
redis.call('ZADD', key, now + tonumber(ARGV[3]), 'l|' .. ARGV[1] .. '|' .. ARGV[2])
return fmt(now)
"#;

/// Moves one permit of a lease that its caller could not use in time to just after
/// now, if no window would then hold more than N. `KEYS[1]`: the log. ARGV: 1 limit
/// N, 2 the lease's slot (µs, to the microsecond below), 3 its tag, 4 a nonce, 5 how
/// far after now (µs), 6 the clock uncertainty u (µs), 7 marker life (µs). Returns
/// {moved (1/0), now, the new slot}.
///
/// Why it is safe: a window that holds the new slot s' > s but not the old one s
/// ends at or after s + its length, so it holds nothing at or before s; if the log
/// holds fewer than N − phantom slots after s, it has room. Every other window holds
/// both, or only the old one.
const RETIME: &str = r#"
local key = KEYS[1]
local now = now_us()
local limit = tonumber(ARGV[1])
local s = tonumber(ARGV[2])
local found, fc, fu, fs = nil, 0, '0', 0
local near = redis.call('ZRANGEBYSCORE', key, s - 1, s + 2, 'WITHSCORES')
for k = 1, #near, 2 do
  local c, u, tag = string.match(near[k], '^(%d+)|(%d+)|(.*)$')
  if c and tag == ARGV[3] then
    found = near[k]
    fc = tonumber(c)
    fu = u
    fs = tonumber(near[k + 1])
  end
end
if not found or now < fs then return {0, now, 0} end
if tonumber(redis.call('ZSCORE', key, 'pause') or '0') > now then return {0, now, 0} end
local scores, counts, n, filled, umax, seen, marks, lph, own = scan(key, now, '', false, tonumber(ARGV[7]))
local ph = phantom(now, limit, seen, marks, lph, own)
local after = 0
for k = 1, n do
  if scores[k] > fs then after = after + counts[k] end
end
if after + 1 + ph > limit then return {0, now, 0} end
local target = now + tonumber(ARGV[5])
redis.call('ZREM', key, found)
if fc > 1 then redis.call('ZADD', key, fs, (fc - 1) .. '|' .. fu .. '|' .. ARGV[3]) end
redis.call('ZADD', key, target, '1|' .. ARGV[6] .. '|' .. ARGV[4])
return {1, now, target}
"#;

fn log_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LUA_LOG}{body}"))
}

pub(crate) static LEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| log_script(LEASE));
pub(crate) static PAUSE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PAUSE));
pub(crate) static REPLAY_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| log_script(REPLAY));
pub(crate) static MARK_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| log_script(MARK));
pub(crate) static RETIME_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| log_script(RETIME));

/// A log read while writes are held: Redis's `TIME` (seconds, microseconds) and its
/// members with their scores.
type FrozenLog = ((String, String), Vec<(String, f64)>);

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
    /// Calls counted for gateways that may be on their local shares.
    phantom: i64,
}

impl LeaseReply {
    fn parse(v: &[i64]) -> LeaseReply {
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        let nl = get(1).max(0) as usize;
        LeaseReply {
            birth: get(0),
            leases: (0..nl)
                .map(|k| (get(5 + 2 * k), get(6 + 2 * k).max(0) as u32))
                .collect(),
            retry_us: get(2).max(0),
            now: get(3),
            phantom: get(4).max(0),
        }
    }
}

/// What a queued caller gets.
#[derive(Debug)]
enum Grant {
    /// Go within `[from, until)`.
    Permit(Lease),
    /// The next slot is further than the caller may wait.
    Refused(Duration),
    /// Redis failed: use the local share.
    Fallback,
}

/// Permits leased together: usable within `[from, until)`.
#[derive(Debug, Clone)]
struct Lease {
    /// The slot as early as it can be in local time (for "may the caller wait that
    /// long").
    slot: Instant,
    from: Instant,
    until: Instant,
    left: u32,
    /// Where its permits are in the log, to move one that was not used in time.
    mark: Mark,
    /// The session it was leased in.
    session: u64,
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
    /// The loss for which the local share was counted as full.
    filled_for: u64,
    /// This gateway's callers are part of a burst after idle: no call it admitted
    /// since it was idle has come back.
    burst_open: bool,
    /// The latest slot this gateway was granted (local time).
    last_slot: Option<Instant>,
    /// The log's birth as last seen (0: never, or not on this server).
    birth: i64,
    /// The session in which this command last leased.
    leased_in: u64,
    /// Writes held: the hold (see [`Hold`]) in which this command's marker was sent,
    /// when, and whether it is known to be held (pending for `redis.timeout_ms`).
    marker: Option<(u64, Instant, MarkerState)>,
    /// The hold for which the local share was seeded with the frozen log.
    seeded_for: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkerState {
    /// Sent, not answered yet.
    Pending,
    /// Pending for `redis.timeout_ms` while Redis answered reads: it is held, and runs
    /// when the pause ends.
    Held,
    /// Answered (writes run again) or failed.
    Done,
}

impl CommandState {
    /// Takes one permit usable before `deadline`, if the pool has one.
    fn take(&mut self, now: Instant, deadline: Instant) -> Option<Lease> {
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
        let mut one = lease.clone();
        one.left = 1;
        if lease.left == 0 {
            self.pool.pop_front();
        }
        Some(one)
    }
}

/// How fast Redis's clock may run against ours, at most: 0.1%.
const DRIFT_PER_MILLION: i64 = 1000;
/// Round trips remembered to bound Redis's clock.
const CLOCK_SAMPLES: usize = 64;
/// ... and for how long.
const CLOCK_SAMPLE_AGE: Duration = Duration::from_secs(5);

/// Recent round trips that read Redis's clock (leases, write-backs, heartbeats,
/// reads), which bound Redis's clock in this gateway's time: each one saw Redis read
/// R between sending at `t_sent` and receiving at `t_recv`, so the offset θ (Redis
/// time = local time + θ) was within `[R − t_recv, R − t_sent]`. The intersection
/// over recent round trips, each widened by the drift since, is as tight as the
/// fastest of them, not as loose as the current one.
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
        // Samples expire by their age when this round trip was sent: the lead it asked
        // for was reckoned from them ([`ClockSync::slowest_back`]), so its answer is
        // read with them too (an older sample is still a true bracket, widened by the
        // drift since; expiry only keeps the set recent). Dropping them in between
        // would move its slot later by the width they kept out, once.
        let max_age = CLOCK_SAMPLE_AGE.as_micros() as i64;
        while q.front().is_some_and(|x| s - x.1 > max_age) {
            q.pop_front();
        }
        if q.len() > CLOCK_SAMPLES {
            // The slowest round trip says least: it goes first (the oldest of them).
            if let Some(i) = (0..q.len()).max_by_key(|&i| (q[i].1 - q[i].0, -(i as i64))) {
                q.remove(i);
            }
        }
        loop {
            let (lo, hi) = Self::bounds(&q, r);
            if lo <= hi || q.len() <= 1 {
                return (lo, hi);
            }
            // The samples disagree (a clock stepped): trust the newest.
            q.pop_front();
        }
    }

    fn bounds(q: &VecDeque<(i64, i64, i64)>, now: i64) -> (i64, i64) {
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        for &(si, ri, ti) in q.iter() {
            let widen = (now - ri).max(0) * DRIFT_PER_MILLION / 1_000_000;
            lo = lo.max(ti - ri - widen);
            hi = hi.min(ti - si + widen);
        }
        (lo, hi)
    }

    /// How well θ is known now (µs): the width of the bounds, `None` without samples.
    #[cfg(test)]
    fn width(&self) -> Option<i64> {
        self.width_after(Duration::ZERO)
    }

    /// How well θ will be known `later` from now (µs), from the samples that are kept
    /// until then; `None` without any.
    fn width_after(&self, later: Duration) -> Option<i64> {
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.us(Instant::now());
        let until = now + later.as_micros() as i64;
        let max_age = CLOCK_SAMPLE_AGE.as_micros() as i64;
        let kept: VecDeque<(i64, i64, i64)> = q
            .iter()
            .filter(|x| until - x.1 <= max_age)
            .copied()
            .collect();
        if kept.is_empty() {
            return None;
        }
        let (lo, hi) = Self::bounds(&kept, until);
        (lo <= hi).then_some(hi - lo)
    }

    /// How long recent answers took to come back after Redis read its clock, as the
    /// gateway must count it (µs): a slot at Redis time s may be used from local time
    /// s − lo on, so an answer read at R and received at r allows a slot at
    /// `R + (r − R + lo)` to be used on arrival. The largest recent such lead.
    /// Only the samples that a round trip sent now reads its answer with count
    /// ([`ClockSync::add`]).
    fn slowest_back(&self) -> Option<i64> {
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.us(Instant::now());
        let max_age = CLOCK_SAMPLE_AGE.as_micros() as i64;
        let fresh: VecDeque<(i64, i64, i64)> =
            q.iter().filter(|x| now - x.1 <= max_age).copied().collect();
        let (lo, _) = Self::bounds(&fresh, now);
        fresh
            .iter()
            .map(|&(s, r, t)| (r - t + lo).clamp(0, r - s))
            .max()
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

/// Calls this gateway sent (fleet permits and local ones), per command, for writing
/// back into the log after an incident.
#[derive(Debug, Default)]
struct Departures {
    /// command → departures within the last window (+ [`MAX_UNCERTAINTY`]).
    calls: HashMap<String, VecDeque<Instant>>,
    /// Calls went on the local share since the last return.
    local: bool,
    /// The local share was seeded with a frozen log since the last return.
    frozen: bool,
    /// The session being returned to (its write-back is being made): no call leaves
    /// on the local share meanwhile.
    returning: u64,
}

/// Writes held (`CLIENT PAUSE WRITE`): numbered, so that markers and seeds belong to
/// one.
#[derive(Debug, Default)]
struct Hold {
    /// The current or last hold's number (0: none yet).
    epoch: u64,
    /// Whether it still lasts, as far as this gateway knows.
    active: bool,
    /// The connection's loss (to held writes) that this hold covers, if any.
    loss: u64,
}

/// The marker of this gateway's last return from an incident (see [`LUA_LOG`]):
/// written into each log with the write-back and the first lease of each command in
/// the session, while it counts.
#[derive(Debug, Clone)]
struct Return {
    /// The session returned to.
    seq: u64,
    /// Until when it is written.
    until: Instant,
    /// When the incident began (local time).
    began: Instant,
    /// Only check-ins since `began` count (a restart, held writes, a first session
    /// after running alone); otherwise also those since "now − the local fill".
    strict: bool,
    /// A restart: the old calls are lost, so a full window counts until they are out
    /// of every window.
    full: Duration,
}

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
    /// The furthest ahead a lease reserves; H, how far ahead of a loss the fleet's
    /// slots may be.
    horizon: Duration,
    /// The local share is N / G, G = max(this, live gateways recently seen).
    expected: u32,
    /// Live gateways seen by the heartbeat, with when (the largest of the last ones
    /// counts).
    live: Mutex<VecDeque<(Instant, u32)>>,
    /// The local share, used while Redis is unusable.
    fallback: LocalRateLimiter,
    states: RwLock<HashMap<String, Arc<Mutex<CommandState>>>>,
    departures: Mutex<Departures>,
    /// The session whose log has our calls; fleet mode only then.
    synced: AtomicU64,
    /// Permits leased in sessions before this one are void (Redis restarted since).
    restarted_at: AtomicU64,
    /// The last return's marker.
    ret: Mutex<Option<Return>>,
    /// Writes held.
    hold: Mutex<Hold>,
    /// Redis's clock in ours.
    clock: ClockSync,
    /// Unique per lease, with the gateway id.
    nonce: AtomicU64,
    id: String,
    /// When this limiter started (the start of "alone" before Redis is first reached).
    started: Instant,
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
        let fallback = LocalRateLimiter::with_span(
            rl.per_command_per_sec,
            rl.commands.clone(),
            rl.burst_percent,
            window,
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
            expected: r.expected_gateways.max(1),
            live: Mutex::new(VecDeque::new()),
            states: RwLock::new(HashMap::new()),
            departures: Mutex::new(Departures::default()),
            synced: AtomicU64::new(0),
            restarted_at: AtomicU64::new(0),
            ret: Mutex::new(None),
            hold: Mutex::new(Hold::default()),
            clock: ClockSync::new(),
            nonce: AtomicU64::new(0),
            id,
            started: Instant::now(),
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

    /// H: how far ahead of a loss the fleet's log may hold slots.
    pub fn hold(&self) -> Duration {
        self.horizon
    }

    /// How long after losing Redis a gateway's local share sends its first call (it
    /// cannot see the fleet's last slots): H + v + u + J + W, u at its largest.
    pub fn local_fill(&self) -> Duration {
        self.fleet_reach() + self.window()
    }

    /// How long after a loss the fleet's calls may still arrive at Chat, less the
    /// latency they share: H + v + u + J, u at its largest (see [`Self::uncertainty`]).
    fn fleet_reach(&self) -> Duration {
        self.horizon + self.lease + self.redis.timeout().min(MAX_UNCERTAINTY) + self.allowance
    }

    /// Sets the live gateways the heartbeat saw: the local share is N / G, G being
    /// the larger of `redis.expected_gateways` and the live gateways seen in the last
    /// [`MARKER_LIFE`].
    pub fn set_live_gateways(&self, g: u32) {
        let now = Instant::now();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.push_back((now, g));
        while live.len() > 16 || live.front().is_some_and(|(t, _)| *t + MARKER_LIFE < now) {
            live.pop_front();
        }
        drop(live);
        self.fallback.set_share(self.gateways());
    }

    /// G: the gateways the fleet counts.
    fn gateways(&self) -> u32 {
        let now = Instant::now();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .filter(|(t, _)| *t + MARKER_LIFE >= now)
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(0)
            .max(self.expected)
    }

    /// A round trip that read Redis's clock (`redis_us`), e.g. the heartbeat's.
    pub fn clock_sample(&self, sent: Instant, recv: Instant, redis_us: i64) {
        if redis_us > 0 {
            self.clock.add(sent, recv, redis_us);
        }
    }

    /// The limit of `command`.
    pub fn rate_of(&self, command: &str) -> u32 {
        self.overrides
            .get(command)
            .copied()
            .unwrap_or(self.default_rate)
            .max(1)
    }

    /// Whether leases come from Redis now (up, and our calls written back).
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
                    marker: None,
                    seeded_for: 0,
                }))
            })
            .clone()
    }

    fn all_states(&self) -> Vec<Arc<Mutex<CommandState>>> {
        self.states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Records a call that leaves now; returns whether it may. A fleet permit from
    /// before a restart is void (the new log has not got it); a local call waits
    /// while this gateway writes its calls back.
    fn depart(&self, command: &str, session: Option<u64>) -> bool {
        let now = Instant::now();
        let keep = self.window() + MAX_UNCERTAINTY;
        let limit = self.rate_of(command) as usize;
        let mut d = self.departures.lock().unwrap_or_else(|p| p.into_inner());
        match session {
            Some(s) => {
                if s < self.restarted_at.load(Ordering::Acquire) {
                    return false;
                }
                counter!(names::PERMITS_USED, "command" => command_label(command)).increment(1);
            }
            None => {
                if d.returning != 0 && d.returning == self.redis.session_seq() {
                    return false;
                }
                d.local = true;
            }
        }
        if d.calls.len() >= MAX_COMMANDS && !d.calls.contains_key(command) {
            return true;
        }
        let q = d.calls.entry(command.to_string()).or_default();
        while q.front().is_some_and(|t| *t + keep <= now) || q.len() >= 2 * limit {
            q.pop_front();
        }
        q.push_back(now);
        true
    }

    /// This session's return marker, for a command's first lease in it.
    fn return_marker(&self, session: u64) -> Option<Return> {
        let r = self.ret.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref()
            .filter(|r| r.seq == session && Instant::now() < r.until)
            .cloned()
    }

    /// The marker's arguments: age of its start (µs; 0: none), G, wait (µs), full
    /// span (µs).
    fn marker_args(&self, m: Option<&Return>) -> [u64; 4] {
        match m {
            None => [0; 4],
            Some(r) => [
                (r.began.elapsed().as_micros() as u64).max(1),
                u64::from(self.gateways()),
                if r.strict {
                    0
                } else {
                    self.local_fill().as_micros() as u64
                },
                r.full.as_micros() as u64,
            ],
        }
    }

    /// The clock uncertainty a lease asks to be counted with (µs): what will still be
    /// known of Redis's clock when its answer is back, or the recent round trip when
    /// nothing is.
    fn uncertainty(&self) -> u64 {
        let cap = self.redis.timeout().min(MAX_UNCERTAINTY).as_micros() as i64;
        let w = match self.clock.width_after(self.redis.timeout()) {
            Some(w) => w + 200,
            None => (self.redis.rtt().as_micros() as i64 * 3 / 2).max(1_000),
        };
        w.clamp(100, cap.max(100)) as u64
    }

    /// The lead a lease asks for (µs): how long its answer takes to come back at most
    /// recently (so that its slots are not past on arrival), capped at the timeout.
    fn lead(&self) -> u64 {
        let cap = self.redis.timeout().as_micros() as i64;
        let back = self.clock.slowest_back().unwrap_or(0);
        (back + 500).clamp(0, cap) as u64
    }

    /// A permit from the pool, or a place in the queue (given up at `max_wait`): at its
    /// head for a caller whose turn came and went (its permit void), which keeps it.
    async fn take_or_wait(&self, command: &str, max_wait: Duration, head: bool) -> Grant {
        // `max_wait` bounds how far the slot may be; asking for it (a lease in flight,
        // then ours: each at most `redis.timeout_ms` and its patience) comes on top.
        let asking = 3 * self.redis.timeout() + self.lease;
        let deadline = Instant::now() + max_wait + asking;
        let st = self.state(command);
        let rx = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some(l) = s.take(now, now + max_wait) {
                return Grant::Permit(l);
            }
            let pace = pace(self.window(), s.limit as usize);
            if s.waiters.is_empty()
                && s.pool.is_empty()
                && s.last_slot.is_none_or(|l| l + pace <= now)
            {
                s.burst_open = true;
            }
            let (tx, rx) = oneshot::channel();
            let w = Waiter { max_wait, tx };
            if head {
                s.waiters.push_front(w);
            } else {
                s.waiters.push_back(w);
            }
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
        // Waiting for the lease's answer is waiting on Redis: it counts against the
        // request's Redis budget (once, when it overlaps the L2 lookup). An answer
        // later than the budget is still waited for, as part of the wait for a slot.
        let _wait = super::conn::BudgetWait::begin();
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(g) => g.unwrap_or(Grant::Fallback),
            // Still no slot (the log waits for gateways that may be on their local
            // shares): refused like a slot out of reach.
            Err(_) => Grant::Refused(PHANTOM_POLL.max(self.lease)),
        }
    }

    /// Leases slots for the queued callers of one command until none is left.
    async fn lease_loop(self: Arc<Self>, st: Arc<Mutex<CommandState>>) {
        loop {
            let now = Instant::now();
            let session = self.redis.session_seq();
            let marker = self.return_marker(session);
            let (key, limit, burst, want, horizon, pause, known, first) = {
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
                    s.leased_in != session,
                )
            };
            if let Some(p) = pause {
                tokio::time::sleep_until(p.into()).await;
                continue;
            }
            let nonce = format!("{}:{}", self.id, self.nonce.fetch_add(1, Ordering::Relaxed));
            let tag = nonce.clone();
            let window_us = self.window_us;
            let burst_size = burst_of(limit as usize, self.burst_percent);
            let horizon_us = horizon.as_micros() as u64;
            let hold_us = self.horizon.as_micros() as u64;
            let u = self.uncertainty();
            let id = self.id.clone();
            let life = MARKER_LIFE.as_micros() as u64;
            let keep = MAX_UNCERTAINTY.as_micros() as u64;
            let m = self.marker_args(if first { marker.as_ref() } else { None });
            let lead = self.lead();
            // A slot stays usable for v + u after it: an answer that late is still
            // worth waiting for.
            let patience = self.lease + Duration::from_micros(u);
            let t_sent = Instant::now();
            let res = self
                .redis
                .run_patient(Op::Ratelimit, patience, |mut c| async move {
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
                        .arg(hold_us)
                        .arg(u)
                        .arg(id)
                        .arg(life)
                        .arg(m[0])
                        .arg(m[1])
                        .arg(m[2])
                        .arg(m[3])
                        .arg(keep)
                        .arg(lead)
                        .invoke_async::<Vec<i64>>(&mut c)
                        .await;
                    r
                })
                .await;
            let t_recv = Instant::now();
            let reply = match res {
                Ok(v) => LeaseReply::parse(&v),
                Err(FleetError::Timeout) if self.redis.is_up() => {
                    // Slow: ask again (each caller waits at most its own wait).
                    continue;
                }
                Err(FleetError::Blocked) => {
                    // Redis holds writes (for every gateway): the callers go on the
                    // local share seeded with the frozen log (see `frozen_ready`).
                    self.hold_begins();
                    self.fail_waiters(&st);
                    return;
                }
                Err(e) => {
                    self.denied(&e);
                    self.fail_waiters(&st);
                    return;
                }
            };
            self.hold_ends();
            let (lo, hi) = self.clock.add(t_sent, t_recv, reply.now);
            let nap = {
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                s.birth = reply.birth;
                s.leased_in = session;
                let granted: u64 = reply.leases.iter().map(|(_, g)| u64::from(*g)).sum();
                counter!(names::PERMITS_LEASED, "command" => command_label(&s.name))
                    .increment(granted);
                let u = u as i64;
                for (k, (offset, g)) in reply.leases.into_iter().enumerate() {
                    // The lead is the time the answer takes, not a wait for a slot.
                    let wait = Duration::from_micros((offset - lead as i64).max(0) as u64);
                    let slot = reply.now + offset.max(0);
                    let drift = offset.max(0) * DRIFT_PER_MILLION / 1_000_000;
                    let mut lease = Lease {
                        slot: self.clock.at(slot - hi),
                        from: self.clock.at(slot - lo + drift),
                        until: self
                            .clock
                            .at(slot - hi - drift + self.lease.as_micros() as i64 + u),
                        left: g,
                        mark: Mark {
                            slot,
                            tag: format!("{tag}:{}", k + 1).into(),
                        },
                        session,
                    };
                    s.last_slot = Some(s.last_slot.map_or(lease.slot, |l| l.max(lease.slot)));
                    if lease.until <= lease.from + MIN_USABLE {
                        // The clocks are not known well enough; nothing usable.
                        tracing::debug!(
                            rtt_us = (t_recv - t_sent).as_micros() as u64,
                            width_us = hi - lo,
                            u,
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
                        let mut one = lease.clone();
                        one.left = 1;
                        if w.tx.send(Grant::Permit(one)).is_ok() {
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
                    if reply.phantom > 0 && granted == 0 {
                        // The log counts gateways that may be on their local shares as
                        // a full window: ask again soon (they come back within a
                        // reconnection).
                        tracing::debug!(
                            phantom = reply.phantom,
                            "waiting for gateways that may be on their local shares"
                        );
                        later.then_some(PHANTOM_POLL)
                    } else {
                        // Ask again when three quarters of a horizon's worth of slots
                        // are in reach: a batch, not one slot per lease.
                        later.then(|| {
                            retry
                                .saturating_sub(self.horizon / 4)
                                .max(Duration::from_millis(5))
                        })
                    }
                } else {
                    None
                }
            };
            if let Some(nap) = nap {
                tokio::time::sleep(nap).await;
            }
        }
    }

    /// Sends every waiter of a command to the local share.
    fn fail_waiters(&self, st: &Mutex<CommandState>) {
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        for w in s.waiters.drain(..) {
            let _ = w.tx.send(Grant::Fallback);
        }
        s.leasing = false;
    }

    /// A permit handed back unused: to the next waiting caller, or the pool.
    fn give_back(&self, command: &str, lease: Lease) {
        let now = Instant::now();
        if lease.until <= now + MIN_HANDED {
            return;
        }
        let st = self.state(command);
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        if s.paused_until.is_some_and(|p| p > now) {
            return;
        }
        let mut lease = lease;
        while let Some(w) = s.waiters.pop_front() {
            match w.tx.send(Grant::Permit(lease)) {
                Ok(()) => return,
                Err(Grant::Permit(l)) => lease = l,
                Err(_) => return,
            }
        }
        s.pool.push_front(lease);
    }

    /// A fleet permit for `lease`: valid until its end; dropped unused, it is handed
    /// to the next caller.
    fn fleet_permit(&self, command: &str, lease: Lease) -> Permit {
        let me = self.this.clone();
        let command = command.to_string();
        let until = lease.until;
        let session = lease.session;
        Permit::new(until, move |used| {
            let Some(me) = me.upgrade() else {
                return false;
            };
            if used {
                me.depart(&command, Some(session))
            } else {
                me.give_back(&command, lease);
                false
            }
        })
    }

    /// A permit for the local slot `at`: valid until `at` + [`MAX_LATE`]; the call is
    /// recorded (to be written back) when it leaves; dropped unused, the slot goes
    /// back to the share.
    fn local_permit(&self, command: &str, at: Instant) -> Permit {
        let me = self.this.clone();
        let command = command.to_string();
        Permit::new(at + MAX_LATE, move |used| {
            let Some(me) = me.upgrade() else {
                return false;
            };
            if used && me.depart(&command, None) {
                return true;
            }
            me.fallback.release(&command, at);
            false
        })
    }

    /// Moves a permit its caller woke too late for to now, if the log allows: the
    /// caller keeps its turn and the slot is not wasted. Returns the new permit. Waits
    /// `redis.timeout_ms` at most, whatever is left of the request's Redis budget.
    async fn retime(&self, command: &str, lease: &Lease) -> Option<Lease> {
        if !self.fleet_mode() {
            tracing::debug!("could not move a permit: Redis unusable");
            return None;
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
        let (slot, tag) = (lease.mark.slot, lease.mark.tag.to_string());
        // Far enough ahead that the answer is back before the new slot.
        let ahead = self.clock.slowest_recent().clamp(2_500, 50_000) * 2;
        let u = self.uncertainty();
        let life = MARKER_LIFE.as_micros() as u64;
        let session = self.redis.session_seq();
        let t_sent = Instant::now();
        // Part of the wait for a slot (bounded by the caller's wait), not of the
        // request's Redis budget: without it the caller would ask for a new lease, a
        // round trip all the same, and lose its turn.
        let res = self
            .redis
            .run_patient(Op::Ratelimit, Duration::ZERO, |mut c| async move {
                let r = RETIME_SCRIPT
                    .key(key)
                    .arg(limit)
                    .arg(slot)
                    .arg(tag)
                    .arg(nonce.clone())
                    .arg(ahead)
                    .arg(u)
                    .arg(life)
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
                return None;
            }
        };
        let (moved, now, target) = (
            v.first().copied() == Some(1),
            v.get(1).copied().unwrap_or(0),
            v.get(2).copied().unwrap_or(0),
        );
        tracing::debug!(moved, "permit moved to the present");
        if !moved {
            return None;
        }
        let (lo, hi) = self.clock.add(t_sent, t_recv, now);
        let from = self.clock.at(target - lo);
        let until = self
            .clock
            .at(target - hi + self.lease.as_micros() as i64 + u as i64);
        if from > Instant::now() {
            tokio::time::sleep_until(from.into()).await;
        }
        (Instant::now() + MIN_USABLE <= until).then(|| Lease {
            slot: from,
            from,
            until,
            left: 1,
            mark: lease.mark.clone(),
            session,
        })
    }

    /// Logs, once, that the Redis user may not run what the limiter needs.
    fn denied(&self, e: &FleetError) {
        if let FleetError::Redis(msg) = e {
            if msg.contains("NOPERM") && !self.denied_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    error = %msg,
                    "the Redis user may not run the rate limiter's commands (EVALSHA, SCRIPT LOAD, TIME, ZRANGEBYSCORE; in scripts TIME, ZADD, ZREM, ZSCORE, ZRANGEBYSCORE, ZREMRANGEBYSCORE): the rate limit runs at this gateway's share"
                );
            }
        }
    }

    // -----------------------------------------------------------------------------
    // Held writes.

    /// A lease was held: Redis holds writes (for every gateway).
    fn hold_begins(&self) {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if !h.active {
            h.active = true;
            h.epoch += 1;
            tracing::debug!(hold = h.epoch, "Redis holds writes");
        }
    }

    /// A write ran: Redis does not hold writes (any more).
    fn hold_ends(&self) {
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if h.active {
            h.active = false;
            tracing::debug!(hold = h.epoch, "Redis runs writes again");
        }
    }

    /// The current hold, if writes are held: from a held lease, or from the
    /// connection's loss to held writes (until a write runs or a session begins).
    fn current_hold(&self) -> Option<u64> {
        let (losses, kind, _) = self.redis.last_loss();
        let held_loss = kind == LossKind::Held && losses > 0 && !self.redis.is_up();
        let mut h = self.hold.lock().unwrap_or_else(|p| p.into_inner());
        if held_loss {
            if h.active {
                h.loss = losses;
            } else if h.loss != losses {
                // Lost to held writes without a held lease of ours: a hold begins.
                h.active = true;
                h.epoch += 1;
                h.loss = losses;
            }
        }
        h.active.then_some(h.epoch)
    }

    /// Whether `command` may go on the local share seeded with the frozen log now
    /// (writes held): its marker is known to be held (it runs when the pause ends,
    /// before any lease sent after the pause) and the frozen log is read. Waits for
    /// that, at most until `deadline`.
    async fn frozen_ready(&self, command: &str, deadline: Instant) -> bool {
        loop {
            let Some(epoch) = self.current_hold() else {
                return false;
            };
            let st = self.state(command);
            let (send, state, name, limit) = {
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                let send = match s.marker {
                    Some((e, _, _)) if e == epoch => false,
                    _ => {
                        s.marker = Some((epoch, Instant::now(), MarkerState::Pending));
                        true
                    }
                };
                let state = s.marker.map(|m| (m.1, m.2));
                (send, state, s.name.clone(), s.limit)
            };
            if send {
                self.send_marker(st.clone(), epoch, name.clone());
            }
            let Some((sent, state)) = state else {
                return false;
            };
            match state {
                MarkerState::Done => return false,
                MarkerState::Pending => {
                    let now = Instant::now();
                    let ready_at =
                        (sent + self.redis.timeout()).max(now + Duration::from_millis(2));
                    if ready_at > deadline {
                        return false;
                    }
                    tokio::time::sleep_until(ready_at.into()).await;
                    continue;
                }
                MarkerState::Held => {}
            }
            let seeded = st.lock().unwrap_or_else(|p| p.into_inner()).seeded_for == epoch;
            if seeded {
                return true;
            }
            return self.seed_frozen(&st, epoch, &name, limit).await;
        }
    }

    /// Sends a command's marker on the connection Redis holds, and notes what became
    /// of it.
    fn send_marker(&self, st: Arc<Mutex<CommandState>>, epoch: u64, name: String) {
        let Some(me) = self.this.upgrade() else {
            return;
        };
        let key = self.keys.limiter(&name);
        let (id, share) = (self.id.clone(), u64::from(self.fallback.rate_of(&name)));
        let life = MARKER_LIFE.as_micros() as u64;
        tokio::spawn(async move {
            let r = me
                .redis
                .run_behind_held(Op::Ratelimit, |mut c| async move {
                    let r = MARK_SCRIPT
                        .key(key)
                        .arg(id)
                        .arg(share)
                        .arg(life)
                        .invoke_async::<String>(&mut c)
                        .await;
                    r
                })
                .await;
            let state = match r {
                Err(FleetError::Blocked) => MarkerState::Held,
                Ok(_) => {
                    // Writes run: the pause is over. Back to the fleet soon.
                    me.hold_ends();
                    me.redis.nudge();
                    MarkerState::Done
                }
                Err(_) => MarkerState::Done,
            };
            tracing::debug!(marker = ?state, "marker for the local share");
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = &mut s.marker {
                if m.0 == epoch {
                    m.2 = state;
                }
            }
        });
    }

    /// Reads the frozen log (on the side connection: reads run while writes are
    /// held) and seeds the local share with it. Returns whether it did.
    async fn seed_frozen(
        &self,
        st: &Arc<Mutex<CommandState>>,
        epoch: u64,
        name: &str,
        limit: u32,
    ) -> bool {
        let key = self.keys.limiter(name);
        let t_sent = Instant::now();
        let res = self
            .redis
            .read_side(Op::Ratelimit, |mut c| async move {
                let mut p = redis::pipe();
                p.cmd("TIME")
                    .cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg("(0")
                    .arg("+inf")
                    .arg("WITHSCORES");
                let r: redis::RedisResult<FrozenLog> = p.query_async(&mut c).await;
                r
            })
            .await;
        let t_recv = Instant::now();
        let ((secs, micros), items) = match res {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the frozen log");
                return false;
            }
        };
        let now = secs.parse::<i64>().unwrap_or(0) * 1_000_000 + micros.parse::<i64>().unwrap_or(0);
        let (lo, hi) = self.clock.add(t_sent, t_recv, now);
        let v = self.lease.as_micros() as i64;
        let mut calls = Vec::new();
        let mut pause = 0i64;
        for (member, score) in items {
            let score = score as i64;
            if member == "pause" {
                pause = score;
                continue;
            }
            let mut parts = member.splitn(3, '|');
            let (Some(c), Some(rest)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(count) = c.parse::<usize>() else {
                continue;
            };
            let u = parts.next().map_or(0, |_| rest.parse::<i64>().unwrap_or(0));
            // It leaves within [s, s + v + u] on Redis's clock: in ours, within
            // [s − hi, s + v + u − lo].
            let a = self.clock.at(score - hi);
            let b = self.clock.at(score + v + u - lo);
            for _ in 0..count.min(limit as usize) {
                calls.push((a, b));
            }
        }
        if pause > now {
            let p = Duration::from_micros((pause - now) as u64);
            self.fallback.pause_now(name, p);
        }
        tracing::debug!(
            calls = calls.len(),
            "local share seeded with the frozen log"
        );
        self.fallback.seed(
            name,
            Seed {
                calls,
                limit: limit as usize,
                weight: self.gateways() as usize,
            },
        );
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        s.seeded_for = epoch;
        true
    }

    // -----------------------------------------------------------------------------
    // Redis lost.

    /// Before a call goes on the local share after Redis was lost (not to held
    /// writes): the share counts the fleet's window as full until `H + v + u + J`
    /// after the loss (then a window more), once per loss. Never reached Redis: nothing to
    /// count.
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
        let (loss, _, at) = self.redis.last_loss();
        let st = self.state(command);
        let name = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            if s.filled_for == loss {
                return;
            }
            s.filled_for = loss;
            s.name.clone()
        };
        let from = if self.synced.load(Ordering::Acquire) == seq {
            at
        } else {
            Instant::now()
        };
        self.fallback
            .fill(&name, from.min(Instant::now()) + self.fleet_reach());
    }

    // -----------------------------------------------------------------------------
    // Coming back.

    /// Writes this gateway's calls of the last window back into every log it knows,
    /// with its return marker; returns whether all landed.
    async fn write_back(&self, calls: &HashMap<String, Vec<u64>>, marker: Option<&Return>) -> bool {
        let mut names: Vec<String> = self
            .all_states()
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).name.clone())
            .collect();
        for c in calls.keys() {
            if !names.contains(c) {
                names.push(c.clone());
            }
        }
        let m = self.marker_args(marker);
        let life = MARKER_LIFE.as_micros() as u64;
        let keep = (self.window() + MAX_UNCERTAINTY).as_micros() as u64;
        for chunk in names.chunks(REPLAY_CHUNK) {
            let mut pipe = redis::pipe();
            for name in chunk {
                let nonce = format!(
                    "{}:r{}",
                    self.id,
                    self.nonce.fetch_add(1, Ordering::Relaxed)
                );
                let mut c = redis::cmd("EVALSHA");
                c.arg(REPLAY_SCRIPT.get_hash())
                    .arg(1)
                    .arg(self.keys.limiter(name))
                    .arg(nonce)
                    .arg(&self.id)
                    .arg(life)
                    .arg(keep)
                    .arg(m[0])
                    .arg(m[1])
                    .arg(m[2])
                    .arg(m[3]);
                for a in calls.get(name).map(Vec::as_slice).unwrap_or_default() {
                    c.arg(*a);
                }
                pipe.add_command(c);
            }
            let t_sent = Instant::now();
            let res = self
                .redis
                .run_long(Op::Ratelimit, |mut c| async move {
                    let r: redis::RedisResult<Vec<String>> = match pipe.query_async(&mut c).await {
                        Err(e)
                            if e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                        {
                            REPLAY_SCRIPT.load_async(&mut c).await?;
                            pipe.query_async(&mut c).await
                        }
                        r => r,
                    };
                    r
                })
                .await;
            let t_recv = Instant::now();
            match res {
                Ok(v) => {
                    if let Some(now) = v.first().and_then(|n| n.parse::<i64>().ok()) {
                        self.clock.add(t_sent, t_recv, now);
                    }
                }
                Err(e) => {
                    self.denied(&e);
                    tracing::debug!(error = %e, "could not write calls back into the fleet's log");
                    return false;
                }
            }
        }
        true
    }
}

/// On every new session: after a restart, voids the old permits and forgets the
/// clock and the logs' births; writes this gateway's calls back into the logs (with
/// its return marker after an incident); then lets leasing resume for that session.
async fn sync_loop(weak: Weak<FleetLimiter>, mut sessions: tokio::sync::watch::Receiver<Session>) {
    let mut last_synced: Option<Instant> = None;
    loop {
        let session = sessions.borrow_and_update().clone();
        if session.seq > 0 {
            let Some(l) = weak.upgrade() else { return };
            let (calls, local, frozen) = {
                let mut d = l.departures.lock().unwrap_or_else(|p| p.into_inner());
                d.returning = session.seq;
                if session.restarted {
                    l.restarted_at.store(session.seq, Ordering::Release);
                }
                let now = Instant::now();
                let calls: HashMap<String, Vec<u64>> = d
                    .calls
                    .iter()
                    .map(|(c, q)| {
                        (
                            c.clone(),
                            q.iter()
                                .map(|t| now.saturating_duration_since(*t).as_micros() as u64)
                                .collect(),
                        )
                    })
                    .collect();
                (calls, d.local, d.frozen)
            };
            if session.restarted {
                l.clock.clear();
                for st in l.all_states() {
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    s.pool.clear();
                    s.birth = 0;
                }
            }
            // After an incident the others may still be on their local shares (or, after
            // a restart, hold calls the new log lacks): the return marker counts them
            // until they are back.
            let (_, kind, lost_at) = l.redis.last_loss();
            let first = last_synced.is_none();
            let incident = session.restarted || local;
            let marker = incident.then(|| Return {
                seq: session.seq,
                until: Instant::now() + MARKER_LIFE,
                began: if first { l.started } else { lost_at },
                strict: session.restarted || frozen || first || kind == LossKind::Held,
                full: if session.restarted {
                    l.horizon + l.window() + MAX_UNCERTAINTY
                } else {
                    Duration::ZERO
                },
            });
            if let Some(m) = &marker {
                tracing::info!(
                    restarted = session.restarted,
                    local,
                    strict = m.strict,
                    "back in the fleet's rate limit: waiting for gateways that may still be on their local shares"
                );
            }
            *l.ret.lock().unwrap_or_else(|p| p.into_inner()) = marker.clone();
            let mut tries = 0u32;
            let mut ok = false;
            while !sessions.has_changed().unwrap_or(true) {
                if l.write_back(&calls, marker.as_ref()).await {
                    ok = true;
                    break;
                }
                tries += 1;
                if tries > 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if ok && !sessions.has_changed().unwrap_or(true) {
                {
                    let mut d = l.departures.lock().unwrap_or_else(|p| p.into_inner());
                    d.local = false;
                    d.frozen = false;
                    d.returning = 0;
                    l.synced.store(session.seq, Ordering::Release);
                }
                l.hold_ends();
                l.fallback.unseed_all();
                last_synced = Some(Instant::now());
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
    ) -> BoxFuture<'a, Result<Permit, Throttled>> {
        Box::pin(async move {
            let deadline = Instant::now() + max_wait;
            'call: loop {
                // The local share is only for when Redis fails: a permit that is void
                // (we woke past its end) is wasted capacity, never a reason to go local.
                let mut head = false;
                while self.fleet_mode() && self.current_hold().is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.take_or_wait(command, left, head).await {
                        Grant::Permit(lease) => {
                            if lease.from > Instant::now() {
                                tokio::time::sleep_until(lease.from.into()).await;
                            }
                            if Instant::now() + MIN_USABLE <= lease.until {
                                return Ok(self.fleet_permit(command, lease));
                            }
                            tracing::debug!(
                                late_us = Instant::now()
                                    .saturating_duration_since(lease.from)
                                    .as_micros() as u64,
                                "permit void"
                            );
                            // Woken too late: move the permit to now if the log allows,
                            // rather than losing the caller's turn.
                            if let Some(moved) = self.retime(command, &lease).await {
                                return Ok(self.fleet_permit(command, moved));
                            }
                            head = true;
                        }
                        Grant::Refused(retry_after) => return Err(Throttled { retry_after }),
                        Grant::Fallback => {
                            if self.current_hold().is_none() && self.fleet_mode() {
                                // Redis failed this lease but is not (yet) declared
                                // unusable: ask it again.
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(Throttled {
                            retry_after: self.lease,
                        });
                    }
                }
                // Writes held: the frozen log decides. Otherwise Redis is gone (or was
                // never reached): the fill decides.
                let frozen = self.frozen_ready(command, deadline).await;
                if self.fleet_mode() && !frozen {
                    continue 'call;
                }
                if frozen {
                    self.departures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .frozen = true;
                } else {
                    self.before_local(command);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let mut slot = LocalSlot {
                    share: &self.fallback,
                    command,
                    slot: Some(self.fallback.reserve(command, left)?),
                };
                let at = slot.slot.unwrap_or_else(Instant::now);
                // Wait for the local slot; Redis coming back decides instead. Nothing
                // goes on the local share while Redis takes writes (the log would not
                // count it): a return being written back is waited for.
                loop {
                    let now = Instant::now();
                    let held = frozen && self.current_hold().is_some();
                    if self.fleet_mode() && !held {
                        drop(slot);
                        continue 'call;
                    }
                    if now >= at && (held || !self.redis.is_up()) {
                        slot.slot = None;
                        if now > at + MAX_LATE {
                            // Woken too late for the slot: ask again.
                            continue 'call;
                        }
                        return Ok(self.local_permit(command, at));
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

    fn pause<'a>(&'a self, command: &'a str, pause: Duration) -> BoxFuture<'a, ()> {
        self.fallback.pause_now(command, pause);
        let st = self.state(command);
        let name = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            let until = Instant::now() + pause;
            s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
            s.pool.clear();
            s.name.clone()
        };
        let key = self.keys.limiter(&name);
        let pause_us = pause.as_micros() as u64;
        // Written before the caller is answered (at most `redis.timeout_ms`, or what is
        // left of the request's Redis budget): once a gateway has answered Chat's
        // throttling code, every lease of the fleet respects the pause. A write that
        // fails leaves the pause to this gateway (and to Chat).
        Box::pin(async move {
            let _ = self
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
        })
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
            LeaseReply::parse(&[1_700_000_000_000_000, 0, 700_000, 1_800_000_000_000_000, 0]),
            LeaseReply {
                birth: 1_700_000_000_000_000,
                leases: vec![],
                retry_us: 700_000,
                now: 1_800_000_000_000_000,
                phantom: 0,
            }
        );
        // Two leases (now, 30; in 0.4 s, 1), and the next slot beyond the horizon.
        let r = LeaseReply::parse(&[7, 2, 900_000, 9, 12, 0, 30, 400_000, 1]);
        assert_eq!(r.birth, 7);
        assert_eq!(r.leases, vec![(0, 30), (400_000, 1)]);
        assert_eq!(r.retry_us, 900_000);
        assert_eq!(r.now, 9);
        assert_eq!(r.phantom, 12);
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
        assert_eq!(c.width(), None);
    }
}
