//! Commands that change conversation lists: `recentcontact/delete`, `openim/sendmsg`
//! and `group_open_http_svc/send_group_msg`.
//!
//! A message gives the conversation a MsgTime of `max(now, newest MsgTime of every
//! affected account + 1)`, so it is strictly the newest on every side, and moves it
//! to the top of its list (pinned conversations stay pinned and go to the top of the
//! pinned list); a conversation that did not exist is created, unpinned. Accounts
//! are write-locked in ascending index order, so concurrent writes never deadlock.

use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{parse_body, ApiError, ContactItemIn, Reply};
use super::state::{unix_now_ms, State};
use super::world::{write, Peer};

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
    let index = state.world.account_index(name).ok_or_else(|| {
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
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: SendMsgIn = parse_body(body, 90001)?;
    let from_name = req.from.as_deref().unwrap_or("");
    if from_name.is_empty() {
        return Err(ApiError::new(
            90001,
            "From_Account is required by the emulator (the admin has no conversation list)",
        ));
    }
    let from = from_account(state, from_name, 70107, who)?;
    let to = state.world.account_index(&req.to).ok_or_else(|| {
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
        let t = now
            .max(lo_acct.max_time.saturating_add(1))
            .max(hi_acct.max_time.saturating_add(1));
        lo_acct.touch(Peer::User(hi), t);
        hi_acct.touch(Peer::User(lo), t);
        t
    };
    let seq = state.msg_seq.fetch_add(1, Ordering::Relaxed) + 1;
    let key = format!("{}_{}_{}", req.msg_random, seq, t);
    if let Some(hooks) = &state.webhooks {
        hooks.fire(
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
            now,
        );
    }
    Ok(Reply::Value(json!({"MsgTime": t, "MsgKey": key})))
}

#[derive(Deserialize)]
struct SendGroupMsgIn {
    #[serde(rename = "GroupId")]
    group_id: String,
    #[serde(rename = "From_Account", default)]
    from: Option<String>,
    #[serde(rename = "Random")]
    random: u32,
    #[serde(rename = "MsgBody")]
    msg_body: Vec<Value>,
    #[serde(rename = "CloudCustomData", default)]
    cloud_custom_data: Option<String>,
}

/// `group_open_http_svc/send_group_msg`: a message to a group, from a member (or from
/// the admin when From_Account is absent). Every member's group conversation becomes
/// the newest (re-created for members who deleted it); with a callback URL,
/// `Group.CallbackAfterSendMsg` follows.
pub(crate) fn send_group_msg(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: SendGroupMsgIn = parse_body(body, 90001)?;
    let g = state
        .world
        .group_index(&req.group_id)
        .ok_or_else(|| ApiError::new(10010, format!("group {:?} does not exist", req.group_id)))?;
    let group = state
        .world
        .group(g)
        .ok_or_else(|| ApiError::new(10010, "group does not exist"))?;
    let sender = match req.from.as_deref().filter(|s| !s.is_empty()) {
        Some(name) => {
            let i = from_account(state, name, 70107, who)?;
            if group.members.binary_search(&i).is_err() {
                return Err(ApiError::new(
                    10007,
                    format!("{name:?} is not a member of {}", group.id),
                ));
            }
            state.world.name(i).to_owned()
        }
        None => state.cfg.identifier.clone(),
    };
    check_msg_body(&req.msg_body)?;
    let now = super::state::unix_now();
    let t = {
        // Members are sorted: ascending lock order.
        let mut guards: Vec<_> = group
            .members
            .iter()
            .filter_map(|&m| state.world.account(m))
            .map(write)
            .collect();
        let newest = guards.iter().map(|a| a.max_time).max().unwrap_or(0);
        let t = now.max(newest.saturating_add(1));
        for acct in guards.iter_mut() {
            acct.touch(Peer::Group(g), t);
        }
        t
    };
    let seq = state.msg_seq.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(hooks) = &state.webhooks {
        hooks.fire(
            "Group.CallbackAfterSendMsg",
            json!({
                "CallbackCommand": "Group.CallbackAfterSendMsg",
                "GroupId": &*group.id,
                "Type": "Public",
                "From_Account": sender,
                "Operator_Account": sender,
                "Random": req.random,
                "MsgSeq": seq,
                "MsgTime": t,
                "OnlineOnlyFlag": 0,
                "MsgBody": req.msg_body,
                "CloudCustomData": req.cloud_custom_data.unwrap_or_default(),
                "EventTime": unix_now_ms(),
            }),
            now,
        );
    }
    Ok(Reply::Value(json!({"MsgTime": t, "MsgSeq": seq})))
}
