//! The fleet: many gateways acting as one through Redis (`[redis]`).
//!
//! - [`conn`]: the connection (TCP or rustls TLS), `redis.timeout_ms` on every
//!   operation, health, metrics, and reconnection with backoff.
//! - [`keys`]: every key, hash-tagged for Redis Cluster (the table is there).
//! - [`limiter`]: the fleet-wide rate limit (leases over a sliding-window log; the
//!   window proof; the local share when Redis is away).
//! - [`bus`]: invalidation events to and from every gateway, and loss detection.
//! - [`l2`]: pages in Redis, per-account generations, and the fleet fetch lock.
//! - [`heartbeat`]: live gateways and the fleet-wide generation.
//!
//! Redis trouble is never an outage: no request waits more than `redis.timeout_ms` on
//! it, and while it is down the gateway serves from memory, then Chat, with the rate
//! limit at its share.

pub mod bus;
pub mod conn;
pub mod heartbeat;
pub mod keys;
pub mod l2;
pub mod limiter;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::cache::PageCache;
use crate::config::{LiveSettings, Settings};
pub use bus::Event;
use bus::{Bus, Pending};
use conn::{Connector, Redis};
use keys::Keys;
use l2::L2;
use limiter::FleetLimiter;

/// Every Lua script the fleet runs: loaded on each new connection, so requests never
/// pay a `NOSCRIPT` round trip (nor a herd of them after a Redis restart).
pub fn all_scripts() -> [&'static redis::Script; 12] {
    [
        &limiter::LEASE_SCRIPT,
        &limiter::PAUSE_SCRIPT,
        &limiter::REPLAY_SCRIPT,
        &l2::LOOKUP_SCRIPT,
        &l2::STORE_SCRIPT,
        &l2::UNLOCK_SCRIPT,
        &l2::BUMP_SCRIPT,
        &l2::INDEX_SCRIPT,
        &l2::TAKE_SCRIPT,
        &l2::BUMP_ALL_SCRIPT,
        &heartbeat::BEAT_SCRIPT,
        &heartbeat::LEAVE_SCRIPT,
    ]
}

/// State the bus, L2 and heartbeat share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Invalidations of this gateway not yet confirmed in Redis.
    pub pending: Pending,
    /// The fleet-wide generation (part of every L2 page's name).
    pub fleet_gen: AtomicU64,
}

/// One gateway's membership of the fleet.
pub struct Fleet {
    /// This gateway's id in the fleet.
    pub id: String,
    redis: Arc<Redis>,
    keys: Keys,
    shared: Arc<Shared>,
    limiter: Arc<FleetLimiter>,
    bus: Arc<Bus>,
    l2: Option<Arc<L2>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("id", &self.id)
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

/// A fresh gateway id: random, with the process id for people reading Redis.
fn new_id() -> String {
    format!("{:016x}-{}", rand::random::<u64>(), std::process::id())
}

impl Fleet {
    /// Joins the fleet `[redis]` describes, if any: starts connecting (in the
    /// background: a Redis that is down delays nothing), the heartbeat, the bus
    /// (applying other gateways' invalidations to `cache`) and the limiter. Must run
    /// inside a tokio runtime. Fails only on a bad `redis.ca_file`.
    pub fn start(
        settings: &Settings,
        cache: Arc<dyn PageCache>,
        live: Arc<ArcSwap<LiveSettings>>,
    ) -> Result<Option<Arc<Fleet>>, String> {
        let Some(r) = &settings.redis else {
            return Ok(None);
        };
        let id = new_id();
        let connector = Connector::new(r.url.clone(), r.ca_file.as_deref(), &id)?;
        let redis = Redis::start(connector, r.timeout);
        let keys = Keys::new(&r.key_prefix, settings.chat.sdkappid);
        let shared = Arc::new(Shared::default());
        let limiter = FleetLimiter::start(
            redis.clone(),
            keys.clone(),
            id.clone(),
            &settings.ratelimit,
            r,
        );
        let bus = Bus::start(
            redis.clone(),
            keys.clone(),
            id.clone(),
            cache,
            shared.clone(),
            r.l2_cache,
            live,
        );
        let l2 = r.l2_cache.then(|| {
            Arc::new(L2::new(
                redis.clone(),
                keys.clone(),
                shared.clone(),
                id.clone(),
                settings.chat.request_timeout,
            ))
        });
        let fleet = Arc::new(Fleet {
            id,
            redis,
            keys,
            shared,
            limiter,
            bus,
            l2,
        });
        heartbeat::spawn(&fleet);
        Ok(Some(fleet))
    }

    /// The fleet-wide rate limiter.
    pub fn limiter(&self) -> Arc<FleetLimiter> {
        self.limiter.clone()
    }

    /// The L2 cache, when `redis.l2_cache` is on.
    pub fn l2(&self) -> Option<&Arc<L2>> {
        self.l2.as_ref()
    }

    /// The connection and its health.
    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// Sends an invalidation this gateway took to the rest of the fleet.
    pub fn publish(&self, event: Event) {
        self.bus.publish(event);
    }

    /// Waits (at most `timeout`) until Redis is up, the limiter is in fleet mode and
    /// the bus reads the stream.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.redis.wait_up(timeout).await {
            return false;
        }
        while !self.limiter.fleet_mode() || !self.bus.positioned() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Leaves the fleet (graceful shutdown): sends what is queued, within
    /// `redis.timeout_ms` per batch, and removes this gateway from the live set.
    pub async fn leave(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.bus.queued() > 0 && self.redis.is_up() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        heartbeat::leave(&self.redis, &self.keys, &self.id).await;
    }
}
