//! Commands that change conversation lists: `recentcontact/delete` and the
//! one-to-one message commands `openim/sendmsg`, `openim/batchsendmsg` and
//! `openim/importmsg` (`send_group_msg` is with the group commands).
//!
//! A message gives the conversation a MsgTime of `max(now, newest MsgTime of every
//! affected account + 1)`, so it is strictly the newest on every side, and moves it
//! to the top of its list (pinned conversations stay pinned and go to the top of the
//! pinned list); a conversation that did not exist is created, unpinned. Accounts
//! are write-locked in ascending index order, so concurrent writes never deadlock.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::groups::check_msg_body as check_body_value;
use super::profile::object;
use super::protocol::{parse_body, reply, Actor, ApiError, ContactItemIn, Envelope, Reply};
use super::state::{unix_now, unix_now_ms, State};
use super::world::{write, Account, Conv, Peer};

/// `From_Account` → its index; 50002 when empty, `unknown_code` when unknown.
pub(crate) fn from_account(
    state: &State,
    name: &str,
    unknown_code: i64,
    who: &mut Option<u32>,
) -> Result<u32, ApiError> {
    if name.is_empty() {
        return Err(ApiError::new(50002, "From_Account is empty"));
    }
    let index = state.world.existing(name).ok_or_else(|| {
        ApiError::new(
            unknown_code,
            format!("account {name:?} has not been imported"),
        )
    })?;
    *who = Some(index);
    Ok(index)
}

#[derive(Deserialize)]
struct DeleteIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(flatten)]
    item: ContactItemIn,
    #[serde(rename = "ClearRamble", default)]
    #[allow(dead_code)]
    clear_ramble: Option<i64>,
}

/// `recentcontact/delete`: removes one conversation from From_Account's list. Its
/// marks and conversation-group membership stay (Chat keeps them apart). Deleting a
/// conversation that is not in the list succeeds and changes nothing.
pub(crate) fn delete(state: &State, body: &[u8], who: &mut Option<u32>) -> Result<Reply, ApiError> {
    let req: DeleteIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    let peer = req.item.resolve(&state.world)?;
    if let Some(lock) = state.world.account(index) {
        write(lock).remove(peer);
    }
    Ok(Reply::Value(json!({})))
}

/// A message body: a non-empty array of `{MsgType, MsgContent}` elements.
fn check_msg_body(body: &[Value]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(90001, "MsgBody must not be empty"));
    }
    for (i, el) in body.iter().enumerate() {
        let ok = el.get("MsgType").is_some_and(Value::is_string)
            && el.get("MsgContent").is_some_and(Value::is_object);
        if !ok {
            return Err(ApiError::new(
                90001,
                format!("MsgBody[{i}] must have a string MsgType and an object MsgContent"),
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct SendMsgIn {
    #[serde(rename = "From_Account", default)]
    from: Option<String>,
    #[serde(rename = "To_Account")]
    to: String,
    #[serde(rename = "MsgRandom")]
    msg_random: u32,
    #[serde(rename = "MsgBody")]
    msg_body: Vec<Value>,
    #[serde(rename = "SyncOtherMachine", default)]
    #[allow(dead_code)]
    sync_other_machine: Option<i64>,
    #[serde(rename = "CloudCustomData", default)]
    cloud_custom_data: Option<String>,
}

/// `openim/sendmsg`: a one-to-one message From_Account → To_Account. Both sides'
/// conversation becomes the newest; the answer has `MsgTime` and `MsgKey`; with a
/// callback URL, `C2C.CallbackAfterSendMsg` follows.
pub(crate) fn sendmsg(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: SendMsgIn = parse_body(body, 90001)?;
    let from_name = match (req.from.as_deref(), actor.user()) {
        (None, Some(user)) => state.world.name(user),
        (from, _) => from.unwrap_or(""),
    };
    if from_name.is_empty() {
        return Err(ApiError::new(
            90001,
            "From_Account is required by the emulator (the admin has no conversation list)",
        ));
    }
    let from = from_account(state, from_name, 70107, who)?;
    if actor.user().is_some_and(|u| u != from) {
        return Err(ApiError::new(
            90009,
            "a user sends as itself; this needs the app admin",
        ));
    }
    let to = state.world.existing(&req.to).ok_or_else(|| {
        ApiError::new(
            70107,
            format!("To_Account {:?} has not been imported", req.to),
        )
    })?;
    if from == to {
        return Err(ApiError::new(
            90001,
            "From_Account and To_Account are the same",
        ));
    }
    check_msg_body(&req.msg_body)?;
    let (lo, hi) = (from.min(to), from.max(to));
    let (Some(lo_lock), Some(hi_lock)) = (state.world.account(lo), state.world.account(hi)) else {
        return Err(ApiError::new(70107, "account has not been imported"));
    };
    let now = super::state::unix_now();
    let t = {
        let mut lo_acct = write(lo_lock);
        let mut hi_acct = write(hi_lock);
        if !lo_acct.imported || !hi_acct.imported {
            return Err(ApiError::new(70107, "account has not been imported"));
        }
        let t = now
            .max(lo_acct.max_time.saturating_add(1))
            .max(hi_acct.max_time.saturating_add(1));
        lo_acct.touch(Peer::User(hi), t);
        hi_acct.touch(Peer::User(lo), t);
        t
    };
    let seq = state.msg_seq.fetch_add(1, Ordering::Relaxed) + 1;
    let key = format!("{}_{}_{}", req.msg_random, seq, t);
    state.fire(
        actor,
        "C2C.CallbackAfterSendMsg",
        json!({
            "CallbackCommand": "C2C.CallbackAfterSendMsg",
            "From_Account": state.world.name(from),
            "To_Account": state.world.name(to),
            "MsgSeq": seq,
            "MsgRandom": req.msg_random,
            "MsgTime": t,
            "MsgKey": key,
            "OnlineOnlyFlag": 0,
            "SendMsgResult": 0,
            "ErrorInfo": "send msg succeed",
            "MsgBody": req.msg_body,
            "CloudCustomData": req.cloud_custom_data.unwrap_or_default(),
            "EventTime": unix_now_ms(),
        }),
    );
    Ok(Reply::Value(json!({"MsgTime": t, "MsgKey": key})))
}

/// Locks the accounts in `slots` (ascending, without duplicates) for writing.
fn lock_all<'a>(
    state: &'a State,
    slots: &[u32],
) -> Vec<(u32, std::sync::RwLockWriteGuard<'a, Account>)> {
    slots
        .iter()
        .filter_map(|&i| state.world.account(i).map(|l| (i, write(l))))
        .collect()
}

/// `openim/batchsendmsg`: one message from From_Account (required by the emulator,
/// like sendmsg) to up to 500 receivers. Each receiver's conversation with the
/// sender becomes the newest (not with `SendMsgControl` `NoLastMsg`); the sender's
/// side only with `SyncOtherMachine` 1. Receivers that are not imported (or the
/// sender itself) go to `ErrorList`. Sends no webhook.
pub(crate) fn batchsendmsg(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 90001)?;
    let from_name = match obj.get("From_Account") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        None | Some(Value::String(_)) => {
            return Err(ApiError::new(
                90001,
                "From_Account is required by the emulator (the admin has no conversation list)",
            ))
        }
        Some(_) => return Err(ApiError::new(90001, "From_Account must be a string")),
    };
    let Some(list) = obj.get("To_Account").and_then(Value::as_array) else {
        return Err(ApiError::new(
            90003,
            "To_Account is required: an array of UserIDs",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::new(90003, "To_Account is empty"));
    }
    if list.len() > 500 {
        return Err(ApiError::new(
            90011,
            "To_Account names more than 500 accounts",
        ));
    }
    let names: Vec<&str> = list
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ApiError::new(90003, "To_Account must hold strings"))
        })
        .collect::<Result<_, _>>()?;
    let random = obj
        .get("MsgRandom")
        .and_then(Value::as_u64)
        .filter(|r| *r <= u64::from(u32::MAX))
        .ok_or_else(|| ApiError::new(90005, "MsgRandom is required: a uint32"))?;
    if !obj.get("MsgBody").is_some_and(Value::is_array) {
        return Err(ApiError::new(90007, "MsgBody must be an array"));
    }
    check_body_value(obj.get("MsgBody"), 90002)?;
    let sync = match obj.get("SyncOtherMachine") {
        None | Some(Value::Null) => 2,
        Some(v) => match v.as_u64() {
            Some(n @ (1 | 2)) => n,
            _ => return Err(ApiError::new(90001, "SyncOtherMachine must be 1 or 2")),
        },
    };
    if let Some(t) = obj.get("MsgLifeTime") {
        if t.as_u64().is_none_or(|t| t > 604_800) {
            return Err(ApiError::new(
                90026,
                "MsgLifeTime must be 0 to 604800 seconds",
            ));
        }
    }
    let controls: Vec<&str> = match obj.get("SendMsgControl") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_str() {
                Some(c @ ("NoUnread" | "NoLastMsg" | "WithMuteNotifications")) => Ok(c),
                _ => Err(ApiError::new(
                    90001,
                    "SendMsgControl holds NoUnread, NoLastMsg, WithMuteNotifications",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::new(90001, "SendMsgControl must be an array")),
    };
    let world = &state.world;
    let from = world.existing(from_name).ok_or_else(|| {
        ApiError::new(
            70107,
            format!("account {from_name:?} has not been imported"),
        )
    })?;
    *who = Some(from);
    let mut errors: Vec<SendErrorOut<'_>> = Vec::new();
    let mut receivers: Vec<u32> = Vec::new();
    for name in &names {
        match world.existing(name) {
            Some(i) if i != from => receivers.push(i),
            Some(_) => errors.push(SendErrorOut {
                to: name,
                code: 90001,
            }),
            None => errors.push(SendErrorOut {
                to: name,
                code: 70107,
            }),
        }
    }
    let now = unix_now();
    let mut t = now;
    if !receivers.is_empty() && !controls.contains(&"NoLastMsg") {
        let mut slots = receivers.clone();
        if sync == 1 {
            slots.push(from);
        }
        slots.sort_unstable();
        slots.dedup();
        let mut guards = lock_all(state, &slots);
        let newest = guards.iter().map(|(_, a)| a.max_time).max().unwrap_or(0);
        t = now.max(newest.saturating_add(1));
        for (i, acct) in guards.iter_mut() {
            if receivers.contains(i) {
                acct.touch(Peer::User(from), t);
            }
            if *i == from {
                for &r in &receivers {
                    acct.touch(Peer::User(r), t);
                }
            }
        }
    }
    let seq = state.msg_seq.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(reply(
        Envelope::Leading,
        &BatchOut {
            key: format!("{random}_{seq}_{t}"),
            errors,
        },
    ))
}

#[derive(Serialize)]
struct SendErrorOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ErrorCode")]
    code: i64,
}

#[derive(Serialize)]
struct BatchOut<'a> {
    #[serde(rename = "MsgKey")]
    key: String,
    #[serde(rename = "ErrorList")]
    errors: Vec<SendErrorOut<'a>>,
}

/// Moves the conversation with `peer` to `max(its MsgTime, t)` (creating it,
/// unpinned, when absent): an imported message placed at its own time.
fn place(acct: &mut Account, peer: Peer, t: u64) {
    let (old, top) = match acct.remove(peer) {
        Some((c, top)) => (c.msg_time, top),
        None => (0, false),
    };
    acct.insert(
        Conv {
            msg_time: old.max(t),
            peer,
        },
        top,
    );
}

/// `openim/importmsg`: one historical (SyncFromOldSystem 2) or live (5) message.
/// The same (MsgSeq, MsgRandom, MsgTimeStamp) between the same two accounts, in
/// either direction, is one message: importing it again changes nothing. With 5
/// both conversations move to the message's time (if later); with 2 the lists stay
/// as they are. Sends no webhook.
pub(crate) fn importmsg(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 90001)?;
    let live = match obj.get("SyncFromOldSystem").and_then(Value::as_u64) {
        Some(2) => false,
        Some(5) => true,
        _ => return Err(ApiError::new(90001, "SyncFromOldSystem must be 2 or 5")),
    };
    let u32_field = |key: &str, code: i64| {
        obj.get(key)
            .and_then(Value::as_u64)
            .filter(|v| *v <= u64::from(u32::MAX))
            .ok_or_else(|| ApiError::new(code, format!("{key} is required: a uint32")))
    };
    let msg_seq = u32_field("MsgSeq", 90001)?;
    let random = u32_field("MsgRandom", 90005)?;
    let ts = obj
        .get("MsgTimeStamp")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::new(90006, "MsgTimeStamp is required: unix seconds"))?;
    if !obj.get("MsgBody").is_some_and(Value::is_array) {
        return Err(ApiError::new(90007, "MsgBody must be an array"));
    }
    check_body_value(obj.get("MsgBody"), 90002)?;
    let from_name = obj
        .get("From_Account")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::new(90001, "From_Account is required: a string"))?;
    let to_name = obj
        .get("To_Account")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::new(90003, "To_Account is required: a string"))?;
    let world = &state.world;
    let from = world
        .existing(from_name)
        .ok_or_else(|| ApiError::new(90048, format!("account {from_name:?} does not exist")))?;
    *who = Some(from);
    let to = world.existing(to_name).ok_or_else(|| {
        ApiError::new(
            90012,
            format!("To_Account {to_name:?} has not been imported"),
        )
    })?;
    if from == to {
        return Err(ApiError::new(
            90001,
            "From_Account and To_Account are the same",
        ));
    }
    let key = (from.min(to), from.max(to), msg_seq, random, ts);
    let fresh = state
        .imported_msgs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    if fresh && live {
        let (lo, hi) = (from.min(to), from.max(to));
        let mut guards = lock_all(state, &[lo, hi]);
        for (i, acct) in guards.iter_mut() {
            let peer = if *i == lo {
                Peer::User(hi)
            } else {
                Peer::User(lo)
            };
            place(acct, peer, ts);
        }
    }
    Ok(reply(Envelope::Leading, &json!({})))
}
