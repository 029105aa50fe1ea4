//! Accounts: `im_open_login_svc/account_check`, `account_import`,
//! `multiaccount_import`, `account_delete`, and `openim/query_online_status`.
//!
//! Every generated account starts imported. `account_import` adds any UserID (up to
//! `EXTRA_ACCOUNTS` new ones) or re-imports a deleted one (allowed, as for trial
//! apps, whose deletion is on by default): it comes back empty. `account_delete`
//! erases the account's profile, friend list, conversations and group memberships,
//! and takes it out of every other friend list. None of these send a webhook.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::groups;
use super::profile::{object, set_tags, ProfileTag};
use super::protocol::{reply, ApiError, Envelope, Reply};
use super::rng::mix64;
use super::sns::remove_friend;
use super::state::State;
use super::world::{read, write, Account, SlotError, World};

/// Most accounts one account_check, multiaccount_import or account_delete names.
pub(crate) const MAX_ACCOUNT_ITEMS: usize = 100;
/// Most accounts one query_online_status names.
pub(crate) const MAX_ONLINE_QUERY: usize = 500;
/// Longest UserID (bytes).
const MAX_USERID: usize = 32;

/// A UserID Chat accepts: 1 to 32 bytes, no whitespace or control characters.
fn valid_userid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USERID
        && !id.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// `CheckItem` / `DeleteItem`: 1 to 100 objects with a string UserID (70402
/// otherwise).
fn user_items<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Vec<&'a str>, ApiError> {
    let Some(list) = obj.get(key).and_then(Value::as_array) else {
        return Err(ApiError::new(
            70402,
            format!("{key} is required: [{{UserID}}]"),
        ));
    };
    if list.is_empty() || list.len() > MAX_ACCOUNT_ITEMS {
        return Err(ApiError::new(
            70402,
            format!("{key} must hold 1 to {MAX_ACCOUNT_ITEMS} accounts"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            item.get("UserID")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::new(70402, format!("{key}[{i}] needs a string UserID")))
        })
        .collect()
}

#[derive(Serialize)]
struct CheckItemOut<'a> {
    #[serde(rename = "UserID")]
    id: &'a str,
    #[serde(rename = "ResultCode")]
    code: i64,
    #[serde(rename = "ResultInfo")]
    info: &'static str,
    #[serde(rename = "AccountStatus")]
    status: &'static str,
}

#[derive(Serialize)]
struct CheckOut<'a> {
    #[serde(rename = "ResultItem")]
    items: Vec<CheckItemOut<'a>>,
}

/// `im_open_login_svc/account_check`: one item per CheckItem entry, ResultCode 0 and
/// `AccountStatus` `Imported` or `NotImported`.
pub(crate) fn account_check(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 70402)?;
    let ids = user_items(&obj, "CheckItem")?;
    let items = ids
        .into_iter()
        .map(|id| CheckItemOut {
            id,
            code: 0,
            info: "",
            status: if state.world.existing(id).is_some() {
                "Imported"
            } else {
                "NotImported"
            },
        })
        .collect();
    Ok(reply(Envelope::Leading, &CheckOut { items }))
}

/// Imports `id` (a valid UserID), writing Nick / FaceUrl when given. An imported
/// account keeps everything else; a new or deleted one starts empty.
fn import_one(
    world: &World,
    id: &str,
    nick: Option<&str>,
    face: Option<&str>,
) -> Result<u32, ApiError> {
    let slot = world.slot_for(id).map_err(|SlotError::Full| {
        ApiError::new(
            70398,
            "account limit reached: the emulator imports at most 10000 accounts beyond its world",
        )
    })?;
    let lock = world
        .account(slot)
        .ok_or_else(|| ApiError::new(70500, "account slot missing"))?;
    let mut acct = write(lock);
    if !acct.imported {
        acct.reset_imported();
    }
    let mut tags: Vec<(ProfileTag, Value)> = Vec::new();
    if let Some(n) = nick {
        tags.push((ProfileTag::Nick, json!(n)));
    }
    if let Some(f) = face {
        tags.push((ProfileTag::Image, json!(f)));
    }
    if !tags.is_empty() {
        set_tags(world.seed(), slot, &mut acct, &tags);
    }
    Ok(slot)
}

/// An optional Nick / FaceUrl: a string of at most 500 bytes (40601 when longer).
fn profile_text<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= 500 => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::new(40601, format!("{key} is over 500 bytes"))),
        Some(_) => Err(ApiError::new(70402, format!("{key} must be a string"))),
    }
}

/// `im_open_login_svc/account_import`: UserID (1 to 32 bytes), optional Nick and
/// FaceUrl (written to Tag_Profile_IM_Nick / Tag_Profile_IM_Image, also when the
/// account exists already). Idempotent.
pub(crate) fn account_import(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 70402)?;
    let id = obj
        .get("UserID")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::new(70402, "UserID is required: a string"))?;
    if !valid_userid(id) {
        return Err(ApiError::new(
            70402,
            "UserID must be 1 to 32 bytes without spaces or control characters",
        ));
    }
    let nick = profile_text(&obj, "Nick")?;
    let face = profile_text(&obj, "FaceUrl")?;
    *who = Some(import_one(&state.world, id, nick, face)?);
    Ok(reply(Envelope::Leading, &json!({})))
}

#[derive(Serialize)]
struct MultiOut<'a> {
    #[serde(rename = "FailAccounts")]
    fail: Vec<&'a str>,
}

/// `im_open_login_svc/multiaccount_import`: exactly one of `Accounts` (UserIDs) or
/// `AccountList` ([{UserID, Nick, FaceUrl}]), 1 to 100 entries. Invalid UserIDs (and
/// entries past the account limit) are listed in `FailAccounts` (always present).
pub(crate) fn multiaccount_import(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 70402)?;
    type Entry<'a> = (&'a str, Option<&'a str>, Option<&'a str>);
    let entries: Vec<Entry<'_>> = match (obj.get("Accounts"), obj.get("AccountList")) {
        (Some(a), None) => {
            let list = a
                .as_array()
                .ok_or_else(|| ApiError::new(70402, "Accounts must be an array of UserIDs"))?;
            list.iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| (s, None, None))
                        .ok_or_else(|| ApiError::new(70402, "Accounts must hold strings"))
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(a)) => {
            let list = a
                .as_array()
                .ok_or_else(|| ApiError::new(70402, "AccountList must be an array"))?;
            let mut out = Vec::with_capacity(list.len());
            for (i, item) in list.iter().enumerate() {
                let Some(o) = item.as_object() else {
                    return Err(ApiError::new(
                        70402,
                        format!("AccountList[{i}] must be an object"),
                    ));
                };
                let id = o.get("UserID").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::new(70402, format!("AccountList[{i}] needs a string UserID"))
                })?;
                out.push((id, profile_text(o, "Nick")?, profile_text(o, "FaceUrl")?));
            }
            out
        }
        _ => {
            return Err(ApiError::new(
                70402,
                "send exactly one of Accounts and AccountList",
            ))
        }
    };
    if entries.is_empty() || entries.len() > MAX_ACCOUNT_ITEMS {
        return Err(ApiError::new(
            70402,
            format!("import 1 to {MAX_ACCOUNT_ITEMS} accounts per call"),
        ));
    }
    let mut fail = Vec::new();
    for (id, nick, face) in entries {
        if !valid_userid(id) || import_one(&state.world, id, nick, face).is_err() {
            fail.push(id);
        }
    }
    Ok(reply(Envelope::Leading, &MultiOut { fail }))
}

#[derive(Serialize)]
struct DeleteItemOut<'a> {
    #[serde(rename = "UserID")]
    id: &'a str,
    #[serde(rename = "ResultCode")]
    code: i64,
    #[serde(rename = "ResultInfo")]
    info: &'static str,
}

#[derive(Serialize)]
struct DeleteOut<'a> {
    #[serde(rename = "ResultItem")]
    items: Vec<DeleteItemOut<'a>>,
}

/// The state of a deleted account: not imported, nothing left.
fn erase(acct: &mut Account) {
    let (std_seq, custom_seq) = (acct.std_seq + 1, acct.custom_seq + 1);
    *acct = Account {
        imported: false,
        next_group_id: 1,
        profile: Some(Default::default()),
        std_seq,
        custom_seq,
        ..Account::default()
    };
}

/// `im_open_login_svc/account_delete`: per entry ResultCode 0, or 70107 when the
/// account is not imported.
pub(crate) fn account_delete(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 70402)?;
    let ids = user_items(&obj, "DeleteItem")?;
    let world = &state.world;
    let mut deleted: Vec<u32> = Vec::new();
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        let done = world.account_index(id).is_some_and(|i| {
            let mut table = write(world.groups());
            let Some(lock) = world.account(i) else {
                return false;
            };
            let mut acct = write(lock);
            if !acct.imported {
                return false;
            }
            groups::remove_account(&mut table, i);
            erase(&mut acct);
            deleted.push(i);
            true
        });
        items.push(if done {
            DeleteItemOut {
                id,
                code: 0,
                info: "",
            }
        } else {
            DeleteItemOut {
                id,
                code: 70107,
                info: "account not imported",
            }
        });
    }
    if !deleted.is_empty() {
        // Out of every other friend list, one account lock at a time.
        for j in 0..world.slot_count() {
            let Some(lock) = world.account(j) else {
                continue;
            };
            if read(lock).friends.keys().any(|k| deleted.contains(k)) {
                let mut acct = write(lock);
                for d in &deleted {
                    remove_friend(&mut acct, *d);
                }
            }
        }
    }
    Ok(reply(Envelope::Leading, &DeleteOut { items }))
}

/// The online state of account slot `index` (deterministic by seed): about 20%
/// `Online`, 10% `PushOnline`, the rest `Offline`; with the platforms behind it.
fn online_state(seed: u64, index: u32) -> (&'static str, Vec<Value>) {
    let r = mix64(mix64(seed ^ 0x0_1A7E) ^ u64::from(index));
    const PLATFORMS: [&str; 4] = ["iPhone", "Android", "Web", "Windows"];
    let p = PLATFORMS[((r >> 8) % 4) as usize];
    match r % 10 {
        0 | 1 => {
            let mut d = vec![json!({"Platform": p, "Status": "Online"})];
            if r & 0x1000 != 0 && p != "Web" {
                d.push(json!({"Platform": "Web", "Status": "Online"}));
            }
            ("Online", d)
        }
        2 => (
            "PushOnline",
            vec![json!({"Platform": "iPhone", "Status": "PushOnline"})],
        ),
        _ => ("Offline", Vec::new()),
    }
}

#[derive(Serialize)]
struct OnlineItemOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "Status")]
    status: &'static str,
    #[serde(rename = "Detail", skip_serializing_if = "Option::is_none")]
    detail: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct OnlineErrorOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ErrorCode")]
    code: i64,
}

#[derive(Serialize)]
struct OnlineOut<'a> {
    #[serde(rename = "QueryResult")]
    items: Vec<OnlineItemOut<'a>>,
    #[serde(rename = "ErrorList")]
    errors: Vec<OnlineErrorOut<'a>>,
}

/// `openim/query_online_status`: To_Account (1 to 500), IsNeedDetail 0/1. Accounts
/// that are not imported go to `ErrorList` with 70107.
pub(crate) fn query_online_status(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 90001)?;
    let Some(list) = obj.get("To_Account").and_then(Value::as_array) else {
        return Err(ApiError::new(
            90003,
            "To_Account is required: an array of UserIDs",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::new(90003, "To_Account is empty"));
    }
    if list.len() > MAX_ONLINE_QUERY {
        return Err(ApiError::new(
            90011,
            format!("To_Account names more than {MAX_ONLINE_QUERY} accounts"),
        ));
    }
    let names: Vec<&str> = list
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ApiError::new(90003, "To_Account must hold strings"))
        })
        .collect::<Result<_, _>>()?;
    let detail = match obj.get("IsNeedDetail") {
        None | Some(Value::Null) => false,
        Some(v) => match v.as_u64() {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(ApiError::new(90001, "IsNeedDetail must be 0 or 1")),
        },
    };
    let seed = state.world.seed();
    let mut out = OnlineOut {
        items: Vec::new(),
        errors: Vec::new(),
    };
    for name in names {
        match state.world.existing(name) {
            Some(i) => {
                let (status, platforms) = online_state(seed, i);
                out.items.push(OnlineItemOut {
                    to: name,
                    status,
                    detail: (detail && status != "Offline").then_some(platforms),
                });
            }
            None => out.errors.push(OnlineErrorOut {
                to: name,
                code: 70107,
            }),
        }
    }
    Ok(reply(Envelope::Leading, &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userids_are_checked() {
        assert!(valid_userid("alice"));
        assert!(valid_userid(&"a".repeat(32)));
        assert!(!valid_userid(&"a".repeat(33)));
        assert!(!valid_userid(""));
        assert!(!valid_userid("a b"));
        assert!(!valid_userid("a\u{0}"));
    }

    #[test]
    fn online_states_are_deterministic_and_mixed() {
        let states: Vec<&str> = (0..300).map(|i| online_state(1, i).0).collect();
        assert_eq!(
            states,
            (0..300).map(|i| online_state(1, i).0).collect::<Vec<_>>()
        );
        assert!(
            states.contains(&"Online")
                && states.contains(&"PushOnline")
                && states.contains(&"Offline")
        );
    }
}
