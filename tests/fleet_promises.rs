//! Fleet promises that need a fault Redis survives with its data, or two fleets on one
//! Redis: real gateway processes, a real redis-server (behind a TCP proxy where one
//! gateway must lose it alone), a fake Chat that records every call.
//!
//! - an invalidation taken while Redis is unreachable is queued and reaches the rest
//!   of the fleet when Redis is back, without anyone dropping its cache;
//! - `redis.key_prefix` makes separate fleets on one Redis: no shared page, no shared
//!   invalidation, no shared rate limit, every key under its prefix;
//! - Chat's throttling pauses the command for the whole fleet.

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisServer, TcpProxy};
use common::*;
use common::{page_of as get_list, page_version as version};

const GET_LIST: &str = "/v4/recentcontact/get_list";
const ONLINE: &str = "/v4/openim/query_online_status";

/// One test at a time: each runs several gateways and a Redis.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// get_list pages carrying the call's number as their version; `OK` for the rest.
fn versioned() -> Responder {
    Box::new(|r: &Recorded, n| {
        if r.path == GET_LIST {
            let acc = r.json()["From_Account"].as_str().unwrap_or("?").to_string();
            let mut page = page_for(&acc, 0);
            page["Version"] = serde_json::json!(n);
            Reply::Json(page, Duration::ZERO)
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}),
                Duration::ZERO,
            )
        }
    })
}

fn gateway_toml(fake: &FakeChat, redis_url: &str, prefix: &str) -> String {
    let redis = format!("url = \"{redis_url}\"\ntimeout_ms = 50\nkey_prefix = \"{prefix}\"\n");
    config_toml(
        &fake.url(),
        &[("redis", &redis), ("cache", "ttl_secs = 60")],
    )
}

/// Caches `account` in every gateway's memory; returns the version cached.
async fn warm(gws: &[&Gateway], account: &str) -> u64 {
    let v = version(&get_list(gws[0], account).await);
    for gw in gws {
        let mut a = get_list(gw, account).await;
        if header(&a, "x-cache") != "HIT" {
            a = get_list(gw, account).await;
        }
        assert_eq!(header(&a, "x-cache"), "HIT", "{:?}", a.2);
        assert_eq!(version(&a), v);
    }
    v
}

/// Waits until `gw` answers `account` with a page newer than `old` (at most 10 s).
async fn wait_fresh(gw: &Gateway, account: &str, old: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if version(&get_list(gw, account).await) > old {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn resyncs(m: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("chat_gateway_fleet_resyncs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One gateway loses Redis (its connections held, then cut, while Redis and the
/// others carry on, data intact) and takes an invalidation meanwhile: it applies it at
/// once, queues it, and publishes it when Redis is back, so the others answer fresh
/// without dropping their caches (no resync on them). Were the queue dropped, they
/// would serve the old page until its TTL (60 s).
#[tokio::test]
async fn an_invalidation_taken_without_redis_reaches_the_fleet_when_it_returns() {
    let _alone = MACHINE.lock().await;
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.addr());
    let fake = FakeChat::start(versioned()).await;
    let a = Gateway::start(&gateway_toml(&fake, &proxy.redis_url(None), "chat-gateway")).await;
    let b = Gateway::start(&gateway_toml(&fake, &redis.url(), "chat-gateway")).await;
    let c = Gateway::start(&gateway_toml(&fake, &redis.url(), "chat-gateway")).await;
    for gw in [&a, &b, &c] {
        wait_metric_within(gw, "chat_gateway_redis_up", 1.0, Duration::from_secs(15)).await;
        wait_metric_within(
            gw,
            "chat_gateway_fleet_gateways",
            3.0,
            Duration::from_secs(15),
        )
        .await;
    }
    let old = warm(&[&a, &b, &c], "queued").await;
    let kept = warm(&[&a, &b, &c], "kept").await;

    proxy.hold(true);
    proxy.cut();
    assert!(
        a.wait_log("lost Redis", Duration::from_secs(15)).await,
        "{}",
        a.log_text()
    );
    let inv = post(
        &a.url("/admin/cache/invalidate"),
        r#"{"From_Account":"queued"}"#,
    )
    .await;
    assert_eq!(inv.0, 200, "{:?}", inv.2);
    assert_eq!(json(&inv)["ErrorCode"], 0);
    // The gateway that took it applied it at once: no longer a hit (its refetch may
    // wait for the rate limit's share without Redis, or be refused meanwhile).
    let after = get_list(&a, "queued").await;
    assert_ne!(header(&after, "x-cache"), "HIT", "{:?}", after.2);
    let (rb, rc) = (
        resyncs(&metrics_text(&b).await),
        resyncs(&metrics_text(&c).await),
    );

    proxy.hold(false);
    assert!(
        a.wait_log("Redis is back", Duration::from_secs(15)).await,
        "{}",
        a.log_text()
    );
    for (name, gw) in [("b", &b), ("c", &c)] {
        assert!(
            wait_fresh(gw, "queued", old).await,
            "gateway {name} still serves the page invalidated during the outage"
        );
    }
    assert_eq!(
        resyncs(&metrics_text(&b).await),
        rb,
        "b did not drop its cache"
    );
    assert_eq!(
        resyncs(&metrics_text(&c).await),
        rc,
        "c did not drop its cache"
    );
    // The others kept the rest of their memory: another account is still a hit.
    for gw in [&b, &c] {
        let k = get_list(gw, "kept").await;
        assert_eq!(header(&k, "x-cache"), "HIT", "{:?}", k.2);
        assert_eq!(version(&k), kept);
    }
}

/// `redis.key_prefix` separates fleets on one Redis: each sees only its own gateways,
/// pages, invalidations and rate limit, and every key carries its prefix.
#[tokio::test]
async fn key_prefixes_make_separate_fleets_on_one_redis() {
    let _alone = MACHINE.lock().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let one = [
        Gateway::start(&gateway_toml(&fake, &redis.url(), "fleet-one")).await,
        Gateway::start(&gateway_toml(&fake, &redis.url(), "fleet-one")).await,
    ];
    let two = Gateway::start(&gateway_toml(&fake, &redis.url(), "fleet-two")).await;
    for gw in one.iter() {
        wait_metric_within(
            gw,
            "chat_gateway_fleet_gateways",
            2.0,
            Duration::from_secs(15),
        )
        .await;
    }
    wait_metric_within(
        &two,
        "chat_gateway_fleet_gateways",
        1.0,
        Duration::from_secs(15),
    )
    .await;

    // A page fetched by fleet one is in its L2, not in fleet two's.
    let first = get_list(&one[0], "shared").await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    let l2 = get_list(&one[1], "shared").await;
    assert_eq!(header(&l2, "x-cache-l2"), "HIT", "{:?}", l2.2);
    let other = get_list(&two, "shared").await;
    assert_eq!(header(&other, "x-cache"), "MISS");
    assert_ne!(header(&other, "x-cache-l2"), "HIT", "another fleet's page");
    assert_eq!(fake.count(), 2, "each fleet called Chat once");
    let theirs = version(&other);

    // An invalidation in fleet one stays there.
    let old = version(&first);
    post(
        &one[0].url("/admin/cache/invalidate"),
        r#"{"From_Account":"shared"}"#,
    )
    .await;
    assert!(wait_fresh(&one[1], "shared", old).await);
    let still = get_list(&two, "shared").await;
    assert_eq!(header(&still, "x-cache"), "HIT");
    assert_eq!(version(&still), theirs);
    let m = metrics_text(&one[1]).await;
    assert!(metric(&m, "chat_gateway_invalidations_total{source=\"fleet\"}") >= 1.0);
    let m = metrics_text(&two).await;
    assert_eq!(
        metric(&m, "chat_gateway_invalidations_total{source=\"fleet\"}"),
        0.0,
        "fleet two received nothing"
    );

    // Every key is under one of the two prefixes.
    let keys = redis.keys("*");
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(
            k.starts_with("fleet-one:") || k.starts_with("fleet-two:"),
            "a key outside the prefixes: {k}"
        );
    }
    assert!(keys.iter().any(|k| k.starts_with("fleet-two:")));
}

/// Chat's 70050 ("paused for a minute") answered to one gateway pauses the command on
/// every gateway: the next call of it through another gateway is refused (429 with
/// the pause's retry-after) without reaching Chat, while other commands go on; a 1 s
/// throttling code holds every gateway's calls of the command for the second.
#[tokio::test]
async fn chat_throttling_pauses_the_command_for_the_whole_fleet() {
    let _alone = MACHINE.lock().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(Box::new(|_, n| {
        if n == 1 {
            Reply::Json(chat_error(70050), Duration::ZERO)
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}),
                Duration::ZERO,
            )
        }
    }))
    .await;
    let a = Gateway::start(&gateway_toml(&fake, &redis.url(), "chat-gateway")).await;
    let b = Gateway::start(&gateway_toml(&fake, &redis.url(), "chat-gateway")).await;
    for gw in [&a, &b] {
        wait_metric_within(
            gw,
            "chat_gateway_fleet_gateways",
            2.0,
            Duration::from_secs(15),
        )
        .await;
    }
    let body = r#"{"To_Account":["x"]}"#;
    assert_eq!(json(&post(&a.url(ONLINE), body).await)["ErrorCode"], 70050);
    let refused = post(&b.url(ONLINE), body).await;
    assert_eq!(refused.0, 429, "{:?}", refused.2);
    assert_eq!(json(&refused)["ErrorCode"], 60007);
    let after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((50..=61).contains(&after), "retry-after {after}");
    assert_eq!(fake.count(), 1, "the paused command did not reach Chat");
    assert_eq!(
        json(
            &post(
                &b.url("/v4/recentcontact/get_contact_group"),
                r#"{"From_Account":"x"}"#
            )
            .await
        )["ErrorCode"],
        0,
        "other commands go on"
    );

    // A 1 s code: calls of the command through either gateway wait out the second.
    fake.reset();
    fake.set_responder(Box::new(|_, n| {
        if n == 1 {
            Reply::Json(chat_error(60018), Duration::ZERO)
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}),
                Duration::ZERO,
            )
        }
    }));
    let cmd = "/v4/recentcontact/get_contact_group";
    let a_url = a.url(cmd);
    let throttled = tokio::spawn(async move { post(&a_url, r#"{"From_Account":"y"}"#).await });
    // Once Chat has throttled a's call, b asks for the same command.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.count() == 0 {
        assert!(Instant::now() < deadline, "a's call never reached Chat");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // ...once the pause has landed in the fleet's log (a's answer is handled after
    // Chat recorded the call).
    let log = chat_gateway::fleet::keys::Keys::new("chat-gateway", SDKAPPID)
        .limiter("recentcontact/get_contact_group");
    while redis
        .command(&["ZSCORE", &log, "pause"])
        .map_or(true, |v| v.is_empty() || v == "(nil)")
    {
        assert!(Instant::now() < deadline, "the pause never reached Redis");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let from_b = post(&b.url(cmd), r#"{"From_Account":"z"}"#).await;
    let code = json(&from_b)["ErrorCode"].as_i64();
    assert!(
        code == Some(0) || code == Some(60007),
        "b waited for the pause or was refused: {:?}",
        from_b.2
    );
    let throttled = throttled.await.unwrap();
    assert_eq!(
        json(&throttled)["ErrorCode"],
        0,
        "a's read retried after the pause"
    );
    let calls = fake.calls();
    assert!(calls.len() >= 2);
    for later in &calls[1..] {
        let gap = later.at.duration_since(calls[0].at);
        assert!(
            gap >= Duration::from_millis(950),
            "a call {gap:?} after Chat paused the command"
        );
    }
}
