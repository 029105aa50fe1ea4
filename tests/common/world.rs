//! A small Chat world for the cached reads, behind [`super::FakeChat`]: profiles,
//! accounts, friends, groups and conversation lists that the reads return in the
//! shapes of `shared/chat-api/*.md` and that the writes change as Chat's docs say
//! they do. It is written from the contract pages, not from the gateway's tables,
//! so a test that reads, writes and reads again checks the gateway against Chat's
//! semantics.
//!
//! Values carry a version (`Tag_Profile_IM_Nick/alice/3`), so a changed answer is
//! visible. Deterministic: the same state answers the same request the same way.
//!
//! - every account exists unless its name starts with `nobody` or it was deleted;
//!   accounts named `ghost*` fail per item in portrait_get (40006);
//! - `<u>`'s friends start as `<u>_f1` and `<u>_f2`;
//! - group `@<name>` exists (members `<name>_owner`, `<name>_m1`, `<name>_m2`)
//!   unless its name starts with `@none` or it was destroyed.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::{Recorded, Reply, Responder};

/// The world's state.
#[derive(Debug, Default)]
pub struct World {
    /// Entity versions: `profile:u`, `sns:u>f`, `ginfo:g`, `gmem:g`, `conv:u`.
    pub ver: HashMap<String, u64>,
    /// Deleted accounts.
    pub deleted: BTreeSet<String>,
    /// Imported accounts that would otherwise not exist.
    pub imported: BTreeSet<String>,
    /// Friend lists, once touched.
    pub friends: BTreeMap<String, BTreeSet<String>>,
    /// Group members, once touched (`None`: destroyed).
    pub groups: BTreeMap<String, Option<Vec<String>>>,
    /// When set, every read answers this (a failing Chat).
    pub fail_reads: Option<Value>,
    /// Delay before answering reads.
    pub read_delay: Duration,
}

fn ok() -> Value {
    json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""})
}

fn fail(code: i64) -> Value {
    json!({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": format!("world error {code}")})
}

fn strs(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn each(v: &Value, list: &str, field: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i[field].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl World {
    pub fn v(&self, key: &str) -> u64 {
        self.ver.get(key).copied().unwrap_or(0)
    }

    pub fn bump(&mut self, key: &str) {
        *self.ver.entry(key.to_string()).or_default() += 1;
    }

    pub fn exists(&self, u: &str) -> bool {
        !self.deleted.contains(u) && (!u.starts_with("nobody") || self.imported.contains(u))
    }

    pub fn friends_of(&mut self, u: &str) -> &mut BTreeSet<String> {
        self.friends
            .entry(u.to_string())
            .or_insert_with(|| [format!("{u}_f1"), format!("{u}_f2")].into())
    }

    /// The members of `g`, or `None` when it does not exist.
    pub fn members(&mut self, g: &str) -> Option<&mut Vec<String>> {
        let name = g.trim_start_matches('@').to_string();
        self.groups
            .entry(g.to_string())
            .or_insert_with(|| {
                (!g.starts_with("@none")).then(|| {
                    vec![
                        format!("{name}_owner"),
                        format!("{name}_m1"),
                        format!("{name}_m2"),
                    ]
                })
            })
            .as_mut()
    }

    /// Groups whose members include `u`, among those touched or named `@<prefix>*`
    /// where `u` is `<prefix>_*`.
    fn joined(&mut self, u: &str) -> Vec<String> {
        if let Some((prefix, _)) = u.rsplit_once('_') {
            let g = format!("@{prefix}");
            let _ = self.members(&g);
        }
        let mut out: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, m)| m.as_ref().is_some_and(|m| m.iter().any(|x| x == u)))
            .map(|(g, _)| g.clone())
            .collect();
        out.sort();
        out
    }

    fn profile_item(&self, u: &str, tags: &[String]) -> Value {
        let v = self.v(&format!("profile:{u}"));
        let items: Vec<Value> = tags
            .iter()
            .map(|t| json!({"Tag": t, "Value": format!("{t}/{u}/{v}")}))
            .collect();
        json!({"To_Account": u, "ResultCode": 0, "ResultInfo": "", "ProfileItem": items})
    }

    fn group_info(&mut self, g: &str) -> Value {
        let vi = self.v(&format!("ginfo:{g}"));
        let vm = self.v(&format!("gmem:{g}"));
        match self.members(g).map(|m| m.clone()) {
            None => json!({"GroupId": g, "ErrorCode": 10010, "ErrorInfo": "group not exist"}),
            Some(m) => json!({
                "GroupId": g, "ErrorCode": 0, "ErrorInfo": "",
                "Name": format!("name/{g}/{vi}"), "Owner_Account": m.first().cloned().unwrap_or_default(),
                "MemberNum": m.len(), "NextMsgSeq": vi + 1,
                "MemberList": m.iter().map(|x| json!({"Member_Account": x, "MsgSeq": vm})).collect::<Vec<_>>()
            }),
        }
    }

    /// Answers one call.
    pub fn answer(&mut self, path: &str, b: &Value) -> Value {
        let cmd = path.trim_start_matches("/v4/");
        if let Some(f) = &self.fail_reads {
            if is_read(cmd) {
                return f.clone();
            }
        }
        match cmd {
            "profile/portrait_get" => {
                let tags = strs(&b["TagList"]);
                let mut items = Vec::new();
                let mut failed = Vec::new();
                for u in strs(&b["To_Account"]) {
                    if u.starts_with("ghost") || !self.exists(&u) {
                        items.push(json!({"To_Account": u, "ResultCode": 40006, "ResultInfo": "Err_Profile_PortraitGet_Read_Custom_Data_Fail"}));
                        failed.push(u);
                    } else {
                        items.push(self.profile_item(&u, &tags));
                    }
                }
                let mut out = json!({"UserProfileItem": items});
                if !failed.is_empty() {
                    out["Fail_Account"] = json!(failed);
                }
                for (k, v) in [
                    ("ActionStatus", json!("OK")),
                    ("ErrorCode", json!(0)),
                    ("ErrorInfo", json!("")),
                    ("ErrorDisplay", json!("")),
                ] {
                    out[k] = v;
                }
                out
            }
            "group_open_http_svc/get_group_info" => {
                let items: Vec<Value> = strs(&b["GroupIdList"])
                    .iter()
                    .map(|g| self.group_info(g))
                    .collect();
                let mut out = ok();
                out["GroupInfo"] = json!(items);
                out
            }
            "group_open_http_svc/get_group_member_info" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                let vm = self.v(&format!("gmem:{g}"));
                match self.members(&g).map(|m| m.clone()) {
                    None => fail(10010),
                    Some(m) => {
                        let mut out = ok();
                        out["MemberNum"] = json!(m.len());
                        out["MemberList"] = json!(m
                            .iter()
                            .map(|x| json!({"Member_Account": x, "Role": "Member", "MsgSeq": vm}))
                            .collect::<Vec<_>>());
                        out
                    }
                }
            }
            "group_open_http_svc/get_joined_group_list" => {
                let u = b["Member_Account"].as_str().unwrap_or("").to_string();
                let groups = self.joined(&u);
                let list: Vec<Value> = groups
                    .iter()
                    .map(|g| {
                        let vi = self.v(&format!("ginfo:{g}"));
                        let vm = self.v(&format!("gmem:{g}"));
                        json!({"GroupId": g, "Name": format!("name/{g}/{vi}"), "SelfInfo": {"MsgSeq": vm}})
                    })
                    .collect();
                let mut out = ok();
                out["TotalCount"] = json!(list.len());
                out["GroupIdList"] = json!(list);
                out
            }
            "im_open_login_svc/account_check" => {
                let items: Vec<Value> = each(b, "CheckItem", "UserID")
                    .iter()
                    .map(|u| {
                        json!({"UserID": u, "ResultCode": 0, "ResultInfo": "",
                        "AccountStatus": if self.exists(u) { "Imported" } else { "NotImported" }})
                    })
                    .collect();
                let mut out = ok();
                out["ResultItem"] = json!(items);
                out
            }
            "sns/friend_get_list" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                let tags = strs(&b["TagList"]);
                let friends = self.friends_of(&from).clone();
                let mut items = Vec::new();
                let mut failed = Vec::new();
                for t in strs(&b["To_Account"]) {
                    if !friends.contains(&t) {
                        items.push(json!({"To_Account": t, "ResultCode": 30001, "ResultInfo": "not a friend"}));
                        failed.push(t);
                        continue;
                    }
                    let vs = self.v(&format!("sns:{from}>{t}"));
                    let vp = self.v(&format!("profile:{t}"));
                    let vals: Vec<Value> = tags
                        .iter()
                        .map(|tag| {
                            let v = if tag.starts_with("Tag_SNS") {
                                format!("{tag}/{from}>{t}/{vs}")
                            } else {
                                format!("{tag}/{t}/{vp}")
                            };
                            json!({"Tag": tag, "Value": v})
                        })
                        .collect();
                    items.push(json!({"To_Account": t, "ResultCode": 0, "ResultInfo": "", "SnsProfileItem": vals}));
                }
                let mut out = json!({"InfoItem": items});
                if !failed.is_empty() {
                    out["Fail_Account"] = json!(failed);
                }
                for (k, v) in [
                    ("ActionStatus", json!("OK")),
                    ("ErrorCode", json!(0)),
                    ("ErrorInfo", json!("")),
                    ("ErrorDisplay", json!("")),
                ] {
                    out[k] = v;
                }
                out
            }
            "sns/friend_get" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                let friends = self.friends_of(&from).clone();
                let items: Vec<Value> = friends
                    .iter()
                    .map(|t| {
                        let vs = self.v(&format!("sns:{from}>{t}"));
                        json!({"To_Account": t, "ValueItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": format!("remark/{from}>{t}/{vs}")}]})
                    })
                    .collect();
                json!({"UserDataItem": items, "StandardSequence": 1, "CustomSequence": 1,
                    "FriendNum": items.len(), "CompleteFlag": 1, "NextStartIndex": 0,
                    "ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "ErrorDisplay": ""})
            }
            "recentcontact/get_list" => {
                let u = b["From_Account"].as_str().unwrap_or("?").to_string();
                let v = self.v(&format!("conv:{u}"));
                let mut p = super::page_for(&u, 0);
                p["SessionItem"][0]["MsgTime"] = json!(1775552160u64 + v);
                p
            }
            // ---- writes
            "profile/portrait_set" => {
                let u = b["From_Account"].as_str().unwrap_or("").to_string();
                self.bump(&format!("profile:{u}"));
                ok()
            }
            "im_open_login_svc/account_import" => {
                let u = b["UserID"].as_str().unwrap_or("").to_string();
                self.import(&u);
                ok()
            }
            "im_open_login_svc/multiaccount_import" => {
                for u in strs(&b["Accounts"])
                    .into_iter()
                    .chain(each(b, "AccountList", "UserID"))
                {
                    self.import(&u);
                }
                let mut out = ok();
                out["FailAccounts"] = json!([]);
                out
            }
            "im_open_login_svc/account_delete" => {
                let users = each(b, "DeleteItem", "UserID");
                for u in &users {
                    self.deleted.insert(u.clone());
                    self.imported.remove(u);
                    self.bump(&format!("profile:{u}"));
                    self.bump(&format!("conv:{u}"));
                    self.friends.insert(u.clone(), BTreeSet::new());
                    for list in self.friends.values_mut() {
                        list.remove(u);
                    }
                    for m in self.groups.values_mut().flatten() {
                        m.retain(|x| x != u);
                    }
                }
                let mut out = ok();
                out["ResultItem"] = json!(users
                    .iter()
                    .map(|u| json!({"UserID": u, "ResultCode": 0, "ResultInfo": ""}))
                    .collect::<Vec<_>>());
                out
            }
            "sns/friend_add" | "sns/friend_import" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                let both =
                    cmd == "sns/friend_add" && b["AddType"].as_str() != Some("Add_Type_Single");
                let to = each(b, "AddFriendItem", "To_Account");
                for t in &to {
                    self.friends_of(&from).insert(t.clone());
                    if both {
                        self.friends_of(t).insert(from.clone());
                    }
                }
                let mut out = ok();
                out["ResultItem"] = json!(to
                    .iter()
                    .map(|t| json!({"To_Account": t, "ResultCode": 0, "ResultInfo": ""}))
                    .collect::<Vec<_>>());
                out
            }
            "sns/friend_update" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                for t in each(b, "UpdateItem", "To_Account") {
                    self.bump(&format!("sns:{from}>{t}"));
                }
                ok()
            }
            "sns/friend_delete" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                let both = b["DeleteType"].as_str() == Some("Delete_Type_Both");
                for t in strs(&b["To_Account"]) {
                    self.friends_of(&from).remove(&t);
                    if both {
                        self.friends_of(&t).remove(&from);
                    }
                }
                ok()
            }
            "sns/friend_delete_all" => {
                let from = b["From_Account"].as_str().unwrap_or("").to_string();
                let former = std::mem::take(self.friends_of(&from));
                if b["DeleteType"].as_str() == Some("Delete_Type_Both") {
                    for t in former {
                        self.friends_of(&t).remove(&from);
                    }
                }
                ok()
            }
            "group_open_http_svc/create_group" => {
                let g = b["GroupId"].as_str().unwrap_or("@created").to_string();
                let mut m: Vec<String> = strs(&b["Owner_Account"]);
                m.extend(each(b, "MemberList", "Member_Account"));
                self.groups.insert(g.clone(), Some(m));
                let mut out = ok();
                out["GroupId"] = json!(g);
                out
            }
            "group_open_http_svc/modify_group_base_info" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                self.bump(&format!("ginfo:{g}"));
                ok()
            }
            "group_open_http_svc/add_group_member" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                let add = each(b, "MemberList", "Member_Account");
                if let Some(m) = self.members(&g) {
                    m.extend(add.iter().cloned());
                }
                self.bump(&format!("ginfo:{g}"));
                self.bump(&format!("gmem:{g}"));
                for u in &add {
                    self.bump(&format!("conv:{u}"));
                }
                let mut out = ok();
                out["MemberList"] = json!(add
                    .iter()
                    .map(|u| json!({"Member_Account": u, "Result": 1}))
                    .collect::<Vec<_>>());
                out
            }
            "group_open_http_svc/delete_group_member" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                let del = strs(&b["MemberToDel_Account"]);
                if let Some(m) = self.members(&g) {
                    m.retain(|x| !del.contains(x));
                }
                self.bump(&format!("ginfo:{g}"));
                self.bump(&format!("gmem:{g}"));
                ok()
            }
            "group_open_http_svc/destroy_group" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                self.groups.insert(g, None);
                ok()
            }
            "group_open_http_svc/change_group_owner" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                let new = b["NewOwner_Account"].as_str().unwrap_or("").to_string();
                if let Some(m) = self.members(&g) {
                    m.retain(|x| *x != new);
                    m.insert(0, new);
                }
                self.bump(&format!("ginfo:{g}"));
                self.bump(&format!("gmem:{g}"));
                ok()
            }
            "group_open_http_svc/modify_group_member_info"
            | "group_open_http_svc/forbid_send_msg" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                self.bump(&format!("gmem:{g}"));
                ok()
            }
            "group_open_http_svc/send_group_msg" => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                self.bump(&format!("ginfo:{g}"));
                self.bump(&format!("gmem:{g}"));
                let members = self.members(&g).cloned().unwrap_or_default();
                for u in members {
                    self.bump(&format!("conv:{u}"));
                }
                let mut out = ok();
                out["MsgSeq"] = json!(self.v(&format!("ginfo:{g}")));
                out["MsgTime"] = json!(1775552160u64);
                out
            }
            "openim/sendmsg" | "openim/batchsendmsg" | "openim/importmsg" => {
                for u in strs(&b["From_Account"])
                    .into_iter()
                    .chain(strs(&b["To_Account"]))
                {
                    self.bump(&format!("conv:{u}"));
                }
                ok()
            }
            // Any other group command changes the group somehow.
            c if c.starts_with("group_open_http_svc/") => {
                let g = b["GroupId"].as_str().unwrap_or("").to_string();
                self.bump(&format!("ginfo:{g}"));
                self.bump(&format!("gmem:{g}"));
                ok()
            }
            _ => ok(),
        }
    }

    fn import(&mut self, u: &str) {
        self.imported.insert(u.to_string());
        self.deleted.remove(u);
        self.bump(&format!("profile:{u}"));
    }
}

fn is_read(cmd: &str) -> bool {
    matches!(
        cmd,
        "profile/portrait_get"
            | "group_open_http_svc/get_group_info"
            | "group_open_http_svc/get_group_member_info"
            | "group_open_http_svc/get_joined_group_list"
            | "im_open_login_svc/account_check"
            | "sns/friend_get_list"
            | "sns/friend_get"
            | "recentcontact/get_list"
    )
}

/// A responder answering from `world`.
pub fn responder(world: Arc<Mutex<World>>) -> Responder {
    Box::new(move |r: &Recorded, _n| {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let mut w = world.lock().unwrap();
        let delay = if is_read(r.path.trim_start_matches("/v4/")) {
            w.read_delay
        } else {
            Duration::ZERO
        };
        Reply::Json(w.answer(&r.path, &body), delay)
    })
}

/// A fake Chat serving a fresh world.
pub async fn start() -> (super::FakeChat, Arc<Mutex<World>>) {
    let world = Arc::new(Mutex::new(World::default()));
    let fake = super::FakeChat::start(responder(world.clone())).await;
    (fake, world)
}

/// What the world answers to `body` on `path`, straight from its state (no call
/// recorded): what Chat would return for the whole request.
pub fn direct(world: &Arc<Mutex<World>>, path: &str, body: &str) -> Value {
    let b: Value = serde_json::from_str(body).unwrap();
    world.lock().unwrap().answer(path, &b)
}
