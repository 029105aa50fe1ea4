//! Freshness across the fleet, against the emulator: three real gateway processes on
//! one real redis-server.
//!
//! - Read-your-writes through any gateway: a randomized run of 2,000 operations,
//!   reads of every cached command through any gateway and the writes that change
//!   them through any gateway; every read answers what the emulator answers at that
//!   moment (after every acknowledged write): 0 stale answers.
//! - Changes made "from a client" (the emulator changes its data and sends the
//!   webhook to one gateway): every gateway serves the new data soon after; the
//!   delay from the change to each gateway's first fresh answer is printed (p50,
//!   p99, max; run with `--nocapture`). The assertion is the behaviour (every
//!   gateway becomes fresh), with a generous bound; the figure is reported.

mod common;

use std::time::{Duration, Instant};

use chat_gateway::emulator::{self, EmulatorConfig, EmulatorHandle};
use common::raw;
use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};

const PORTRAIT: &str = "/v4/profile/portrait_get";
const GROUP_INFO: &str = "/v4/group_open_http_svc/get_group_info";
const CHECK: &str = "/v4/im_open_login_svc/account_check";
const GET_LIST: &str = "/v4/recentcontact/get_list";

/// The two tests run one after the other: the delays measured by the second are the
/// gateways', not those of six gateways sharing the machine's two cores.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

    fn some(&mut self, v: &[String], n: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        while out.len() < n {
            let x = self.pick(v).clone();
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    }
}

/// The emulator, with Chat's rate limit off (the runs make many calls).
async fn emulator_unlimited() -> EmulatorHandle {
    let cfg = EmulatorConfig {
        faults: emulator::FaultSettings {
            rate_limit: 0,
            ..Default::default()
        },
        ..EmulatorConfig::default()
    };
    emulator::spawn(cfg).await.unwrap()
}

/// The emulator (Chat's rate limit off: the run makes many calls), a redis-server
/// and three gateways on it.
async fn fleet() -> (EmulatorHandle, RedisServer, Vec<Gateway>) {
    let emu = emulator_unlimited().await;
    let redis = RedisServer::start();
    let secret = emu.config().secret_key.clone();
    // A generous Redis time on a busy 2-core machine: a write waits at most this for
    // the other gateways to apply it.
    let section = format!("url = \"{}\"\ntimeout_ms = 500\n", redis.url());
    let toml = config_toml_with(
        &emu.base_url(),
        &secret,
        &[
            ("redis", &section),
            ("ratelimit", "per_command_per_sec = 100000"),
        ],
    );
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&toml).await);
    }
    for gw in &gws {
        wait_metric(gw, "chat_gateway_redis_up", 1.0).await;
        wait_metric(gw, "chat_gateway_fleet_gateways", 3.0).await;
    }
    (emu, redis, gws)
}

async fn groups(emu: &EmulatorHandle, n: usize) -> Vec<String> {
    let listed: Value = serde_json::from_slice(
        &get(&format!("{}/__emulator/groups", emu.base_url()))
            .await
            .unwrap()
            .2,
    )
    .unwrap();
    listed["Groups"]
        .as_array()
        .unwrap()
        .iter()
        .take(n)
        .map(|g| g["GroupId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_across_the_fleet_randomized() {
    let _alone = MACHINE.lock().await;
    let (emu, _redis, gws) = fleet().await;
    let pool: Vec<String> = (1..=8).map(|i| format!("user_{i:04}")).collect();
    let extra: Vec<String> = (0..4).map(|i| format!("newbie_{i}")).collect();
    let everyone: Vec<String> = pool.iter().chain(&extra).cloned().collect();
    let groups = groups(&emu, 6).await;
    // Everyone in the pool befriends everyone: friend updates then change something.
    for (i, u) in pool.iter().enumerate() {
        let to: Vec<Value> = pool[i + 1..]
            .iter()
            .map(|v| json!({"To_Account": v, "AddSource": "AddSource_Type_Web"}))
            .collect();
        if !to.is_empty() {
            let body = json!({"From_Account": u, "ForceAddFlags": 1, "AddFriendItem": to});
            assert_eq!(
                post(&gws[i % 3].url("/v4/sns/friend_add"), body.to_string())
                    .await
                    .0,
                200
            );
        }
    }
    let mut rng = Rng(0x5eed_f1ee_7000_0018);
    // A fixed set of reads of every cached command, asked again and again through
    // any gateway (so most are cached, here or in L2, when a write comes).
    let mut read_set: Vec<(&str, Value)> = Vec::new();
    for k in 0..48 {
        read_set.push(match k % 8 {
            0 => (
                PORTRAIT,
                json!({"To_Account": rng.some(&everyone, 4), "TagList": ["Tag_Profile_IM_Nick", "Tag_Profile_Custom_Level"]}),
            ),
            1 => (GROUP_INFO, json!({ "GroupIdList": rng.some(&groups, 3) })),
            2 => {
                let items: Vec<Value> = rng
                    .some(&everyone, 4)
                    .into_iter()
                    .map(|u| json!({ "UserID": u }))
                    .collect();
                (CHECK, json!({ "CheckItem": items }))
            }
            3 => (
                "/v4/sns/friend_get_list",
                json!({"From_Account": rng.pick(&pool), "To_Account": rng.some(&pool, 4),
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
            6 => (
                "/v4/group_open_http_svc/get_group_member_info",
                json!({ "GroupId": rng.pick(&groups) }),
            ),
            _ => (
                GET_LIST,
                json!({"From_Account": rng.pick(&pool), "TimeStamp": 0, "StartIndex": 0,
                       "TopTimeStamp": 0, "TopStartIndex": 0, "AssistFlags": 15}),
            ),
        });
    }
    let (mut reads, mut writes) = (0usize, 0usize);
    let (mut from_memory, mut from_l2) = (0usize, 0usize);
    for step in 0..2000 {
        let gw = &gws[rng.below(3)];
        if rng.below(100) < 75 {
            let (path, body) = rng.pick(&read_set).clone();
            let a = post(&gw.url(path), body.to_string()).await;
            let now = direct(&emu, path, &body.to_string()).await;
            let (got, want) = (sans_request_id(json(&a)), sans_request_id(now));
            assert!(
                got == want,
                "step {step}: {path} {body} through {} answered {} (stale):\n got {:.600}\nwant {:.600}",
                gw.addr,
                header(&a, "x-cache"),
                got.to_string(),
                want.to_string()
            );
            reads += 1;
            from_memory += usize::from(header(&a, "x-cache") == "HIT");
            from_l2 += usize::from(header(&a, "x-cache-l2") == "HIT");
        } else {
            let u = rng.pick(&pool).clone();
            let v = rng.pick(&pool).clone();
            let g = rng.pick(&groups).clone();
            let n = rng.next() % 1000;
            let (path, body) = match rng.below(13) {
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
                    "/v4/openim/sendmsg",
                    json!({"From_Account": u, "To_Account": v, "MsgRandom": n, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
                ),
                10 => (
                    "/v4/im_open_login_svc/account_import",
                    json!({"UserID": rng.pick(&extra), "Nick": format!("new {n}")}),
                ),
                11 => (
                    "/v4/im_open_login_svc/account_delete",
                    json!({"DeleteItem": [{"UserID": rng.pick(&extra)}]}),
                ),
                _ => (
                    "/v4/recentcontact/delete",
                    json!({"From_Account": u, "Type": 1, "To_Account": v}),
                ),
            };
            let w = post(&gw.url(path), body.to_string()).await;
            assert_eq!(w.0, 200, "step {step}: {path}");
            writes += 1;
        }
    }
    let mut timeouts = 0.0;
    for gw in &gws {
        timeouts += metric(
            &metrics_text(gw).await,
            "chat_gateway_fleet_invalidation_waits_total{outcome=\"timeout\"}",
        );
    }
    eprintln!(
        "{reads} reads ({from_memory} from memory, {from_l2} from L2, 0 stale), {writes} writes through 3 gateways; {timeouts} waits for the fleet timed out"
    );
    assert!(
        reads > 1200 && writes > 300,
        "{reads} reads, {writes} writes"
    );
    assert!(
        from_memory > 200,
        "reads were served from memory: {from_memory}"
    );
    assert!(from_l2 > 20, "reads were served from L2: {from_l2}");
}

/// p-th percentile of sorted durations.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_a_client_reach_every_gateway() {
    let _alone = MACHINE.lock().await;
    let (emu, _redis, gws) = fleet().await;
    // Chat's webhooks go to one gateway (as through a Service in front of them all).
    let set = format!("{}/__emulator/callback", emu.base_url());
    let hook = gws[0].url("/callback");
    assert_eq!(post(&set, json!({ "url": hook }).to_string()).await.0, 200);
    let accounts: Vec<String> = (1..=5).map(|i| format!("user_{:04}", 100 + i)).collect();
    let read = |u: &str| json!({"To_Account": [u], "TagList": ["Tag_Profile_IM_Nick"]}).to_string();
    let mut delays: Vec<Duration> = Vec::new();
    for round in 0..40 {
        let u = &accounts[round % accounts.len()];
        // Cached everywhere.
        for gw in &gws {
            post(&gw.url(PORTRAIT), read(u)).await;
            assert_eq!(
                header(&post(&gw.url(PORTRAIT), read(u)).await, "x-cache"),
                "HIT"
            );
        }
        let nick = format!("from the phone {round}");
        let client = format!(
            "{}/__emulator/client/profile/portrait_set?as={u}&platform=iOS",
            emu.base_url()
        );
        let started = Instant::now();
        let c = post(
            &client,
            json!({"From_Account": u, "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": nick}]})
                .to_string(),
        )
        .await;
        assert_eq!(c.0, 200, "{:?}", c.2);
        let mut waits = Vec::new();
        for gw in &gws {
            // One keep-alive connection per gateway, asking every millisecond.
            let (addr, body, nick) = (gw.addr, read(u), nick.clone());
            let ask = format!(
                "POST {PORTRAIT} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            waits.push(tokio::spawn(async move {
                let mut c = raw::RawConn::connect(addr).await;
                loop {
                    c.send(ask.as_bytes()).await.unwrap();
                    let a = c.response(Duration::from_secs(10)).await.unwrap();
                    if a.json()["UserProfileItem"][0]["ProfileItem"][0]["Value"] == nick.as_str() {
                        return started.elapsed();
                    }
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "{addr} never served the change; its last answer: {} x-cache {} {}",
                        a.status,
                        a.header("x-cache"),
                        String::from_utf8_lossy(&a.body)
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        let mut row = Vec::new();
        for w in waits {
            let d = match w.await {
                Ok(d) => d,
                Err(e) => {
                    for gw in &gws {
                        eprintln!("--- {} log:\n{}", gw.addr, gw.log_text());
                    }
                    panic!("round {round} ({u}): {e}");
                }
            };
            row.push(d.as_secs_f64() * 1000.0);
            delays.push(d);
        }
        if std::env::var("SHOW_EACH").is_ok() {
            eprintln!("round {round}: {row:.1?} ms");
        }
    }
    delays.sort();
    eprintln!(
        "a change from a client, to each gateway's first fresh answer ({} samples, 3 gateways): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delays.len(),
        pct(&delays, 0.5).as_secs_f64() * 1000.0,
        pct(&delays, 0.99).as_secs_f64() * 1000.0,
        delays.last().unwrap().as_secs_f64() * 1000.0
    );
    let applied = metric(
        &metrics_text(&gws[0]).await,
        "chat_gateway_callbacks_total{outcome=\"applied\"}",
    );
    assert!(applied >= 40.0, "{applied}");
}

/// A first get_list page, as the tests ask it.
fn first_page(account: &str) -> String {
    json!({"From_Account": account, "TimeStamp": 0, "StartIndex": 0,
           "TopTimeStamp": 0, "TopStartIndex": 0, "AssistFlags": 15})
    .to_string()
}

/// The GroupIds a get_list answer lists.
fn listed_groups(page: &Value) -> Vec<String> {
    page["SessionItem"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["GroupId"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A heavy account of the emulator's world and two groups it is a member of that its
/// first page does not list (its conversations with them are further down).
async fn unlisting_member(emu: &EmulatorHandle) -> (String, String, String) {
    let world: Value = serde_json::from_slice(
        &get(&format!("{}/__emulator/world", emu.base_url()))
            .await
            .unwrap()
            .2,
    )
    .unwrap();
    for m in world["heavy_accounts"].as_array().unwrap() {
        let m = m.as_str().unwrap();
        let page = direct(emu, GET_LIST, &first_page(m)).await;
        let on_page = listed_groups(&page);
        let dump: Value = serde_json::from_slice(
            &get(&format!("{}/__emulator/accounts/{m}", emu.base_url()))
                .await
                .unwrap()
                .2,
        )
        .unwrap();
        let below: Vec<String> = listed_groups(&dump)
            .into_iter()
            .filter(|g| !on_page.contains(g))
            .collect();
        if below.len() >= 2 {
            return (m.to_string(), below[0].clone(), below[1].clone());
        }
    }
    panic!("no heavy account is in two groups below its first page");
}

/// `m`'s first page, read twice through `gw`: the second read is a memory hit.
async fn cached_first_page(gw: &Gateway, m: &str) -> Value {
    post(&gw.url(GET_LIST), first_page(m)).await;
    let a = post(&gw.url(GET_LIST), first_page(m)).await;
    assert_eq!(header(&a, "x-cache"), "HIT", "{m}'s first page is cached");
    json(&a)
}

fn group_msg(g: &str, random: u32) -> String {
    json!({"GroupId": g, "Random": random,
           "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "to every member"}}]})
    .to_string()
}

/// A group message changes every member's conversation list, and neither the write
/// nor its webhook names the members. A member whose cached first page does not list
/// the group (its conversation is further down): after a group message through one
/// gateway, and after one sent "from a client" and announced by webhook to another,
/// every gateway serves that member's first page as the emulator answers it (with the
/// group now on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_reaches_members_whose_cached_pages_do_not_list_the_group() {
    let _alone = MACHINE.lock().await;
    let (emu, _redis, gws) = fleet().await;
    let (m, g1, g2) = unlisting_member(&emu).await;
    let set = format!("{}/__emulator/callback", emu.base_url());
    let hook = gws[1].url("/callback");
    assert_eq!(post(&set, json!({ "url": hook }).to_string()).await.0, 200);

    // Through a gateway: answered once every gateway has applied it.
    for gw in &gws {
        assert!(!listed_groups(&cached_first_page(gw, &m).await).contains(&g1));
    }
    let w = post(
        &gws[0].url("/v4/group_open_http_svc/send_group_msg"),
        group_msg(&g1, 7),
    )
    .await;
    assert_eq!(json(&w)["ErrorCode"], 0, "{:?}", w.2);
    let want = sans_request_id(direct(&emu, GET_LIST, &first_page(&m)).await);
    assert!(
        listed_groups(&want).contains(&g1),
        "the message moved {g1} onto {m}'s first page"
    );
    for gw in &gws {
        let got = sans_request_id(json(&post(&gw.url(GET_LIST), first_page(&m)).await));
        assert!(
            got == want,
            "{} served {m}'s old first page after a message to {g1}:\n got {:.400}\nwant {:.400}",
            gw.addr,
            got.to_string(),
            want.to_string()
        );
    }

    // From a client, announced by Group.CallbackAfterSendMsg to one gateway.
    for gw in &gws {
        assert!(!listed_groups(&cached_first_page(gw, &m).await).contains(&g2));
    }
    let client = format!(
        "{}/__emulator/client/group_open_http_svc/send_group_msg?as={m}",
        emu.base_url()
    );
    let c = post(&client, group_msg(&g2, 8)).await;
    assert_eq!(c.0, 200, "{:?}", c.2);
    let want = sans_request_id(direct(&emu, GET_LIST, &first_page(&m)).await);
    assert!(listed_groups(&want).contains(&g2));
    // Within 5 s (the TTL is 10 s: a fresh answer before then is the webhook's doing).
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = sans_request_id(json(&post(&gw.url(GET_LIST), first_page(&m)).await));
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} still serves {m}'s old first page 5 s after a message to {g2} from a client:\n got {:.400}",
                gw.addr,
                got.to_string()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// `cache.group_events = "listing-accounts"` keeps the pages of accounts that do not
/// list the group: a member whose cached first page does not list it is served that
/// page after a group message, until its TTL (the trade-off of that scope). The key
/// is reloaded live: back to `all-pages`, the next group message reaches the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_accounts_scope_keeps_an_unlisting_members_page_and_reloads_live() {
    let _alone = MACHINE.lock().await;
    let emu = emulator_unlimited().await;
    let (m, g1, g2) = unlisting_member(&emu).await;
    let secret = emu.config().secret_key.clone();
    let toml = config_toml_with(
        &emu.base_url(),
        &secret,
        &[(
            "cache",
            "ttl_secs = 60\ngroup_events = \"listing-accounts\"",
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &toml).unwrap();
    let gw = Gateway::start_file(dir, path.clone(), &[]).await;

    let before = cached_first_page(&gw, &m).await;
    let w = post(
        &gw.url("/v4/group_open_http_svc/send_group_msg"),
        group_msg(&g1, 7),
    )
    .await;
    assert_eq!(json(&w)["ErrorCode"], 0, "{:?}", w.2);
    let a = post(&gw.url(GET_LIST), first_page(&m)).await;
    assert_eq!(header(&a, "x-cache"), "HIT", "the old page stays");
    assert_eq!(json(&a), before);
    let now = direct(&emu, GET_LIST, &first_page(&m)).await;
    assert!(listed_groups(&now).contains(&g1) && !listed_groups(&before).contains(&g1));

    std::fs::write(&path, toml.replace("listing-accounts", "all-pages")).unwrap();
    assert!(
        gw.wait_log("listing-accounts -> all-pages", Duration::from_secs(5))
            .await,
        "reloaded: {}",
        gw.log_text()
    );
    post(
        &gw.url("/admin/cache/invalidate"),
        json!({"From_Account": m}).to_string(),
    )
    .await;
    let before = cached_first_page(&gw, &m).await;
    assert!(!listed_groups(&before).contains(&g2));
    post(
        &gw.url("/v4/group_open_http_svc/send_group_msg"),
        group_msg(&g2, 8),
    )
    .await;
    let a = post(&gw.url(GET_LIST), first_page(&m)).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(
        sans_request_id(json(&a)),
        sans_request_id(direct(&emu, GET_LIST, &first_page(&m)).await)
    );
    assert!(listed_groups(&json(&a)).contains(&g2));
}
