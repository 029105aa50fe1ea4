//! The caches. get_list pages: what a page key is ([`key`]), where pages live and
//! how an account's pages are dropped ([`store`]), which accounts list a group
//! ([`groups`]). The other cached reads: what an item's key is and what is
//! forwarded ([`item_key`]), how answers split into items and are assembled back
//! ([`assemble`]), where items live and how entities invalidate them ([`items`]).
//! Both: how concurrent misses share one fetch ([`coalesce`]).
//!
//! `cache` only knows how to find, store and drop entries; what is cacheable and
//! what goes stale is decided in [`crate::chat::reads`] and
//! [`crate::chat::effects`], and invalidations come through [`crate::invalidate`].
//!
//! [`PageCache`] is the small interface the handlers use, so a shared L2 (Redis) can
//! sit behind it later without touching them.

pub mod assemble;
pub mod coalesce;
pub mod groups;
pub mod invalidate;
pub mod item_fast;
pub mod item_key;
pub mod items;
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
