//! The emulator's per-item reads (profiles, groups, friends, accounts) and the
//! writes that change them, over real sockets: each test starts its own emulator
//! with `emulator::spawn` on 127.0.0.1:0 and speaks HTTP to it. These answers are
//! the ground truth the gateway's per-item cache is checked against, so the tests
//! pin the shapes, limits, per-item codes, webhooks and determinism.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chat_gateway::chat::usersig;
use chat_gateway::emulator::{self, EmulatorConfig, EmulatorHandle, FaultSettings};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const KEY: &str = "emulator-secret-key";
const APP: u64 = 1_400_000_000;
const ADMIN: &str = "administrator";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A small HTTP client bound to one emulator.
#[derive(Clone)]
struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    sig: String,
}

impl Api {
    fn new(emu: &EmulatorHandle) -> Api {
        Api {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: emu.base_url(),
            sig: usersig::generate(APP, KEY.as_bytes(), ADMIN, 86_400, unix_now(), None),
        }
    }

    async fn raw(&self, method: Method, path: &str, body: impl Into<Bytes>) -> (StatusCode, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .expect("request");
        let resp = self.client.request(req).await.expect("transport");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes)
    }

    /// A `/v4` call as the admin with a raw body: the answer's text and JSON.
    async fn call_body(&self, command: &str, body: &str) -> (String, Value) {
        let query = format!(
            "sdkappid={APP}&identifier={ADMIN}&usersig={}&random=7&contenttype=json",
            self.sig
        );
        let (status, bytes) = self
            .raw(
                Method::POST,
                &format!("/v4/{command}?{query}"),
                body.to_owned(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(bytes.to_vec()).expect("UTF-8 answer");
        let v: Value = serde_json::from_str(&text).expect("JSON answer");
        assert!(v["ErrorCode"].is_i64(), "{v}");
        assert!(
            v["RequestId"].as_str().is_some_and(|s| !s.is_empty()),
            "{v}"
        );
        let ok = v["ErrorCode"] == 0;
        assert_eq!(v["ActionStatus"], if ok { "OK" } else { "FAIL" }, "{v}");
        (text, v)
    }

    async fn call_text(&self, command: &str, body: &Value) -> (String, Value) {
        self.call_body(command, &body.to_string()).await
    }

    async fn call(&self, command: &str, body: &Value) -> Value {
        self.call_text(command, body).await.1
    }

    /// A call that must succeed.
    async fn ok(&self, command: &str, body: &Value) -> Value {
        let v = self.call(command, body).await;
        assert_eq!(code(&v), 0, "{command} {body:.300}: {v}");
        v
    }

    async fn get(&self, path: &str) -> Value {
        let (status, bytes) = self.raw(Method::GET, path, Bytes::new()).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// A change "from a client": the status and the answer.
    async fn client(&self, command: &str, query: &str, body: &Value) -> (StatusCode, Value) {
        let (status, bytes) = self
            .raw(
                Method::POST,
                &format!("/__emulator/client/{command}?{query}"),
                body.to_string(),
            )
            .await;
        (status, serde_json::from_slice(&bytes).expect("JSON"))
    }

    /// The number of the newest logged webhook.
    async fn hook_mark(&self) -> u64 {
        self.get("/__emulator/webhooks").await["Last"]
            .as_u64()
            .unwrap()
    }

    /// The webhooks logged after `mark`.
    async fn hooks_since(&self, mark: u64) -> Vec<Value> {
        self.get(&format!("/__emulator/webhooks?since={mark}"))
            .await["Webhooks"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Runs a REST write and returns its answer and the CallbackCommands it caused.
    async fn write(&self, command: &str, body: &Value) -> (Value, Vec<String>) {
        let mark = self.hook_mark().await;
        let v = self.call(command, body).await;
        let hooks = self
            .hooks_since(mark)
            .await
            .iter()
            .map(|h| h["CallbackCommand"].as_str().unwrap().to_owned())
            .collect();
        (v, hooks)
    }
}

fn code(v: &Value) -> i64 {
    v["ErrorCode"].as_i64().unwrap_or(-1)
}

fn strs(items: &Value, key: &str) -> Vec<String> {
    items
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|i| i[key].as_str().unwrap_or("").to_owned())
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Asserts that each key first appears in `raw` in the given order.
fn key_order(raw: &str, order: &[&str]) {
    let pos: Vec<usize> = order
        .iter()
        .map(|k| {
            raw.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing in {raw:.300}"))
        })
        .collect();
    assert!(
        pos.windows(2).all(|p| p[0] < p[1]),
        "keys not in order {order:?}: {raw:.400}"
    );
}

fn without_request_id(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("RequestId");
    }
    v
}

fn users(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("user_{i:04}")).collect()
}

fn no_limit() -> EmulatorConfig {
    EmulatorConfig {
        faults: FaultSettings {
            rate_limit: 0,
            ..FaultSettings::default()
        },
        ..EmulatorConfig::default()
    }
}

async fn start(cfg: EmulatorConfig) -> (EmulatorHandle, Api) {
    let emu = emulator::spawn(cfg).await.expect("emulator starts");
    let api = Api::new(&emu);
    (emu, api)
}

/// The GroupIds of the live groups.
async fn group_ids(api: &Api) -> Vec<String> {
    strs(&api.get("/__emulator/groups").await["Groups"], "GroupId")
}

/// The profile tag values of `account` as a map.
async fn profile(api: &Api, account: &str, tags: &[&str]) -> BTreeMap<String, Value> {
    let v = api
        .ok(
            "profile/portrait_get",
            &json!({"To_Account": [account], "TagList": tags}),
        )
        .await;
    let item = &v["UserProfileItem"][0];
    assert_eq!(item["ResultCode"], 0, "{v}");
    item["ProfileItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["Tag"].as_str().unwrap().to_owned(), t["Value"].clone()))
        .collect()
}

/// `account`'s whole conversation list, as "c2c:<peer>" / "group:<id>" → MsgTime.
async fn conversations(api: &Api, account: &str) -> BTreeMap<String, u64> {
    let dump = api.get(&format!("/__emulator/accounts/{account}")).await;
    dump["SessionItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let k = if s["Type"] == 1 {
                format!("c2c:{}", s["To_Account"].as_str().unwrap())
            } else {
                format!("group:{}", s["GroupId"].as_str().unwrap())
            };
            (k, s["MsgTime"].as_u64().unwrap())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portrait_get_answers_each_account_in_request_order() {
    let (emu, api) = start(no_limit()).await;
    let tags = [
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Image",
        "Tag_Profile_Custom_Level",
    ];
    let (raw, v) = api
        .call_text(
            "profile/portrait_get",
            &json!({"To_Account": ["user_0001", "ghost", "user_0002", "user_0001"], "TagList": tags}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "UserProfileItem",
            "To_Account",
            "ResultCode",
            "ResultInfo",
            "ProfileItem",
            "Fail_Account",
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "ErrorDisplay",
            "RequestId",
        ],
    );
    let items = &v["UserProfileItem"];
    assert_eq!(
        strs(items, "To_Account"),
        ["user_0001", "ghost", "user_0002", "user_0001"]
    );
    assert_eq!(items[1]["ResultCode"], 40003);
    assert!(
        items[1].get("ProfileItem").is_none(),
        "a failed item has no ProfileItem"
    );
    assert_eq!(
        keys(&items[1]),
        set(&["To_Account", "ResultCode", "ResultInfo"])
    );
    assert_eq!(v["Fail_Account"], json!(["ghost"]));
    assert_eq!(items[0], items[3], "a duplicate gets its own, equal item");
    assert_eq!(v["ErrorDisplay"], "");

    // 100 accounts, tags in TagList order, unset tags left out; every account's item
    // is what a request for it alone answers (items are independent).
    let all = users(1..=100);
    let tags = [
        "Tag_Profile_Custom_Team",
        "Tag_Profile_IM_Image",
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Gender",
        "Tag_Profile_IM_BirthDay",
        "Tag_Profile_IM_AllowType",
    ];
    let whole = api
        .ok(
            "profile/portrait_get",
            &json!({"To_Account": all, "TagList": tags}),
        )
        .await;
    assert!(
        whole.get("Fail_Account").is_none(),
        "no Fail_Account when all succeed"
    );
    let items = whole["UserProfileItem"].as_array().unwrap();
    assert_eq!(items.len(), 100);
    let mut unset_images = 0;
    for item in items {
        assert_eq!(item["ResultCode"], 0);
        let got = strs(&item["ProfileItem"], "Tag");
        let expected: Vec<String> = tags
            .iter()
            .filter(|t| got.iter().any(|g| g == *t))
            .map(|t| t.to_string())
            .collect();
        assert_eq!(got, expected, "tags come in TagList order");
        assert!(
            got.iter().any(|g| g == "Tag_Profile_IM_Nick"),
            "every account has a nick"
        );
        if !got.iter().any(|g| g == "Tag_Profile_IM_Image") {
            unset_images += 1;
        }
        let nick = item["ProfileItem"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Tag"] == "Tag_Profile_IM_Nick");
        assert!(nick.unwrap()["Value"].is_string());
        if let Some(b) = item["ProfileItem"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["Tag"] == "Tag_Profile_IM_BirthDay")
        {
            assert!(b["Value"].is_u64(), "uint32 tags are numbers: {b}");
        }
    }
    assert!(
        unset_images > 3,
        "some accounts have no avatar ({unset_images})"
    );
    for chunk in (0..100).step_by(25) {
        let part = api
            .ok(
                "profile/portrait_get",
                &json!({"To_Account": all[chunk..chunk + 25], "TagList": tags}),
            )
            .await;
        assert_eq!(
            part["UserProfileItem"].as_array().unwrap()[..],
            items[chunk..chunk + 25]
        );
    }
    // A tag named twice comes once.
    let v = api
        .ok(
            "profile/portrait_get",
            &json!({"To_Account": ["user_0003"], "TagList": ["Tag_Profile_IM_Nick", "Tag_Profile_IM_Nick"]}),
        )
        .await;
    assert_eq!(
        v["UserProfileItem"][0]["ProfileItem"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Limits and request errors: the whole call fails, with ErrorDisplay.
    let mut over = users(1..=100);
    over.push("user_0101".into());
    for (body, want) in [
        (
            json!({"To_Account": over, "TagList": ["Tag_Profile_IM_Nick"]}),
            40001,
        ),
        (
            json!({"To_Account": [], "TagList": ["Tag_Profile_IM_Nick"]}),
            40002,
        ),
        (json!({"TagList": ["Tag_Profile_IM_Nick"]}), 40002),
        (
            json!({"To_Account": "user_0001", "TagList": ["Tag_Profile_IM_Nick"]}),
            40001,
        ),
        (
            json!({"To_Account": [1], "TagList": ["Tag_Profile_IM_Nick"]}),
            40001,
        ),
        (json!({"To_Account": ["user_0001"]}), 40001),
        (json!({"To_Account": ["user_0001"], "TagList": []}), 40001),
        (
            json!({"To_Account": ["user_0001"], "TagList": ["Tag_Profile_Custom_Other"]}),
            40009,
        ),
        (
            json!({"To_Account": ["user_0001"], "TagList": ["Tag_Profile_IM_nick"]}),
            40009,
        ),
        (json!([1, 2]), 40001),
    ] {
        let (raw, v) = api.call_text("profile/portrait_get", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
        key_order(
            &raw,
            &[
                "ActionStatus",
                "ErrorCode",
                "ErrorInfo",
                "ErrorDisplay",
                "RequestId",
            ],
        );
    }
    let (_, v) = api.call_body("profile/portrait_get", "{not json").await;
    assert_eq!(code(&v), 60003);
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portrait_set_writes_what_the_profile_reads_return() {
    let (emu, api) = start(no_limit()).await;
    let tags = [
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Gender",
        "Tag_Profile_IM_BirthDay",
        "Tag_Profile_Custom_Level",
        "Tag_Profile_IM_AllowType",
    ];
    let (raw, v) = api
        .call_text(
            "profile/portrait_set",
            &json!({"From_Account": "user_0002", "ProfileItem": [
                {"Tag": "Tag_Profile_IM_Nick", "Value": "Neo"},
                {"Tag": "Tag_Profile_IM_Gender", "Value": "Gender_Type_Female"},
                {"Tag": "Tag_Profile_IM_BirthDay", "Value": 19990101},
                {"Tag": "Tag_Profile_Custom_Level", "Value": "gold"},
                {"Tag": "Tag_Profile_IM_Nick", "Value": "Neo W."}]}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "ErrorDisplay",
            "RequestId",
        ],
    );
    let p = profile(&api, "user_0002", &tags).await;
    assert_eq!(
        p["Tag_Profile_IM_Nick"], "Neo W.",
        "the last value of a repeated tag wins"
    );
    assert_eq!(p["Tag_Profile_IM_Gender"], "Gender_Type_Female");
    assert_eq!(p["Tag_Profile_IM_BirthDay"], 19990101);
    assert_eq!(p["Tag_Profile_Custom_Level"], "gold");

    // A friend's profile tags in friend_get_list follow the write too.
    let friends = api
        .ok(
            "sns/friend_get",
            &json!({"From_Account": "user_0002", "StartIndex": 0}),
        )
        .await;
    let friend = friends["UserDataItem"][0]["To_Account"]
        .as_str()
        .unwrap()
        .to_owned();
    api.ok(
        "profile/portrait_set",
        &json!({"From_Account": friend, "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "Buddy"}]}),
    )
    .await;
    let list = api
        .ok(
            "sns/friend_get_list",
            &json!({"From_Account": "user_0002", "To_Account": [friend], "TagList": ["Tag_Profile_IM_Nick"]}),
        )
        .await;
    assert_eq!(list["InfoItem"][0]["SnsProfileItem"][0]["Value"], "Buddy");

    // Errors; a failed call writes nothing (all or nothing).
    let item = |tag: &str, v: Value| json!({"From_Account": "user_0002", "ProfileItem": [{"Tag": tag, "Value": v}]});
    for (body, want) in [
        (item("Tag_Profile_IM_Gender", json!("Male")), 40605),
        (
            item("Tag_Profile_IM_AllowType", json!("AllowType_Type_Maybe")),
            40605,
        ),
        (item("Tag_Profile_IM_BirthDay", json!("19990101")), 40610),
        (item("Tag_Profile_IM_Nick", json!(5)), 40610),
        (item("Tag_Profile_IM_Level", json!(4_294_967_296u64)), 40610),
        (item("Tag_Profile_IM_Nick", json!("n".repeat(501))), 40601),
        (
            item("Tag_Profile_IM_Location", json!("x".repeat(17))),
            40601,
        ),
        (item("Tag_Profile_Custom_Nope", json!("x")), 40009),
        (
            json!({"From_Account": "ghost", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "x"}]}),
            40003,
        ),
        (json!({"From_Account": "user_0002"}), 40001),
        (
            json!({"From_Account": "user_0002", "ProfileItem": []}),
            40001,
        ),
        (
            json!({"ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "x"}]}),
            40001,
        ),
        (
            json!({"From_Account": "user_0002", "ProfileItem": [
            {"Tag": "Tag_Profile_IM_Nick", "Value": "Half"},
            {"Tag": "Tag_Profile_IM_Gender", "Value": "bad"}]}),
            40605,
        ),
    ] {
        let (raw, v) = api.call_text("profile/portrait_set", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
        key_order(
            &raw,
            &["ActionStatus", "ErrorCode", "ErrorInfo", "ErrorDisplay"],
        );
    }
    assert_eq!(
        profile(&api, "user_0002", &tags).await["Tag_Profile_IM_Nick"],
        "Neo W."
    );
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------

const BASE_FIELDS: [&str; 16] = [
    "Type",
    "Name",
    "Introduction",
    "Notification",
    "FaceUrl",
    "Owner_Account",
    "CreateTime",
    "InfoSeq",
    "LastInfoTime",
    "LastMsgTime",
    "NextMsgSeq",
    "MemberNum",
    "MaxMemberNum",
    "ApplyJoinOption",
    "InviteJoinOption",
    "MuteAllMember",
];

const MEMBER_FIELDS: [&str; 8] = [
    "Member_Account",
    "Role",
    "JoinTime",
    "MsgSeq",
    "MsgFlag",
    "LastSendMsgTime",
    "MuteUntil",
    "NameCard",
];

async fn group_info(api: &Api, id: &str) -> Value {
    let v = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": [id]}),
        )
        .await;
    v["GroupInfo"][0].clone()
}

async fn members(api: &Api, id: &str) -> Value {
    api.ok(
        "group_open_http_svc/get_group_member_info",
        &json!({"GroupId": id}),
    )
    .await
}

async fn joined(api: &Api, account: &str) -> Vec<String> {
    let v = api
        .ok(
            "group_open_http_svc/get_joined_group_list",
            &json!({"Member_Account": account}),
        )
        .await;
    strs(&v["GroupIdList"], "GroupId")
}

fn row<'a>(list: &'a Value, account: &str) -> Option<&'a Value> {
    list["MemberList"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["Member_Account"] == account)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_reads_follow_filters_limits_and_paging() {
    let (emu, api) = start(no_limit()).await;
    let ids = group_ids(&api).await;
    assert_eq!(ids.len(), 50);
    let g = ids[0].clone();

    // No filter: every base field and the member list with every member field.
    let (raw, v) = api
        .call_text(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": [g]}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "GroupInfo",
        ],
    );
    let mut order = vec!["GroupInfo", "GroupId"];
    order.extend(BASE_FIELDS);
    order.push("MemberList");
    key_order(&raw, &order);
    let info = &v["GroupInfo"][0];
    for f in BASE_FIELDS {
        assert!(info.get(f).is_some(), "{f} missing: {info}");
    }
    assert_eq!(info["ErrorCode"], 0);
    let list = info["MemberList"].as_array().unwrap();
    assert_eq!(info["MemberNum"], list.len());
    for m in list {
        for f in MEMBER_FIELDS {
            assert!(m.get(f).is_some(), "{f} missing: {m}");
        }
    }
    let owners: Vec<&Value> = list.iter().filter(|m| m["Role"] == "Owner").collect();
    if info["Owner_Account"] == "" {
        assert!(owners.is_empty());
    } else {
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0]["Member_Account"], info["Owner_Account"]);
    }

    // The documented filter example.
    let v = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": [g, "no_such_group", ""],
                    "ResponseFilter": {"GroupBaseInfoFilter": ["Type", "Name", "Owner_Account", "MemberNum"]}}),
        )
        .await;
    let items = v["GroupInfo"].as_array().unwrap();
    assert_eq!(
        keys(&items[0]),
        set(&[
            "GroupId",
            "ErrorCode",
            "ErrorInfo",
            "Type",
            "Name",
            "Owner_Account",
            "MemberNum"
        ])
    );
    assert_eq!(items[1]["ErrorCode"], 10010);
    assert_eq!(keys(&items[1]), set(&["GroupId", "ErrorCode", "ErrorInfo"]));
    assert_eq!(items[2]["ErrorCode"], 10015);
    // Only a member filter: member rows with those fields, no base fields.
    let v = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": [g], "ResponseFilter": {"MemberInfoFilter": ["Role", "NameCard"]}}),
        )
        .await;
    let item = &v["GroupInfo"][0];
    assert_eq!(
        keys(item),
        set(&["GroupId", "ErrorCode", "ErrorInfo", "MemberList"])
    );
    for m in item["MemberList"].as_array().unwrap() {
        assert_eq!(keys(m), set(&["Member_Account", "Role", "NameCard"]));
    }
    // Each item is independent of the others in the request: 50 groups at once
    // equal 50 single requests.
    let whole = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": ids}),
        )
        .await;
    for (i, id) in ids.iter().enumerate().step_by(7) {
        assert_eq!(whole["GroupInfo"][i], group_info(&api, id).await);
    }
    let mut over = ids.clone();
    over.push(g.clone());
    for (body, want) in [
        (json!({"GroupIdList": over}), 10004),
        (json!({"GroupIdList": []}), 10004),
        (json!({}), 10004),
        (json!({"GroupIdList": [1]}), 10004),
        (
            json!({"GroupIdList": [g], "ResponseFilter": {"GroupBaseInfoFilter": "Name"}}),
            10004,
        ),
        (json!({"GroupIdList": [g], "ResponseFilter": 5}), 10004),
    ] {
        let v = api.call("group_open_http_svc/get_group_info", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
        assert!(
            v.get("ErrorDisplay").is_none(),
            "group answers carry no ErrorDisplay"
        );
    }

    // Members: Limit/Offset pages add up to the whole list, MemberNum is the total.
    let big = ids.iter().find(|id| !id.is_empty()).cloned().unwrap();
    let all = members(&api, &big).await;
    let total = all["MemberNum"].as_u64().unwrap() as usize;
    let all_rows = all["MemberList"].as_array().unwrap().clone();
    assert_eq!(all_rows.len(), total);
    let (raw, _) = api
        .call_text(
            "group_open_http_svc/get_group_member_info",
            &json!({"GroupId": big, "Limit": 2}),
        )
        .await;
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "MemberNum",
            "MemberList",
        ],
    );
    let mut walked = Vec::new();
    let mut offset = 0;
    loop {
        let page = api
            .ok(
                "group_open_http_svc/get_group_member_info",
                &json!({"GroupId": big, "Limit": 3, "Offset": offset}),
            )
            .await;
        assert_eq!(page["MemberNum"], total);
        assert!(page.get("Next").is_none(), "Next is for Community groups");
        let rows = page["MemberList"].as_array().unwrap();
        if rows.is_empty() {
            break;
        }
        walked.extend(rows.iter().cloned());
        offset += 3;
    }
    assert_eq!(walked, all_rows);
    let filtered = api
        .ok(
            "group_open_http_svc/get_group_member_info",
            &json!({"GroupId": big, "MemberRoleFilter": ["Owner", "Admin"], "MemberInfoFilter": ["Role"]}),
        )
        .await;
    let managers: Vec<&Value> = all_rows.iter().filter(|m| m["Role"] != "Member").collect();
    assert_eq!(
        filtered["MemberList"].as_array().unwrap().len(),
        managers.len()
    );
    assert_eq!(filtered["MemberNum"], total);
    for m in filtered["MemberList"].as_array().unwrap() {
        assert_eq!(keys(m), set(&["Member_Account", "Role"]));
    }
    for (body, want) in [
        (json!({"GroupId": "nope"}), 10010),
        (json!({"GroupId": ""}), 10015),
        (json!({}), 10004),
        (json!({"GroupId": big, "Limit": 6001}), 10004),
        (json!({"GroupId": big, "Limit": -1}), 10004),
        (json!({"GroupId": big, "MemberRoleFilter": ["Boss"]}), 10004),
    ] {
        let v = api
            .call("group_open_http_svc/get_group_member_info", &body)
            .await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }
    assert_eq!(
        code(
            &api.call(
                "group_open_http_svc/get_group_member_info",
                &json!({"GroupId": big, "Limit": 6000})
            )
            .await
        ),
        0
    );

    // Community groups page with the Next cursor.
    let types = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": ids, "ResponseFilter": {"GroupBaseInfoFilter": ["Type"]}}),
        )
        .await;
    let types: Vec<(String, String)> = types["GroupInfo"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["GroupId"].as_str().unwrap().to_owned(),
                i["Type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let kinds: HashSet<&str> = types.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        kinds.contains("Public") && kinds.contains("Private"),
        "{kinds:?}"
    );
    if let Some((community, _)) = types.iter().find(|(_, t)| t == "Community") {
        let whole = members(&api, community).await;
        assert_eq!(whole["Next"], "");
        let mut next = String::new();
        let mut rows = Vec::new();
        loop {
            let page = api
                .ok(
                    "group_open_http_svc/get_group_member_info",
                    &json!({"GroupId": community, "Limit": 2, "Next": next}),
                )
                .await;
            rows.extend(page["MemberList"].as_array().unwrap().iter().cloned());
            next = page["Next"].as_str().unwrap().to_owned();
            if next.is_empty() {
                break;
            }
        }
        assert_eq!(rows, *whole["MemberList"].as_array().unwrap());
    }

    // Joined groups: exactly the groups whose member list has the account.
    let account = "user_0010";
    let mut expected = Vec::new();
    for id in &ids {
        if row(&members(&api, id).await, account).is_some() {
            expected.push(id.clone());
        }
    }
    let (raw, v) = api
        .call_text(
            "group_open_http_svc/get_joined_group_list",
            &json!({"Member_Account": account}),
        )
        .await;
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "TotalCount",
            "GroupIdList",
        ],
    );
    assert_eq!(v["TotalCount"], expected.len());
    let got = strs(&v["GroupIdList"], "GroupId");
    assert_eq!(
        got.iter().collect::<BTreeSet<_>>(),
        expected.iter().collect::<BTreeSet<_>>()
    );
    for item in v["GroupIdList"].as_array().unwrap() {
        assert_eq!(keys(item), set(&["GroupId"]), "no filter: GroupId only");
    }
    let page = api
        .ok(
            "group_open_http_svc/get_joined_group_list",
            &json!({"Member_Account": account, "Limit": 2, "Offset": 1,
                    "ResponseFilter": {"GroupBaseInfoFilter": ["Name", "MemberNum"], "SelfInfoFilter": ["Role", "JoinTime", "UnreadMsgNum"]}}),
        )
        .await;
    assert_eq!(page["TotalCount"], expected.len());
    let items = page["GroupIdList"].as_array().unwrap();
    assert_eq!(
        strs(&page["GroupIdList"], "GroupId"),
        got[1..3.min(got.len())]
    );
    for item in items {
        let id = item["GroupId"].as_str().unwrap();
        let info = group_info(&api, id).await;
        assert_eq!(item["Name"], info["Name"]);
        assert_eq!(item["MemberNum"], info["MemberNum"]);
        let me = row(&info, account).unwrap();
        assert_eq!(item["SelfInfo"]["Role"], me["Role"]);
        assert_eq!(item["SelfInfo"]["JoinTime"], me["JoinTime"]);
        let unread = info["NextMsgSeq"].as_u64().unwrap() - 1 - me["MsgSeq"].as_u64().unwrap();
        assert_eq!(item["SelfInfo"]["UnreadMsgNum"], unread);
    }
    let mut by_type = 0;
    for t in ["Public", "Private", "ChatRoom", "Community"] {
        let v = api
            .ok(
                "group_open_http_svc/get_joined_group_list",
                &json!({"Member_Account": account, "GroupType": t}),
            )
            .await;
        by_type += v["TotalCount"].as_u64().unwrap();
    }
    assert_eq!(by_type, expected.len() as u64);
    for (body, want) in [
        (json!({"Member_Account": "ghost"}), 10019),
        (json!({}), 10004),
        (json!({"Member_Account": account, "Limit": 5001}), 10004),
        (
            json!({"Member_Account": account, "GroupType": "Club"}),
            10004,
        ),
    ] {
        let v = api
            .call("group_open_http_svc/get_joined_group_list", &body)
            .await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_writes_change_what_the_group_reads_return() {
    let (emu, api) = start(no_limit()).await;
    let (a, b, c, d) = ("user_0101", "user_0102", "user_0103", "user_0104");
    let create = json!({"Type": "Public", "Name": "probe", "Owner_Account": a, "GroupId": "probe-1",
        "Introduction": "intro", "MemberList": [{"Member_Account": b}, {"Member_Account": c, "Role": "Admin"}],
        "AppDefinedData": [{"Key": "Topic", "Value": "tests"}]});
    let (raw, v) = api
        .call_text("group_open_http_svc/create_group", &create)
        .await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(v["GroupId"], "probe-1");
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "GroupId",
        ],
    );
    let info = group_info(&api, "probe-1").await;
    assert_eq!(info["Owner_Account"], a);
    assert_eq!(info["MemberNum"], 3);
    assert_eq!(info["InfoSeq"], 1);
    assert_eq!(info["NextMsgSeq"], 1);
    assert_eq!(info["Introduction"], "intro");
    assert_eq!(info["ApplyJoinOption"], "NeedPermission");
    assert_eq!(
        info["AppDefinedData"],
        json!([{"Key": "Topic", "Value": "tests"}])
    );
    assert_eq!(strs(&info["MemberList"], "Member_Account"), [a, b, c]);
    assert_eq!(
        strs(&info["MemberList"], "Role"),
        ["Owner", "Member", "Admin"]
    );
    assert!(joined(&api, b).await.contains(&"probe-1".to_owned()));
    let t = info["LastMsgTime"].as_u64().unwrap();
    for m in [a, b, c] {
        let convs = conversations(&api, m).await;
        assert_eq!(
            convs.get("group:probe-1"),
            Some(&t),
            "{m} has the new group's conversation"
        );
        assert_eq!(convs.values().max(), Some(&t), "as its newest");
    }
    let auto = api
        .ok(
            "group_open_http_svc/create_group",
            &json!({"Type": "Private", "Name": "auto"}),
        )
        .await;
    let auto_id = auto["GroupId"].as_str().unwrap().to_owned();
    assert!(
        auto_id.starts_with("@TGS#") && auto_id.len() == 14,
        "{auto_id}"
    );
    assert_eq!(
        group_info(&api, &auto_id).await["Owner_Account"],
        "",
        "ownerless"
    );
    for (body, want) in [
        (create.clone(), 10021),
        (
            json!({"Type": "Public", "Name": "x", "GroupId": "@TGS#mine"}),
            10015,
        ),
        (
            json!({"Type": "Community", "Name": "x", "GroupId": "plain"}),
            10015,
        ),
        (json!({"Type": "Club", "Name": "x"}), 10004),
        (json!({"Type": "Public", "Name": "n".repeat(31)}), 10004),
        (json!({"Type": "Public"}), 10004),
        (
            json!({"Type": "Public", "Name": "x", "Owner_Account": "ghost"}),
            10019,
        ),
        (
            json!({"Type": "Public", "Name": "x", "MemberList": [{"Member_Account": "ghost"}]}),
            10019,
        ),
        (
            json!({"Type": "Public", "Name": "x", "AppDefinedData": [{"Key": "Secret", "Value": "v"}]}),
            10004,
        ),
        (
            json!({"Type": "AVChatRoom", "Name": "x", "MemberList": [{"Member_Account": b}]}),
            10007,
        ),
        (
            json!({"Type": "Public", "Name": "x", "MaxMemberCount": 1, "Owner_Account": a, "MemberList": [{"Member_Account": b}]}),
            10014,
        ),
    ] {
        let v = api.call("group_open_http_svc/create_group", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // modify_group_base_info: the fields and InfoSeq.
    api.ok(
        "group_open_http_svc/modify_group_base_info",
        &json!({"GroupId": "probe-1", "Name": "probe2", "Notification": "rules", "MuteAllMember": "On",
                "AppDefinedData": [{"Key": "Region", "Value": "eu"}, {"Key": "Topic", "Value": ""}]}),
    )
    .await;
    let info = group_info(&api, "probe-1").await;
    assert_eq!(info["Name"], "probe2");
    assert_eq!(info["Notification"], "rules");
    assert_eq!(info["Introduction"], "intro");
    assert_eq!(info["MuteAllMember"], "On");
    assert_eq!(
        info["AppDefinedData"],
        json!([{"Key": "Region", "Value": "eu"}])
    );
    assert_eq!(info["InfoSeq"], 2);
    for (body, want) in [
        (json!({"GroupId": "nope", "Name": "x"}), 10010),
        (json!({"GroupId": "probe-1", "Name": ""}), 10004),
        (json!({"GroupId": "probe-1", "MaxMemberNum": 2}), 10004),
        (
            json!({"GroupId": "probe-1", "ApplyJoinOption": "Sometimes"}),
            10004,
        ),
        (json!({"Name": "x"}), 10004),
    ] {
        let v = api
            .call("group_open_http_svc/modify_group_base_info", &body)
            .await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // add_group_member: per-member Result.
    let (raw, v) = api
        .call_text(
            "group_open_http_svc/add_group_member",
            &json!({"GroupId": "probe-1", "Silence": 1, "MemberList": [
                {"Member_Account": d}, {"Member_Account": b}, {"Member_Account": "ghost"}, {"Member_Account": d}]}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "ActionStatus",
            "RequestId",
            "MemberList",
            "Member_Account",
            "Result",
        ],
    );
    assert_eq!(
        v["MemberList"],
        json!([
        {"Member_Account": d, "Result": 1}, {"Member_Account": b, "Result": 2},
        {"Member_Account": "ghost", "Result": 0}, {"Member_Account": d, "Result": 2}])
    );
    let info = group_info(&api, "probe-1").await;
    assert_eq!(info["MemberNum"], 4);
    assert_eq!(
        strs(&info["MemberList"], "Member_Account"),
        [a, b, c, d],
        "join order"
    );
    assert_eq!(row(&info, d).unwrap()["Role"], "Member");
    assert!(joined(&api, d).await.contains(&"probe-1".to_owned()));
    assert_eq!(
        conversations(&api, d).await.get("group:probe-1"),
        Some(&info["LastMsgTime"].as_u64().unwrap())
    );

    // delete_group_member.
    api.ok(
        "group_open_http_svc/delete_group_member",
        &json!({"GroupId": "probe-1", "MemberToDel_Account": [d, "ghost"]}),
    )
    .await;
    assert_eq!(group_info(&api, "probe-1").await["MemberNum"], 3);
    assert!(!joined(&api, d).await.contains(&"probe-1".to_owned()));
    assert!(!conversations(&api, d).await.contains_key("group:probe-1"));
    let v = api
        .call(
            "group_open_http_svc/delete_group_member",
            &json!({"GroupId": "probe-1", "MemberToDel_Account": [a]}),
        )
        .await;
    assert_eq!(code(&v), 10007, "the owner cannot be removed: {v}");

    // modify_group_member_info and forbid_send_msg.
    let now = unix_now();
    api.ok(
        "group_open_http_svc/modify_group_member_info",
        &json!({"GroupId": "probe-1", "Member_Account": b, "Role": "Admin", "NameCard": "bee",
                "MsgFlag": "AcceptNotNotify", "MuteTime": 60,
                "AppMemberDefinedData": [{"Key": "Title", "Value": "ops"}]}),
    )
    .await;
    api.ok(
        "group_open_http_svc/forbid_send_msg",
        &json!({"GroupId": "probe-1", "Members_Account": [c, "ghost"], "MuteTime": 4294967295u64}),
    )
    .await;
    let m = members(&api, "probe-1").await;
    let rb = row(&m, b).unwrap();
    assert_eq!(rb["Role"], "Admin");
    assert_eq!(rb["NameCard"], "bee");
    assert_eq!(rb["MsgFlag"], "AcceptNotNotify");
    assert_eq!(
        rb["AppMemberDefinedData"],
        json!([{"Key": "Title", "Value": "ops"}])
    );
    let mute = rb["MuteUntil"].as_u64().unwrap();
    assert!(mute >= now + 60 && mute <= unix_now() + 60, "{mute}");
    assert_eq!(row(&m, c).unwrap()["MuteUntil"], 4294967295u64);
    for (body, want) in [
        (
            json!({"GroupId": "probe-1", "Member_Account": a, "Role": "Admin"}),
            10007,
        ),
        (
            json!({"GroupId": "probe-1", "Member_Account": d, "NameCard": "x"}),
            10007,
        ),
        (
            json!({"GroupId": "probe-1", "Member_Account": b, "Role": "Owner"}),
            10004,
        ),
        (
            json!({"GroupId": "probe-1", "Member_Account": b, "NameCard": "n".repeat(51)}),
            10004,
        ),
        (
            json!({"GroupId": "probe-1", "Member_Account": "ghost", "NameCard": "x"}),
            10019,
        ),
    ] {
        let v = api
            .call("group_open_http_svc/modify_group_member_info", &body)
            .await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // change_group_owner.
    api.ok(
        "group_open_http_svc/change_group_owner",
        &json!({"GroupId": "probe-1", "NewOwner_Account": c}),
    )
    .await;
    let info = group_info(&api, "probe-1").await;
    assert_eq!(info["Owner_Account"], c);
    assert_eq!(row(&info, a).unwrap()["Role"], "Member");
    assert_eq!(row(&info, c).unwrap()["Role"], "Owner");
    assert_eq!(info["InfoSeq"], 3);
    let v = api
        .call(
            "group_open_http_svc/change_group_owner",
            &json!({"GroupId": "probe-1", "NewOwner_Account": d}),
        )
        .await;
    assert_eq!(code(&v), 10007, "not a member: {v}");

    // send_group_msg: NextMsgSeq, LastMsgTime, the sender's LastSendMsgTime.
    let sent = api
        .ok(
            "group_open_http_svc/send_group_msg",
            &json!({"GroupId": "probe-1", "From_Account": b, "Random": 9,
                    "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
        )
        .await;
    assert_eq!(sent["MsgSeq"], 1);
    let info = group_info(&api, "probe-1").await;
    assert_eq!(info["NextMsgSeq"], 2);
    assert_eq!(info["LastMsgTime"], sent["MsgTime"]);
    assert_eq!(row(&info, b).unwrap()["LastSendMsgTime"], sent["MsgTime"]);
    let v = api
        .call(
            "group_open_http_svc/send_group_msg",
            &json!({"GroupId": "probe-1", "From_Account": d, "Random": 9,
                    "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
        )
        .await;
    assert_eq!(code(&v), 10007, "a non-member cannot send: {v}");

    // destroy_group.
    api.ok(
        "group_open_http_svc/destroy_group",
        &json!({"GroupId": "probe-1"}),
    )
    .await;
    let v = api
        .ok(
            "group_open_http_svc/get_group_info",
            &json!({"GroupIdList": ["probe-1"]}),
        )
        .await;
    assert_eq!(v["GroupInfo"][0]["ErrorCode"], 10010);
    let v = api
        .call(
            "group_open_http_svc/get_group_member_info",
            &json!({"GroupId": "probe-1"}),
        )
        .await;
    assert_eq!(code(&v), 10010);
    for m in [a, b, c] {
        assert!(!joined(&api, m).await.contains(&"probe-1".to_owned()));
        assert!(!conversations(&api, m).await.contains_key("group:probe-1"));
    }
    let v = api
        .call(
            "group_open_http_svc/destroy_group",
            &json!({"GroupId": "probe-1"}),
        )
        .await;
    assert_eq!(code(&v), 10010);
    // The id can be used again.
    api.ok(
        "group_open_http_svc/create_group",
        &json!({"Type": "Public", "Name": "again", "GroupId": "probe-1"}),
    )
    .await;
    assert_eq!(group_info(&api, "probe-1").await["Name"], "again");
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------
// Friends
// ---------------------------------------------------------------------------

/// `account`'s whole friend list: friend → ValueItem, walking every page.
async fn friend_list(api: &Api, account: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut start = 0;
    loop {
        let page = api
            .ok(
                "sns/friend_get",
                &json!({"From_Account": account, "StartIndex": start}),
            )
            .await;
        for item in page["UserDataItem"].as_array().unwrap() {
            let prev = out.insert(
                item["To_Account"].as_str().unwrap().to_owned(),
                item["ValueItem"].clone(),
            );
            assert!(prev.is_none(), "{item} twice");
        }
        if page["CompleteFlag"] == 1 {
            assert_eq!(page["NextStartIndex"], 0);
            assert_eq!(page["FriendNum"], out.len());
            return out;
        }
        start = page["NextStartIndex"].as_u64().unwrap();
    }
}

fn tag_value<'a>(items: &'a Value, tag: &str) -> Option<&'a Value> {
    items
        .as_array()?
        .iter()
        .find(|t| t["Tag"] == tag)
        .map(|t| &t["Value"])
}

/// friend_get_list of one friend: (ResultCode, SnsProfileItem).
async fn friend_entry(api: &Api, from: &str, to: &str, tags: &[&str]) -> (i64, Value) {
    let v = api
        .ok(
            "sns/friend_get_list",
            &json!({"From_Account": from, "To_Account": [to], "TagList": tags}),
        )
        .await;
    let item = &v["InfoItem"][0];
    (
        item["ResultCode"].as_i64().unwrap(),
        item["SnsProfileItem"].clone(),
    )
}

async fn sequences(api: &Api, account: &str) -> (u64, u64) {
    let v = api
        .ok(
            "sns/friend_get",
            &json!({"From_Account": account, "StartIndex": 0}),
        )
        .await;
    (
        v["StandardSequence"].as_u64().unwrap(),
        v["CustomSequence"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friend_get_pages_the_list_and_friend_get_list_reads_chosen_friends() {
    let (emu, api) = start(no_limit()).await;
    let (raw, first) = api
        .call_text(
            "sns/friend_get",
            &json!({"From_Account": "user_0001", "StartIndex": 0}),
        )
        .await;
    assert_eq!(code(&first), 0);
    key_order(
        &raw,
        &[
            "UserDataItem",
            "To_Account",
            "ValueItem",
            "StandardSequence",
            "CustomSequence",
            "FriendNum",
            "CompleteFlag",
            "NextStartIndex",
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "ErrorDisplay",
            "RequestId",
        ],
    );
    let total = first["FriendNum"].as_u64().unwrap();
    assert!(
        total > 100,
        "user_0001 has more than a page of friends ({total})"
    );
    assert_eq!(first["UserDataItem"].as_array().unwrap().len(), 100);
    assert_eq!(first["CompleteFlag"], 0);
    assert_eq!(first["NextStartIndex"], 100);
    let all = friend_list(&api, "user_0001").await;
    assert_eq!(all.len() as u64, total);
    for (friend, values) in &all {
        assert!(
            tag_value(values, "Tag_SNS_IM_AddSource").is_some(),
            "{friend}: {values}"
        );
        assert!(tag_value(values, "Tag_SNS_IM_AddTime").is_some_and(Value::is_u64));
    }
    // Sequences the client already has leave that part out.
    let (std_seq, custom_seq) = (
        first["StandardSequence"].clone(),
        first["CustomSequence"].clone(),
    );
    let v = api
        .ok(
            "sns/friend_get",
            &json!({"From_Account": "user_0001", "StartIndex": 0, "StandardSequence": std_seq, "CustomSequence": custom_seq}),
        )
        .await;
    assert!(v["UserDataItem"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i.get("ValueItem").is_none()));
    assert_eq!(v["FriendNum"], total);
    let v = api
        .ok(
            "sns/friend_get",
            &json!({"From_Account": "user_0001", "StartIndex": 0, "StandardSequence": std_seq}),
        )
        .await;
    for item in v["UserDataItem"].as_array().unwrap() {
        for t in strs(&item["ValueItem"], "Tag") {
            assert!(t.starts_with("Tag_SNS_Custom_"), "{t}");
        }
    }
    let v = api
        .ok(
            "sns/friend_get",
            &json!({"From_Account": "user_0001", "StartIndex": 100_000}),
        )
        .await;
    assert_eq!(v["UserDataItem"], json!([]));
    assert_eq!(v["CompleteFlag"], 1);
    for (body, want) in [
        (json!({"From_Account": "user_0001"}), 30001),
        (json!({"From_Account": "ghost", "StartIndex": 0}), 30003),
        (json!({"StartIndex": 0}), 30001),
        (
            json!({"From_Account": "user_0001", "StartIndex": "0"}),
            30001,
        ),
    ] {
        let (raw, v) = api.call_text("sns/friend_get", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
        key_order(
            &raw,
            &["ActionStatus", "ErrorCode", "ErrorInfo", "ErrorDisplay"],
        );
    }

    // friend_get_list: per item, in request order.
    let friend = all.keys().next().unwrap().clone();
    let stranger = users(2..=999)
        .into_iter()
        .find(|u| !all.contains_key(u))
        .unwrap();
    let tags = [
        "Tag_SNS_IM_AddTime",
        "Tag_Profile_IM_Nick",
        "Tag_SNS_IM_AddSource",
    ];
    let (raw, v) = api
        .call_text(
            "sns/friend_get_list",
            &json!({"From_Account": "user_0001", "To_Account": [friend, stranger, "ghost"], "TagList": tags}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "InfoItem",
            "To_Account",
            "ResultCode",
            "ResultInfo",
            "SnsProfileItem",
            "Fail_Account",
            "ActionStatus",
            "ErrorDisplay",
        ],
    );
    let items = &v["InfoItem"];
    assert_eq!(
        strs(items, "To_Account"),
        [friend.as_str(), stranger.as_str(), "ghost"]
    );
    assert_eq!(items[0]["ResultCode"], 0);
    assert_eq!(items[1]["ResultCode"], 30001);
    assert_eq!(items[2]["ResultCode"], 30003);
    assert_eq!(v["Fail_Account"], json!([stranger, "ghost"]));
    assert_eq!(strs(&items[0]["SnsProfileItem"], "Tag"), tags);
    assert_eq!(
        tag_value(&items[0]["SnsProfileItem"], "Tag_SNS_IM_AddTime"),
        tag_value(&all[&friend], "Tag_SNS_IM_AddTime")
    );
    let nick = profile(&api, &friend, &["Tag_Profile_IM_Nick"]).await;
    assert_eq!(
        tag_value(&items[0]["SnsProfileItem"], "Tag_Profile_IM_Nick"),
        nick.get("Tag_Profile_IM_Nick")
    );
    let over = users(1..=101);
    for (body, want) in [
        (
            json!({"From_Account": "user_0001", "To_Account": over, "TagList": tags}),
            30001,
        ),
        (
            json!({"From_Account": "user_0001", "To_Account": [friend], "TagList": ["Tag_SNS_IM_Nope"]}),
            30001,
        ),
        (
            json!({"From_Account": "user_0001", "To_Account": [friend], "TagList": []}),
            30001,
        ),
        (
            json!({"From_Account": "user_0001", "To_Account": [], "TagList": tags}),
            30001,
        ),
        (
            json!({"From_Account": "ghost", "To_Account": [friend], "TagList": tags}),
            30003,
        ),
    ] {
        let v = api.call("sns/friend_get_list", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }
    emu.shutdown().await;
}

/// Accounts among `candidates` whose AllowType is `allow` and who may send friend
/// requests, and who are not in `from`'s list.
async fn pick(api: &Api, from: &str, allow: &str, candidates: &[String], n: usize) -> Vec<String> {
    let mut profiles = Vec::new();
    for chunk in candidates.chunks(100) {
        let v = api
            .ok(
                "profile/portrait_get",
                &json!({"To_Account": chunk, "TagList": ["Tag_Profile_IM_AllowType", "Tag_Profile_IM_AdminForbidType"]}),
            )
            .await;
        profiles.extend(v["UserProfileItem"].as_array().unwrap().iter().cloned());
    }
    let mut out = Vec::new();
    for item in &profiles {
        let name = item["To_Account"].as_str().unwrap();
        let allow_type = tag_value(&item["ProfileItem"], "Tag_Profile_IM_AllowType")
            .and_then(Value::as_str)
            .unwrap_or("AllowType_Type_NeedConfirm");
        let forbidden = tag_value(&item["ProfileItem"], "Tag_Profile_IM_AdminForbidType")
            == Some(&json!("AdminForbid_Type_SendOut"));
        if name != from
            && allow_type == allow
            && !forbidden
            && friend_entry(api, from, name, &["Tag_SNS_IM_AddTime"])
                .await
                .0
                != 0
            && friend_entry(api, name, from, &["Tag_SNS_IM_AddTime"])
                .await
                .0
                != 0
        {
            out.push(name.to_owned());
            if out.len() == n {
                break;
            }
        }
    }
    assert_eq!(out.len(), n, "not enough {allow} accounts");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friend_writes_change_what_the_friend_reads_return() {
    let (emu, api) = start(no_limit()).await;
    let candidates = users(300..=399);
    let from = pick(&api, "user_0299", "AllowType_Type_AllowAny", &candidates, 1).await[0].clone();
    let any = pick(&api, &from, "AllowType_Type_AllowAny", &candidates, 3).await;
    let confirm = pick(&api, &from, "AllowType_Type_NeedConfirm", &candidates, 2).await;
    let deny = pick(&api, &from, "AllowType_Type_DenyAny", &users(400..=999), 1).await[0].clone();
    let (std0, custom0) = sequences(&api, &from).await;

    let (raw, v) = api
        .call_text(
            "sns/friend_add",
            &json!({"From_Account": from, "AddFriendItem": [
                {"To_Account": any[0], "Remark": "pal", "GroupName": "work", "AddSource": "AddSource_Type_Web", "AddWording": "hi"},
                {"To_Account": confirm[0], "AddSource": "AddSource_Type_Web"},
                {"To_Account": deny, "AddSource": "AddSource_Type_Web"},
                {"To_Account": from, "AddSource": "AddSource_Type_Web"},
                {"To_Account": "ghost", "AddSource": "AddSource_Type_Web"}]}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "ResultItem",
            "To_Account",
            "ResultCode",
            "ResultInfo",
            "ActionStatus",
            "ErrorDisplay",
        ],
    );
    let codes: Vec<i64> = v["ResultItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ResultCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 30539, 30516, 30001, 30003]);
    let tags = [
        "Tag_SNS_IM_Remark",
        "Tag_SNS_IM_Group",
        "Tag_SNS_IM_AddSource",
        "Tag_SNS_IM_AddWording",
        "Tag_SNS_IM_AddTime",
    ];
    let (c, items) = friend_entry(&api, &from, &any[0], &tags).await;
    assert_eq!(c, 0);
    assert_eq!(tag_value(&items, "Tag_SNS_IM_Remark"), Some(&json!("pal")));
    assert_eq!(
        tag_value(&items, "Tag_SNS_IM_Group"),
        Some(&json!(["work"]))
    );
    assert_eq!(
        tag_value(&items, "Tag_SNS_IM_AddWording"),
        Some(&json!("hi"))
    );
    let added = tag_value(&items, "Tag_SNS_IM_AddTime")
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(added.abs_diff(unix_now()) <= 5);
    assert_eq!(
        friend_entry(&api, &any[0], &from, &tags).await.0,
        0,
        "Add_Type_Both adds both ways"
    );
    assert_ne!(
        friend_entry(&api, &from, &confirm[0], &tags).await.0,
        0,
        "pending: nothing formed"
    );
    let (std1, _) = sequences(&api, &from).await;
    assert!(std1 > std0);
    let v = api
        .ok(
            "sns/friend_add",
            &json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[0], "AddSource": "AddSource_Type_Web"}]}),
        )
        .await;
    assert_eq!(v["ResultItem"][0]["ResultCode"], 30001, "already a friend");
    // One-way add needs no confirmation; a forced add ignores AllowType.
    let v = api
        .ok(
            "sns/friend_add",
            &json!({"From_Account": from, "AddType": "Add_Type_Single", "AddFriendItem": [{"To_Account": confirm[1], "AddSource": "AddSource_Type_Web"}]}),
        )
        .await;
    assert_eq!(v["ResultItem"][0]["ResultCode"], 0);
    assert_eq!(friend_entry(&api, &from, &confirm[1], &tags).await.0, 0);
    assert_ne!(
        friend_entry(&api, &confirm[1], &from, &tags).await.0,
        0,
        "one way only"
    );
    let v = api
        .ok(
            "sns/friend_add",
            &json!({"From_Account": from, "ForceAddFlags": 1, "AddFriendItem": [{"To_Account": deny, "AddSource": "AddSource_Type_Web"}]}),
        )
        .await;
    assert_eq!(v["ResultItem"][0]["ResultCode"], 0);
    assert_eq!(friend_entry(&api, &deny, &from, &tags).await.0, 0);
    for (body, want) in [
        (
            json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[1]}]}),
            30001,
        ),
        (
            json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[1], "AddSource": "Web"}]}),
            30001,
        ),
        (json!({"From_Account": from, "AddFriendItem": []}), 30001),
        (
            json!({"From_Account": from, "AddType": "Sideways", "AddFriendItem": [{"To_Account": any[1], "AddSource": "AddSource_Type_Web"}]}),
            30001,
        ),
        (
            json!({"From_Account": "ghost", "AddFriendItem": [{"To_Account": any[1], "AddSource": "AddSource_Type_Web"}]}),
            30003,
        ),
    ] {
        let v = api.call("sns/friend_add", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // friend_import: one way, with history and custom data.
    let v = api
        .ok(
            "sns/friend_import",
            &json!({"From_Account": from, "AddFriendItem": [
                {"To_Account": any[1], "Remark": "old pal", "RemarkTime": 1_600_000_100u64, "GroupName": ["a", "b"],
                 "AddSource": "AddSource_Type_Import", "AddTime": 1_600_000_000u64,
                 "CustomItem": [{"Tag": "Tag_SNS_Custom_Note", "Value": "n1"}, {"Tag": "Tag_SNS_Custom_Rank", "Value": 3}]},
                {"To_Account": any[0], "AddSource": "AddSource_Type_Import"}]}),
        )
        .await;
    assert_eq!(v["ResultItem"][0]["ResultCode"], 0);
    assert_eq!(v["ResultItem"][1]["ResultCode"], 30001);
    assert_eq!(v["Fail_Account"], json!([any[0]]));
    let all_tags = [
        "Tag_SNS_IM_Remark",
        "Tag_SNS_IM_RemarkTime",
        "Tag_SNS_IM_Group",
        "Tag_SNS_IM_AddTime",
        "Tag_SNS_Custom_Note",
        "Tag_SNS_Custom_Rank",
    ];
    let (c, items) = friend_entry(&api, &from, &any[1], &all_tags).await;
    assert_eq!(c, 0);
    assert_eq!(
        items,
        json!([{"Tag": "Tag_SNS_IM_Remark", "Value": "old pal"}, {"Tag": "Tag_SNS_IM_RemarkTime", "Value": 1_600_000_100u64},
               {"Tag": "Tag_SNS_IM_Group", "Value": ["a", "b"]}, {"Tag": "Tag_SNS_IM_AddTime", "Value": 1_600_000_000u64},
               {"Tag": "Tag_SNS_Custom_Note", "Value": "n1"}, {"Tag": "Tag_SNS_Custom_Rank", "Value": 3}])
    );
    assert_ne!(
        friend_entry(&api, &any[1], &from, &all_tags).await.0,
        0,
        "import is one way"
    );
    let v = api
        .call(
            "sns/friend_import",
            &json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[2], "AddSource": "AddSource_Type_X", "CustomItem": [{"Tag": "Tag_SNS_Custom_Zzz", "Value": 1}]}]}),
        )
        .await;
    assert_eq!(code(&v), 30001, "undeclared custom tag: {v}");

    // friend_update: Remark, Group and custom tags; sequences move.
    let (std2, custom2) = sequences(&api, &from).await;
    assert!(custom2 > custom0);
    let v = api
        .ok(
            "sns/friend_update",
            &json!({"From_Account": from, "UpdateItem": [
                {"To_Account": any[0], "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": "buddy"}, {"Tag": "Tag_SNS_Custom_Rank", "Value": 9}]},
                {"To_Account": any[2], "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": "x"}]},
                {"To_Account": any[1], "SnsItem": [{"Tag": "Tag_SNS_IM_AddSource", "Value": "AddSource_Type_X"}]}]}),
        )
        .await;
    let codes: Vec<i64> = v["ResultItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ResultCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 30001, 30001]);
    assert_eq!(v["Fail_Account"], json!([any[2], any[1]]));
    let (_, items) = friend_entry(
        &api,
        &from,
        &any[0],
        &["Tag_SNS_IM_Remark", "Tag_SNS_Custom_Rank"],
    )
    .await;
    assert_eq!(
        items,
        json!([{"Tag": "Tag_SNS_IM_Remark", "Value": "buddy"}, {"Tag": "Tag_SNS_Custom_Rank", "Value": 9}])
    );
    let (std3, custom3) = sequences(&api, &from).await;
    assert!(std3 > std2 && custom3 > custom2);

    // friend_delete: 31704 for a non-friend; Both removes the other side too.
    let v = api
        .ok(
            "sns/friend_delete",
            &json!({"From_Account": from, "DeleteType": "Delete_Type_Both", "To_Account": [any[0], any[2]]}),
        )
        .await;
    let codes: Vec<i64> = v["ResultItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ResultCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 31704]);
    assert_ne!(friend_entry(&api, &from, &any[0], &tags).await.0, 0);
    assert_ne!(friend_entry(&api, &any[0], &from, &tags).await.0, 0);
    // Single (the default) leaves the other side.
    api.ok(
        "sns/friend_delete",
        &json!({"From_Account": from, "To_Account": [deny]}),
    )
    .await;
    assert_ne!(friend_entry(&api, &from, &deny, &tags).await.0, 0);
    assert_eq!(friend_entry(&api, &deny, &from, &tags).await.0, 0);

    // friend_delete_all with Both: the list is empty and former friends lose From.
    let before = friend_list(&api, &from).await;
    assert!(!before.is_empty());
    let (raw, v) = api
        .call_text(
            "sns/friend_delete_all",
            &json!({"From_Account": from, "DeleteType": "Delete_Type_Both"}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "ErrorDisplay",
            "RequestId",
        ],
    );
    assert!(friend_list(&api, &from).await.is_empty());
    for f in before.keys() {
        assert_ne!(
            friend_entry(&api, f, &from, &tags).await.0,
            0,
            "{f} still lists {from}"
        );
    }
    assert_eq!(
        friend_entry(&api, &deny, &from, &tags).await.0,
        0,
        "not a friend of From: untouched"
    );
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------
// Accounts and messages
// ---------------------------------------------------------------------------

async fn statuses(api: &Api, ids: &[&str]) -> Vec<String> {
    let items: Vec<Value> = ids.iter().map(|i| json!({"UserID": i})).collect();
    let v = api
        .ok(
            "im_open_login_svc/account_check",
            &json!({"CheckItem": items}),
        )
        .await;
    strs(&v["ResultItem"], "AccountStatus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_checked_imported_and_deleted() {
    let (emu, api) = start(no_limit()).await;
    let (raw, v) = api
        .call_text(
            "im_open_login_svc/account_check",
            &json!({"CheckItem": [{"UserID": "user_0001"}, {"UserID": "nobody"}, {"UserID": "user_0001"}]}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "ResultItem",
            "UserID",
            "ResultCode",
            "ResultInfo",
            "AccountStatus",
        ],
    );
    assert_eq!(
        v["ResultItem"],
        json!([
            {"UserID": "user_0001", "ResultCode": 0, "ResultInfo": "", "AccountStatus": "Imported"},
            {"UserID": "nobody", "ResultCode": 0, "ResultInfo": "", "AccountStatus": "NotImported"},
            {"UserID": "user_0001", "ResultCode": 0, "ResultInfo": "", "AccountStatus": "Imported"}])
    );
    let hundred: Vec<Value> = users(1..=100)
        .iter()
        .map(|u| json!({"UserID": u}))
        .collect();
    api.ok(
        "im_open_login_svc/account_check",
        &json!({"CheckItem": hundred}),
    )
    .await;
    let mut over = hundred.clone();
    over.push(json!({"UserID": "x"}));
    for (body, want) in [
        (json!({"CheckItem": over}), 70402),
        (json!({"CheckItem": []}), 70402),
        (json!({"CheckItem": [{"Id": "x"}]}), 70402),
        (json!({}), 70402),
    ] {
        let v = api.call("im_open_login_svc/account_check", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // Import: a new account, then again with a new nick.
    let (raw, v) = api
        .call_text(
            "im_open_login_svc/account_import",
            &json!({"UserID": "alice", "Nick": "Alice", "FaceUrl": "https://img.example/a.png"}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &["ActionStatus", "ErrorCode", "ErrorInfo", "RequestId"],
    );
    assert_eq!(statuses(&api, &["alice"]).await, ["Imported"]);
    let tags = [
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Image",
        "Tag_Profile_IM_Gender",
    ];
    let p = profile(&api, "alice", &tags).await;
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p["Tag_Profile_IM_Nick"], "Alice");
    assert_eq!(p["Tag_Profile_IM_Image"], "https://img.example/a.png");
    api.ok(
        "im_open_login_svc/account_import",
        &json!({"UserID": "alice", "Nick": "Alice 2"}),
    )
    .await;
    let p = profile(&api, "alice", &tags).await;
    assert_eq!(p["Tag_Profile_IM_Nick"], "Alice 2");
    assert_eq!(p["Tag_Profile_IM_Image"], "https://img.example/a.png");
    // The new account works everywhere: a message, a friend.
    api.ok(
        "openim/sendmsg",
        &json!({"From_Account": "alice", "To_Account": "user_0005", "MsgRandom": 1,
                "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
    )
    .await;
    assert!(conversations(&api, "alice")
        .await
        .contains_key("c2c:user_0005"));
    for (body, want) in [
        (json!({"UserID": "a b"}), 70402),
        (json!({"UserID": "a".repeat(33)}), 70402),
        (json!({"UserID": ""}), 70402),
        (json!({}), 70402),
        (json!({"UserID": "carl", "Nick": "n".repeat(501)}), 40601),
    ] {
        let v = api.call("im_open_login_svc/account_import", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    let (raw, v) = api
        .call_text(
            "im_open_login_svc/multiaccount_import",
            &json!({"Accounts": ["bob", "bad id", "carol"]}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(&raw, &["ActionStatus", "RequestId", "FailAccounts"]);
    assert_eq!(v["FailAccounts"], json!(["bad id"]));
    let v = api
        .ok(
            "im_open_login_svc/multiaccount_import",
            &json!({"AccountList": [{"UserID": "dave", "Nick": "Dave"}, {"UserID": "bob", "FaceUrl": "https://img.example/b.png"}]}),
        )
        .await;
    assert_eq!(v["FailAccounts"], json!([]));
    assert_eq!(
        statuses(&api, &["bob", "carol", "dave", "bad id"]).await,
        ["Imported", "Imported", "Imported", "NotImported"]
    );
    assert_eq!(
        profile(&api, "dave", &tags).await["Tag_Profile_IM_Nick"],
        "Dave"
    );
    assert_eq!(
        profile(&api, "bob", &tags).await["Tag_Profile_IM_Image"],
        "https://img.example/b.png"
    );
    for body in [
        json!({"Accounts": ["x"], "AccountList": [{"UserID": "y"}]}),
        json!({}),
        json!({"Accounts": []}),
    ] {
        let v = api
            .call("im_open_login_svc/multiaccount_import", &body)
            .await;
        assert_eq!(code(&v), 70402, "{body}: {v}");
    }

    // Delete an account with friends, groups and conversations.
    let victim = "user_0020";
    let friends = friend_list(&api, victim).await;
    let groups = joined(&api, victim).await;
    assert!(!friends.is_empty() && !groups.is_empty());
    let holders: Vec<String> = {
        let mut h = Vec::new();
        for f in friends.keys() {
            if friend_entry(&api, f, victim, &["Tag_SNS_IM_AddTime"])
                .await
                .0
                == 0
            {
                h.push(f.clone());
            }
        }
        h
    };
    assert!(!holders.is_empty());
    let sizes: Vec<u64> = {
        let mut s = Vec::new();
        for g in &groups {
            s.push(group_info(&api, g).await["MemberNum"].as_u64().unwrap());
        }
        s
    };
    let (raw, v) = api
        .call_text(
            "im_open_login_svc/account_delete",
            &json!({"DeleteItem": [{"UserID": victim}, {"UserID": "nobody"}]}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &[
            "ActionStatus",
            "RequestId",
            "ResultItem",
            "UserID",
            "ResultCode",
            "ResultInfo",
        ],
    );
    assert_eq!(
        v["ResultItem"][0],
        json!({"UserID": victim, "ResultCode": 0, "ResultInfo": ""})
    );
    assert_eq!(v["ResultItem"][1]["ResultCode"], 70107);
    assert_eq!(statuses(&api, &[victim]).await, ["NotImported"]);
    let v = api
        .ok(
            "profile/portrait_get",
            &json!({"To_Account": [victim], "TagList": ["Tag_Profile_IM_Nick"]}),
        )
        .await;
    assert_eq!(v["UserProfileItem"][0]["ResultCode"], 40003);
    let v = api
        .call(
            "sns/friend_get",
            &json!({"From_Account": victim, "StartIndex": 0}),
        )
        .await;
    assert_eq!(code(&v), 30003);
    for h in &holders {
        assert!(
            !friend_list(&api, h).await.contains_key(victim),
            "{h} still lists {victim}"
        );
    }
    let v = api
        .call(
            "group_open_http_svc/get_joined_group_list",
            &json!({"Member_Account": victim}),
        )
        .await;
    assert_eq!(code(&v), 10019);
    for (g, size) in groups.iter().zip(sizes) {
        let info = group_info(&api, g).await;
        assert_eq!(info["MemberNum"], size - 1, "{g}");
        assert!(row(&info, victim).is_none());
        assert_ne!(info["Owner_Account"], victim);
    }
    let v = api
        .call(
            "recentcontact/get_list",
            &json!({"From_Account": victim, "TimeStamp": 0, "StartIndex": 0, "TopTimeStamp": 0, "TopStartIndex": 0, "AssistFlags": 63}),
        )
        .await;
    assert_eq!(code(&v), 50001);
    // Re-importing gives an empty account.
    api.ok(
        "im_open_login_svc/account_import",
        &json!({"UserID": victim}),
    )
    .await;
    assert_eq!(statuses(&api, &[victim]).await, ["Imported"]);
    assert!(profile(&api, victim, &tags).await.is_empty());
    assert!(friend_list(&api, victim).await.is_empty());
    assert!(joined(&api, victim).await.is_empty());
    assert!(conversations(&api, victim).await.is_empty());
    emu.shutdown().await;
}

fn text_body() -> Value {
    json!([{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hello"}}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchsendmsg_and_importmsg_move_conversations() {
    let (emu, api) = start(no_limit()).await;
    let (from, r1, r2) = ("user_0003", "user_0004", "user_0005");
    let before = conversations(&api, from).await;
    let (raw, v) = api
        .call_text(
            "openim/batchsendmsg",
            &json!({"From_Account": from, "To_Account": [r1, r2, "ghost"], "MsgRandom": 77, "MsgBody": text_body()}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &[
            "ActionStatus",
            "ErrorCode",
            "ErrorInfo",
            "RequestId",
            "MsgKey",
            "ErrorList",
        ],
    );
    assert_eq!(
        v["ErrorList"],
        json!([{"To_Account": "ghost", "ErrorCode": 70107}])
    );
    let key = v["MsgKey"].as_str().unwrap();
    let t: u64 = key.rsplit('_').next().unwrap().parse().unwrap();
    assert!(key.starts_with("77_"));
    for r in [r1, r2] {
        let convs = conversations(&api, r).await;
        assert_eq!(convs[&format!("c2c:{from}")], t, "{r}");
        assert_eq!(convs.values().max(), Some(&t), "{r}: the newest");
    }
    assert_eq!(
        conversations(&api, from).await,
        before,
        "without SyncOtherMachine 1 the sender's list stays"
    );
    let v = api
        .ok(
            "openim/batchsendmsg",
            &json!({"From_Account": from, "To_Account": [r1], "SyncOtherMachine": 1, "MsgRandom": 78, "MsgBody": text_body()}),
        )
        .await;
    assert_eq!(v["ErrorList"], json!([]));
    let t2: u64 = v["MsgKey"]
        .as_str()
        .unwrap()
        .rsplit('_')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(t2 > t);
    assert_eq!(conversations(&api, from).await[&format!("c2c:{r1}")], t2);
    let snapshot = conversations(&api, r2).await;
    api.ok(
        "openim/batchsendmsg",
        &json!({"From_Account": from, "To_Account": [r2], "SendMsgControl": ["NoLastMsg"], "MsgRandom": 79, "MsgBody": text_body()}),
    )
    .await;
    assert_eq!(
        conversations(&api, r2).await,
        snapshot,
        "NoLastMsg changes no list"
    );
    let over: Vec<String> = users(1..=501);
    for (body, want) in [
        (
            json!({"From_Account": from, "MsgRandom": 1, "MsgBody": text_body()}),
            90003,
        ),
        (
            json!({"From_Account": from, "To_Account": over, "MsgRandom": 1, "MsgBody": text_body()}),
            90011,
        ),
        (
            json!({"From_Account": from, "To_Account": [r1], "MsgBody": text_body()}),
            90005,
        ),
        (
            json!({"From_Account": from, "To_Account": [r1], "MsgRandom": 1, "MsgBody": "hi"}),
            90007,
        ),
        (
            json!({"From_Account": from, "To_Account": [r1], "MsgRandom": 1, "MsgBody": [1]}),
            90002,
        ),
        (
            json!({"From_Account": from, "To_Account": [r1], "MsgRandom": 1, "MsgBody": text_body(), "MsgLifeTime": 604_801}),
            90026,
        ),
        (
            json!({"To_Account": [r1], "MsgRandom": 1, "MsgBody": text_body()}),
            90001,
        ),
        (
            json!({"From_Account": "ghost", "To_Account": [r1], "MsgRandom": 1, "MsgBody": text_body()}),
            70107,
        ),
    ] {
        let v = api.call("openim/batchsendmsg", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }

    // importmsg: 5 places the message at its time on both sides; 2 changes no list;
    // the same message imported again is one message.
    let (a, b) = ("user_0006", "user_0777");
    let future = unix_now() + 100_000;
    let msg = |sync: u64, ts: u64| {
        json!({"SyncFromOldSystem": sync, "From_Account": a, "To_Account": b, "MsgSeq": 5, "MsgRandom": 6,
               "MsgTimeStamp": ts, "MsgBody": text_body()})
    };
    let (raw, v) = api.call_text("openim/importmsg", &msg(2, future)).await;
    assert_eq!(code(&v), 0, "{v}");
    key_order(
        &raw,
        &["ActionStatus", "ErrorCode", "ErrorInfo", "RequestId"],
    );
    assert_ne!(
        conversations(&api, a).await.get(&format!("c2c:{b}")),
        Some(&future)
    );
    api.ok("openim/importmsg", &msg(5, future + 1)).await;
    assert_eq!(
        conversations(&api, a).await[&format!("c2c:{b}")],
        future + 1
    );
    assert_eq!(
        conversations(&api, b).await[&format!("c2c:{a}")],
        future + 1
    );
    for side in [(a, b), (b, a)] {
        api.ok(
            "recentcontact/delete",
            &json!({"From_Account": side.0, "Type": 1, "To_Account": side.1, "ClearRamble": 0}),
        )
        .await;
    }
    let mut again = msg(5, future + 1);
    again["From_Account"] = json!(b);
    again["To_Account"] = json!(a);
    api.ok("openim/importmsg", &again).await;
    assert!(
        !conversations(&api, a)
            .await
            .contains_key(&format!("c2c:{b}")),
        "the same (MsgSeq, MsgRandom, MsgTimeStamp) in the other direction is the same message"
    );
    let mut bad = msg(5, future);
    bad.as_object_mut().unwrap().remove("MsgTimeStamp");
    for (body, want) in [
        (msg(3, future), 90001),
        (bad, 90006),
        (
            json!({"SyncFromOldSystem": 2, "From_Account": a, "To_Account": "ghost", "MsgSeq": 1, "MsgRandom": 1, "MsgTimeStamp": 1, "MsgBody": text_body()}),
            90012,
        ),
        (
            json!({"SyncFromOldSystem": 2, "From_Account": "ghost", "To_Account": a, "MsgSeq": 1, "MsgRandom": 1, "MsgTimeStamp": 1, "MsgBody": text_body()}),
            90048,
        ),
        (
            json!({"SyncFromOldSystem": 2, "From_Account": a, "To_Account": b, "MsgSeq": 1, "MsgTimeStamp": 1, "MsgBody": text_body()}),
            90005,
        ),
    ] {
        let v = api.call("openim/importmsg", &body).await;
        assert_eq!(code(&v), want, "{body}: {v}");
    }
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_online_status_reports_each_account() {
    let (emu, api) = start(no_limit()).await;
    let ids = users(1..=40);
    let mut asked: Vec<String> = ids.clone();
    asked.push("ghost".into());
    let (raw, v) = api
        .call_text(
            "openim/query_online_status",
            &json!({"To_Account": asked, "IsNeedDetail": 1}),
        )
        .await;
    assert_eq!(code(&v), 0);
    key_order(
        &raw,
        &["ActionStatus", "RequestId", "QueryResult", "ErrorList"],
    );
    assert_eq!(strs(&v["QueryResult"], "To_Account"), ids);
    assert_eq!(
        v["ErrorList"],
        json!([{"To_Account": "ghost", "ErrorCode": 70107}])
    );
    let states: HashSet<String> = strs(&v["QueryResult"], "Status").into_iter().collect();
    assert!(
        states.contains("Offline") && states.len() >= 2,
        "{states:?}"
    );
    for item in v["QueryResult"].as_array().unwrap() {
        assert_eq!(
            item.get("Detail").is_some(),
            item["Status"] != "Offline",
            "{item}"
        );
    }
    let plain = api
        .ok("openim/query_online_status", &json!({"To_Account": ids}))
        .await;
    for item in plain["QueryResult"].as_array().unwrap() {
        assert_eq!(keys(item), set(&["To_Account", "Status"]));
    }
    let over = users(1..=501);
    assert_eq!(
        code(
            &api.call("openim/query_online_status", &json!({"To_Account": over}))
                .await
        ),
        90011
    );
    assert_eq!(
        code(&api.call("openim/query_online_status", &json!({})).await),
        90003
    );
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------
// Webhooks and changes from clients
// ---------------------------------------------------------------------------

/// A webhook receiver: records every request's URI and body.
async fn hook_server() -> (SocketAddr, mpsc::UnboundedReceiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let uri = req.uri().to_string();
                        let body = req.into_body().collect().await?.to_bytes();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let _ = tx.send((uri, v));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(
                            br#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn query_param(uri: &str, name: &str) -> Option<String> {
    let q = uri.split_once('?')?.1;
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Receives `n` webhooks (each within 10 s).
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    n: usize,
) -> Vec<(String, Value)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("webhook within 10 s")
            .expect("receiver open");
        out.push(got);
    }
    out
}

/// Waits (up to 10 s) until the emulator has counted `n` delivered webhooks; the
/// count moves once the receiver has answered, just after it got the request.
async fn wait_delivered(api: &Api, n: usize) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = api.get("/__emulator/stats").await;
        let done = stats["webhooks"]["delivered"].as_u64().unwrap() as usize
            + stats["webhooks"]["failed"].as_u64().unwrap() as usize;
        if done >= n || tokio::time::Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signed(uri: &str, token: &str) -> bool {
    let Some(t) = query_param(uri, "RequestTime") else {
        return false;
    };
    let mut h = Sha256::new();
    h.update(format!("{token}{t}"));
    query_param(uri, "Sign") == Some(hex::encode(h.finalize()))
        && t.parse::<u64>().is_ok_and(|t| t.abs_diff(unix_now()) <= 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_follow_exactly_the_writes_that_chat_announces() {
    let (hook_addr, mut rx) = hook_server().await;
    let token = "s3cret";
    let (emu, api) = start(EmulatorConfig {
        callback_url: Some(format!("http://{hook_addr}/cb")),
        callback_token: Some(token.into()),
        ..no_limit()
    })
    .await;
    let candidates = users(300..=399);
    let from = pick(&api, "user_0299", "AllowType_Type_AllowAny", &candidates, 1).await[0].clone();
    let any = pick(&api, &from, "AllowType_Type_AllowAny", &candidates, 2).await;
    let confirm = pick(&api, &from, "AllowType_Type_NeedConfirm", &candidates, 1).await[0].clone();
    let (a, b, c) = ("user_0101", "user_0102", "user_0103");
    let msg = text_body();
    let steps: Vec<(&str, Value, &[&str])> = vec![
        (
            "profile/portrait_set",
            json!({"From_Account": a, "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "A"}]}),
            &["Profile.CallbackPortraitSet"],
        ),
        (
            "profile/portrait_set",
            json!({"From_Account": a, "ProfileItem": [{"Tag": "Tag_Profile_IM_Gender", "Value": "bad"}]}),
            &[],
        ),
        (
            "sns/friend_add",
            json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[0], "AddSource": "AddSource_Type_Web"}, {"To_Account": confirm, "AddSource": "AddSource_Type_Web"}]}),
            &["Sns.CallbackFriendAdd"],
        ),
        (
            "sns/friend_add",
            json!({"From_Account": from, "AddFriendItem": [{"To_Account": confirm, "AddSource": "AddSource_Type_Web"}]}),
            &[],
        ),
        (
            "sns/friend_import",
            json!({"From_Account": from, "AddFriendItem": [{"To_Account": any[1], "AddSource": "AddSource_Type_Web"}]}),
            &[],
        ),
        (
            "sns/friend_update",
            json!({"From_Account": from, "UpdateItem": [{"To_Account": any[1], "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": "r"}]}]}),
            &[],
        ),
        (
            "sns/friend_delete",
            json!({"From_Account": from, "To_Account": [any[1]]}),
            &["Sns.CallbackFriendDelete"],
        ),
        (
            "sns/friend_delete",
            json!({"From_Account": from, "To_Account": [any[1]]}),
            &[],
        ),
        (
            "im_open_login_svc/account_import",
            json!({"UserID": "hooky", "Nick": "H"}),
            &[],
        ),
        (
            "im_open_login_svc/multiaccount_import",
            json!({"AccountList": [{"UserID": "hooky2", "Nick": "H2"}]}),
            &[],
        ),
        (
            "group_open_http_svc/create_group",
            json!({"Type": "Public", "Name": "hooks", "GroupId": "hooks", "Owner_Account": a, "MemberList": [{"Member_Account": b}]}),
            &["Group.CallbackAfterCreateGroup"],
        ),
        (
            "group_open_http_svc/modify_group_base_info",
            json!({"GroupId": "hooks", "Notification": "n"}),
            &["Group.CallbackAfterGroupInfoChanged"],
        ),
        (
            "group_open_http_svc/modify_group_base_info",
            json!({"GroupId": "hooks", "MaxMemberNum": 100, "MuteAllMember": "On", "AppDefinedData": [{"Key": "Topic", "Value": "t"}]}),
            &[],
        ),
        (
            "group_open_http_svc/add_group_member",
            json!({"GroupId": "hooks", "MemberList": [{"Member_Account": c}]}),
            &["Group.CallbackAfterNewMemberJoin"],
        ),
        (
            "group_open_http_svc/add_group_member",
            json!({"GroupId": "hooks", "MemberList": [{"Member_Account": c}]}),
            &[],
        ),
        (
            "group_open_http_svc/modify_group_member_info",
            json!({"GroupId": "hooks", "Member_Account": c, "Role": "Admin"}),
            &["Group.CallbackAfterMemberFieldChanged"],
        ),
        (
            "group_open_http_svc/modify_group_member_info",
            json!({"GroupId": "hooks", "Member_Account": c, "MsgFlag": "Discard", "MuteTime": 10}),
            &[],
        ),
        (
            "group_open_http_svc/forbid_send_msg",
            json!({"GroupId": "hooks", "Members_Account": [b], "MuteTime": 10}),
            &[],
        ),
        (
            "group_open_http_svc/change_group_owner",
            json!({"GroupId": "hooks", "NewOwner_Account": b}),
            &["Group.CallbackAfterChangeGroupOwner"],
        ),
        (
            "group_open_http_svc/send_group_msg",
            json!({"GroupId": "hooks", "From_Account": a, "Random": 1, "MsgBody": msg}),
            &["Group.CallbackAfterSendMsg"],
        ),
        (
            "group_open_http_svc/delete_group_member",
            json!({"GroupId": "hooks", "MemberToDel_Account": [c]}),
            &["Group.CallbackAfterMemberExit"],
        ),
        (
            "openim/sendmsg",
            json!({"From_Account": a, "To_Account": b, "MsgRandom": 1, "MsgBody": msg}),
            &["C2C.CallbackAfterSendMsg"],
        ),
        (
            "openim/batchsendmsg",
            json!({"From_Account": a, "To_Account": [b, c], "MsgRandom": 2, "MsgBody": msg}),
            &[],
        ),
        (
            "openim/importmsg",
            json!({"SyncFromOldSystem": 5, "From_Account": a, "To_Account": c, "MsgSeq": 1, "MsgRandom": 1, "MsgTimeStamp": 1_700_000_000u64, "MsgBody": msg}),
            &[],
        ),
        (
            "sns/friend_delete_all",
            json!({"From_Account": from, "DeleteType": "Delete_Type_Both"}),
            &[],
        ),
        (
            "recentcontact/delete",
            json!({"From_Account": a, "Type": 1, "To_Account": b}),
            &[],
        ),
        (
            "group_open_http_svc/destroy_group",
            json!({"GroupId": "hooks"}),
            &["Group.CallbackAfterGroupDestroyed"],
        ),
        (
            "im_open_login_svc/account_delete",
            json!({"DeleteItem": [{"UserID": "hooky"}]}),
            &[],
        ),
    ];
    let mark = api.hook_mark().await;
    let mut expected: Vec<String> = Vec::new();
    for (command, body, want) in &steps {
        let (v, hooks) = api.write(command, body).await;
        assert_eq!(hooks, *want, "{command} {body}: {v}");
        expected.extend(want.iter().map(|s| s.to_string()));
    }
    let logged = api.hooks_since(mark).await;
    let body_of = |cmd: &str| -> Value {
        logged
            .iter()
            .find(|h| h["CallbackCommand"] == cmd)
            .map(|h| h["Body"].clone())
            .unwrap()
    };
    let p = body_of("Profile.CallbackPortraitSet");
    assert_eq!(p["Operator_Account"], ADMIN);
    assert_eq!(p["From_Account"], a);
    assert_eq!(
        p["ProfileItem"],
        json!([{"Tag": "Tag_Profile_IM_Nick", "Value": "A"}])
    );
    assert!(p["EventTime"].is_u64());
    let f = body_of("Sns.CallbackFriendAdd");
    assert_eq!(
        f["PairList"],
        json!([{"From_Account": from, "To_Account": any[0], "Initiator_Account": from},
               {"From_Account": any[0], "To_Account": from, "Initiator_Account": from}]),
        "only the pair that formed (the pending one is not there)"
    );
    assert_eq!(f["ClientCmd"], "friend_add");
    assert_eq!(f["Admin_Account"], ADMIN);
    assert_eq!(f["ForceFlag"], 0);
    assert_eq!(
        body_of("Sns.CallbackFriendDelete")["PairList"],
        json!([{"From_Account": from, "To_Account": any[1]}])
    );
    let g = body_of("Group.CallbackAfterCreateGroup");
    assert_eq!(
        (
            g["GroupId"].clone(),
            g["Owner_Account"].clone(),
            g["Type"].clone()
        ),
        (json!("hooks"), json!(a), json!("Public"))
    );
    assert_eq!(g["MemberList"], json!([{"Member_Account": b}]));
    let i = body_of("Group.CallbackAfterGroupInfoChanged");
    assert_eq!(i["Notification"], "n");
    assert!(i.get("Name").is_none(), "only the changed fields");
    assert_eq!(
        body_of("Group.CallbackAfterNewMemberJoin")["NewMemberList"],
        json!([{"Member_Account": c}])
    );
    let m = body_of("Group.CallbackAfterMemberFieldChanged");
    assert_eq!(
        (m["Member_Account"].clone(), m["Role"].clone()),
        (json!(c), json!("Admin"))
    );
    let o = body_of("Group.CallbackAfterChangeGroupOwner");
    assert_eq!(
        (o["OldOwner_Account"].clone(), o["NewOwner_Account"].clone()),
        (json!(a), json!(b))
    );
    assert_eq!(
        body_of("Group.CallbackAfterMemberExit")["ExitMemberList"],
        json!([{"Member_Account": c}])
    );
    let d = body_of("Group.CallbackAfterGroupDestroyed");
    assert_eq!(
        d["MemberList"],
        json!([{"Member_Account": a}, {"Member_Account": b}])
    );
    for h in &logged {
        assert_eq!(h["OptPlatform"], "RESTAPI");
        assert_eq!(h["Body"]["CallbackCommand"], h["CallbackCommand"]);
    }

    // The receiver got each one, signed.
    let got = receive(&mut rx, expected.len()).await;
    let mut got_commands: Vec<String> = got
        .iter()
        .map(|(uri, body)| {
            assert!(uri.starts_with("/cb?"), "{uri}");
            assert!(signed(uri, token), "{uri}");
            assert_eq!(query_param(uri, "SdkAppid").as_deref(), Some("1400000000"));
            assert_eq!(query_param(uri, "OptPlatform").as_deref(), Some("RESTAPI"));
            let c = query_param(uri, "CallbackCommand").unwrap();
            assert_eq!(body["CallbackCommand"], c.as_str());
            c
        })
        .collect();
    got_commands.sort();
    expected.sort();
    assert_eq!(got_commands, expected);
    let stats = wait_delivered(&api, expected.len()).await;
    assert_eq!(stats["webhooks"]["failed"], 0);
    assert_eq!(stats["webhooks"]["delivered"], expected.len());
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_changes_act_as_the_user_and_send_client_webhooks() {
    let (hook_addr, mut rx) = hook_server().await;
    let (emu, api) = start(EmulatorConfig {
        callback_url: Some(format!("http://{hook_addr}/cb")),
        ..no_limit()
    })
    .await;
    let user = "user_0007";
    let mark = api.hook_mark().await;
    let (status, v) = api
        .client(
            "profile/portrait_set",
            &format!("as={user}&platform=iOS"),
            &json!({"ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "Seven"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(v["ErrorDisplay"], "", "the REST answer's shape");
    assert_eq!(
        profile(&api, user, &["Tag_Profile_IM_Nick"]).await["Tag_Profile_IM_Nick"],
        "Seven"
    );
    let hooks = api.hooks_since(mark).await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["OptPlatform"], "iOS");
    assert_eq!(hooks[0]["Body"]["Operator_Account"], user);
    assert_eq!(hooks[0]["Body"]["From_Account"], user);
    let (uri, body) = receive(&mut rx, 1).await.remove(0);
    assert_eq!(query_param(&uri, "OptPlatform").as_deref(), Some("iOS"));
    assert_eq!(
        query_param(&uri, "CallbackCommand").as_deref(),
        Some("Profile.CallbackPortraitSet")
    );
    assert!(query_param(&uri, "Sign").is_none(), "no token, no Sign");
    assert_eq!(
        body["ProfileItem"],
        json!([{"Tag": "Tag_Profile_IM_Nick", "Value": "Seven"}])
    );

    // A user acts only for itself.
    let (_, v) = api
        .client(
            "profile/portrait_set",
            &format!("as={user}"),
            &json!({"From_Account": "user_0008", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "x"}]}),
        )
        .await;
    assert_eq!(code(&v), 40004);
    let (_, v) = api
        .client(
            "profile/portrait_set",
            &format!("as={user}"),
            &json!({"ProfileItem": [{"Tag": "Tag_Profile_IM_AdminForbidType", "Value": "AdminForbid_Type_None"}]}),
        )
        .await;
    assert_eq!(code(&v), 40008);

    // Friends: an add sends Sns.CallbackFriendAdd as a client request; an update
    // sends nothing, yet changes the data.
    let candidates = users(300..=399);
    let from = pick(&api, "user_0299", "AllowType_Type_AllowAny", &candidates, 1).await[0].clone();
    let any = pick(&api, &from, "AllowType_Type_AllowAny", &candidates, 1).await[0].clone();
    let deny = pick(&api, &from, "AllowType_Type_DenyAny", &users(400..=999), 1).await[0].clone();
    let mark = api.hook_mark().await;
    let (_, v) = api
        .client(
            "sns/friend_add",
            &format!("as={from}&platform=Web"),
            &json!({"ForceAddFlags": 1, "AddFriendItem": [{"To_Account": any, "AddSource": "AddSource_Type_Web"}, {"To_Account": deny, "AddSource": "AddSource_Type_Web"}]}),
        )
        .await;
    let codes: Vec<i64> = v["ResultItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ResultCode"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 30516], "a client cannot force an add");
    let hooks = api.hooks_since(mark).await;
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["CallbackCommand"], "Sns.CallbackFriendAdd");
    assert_eq!(hooks[0]["OptPlatform"], "Web");
    assert_eq!(hooks[0]["Body"]["Admin_Account"], "");
    assert_eq!(hooks[0]["Body"]["ForceFlag"], 0);
    let mark = api.hook_mark().await;
    let (_, v) = api
        .client(
            "sns/friend_update",
            &format!("as={from}"),
            &json!({"UpdateItem": [{"To_Account": any, "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": "from the app"}]}]}),
        )
        .await;
    assert_eq!(v["ResultItem"][0]["ResultCode"], 0);
    assert!(
        api.hooks_since(mark).await.is_empty(),
        "friend_update sends no webhook"
    );
    let (_, items) = friend_entry(&api, &from, &any, &["Tag_SNS_IM_Remark"]).await;
    assert_eq!(items[0]["Value"], "from the app");

    // Groups: roles decide; the operator is the user.
    let ids = group_ids(&api).await;
    let mut target = None;
    for id in &ids {
        let m = members(&api, id).await;
        let rows = m["MemberList"].as_array().unwrap();
        let owner = rows.iter().find(|r| r["Role"] == "Owner");
        let plain: Vec<&Value> = rows.iter().filter(|r| r["Role"] == "Member").collect();
        if let (Some(o), true) = (owner, plain.len() >= 2) {
            target = Some((
                id.clone(),
                o["Member_Account"].as_str().unwrap().to_owned(),
                plain[0]["Member_Account"].as_str().unwrap().to_owned(),
                plain[1]["Member_Account"].as_str().unwrap().to_owned(),
            ));
            break;
        }
    }
    let (g, owner, member, other) = target.expect("a group with an owner and two members");
    let (_, v) = api
        .client(
            "group_open_http_svc/modify_group_base_info",
            &format!("as={member}"),
            &json!({"GroupId": g, "Name": "mine"}),
        )
        .await;
    assert_eq!(code(&v), 10007, "a plain member may not rename: {v}");
    let (_, v) = api
        .client(
            "group_open_http_svc/delete_group_member",
            &format!("as={member}"),
            &json!({"GroupId": g, "MemberToDel_Account": [other]}),
        )
        .await;
    assert_eq!(code(&v), 10007, "nor remove others: {v}");
    let mark = api.hook_mark().await;
    let (_, v) = api
        .client(
            "group_open_http_svc/modify_group_base_info",
            &format!("as={owner}&platform=Android"),
            &json!({"GroupId": g, "Name": "renamed"}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    assert!(v.get("ErrorDisplay").is_none());
    let (_, v) = api
        .client(
            "group_open_http_svc/delete_group_member",
            &format!("as={member}&platform=Mac"),
            &json!({"GroupId": g, "MemberToDel_Account": [member]}),
        )
        .await;
    assert_eq!(code(&v), 0, "a member may quit: {v}");
    let (_, v) = api
        .client(
            "group_open_http_svc/send_group_msg",
            &format!("as={owner}"),
            &json!({"GroupId": g, "Random": 3, "MsgBody": text_body()}),
        )
        .await;
    assert_eq!(code(&v), 0, "{v}");
    let hooks = api.hooks_since(mark).await;
    let summary: Vec<(String, String, String)> = hooks
        .iter()
        .map(|h| {
            (
                h["CallbackCommand"].as_str().unwrap().to_owned(),
                h["OptPlatform"].as_str().unwrap().to_owned(),
                h["Body"]["Operator_Account"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "Group.CallbackAfterGroupInfoChanged".to_owned(),
                "Android".to_owned(),
                owner.clone()
            ),
            (
                "Group.CallbackAfterMemberExit".to_owned(),
                "Mac".to_owned(),
                member.clone()
            ),
            (
                "Group.CallbackAfterSendMsg".to_owned(),
                "Android".to_owned(),
                owner.clone()
            ),
        ]
    );
    assert_eq!(hooks[1]["Body"]["ExitType"], "Quit");
    let info = group_info(&api, &g).await;
    assert_eq!(info["Name"], "renamed");
    assert!(row(&info, &member).is_none());

    // The endpoint's own errors.
    for (path, query, want) in [
        ("profile/portrait_set", "", StatusCode::BAD_REQUEST),
        ("profile/portrait_set", "as=ghost", StatusCode::BAD_REQUEST),
        (
            "profile/portrait_set",
            "as=user_0007&platform=RESTAPI",
            StatusCode::BAD_REQUEST,
        ),
        (
            "profile/portrait_get",
            "as=user_0007",
            StatusCode::NOT_FOUND,
        ),
        ("nope/nope", "as=user_0007", StatusCode::NOT_FOUND),
    ] {
        let (status, v) = api.client(path, query, &json!({})).await;
        assert_eq!(status, want, "{path}?{query}: {v}");
        assert!(v["error"].is_string());
    }
    let stats = api.get("/__emulator/stats").await;
    assert!(
        stats["calls_per_command"]
            .get("profile/portrait_set")
            .is_none(),
        "client changes are not REST calls: {stats}"
    );
    // Drain what the receiver got: every logged webhook was delivered.
    let total = api.hook_mark().await as usize;
    receive(&mut rx, total - 1).await;
    emu.shutdown().await;
}

// ---------------------------------------------------------------------------
// Rate limit, determinism, junk input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_covers_the_new_commands() {
    let (emu, api) = start(EmulatorConfig {
        faults: FaultSettings {
            rate_limit: 10,
            ..FaultSettings::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let burst = |command: &'static str, body: Value| {
        let api = api.clone();
        async move {
            let calls: Vec<_> = (0..40)
                .map(|_| {
                    let api = api.clone();
                    let body = body.clone();
                    tokio::spawn(async move { api.call(command, &body).await })
                })
                .collect();
            let mut answers = Vec::new();
            for c in calls {
                answers.push(c.await.unwrap());
            }
            answers
        }
    };
    let pg = burst(
        "profile/portrait_get",
        json!({"To_Account": ["user_0001"], "TagList": ["Tag_Profile_IM_Nick"]}),
    )
    .await;
    let limited: Vec<&Value> = pg.iter().filter(|v| code(v) == 60007).collect();
    assert!(!limited.is_empty(), "no 60007 in 40 calls at 10/s");
    assert!(pg.iter().all(|v| code(v) == 0 || code(v) == 60007));
    assert!(limited[0]["ErrorInfo"]
        .as_str()
        .unwrap()
        .contains("limited to 10 calls per second"));
    // account_check is documented at 100/s: half the base.
    let ac = burst(
        "im_open_login_svc/account_check",
        json!({"CheckItem": [{"UserID": "user_0001"}]}),
    )
    .await;
    let limited = ac
        .iter()
        .find(|v| code(v) == 60007)
        .expect("account_check is limited");
    assert!(
        limited["ErrorInfo"]
            .as_str()
            .unwrap()
            .contains("limited to 5 calls per second"),
        "{limited}"
    );
    for command in ["sns/friend_get", "group_open_http_svc/get_group_info"] {
        let answers = burst(command, json!({})).await;
        assert!(answers.iter().any(|v| code(v) == 60007), "{command}");
    }
    emu.shutdown().await;
}

/// Every read's answer for a fixed set of requests.
async fn snapshot(seed: u64) -> Vec<Value> {
    let (emu, api) = start(EmulatorConfig { seed, ..no_limit() }).await;
    let ids = group_ids(&api).await;
    let all_tags = [
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Gender",
        "Tag_Profile_IM_BirthDay",
        "Tag_Profile_IM_Location",
        "Tag_Profile_IM_SelfSignature",
        "Tag_Profile_IM_AllowType",
        "Tag_Profile_IM_Language",
        "Tag_Profile_IM_Image",
        "Tag_Profile_IM_MsgSettings",
        "Tag_Profile_IM_AdminForbidType",
        "Tag_Profile_IM_Level",
        "Tag_Profile_IM_Role",
        "Tag_Profile_Custom_Level",
        "Tag_Profile_Custom_Team",
    ];
    let checks: Vec<Value> = users(1..=100)
        .iter()
        .map(|u| json!({"UserID": u}))
        .collect();
    let requests = [
        (
            "profile/portrait_get",
            json!({"To_Account": users(1..=100), "TagList": all_tags}),
        ),
        (
            "group_open_http_svc/get_group_info",
            json!({"GroupIdList": ids}),
        ),
        (
            "group_open_http_svc/get_group_member_info",
            json!({"GroupId": ids[3]}),
        ),
        (
            "group_open_http_svc/get_joined_group_list",
            json!({"Member_Account": "user_0010", "ResponseFilter": {"GroupBaseInfoFilter": ["Name"], "SelfInfoFilter": ["Role"]}}),
        ),
        (
            "sns/friend_get",
            json!({"From_Account": "user_0001", "StartIndex": 0}),
        ),
        (
            "sns/friend_get",
            json!({"From_Account": "user_0001", "StartIndex": 100}),
        ),
        (
            "sns/friend_get_list",
            json!({"From_Account": "user_0002", "To_Account": users(1..=100), "TagList": ["Tag_SNS_IM_Remark", "Tag_Profile_IM_Nick"]}),
        ),
        (
            "im_open_login_svc/account_check",
            json!({"CheckItem": checks}),
        ),
        (
            "openim/query_online_status",
            json!({"To_Account": users(1..=100), "IsNeedDetail": 1}),
        ),
    ];
    let mut out = vec![json!(ids)];
    for (command, body) in requests {
        out.push(without_request_id(api.ok(command, &body).await));
    }
    emu.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_profiles_groups_and_friends() {
    let a = snapshot(7).await;
    let b = snapshot(7).await;
    let c = snapshot(8).await;
    assert_eq!(a, b);
    for (i, (x, y)) in a.iter().zip(&c).enumerate() {
        // account_check answers the same for every seed (all 100 exist).
        if i != 8 {
            assert_ne!(x, y, "answer {i} does not depend on the seed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_input_to_the_new_commands_gets_an_envelope_not_a_crash() {
    let (emu, api) = start(no_limit()).await;
    let commands = [
        "profile/portrait_get",
        "profile/portrait_set",
        "group_open_http_svc/get_group_info",
        "group_open_http_svc/get_group_member_info",
        "group_open_http_svc/get_joined_group_list",
        "group_open_http_svc/create_group",
        "group_open_http_svc/modify_group_base_info",
        "group_open_http_svc/add_group_member",
        "group_open_http_svc/delete_group_member",
        "group_open_http_svc/modify_group_member_info",
        "group_open_http_svc/change_group_owner",
        "group_open_http_svc/destroy_group",
        "group_open_http_svc/forbid_send_msg",
        "group_open_http_svc/send_group_msg",
        "sns/friend_get",
        "sns/friend_get_list",
        "sns/friend_add",
        "sns/friend_import",
        "sns/friend_update",
        "sns/friend_delete",
        "sns/friend_delete_all",
        "im_open_login_svc/account_check",
        "im_open_login_svc/account_import",
        "im_open_login_svc/multiaccount_import",
        "im_open_login_svc/account_delete",
        "openim/query_online_status",
        "openim/batchsendmsg",
        "openim/importmsg",
    ];
    let mut bodies: Vec<String> = vec![
        "{}".into(),
        "null".into(),
        "[]".into(),
        "\"text\"".into(),
        "1e999".into(),
        "[".repeat(5000),
        r#"{"To_Account":[null,{"a":1},["x"]],"TagList":[true]}"#.into(),
        r#"{"GroupIdList":[null],"ResponseFilter":{"GroupBaseInfoFilter":[1],"MemberInfoFilter":{}}}"#.into(),
        r#"{"GroupId":"\u0000","Limit":18446744073709551615,"Offset":18446744073709551615,"Next":"99999999999999999999"}"#.into(),
        r#"{"Member_Account":"user_0001","Limit":-5,"GroupType":7,"ResponseFilter":[]}"#.into(),
        r#"{"From_Account":"user_0001","StartIndex":18446744073709551615,"StandardSequence":-1}"#.into(),
        r#"{"From_Account":"user_0001","AddFriendItem":[{"To_Account":"user_0002","AddSource":"AddSource_Type_\u00ff","GroupName":[1]}],"ForceAddFlags":"x"}"#.into(),
        r#"{"From_Account":"user_0001","UpdateItem":[{"To_Account":"user_0002","SnsItem":"x"}]}"#.into(),
        r#"{"CheckItem":[{"UserID":7}],"DeleteItem":"x","Accounts":[null]}"#.into(),
        r#"{"Type":"Public","Name":"\ud83d\ude00","MemberList":[{"Member_Account":null}],"AppDefinedData":[{"Key":1}]}"#.into(),
        r#"{"GroupId":"x","MemberList":[{}],"MemberToDel_Account":[1],"Members_Account":"x","MuteTime":-1}"#.into(),
        r#"{"From_Account":"user_0001","To_Account":["user_0002"],"MsgRandom":4294967296,"MsgBody":[{"MsgType":1}]}"#.into(),
        r#"{"SyncFromOldSystem":5,"From_Account":"user_0001","To_Account":"user_0001","MsgSeq":1,"MsgRandom":1,"MsgTimeStamp":18446744073709551615,"MsgBody":[]}"#.into(),
    ];
    let mut x: u64 = 0x5eed;
    for len in [1usize, 9, 80, 400] {
        let mut s = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push((x % 256) as u8);
        }
        bodies.push(String::from_utf8_lossy(&s).into_owned());
    }
    for command in commands {
        for body in &bodies {
            let (_, v) = api.call_body(command, body).await;
            let c = code(&v);
            assert!(c == 0 || c >= 10_000, "{command} {body:.40}: {v}");
        }
    }
    assert_eq!(api.get("/__emulator/health").await["status"], "ok");
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_url_can_be_set_at_run_time() {
    let (hook_addr, mut rx) = hook_server().await;
    let (emu, api) = start(no_limit()).await;
    let set_nick = |nick: &str| json!({"From_Account": "user_0009", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": nick}]});
    let (_, hooks) = api.write("profile/portrait_set", &set_nick("one")).await;
    assert_eq!(
        hooks,
        ["Profile.CallbackPortraitSet"],
        "logged without a URL too"
    );
    assert_eq!(
        api.get("/__emulator/callback").await,
        json!({"url": null, "signed": false})
    );
    let url = format!("http://{hook_addr}/hook");
    let (status, bytes) = api
        .raw(
            Method::POST,
            "/__emulator/callback",
            json!({"url": url, "token": "tok"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        v,
        json!({"url": url, "signed": true}),
        "the token is never shown"
    );
    api.ok("profile/portrait_set", &set_nick("two")).await;
    let (uri, body) = receive(&mut rx, 1).await.remove(0);
    assert!(uri.starts_with("/hook?") && signed(&uri, "tok"), "{uri}");
    assert_eq!(body["ProfileItem"][0]["Value"], "two");
    for bad in [
        json!({"url": "https://x/"}),
        json!({"url": "x", "extra": 1}),
        json!([]),
    ] {
        let (status, _) = api
            .raw(Method::POST, "/__emulator/callback", bad.to_string())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _) = api
        .raw(
            Method::POST,
            "/__emulator/callback",
            json!({"url": null}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    api.ok("profile/portrait_set", &set_nick("three")).await;
    // Only the one webhook sent while the URL was set was delivered.
    let stats = wait_delivered(&api, 1).await;
    assert_eq!(stats["webhooks"]["delivered"], 1);
    assert!(rx.try_recv().is_err());
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_and_reads_never_deadlock() {
    let (emu, api) = start(no_limit()).await;
    let ids = group_ids(&api).await;
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let api = api.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut x = t.wrapping_mul(0x9E37_79B9) | 1;
                let mut codes = Vec::new();
                for i in 0..150u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let u = |k: u64| format!("user_{:04}", (x >> k) % 200 + 1);
                    let g = &ids[(x % ids.len() as u64) as usize];
                    let (command, body) = match x % 13 {
                        0 => ("group_open_http_svc/send_group_msg", json!({"GroupId": g, "Random": i, "MsgBody": text_body()})),
                        1 => ("recentcontact/update_contact_group", json!({"From_Account": u(8), "UpdateType": 1, "UpdateGroup": {
                            "UpdateGroupType": 2, "OldGroupName": "group_0001",
                            "ContactUpdateItem": [{"ContactOptType": 1, "ContactItem": {"Type": 2, "ToGroupId": g}}]}})),
                        2 => ("group_open_http_svc/create_group", json!({"Type": "Public", "Name": "c", "Owner_Account": u(8), "MemberList": [{"Member_Account": u(16)}]})),
                        3 => ("group_open_http_svc/add_group_member", json!({"GroupId": g, "MemberList": [{"Member_Account": u(8)}]})),
                        4 => ("group_open_http_svc/delete_group_member", json!({"GroupId": g, "MemberToDel_Account": [u(8)]})),
                        5 => ("im_open_login_svc/account_delete", json!({"DeleteItem": [{"UserID": u(8)}]})),
                        6 => ("im_open_login_svc/account_import", json!({"UserID": u(8)})),
                        7 => ("sns/friend_add", json!({"From_Account": u(8), "ForceAddFlags": 1, "AddFriendItem": [{"To_Account": u(16), "AddSource": "AddSource_Type_X"}]})),
                        8 => ("sns/friend_delete", json!({"From_Account": u(8), "DeleteType": "Delete_Type_Both", "To_Account": [u(16)]})),
                        9 => ("openim/batchsendmsg", json!({"From_Account": u(8), "SyncOtherMachine": 1, "To_Account": [u(16), u(24), u(32)], "MsgRandom": 1, "MsgBody": text_body()})),
                        10 => ("sns/friend_get_list", json!({"From_Account": u(8), "To_Account": [u(16), u(24)], "TagList": ["Tag_Profile_IM_Nick", "Tag_SNS_IM_Remark"]})),
                        11 => ("group_open_http_svc/get_joined_group_list", json!({"Member_Account": u(8), "ResponseFilter": {"SelfInfoFilter": ["Role"]}})),
                        _ => ("group_open_http_svc/get_group_info", json!({"GroupIdList": [g, ids[0]]})),
                    };
                    codes.push(code(&api.call(command, &body).await));
                }
                codes
            })
        })
        .collect();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
    .await
    .expect("1200 mixed calls finish: no deadlock");
    assert_eq!(all.len(), 1200);
    assert!(
        all.iter().filter(|&&c| c == 0).count() > 600,
        "most calls succeed"
    );
    assert!(all.iter().all(|&c| c == 0 || c >= 10_000));
    emu.shutdown().await;
}
