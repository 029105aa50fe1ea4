//! The get_list page cache: what a key is ([`key`]), where pages live and how an
//! account's pages are dropped ([`store`]), which accounts list a group ([`groups`]),
//! how identical misses share one fetch ([`coalesce`]), and the one door every
//! invalidation source goes through ([`invalidate`]).
//!
//! [`PageCache`] is the small interface the handlers use, so a shared L2 (Redis) can
//! sit behind it later without touching them.

pub mod coalesce;
pub mod groups;
pub mod invalidate;
pub mod key;
pub mod store;

use std::sync::Arc;
use std::time::Instant;

use key::PageKey;
use store::{Lookup, Page};

/// Sizes, for metrics and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Accounts with cached pages.
    pub accounts: u64,
    /// Cached pages.
    pub pages: u64,
    /// Weighted size, bytes.
    pub weighted_bytes: u64,
}

/// What the handlers need from a page cache.
pub trait PageCache: Send + Sync + 'static {
    /// Finds a page; must not allocate or lock (the hot path).
    fn lookup(&self, account: &str, key: &PageKey, now: Instant) -> Lookup;
    /// Marks the start of a fetch; pass the value to [`PageCache::insert`].
    fn begin_fetch(&self) -> u64;
    /// Stores a page fetched since `fetch_epoch` unless its account was invalidated
    /// meanwhile; returns whether it was stored.
    fn insert(&self, account: &str, page: Page, fetch_epoch: u64) -> bool;
    /// Drops every page of `account`, O(1); returns the pages dropped.
    fn invalidate(&self, account: &str) -> usize;
    /// Drops the pages of every account whose cached pages list `group`; returns the
    /// accounts and pages dropped.
    fn invalidate_group(&self, group: &str) -> Vec<(Arc<str>, usize)>;
    /// Drops everything; returns the pages dropped.
    fn invalidate_all(&self) -> usize;
    /// Current sizes.
    fn stats(&self) -> CacheStats;
}
