//! Every row of the table of invalidations (`src/chat/effects.rs`), one test each,
//! against the real binary and the fake Chat world (`tests/common/world.rs`, which
//! changes its state as Chat's docs say each write does): cached entries (a MISS,
//! then a HIT), the write through the gateway or the webhook (the change made "from
//! a client" in the world first), then each read again: not a HIT, equal to what
//! Chat answers now, and different from before (so the write did change it).

mod common;

use common::world::{self, World};
use common::*;
use serde_json::{json, Value};

const PORTRAIT: &str = "/v4/profile/portrait_get";
const GROUP_INFO: &str = "/v4/group_open_http_svc/get_group_info";
const CHECK: &str = "/v4/im_open_login_svc/account_check";
const FRIEND_LIST: &str = "/v4/sns/friend_get_list";
const FRIEND_GET: &str = "/v4/sns/friend_get";
const JOINED: &str = "/v4/group_open_http_svc/get_joined_group_list";
const MEMBERS: &str = "/v4/group_open_http_svc/get_group_member_info";
const GET_LIST: &str = "/v4/recentcontact/get_list";

type Read = (&'static str, String);

fn portrait(accounts: &[&str]) -> Read {
    (
        PORTRAIT,
        json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick"]}).to_string(),
    )
}
fn group_info(groups: &[&str]) -> Read {
    (GROUP_INFO, json!({ "GroupIdList": groups }).to_string())
}
fn check(users: &[&str]) -> Read {
    let items: Vec<Value> = users.iter().map(|u| json!({ "UserID": u })).collect();
    (CHECK, json!({ "CheckItem": items }).to_string())
}
fn friend_list(from: &str, to: &[&str], tag: &str) -> Read {
    (
        FRIEND_LIST,
        json!({"From_Account": from, "To_Account": to, "TagList": [tag]}).to_string(),
    )
}
fn friends(from: &str) -> Read {
    (
        FRIEND_GET,
        json!({"From_Account": from, "StartIndex": 0}).to_string(),
    )
}
fn joined(u: &str) -> Read {
    (JOINED, json!({ "Member_Account": u }).to_string())
}
fn members(g: &str) -> Read {
    (MEMBERS, json!({ "GroupId": g }).to_string())
}
fn get_list(u: &str) -> Read {
    (GET_LIST, json!({ "From_Account": u }).to_string())
}

/// What changes the world.
enum Act {
    /// A write through the gateway.
    Write(&'static str, Value),
    /// A change made "from a client" in the world, then the webhook that announces
    /// it.
    Hook(fn(&mut World), &'static str, Value),
}

async fn fresh_after(prepare: fn(&mut World), reads: Vec<Read>, act: Act) {
    let (fake, world) = world::start().await;
    prepare(&mut world.lock().unwrap());
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let mut before = Vec::new();
    for (path, body) in &reads {
        let a = post(&gw.url(path), body.clone()).await;
        assert_eq!(header(&a, "x-cache"), "MISS", "{path} {body}");
        let b = post(&gw.url(path), body.clone()).await;
        assert_eq!(header(&b, "x-cache"), "HIT", "{path} {body}: cached");
        before.push(json(&a));
    }
    match act {
        Act::Write(path, body) => {
            let w = post(&gw.url(path), body.to_string()).await;
            assert_eq!(json(&w)["ErrorCode"], 0, "{path}");
        }
        Act::Hook(change, command, mut body) => {
            change(&mut world.lock().unwrap());
            body["CallbackCommand"] = json!(command);
            let url = gw.url(&format!(
                "/callback?SdkAppid={SDKAPPID}&CallbackCommand={command}&contenttype=json&ClientIP=1.2.3.4&OptPlatform=Android"
            ));
            let h = post(&url, body.to_string()).await;
            assert_eq!(json(&h)["ErrorCode"], 0, "{command}");
        }
    }
    for ((path, body), old) in reads.iter().zip(before) {
        let c = post(&gw.url(path), body.clone()).await;
        assert_ne!(
            header(&c, "x-cache"),
            "HIT",
            "{path} {body}: stale after the change"
        );
        let now = world::direct(&world, path, body);
        assert_eq!(json(&c), now, "{path} {body}: what Chat answers now");
        assert_ne!(
            now, old,
            "{path} {body}: the change changed it (test check)"
        );
    }
}

fn nothing(_: &mut World) {}

// ------------------------------------------------------------------- writes

#[tokio::test]
async fn portrait_set() {
    fresh_after(
        nothing,
        vec![
            portrait(&["zed_f1", "other"]),
            friend_list("zed", &["zed_f1"], "Tag_Profile_IM_Nick"),
        ],
        Act::Write(
            "/v4/profile/portrait_set",
            json!({"From_Account": "zed_f1", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "Z"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn account_import() {
    fresh_after(
        nothing,
        vec![portrait(&["alice"])],
        Act::Write(
            "/v4/im_open_login_svc/account_import",
            json!({"UserID": "alice", "Nick": "Alice"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn multiaccount_import() {
    fresh_after(
        nothing,
        vec![portrait(&["m_one", "m_two"])],
        Act::Write(
            "/v4/im_open_login_svc/multiaccount_import",
            json!({"AccountList": [{"UserID": "m_one", "Nick": "One"}], "Accounts": ["m_two"]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn account_delete() {
    fn prepare(w: &mut World) {
        w.friends_of("cat").insert("dan".into());
        w.groups.insert(
            "@club".into(),
            Some(vec!["club_owner".into(), "dan".into()]),
        );
    }
    fresh_after(
        prepare,
        vec![
            check(&["dan", "eve"]),
            portrait(&["dan", "eve"]),
            // Lists that mention the deleted account, which nothing names.
            friends("cat"),
            members("@club"),
            group_info(&["@club"]),
        ],
        Act::Write(
            "/v4/im_open_login_svc/account_delete",
            json!({"DeleteItem": [{"UserID": "dan"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn friend_add() {
    fresh_after(
        nothing,
        vec![friends("fa"), friends("fb")],
        Act::Write(
            "/v4/sns/friend_add",
            json!({"From_Account": "fa", "AddFriendItem": [{"To_Account": "fb", "AddSource": "AddSource_Type_Web"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn friend_import() {
    fresh_after(
        nothing,
        vec![friends("fi")],
        Act::Write(
            "/v4/sns/friend_import",
            json!({"From_Account": "fi", "AddFriendItem": [{"To_Account": "fj", "AddSource": "AddSource_Type_Web"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn friend_update() {
    fresh_after(
        nothing,
        vec![
            friend_list("fu", &["fu_f1", "fu_f2"], "Tag_SNS_IM_Remark"),
            friends("fu"),
        ],
        Act::Write(
            "/v4/sns/friend_update",
            json!({"From_Account": "fu", "UpdateItem": [{"To_Account": "fu_f1", "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": "x"}]}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn friend_delete_both_ways() {
    fn prepare(w: &mut World) {
        w.friends_of("fd_f1").insert("fd".into());
    }
    fresh_after(
        prepare,
        vec![friends("fd"), friends("fd_f1")],
        Act::Write(
            "/v4/sns/friend_delete",
            json!({"From_Account": "fd", "To_Account": ["fd_f1"], "DeleteType": "Delete_Type_Both"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn friend_delete_all_both_ways_reaches_former_friends() {
    fn prepare(w: &mut World) {
        w.friends_of("fx_f1").insert("fx".into());
    }
    fresh_after(
        prepare,
        vec![friends("fx"), friends("fx_f1")],
        Act::Write(
            "/v4/sns/friend_delete_all",
            json!({"From_Account": "fx", "DeleteType": "Delete_Type_Both"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn create_group() {
    fresh_after(
        nothing,
        vec![joined("ng_m")],
        Act::Write(
            "/v4/group_open_http_svc/create_group",
            json!({"Type": "Public", "Name": "n", "GroupId": "@newg", "Owner_Account": "ng_owner",
                   "MemberList": [{"Member_Account": "ng_m"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn modify_group_base_info() {
    fresh_after(
        nothing,
        vec![group_info(&["@mg", "@other"]), joined("mg_m1")],
        Act::Write(
            "/v4/group_open_http_svc/modify_group_base_info",
            json!({"GroupId": "@mg", "Name": "renamed"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn add_group_member() {
    fresh_after(
        nothing,
        vec![
            members("@ag"),
            group_info(&["@ag"]),
            joined("newbie"),
            get_list("newbie"),
        ],
        Act::Write(
            "/v4/group_open_http_svc/add_group_member",
            json!({"GroupId": "@ag", "MemberList": [{"Member_Account": "newbie"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn delete_group_member() {
    fresh_after(
        nothing,
        vec![members("@dg"), joined("dg_m1")],
        Act::Write(
            "/v4/group_open_http_svc/delete_group_member",
            json!({"GroupId": "@dg", "MemberToDel_Account": ["dg_m1"]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn destroy_group() {
    fresh_after(
        nothing,
        vec![group_info(&["@xg", "@yg"]), joined("xg_m1")],
        Act::Write(
            "/v4/group_open_http_svc/destroy_group",
            json!({"GroupId": "@xg"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn change_group_owner() {
    fresh_after(
        nothing,
        vec![group_info(&["@og"]), members("@og")],
        Act::Write(
            "/v4/group_open_http_svc/change_group_owner",
            json!({"GroupId": "@og", "NewOwner_Account": "og_m2"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn modify_group_member_info() {
    fresh_after(
        nothing,
        vec![members("@mm"), joined("mm_m1"), group_info(&["@mm"])],
        Act::Write(
            "/v4/group_open_http_svc/modify_group_member_info",
            json!({"GroupId": "@mm", "Member_Account": "mm_m1", "NameCard": "x"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn forbid_send_msg() {
    fresh_after(
        nothing,
        vec![members("@fm")],
        Act::Write(
            "/v4/group_open_http_svc/forbid_send_msg",
            json!({"GroupId": "@fm", "Members_Account": ["fm_m1"], "MuteTime": 60}),
        ),
    )
    .await;
}

#[tokio::test]
async fn send_group_msg() {
    // The member's conversation list lists the group: the GroupId index finds it.
    fresh_after(
        nothing,
        vec![
            group_info(&["@TGS#1B2AUI7RZ"]),
            get_list("TGS#1B2AUI7RZ_m1"),
            joined("TGS#1B2AUI7RZ_m2"),
        ],
        Act::Write(
            "/v4/group_open_http_svc/send_group_msg",
            json!({"GroupId": "@TGS#1B2AUI7RZ", "Random": 1, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn an_unlisted_group_write_is_a_group_event() {
    fresh_after(
        nothing,
        vec![group_info(&["@ug"]), members("@ug")],
        Act::Write(
            "/v4/group_open_http_svc/import_group_member",
            json!({"GroupId": "@ug", "MemberList": [{"Member_Account": "late"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn batchsendmsg() {
    fresh_after(
        nothing,
        vec![get_list("bs"), get_list("bt1"), get_list("bt2")],
        Act::Write(
            "/v4/openim/batchsendmsg",
            json!({"SyncOtherMachine": 1, "From_Account": "bs", "To_Account": ["bt1", "bt2"], "MsgRandom": 1,
                   "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn importmsg() {
    fresh_after(
        nothing,
        vec![get_list("im1"), get_list("im2")],
        Act::Write(
            "/v4/openim/importmsg",
            json!({"SyncFromOldSystem": 5, "From_Account": "im1", "To_Account": "im2", "MsgSeq": 1,
                   "MsgRandom": 2, "MsgTimeStamp": 1556178721,
                   "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "old"}}]}),
        ),
    )
    .await;
}

// ----------------------------------------------------------------- webhooks

#[tokio::test]
async fn hook_portrait_set() {
    fresh_after(
        nothing,
        vec![portrait(&["hp", "hq"])],
        Act::Hook(
            |w| w.bump("profile:hp"),
            "Profile.CallbackPortraitSet",
            json!({"Operator_Account": "hp", "From_Account": "hp", "EventTime": 1,
                   "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "x"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_portrait_set_of_a_friend() {
    fresh_after(
        nothing,
        vec![friend_list("hz", &["hz_f1"], "Tag_Profile_IM_Nick")],
        Act::Hook(
            |w| w.bump("profile:hz_f1"),
            "Profile.CallbackPortraitSet",
            json!({"Operator_Account": "hz_f1", "From_Account": "hz_f1", "EventTime": "1670574414123"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_friend_add() {
    fresh_after(
        nothing,
        vec![friends("ha"), friends("hb")],
        Act::Hook(
            |w| {
                w.friends_of("ha").insert("hb".into());
                w.friends_of("hb").insert("ha".into());
            },
            "Sns.CallbackFriendAdd",
            json!({"PairList": [{"From_Account": "ha", "To_Account": "hb", "Initiator_Account": "ha"}],
                   "ClientCmd": "friend_response", "Admin_Account": "", "ForceFlag": 0}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_friend_delete() {
    fresh_after(
        nothing,
        vec![friends("hd")],
        Act::Hook(
            |w| {
                w.friends_of("hd").remove("hd_f1");
            },
            "Sns.CallbackFriendDelete",
            json!({"PairList": [{"From_Account": "hd", "To_Account": "hd_f1"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_after_create_group() {
    fresh_after(
        nothing,
        vec![joined("hc_x")],
        Act::Hook(
            |w| {
                w.groups
                    .insert("@hcg".into(), Some(vec!["hc_owner".into(), "hc_x".into()]));
            },
            "Group.CallbackAfterCreateGroup",
            json!({"GroupId": "@hcg", "Operator_Account": "hc_owner", "Owner_Account": "hc_owner",
                   "Type": "Public", "Name": "n", "MemberList": [{"Member_Account": "hc_x"}], "EventTime": 1}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_group_info_changed() {
    fresh_after(
        nothing,
        vec![group_info(&["@hi"]), joined("hi_m1")],
        Act::Hook(
            |w| w.bump("ginfo:@hi"),
            "Group.CallbackAfterGroupInfoChanged",
            json!({"GroupId": "@hi", "Type": "Public", "Operator_Account": "x", "Notification": "n"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_member_field_changed_as_the_java_sdk_names_it() {
    fresh_after(
        nothing,
        vec![members("@hm"), joined("hm_m1")],
        Act::Hook(
            |w| w.bump("gmem:@hm"),
            "Group.CallbackAfterMemberFieldChanged",
            json!({"GroupId": "@hm", "Type": "Public", "Operator_Account": "x",
                   "Modified_Account": "hm_m1", "NameCard": "n"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_change_group_owner() {
    fresh_after(
        nothing,
        vec![group_info(&["@ho"]), members("@ho")],
        Act::Hook(
            |w| {
                if let Some(m) = w.members("@ho") {
                    m.swap(0, 2);
                }
            },
            "Group.CallbackAfterChangeGroupOwner",
            json!({"GroupId": "@ho", "Type": "Public", "Operator_Account": "x",
                   "OldOwner_Account": "ho_owner", "NewOwner_Account": "ho_m2"}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_new_member_join() {
    fresh_after(
        nothing,
        vec![members("@hj"), group_info(&["@hj"]), joined("hj_new")],
        Act::Hook(
            |w| {
                if let Some(m) = w.members("@hj") {
                    m.push("hj_new".into());
                }
            },
            "Group.CallbackAfterNewMemberJoin",
            json!({"GroupId": "@hj", "Type": "Public", "JoinType": "Apply", "Operator_Account": "hj_new",
                   "NewMemberList": [{"Member_Account": "hj_new"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_member_exit() {
    fresh_after(
        nothing,
        vec![members("@he"), joined("he_m1"), get_list("he_m1")],
        Act::Hook(
            |w| {
                if let Some(m) = w.members("@he") {
                    m.retain(|x| x != "he_m1");
                }
                // The group's conversation leaves the member's list.
                w.bump("conv:he_m1");
            },
            "Group.CallbackAfterMemberExit",
            json!({"GroupId": "@he", "Type": "Public", "ExitType": "Quit", "Operator_Account": "he_m1",
                   "ExitMemberList": [{"Member_Account": "he_m1"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_group_destroyed() {
    fresh_after(
        nothing,
        vec![group_info(&["@hx"]), joined("hx_m2"), get_list("hx_m2")],
        Act::Hook(
            |w| {
                w.groups.insert("@hx".into(), None);
                w.bump("conv:hx_m2");
            },
            "Group.CallbackAfterGroupDestroyed",
            json!({"GroupId": "@hx", "Type": "Public", "Owner_Account": "hx_owner",
                   "MemberList": [{"Member_Account": "hx_owner"}, {"Member_Account": "hx_m1"}, {"Member_Account": "hx_m2"}]}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_group_send_msg() {
    fresh_after(
        nothing,
        vec![group_info(&["@hs"]), members("@hs")],
        Act::Hook(
            |w| {
                w.bump("ginfo:@hs");
                w.bump("gmem:@hs");
            },
            "Group.CallbackAfterSendMsg",
            json!({"GroupId": "@hs", "Type": "Public", "From_Account": "hs_m1", "Operator_Account": "hs_m1",
                   "Random": 1, "MsgSeq": 2, "MsgTime": 3, "MsgBody": []}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_c2c_send_msg() {
    fresh_after(
        nothing,
        vec![get_list("c1"), get_list("c2")],
        Act::Hook(
            |w| {
                w.bump("conv:c1");
                w.bump("conv:c2");
            },
            "C2C.CallbackAfterSendMsg",
            json!({"From_Account": "c1", "To_Account": "c2", "MsgTime": 1, "SendMsgResult": 0}),
        ),
    )
    .await;
}

#[tokio::test]
async fn hook_c2c_msg_withdraw() {
    fresh_after(
        nothing,
        vec![get_list("wd1"), get_list("wd2")],
        Act::Hook(
            |w| {
                w.bump("conv:wd1");
                w.bump("conv:wd2");
            },
            "C2C.CallbackAfterMsgWithDraw",
            json!({"From_Account": "wd1", "To_Account": "wd2", "MsgKey": "k", "UnreadMsgNum": 0}),
        ),
    )
    .await;
}

/// A recall is a group event: the group's entries, and the conversation lists that
/// list the group (every page of the fake world lists this group).
#[tokio::test]
async fn hook_group_recall_msg() {
    const LISTED: &str = "@TGS#1B2AUI7RZ";
    fresh_after(
        nothing,
        vec![group_info(&[LISTED]), get_list("rc_reader")],
        Act::Hook(
            |w| {
                w.bump("ginfo:@TGS#1B2AUI7RZ");
                w.bump("conv:rc_reader");
            },
            "Group.CallbackAfterRecallMsg",
            json!({"GroupId": LISTED, "Type": "Public", "Operator_Account": "rc_admin",
                   "MsgSeqList": [{"MsgSeq": 1}]}),
        ),
    )
    .await;
}

/// A write that fails at Chat still invalidates (it may have been applied).
#[tokio::test]
async fn a_failed_write_still_invalidates() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        if r.path.ends_with("portrait_set") {
            return Reply::Json(chat_error(50004), std::time::Duration::ZERO);
        }
        let v = r.json();
        let items: Vec<Value> = v["To_Account"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| json!({"To_Account": a, "ResultCode": 0, "ResultInfo": "", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": format!("v{n}")}]}))
            .collect();
        Reply::Json(
            json!({"UserProfileItem": items, "ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "ErrorDisplay": ""}),
            std::time::Duration::ZERO,
        )
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let (path, body) = portrait(&["fw"]);
    post(&gw.url(path), body.clone()).await;
    assert_eq!(
        header(&post(&gw.url(path), body.clone()).await, "x-cache"),
        "HIT"
    );
    let w = post(
        &gw.url("/v4/profile/portrait_set"),
        r#"{"From_Account":"fw","ProfileItem":[]}"#,
    )
    .await;
    assert_eq!(json(&w)["ErrorCode"], 50004);
    assert_eq!(header(&post(&gw.url(path), body).await, "x-cache"), "MISS");
}
