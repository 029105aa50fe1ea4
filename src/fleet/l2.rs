//! The shared L2 page cache in Redis, its generations, its group index, and the fleet
//! fetch lock.
//!
//! - **Pages.** Each page is a key of its own,
//!   `P:{a:<account>}:p:<fleet gen>.<pages gen>:<gen>:<page>`,
//!   stored with `PX` = TTL + stale window: Redis removes it then, whatever happens to
//!   the account meanwhile, so Redis memory is bounded by the TTL. An account's index
//!   (`:ix`, scored by expiry) holds at most `cache.max_pages_per_account` page keys:
//!   a store drops the expired entries and, past the cap, the oldest page. A store is
//!   O(log cap) in Redis, never a scan of the account.
//! - **Freshness on Redis's clock.** The store script stamps a page with Redis's
//!   `TIME`: `<fresh until> <stale until> <stored>` (ms), a newline, Chat's bytes. A
//!   lookup answers with Redis's time too, and the gateway turns the stamps into its
//!   own monotonic instants relative to that: the gateways' clocks play no part, and
//!   `age` is the page's true age.
//! - **Generations.** An account's generation is its own key (`:gen`). Invalidating
//!   the account raises it to `max(Redis ms, gen + 1)` (O(1), keeping its expiry): the
//!   old pages are no longer addressed and expire on their own. A lookup that finds
//!   no generation creates one (Redis ms), so a generation, once read, is never read
//!   again after the key was lost (expired or evicted): a fetch that began before an
//!   invalidation can never store. "Invalidate everything" raises the fleet-wide
//!   generation ([`super::heartbeat`]); "every conversation list" raises the
//!   conversation pages' generation ([`bump_pages`]). A fetch stores under the two
//!   fleet-wide generations its first lookup read with ([`FetchPlan::gens`]).
//! - **Lock.** A miss that finds no fresh page takes `P:{a:<account>}:lk:<page>` with
//!   `SET NX PX` and a token (in the same script as the lookup: one round trip); the
//!   store releases it by compare-and-delete; a gateway that dies mid-fetch frees it
//!   when `PX` runs out. Other gateways poll for the page (5 ms, doubling to 50 ms) for
//!   at most half of `chat.request_timeout_ms` (and within their request's Redis
//!   budget), then fetch themselves; whoever fetches stores only if the account's
//!   generation did not move meanwhile.
//! - **Groups.** Before a page that lists groups is stored, its account is added to
//!   each group's index (`P:{g:<GroupId>}:ix`, scored by Redis ms), and the fleet's
//!   registry notes until when each index lives (`P:{fleet}:groups`) and answers
//!   whether one of the groups had an event since the fetch began (`P:{fleet}:gev`):
//!   then the page is not stored. A group event ([`group_event`]) records its time,
//!   then takes the index in chunks of [`GROUP_CHUNK`] accounts indexed before it:
//!   bumps them, and only then removes them, so a failure leaves the rest for the
//!   retry, and no Redis command of the event handles more than one chunk. An index
//!   that the registry says should exist but is gone was evicted: that is a loss, and
//!   the fleet-wide generation is raised.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::counter;

use super::conn::{Conn, FleetError, Op, Redis};
use super::heartbeat::LUA_CLOCK;
use super::keys::{page_name, Keys};
use super::Shared;
use crate::cache::key::PageKey;
use crate::cache::store::Page;
use crate::metrics::names;

/// Accounts of a group handled per step of a group event (one pipeline of bumps,
/// then one script removing them and reading the next ones).
pub const GROUP_CHUNK: usize = 200;
/// Accounts bumped per pipeline for an "accounts" event.
pub const BUMP_CHUNK: usize = 500;
/// How long a group's last event is remembered for stores that began before it: far
/// longer than any fetch (`chat.request_timeout_ms` + 1 s at most holds the lock).
pub const EVENT_MEMORY: Duration = Duration::from_secs(300);

/// Looks a page up and, when none is fresh and asked to, takes the fetch lock.
///
/// `KEYS[1]`: the account's generation, `KEYS[2]`: the lock. ARGV: fleet gen, page,
/// token, lock PX (ms), take the lock ("1"/"0"), page key prefix.
/// Returns {gen, value or nil, 0 (no lock asked or needed) | 1 (ours) | 2 (theirs),
/// Redis now (ms)}.
const LOOKUP: &str = r#"
local now = now_ms()
local g = redis.call('GET', KEYS[1])
if not g then
  g = fmt(now)
  redis.call('SET', KEYS[1], g, 'PX', ARGV[4])
end
local v = redis.call('GET', ARGV[6] .. ARGV[1] .. ':' .. g .. ':' .. ARGV[2])
if v then
  local fu = tonumber(string.match(v, '^(%d+)'))
  if fu and fu > now then return {g, v, 0, fmt(now)} end
end
if ARGV[5] ~= '1' then return {g, v, 0, fmt(now)} end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return {g, v, 1, fmt(now)} end
return {g, v, 2, fmt(now)}
"#;

/// Stores a page if the account's generation is still the one the fetch began with,
/// keeps the account's index within the cap, and releases the lock if it is ours.
///
/// `KEYS[1]`: the generation, `KEYS[2]`: the lock, `KEYS[3]`: the index. ARGV: fleet
/// gen, expected gen, page, body, TTL (ms), stale window (ms), token ('' for none), cap,
/// page key prefix. Returns 1 if stored.
const STORE: &str = r#"
local now = now_ms()
local stored = 0
local g = redis.call('GET', KEYS[1])
if g and g == ARGV[2] then
  local key = ARGV[9] .. ARGV[1] .. ':' .. g .. ':' .. ARGV[3]
  local ttl = tonumber(ARGV[5])
  local life = ttl + tonumber(ARGV[6])
  local head = fmt(now + ttl) .. ' ' .. fmt(now + life) .. ' ' .. fmt(now) .. '\n'
  redis.call('SET', key, head .. ARGV[4], 'PX', life)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('ZADD', KEYS[3], now + life, key)
  local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[8])
  if over > 0 then
    local popped = redis.call('ZPOPMIN', KEYS[3], over)
    for i = 1, #popped, 2 do redis.call('DEL', popped[i]) end
  end
  if redis.call('PTTL', KEYS[3]) < life then redis.call('PEXPIRE', KEYS[3], life) end
  if redis.call('PTTL', KEYS[1]) < life then redis.call('PEXPIRE', KEYS[1], life) end
  stored = 1
end
if ARGV[7] ~= '' and redis.call('GET', KEYS[2]) == ARGV[7] then redis.call('DEL', KEYS[2]) end
return stored
"#;

/// Releases a lock if it is still ours. `KEYS[1]`: the lock. ARGV: token.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Invalidates an account: raises its generation, keeping the key's expiry (an
/// invalidation never keeps anything in Redis longer). No generation, no pages: nothing
/// to do. `KEYS[1]`: the generation.
const BUMP: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then return 0 end
local n = now_ms()
if tonumber(g) + 1 > n then n = tonumber(g) + 1 end
redis.call('SET', KEYS[1], fmt(n), 'KEEPTTL')
return 1
"#;

/// Adds an account to a group's index. `KEYS[1]`: the index. ARGV: account, life (ms).
const INDEX: &str = r#"
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZADD', KEYS[1], 'inf', '~')
local life = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < life then redis.call('PEXPIRE', KEYS[1], life) end
return 1
"#;

/// After indexing a page's groups: notes until when their indexes live, and returns
/// the latest event of any of them (0 if none).
///
/// `KEYS[1]`: the registry, `KEYS[2]`: the group events. ARGV: life (ms), event memory
/// (ms), then the GroupIds. Removes at most 16 expired entries of each.
const GROUP_CHECK: &str = r#"
local now = now_ms()
local until_ms = now + tonumber(ARGV[1]) - 1000
local last = 0
for i = 3, #ARGV do
  local cur = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]) or '0')
  if until_ms > cur then redis.call('ZADD', KEYS[1], until_ms, ARGV[i]) end
  local e = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or '0')
  if e > last then last = e end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)
for _, m in ipairs(old) do redis.call('ZREM', KEYS[1], m) end
old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 16)
for _, m in ipairs(old) do redis.call('ZREM', KEYS[2], m) end
return fmt(last)
"#;

/// Records a group event. `KEYS[1]`: the registry, `KEYS[2]`: the group events.
/// ARGV: GroupId, event memory (ms). Returns {now, until when the registry says the
/// group's index lives (0: not known)}.
const GROUP_EVENT: &str = r#"
local now = now_ms()
local e = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
if now > e then redis.call('ZADD', KEYS[2], now, ARGV[1]) end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 16)
for _, m in ipairs(old) do redis.call('ZREM', KEYS[2], m) end
return {fmt(now), fmt(tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0'))}
"#;

/// One step of a group event: removes the accounts just bumped (if still indexed
/// before the event), and returns whether the index exists and the next accounts
/// indexed before the event.
///
/// `KEYS[1]`: the index. ARGV: the event's time (ms), chunk size, then the accounts
/// bumped. Returns {exists (0/1), accounts...}.
const GROUP_NEXT: &str = r#"
local at = tonumber(ARGV[1])
local done = {}
for i = 3, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= at then done[#done + 1] = ARGV[i] end
end
if #done > 0 then redis.call('ZREM', KEYS[1], unpack(done)) end
local out = {tostring(redis.call('EXISTS', KEYS[1]))}
local next = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', at, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(next) do out[#out + 1] = m end
return out
"#;

/// Raises the fleet-wide generation past its value and `ARGV[1]` (the generation this
/// gateway knows). `KEYS[1]`: it. Returns the new value.
const RAISE: &str = r#"
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = raised(g, tonumber(ARGV[1]), now_ms())
redis.call('SET', KEYS[1], fmt(n))
return fmt(n)
"#;

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{LUA_CLOCK}{body}"))
}

pub(crate) static LOOKUP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(LOOKUP));
pub(crate) static STORE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(STORE));
pub(crate) static UNLOCK_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNLOCK));
pub(crate) static BUMP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(BUMP));
pub(crate) static INDEX_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(INDEX));
pub(crate) static GROUP_CHECK_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| script(GROUP_CHECK));
pub(crate) static GROUP_EVENT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| script(GROUP_EVENT));
pub(crate) static GROUP_NEXT_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(GROUP_NEXT));
pub(crate) static RAISE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(RAISE));

/// First pause between polls for another gateway's page.
const POLL_MIN: Duration = Duration::from_millis(5);
/// Longest pause between polls.
const POLL_MAX: Duration = Duration::from_millis(50);

/// An `EVALSHA` of `s` for a pipeline (the scripts are loaded on every connection).
pub(crate) fn evalsha(s: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(s.get_hash()).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

/// Runs `pipe`; loads `s` and runs it once more if Redis lost its scripts (`SCRIPT
/// FLUSH`).
pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
    c: &mut Conn,
    pipe: &redis::Pipeline,
    s: &redis::Script,
) -> redis::RedisResult<T> {
    match pipe.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            s.load_async(c).await?;
            pipe.query_async(c).await
        }
        r => r,
    }
}

/// A page as L2 holds it, stamped with Redis's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Page {
    /// Chat's answer, byte for byte.
    pub body: Bytes,
    /// When it was stored (Redis ms).
    pub stored_ms: u64,
    /// Fresh until (Redis ms).
    pub fresh_until_ms: u64,
    /// Servable when Chat fails until (Redis ms).
    pub stale_until_ms: u64,
}

impl L2Page {
    /// The in-memory form, for `key`, given Redis's time `now_ms` (read with the page):
    /// the stamps become instants of this process's monotonic clock.
    pub fn to_page(&self, key: PageKey, now_ms: u64) -> Page {
        let now_i = Instant::now();
        let at = |ms: u64| -> Instant {
            if ms >= now_ms {
                now_i + Duration::from_millis(ms - now_ms)
            } else {
                now_i
                    .checked_sub(Duration::from_millis(now_ms - ms))
                    .unwrap_or(now_i)
            }
        };
        Page {
            key,
            body: self.body.clone(),
            stored_at: at(self.stored_ms),
            fresh_until: at(self.fresh_until_ms),
            stale_until: at(self.stale_until_ms),
            groups: crate::cache::groups::group_keys(&self.body),
        }
    }

    /// Whether it is fresh at Redis time `now_ms`.
    pub fn fresh_at(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// Whether it may be served when Chat fails at Redis time `now_ms`.
    pub fn stale_servable_at(&self, now_ms: u64) -> bool {
        now_ms < self.stale_until_ms
    }

    /// Parses stored bytes.
    pub fn decode(v: &[u8]) -> Option<L2Page> {
        let nl = v.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&v[..nl]).ok()?;
        let mut nums = head.split(' ').map(|n| n.parse::<u64>().ok());
        let (fresh, stale, stored) = (nums.next()??, nums.next()??, nums.next()??);
        Some(L2Page {
            body: Bytes::copy_from_slice(&v[nl + 1..]),
            stored_ms: stored,
            fresh_until_ms: fresh,
            stale_until_ms: stale,
        })
    }
}

/// Who fetches a page L2 does not have fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// Not asked for (or not needed: the page was fresh).
    None,
    /// Ours, with this token.
    Mine(String),
    /// Another gateway's.
    Theirs,
}

/// The fleet-wide generations in a page's name: the fleet's (everything) and the
/// conversation pages' (every conversation list).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageGens {
    /// [`Shared::fleet_gen`].
    pub fleet: u64,
    /// [`Shared::pages_gen`].
    pub pages: u64,
}

impl PageGens {
    /// The generations this gateway knows now.
    pub fn known(shared: &Shared) -> PageGens {
        PageGens {
            fleet: shared.fleet_gen.load(Ordering::Acquire),
            pages: shared.pages_gen.load(Ordering::Acquire),
        }
    }

    /// As they appear in a page's key.
    fn name(self) -> String {
        format!("{}.{}", self.fleet, self.pages)
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The account's generation (store with it).
    pub gen: u64,
    /// The fleet-wide generations the lookup read with (store with them).
    pub gens: PageGens,
    /// The page, fresh or not.
    pub page: Option<L2Page>,
    /// The fetch lock.
    pub lock: Lock,
    /// Redis's time at the lookup (ms).
    pub now_ms: u64,
}

/// What a miss should do after asking L2.
#[derive(Debug)]
pub enum MissPlan {
    /// Serve this fresh page (from L2, possibly stored by another gateway just now);
    /// `now_ms` is Redis's time when it was read.
    Serve(L2Page, u64),
    /// Fetch from Chat, then store with `gen` (and release the lock if `token`).
    Fetch(FetchPlan),
    /// L2 is unusable for this account now (Redis down, or an invalidation of it not
    /// yet confirmed): go to Chat and store nothing in L2.
    Bypass,
}

/// How to store what a fetch brings.
#[derive(Debug, Clone)]
pub struct FetchPlan {
    /// The generation to store with.
    pub gen: u64,
    /// The fleet-wide generations to store with: those known when the fetch began,
    /// so that a page fetched before "every conversation list" (or "everything") is
    /// stored where no gateway that applied it looks.
    pub gens: PageGens,
    /// Our lock's token, if we hold the lock.
    pub token: Option<String>,
    /// A page past its TTL but within the stale window, and Redis's time then.
    pub stale: Option<(L2Page, u64)>,
    /// Redis's time when the fetch began (ms): a group event since then means the
    /// page is not stored.
    pub since_ms: u64,
}

/// The L2 cache.
pub struct L2 {
    redis: Arc<Redis>,
    keys: Keys,
    shared: Arc<Shared>,
    /// Lock expiry: `chat.request_timeout_ms` + 1 s.
    lock_px: Duration,
    /// How long a miss waits for another gateway's fetch.
    lock_wait: Duration,
    /// Pages per account, at most (`cache.max_pages_per_account`).
    max_pages: usize,
    id: String,
    seq: AtomicU64,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("lock_px", &self.lock_px)
            .field("lock_wait", &self.lock_wait)
            .field("max_pages", &self.max_pages)
            .finish_non_exhaustive()
    }
}

impl L2 {
    /// An L2 on `redis`; `request_timeout` sizes the lock and the wait for it;
    /// `max_pages` is the cap of pages per account.
    pub fn new(
        redis: Arc<Redis>,
        keys: Keys,
        shared: Arc<Shared>,
        id: String,
        request_timeout: Duration,
        max_pages: usize,
    ) -> L2 {
        L2 {
            redis,
            keys,
            shared,
            lock_px: request_timeout + Duration::from_secs(1),
            lock_wait: request_timeout / 2,
            max_pages: max_pages.max(1),
            id,
            seq: AtomicU64::new(0),
        }
    }

    /// How long a miss waits for another gateway's fetch.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// Looks `key` of `account` up; with `lock`, takes the fetch lock when no fresh
    /// page is there.
    pub async fn lookup(
        &self,
        account: &str,
        key: &PageKey,
        lock: bool,
    ) -> Result<Found, FleetError> {
        let page = page_name(key);
        let gen_key = self.keys.account_gen(account);
        let lock_key = self.keys.lock(account, &page);
        let prefix = self.keys.page_prefix(account);
        let gens = PageGens::known(&self.shared);
        let gens_name = gens.name();
        let token = format!("{}:{}", self.id, self.seq.fetch_add(1, Ordering::Relaxed));
        let px = self.lock_px.as_millis() as u64;
        let op = if lock { Op::Lock } else { Op::L2Get };
        let tok = token.clone();
        let (gen, value, state, now): (String, Option<Vec<u8>>, i64, String) = self
            .redis
            .run(op, |mut c| async move {
                let r = LOOKUP_SCRIPT
                    .key(gen_key)
                    .key(lock_key)
                    .arg(gens_name)
                    .arg(page)
                    .arg(tok)
                    .arg(px)
                    .arg(if lock { "1" } else { "0" })
                    .arg(prefix)
                    .invoke_async(&mut c)
                    .await;
                r
            })
            .await?;
        Ok(Found {
            gen: gen.parse().unwrap_or(0),
            gens,
            page: value.as_deref().and_then(L2Page::decode),
            lock: match state {
                1 => Lock::Mine(token),
                2 => Lock::Theirs,
                _ => Lock::None,
            },
            now_ms: now.parse().unwrap_or(0),
        })
    }

    /// What a miss of `key` should do: serve a fresh L2 page, wait for another
    /// gateway's fetch (bounded by the lock wait and the request's Redis budget), or
    /// fetch (with the lock when it could be had).
    pub async fn plan_miss(&self, account: &str, key: &PageKey) -> MissPlan {
        if self.shared.pending.blocks(account) {
            return MissPlan::Bypass;
        }
        let deadline = Instant::now() + self.lock_wait;
        let mut pause = POLL_MIN;
        let mut waited = false;
        let mut stale: Option<(L2Page, u64)> = None;
        let mut last: Option<(u64, PageGens, u64)> = None;
        loop {
            let found = match self.lookup(account, key, true).await {
                Ok(f) => f,
                Err(_) => {
                    // Redis failed, or the request spent its Redis time (while waiting
                    // for another gateway): fetch without it, and store with the
                    // generation seen, if any.
                    counter!(names::L2_REQUESTS, "result" => "error").increment(1);
                    return match last {
                        Some((gen, gens, since_ms)) => {
                            counter!(names::FLEET_COALESCED, "outcome" => "timeout").increment(1);
                            MissPlan::Fetch(FetchPlan {
                                gen,
                                gens,
                                token: None,
                                stale,
                                since_ms,
                            })
                        }
                        None => MissPlan::Bypass,
                    };
                }
            };
            let now_ms = found.now_ms;
            match found.page {
                Some(p) if p.fresh_at(now_ms) => {
                    counter!(names::L2_REQUESTS, "result" => "hit").increment(1);
                    if waited {
                        counter!(names::FLEET_COALESCED, "outcome" => "served").increment(1);
                    }
                    return MissPlan::Serve(p, now_ms);
                }
                Some(p) if p.stale_servable_at(now_ms) => stale = Some((p, now_ms)),
                _ => {}
            }
            if !waited {
                counter!(names::L2_REQUESTS, "result" => "miss").increment(1);
            }
            // The fetch begins now, as far as group events are concerned (the first
            // lookup's time: a page fetched after a wait is still no newer than that).
            let since_ms = last.map_or(now_ms, |(_, _, s)| s);
            // Likewise the generations: those of the first lookup.
            let gens = last.map_or(found.gens, |(_, g, _)| g);
            match found.lock {
                Lock::Mine(token) => {
                    return MissPlan::Fetch(FetchPlan {
                        gen: found.gen,
                        gens,
                        token: Some(token),
                        stale,
                        since_ms,
                    });
                }
                Lock::None | Lock::Theirs if Instant::now() + pause >= deadline => {
                    counter!(names::FLEET_COALESCED, "outcome" => "timeout").increment(1);
                    return MissPlan::Fetch(FetchPlan {
                        gen: found.gen,
                        gens,
                        token: None,
                        stale,
                        since_ms,
                    });
                }
                Lock::None | Lock::Theirs => {
                    last = Some((found.gen, gens, since_ms));
                    waited = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
            }
        }
    }

    /// Stores `body` as page `key` of `account` if its generation is still
    /// `plan.gen` and no group it lists had an event since `plan.since_ms`; keeps it
    /// for `ttl` + `stale`; releases the lock `plan.token`. Returns whether it was
    /// stored.
    pub async fn store(
        &self,
        account: &str,
        body: &Bytes,
        key: &PageKey,
        plan: &FetchPlan,
        ttl: Duration,
        stale: Duration,
    ) -> Result<bool, FleetError> {
        let name = page_name(key);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let stale_ms = stale.as_millis() as u64;
        let life_ms = ttl_ms + stale_ms;
        let token = plan.token.clone().unwrap_or_default();
        let groups = crate::cache::groups::group_ids(body);
        if !groups.is_empty() {
            // Indexed before the page is stored, so a group event never misses it;
            // and not stored if one of its groups had an event since the fetch began.
            let registry = self.keys.group_registry();
            let events = self.keys.group_events();
            let sets: Vec<String> = groups.iter().map(|g| self.keys.group(g)).collect();
            let account_arg = account.to_string();
            let memory_ms = EVENT_MEMORY.as_millis() as u64;
            let last_event: String = self
                .redis
                .run_long(Op::L2Put, |mut c| async move {
                    let mut p = redis::pipe();
                    for set in &sets {
                        p.add_command(evalsha(&INDEX_SCRIPT, &[set]))
                            .arg(&account_arg)
                            .arg(life_ms)
                            .ignore();
                    }
                    p.add_command(evalsha(&GROUP_CHECK_SCRIPT, &[&registry, &events]))
                        .arg(life_ms)
                        .arg(memory_ms);
                    for g in &groups {
                        p.arg(g);
                    }
                    let r: redis::RedisResult<(String,)> =
                        query_pipe(&mut c, &p, &GROUP_CHECK_SCRIPT).await;
                    r.map(|(v,)| v)
                })
                .await
                .inspect_err(|_| {
                    if let Some(t) = &plan.token {
                        self.unlock_later(account, key, t);
                    }
                })?;
            if last_event.parse::<u64>().unwrap_or(0) >= plan.since_ms {
                if let Some(t) = &plan.token {
                    self.unlock_later(account, key, t);
                }
                return Ok(false);
            }
        }
        let gen_key = self.keys.account_gen(account);
        let lock_key = self.keys.lock(account, &name);
        let index = self.keys.page_index(account);
        let prefix = self.keys.page_prefix(account);
        let gens_name = plan.gens.name();
        let gen = plan.gen;
        let max_pages = self.max_pages;
        let body = body.clone();
        let stored: i64 = self
            .redis
            .run_long(Op::L2Put, |mut c| async move {
                let r = STORE_SCRIPT
                    .key(gen_key)
                    .key(lock_key)
                    .key(index)
                    .arg(gens_name)
                    .arg(gen)
                    .arg(name)
                    .arg(body.as_ref())
                    .arg(ttl_ms)
                    .arg(stale_ms)
                    .arg(token)
                    .arg(max_pages)
                    .arg(prefix)
                    .invoke_async(&mut c)
                    .await;
                r
            })
            .await?;
        Ok(stored == 1)
    }

    /// Releases our lock on `key` of `account` (the fetch failed).
    pub async fn unlock(&self, account: &str, key: &PageKey, token: &str) {
        let lock_key = self.keys.lock(account, &page_name(key));
        let token = token.to_string();
        let _ = self
            .redis
            .run_long(Op::Lock, |mut c| async move {
                let r = UNLOCK_SCRIPT
                    .key(lock_key)
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await;
                r
            })
            .await;
    }

    /// Releases our lock in the background (without the request's budget).
    fn unlock_later(&self, account: &str, key: &PageKey, token: &str) {
        let redis = self.redis.clone();
        let lock_key = self.keys.lock(account, &page_name(key));
        let token = token.to_string();
        tokio::spawn(async move {
            let _ = redis
                .run_long(Op::Lock, |mut c| async move {
                    let r = UNLOCK_SCRIPT
                        .key(lock_key)
                        .arg(token)
                        .invoke_async::<i64>(&mut c)
                        .await;
                    r
                })
                .await;
        });
    }
}

/// Invalidates `accounts` in L2 (raises their generations), [`BUMP_CHUNK`] per
/// pipeline.
pub async fn bump_accounts(
    redis: &Redis,
    keys: &Keys,
    accounts: &[String],
) -> Result<(), FleetError> {
    for chunk in accounts.chunks(BUMP_CHUNK) {
        let gens: Vec<String> = chunk.iter().map(|a| keys.account_gen(a)).collect();
        redis
            .run_long(Op::Generation, |mut c| async move {
                let mut p = redis::pipe();
                for g in &gens {
                    p.add_command(evalsha(&BUMP_SCRIPT, &[g])).ignore();
                }
                let r: redis::RedisResult<()> = query_pipe(&mut c, &p, &BUMP_SCRIPT).await;
                r
            })
            .await?;
    }
    Ok(())
}

/// Invalidates `entities` in L2 (raises their generations), [`BUMP_CHUNK`] per
/// pipeline. Each is one key in its own account's or group's slot; a generation
/// that does not exist has nothing depending on it.
pub async fn bump_entities(
    redis: &Redis,
    keys: &Keys,
    entities: &[crate::chat::effects::Entity],
) -> Result<(), FleetError> {
    for chunk in entities.chunks(BUMP_CHUNK) {
        let gens: Vec<String> = chunk
            .iter()
            .map(|e| keys.entity_gen(e.kind, &e.id))
            .collect();
        redis
            .run_long(Op::Generation, |mut c| async move {
                let mut p = redis::pipe();
                for g in &gens {
                    p.add_command(evalsha(&BUMP_SCRIPT, &[g])).ignore();
                }
                let r: redis::RedisResult<()> = query_pipe(&mut c, &p, &BUMP_SCRIPT).await;
                r
            })
            .await?;
    }
    Ok(())
}

/// What a group event did in L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupDone {
    /// Accounts bumped.
    pub accounts: usize,
    /// The group's index was gone before its time (evicted): the fleet-wide
    /// generation was raised to this.
    pub raised: Option<u64>,
}

/// Applies a group event to L2: bumps every account whose pages list `group`, in
/// chunks, removing each chunk from the index only once it is bumped. Fails (to be
/// retried) if any step fails; what was done stays done.
pub async fn group_event(
    redis: &Redis,
    keys: &Keys,
    shared: &Shared,
    group: &str,
) -> Result<GroupDone, FleetError> {
    let registry = keys.group_registry();
    let events = keys.group_events();
    let g = group.to_string();
    let memory_ms = EVENT_MEMORY.as_millis() as u64;
    let (at, alive_until): (String, String) = redis
        .run_long(Op::Generation, |mut c| async move {
            let r = GROUP_EVENT_SCRIPT
                .key(registry)
                .key(events)
                .arg(g)
                .arg(memory_ms)
                .invoke_async(&mut c)
                .await;
            r
        })
        .await?;
    let at: u64 = at.parse().unwrap_or(0);
    let alive_until: u64 = alive_until.parse().unwrap_or(0);
    let set = keys.group(group);
    let mut done = GroupDone::default();
    let mut bumped: Vec<String> = Vec::new();
    let mut first = true;
    loop {
        let set_k = set.clone();
        let prev = std::mem::take(&mut bumped);
        let reply: Vec<String> = redis
            .run_long(Op::Generation, |mut c| async move {
                let r = GROUP_NEXT_SCRIPT
                    .key(set_k)
                    .arg(at)
                    .arg(GROUP_CHUNK)
                    .arg(&prev)
                    .invoke_async(&mut c)
                    .await;
                r
            })
            .await?;
        let mut it = reply.into_iter();
        let exists = it.next().is_some_and(|e| e == "1");
        let next: Vec<String> = it.collect();
        if first && !exists && alive_until > at {
            // The registry says the index should be there: it was evicted (or
            // deleted), and with it the accounts to invalidate. Nothing in L2 can be
            // proven fresh: raise the fleet-wide generation.
            let gen = bump_fleet(redis, keys, shared).await?;
            super::heartbeat::Flush::Evicted.record(gen);
            tracing::warn!(
                group,
                "a group's index was gone from Redis before its time (evicted?)"
            );
            done.raised = Some(gen);
        }
        first = false;
        if next.is_empty() {
            return Ok(done);
        }
        bump_accounts(redis, keys, &next).await?;
        done.accounts += next.len();
        bumped = next;
    }
}

/// Raises the conversation pages' generation past every value this gateway has seen
/// (every L2 page is then unreachable; the items stay); returns the new value (and
/// learns it).
pub async fn bump_pages(redis: &Redis, keys: &Keys, shared: &Shared) -> Result<u64, FleetError> {
    raise(redis, keys.pages_gen(), &shared.pages_gen).await
}

/// Raises the fleet-wide generation past every value this gateway has seen; returns
/// the new value (and learns it).
pub async fn bump_fleet(redis: &Redis, keys: &Keys, shared: &Shared) -> Result<u64, FleetError> {
    raise(redis, keys.fleet_gen(), &shared.fleet_gen).await
}

/// Raises the fleet-wide generation at `key` past its value, Redis's clock and
/// `known` (the highest value this gateway has seen), and learns the new value.
async fn raise(redis: &Redis, key: String, known: &AtomicU64) -> Result<u64, FleetError> {
    let seen = known.load(Ordering::Acquire);
    let v: String = redis
        .run_long(Op::Generation, |mut c| async move {
            let r = RAISE_SCRIPT.key(key).arg(seen).invoke_async(&mut c).await;
            r
        })
        .await?;
    let g = v.parse().unwrap_or(0);
    known.fetch_max(g, Ordering::AcqRel);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_parse() {
        let v = b"2000 3000 1000\n{\"ErrorCode\":0}\n";
        let p = L2Page::decode(v).unwrap();
        assert_eq!(
            (p.fresh_until_ms, p.stale_until_ms, p.stored_ms),
            (2000, 3000, 1000)
        );
        assert_eq!(&p.body[..], b"{\"ErrorCode\":0}\n");
        assert!(p.fresh_at(1999) && !p.fresh_at(2000));
        assert!(p.stale_servable_at(2999) && !p.stale_servable_at(3000));
        assert_eq!(L2Page::decode(b"garbage"), None);
        // Times relative to Redis's clock become instants relative to now.
        let page = p.to_page(PageKey::default(), 1500);
        assert!(page.stored_at < Instant::now());
        assert!(page.fresh_until > Instant::now() + Duration::from_millis(400));
    }
}
