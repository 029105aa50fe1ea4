//! The invalidation bus: every invalidation taken by any gateway reaches every
//! gateway of the fleet, and none is lost silently.
//!
//! **Publishing.** [`crate::cache::invalidate::Invalidator`] applies an invalidation to
//! this gateway's memory and hands the event to [`Bus::publish`] (no waiting). A task
//! sends queued events in batches: first the L2 side, once, by the publishing gateway
//! (the accounts' generations; for a group, the accounts of Redis's GroupId index, in
//! chunks ([`l2::group_event`]); for "everything", the fleet-wide generation), then the
//! entries, by one script that numbers each one (`n`, from `P:{fleet}:seq`) as it
//! appends it to the stream `P:{fleet}:bus` (`MAXLEN ~` [`MAXLEN`]). An event leaves the
//! queue only when all of that has landed: a failure at any step (Redis down, full,
//! paused) leaves it queued, and the retry does again what is needed (bumping twice
//! costs nothing). Until an event is in Redis, this gateway does not read L2 for what
//! it names ([`Pending`]), so its own writes are read back fresh. Past [`MAX_QUEUE`]
//! events or [`MAX_QUEUED_NAMES`] names the queue collapses into one "everything".
//!
//! **Receiving.** A task reads the stream (`XREAD BLOCK` on its own connection) from
//! the position it remembers, and applies other gateways' events to this gateway's
//! memory only (no re-publishing).
//!
//! **Loss detection (numbered entries in a stream, with a remembered position).** The
//! gateway drops its in-memory pages (`chat_gateway_fleet_resyncs_total{reason}`)
//! before serving from them again whenever it may have missed an event:
//! - `restart`: the server is not the one the position was taken on (Redis restarted,
//!   possibly empty, or failed over; see [`conn::Session`]);
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
use tokio::sync::Notify;

use super::conn::{self, Conn, FleetError, Op, Redis};
use super::keys::Keys;
use super::l2;
use super::Shared;
use crate::cache::PageCache;
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

/// Appends numbered entries. `KEYS[1]`: the stream, `KEYS[2]`: the counter. ARGV:
/// MAXLEN, origin, then per entry: kind, value, fleet generation ('' for none).
/// Returns {id, n} of the last entry.
const PUBLISH: &str = r#"
local id, n
for i = 3, #ARGV, 3 do
  n = redis.call('INCR', KEYS[2])
  if ARGV[i + 2] ~= '' then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'o', ARGV[2], 'k', ARGV[i], 'v', ARGV[i + 1], 'n', n, 'f', ARGV[i + 2])
  else
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'o', ARGV[2], 'k', ARGV[i], 'v', ARGV[i + 1], 'n', n)
  end
end
return {id, n}
"#;

pub(crate) static PUBLISH_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(PUBLISH));

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
        cache: Arc<dyn PageCache>,
        shared: Arc<Shared>,
        l2: bool,
    ) -> Arc<Bus> {
        let bus = Arc::new(Bus {
            redis,
            keys,
            id,
            cache,
            shared,
            l2,
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

    /// Sends a batch: the L2 side first, then the numbered entries.
    async fn send(&self, batch: &[Event]) -> Result<(), FleetError> {
        let mut entries: Vec<(&'static str, String, String)> = Vec::with_capacity(batch.len());
        for e in batch {
            match e {
                Event::Accounts(list) => {
                    if self.l2 {
                        l2::bump_accounts(&self.redis, &self.keys, list).await?;
                    }
                    entries.push((
                        "a",
                        serde_json::to_string(list).unwrap_or_default(),
                        String::new(),
                    ));
                }
                Event::Group(g) => {
                    let mut raised = String::new();
                    if self.l2 {
                        let done =
                            l2::group_event(&self.redis, &self.keys, &self.shared, g).await?;
                        if let Some(gen) = done.raised {
                            raised = gen.to_string();
                        }
                    }
                    entries.push(("g", g.clone(), raised));
                }
                Event::All => {
                    let gen = if self.l2 {
                        l2::bump_fleet(&self.redis, &self.keys, &self.shared).await?
                    } else {
                        0
                    };
                    entries.push(("*", gen.to_string(), String::new()));
                }
            }
        }
        let (last_id, n) = self.append(entries).await?;
        tracing::trace!(last_id, n, "published");
        Ok(())
    }

    /// Appends numbered entries; returns the last one's id and number.
    async fn append(
        &self,
        entries: Vec<(&'static str, String, String)>,
    ) -> Result<(String, u64), FleetError> {
        let stream = self.keys.bus();
        let seq = self.keys.bus_seq();
        let id = self.id.clone();
        let (last_id, n): (String, u64) = self
            .redis
            .run_long(Op::Publish, |mut c| async move {
                let mut inv = PUBLISH_SCRIPT.key(stream);
                inv.key(seq).arg(MAXLEN).arg(id);
                for (kind, v, f) in &entries {
                    inv.arg(*kind).arg(v).arg(f);
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
            let lag = super::wall_ms().saturating_sub(ms);
            histogram!(names::FLEET_LAG).record(lag as f64 / 1000.0);
        }
    }

    /// Drops every in-memory page: invalidations may have been missed. After a loss
    /// of Redis's own state, the whole fleet is told to do the same.
    fn resync(&self, why: Loss) {
        let pages = self.cache.invalidate_all();
        counter!(names::FLEET_RESYNCS, "reason" => why.as_str()).increment(1);
        tracing::warn!(
            reason = why.as_str(),
            pages,
            "may have missed fleet invalidations; dropped the in-memory pages"
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

/// Appends a marker entry and returns its id and number: a position that exists.
async fn mark(c: &mut Conn, keys: &Keys, me: &str) -> redis::RedisResult<(String, u64)> {
    PUBLISH_SCRIPT
        .key(keys.bus())
        .key(keys.bus_seq())
        .arg(MAXLEN)
        .arg(me)
        .arg("h")
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
    bus.positioned.store(true, Ordering::Release);
    // The position is taken first: every event after it will be read, every one
    // before it is covered by this drop.
    if let Some(w) = why {
        bus.resync(w);
    }
    Ok(Position {
        id,
        n,
        identity: identity.to_string(),
    })
}

async fn read_loop(weak: std::sync::Weak<Bus>) {
    let mut pos: Option<Position> = None;
    let mut backoff = Duration::from_millis(50);
    // The bus connection's own marker (see conn::identify).
    let markers = AtomicU64::new(0);
    loop {
        let Some(bus) = weak.upgrade() else { return };
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
                    let had_pages = bus.cache.stats().pages > 0;
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
                pos = Some(cur);
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
