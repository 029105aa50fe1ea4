//! The heartbeat, once a second off the request path: tells the fleet this gateway is
//! alive, learns how many gateways are (the local rate-limit share while Redis is
//! away is N divided by that), keeps the fleet-wide generation in step, and probes
//! Redis when no request does.

use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use metrics::gauge;

use super::conn::{Op, Redis};
use super::keys::Keys;
use super::limiter::FleetLimiter;
use super::Shared;
use crate::metrics::names;

/// How often a gateway beats.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A gateway is live if it beat within this.
pub const LIVE: Duration = Duration::from_secs(5);

/// `KEYS[1]`: the heartbeats, `KEYS[2]`: the fleet-wide generation. ARGV: gateway id,
/// LIVE (ms), the generation this gateway knows (the key never goes below it, so a
/// Redis restarted empty cannot bring back pages of an old generation).
/// Returns {live gateways, fleet generation}.
const BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - live)
redis.call('PEXPIRE', KEYS[1], live * 2)
local g = tonumber(redis.call('GET', KEYS[2]) or '0')
local known = tonumber(ARGV[3])
if g < known then
  redis.call('SET', KEYS[2], ARGV[3])
  g = known
end
return {redis.call('ZCARD', KEYS[1]), g}
"#;

/// Leaves the fleet. `KEYS[1]`: the heartbeats. ARGV: gateway id.
const LEAVE: &str = "return redis.call('ZREM', KEYS[1], ARGV[1])";

pub(crate) static BEAT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BEAT));
pub(crate) static LEAVE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(LEAVE));

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
    let known = shared.fleet_gen.load(Ordering::Acquire);
    let id = id.to_string();
    let (live, gen): (u32, u64) = redis
        .run(Op::Heartbeat, |mut c| async move {
            let r = BEAT_SCRIPT
                .key(hb)
                .key(gen_key)
                .arg(id)
                .arg(LIVE.as_millis() as u64)
                .arg(known)
                .invoke_async(&mut c)
                .await;
            r
        })
        .await
        .ok()?;
    shared.fleet_gen.fetch_max(gen, Ordering::AcqRel);
    let live = live.max(1);
    limiter.set_live_gateways(live);
    gauge!(names::FLEET_GATEWAYS).set(live as f64);
    Some(live)
}

/// Removes this gateway from the live set (graceful shutdown).
pub async fn leave(redis: &Redis, keys: &Keys, id: &str) {
    let hb = keys.heartbeat();
    let id = id.to_string();
    let _ = redis
        .run(Op::Heartbeat, |mut c| async move {
            let r = LEAVE_SCRIPT
                .key(hb)
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
