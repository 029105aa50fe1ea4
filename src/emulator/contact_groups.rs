//! Conversation marks and conversation groups: `mark_contact`,
//! `create_contact_group`, `update_contact_group`, `del_contact_group`,
//! `get_contact_group` and `search_contact_group`.
//!
//! As in Chat, this data lives apart from the conversation list: a mark or a group
//! membership may name a conversation that is not (or no longer) in the list, and
//! `get_list` shows it on the conversations that are. Limits: 20 conversation groups
//! per user and 1000 conversations with marks or groups (51008 past either). A call
//! is checked whole before anything changes, so a failed call changes nothing.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{parse_body, ApiError, ContactItemIn, ContactItemOut, GroupItemOut, Reply};
use super::state::{unix_now, State};
use super::world::{
    read, write, Account, ContactGroup, Mark, Peer, World, MAX_CONTACT_GROUPS, MAX_MARKED,
};
use super::writes::from_account;

/// get_contact_group items per page.
const CONTACT_PAGE: usize = 100;
/// Most mark items per mark_contact call.
const MAX_MARK_ITEMS: usize = 100;
/// Longest conversation group name, bytes.
const MAX_GROUP_NAME: usize = 32;
/// Longest custom mark, bytes.
const MAX_CUSTOM_MARK: usize = 256;

fn contact_value(world: &World, peer: Peer) -> Value {
    serde_json::to_value(ContactItemOut::of(world, peer)).unwrap_or(Value::Null)
}

fn group_item(g: &ContactGroup) -> Value {
    serde_json::to_value(GroupItemOut {
        name: &g.name,
        id: g.id,
    })
    .unwrap_or(Value::Null)
}

/// A marks entry as get_contact_group and search_contact_group show it.
fn mark_value(world: &World, peer: Peer, m: &Mark) -> Value {
    let mut v = contact_value(world, peer);
    if let Some(obj) = v.as_object_mut() {
        if let Some(s) = m.standard_string() {
            obj.insert("StandardMark".into(), s.into());
        }
        if !m.custom.is_empty() {
            obj.insert("CustomMark".into(), m.custom.clone().into());
        }
        if !m.groups.is_empty() {
            obj.insert("ContactGroupId".into(), json!(m.groups));
        }
        obj.insert("Timestamp".into(), m.timestamp.into());
    }
    v
}

fn check_group_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME {
        return Err(ApiError::new(
            50002,
            format!("GroupName must be 1 to {MAX_GROUP_NAME} bytes, got {name:?}"),
        ));
    }
    Ok(())
}

/// Marks entries after a change, with the 1000 limit checked; commits nothing.
fn check_marked_limit(acct: &Account, changed: &BTreeMap<Peer, Mark>) -> Result<(), ApiError> {
    let mut count = acct.marks.len();
    for (peer, m) in changed {
        match (acct.marks.contains_key(peer), m.is_empty()) {
            (false, false) => count += 1,
            (true, true) => count -= 1,
            _ => {}
        }
    }
    if count > MAX_MARKED {
        return Err(ApiError::new(
            51008,
            format!("at most {MAX_MARKED} conversations may have marks or groups"),
        ));
    }
    Ok(())
}

fn commit(acct: &mut Account, changed: BTreeMap<Peer, Mark>) {
    for (peer, m) in changed {
        if m.is_empty() {
            acct.marks.remove(&peer);
        } else {
            acct.marks.insert(peer, m);
        }
    }
}

fn lock_account(state: &State, index: u32) -> Result<&std::sync::RwLock<Account>, ApiError> {
    state
        .world
        .account(index)
        .ok_or_else(|| ApiError::new(50001, "account not found"))
}

#[derive(Deserialize)]
struct MarkContactIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "MarkItem")]
    items: Vec<MarkItemIn>,
}

#[derive(Deserialize)]
struct MarkItemIn {
    #[serde(rename = "OptType")]
    opt_type: i64,
    #[serde(rename = "ContactItem")]
    contact: ContactItemIn,
    #[serde(rename = "SetMark", default)]
    set_mark: Vec<u64>,
    #[serde(rename = "ClearMark", default)]
    clear_mark: Vec<u64>,
    #[serde(rename = "CustomMark", default)]
    custom_mark: Option<String>,
}

fn bits(list: &[u64]) -> Result<u64, ApiError> {
    list.iter().try_fold(0u64, |acc, &b| {
        if b < 64 {
            Ok(acc | (1 << b))
        } else {
            Err(ApiError::new(50002, format!("mark bit {b} is not 0 to 63")))
        }
    })
}

/// `recentcontact/mark_contact`: OptType 1 sets `SetMark` bits and clears
/// `ClearMark` bits of the standard mark; 2 sets the custom mark (empty clears it);
/// 3 does both.
pub(crate) fn mark_contact(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: MarkContactIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    if req.items.is_empty() || req.items.len() > MAX_MARK_ITEMS {
        return Err(ApiError::new(
            50002,
            format!("MarkItem must have 1 to {MAX_MARK_ITEMS} items"),
        ));
    }
    let mut plan = Vec::with_capacity(req.items.len());
    for item in &req.items {
        if !(1..=3).contains(&item.opt_type) {
            return Err(ApiError::new(50002, "OptType must be 1, 2 or 3"));
        }
        let custom = item.custom_mark.as_deref().unwrap_or("");
        if custom.len() > MAX_CUSTOM_MARK {
            return Err(ApiError::new(
                50002,
                format!("CustomMark is longer than {MAX_CUSTOM_MARK} bytes"),
            ));
        }
        let peer = item.contact.resolve(&state.world)?;
        plan.push((
            item.opt_type,
            peer,
            bits(&item.set_mark)?,
            bits(&item.clear_mark)?,
            custom,
        ));
    }
    let now = unix_now();
    let mut acct = write(lock_account(state, index)?);
    let mut changed: BTreeMap<Peer, Mark> = BTreeMap::new();
    for &(opt, peer, set, clear, custom) in &plan {
        let m = changed
            .entry(peer)
            .or_insert_with(|| acct.marks.get(&peer).cloned().unwrap_or_default());
        if opt == 1 || opt == 3 {
            m.standard = (m.standard | set) & !clear;
        }
        if opt == 2 || opt == 3 {
            m.custom = custom.to_owned();
        }
        m.timestamp = now;
    }
    check_marked_limit(&acct, &changed)?;
    let results: Vec<Value> = plan
        .iter()
        .map(|&(opt, peer, ..)| {
            let m = changed.get(&peer);
            json!({
                "OptType": opt,
                "ContactItem": contact_value(&state.world, peer),
                "StandardMark": m.and_then(Mark::standard_string).unwrap_or_default(),
                "CustomMark": m.map(|m| m.custom.clone()).unwrap_or_default(),
                "ResultCode": 0,
                "ResultInfo": "",
            })
        })
        .collect();
    commit(&mut acct, changed);
    Ok(Reply::Value(json!({"ResultItem": results})))
}

#[derive(Deserialize)]
struct CreateIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "GroupContactItem")]
    groups: Vec<CreateGroupIn>,
}

#[derive(Deserialize)]
struct CreateGroupIn {
    #[serde(rename = "GroupName")]
    name: String,
    #[serde(rename = "ContactItem", default)]
    contacts: Vec<ContactItemIn>,
}

/// `recentcontact/create_contact_group`: creates conversation groups, each with the
/// conversations listed. Names must be new and 1 to 32 bytes.
pub(crate) fn create_contact_group(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: CreateIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    if req.groups.is_empty() {
        return Err(ApiError::new(50002, "GroupContactItem must not be empty"));
    }
    let mut planned: Vec<(&str, Vec<Peer>)> = Vec::new();
    for g in &req.groups {
        check_group_name(&g.name)?;
        if planned.iter().any(|(n, _)| *n == g.name) {
            return Err(ApiError::new(
                50002,
                format!("GroupName {:?} appears twice", g.name),
            ));
        }
        let peers = g
            .contacts
            .iter()
            .map(|c| c.resolve(&state.world))
            .collect::<Result<Vec<_>, _>>()?;
        planned.push((&g.name, peers));
    }
    let now = unix_now();
    let mut acct = write(lock_account(state, index)?);
    if let Some((name, _)) = planned
        .iter()
        .find(|(n, _)| acct.group_by_name(n).is_some())
    {
        return Err(ApiError::new(
            50002,
            format!("GroupName {name:?} already exists"),
        ));
    }
    if acct.contact_groups.len() + planned.len() > MAX_CONTACT_GROUPS {
        return Err(ApiError::new(
            51008,
            format!("at most {MAX_CONTACT_GROUPS} conversation groups per user"),
        ));
    }
    let mut changed: BTreeMap<Peer, Mark> = BTreeMap::new();
    let mut out = Vec::new();
    for (id, (name, peers)) in (acct.next_group_id..).zip(planned.iter()) {
        let mut results = Vec::new();
        for &peer in peers {
            let m = changed
                .entry(peer)
                .or_insert_with(|| acct.marks.get(&peer).cloned().unwrap_or_default());
            if let Err(at) = m.groups.binary_search(&id) {
                m.groups.insert(at, id);
            }
            m.timestamp = now;
            results.push(json!({
                "ContactItem": contact_value(&state.world, peer),
                "ResultCode": 0,
                "ResultInfo": "",
            }));
        }
        out.push(json!({
            "GroupItem": {"GroupName": name, "GroupId": id},
            "ResultItem": results,
        }));
    }
    check_marked_limit(&acct, &changed)?;
    for (name, _) in &planned {
        let id = acct.next_group_id;
        acct.next_group_id += 1;
        acct.contact_groups.push(ContactGroup {
            id,
            name: (*name).to_owned(),
        });
    }
    commit(&mut acct, changed);
    Ok(Reply::Value(json!({"GroupResultItem": out})))
}

/// One conversation or a list of them (clients send both forms).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(ContactItemIn),
    Many(Vec<ContactItemIn>),
}

#[derive(Deserialize)]
struct UpdateIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "UpdateType", default = "one")]
    update_type: i64,
    #[serde(rename = "UpdateGroup")]
    group: UpdateGroupIn,
}

fn one() -> i64 {
    1
}

#[derive(Deserialize)]
struct UpdateGroupIn {
    #[serde(rename = "UpdateGroupType")]
    kind: i64,
    #[serde(rename = "OldGroupName")]
    old_name: String,
    #[serde(rename = "NewGroupName", default)]
    new_name: Option<String>,
    #[serde(rename = "ContactUpdateItem", default)]
    updates: Vec<ContactUpdateIn>,
}

#[derive(Deserialize)]
struct ContactUpdateIn {
    #[serde(rename = "ContactOptType")]
    op: i64,
    #[serde(rename = "ContactItem")]
    contacts: OneOrMany,
}

/// `recentcontact/update_contact_group`: `UpdateGroupType` 1 renames `OldGroupName`
/// to `NewGroupName`; 2 adds (`ContactOptType` 1) or removes (2) conversations.
pub(crate) fn update_contact_group(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: UpdateIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    if req.update_type != 1 {
        return Err(ApiError::new(50002, "UpdateType must be 1"));
    }
    let g = &req.group;
    let now = unix_now();
    let mut acct = write(lock_account(state, index)?);
    let current = acct.group_by_name(&g.old_name).cloned().ok_or_else(|| {
        ApiError::new(
            50002,
            format!("conversation group {:?} not found", g.old_name),
        )
    })?;
    match g.kind {
        1 => {
            let new_name = g.new_name.as_deref().unwrap_or("");
            check_group_name(new_name)?;
            if new_name != current.name && acct.group_by_name(new_name).is_some() {
                return Err(ApiError::new(
                    50002,
                    format!("GroupName {new_name:?} already exists"),
                ));
            }
            if let Some(grp) = acct.contact_groups.iter_mut().find(|x| x.id == current.id) {
                grp.name = new_name.to_owned();
            }
            Ok(Reply::Value(json!({
                "GroupItem": {"GroupName": new_name, "GroupId": current.id},
            })))
        }
        2 => {
            let mut changed: BTreeMap<Peer, Mark> = BTreeMap::new();
            let mut results = Vec::new();
            for u in &g.updates {
                if u.op != 1 && u.op != 2 {
                    return Err(ApiError::new(50002, "ContactOptType must be 1 or 2"));
                }
                let items = match &u.contacts {
                    OneOrMany::One(c) => std::slice::from_ref(c),
                    OneOrMany::Many(v) => &v[..],
                };
                for c in items {
                    let peer = c.resolve(&state.world)?;
                    let m = changed
                        .entry(peer)
                        .or_insert_with(|| acct.marks.get(&peer).cloned().unwrap_or_default());
                    match (u.op, m.groups.binary_search(&current.id)) {
                        (1, Err(at)) => m.groups.insert(at, current.id),
                        (2, Ok(at)) => {
                            m.groups.remove(at);
                        }
                        _ => {}
                    }
                    m.timestamp = now;
                    results.push(json!({
                        "ContactOptType": u.op,
                        "ContactItem": contact_value(&state.world, peer),
                        "ResultCode": 0,
                        "ResultInfo": "",
                    }));
                }
            }
            check_marked_limit(&acct, &changed)?;
            commit(&mut acct, changed);
            Ok(Reply::Value(json!({
                "GroupItem": group_item(&current),
                "ContactResultItem": results,
            })))
        }
        k => Err(ApiError::new(
            50002,
            format!("UpdateGroupType must be 1 or 2, got {k}"),
        )),
    }
}

#[derive(Deserialize)]
struct DelIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "GroupName")]
    names: Vec<String>,
}

/// `recentcontact/del_contact_group`: deletes the named conversation groups (all
/// must exist) and takes their ids off every conversation.
pub(crate) fn del_contact_group(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: DelIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    if req.names.is_empty() {
        return Err(ApiError::new(50002, "GroupName must not be empty"));
    }
    let mut acct = write(lock_account(state, index)?);
    let mut gone = Vec::new();
    for name in &req.names {
        let g = acct.group_by_name(name).cloned().ok_or_else(|| {
            ApiError::new(50002, format!("conversation group {name:?} not found"))
        })?;
        if !gone.contains(&g) {
            gone.push(g);
        }
    }
    let ids: Vec<u32> = gone.iter().map(|g| g.id).collect();
    acct.contact_groups.retain(|g| !ids.contains(&g.id));
    let now = unix_now();
    acct.marks.retain(|_, m| {
        let before = m.groups.len();
        m.groups.retain(|id| !ids.contains(id));
        if m.groups.len() != before {
            m.timestamp = now;
        }
        !m.is_empty()
    });
    let items: Vec<Value> = gone.iter().map(group_item).collect();
    Ok(Reply::Value(json!({"GroupItem": items})))
}

#[derive(Deserialize)]
struct GetIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "StartIndex")]
    start: u64,
}

/// `recentcontact/get_contact_group`: pages (100 per page) through the conversations
/// that have marks or groups, ordered by conversation; `NextStartIndex` is 0 on the
/// last page.
pub(crate) fn get_contact_group(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: GetIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    let acct = read(lock_account(state, index)?);
    let start = usize::try_from(req.start).unwrap_or(usize::MAX);
    let items: Vec<Value> = acct
        .marks
        .iter()
        .skip(start)
        .take(CONTACT_PAGE)
        .map(|(&peer, m)| mark_value(&state.world, peer, m))
        .collect();
    let end = start.saturating_add(items.len());
    let complete = end >= acct.marks.len();
    let groups: Vec<Value> = acct.contact_groups.iter().map(group_item).collect();
    Ok(Reply::Value(json!({
        "ContactItem": items,
        "GroupItem": groups,
        "CompleteFlag": u8::from(complete),
        "NextStartIndex": if complete { 0 } else { end },
    })))
}

#[derive(Deserialize)]
struct SearchIn {
    #[serde(rename = "From_Account")]
    from: String,
    #[serde(rename = "GroupName")]
    name: String,
}

/// `recentcontact/search_contact_group`: the conversation groups whose name contains
/// `GroupName` (case sensitive), each with its conversations.
pub(crate) fn search_contact_group(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let req: SearchIn = parse_body(body, 50002)?;
    let index = from_account(state, &req.from, 50001, who)?;
    if req.name.is_empty() {
        return Err(ApiError::new(50002, "GroupName must not be empty"));
    }
    let acct = read(lock_account(state, index)?);
    let found: Vec<Value> = acct
        .contact_groups
        .iter()
        .filter(|g| g.name.contains(req.name.as_str()))
        .map(|g| {
            let contacts: Vec<Value> = acct
                .marks
                .iter()
                .filter(|(_, m)| m.groups.contains(&g.id))
                .map(|(&peer, m)| mark_value(&state.world, peer, m))
                .collect();
            json!({"GroupItem": group_item(g), "ContactItem": contacts})
        })
        .collect();
    Ok(Reply::Value(json!({"Item": found})))
}
