//! The invalidation bus: every invalidation taken by any gateway reaches every
//! gateway of the fleet, and none is lost silently.
//!
//! **Events are typed.** An [`Event`] names what changed as precisely as the table of
//! invalidations did ([`crate::chat::effects`]): entities (a kind and an account or
//! GroupId each: an account's conversation list, profile, friends..., a group's info
//! or members), a group event, every entity of a kind, or everything. Every gateway
//! applies exactly that to its memory ([`Sink`]), so a profile change drops that
//! profile's entries everywhere and nothing else.
//!
//! **Publishing.** [`crate::invalidate::Invalidator`] applies an invalidation to this
//! gateway's memory and hands the event to [`Bus::publish`] (no waiting). A task sends
//! queued events in batches: first the L2 side, once, by the publishing gateway (the
//! entities' generations; for a group, the group's own generations and the accounts of
//! Redis's GroupId index, in chunks ([`l2::group_event`]); for "every conversation
//! list", the conversation pages' generation ([`l2::bump_pages`], carried in the entry
//! as `p`); for "everything" and any other "every entity of a kind", the fleet-wide
//! generation, carried as `f`), then the entries, by one script
//! that numbers each one (`n`, from `P:{fleet}:seq`) as it appends it to the stream
//! `P:{fleet}:bus` (`MAXLEN ~` [`MAXLEN`]). An event leaves the queue only when all of
//! that has landed: a failure at any step (Redis down, full, paused) leaves it queued,
//! and the retry does again what is needed (bumping twice costs nothing; the script
//! skips entries it already appended, by the gateway's receipt
//! `P:{fleet}:sent:<id>`, so an event whose answer was lost is applied once). Until an
//! event is in Redis, this gateway does not read L2 for what it names ([`Pending`]),
//! so its own writes are read back fresh. Past [`MAX_QUEUE`] events or
//! [`MAX_QUEUED_NAMES`] names the queue collapses into one "everything".
//!
//! **Receiving.** A task reads the stream (`XREAD BLOCK` on its own connection) from
//! the position it remembers, applies other gateways' events to this gateway's memory
//! only (no re-publishing), and then records how far it has applied the stream
//! (`P:{fleet}:ack`, one `ZADD` per batch read).
//!
//! **Read-your-writes across the fleet.** A caller whose write went through gateway A
//! may read through gateway B next. [`Bus::wait_applied`] lets A answer the write only
//! once its event is in the stream and every live gateway (a heartbeat within
//! [`super::heartbeat::LIVE`], and a position in the stream) has recorded a position
//! at or past it, or once the wait's limit (`redis.timeout_ms`) has passed: past it,
//! the others apply the event within milliseconds, as they would anyway.
//!
//! **Loss detection (numbered entries in a stream, with a remembered position).** The
//! gateway drops its in-memory pages (`chat_gateway_fleet_resyncs_total{reason}`)
//! before serving from them again whenever it may have missed an event:
//! - `restart`: the server is not the one the position was taken on (Redis restarted,
//!   possibly empty, or failed over; see [`conn::Session`]). Checked on every
//!   reconnection of the reader, and whenever the gateway's session says the servers
//!   changed (the reader's own connection may outlive a failover: a cluster's old
//!   primary stays up as a replica);
//! - `gap`: entries are missing: the next entry read is not numbered one past the last
//!   one (the stream was trimmed past the position, or deleted and re-created), or
//!   the counter is past the last entry read while the stream does not hold that
//!   entry (the stream was deleted). Checked on every entry, on every reconnection,
//!   and whenever a read waits a whole block for nothing;
//! - `lost`: the counter went back (below an entry this gateway read or published):
//!   Redis lost writes (a lagging replica promoted, an older snapshot, eviction).
//!   Other gateways may not be able to tell (they may not have seen the lost
//!   entries), so this gateway also publishes "everything", which raises the
//!   fleet-wide generation (no L2 page from before is served again) and makes every
//!   gateway drop its memory;
//! - `reconnect`: pages were cached while the gateway held no position (it served
//!   before it could first read the stream).
//!
//! A dropped connection alone is not a loss: the events stay in the stream and are
//! read on reconnection. The position is always an entry this gateway saw; when it
//! needs a new one it appends a marker entry (`k=h`) and takes its id and number,
//! then drops its pages, so every event after the marker is read and every event
//! before it is covered by the drop.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use redis::Value;
use tokio::sync::{watch, Notify};

use super::conn::{self, Conn, FleetError, Op, Redis};
use super::keys::Keys;
use super::l2;
use super::Shared;
use crate::chat::effects::{Entity, EntityKind};
use crate::metrics::names;

/// Entries the stream keeps (approximately).
pub const MAXLEN: u64 = 100_000;
/// Events waiting to be published at most; past it they collapse into "everything".
pub const MAX_QUEUE: usize = 10_000;
/// Account names and GroupIds the queue may hold in all (each at most 32 bytes for an
/// account): bounds its memory, whatever the size of each event.
pub const MAX_QUEUED_NAMES: usize = 100_000;
/// Events sent per batch.
const BATCH: usize = 256;
/// Entries read per `XREAD`.
const READ_COUNT: usize = 512;
/// How long one `XREAD` blocks.
const BLOCK: Duration = Duration::from_millis(1000);
/// How long the reader waits for any other step (a check, a marker).
const STEP: Duration = Duration::from_secs(2);

/// Appends numbered entries. `KEYS[1]`: the stream, `KEYS[2]`: the counter, `KEYS[3]`:
/// the publishing gateway's receipt (its last ticket appended, that entry's number
/// and id). ARGV: MAXLEN, origin, then per entry: ticket ('0': a marker, always
/// appended), kind, value, fleet generation ('' for none), pages generation ('' for
/// none). An entry whose ticket the receipt already covers is skipped: a batch sent
/// again because its answer was lost (a dropped connection, a timeout) is appended
/// once. Returns {id, n} of the last entry of the batch in the stream.
const PUBLISH: &str = r#"
local id, n
local last = 0
local done = redis.call('GET', KEYS[3])
if done then
  local t, dn, did = string.match(done, '^(%d+) (%d+) (.+)$')
  if t then last = tonumber(t); n = tonumber(dn); id = did end
end
local top = last
for i = 3, #ARGV, 5 do
  local t = tonumber(ARGV[i]) or 0
  if t == 0 or t > last then
    n = redis.call('INCR', KEYS[2])
    local e = {'o', ARGV[2], 'k', ARGV[i + 1], 'v', ARGV[i + 2], 'n', n}
    if ARGV[i + 3] ~= '' then e[#e + 1] = 'f'; e[#e + 1] = ARGV[i + 3] end
    if ARGV[i + 4] ~= '' then e[#e + 1] = 'p'; e[#e + 1] = ARGV[i + 4] end
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(e))
    if t > top then top = t end
  end
end
if top > last then
  redis.call('SET', KEYS[3], string.format('%d %d %s', top, n, id), 'PX', 600000)
end
return {id, n}
"#;

pub(crate) static PUBLISH_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PUBLISH));

/// An invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// These entities (sorted, each once).
    Entities(Vec<Entity>),
    /// A group event: the group's info and members, and the conversation lists of
    /// every account whose pages list the group.
    Group(String),
    /// Every entity of a kind.
    Every(EntityKind),
    /// Everything.
    All,
}

impl Event {
    /// Every entity of each account (what an older gateway's "accounts" entry meant).
    pub fn accounts(accounts: &[&str]) -> Event {
        let mut list: Vec<Entity> = accounts
            .iter()
            .flat_map(|a| {
                EntityKind::OF_ACCOUNT
                    .iter()
                    .map(move |k| Entity::new(*k, *a))
            })
            .collect();
        list.sort();
        list.dedup();
        Event::Entities(list)
    }

    /// The stream entry's kind and value.
    fn encode(&self) -> (&'static str, String) {
        match self {
            Event::Entities(list) => {
                let mut by_kind: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
                for e in list {
                    by_kind.entry(e.kind.as_str()).or_default().push(&e.id);
                }
                ("e", serde_json::to_string(&by_kind).unwrap_or_default())
            }
            Event::Group(g) => ("g", g.clone()),
            Event::Every(k) => ("k", k.as_str().to_string()),
            Event::All => ("*", String::new()),
        }
    }

    /// The event of a stream entry of kind `k` and value `v` (`None`: not an event).
    fn decode(k: &str, v: &str) -> Option<Event> {
        Some(match k {
            "e" => {
                let by_kind: std::collections::BTreeMap<String, Vec<String>> =
                    serde_json::from_str(v).ok()?;
                let mut list = Vec::new();
                for (kind, ids) in by_kind {
                    // A kind this version does not know: everything, to be safe.
                    let Some(kind) = EntityKind::from_name(&kind) else {
                        return Some(Event::All);
                    };
                    list.extend(ids.into_iter().map(|id| Entity::new(kind, id)));
                }
                list.sort();
                list.dedup();
                Event::Entities(list)
            }
            // An older gateway's "these accounts".
            "a" => {
                let accounts: Vec<String> = serde_json::from_str(v).unwrap_or_default();
                let refs: Vec<&str> = accounts.iter().map(String::as_str).collect();
                Event::accounts(&refs)
            }
            "g" => Event::Group(v.to_string()),
            "k" => EntityKind::from_name(v).map_or(Event::All, Event::Every),
            "*" => Event::All,
            _ => return None,
        })
    }

    /// Names it carries (one for a group, a kind or "everything"), for the queue's
    /// bound.
    fn names(&self) -> usize {
        match self {
            Event::Entities(list) => list.len(),
            Event::Group(_) | Event::Every(_) | Event::All => 1,
        }
    }
}

/// What the bus does to this gateway's memory: the events other gateways published,
/// and a drop of everything when one may have been missed.
pub trait Sink: Send + Sync + 'static {
    /// Applies an event; returns the get_list pages it dropped.
    fn apply(&self, event: &Event) -> usize;
    /// Drops everything; returns the get_list pages dropped.
    fn drop_all(&self) -> usize;
    /// Whether anything is cached.
    fn holds_anything(&self) -> bool;
}

/// A page store alone (no item store) as a sink: its pages are the conversation
/// lists.
impl<T: crate::cache::PageCache> Sink for T {
    fn apply(&self, event: &Event) -> usize {
        match event {
            Event::Entities(list) => list
                .iter()
                .filter(|e| e.kind == EntityKind::Conversations)
                .map(|e| self.invalidate(&e.id))
                .sum(),
            Event::Group(g) => self.invalidate_group(g).iter().map(|(_, n)| n).sum(),
            Event::Every(EntityKind::Conversations) | Event::All => self.invalidate_all(),
            Event::Every(_) => 0,
        }
    }

    fn drop_all(&self) -> usize {
        self.invalidate_all()
    }

    fn holds_anything(&self) -> bool {
        self.stats().pages > 0
    }
}

/// What this gateway invalidated but has not yet confirmed in Redis: L2 is not read
/// for it meanwhile.
#[derive(Debug, Default)]
pub struct Pending {
    /// Per kind: id → events naming it not yet confirmed.
    entities: [Mutex<HashMap<String, u32>>; EntityKind::ALL.len()],
    /// Per kind: "every entity of the kind" events not yet confirmed (a group event
    /// under `all-pages` is "every conversation list": it holds back L2 pages only,
    /// not the items).
    every: [AtomicU32; EntityKind::ALL.len()],
    /// Group and "everything" events not yet confirmed.
    wide: AtomicU32,
}

impl Pending {
    /// Whether L2 must not be read for `account`'s pages now.
    pub fn blocks(&self, account: &str) -> bool {
        self.blocks_entity(EntityKind::Conversations, account)
    }

    /// Whether L2 must not be read for what depends on the entity `kind` `id` now.
    pub fn blocks_entity(&self, kind: EntityKind, id: &str) -> bool {
        self.wide.load(Ordering::Acquire) > 0
            || self.every[kind.index()].load(Ordering::Acquire) > 0
            || self.entities[kind.index()]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
    }

    fn add(&self, e: &Event) {
        match e {
            Event::Entities(list) => {
                for en in list {
                    let mut m = self.entities[en.kind.index()]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    *m.entry(en.id.clone()).or_default() += 1;
                }
            }
            Event::Every(k) => {
                self.every[k.index()].fetch_add(1, Ordering::AcqRel);
            }
            Event::Group(_) | Event::All => {
                self.wide.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn done(&self, e: &Event) {
        match e {
            Event::Entities(list) => {
                for en in list {
                    let mut m = self.entities[en.kind.index()]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = m.get_mut(&en.id) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&en.id);
                        }
                    }
                }
            }
            // Never below zero, whatever the order of confirmations.
            Event::Every(k) => {
                let _ =
                    self.every[k.index()]
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
            }
            Event::Group(_) | Event::All => {
                let _ = self
                    .wide
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
            }
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entities
            .iter()
            .all(|m| m.lock().unwrap_or_else(|p| p.into_inner()).is_empty())
    }
}

/// Events waiting for Redis, each with its ticket (in order), and how many names
/// they hold.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<(u64, Event)>,
    names: usize,
    next_ticket: u64,
}

impl Queue {
    /// Queues `event` (marked pending); past the bounds, everything queued collapses
    /// into one "everything" (with a later ticket, so whoever waits for a dropped
    /// event waits for it). Returns its ticket and whether the queue collapsed.
    fn push(&mut self, event: Event, pending: &Pending) -> (u64, bool) {
        pending.add(&event);
        self.names += event.names();
        self.next_ticket += 1;
        self.events.push_back((self.next_ticket, event));
        if self.events.len() <= MAX_QUEUE && self.names <= MAX_QUEUED_NAMES {
            return (self.next_ticket, false);
        }
        for (_, e) in self.events.drain(..) {
            pending.done(&e);
        }
        pending.add(&Event::All);
        self.next_ticket += 1;
        self.events.push_back((self.next_ticket, Event::All));
        self.names = 1;
        (self.next_ticket, true)
    }
}

/// How far publishing has gone: every event up to `ticket` is in the stream, the
/// last of them numbered `n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Confirmed {
    ticket: u64,
    n: u64,
}

/// How a wait for the fleet to apply an invalidation ended
/// (`chat_gateway_fleet_invalidation_waits_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Every live gateway applied it.
    Everywhere,
    /// The wait's limit passed first (the others apply it when it reaches them).
    Timeout,
    /// Redis is unusable: the event waits in the queue.
    Unavailable,
}

impl Applied {
    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Everywhere => "applied",
            Applied::Timeout => "timeout",
            Applied::Unavailable => "unavailable",
        }
    }
}

/// Whether every live gateway other than `ARGV[3]` has applied the stream up to
/// `ARGV[1]`. `KEYS[1]`: the heartbeats, `KEYS[2]`: the positions applied. ARGV: n,
/// LIVE (ms), this gateway's id. A live gateway with no position yet holds no memory
/// it could serve stale (it drops it when it takes one). Returns how many are behind.
const BEHIND: &str = r#"
local now = now_ms()
local n = tonumber(ARGV[1])
local behind = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')) do
  if id ~= ARGV[3] then
    local at = redis.call('ZSCORE', KEYS[2], id)
    if at and tonumber(at) < n then behind = behind + 1 end
  end
end
return behind
"#;

pub(crate) static BEHIND_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{}{BEHIND}", super::heartbeat::LUA_CLOCK)));

/// First pause between two checks of the fleet's positions.
const ACK_POLL_MIN: Duration = Duration::from_millis(1);
/// Longest pause between two checks.
const ACK_POLL_MAX: Duration = Duration::from_millis(4);

/// The bus.
pub struct Bus {
    redis: Arc<Redis>,
    keys: Keys,
    id: String,
    sink: Arc<dyn Sink>,
    shared: Arc<Shared>,
    l2: bool,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    /// Whether the reader holds a position in the stream.
    positioned: AtomicBool,
    /// How far publishing has gone.
    confirmed: watch::Sender<Confirmed>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Where the reader is.
#[derive(Debug, Clone)]
struct Position {
    /// The last entry read (or the marker taken).
    id: String,
    /// Its number.
    n: u64,
    /// The server it was read on ([`conn::identify`]).
    identity: String,
}

/// Why the reader drops its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Another server.
    Restart,
    /// Entries missing from the stream.
    Gap,
    /// Redis went back (the counter is below what this gateway saw).
    Lost,
    /// Pages cached while the gateway held no position.
    Reconnect,
}

impl Loss {
    fn as_str(self) -> &'static str {
        match self {
            Loss::Restart => "restart",
            Loss::Gap => "gap",
            Loss::Lost => "lost",
            Loss::Reconnect => "reconnect",
        }
    }
}

impl Bus {
    /// Starts publishing and reading.
    pub fn start(
        redis: Arc<Redis>,
        keys: Keys,
        id: String,
        sink: Arc<dyn Sink>,
        shared: Arc<Shared>,
        l2: bool,
    ) -> Arc<Bus> {
        let bus = Arc::new(Bus {
            redis,
            keys,
            id,
            sink,
            shared,
            l2,
            queue: Mutex::new(Queue::default()),
            wake: Arc::new(Notify::new()),
            positioned: AtomicBool::new(false),
            confirmed: watch::Sender::new(Confirmed::default()),
        });
        tokio::spawn(publish_loop(Arc::downgrade(&bus)));
        tokio::spawn(read_loop(Arc::downgrade(&bus)));
        bus
    }

    /// Queues `event` for the fleet (this gateway already applied it to its memory);
    /// returns its ticket, for [`Bus::wait_applied`].
    pub fn publish(&self, event: Event) -> u64 {
        if matches!(&event, Event::Entities(a) if a.is_empty()) {
            return 0;
        }
        let ticket = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Too much to send one by one: the fleet invalidates everything instead.
            let (ticket, collapsed) = q.push(event, &self.shared.pending);
            if collapsed {
                tracing::warn!(
                    "more than {MAX_QUEUE} invalidations or {MAX_QUEUED_NAMES} names waiting for Redis; the fleet will drop everything instead"
                );
            }
            ticket
        };
        self.wake.notify_one();
        ticket
    }

    /// Waits, at most `limit`, until the events this gateway queued up to `ticket`
    /// are in the stream and every other live gateway has applied them.
    pub async fn wait_applied(&self, ticket: u64, limit: Duration) -> Applied {
        let outcome = self.wait_applied_inner(ticket, limit).await;
        counter!(names::FLEET_WAITS, "outcome" => outcome.as_str()).increment(1);
        outcome
    }

    async fn wait_applied_inner(&self, ticket: u64, limit: Duration) -> Applied {
        if ticket == 0 {
            return Applied::Everywhere;
        }
        if !self.redis.is_up() {
            return Applied::Unavailable;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = self.confirmed.subscribe();
        let n = match tokio::time::timeout_at(deadline, rx.wait_for(|c| c.ticket >= ticket)).await {
            Ok(Ok(c)) => c.n,
            _ => return Applied::Timeout,
        };
        let mut pause = ACK_POLL_MIN;
        loop {
            let (hb, acks, id) = (self.keys.heartbeat(), self.keys.acks(), self.id.clone());
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let behind = tokio::time::timeout(
                left,
                self.redis.run(Op::Publish, |mut c| async move {
                    let r: redis::RedisResult<u64> = BEHIND_SCRIPT
                        .key(hb)
                        .key(acks)
                        .arg(n)
                        .arg(super::heartbeat::LIVE.as_millis() as u64)
                        .arg(id)
                        .invoke_async(&mut c)
                        .await;
                    r
                }),
            )
            .await;
            match behind {
                Ok(Ok(0)) => return Applied::Everywhere,
                Ok(Ok(_)) => {}
                Ok(Err(FleetError::Down)) => return Applied::Unavailable,
                Ok(Err(_)) | Err(_) => {}
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Applied::Timeout;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(ACK_POLL_MAX);
        }
    }

    /// Whether the reader has taken its first position (from then on, every event is
    /// applied or its loss detected).
    pub fn positioned(&self) -> bool {
        self.positioned.load(Ordering::Acquire)
    }

    /// Events waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.lock().map(|q| q.events.len()).unwrap_or(0)
    }

    /// Sends a batch: the L2 side first, then the numbered entries.
    async fn send(&self, batch: &[(u64, Event)]) -> Result<u64, FleetError> {
        let mut entries: Vec<(u64, &'static str, String, String, String)> =
            Vec::with_capacity(batch.len());
        // One raise of the conversation pages' generation serves every "every
        // conversation list" of the batch: all of them were taken before it.
        let mut pages_raised_once: Option<String> = None;
        for (ticket, e) in batch {
            let mut raised = String::new();
            let mut pages_raised = String::new();
            match e {
                Event::Entities(list) => {
                    if self.l2 {
                        l2::bump_entities(&self.redis, &self.keys, list).await?;
                    }
                }
                Event::Group(g) => {
                    if self.l2 {
                        let own = [
                            Entity::new(EntityKind::GroupInfo, g.as_str()),
                            Entity::new(EntityKind::GroupMembers, g.as_str()),
                        ];
                        l2::bump_entities(&self.redis, &self.keys, &own).await?;
                        let done =
                            l2::group_event(&self.redis, &self.keys, &self.shared, g).await?;
                        if let Some(gen) = done.raised {
                            raised = gen.to_string();
                        }
                    }
                }
                // Every conversation list (a group event under `cache.group_events =
                // "all-pages"`): every L2 page becomes unreachable, the items stay.
                Event::Every(EntityKind::Conversations) => {
                    if self.l2 {
                        if pages_raised_once.is_none() {
                            let g = l2::bump_pages(&self.redis, &self.keys, &self.shared).await?;
                            pages_raised_once = Some(g.to_string());
                        }
                        pages_raised = pages_raised_once.clone().unwrap_or_default();
                    }
                }
                // L2 cannot name every entity of a kind: it is emptied instead (rare
                // writes: account_delete, friend_delete_all both ways).
                Event::Every(_) | Event::All => {
                    if self.l2 {
                        raised = l2::bump_fleet(&self.redis, &self.keys, &self.shared)
                            .await?
                            .to_string();
                    }
                }
            }
            let (kind, value) = e.encode();
            entries.push((*ticket, kind, value, raised, pages_raised));
        }
        let (last_id, n) = self.append(entries).await?;
        tracing::trace!(last_id, n, "published");
        Ok(n)
    }

    /// Appends numbered entries; returns the last one's id and number.
    async fn append(
        &self,
        entries: Vec<(u64, &'static str, String, String, String)>,
    ) -> Result<(String, u64), FleetError> {
        let stream = self.keys.bus();
        let seq = self.keys.bus_seq();
        let sent = self.keys.bus_sent(&self.id);
        let id = self.id.clone();
        let (last_id, n): (String, u64) = self
            .redis
            .run_long(Op::Publish, |mut c| async move {
                let mut inv = PUBLISH_SCRIPT.key(stream);
                inv.key(seq).key(sent).arg(MAXLEN).arg(id);
                for (ticket, kind, v, f, pg) in &entries {
                    inv.arg(*ticket).arg(*kind).arg(v).arg(f).arg(pg);
                }
                let r = inv.invoke_async(&mut c).await;
                r
            })
            .await?;
        self.shared.seq_seen.fetch_max(n, Ordering::AcqRel);
        Ok((last_id, n))
    }

    /// Applies one entry of the stream.
    fn apply(&self, entry_id: &str, fields: &HashMap<String, String>) {
        if let Some(g) = fields.get("f").and_then(|f| f.parse::<u64>().ok()) {
            self.shared.fleet_gen.fetch_max(g, Ordering::AcqRel);
        }
        if let Some(g) = fields.get("p").and_then(|f| f.parse::<u64>().ok()) {
            self.shared.pages_gen.fetch_max(g, Ordering::AcqRel);
        }
        if fields.get("o").is_some_and(|o| *o == self.id) {
            return;
        }
        let v = fields.get("v").map(String::as_str).unwrap_or("");
        let Some(event) = Event::decode(fields.get("k").map(String::as_str).unwrap_or(""), v)
        else {
            return;
        };
        if event == Event::All {
            // An older gateway's "everything" carries the raised generation as its value.
            if let Ok(g) = v.parse::<u64>() {
                self.shared.fleet_gen.fetch_max(g, Ordering::AcqRel);
            }
        }
        let pages = self.sink.apply(&event);
        counter!(names::FLEET_RECEIVED).increment(1);
        counter!(names::INVALIDATIONS, "source" => "fleet").increment(1);
        counter!(names::INVALIDATED_PAGES, "source" => "fleet").increment(pages as u64);
        if let Some(ms) = entry_id
            .split('-')
            .next()
            .and_then(|m| m.parse::<u64>().ok())
        {
            let lag = super::wall_ms().saturating_sub(ms);
            histogram!(names::FLEET_LAG).record(lag as f64 / 1000.0);
        }
    }

    /// Drops everything in memory: invalidations may have been missed. After a loss of
    /// Redis's own state, the whole fleet is told to do the same.
    fn resync(&self, why: Loss) {
        let pages = self.sink.drop_all();
        counter!(names::FLEET_RESYNCS, "reason" => why.as_str()).increment(1);
        tracing::warn!(
            reason = why.as_str(),
            pages,
            "may have missed fleet invalidations; dropped the in-memory entries"
        );
        if why == Loss::Lost {
            self.publish(Event::All);
        }
    }
}

async fn publish_loop(weak: std::sync::Weak<Bus>) {
    let mut sessions = match weak.upgrade() {
        Some(b) => b.redis.sessions(),
        None => return,
    };
    loop {
        let Some(bus) = weak.upgrade() else { return };
        let batch: Vec<(u64, Event)> = {
            let q = bus.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.events.iter().take(BATCH).cloned().collect()
        };
        if batch.is_empty() {
            let wake = bus.wake.clone();
            let notified = wake.notified();
            drop(bus);
            notified.await;
            continue;
        }
        match bus.send(&batch).await {
            Ok(n) => {
                let mut q = bus.queue.lock().unwrap_or_else(|p| p.into_inner());
                // The queue may have collapsed meanwhile (and confirmed what it
                // dropped): take off, and confirm, only what is still at its front.
                for (t, e) in &batch {
                    if q.events.front().is_some_and(|(qt, _)| qt == t) {
                        q.events.pop_front();
                        q.names = q.names.saturating_sub(e.names());
                        bus.shared.pending.done(e);
                    }
                }
                drop(q);
                let last = batch.last().map_or(0, |(t, _)| *t);
                bus.confirmed.send_if_modified(|c| {
                    let moved = last > c.ticket;
                    if moved {
                        *c = Confirmed { ticket: last, n };
                    }
                    moved
                });
                counter!(names::FLEET_SENT).increment(batch.len() as u64);
            }
            Err(e) => {
                tracing::debug!(error = %e, "invalidations not sent yet; retrying");
                drop(bus);
                // Wait for Redis to come back (a new session), or retry a transient
                // error (a full Redis, paused writes) after a short pause.
                let _ = tokio::time::timeout(Duration::from_millis(200), sessions.changed()).await;
            }
        }
    }
}

/// Records that this gateway has applied the stream up to `n` (best effort: a writer
/// that cannot see it waits until its limit).
async fn ack(c: &mut Conn, keys: &Keys, me: &str, n: u64) {
    let r: redis::RedisResult<()> = redis::cmd("ZADD")
        .arg(keys.acks())
        .arg(n)
        .arg(me)
        .query_async(c)
        .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "could not record the position applied");
    }
}

/// Appends a marker entry and returns its id and number: a position that exists.
async fn mark(c: &mut Conn, keys: &Keys, me: &str) -> redis::RedisResult<(String, u64)> {
    PUBLISH_SCRIPT
        .key(keys.bus())
        .key(keys.bus_seq())
        .key(keys.bus_sent(me))
        .arg(MAXLEN)
        .arg(me)
        .arg(0)
        .arg("h")
        .arg("")
        .arg("")
        .arg("")
        .invoke_async(c)
        .await
}

/// The counter and the stream's last entry's number (-1: the stream is empty or
/// gone), read together (`MULTI`: reads only, so a Redis pausing writes answers it).
async fn check(c: &mut Conn, keys: &Keys) -> redis::RedisResult<(u64, i64)> {
    let (counter, last): (Option<u64>, Value) = redis::pipe()
        .atomic()
        .cmd("GET")
        .arg(keys.bus_seq())
        .cmd("XREVRANGE")
        .arg(keys.bus())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(c)
        .await?;
    let last_n = parse_entries(last)
        .first()
        .and_then(|(_, f)| f.get("n"))
        .and_then(|n| n.parse::<i64>().ok())
        .unwrap_or(-1);
    Ok((counter.unwrap_or(0), last_n))
}

/// What the counter and the stream say about a reader at `pos` that found nothing more
/// to read, this gateway having seen events up to `seen`.
fn judge(pos: &Position, seen: u64, counter: u64, last_n: i64) -> Option<Loss> {
    if counter < pos.n.max(seen) {
        Some(Loss::Lost)
    } else if counter > pos.n && last_n != counter as i64 {
        // Entries were appended after ours, but the stream does not end with the last
        // of them: they are gone (the stream was deleted or emptied).
        Some(Loss::Gap)
    } else {
        None
    }
}

type Entry = (String, HashMap<String, String>);

/// Parses an `XREAD` answer for one stream.
fn parse_xread(v: Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let streams = match v {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return out,
    };
    for s in streams {
        let Value::Array(mut kv) = s else { continue };
        if kv.len() != 2 {
            continue;
        }
        out.extend(parse_entries(kv.pop().unwrap_or(Value::Nil)));
    }
    out
}

/// Parses a list of stream entries (`XRANGE`, or one stream of `XREAD`).
fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(mut parts) = e else { continue };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let id = text(&parts[0]);
        let mut map = HashMap::new();
        if let Value::Array(f) = fields {
            for pair in f.chunks(2) {
                if let [k, v] = pair {
                    map.insert(text(k), text(v));
                }
            }
        }
        out.push((id, map));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// Takes a new position (a marker) and then drops the memory, if `why`.
async fn reposition(
    c: &mut Conn,
    bus: &Bus,
    identity: &str,
    why: Option<Loss>,
) -> redis::RedisResult<Position> {
    let (id, n) = mark(c, &bus.keys, &bus.id).await?;
    bus.shared.seq_seen.fetch_max(n, Ordering::AcqRel);
    // The fleet-wide generations as they are now: the events before the position may
    // have raised them and be lost (a gap), and only their entries carried the new
    // values. Learnt before memory is dropped, so that no read after the drop goes
    // to L2 under a generation an event left behind.
    learn_generations(c, bus).await?;
    bus.positioned.store(true, Ordering::Release);
    // The position is taken first: every event after it will be read, every one
    // before it is covered by this drop.
    if let Some(w) = why {
        bus.resync(w);
    }
    ack(c, &bus.keys, &bus.id, n).await;
    Ok(Position {
        id,
        n,
        identity: identity.to_string(),
    })
}

/// Learns the fleet-wide generation and the conversation pages' generation from
/// Redis (both keys share the stream's slot, so the bus connection reaches them).
async fn learn_generations(c: &mut Conn, bus: &Bus) -> redis::RedisResult<()> {
    // Two GETs in one round trip (the fleet's ACL user has no MGET).
    let (fleet, pages): (Option<u64>, Option<u64>) = redis::pipe()
        .get(bus.keys.fleet_gen())
        .get(bus.keys.pages_gen())
        .query_async(c)
        .await?;
    bus.shared
        .fleet_gen
        .fetch_max(fleet.unwrap_or(0), Ordering::AcqRel);
    bus.shared
        .pages_gen
        .fetch_max(pages.unwrap_or(0), Ordering::AcqRel);
    Ok(())
}

async fn read_loop(weak: std::sync::Weak<Bus>) {
    let mut pos: Option<Position> = None;
    let mut backoff = Duration::from_millis(50);
    // The bus connection's own marker (see conn::identify).
    let markers = AtomicU64::new(0);
    // The gateway's sessions: one that says the servers changed (a restart, a
    // failover the topology watcher saw) sends the reader back to check its own
    // server, since its connection may have outlived the change (a cluster's old
    // primary stays up as a replica).
    let mut sessions = match weak.upgrade() {
        Some(b) => b.redis.sessions(),
        None => return,
    };
    loop {
        let Some(bus) = weak.upgrade() else { return };
        sessions.borrow_and_update();
        let connector = bus.redis.connector().clone();
        let marker = connector.marker("bus");
        let stream = bus.keys.bus();
        drop(bus);
        let ready = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = connector.connect("bus").await?;
            let identity = conn::identify(&mut c, &marker, &markers).await?;
            let Some(bus) = weak.upgrade() else {
                return Ok(None);
            };
            // Can we carry on from where we were?
            let p = match pos.clone() {
                None => {
                    let had_pages = bus.sink.holds_anything();
                    reposition(
                        &mut c,
                        &bus,
                        &identity,
                        had_pages.then_some(Loss::Reconnect),
                    )
                    .await?
                }
                Some(p) if super::topology::server_changed(&p.identity, &identity) => {
                    reposition(&mut c, &bus, &identity, Some(Loss::Restart)).await?
                }
                Some(p) => {
                    let (counter, last_n) = check(&mut c, &bus.keys).await?;
                    let seen = bus.shared.seq_seen.load(Ordering::Acquire);
                    match judge(&p, seen, counter, last_n) {
                        Some(why) => reposition(&mut c, &bus, &identity, Some(why)).await?,
                        None => p,
                    }
                }
            };
            Ok::<_, redis::RedisError>(Some((c, p)))
        })
        .await;
        let mut c = match ready {
            Ok(Ok(Some((c, p)))) => {
                pos = Some(p);
                c
            }
            Ok(Ok(None)) => return,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(conn::MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Read until the connection fails, or the servers may have changed.
        while let Some(p) = pos.clone() {
            if sessions.has_changed().unwrap_or(false) && sessions.borrow_and_update().restarted {
                break;
            }
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&p.id);
            let read = cmd.query_async::<Value>(&mut c);
            let v = match tokio::time::timeout(BLOCK + Duration::from_secs(2), read).await {
                Ok(Ok(v)) => v,
                _ => break,
            };
            let entries = parse_xread(v);
            let Some(bus) = weak.upgrade() else { return };
            if entries.is_empty() {
                // A whole block without an entry: were entries lost meanwhile (the
                // stream deleted)?
                let Ok(Ok((counter, last_n))) =
                    tokio::time::timeout(STEP, check(&mut c, &bus.keys)).await
                else {
                    break;
                };
                let seen = bus.shared.seq_seen.load(Ordering::Acquire);
                if let Some(why) = judge(&p, seen, counter, last_n) {
                    let again = reposition(&mut c, &bus, &p.identity, Some(why));
                    match tokio::time::timeout(STEP, again).await {
                        Ok(Ok(np)) => pos = Some(np),
                        _ => break,
                    }
                }
                continue;
            }
            let started = Instant::now();
            let mut cur = p;
            let mut broken = None;
            for (id, fields) in &entries {
                match fields.get("n").and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) if n <= cur.n => {
                        broken = Some(Loss::Lost);
                        break;
                    }
                    Some(n) if n > cur.n + 1 => {
                        broken = Some(Loss::Gap);
                        break;
                    }
                    Some(n) => cur.n = n,
                    // An entry without a number (an older gateway's): nothing to check.
                    None => {}
                }
                bus.shared.seq_seen.fetch_max(cur.n, Ordering::AcqRel);
                bus.apply(id, fields);
                cur.id = id.clone();
            }
            tracing::trace!(
                events = entries.len(),
                took_us = started.elapsed().as_micros() as u64,
                "applied fleet events"
            );
            if let Some(why) = broken {
                let again = reposition(&mut c, &bus, &cur.identity, Some(why));
                match tokio::time::timeout(STEP, again).await {
                    Ok(Ok(np)) => pos = Some(np),
                    _ => break,
                }
            } else {
                // Everything up to here is applied: writers waiting on it may go.
                let _ = tokio::time::timeout(STEP, ack(&mut c, &bus.keys, &bus.id, cur.n)).await;
                pos = Some(cur);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversations(prefix: &str, n: usize) -> Event {
        Event::Entities(
            (0..n)
                .map(|i| Entity::new(EntityKind::Conversations, format!("{prefix}{i}")))
                .collect(),
        )
    }

    #[test]
    fn the_queue_is_bounded_in_events_and_in_names() {
        let pending = Pending::default();
        let mut q = Queue::default();
        // Names: five events of 20,000 fit, the sixth collapses the queue.
        for i in 0..5 {
            assert!(!q.push(conversations(&format!("e{i}_"), 20_000), &pending).1);
        }
        assert!(pending.blocks("e0_7"));
        assert!(!pending.blocks_entity(EntityKind::Profile, "e0_7"));
        let (ticket, collapsed) = q.push(conversations("e5_", 20_000), &pending);
        assert!(collapsed);
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.names, 1);
        // The "everything" that replaced them comes after every ticket handed out.
        assert!(matches!(q.events[0], (t, Event::All) if t == ticket && t > 6));
        // Only "everything" is pending now; the entity maps were emptied.
        assert!(pending.is_empty());
        assert_eq!(pending.wide.load(Ordering::Acquire), 1);
        // Events: past MAX_QUEUE small ones it collapses too.
        let mut q = Queue::default();
        let pending = Pending::default();
        let collapsed = (0..=MAX_QUEUE).any(|i| q.push(Event::Group(format!("@g{i}")), &pending).1);
        assert!(collapsed);
        assert_eq!(q.events.len(), 1);
        assert_eq!(pending.wide.load(Ordering::Acquire), 1);
    }

    #[test]
    fn every_entity_of_a_kind_holds_back_that_kind_only() {
        let pending = Pending::default();
        let every = Event::Every(EntityKind::Conversations);
        pending.add(&every);
        assert!(pending.blocks("anyone"));
        assert!(!pending.blocks_entity(EntityKind::Profile, "anyone"));
        assert!(!pending.blocks_entity(EntityKind::GroupInfo, "@g"));
        pending.done(&every);
        pending.done(&every);
        assert!(!pending.blocks("anyone"));
        // A group event (listing-accounts) and "everything" hold back everything.
        for e in [Event::Group("@g".into()), Event::All] {
            pending.add(&e);
            assert!(pending.blocks_entity(EntityKind::Profile, "anyone"));
            pending.done(&e);
            assert!(!pending.blocks_entity(EntityKind::Profile, "anyone"));
        }
    }

    #[test]
    fn confirmations_never_drive_the_count_below_zero() {
        let pending = Pending::default();
        pending.add(&Event::All);
        pending.done(&Event::All);
        pending.done(&Event::All);
        assert_eq!(pending.wide.load(Ordering::Acquire), 0);
        assert!(!pending.blocks("anyone"));
    }

    #[test]
    fn events_round_trip_through_stream_entries() {
        let events = [
            Event::Entities(vec![
                Entity::new(EntityKind::Conversations, "a"),
                Entity::new(EntityKind::Profile, "a"),
                Entity::new(EntityKind::Profile, "b\"\\é"),
                Entity::new(EntityKind::GroupMembers, "@g"),
            ]),
            Event::Group("@TGS#1".into()),
            Event::Every(EntityKind::Friends),
            Event::All,
        ];
        for e in events {
            let (k, v) = e.encode();
            assert_eq!(Event::decode(k, &v), Some(e.clone()), "{k} {v}");
        }
        // An older gateway's "accounts" entry: every entity of each account.
        let old = Event::decode("a", r#"["u","v"]"#).unwrap();
        let Event::Entities(list) = &old else {
            panic!("{old:?}")
        };
        assert_eq!(list.len(), 2 * EntityKind::OF_ACCOUNT.len());
        // Markers and the unknown are not events; an unknown kind is everything.
        assert_eq!(Event::decode("h", ""), None);
        assert_eq!(Event::decode("k", "Nope"), Some(Event::All));
        assert_eq!(Event::decode("e", r#"{"Nope":["x"]}"#), Some(Event::All));
    }
}
