//! The heartbeat, once a second off the request path: tells the fleet this gateway is
//! alive, learns how many gateways are (the local rate-limit share while Redis is
//! away is N divided by that), keeps the fleet-wide generation in step, and probes
//! Redis when no request does.
//!
//! It also owns the fleet-wide state every session checks ([`session`]):
//!
//! - **The fleet-wide generation only moves forward.** It is part of every L2 page's
//!   key. Raising it (for "invalidate everything", or after a loss) sets it to the
//!   largest of Redis's clock in milliseconds, its value plus one, and this gateway's
//!   highest known value plus one: past every value any gateway has seen, and past
//!   any value an older snapshot or a lagging replica could hold. A key that went
//!   missing is re-created past the clock too, so it can never count up into the
//!   generations of pages still in Redis.
//! - **Loss detection.** A new session compares the key and the event counter
//!   (`P:{fleet}:seq`) with the highest values this gateway has seen: lower values
//!   mean Redis lost writes (a failover to a lagging replica, a restart from an older
//!   snapshot, eviction). That, or a different server ([`super::conn::Session`]),
//!   raises the generation before the session is used, so no L2 page written before
//!   the incident is ever read again (`chat_gateway_l2_flushes_total{reason}`); the bus
//!   drops the memory it cannot prove fresh. Each beat checks the generation too: a
//!   key evicted or deleted under a live session is raised the same way
//!   (`reason="evicted"`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use metrics::{counter, gauge};

use super::conn::{Conn, Op, Redis};
use super::keys::Keys;
use super::limiter::FleetLimiter;
use super::Shared;
use crate::metrics::names;

/// How often a gateway beats.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A gateway is live if it beat within this.
pub const LIVE: Duration = Duration::from_secs(5);

/// Lua: Redis's clock in ms, and how every generation is raised. Shared by every
/// script that raises one.
pub(crate) const LUA_CLOCK: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%.0f', n) end
local function raised(cur, known, now)
  local n = now
  if cur + 1 > n then n = cur + 1 end
  if known + 1 > n then n = known + 1 end
  return n
end
"#;

/// `KEYS[1]`: the fleet-wide generation, `KEYS[2]`: the event counter. ARGV: the
/// generation this gateway knows, the highest event number it has seen, '1' if the
/// server is not the one of the previous session. Always writes (the session's write
/// probe). Returns {generation, lost (the state went back), raised}.
const SESSION: &str = r#"
local now = now_ms()
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
local s = tonumber(redis.call('GET', KEYS[2]) or '0')
local known = tonumber(ARGV[1])
local lost = 0
if g < known or s < tonumber(ARGV[2]) then lost = 1 end
local raise = 0
if lost == 1 or ARGV[3] == '1' then raise = 1 end
local out = g
if raise == 1 then out = raised(g, known, now)
elseif g == 0 then out = raised(0, known, now) end
redis.call('SET', KEYS[1], fmt(out))
return {fmt(out), lost, raise}
"#;

/// `KEYS[1]`: the heartbeats, `KEYS[2]`: the fleet-wide generation, `KEYS[3]`: the
/// positions applied. ARGV: gateway id, LIVE (ms), the generation this gateway knows.
/// A generation below it (the key was evicted or deleted) is raised past it. The
/// positions of at most 16 gateways no longer beating (the lowest: they stopped) are
/// removed. Returns {live gateways, generation, raised, Redis's clock in µs (which the
/// rate limiter learns its clock from)}.
const BEAT: &str = r#"
local now = now_ms()
local live = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - live)
redis.call('PEXPIRE', KEYS[1], live * 2)
for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, 15)) do
  if not redis.call('ZSCORE', KEYS[1], m) then redis.call('ZREM', KEYS[3], m) end
end
local g = tonumber(redis.call('GET', KEYS[2]) or '0')
local known = tonumber(ARGV[3])
local raise = 0
if g < known then
  g = raised(g, known, now)
  redis.call('SET', KEYS[2], fmt(g))
  raise = 1
end
local t = redis.call('TIME')
return {redis.call('ZCARD', KEYS[1]), fmt(g), raise, t[1] .. string.format('%06d', tonumber(t[2]))}
"#;

/// Leaves the fleet. `KEYS[1]`: the heartbeats, `KEYS[2]`: the positions applied.
/// ARGV: gateway id.
const LEAVE: &str =
    "redis.call('ZREM', KEYS[2], ARGV[1]) return redis.call('ZREM', KEYS[1], ARGV[1])";

pub(crate) static SESSION_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{LUA_CLOCK}{SESSION}")));
pub(crate) static BEAT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{LUA_CLOCK}{BEAT}")));
pub(crate) static LEAVE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(LEAVE));

/// Why L2 was emptied (the fleet-wide generation raised), for
/// `chat_gateway_l2_flushes_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Another server (restarted, failed over).
    Restart,
    /// Redis lost state this gateway had seen.
    Lost,
    /// A key whose loss loses invalidations was evicted or deleted (the fleet-wide
    /// generation, a group's index).
    Evicted,
}

impl Flush {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Flush::Restart => "restart",
            Flush::Lost => "lost",
            Flush::Evicted => "evicted",
        }
    }

    /// Counts it and says so.
    pub fn record(self, generation: u64) {
        counter!(names::L2_FLUSHES, "reason" => self.as_str()).increment(1);
        tracing::warn!(
            reason = self.as_str(),
            generation,
            "raised the fleet-wide generation: no page L2 held before is served again"
        );
    }
}

/// The session check, on a new connection before it is used: raises the fleet-wide
/// generation after a loss or when the server `changed`, and learns it. Returns
/// whether Redis lost state this gateway had seen.
pub async fn session(
    c: &mut Conn,
    keys: &Keys,
    shared: &Shared,
    changed: bool,
) -> redis::RedisResult<bool> {
    let known = shared.fleet_gen.load(Ordering::Acquire);
    let seen = shared.seq_seen.load(Ordering::Acquire);
    let (gen, lost, raised): (String, i64, i64) = SESSION_SCRIPT
        .key(keys.fleet_gen())
        .key(keys.bus_seq())
        .arg(known)
        .arg(seen)
        .arg(if changed { "1" } else { "0" })
        .invoke_async(c)
        .await?;
    let gen: u64 = gen.parse().unwrap_or(0);
    shared.fleet_gen.fetch_max(gen, Ordering::AcqRel);
    // The conversation pages' generation, so that this gateway reads the pages the
    // others store from the start (events carry it from then on).
    let pages: Option<u64> = redis::cmd("GET")
        .arg(keys.pages_gen())
        .query_async(c)
        .await?;
    shared
        .pages_gen
        .fetch_max(pages.unwrap_or(0), Ordering::AcqRel);
    if lost == 1 {
        tracing::warn!(
            known_generation = known,
            seen_events = seen,
            "Redis lost fleet state this gateway had seen (failover to a lagging replica, older snapshot, or eviction)"
        );
    }
    if raised == 1 && known > 0 {
        let why = if changed { Flush::Restart } else { Flush::Lost };
        why.record(gen);
    }
    Ok(lost == 1)
}

/// One beat; returns the live gateways.
pub async fn beat(
    redis: &Redis,
    keys: &Keys,
    id: &str,
    shared: &Shared,
    limiter: &FleetLimiter,
) -> Option<u32> {
    let hb = keys.heartbeat();
    let gen_key = keys.fleet_gen();
    let acks = keys.acks();
    let known = shared.fleet_gen.load(Ordering::Acquire);
    let id = id.to_string();
    let sent = std::time::Instant::now();
    let (live, gen, raised, now_us): (u32, String, i64, String) = redis
        .run(Op::Heartbeat, |mut c| async move {
            let r = BEAT_SCRIPT
                .key(hb)
                .key(gen_key)
                .key(acks)
                .arg(id)
                .arg(LIVE.as_millis() as u64)
                .arg(known)
                .invoke_async(&mut c)
                .await;
            r
        })
        .await
        .ok()?;
    limiter.clock_sample(sent, std::time::Instant::now(), now_us.parse().unwrap_or(0));
    let gen: u64 = gen.parse().unwrap_or(0);
    shared.fleet_gen.fetch_max(gen, Ordering::AcqRel);
    if raised == 1 {
        Flush::Evicted.record(gen);
    }
    let live = live.max(1);
    limiter.set_live_gateways(live);
    gauge!(names::FLEET_GATEWAYS).set(live as f64);
    Some(live)
}

/// Removes this gateway from the live set (graceful shutdown).
pub async fn leave(redis: &Redis, keys: &Keys, id: &str) {
    let hb = keys.heartbeat();
    let acks = keys.acks();
    let id = id.to_string();
    let _ = redis
        .run(Op::Heartbeat, |mut c| async move {
            let r = LEAVE_SCRIPT
                .key(hb)
                .key(acks)
                .arg(id)
                .invoke_async::<i64>(&mut c)
                .await;
            r
        })
        .await;
}

/// Beats every [`INTERVAL`] while `fleet` lives; beats at once on every new session.
pub async fn run(weak: Weak<super::Fleet>) {
    let mut sessions = match weak.upgrade() {
        Some(f) => f.redis.sessions(),
        None => return,
    };
    loop {
        {
            let Some(f) = weak.upgrade() else { return };
            beat(&f.redis, &f.keys, &f.id, &f.shared, &f.limiter).await;
        }
        let jitter = INTERVAL.mul_f64(0.9 + rand::random::<f64>() * 0.2);
        let _ = tokio::time::timeout(jitter, sessions.changed()).await;
    }
}

/// A session-start beat must not wait for the interval: used by [`super::Fleet`].
pub fn spawn(fleet: &Arc<super::Fleet>) {
    tokio::spawn(run(Arc::downgrade(fleet)));
}
