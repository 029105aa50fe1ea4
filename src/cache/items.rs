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
//! An invalidated entry is dead weight until the eviction reaches it or its stale
//! window ends; a newer fetch of the same key replaces it.
//!
//! **The table: sharded, read-mostly, no per-hit bookkeeping.** A fully cached
//! batched read looks up every item (20 for a typical portrait_get), so a lookup must
//! cost little: the key is hashed once with a fast keyed hash (foldhash, seeded per
//! process), that hash picks one of up to [`MAX_SHARDS`] shards and the bucket in
//! the shard's hash table; the shard's read lock is held only to clone the entry's
//! `Arc`. A hit records nothing but a "visited" bit. Each shard evicts by CLOCK
//! (second chance) over its insertion queue when its share of the budget is full;
//! entries past their stale window and entries a generation invalidated go first,
//! whenever an insert passes them.
//!
//! **Memory.** Entries are weighed at what they cost ([`weigh_item`]): the item's
//! bytes (an exact-size copy of its slice of Chat's answer), the key, the
//! dependency slots and a fixed overhead for the table slot, the queue record, the
//! entry itself and the allocator's rounding. The store's share of
//! `cache.max_bytes` (`cache.items_percent`) pays for the generation table too (one
//! 8-byte slot per 64 bytes of the share), so entries and table together stay
//! within it: each shard holds at most its part of the rest.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashTable;

use crate::chat::effects::EntityKind;

/// Bytes counted per entry on top of its item bytes, key and dependencies: its
/// table slot (40 bytes, at most 8/7 of it with the table's load factor) and queue
/// record (16, up to twice while replaced entries wait to be compacted), the
/// `Arc<ItemEntry>` allocation (about 150 bytes), the key's and the body's
/// allocations and the allocator's rounding of each (up to 64 bytes apiece).
pub const ITEM_OVERHEAD: usize = 384;
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
/// Most shards of the table.
pub const MAX_SHARDS: usize = 64;
/// Least budget a shard gets (fewer shards for a small share).
const MIN_SHARD_BYTES: u64 = 256 * 1024;

/// What one entry weighs, in bytes.
pub fn weigh_item(body_len: usize, key_len: usize, deps: usize) -> usize {
    body_len + key_len + deps * DEP_OVERHEAD + ITEM_OVERHEAD
}

/// The id of a request's other fields (everything but the items), canonical.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VariantId(pub u128);

/// A key in a stack buffer.
pub struct KeyBuf {
    buf: [u8; MAX_KEY],
    len: usize,
}

impl KeyBuf {
    /// The key of `item` of `row` in `variant`; `None` when the item is longer than
    /// any row allows (such requests are never split).
    #[inline]
    pub fn new(row: usize, variant: VariantId, item: &str) -> Option<KeyBuf> {
        Self::of_bytes(row, variant, item.as_bytes())
    }

    /// [`KeyBuf::new`] of an item's bytes (UTF-8).
    #[inline]
    pub fn of_bytes(row: usize, variant: VariantId, item: &[u8]) -> Option<KeyBuf> {
        let len = 17 + item.len();
        if len > MAX_KEY {
            return None;
        }
        let mut buf = [0u8; MAX_KEY];
        buf[0] = row as u8;
        buf[1..17].copy_from_slice(&variant.0.to_le_bytes());
        buf[17..len].copy_from_slice(item);
        Some(KeyBuf { buf, len })
    }

    /// The key's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// An owned copy, for storing and for coalescing.
    pub fn to_key(&self) -> ItemKey {
        Arc::from(self.as_bytes())
    }

    /// The stack form of an owned key.
    pub fn from_key(key: &[u8]) -> Option<KeyBuf> {
        let mut buf = [0u8; MAX_KEY];
        buf.get_mut(..key.len())?.copy_from_slice(key);
        Some(KeyBuf {
            buf,
            len: key.len(),
        })
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
    #[inline]
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

    #[inline]
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
    /// The same bytes after a comma (one allocation with `body`): how an item that is
    /// not the first of an answer is written.
    with_comma: Bytes,
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
    /// Read since the eviction last passed it.
    visited: AtomicBool,
}

impl ItemEntry {
    /// `,` and the item's JSON: how it follows another item in an answer.
    #[inline]
    pub fn with_comma(&self) -> &[u8] {
        &self.with_comma
    }
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

/// One entry of a shard's table.
struct Slot {
    hash: u64,
    /// Its insertion number in the shard (its queue record names it).
    seq: u64,
    key: ItemKey,
    entry: Arc<ItemEntry>,
}

impl Slot {
    fn weight(&self) -> u64 {
        u64::from(self.entry.weight) + self.key.len() as u64
    }
}

/// A part of the table, under its own lock.
#[derive(Default)]
struct Shard {
    table: HashTable<Slot>,
    /// Insertion order: (hash, seq) of each entry; records of replaced or removed
    /// entries are skipped (and compacted away).
    queue: VecDeque<(u64, u64)>,
    weight: u64,
    next_seq: u64,
}

impl Shard {
    /// Makes room (CLOCK over the insertion queue) until the shard is within
    /// `budget`, dropping on the way every dead entry at the front (expired, or
    /// invalidated per `gens`).
    fn evict(&mut self, budget: u64, gens: &Generations, now: Instant) {
        let Shard {
            table,
            queue,
            weight,
            ..
        } = self;
        // Each live record is passed at most twice (its visited bit cleared the
        // first time), so this ends.
        let mut passes = 2 * queue.len() + 1;
        while let Some(&(h, seq)) = queue.front() {
            if passes == 0 {
                break;
            }
            passes -= 1;
            let over = *weight > budget;
            let Ok(slot) = table.find_entry(h, |s| s.seq == seq) else {
                queue.pop_front();
                continue;
            };
            let e = &slot.get().entry;
            let dead = now >= e.stale_until || !gens.valid(e);
            if dead || (over && !e.visited.load(Ordering::Relaxed)) {
                *weight = weight.saturating_sub(slot.get().weight());
                slot.remove();
                queue.pop_front();
            } else if over {
                e.visited.store(false, Ordering::Relaxed);
                queue.pop_front();
                queue.push_back((h, seq));
            } else {
                break;
            }
        }
        if queue.len() > 2 * table.len() + 64 {
            queue.retain(|(h, seq)| table.find(*h, |s| s.seq == *seq).is_some());
        }
    }
}

/// The item store.
pub struct ItemStore {
    shards: Box<[RwLock<Shard>]>,
    /// Bits of a key's hash that pick its shard start here (above the bits the
    /// shard's table uses for the bucket, below those it keeps as tags).
    shard_mask: u64,
    shard_budget: u64,
    /// Keyed per process.
    hasher: foldhash::fast::RandomState,
    gens: Generations,
    /// Two keys for the 128-bit variant ids.
    variant_keys: [std::collections::hash_map::RandomState; 2],
    /// This store among the process's (for the per-thread memo of variant ids).
    id: u64,
}

/// One remembered variant id.
#[derive(Default)]
struct Memo {
    store: u64,
    row: usize,
    text: Vec<u8>,
    id: VariantId,
}

thread_local! {
    /// The last variant ids this thread computed (any store's: each names its own).
    static VARIANT_MEMO: std::cell::RefCell<[Memo; 4]> = std::cell::RefCell::default();
}

/// Ids of stores, from 1.
static STORES: AtomicU64 = AtomicU64::new(1);

/// Where the shard index sits in a key's hash.
const SHARD_SHIFT: u32 = 40;

impl std::fmt::Debug for ItemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.stats();
        f.debug_struct("ItemStore")
            .field("entries", &s.entries)
            .field("weighted_bytes", &s.weighted_bytes)
            .field("slots", &self.gens.slots.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// A key's parts: the row's byte, the variant id, the item (as [`KeyBuf::of_bytes`]
/// writes them; a key too short for them, which no [`KeyBuf`] is, gives zeros).
#[inline]
fn split_key(key: &[u8]) -> (u8, u128, &[u8]) {
    let (head, item) = key.split_at(key.len().min(17));
    let variant = head
        .get(1..17)
        .and_then(|v| <[u8; 16]>::try_from(v).ok())
        .map_or(0, u128::from_le_bytes);
    (head.first().copied().unwrap_or(0), variant, item)
}

/// Whether two keys are equal: eight bytes at a time, inline (keys are short, and a
/// call to `memcmp` costs more than comparing them).
#[inline]
fn key_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_ne_bytes);
    let (mut x, mut y) = (a.chunks_exact(8), b.chunks_exact(8));
    for (p, q) in (&mut x).zip(&mut y) {
        if word(p) != word(q) {
            return false;
        }
    }
    x.remainder().iter().zip(y.remainder()).all(|(p, q)| p == q)
}

fn read(s: &RwLock<Shard>) -> std::sync::RwLockReadGuard<'_, Shard> {
    s.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(s: &RwLock<Shard>) -> std::sync::RwLockWriteGuard<'_, Shard> {
    s.write().unwrap_or_else(PoisonError::into_inner)
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
        let entries = share.saturating_sub(table);
        let mut shards = 1usize;
        while shards < MAX_SHARDS && entries / (2 * shards as u64) >= MIN_SHARD_BYTES {
            shards *= 2;
        }
        ItemStore {
            shards: (0..shards).map(|_| RwLock::default()).collect(),
            shard_mask: shards as u64 - 1,
            shard_budget: entries / shards as u64,
            hasher: foldhash::fast::RandomState::default(),
            gens: Generations::new(slots),
            variant_keys: Default::default(),
            id: STORES.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A key's hash: the item's bytes hashed (foldhash, keyed per process) and mixed
    /// with the row and variant id (which are themselves keyed hashes).
    #[inline]
    fn hash(&self, key: &[u8]) -> u64 {
        let (row, variant, item) = split_key(key);
        self.hash_parts(row, variant, item)
    }

    /// [`ItemStore::hash`] of a key given as its parts (the row's byte, the variant
    /// id, the item), without writing the key out.
    #[inline(always)]
    fn hash_parts(&self, row: u8, variant: u128, item: &[u8]) -> u64 {
        let v = (variant as u64) ^ ((variant >> 64) as u64).rotate_left(29);
        let h = self.hasher.hash_one(item) ^ v ^ u64::from(row);
        // One multiply-xorshift round so that the variant's bits reach every bit used.
        let h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }

    /// The hash of the key of `item` of `row` in `variant` (what the store hashes
    /// its [`KeyBuf`] to); `None` when no key can hold the item.
    #[inline]
    pub fn item_hash(&self, row: usize, variant: VariantId, item: &[u8]) -> Option<u64> {
        (17 + item.len() <= MAX_KEY).then(|| self.hash_parts(row as u8, variant.0, item))
    }

    /// [`ItemStore::lookup`] of the key of `item` of `row` in `variant` whose
    /// [`ItemStore::item_hash`] is `h`, without writing the key out (the hit path's
    /// lookup, which hashes every item anyway to tell items named twice).
    #[inline]
    pub fn lookup_item(
        &self,
        row: usize,
        variant: VariantId,
        item: &[u8],
        h: u64,
        now: Instant,
    ) -> ItemLookup {
        self.find(row as u8, variant.0, item, h, now)
    }

    /// The one way an entry is found: by its key's parts and their hash. Holds the
    /// shard's read lock only to clone the entry's `Arc`; allocates nothing.
    #[inline(always)]
    fn find(&self, row: u8, variant: u128, item: &[u8], h: u64, now: Instant) -> ItemLookup {
        let vid = variant.to_le_bytes();
        let found = {
            let shard = read(self.shard(h));
            shard
                .table
                .find(h, |s| {
                    s.hash == h
                        && s.key.len() == 17 + item.len()
                        && s.key[0] == row
                        && s.key[1..17] == vid
                        && key_eq(&s.key[17..], item)
                })
                .map(|s| s.entry.clone())
        };
        let Some(e) = found else {
            return ItemLookup::Miss;
        };
        // Read: the eviction gives it a second chance.
        if !e.visited.load(Ordering::Relaxed) {
            e.visited.store(true, Ordering::Relaxed);
        }
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

    #[inline]
    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[((hash >> SHARD_SHIFT) & self.shard_mask) as usize]
    }

    /// The id of `variant` (a row's canonical other fields) for `row`. The last few
    /// variants each thread asked for are remembered (the same TagList comes again
    /// and again), so a hit usually compares bytes instead of hashing them.
    pub fn variant_id(&self, row: usize, variant: &str) -> VariantId {
        self.variant_id_of(row, variant.as_bytes())
    }

    /// [`ItemStore::variant_id`] of the variant's bytes (UTF-8).
    pub fn variant_id_of(&self, row: usize, variant: &[u8]) -> VariantId {
        VARIANT_MEMO.with(|m| {
            let mut m = m.borrow_mut();
            let found = m
                .iter()
                .find(|e| e.store == self.id && e.row == row && e.text.as_slice() == variant);
            if let Some(e) = found {
                return e.id;
            }
            let id = self.variant_id_uncached(row, variant);
            m.rotate_right(1);
            let e = &mut m[0];
            (e.store, e.row, e.id) = (self.id, row, id);
            e.text.clear();
            e.text.extend_from_slice(variant);
            id
        })
    }

    fn variant_id_uncached(&self, row: usize, variant: &[u8]) -> VariantId {
        let h = |k: &std::collections::hash_map::RandomState| {
            let mut h = k.build_hasher();
            h.write_usize(row);
            h.write(variant);
            h.write_u8(0xff);
            h.finish()
        };
        VariantId(
            (u128::from(h(&self.variant_keys[0])) << 64) | u128::from(h(&self.variant_keys[1])),
        )
    }

    /// Finds an entry (see [`ItemStore::find`]).
    #[inline]
    pub fn lookup(&self, key: &KeyBuf, now: Instant) -> ItemLookup {
        let (row, variant, item) = split_key(key.as_bytes());
        self.find(row, variant, item, self.hash_parts(row, variant, item), now)
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

    /// Builds an entry of `body` fetched since `epoch`, depending on `deps`, stored
    /// now.
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
        self.entry_at(
            body,
            epoch,
            deps,
            now,
            fresh_until,
            fresh_until + stale_if_error,
        )
    }

    /// Builds an entry with given times (an entry from the fleet's L2, stamped on
    /// Redis's clock).
    pub fn entry_at(
        &self,
        body: &[u8],
        epoch: FetchEpoch,
        deps: Deps,
        stored_at: Instant,
        fresh_until: Instant,
        stale_until: Instant,
    ) -> ItemEntry {
        let mut v = Vec::with_capacity(body.len() + 1);
        v.push(b',');
        v.extend_from_slice(body);
        let with_comma = Bytes::from(v);
        ItemEntry {
            body: with_comma.slice(1..),
            with_comma,
            stored_at,
            fresh_until,
            stale_until,
            epoch: epoch.0,
            weight: u32::try_from(weigh_item(body.len(), 0, deps.len())).unwrap_or(u32::MAX),
            deps,
            visited: AtomicBool::new(false),
        }
    }

    /// Stores `entry` under `key` unless it was invalidated since its fetch began
    /// (or weighs more than a shard holds); returns whether it was stored.
    pub fn insert(&self, key: ItemKey, entry: Arc<ItemEntry>) -> bool {
        if !self.gens.valid(&entry) {
            return false;
        }
        let h = self.hash(&key);
        let slot_weight = u64::from(entry.weight) + key.len() as u64;
        if slot_weight > self.shard_budget {
            return false;
        }
        let now = Instant::now();
        let mut shard = write(self.shard(h));
        let s = &mut *shard;
        let seq = s.next_seq;
        s.next_seq += 1;
        match s.table.find_entry(h, |x| x.hash == h && *x.key == *key) {
            Ok(mut old) => {
                let old = old.get_mut();
                s.weight = s.weight.saturating_sub(old.weight());
                old.seq = seq;
                old.entry = entry;
            }
            Err(_) => {
                s.table.insert_unique(
                    h,
                    Slot {
                        hash: h,
                        seq,
                        key,
                        entry,
                    },
                    |x| x.hash,
                );
            }
        }
        s.weight += slot_weight;
        s.queue.push_back((h, seq));
        s.evict(self.shard_budget, &self.gens, now);
        true
    }

    /// Stores without the validity check (a test of what lookups refuse).
    #[cfg(test)]
    fn force_insert(&self, key: ItemKey, entry: Arc<ItemEntry>) {
        let h = self.hash(&key);
        let mut s = write(self.shard(h));
        let seq = s.next_seq;
        s.next_seq += 1;
        s.table.insert_unique(
            h,
            Slot {
                hash: h,
                seq,
                key,
                entry,
            },
            |x| x.hash,
        );
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

    /// Invalidates everything (and frees the entries); returns how many there were.
    pub fn invalidate_all(&self) -> u64 {
        let e = self.gens.bump();
        self.gens.all_floor.fetch_max(e, Ordering::AcqRel);
        let mut n = 0;
        for s in self.shards.iter() {
            let mut s = write(s);
            n += s.table.len() as u64;
            s.table.clear();
            s.queue.clear();
            s.weight = 0;
        }
        n
    }

    /// Current sizes.
    pub fn stats(&self) -> ItemStats {
        let mut st = ItemStats {
            table_bytes: (self.gens.slots.len() * 8) as u64,
            ..ItemStats::default()
        };
        for s in self.shards.iter() {
            let s = read(s);
            st.entries += s.table.len() as u64;
            st.weighted_bytes += s.weight;
        }
        st
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
        s.force_insert(KeyBuf::new(0, v, "a").unwrap().to_key(), entry);
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
        // The memo answers what the hash does, per store and per row.
        let other = store();
        for _ in 0..3 {
            for (st, row, v) in [
                (&s, 0, "a"),
                (&s, 1, "a"),
                (&other, 0, "a"),
                (&s, 0, "b"),
                (&s, 0, "c"),
                (&s, 0, "d"),
                (&s, 0, "e"),
            ] {
                assert_eq!(
                    st.variant_id(row, v),
                    st.variant_id_uncached(row, v.as_bytes())
                );
            }
        }
        assert_ne!(s.variant_id(0, "a"), other.variant_id(0, "a"));
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
    fn the_hit_path_lookup_by_parts_is_the_lookup_by_key() {
        let s = store();
        let (a, b) = (s.variant_id(0, ""), s.variant_id(0, r#","TagList":["b"]"#));
        for (row, v, item) in [(0, a, "u"), (1, a, "u"), (0, b, "u"), (0, a, "uv")] {
            let e = s.entry(item.as_bytes(), s.begin_fetch(), s.deps([]), T, T);
            let key = KeyBuf::new(row, v, item).unwrap();
            assert!(s.insert(key.to_key(), Arc::new(e)));
        }
        let now = Instant::now();
        let long = "x".repeat(MAX_KEY - 17);
        for row in 0..3 {
            for v in [a, b, s.variant_id(2, "")] {
                for item in ["u", "uv", "v", "", "uvw", long.as_str()] {
                    let key = KeyBuf::new(row, v, item).unwrap();
                    let h = s.item_hash(row, v, item.as_bytes()).unwrap();
                    assert_eq!(h, s.hash(key.as_bytes()), "{row} {item}");
                    let by_key = s.lookup(&key, now);
                    let by_parts = s.lookup_item(row, v, item.as_bytes(), h, now);
                    match (&by_key, &by_parts) {
                        (ItemLookup::Fresh(x), ItemLookup::Fresh(y)) => {
                            assert!(Arc::ptr_eq(x, y));
                            assert_eq!(&x.body[..], item.as_bytes());
                        }
                        (ItemLookup::Miss, ItemLookup::Miss) => {}
                        _ => panic!("{row} {item}: {by_key:?} vs {by_parts:?}"),
                    }
                }
            }
        }
        // An item no key can hold has no hash (as it has no key).
        assert!(s.item_hash(0, a, long.as_bytes()).is_some());
        assert!(s.item_hash(0, a, format!("{long}x").as_bytes()).is_none());
        assert!(KeyBuf::new(0, a, &format!("{long}x")).is_none());
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
    fn eviction_gives_read_entries_a_second_chance_and_drops_dead_ones_first() {
        // One shard (a small share), room for about 40 entries of 1 KB.
        let s = ItemStore::new(64 * 1024);
        assert_eq!(s.shards.len(), 1);
        let v = s.variant_id(0, "");
        let body = vec![b'x'; 1000];
        let add = |item: &str| {
            let e = s.entry(&body, s.begin_fetch(), s.deps([(K::Profile, item)]), T, T);
            assert!(s.insert(KeyBuf::new(0, v, item).unwrap().to_key(), Arc::new(e)));
        };
        add("hot");
        for i in 0..10 {
            add(&format!("dead{i}"));
            s.invalidate(K::Profile, &format!("dead{i}"));
        }
        for i in 0..200 {
            // Read the hot entry between inserts: it is never the one evicted.
            assert!(fresh(&s, "hot"), "evicted after {i} inserts");
            add(&format!("cold{i}"));
        }
        let st = s.stats();
        assert!(st.weighted_bytes + st.table_bytes <= 64 * 1024, "{st:?}");
        // Invalidated entries were dropped before any live one.
        let sh = read(&s.shards[0]);
        assert!(sh
            .table
            .iter()
            .all(|x| !x.key.ends_with(b"dead0") && !x.key.ends_with(b"dead9")));
        // Replacing an entry again and again neither leaks weight nor grows the queue.
        drop(sh);
        let before = s.stats().weighted_bytes;
        for _ in 0..1000 {
            add("cold199");
        }
        assert_eq!(s.stats().weighted_bytes, before);
        assert!(read(&s.shards[0]).queue.len() <= 2 * s.stats().entries as usize + 65);
    }

    #[test]
    fn shards_split_the_budget() {
        let share = 64 << 20;
        let s = ItemStore::new(share);
        assert_eq!(s.shards.len(), MAX_SHARDS);
        let v = s.variant_id(0, "");
        let body = vec![b'x'; 4000];
        for i in 0..40_000 {
            let item = format!("u{i}");
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
        // Every shard was used, and filled to most of its part.
        assert!(
            st.weighted_bytes > (share - st.table_bytes) * 9 / 10,
            "{st:?}"
        );
        assert_eq!(s.invalidate_all(), st.entries);
        assert_eq!(s.stats().entries, 0);
    }

    #[test]
    fn keys_never_overflow_their_buffer() {
        let v = VariantId(7);
        assert!(KeyBuf::new(0, v, &"x".repeat(64)).is_some());
        assert!(KeyBuf::new(0, v, &"x".repeat(65)).is_none());
    }
}
