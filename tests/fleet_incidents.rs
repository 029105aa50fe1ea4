//! The fleet through the incidents every production Redis sees: real gateway
//! processes, real redis-servers (replicas through a proxy that can hold the
//! replication stream, `maxmemory`, `CLIENT PAUSE WRITE`, replies delayed by a proxy,
//! `DEL` standing in for eviction), a fake Chat whose every get_list page carries the
//! number of the call that produced it, so a page from before an invalidation is told
//! from a fresh one. Each test asserts that no read after an acknowledged
//! invalidation is stale, or the latency and 429 figures the fleet promises.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{RedisOpts, RedisServer, TcpProxy};
use common::*;
use common::{page_of as get_list, page_version as version};
use sha2::{Digest, Sha256};

const GET_LIST: &str = "/v4/recentcontact/get_list";
/// The GroupId every fake page lists (see `common::page_for`).
const GROUP: &str = "@TGS#1B2AUI7RZ";
const PREFIX: &str = "chat-gateway:1400000000";
const TOKEN: &str = "tok-incidents";

/// Tests that measure latency or admission run alone; the others share the machine.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A fake Chat: get_list pages carrying a version (the call's number), `OK` for
/// everything else.
fn versioned() -> Responder {
    Box::new(move |r: &Recorded, n| {
        if r.path == GET_LIST {
            let v = r.json();
            let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
            let mut page = page_for(&acc, v["TimeStamp"].as_u64().unwrap_or(0));
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

fn redis_section(url: &str) -> String {
    format!("url = \"{url}\"\ntimeout_ms = 50\n")
}
const DEBUG_LOG: (&str, &str) = (
    "log",
    "level = \"info,chat_gateway::fleet=debug,chat_gateway::server=debug\"",
);

/// `n` gateways on `url`, each with `env`, started together; waits until each sees
/// the others.
async fn fleet_with_env(
    n: usize,
    fake: &FakeChat,
    url: &str,
    extra: &[(&str, &str)],
    env: &[&[(&str, &str)]],
) -> Vec<Gateway> {
    fleet_prepared(n, fake, url, extra, env, |_| {}).await
}

/// Like [`fleet_with_env`], each gateway's command prepared by `prepare` (e.g.
/// [`favoured`]).
async fn fleet_prepared(
    n: usize,
    fake: &FakeChat,
    url: &str,
    extra: &[(&str, &str)],
    env: &[&[(&str, &str)]],
    prepare: fn(&mut std::process::Command),
) -> Vec<Gateway> {
    let redis = redis_section(url);
    let callback = format!("token = \"{TOKEN}\"");
    let mut sections: Vec<(&str, &str)> = vec![
        ("redis", &redis),
        ("cache", "ttl_secs = 60"),
        ("callback", &callback),
    ];
    sections.extend_from_slice(extra);
    let toml = config_toml(&fake.url(), &sections);
    let mut starts = Vec::new();
    for i in 0..n {
        let (toml, env): (String, Vec<(String, String)>) = (
            toml.clone(),
            env.get(i)
                .map(|e| {
                    e.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        );
        starts.push(tokio::spawn(async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Gateway::start_with_env_prepared(&toml, &env, prepare).await
        }));
    }
    let mut gws = Vec::new();
    for s in starts {
        gws.push(s.await.unwrap());
    }
    for gw in &gws {
        wait_metric_within(gw, "chat_gateway_redis_up", 1.0, Duration::from_secs(15)).await;
        wait_metric_within(
            gw,
            "chat_gateway_fleet_gateways",
            n as f64,
            Duration::from_secs(15),
        )
        .await;
    }
    gws
}

async fn fleet_of(n: usize, fake: &FakeChat, url: &str, extra: &[(&str, &str)]) -> Vec<Gateway> {
    fleet_with_env(n, fake, url, extra, &[]).await
}

async fn wait_metric_at_least(gw: &Gateway, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = metrics_text(gw).await;
        if metric(&m, name) >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {want}; metrics:\n{}\nlog:\n{}",
            m.lines()
                .filter(|l| l.contains("redis") || l.contains("fleet") || l.contains("l2"))
                .collect::<Vec<_>>()
                .join("\n"),
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Caches each account on every gateway (memory and L2); returns the version cached.
async fn warm(gws: &[Gateway], accounts: &[String]) -> Vec<u64> {
    let mut versions = Vec::new();
    for a in accounts {
        let v = version(&get_list(&gws[0], a).await);
        for gw in gws {
            let got = get_list(gw, a).await;
            assert_eq!(version(&got), v, "{a}: one page for the fleet");
            let again = get_list(gw, a).await;
            assert_eq!(header(&again, "x-cache"), "HIT");
        }
        versions.push(v);
    }
    versions
}

/// Reads every account on every gateway; returns the stale answers (a version not
/// newer than the one cached before the invalidation), described.
async fn stale_reads(gws: &[Gateway], accounts: &[String], old: &[u64]) -> Vec<String> {
    let mut stale = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        for (a, v) in accounts.iter().zip(old) {
            let got = get_list(gw, a).await;
            if json(&got)["ErrorCode"] != 0 {
                for (i, g) in gws.iter().enumerate() {
                    eprintln!("gateway {} log:\n{}", i + 1, g.log_text());
                }
            }
            assert_eq!(json(&got)["ErrorCode"], 0, "{got:?}");
            eprintln!(
                "read: gateway {} {a}: version {} (cached {v}; x-cache {}, x-cache-l2 {})",
                i + 1,
                version(&got),
                header(&got, "x-cache"),
                header(&got, "x-cache-l2")
            );
            if version(&got) <= *v {
                stale.push(format!(
                    "gateway {} {a}: version {} (x-cache {}, x-cache-l2 {})",
                    i + 1,
                    version(&got),
                    header(&got, "x-cache"),
                    header(&got, "x-cache-l2")
                ));
            }
        }
    }
    stale
}

fn accounts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}_{i}")).collect()
}

async fn invalidate(gw: &Gateway, body: &str) {
    let a = post(&gw.url("/admin/cache/invalidate"), body.to_string()).await;
    assert_eq!(json(&a)["ErrorCode"], 0, "{a:?}");
}

fn sign(t: u64) -> String {
    hex::encode(Sha256::digest(format!("{TOKEN}{t}")))
}

async fn group_webhook(gw: &Gateway) {
    group_webhook_for(gw, GROUP).await;
}

/// `Group.CallbackAfterSendMsg` for `group`, signed, accepted.
async fn group_webhook_for(gw: &Gateway, group: &str) {
    let t = chat_gateway::upstream::signer::unix_now();
    let url = gw.url(&format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&Sign={}&RequestTime={t}",
        sign(t)
    ));
    let body = serde_json::json!({"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":group,"From_Account":"x"});
    let a = post(&url, body.to_string()).await;
    assert_eq!(json(&a)["ErrorCode"], 0, "{a:?}");
}

/// Waits until each of `gws` received `n` more fleet events than `before`.
async fn wait_received(gws: &[Gateway], before: &[f64], n: f64) {
    for (gw, b) in gws.iter().zip(before) {
        wait_metric_at_least(
            gw,
            "chat_gateway_fleet_invalidations_received_total",
            b + n,
            Duration::from_secs(30),
        )
        .await;
    }
}

async fn received(gws: &[Gateway]) -> Vec<f64> {
    let mut out = Vec::new();
    for gw in gws {
        out.push(metric(
            &metrics_text(gw).await,
            "chat_gateway_fleet_invalidations_received_total",
        ));
    }
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// 1. The primary dies while its replica lags (the replication stream held), after the
/// fleet invalidated accounts; the replica is promoted behind the same address. The
/// gateways connect as the ACL user docs/fleet.md gives (the fleet's commands only, no
/// `@dangerous`, so no `INFO`): they still tell
/// the promoted replica from the old primary, raise the fleet-wide generation, drop
/// their memory, and serve nothing stale, although the replica holds the old pages and
/// the old generations.
#[tokio::test]
async fn failover_to_a_lagging_replica_serves_nothing_stale() {
    let _shared = MACHINE.read().await;
    let mut primary = RedisServer::start();
    let replica = RedisServer::start();
    let link = TcpProxy::start(primary.addr());
    replica.replicate(link.addr());
    // The user docs/fleet.md gives: the fleet's keys and commands, nothing from
    // @dangerous (so no INFO, no CONFIG).
    let docs = std::fs::read_to_string("docs/fleet.md").unwrap();
    let acl = docs
        .lines()
        .find_map(|l| l.strip_prefix("ACL SETUSER chat-gateway on >PASSWORD "))
        .expect("docs/fleet.md gives the ACL line");
    let rules: Vec<&str> = acl.split_whitespace().collect();
    assert!(!rules
        .iter()
        .any(|r| *r == "+info" || r.starts_with("+config")));
    for r in [&primary, &replica] {
        r.acl_user("gw", "gw-pw", &rules);
    }
    let front = TcpProxy::start(primary.addr());
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(3, &fake, &front.redis_url(Some("gw:gw-pw")), &[DEBUG_LOG]).await;
    for gw in &gws {
        assert!(
            gw.wait_log("Redis denies INFO", Duration::from_secs(1))
                .await,
            "the denied INFO is said once:\n{}",
            gw.log_text()
        );
    }
    let list = accounts("failover", 10);
    let old = warm(&gws, &list).await;
    // Everything so far is on the replica.
    let acked = primary.command(&["WAIT", "1", "5000"]).unwrap();
    assert_eq!(acked, "1");

    // The replica stops receiving; the fleet invalidates every account.
    link.hold(true);
    let before = received(&gws).await;
    let names: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
    invalidate(
        &gws[0],
        &format!("{{\"From_Account\":[{}]}}", names.join(",")),
    )
    .await;
    wait_received(&gws[1..], &before[1..], 1.0).await;

    // The primary dies; the lagging replica takes over behind the same address.
    primary.kill();
    link.cut();
    replica.promote();
    front.retarget(replica.addr());
    front.cut();
    for gw in &gws {
        assert!(
            gw.wait_log("Redis is back", Duration::from_secs(15)).await,
            "{}",
            gw.log_text()
        );
        wait_metric_within(gw, "chat_gateway_redis_up", 1.0, Duration::from_secs(15)).await;
    }
    let stale = stale_reads(&gws, &list, &old).await;
    assert!(
        stale.is_empty(),
        "stale reads after the failover:\n{}",
        stale.join("\n")
    );
    for gw in &gws {
        let m = metrics_text(gw).await;
        assert!(metric(&m, "chat_gateway_l2_flushes_total{reason=\"restart\"}") >= 1.0);
        assert!(metric(&m, "chat_gateway_fleet_resyncs_total{reason=\"restart\"}") >= 1.0);
        assert_eq!(gw.log_count("lost Redis"), 1, "{}", gw.log_text());
    }
}

/// 2. A group event taken while Redis is full (`maxmemory`, `noeviction`) waits, and
/// lands completely when Redis has room again: every account whose pages list the
/// group is invalidated in memory and in L2 everywhere.
#[tokio::test]
async fn a_group_event_while_redis_is_full_lands_when_there_is_room() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start_with(RedisOpts {
        extra: vec![("maxmemory-policy".into(), "noeviction".into())],
        ..Default::default()
    });
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(3, &fake, &redis.url(), &[]).await;
    let list = accounts("full", 6);
    let old = warm(&gws, &list).await;

    // Redis full: maxmemory below what it holds (noeviction: every write refused).
    let used: u64 = redis
        .command(&["INFO", "memory"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    redis
        .command(&["CONFIG", "SET", "maxmemory", &(used / 2).to_string()])
        .unwrap();
    assert!(redis
        .command(&["SET", "probe", "x"])
        .unwrap()
        .starts_with("OOM"));

    let before = received(&gws).await;
    group_webhook(&gws[0]).await;
    // Redis refuses the event's writes for a while (the gateway retries every 200 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(redis
        .command(&["SET", "probe", "x"])
        .unwrap()
        .starts_with("OOM"));
    // Room again: the event lands, whole.
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]).unwrap();
    wait_received(&gws[1..], &before[1..], 1.0).await;
    let stale = stale_reads(&gws, &list, &old).await;
    assert!(
        stale.is_empty(),
        "stale reads after the group event:\n{}",
        stale.join("\n")
    );
}

/// Each gateway under `cache.group_events = "listing-accounts"`: a group event walks
/// the group's index of accounts in Redis.
const LISTING: &[(&str, &str)] = &[("CHAT_GATEWAY__CACHE__GROUP_EVENTS", "listing-accounts")];

/// 3. A group of 100,000 members (the index holds 100,000 accounts besides the six
/// real ones), under `listing-accounts`: the event reaches every gateway with no
/// stale read, its Redis work is chunked (no command of it runs 5 ms or more), and
/// nothing times out.
#[tokio::test]
async fn a_group_of_100000_members_is_invalidated_in_bounded_steps() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_with_env(3, &fake, &redis.url(), &[], &[LISTING; 3]).await;
    let list = accounts("member", 6);
    let old = warm(&gws, &list).await;

    // 100,000 more accounts in the group's index, indexed a second ago.
    let index = format!("{PREFIX}:{{g:{GROUP}}}:ix");
    let now_ms = chat_gateway::fleet::wall_ms();
    let score = (now_ms - 1000).to_string();
    let cmds: Vec<Vec<String>> = (0..100)
        .map(|c| {
            let mut cmd = vec!["ZADD".to_string(), index.clone()];
            for i in 0..1000 {
                cmd.push(score.clone());
                cmd.push(format!("crowd_{c}_{i}"));
            }
            cmd
        })
        .collect();
    redis.pipeline(&cmds).unwrap();
    assert_eq!(redis.command(&["ZCARD", &index]).unwrap(), "100007");
    redis
        .command(&["CONFIG", "SET", "slowlog-log-slower-than", "5000"])
        .unwrap();
    redis.command(&["SLOWLOG", "RESET"]).unwrap();

    let before = received(&gws).await;
    let calls_before = redis.command_calls().get("evalsha").copied().unwrap_or(0);
    let started = Instant::now();
    group_webhook(&gws[0]).await;
    wait_received(&gws[1..], &before[1..], 1.0).await;
    let took = started.elapsed();
    // Every account was taken off the index (only the marker is left).
    assert_eq!(redis.command(&["ZCARD", &index]).unwrap(), "1");
    let stale = stale_reads(&gws, &list, &old).await;
    assert!(
        stale.is_empty(),
        "stale reads after the group event:\n{}",
        stale.join("\n")
    );
    // No command of the event works for 5 ms: each handles at most
    // chat_gateway::fleet::l2::GROUP_CHUNK accounts (about 1 ms at most on a quiet
    // machine; bench/fleet.sh measures it). A busy machine preempts Redis mid-command
    // now and then: of the event's ~100,000 commands allow 25 to be seen at 5 ms or
    // more, none at 50 ms (one command over the whole index takes longer than that).
    let commands = redis
        .command_calls()
        .get("evalsha")
        .copied()
        .unwrap_or(0)
        .saturating_sub(calls_before);
    let slow = redis.command(&["SLOWLOG", "GET", "1000"]).unwrap();
    let now_s = chat_gateway::fleet::wall_ms() / 1000;
    let lines: Vec<&str> = slow.lines().collect();
    let durations: Vec<u64> = lines
        .windows(2)
        .filter(|w| w[0].parse::<u64>().is_ok_and(|t| t.abs_diff(now_s) < 600))
        .filter_map(|w| w[1].parse().ok())
        .collect();
    assert!(
        durations.len() <= 25 && durations.iter().all(|us| *us < 50_000),
        "Redis commands of 5 ms or more during the event ({durations:?} µs; {commands} scripts):\n{slow}"
    );
    for gw in &gws {
        assert_eq!(gw.log_count("lost Redis"), 0, "{}", gw.log_text());
    }
    eprintln!(
        "100,000-member group event applied everywhere in {took:?}; {commands} scripts run, commands of 5 ms or more: {durations:?}"
    );
}

/// 4a. The fleet-wide generation evicted (`DEL` standing in; the policy is
/// `allkeys-lru`, which the gateways report as unsupported): "invalidate everything"
/// raises it past every value seen instead of counting from 1 again; the heartbeat
/// also notices the missing key and raises it.
#[tokio::test]
async fn an_evicted_fleet_generation_is_raised_not_restarted() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start_with(RedisOpts {
        extra: vec![("maxmemory-policy".into(), "allkeys-lru".into())],
        ..Default::default()
    });
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(3, &fake, &redis.url(), &[]).await;
    for gw in &gws {
        assert!(
            gw.wait_log("maxmemory-policy may evict", Duration::from_secs(1))
                .await
        );
        let m = metrics_text(gw).await;
        assert_eq!(
            metric(&m, "chat_gateway_redis_maxmemory_policy_unsupported"),
            1.0
        );
    }
    let list = accounts("evicted_gen", 10);
    let old = warm(&gws, &list).await;
    let gen_key = format!("{PREFIX}:{{fleet}}:gen");
    let before_gen: u64 = redis.command(&["GET", &gen_key]).unwrap().parse().unwrap();

    let before = received(&gws).await;
    redis.command(&["DEL", &gen_key]).unwrap();
    invalidate(&gws[0], r#"{"All":true}"#).await;
    wait_received(&gws[1..], &before[1..], 1.0).await;
    let stale = stale_reads(&gws, &list, &old).await;
    assert!(
        stale.is_empty(),
        "stale reads after invalidating everything:\n{}",
        stale.join("\n")
    );
    let after_gen: u64 = redis.command(&["GET", &gen_key]).unwrap().parse().unwrap();
    assert!(after_gen > before_gen, "{after_gen} <= {before_gen}");

    // Evicted under a live fleet, with no event: the heartbeat raises it.
    warm(&gws, &list).await;
    redis.command(&["DEL", &gen_key]).unwrap();
    let mut raised = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !raised && Instant::now() < deadline {
        for gw in &gws {
            let m = metrics_text(gw).await;
            raised |= metric(&m, "chat_gateway_l2_flushes_total{reason=\"evicted\"}") >= 1.0;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(raised, "no gateway noticed the missing generation");
    let now_gen: u64 = redis.command(&["GET", &gen_key]).unwrap().parse().unwrap();
    assert!(now_gen > after_gen);
    // Memory was not touched (nothing was invalidated): still the old pages there.
    for gw in &gws {
        assert_eq!(header(&get_list(gw, &list[0]).await, "x-cache"), "HIT");
    }
}

/// 4b. A group's index evicted (`DEL`), under `listing-accounts`: the group event
/// finds it gone before its time, treats it as a loss (the fleet-wide generation
/// raised), and no read is stale.
#[tokio::test]
async fn an_evicted_group_index_is_a_detected_loss() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_with_env(3, &fake, &redis.url(), &[], &[LISTING; 3]).await;
    let list = accounts("evicted_index", 15);
    let old = warm(&gws, &list).await;
    let before = received(&gws).await;
    redis
        .command(&["DEL", &format!("{PREFIX}:{{g:{GROUP}}}:ix")])
        .unwrap();
    group_webhook(&gws[0]).await;
    wait_received(&gws[1..], &before[1..], 1.0).await;
    let stale = stale_reads(&gws, &list, &old).await;
    assert!(
        stale.is_empty(),
        "stale reads after the group event:\n{}",
        stale.join("\n")
    );
    let m = metrics_text(&gws[0]).await;
    assert_eq!(
        metric(&m, "chat_gateway_l2_flushes_total{reason=\"evicted\"}"),
        1.0
    );
}

/// An event the stopped gateway never reads: an account's invalidation, or a group
/// event for a group no cached page lists.
enum Unread {
    Account,
    Group,
}

/// 4c/4d's incident: three gateways with `name`'s accounts warm; gateway 3 stopped
/// (`SIGSTOP`) past one blocking read; `event` taken by gateway 1 and applied by
/// gateway 2; the stream deleted; gateway 3 woken. It must find the gap (the counter
/// past the stream) and resync. Returns the stale reads of the accounts the event
/// changed (the first for an account, all for a group event).
async fn stream_lost_while_stopped(name: &str, event: Unread) -> Vec<String> {
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(3, &fake, &redis.url(), &[]).await;
    let list = accounts(name, 3);
    let old = warm(&gws, &list).await;

    gws[2].signal(libc::SIGSTOP);
    // Longer than one blocking read: the stopped gateway has no read pending.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // (The stopped gateway answers nothing: ask the others only.)
    let before = received(&gws[..2]).await;
    let changed = match event {
        Unread::Account => {
            invalidate(&gws[0], &format!("{{\"From_Account\":\"{}\"}}", list[0])).await;
            1
        }
        Unread::Group => {
            group_webhook_for(&gws[0], "@TGS#listed_nowhere").await;
            list.len()
        }
    };
    wait_received(&gws[1..2], &before[1..2], 1.0).await;
    redis
        .command(&["DEL", &format!("{PREFIX}:{{fleet}}:bus")])
        .unwrap();
    gws[2].signal(libc::SIGCONT);
    wait_metric_at_least(
        &gws[2],
        "chat_gateway_fleet_resyncs_total{reason=\"gap\"}",
        1.0,
        Duration::from_secs(5),
    )
    .await;
    stale_reads(&gws, &list[..changed], &old[..changed]).await
}

/// 4c. The stream deleted while a gateway is stopped (`SIGSTOP`), with an invalidation
/// in it that the gateway never read: on waking it finds the counter past the stream,
/// drops its memory, and serves the account fresh.
#[tokio::test]
async fn a_stream_deleted_while_a_gateway_is_stopped_is_a_detected_gap() {
    let _shared = MACHINE.read().await;
    let stale = stream_lost_while_stopped("deleted_stream", Unread::Account).await;
    assert!(
        stale.is_empty(),
        "stale reads after the stream's loss:\n{}",
        stale.join("\n")
    );
}

/// 4d. The same with a group event (`cache.group_events = "all-pages"`, for a group
/// the cached pages do not list): L2 still holds every page under the conversation
/// pages' old generation, which only the lost entry carried. On waking the gateway
/// learns the generations from Redis before it drops its memory, so it never reads
/// those pages again.
#[tokio::test]
async fn a_group_event_lost_with_the_stream_while_a_gateway_is_stopped_leaves_nothing_stale() {
    let _shared = MACHINE.read().await;
    let stale = stream_lost_while_stopped("deleted_stream_group", Unread::Group).await;
    assert!(
        stale.is_empty(),
        "stale reads after a group event lost with the stream:\n{}",
        stale.join("\n")
    );
}

/// 5. Clock skew: a gateway 120 s ahead and one 30 s behind (their wall clocks as the
/// fleet reads them). Pages one of them stored are fresh for exactly the TTL on every
/// gateway, `age` is true, and a page costs one Chat call whoever fetches it.
#[tokio::test]
async fn skewed_clocks_change_neither_freshness_nor_age() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let ahead: &[(&str, &str)] = &[("CHAT_GATEWAY_TEST_CLOCK_OFFSET_MS", "120000")];
    let behind: &[(&str, &str)] = &[("CHAT_GATEWAY_TEST_CLOCK_OFFSET_MS", "-30000")];
    let gws = fleet_with_env(
        3,
        &fake,
        &redis.url(),
        &[("cache", "ttl_secs = 2\nstale_if_error_secs = 5")],
        &[ahead, behind, &[]],
    )
    .await;

    // Stored by the gateway ahead: fresh on the others, age 0, then expired on time.
    let a = get_list(&gws[0], "skew_a").await;
    let stored = Instant::now();
    for gw in &gws[1..] {
        let b = get_list(gw, "skew_a").await;
        assert_eq!(header(&b, "x-cache-l2"), "HIT");
        assert_eq!(b.2, a.2);
        assert_eq!(header(&b, "age"), "0");
    }
    tokio::time::sleep_until((stored + Duration::from_millis(2300)).into()).await;
    for gw in &gws[1..] {
        let c = get_list(gw, "skew_a").await;
        assert!(version(&c) > version(&a), "served past its TTL: {c:?}");
    }

    // Fetched first by the gateway behind: one Chat call each, and a true age.
    fake.reset();
    let list = accounts("skew_b", 10);
    for acc in &list {
        assert_eq!(header(&get_list(&gws[1], acc).await, "x-cache"), "MISS");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for acc in &list {
        let c = get_list(&gws[2], acc).await;
        assert_eq!(header(&c, "x-cache-l2"), "HIT", "{acc}");
        assert_eq!(header(&c, "age"), "1", "{acc}");
    }
    let calls = fake.calls().iter().filter(|c| c.path == GET_LIST).count();
    assert_eq!(calls, list.len(), "one Chat call per page");
}

/// 6. Redis answers 85 ms late (a proxy delays its replies; `timeout_ms` 100): a memory
/// miss answered from L2 makes one round trip, and so does a miss fetched from Chat
/// (its L2 lookup and its rate-limit lease go together; the L2 store runs after the
/// answer): p99 of each within `timeout_ms` + 60 ms. None is refused or bypasses L2
/// for want of Redis time. The figures set one bounded wait (85 ms, plus what a busy
/// machine adds: p99 108-117 ms from Chat with a CPU hog beside it) and two round
/// trips (never under 170 ms, however idle or busy the machine: the proxy holds each
/// reply 85 ms; 178-189 ms measured) apart by more than scheduling noise on a busy
/// 2-core box crosses; Redis's lateness stays 15 ms inside the timeout.
#[tokio::test]
async fn a_slow_redis_costs_a_miss_at_most_its_budget() {
    let _alone = MACHINE.write().await;
    // Redis, the gateways, and this test's thread (its clock, the fake Chat and the
    // proxy's threads) at a higher priority: 85 ms of a 100 ms budget leaves little
    // for a machine busy with other builds.
    favour_this_thread();
    let redis = RedisServer::start_with(RedisOpts {
        favoured: true,
        ..Default::default()
    });
    let proxy = TcpProxy::start(redis.addr());
    let fake = FakeChat::start(versioned()).await;
    let url = proxy.redis_url(None);
    let timeout = Duration::from_millis(100);
    let late = Duration::from_millis(85);
    let slack = Duration::from_millis(60);
    // The bound stays below the floor of two round trips, so they always fail it.
    assert!(timeout + slack < 2 * late);
    // A permit stays usable 100 ms past its slot (`lease_ms`, 20 by default): a
    // starved box (a CPU hog on one core) delivers a lease's answer 20 ms and more
    // later than the ones before, and a caller past its permit asks Redis again (a
    // second round trip, 230-330 ms with the default). Only the rate limit's window
    // grows by it (these misses come one at a time).
    let redis_conf = format!("timeout_ms = {}\nlease_ms = 100", timeout.as_millis());
    let gws = fleet_prepared(
        2,
        &fake,
        &url,
        &[DEBUG_LOG, ("redis", &redis_conf)],
        &[],
        favoured,
    )
    .await;
    proxy.delay_replies(late);
    // The first lease after Redis slowed down may find its slot past on arrival (its
    // lead was set by the fast round trips before) and ask again: once, not counted.
    let first = get_list(&gws[0], "slow_first").await;
    assert_eq!(header(&first, "x-cache"), "MISS", "{first:?}");
    let (mut from_l2, mut from_chat) = (Vec::new(), Vec::new());
    let list = accounts("slow", 100);
    for acc in &list {
        let t = Instant::now();
        let a = get_list(&gws[0], acc).await;
        from_chat.push(t.elapsed());
        if t.elapsed() > timeout + slack / 2 {
            eprintln!("slow: gateway 1 {acc} {:?} {a:?}", t.elapsed());
        }
        assert_eq!(
            header(&a, "x-cache"),
            "MISS",
            "{a:?}\n{}",
            gws[0].log_text()
        );
    }
    // The stores run after the answers (two round trips for a page listing a group).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut l2_hits = 0;
    for acc in &list {
        let t = Instant::now();
        let b = get_list(&gws[1], acc).await;
        let took = t.elapsed();
        if took > timeout + slack / 2 {
            eprintln!("slow: gateway 2 {acc} {took:?} {b:?}");
        }
        assert_eq!(json(&b)["ErrorCode"], 0, "{b:?}");
        if header(&b, "x-cache-l2") == "HIT" {
            l2_hits += 1;
            from_l2.push(took);
        } else {
            from_chat.push(took);
        }
    }
    assert!(l2_hits >= 70, "only {l2_hits} of 100 answered from L2");
    let (l2_p99, chat_p99) = (pct(&mut from_l2, 0.99), pct(&mut from_chat, 0.99));
    let report = format!(
        "Redis {late:?} late, timeout {timeout:?}: misses from L2 p50 {:?} p99 {l2_p99:?} max {:?}; from Chat p50 {:?} p99 {chat_p99:?} max {:?}",
        pct(&mut from_l2, 0.5),
        pct(&mut from_l2, 1.0),
        pct(&mut from_chat, 0.5),
        pct(&mut from_chat, 1.0),
    );
    eprintln!("{report}");
    let logs = || format!("{}\n---\n{}", gws[0].log_text(), gws[1].log_text());
    assert!(l2_p99 <= timeout + slack, "{report}\n{}", logs());
    // One round trip (the lookup and the lease together): two one after the other
    // would take 170 ms or more. A lease asked again (a caller woken past its permit)
    // is the rare exception, not the 99th percentile.
    assert!(chat_p99 <= timeout + slack, "{report}\n{}", logs());
}

/// 7. `CLIENT PAUSE 3000 WRITE` under 45 misses a second (N = 200): no caller gets a
/// 429, and each gateway logs the loss and the recovery once.
#[tokio::test]
async fn paused_writes_are_not_an_outage() {
    let _alone = MACHINE.write().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = Arc::new(fleet_of(3, &fake, &redis.url(), &[]).await);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for g in 0..3usize {
        let gws = gws.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut next = started + Duration::from_millis(22 * g as u64);
            let mut i = 0;
            while next < started + Duration::from_millis(4500) {
                tokio::time::sleep_until(next.into()).await;
                let a = get_list(&gws[g], &format!("paused_{g}_{i}")).await;
                answers.push((a.0, json(&a)["ErrorCode"].as_i64().unwrap_or(-1)));
                if a.0 != 200 {
                    eprintln!(
                        "{:?} {:?} {}",
                        started.elapsed(),
                        a.0,
                        String::from_utf8_lossy(&a.2)
                    );
                }
                i += 1;
                next += Duration::from_millis(1000 / 15);
            }
            answers
        }));
    }
    tokio::time::sleep_until((started + Duration::from_millis(1000)).into()).await;
    assert_eq!(
        redis
            .command(&["CLIENT", "PAUSE", "3000", "WRITE"])
            .unwrap(),
        "OK"
    );
    let mut total = 0;
    let mut refused = 0;
    for t in tasks {
        for (status, code) in t.await.unwrap() {
            total += 1;
            if status == 429 || code != 0 {
                refused += 1;
            }
        }
    }
    assert!(total >= 190, "{total} requests");
    for gw in gws.iter() {
        assert!(
            gw.wait_log("Redis is back", Duration::from_secs(10)).await,
            "{}",
            gw.log_text()
        );
    }
    for gw in gws.iter() {
        let lines = gw.log_count("lost Redis") + gw.log_count("Redis is back");
        assert!(
            lines <= 2,
            "{lines} loss/recovery lines:\n{}",
            gw.log_text()
        );
    }
    let logs: Vec<String> = gws.iter().map(|g| g.log_text()).collect();
    assert_eq!(
        refused,
        0,
        "{refused} of {total} refused\n{}",
        logs.join("\n---\n")
    );
}

/// 8. L2 keeps at most `cache.max_pages_per_account` pages of an account, like memory.
#[tokio::test]
async fn an_accounts_l2_pages_are_capped() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(
        1,
        &fake,
        &redis.url(),
        &[("cache", "max_pages_per_account = 4")],
    )
    .await;
    for ts in 0..40 {
        let a = post(
            &gws[0].url(GET_LIST),
            format!(r#"{{"From_Account":"many","TimeStamp":{ts}}}"#),
        )
        .await;
        assert_eq!(header(&a, "x-cache"), "MISS");
    }
    let pages = redis.keys(&format!("{PREFIX}:{{a:many}}:p:*"));
    assert!(
        (1..=4).contains(&pages.len()),
        "{} pages in L2: {pages:?}",
        pages.len()
    );
    let index = redis
        .command(&["ZCARD", &format!("{PREFIX}:{{a:many}}:ix")])
        .unwrap();
    assert!(index.parse::<u64>().unwrap() <= 4, "{index}");
    // The newest pages are the ones kept.
    let newest = post(
        &gws[0].url(GET_LIST),
        r#"{"From_Account":"many","TimeStamp":39}"#.to_string(),
    )
    .await;
    assert_eq!(header(&newest, "x-cache"), "HIT");
}

/// 9. A page invalidated again and again but never read again is gone from Redis after
/// its TTL + stale window, and so is everything else of its account soon after.
#[tokio::test]
async fn a_page_invalidated_repeatedly_is_gone_after_its_life() {
    let _shared = MACHINE.read().await;
    let redis = RedisServer::start();
    let fake = FakeChat::start(versioned()).await;
    let gws = fleet_of(
        2,
        &fake,
        &redis.url(),
        &[("cache", "ttl_secs = 1\nstale_if_error_secs = 1")],
    )
    .await;
    get_list(&gws[0], "ghost").await;
    let stored = Instant::now();
    let pattern = format!("{PREFIX}:{{a:ghost}}:*");
    assert!(!redis.keys(&format!("{PREFIX}:{{a:ghost}}:p:*")).is_empty());
    let mut i = 0;
    while stored.elapsed() < Duration::from_millis(2500) {
        invalidate(&gws[i % 2], r#"{"From_Account":"ghost"}"#).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // TTL + stale window = 2 s, plus slack for Redis's expiry cycle.
    tokio::time::sleep_until((stored + Duration::from_millis(2600)).into()).await;
    let pages = redis.keys(&format!("{PREFIX}:{{a:ghost}}:p:*"));
    assert!(pages.is_empty(), "pages past their life: {pages:?}");
    // The generation and the index go with the lock's life at the latest.
    let deadline = stored + Duration::from_secs(6);
    while !redis.keys(&pattern).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in Redis: {:?}",
            redis.keys(&pattern)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
