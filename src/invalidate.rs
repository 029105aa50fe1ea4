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
//! **The fleet.** The bus carries the effects as they are ([`fleet_events`]: typed
//! entities, group events, "every entity of a kind", "everything"), and every other
//! gateway applies exactly them to its [`Memory`] (the [`Sink`] the bus is given), so
//! the fleet invalidates what this gateway invalidated and nothing more. A write
//! that passed through the gateway, and an admin invalidation, are answered once the
//! fleet has applied them ([`Invalidator::apply_and_wait`]): read-your-writes through
//! any gateway of the fleet.

use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::counter;
use serde::Serialize;

use crate::cache::items::ItemStore;
use crate::cache::PageCache;
use crate::chat::effects::{Effect, Entity, EntityKind};
use crate::config::LiveSettings;
use crate::fleet::{Event, Fleet, Sink};

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

/// What the fleet's bus does to this gateway: other gateways' events, applied to
/// both stores exactly as [`Memory::apply`] applies the effects they carry.
impl Sink for Memory {
    fn apply(&self, event: &Event) -> usize {
        let mut d = Dropped::default();
        match event {
            Event::Entities(list) => {
                for e in list {
                    self.apply(&Effect::Entity(e.clone()), &mut d);
                }
            }
            Event::Group(g) => self.apply(&Effect::Group(g.clone()), &mut d),
            Event::Every(k) => self.apply(&Effect::Every(*k), &mut d),
            Event::All => self.apply(&Effect::All, &mut d),
        }
        d.pages
    }

    fn drop_all(&self) -> usize {
        self.items.invalidate_all();
        self.pages.invalidate_all()
    }

    fn holds_anything(&self) -> bool {
        self.pages.stats().pages > 0 || self.items.stats().entries > 0
    }
}

/// The events that carry `effects` to the fleet: all of the named entities in one
/// event, one per group event and per kind, or "everything" alone.
pub fn fleet_events(effects: &[Effect]) -> Vec<Event> {
    if effects.contains(&Effect::All) {
        return vec![Event::All];
    }
    let mut entities: Vec<Entity> = Vec::new();
    let mut out: Vec<Event> = Vec::new();
    for e in effects {
        match e {
            Effect::Entity(e) => entities.push(e.clone()),
            Effect::Group(g) => out.push(Event::Group(g.clone())),
            Effect::Every(k) => out.push(Event::Every(*k)),
            Effect::All => {}
        }
    }
    out.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    out.dedup();
    if !entities.is_empty() {
        entities.sort();
        entities.dedup();
        out.push(Event::Entities(entities));
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
    /// Where `cache.group_events` is read (live), if anywhere (else its default).
    live: Option<Arc<ArcSwap<LiveSettings>>>,
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
            live: None,
        }
    }

    /// The same, reading `cache.group_events` from `live`.
    pub fn with_live(mut self, live: Arc<ArcSwap<LiveSettings>>) -> Self {
        self.live = Some(live);
        self
    }

    /// The same, publishing every invalidation to `fleet`.
    pub fn with_fleet(mut self, fleet: Option<Arc<Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Applies `effects` (nothing when empty).
    pub fn apply(&self, source: Source, effects: &[Effect]) -> Dropped {
        self.apply_ticketed(source, effects).0
    }

    /// [`Invalidator::apply`], and the fleet's ticket of the last event sent.
    fn apply_ticketed(&self, source: Source, effects: &[Effect]) -> (Dropped, u64) {
        let mut d = Dropped::default();
        if effects.is_empty() {
            return (d, 0);
        }
        // What a group event reaches is decided here, once, for this gateway's memory
        // and the fleet alike: the fleet applies the effects as published.
        let scope = self
            .live
            .as_ref()
            .map(|l| l.load().group_events)
            .unwrap_or_default();
        let effects: &[Effect] = &scope.widen(effects);
        // The fleet first: publishing marks what the effects name as pending (no L2
        // read of it until Redis has the event), so that a read arriving once memory
        // has dropped an entry cannot refill it from an L2 entry that the event has
        // not reached yet. (The other way round, such a read stored the old entry
        // again, and this gateway never applies its own event from the stream.)
        let ticket = self.publish(effects);
        for e in effects {
            self.memory.apply(e, &mut d);
            tracing::debug!(source = source.as_str(), effect = ?e, "invalidated");
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
        (d, ticket)
    }

    /// Drops everything.
    pub fn all(&self, source: Source) -> Dropped {
        self.apply(source, &[Effect::All])
    }

    /// Sends `effects` to the fleet; returns the last ticket (0 without a fleet).
    fn publish(&self, effects: &[Effect]) -> u64 {
        let Some(f) = &self.fleet else { return 0 };
        fleet_events(effects)
            .into_iter()
            .map(|e| f.publish(e))
            .max()
            .unwrap_or(0)
    }

    /// Applies `effects` like [`Invalidator::apply`], then, in a fleet, waits until
    /// every live gateway has applied them too (at most `redis.timeout_ms`): what the
    /// caller is answered next, through any gateway, is fresh.
    pub async fn apply_and_wait(&self, source: Source, effects: &[Effect]) -> Dropped {
        let (d, ticket) = self.apply_ticketed(source, effects);
        if let (Some(f), true) = (&self.fleet, ticket > 0) {
            let outcome = f.wait_applied(ticket).await;
            tracing::debug!(
                source = source.as_str(),
                outcome = outcome.as_str(),
                "waited for the fleet"
            );
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_events_carry_every_effect_as_it_is() {
        let e = fleet_events(&[
            Effect::one(EntityKind::Profile, "a"),
            Effect::one(EntityKind::Conversations, "a"),
            Effect::one(EntityKind::Friends, "b"),
            Effect::one(EntityKind::GroupMembers, "@g"),
            Effect::Group("@h".into()),
            Effect::Every(EntityKind::Friends),
            Effect::one(EntityKind::Profile, "a"),
        ]);
        assert_eq!(
            e,
            vec![
                Event::Every(EntityKind::Friends),
                Event::Group("@h".into()),
                Event::Entities(vec![
                    Entity::new(EntityKind::Conversations, "a"),
                    Entity::new(EntityKind::Profile, "a"),
                    Entity::new(EntityKind::Friends, "b"),
                    Entity::new(EntityKind::GroupMembers, "@g"),
                ]),
            ]
        );
        assert_eq!(
            fleet_events(&[Effect::All, Effect::one(EntityKind::Profile, "a")]),
            vec![Event::All]
        );
        assert!(fleet_events(&[]).is_empty());
    }
}
