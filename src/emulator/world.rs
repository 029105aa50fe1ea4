//! The synthetic Chat world: accounts, groups, every account's conversation list and
//! its marks and conversation groups, generated deterministically from a seed and
//! kept consistent by the write commands.
//!
//! Shape of a generated world (see `docs/emulator.md`):
//! - accounts `user_0001` ... `user_NNNN` (zero padded to at least 4 digits);
//! - one-to-one conversations are symmetric: if A has B, B has A, with the same
//!   MsgTime (the time of their last message);
//! - groups `@TGS#...` with 3 to 40 members; every member has the group conversation
//!   with the group's last message time;
//! - "heavy" accounts (`user_0001` and every 10th) have 130 to 200 one-to-one
//!   partners of their own (more than one page), many pinned conversations, and a few
//!   bursts of conversations sharing one MsgTime, so cursors must use `StartIndex`;
//! - some conversations are pinned, marked (StandardMark, CustomMark) or in
//!   conversation groups (ContactGroupId, GroupItem).
//!
//! - every account has a profile (generated from the seed on demand, stored once
//!   written: `profile`), a friend list (`sns`), and is "imported" until
//!   `account_delete`; `account_import` adds accounts with any UserID;
//! - groups carry their whole profile and member rows (`groups`).
//!
//! Each account's state sits behind its own `RwLock`, so reads of different (or the
//! same) accounts run in parallel and a write locks only the accounts it changes.
//! All groups sit behind one `RwLock` (the group table). Lock order, everywhere: the
//! group table first, then accounts in ascending index; a handler that needs several
//! accounts in another order takes them one at a time. The name and GroupId indexes
//! are leaf locks: nothing else is taken while one is held.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::Value;

use super::groups::{self, GroupTable, RawGroup};
use super::profile::ProfileTag;
use super::rng::{mix64, SplitMix64};
use super::sns::{self, Friend};

/// 2026-01-01T00:00:00Z: the base of every world's epoch.
const BASE_EPOCH: u64 = 1_767_225_600;
/// MsgTimes spread over the eight weeks before the epoch.
const SPAN_SECS: u64 = 8 * 7 * 86_400;
/// Conversation groups a user may have (Chat's documented limit).
pub(crate) const MAX_CONTACT_GROUPS: usize = 20;
/// Conversations with marks or groups a user may have (Chat's documented limit).
pub(crate) const MAX_MARKED: usize = 1000;
/// Accounts `account_import` may add beyond the generated ones (then 70398).
pub(crate) const EXTRA_ACCOUNTS: u32 = 10_000;
/// Groups `create_group` may add beyond the generated ones.
pub(crate) const EXTRA_GROUPS: u32 = 10_000;

/// The other side of a conversation. `User` sorts before `Group`, which fixes the
/// order of conversations that share a MsgTime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Peer {
    /// A one-to-one conversation with the account at this index.
    User(u32),
    /// A group conversation with the group at this index.
    Group(u32),
}

/// One entry of a conversation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conv {
    /// Unix seconds of the conversation's latest message; never 0.
    pub msg_time: u64,
    /// Who the conversation is with.
    pub peer: Peer,
}

/// The list order: newest first, then by peer. Both conversation lists of an account
/// are kept sorted by this key; paging depends on it.
pub(crate) fn order_key(c: &Conv) -> (Reverse<u64>, Peer) {
    (Reverse(c.msg_time), c.peer)
}

/// Marks and conversation-group membership of one conversation. Chat keeps these
/// apart from the conversation list: deleting a conversation keeps its marks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Mark {
    /// Standard mark bits (bit 0 is the rightmost character of `StandardMark`).
    pub standard: u64,
    /// Custom mark; empty when unset.
    pub custom: String,
    /// Ids of the conversation groups the conversation is in, ascending.
    pub groups: Vec<u32>,
    /// Unix seconds of the last change (get_contact_group's `Timestamp`).
    pub timestamp: u64,
}

impl Mark {
    /// Nothing set: such an entry is removed.
    pub(crate) fn is_empty(&self) -> bool {
        self.standard == 0 && self.custom.is_empty() && self.groups.is_empty()
    }

    /// `StandardMark` as Chat writes it: a bit string, most significant bit first.
    pub(crate) fn standard_string(&self) -> Option<String> {
        (self.standard != 0).then(|| format!("{:b}", self.standard))
    }
}

/// A user's conversation group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContactGroup {
    /// Per-user id, allocated from 1 and never reused.
    pub id: u32,
    /// Display name, at most 32 bytes, unique per user.
    pub name: String,
}

/// Everything one account owns.
#[derive(Debug, Clone, Default)]
pub(crate) struct Account {
    /// Pinned conversations, sorted by [`order_key`].
    pub top: Vec<Conv>,
    /// General conversations, sorted by [`order_key`].
    pub general: Vec<Conv>,
    /// Marks and group membership per conversation, ordered by peer.
    pub marks: BTreeMap<Peer, Mark>,
    /// Conversation groups, in creation order.
    pub contact_groups: Vec<ContactGroup>,
    /// Next conversation group id.
    pub next_group_id: u32,
    /// The newest MsgTime this account has ever had: a new message gets a later one.
    pub max_time: u64,
    /// Imported (exists for every API); false for a free slot or after
    /// `account_delete`.
    pub imported: bool,
    /// The profile once written (`portrait_set`, import, delete); `None` while it is
    /// still the one generated from the seed.
    pub profile: Option<BTreeMap<ProfileTag, Value>>,
    /// The friend list: friend account index → friend data.
    pub friends: BTreeMap<u32, Friend>,
    /// `StandardSequence` of the friend list: grows on every change.
    pub std_seq: u64,
    /// `CustomSequence` of the friend list: grows when custom friend data changes.
    pub custom_seq: u64,
}

impl Account {
    /// Where `peer`'s conversation is: `(pinned, index)`.
    pub(crate) fn position(&self, peer: Peer) -> Option<(bool, usize)> {
        if let Some(i) = self.top.iter().position(|c| c.peer == peer) {
            return Some((true, i));
        }
        self.general
            .iter()
            .position(|c| c.peer == peer)
            .map(|i| (false, i))
    }

    /// Removes `peer`'s conversation; returns it and whether it was pinned.
    pub(crate) fn remove(&mut self, peer: Peer) -> Option<(Conv, bool)> {
        let (top, i) = self.position(peer)?;
        let list = if top {
            &mut self.top
        } else {
            &mut self.general
        };
        Some((list.remove(i), top))
    }

    /// Inserts a conversation at its sorted place.
    pub(crate) fn insert(&mut self, conv: Conv, top: bool) {
        let list = if top {
            &mut self.top
        } else {
            &mut self.general
        };
        let key = order_key(&conv);
        let at = list.partition_point(|c| order_key(c) < key);
        list.insert(at, conv);
        self.max_time = self.max_time.max(conv.msg_time);
    }

    /// A new message in the conversation with `peer` at time `t`: moves it (creating
    /// it when absent, unpinned) to its new place. Pinned stays pinned.
    pub(crate) fn touch(&mut self, peer: Peer, t: u64) {
        let top = self.remove(peer).map(|(_, top)| top).unwrap_or(false);
        self.insert(Conv { msg_time: t, peer }, top);
    }

    /// Number of conversations, pinned and general.
    pub(crate) fn len(&self) -> usize {
        self.top.len() + self.general.len()
    }

    /// The conversation group called `name`.
    pub(crate) fn group_by_name(&self, name: &str) -> Option<&ContactGroup> {
        self.contact_groups.iter().find(|g| g.name == name)
    }

    /// The state of an account just (re-)imported: nothing but its existence and an
    /// empty profile; conversation groups start at 1 again.
    pub(crate) fn reset_imported(&mut self) {
        let std_seq = self.std_seq + 1;
        let custom_seq = self.custom_seq + 1;
        *self = Account {
            imported: true,
            next_group_id: 1,
            profile: Some(BTreeMap::new()),
            std_seq,
            custom_seq,
            ..Account::default()
        };
    }
}

/// Why an account slot could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotError {
    /// Every extra slot is taken.
    Full,
}

/// The whole world: accounts (generated, then imported ones in extra slots),
/// conversation lists, marks and conversation groups, profiles, friends and groups.
pub(crate) struct World {
    seed: u64,
    epoch: u64,
    width: usize,
    names: Vec<Box<str>>,
    /// Names of imported accounts beyond the generated ones, slot `names.len() + k`.
    extra_names: Vec<OnceLock<Box<str>>>,
    /// Name → slot for the extra accounts.
    extra_index: RwLock<HashMap<Box<str>, u32>>,
    accounts: Vec<RwLock<Account>>,
    /// Every group id ever used, by group slot (set once, never changed).
    group_ids: Vec<OnceLock<Box<str>>>,
    generated_groups: u32,
    groups: RwLock<GroupTable>,
    /// Live GroupId → group slot. A leaf lock: nothing else is locked while it is
    /// held, so any handler may look a group up whatever it holds; it changes only
    /// under the group table's write lock.
    group_index: RwLock<HashMap<Box<str>, u32>>,
}

/// Reads a lock, recovering the data if a writer panicked (writes keep the lists
/// sorted at every step, so the data stays usable).
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks, recovering the data if a writer panicked.
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// An account is "heavy" (more than a page of conversations) when it is `user_0001`
/// or its number is a multiple of 10.
pub(crate) fn is_heavy(index: u32) -> bool {
    index == 0 || (index + 1).is_multiple_of(10)
}

/// Account name for a 0-based index, zero padded to `width` digits.
fn account_name(index: u32, width: usize) -> String {
    format!("user_{:0width$}", u64::from(index) + 1)
}

fn random_group_id(rng: &mut SplitMix64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut s = String::with_capacity(14);
    s.push_str("@TGS#");
    s.push(char::from(b'1' + rng.below(9) as u8));
    for _ in 0..8 {
        s.push(char::from(
            ALPHABET[rng.below(ALPHABET.len() as u64) as usize],
        ));
    }
    s
}

impl World {
    /// Generates the world for `accounts` accounts from `seed`. The same inputs always
    /// give the same world.
    pub(crate) fn generate(accounts: u32, seed: u64) -> World {
        let n = accounts.max(1);
        let mut rng = SplitMix64::new(mix64(seed ^ 0x00C4_A7E0_u64));
        let epoch = BASE_EPOCH + rng.below(30 * 86_400);
        let width = n.to_string().len().max(4);
        let names: Vec<Box<str>> = (0..n)
            .map(|i| account_name(i, width).into_boxed_str())
            .collect();
        let mut accts: Vec<Account> = (0..n)
            .map(|_| Account {
                next_group_id: 1,
                imported: true,
                ..Account::default()
            })
            .collect();

        let msg_time = |rng: &mut SplitMix64| {
            let off = rng.below(SPAN_SECS);
            // About a third of the times fall on the hour, so ties are common.
            let off = if rng.chance(0.3) {
                off - off % 3600
            } else {
                off
            };
            epoch - off
        };
        let pin_chance = |i: u32| if is_heavy(i) { 0.15 } else { 0.05 };

        // One-to-one conversations: undirected edges, each giving both sides a
        // conversation with the same MsgTime.
        let mut seen: HashSet<u64> = HashSet::new();
        for i in 0..n {
            let want = if is_heavy(i) {
                rng.range(130, 200)
            } else {
                rng.range(2, 10)
            }
            .min(u64::from(n - 1));
            let bursts = [msg_time(&mut rng), msg_time(&mut rng), msg_time(&mut rng)];
            let (mut made, mut tries) = (0, 0);
            while made < want && tries < want * 4 + 16 {
                tries += 1;
                let j = rng.below(u64::from(n)) as u32;
                if j == i {
                    continue;
                }
                let (a, b) = (i.min(j), i.max(j));
                if !seen.insert((u64::from(a) << 32) | u64::from(b)) {
                    continue;
                }
                made += 1;
                let t = if is_heavy(i) && rng.chance(0.25) {
                    bursts[rng.below(3) as usize]
                } else {
                    msg_time(&mut rng)
                };
                let (pin_i, pin_j) = (rng.chance(pin_chance(i)), rng.chance(pin_chance(j)));
                push(&mut accts[i as usize], Peer::User(j), t, pin_i);
                push(&mut accts[j as usize], Peer::User(i), t, pin_j);
            }
        }
        drop(seen);

        // Groups and their members (in the order they were drawn: the join order).
        let group_count = (n / 20).max(1);
        let mut groups: Vec<RawGroup> = Vec::with_capacity(group_count as usize);
        let mut used: HashSet<String> = HashSet::new();
        for _ in 0..group_count {
            let mut id = random_group_id(&mut rng);
            while used.contains(&id) {
                id = random_group_id(&mut rng);
            }
            used.insert(id.clone());
            let size = rng.range(3, 40).min(u64::from(n)) as usize;
            let mut members: Vec<u32> = Vec::with_capacity(size);
            while members.len() < size {
                let m = rng.below(u64::from(n)) as u32;
                if !members.contains(&m) {
                    members.push(m);
                }
            }
            groups.push(RawGroup {
                id,
                members,
                last_msg_time: 0,
            });
        }
        drop(used);
        for i in (0..n).filter(|&i| is_heavy(i)) {
            for _ in 0..5 {
                let g = rng.below(u64::from(group_count)) as usize;
                if !groups[g].members.contains(&i) {
                    groups[g].members.push(i);
                }
            }
        }
        for (g, group) in groups.iter_mut().enumerate() {
            let mut sorted = group.members.clone();
            sorted.sort_unstable();
            let t = msg_time(&mut rng);
            group.last_msg_time = t;
            for &m in &sorted {
                let pinned = rng.chance(pin_chance(m));
                push(&mut accts[m as usize], Peer::Group(g as u32), t, pinned);
            }
        }

        // Sort, then marks and conversation groups.
        for (i, acct) in accts.iter_mut().enumerate() {
            acct.top.sort_unstable_by_key(order_key);
            acct.general.sort_unstable_by_key(order_key);
            acct.max_time = acct
                .top
                .iter()
                .chain(acct.general.iter())
                .map(|c| c.msg_time)
                .max()
                .unwrap_or(0);
            let ngroups = if is_heavy(i as u32) || rng.chance(0.3) {
                rng.range(1, 4) as u32
            } else {
                0
            };
            for id in 1..=ngroups {
                acct.contact_groups.push(ContactGroup {
                    id,
                    name: format!("group_{id:04}"),
                });
            }
            acct.next_group_id = ngroups + 1;
            let convs: Vec<Conv> = acct
                .top
                .iter()
                .chain(acct.general.iter())
                .copied()
                .collect();
            for c in convs {
                let mut mark = Mark {
                    timestamp: c.msg_time,
                    ..Mark::default()
                };
                if rng.chance(0.08) {
                    mark.standard = rng.range(1, 255);
                }
                if rng.chance(0.05) {
                    mark.custom = format!("tag_{:04}", rng.below(10_000));
                }
                if ngroups > 0 && rng.chance(0.12) {
                    let first = rng.range(1, u64::from(ngroups)) as u32;
                    mark.groups.push(first);
                    let second = rng.range(1, u64::from(ngroups)) as u32;
                    if second != first && rng.chance(0.3) {
                        mark.groups.push(second);
                        mark.groups.sort_unstable();
                    }
                }
                if !mark.is_empty() {
                    acct.marks.insert(c.peer, mark);
                }
            }
        }

        // Friends and group profiles come from their own streams, so the
        // conversations above stay what they were before these existed.
        sns::generate(&mut accts, seed);
        let slots = n as usize + EXTRA_ACCOUNTS as usize;
        let generated_groups = groups.len() as u32;
        let group_ids: Vec<OnceLock<Box<str>>> = (0..generated_groups + EXTRA_GROUPS)
            .map(|_| OnceLock::new())
            .collect();
        for (g, raw) in groups.iter().enumerate() {
            let _ = group_ids[g].set(raw.id.clone().into_boxed_str());
        }
        let (table, group_index) = groups::generate(groups, seed, epoch, slots);
        accts.resize_with(slots, Account::default);

        World {
            seed,
            epoch,
            width,
            names,
            extra_names: (0..EXTRA_ACCOUNTS).map(|_| OnceLock::new()).collect(),
            extra_index: RwLock::new(HashMap::new()),
            accounts: accts.into_iter().map(RwLock::new).collect(),
            group_ids,
            generated_groups,
            groups: RwLock::new(table),
            group_index: RwLock::new(group_index),
        }
    }

    /// The seed the world was generated from.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// The newest generated MsgTime bound (unix seconds).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of generated accounts (imported ones come on top).
    pub(crate) fn account_count(&self) -> u32 {
        self.names.len() as u32
    }

    /// Number of account slots: generated plus room for imported accounts.
    pub(crate) fn slot_count(&self) -> u32 {
        self.accounts.len() as u32
    }

    /// Digits in an account number (4 unless there are more than 9999 accounts).
    pub(crate) fn name_width(&self) -> usize {
        self.width
    }

    /// The slot of the account named `name`, imported or not (exactly: `user_1` is
    /// not `user_0001`). Generated names are parsed; others are looked up among the
    /// imported ones.
    pub(crate) fn account_index(&self, name: &str) -> Option<u32> {
        if let Some(i) = self.generated_index(name) {
            return Some(i);
        }
        read(&self.extra_index).get(name).copied()
    }

    fn generated_index(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix("user_")?;
        if digits.len() != self.width || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let number: u64 = digits.parse().ok()?;
        (number >= 1 && number <= self.names.len() as u64).then(|| (number - 1) as u32)
    }

    /// The slot of `name` when the account is imported now.
    pub(crate) fn existing(&self, name: &str) -> Option<u32> {
        let i = self.account_index(name)?;
        self.is_imported(i).then_some(i)
    }

    /// Whether the account in slot `index` is imported now.
    pub(crate) fn is_imported(&self, index: u32) -> bool {
        self.account(index).is_some_and(|a| read(a).imported)
    }

    /// The slot for `name`, allocating one for a new name.
    pub(crate) fn slot_for(&self, name: &str) -> Result<u32, SlotError> {
        if let Some(i) = self.account_index(name) {
            return Ok(i);
        }
        let mut index = write(&self.extra_index);
        if let Some(&i) = index.get(name) {
            return Ok(i);
        }
        let k = index.len();
        let cell = self.extra_names.get(k).ok_or(SlotError::Full)?;
        if cell.set(name.into()).is_err() {
            return Err(SlotError::Full);
        }
        let slot = self.names.len() as u32 + k as u32;
        index.insert(name.into(), slot);
        Ok(slot)
    }

    /// The name of the account at `index`.
    pub(crate) fn name(&self, index: u32) -> &str {
        let i = index as usize;
        match self.names.get(i) {
            Some(n) => n,
            None => self
                .extra_names
                .get(i - self.names.len())
                .and_then(OnceLock::get)
                .map_or("", |s| s),
        }
    }

    /// The account at `index` (an index from [`World::account_index`] or a peer).
    pub(crate) fn account(&self, index: u32) -> Option<&RwLock<Account>> {
        self.accounts.get(index as usize)
    }

    /// The group table (lock it before any account).
    pub(crate) fn groups(&self) -> &RwLock<GroupTable> {
        &self.groups
    }

    /// Groups generated with the world.
    pub(crate) fn generated_groups(&self) -> u32 {
        self.generated_groups
    }

    /// The slot of the live group `id`.
    pub(crate) fn group_index(&self, id: &str) -> Option<u32> {
        read(&self.group_index).get(id).copied()
    }

    /// Records the live group `id` in slot `g` (hold the group table's write lock).
    pub(crate) fn index_group(&self, id: &str, g: u32) {
        write(&self.group_index).insert(id.into(), g);
    }

    /// Forgets the live group `id` (hold the group table's write lock).
    pub(crate) fn unindex_group(&self, id: &str) {
        write(&self.group_index).remove(id);
    }

    /// The id of the group in slot `g` (destroyed groups keep theirs).
    pub(crate) fn group_id(&self, g: u32) -> &str {
        self.group_ids
            .get(g as usize)
            .and_then(OnceLock::get)
            .map_or("", |s| s)
    }

    /// Records `id` for group slot `g`; false when the slot is out of range or taken.
    pub(crate) fn set_group_id(&self, g: u32, id: &str) -> bool {
        self.group_ids
            .get(g as usize)
            .is_some_and(|cell| cell.set(id.into()).is_ok())
    }

    /// How many group slots there are in all.
    pub(crate) fn group_capacity(&self) -> u32 {
        self.group_ids.len() as u32
    }

    /// Display id of a peer: the account name or the group id.
    pub(crate) fn peer_id(&self, peer: Peer) -> &str {
        match peer {
            Peer::User(i) => self.name(i),
            Peer::Group(g) => self.group_id(g),
        }
    }

    /// Total conversations over all accounts (takes every read lock in turn).
    pub(crate) fn conversation_count(&self) -> usize {
        self.accounts.iter().map(|a| read(a).len()).sum()
    }

    /// Imported accounts right now (takes every read lock in turn).
    pub(crate) fn imported_count(&self) -> usize {
        self.accounts.iter().filter(|a| read(a).imported).count()
    }

    /// Friend-list entries over all accounts (takes every read lock in turn).
    pub(crate) fn friendship_count(&self) -> usize {
        self.accounts.iter().map(|a| read(a).friends.len()).sum()
    }
}

fn push(acct: &mut Account, peer: Peer, t: u64, pinned: bool) {
    let c = Conv { msg_time: t, peer };
    if pinned {
        acct.top.push(c);
    } else {
        acct.general.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(a: &Account) -> Vec<Conv> {
        a.top.iter().chain(a.general.iter()).copied().collect()
    }

    #[test]
    fn one_to_one_is_symmetric_and_groups_reach_every_member() {
        let w = World::generate(300, 5);
        for i in 0..w.account_count() {
            let a = read(w.account(i).unwrap()).clone();
            for c in all(&a) {
                match c.peer {
                    Peer::User(j) => {
                        let b = read(w.account(j).unwrap());
                        let back = all(&b).into_iter().find(|x| x.peer == Peer::User(i));
                        assert_eq!(back.map(|x| x.msg_time), Some(c.msg_time), "{i} {j}");
                    }
                    Peer::Group(g) => {
                        let t = read(w.groups());
                        assert!(t.get(g).unwrap().members.iter().any(|m| m.account == i));
                        assert!(t.joined[i as usize].contains(&g));
                    }
                }
                assert!(c.msg_time > 0 && c.msg_time <= w.epoch());
            }
            assert!(a
                .top
                .windows(2)
                .all(|p| order_key(&p[0]) < order_key(&p[1])));
            assert!(a
                .general
                .windows(2)
                .all(|p| order_key(&p[0]) < order_key(&p[1])));
        }
        let t = read(w.groups());
        assert_eq!(t.live().count() as u32, w.generated_groups());
        for (g, group) in t.live() {
            let id = w.group_id(g);
            assert!(id.starts_with("@TGS#") && id.len() == 14);
            assert_eq!(w.group_index(id), Some(g));
            let owners = group
                .members
                .iter()
                .filter(|m| m.role == groups::Role::Owner);
            assert_eq!(
                owners.map(|m| m.account).collect::<Vec<_>>(),
                group.owner.into_iter().collect::<Vec<_>>()
            );
            assert!(group
                .members
                .windows(2)
                .all(|p| p[0].join_time <= p[1].join_time));
            for m in &group.members {
                let a = read(w.account(m.account).unwrap());
                let c = all(&a).into_iter().find(|c| c.peer == Peer::Group(g));
                assert_eq!(c.map(|c| c.msg_time), Some(group.last_msg_time));
            }
        }
    }

    #[test]
    fn the_conversations_are_those_of_earlier_versions() {
        // Figures from docs/emulator.md, measured before profiles, friends and group
        // profiles were added: those come from their own random streams.
        let w = World::generate(1000, 1);
        assert_eq!(w.conversation_count(), 46_671);
        assert_eq!(read(w.account(0).unwrap()).len(), 191);
    }

    #[test]
    fn friends_are_mostly_mutual_and_follow_conversations() {
        let w = World::generate(1000, 1);
        let (mut entries, mut mutual) = (0, 0);
        for i in 0..w.account_count() {
            let a = read(w.account(i).unwrap()).clone();
            assert!(a.std_seq > a.friends.len() as u64);
            for &j in a.friends.keys() {
                entries += 1;
                assert!(a.position(Peer::User(j)).is_some(), "{i} {j}");
                if read(w.account(j).unwrap()).friends.contains_key(&i) {
                    mutual += 1;
                }
            }
        }
        assert!(entries > 5000, "{entries}");
        assert!(mutual * 10 > entries * 8, "{mutual} of {entries}");
        let heavy = read(w.account(0).unwrap()).friends.len();
        assert!(
            heavy > 100,
            "user_0001 has {heavy} friends: more than a friend_get page"
        );
    }

    #[test]
    fn imported_accounts_get_slots_until_full() {
        let w = World::generate(10, 1);
        assert_eq!(w.account_index("alice"), None);
        let a = w.slot_for("alice").unwrap();
        assert_eq!(a, 10);
        assert_eq!(w.slot_for("alice"), Ok(10));
        assert_eq!(w.account_index("alice"), Some(10));
        assert_eq!(w.name(10), "alice");
        assert!(!w.is_imported(10));
        assert_eq!(w.slot_for("user_0003"), Ok(2));
        assert_eq!(w.slot_for("user_0011"), Ok(11));
        for k in 0..EXTRA_ACCOUNTS - 2 {
            w.slot_for(&format!("x{k}")).unwrap();
        }
        assert_eq!(w.slot_for("one_more"), Err(SlotError::Full));
        assert_eq!(w.slot_count(), 10 + EXTRA_ACCOUNTS);
    }

    #[test]
    fn heavy_accounts_have_more_than_a_page_and_ties() {
        let w = World::generate(1000, 1);
        let a = read(w.account(0).unwrap());
        assert!(a.general.len() > 100, "{}", a.general.len());
        assert!(a.top.len() > 20, "{}", a.top.len());
        let ties = a
            .general
            .windows(2)
            .filter(|p| p[0].msg_time == p[1].msg_time)
            .count();
        assert!(ties > 5, "{ties}");
        assert!(!a.contact_groups.is_empty());
        assert!(!a.marks.is_empty());
    }

    #[test]
    fn names_round_trip_and_width_grows() {
        let w = World::generate(12, 1);
        assert_eq!(w.name(0), "user_0001");
        assert_eq!(w.account_index("user_0012"), Some(11));
        assert_eq!(w.account_index("user_0013"), None);
        assert_eq!(w.account_index("user_12"), None);
        assert_eq!(w.account_index("user_0000"), None);
        assert_eq!(w.account_index("nobody"), None);
        let w = World::generate(10_000, 1);
        assert_eq!(w.name_width(), 5);
        assert_eq!(w.account_index("user_10000"), Some(9999));
        let tiny = World::generate(1, 1);
        assert_eq!(tiny.account_count(), 1);
    }

    #[test]
    fn same_seed_same_world() {
        let (a, b, c) = (
            World::generate(200, 9),
            World::generate(200, 9),
            World::generate(200, 10),
        );
        let lists = |w: &World| -> Vec<Vec<Conv>> {
            (0..w.account_count())
                .map(|i| all(&read(w.account(i).unwrap())))
                .collect()
        };
        assert_eq!(lists(&a), lists(&b));
        assert_ne!(lists(&a), lists(&c));
        assert_eq!(a.group_id(0), b.group_id(0));
        let friends = |w: &World| -> Vec<Vec<(u32, sns::Friend)>> {
            (0..w.account_count())
                .map(|i| {
                    read(w.account(i).unwrap())
                        .friends
                        .clone()
                        .into_iter()
                        .collect()
                })
                .collect()
        };
        assert_eq!(friends(&a), friends(&b));
        assert_ne!(friends(&a), friends(&c));
        let names = |w: &World| -> Vec<String> {
            read(w.groups())
                .live()
                .map(|(_, d)| d.name.clone())
                .collect()
        };
        assert_eq!(names(&a), names(&b));
    }

    #[test]
    fn touch_moves_and_creates() {
        let mut a = Account::default();
        a.insert(
            Conv {
                msg_time: 10,
                peer: Peer::User(1),
            },
            false,
        );
        a.insert(
            Conv {
                msg_time: 20,
                peer: Peer::User(2),
            },
            true,
        );
        a.touch(Peer::User(1), 30);
        assert_eq!(a.general[0].peer, Peer::User(1));
        a.touch(Peer::User(2), 40);
        assert_eq!(a.top[0].msg_time, 40);
        a.touch(Peer::User(3), 50);
        assert_eq!(a.general[0].peer, Peer::User(3));
        assert_eq!(a.len(), 3);
        assert_eq!(a.max_time, 50);
    }
}
