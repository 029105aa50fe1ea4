//! The one door for invalidations, whatever their source (admin API, write-through,
//! Chat's webhooks). It applies them to this gateway's memory, counts them by source,
//! and, in a fleet, publishes them so every other gateway applies them too
//! ([`crate::fleet::bus`]; events received from the fleet are applied there, to
//! memory only, and never published again).

use std::sync::Arc;

use metrics::counter;
use serde::Serialize;

use super::PageCache;
use crate::fleet::{Event, Fleet};

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `POST /admin/cache/invalidate`.
    Admin,
    /// A write that passed through the gateway.
    WriteThrough,
    /// A Chat webhook (`POST /callback`).
    Webhook,
}

impl Source {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::WriteThrough => "write_through",
            Source::Webhook => "webhook",
        }
    }
}

/// What an invalidation dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Accounts whose pages were dropped (or asked to be, for "all": every account).
    #[serde(rename = "Accounts")]
    pub accounts: usize,
    /// Pages dropped.
    #[serde(rename = "Pages")]
    pub pages: usize,
}

/// Applies invalidations to the cache and records them.
#[derive(Clone)]
pub struct Invalidator {
    /// The cache invalidated.
    cache: Arc<dyn PageCache>,
    /// The fleet told about it, if any.
    fleet: Option<Arc<Fleet>>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").finish_non_exhaustive()
    }
}

impl Invalidator {
    /// An invalidator for `cache`.
    pub fn new(cache: Arc<dyn PageCache>) -> Self {
        Invalidator { cache, fleet: None }
    }

    /// The same, publishing every invalidation to `fleet`.
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    fn publish(&self, event: impl FnOnce() -> Event) {
        if let Some(f) = &self.fleet {
            f.publish(event());
        }
    }

    /// Drops every page of each account. O(1) per account.
    pub fn accounts<'a>(
        &self,
        source: Source,
        accounts: impl IntoIterator<Item = &'a str>,
    ) -> Dropped {
        let mut d = Dropped::default();
        let mut named = Vec::new();
        for a in accounts {
            let pages = self.cache.invalidate(a);
            d.accounts += usize::from(pages > 0);
            d.pages += pages;
            tracing::debug!(source = source.as_str(), account = a, pages, "invalidated");
            if self.fleet.is_some() {
                named.push(a.to_string());
            }
        }
        self.publish(|| Event::Accounts(named));
        self.record(source, d);
        d
    }

    /// Drops the pages of every cached account whose pages list `group`.
    pub fn group(&self, source: Source, group: &str) -> Dropped {
        let dropped = self.cache.invalidate_group(group);
        self.publish(|| Event::Group(group.to_string()));
        let d = Dropped {
            accounts: dropped.len(),
            pages: dropped.iter().map(|(_, n)| n).sum(),
        };
        tracing::debug!(
            source = source.as_str(),
            group,
            accounts = d.accounts,
            "group invalidated"
        );
        self.record(source, d);
        d
    }

    /// Drops everything.
    pub fn all(&self, source: Source) -> Dropped {
        let accounts = self.cache.stats().accounts as usize;
        let pages = self.cache.invalidate_all();
        self.publish(|| Event::All);
        let d = Dropped { accounts, pages };
        tracing::info!(source = source.as_str(), pages, "whole cache invalidated");
        self.record(source, d);
        d
    }

    fn record(&self, source: Source, d: Dropped) {
        counter!(crate::metrics::names::INVALIDATIONS, "source" => source.as_str()).increment(1);
        counter!(crate::metrics::names::INVALIDATED_PAGES, "source" => source.as_str())
            .increment(d.pages as u64);
    }
}
