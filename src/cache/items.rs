//! The item store: per-item entries of the batched reads and whole answers of the
//! single reads ([`crate::chat::reads`]), validated by a generation table.
//!
//! **Keys.** An entry's key is the row, a 128-bit id of the request's other fields
//! in canonical form (two SipHash keys chosen per process, so no caller can aim a
//! collision at another's variant), and the item itself, as one byte string. A
//! lookup builds it in a stack buffer: no allocation.
//!
//! **Validity: a generation table, O(1) invalidation with no index.** Every entity
//! ([`crate::chat::effects::Entity`]) hashes to a slot of a fixed table of epochs.
//! A fetch takes the current epoch when it *begins*; the entry it stores remembers
//! it and the slots of the entities it depends on (one to three, or the listed
//! groups of a joined-group list). Invalidating an entity moves the global epoch on
//! and raises its slot to the old value; an entry is valid only while every slot it
//! depends on is below its epoch (and above the floors of "every entity of a kind"
//! and "everything"). So:
//! - invalidating an entity costs one atomic whatever depends on it (a portrait, the
//!   friend lists that carry its tags, the joined-group lists that name a group);
//! - a fetch that began before an invalidation can never be served, even if it
//!   stores its answer after it;
//! - two entities sharing a slot only cost a refetch, never a stale answer.
//!
//! An invalidated entry is dead weight until moka evicts it or its stale window
//! ends; a newer fetch of the same key replaces it.
//!
//! **Memory.** Entries are weighed at what they cost ([`weigh_item`]): the item's
//! bytes (an exact-size copy of its slice of Chat's answer), the key, the
//! dependency slots and a fixed overhead for moka's bookkeeping and the entry
//! itself. The store's share of `cache.max_bytes` (`cache.items_percent`) pays for
//! the generation table too (one 8-byte slot per 64 bytes of the share), so
//! entries and table together stay within it.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;

use crate::chat::effects::EntityKind;

/// Bytes counted per entry on top of its item bytes, key and dependencies: moka's
/// per-entry bookkeeping (hash-table slot, access and write order nodes, timer
/// wheel node, entry info; about 300 bytes, see the page store's calibrated
/// `ENTRY_OVERHEAD`), the `Arc<ItemEntry>` allocation, the key's and the body's
/// allocations and the allocator's rounding.
pub const ITEM_OVERHEAD: usize = 448;
/// Bytes counted per dependency slot an entry records.
pub const DEP_OVERHEAD: usize = 4;
/// Bytes of the store's share that buy one generation slot (8 bytes).
pub const SHARE_PER_SLOT: u64 = 64;
/// Fewest and most slots of the generation table.
pub const MIN_SLOTS: usize = 1 << 6;
/// See [`MIN_SLOTS`].
pub const MAX_SLOTS: usize = 1 << 22;
/// Longest key: the row (1 byte), the variant id (16) and an item (at most 64).
pub const MAX_KEY: usize = 1 + 16 + 64;

/// What one entry weighs, in bytes.
pub fn weigh_item(body_len: usize, key_len: usize, deps: usize) -> usize {
    body_len + key_len + deps * DEP_OVERHEAD + ITEM_OVERHEAD
}

/// The id of a request's other fields (everything but the items), canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VariantId(pub u128);

/// A key in a stack buffer.
pub struct KeyBuf {
    buf: [u8; MAX_KEY],
    len: usize,
}

impl KeyBuf {
    /// The key of `item` of `row` in `variant`; `None` when the item is longer than
    /// any row allows (such requests are never split).
    pub fn new(row: usize, variant: VariantId, item: &str) -> Option<KeyBuf> {
        let mut buf = [0u8; MAX_KEY];
        let len = 17 + item.len();
        if len > MAX_KEY {
            return None;
        }
        buf[0] = row as u8;
        buf[1..17].copy_from_slice(&variant.0.to_le_bytes());
        buf[17..len].copy_from_slice(item.as_bytes());
        Some(KeyBuf { buf, len })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// An owned copy, for storing and for coalescing.
    pub fn to_key(&self) -> ItemKey {
        Arc::from(self.as_bytes())
    }
}

/// An entry's key, owned.
pub type ItemKey = Arc<[u8]>;

/// The epochs: a fixed table of slots by entity, a floor per kind and one for all.
struct Generations {
    /// Moves on with every invalidation; a fetch records it when it begins.
    epoch: AtomicU64,
    /// slot → the highest epoch of an invalidation of an entity hashed there.
    slots: Box<[AtomicU64]>,
    /// kind → the epoch of the last "every entity of this kind".
    kind_floors: [AtomicU64; EntityKind::ALL.len()],
    /// The epoch of the last "everything".
    all_floor: AtomicU64,
    /// Keyed per process, so callers cannot aim collisions.
    hasher: std::collections::hash_map::RandomState,
}

impl Generations {
    fn new(slots: usize) -> Self {
        Generations {
            epoch: AtomicU64::new(1),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            kind_floors: Default::default(),
            all_floor: AtomicU64::new(0),
            hasher: Default::default(),
        }
    }

    fn slot(&self, kind: EntityKind, id: &str) -> u32 {
        let mut h = self.hasher.build_hasher();
        (kind as u8).hash(&mut h);
        id.hash(&mut h);
        (h.finish() % self.slots.len() as u64) as u32
    }

    fn bump(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel)
    }

    /// Whether no entity of `deps` was invalidated at or after `epoch`.
    fn unchanged(&self, deps: &Deps, epoch: u64) -> bool {
        if self.all_floor.load(Ordering::Acquire) >= epoch {
            return false;
        }
        let mut kinds = deps.kinds;
        while kinds != 0 {
            let k = kinds.trailing_zeros() as usize;
            kinds &= kinds - 1;
            if self.kind_floors[k].load(Ordering::Acquire) >= epoch {
                return false;
            }
        }
        deps.slots
            .iter()
            .all(|s| self.slots[*s as usize].load(Ordering::Acquire) < epoch)
    }

    fn valid(&self, e: &ItemEntry) -> bool {
        self.unchanged(&e.deps, e.epoch)
    }
}

/// Marks the start of a fetch: pass it to [`ItemStore::entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchEpoch(u64);

/// The entities something depends on, as generation slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    /// The slots of the entities.
    slots: Box<[u32]>,
    /// Their kinds (a bit per [`EntityKind::index`]).
    kinds: u8,
}

impl Deps {
    /// How many slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// One cached item (or whole answer).
#[derive(Debug)]
pub struct ItemEntry {
    /// The item's JSON exactly as Chat returned it (an exact-size copy).
    pub body: Bytes,
    /// When it was stored, for `age`.
    pub stored_at: Instant,
    /// Served as fresh until then.
    pub fresh_until: Instant,
    /// Served as stale (only when Chat fails) until then.
    pub stale_until: Instant,
    /// The epoch at which its fetch began.
    epoch: u64,
    /// The entities it depends on.
    deps: Deps,
    /// Weighed size (without the key).
    weight: u32,
}

/// What a lookup found.
#[derive(Debug)]
pub enum ItemLookup {
    /// Valid and within its TTL.
    Fresh(Arc<ItemEntry>),
    /// Valid, past its TTL, within its stale window: only for when Chat fails.
    Stale(Arc<ItemEntry>),
    /// Nothing usable.
    Miss,
}

/// Sizes, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ItemStats {
    /// Entries held (valid or not yet evicted).
    pub entries: u64,
    /// Their weighed size, bytes.
    pub weighted_bytes: u64,
    /// Bytes of the generation table.
    pub table_bytes: u64,
}

struct ItemExpiry;

impl Expiry<ItemKey, Arc<ItemEntry>> for ItemExpiry {
    fn expire_after_create(
        &self,
        _key: &ItemKey,
        value: &Arc<ItemEntry>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.stale_until.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &ItemKey,
        value: &Arc<ItemEntry>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.stale_until.saturating_duration_since(updated_at))
    }
}

/// The item store.
pub struct ItemStore {
    cache: moka::sync::Cache<ItemKey, Arc<ItemEntry>>,
    gens: Generations,
    /// Two keys for the 128-bit variant ids.
    variant_keys: [std::collections::hash_map::RandomState; 2],
}

impl std::fmt::Debug for ItemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStore")
            .field("entries", &self.cache.entry_count())
            .field("weighted_bytes", &self.cache.weighted_size())
            .field("slots", &self.gens.slots.len())
            .finish()
    }
}

impl ItemStore {
    /// A store within `share` bytes: the generation table (sized from the share)
    /// and the weighed entries together.
    pub fn new(share: u64) -> Self {
        let slots = ((share / SHARE_PER_SLOT) as usize)
            .checked_next_power_of_two()
            .unwrap_or(MAX_SLOTS)
            .clamp(MIN_SLOTS, MAX_SLOTS);
        let table = (slots * 8) as u64;
        let cache = moka::sync::Cache::builder()
            .max_capacity(share.saturating_sub(table))
            .weigher(|k: &ItemKey, v: &Arc<ItemEntry>| v.weight.saturating_add(k.len() as u32))
            .expire_after(ItemExpiry)
            .build();
        ItemStore {
            cache,
            gens: Generations::new(slots),
            variant_keys: Default::default(),
        }
    }

    /// The id of `variant` (a row's canonical other fields) for `row`.
    pub fn variant_id(&self, row: usize, variant: &str) -> VariantId {
        let h = |k: &std::collections::hash_map::RandomState| {
            let mut h = k.build_hasher();
            row.hash(&mut h);
            variant.hash(&mut h);
            h.finish()
        };
        VariantId(
            (u128::from(h(&self.variant_keys[0])) << 64) | u128::from(h(&self.variant_keys[1])),
        )
    }

    /// Finds an entry; allocates nothing.
    pub fn lookup(&self, key: &KeyBuf, now: Instant) -> ItemLookup {
        let Some(e) = self.cache.get(key.as_bytes()) else {
            return ItemLookup::Miss;
        };
        if !self.gens.valid(&e) {
            return ItemLookup::Miss;
        }
        if now < e.fresh_until {
            ItemLookup::Fresh(e)
        } else if now < e.stale_until {
            ItemLookup::Stale(e)
        } else {
            ItemLookup::Miss
        }
    }

    /// Marks the start of a fetch.
    pub fn begin_fetch(&self) -> FetchEpoch {
        FetchEpoch(self.gens.epoch.load(Ordering::Acquire))
    }

    /// The slots of `deps`.
    pub fn deps<'a>(&self, deps: impl IntoIterator<Item = (EntityKind, &'a str)>) -> Deps {
        let mut slots = Vec::new();
        let mut kinds = 0u8;
        for (k, id) in deps {
            kinds |= 1 << k.index();
            slots.push(self.gens.slot(k, id));
        }
        slots.sort_unstable();
        slots.dedup();
        Deps {
            slots: slots.into_boxed_slice(),
            kinds,
        }
    }

    /// Whether none of `deps` was invalidated since a fetch began at `epoch` (what
    /// that fetch answered may still be served).
    pub fn unchanged_since(&self, deps: &Deps, epoch: FetchEpoch) -> bool {
        self.gens.unchanged(deps, epoch.0)
    }

    /// Builds an entry of `body` fetched since `epoch`, depending on `deps`.
    pub fn entry(
        &self,
        body: &[u8],
        epoch: FetchEpoch,
        deps: Deps,
        ttl: Duration,
        stale_if_error: Duration,
    ) -> ItemEntry {
        let now = Instant::now();
        let fresh_until = now + ttl;
        ItemEntry {
            body: Bytes::copy_from_slice(body),
            stored_at: now,
            fresh_until,
            stale_until: fresh_until + stale_if_error,
            epoch: epoch.0,
            weight: u32::try_from(weigh_item(body.len(), 0, deps.len())).unwrap_or(u32::MAX),
            deps,
        }
    }

    /// Stores `entry` under `key` unless it was invalidated since its fetch began;
    /// returns whether it was stored.
    pub fn insert(&self, key: ItemKey, entry: Arc<ItemEntry>) -> bool {
        if !self.gens.valid(&entry) {
            return false;
        }
        self.cache.insert(key, entry);
        true
    }

    /// Invalidates one entity: O(1).
    pub fn invalidate(&self, kind: EntityKind, id: &str) {
        let e = self.gens.bump();
        self.gens.slots[self.gens.slot(kind, id) as usize].fetch_max(e, Ordering::AcqRel);
    }

    /// Invalidates every entity of `kind`.
    pub fn invalidate_kind(&self, kind: EntityKind) {
        let e = self.gens.bump();
        self.gens.kind_floors[kind.index()].fetch_max(e, Ordering::AcqRel);
    }

    /// Invalidates everything (and frees the entries).
    pub fn invalidate_all(&self) -> u64 {
        let e = self.gens.bump();
        self.gens.all_floor.fetch_max(e, Ordering::AcqRel);
        let n = self.cache.entry_count();
        self.cache.invalidate_all();
        n
    }

    /// Current sizes.
    pub fn stats(&self) -> ItemStats {
        self.cache.run_pending_tasks();
        ItemStats {
            entries: self.cache.entry_count(),
            weighted_bytes: self.cache.weighted_size(),
            table_bytes: (self.gens.slots.len() * 8) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EntityKind as K;

    const T: Duration = Duration::from_secs(60);

    fn store() -> ItemStore {
        ItemStore::new(1 << 20)
    }

    fn put(s: &ItemStore, item: &str, deps: &[(K, &str)], epoch: FetchEpoch) -> bool {
        let v = s.variant_id(0, "");
        let key = KeyBuf::new(0, v, item).unwrap();
        let e = s.entry(item.as_bytes(), epoch, s.deps(deps.iter().copied()), T, T);
        s.insert(key.to_key(), Arc::new(e))
    }

    fn fresh(s: &ItemStore, item: &str) -> bool {
        let v = s.variant_id(0, "");
        matches!(
            s.lookup(&KeyBuf::new(0, v, item).unwrap(), Instant::now()),
            ItemLookup::Fresh(_)
        )
    }

    #[test]
    fn an_entity_invalidates_every_entry_that_depends_on_it() {
        let s = store();
        assert!(put(&s, "a", &[(K::Profile, "a")], s.begin_fetch()));
        assert!(put(
            &s,
            "x/a",
            &[(K::Friends, "x"), (K::Profile, "a")],
            s.begin_fetch()
        ));
        assert!(put(&s, "b", &[(K::Profile, "b")], s.begin_fetch()));
        assert!(fresh(&s, "a") && fresh(&s, "x/a") && fresh(&s, "b"));
        s.invalidate(K::Profile, "a");
        assert!(!fresh(&s, "a") && !fresh(&s, "x/a"));
        assert!(fresh(&s, "b"));
        // The same name of another kind is another entity.
        s.invalidate(K::Friends, "b");
        assert!(fresh(&s, "b"));
        // A new fetch stores again.
        assert!(put(&s, "a", &[(K::Profile, "a")], s.begin_fetch()));
        assert!(fresh(&s, "a"));
    }

    #[test]
    fn a_fetch_overtaken_by_an_invalidation_is_never_served() {
        let s = store();
        let e = s.begin_fetch();
        s.invalidate(K::Exists, "a");
        assert!(!put(&s, "a", &[(K::Exists, "a")], e));
        assert!(!fresh(&s, "a"));
        // Stored first, invalidated later: refused at lookup.
        let e = s.begin_fetch();
        let v = s.variant_id(0, "");
        let entry = Arc::new(s.entry(b"a", e, s.deps([(K::Exists, "a")]), T, T));
        s.invalidate(K::Exists, "a");
        s.cache
            .insert(KeyBuf::new(0, v, "a").unwrap().to_key(), entry);
        assert!(!fresh(&s, "a"));
    }

    #[test]
    fn kind_and_all_floors() {
        let s = store();
        assert!(put(&s, "f", &[(K::Friends, "u")], s.begin_fetch()));
        assert!(put(&s, "p", &[(K::Profile, "u")], s.begin_fetch()));
        s.invalidate_kind(K::Friends);
        assert!(!fresh(&s, "f"));
        assert!(fresh(&s, "p"));
        s.invalidate_all();
        assert!(!fresh(&s, "p"));
        assert!(put(&s, "p", &[(K::Profile, "u")], s.begin_fetch()));
        assert!(fresh(&s, "p"));
    }

    #[test]
    fn variants_are_told_apart() {
        let s = store();
        let a = s.variant_id(0, r#","TagList":["a"]"#);
        let b = s.variant_id(0, r#","TagList":["b"]"#);
        assert_ne!(a, b);
        assert_ne!(s.variant_id(1, ""), s.variant_id(0, ""));
        assert_eq!(a, s.variant_id(0, r#","TagList":["a"]"#));
        let e = s.entry(b"x", s.begin_fetch(), s.deps([(K::Profile, "u")]), T, T);
        assert!(s.insert(KeyBuf::new(0, a, "u").unwrap().to_key(), Arc::new(e)));
        assert!(matches!(
            s.lookup(&KeyBuf::new(0, b, "u").unwrap(), Instant::now()),
            ItemLookup::Miss
        ));
    }

    #[test]
    fn stale_is_told_apart_from_fresh() {
        let s = store();
        let v = s.variant_id(0, "");
        let e = s.entry(
            b"x",
            s.begin_fetch(),
            s.deps([(K::Profile, "u")]),
            Duration::ZERO,
            T,
        );
        assert!(s.insert(KeyBuf::new(0, v, "u").unwrap().to_key(), Arc::new(e)));
        assert!(matches!(
            s.lookup(&KeyBuf::new(0, v, "u").unwrap(), Instant::now()),
            ItemLookup::Stale(_)
        ));
    }

    #[test]
    fn entries_and_table_stay_within_the_share() {
        let share = 256 * 1024;
        let s = ItemStore::new(share);
        let body = vec![b'x'; 200];
        for i in 0..5000 {
            let v = s.variant_id(0, "");
            let item = format!("user_{i:05}");
            let e = s.entry(
                &body,
                s.begin_fetch(),
                s.deps([(K::Profile, item.as_str())]),
                T,
                T,
            );
            s.insert(KeyBuf::new(0, v, &item).unwrap().to_key(), Arc::new(e));
        }
        let st = s.stats();
        assert!(st.weighted_bytes + st.table_bytes <= share, "{st:?}");
        assert!(st.entries > 100 && st.entries < 5000, "{st:?}");
        let per = st.weighted_bytes / st.entries;
        assert!(per as usize >= body.len() + ITEM_OVERHEAD, "{per}");
    }

    #[test]
    fn keys_never_overflow_their_buffer() {
        let v = VariantId(7);
        assert!(KeyBuf::new(0, v, &"x".repeat(64)).is_some());
        assert!(KeyBuf::new(0, v, &"x".repeat(65)).is_none());
    }
}
