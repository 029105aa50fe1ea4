//! GroupId → accounts whose cached pages list that group, for group events (a group
//! message changes every member's list, and the callback carries no member list).
//!
//! Entries are added when a page is stored and pruned when an account's entry leaves
//! the store. Each account entry has a unique id; pruning removes an index entry only
//! if it still carries the id of the entry that left, so a late removal notice can
//! never unlink a newer entry. The index may briefly list an account whose current
//! pages no longer show the group; [`super::Invalidator`] checks the pages before
//! dropping anything, so group events invalidate exactly the listing accounts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// account → id of the account entry that listed the group.
type Listers = HashMap<Arc<str>, u64>;

/// The index.
#[derive(Debug, Default)]
pub struct GroupIndex {
    /// group → the accounts whose cached pages list it.
    map: Mutex<HashMap<Arc<str>, Listers>>,
}

impl GroupIndex {
    /// Records that entry `id` of `account` lists `groups`.
    pub fn add(&self, account: &Arc<str>, id: u64, groups: impl Iterator<Item = Arc<str>>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for g in groups {
            map.entry(g).or_default().insert(account.clone(), id);
        }
    }

    /// Entry `id` of `account`, which listed `groups`, left the store.
    pub fn remove(&self, account: &str, id: u64, groups: impl Iterator<Item = Arc<str>>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for g in groups {
            if let Some(accounts) = map.get_mut(&g) {
                if accounts.get(account) == Some(&id) {
                    accounts.remove(account);
                }
                if accounts.is_empty() {
                    map.remove(&g);
                }
            }
        }
    }

    /// Takes the accounts recorded for `group` out of the index.
    pub fn take(&self, group: &str) -> Vec<Arc<str>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(group)
            .map(|a| a.into_keys().collect())
            .unwrap_or_default()
    }

    /// Groups indexed (for tests and metrics).
    pub fn group_count(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The accounts recorded for `group` (for tests).
    pub fn accounts(&self, group: &str) -> Vec<Arc<str>> {
        self.map
            .lock()
            .map(|m| {
                m.get(group)
                    .map(|a| a.keys().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_removal_does_not_unlink_a_newer_entry() {
        let idx = GroupIndex::default();
        let a: Arc<str> = Arc::from("a");
        let g: Arc<str> = Arc::from("@g");
        idx.add(&a, 1, [g.clone()].into_iter());
        idx.add(&a, 2, [g.clone()].into_iter());
        idx.remove("a", 1, [g.clone()].into_iter());
        assert_eq!(idx.accounts("@g").len(), 1);
        idx.remove("a", 2, [g.clone()].into_iter());
        assert_eq!(idx.group_count(), 0);
    }
}
