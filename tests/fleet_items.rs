//! The cached reads other than get_list in a fleet: three real gateway processes on
//! one real redis-server, in front of the fake Chat world (`tests/common/world.rs`):
//! item entries shared through L2 (one gateway's fetch answers the others without a
//! call to Chat), one fetch per item across the fleet, typed invalidations that drop
//! exactly what changed everywhere (writes, webhooks, the admin endpoint, with the
//! new entity forms), the L2 entries' bounds in Redis (their life, the cap per slot,
//! one hash tag per script), and "everything" emptying L2.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::world::{self, World};
use common::*;
use serde_json::{json, Value};

const PORTRAIT: &str = "/v4/profile/portrait_get";
const GROUP_INFO: &str = "/v4/group_open_http_svc/get_group_info";
const FRIEND_LIST: &str = "/v4/sns/friend_get_list";
const JOINED: &str = "/v4/group_open_http_svc/get_joined_group_list";

fn portrait(accounts: &[&str]) -> String {
    json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick"]}).to_string()
}

struct Fleet {
    redis: RedisServer,
    fake: FakeChat,
    world: Arc<Mutex<World>>,
    gws: Vec<Gateway>,
}

async fn fleet(extra: &[(&str, &str)]) -> Fleet {
    let redis = RedisServer::start();
    let (fake, world) = world::start().await;
    let section = format!("url = \"{}\"\ntimeout_ms = 250\n", redis.url());
    let mut sections: Vec<(&str, &str)> = vec![("redis", &section)];
    sections.extend_from_slice(extra);
    let toml = config_toml(&fake.url(), &sections);
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&toml).await);
    }
    for gw in &gws {
        wait_metric(gw, "chat_gateway_redis_up", 1.0).await;
        wait_metric(gw, "chat_gateway_fleet_gateways", 3.0).await;
    }
    Fleet {
        redis,
        fake,
        world,
        gws,
    }
}

fn calls_to(fake: &FakeChat, path: &str) -> Vec<Value> {
    fake.calls()
        .into_iter()
        .filter(|c| c.path == path)
        .map(|c| c.json())
        .collect()
}

/// An entry one gateway fetched answers the others from L2 (no call to Chat), per
/// item: a request naming cached and new items asks Chat only for the new ones,
/// wherever they were cached.
#[tokio::test]
async fn item_entries_are_shared_through_l2() {
    let f = fleet(&[]).await;
    let (a, b, c) = (&f.gws[0], &f.gws[1], &f.gws[2]);
    let first = post(&a.url(PORTRAIT), portrait(&["u1", "u2"])).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    f.fake.reset();
    // b has nothing in memory: both items from L2.
    let from_l2 = post(&b.url(PORTRAIT), portrait(&["u1", "u2"])).await;
    assert_eq!(header(&from_l2, "x-cache"), "MISS");
    assert_eq!(header(&from_l2, "x-cache-l2"), "HIT");
    assert_eq!(json(&from_l2), json(&first));
    assert_eq!(f.fake.count(), 0, "no call to Chat");
    // ... and now from its memory.
    let again = post(&b.url(PORTRAIT), portrait(&["u1", "u2"])).await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    // c: u2 from L2, u3 from Chat (only u3 is named), in the request's order.
    let mixed = post(&c.url(PORTRAIT), portrait(&["u3", "u2"])).await;
    assert_eq!(header(&mixed, "x-cache"), "MISS");
    assert_eq!(header(&mixed, "x-cache-l2"), "");
    let calls = calls_to(&f.fake, PORTRAIT);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["To_Account"], json!(["u3"]));
    assert_eq!(
        json(&mixed),
        world::direct(&f.world, PORTRAIT, &portrait(&["u3", "u2"]))
    );
    let m = metrics_text(c).await;
    let items = |source: &str| {
        metric(
            &m,
            &format!("chat_gateway_item_cache_items_total{{command=\"profile/portrait_get\",source=\"{source}\"}}"),
        )
    };
    assert_eq!((items("l2"), items("chat")), (1.0, 1.0));
    // A group's info, and a friend list (which carries its owner's generation).
    let gi = json!({"GroupIdList": ["@team"]}).to_string();
    let fl =
        json!({"From_Account": "kim", "To_Account": ["kim_f1"], "TagList": ["Tag_SNS_IM_Remark"]})
            .to_string();
    for (path, body) in [(GROUP_INFO, &gi), (FRIEND_LIST, &fl)] {
        post(&a.url(path), body.clone()).await;
        f.fake.reset();
        let x = post(&b.url(path), body.clone()).await;
        assert_eq!(header(&x, "x-cache-l2"), "HIT", "{path}");
        assert_eq!(f.fake.count(), 0, "{path}");
    }
    // get_joined_group_list depends on every group it lists: memory only.
    let j = json!({"Member_Account": "team_m1"}).to_string();
    post(&a.url(JOINED), j.clone()).await;
    f.fake.reset();
    let x = post(&b.url(JOINED), j).await;
    assert_eq!(header(&x, "x-cache"), "MISS");
    assert_eq!(f.fake.count(), 1);
}

/// Concurrent misses of the same items on three gateways make one call per item to
/// Chat: the first gateway takes each item's lock, the others wait for its entries.
#[tokio::test]
async fn concurrent_misses_make_one_fetch_per_item_across_the_fleet() {
    let f = fleet(&[]).await;
    f.world.lock().unwrap().read_delay = Duration::from_millis(300);
    let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let body = portrait(&refs);
    let mut tasks = Vec::new();
    for (k, gw) in f.gws.iter().enumerate() {
        for _ in 0..3 {
            let (url, body) = (gw.url(PORTRAIT), body.clone());
            tasks.push(tokio::spawn(async move {
                // The first gateway goes first; the others find its locks.
                tokio::time::sleep(Duration::from_millis(if k == 0 { 0 } else { 60 })).await;
                post(&url, body).await
            }));
        }
    }
    let want = world::direct(&f.world, PORTRAIT, &body);
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(json(&a), want);
    }
    let named: usize = calls_to(&f.fake, PORTRAIT)
        .iter()
        .map(|c| c["To_Account"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        named,
        10,
        "each item fetched once: {:?}",
        calls_to(&f.fake, PORTRAIT)
    );
    let served: f64 = {
        let mut s = 0.0;
        for gw in &f.gws[1..] {
            s += metric(
                &metrics_text(gw).await,
                "chat_gateway_fleet_coalesced_waits_total{outcome=\"served\"}",
            );
        }
        s
    };
    assert!(
        served >= 1.0,
        "the others waited for the first one's entries"
    );
}

/// Writes, webhooks and admin invalidations drop exactly what they changed on every
/// gateway, and are answered once the others have applied them: the next read on
/// any gateway is fresh. Entries of other entities stay cached everywhere.
#[tokio::test]
async fn typed_invalidations_reach_every_gateway_before_the_answer() {
    let f = fleet(&[]).await;
    let body = portrait(&["p1", "p2"]);
    let gi = json!({"GroupIdList": ["@team", "@other"]}).to_string();
    for gw in &f.gws {
        post(&gw.url(PORTRAIT), body.clone()).await;
        post(&gw.url(GROUP_INFO), gi.clone()).await;
        assert_eq!(
            header(&post(&gw.url(PORTRAIT), body.clone()).await, "x-cache"),
            "HIT"
        );
    }
    // A write through gateway 0: every gateway asks Chat for p1 (only) at once.
    let w = post(
        &f.gws[0].url("/v4/profile/portrait_set"),
        json!({"From_Account": "p1", "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": "new"}]})
            .to_string(),
    )
    .await;
    assert_eq!(json(&w)["ErrorCode"], 0);
    for gw in &f.gws[1..] {
        f.fake.reset();
        let a = post(&gw.url(PORTRAIT), body.clone()).await;
        assert_eq!(header(&a, "x-cache"), "PARTIAL");
        assert_eq!(json(&a), world::direct(&f.world, PORTRAIT, &body));
        let calls = calls_to(&f.fake, PORTRAIT);
        assert!(
            calls.len() <= 1 && f.fake.count() <= 1,
            "p1 only, from L2 or from Chat: {calls:?}"
        );
        // Group info was not touched: still a hit.
        assert_eq!(
            header(&post(&gw.url(GROUP_INFO), gi.clone()).await, "x-cache"),
            "HIT"
        );
    }
    // The admin endpoint, new forms: a profile, and a group event.
    for gw in &f.gws {
        post(&gw.url(PORTRAIT), body.clone()).await;
    }
    let d = post(
        &f.gws[1].url("/admin/cache/invalidate"),
        json!({"Profile": ["p2"], "GroupId": "@team"}).to_string(),
    )
    .await;
    assert_eq!(json(&d)["ErrorCode"], 0, "{:?}", json(&d));
    for gw in [&f.gws[0], &f.gws[2]] {
        f.fake.reset();
        assert_eq!(
            header(&post(&gw.url(PORTRAIT), body.clone()).await, "x-cache"),
            "PARTIAL"
        );
        let g = post(&gw.url(GROUP_INFO), gi.clone()).await;
        assert_eq!(header(&g, "x-cache"), "PARTIAL", "@team only");
    }
    // The old form still works: every entity of the account.
    let d = post(
        &f.gws[2].url("/admin/cache/invalidate"),
        json!({"From_Account": "p1"}).to_string(),
    )
    .await;
    assert_eq!(json(&d)["ErrorCode"], 0);
    f.fake.reset();
    let a = post(&f.gws[0].url(PORTRAIT), body.clone()).await;
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    // Every wait ended with every gateway having applied it.
    for gw in &f.gws {
        let m = metrics_text(gw).await;
        assert_eq!(
            metric(
                &m,
                "chat_gateway_fleet_invalidation_waits_total{outcome=\"timeout\"}"
            ),
            0.0
        );
    }
    let m = metrics_text(&f.gws[1]).await;
    assert!(
        metric(
            &m,
            "chat_gateway_fleet_invalidation_waits_total{outcome=\"applied\"}"
        ) >= 1.0
    );
}

/// In Redis an item entry lives at most its TTL + stale window, a slot keeps at most
/// `cache.max_pages_per_account` entries, and an invalidation raises a generation
/// (never lowers one); "every entity of a kind" empties L2 (the fleet-wide
/// generation).
#[tokio::test]
async fn l2_entries_are_bounded_and_generations_only_move_forward() {
    let f = fleet(&[
        ("cache", "max_pages_per_account = 4"),
        (
            "cache.commands.\"profile/portrait_get\"",
            "ttl_secs = 2\nstale_if_error_secs = 3",
        ),
    ])
    .await;
    let gw = &f.gws[0];
    // Ten variants (TagLists) of one account's portrait.
    for i in 0..10 {
        let b = json!({"To_Account": ["capped"], "TagList": [format!("Tag_Profile_Custom_T{i}")]})
            .to_string();
        post(&gw.url(PORTRAIT), b).await;
    }
    let keys = |pattern: &str| f.redis.keys(pattern);
    // The stores run after the answers: wait for the last.
    let deadline = Instant::now() + Duration::from_secs(5);
    while keys("*{a:capped}:i:*").is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let entries = keys("*{a:capped}:i:*");
    assert!(entries.len() <= 4, "{entries:?}");
    let index = keys("*{a:capped}:iix");
    assert_eq!(index.len(), 1);
    assert!(
        f.redis
            .command(&["ZCARD", &index[0]])
            .unwrap()
            .parse::<u64>()
            .unwrap()
            <= 4
    );
    for k in &entries {
        let ttl: i64 = f.redis.command(&["PTTL", k]).unwrap().parse().unwrap();
        assert!(ttl > 0 && ttl <= 5000, "{k}: {ttl}");
    }
    // Every key of the account's entries shares its hash tag.
    for k in keys("*capped*") {
        assert!(k.contains("{a:capped}"), "{k}");
    }
    // A profile invalidation raises the profile's generation.
    let gen_key = keys("*{a:capped}:g:Profile");
    assert_eq!(gen_key.len(), 1);
    let before: u64 = f
        .redis
        .command(&["GET", &gen_key[0]])
        .unwrap()
        .parse()
        .unwrap();
    post(
        &gw.url("/admin/cache/invalidate"),
        json!({"Profile": "capped"}).to_string(),
    )
    .await;
    let after: u64 = f
        .redis
        .command(&["GET", &gen_key[0]])
        .unwrap()
        .parse()
        .unwrap();
    assert!(after > before);
    let b0 = json!({"To_Account": ["capped"], "TagList": ["Tag_Profile_Custom_T0"]}).to_string();
    post(&gw.url(PORTRAIT), b0.clone()).await;
    // "every entity of a kind" (account_delete): L2 is emptied (fleet-wide
    // generation) and every gateway's memory drops the kind.
    let fleet_gen_key = keys("*{fleet}:gen");
    let g0: u64 = f
        .redis
        .command(&["GET", &fleet_gen_key[0]])
        .unwrap()
        .parse()
        .unwrap();
    post(
        &f.gws[1].url("/v4/im_open_login_svc/account_delete"),
        json!({"DeleteItem": [{"UserID": "someone"}]}).to_string(),
    )
    .await;
    let g1: u64 = f
        .redis
        .command(&["GET", &fleet_gen_key[0]])
        .unwrap()
        .parse()
        .unwrap();
    assert!(g1 > g0, "{g0} -> {g1}");
    f.fake.reset();
    let a = post(&f.gws[2].url(PORTRAIT), b0).await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(header(&a, "x-cache-l2"), "", "nothing from before in L2");
    assert_eq!(f.fake.count(), 1);
    // Entries expire with their TTL + stale window (5 s here).
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert!(
        keys("*{a:capped}:i:*").is_empty(),
        "{:?}",
        keys("*{a:capped}:i:*")
    );
}
