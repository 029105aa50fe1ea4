//! Fleet benchmarks (ignored in `cargo test`; run by `bench/fleet.sh`, which builds
//! in release and runs them one at a time). Each prints one `BENCH` line per figure.
//! They start a real redis-server, real gateway processes and a fake Chat, like the
//! integration tests in `tests/fleet.rs`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::redis::topology::{RedisCluster, TopologyOpts};
use common::redis::RedisServer;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Digest;

const GET_LIST: &str = "/v4/recentcontact/get_list";

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A keep-alive client (the figures should not include TCP set-up).
fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get_list(c: &Http, gw: &Gateway, account: &str) -> (String, String) {
    let req = http::Request::post(gw.url(GET_LIST))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"From_Account":"{account}"}}"#
        ))))
        .unwrap();
    let resp = c.request(req).await.expect("request");
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (x, l2) = (h("x-cache"), h("x-cache-l2"));
    resp.into_body().collect().await.unwrap();
    (x, l2)
}

async fn fleet_of(
    n: usize,
    fake: &FakeChat,
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> Vec<Gateway> {
    fleet_on(n, fake, &format!("url = \"{}\"\n", redis.url()), extra).await
}

/// `n` gateways with `r` as their `[redis]` section.
async fn fleet_on(n: usize, fake: &FakeChat, r: &str, extra: &[(&str, &str)]) -> Vec<Gateway> {
    let mut sections: Vec<(&str, &str)> = vec![
        ("redis", r),
        ("cache", "ttl_secs = 60"),
        ("log", "level = \"warn,chat_gateway::cmd=info\""),
    ];
    sections.extend_from_slice(extra);
    let toml = config_toml(&fake.url(), &sections);
    let mut gws = Vec::new();
    for _ in 0..n {
        gws.push(Gateway::start(&toml).await);
    }
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&metrics_text(gw).await, "chat_gateway_fleet_gateways") != n as f64 {
            assert!(Instant::now() < deadline, "fleet never formed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    gws
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn redis_ops_per_admitted_call_at_saturation() {
    let redis = RedisServer::start();
    let section = format!("url = \"{}\"\n", redis.url());
    saturation("", &section, || redis.command_calls()).await;
}

/// The same on a Redis Cluster of 3 masters (no replicas), beside standalone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn cluster_redis_ops_per_admitted_call_at_saturation() {
    let cluster = RedisCluster::start(3, 0, TopologyOpts::default());
    let section = format!("mode = \"cluster\"\nurl = \"{}\"\n", cluster.url(0));
    saturation("cluster: ", &section, || cluster.command_calls_by_name()).await;
}

/// Saturates the rate limit over 3 gateways on `section`; `tag` starts each line.
async fn saturation(
    tag: &str,
    section: &str,
    commands: impl Fn() -> std::collections::BTreeMap<String, u64>,
) {
    let fake = FakeChat::start(echo_pages()).await;
    let gws = fleet_on(
        3,
        &fake,
        section,
        &[
            (
                "ratelimit",
                "per_command_per_sec = 200\nmax_wait_ms = 30000",
            ),
            ("chat", "request_timeout_ms = 40000"),
        ],
    )
    .await;
    let calls = 1500usize;
    let gws = Arc::new(gws);
    let before = commands();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..calls {
        let gws = gws.clone();
        tasks.push(tokio::spawn(async move {
            let a = post(
                &gws[i % 3].url(GET_LIST),
                format!(r#"{{"From_Account":"sat_{i}"}}"#),
            )
            .await;
            assert_eq!(json(&a)["ErrorCode"], 0);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    let after = commands();
    let mut by_op = std::collections::BTreeMap::new();
    for gw in gws.iter() {
        let m = metrics_text(gw).await;
        for op in [
            "ratelimit",
            "l2_get",
            "lock",
            "l2_put",
            "publish",
            "generation",
            "heartbeat",
        ] {
            *by_op.entry(op).or_insert(0.0) += metric(
                &m,
                &format!("chat_gateway_redis_latency_seconds_count{{op=\"{op}\"}}"),
            );
        }
    }
    let evalsha =
        after.get("evalsha").copied().unwrap_or(0) - before.get("evalsha").copied().unwrap_or(0);
    let n = calls as f64;
    println!(
        "BENCH {tag}saturation: {calls} distinct misses over 3 gateways, N = 200/s, took {:.1} s ({:.0} calls/s at Chat)",
        took.as_secs_f64(),
        n / took.as_secs_f64()
    );
    println!(
        "BENCH {tag}rate-limit Redis operations per admitted call: {:.3} ({} lease scripts)",
        by_op["ratelimit"] / n,
        by_op["ratelimit"]
    );
    let per_call: Vec<String> = by_op
        .iter()
        .map(|(k, v)| format!("{k} {:.3}", v / n))
        .collect();
    println!(
        "BENCH {tag}Redis round trips per admitted call by op: {}",
        per_call.join(", ")
    );
    println!(
        "BENCH {tag}EVALSHA per admitted call (INFO commandstats): {:.2}",
        evalsha as f64 / n
    );
    // Every call here was a memory miss: before Chat it made the L2 lookup (which
    // takes the fetch lock in the same script) and, now and then, a rate-limit lease;
    // the L2 store runs after the answer, in a task of its own.
    println!(
        "BENCH {tag}Redis round trips per memory miss: before Chat {:.3} (L2 lookup {:.3}, rate limit {:.3}); after the answer, not waited for beyond the request's budget: L2 store {:.3}",
        (by_op["lock"] + by_op["l2_get"] + by_op["ratelimit"]) / n,
        (by_op["lock"] + by_op["l2_get"]) / n,
        by_op["ratelimit"] / n,
        by_op["l2_put"] / n
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn invalidation_lag_across_three_gateways() {
    let redis = RedisServer::start();
    invalidation_lag("", &format!("url = \"{}\"\n", redis.url())).await;
}

/// The same on a Redis Cluster of 3 masters (no replicas), beside standalone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn cluster_invalidation_lag_across_three_gateways() {
    let cluster = RedisCluster::start(3, 0, TopologyOpts::default());
    let section = format!("mode = \"cluster\"\nurl = \"{}\"\n", cluster.url(0));
    invalidation_lag("cluster: ", &section).await;
}

/// Invalidation lag over 3 gateways on `section`; `tag` starts each line.
async fn invalidation_lag(tag: &str, section: &str) {
    let fake = FakeChat::start(echo_pages()).await;
    let gws = Arc::new(
        fleet_on(
            3,
            &fake,
            section,
            &[("ratelimit", "per_command_per_sec = 100000")],
        )
        .await,
    );
    let c = client();
    let mut lags = Vec::new();
    for i in 0..200 {
        let account = format!("lag_{i}");
        for gw in gws.iter() {
            while get_list(&c, gw, &account).await.0 != "HIT" {}
        }
        let t0 = Instant::now();
        let a = post(
            &gws[0].url("/admin/cache/invalidate"),
            format!(r#"{{"From_Account":"{account}"}}"#),
        )
        .await;
        assert_eq!(json(&a)["ErrorCode"], 0);
        let mut waits = Vec::new();
        for g in 1..3 {
            let (gws, c, account) = (gws.clone(), c.clone(), account.clone());
            waits.push(tokio::spawn(async move {
                while get_list(&c, &gws[g], &account).await.0 == "HIT" {}
                t0.elapsed()
            }));
        }
        for w in waits {
            lags.push(w.await.unwrap());
        }
    }
    let n = lags.len();
    println!(
        "BENCH {tag}invalidation lag (admin call on gateway 1 sent → first MISS on gateways 2 and 3, {n} samples): p50 {}, p99 {}, max {}",
        us(pct(&mut lags, 0.5)),
        us(pct(&mut lags, 0.99)),
        us(pct(&mut lags, 1.0))
    );
    let mut hist = Vec::new();
    for gw in &gws[1..] {
        let m = metrics_text(gw).await;
        hist.push(format!(
            "{} events, {:.2} ms mean",
            metric(&m, "chat_gateway_fleet_invalidation_lag_seconds_count"),
            1000.0 * metric(&m, "chat_gateway_fleet_invalidation_lag_seconds_sum")
                / metric(&m, "chat_gateway_fleet_invalidation_lag_seconds_count").max(1.0)
        ));
    }
    println!(
        "BENCH {tag}lag histogram on gateways 2 and 3 (publication → applied): {}",
        hist.join("; ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn what_an_l2_hit_costs_over_a_memory_hit() {
    let redis = RedisServer::start();
    let fake = FakeChat::start(echo_pages()).await;
    // Sequential misses as fast as they go: a rate limit far above them.
    let gws = fleet_of(
        2,
        &fake,
        &redis,
        &[("ratelimit", "per_command_per_sec = 100000")],
    )
    .await;
    let c = client();
    let (mut l2, mut mem) = (Vec::new(), Vec::new());
    for i in 0..1000 {
        let account = format!("l2_{i}");
        let first = get_list(&c, &gws[0], &account).await.0;
        assert_eq!(first, "MISS", "{}", gws[0].log_text());
        let t = Instant::now();
        let (x, h) = get_list(&c, &gws[1], &account).await;
        l2.push(t.elapsed());
        assert_eq!((x.as_str(), h.as_str()), ("MISS", "HIT"));
        let t = Instant::now();
        assert_eq!(get_list(&c, &gws[1], &account).await.0, "HIT");
        mem.push(t.elapsed());
    }
    let (l50, m50) = (pct(&mut l2, 0.5), pct(&mut mem, 0.5));
    println!(
        "BENCH request latency, one client, keep-alive: memory hit p50 {} p99 {}; L2 hit p50 {} p99 {}; an L2 hit adds {} at p50",
        us(m50),
        us(pct(&mut mem, 0.99)),
        us(l50),
        us(pct(&mut l2, 0.99)),
        us(l50.saturating_sub(m50))
    );
    assert_eq!(fake.count(), 1000, "every L2 hit was served without Chat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn a_group_event_over_100000_members() {
    let redis = RedisServer::start();
    let fake = FakeChat::start(echo_pages()).await;
    let cb = "token = \"tok-bench\"";
    let gws = fleet_of(3, &fake, &redis, &[("callback", cb)]).await;
    // The GroupId every fake page lists (see common::page_for).
    let group = "@TGS#1B2AUI7RZ";
    let c = client();
    for i in 0..6 {
        let account = format!("member_{i}");
        for gw in &gws {
            while get_list(&c, gw, &account).await.0 != "HIT" {}
        }
    }
    let index = format!("chat-gateway:1400000000:{{g:{group}}}:ix");
    let score = (chat_gateway::fleet::wall_ms() - 1000).to_string();
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
    redis
        .command(&["CONFIG", "SET", "slowlog-log-slower-than", "200"])
        .unwrap();
    redis
        .command(&["CONFIG", "SET", "slowlog-max-len", "100000"])
        .unwrap();
    redis.command(&["SLOWLOG", "RESET"]).unwrap();
    let t = chat_gateway::upstream::signer::unix_now();
    let sign = hex::encode(sha2::Sha256::digest(format!("tok-bench{t}")));
    let url = gws[0].url(&format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=Group.CallbackAfterSendMsg&contenttype=json&Sign={sign}&RequestTime={t}"
    ));
    let started = Instant::now();
    let body = serde_json::json!({"CallbackCommand":"Group.CallbackAfterSendMsg","GroupId":group,"From_Account":"x"});
    assert_eq!(json(&post(&url, body.to_string()).await)["ErrorCode"], 0);
    // Applied everywhere: the index is empty but for its marker, and the other
    // gateways dropped the members' pages.
    while redis.command(&["ZCARD", &index]).unwrap() != "1" {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for gw in &gws[1..] {
        while get_list(&c, gw, "member_0").await.0 == "HIT" {}
    }
    let took = started.elapsed();
    let slow = redis.command(&["SLOWLOG", "GET", "100000"]).unwrap();
    let now_s = chat_gateway::fleet::wall_ms() / 1000;
    let lines: Vec<&str> = slow.lines().collect();
    let mut durations: Vec<u64> = lines
        .windows(2)
        .filter(|w| w[0].parse::<u64>().is_ok_and(|t| t.abs_diff(now_s) < 600))
        .filter_map(|w| w[1].parse().ok())
        .collect();
    durations.sort_unstable();
    let over_5ms = durations.iter().filter(|d| **d >= 5000).count();
    println!(
        "BENCH group event over 100,006 indexed accounts: applied on 3 gateways in {:.2} s; Redis commands of 200 µs or more: {}, the largest {} µs, of 5 ms or more: {over_5ms}",
        took.as_secs_f64(),
        durations.len(),
        durations.last().copied().unwrap_or(0)
    );
}

/// req/s of wrk against `gw` for `secs`, over `bodies` cached bodies.
fn wrk(gw: &Gateway, script: &std::path::Path, secs: u32) -> f64 {
    let out = std::process::Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(gw.url(GET_LIST))
        .output()
        .expect("wrk is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wrk figure: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn memory_hits_are_as_fast_with_redis_as_without() {
    let redis = RedisServer::start();
    let fake = FakeChat::start(echo_pages()).await;
    let r = format!("url = \"{}\"\n", redis.url());
    let one_worker = [("TOKIO_WORKER_THREADS", "1")];
    let with = Gateway::start_with_env(
        &config_toml(
            &fake.url(),
            &[
                ("redis", &r),
                ("cache", "ttl_secs = 600"),
                ("log", "level = \"warn,chat_gateway::cmd=info\""),
            ],
        ),
        &one_worker,
    )
    .await;
    let without = Gateway::start_with_env(
        &config_toml(
            &fake.url(),
            &[
                ("cache", "ttl_secs = 600"),
                ("log", "level = \"warn,chat_gateway::cmd=info\""),
            ],
        ),
        &one_worker,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hits.lua");
    std::fs::write(
        &script,
        "local i = 0\nrequest = function()\n  i = (i + 1) % 100\n  return wrk.format(\"POST\", nil, {[\"content-type\"]=\"application/json\"}, '{\"From_Account\":\"hot_' .. i .. '\"}')\nend\n",
    )
    .unwrap();
    let c = client();
    for gw in [&with, &without] {
        for i in 0..100 {
            let a = format!("hot_{i}");
            while get_list(&c, gw, &a).await.0 != "HIT" {}
        }
    }
    let calls = fake.count();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        a.push(wrk(&with, &script, 5));
        b.push(wrk(&without, &script, 5));
    }
    assert_eq!(fake.count(), calls, "every measured request was a hit");
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    println!(
        "BENCH memory hits, wrk -t1 -c32, 3 alternating 5 s rounds, one tokio worker each: with [redis] {:.0} req/s (rounds {:?}), without {:.0} req/s (rounds {:?}), ratio {:.2}",
        a[1],
        a.iter().map(|v| *v as u64).collect::<Vec<_>>(),
        b[1],
        b.iter().map(|v| *v as u64).collect::<Vec<_>>(),
        a[1] / b[1]
    );
}
