//! The fleet: many gateways acting as one through Redis (`[redis]`).
//!
//! - [`conn`]: the connection (TCP or rustls TLS), the request's Redis budget
//!   (`redis.timeout_ms` for all of a request's Redis work), health (slow, paused,
//!   gone), metrics, reconnection with backoff, and what each session finds out
//!   (which server, the eviction policy).
//! - [`keys`]: every key, hash-tagged for Redis Cluster (the table is there).
//! - [`limiter`]: the fleet-wide rate limit (leases over a sliding-window log; the
//!   window proof; the local share when Redis is away).
//! - [`bus`]: invalidation events to and from every gateway, and loss detection.
//! - [`l2`]: pages in Redis (on Redis's clock, capped per account), per-account
//!   generations, the group index, and the fleet fetch lock.
//! - [`items`]: the item entries of the other cached reads in Redis (the same
//!   properties, per item), and the per-item fetch lock.
//! - [`heartbeat`]: live gateways, the fleet-wide generation, and the loss checks of
//!   every session.
//! - [`topology`]: `redis.mode`: a Redis Cluster (discovered from seeds, redirections
//!   followed, pipelines split by hash tag) or a Sentinel-managed primary, behind one
//!   connection type; failovers of either treated as restarts.
//!
//! Redis trouble is never an outage: no request waits more than `redis.timeout_ms` on
//! it in all, and while it is down the gateway serves from memory, then Chat, with the
//! rate limit at its share. No Redis incident (restart, failover, eviction, a full or
//! paused Redis) loses an invalidation silently: each is either survived or detected,
//! and what cannot be proven fresh is dropped.

pub mod bus;
pub mod conn;
pub mod heartbeat;
pub mod items;
pub mod keys;
pub mod l2;
pub mod limiter;
pub mod topology;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{LiveSettings, Settings};
pub use bus::{Applied, Event, Sink};
use bus::{Bus, Pending};
use conn::{Connector, Redis};
use items::ItemL2;
use keys::Keys;
use l2::L2;
use limiter::FleetLimiter;

/// Every Lua script the fleet runs: loaded on each new connection, so requests never
/// pay a `NOSCRIPT` round trip (nor a herd of them after a Redis restart).
pub fn all_scripts() -> [&'static redis::Script; 24] {
    [
        &conn::NOOP_SCRIPT,
        &limiter::LEASE_SCRIPT,
        &limiter::PAUSE_SCRIPT,
        &limiter::REPLAY_SCRIPT,
        &limiter::MARK_SCRIPT,
        &limiter::RETIME_SCRIPT,
        &l2::LOOKUP_SCRIPT,
        &l2::STORE_SCRIPT,
        &l2::UNLOCK_SCRIPT,
        &l2::BUMP_SCRIPT,
        &l2::INDEX_SCRIPT,
        &l2::GROUP_CHECK_SCRIPT,
        &l2::GROUP_EVENT_SCRIPT,
        &l2::GROUP_NEXT_SCRIPT,
        &l2::RAISE_SCRIPT,
        &items::ITEM_LOOKUP_SCRIPT,
        &items::ITEM_STORE_SCRIPT,
        &items::GEN_READ_SCRIPT,
        &items::GEN_TOUCH_SCRIPT,
        &bus::PUBLISH_SCRIPT,
        &bus::BEHIND_SCRIPT,
        &heartbeat::SESSION_SCRIPT,
        &heartbeat::BEAT_SCRIPT,
        &heartbeat::LEAVE_SCRIPT,
    ]
}

/// Wall-clock Unix milliseconds, as the fleet reads them (only for the invalidation
/// lag metric: L2 freshness is on Redis's clock).
///
/// Test only: `CHAT_GATEWAY_TEST_CLOCK_OFFSET_MS` (signed) shifts this clock, standing
/// in for a host whose clock is wrong, so the integration tests can show that nothing
/// in the fleet depends on it. It is read once and is not a documented setting.
pub fn wall_ms() -> u64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        std::env::var("CHAT_GATEWAY_TEST_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    now.saturating_add(offset).max(0) as u64
}

/// State the bus, L2 and heartbeat share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Invalidations of this gateway not yet confirmed in Redis.
    pub pending: Pending,
    /// The highest fleet-wide generation seen (part of every L2 page's and item's name).
    pub fleet_gen: AtomicU64,
    /// The highest conversation-pages generation seen (part of every L2 page's name):
    /// "every conversation list" (a group event under `cache.group_events =
    /// "all-pages"`) raises it, leaving the L2 items alone.
    pub pages_gen: AtomicU64,
    /// The highest event number this gateway read or published: a counter below it
    /// means Redis lost writes.
    pub seq_seen: AtomicU64,
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
    items: Option<Arc<ItemL2>>,
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
    /// (applying other gateways' invalidations to `memory`) and the limiter. Must run
    /// inside a tokio runtime. Fails only on a bad `redis.ca_file`. (`_live` is kept
    /// for callers: each L2 store carries the TTL it was fetched with.)
    pub fn start(
        settings: &Settings,
        memory: Arc<dyn Sink>,
        _live: Arc<ArcSwap<LiveSettings>>,
    ) -> Result<Option<Arc<Fleet>>, String> {
        let Some(r) = &settings.redis else {
            return Ok(None);
        };
        let id = new_id();
        let connector = Connector::new(r.url.clone(), r.ca_file.as_deref(), &id)?
            .with_topology(topology::Topology::new(r)?);
        let keys = Keys::new(&r.key_prefix, settings.chat.sdkappid);
        let shared = Arc::new(Shared::default());
        let hook = conn::FleetHook {
            keys: keys.clone(),
            shared: shared.clone(),
        };
        let redis = Redis::start_with(connector, r.timeout, Some(hook));
        topology::watch(&redis, r.mode);
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
            memory,
            shared.clone(),
            r.l2_cache,
        );
        let l2 = r.l2_cache.then(|| {
            Arc::new(L2::new(
                redis.clone(),
                keys.clone(),
                shared.clone(),
                id.clone(),
                settings.chat.request_timeout,
                settings.cache.max_pages_per_account,
            ))
        });
        let items = r.l2_cache.then(|| {
            Arc::new(ItemL2::new(
                redis.clone(),
                keys.clone(),
                shared.clone(),
                id.clone(),
                settings.chat.request_timeout,
                settings.cache.max_pages_per_account,
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
            items,
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

    /// The item entries of the cached reads in L2, when `redis.l2_cache` is on.
    pub fn item_l2(&self) -> Option<&Arc<ItemL2>> {
        self.items.as_ref()
    }

    /// Whether L2 must not be read for what depends on the entity `kind` `id` now
    /// (this gateway invalidated it, and Redis does not have it yet).
    pub fn pending(&self, kind: crate::chat::effects::EntityKind, id: &str) -> bool {
        self.shared.pending.blocks_entity(kind, id)
    }

    /// The connection and its health.
    pub fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// Sends an invalidation this gateway took to the rest of the fleet; returns its
    /// ticket for [`Fleet::wait_applied`].
    pub fn publish(&self, event: Event) -> u64 {
        self.bus.publish(event)
    }

    /// Waits until every live gateway has applied what this gateway published up to
    /// `ticket`, at most `redis.timeout_ms`.
    pub async fn wait_applied(&self, ticket: u64) -> Applied {
        self.bus.wait_applied(ticket, self.redis.timeout()).await
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
