//! The per-item cache against the emulator (real binaries on free ports): the
//! gateway → a recording proxy → the emulator. A portrait_get of 100 accounts of
//! which 90 are cached, a get_group_info of 50 groups of which 45 are, an
//! account_check of 100 accounts of which 90 are: exactly one call naming the
//! others with the same other fields, and an answer JSON-equal, in the same order,
//! to what the emulator answers for the whole request (its `RequestId`, new on every
//! answer, aside). Then changes made "from a client", announced by the emulator's
//! webhooks to the gateway: the next read is fresh.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_gateway::emulator::{self, EmulatorConfig, EmulatorHandle};
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

const PORTRAIT: &str = "/v4/profile/portrait_get";
const GROUP_INFO: &str = "/v4/group_open_http_svc/get_group_info";
const CHECK: &str = "/v4/im_open_login_svc/account_check";

/// Forwards everything to the emulator and records the `/v4` calls (path, body).
struct Proxy {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let recorded = calls.clone();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (client, recorded, upstream) =
                    (client.clone(), recorded.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (client, recorded, upstream) =
                            (client.clone(), recorded.clone(), upstream.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let path = parts.uri.path().to_string();
                            if path.starts_with("/v4/") {
                                recorded.lock().unwrap().push((
                                    path.clone(),
                                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                                ));
                            }
                            let uri = format!(
                                "{upstream}{}",
                                parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.as_str())
                                    .unwrap_or("/")
                            );
                            let fwd = Request::builder()
                                .method(parts.method)
                                .uri(uri)
                                .body(Full::new(body))
                                .unwrap();
                            let resp = client.request(fwd).await.unwrap();
                            let (p, b) = resp.into_parts();
                            let b = b.collect().await.unwrap().to_bytes();
                            Ok::<_, std::convert::Infallible>(Response::from_parts(p, Full::new(b)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy { addr, calls }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls_to(&self, path: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn reset(&self) {
        self.calls.lock().unwrap().clear();
    }
}

struct Setup {
    emu: EmulatorHandle,
    proxy: Proxy,
    gw: Gateway,
}

async fn setup() -> Setup {
    let emu = emulator::spawn(EmulatorConfig::default()).await.unwrap();
    let proxy = Proxy::start(emu.base_url()).await;
    let secret = emu.config().secret_key.clone();
    let gw = Gateway::start(&config_toml_with(&proxy.url(), &secret, &[])).await;
    Setup { emu, proxy, gw }
}

/// What the emulator answers for `body` on `path`, asked directly.
async fn direct(emu: &EmulatorHandle, path: &str, body: &str) -> Value {
    let url = format!(
        "{}{path}?sdkappid={SDKAPPID}&identifier={IDENTIFIER}&usersig={}&random=1&contenttype=json",
        emu.base_url(),
        emu.admin_usersig()
    );
    json(&post(&url, body.to_string()).await)
}

/// A Chat answer without its `RequestId` (a new one on every answer).
fn sans_request_id(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("RequestId");
    }
    v
}

fn accounts(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("user_{i:04}")).collect()
}

/// The items a call named: the strings of its item field, or their `UserID`.
fn named(path: &str, call: &Value) -> Vec<String> {
    let field = items_field(path);
    call[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().or(v["UserID"].as_str()).unwrap().to_string())
        .collect()
}

fn items_field(path: &str) -> &'static str {
    let command = path.trim_start_matches("/v4/");
    chat_gateway::chat::reads::row(command)
        .unwrap()
        .1
        .items
        .field()
}

/// Caches every item of `all` but `missing`, asks for `all`, then again; `failed`
/// are the items Chat fails (never cached).
async fn partial_then_whole(
    s: &Setup,
    path: &str,
    body: impl Fn(&[String]) -> String,
    all: &[String],
    missing: &[String],
    failed: &[String],
) {
    let items_field = items_field(path);
    let cached: Vec<String> = all
        .iter()
        .filter(|i| !missing.contains(i))
        .cloned()
        .collect();
    let warm = post(&s.gw.url(path), body(&cached)).await;
    assert_eq!(header(&warm, "x-cache"), "MISS", "{}", json(&warm));
    s.proxy.reset();
    let a = post(&s.gw.url(path), body(all)).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL", "{}", json(&a));
    let calls = s.proxy.calls_to(path);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        named(path, &calls[0]),
        missing,
        "only the missing ones, in order"
    );
    let whole: Value = serde_json::from_str(&body(all)).unwrap();
    for (k, v) in whole.as_object().unwrap() {
        if k != items_field {
            assert_eq!(&calls[0][k], v, "{k} forwarded unchanged");
        }
    }
    let expected = sans_request_id(direct(&s.emu, path, &body(all)).await);
    assert_eq!(sans_request_id(json(&a)), expected);
    // Again: every success is cached now, only failures are asked for again.
    s.proxy.reset();
    let b = post(&s.gw.url(path), body(all)).await;
    let again = s.proxy.calls_to(path);
    match failed.is_empty() {
        true => {
            assert_eq!(header(&b, "x-cache"), "HIT");
            assert!(again.is_empty());
        }
        false => {
            assert_eq!(header(&b, "x-cache"), "PARTIAL");
            assert_eq!(named(path, &again[0]), failed);
        }
    }
    assert_eq!(sans_request_id(json(&b)), expected);
}

#[tokio::test]
async fn portrait_get_of_100_with_90_cached() {
    let s = setup().await;
    let tags = json!([
        "Tag_Profile_IM_Nick",
        "Tag_Profile_IM_Image",
        "Tag_Profile_Custom_Level",
        "Tag_Profile_IM_Gender"
    ]);
    let all = accounts(1..=100);
    let missing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 3)
        .map(|(_, a)| a.clone())
        .collect();
    partial_then_whole(
        &s,
        PORTRAIT,
        |list| json!({"To_Account": list, "TagList": tags}).to_string(),
        &all,
        &missing,
        &[],
    )
    .await;
}

#[tokio::test]
async fn get_group_info_of_50_with_45_cached() {
    let s = setup().await;
    let listed: Value = {
        let url = format!("{}/__emulator/groups", s.emu.base_url());
        serde_json::from_slice(&get(&url).await.unwrap().2).unwrap()
    };
    let groups: Vec<String> = listed["Groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["GroupId"].as_str().unwrap().to_string())
        .collect();
    assert!(groups.len() >= 49, "{}", groups.len());
    let mut all: Vec<String> = groups.into_iter().take(49).collect();
    all.insert(10, "@TGS#NOSUCHGRP".into());
    let missing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 0)
        .map(|(_, g)| g.clone())
        .collect();
    assert_eq!(missing.len(), 5);
    partial_then_whole(
        &s,
        GROUP_INFO,
        |list| {
            json!({"GroupIdList": list, "ResponseFilter": {"GroupBaseInfoFilter": ["Type", "Name", "Owner_Account", "MemberNum"], "MemberInfoFilter": ["Role"]}})
                .to_string()
        },
        &all,
        &missing,
        &["@TGS#NOSUCHGRP".to_string()],
    )
    .await;
}

#[tokio::test]
async fn account_check_of_100_with_90_cached() {
    let s = setup().await;
    let mut all = accounts(1..=95);
    for i in 0..5 {
        all.insert(i * 20, format!("nobody_{i}"));
    }
    // The NotImported ones are never cached: they are asked for every time.
    let missing: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, a)| i % 10 == 5 || a.starts_with("nobody"))
        .map(|(_, a)| a.clone())
        .collect();
    let body = |list: &[String]| {
        let items: Vec<Value> = list.iter().map(|u| json!({ "UserID": u })).collect();
        json!({ "CheckItem": items }).to_string()
    };
    let not_imported: Vec<String> = all
        .iter()
        .filter(|a| a.starts_with("nobody"))
        .cloned()
        .collect();
    let cached: Vec<String> = all
        .iter()
        .filter(|a| !missing.contains(a))
        .cloned()
        .collect();
    // Warm with the 90 (NotImported ones included, which are not stored).
    let warm: Vec<String> = cached.iter().chain(&not_imported).cloned().collect();
    let w = post(&s.gw.url(CHECK), body(&warm)).await;
    assert_eq!(header(&w, "x-cache"), "MISS");
    s.proxy.reset();
    let a = post(&s.gw.url(CHECK), body(&all)).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    let calls = s.proxy.calls_to(CHECK);
    assert_eq!(calls.len(), 1);
    let named: Vec<String> = calls[0]["CheckItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["UserID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(named, missing);
    assert_eq!(
        sans_request_id(json(&a)),
        sans_request_id(direct(&s.emu, CHECK, &body(&all)).await)
    );
}

/// Changes made from a user's app reach the gateway through the emulator's webhooks:
/// the next read asks Chat again and answers the new value.
#[tokio::test]
async fn changes_from_a_client_reach_the_cache_through_webhooks() {
    let s = setup().await;
    let set = format!("{}/__emulator/callback", s.emu.base_url());
    let hook = s.gw.url("/callback");
    assert_eq!(post(&set, json!({ "url": hook }).to_string()).await.0, 200);
    let portrait =
        json!({"To_Account": ["user_0007", "user_0008"], "TagList": ["Tag_Profile_IM_Nick"]})
            .to_string();
    let before = post(&s.gw.url(PORTRAIT), portrait.clone()).await;
    assert_eq!(
        header(
            &post(&s.gw.url(PORTRAIT), portrait.clone()).await,
            "x-cache"
        ),
        "HIT"
    );
    let client = format!(
        "{}/__emulator/client/profile/portrait_set?as=user_0007&platform=iOS",
        s.emu.base_url()
    );
    let c = post(
        &client,
        json!({"From_Account": "user_0007", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "changed on the phone"}]})
            .to_string(),
    )
    .await;
    assert_eq!(c.0, 200, "{:?}", c.2);
    // The webhook is delivered asynchronously: wait for its effect, not a time.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = String::from_utf8_lossy(&get(&s.gw.url("/metrics")).await.unwrap().2).into_owned();
        if metric(&m, "chat_gateway_callbacks_total{outcome=\"applied\"}") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no webhook arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = post(&s.gw.url(PORTRAIT), portrait.clone()).await;
    assert_eq!(header(&after, "x-cache"), "PARTIAL");
    assert_eq!(
        s.proxy.calls_to(PORTRAIT).last().unwrap()["To_Account"],
        json!(["user_0007"])
    );
    assert_eq!(
        json(&after)["UserProfileItem"][0]["ProfileItem"][0]["Value"],
        "changed on the phone"
    );
    assert_ne!(json(&after), json(&before));
    assert_eq!(
        sans_request_id(json(&after)),
        sans_request_id(direct(&s.emu, PORTRAIT, &portrait).await)
    );
}

/// xorshift64*, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Read-your-writes through one gateway: a randomized run of 1,000 steps, reads of
/// every cached command (a fixed set asked again and again, so most are cached when
/// a write comes) and the writes that change them, all through the gateway; every
/// read answers what the emulator answers at that moment.
#[tokio::test]
async fn read_your_writes_randomized_through_one_gateway() {
    let cfg = EmulatorConfig {
        faults: emulator::FaultSettings {
            rate_limit: 0,
            ..Default::default()
        },
        ..EmulatorConfig::default()
    };
    let emu = emulator::spawn(cfg).await.unwrap();
    let proxy = Proxy::start(emu.base_url()).await;
    let secret = emu.config().secret_key.clone();
    let gw = Gateway::start(&config_toml_with(
        &proxy.url(),
        &secret,
        &[("ratelimit", "per_command_per_sec = 100000")],
    ))
    .await;
    let pool: Vec<String> = (1..=8).map(|i| format!("user_{i:04}")).collect();
    let extra: Vec<String> = (0..4).map(|i| format!("newbie_{i}")).collect();
    let listed: Value = serde_json::from_slice(
        &get(&format!("{}/__emulator/groups", emu.base_url()))
            .await
            .unwrap()
            .2,
    )
    .unwrap();
    let groups: Vec<String> = listed["Groups"]
        .as_array()
        .unwrap()
        .iter()
        .take(6)
        .map(|g| g["GroupId"].as_str().unwrap().to_string())
        .collect();
    // Everyone in the pool befriends everyone: friend updates then change something.
    for (i, u) in pool.iter().enumerate() {
        let to: Vec<Value> = pool[i + 1..]
            .iter()
            .map(|v| json!({"To_Account": v, "AddSource": "AddSource_Type_Web"}))
            .collect();
        if !to.is_empty() {
            let body = json!({"From_Account": u, "ForceAddFlags": 1, "AddFriendItem": to});
            assert_eq!(
                post(&gw.url("/v4/sns/friend_add"), body.to_string())
                    .await
                    .0,
                200
            );
        }
    }
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let some = |rng: &mut Rng, v: &[String], n: usize| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        while out.len() < n {
            let x = rng.pick(v).clone();
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    };
    let everyone: Vec<String> = pool.iter().chain(&extra).cloned().collect();
    // A fixed set of reads, asked again and again (so most are cached when a write
    // comes), of every cached command.
    let mut read_set: Vec<(&str, Value)> = Vec::new();
    for k in 0..42 {
        read_set.push(match k % 7 {
            0 => (
                PORTRAIT,
                json!({"To_Account": some(&mut rng, &everyone, 4), "TagList": ["Tag_Profile_IM_Nick", "Tag_Profile_Custom_Level"]}),
            ),
            1 => (GROUP_INFO, json!({ "GroupIdList": some(&mut rng, &groups, 3) })),
            2 => {
                let items: Vec<Value> = some(&mut rng, &everyone, 4)
                    .into_iter()
                    .map(|u| json!({ "UserID": u }))
                    .collect();
                (CHECK, json!({ "CheckItem": items }))
            }
            3 => (
                "/v4/sns/friend_get_list",
                json!({"From_Account": rng.pick(&pool), "To_Account": some(&mut rng, &pool, 4),
                       "TagList": ["Tag_SNS_IM_Remark", "Tag_Profile_IM_Nick"]}),
            ),
            4 => (
                "/v4/sns/friend_get",
                json!({"From_Account": rng.pick(&pool), "StartIndex": 0}),
            ),
            5 => (
                "/v4/group_open_http_svc/get_joined_group_list",
                json!({"Member_Account": rng.pick(&pool),
                       "ResponseFilter": {"GroupBaseInfoFilter": ["Name", "MemberNum"], "SelfInfoFilter": ["Role", "NameCard"]}}),
            ),
            _ => (
                "/v4/group_open_http_svc/get_group_member_info",
                json!({ "GroupId": rng.pick(&groups) }),
            ),
        });
    }
    let (mut reads, mut hits, mut writes) = (0, 0, 0);
    for step in 0..1000 {
        if rng.below(100) < 75 {
            let (path, body) = rng.pick(&read_set).clone();
            let a = post(&gw.url(path), body.to_string()).await;
            let now = direct(&emu, path, &body.to_string()).await;
            let (got, want) = (sans_request_id(json(&a)), sans_request_id(now));
            assert!(
                got == want,
                "step {step}: {path} {body} answered {} (stale):\n got {:.600}\nwant {:.600}",
                header(&a, "x-cache"),
                got.to_string(),
                want.to_string()
            );
            reads += 1;
            hits += usize::from(header(&a, "x-cache") == "HIT");
        } else {
            let u = rng.pick(&pool).clone();
            let v = rng.pick(&pool).clone();
            let g = rng.pick(&groups).clone();
            let n = rng.next() % 1000;
            let (path, body) = match rng.below(11) {
                0 => (
                    "/v4/profile/portrait_set",
                    json!({"From_Account": rng.pick(&everyone), "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": format!("nick {n}")}]}),
                ),
                1 => (
                    "/v4/sns/friend_add",
                    json!({"From_Account": u, "ForceAddFlags": 1, "AddFriendItem": [{"To_Account": v, "AddSource": "AddSource_Type_Web"}]}),
                ),
                2 => (
                    "/v4/sns/friend_delete",
                    json!({"From_Account": u, "To_Account": [v], "DeleteType": "Delete_Type_Both"}),
                ),
                3 => (
                    "/v4/sns/friend_update",
                    json!({"From_Account": u, "UpdateItem": [{"To_Account": v, "SnsItem": [{"Tag": "Tag_SNS_IM_Remark", "Value": format!("r{n}")}]}]}),
                ),
                4 => (
                    "/v4/group_open_http_svc/add_group_member",
                    json!({"GroupId": g, "MemberList": [{"Member_Account": u}]}),
                ),
                5 => (
                    "/v4/group_open_http_svc/delete_group_member",
                    json!({"GroupId": g, "MemberToDel_Account": [u]}),
                ),
                6 => (
                    "/v4/group_open_http_svc/modify_group_base_info",
                    json!({"GroupId": g, "Name": format!("g{n}")}),
                ),
                7 => (
                    "/v4/group_open_http_svc/modify_group_member_info",
                    json!({"GroupId": g, "Member_Account": u, "NameCard": format!("c{n}")}),
                ),
                8 => (
                    "/v4/group_open_http_svc/send_group_msg",
                    json!({"GroupId": g, "Random": n, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "x"}}]}),
                ),
                9 => (
                    "/v4/im_open_login_svc/account_import",
                    json!({"UserID": rng.pick(&extra), "Nick": format!("new {n}")}),
                ),
                _ => (
                    "/v4/im_open_login_svc/account_delete",
                    json!({"DeleteItem": [{"UserID": rng.pick(&extra)}]}),
                ),
            };
            let w = post(&gw.url(path), body.to_string()).await;
            assert_eq!(w.0, 200, "step {step}: {path}");
            writes += 1;
        }
    }
    assert!(
        reads > 300 && writes > 100,
        "{reads} reads, {writes} writes"
    );
    eprintln!("{reads} reads ({hits} from the cache), {writes} writes");
    assert!(hits > 100, "reads were served from the cache: {hits}");
}
