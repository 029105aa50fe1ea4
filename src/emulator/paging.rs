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

use super::protocol::{parse_body, ApiError, Reply};
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

/// The answer's fields in documented order (the reference form of `write_page`).
#[cfg(test)]
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
    group_item: Vec<super::protocol::GroupItemOut<'a>>,
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
    if !acct.imported {
        return Err(ApiError::new(
            50001,
            format!("From_Account {:?} has not been imported", req.from),
        ));
    }
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
    let mut buf = Vec::with_capacity(
        256 + 112 * ((top.end - top.start) + (general.end - general.start))
            + 48 * acct.contact_groups.len(),
    );
    write_page(&mut buf, world, &acct, &top, &general);
    Ok(Reply::Raw(buf))
}

/// The answer's fields as typed structs: the reference form, which the hand-written
/// [`write_page`] must reproduce byte for byte (a unit test checks it).
#[cfg(test)]
fn page<'a>(world: &'a World, acct: &'a Account, top: &Slice, general: &Slice) -> GetListOut<'a> {
    let items = acct.top[top.start..top.end]
        .iter()
        .map(|c| item(world, acct, c, true))
        .chain(
            acct.general[general.start..general.end]
                .iter()
                .map(|c| item(world, acct, c, false)),
        )
        .collect();
    GetListOut {
        items,
        complete: u8::from(!top.more && !general.more),
        time_stamp: general.next.time,
        start_index: general.next.index,
        top_time_stamp: top.next.time,
        top_start_index: top.next.index,
        group_item: acct
            .contact_groups
            .iter()
            .map(|g| super::protocol::GroupItemOut {
                name: &g.name,
                id: g.id,
            })
            .collect(),
    }
}

/// Appends `n` in decimal.
fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Appends `s` as a JSON string, escaped exactly as serde_json does.
fn push_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        buf.extend_from_slice(b"\"\"");
    }
}

/// Appends one `SessionItem`.
fn write_item(buf: &mut Vec<u8>, world: &World, acct: &Account, c: &Conv, top: bool) {
    match c.peer {
        Peer::User(_) => buf.extend_from_slice(br#"{"Type":1,"To_Account":"#),
        Peer::Group(_) => buf.extend_from_slice(br#"{"Type":2,"GroupId":"#),
    }
    push_str(buf, world.peer_id(c.peer));
    buf.extend_from_slice(br#","MsgTime":"#);
    push_u64(buf, c.msg_time);
    buf.extend_from_slice(if top {
        br#","TopFlag":1"#
    } else {
        br#","TopFlag":0"#
    });
    if let Some(m) = acct.marks.get(&c.peer) {
        if m.standard != 0 {
            buf.extend_from_slice(br#","StandardMark":""#);
            let high = 63 - m.standard.leading_zeros();
            for bit in (0..=high).rev() {
                buf.push(if m.standard >> bit & 1 == 1 {
                    b'1'
                } else {
                    b'0'
                });
            }
            buf.push(b'"');
        }
        if !m.custom.is_empty() {
            buf.extend_from_slice(br#","CustomMark":"#);
            push_str(buf, &m.custom);
        }
        if !m.groups.is_empty() {
            buf.extend_from_slice(br#","ContactGroupId":["#);
            for (i, id) in m.groups.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                push_u64(buf, u64::from(*id));
            }
            buf.push(b']');
        }
    }
    buf.push(b'}');
}

/// Writes the answer's fields, in the documented order, straight into `buf`: the
/// hot path's serializer (no intermediate structs, no allocation but `buf`).
fn write_page(buf: &mut Vec<u8>, world: &World, acct: &Account, top: &Slice, general: &Slice) {
    buf.extend_from_slice(br#"{"SessionItem":["#);
    let items = acct.top[top.start..top.end]
        .iter()
        .map(|c| (c, true))
        .chain(
            acct.general[general.start..general.end]
                .iter()
                .map(|c| (c, false)),
        );
    for (i, (c, pinned)) in items.enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_item(buf, world, acct, c, pinned);
    }
    buf.extend_from_slice(br#"],"CompleteFlag":"#);
    buf.push(if !top.more && !general.more {
        b'1'
    } else {
        b'0'
    });
    buf.extend_from_slice(br#","TimeStamp":"#);
    push_u64(buf, general.next.time);
    buf.extend_from_slice(br#","StartIndex":"#);
    push_u64(buf, general.next.index);
    buf.extend_from_slice(br#","TopTimeStamp":"#);
    push_u64(buf, top.next.time);
    buf.extend_from_slice(br#","TopStartIndex":"#);
    push_u64(buf, top.next.index);
    buf.extend_from_slice(br#","GroupItem":["#);
    for (i, g) in acct.contact_groups.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(br#"{"GroupName":"#);
        push_str(buf, &g.name);
        buf.extend_from_slice(br#","GroupId":"#);
        push_u64(buf, u64::from(g.id));
        buf.push(b'}');
    }
    buf.extend_from_slice(b"]}");
}

/// Every conversation of an account in `get_list` item form, pinned first (for
/// `GET /__emulator/accounts/<name>`).
pub(crate) fn dump(world: &World, acct: &Account) -> serde_json::Value {
    let items: Vec<SessionItemOut<'_>> = acct
        .top
        .iter()
        .map(|c| item(world, acct, c, true))
        .chain(acct.general.iter().map(|c| item(world, acct, c, false)))
        .collect();
    serde_json::to_value(items).unwrap_or_default()
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
    fn hand_written_page_matches_the_typed_structs() {
        let world = World::generate(300, 3);
        for i in 0..world.account_count() {
            let mut acct = read(world.account(i).unwrap()).clone();
            if i == 5 {
                // Strings that need escaping, and big numbers.
                acct.contact_groups.push(super::super::world::ContactGroup {
                    id: u32::MAX,
                    name: "q\"\\\u{1}\u{e9}".into(),
                });
                if let Some(c) = acct.general.first().copied() {
                    let m = acct.marks.entry(c.peer).or_default();
                    m.custom = "tab\there \"x\"".into();
                    m.standard = u64::MAX;
                    m.groups = vec![1, u32::MAX];
                }
            }
            for (size, cursor) in [(100, Cursor::default()), (3, Cursor::default())] {
                let top = cut(&acct.top, cursor, size);
                let general = cut(&acct.general, cursor, size);
                let want = serde_json::to_vec(&page(&world, &acct, &top, &general)).unwrap();
                let mut got = Vec::new();
                write_page(&mut got, &world, &acct, &top, &general);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "account {i}"
                );
            }
        }
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
        assert_eq!(s.next, Cursor { time: 90, index: 2 });
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
