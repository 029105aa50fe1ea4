//! `v4/recentcontact/get_list`: cursor paging over an account's two sorted lists.
//!
//! Pinned and general conversations are paged separately, each newest first by
//! `(MsgTime desc, peer)`. A cursor is `(TimeStamp, StartIndex)` (or
//! `(TopTimeStamp, TopStartIndex)` for pinned ones):
//! - `TimeStamp == 0`: start at the newest conversation (`StartIndex` is ignored);
//! - otherwise: skip every conversation newer than `TimeStamp`, then skip the first
//!   `StartIndex` of those whose MsgTime equals `TimeStamp`, and start there.
//!
//! An answer's cursor names the last conversation it returned: its MsgTime, and how
//! many conversations with that MsgTime were returned so far (on this and earlier
//! pages). So a walk from all-zero cursors returns every conversation exactly once
//! even when many share a MsgTime. A list with nothing left echoes the request's
//! cursor. `CompleteFlag` is 1 when neither list has anything after this page.
//!
//! This is the hot path: it takes one read lock and serializes typed structs.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::protocol::{parse_body, raw, ApiError, GroupItemOut, Reply};
use super::world::{read, Account, Conv, Peer, World};

/// A position in one of the lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Cursor {
    /// MsgTime of the last conversation returned; 0 for the start.
    pub time: u64,
    /// How many conversations with that MsgTime were already returned.
    pub index: u64,
}

/// One page cut from a sorted list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slice {
    /// First index in the list.
    pub start: usize,
    /// One past the last index in the list.
    pub end: usize,
    /// Cursor for the next page.
    pub next: Cursor,
    /// Whether anything is left after `end`.
    pub more: bool,
}

/// Cuts the page starting at `cursor`, at most `size` long, from `list` (sorted by
/// `order_key`).
pub(crate) fn cut(list: &[Conv], cursor: Cursor, size: usize) -> Slice {
    let start = if cursor.time == 0 {
        0
    } else {
        let first = list.partition_point(|c| c.msg_time > cursor.time);
        let past = list.partition_point(|c| c.msg_time >= cursor.time);
        let skip = usize::try_from(cursor.index).unwrap_or(usize::MAX);
        first + skip.min(past - first)
    };
    let end = start.saturating_add(size).min(list.len());
    let next = match end.checked_sub(1).filter(|_| end > start) {
        Some(last) => {
            let t = list[last].msg_time;
            let first_of_t = list.partition_point(|c| c.msg_time > t);
            Cursor {
                time: t,
                index: (end - first_of_t) as u64,
            }
        }
        None => cursor,
    };
    Slice {
        start,
        end,
        next,
        more: end < list.len(),
    }
}

#[derive(Deserialize)]
struct GetListIn<'a> {
    #[serde(rename = "From_Account", borrow)]
    from: Cow<'a, str>,
    #[serde(rename = "TimeStamp")]
    time_stamp: u64,
    #[serde(rename = "StartIndex")]
    start_index: u64,
    #[serde(rename = "TopTimeStamp")]
    top_time_stamp: u64,
    #[serde(rename = "TopStartIndex")]
    top_start_index: u64,
    #[serde(rename = "AssistFlags")]
    #[allow(dead_code)]
    assist_flags: u32,
}

#[derive(Serialize)]
struct SessionItemOut<'a> {
    #[serde(rename = "Type")]
    kind: u8,
    #[serde(rename = "To_Account", skip_serializing_if = "Option::is_none")]
    to_account: Option<&'a str>,
    #[serde(rename = "GroupId", skip_serializing_if = "Option::is_none")]
    group_id: Option<&'a str>,
    #[serde(rename = "MsgTime")]
    msg_time: u64,
    #[serde(rename = "TopFlag")]
    top_flag: u8,
    #[serde(rename = "StandardMark", skip_serializing_if = "Option::is_none")]
    standard_mark: Option<String>,
    #[serde(rename = "CustomMark", skip_serializing_if = "Option::is_none")]
    custom_mark: Option<&'a str>,
    #[serde(rename = "ContactGroupId", skip_serializing_if = "<[u32]>::is_empty")]
    contact_group_id: &'a [u32],
}

#[derive(Serialize)]
struct GetListOut<'a> {
    #[serde(rename = "SessionItem")]
    items: Vec<SessionItemOut<'a>>,
    #[serde(rename = "CompleteFlag")]
    complete: u8,
    #[serde(rename = "TimeStamp")]
    time_stamp: u64,
    #[serde(rename = "StartIndex")]
    start_index: u64,
    #[serde(rename = "TopTimeStamp")]
    top_time_stamp: u64,
    #[serde(rename = "TopStartIndex")]
    top_start_index: u64,
    #[serde(rename = "GroupItem")]
    group_item: Vec<GroupItemOut<'a>>,
}

fn item<'a>(world: &'a World, acct: &'a Account, c: &Conv, top: bool) -> SessionItemOut<'a> {
    let mark = acct.marks.get(&c.peer);
    let (to_account, group_id, kind) = match c.peer {
        Peer::User(_) => (Some(world.peer_id(c.peer)), None, 1),
        Peer::Group(_) => (None, Some(world.peer_id(c.peer)), 2),
    };
    SessionItemOut {
        kind,
        to_account,
        group_id,
        msg_time: c.msg_time,
        top_flag: u8::from(top),
        standard_mark: mark.and_then(|m| m.standard_string()),
        custom_mark: mark.map(|m| m.custom.as_str()).filter(|s| !s.is_empty()),
        contact_group_id: mark.map_or(&[][..], |m| &m.groups[..]),
    }
}

/// Handles `get_list`. Records the account in `who` for the per-account counters.
pub(crate) fn get_list(
    world: &World,
    page_size: usize,
    top_page_size: usize,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: GetListIn<'_> = parse_body(body, 50002)?;
    if req.from.is_empty() {
        return Err(ApiError::new(50002, "From_Account is empty"));
    }
    let index = world.account_index(&req.from).ok_or_else(|| {
        ApiError::new(
            50001,
            format!("From_Account {:?} has not been imported", req.from),
        )
    })?;
    *who = Some(index);
    let lock = world
        .account(index)
        .ok_or_else(|| ApiError::new(50001, "account not found"))?;
    let acct = read(lock);
    let top = cut(
        &acct.top,
        Cursor {
            time: req.top_time_stamp,
            index: req.top_start_index,
        },
        top_page_size,
    );
    let general = cut(
        &acct.general,
        Cursor {
            time: req.time_stamp,
            index: req.start_index,
        },
        page_size,
    );
    let mut items = Vec::with_capacity((top.end - top.start) + (general.end - general.start));
    for c in &acct.top[top.start..top.end] {
        items.push(item(world, &acct, c, true));
    }
    for c in &acct.general[general.start..general.end] {
        items.push(item(world, &acct, c, false));
    }
    let out = GetListOut {
        items,
        complete: u8::from(!top.more && !general.more),
        time_stamp: general.next.time,
        start_index: general.next.index,
        top_time_stamp: top.next.time,
        top_start_index: top.next.index,
        group_item: acct
            .contact_groups
            .iter()
            .map(|g| GroupItemOut {
                name: &g.name,
                id: g.id,
            })
            .collect(),
    };
    Ok(raw(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(times: &[u64]) -> Vec<Conv> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Conv {
                msg_time: t,
                peer: Peer::User(i as u32),
            })
            .collect()
    }

    fn walk(l: &[Conv], size: usize) -> (Vec<usize>, usize) {
        let mut cur = Cursor::default();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let s = cut(l, cur, size);
            pages += 1;
            seen.extend(s.start..s.end);
            cur = s.next;
            if !s.more {
                break;
            }
            assert!(pages < 1000);
        }
        (seen, pages)
    }

    #[test]
    fn walk_returns_everything_once_with_ties_across_pages() {
        let l = list(&[100, 90, 90, 90, 90, 90, 80, 80, 70, 60, 60, 60]);
        for size in 1..=13 {
            let (seen, pages) = walk(&l, size);
            assert_eq!(seen, (0..l.len()).collect::<Vec<_>>(), "size {size}");
            assert_eq!(pages, l.len().div_ceil(size).max(1));
        }
    }

    #[test]
    fn cursor_points_inside_a_tie() {
        let l = list(&[100, 90, 90, 90, 80]);
        let s = cut(&l, Cursor::default(), 3);
        assert_eq!(
            s.next,
            Cursor {
                time: 90,
                index: 2
            }
        );
        let s2 = cut(&l, s.next, 3);
        assert_eq!((s2.start, s2.end, s2.more), (3, 5, false));
        // Exhausted lists echo their cursor and stay exhausted.
        let s3 = cut(&l, s2.next, 3);
        assert_eq!((s3.start, s3.end, s3.next), (5, 5, s2.next));
    }

    #[test]
    fn empty_and_oversized_cursors_are_safe() {
        let s = cut(&[], Cursor::default(), 10);
        assert_eq!((s.start, s.end, s.more), (0, 0, false));
        let l = list(&[5, 4]);
        let s = cut(
            &l,
            Cursor {
                time: 4,
                index: u64::MAX,
            },
            10,
        );
        assert_eq!((s.start, s.end), (2, 2));
        let s = cut(
            &l,
            Cursor {
                time: u64::MAX,
                index: 0,
            },
            usize::MAX,
        );
        assert_eq!((s.start, s.end), (0, 2));
    }
}
