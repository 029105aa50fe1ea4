//! Freshness: write-through, webhooks, admin invalidation, stale-if-error, hot reload.

mod common;

use std::time::{Duration, Instant};

use common::page_of as get_list;
use common::*;
use sha2::{Digest, Sha256};

/// A way for Chat to fail, and the fake's responder that makes it.
type Failure = (&'static str, fn() -> Responder);

const GET_LIST: &str = "/v4/recentcontact/get_list";

/// The peer of the newest general (unpinned) conversation: pinned ones come first in
/// a page, and a new message moves its conversation to the top of the general list.
fn first_peer(a: &Answer) -> String {
    let v = json(a);
    let items = v["SessionItem"].as_array().cloned().unwrap_or_default();
    let item = items
        .iter()
        .find(|i| i["TopFlag"] == 0)
        .cloned()
        .unwrap_or_default();
    item["To_Account"]
        .as_str()
        .or(item["GroupId"].as_str())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn sendmsg_through_the_gateway_invalidates_both_sides() {
    let emu = chat_gateway::emulator::spawn(chat_gateway::emulator::EmulatorConfig::default())
        .await
        .unwrap();
    let cfg = emu.config().clone();
    let toml = config_toml_with(&emu.base_url(), &cfg.secret_key, &[]);
    let gw = Gateway::start(&toml).await;

    let a = get_list(&gw, "user_0001").await;
    assert_eq!(json(&a)["ErrorCode"], 0, "{:?}", json(&a));
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "user_0001").await, "x-cache"), "HIT");
    assert_eq!(header(&get_list(&gw, "user_0777").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "user_0777").await, "x-cache"), "HIT");
    assert_ne!(first_peer(&a), "user_0777");

    let send = post(
        &gw.url("/v4/openim/sendmsg"),
        r#"{"SyncOtherMachine":1,"From_Account":"user_0001","To_Account":"user_0777","MsgRandom":42,
            "MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}"#,
    )
    .await;
    assert_eq!(json(&send)["ErrorCode"], 0, "{:?}", json(&send));

    let after = get_list(&gw, "user_0001").await;
    assert_eq!(
        header(&after, "x-cache"),
        "MISS",
        "the sender's page was invalidated"
    );
    assert_eq!(
        first_peer(&after),
        "user_0777",
        "the new conversation order shows"
    );
    let other = get_list(&gw, "user_0777").await;
    assert_eq!(
        header(&other, "x-cache"),
        "MISS",
        "the receiver's page was invalidated"
    );
    assert_eq!(first_peer(&other), "user_0001");

    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).to_string();
    assert!(
        m.contains("chat_gateway_invalidations_total{source=\"write_through\"} 1"),
        "{m}"
    );
    emu.shutdown().await;
}

fn sign(token: &str, t: u64) -> String {
    hex::encode(Sha256::digest(format!("{token}{t}")))
}

async fn callback(
    gw: &Gateway,
    sdkappid: u64,
    command: &str,
    sig: Option<(String, u64)>,
    body: serde_json::Value,
) -> Answer {
    let mut url = gw.url(&format!(
        "/callback?SdkAppid={sdkappid}&CallbackCommand={command}&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
    ));
    if let Some((s, t)) = sig {
        url.push_str(&format!("&Sign={s}&RequestTime={t}"));
    }
    post(&url, body.to_string()).await
}

#[tokio::test]
async fn webhooks_invalidate_only_when_signed_by_us() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("callback", "token = \"tok-123\"")],
    ))
    .await;
    get_list(&gw, "alice").await;
    get_list(&gw, "bob").await;
    let now = chat_gateway::upstream::signer::unix_now();
    let body = serde_json::json!({"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"alice","To_Account":"bob",
        "MsgTime": now, "SendMsgResult": 0, "MsgKey": "k", "EventTime": now * 1000});
    const C2C: &str = "C2C.CallbackAfterSendMsg";

    for (what, appid, sig) in [
        ("bad Sign", SDKAPPID, Some((sign("wrong", now), now))),
        (
            "old RequestTime",
            SDKAPPID,
            Some((sign("tok-123", now - 120), now - 120)),
        ),
        (
            "another SdkAppid",
            SDKAPPID + 1,
            Some((sign("tok-123", now), now)),
        ),
        ("no Sign", SDKAPPID, None),
    ] {
        let a = callback(&gw, appid, C2C, sig, body.clone()).await;
        assert_eq!(a.0, 403, "{what} is rejected");
        assert_eq!(json(&a)["ActionStatus"], "FAIL");
        assert_eq!(
            header(&get_list(&gw, "alice").await, "x-cache"),
            "HIT",
            "{what} invalidated nothing"
        );
    }
    assert_eq!(fake.count(), 2);

    let a = callback(
        &gw,
        SDKAPPID,
        C2C,
        Some((sign("tok-123", now), now)),
        body.clone(),
    )
    .await;
    assert_eq!(a.0, 200);
    assert_eq!(
        json(&a),
        serde_json::json!({"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0})
    );
    assert_eq!(header(&get_list(&gw, "alice").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "bob").await, "x-cache"), "MISS");

    let a = callback(
        &gw,
        SDKAPPID,
        "State.StateChange",
        Some((sign("tok-123", now), now)),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(a.0, 200, "unknown commands are acknowledged");
    assert!(
        gw.log_text().contains("callback rejected"),
        "rejections are logged"
    );
    // ... at most once a second (the four came within one or two seconds), and
    // every one is counted.
    assert!(gw.log_count("callback rejected") <= 2, "{}", gw.log_text());
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned();
    assert_eq!(
        metric(&m, "chat_gateway_callbacks_total{outcome=\"rejected\"}"),
        4.0
    );
}

/// Pages of alice and bob list `@TGS#team`, carol's `@TGS#other`.
fn team_pages() -> Responder {
    Box::new(|r: &Recorded, _| {
        let acc = r.json()["From_Account"].as_str().unwrap().to_string();
        let group = if acc == "carol" {
            "@TGS#other"
        } else {
            "@TGS#team"
        };
        let mut page = page_for(&acc, 0);
        page["SessionItem"][1]["GroupId"] = serde_json::json!(group);
        Reply::Json(page, Duration::ZERO)
    })
}

/// `Group.CallbackAfterSendMsg` for `@TGS#team`, accepted.
async fn team_message(gw: &Gateway) {
    let a = callback(
        gw,
        SDKAPPID,
        "Group.CallbackAfterSendMsg",
        None,
        serde_json::json!({"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":"@TGS#team","From_Account":"alice","Type":"Public"}),
    )
    .await;
    assert_eq!(a.0, 200);
}

/// By default a group event drops every cached page: a member whose cached pages
/// do not list the group (carol's page does not show `@TGS#team`; it may be further
/// down her list) is not served a page the message may have changed.
#[tokio::test]
async fn group_webhook_drops_every_cached_page_by_default() {
    let fake = FakeChat::start(team_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    for a in ["alice", "bob", "carol"] {
        assert_eq!(header(&get_list(&gw, a).await, "x-cache"), "MISS");
        assert_eq!(header(&get_list(&gw, a).await, "x-cache"), "HIT");
    }
    team_message(&gw).await;
    for a in ["alice", "bob", "carol"] {
        assert_eq!(header(&get_list(&gw, a).await, "x-cache"), "MISS", "{a}");
    }
}

#[tokio::test]
async fn under_listing_accounts_a_group_webhook_invalidates_exactly_the_members_listing_the_group()
{
    let fake = FakeChat::start(team_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("cache", "group_events = \"listing-accounts\"")],
    ))
    .await;
    for a in ["alice", "bob", "carol"] {
        assert_eq!(header(&get_list(&gw, a).await, "x-cache"), "MISS");
    }
    team_message(&gw).await;
    assert_eq!(header(&get_list(&gw, "alice").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "bob").await, "x-cache"), "MISS");
    assert_eq!(
        header(&get_list(&gw, "carol").await, "x-cache"),
        "HIT",
        "carol's page does not list the group"
    );

    // A member who joins is invalidated by name, with the group's listers.
    let a = callback(
        &gw,
        SDKAPPID,
        "Group.CallbackAfterNewMemberJoin",
        None,
        serde_json::json!({"GroupId":"@TGS#other","NewMemberList":[{"Member_Account":"bob"}]}),
    )
    .await;
    assert_eq!(a.0, 200);
    assert_eq!(
        header(&get_list(&gw, "carol").await, "x-cache"),
        "MISS",
        "carol lists @TGS#other"
    );
    assert_eq!(
        header(&get_list(&gw, "bob").await, "x-cache"),
        "MISS",
        "bob joined"
    );
    assert_eq!(header(&get_list(&gw, "alice").await, "x-cache"), "HIT");
}

#[tokio::test]
async fn admin_invalidation_by_account_list_and_all() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    for a in ["u1", "u2", "u3", "u4"] {
        get_list(&gw, a).await;
    }
    post(&gw.url(GET_LIST), r#"{"From_Account":"u1","TimeStamp":9}"#).await;
    let url = gw.url("/admin/cache/invalidate");
    let a = post(&url, r#"{"From_Account":"u1"}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    // Every entity of the account: its pages, and its four item entities.
    assert_eq!(
        json(&a)["Invalidated"],
        serde_json::json!({"Accounts":1,"Pages":2,"Entities":4})
    );
    assert_eq!(header(&get_list(&gw, "u1").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "u2").await, "x-cache"), "HIT");

    let a = post(&url, r#"{"From_Account":["u2","u3","nobody"]}"#).await;
    assert_eq!(
        json(&a)["Invalidated"],
        serde_json::json!({"Accounts":2,"Pages":2,"Entities":12})
    );
    assert_eq!(header(&get_list(&gw, "u3").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "u4").await, "x-cache"), "HIT");

    let a = post(&url, r#"{"All":true}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert_eq!(
        json(&a)["Invalidated"],
        serde_json::json!({"Accounts":3,"Pages":3,"Entities":0})
    );
    for acc in ["u1", "u2", "u3", "u4"] {
        assert_eq!(header(&get_list(&gw, acc).await, "x-cache"), "MISS");
    }
    for bad in [
        r#"{}"#,
        r#"{"From_Account":[]}"#,
        r#"{"From_Account":5}"#,
        r#"{"All":false}"#,
        r#"{"Everything":true}"#,
    ] {
        let a = post(&url, bad).await;
        assert_eq!(json(&a)["ErrorCode"], 50002, "{bad}");
    }
    assert_eq!(json(&post(&url, "nope").await)["ErrorCode"], 60003);
}

/// A stale page carries `age`: whole seconds since Chat answered it.
fn assert_age(a: &Answer, at_least: u64, at_most: u64) {
    let age: u64 = header(a, "age")
        .parse()
        .unwrap_or_else(|_| panic!("age on a {} answer: {:?}", header(a, "x-cache"), a.1));
    assert!(
        (at_least..=at_most).contains(&age),
        "age {age}, not in {at_least}..={at_most}"
    );
}

#[tokio::test]
async fn stale_pages_are_served_only_while_chat_fails_and_only_within_the_window() {
    let fake = FakeChat::start(echo_pages()).await;
    // A deadline shorter than Chat's throttling pause: a throttled read is not
    // retried after the pause, it is answered at once (stale).
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 1\nstale_if_error_secs = 3"),
            ("chat", "request_timeout_ms = 800"),
        ],
    ))
    .await;
    let first = get_list(&gw, "user_0001").await;
    let stored = Instant::now();
    get_list(&gw, "user_0002").await;
    let until = |d: u64| async move {
        let target = stored + Duration::from_millis(d);
        let now = Instant::now();
        if target > now {
            tokio::time::sleep(target - now).await;
        }
    };
    until(1100).await;
    // Past the TTL with Chat healthy: a normal MISS, never STALE.
    assert_eq!(header(&get_list(&gw, "user_0002").await, "x-cache"), "MISS");

    // Each way Chat can fail: 50005 (after the retries), HTTP 5xx, no answer at all
    // (the connection closed), throttling.
    let failures: [Failure; 4] = [
        ("50005", || {
            Box::new(|_, _| Reply::Json(chat_error(50005), Duration::ZERO))
        }),
        ("HTTP 503", || {
            Box::new(|_, _| Reply::Status(503, "down".into()))
        }),
        ("a transport error", || Box::new(|_, _| Reply::Close)),
        ("throttling", || {
            Box::new(|_, _| Reply::Json(chat_error(60018), Duration::ZERO))
        }),
    ];
    for (what, responder) in failures {
        fake.set_responder(responder());
        let calls = fake.count();
        let s = get_list(&gw, "user_0001").await;
        assert_eq!(header(&s, "x-cache"), "STALE", "{what}: {:?}", json(&s));
        assert_eq!(s.2, first.2, "{what}: the stale page, byte for byte");
        assert_age(&s, 1, 4);
        assert!(fake.count() > calls, "{what}: Chat was asked first");
    }
    assert!(
        gw.wait_log("serving a stale page", Duration::from_secs(2))
            .await
    );

    until(4300).await;
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(50005), Duration::ZERO)
    }));
    let e = get_list(&gw, "user_0001").await;
    assert_eq!(
        json(&e)["ErrorCode"],
        50005,
        "past the stale window the caller gets the error"
    );
    assert_ne!(header(&e, "x-cache"), "STALE");
}

/// `cache.stale_if_error_secs` and `retry.*` change with the file, without a restart:
/// for new entries and new requests.
#[tokio::test]
async fn stale_window_and_retries_reload_live() {
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 1\nstale_if_error_secs = 0"),
            ("retry", "max_attempts = 3"),
        ],
    );
    let gw = Gateway::start(&toml).await;
    let failing =
        || -> Responder { Box::new(|_, _| Reply::Json(chat_error(50004), Duration::ZERO)) };

    // Before: no stale window, three attempts per failing read.
    get_list(&gw, "before").await;
    let stored = Instant::now();
    tokio::time::sleep(
        (stored + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
    )
    .await;
    fake.set_responder(failing());
    let calls = fake.count();
    let e = get_list(&gw, "before").await;
    assert_eq!(json(&e)["ErrorCode"], 50004, "no stale window: the error");
    assert_eq!(fake.count() - calls, 3, "max_attempts = 3");

    std::fs::write(
        &gw.config_path,
        toml.replace("stale_if_error_secs = 0", "stale_if_error_secs = 60")
            .replace("max_attempts = 3", "max_attempts = 1"),
    )
    .unwrap();
    assert!(
        gw.wait_log("config reloaded", Duration::from_secs(10))
            .await,
        "{}",
        gw.log_text()
    );
    for change in [
        "cache.stale_if_error_secs: 0 -> 60",
        "retry.max_attempts: 3 -> 1",
    ] {
        assert!(
            gw.log_text().contains(change),
            "{change}: {}",
            gw.log_text()
        );
    }

    // After: one attempt per failing read, and new pages get the 60 s window.
    fake.set_responder(echo_pages());
    get_list(&gw, "after").await;
    let stored = Instant::now();
    tokio::time::sleep(
        (stored + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
    )
    .await;
    fake.set_responder(failing());
    let calls = fake.count();
    let s = get_list(&gw, "after").await;
    assert_eq!(header(&s, "x-cache"), "STALE", "{:?}", json(&s));
    assert_eq!(fake.count() - calls, 1, "max_attempts = 1");
    let calls = fake.count();
    let e = get_list(&gw, "never_cached").await;
    assert_eq!(json(&e)["ErrorCode"], 50004);
    assert_eq!(fake.count() - calls, 1, "max_attempts = 1");
}

#[tokio::test]
async fn ttl_edit_in_the_file_applies_without_a_restart() {
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(&fake.url(), &[("cache", "ttl_secs = 60")]);
    let gw = Gateway::start(&toml).await;
    assert_eq!(header(&get_list(&gw, "before").await, "x-cache"), "MISS");

    // An invalid edit is rejected and the old values stay.
    std::fs::write(
        &gw.config_path,
        toml.replace("ttl_secs = 60", "ttl_secs = 0"),
    )
    .unwrap();
    assert!(
        gw.wait_log("config reload rejected", Duration::from_secs(2))
            .await,
        "{}",
        gw.log_text()
    );
    assert!(gw.log_text().contains("cache.ttl_secs"));

    std::fs::write(
        &gw.config_path,
        toml.replace("ttl_secs = 60", "ttl_secs = 1"),
    )
    .unwrap();
    assert!(
        gw.wait_log("config reloaded", Duration::from_secs(10))
            .await,
        "the edit is seen without a signal: {}",
        gw.log_text()
    );
    assert!(
        gw.log_text().contains("cache.ttl_secs: 60 -> 1"),
        "{}",
        gw.log_text()
    );

    let stored = Instant::now();
    assert_eq!(header(&get_list(&gw, "after").await, "x-cache"), "MISS");
    assert_eq!(header(&get_list(&gw, "after").await, "x-cache"), "HIT");
    let wait = Duration::from_millis(1100).saturating_sub(stored.elapsed());
    tokio::time::sleep(wait).await;
    assert_eq!(
        header(&get_list(&gw, "after").await, "x-cache"),
        "MISS",
        "new entries use the 1 s TTL"
    );

    // A key that cannot change live is reported as needing a restart; SIGHUP reloads.
    let n = gw.log_count("config re-read");
    std::fs::write(
        &gw.config_path,
        toml.replace("ttl_secs = 60", "ttl_secs = 1")
            .replace("shutdown_grace_secs = 5", "shutdown_grace_secs = 7"),
    )
    .unwrap();
    assert!(
        gw.wait_log("only after a restart", Duration::from_secs(2))
            .await
    );
    assert!(gw.log_text().contains("server.shutdown_grace_secs"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.log_count("config re-read") == n {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let n = gw.log_count("config re-read");
    gw.signal(libc::SIGHUP);
    assert!(gw.wait_log("SIGHUP received", Duration::from_secs(2)).await);
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.log_count("config re-read") == n {
        assert!(Instant::now() < deadline, "SIGHUP reloads");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).to_string();
    assert!(
        m.contains("chat_gateway_config_reloads_total{outcome=\"applied\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("chat_gateway_config_reloads_total{outcome=\"rejected\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_reloaded() {
    // Kubernetes mounts a ConfigMap as config.toml -> ..data/config.toml with
    // ..data -> ..<timestamp>/, and updates it by swapping the ..data symlink.
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(&fake.url(), &[("cache", "ttl_secs = 60")]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/gateway.toml"), &toml).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.toml", d.join("gateway.toml")).unwrap();
    let path = d.join("gateway.toml");
    let gw = Gateway::start_file(dir, path, &[]).await;
    let d = gw.config_path.parent().unwrap().to_path_buf();

    for (version, ttl) in [("..v2", 7), ("..v3", 9)] {
        std::fs::create_dir(d.join(version)).unwrap();
        std::fs::write(
            d.join(version).join("gateway.toml"),
            toml.replace("ttl_secs = 60", &format!("ttl_secs = {ttl}")),
        )
        .unwrap();
        std::os::unix::fs::symlink(version, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert!(
            gw.wait_log(&format!("-> {ttl}"), Duration::from_secs(2))
                .await,
            "swap to {version} reloaded: {}",
            gw.log_text()
        );
    }
}

/// A page another gateway of the fleet stored in Redis is answered with `age`
/// counted from when Chat answered it, not from when this gateway took it.
#[tokio::test]
async fn an_l2_answer_carries_the_pages_age() {
    let redis = common::redis::RedisServer::start();
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(
        &fake.url(),
        &[
            ("redis", &format!("url = \"{}\"", redis.url())),
            ("cache", "ttl_secs = 60"),
        ],
    );
    let (one, two) = (Gateway::start(&toml).await, Gateway::start(&toml).await);
    for gw in [&one, &two] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m =
                String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned();
            if metric(&m, "chat_gateway_redis_up") == 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "Redis never up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let a = get_list(&one, "aged").await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    let stored = Instant::now();
    tokio::time::sleep(
        (stored + Duration::from_millis(2100)).saturating_duration_since(Instant::now()),
    )
    .await;
    let b = get_list(&two, "aged").await;
    assert_eq!(
        header(&b, "x-cache"),
        "MISS",
        "not in this gateway's memory"
    );
    assert_eq!(header(&b, "x-cache-l2"), "HIT");
    assert_eq!(b.2, a.2);
    assert_eq!(fake.count(), 1, "Chat was not called for the L2 answer");
    // Stored in Redis a little over 2 s ago (wall clocks: a second of slack).
    assert_age(&b, 1, 5);
    // The page is in the second gateway's memory now, with the same origin.
    let c = get_list(&two, "aged").await;
    assert_eq!(header(&c, "x-cache"), "HIT");
    assert_age(&c, 1, 5);
}

/// Every conversation write that passes through the gateway refreshes the writer's
/// get_list pages (against the emulator, which applies each write as Chat does):
/// after each, the page is fetched again and equals what Chat answers now, which
/// differs from before. A write Chat refuses invalidates too (it may have been
/// applied).
#[tokio::test]
async fn conversation_writes_refresh_the_writers_pages() {
    let emu = chat_gateway::emulator::spawn(chat_gateway::emulator::EmulatorConfig::default())
        .await
        .unwrap();
    let secret = emu.config().secret_key.clone();
    let gw = Gateway::start(&config_toml_with(
        &emu.base_url(),
        &secret,
        &[("cache", "ttl_secs = 600")],
    ))
    .await;
    let (me, peer) = ("user_0003", "user_0004");
    // The body the gateway forwards for `{"From_Account": me}` (Chat's defaults).
    let page_body = format!(
        r#"{{"From_Account":"{me}","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}}"#
    );
    let direct = || {
        let url = format!(
            "{}{GET_LIST}?sdkappid={SDKAPPID}&identifier={IDENTIFIER}&usersig={}&random=1&contenttype=json",
            emu.base_url(),
            emu.admin_usersig()
        );
        let body = page_body.clone();
        async move { sans_request_id(json(&post(&url, body).await)) }
    };
    // The conversation with the peer is on the first page.
    let sent = post(
        &gw.url("/v4/openim/sendmsg"),
        format!(
            r#"{{"From_Account":"{me}","To_Account":"{peer}","MsgRandom":7,"MsgBody":[{{"MsgType":"TIMTextElem","MsgContent":{{"Text":"x"}}}}]}}"#
        ),
    )
    .await;
    assert_eq!(json(&sent)["ErrorCode"], 0, "{:?}", json(&sent));

    let writes: [(&str, serde_json::Value, i64); 7] = [
        (
            "create_contact_group",
            serde_json::json!({"From_Account": me, "GroupContactItem": [
                {"GroupName": "friends", "ContactItem": [{"Type": 1, "To_Account": peer}]}]}),
            0,
        ),
        (
            "mark_contact",
            serde_json::json!({"From_Account": me, "MarkItem": [{"OptType": 3,
                "ContactItem": {"Type": 1, "To_Account": peer}, "SetMark": [0, 3], "CustomMark": "vip"}]}),
            0,
        ),
        (
            "update_contact_group",
            serde_json::json!({"From_Account": me, "UpdateType": 1, "UpdateGroup": {"UpdateGroupType": 1,
                "OldGroupName": "friends", "NewGroupName": "pals"}}),
            0,
        ),
        (
            "update_contact_group",
            serde_json::json!({"From_Account": me, "UpdateType": 1, "UpdateGroup": {"UpdateGroupType": 2,
                "OldGroupName": "pals", "ContactUpdateItem": [{"ContactOptType": 2,
                "ContactItem": [{"Type": 1, "To_Account": peer}]}]}}),
            0,
        ),
        (
            "del_contact_group",
            serde_json::json!({"From_Account": me, "GroupName": ["pals"]}),
            0,
        ),
        (
            "delete",
            serde_json::json!({"From_Account": me, "Type": 1, "To_Account": peer, "ClearRamble": 1}),
            0,
        ),
        // Refused (no such group): the page is dropped all the same.
        (
            "del_contact_group",
            serde_json::json!({"From_Account": me, "GroupName": ["pals"]}),
            50002,
        ),
    ];
    for (command, body, code) in writes {
        let before = get_list(&gw, me).await;
        let cached = get_list(&gw, me).await;
        assert_eq!(
            header(&cached, "x-cache"),
            "HIT",
            "{command}: cached before"
        );
        let w = post(
            &gw.url(&format!("/v4/recentcontact/{command}")),
            body.to_string(),
        )
        .await;
        assert_eq!(json(&w)["ErrorCode"], code, "{command}: {:?}", json(&w));
        let after = get_list(&gw, me).await;
        assert_eq!(
            header(&after, "x-cache"),
            "MISS",
            "{command}: the page was dropped"
        );
        let now = direct().await;
        assert_eq!(
            sans_request_id(json(&after)),
            now,
            "{command}: what Chat answers now"
        );
        if code == 0 {
            assert_ne!(
                sans_request_id(json(&before)),
                now,
                "{command}: the write changed the page (test check)"
            );
        }
    }
    emu.shutdown().await;
}

/// A Chat answer without its `RequestId` (a new one on every answer).
fn sans_request_id(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("RequestId");
    }
    v
}
