//! The page store: moka, with one entry per account holding that account's pages.
//!
//! Grouping pages per account makes "drop every page of this account" one moka
//! `remove`, O(1) whatever the number of cached pages or accounts. An entry is
//! replaced copy-on-write when a page is added (under moka's per-key compute lock), so
//! readers never lock: a hit is one moka `get` and a scan of the account's few pages.
//!
//! Each page keeps its own `fresh_until` and `stale_until`; moka expires the account's
//! entry when its last page's stale window ends (see `PagesExpiry`). A lookup tells
//! fresh from stale, so stale-if-error can serve a page moka still holds.
//!
//! A fetch that started before an invalidation of its account must not put its
//! (possibly stale) answer back: [`PageStore::begin_fetch`] takes an epoch, and
//! [`PageStore::insert`] refuses when the account was invalidated after it. Recent
//! invalidations are remembered in a fixed table of epochs indexed by a hash of the
//! account (`RecentInvalidations`), so that memory is bounded whatever the number of
//! accounts invalidated; two accounts sharing a slot only cost a fetch its store.
//!
//! Memory is bounded by `cache.max_bytes`: every stored body is copied into an
//! allocation of exactly its size (an upstream body is often a slice of a larger read
//! buffer, which it would keep alive), and an entry is weighed at what it really costs
//! (body, key, page and entry structs, GroupIds and their index, moka's own per-entry
//! bookkeeping and the allocator's rounding; see [`weigh_page`]). An account holds at
//! most `cache.max_pages_per_account` pages; past it its oldest page goes, which also
//! bounds the copy-on-write work of adding a page.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::Expiry;

use super::groups::{group_key, GroupIndex, GroupKey};
use super::key::PageKey;
use super::{CacheStats, PageCache};

/// Bytes counted per page on top of its body, extra-field key and GroupIds: the
/// `Arc<Page>` allocation, its slot in the account's page list, the shared-`Bytes`
/// header, and the allocator's rounding of the body to its size class. Calibrated
/// with `bench/rss.sh`, so that what a page weighs stays within about 15% of the RSS
/// it adds (see the README's figures).
pub const PAGE_OVERHEAD: usize = 384;
/// Bytes counted per GroupId a page lists: its key in the page, and its share of the
/// GroupId index (a slot in the group's list of accounts, the table slot).
pub const GROUP_OVERHEAD: usize = 128;
/// Bytes counted per account entry on top of its pages and account name: the
/// `Arc<AccountPages>`, the key's allocations, and moka's per-entry bookkeeping (its
/// hash-table slot, access and write order nodes, timer-wheel node, entry info).
pub const ENTRY_OVERHEAD: usize = 512;
/// Slots of the recent-invalidations table (8 bytes each: 512 KiB).
pub const RECENT_INVALIDATION_SLOTS: usize = 1 << 16;

/// What one page weighs in the cache, in bytes (see the constants above).
pub fn weigh_page(body_len: usize, extra_len: usize, groups: usize) -> usize {
    body_len + extra_len + groups * GROUP_OVERHEAD + PAGE_OVERHEAD
}

/// The epochs of recent invalidations, in a fixed table indexed by a hash of the
/// account: bounded memory, whatever the number of accounts invalidated.
///
/// The guarantee is the same as remembering every account: a fetch that began (took
/// the epoch `e`) before an invalidation of its account finds a slot value `>= e` and
/// does not store. Accounts that share a slot may also refuse a store they could have
/// made: a wasted fetch, never a stale page.
struct RecentInvalidations {
    /// slot → the highest epoch of an invalidation of an account hashed there.
    slots: Box<[AtomicU64]>,
    /// Keyed per process, so callers cannot aim collisions at an account.
    hasher: std::collections::hash_map::RandomState,
}

impl RecentInvalidations {
    fn new() -> Self {
        RecentInvalidations {
            slots: (0..RECENT_INVALIDATION_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: Default::default(),
        }
    }

    fn slot(&self, account: &str) -> &AtomicU64 {
        let h = self.hasher.hash_one(account) as usize;
        &self.slots[h % self.slots.len()]
    }

    fn record(&self, account: &str, epoch: u64) {
        self.slot(account).fetch_max(epoch, Ordering::AcqRel);
    }

    fn since(&self, account: &str, epoch: u64) -> bool {
        self.slot(account).load(Ordering::Acquire) >= epoch
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct Page {
    /// Which page of the account.
    pub key: PageKey,
    /// Chat's answer, byte for byte; cloned by handle on every hit.
    pub body: Bytes,
    /// When it was stored, for the `age` header.
    pub stored_at: Instant,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served as stale (only when Chat fails) until then.
    pub stale_until: Instant,
    /// Keys of the GroupIds this page lists (for group-event invalidation).
    pub groups: Box<[GroupKey]>,
}

impl Page {
    /// A page holding its own copy of `body`, in an allocation of exactly its size:
    /// the answer as read is often a slice of a larger buffer, which a cached slice
    /// would keep alive for as long as the page lives.
    pub fn new(
        key: PageKey,
        body: &[u8],
        stored_at: Instant,
        fresh_until: Instant,
        stale_until: Instant,
        groups: Box<[GroupKey]>,
    ) -> Page {
        Page {
            key,
            body: Bytes::copy_from_slice(body),
            stored_at,
            fresh_until,
            stale_until,
            groups,
        }
    }
}

/// An account's cached pages: the value of one moka entry.
#[derive(Debug, Default)]
pub struct AccountPages {
    /// The pages, few per account; scanned linearly.
    pub pages: Vec<Arc<Page>>,
    /// Weighted size, computed once when the entry is built.
    weight: u32,
    /// The latest `stale_until` of the pages: when moka may drop the entry.
    stale_until: Option<Instant>,
    /// Unique per entry built, so the GroupId index can tell entries apart.
    id: u64,
}

impl AccountPages {
    fn new(pages: Vec<Arc<Page>>, account_len: usize, id: u64) -> Self {
        let weight = pages
            .iter()
            .map(|p| {
                weigh_page(
                    p.body.len(),
                    p.key.extra.as_ref().map_or(0, |e| e.len()),
                    p.groups.len(),
                )
            })
            .sum::<usize>()
            + account_len
            + ENTRY_OVERHEAD;
        let stale_until = pages.iter().map(|p| p.stale_until).max();
        AccountPages {
            pages,
            weight: u32::try_from(weight).unwrap_or(u32::MAX),
            stale_until,
            id,
        }
    }

    /// Every GroupId its pages list (with repeats).
    fn groups(&self) -> impl Iterator<Item = GroupKey> + '_ {
        self.pages.iter().flat_map(|p| p.groups.iter().copied())
    }

    /// Whether any page lists `group`.
    pub fn lists_group(&self, group: &str) -> bool {
        let key = group_key(group);
        self.pages.iter().any(|p| p.groups.contains(&key))
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A page within its TTL.
    Fresh(Arc<Page>),
    /// A page past its TTL but within the stale window: only for when Chat fails.
    Stale(Arc<Page>),
    /// Nothing usable.
    Miss,
}

/// Tells moka when an account's entry may go: after its last page's stale window.
struct PagesExpiry;

impl Expiry<Arc<str>, Arc<AccountPages>> for PagesExpiry {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Arc<AccountPages>,
        created_at: Instant,
    ) -> Option<Duration> {
        value
            .stale_until
            .map(|t| t.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Arc<AccountPages>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value
            .stale_until
            .map(|t| t.saturating_duration_since(updated_at))
    }
}

/// The page cache.
pub struct PageStore {
    /// account → its pages.
    cache: moka::sync::Cache<Arc<str>, Arc<AccountPages>>,
    /// Bumped by every invalidation; a fetch records it when it starts.
    epoch: AtomicU64,
    /// The epoch of the last "invalidate everything".
    all_invalidated: AtomicU64,
    /// Epochs of recent invalidations, by a hash of the account (fixed size).
    recent_invalidations: RecentInvalidations,
    /// Pages one account may hold; past it its oldest page goes.
    max_pages_per_account: usize,
    /// Pages held (for the pages gauge), kept by insert and the removal listener.
    pages: Arc<AtomicI64>,
    /// GroupId → accounts, kept in step with the entries.
    groups: Arc<GroupIndex>,
    /// Source of entry ids.
    next_id: AtomicU64,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore")
            .field("entries", &self.cache.entry_count())
            .field("weighted_bytes", &self.cache.weighted_size())
            .finish()
    }
}

impl PageStore {
    /// A store bounded to `max_bytes` of weighted size and `max_pages_per_account`
    /// pages per account.
    pub fn new(max_bytes: u64, max_pages_per_account: usize) -> Self {
        let pages = Arc::new(AtomicI64::new(0));
        let pages_l = pages.clone();
        let groups = Arc::new(GroupIndex::default());
        let groups_l = groups.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Arc<str>, v: &Arc<AccountPages>| v.weight.saturating_add(k.len() as u32))
            .expire_after(PagesExpiry)
            .eviction_listener(move |k: Arc<Arc<str>>, v: Arc<AccountPages>, cause| {
                if cause != RemovalCause::Replaced {
                    pages_l.fetch_sub(v.pages.len() as i64, Ordering::Relaxed);
                }
                groups_l.remove(&k, v.id, v.groups());
            })
            .build();
        PageStore {
            cache,
            epoch: AtomicU64::new(1),
            all_invalidated: AtomicU64::new(0),
            recent_invalidations: RecentInvalidations::new(),
            max_pages_per_account: max_pages_per_account.max(1),
            pages,
            groups,
            next_id: AtomicU64::new(1),
        }
    }

    fn invalidated_since(&self, account: &str, fetch_epoch: u64) -> bool {
        self.all_invalidated.load(Ordering::Acquire) >= fetch_epoch
            || self.recent_invalidations.since(account, fetch_epoch)
    }

    /// The GroupId index (for tests).
    pub fn group_index(&self) -> &GroupIndex {
        &self.groups
    }
}

impl PageCache for PageStore {
    fn lookup(&self, account: &str, key: &PageKey, now: Instant) -> Lookup {
        let Some(entry) = self.cache.get(account) else {
            return Lookup::Miss;
        };
        match entry.pages.iter().find(|p| p.key == *key) {
            Some(p) if now < p.fresh_until => Lookup::Fresh(p.clone()),
            Some(p) if now < p.stale_until => Lookup::Stale(p.clone()),
            _ => Lookup::Miss,
        }
    }

    fn begin_fetch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn insert(&self, account: &str, page: Page, fetch_epoch: u64) -> bool {
        let now = Instant::now();
        let page = Arc::new(page);
        let key: Arc<str> = Arc::from(account);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut stored = false;
        let mut delta = 0i64;
        self.cache.entry(key.clone()).and_compute_with(|existing| {
            // Checked under the key's lock: an invalidation records itself before it
            // removes, so either we see it here or it removes what we put.
            if self.invalidated_since(&key, fetch_epoch) {
                return Op::Nop;
            }
            let old = existing.as_ref().map(|e| e.value());
            let mut pages: Vec<Arc<Page>> = match old {
                Some(e) => {
                    let mut kept: Vec<Arc<Page>> = Vec::with_capacity(e.pages.len() + 1);
                    kept.extend(
                        e.pages
                            .iter()
                            .filter(|p| p.key != page.key && p.stale_until > now)
                            .cloned(),
                    );
                    // At the cap, the oldest page of the account makes room. Pages are
                    // kept in the order they were stored, so it is the first.
                    if kept.len() >= self.max_pages_per_account {
                        kept.drain(..=kept.len() - self.max_pages_per_account);
                    }
                    kept
                }
                None => Vec::with_capacity(1),
            };
            let before = old.map_or(0, |e| e.pages.len()) as i64;
            pages.push(page.clone());
            delta = pages.len() as i64 - before;
            stored = true;
            let entry = AccountPages::new(pages, key.len(), id);
            // Indexed before the entry is visible and under the key's lock, so a group
            // event never misses a page that lists its group.
            self.groups.add(&key, id, entry.groups());
            Op::Put(Arc::new(entry))
        });
        if stored {
            self.pages.fetch_add(delta, Ordering::Relaxed);
        }
        stored
    }

    fn invalidate(&self, account: &str) -> usize {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel);
        self.recent_invalidations.record(account, e);
        self.cache.remove(account).map_or(0, |v| v.pages.len())
    }

    fn invalidate_group(&self, group: &str) -> Vec<(Arc<str>, usize)> {
        let mut dropped = Vec::new();
        for account in self.groups.take(group) {
            let lists = self
                .cache
                .get(&account)
                .is_some_and(|e| e.lists_group(group));
            if lists {
                let n = self.invalidate(&account);
                dropped.push((account, n));
            }
        }
        dropped
    }

    fn invalidate_all(&self) -> usize {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel);
        self.all_invalidated.fetch_max(e, Ordering::AcqRel);
        let n = self.pages.load(Ordering::Relaxed).max(0) as usize;
        self.cache.invalidate_all();
        n
    }

    fn stats(&self) -> CacheStats {
        self.cache.run_pending_tasks();
        CacheStats {
            accounts: self.cache.entry_count(),
            pages: self.pages.load(Ordering::Relaxed).max(0) as u64,
            weighted_bytes: self.cache.weighted_size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ts: u64) -> PageKey {
        PageKey {
            time_stamp: ts,
            ..PageKey::default()
        }
    }

    fn page(ts: u64, ttl: Duration, stale: Duration) -> Page {
        page_in(ts, ttl, stale, &[])
    }

    fn page_in(ts: u64, ttl: Duration, stale: Duration, groups: &[&str]) -> Page {
        let now = Instant::now();
        Page {
            key: key(ts),
            body: Bytes::from(format!("page {ts}")),
            stored_at: now,
            fresh_until: now + ttl,
            stale_until: now + ttl + stale,
            groups: groups.iter().map(|g| group_key(g)).collect(),
        }
    }

    #[test]
    fn pages_of_an_account_are_dropped_together() {
        let s = PageStore::new(1 << 20, 64);
        let t = Duration::from_secs(60);
        for ts in 0..3 {
            assert!(s.insert("a", page(ts, t, t), s.begin_fetch()));
        }
        assert!(s.insert("b", page(0, t, t), s.begin_fetch()));
        assert!(matches!(
            s.lookup("a", &key(2), Instant::now()),
            Lookup::Fresh(_)
        ));
        assert_eq!(s.stats().pages, 4);
        assert_eq!(s.invalidate("a"), 3);
        assert!(matches!(
            s.lookup("a", &key(2), Instant::now()),
            Lookup::Miss
        ));
        assert!(matches!(
            s.lookup("b", &key(0), Instant::now()),
            Lookup::Fresh(_)
        ));
        assert_eq!(s.stats().pages, 1);
    }

    #[test]
    fn a_fetch_that_started_before_an_invalidation_is_not_stored() {
        let s = PageStore::new(1 << 20, 64);
        let t = Duration::from_secs(60);
        let e = s.begin_fetch();
        s.invalidate("a");
        assert!(!s.insert("a", page(0, t, t), e));
        assert!(s.insert("a", page(0, t, t), s.begin_fetch()));
        let e = s.begin_fetch();
        s.invalidate_all();
        assert!(!s.insert("b", page(0, t, t), e));
    }

    #[test]
    fn stale_is_told_apart_from_fresh() {
        let s = PageStore::new(1 << 20, 64);
        assert!(s.insert(
            "a",
            page(0, Duration::ZERO, Duration::from_secs(60)),
            s.begin_fetch()
        ));
        assert!(matches!(
            s.lookup("a", &key(0), Instant::now()),
            Lookup::Stale(_)
        ));
    }

    #[test]
    fn group_invalidation_drops_exactly_the_listing_accounts() {
        let s = PageStore::new(1 << 20, 64);
        let t = Duration::from_secs(60);
        assert!(s.insert("a", page_in(0, t, t, &["@g1"]), s.begin_fetch()));
        assert!(s.insert("b", page_in(0, t, t, &["@g1", "@g2"]), s.begin_fetch()));
        assert!(s.insert("c", page_in(0, t, t, &["@g2"]), s.begin_fetch()));
        // b's page is replaced by one that no longer lists @g1.
        assert!(s.insert("b", page_in(0, t, t, &["@g2"]), s.begin_fetch()));
        let mut dropped: Vec<String> = s
            .invalidate_group("@g1")
            .into_iter()
            .map(|(a, _)| a.to_string())
            .collect();
        dropped.sort();
        assert_eq!(dropped, vec!["a"]);
        assert!(matches!(
            s.lookup("b", &key(0), Instant::now()),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            s.lookup("c", &key(0), Instant::now()),
            Lookup::Fresh(_)
        ));
        let mut dropped: Vec<String> = s
            .invalidate_group("@g2")
            .into_iter()
            .map(|(a, _)| a.to_string())
            .collect();
        dropped.sort();
        assert_eq!(dropped, vec!["b", "c"]);
        s.stats();
        assert_eq!(
            s.group_index().group_count(),
            0,
            "index pruned as entries leave"
        );
    }
}
