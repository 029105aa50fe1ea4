//! The one door for invalidations, whatever their source (admin API, write-through,
//! Chat's webhooks). It takes the effects the table of invalidations names
//! ([`crate::chat::effects`]), applies them to this gateway's memory (the get_list
//! page store and the item store), counts them by source, and, in a fleet,
//! publishes them so every other gateway applies them too ([`crate::fleet::bus`];
//! events received from the fleet are applied to [`Memory`] there, and never
//! published again).
//!
//! It sits above `cache` and `fleet`, which know nothing of each other.
//!
//! **The fleet today.** The bus carries three events: "these accounts", "this
//! group", "everything". [`fleet_events`] maps typed effects onto them, invalidating
//! more where an event is coarser than the effect: any entity of an account travels
//! as that account (every gateway drops the account's pages and every item entity
//! of the account), a group's info or members as the group event, "every entity of a
//! kind" as "everything". When the bus carries typed entity events, that function is
//! the one place to change; [`Memory`]'s [`PageCache`] methods are how received
//! events reach the item store until then.

use std::sync::Arc;
use std::time::Instant;

use metrics::counter;
use serde::Serialize;

use crate::cache::items::ItemStore;
use crate::cache::key::PageKey;
use crate::cache::store::{Lookup, Page};
use crate::cache::{CacheStats, PageCache};
use crate::chat::effects::{Effect, EntityKind};
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
    /// Accounts whose get_list pages were dropped (or asked to be, for "all": every
    /// account).
    #[serde(rename = "Accounts")]
    pub accounts: usize,
    /// get_list pages dropped.
    #[serde(rename = "Pages")]
    pub pages: usize,
    /// Entities invalidated in the item store (each drops every entry that depends
    /// on it, however many); for "everything", the item entries dropped.
    #[serde(rename = "Entities")]
    pub entities: usize,
}

/// This gateway's memory: the get_list page store and the item store.
pub struct Memory {
    /// get_list pages.
    pub pages: Arc<dyn PageCache>,
    /// Per-item entries.
    pub items: Arc<ItemStore>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("items", &self.items)
            .finish_non_exhaustive()
    }
}

impl Memory {
    /// Applies one effect; adds what it dropped to `d`.
    fn apply(&self, effect: &Effect, d: &mut Dropped) {
        match effect {
            Effect::Entity(e) if e.kind == EntityKind::Conversations => {
                let pages = self.pages.invalidate(&e.id);
                d.accounts += usize::from(pages > 0);
                d.pages += pages;
            }
            Effect::Entity(e) => {
                self.items.invalidate(e.kind, &e.id);
                d.entities += 1;
            }
            Effect::Group(g) => {
                for (_, pages) in self.pages.invalidate_group(g) {
                    d.accounts += 1;
                    d.pages += pages;
                }
                self.items.invalidate(EntityKind::GroupInfo, g);
                self.items.invalidate(EntityKind::GroupMembers, g);
                d.entities += 2;
            }
            Effect::Every(EntityKind::Conversations) => {
                d.accounts += self.pages.stats().accounts as usize;
                d.pages += self.pages.invalidate_all();
            }
            Effect::Every(kind) => {
                self.items.invalidate_kind(*kind);
                d.entities += 1;
            }
            Effect::All => {
                d.accounts += self.pages.stats().accounts as usize;
                d.pages += self.pages.invalidate_all();
                d.entities += self.items.invalidate_all() as usize;
            }
        }
        counted(effect);
    }
}

/// Counts the entities an effect names, by kind.
fn counted(effect: &Effect) {
    let kind = |k: EntityKind| {
        counter!(crate::metrics::names::INVALIDATED_ENTITIES, "kind" => k.as_str()).increment(1)
    };
    match effect {
        Effect::Entity(e) => kind(e.kind),
        Effect::Every(k) => kind(*k),
        Effect::Group(_) => {
            kind(EntityKind::GroupInfo);
            kind(EntityKind::GroupMembers);
        }
        Effect::All => {}
    }
}

/// What the fleet's bus does to this gateway: its events, applied to both stores.
impl PageCache for Memory {
    fn lookup(&self, account: &str, key: &PageKey, now: Instant) -> Lookup {
        self.pages.lookup(account, key, now)
    }

    fn begin_fetch(&self) -> u64 {
        self.pages.begin_fetch()
    }

    fn insert(&self, account: &str, page: Page, fetch_epoch: u64) -> bool {
        self.pages.insert(account, page, fetch_epoch)
    }

    /// An account event: its pages and every item entity of the account.
    fn invalidate(&self, account: &str) -> usize {
        for k in EntityKind::OF_ACCOUNT {
            if k != EntityKind::Conversations {
                self.items.invalidate(k, account);
            }
        }
        self.pages.invalidate(account)
    }

    /// A group event: the pages that list it, and the group's info and members.
    fn invalidate_group(&self, group: &str) -> Vec<(Arc<str>, usize)> {
        self.items.invalidate(EntityKind::GroupInfo, group);
        self.items.invalidate(EntityKind::GroupMembers, group);
        self.pages.invalidate_group(group)
    }

    fn invalidate_all(&self) -> usize {
        self.items.invalidate_all();
        self.pages.invalidate_all()
    }

    /// The pages' sizes, with the item entries counted as pages: whoever asks
    /// whether anything is cached (the bus, before it resynchronises) sees them.
    fn stats(&self) -> CacheStats {
        let mut s = self.pages.stats();
        let items = self.items.stats();
        s.pages += items.entries;
        s.weighted_bytes += items.weighted_bytes;
        s
    }
}

/// The events that carry `effects` to the fleet today (see the module docs).
pub fn fleet_events(effects: &[Effect]) -> Vec<Event> {
    if effects
        .iter()
        .any(|e| matches!(e, Effect::All | Effect::Every(_)))
    {
        return vec![Event::All];
    }
    let mut accounts: Vec<String> = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for e in effects {
        match e {
            Effect::Entity(e) if e.kind.of_account() => accounts.push(e.id.clone()),
            Effect::Entity(e) => groups.push(e.id.clone()),
            Effect::Group(g) => groups.push(g.clone()),
            Effect::Every(_) | Effect::All => {}
        }
    }
    accounts.sort();
    accounts.dedup();
    groups.sort();
    groups.dedup();
    let mut out: Vec<Event> = groups.into_iter().map(Event::Group).collect();
    if !accounts.is_empty() {
        out.push(Event::Accounts(accounts));
    }
    out
}

/// Applies invalidations to this gateway's memory and the fleet, and records them.
#[derive(Clone)]
pub struct Invalidator {
    /// This gateway's memory.
    memory: Arc<Memory>,
    /// The fleet told about it, if any.
    fleet: Option<Arc<Fleet>>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").finish_non_exhaustive()
    }
}

impl Invalidator {
    /// An invalidator for `memory`.
    pub fn new(memory: Arc<Memory>) -> Self {
        Invalidator {
            memory,
            fleet: None,
        }
    }

    /// The same, publishing every invalidation to `fleet`.
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Applies `effects` (nothing when empty).
    pub fn apply(&self, source: Source, effects: &[Effect]) -> Dropped {
        let mut d = Dropped::default();
        if effects.is_empty() {
            return d;
        }
        for e in effects {
            self.memory.apply(e, &mut d);
            tracing::debug!(source = source.as_str(), effect = ?e, "invalidated");
        }
        if let Some(f) = &self.fleet {
            for event in fleet_events(effects) {
                f.publish(event);
            }
        }
        if effects.contains(&Effect::All) {
            tracing::info!(
                source = source.as_str(),
                pages = d.pages,
                "whole cache invalidated"
            );
        }
        counter!(crate::metrics::names::INVALIDATIONS, "source" => source.as_str()).increment(1);
        counter!(crate::metrics::names::INVALIDATED_PAGES, "source" => source.as_str())
            .increment(d.pages as u64);
        d
    }

    /// Drops everything.
    pub fn all(&self, source: Source) -> Dropped {
        self.apply(source, &[Effect::All])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::effects::Entity;

    #[test]
    fn fleet_events_cover_every_effect() {
        let e = fleet_events(&[
            Effect::one(EntityKind::Profile, "a"),
            Effect::one(EntityKind::Conversations, "a"),
            Effect::one(EntityKind::Friends, "b"),
            Effect::one(EntityKind::GroupMembers, "@g"),
            Effect::Group("@h".into()),
        ]);
        assert_eq!(
            e,
            vec![
                Event::Group("@g".into()),
                Event::Group("@h".into()),
                Event::Accounts(vec!["a".into(), "b".into()])
            ]
        );
        assert_eq!(
            fleet_events(&[Effect::Every(EntityKind::Friends)]),
            vec![Event::All]
        );
        assert!(fleet_events(&[]).is_empty());
        let _ = Entity::new(EntityKind::Exists, "x");
    }
}
