//! GroupId → accounts whose cached pages list that group, for group events (a group
//! message changes every member's list, and the callback carries no member list).
//!
//! Groups are kept as 64-bit keys ([`group_key`]: a hash keyed per process), not as
//! strings: a page stores the keys of the groups it lists, and the index maps a key
//! to the accounts listing it. A collision could only make a group event drop an
//! account that lists another group (a wasted fetch, never a stale page), and the
//! per-process key makes collisions impossible to aim.
//!
//! Entries are added when a page is stored and pruned when an account's entry leaves
//! the store. Each account entry has a unique id; pruning removes an index entry only
//! if it still carries the id of the entry that left, so a late removal notice can
//! never unlink a newer entry. The index may briefly list an account whose current
//! pages no longer show the group; [`super::invalidate::Invalidator`] checks the pages before
//! dropping anything, so group events invalidate exactly the listing accounts.
//!
//! Memory follows the cached pages: an entry per (group, account) pair of the pages
//! held, a short vector per group (a map for groups with many cached members), and
//! the table shrinks when most of it has emptied. Its cost is part of each page's
//! weight ([`super::store::GROUP_OVERHEAD`]).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Deserialize;

/// A group's key: a per-process hash of its GroupId.
pub type GroupKey = u64;

/// Past this many cached accounts, a group's listers are kept in a map.
const SMALL_GROUP: usize = 16;

/// The key of `group`.
pub fn group_key(group: &str) -> GroupKey {
    static SEED: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(group)
}

/// The GroupIds a get_list page lists, each once (the one place that reads them).
pub fn group_ids(body: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct PageDoc<'a> {
        #[serde(rename = "SessionItem", borrow, default)]
        items: Vec<Item<'a>>,
    }
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(rename = "GroupId", borrow, default)]
        group: Option<std::borrow::Cow<'a, str>>,
    }
    let Ok(doc) = serde_json::from_slice::<PageDoc<'_>>(body) else {
        return Vec::new();
    };
    let mut groups: Vec<String> = doc
        .items
        .into_iter()
        .filter_map(|i| i.group.map(|g| g.into_owned()))
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

/// The keys of the GroupIds a page lists, for [`super::store::Page::groups`].
pub fn group_keys(body: &[u8]) -> Box<[GroupKey]> {
    let mut keys: Vec<GroupKey> = group_ids(body).iter().map(|g| group_key(g)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.into_boxed_slice()
}

/// The accounts whose entries list one group, with the id of the listing entry.
#[derive(Debug)]
enum Listers {
    /// Few: a short vector (most groups have one or two cached members).
    Few(Vec<(Arc<str>, u64)>),
    /// Many: a map, so that pruning one stays O(1).
    Many(HashMap<Arc<str>, u64>),
}

impl Listers {
    fn insert(&mut self, account: &Arc<str>, id: u64) {
        match self {
            Listers::Few(v) => {
                if let Some(slot) = v.iter_mut().find(|(a, _)| a == account) {
                    slot.1 = id;
                } else if v.len() < SMALL_GROUP {
                    v.push((account.clone(), id));
                } else {
                    let mut m: HashMap<Arc<str>, u64> = v.drain(..).collect();
                    m.insert(account.clone(), id);
                    *self = Listers::Many(m);
                }
            }
            Listers::Many(m) => {
                m.insert(account.clone(), id);
            }
        }
    }

    /// Removes `account` if its entry `id` is the one listed.
    fn remove(&mut self, account: &str, id: u64) {
        match self {
            Listers::Few(v) => v.retain(|(a, i)| !(&**a == account && *i == id)),
            Listers::Many(m) => {
                if m.get(account) == Some(&id) {
                    m.remove(account);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Listers::Few(v) => v.is_empty(),
            Listers::Many(m) => m.is_empty(),
        }
    }

    fn into_accounts(self) -> Vec<Arc<str>> {
        match self {
            Listers::Few(v) => v.into_iter().map(|(a, _)| a).collect(),
            Listers::Many(m) => m.into_keys().collect(),
        }
    }
}

/// The index.
#[derive(Debug, Default)]
pub struct GroupIndex {
    /// group key → the accounts whose cached pages list it.
    map: Mutex<HashMap<GroupKey, Listers>>,
}

impl GroupIndex {
    /// Records that entry `id` of `account` lists `groups`.
    pub fn add(&self, account: &Arc<str>, id: u64, groups: impl Iterator<Item = GroupKey>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for g in groups {
            map.entry(g)
                .or_insert_with(|| Listers::Few(Vec::with_capacity(1)))
                .insert(account, id);
        }
    }

    /// Entry `id` of `account`, which listed `groups`, left the store.
    pub fn remove(&self, account: &str, id: u64, groups: impl Iterator<Item = GroupKey>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for g in groups {
            if let Some(listers) = map.get_mut(&g) {
                listers.remove(account, id);
                if listers.is_empty() {
                    map.remove(&g);
                }
            }
        }
        // A table emptied by evictions gives its memory back.
        if map.capacity() > 64 && map.len() < map.capacity() / 4 {
            let keep = map.len() * 2;
            map.shrink_to(keep);
        }
    }

    /// Takes the accounts recorded for `group` out of the index.
    pub fn take(&self, group: &str) -> Vec<Arc<str>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&group_key(group))
            .map(Listers::into_accounts)
            .unwrap_or_default()
    }

    /// Groups indexed (for tests and metrics).
    pub fn group_count(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The accounts recorded for `group` (for tests).
    pub fn accounts(&self, group: &str) -> Vec<Arc<str>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&group_key(group)) {
            Some(Listers::Few(v)) => v.iter().map(|(a, _)| a.clone()).collect(),
            Some(Listers::Many(m)) => m.keys().cloned().collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_removal_does_not_unlink_a_newer_entry() {
        let idx = GroupIndex::default();
        let a: Arc<str> = Arc::from("a");
        let g = group_key("@g");
        idx.add(&a, 1, [g].into_iter());
        idx.add(&a, 2, [g].into_iter());
        idx.remove("a", 1, [g].into_iter());
        assert_eq!(idx.accounts("@g").len(), 1);
        idx.remove("a", 2, [g].into_iter());
        assert_eq!(idx.group_count(), 0);
    }

    #[test]
    fn large_groups_switch_to_a_map_and_back_out() {
        let idx = GroupIndex::default();
        let g = group_key("@big");
        let accounts: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("u{i}"))).collect();
        for (i, a) in accounts.iter().enumerate() {
            idx.add(a, i as u64, [g].into_iter());
        }
        assert_eq!(idx.accounts("@big").len(), 100);
        for (i, a) in accounts.iter().enumerate().skip(1) {
            idx.remove(a, i as u64, [g].into_iter());
        }
        assert_eq!(idx.accounts("@big"), vec![accounts[0].clone()]);
        assert_eq!(idx.take("@big"), vec![accounts[0].clone()]);
        assert_eq!(idx.group_count(), 0);
    }

    #[test]
    fn group_ids_are_read_from_a_page() {
        let body = br#"{"SessionItem":[{"Type":2,"GroupId":"@b"},{"Type":1,"To_Account":"x"},{"Type":2,"GroupId":"@a"},{"GroupId":"@b"}]}"#;
        assert_eq!(group_ids(body), vec!["@a", "@b"]);
        assert_eq!(group_keys(body).len(), 2);
        assert!(group_ids(b"not json").is_empty());
    }
}
