//! The cached reads other than get_list, per item, against the real binary and a
//! fake Chat world (`tests/common/world.rs`) that answers in the documented shapes:
//! partial hits ask Chat only for the missing items and answer exactly what Chat
//! answers for the whole request; failures pass through and are never cached; odd
//! requests are forwarded or refused, never guessed; concurrent misses of one item
//! make one fetch; stale-if-error; per-command settings, reloaded live; admin entity
//! invalidation; metrics.

mod common;

use std::time::Duration;

use common::raw;
use common::world::{self, World};
use common::*;
use serde_json::{json, Value};

/// A way for Chat to fail, and the fake's responder that makes it.
type Failure = (&'static str, fn() -> Responder);

const PORTRAIT: &str = "/v4/profile/portrait_get";
const GROUP_INFO: &str = "/v4/group_open_http_svc/get_group_info";
const CHECK: &str = "/v4/im_open_login_svc/account_check";
const FRIEND_LIST: &str = "/v4/sns/friend_get_list";
const FRIEND_GET: &str = "/v4/sns/friend_get";
const JOINED: &str = "/v4/group_open_http_svc/get_joined_group_list";
const MEMBERS: &str = "/v4/group_open_http_svc/get_group_member_info";
const TAGS: &str = r#"["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]"#;

fn portrait(accounts: &[String]) -> String {
    json!({"To_Account": accounts, "TagList": serde_json::from_str::<Value>(TAGS).unwrap()})
        .to_string()
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

async fn scrape(gw: &Gateway) -> String {
    String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned()
}

/// The calls the fake received on `path`, as JSON.
fn calls_to(fake: &FakeChat, path: &str) -> Vec<Value> {
    fake.calls()
        .into_iter()
        .filter(|c| c.path == path)
        .map(|c| c.json())
        .collect()
}

async fn setup(
    extra: &[(&str, &str)],
) -> (FakeChat, std::sync::Arc<std::sync::Mutex<World>>, Gateway) {
    let (fake, world) = world::start().await;
    let gw = Gateway::start(&config_toml(&fake.url(), extra)).await;
    (fake, world, gw)
}

#[tokio::test]
async fn a_portrait_get_of_100_with_90_cached_asks_chat_for_the_10_others() {
    let (fake, world, gw) = setup(&[]).await;
    let all = names("user_", 100);
    let cached: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 7)
        .map(|(_, a)| a.clone())
        .collect();
    let missing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 7)
        .map(|(_, a)| a.clone())
        .collect();
    let warm = post(&gw.url(PORTRAIT), portrait(&cached)).await;
    assert_eq!(header(&warm, "x-cache"), "MISS");
    assert_eq!(
        json(&warm),
        world::direct(&world, PORTRAIT, &portrait(&cached))
    );
    fake.reset();

    let a = post(&gw.url(PORTRAIT), portrait(&all)).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    let calls = calls_to(&fake, PORTRAIT);
    assert_eq!(calls.len(), 1, "exactly one call: {calls:?}");
    assert_eq!(fake.count(), 1);
    assert_eq!(
        calls[0]["To_Account"],
        json!(missing),
        "only the missing ones, in order"
    );
    assert_eq!(
        calls[0]["TagList"],
        serde_json::from_str::<Value>(TAGS).unwrap()
    );
    assert_eq!(
        calls[0].as_object().unwrap().len(),
        2,
        "no other field: {}",
        calls[0]
    );
    fake.calls()[0].assert_gateway_credentials();
    // JSON-equal to what Chat answers for the whole request, items in its order.
    let whole = world::direct(&world, PORTRAIT, &portrait(&all));
    assert_eq!(json(&a), whole);
    let answer = json(&a);
    let order: Vec<&str> = answer["UserProfileItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["To_Account"].as_str().unwrap())
        .collect();
    assert_eq!(order, all.iter().map(String::as_str).collect::<Vec<_>>());

    // Now everything is cached: no call at all, and still the same answer.
    fake.reset();
    let b = post(&gw.url(PORTRAIT), portrait(&all)).await;
    assert_eq!(header(&b, "x-cache"), "HIT");
    assert!(!header(&b, "age").is_empty());
    assert_eq!(fake.count(), 0);
    assert_eq!(json(&b), whole);
    // Another TagList is another key.
    let other = json!({"To_Account": ["user_000"], "TagList": ["Tag_Profile_IM_Nick"]}).to_string();
    assert_eq!(
        header(&post(&gw.url(PORTRAIT), other).await, "x-cache"),
        "MISS"
    );
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_get_group_info_of_50_with_45_cached_asks_for_the_5_others() {
    let (fake, world, gw) = setup(&[]).await;
    let body = |groups: &[String]| {
        json!({"GroupIdList": groups, "ResponseFilter": {"GroupBaseInfoFilter": ["Name", "MemberNum"]}})
            .to_string()
    };
    let mut all = names("@grp", 49);
    all.insert(20, "@none_lost".to_string());
    let missing: Vec<String> = vec![
        all[3].clone(),
        all[20].clone(),
        all[30].clone(),
        all[41].clone(),
        all[49].clone(),
    ];
    let cached: Vec<String> = all
        .iter()
        .filter(|g| !missing.contains(g))
        .cloned()
        .collect();
    assert_eq!(cached.len(), 45);
    assert_eq!(
        header(&post(&gw.url(GROUP_INFO), body(&cached)).await, "x-cache"),
        "MISS"
    );
    fake.reset();
    let a = post(&gw.url(GROUP_INFO), body(&all)).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    let calls = calls_to(&fake, GROUP_INFO);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["GroupIdList"], json!(missing));
    assert_eq!(
        calls[0]["ResponseFilter"],
        json!({"GroupBaseInfoFilter": ["Name", "MemberNum"]})
    );
    assert_eq!(json(&a), world::direct(&world, GROUP_INFO, &body(&all)));
    // The missing group's per-item error passed through, and was not cached.
    assert_eq!(json(&a)["GroupInfo"][20]["ErrorCode"], 10010);
    fake.reset();
    let b = post(&gw.url(GROUP_INFO), body(&all)).await;
    assert_eq!(header(&b, "x-cache"), "PARTIAL");
    assert_eq!(
        calls_to(&fake, GROUP_INFO)[0]["GroupIdList"],
        json!(["@none_lost"])
    );
    assert_eq!(json(&b), json(&a));
}

#[tokio::test]
async fn an_account_check_of_100_caches_only_imported_accounts() {
    let (fake, world, gw) = setup(&[]).await;
    let body = |users: &[String]| {
        let items: Vec<Value> = users.iter().map(|u| json!({"UserID": u})).collect();
        json!({"CheckItem": items}).to_string()
    };
    let mut all = names("acct_", 95);
    for i in 0..5 {
        all.insert(i * 19, format!("nobody_{i}"));
    }
    assert_eq!(all.len(), 100);
    let cached: Vec<String> = all.iter().take(90).cloned().collect();
    assert_eq!(
        header(&post(&gw.url(CHECK), body(&cached)).await, "x-cache"),
        "MISS"
    );
    fake.reset();
    let a = post(&gw.url(CHECK), body(&all)).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    let calls = calls_to(&fake, CHECK);
    assert_eq!(calls.len(), 1);
    // The 10 never asked for, and the NotImported among the 90 (never cached).
    let asked: Vec<String> = calls[0]["CheckItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["UserID"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, u)| *i >= 90 || u.starts_with("nobody"))
        .map(|(_, u)| u.clone())
        .collect();
    assert_eq!(asked, expected, "in request order");
    assert_eq!(json(&a), world::direct(&world, CHECK, &body(&all)));
    assert_eq!(json(&a)["ResultItem"][0]["AccountStatus"], "NotImported");
}

#[tokio::test]
async fn per_item_failures_pass_through_and_are_never_cached() {
    let (fake, world, gw) = setup(&[]).await;
    let list = vec![
        "alice".to_string(),
        "ghost_1".to_string(),
        "bob".to_string(),
        "ghost_2".to_string(),
    ];
    let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    let v = json(&a);
    assert_eq!(v, world::direct(&world, PORTRAIT, &portrait(&list)));
    assert_eq!(v["Fail_Account"], json!(["ghost_1", "ghost_2"]));
    assert_eq!(v["UserProfileItem"][1]["ResultCode"], 40006);
    fake.reset();
    let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&b, "x-cache"), "PARTIAL");
    assert_eq!(
        calls_to(&fake, PORTRAIT)[0]["To_Account"],
        json!(["ghost_1", "ghost_2"])
    );
    assert_eq!(json(&b), v);
    // Only successes: a HIT carries no fail list (Chat leaves it out then).
    let ok = vec!["alice".to_string(), "bob".to_string()];
    let c = post(&gw.url(PORTRAIT), portrait(&ok)).await;
    assert_eq!(header(&c, "x-cache"), "HIT");
    assert_eq!(json(&c), world::direct(&world, PORTRAIT, &portrait(&ok)));
}

#[tokio::test]
async fn friend_get_list_is_per_friend_of_its_owner() {
    let (fake, world, gw) = setup(&[]).await;
    let body = |from: &str, to: &[&str]| {
        json!({"From_Account": from, "To_Account": to, "TagList": ["Tag_SNS_IM_Remark", "Tag_Profile_IM_Nick"]}).to_string()
    };
    let a = post(&gw.url(FRIEND_LIST), body("amy", &["amy_f1", "stranger"])).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(
        json(&a),
        world::direct(&world, FRIEND_LIST, &body("amy", &["amy_f1", "stranger"]))
    );
    assert_eq!(json(&a)["Fail_Account"], json!(["stranger"]));
    fake.reset();
    let b = post(&gw.url(FRIEND_LIST), body("amy", &["amy_f2", "amy_f1"])).await;
    assert_eq!(header(&b, "x-cache"), "PARTIAL");
    assert_eq!(
        calls_to(&fake, FRIEND_LIST)[0]["To_Account"],
        json!(["amy_f2"])
    );
    assert_eq!(
        json(&b),
        world::direct(&world, FRIEND_LIST, &body("amy", &["amy_f2", "amy_f1"]))
    );
    // Another owner is another key.
    fake.reset();
    let c = post(&gw.url(FRIEND_LIST), body("bea", &["amy_f1"])).await;
    assert_eq!(header(&c, "x-cache"), "MISS");
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn single_reads_cache_their_whole_answer() {
    let (fake, world, gw) = setup(&[]).await;
    for (path, body) in [
        (FRIEND_GET, r#"{"From_Account":"kim","StartIndex":0}"#),
        (JOINED, r#"{"Member_Account":"team_m1"}"#),
        (MEMBERS, r#"{"GroupId":"@team","Limit":100,"Offset":0}"#),
    ] {
        fake.reset();
        let a = post(&gw.url(path), body).await;
        assert_eq!(header(&a, "x-cache"), "MISS", "{path}");
        assert_eq!(json(&a), world::direct(&world, path, body), "{path}");
        let b = post(&gw.url(path), body).await;
        assert_eq!(header(&b, "x-cache"), "HIT", "{path}");
        assert_eq!(b.2, a.2, "{path}: byte for byte");
        assert_eq!(fake.count(), 1, "{path}");
    }
    // A failed single read (the group does not exist) is not cached.
    fake.reset();
    let body = r#"{"GroupId":"@none_x"}"#;
    for _ in 0..2 {
        let a = post(&gw.url(MEMBERS), body).await;
        assert_eq!(json(&a)["ErrorCode"], 10010);
        assert_eq!(header(&a, "x-cache"), "BYPASS");
    }
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn odd_requests_are_forwarded_or_refused_never_guessed() {
    let (fake, _world, gw) = setup(&[]).await;
    // Forwarded unchanged (Chat's answer as is), x-cache BYPASS.
    let many: Vec<String> = names("n", 101);
    for body in [
        r#"{"To_Account":["a","b","a"],"TagList":["Tag_Profile_IM_Nick"]}"#.to_string(),
        portrait(&many),
        r#"{"To_Account":["a",7],"TagList":["Tag_Profile_IM_Nick"]}"#.to_string(),
        r#"{"To_Account":"a","TagList":["Tag_Profile_IM_Nick"]}"#.to_string(),
        r#"{"To_Account":["a"]}"#.to_string(),
        r#"{"To_Account":[""],"TagList":[]}"#.to_string(),
        r#"["To_Account"]"#.to_string(),
    ] {
        fake.reset();
        let a = post(&gw.url(PORTRAIT), body.clone()).await;
        assert_eq!(header(&a, "x-cache"), "BYPASS", "{body}");
        assert_eq!(json(&a)["ActionStatus"], "OK", "{body}");
        let calls = fake.calls();
        assert_eq!(calls.len(), 1, "{body}");
        assert_eq!(calls[0].body, body.as_bytes(), "forwarded byte for byte");
    }
    // Refused by the gateway, never reaching Chat.
    fake.reset();
    for (body, code) in [
        ("{", 60003),
        ("not json", 60003),
        (
            r#"{"To_Account":["a"],"To_Account":["b"],"TagList":[]}"#,
            50002,
        ),
        (
            r#"{"To_Account":["a"],"TagList":[],"X":{"k":1,"k":2}}"#,
            50002,
        ),
    ] {
        let a = post(&gw.url(PORTRAIT), body).await;
        assert_eq!(json(&a)["ErrorCode"], code, "{body}");
        assert_eq!(header(&a, "x-cache"), "BYPASS");
    }
    assert_eq!(fake.count(), 0);
    // An empty body is Chat's to answer (forwarded as `{}`).
    let a = post(&gw.url(CHECK), "").await;
    assert_eq!(header(&a, "x-cache"), "BYPASS");
    assert_eq!(fake.calls()[0].body, &b"{}"[..]);
}

#[tokio::test]
async fn concurrent_misses_of_one_item_make_one_fetch() {
    let (fake, world, gw) = setup(&[]).await;
    world.lock().unwrap().read_delay = Duration::from_millis(300);
    let url = gw.url(PORTRAIT);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let list = vec!["shared".to_string(), format!("own_{i:02}")];
            post(&url, portrait(&list)).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let calls = calls_to(&fake, PORTRAIT);
    let fetched_shared = calls
        .iter()
        .filter(|c| {
            c["To_Account"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "shared")
        })
        .count();
    assert_eq!(fetched_shared, 1, "{calls:?}");
    for (i, a) in answers.iter().enumerate() {
        let list = vec!["shared".to_string(), format!("own_{i:02}")];
        assert_eq!(json(a), world::direct(&world, PORTRAIT, &portrait(&list)));
    }
    let m = scrape(&gw).await;
    assert!(
        metric(&m, "chat_gateway_coalesced_waits_total") >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn chat_failing_serves_stale_items_or_its_error() {
    let (fake, world, gw) = setup(&[(
        "cache.commands.\"profile/portrait_get\"",
        "ttl_secs = 1\nstale_if_error_secs = 60",
    )])
    .await;
    let list = vec!["sam".to_string(), "tom".to_string()];
    let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    // Past the TTL (1 s), within the stale window.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    world.lock().unwrap().fail_reads =
        Some(json!({"ActionStatus":"FAIL","ErrorCode":50004,"ErrorInfo":"busy"}));
    fake.reset();
    let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&b, "x-cache"), "STALE");
    assert_eq!(json(&b), json(&a));
    assert!(fake.count() >= 1, "Chat was asked first");
    // An item with nothing stale: Chat's error, as is.
    let c = post(
        &gw.url(PORTRAIT),
        portrait(&["sam".to_string(), "new".to_string()]),
    )
    .await;
    assert_eq!(json(&c)["ErrorCode"], 50004);
    assert_eq!(header(&c, "x-cache"), "BYPASS");
    // A final error (not transient) is never hidden by stale items.
    world.lock().unwrap().fail_reads =
        Some(json!({"ActionStatus":"FAIL","ErrorCode":40001,"ErrorInfo":"bad"}));
    let d = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(json(&d)["ErrorCode"], 40001);
}

/// Every way Chat can fail (an envelope with 50005, HTTP 5xx, no answer at all,
/// throttling) serves the stale items, with `age`.
#[tokio::test]
async fn stale_items_stand_in_for_any_failure_with_their_age() {
    let (fake, world, gw) = setup(&[
        (
            "cache.commands.\"profile/portrait_get\"",
            "ttl_secs = 1\nstale_if_error_secs = 60",
        ),
        // Shorter than a throttling pause: a throttled read is answered at once.
        ("chat", "request_timeout_ms = 800"),
    ])
    .await;
    let list = vec!["sue".to_string(), "tim".to_string()];
    let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let failures: [Failure; 4] = [
        ("50005", || {
            Box::new(|_, _| Reply::Json(chat_error(50005), Duration::ZERO))
        }),
        ("HTTP 502", || {
            Box::new(|_, _| Reply::Status(502, "down".into()))
        }),
        ("a transport error", || Box::new(|_, _| Reply::Close)),
        ("throttling", || {
            Box::new(|_, _| Reply::Json(chat_error(60019), Duration::ZERO))
        }),
    ];
    for (what, responder) in failures {
        fake.set_responder(responder());
        let calls = fake.count();
        let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
        assert_eq!(header(&b, "x-cache"), "STALE", "{what}: {:?}", json(&b));
        assert_eq!(json(&b), json(&a), "{what}");
        let age: u64 = header(&b, "age").parse().expect("age on STALE");
        assert!((1..=5).contains(&age), "{what}: age {age}");
        assert!(fake.count() > calls, "{what}: Chat was asked first");
    }
    fake.set_responder(world::responder(world));
}

/// A batched read's fetch runs as its own task: a caller that goes away while the
/// fetch is at Chat (an HTTP/2 caller whose connection closes, which drops its
/// request's handler) cancels nothing, and the items are stored with nobody asking
/// again.
#[tokio::test]
async fn a_caller_that_disconnects_cancels_no_item_fetch() {
    let (fake, world, gw) = setup(&[("chat", "request_timeout_ms = 60000")]).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    fake.set_responder({
        let (world, gate) = (world.clone(), gate.clone());
        Box::new(move |r: &Recorded, _| {
            let v = world.lock().unwrap().answer(&r.path, &r.json());
            Reply::Gated(v, gate.clone())
        })
    });
    let list = vec!["gone1".to_string(), "gone2".to_string()];
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(gw.url(PORTRAIT))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(portrait(
            &list,
        ))))
        .unwrap();
    let request = tokio::spawn(async move { sender.send_request(req).await.map(|_| ()) });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fake.count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetch never reached Chat"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The caller goes away; the gateway sees its connection close (the scrape's own
    // is the one left).
    request.abort();
    conn.abort();
    let open = "chat_gateway_open_connections{listener=\"main\"}";
    while metric(&scrape(&gw).await, open) > 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(1);
    while metric(&scrape(&gw).await, "chat_gateway_cache_items") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the items were never stored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&a, "x-cache"), "HIT");
    assert_eq!(json(&a), world::direct(&world, PORTRAIT, &portrait(&list)));
    assert_eq!(fake.count(), 1, "one call to Chat");
}

#[tokio::test]
async fn an_answer_that_cannot_be_split_is_never_assembled() {
    // Chat answers the second call with one item missing; the gateway forwards the
    // caller's whole request instead of guessing.
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        let v = r.json();
        let mut items: Vec<Value> = v["To_Account"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| json!({"To_Account": a, "ResultCode": 0, "ResultInfo": "", "ProfileItem": []}))
            .collect();
        if n == 2 || n == 4 {
            items.pop();
        }
        Reply::Json(
            json!({"UserProfileItem": items, "ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "ErrorDisplay": ""}),
            Duration::ZERO,
        )
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    assert_eq!(
        header(
            &post(&gw.url(PORTRAIT), r#"{"To_Account":["y"],"TagList":[]}"#).await,
            "x-cache"
        ),
        "MISS"
    );
    let body = r#"{"To_Account":["x","y"],  "TagList":[]}"#;
    let a = post(&gw.url(PORTRAIT), body).await;
    assert_eq!(header(&a, "x-cache"), "BYPASS");
    let calls = fake.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[1].json()["To_Account"], json!(["x"]));
    assert_eq!(calls[2].body, body.as_bytes(), "the original request");
    assert_eq!(json(&a)["UserProfileItem"].as_array().unwrap().len(), 2);
    // When the call named the whole request, its answer is Chat's answer: as is.
    let whole = r#"{"To_Account":["p","q"],"TagList":[]}"#;
    let b = post(&gw.url(PORTRAIT), whole).await;
    assert_eq!(header(&b, "x-cache"), "BYPASS");
    assert_eq!(fake.count(), 4);
    assert_eq!(json(&b)["UserProfileItem"].as_array().unwrap().len(), 1);
    // Nothing of it was cached.
    assert_eq!(
        header(
            &post(&gw.url(PORTRAIT), r#"{"To_Account":["p"],"TagList":[]}"#).await,
            "x-cache"
        ),
        "MISS"
    );
}

#[tokio::test]
async fn no_cache_refetches_every_item() {
    let (fake, world, gw) = setup(&[]).await;
    let list = vec!["ann".to_string(), "ben".to_string()];
    post(&gw.url(PORTRAIT), portrait(&list)).await;
    world.lock().unwrap().bump("profile:ann");
    fake.reset();
    let a = send(
        http::Request::post(gw.url(PORTRAIT))
            .header("cache-control", "no-cache")
            .body(http_body_util::Full::new(bytes::Bytes::from(portrait(
                &list,
            ))))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(header(&a, "x-cache"), "BYPASS");
    assert_eq!(
        calls_to(&fake, PORTRAIT)[0]["To_Account"],
        json!(["ann", "ben"])
    );
    assert_eq!(json(&a), world::direct(&world, PORTRAIT, &portrait(&list)));
    // ... and refreshed the stored items.
    let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&b, "x-cache"), "HIT");
    assert_eq!(json(&b), json(&a));
}

#[tokio::test]
async fn admin_invalidates_entities_and_keeps_the_old_forms() {
    let (fake, world, gw) = setup(&[]).await;
    let list = vec!["pia".to_string(), "quinn".to_string()];
    let groups = r#"{"GroupIdList":["@alpha","@beta"]}"#;
    post(&gw.url(PORTRAIT), portrait(&list)).await;
    post(&gw.url(GROUP_INFO), groups).await;
    let inv = |body: &'static str| {
        let url = gw.url("/admin/cache/invalidate");
        async move { post(&url, body).await }
    };
    // A profile changed "elsewhere": the cache still serves the old one...
    world.lock().unwrap().bump("profile:pia");
    assert_eq!(
        header(&post(&gw.url(PORTRAIT), portrait(&list)).await, "x-cache"),
        "HIT"
    );
    let a = inv(r#"{"Profile":["pia"]}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert_eq!(json(&a)["Invalidated"]["Entities"], 1);
    fake.reset();
    let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&b, "x-cache"), "PARTIAL");
    assert_eq!(calls_to(&fake, PORTRAIT)[0]["To_Account"], json!(["pia"]));
    assert_eq!(json(&b), world::direct(&world, PORTRAIT, &portrait(&list)));
    // A group event.
    world.lock().unwrap().bump("ginfo:@beta");
    assert_eq!(json(&inv(r#"{"GroupId":["@beta"]}"#).await)["ErrorCode"], 0);
    fake.reset();
    let c = post(&gw.url(GROUP_INFO), groups).await;
    assert_eq!(header(&c, "x-cache"), "PARTIAL");
    assert_eq!(
        calls_to(&fake, GROUP_INFO)[0]["GroupIdList"],
        json!(["@beta"])
    );
    assert_eq!(json(&c), world::direct(&world, GROUP_INFO, groups));
    // The old form: every entity of the account.
    assert_eq!(
        json(&inv(r#"{"From_Account":"quinn"}"#).await)["ErrorCode"],
        0
    );
    fake.reset();
    post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(calls_to(&fake, PORTRAIT)[0]["To_Account"], json!(["quinn"]));
    // Everything.
    assert_eq!(json(&inv(r#"{"All":true}"#).await)["ErrorCode"], 0);
    assert_eq!(
        header(&post(&gw.url(GROUP_INFO), groups).await, "x-cache"),
        "MISS"
    );
    // Bad forms.
    for body in [
        r#"{"Profile":[]}"#,
        r#"{"Nope":"x"}"#,
        r#"{"All":true,"GroupId":"@a"}"#,
    ] {
        assert_eq!(json(&inv(body).await)["ErrorCode"], 50002, "{body}");
    }
}

#[tokio::test]
async fn per_command_settings_reload_live() {
    let (fake, _world, gw) = setup(&[]).await;
    let list = vec!["rex".to_string()];
    post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(
        header(&post(&gw.url(PORTRAIT), portrait(&list)).await, "x-cache"),
        "HIT"
    );
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        format!("{text}\n[cache.commands.\"profile/portrait_get\"]\nenabled = false\n"),
    )
    .unwrap();
    assert!(
        gw.wait_log(
            "cache.commands.\"profile/portrait_get\".enabled: true -> false",
            Duration::from_secs(10)
        )
        .await,
        "{}",
        gw.log_text()
    );
    fake.reset();
    for _ in 0..2 {
        let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
        assert_eq!(header(&a, "x-cache"), "", "forwarded like any command");
        assert_eq!(json(&a)["ErrorCode"], 0);
    }
    assert_eq!(fake.count(), 2);
    // Back on with a TTL of its own: what was stored before is still fresh... and
    // a reload never serves what an invalidation dropped.
    std::fs::write(
        &gw.config_path,
        format!(
            "{text}\n[cache.commands.\"profile/portrait_get\"]\nenabled = true\nttl_secs = 120\n"
        ),
    )
    .unwrap();
    assert!(
        gw.wait_log("ttl_secs: 60 -> 120", Duration::from_secs(10))
            .await,
        "{}",
        gw.log_text()
    );
    fake.reset();
    let b = post(&gw.url(PORTRAIT), portrait(&["sue".to_string()])).await;
    assert_eq!(header(&b, "x-cache"), "MISS");
    assert_eq!(
        header(
            &post(&gw.url(PORTRAIT), portrait(&["sue".to_string()])).await,
            "x-cache"
        ),
        "HIT"
    );
    // An invalid edit is refused and the settings stay.
    std::fs::write(
        &gw.config_path,
        format!("{text}\n[cache.commands.\"openim/query_online_status\"]\nenabled = true\n"),
    )
    .unwrap();
    assert!(
        gw.wait_log("never cached", Duration::from_secs(10)).await,
        "{}",
        gw.log_text()
    );
    assert_eq!(
        header(
            &post(&gw.url(PORTRAIT), portrait(&["sue".to_string()])).await,
            "x-cache"
        ),
        "HIT"
    );
}

#[tokio::test]
async fn query_online_status_is_never_cached() {
    let (fake, _world, gw) = setup(&[]).await;
    for _ in 0..2 {
        let a = post(
            &gw.url("/v4/openim/query_online_status"),
            r#"{"To_Account":["a"]}"#,
        )
        .await;
        assert_eq!(header(&a, "x-cache"), "");
    }
    assert_eq!(fake.count(), 2);
}

#[tokio::test]
async fn metrics_count_per_command_and_per_item() {
    let (_fake, _world, gw) = setup(&[]).await;
    let first = vec!["m1".to_string(), "m2".to_string()];
    let both = vec!["m1".to_string(), "m2".to_string(), "m3".to_string()];
    post(&gw.url(PORTRAIT), portrait(&first)).await; // miss: 2 from Chat
    post(&gw.url(PORTRAIT), portrait(&first)).await; // hit: 2 from memory, 1 call saved
    post(&gw.url(PORTRAIT), portrait(&both)).await; // partial: 2 + 1
    let m = scrape(&gw).await;
    let c = |result: &str| {
        metric(
            &m,
            &format!("chat_gateway_item_cache_requests_total{{command=\"profile/portrait_get\",result=\"{result}\"}}"),
        )
    };
    assert_eq!((c("miss"), c("hit"), c("partial")), (1.0, 1.0, 1.0), "{m}");
    let items = |source: &str| {
        metric(
            &m,
            &format!("chat_gateway_item_cache_items_total{{command=\"profile/portrait_get\",source=\"{source}\"}}"),
        )
    };
    assert_eq!(
        (items("memory"), items("chat"), items("l2")),
        (4.0, 3.0, 0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "chat_gateway_upstream_calls_saved_total{command=\"profile/portrait_get\"}"
        ),
        1.0
    );
    assert!(metric(&m, "chat_gateway_cache_items") >= 3.0, "{m}");
    assert!(
        metric(&m, "chat_gateway_cache_item_weighted_bytes") > 0.0,
        "{m}"
    );
    // Every cached command's series is there from the start.
    for cmd in [
        "group_open_http_svc/get_group_info",
        "im_open_login_svc/account_check",
        "sns/friend_get",
    ] {
        assert!(
            m.contains(&format!(
                "chat_gateway_item_cache_requests_total{{command=\"{cmd}\",result=\"hit\"}} 0"
            )),
            "{cmd}"
        );
    }
    assert!(
        m.contains("chat_gateway_requests_total{route=\"items\",outcome=\"ok\"} 3"),
        "{m}"
    );
}

#[tokio::test]
async fn a_full_hit_answers_without_chat_even_when_chat_is_gone() {
    let (fake, world, gw) = setup(&[]).await;
    let list = vec!["vic".to_string(), "wes".to_string()];
    let a = post(&gw.url(PORTRAIT), portrait(&list)).await;
    fake.stop();
    let b = post(&gw.url(PORTRAIT), portrait(&list)).await;
    assert_eq!(header(&b, "x-cache"), "HIT");
    assert_eq!(json(&b), json(&a));
    assert_eq!(json(&b), world::direct(&world, PORTRAIT, &portrait(&list)));
}

/// A request that arrives after a write was acknowledged never gets the answer of
/// a fetch that began before the write, even though that fetch is for its item and
/// still in the air: it asks again.
#[tokio::test]
async fn a_fetch_in_the_air_before_a_write_never_answers_a_request_after_it() {
    let (fake, world, gw) = setup(&[]).await;
    world.lock().unwrap().read_delay = Duration::from_millis(400);
    let list = vec!["racer".to_string()];
    let url = gw.url(PORTRAIT);
    let early = {
        let (url, body) = (url.clone(), portrait(&list));
        tokio::spawn(async move { post(&url, body).await })
    };
    // The early fetch has reached Chat (and read the old profile).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while calls_to(&fake, PORTRAIT).is_empty() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let w = post(
        &gw.url("/v4/profile/portrait_set"),
        r#"{"From_Account":"racer","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"new"}]}"#,
    )
    .await;
    assert_eq!(json(&w)["ErrorCode"], 0);
    let after = post(&url, portrait(&list)).await;
    let now = world::direct(&world, PORTRAIT, &portrait(&list));
    assert_eq!(
        json(&after),
        now,
        "the answer after the write is the new one"
    );
    let before = early.await.unwrap();
    assert_ne!(json(&before), now, "the early request read the old profile");
    assert_eq!(calls_to(&fake, PORTRAIT).len(), 2);
    // The early fetch did not store its old answer; the second one did.
    let again = post(&url, portrait(&list)).await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    assert_eq!(json(&again), now);
}

/// A full hit is answered by the HTTP/1.1 front end's hit path (no router): the same
/// bytes and headers as the router's answer for the same request (a gateway with
/// caller tokens takes the router's path for everything), pipelined hits in order,
/// counted alike; and what that path cannot answer (an item named twice, a body with
/// escapes, one item not cached, `no-cache`) is still answered right by the router.
#[tokio::test]
async fn full_hits_take_the_front_ends_hit_path_and_answer_as_the_router_does() {
    const TOKEN: &str = "token-item-hits-0001";
    let (fake, world) = world::start().await;
    let fast = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let routed = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", &format!("auth_tokens = [\"{TOKEN}\"]"))],
    ))
    .await;
    let cases: Vec<(&str, String)> = vec![
        (PORTRAIT, portrait(&names("user_", 20))),
        (
            GROUP_INFO,
            r#"{"GroupIdList":["@a","@b","@none_c"],"ResponseFilter":{"GroupBaseInfoFilter":["Name"]}}"#
                .into(),
        ),
        (
            CHECK,
            r#"{"CheckItem":[{"UserID":"kim"},{"UserID":"lee"}]}"#.into(),
        ),
        (
            FRIEND_LIST,
            r#"{"From_Account":"kim","To_Account":["kim_f1","kim_f2"],"TagList":["Tag_SNS_IM_Remark"]}"#
                .into(),
        ),
        (FRIEND_GET, r#"{"From_Account":"kim","StartIndex":0}"#.into()),
        (JOINED, r#"{"Member_Account":"team_m1"}"#.into()),
        (MEMBERS, r#"{"GroupId":"@team"}"#.into()),
    ];
    let raw_post = |path: &str, body: &str, extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let mut on_fast = raw::RawConn::connect(fast.addr).await;
    let mut on_routed = raw::RawConn::connect(routed.addr).await;
    let within = Duration::from_secs(10);
    for (path, body) in &cases {
        // Warm both (the group that does not exist fails and is asked again: only
        // the other items can hit).
        for (c, extra) in [(&mut on_fast, ""), (&mut on_routed, auth.as_str())] {
            c.send(raw_post(path, body, extra).as_bytes())
                .await
                .unwrap();
            let a = c.response(within).await.unwrap();
            assert_eq!(a.json(), world::direct(&world, path, body), "{path}");
        }
    }
    let scrape_hits = |m: &str, path: &str| {
        metric(
            m,
            &format!(
                "chat_gateway_item_cache_requests_total{{command=\"{}\",result=\"hit\"}}",
                path.trim_start_matches("/v4/")
            ),
        )
    };
    let before = scrape(&fast).await;
    fake.reset();
    // Every cacheable case, pipelined on one connection: all hits, in order.
    let hits: Vec<&(&str, String)> = cases.iter().filter(|(p, _)| *p != GROUP_INFO).collect();
    let mut pipelined = String::new();
    for (path, body) in &hits {
        pipelined.push_str(&raw_post(path, body, ""));
    }
    on_fast.send(pipelined.as_bytes()).await.unwrap();
    for (path, body) in &hits {
        let a = on_fast.response(within).await.unwrap();
        on_routed
            .send(raw_post(path, body, &auth).as_bytes())
            .await
            .unwrap();
        let b = on_routed.response(within).await.unwrap();
        assert_eq!(a.header("x-cache"), "HIT", "{path}");
        assert_eq!(b.header("x-cache"), "HIT", "{path}");
        assert_eq!(a.body, b.body, "{path}: byte for byte");
        let names = |r: &raw::RawResponse| {
            let mut n: Vec<String> = r.headers.iter().map(|(k, _)| k.to_lowercase()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&a), names(&b), "{path}");
        for h in ["content-type", "age", "content-length"] {
            assert_eq!(a.header(h), b.header(h), "{path}: {h}");
        }
        assert_eq!(a.header("x-request-id").len(), 16);
    }
    assert_eq!(fake.count(), 0, "no call to Chat");
    let after = scrape(&fast).await;
    for (path, _) in &hits {
        assert_eq!(
            scrape_hits(&after, path) - scrape_hits(&before, path),
            1.0,
            "{path}"
        );
    }
    // What the hit path leaves to the router.
    let twice = portrait(&["user_000".into(), "user_001".into(), "user_000".into()]);
    let escaped = r#"{"To_Account":["user_\u003001"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]}"#;
    let one_new = portrait(&["user_000".into(), "brand_new".into()]);
    for (body, x, calls) in [
        (twice.as_str(), "BYPASS", 1),
        (escaped, "HIT", 0),
        (one_new.as_str(), "PARTIAL", 1),
    ] {
        fake.reset();
        on_fast
            .send(raw_post(PORTRAIT, body, "").as_bytes())
            .await
            .unwrap();
        let a = on_fast.response(within).await.unwrap();
        assert_eq!(a.header("x-cache"), x, "{body}");
        assert_eq!(a.json(), world::direct(&world, PORTRAIT, body), "{body}");
        assert_eq!(fake.count(), calls, "{body}");
    }
    on_fast
        .send(raw_post(PORTRAIT, &cases[0].1, "Cache-Control: no-cache\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(
        on_fast.response(within).await.unwrap().header("x-cache"),
        "BYPASS"
    );
}

/// With caller tokens, a fully cached read is still answered by the front end's fast
/// path only for a valid token: without one, or with a wrong one, 401 (the cached
/// items are never shown), on the same keep-alive connection.
#[tokio::test]
async fn caller_tokens_guard_item_hits() {
    use common::raw::RawConn;
    let (fake, _world, gw) =
        setup(&[("server", "auth_tokens = [\"item-caller-token-0000\"]")]).await;
    let body = portrait(&names("tok", 20));
    let request = |auth: Option<&str>| {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        format!(
            "POST {PORTRAIT} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut conn = RawConn::connect(gw.addr).await;
    let mut ask = async |auth: Option<&str>| {
        conn.send(request(auth).as_bytes()).await.unwrap();
        let r = conn.response(Duration::from_secs(5)).await.unwrap();
        (r.status, r.header("x-cache").to_string())
    };
    let good = Some("Bearer item-caller-token-0000");
    assert_eq!(ask(good).await, (200, "MISS".into()));
    assert_eq!(ask(good).await, (200, "HIT".into()));
    for auth in [
        None,
        Some("Bearer item-caller-token-000"),
        Some("Bearer item-caller-token-00000"),
        Some("Basic item-caller-token-0000"),
    ] {
        assert_eq!(ask(auth).await.0, 401, "{auth:?} on cached items");
    }
    assert_eq!(ask(good).await, (200, "HIT".into()));
    assert_eq!(calls_to(&fake, PORTRAIT).len(), 1);
}
