//! The invalidation bus: every invalidation taken by any gateway reaches every
//! gateway of the fleet, and none is lost silently.
//!
//! **Publishing.** [`crate::cache::invalidate::Invalidator`] applies an invalidation to
//! this gateway's memory and hands the event to [`Bus::publish`] (no waiting). A task
//! sends queued events in batches: first the L2 side, once, by the publishing gateway
//! (the accounts' generations; for a group, the accounts Redis's GroupId index holds;
//! for "everything", the fleet-wide generation), then one `XADD` per event to the
//! stream `P:{fleet}:bus` (`MAXLEN ~` [`MAXLEN`]). Until an event is in Redis, this
//! gateway does not read L2 for what it names ([`Pending`]), so its own writes are read
//! back fresh. Events that cannot be sent (Redis down) wait in the queue and go out
//! when Redis is back; past [`MAX_QUEUE`] events or [`MAX_QUEUED_NAMES`] names they
//! collapse into one "everything".
//!
//! **Receiving.** A task reads the stream (`XREAD BLOCK` on its own connection) from
//! the position it remembers, and applies other gateways' events to this gateway's
//! memory only (no re-publishing).
//!
//! **Loss detection (Redis Streams with a remembered position).** The gateway drops its
//! in-memory pages (`chat_gateway_fleet_resyncs_total{reason}`) before serving from
//! them again whenever it may have missed an event:
//! - `restart`: the server's `run_id` is not the one the position was taken on (Redis
//!   restarted, possibly empty, or failed over);
//! - `gap`: the entry at the position is gone (the stream was trimmed past it, or
//!   deleted or evicted): trimming removes the oldest entries first, so while the
//!   position's own entry is there, nothing after it was lost. Checked on every
//!   reconnection, and after every full batch (a reader that far behind may have been
//!   overtaken by trimming);
//! - `reconnect`: pages were cached while the gateway held no position (it served
//!   before it could first read the stream).
//!
//! A dropped connection alone is not a loss: the events stay in the stream and are
//! read on reconnection. The position is always an entry this gateway saw; when it
//! needs a new one it appends a marker entry (`k=h`) and takes its id, then drops its
//! pages, so every event after the marker is read and every event before it is covered
//! by the drop.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::{counter, histogram};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::sync::Notify;

use super::conn::{self, FleetError, Op, Redis};
use super::keys::Keys;
use super::l2::{self, unix_ms};
use super::Shared;
use crate::cache::PageCache;
use crate::config::LiveSettings;
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

/// An invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every page of these accounts.
    Accounts(Vec<String>),
    /// Every account whose pages list this GroupId.
    Group(String),
    /// Everything.
    All,
}

/// What this gateway invalidated but has not yet confirmed in Redis: L2 is not read
/// for it meanwhile.
#[derive(Debug, Default)]
pub struct Pending {
    accounts: Mutex<HashMap<String, u32>>,
    /// Group and "everything" events not yet confirmed.
    wide: AtomicU32,
}

impl Pending {
    /// Whether L2 must not be read for `account` now.
    pub fn blocks(&self, account: &str) -> bool {
        self.wide.load(Ordering::Acquire) > 0
            || self
                .accounts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(account)
    }

    fn add(&self, e: &Event) {
        match e {
            Event::Accounts(list) => {
                let mut m = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
                for a in list {
                    *m.entry(a.clone()).or_default() += 1;
                }
            }
            Event::Group(_) | Event::All => {
                self.wide.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn done(&self, e: &Event) {
        match e {
            Event::Accounts(list) => {
                let mut m = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
                for a in list {
                    if let Some(n) = m.get_mut(a) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(a);
                        }
                    }
                }
            }
            Event::Group(_) | Event::All => {
                // Never below zero, whatever the order of confirmations.
                let _ = self
                    .wide
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1));
            }
        }
    }
}

impl Event {
    /// Names it carries (one for a group or "everything"), for the queue's bound.
    fn names(&self) -> usize {
        match self {
            Event::Accounts(list) => list.len(),
            Event::Group(_) | Event::All => 1,
        }
    }
}

/// Events waiting for Redis, and how many names they hold.
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Event>,
    names: usize,
}

impl Queue {
    /// Queues `event` (marked pending); past the bounds, everything queued collapses
    /// into one "everything". Returns whether it collapsed.
    fn push(&mut self, event: Event, pending: &Pending) -> bool {
        pending.add(&event);
        self.names += event.names();
        self.events.push_back(event);
        if self.events.len() <= MAX_QUEUE && self.names <= MAX_QUEUED_NAMES {
            return false;
        }
        for e in self.events.drain(..) {
            pending.done(&e);
        }
        pending.add(&Event::All);
        self.events.push_back(Event::All);
        self.names = 1;
        true
    }
}

/// The bus.
pub struct Bus {
    redis: Arc<Redis>,
    keys: Keys,
    id: String,
    cache: Arc<dyn PageCache>,
    shared: Arc<Shared>,
    l2: bool,
    live: Arc<ArcSwap<LiveSettings>>,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    /// Whether the reader holds a position in the stream.
    positioned: AtomicBool,
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
    /// The server it was read on.
    run_id: String,
}

impl Bus {
    /// Starts publishing and reading.
    pub fn start(
        redis: Arc<Redis>,
        keys: Keys,
        id: String,
        cache: Arc<dyn PageCache>,
        shared: Arc<Shared>,
        l2: bool,
        live: Arc<ArcSwap<LiveSettings>>,
    ) -> Arc<Bus> {
        let bus = Arc::new(Bus {
            redis,
            keys,
            id,
            cache,
            shared,
            l2,
            live,
            queue: Mutex::new(Queue::default()),
            wake: Arc::new(Notify::new()),
            positioned: AtomicBool::new(false),
        });
        tokio::spawn(publish_loop(Arc::downgrade(&bus)));
        tokio::spawn(read_loop(Arc::downgrade(&bus)));
        bus
    }

    /// Queues `event` for the fleet (this gateway already applied it to its memory).
    pub fn publish(&self, event: Event) {
        if matches!(&event, Event::Accounts(a) if a.is_empty()) {
            return;
        }
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Too much to send one by one: the fleet invalidates everything instead.
            if q.push(event, &self.shared.pending) {
                tracing::warn!(
                    "more than {MAX_QUEUE} invalidations or {MAX_QUEUED_NAMES} names waiting for Redis; the fleet will drop everything instead"
                );
            }
        }
        self.wake.notify_one();
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

    /// How long L2 keeps an invalidated account's generation: as long as a page.
    fn l2_ttl(&self) -> Duration {
        let live = self.live.load();
        live.cache_ttl + live.stale_if_error + Duration::from_secs(60)
    }

    /// Sends a batch: the L2 side first, then the events.
    async fn send(&self, batch: &[Event]) -> Result<(), FleetError> {
        let mut entries: Vec<(&'static str, String)> = Vec::with_capacity(batch.len());
        for e in batch {
            match e {
                Event::Accounts(list) => {
                    if self.l2 {
                        l2::bump_accounts(&self.redis, &self.keys, list, self.l2_ttl()).await?;
                    }
                    entries.push(("a", serde_json::to_string(list).unwrap_or_default()));
                }
                Event::Group(g) => {
                    if self.l2 {
                        let members = l2::take_group(&self.redis, &self.keys, g).await?;
                        l2::bump_accounts(&self.redis, &self.keys, &members, self.l2_ttl()).await?;
                    }
                    entries.push(("g", g.clone()));
                }
                Event::All => {
                    let gen = if self.l2 {
                        let g = l2::bump_fleet(&self.redis, &self.keys).await?;
                        self.shared.fleet_gen.fetch_max(g, Ordering::AcqRel);
                        g
                    } else {
                        0
                    };
                    entries.push(("*", gen.to_string()));
                }
            }
        }
        let key = self.keys.bus();
        let id = self.id.clone();
        self.redis
            .run(Op::Publish, |mut c| async move {
                let mut p = redis::pipe();
                for (kind, v) in &entries {
                    p.cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(MAXLEN)
                        .arg("*")
                        .arg("o")
                        .arg(&id)
                        .arg("k")
                        .arg(*kind)
                        .arg("v")
                        .arg(v)
                        .ignore();
                }
                let r = p.query_async::<()>(&mut c).await;
                r
            })
            .await
    }

    /// Applies one entry of the stream.
    fn apply(&self, entry_id: &str, fields: &HashMap<String, String>) {
        if fields.get("o").is_some_and(|o| *o == self.id) {
            return;
        }
        let v = fields.get("v").map(String::as_str).unwrap_or("");
        let pages = match fields.get("k").map(String::as_str) {
            Some("a") => {
                let accounts: Vec<String> = serde_json::from_str(v).unwrap_or_default();
                accounts.iter().map(|a| self.cache.invalidate(a)).sum()
            }
            Some("g") => self.cache.invalidate_group(v).iter().map(|(_, n)| n).sum(),
            Some("*") => {
                if let Ok(g) = v.parse::<u64>() {
                    self.shared.fleet_gen.fetch_max(g, Ordering::AcqRel);
                }
                self.cache.invalidate_all()
            }
            _ => return,
        };
        counter!(names::FLEET_RECEIVED).increment(1);
        counter!(names::INVALIDATIONS, "source" => "fleet").increment(1);
        counter!(names::INVALIDATED_PAGES, "source" => "fleet").increment(pages as u64);
        if let Some(ms) = entry_id
            .split('-')
            .next()
            .and_then(|m| m.parse::<u64>().ok())
        {
            let lag = unix_ms().saturating_sub(ms);
            histogram!(names::FLEET_LAG).record(lag as f64 / 1000.0);
        }
    }

    /// Drops every in-memory page: invalidations may have been missed.
    fn resync(&self, reason: &'static str) {
        let pages = self.cache.invalidate_all();
        counter!(names::FLEET_RESYNCS, "reason" => reason).increment(1);
        tracing::warn!(
            reason,
            pages,
            "may have missed fleet invalidations; dropped the in-memory pages"
        );
    }
}

async fn publish_loop(weak: std::sync::Weak<Bus>) {
    let mut sessions = match weak.upgrade() {
        Some(b) => b.redis.sessions(),
        None => return,
    };
    loop {
        let Some(bus) = weak.upgrade() else { return };
        let batch: Vec<Event> = {
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
            Ok(()) => {
                let mut q = bus.queue.lock().unwrap_or_else(|p| p.into_inner());
                // The queue may have collapsed meanwhile (and confirmed what it
                // dropped): take off, and confirm, only what is still at its front.
                for e in &batch {
                    if q.events.front() == Some(e) {
                        q.events.pop_front();
                        q.names = q.names.saturating_sub(e.names());
                        bus.shared.pending.done(e);
                    }
                }
                counter!(names::FLEET_SENT).increment(batch.len() as u64);
            }
            Err(_) => {
                drop(bus);
                // Wait for Redis to come back (a new session), or retry a transient
                // error after a short pause.
                let _ = tokio::time::timeout(Duration::from_millis(200), sessions.changed()).await;
            }
        }
    }
}

/// Whether entry `id` is still in `stream`.
async fn entry_exists(
    c: &mut MultiplexedConnection,
    stream: &str,
    id: &str,
) -> redis::RedisResult<bool> {
    let v: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(id)
        .arg(id)
        .query_async(c)
        .await?;
    Ok(matches!(v, Value::Array(a) if !a.is_empty()))
}

/// Appends a marker entry and returns its id: a position that exists.
async fn mark(c: &mut MultiplexedConnection, stream: &str, me: &str) -> redis::RedisResult<String> {
    redis::cmd("XADD")
        .arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(MAXLEN)
        .arg("*")
        .arg("o")
        .arg(me)
        .arg("k")
        .arg("h")
        .query_async(c)
        .await
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
        let Value::Array(entries) = kv.pop().unwrap_or(Value::Nil) else {
            continue;
        };
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

async fn read_loop(weak: std::sync::Weak<Bus>) {
    let mut pos: Option<Position> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(bus) = weak.upgrade() else { return };
        let connector = bus.redis.connector().clone();
        let stream = bus.keys.bus();
        let me = bus.id.clone();
        drop(bus);
        let attempt = async {
            let mut c = connector.connect("bus").await?;
            let id = conn::run_id(&mut c).await?;
            Ok::<_, redis::RedisError>((c, id))
        };
        let ready = tokio::time::timeout(Duration::from_secs(2), async {
            let (mut c, run_id) = attempt.await?;
            // Can we carry on from where we were?
            let reason = match &pos {
                None => None,
                Some(p) if p.run_id != run_id => Some("restart"),
                Some(p) if entry_exists(&mut c, &stream, &p.id).await? => None,
                Some(_) => Some("gap"),
            };
            let marked = if pos.is_none() || reason.is_some() {
                Some(mark(&mut c, &stream, &me).await?)
            } else {
                None
            };
            Ok::<_, redis::RedisError>((c, run_id, reason, marked))
        })
        .await;
        let (mut c, run_id) = match ready {
            Ok(Ok((c, run_id, reason, marked))) => {
                if let Some(id) = marked {
                    let had_none = pos.is_none();
                    pos = Some(Position {
                        id,
                        run_id: run_id.clone(),
                    });
                    let Some(bus) = weak.upgrade() else { return };
                    bus.positioned.store(true, Ordering::Release);
                    // The position is taken first: every event after it will be read,
                    // every one before it is covered by this drop.
                    match reason {
                        Some(r) => bus.resync(r),
                        None if had_none && bus.cache.stats().pages > 0 => bus.resync("reconnect"),
                        None => {}
                    }
                }
                (c, run_id)
            }
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(conn::MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Read until the connection fails.
        while let Some(p) = pos.clone() {
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
            if entries.is_empty() {
                continue;
            }
            let Some(bus) = weak.upgrade() else { return };
            if entries.len() >= READ_COUNT {
                // Far behind: make sure trimming did not overtake us.
                match entry_exists(&mut c, &stream, &p.id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        if let Ok(id) = mark(&mut c, &stream, &me).await {
                            pos = Some(Position {
                                id,
                                run_id: run_id.clone(),
                            });
                            bus.resync("gap");
                            continue;
                        }
                        break;
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            for (id, fields) in &entries {
                bus.apply(id, fields);
            }
            tracing::trace!(
                events = entries.len(),
                took_us = started.elapsed().as_micros() as u64,
                "applied fleet events"
            );
            if let Some((last, _)) = entries.last() {
                pos = Some(Position {
                    id: last.clone(),
                    run_id: run_id.clone(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts(prefix: &str, n: usize) -> Event {
        Event::Accounts((0..n).map(|i| format!("{prefix}{i}")).collect())
    }

    #[test]
    fn the_queue_is_bounded_in_events_and_in_names() {
        let pending = Pending::default();
        let mut q = Queue::default();
        // Names: five events of 20,000 fit, the sixth collapses the queue.
        for i in 0..5 {
            assert!(!q.push(accounts(&format!("e{i}_"), 20_000), &pending));
        }
        assert!(pending.blocks("e0_7"));
        assert!(q.push(accounts("e5_", 20_000), &pending));
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.names, 1);
        assert!(matches!(q.events[0], Event::All));
        // Only "everything" is pending now; the account map was emptied.
        assert!(pending.accounts.lock().unwrap().is_empty());
        assert_eq!(pending.wide.load(Ordering::Acquire), 1);
        // Events: past MAX_QUEUE small ones it collapses too.
        let mut q = Queue::default();
        let pending = Pending::default();
        let collapsed = (0..=MAX_QUEUE).any(|i| q.push(Event::Group(format!("@g{i}")), &pending));
        assert!(collapsed);
        assert_eq!(q.events.len(), 1);
        assert_eq!(pending.wide.load(Ordering::Acquire), 1);
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
}
