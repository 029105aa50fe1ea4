//! The shared L2 page cache in Redis, its generations, and the fleet fetch lock.
//!
//! - **Pages.** An account's pages live in one hash, `P:{a:<account>}`, beside its
//!   generation `gen`; a page's field is `p:<fleet gen>:<gen>:<page>`. Invalidating an
//!   account is one `HINCRBY gen` (O(1)): the old pages are no longer addressed, and
//!   the next store prunes them. "Invalidate everything" is one `INCR` of the
//!   fleet-wide generation ([`super::keys`]). The hash expires with its last page, so
//!   a generation can only reset when no page is left to revive.
//! - **Values** are Chat's bytes after a short header: `<fresh_until_ms>
//!   <stale_until_ms> <stored_ms>\n<GroupIds as JSON>\n<body>` (wall-clock Unix ms, so
//!   gateways' clocks should agree within a second; NTP does that). A page stays in
//!   Redis for the TTL plus the stale window, so stale-if-error works from L2 too.
//! - **Lock.** A miss that finds no fresh page takes `P:{a:<account>}:lk:<page>` with
//!   `SET NX PX` and a token (in the same script as the lookup: one round trip); the
//!   store releases it by compare-and-delete; a gateway that dies mid-fetch frees it
//!   when `PX` runs out. Other gateways poll for the page (5 ms, doubling to 50 ms) for
//!   at most half of `chat.request_timeout_ms`, then fetch themselves; whoever
//!   fetches stores only if the account's generation did not move meanwhile.
//! - **Groups.** Each stored page adds its account to `P:{g:<GroupId>}` for every group
//!   it lists (before the page is stored, so a group event never misses it); a group
//!   event takes the set and bumps those accounts' generations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metrics::counter;

use super::conn::{FleetError, Op, Redis};
use super::keys::{page_name, Keys};
use super::Shared;
use crate::cache::key::PageKey;
use crate::cache::store::Page;
use crate::metrics::names;

/// Looks a page up and, when none is fresh and asked to, takes the fetch lock.
///
/// `KEYS[1]`: the account hash, `KEYS[2]`: the lock. ARGV: fleet gen, page, now (ms),
/// token, lock PX (ms), take the lock ("1"/"0").
/// Returns {gen, value or nil, 0 (no lock asked or needed) | 1 (ours) | 2 (theirs)}.
const LOOKUP: &str = r#"
local g = redis.call('HGET', KEYS[1], 'gen') or '0'
local v = redis.call('HGET', KEYS[1], 'p:' .. ARGV[1] .. ':' .. g .. ':' .. ARGV[2])
if v then
  local fu = tonumber(string.match(v, '^(%d+)'))
  if fu and fu > tonumber(ARGV[3]) then return {g, v, 0} end
end
if ARGV[6] ~= '1' then return {g, v, 0} end
if redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', ARGV[5]) then return {g, v, 1} end
return {g, v, 2}
"#;

/// Stores a page if the account's generation is still the one the fetch began with,
/// prunes pages of other generations, and releases the lock if it is ours.
///
/// `KEYS[1]`: the account hash, `KEYS[2]`: the lock. ARGV: fleet gen, expected gen, page,
/// value, TTL (ms), token ('' for none). Returns 1 if stored.
const STORE: &str = r#"
local g = redis.call('HGET', KEYS[1], 'gen') or '0'
local stored = 0
if g == ARGV[2] then
  local prefix = 'p:' .. ARGV[1] .. ':' .. g .. ':'
  local fields = redis.call('HKEYS', KEYS[1])
  for _, f in ipairs(fields) do
    if f ~= 'gen' and string.sub(f, 1, #prefix) ~= prefix then redis.call('HDEL', KEYS[1], f) end
  end
  redis.call('HSET', KEYS[1], prefix .. ARGV[3], ARGV[4])
  local ttl = tonumber(ARGV[5])
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  stored = 1
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[2]) == ARGV[6] then redis.call('DEL', KEYS[2]) end
return stored
"#;

/// Releases a lock if it is still ours. `KEYS[1]`: the lock. ARGV: token.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Bumps an account's generation. `KEYS[1]`: the account hash. ARGV: TTL (ms).
const BUMP: &str = r#"
local g = redis.call('HINCRBY', KEYS[1], 'gen', 1)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return g
"#;

/// Adds an account to a group's set. `KEYS[1]`: the set. ARGV: account, TTL (ms).
const INDEX: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#;

/// Takes (reads and deletes) a group's set. `KEYS[1]`: the set.
const TAKE: &str = r#"
local m = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return m
"#;

/// Raises the fleet-wide generation. `KEYS[1]`: it. Returns the new value.
const BUMP_ALL: &str = r#"
return redis.call('INCR', KEYS[1])
"#;

pub(crate) static LOOKUP_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(LOOKUP));
pub(crate) static STORE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(STORE));
pub(crate) static UNLOCK_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(UNLOCK));
pub(crate) static BUMP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BUMP));
pub(crate) static INDEX_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(INDEX));
pub(crate) static TAKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TAKE));
pub(crate) static BUMP_ALL_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(BUMP_ALL));

/// First pause between polls for another gateway's page.
const POLL_MIN: Duration = Duration::from_millis(5);
/// Longest pause between polls.
const POLL_MAX: Duration = Duration::from_millis(50);

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A page as L2 holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Page {
    /// Chat's answer, byte for byte.
    pub body: Bytes,
    /// When it was stored (Unix ms).
    pub stored_ms: u64,
    /// Fresh until (Unix ms).
    pub fresh_until_ms: u64,
    /// Servable when Chat fails until (Unix ms).
    pub stale_until_ms: u64,
    /// GroupIds the page lists.
    pub groups: Vec<String>,
}

impl L2Page {
    /// The L2 form of a page held in memory.
    pub fn from_page(p: &Page) -> L2Page {
        let now_i = Instant::now();
        let now_ms = unix_ms();
        let at = |t: Instant| -> u64 {
            if t >= now_i {
                now_ms + (t - now_i).as_millis() as u64
            } else {
                now_ms.saturating_sub((now_i - t).as_millis() as u64)
            }
        };
        L2Page {
            body: p.body.clone(),
            stored_ms: at(p.stored_at),
            fresh_until_ms: at(p.fresh_until),
            stale_until_ms: at(p.stale_until),
            groups: crate::cache::groups::group_ids(&p.body),
        }
    }

    /// The in-memory form, for `key`.
    pub fn to_page(&self, key: PageKey) -> Page {
        let now_i = Instant::now();
        let now_ms = unix_ms();
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

    /// Whether it is fresh at `now_ms`.
    pub fn fresh_at(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// Whether it may be served when Chat fails at `now_ms`.
    pub fn stale_servable_at(&self, now_ms: u64) -> bool {
        now_ms < self.stale_until_ms
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let groups = serde_json::to_string(&self.groups).unwrap_or_else(|_| "[]".into());
        let mut out = format!(
            "{} {} {}\n{}\n",
            self.fresh_until_ms, self.stale_until_ms, self.stored_ms, groups
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// Parses stored bytes.
    pub fn decode(v: &[u8]) -> Option<L2Page> {
        let nl = v.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&v[..nl]).ok()?;
        let mut nums = head.split(' ').map(|n| n.parse::<u64>().ok());
        let (fresh, stale, stored) = (nums.next()??, nums.next()??, nums.next()??);
        let rest = &v[nl + 1..];
        let nl2 = rest.iter().position(|b| *b == b'\n')?;
        let groups: Vec<String> = serde_json::from_slice(&rest[..nl2]).ok()?;
        Some(L2Page {
            body: Bytes::copy_from_slice(&rest[nl2 + 1..]),
            stored_ms: stored,
            fresh_until_ms: fresh,
            stale_until_ms: stale,
            groups,
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

/// What a lookup found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The account's generation (store with it).
    pub gen: u64,
    /// The page, fresh or not.
    pub page: Option<L2Page>,
    /// The fetch lock.
    pub lock: Lock,
}

/// What a miss should do after asking L2.
#[derive(Debug)]
pub enum MissPlan {
    /// Serve this fresh page (from L2, possibly stored by another gateway just now).
    Serve(L2Page),
    /// Fetch from Chat, then store with `gen` (and release the lock if `token`).
    /// `stale` is an L2 page that may be served if Chat fails.
    Fetch {
        /// The generation to store with.
        gen: u64,
        /// Our lock's token, if we hold the lock.
        token: Option<String>,
        /// A page past its TTL but within the stale window.
        stale: Option<L2Page>,
    },
    /// L2 is unusable for this account now (Redis down, or an invalidation of it not
    /// yet confirmed): go to Chat and store nothing in L2.
    Bypass,
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
    id: String,
    seq: AtomicU64,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2")
            .field("lock_px", &self.lock_px)
            .field("lock_wait", &self.lock_wait)
            .finish_non_exhaustive()
    }
}

impl L2 {
    /// An L2 on `redis`; `request_timeout` sizes the lock and the wait for it.
    pub fn new(
        redis: Arc<Redis>,
        keys: Keys,
        shared: Arc<Shared>,
        id: String,
        request_timeout: Duration,
    ) -> L2 {
        L2 {
            redis,
            keys,
            shared,
            lock_px: request_timeout + Duration::from_secs(1),
            lock_wait: request_timeout / 2,
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
        let hash = self.keys.account(account);
        let lock_key = self.keys.lock(account, &page);
        let fleet_gen = self.shared.fleet_gen.load(Ordering::Acquire);
        let token = format!("{}:{}", self.id, self.seq.fetch_add(1, Ordering::Relaxed));
        let px = self.lock_px.as_millis() as u64;
        let now_ms = unix_ms();
        let op = if lock { Op::Lock } else { Op::L2Get };
        let tok = token.clone();
        let (gen, value, state): (String, Option<Vec<u8>>, i64) = self
            .redis
            .run(op, |mut c| async move {
                let r = LOOKUP_SCRIPT
                    .key(hash)
                    .key(lock_key)
                    .arg(fleet_gen)
                    .arg(page)
                    .arg(now_ms)
                    .arg(tok)
                    .arg(px)
                    .arg(if lock { "1" } else { "0" })
                    .invoke_async(&mut c)
                    .await;
                r
            })
            .await?;
        Ok(Found {
            gen: gen.parse().unwrap_or(0),
            page: value.as_deref().and_then(L2Page::decode),
            lock: match state {
                1 => Lock::Mine(token),
                2 => Lock::Theirs,
                _ => Lock::None,
            },
        })
    }

    /// What a miss of `key` should do: serve a fresh L2 page, wait for another
    /// gateway's fetch (bounded), or fetch (with the lock when it could be had).
    pub async fn plan_miss(&self, account: &str, key: &PageKey) -> MissPlan {
        if self.shared.pending.blocks(account) {
            return MissPlan::Bypass;
        }
        let deadline = Instant::now() + self.lock_wait;
        let mut pause = POLL_MIN;
        let mut waited = false;
        let mut stale: Option<L2Page> = None;
        loop {
            let found = match self.lookup(account, key, true).await {
                Ok(f) => f,
                Err(_) => {
                    counter!(names::L2_REQUESTS, "result" => "error").increment(1);
                    return MissPlan::Bypass;
                }
            };
            let now_ms = unix_ms();
            match found.page {
                Some(p) if p.fresh_at(now_ms) => {
                    counter!(names::L2_REQUESTS, "result" => "hit").increment(1);
                    if waited {
                        counter!(names::FLEET_COALESCED, "outcome" => "served").increment(1);
                    }
                    return MissPlan::Serve(p);
                }
                Some(p) if p.stale_servable_at(now_ms) => stale = Some(p),
                _ => {}
            }
            match found.lock {
                Lock::Mine(token) => {
                    if !waited {
                        counter!(names::L2_REQUESTS, "result" => "miss").increment(1);
                    }
                    return MissPlan::Fetch {
                        gen: found.gen,
                        token: Some(token),
                        stale,
                    };
                }
                Lock::None | Lock::Theirs if Instant::now() + pause >= deadline => {
                    if !waited {
                        counter!(names::L2_REQUESTS, "result" => "miss").increment(1);
                    }
                    counter!(names::FLEET_COALESCED, "outcome" => "timeout").increment(1);
                    return MissPlan::Fetch {
                        gen: found.gen,
                        token: None,
                        stale,
                    };
                }
                Lock::None | Lock::Theirs => {
                    if !waited {
                        counter!(names::L2_REQUESTS, "result" => "miss").increment(1);
                    }
                    waited = true;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(POLL_MAX);
                }
            }
        }
    }

    /// Stores `page` for `account` if its generation is still `gen`, keeping it for
    /// `ttl`; releases the lock `token`. Returns whether it was stored.
    pub async fn store(
        &self,
        account: &str,
        page: &L2Page,
        key: &PageKey,
        gen: u64,
        token: Option<&str>,
        ttl: Duration,
    ) -> Result<bool, FleetError> {
        let name = page_name(key);
        let ttl_ms = ttl.as_millis().max(1) as u64;
        // Indexed before the page is visible, so a group event never misses it.
        if !page.groups.is_empty() {
            let calls = page.groups.iter().map(|g| {
                let set = self.keys.group(g);
                let account = account.to_string();
                self.redis.run(Op::L2Put, move |mut c| async move {
                    let r = INDEX_SCRIPT
                        .key(set)
                        .arg(account)
                        .arg(ttl_ms)
                        .invoke_async::<i64>(&mut c)
                        .await;
                    r
                })
            });
            for r in futures_util::future::join_all(calls).await {
                r?;
            }
        }
        let hash = self.keys.account(account);
        let lock_key = self.keys.lock(account, &name);
        let fleet_gen = self.shared.fleet_gen.load(Ordering::Acquire);
        let value = page.encode();
        let token = token.unwrap_or("").to_string();
        let stored: i64 = self
            .redis
            .run(Op::L2Put, |mut c| async move {
                let r = STORE_SCRIPT
                    .key(hash)
                    .key(lock_key)
                    .arg(fleet_gen)
                    .arg(gen)
                    .arg(name)
                    .arg(value)
                    .arg(ttl_ms)
                    .arg(token)
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
            .run(Op::Lock, |mut c| async move {
                let r = UNLOCK_SCRIPT
                    .key(lock_key)
                    .arg(token)
                    .invoke_async::<i64>(&mut c)
                    .await;
                r
            })
            .await;
    }
}

/// Bumps the generations of `accounts` (one script each, sent together), keeping each
/// hash at least `ttl`.
pub async fn bump_accounts(
    redis: &Redis,
    keys: &Keys,
    accounts: &[String],
    ttl: Duration,
) -> Result<(), FleetError> {
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let calls = accounts.iter().map(|a| {
        let hash = keys.account(a);
        redis.run(Op::Generation, move |mut c| async move {
            let r = BUMP_SCRIPT
                .key(hash)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut c)
                .await;
            r
        })
    });
    for r in futures_util::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// Takes the accounts whose L2 pages list `group`.
pub async fn take_group(
    redis: &Redis,
    keys: &Keys,
    group: &str,
) -> Result<Vec<String>, FleetError> {
    let set = keys.group(group);
    redis
        .run(Op::Generation, |mut c| async move {
            let r = TAKE_SCRIPT
                .key(set)
                .invoke_async::<Vec<String>>(&mut c)
                .await;
            r
        })
        .await
}

/// Raises the fleet-wide generation; returns the new value.
pub async fn bump_fleet(redis: &Redis, keys: &Keys) -> Result<u64, FleetError> {
    let key = keys.fleet_gen();
    redis
        .run(Op::Generation, |mut c| async move {
            let r = BUMP_ALL_SCRIPT.key(key).invoke_async::<u64>(&mut c).await;
            r
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let p = L2Page {
            body: Bytes::from_static(b"{\"ErrorCode\":0}\n"),
            stored_ms: 1,
            fresh_until_ms: 2,
            stale_until_ms: 3,
            groups: vec!["@TGS#1".into(), "g\nodd".into()],
        };
        assert_eq!(L2Page::decode(&p.encode()), Some(p));
        assert_eq!(L2Page::decode(b"garbage"), None);
    }
}
