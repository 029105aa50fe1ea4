//! Item entries of the cached reads in the fleet's L2 (besides the get_list pages of
//! [`super::l2`]), with the pages' properties:
//!
//! - **One slot per entry.** An entry lives in the slot of the entity its item names
//!   (`{a:<UserID>}` for a profile, an account's existence or friends; `{g:<GroupId>}`
//!   for a group's info or members): its key, the generations of that entity's kinds
//!   it depends on, its lock and the slot's index of entries share the hash tag, so
//!   every script touches one slot (Redis Cluster ready).
//! - **Generations in the key.** An entry's key holds the fleet-wide generation and
//!   the generations of its slot's entities (`P:{a:u}:i:<fleet gen>:<gens>:<name>`).
//!   Invalidating an entity raises its generation (O(1), [`super::l2::bump_entities`],
//!   only ever forward); the old entries are no longer addressed and expire on their
//!   own. A lookup that finds no generation creates one from Redis's clock, so a
//!   generation lost (expired, evicted) is never read again: a fetch that began
//!   before can never store.
//! - **Other slots: carried.** `friend_get_list`'s entries depend on the owner's
//!   friends too (`Friends` of `From_Account`, another slot). Such an entry carries
//!   the owner's generation as it was when the fetch began; the same pipeline that
//!   looks the entries up reads the current one, and an entry that carries another
//!   is not served. (`get_joined_group_list`'s entries depend on every group they
//!   list, any number of slots: they stay in each gateway's memory only.)
//! - **On Redis's clock.** A store stamps `<fresh until> <stale until> <stored>`
//!   with Redis's `TIME`; a lookup answers Redis's time too. Each entry expires
//!   (`PX`) at the end of its TTL + stale window, whatever happens meanwhile, and a
//!   slot keeps at most `cache.max_pages_per_account` entries (the oldest goes).
//! - **Fleet coalescing per item.** A lookup that finds no fresh entry takes the
//!   item's lock (`SET NX PX`, in the same script); a gateway that finds another's
//!   lock polls for the entry (5 ms doubling to 50 ms, at most half of
//!   `chat.request_timeout_ms` and within the request's Redis budget), then fetches
//!   itself. The store releases the lock.
//!
//! All of a request's items are looked up in one pipeline (one round trip, one
//! script per item's slot), and stored in one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::counter;
use sha2::{Digest, Sha256};

use super::conn::{FleetError, Op, Redis};
use super::heartbeat::LUA_CLOCK;
use super::keys::{tag, Keys};
use super::l2::{evalsha, UNLOCK_SCRIPT};
use super::Shared;
use crate::chat::effects::EntityKind;
use crate::chat::reads::{ReadRow, Store};
use crate::metrics::names;

/// Looks an item entry up and, when none is fresh and asked to, takes its lock.
///
/// `KEYS[1]`: the lock, `KEYS[2..]`: the generations of the slot's entities the entry
/// depends on. ARGV: fleet gen, name, token, lock PX (ms), take the lock ("1"/"0"),
/// entry key prefix. Returns {generations (joined by '.'), value or nil, 0 (no lock
/// asked or needed) | 1 (ours) | 2 (theirs), Redis now (ms)}.
const LOOKUP: &str = r#"
local now = now_ms()
local gens = {}
for i = 2, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if not g then
    g = fmt(now)
    redis.call('SET', KEYS[i], g, 'PX', ARGV[4])
  end
  gens[#gens + 1] = g
end
local gs = table.concat(gens, '.')
local v = redis.call('GET', ARGV[6] .. ARGV[1] .. ':' .. gs .. ':' .. ARGV[2])
if v then
  local fu = tonumber(string.match(v, '^(%d+)'))
  if fu and fu > now then return {gs, v, 0, fmt(now)} end
end
if ARGV[5] ~= '1' then return {gs, v, 0, fmt(now)} end
if redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4]) then return {gs, v, 1, fmt(now)} end
return {gs, v, 2, fmt(now)}
"#;

/// Reads a generation of another slot (created from Redis's clock when missing).
/// `KEYS[1]`: it. ARGV: PX (ms) for a new one.
const GEN_READ: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then
  g = fmt(now_ms())
  redis.call('SET', KEYS[1], g, 'PX', ARGV[1])
end
return g
"#;

/// Keeps a generation of another slot at least as long as the entries carrying it.
/// `KEYS[1]`: it. ARGV: life (ms).
const GEN_TOUCH: &str = r#"
local t = redis.call('PTTL', KEYS[1])
if t >= 0 and t < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"#;

/// Stores an item entry if the slot's generations are still the ones the fetch
/// began with, keeps the slot's index within the cap, and releases the lock if it is
/// ours.
///
/// `KEYS[1]`: the lock, `KEYS[2]`: the slot's index, `KEYS[3..]`: the generations.
/// ARGV: fleet gen, expected generations, name, body, TTL (ms), stale window (ms),
/// token ('' for none), cap, entry key prefix, carried generations ('-' for none).
/// Returns 1 if stored.
const STORE: &str = r#"
local now = now_ms()
local stored = 0
local gens = {}
local ok = true
for i = 3, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if not g then ok = false break end
  gens[#gens + 1] = g
end
if ok and table.concat(gens, '.') == ARGV[2] then
  local key = ARGV[9] .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3]
  local ttl = tonumber(ARGV[5])
  local life = ttl + tonumber(ARGV[6])
  local head = fmt(now + ttl) .. ' ' .. fmt(now + life) .. ' ' .. fmt(now) .. ' ' .. ARGV[10] .. '\n'
  redis.call('SET', key, head .. ARGV[4], 'PX', life)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], now + life, key)
  local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[8])
  if over > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[2], over)
    for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
  end
  if redis.call('PTTL', KEYS[2]) < life then redis.call('PEXPIRE', KEYS[2], life) end
  for i = 3, #KEYS do
    if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
  end
  stored = 1
end
if ARGV[7] ~= '' and redis.call('GET', KEYS[1]) == ARGV[7] then redis.call('DEL', KEYS[1]) end
return stored
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LUA_CLOCK}{body}"))
}

pub(crate) static ITEM_LOOKUP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(LOOKUP));
pub(crate) static ITEM_STORE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(STORE));
pub(crate) static GEN_READ_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(GEN_READ));
pub(crate) static GEN_TOUCH_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(GEN_TOUCH));

/// First pause between polls for another gateway's entry.
const POLL_MIN: Duration = Duration::from_millis(5);
/// Longest pause between polls.
const POLL_MAX: Duration = Duration::from_millis(50);

/// Whether a row's entries go to L2: per-item rows whose entries depend only on the
/// item's own entities and, at most, one more named by the request (its scope).
/// Rows whose entries depend on what their answer lists (any number of slots) stay
/// in memory.
pub fn in_l2(row: &ReadRow) -> bool {
    row.store == Store::Items && row.listed_deps.is_none()
}

/// An item entry as L2 holds it, stamped with Redis's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Item {
    /// The item's bytes as Chat returned them.
    pub body: Bytes,
    /// When it was stored (Redis ms).
    pub stored_ms: u64,
    /// Fresh until (Redis ms).
    pub fresh_until_ms: u64,
    /// Servable when Chat fails until (Redis ms).
    pub stale_until_ms: u64,
    /// The generations it carries from other slots (`-` for none).
    carried: String,
}

impl L2Item {
    /// Parses stored bytes.
    pub fn decode(v: &[u8]) -> Option<L2Item> {
        let nl = v.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&v[..nl]).ok()?;
        let mut parts = head.split(' ');
        let mut num = || parts.next().and_then(|n| n.parse::<u64>().ok());
        let (fresh, stale, stored) = (num()?, num()?, num()?);
        let carried = parts.next()?.to_string();
        Some(L2Item {
            body: Bytes::copy_from_slice(&v[nl + 1..]),
            stored_ms: stored,
            fresh_until_ms: fresh,
            stale_until_ms: stale,
            carried,
        })
    }

    /// Its times as instants of this process's clock, given Redis's time `now_ms`
    /// (read with it): (stored, fresh until, stale until).
    pub fn instants(&self, now_ms: u64) -> (Instant, Instant, Instant) {
        let now = Instant::now();
        let at = |ms: u64| -> Instant {
            if ms >= now_ms {
                now + Duration::from_millis(ms - now_ms)
            } else {
                now.checked_sub(Duration::from_millis(now_ms - ms))
                    .unwrap_or(now)
            }
        };
        (
            at(self.stored_ms),
            at(self.fresh_until_ms),
            at(self.stale_until_ms),
        )
    }
}

/// Where one item's entry is.
#[derive(Debug, Clone)]
struct Spot {
    /// The slot's hash tag.
    tag: String,
    /// The entry's lock.
    lock: String,
    /// The generations of the slot's entities it depends on.
    gens: Vec<String>,
}

/// A request's items in L2: their spots, the entries' name (the command and the
/// variant, digested), and the generation carried from another slot, if any.
#[derive(Debug, Clone)]
pub struct Query {
    name: String,
    spots: Vec<Spot>,
    carried: Option<String>,
}

/// What one lookup found for one item.
#[derive(Debug, Clone)]
pub enum Found {
    /// A fresh entry.
    Fresh {
        /// The entry.
        item: L2Item,
        /// Redis's time when it was read.
        now_ms: u64,
        /// The slot's generations (to store a refresh with).
        gens: String,
        /// The carried generation.
        carried: String,
    },
    /// No fresh entry: fetch it and store with these generations (and release the
    /// lock if `token`). `stale`: an entry past its TTL within its stale window.
    Fetch {
        /// The slot's generations when the fetch began.
        gens: String,
        /// The carried generation then.
        carried: String,
        /// Our lock's token, if we hold the lock.
        token: Option<String>,
        /// A stale entry, and Redis's time when read.
        stale: Option<(L2Item, u64)>,
    },
    /// Another gateway holds the lock: wait for its entry.
    Theirs {
        /// The slot's generations.
        gens: String,
        /// The carried generation.
        carried: String,
    },
}

/// The item entries in L2.
pub struct ItemL2 {
    redis: Arc<Redis>,
    keys: Keys,
    shared: Arc<Shared>,
    /// Lock expiry (and a new generation's): `chat.request_timeout_ms` + 1 s.
    lock_px: Duration,
    /// How long a miss waits for another gateway's fetch.
    lock_wait: Duration,
    /// Entries per slot, at most (`cache.max_pages_per_account`).
    cap: usize,
    id: String,
    seq: AtomicU64,
}

impl std::fmt::Debug for ItemL2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemL2")
            .field("lock_wait", &self.lock_wait)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl ItemL2 {
    /// Item entries on `redis`; `request_timeout` sizes the lock and the wait for it;
    /// `cap` is the most entries per account or group.
    pub fn new(
        redis: Arc<Redis>,
        keys: Keys,
        shared: Arc<Shared>,
        id: String,
        request_timeout: Duration,
        cap: usize,
    ) -> ItemL2 {
        ItemL2 {
            redis,
            keys,
            shared,
            lock_px: request_timeout + Duration::from_secs(1),
            lock_wait: request_timeout / 2,
            cap: cap.max(1),
            id,
            seq: AtomicU64::new(0),
        }
    }

    /// Where the items of a request of `row` with `variant` (and `scope`) are.
    pub fn query(
        &self,
        row: &ReadRow,
        variant: &str,
        scope: Option<&str>,
        items: &[Arc<str>],
    ) -> Query {
        let mut h = Sha256::new();
        h.update(row.command.as_bytes());
        h.update([0]);
        h.update(variant.as_bytes());
        let name = hex::encode(&h.finalize()[..16]);
        let spots = items
            .iter()
            .map(|item| {
                let first = row
                    .item_deps
                    .first()
                    .copied()
                    .unwrap_or(EntityKind::Profile);
                let t = tag(first, item);
                Spot {
                    lock: self.keys.item_lock(&t, &name),
                    gens: row
                        .item_deps
                        .iter()
                        .map(|k| self.keys.entity_gen(*k, item))
                        .collect(),
                    tag: t,
                }
            })
            .collect();
        let carried = match (row.scope, scope) {
            (Some((_, kind)), Some(s)) => Some(self.keys.entity_gen(kind, s)),
            _ => None,
        };
        Query {
            name,
            spots,
            carried,
        }
    }

    /// How long a miss waits for another gateway's fetch.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// Looks the items at `which` (indexes into the query's items) up, in one
    /// pipeline; with `lock`, takes each missing one's lock. An entry carrying another
    /// generation than the current one is no entry.
    pub async fn lookup(
        &self,
        q: &Query,
        which: &[usize],
        lock: bool,
    ) -> Result<Vec<Found>, FleetError> {
        let fleet_gen = self.shared.fleet_gen.load(Ordering::Acquire);
        let px = self.lock_px.as_millis() as u64;
        let tokens: Vec<String> = which
            .iter()
            .map(|_| format!("{}:i{}", self.id, self.seq.fetch_add(1, Ordering::Relaxed)))
            .collect();
        let mut p = redis::pipe();
        if let Some(c) = &q.carried {
            p.add_command(evalsha(&GEN_READ_SCRIPT, &[c])).arg(px);
        }
        for (i, token) in which.iter().zip(&tokens) {
            let s = &q.spots[*i];
            let mut keys: Vec<&str> = vec![&s.lock];
            keys.extend(s.gens.iter().map(String::as_str));
            p.add_command(evalsha(&ITEM_LOOKUP_SCRIPT, &keys))
                .arg(fleet_gen)
                .arg(&q.name)
                .arg(token)
                .arg(px)
                .arg(if lock { "1" } else { "0" })
                .arg(self.keys.item_prefix(&s.tag));
        }
        let op = if lock { Op::Lock } else { Op::L2Get };
        let reply: Vec<redis::Value> = self
            .redis
            .run(op, |mut c| async move {
                let r = query_pipe(&mut c, &p, &[&ITEM_LOOKUP_SCRIPT, &GEN_READ_SCRIPT]).await;
                r
            })
            .await?;
        let mut it = reply.into_iter();
        let carried = match &q.carried {
            Some(_) => text(&it.next().unwrap_or(redis::Value::Nil)),
            None => "-".to_string(),
        };
        let mut out = Vec::with_capacity(which.len());
        for token in tokens {
            let v = it.next().unwrap_or(redis::Value::Nil);
            let (gens, value, state, now) =
                match redis::from_redis_value::<(String, Option<Vec<u8>>, i64, String)>(v) {
                    Ok(t) => t,
                    Err(e) => return Err(FleetError::Redis(e.to_string())),
                };
            let now_ms: u64 = now.parse().unwrap_or(0);
            // The fleet-wide generation read with, ahead of the slot's: a fetch stores
            // under the generations it began with, so an entry fetched before
            // "everything" (or "every entity of a kind") is stored where no gateway that
            // applied it looks.
            let gens = format!("{fleet_gen}:{gens}");
            let entry = value
                .as_deref()
                .and_then(L2Item::decode)
                .filter(|e| e.carried == carried);
            out.push(match (entry, state) {
                (Some(e), _) if e.fresh_until_ms > now_ms => Found::Fresh {
                    item: e,
                    now_ms,
                    gens,
                    carried: carried.clone(),
                },
                (_, 2) => Found::Theirs {
                    gens,
                    carried: carried.clone(),
                },
                (e, state) => Found::Fetch {
                    gens,
                    carried: carried.clone(),
                    token: (state == 1).then_some(token),
                    stale: e.filter(|e| e.stale_until_ms > now_ms).map(|e| (e, now_ms)),
                },
            });
        }
        Ok(out)
    }

    /// Looks the items at `which` up and takes the locks of the missing ones;
    /// waits (polling, at most [`ItemL2::lock_wait`] and the request's Redis budget)
    /// for those another gateway is fetching. Every item ends `Fresh` or `Fetch`. On
    /// a Redis failure before anything was learned: `None` (go to Chat, store
    /// nothing in L2).
    pub async fn plan(&self, q: &Query, which: &[usize]) -> Option<Vec<Found>> {
        let mut found = match self.lookup(q, which, true).await {
            Ok(f) => f,
            Err(_) => {
                counter!(names::L2_REQUESTS, "result" => "error").increment(1);
                return None;
            }
        };
        for f in &found {
            let r = if matches!(f, Found::Fresh { .. }) {
                "hit"
            } else {
                "miss"
            };
            counter!(names::L2_REQUESTS, "result" => r).increment(1);
        }
        let deadline = Instant::now() + self.lock_wait;
        let mut pause = POLL_MIN;
        loop {
            let waiting: Vec<usize> = (0..found.len())
                .filter(|i| matches!(found[*i], Found::Theirs { .. }))
                .collect();
            if waiting.is_empty() {
                return Some(found);
            }
            if Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
            let again: Vec<usize> = waiting.iter().map(|i| which[*i]).collect();
            match self.lookup(q, &again, true).await {
                Ok(f) => {
                    for (i, f) in waiting.into_iter().zip(f) {
                        if matches!(f, Found::Fresh { .. }) {
                            counter!(names::FLEET_COALESCED, "outcome" => "served").increment(1);
                        }
                        found[i] = f;
                    }
                }
                // The request's Redis time is spent, or Redis failed: fetch them.
                Err(_) => break,
            }
        }
        for f in &mut found {
            if let Found::Theirs { gens, carried } = f {
                counter!(names::FLEET_COALESCED, "outcome" => "timeout").increment(1);
                *f = Found::Fetch {
                    gens: std::mem::take(gens),
                    carried: std::mem::take(carried),
                    token: None,
                    stale: None,
                };
            }
        }
        Some(found)
    }

    /// Stores entries (each: the item's index in the query, its bytes, the
    /// generations and carried generation its fetch began with, our lock's token)
    /// for `ttl` + `stale`, in one pipeline. Returns how many were stored.
    pub async fn store(
        &self,
        q: &Query,
        entries: &[(usize, Bytes, String, String, Option<String>)],
        ttl: Duration,
        stale: Duration,
    ) -> Result<usize, FleetError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let stale_ms = stale.as_millis() as u64;
        let mut p = redis::pipe();
        for (i, body, gens, carried, token) in entries {
            let s = &q.spots[*i];
            let (fleet_gen, gens) = gens.split_once(':').unwrap_or(("0", gens.as_str()));
            let index = self.keys.item_index(&s.tag);
            let mut keys: Vec<&str> = vec![&s.lock, &index];
            keys.extend(s.gens.iter().map(String::as_str));
            p.add_command(evalsha(&ITEM_STORE_SCRIPT, &keys))
                .arg(fleet_gen)
                .arg(gens)
                .arg(&q.name)
                .arg(body.as_ref())
                .arg(ttl_ms)
                .arg(stale_ms)
                .arg(token.as_deref().unwrap_or(""))
                .arg(self.cap)
                .arg(self.keys.item_prefix(&s.tag))
                .arg(carried);
        }
        if let Some(c) = &q.carried {
            p.add_command(evalsha(&GEN_TOUCH_SCRIPT, &[c]))
                .arg(ttl_ms + stale_ms)
                .ignore();
        }
        let stored: Vec<i64> = self
            .redis
            .run_long(Op::L2Put, |mut c| async move {
                let r = query_pipe(&mut c, &p, &[&ITEM_STORE_SCRIPT, &GEN_TOUCH_SCRIPT]).await;
                r
            })
            .await?;
        Ok(stored.iter().filter(|s| **s == 1).count())
    }

    /// Releases our locks of the items at `which` (their fetch failed), in the
    /// background.
    pub fn unlock_later(&self, q: &Query, which: Vec<(usize, String)>) {
        if which.is_empty() {
            return;
        }
        let redis = self.redis.clone();
        let locks: Vec<(String, String)> = which
            .into_iter()
            .map(|(i, token)| (q.spots[i].lock.clone(), token))
            .collect();
        tokio::spawn(async move {
            let _ = redis
                .run_long(Op::Lock, |mut c| async move {
                    let mut p = redis::pipe();
                    for (lock, token) in &locks {
                        p.add_command(evalsha(&UNLOCK_SCRIPT, &[lock]))
                            .arg(token)
                            .ignore();
                    }
                    let r: redis::RedisResult<()> = query_pipe(&mut c, &p, &[&UNLOCK_SCRIPT]).await;
                    r
                })
                .await;
        });
    }
}

/// Runs `pipe`; loads `scripts` and runs it once more if Redis lost its scripts
/// (`SCRIPT FLUSH`; they are loaded on every new connection).
async fn query_pipe<T: redis::FromRedisValue>(
    c: &mut super::conn::Conn,
    pipe: &redis::Pipeline,
    scripts: &[&redis::Script],
) -> redis::RedisResult<T> {
    match pipe.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            for s in scripts {
                s.load_async(c).await?;
            }
            pipe.query_async(c).await
        }
        r => r,
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_parse() {
        let v = b"2000 3000 1000 -\n{\"To_Account\":\"a\"}";
        let e = L2Item::decode(v).unwrap();
        assert_eq!(
            (
                e.fresh_until_ms,
                e.stale_until_ms,
                e.stored_ms,
                e.carried.as_str()
            ),
            (2000, 3000, 1000, "-")
        );
        assert_eq!(&e.body[..], b"{\"To_Account\":\"a\"}");
        assert_eq!(
            L2Item::decode(b"2000 3000 1000 17\nx").unwrap().carried,
            "17"
        );
        assert_eq!(L2Item::decode(b"2000 3000 1000\nx"), None);
        assert_eq!(L2Item::decode(b"garbage"), None);
        let (stored, fresh, stale) = e.instants(1500);
        let now = Instant::now();
        assert!(stored < now && fresh > now && stale > fresh);
    }

    #[test]
    fn rows_in_l2_have_their_entities_in_one_slot() {
        for r in crate::chat::reads::READS {
            if !in_l2(r) {
                continue;
            }
            // Every entity named by the item is of one side (account or group), so
            // they share the item's slot.
            let first = r.item_deps[0].of_account();
            assert!(
                r.item_deps.iter().all(|k| k.of_account() == first),
                "{}",
                r.command
            );
        }
        let joined = crate::chat::reads::row("group_open_http_svc/get_joined_group_list")
            .unwrap()
            .1;
        assert!(!in_l2(joined));
        let get_list = crate::chat::reads::row(crate::chat::commands::GET_LIST)
            .unwrap()
            .1;
        assert!(!in_l2(get_list));
    }
}
