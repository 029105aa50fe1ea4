//! The fleet on a real Redis Cluster (3 masters, 3 replicas) and on a real Sentinel
//! set (a primary, a replica, 3 sentinels), with a password and TLS on every
//! connection: the rate limit, invalidations everywhere, L2 and fleet coalescing; then
//! under load, a reshard of the slots in use (`SETSLOT MIGRATING/IMPORTING` +
//! `MIGRATE`) and a failover (`CLUSTER FAILOVER`, `SENTINEL FAILOVER`): no stale read,
//! never over N at Chat, no request waiting on Redis more than `redis.timeout_ms`
//! (plus slack for a busy machine).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::topology::{RedisCluster, SentinelSet, TopologyOpts};
use common::*;
use common::{page_of as get_list, page_version as version};
use sha2::{Digest, Sha256};

const GET_LIST: &str = "/v4/recentcontact/get_list";
const SENDMSG: &str = "/v4/openim/sendmsg";
/// The GroupId every fake page lists (see `common::page_for`).
const GROUP: &str = "@TGS#1B2AUI7RZ";
const TOKEN: &str = "tok-topology";
/// The rate limit of sendmsg, the command the load saturates.
const N: usize = 40;
/// `redis.timeout_ms` (twice the default: every connection is TLS, on a 2-core
/// machine shared with six redis-servers and three gateways).
const TIMEOUT_MS: u64 = 100;
/// `ratelimit.max_wait_ms`.
const MAX_WAIT_MS: u64 = 3000;
const PORTRAIT: &str = "/v4/profile/portrait_get";
/// What a busy 2-core machine may add to a request (scheduling, the fake Chat, HTTP).
const SLACK: Duration = Duration::from_millis(400);

/// Both tests run many processes: one at a time.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// get_list pages carrying a version (the call's number), `OK` for everything else.
fn versioned() -> Responder {
    Box::new(move |r: &Recorded, n| {
        if r.path == GET_LIST {
            let v = r.json();
            let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
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

fn toml_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

async fn fleet(n: usize, fake: &FakeChat, redis: &str) -> Vec<Gateway> {
    let limits = format!(
        "per_command_per_sec = 200\nmax_wait_ms = {MAX_WAIT_MS}\n\n[ratelimit.commands]\n\"openim/sendmsg\" = {N}\n"
    );
    let toml = config_toml(
        &fake.url(),
        &[
            ("redis", redis),
            ("cache", "ttl_secs = 60"),
            ("callback", &format!("token = \"{TOKEN}\"")),
            ("ratelimit", &limits),
            ("chat", "request_timeout_ms = 5000"),
        ],
    );
    let mut gws = Vec::new();
    for _ in 0..n {
        gws.push(Gateway::start(&toml).await);
    }
    for gw in &gws {
        wait_metric_within(gw, "chat_gateway_redis_up", 1.0, Duration::from_secs(20)).await;
    }
    for gw in &gws {
        wait_metric_within(
            gw,
            "chat_gateway_fleet_gateways",
            n as f64,
            Duration::from_secs(20),
        )
        .await;
    }
    gws
}

fn calls_to(fake: &FakeChat, path: &str) -> Vec<Instant> {
    fake.calls()
        .iter()
        .filter(|c| c.path == path)
        .map(|c| c.at)
        .collect()
}

async fn group_webhook(gw: &Gateway) {
    let t = chat_gateway::upstream::signer::unix_now();
    let sign = hex::encode(Sha256::digest(format!("{TOKEN}{t}")));
    let url = gw.url(&format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&Sign={sign}&RequestTime={t}"
    ));
    let body = serde_json::json!({"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":GROUP,"From_Account":"x"});
    let a = post(&url, body.to_string()).await;
    assert_eq!(json(&a)["ErrorCode"], 0, "{a:?}");
}

/// Caches `account` in every gateway's memory (a gateway may hold a newer page than
/// another's: one fetched after an invalidation); returns the newest version cached.
async fn warm(gws: &[Gateway], account: &str) -> u64 {
    let mut newest = 0;
    for gw in gws {
        let a = get_list(gw, account).await;
        assert_eq!(json(&a)["ErrorCode"], 0, "{a:?}");
        let b = get_list(gw, account).await;
        assert_eq!(header(&b, "x-cache"), "HIT", "{account}: {b:?}");
        newest = newest.max(version(&b));
    }
    newest
}

/// After an invalidation of `account` (cached at `old`): every gateway serves a newer
/// page within `within`.
async fn wait_fresh(gws: &[Gateway], account: &str, old: u64, within: Duration, what: &str) {
    let t0 = Instant::now();
    for (i, gw) in gws.iter().enumerate() {
        loop {
            let a = get_list(gw, account).await;
            if version(&a) > old {
                break;
            }
            assert!(
                t0.elapsed() < within,
                "{what}: gateway {} still serves version {} (x-cache {}, x-cache-l2 {}) after {:?}",
                i + 1,
                version(&a),
                header(&a, "x-cache"),
                header(&a, "x-cache-l2"),
                t0.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The fleet behaviours of tests/fleet.rs, on whatever Redis `gws` share.
async fn fleet_behaviours(gws: &[Gateway], fake: &FakeChat) {
    // L2: a page one gateway fetched serves the others.
    let a = get_list(&gws[0], "alice").await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    for gw in &gws[1..] {
        let b = get_list(gw, "alice").await;
        assert_eq!(b.2, a.2, "the same page, byte for byte");
        assert_eq!(header(&b, "x-cache-l2"), "HIT", "served from L2: {b:?}");
    }
    assert_eq!(calls_to(fake, GET_LIST).len(), 1, "one upstream call");

    // Item entries: a portrait_get of 20 accounts (20 hash tags, so 20 slots on a
    // cluster) fetched by one gateway is served to the others from L2, byte for byte.
    fake.reset();
    fake.set_responder(Box::new(|r: &Recorded, n| {
        if r.path == PORTRAIT {
            let items: Vec<serde_json::Value> = r.json()["To_Account"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    serde_json::json!({"To_Account": u, "ResultCode": 0, "ResultInfo": "",
                        "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": format!("{}-{n}", u.as_str().unwrap_or(""))}]})
                })
                .collect();
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":"","UserProfileItem": items}),
                Duration::ZERO,
            )
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}),
                Duration::ZERO,
            )
        }
    }));
    let accounts: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
    let body =
        serde_json::json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick"]}).to_string();
    let first = post(&gws[0].url(PORTRAIT), body.clone()).await;
    assert_eq!(json(&first)["ErrorCode"], 0, "{first:?}");
    assert_eq!(header(&first, "x-cache"), "MISS");
    for gw in &gws[1..] {
        let b = post(&gw.url(PORTRAIT), body.clone()).await;
        assert_eq!(json(&b), json(&first), "the same answer");
        assert_eq!(header(&b, "x-cache-l2"), "HIT", "items from L2: {b:?}");
    }
    assert_eq!(calls_to(fake, PORTRAIT).len(), 1, "one upstream call");
    fake.set_responder(versioned());

    // Fleet coalescing: concurrent cold misses on every gateway, one call.
    fake.reset();
    fake.set_responder(Box::new(|r: &Recorded, n| {
        let mut page = page_for("cold", 0);
        page["Version"] = serde_json::json!(n);
        if r.path == GET_LIST {
            Reply::Json(page, Duration::from_millis(200))
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0}),
                Duration::ZERO,
            )
        }
    }));
    let gws_urls: Vec<String> = gws.iter().map(|g| g.url(GET_LIST)).collect();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = gws_urls[i % gws_urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            post(&url, r#"{"From_Account":"cold"}"#).await
        }));
    }
    for t in tasks {
        assert_eq!(json(&t.await.unwrap())["ErrorCode"], 0);
    }
    assert_eq!(
        calls_to(fake, GET_LIST).len(),
        1,
        "60 concurrent cold requests over the fleet, one upstream call"
    );
    fake.set_responder(versioned());

    // Invalidations everywhere: the admin endpoint, a write through, a group event
    // (its index is in the group's slot, its registry in the fleet's).
    let v = warm(gws, "u_admin").await;
    let a = post(
        &gws[0].url("/admin/cache/invalidate"),
        r#"{"From_Account":"u_admin"}"#,
    )
    .await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    wait_fresh(gws, "u_admin", v, Duration::from_millis(500), "admin").await;
    let v = warm(gws, "u_send").await;
    let a = post(
        &gws[1].url(SENDMSG),
        r#"{"From_Account":"x","To_Account":"u_send","MsgRandom":1,"MsgBody":[]}"#,
    )
    .await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    wait_fresh(gws, "u_send", v, Duration::from_millis(500), "sendmsg").await;
    let v = warm(gws, "u_group").await;
    group_webhook(&gws[2]).await;
    wait_fresh(gws, "u_group", v, Duration::from_millis(500), "group event").await;
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Reads older than the page the same gateway served after the invalidation.
    stale: Vec<String>,
    /// Reads answered without Chat (memory or L2) that took longer than the bound.
    slow: Vec<String>,
    reads: usize,
    rounds: usize,
}

/// Runs until `stop`: sendmsg as fast as `senders` callers go (saturating N at
/// Chat), and rounds of "read everywhere, invalidate on one gateway, read
/// everywhere again" over `accounts`, recording stale and slow reads.
async fn load(
    gws: Arc<Vec<Gateway>>,
    accounts: Vec<String>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut senders = Vec::new();
    for i in 0..12 {
        let (gws, stop) = (gws.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(
                    r#"{{"From_Account":"x","To_Account":"load_{i}_{k}","MsgRandom":{k},"MsgBody":[]}}"#
                );
                let _ = post(&gws[i % gws.len()].url(SENDMSG), body).await;
                k += 1;
            }
        }));
    }
    let bound = Duration::from_millis(TIMEOUT_MS) + SLACK;
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        let account = &accounts[round % accounts.len()];
        // What each gateway serves now (memory, L2 or Chat).
        let mut last = Vec::new();
        for (i, gw) in gws.iter().enumerate() {
            let t = Instant::now();
            let a = get_list(gw, account).await;
            let took = t.elapsed();
            assert_eq!(json(&a)["ErrorCode"], 0, "{a:?}");
            let chat = header(&a, "x-cache") != "HIT" && header(&a, "x-cache-l2") != "HIT";
            // An answer from Chat also waited for its rate-limit slot: the lease is a
            // round trip of its own (under its own timeout_ms), and after a failover
            // the limiter counts the window as full, so a call may queue for a slot
            // up to ratelimit.max_wait_ms (the limiter's promise, not Redis's wait).
            let limit = if chat {
                bound + Duration::from_millis(TIMEOUT_MS + MAX_WAIT_MS)
            } else {
                bound
            };
            if took > limit {
                seen.lock().unwrap().slow.push(format!(
                    "gateway {} {account}: {took:?} (x-cache {}, x-cache-l2 {})",
                    i + 1,
                    header(&a, "x-cache"),
                    header(&a, "x-cache-l2")
                ));
            }
            last.push(version(&a));
        }
        let newest = *last.iter().max().unwrap_or(&0);
        let by = round % gws.len();
        let a = post(
            &gws[by].url("/admin/cache/invalidate"),
            format!(r#"{{"From_Account":"{account}"}}"#),
        )
        .await;
        assert_eq!(json(&a)["ErrorCode"], 0);
        // The gateway that took the invalidation reads fresh at once; the others
        // within the bus's lag (generous: a failover may be under way); after that,
        // nobody serves the old page again.
        let t0 = Instant::now();
        for (i, gw) in gws.iter().enumerate() {
            loop {
                let a = get_list(gw, account).await;
                seen.lock().unwrap().reads += 1;
                let v = version(&a);
                if v > newest {
                    break;
                }
                if i == by || t0.elapsed() > Duration::from_secs(3) {
                    seen.lock().unwrap().stale.push(format!(
                        "round {round}: gateway {} {account}: version {v} <= {newest} after {:?} (x-cache {}, x-cache-l2 {}){}",
                        i + 1,
                        t0.elapsed(),
                        header(&a, "x-cache"),
                        header(&a, "x-cache-l2"),
                        if i == by { " on the gateway that invalidated" } else { "" }
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for (i, gw) in gws.iter().enumerate() {
            let a = get_list(gw, account).await;
            seen.lock().unwrap().reads += 1;
            if version(&a) <= newest {
                seen.lock().unwrap().stale.push(format!(
                    "round {round}: gateway {} {account} went back to version {}",
                    i + 1,
                    version(&a)
                ));
            }
        }
        round += 1;
        seen.lock().unwrap().rounds = round;
    }
    for s in senders {
        let _ = s.await;
    }
}

/// The most instants in any one-second window.
fn max_per_second(mut times: Vec<Instant>) -> usize {
    times.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] >= times[j] + Duration::from_secs(1) {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// Starts the load, runs `chaos` (blocking work: the Redis admin commands), stops the
/// load a little after, and checks what the load saw.
/// Waits until gateway `i` has dropped its memory for a restart or failover (its
/// invalidation reader notices the new session when its blocking read returns: on a
/// busy machine that may be after the load stopped).
async fn resynced_after_restart(gw: &Gateway, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics_text(gw).await;
        if metric(&m, "chat_gateway_fleet_resyncs_total{reason=\"restart\"}") >= 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway {} never resynced:\n{}",
            i + 1,
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn under_load(
    gws: &Arc<Vec<Gateway>>,
    fake: &FakeChat,
    accounts: &[String],
    what: &str,
    chaos: impl FnOnce() + Send + 'static,
) {
    for a in accounts {
        warm(gws, a).await;
    }
    // (Not fake.reset(): the versions must keep counting up.)
    let since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    let runner = tokio::spawn(load(
        gws.clone(),
        accounts.to_vec(),
        stop.clone(),
        seen.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(chaos).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    runner.await.unwrap();
    let seen = seen.lock().unwrap();
    let sends: Vec<Instant> = calls_to(fake, SENDMSG)
        .into_iter()
        .filter(|t| *t >= since)
        .collect();
    let most = max_per_second(sends.clone());
    eprintln!(
        "{what}: {} rounds, {} reads, {} sendmsg at Chat in {:?}, at most {most} in one second",
        seen.rounds,
        seen.reads,
        sends.len(),
        started.elapsed()
    );
    assert!(
        seen.stale.is_empty(),
        "{what}: stale reads:\n{}",
        seen.stale.join("\n")
    );
    assert!(
        most <= N,
        "{what}: Chat saw {most} sendmsg in one second (N = {N})"
    );
    assert!(
        sends.len() as f64 >= 0.5 * N as f64,
        "{what}: the load saturated the limit ({} calls)",
        sends.len()
    );
    assert!(
        seen.slow.is_empty(),
        "{what}: requests that waited on Redis more than timeout_ms + {SLACK:?}:\n{}",
        seen.slow.join("\n")
    );
    assert!(
        seen.rounds >= 3,
        "{what}: the load ran ({} rounds)",
        seen.rounds
    );
}

/// The key tags of the fleet's keys that the load touches.
fn tags_in_use(accounts: &[String]) -> Vec<String> {
    let mut tags = vec![
        "{fleet}".to_string(),
        "{rl:openim/sendmsg}".to_string(),
        "{rl:recentcontact/get_list}".to_string(),
    ];
    tags.extend(accounts.iter().map(|a| format!("{{a:{a}}}")));
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_fleet_keeps_its_promises_through_a_reshard_and_a_failover() {
    let _alone = MACHINE.lock().await;
    let cluster = Arc::new(RedisCluster::start(
        3,
        1,
        TopologyOpts {
            password: Some("cluster-pw".into()),
            tls: true,
        },
    ));
    let fake = FakeChat::start(versioned()).await;
    let redis = format!(
        "mode = \"cluster\"\nurl = \"{}\"\nurls = {}\nca_file = \"{}\"\ntimeout_ms = {TIMEOUT_MS}\n",
        cluster.url(0),
        toml_list(&[cluster.url(1), cluster.url(2)]),
        cluster.ca_file().unwrap().display()
    );
    let gws = fleet(3, &fake, &redis).await;
    let ops_before = cluster.command_calls();
    fleet_behaviours(&gws, &fake).await;
    assert!(cluster.command_calls() > ops_before);
    // The fleet's keys are spread over the masters, by hash tag.
    let mut owners = std::collections::BTreeSet::new();
    for t in tags_in_use(&[
        "alice".into(),
        "u_admin".into(),
        "u_send".into(),
        "u_group".into(),
    ]) {
        owners.insert(cluster.owner_of(cluster.slot_of(&t)));
    }
    assert!(owners.len() >= 2, "keys on {owners:?}");

    let gws = Arc::new(gws);
    let accounts: Vec<String> = (0..6).map(|i| format!("busy_{i}")).collect();

    // A reshard of every slot the load uses, a key at a time.
    let c = cluster.clone();
    let tags = tags_in_use(&accounts);
    under_load(&gws, &fake, &accounts, "slot migration", move || {
        let mut moved = 0;
        for t in &tags {
            let slot = c.slot_of(t);
            let to = (c.owner_of(slot) + 1) % c.masters;
            moved += c.migrate_slot(slot, to, 1, Duration::from_millis(10));
        }
        assert!(moved >= tags.len(), "{moved} keys moved");
        c.wait_ok();
    })
    .await;
    for (i, gw) in gws.iter().enumerate() {
        assert_eq!(
            gw.log_count("lost Redis"),
            0,
            "gateway {}: a reshard is not a lost Redis:\n{}",
            i + 1,
            gw.log_text()
        );
    }

    // A failover of the master holding the fleet-wide keys, and of one holding an
    // account in use.
    let c = cluster.clone();
    let fleet_owner = cluster.owner_of(cluster.slot_of("{fleet}"));
    let other = accounts
        .iter()
        .map(|a| format!("{{a:{a}}}"))
        .find(|t| cluster.owner_of(cluster.slot_of(t)) != fleet_owner)
        .expect("an account on another master");
    let tags = vec!["{fleet}".to_string(), other];
    under_load(&gws, &fake, &accounts, "cluster failover", move || {
        for t in &tags {
            let slot = c.slot_of(t);
            let replica = c.replica_of_owner(slot);
            c.failover(replica);
        }
    })
    .await;
    // Each gateway saw the slot owners change: the fleet-wide generation raised and
    // its memory dropped, as after any failover.
    for (i, gw) in gws.iter().enumerate() {
        resynced_after_restart(gw, i).await;
        assert!(gw.log_text().contains("Redis topology changed"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_fleet_keeps_its_promises_through_a_failover() {
    let _alone = MACHINE.lock().await;
    let set = Arc::new(SentinelSet::start(TopologyOpts {
        password: Some("primary-pw".into()),
        tls: true,
    }));
    let fake = FakeChat::start(versioned()).await;
    let redis = format!(
        "mode = \"sentinel\"\nurl = \"{}\"\nsentinels = {}\nmaster_name = \"{}\"\nca_file = \"{}\"\ntimeout_ms = {TIMEOUT_MS}\n",
        set.primary_url(),
        toml_list(&set.sentinel_urls()),
        set.master_name,
        set.ca_file().unwrap().display()
    );
    let gws = fleet(3, &fake, &redis).await;
    fleet_behaviours(&gws, &fake).await;
    // Everything went to the primary the sentinels name.
    assert!(!set.primary.keys("chat-gateway:*").is_empty());

    let gws = Arc::new(gws);
    let accounts: Vec<String> = (0..6).map(|i| format!("busy_{i}")).collect();
    let s = set.clone();
    under_load(&gws, &fake, &accounts, "sentinel failover", move || {
        s.failover();
    })
    .await;
    for (i, gw) in gws.iter().enumerate() {
        resynced_after_restart(gw, i).await;
        assert_eq!(
            metric(&metrics_text(gw).await, "chat_gateway_redis_up"),
            1.0
        );
    }
    // The fleet now writes to the new primary.
    let before = set.replica.command_calls().values().sum::<u64>();
    let a = post(
        &gws[0].url("/admin/cache/invalidate"),
        r#"{"From_Account":"after"}"#,
    )
    .await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(set.replica.command_calls().values().sum::<u64>() > before);
}
