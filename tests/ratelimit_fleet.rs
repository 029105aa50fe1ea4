//! The fleet's rate limit end to end: three real gateway processes on a real
//! redis-server, in front of one fake Chat that records when each call arrives. Over
//! the limit, callers wait their turn; and through every Redis incident (restarted
//! empty, evictions, connection resets, a user without `@dangerous`, Redis unreachable
//! while the gateways start) Chat never sees more than N calls in any one-second
//! window.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::load::*;
use common::redis::{command_at, RedisOpts, RedisServer};
use common::*;

/// These tests load the machine: one at a time.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The limiter's log of get_list in Redis.
const LOG_KEY: &str = "chat-gateway:1400000000:{rl:recentcontact/get_list}";

fn pages() -> Responder {
    Box::new(|r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        Reply::Json(page_for(&acc, 0), Duration::ZERO)
    })
}

/// Waits until every gateway shows `name` = `want` (at most `timeout`).
async fn wait_metric(gws: &[Gateway], name: &str, want: f64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = true;
        for gw in gws {
            all &= metric(&metrics_text(gw).await, name) == want;
        }
        if all {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three gateways on `url`; waits until they are one fleet when `joined`.
async fn three(fake: &FakeChat, url: &str, rate: u32, joined: bool) -> Vec<Gateway> {
    three_waiting(fake, url, rate, joined, 50).await
}

/// Like [`three`], waiting `timeout_ms` for Redis.
async fn three_waiting(
    fake: &FakeChat,
    url: &str,
    rate: u32,
    joined: bool,
    timeout_ms: u32,
) -> Vec<Gateway> {
    let redis = format!("url = \"{url}\"\ntimeout_ms = {timeout_ms}\nexpected_gateways = 3\n");
    let rl = format!("per_command_per_sec = {rate}\n");
    let toml = config_toml(
        &fake.url(),
        &[
            ("redis", &redis),
            ("ratelimit", &rl),
            ("cache", "ttl_secs = 60"),
            ("log", "level = \"info,chat_gateway::fleet::limiter=debug\""),
        ],
    );
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start_prepared(&toml, favoured).await);
    }
    if joined {
        let ok = wait_metric(&gws, "chat_gateway_redis_up", 1.0, Duration::from_secs(10)).await
            && wait_metric(
                &gws,
                "chat_gateway_fleet_gateways",
                3.0,
                Duration::from_secs(10),
            )
            .await;
        assert!(
            ok,
            "the gateways never formed a fleet; log:\n{}",
            gws[0].log_text()
        );
    }
    gws
}

/// A redis-server at a higher priority: these tests measure when calls reach Chat,
/// and the gateways and Redis run favoured over whatever else the machine builds.
fn favoured_redis() -> RedisServer {
    RedisServer::start_with(RedisOpts {
        favoured: true,
        ..Default::default()
    })
}

fn bases(gws: &[Gateway]) -> Vec<String> {
    gws.iter().map(|g| g.url("")).collect()
}

/// Runs `callers` closed-loop callers over the gateways for `run`, and reports.
async fn saturate(
    gws: &[Gateway],
    callers: usize,
    run: Duration,
    tag: &str,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    let b = bases(gws);
    let tag = tag.to_string();
    tokio::spawn(async move { closed_loop(&b, callers, run, &tag).await })
}

/// Asserts N in any second at Chat, and prints what happened.
fn check(what: &str, fake: &FakeChat, out: &[Outcome], n: usize) -> usize {
    let at_chat = arrivals(fake);
    let most = max_per_second(&at_chat);
    let ok = out.iter().filter(|o| o.ok()).count();
    eprintln!(
        "{what}: busiest second at Chat {most} (N = {n}), {} calls in all, {ok} served; {}",
        at_chat.len(),
        tally(out)
    );
    if most > n {
        // The busiest window, call by call (ms from its first), and the gaps around it.
        let mut t = at_chat.clone();
        t.sort();
        let start = (0..t.len())
            .find(|&i| {
                t[i..]
                    .iter()
                    .take_while(|u| **u < t[i] + Duration::from_secs(1))
                    .count()
                    == most
            })
            .unwrap_or(0);
        let from = start.saturating_sub(3);
        let shown: Vec<i128> = t[from..(start + most + 3).min(t.len())]
            .iter()
            .map(|u| {
                if *u < t[start] {
                    -((t[start] - *u).as_millis() as i128)
                } else {
                    (*u - t[start]).as_millis() as i128
                }
            })
            .collect();
        eprintln!("busiest window (ms after its first call; 3 calls before and after): {shown:?}");
    }
    assert!(
        most <= n,
        "{what}: Chat saw {most} calls in one second (N = {n})"
    );
    // Nothing the callers got was an error other than the gateway's own 429.
    assert!(
        out.iter().all(|o| o.ok() || o.status == 429),
        "{}",
        tally(out)
    );
    most
}

/// A thread that calls `f` every `every` until the returned flag is set; returns how
/// often it did.
fn every(
    every: Duration,
    f: impl Fn() + Send + 'static,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut n = 0;
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            f();
            n += 1;
        }
        n
    });
    (stop, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_callers_on_three_gateways_wait_their_turn_instead_of_429() {
    let _alone = MACHINE.lock().await;
    let redis = favoured_redis();
    let fake = fake_chat_apart(pages());
    // Redis is healthy here: a machine too busy to answer within 50 ms must not pass
    // for a Redis incident (three timeouts in a row mark Redis lost).
    let gws = three_waiting(&fake, &redis.url(), 200, true, 250).await;
    let run = Duration::from_secs(4);
    let started = Instant::now();
    let out = saturate(&gws, 60, run, "sixty").await.await.unwrap();
    let refused = out.iter().filter(|o| o.status == 429).count();
    let served = out
        .iter()
        .filter(|o| o.ok() && o.done <= started + run)
        .count();
    let rate = served as f64 / run.as_secs_f64();
    let worst = out
        .iter()
        .map(|o| o.done - o.sent)
        .max()
        .unwrap_or_default();
    let most = check("60 callers on three gateways", &fake, &out, 200);
    eprintln!(
        "60 callers on three gateways, 4 s: {served} served ({rate:.1}/s), {refused} refused, busiest second {most}, slowest answer {worst:?}"
    );
    if refused > 0 {
        // What to look at: when the refused callers asked, and whether permits were
        // lost to a late wake-up or an unknown clock.
        let t0 = out.iter().map(|o| o.sent).min().unwrap();
        let mut r: Vec<(u128, u128)> = out
            .iter()
            .filter(|o| o.status == 429)
            .map(|o| ((o.sent - t0).as_millis(), (o.done - o.sent).as_millis()))
            .collect();
        r.sort();
        eprintln!("refused (sent ms, took ms): {r:?}");
        for gw in &gws {
            eprintln!(
                "permits woken too late for: {}, moved to the present {}, not {}",
                gw.log_count("permit void") + gw.log_count("lease unusable"),
                gw.log_count("moved=true"),
                gw.log_count("moved=false"),
            );
        }
    }
    assert_eq!(refused, 0, "{}", tally(&out));
    assert!(rate >= 180.0, "{rate:.1} served per second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_at_saturation_keeps_n() {
    let _alone = MACHINE.lock().await;
    let mut redis = favoured_redis();
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &redis.url(), 50, true).await;
    let started = Instant::now();
    let load = saturate(&gws, 30, Duration::from_secs(8), "restart").await;
    for at in [1500, 3500, 5500] {
        tokio::time::sleep_until((started + Duration::from_millis(at)).into()).await;
        tokio::task::block_in_place(|| redis.restart());
    }
    let out = load.await.unwrap();
    check("Redis restarted empty 3 times", &fake, &out, 50);
    // The restarts were seen as such, and the gateways are back in the fleet.
    assert!(wait_metric(&gws, "chat_gateway_redis_up", 1.0, Duration::from_secs(5)).await);
    for gw in &gws {
        assert!(gw.log_count("Redis is back") >= 1, "{}", gw.log_text());
    }
}

/// Keeps writing volatile keys of `size` bytes (long TTLs), so a full Redis evicts.
fn fill_memory(
    redis: &RedisServer,
    size: usize,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let port = redis.port;
    let i = AtomicU64::new(0);
    let value = "x".repeat(size);
    every(Duration::from_millis(2), move || {
        let n = i.fetch_add(1, Ordering::Relaxed);
        let _ = command_at(
            port,
            None,
            &["SET", &format!("filler:{n}"), &value, "PX", "600000"],
        );
    })
}

fn evicted(redis: &RedisServer) -> u64 {
    redis
        .command(&["INFO", "stats"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn birth(port: u16) -> String {
    command_at(port, None, &["ZRANGEBYSCORE", LOG_KEY, "0", "0"]).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_ttl_eviction_cannot_take_the_limiter_log() {
    let _alone = MACHINE.lock().await;
    let redis = RedisServer::start_with(RedisOpts {
        favoured: true,
        extra: vec![
            ("maxmemory".into(), "4mb".into()),
            ("maxmemory-policy".into(), "volatile-ttl".into()),
        ],
        ..Default::default()
    });
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &redis.url(), 50, true).await;
    let load = saturate(&gws, 30, Duration::from_secs(7), "volatile").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = birth(redis.port);
    assert!(first.starts_with("b|"), "the log has a birth: {first:?}");
    let (stop, filler) = fill_memory(&redis, 20_000);
    let out = load.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = filler.join().unwrap();
    let evictions = evicted(&redis);
    check("volatile-ttl eviction", &fake, &out, 50);
    eprintln!(
        "{writes} filler writes, {evictions} keys evicted; the log's birth {first} then {}",
        birth(redis.port)
    );
    assert!(evictions > 100, "memory pressure evicted {evictions} keys");
    assert_eq!(
        birth(redis.port),
        first,
        "the limiter's log was never evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allkeys_eviction_of_the_log_is_detected_and_keeps_n() {
    let _alone = MACHINE.lock().await;
    let redis = RedisServer::start_with(RedisOpts {
        favoured: true,
        extra: vec![
            ("maxmemory".into(), "3mb".into()),
            ("maxmemory-policy".into(), "allkeys-random".into()),
        ],
        ..Default::default()
    });
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &redis.url(), 50, true).await;
    let load = saturate(&gws, 30, Duration::from_secs(7), "allkeys").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (stop, filler) = fill_memory(&redis, 60_000);
    // Watch the log's birth: a new one means the log was evicted and made again.
    let births = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let b2 = births.clone();
    let port = redis.port;
    let (stop_watch, watch) = every(Duration::from_millis(20), move || {
        let b = birth(port);
        if !b.is_empty() {
            b2.lock().unwrap().insert(b);
        }
    });
    let out = load.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    stop_watch.store(true, Ordering::Relaxed);
    filler.join().unwrap();
    watch.join().unwrap();
    let evictions = evicted(&redis);
    check("allkeys-random eviction", &fake, &out, 50);
    eprintln!(
        "{evictions} keys evicted; the log was made {} times",
        births.lock().unwrap().len()
    );
    assert!(evictions > 100, "memory pressure evicted {evictions} keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_every_300_ms_keep_n() {
    let _alone = MACHINE.lock().await;
    let redis = favoured_redis();
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &redis.url(), 50, true).await;
    let load = saturate(&gws, 30, Duration::from_secs(7), "resets").await;
    let port = redis.port;
    let (stop, killer) = every(Duration::from_millis(300), move || {
        let _ = command_at(
            port,
            None,
            &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
        );
    });
    let out = load.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let resets = killer.join().unwrap();
    check("connections reset every 300 ms", &fake, &out, 50);
    eprintln!("{resets} resets");
    assert!(resets >= 15);
}

/// A user with everything but `@dangerous` (no INFO, CONFIG, DEBUG, KEYS, ...): what
/// managed Redis services and hardened setups give.
fn restricted_url(redis: &RedisServer) -> String {
    let r = redis.command(&[
        "ACL",
        "SETUSER",
        "gw",
        "on",
        ">gw-pass",
        "~*",
        "&*",
        "+@all",
        "-@dangerous",
    ]);
    assert_eq!(r.as_deref(), Ok("OK"), "{r:?}");
    format!("redis://gw:gw-pass@127.0.0.1:{}/0", redis.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_dangerous_commands_keeps_n() {
    let _alone = MACHINE.lock().await;
    let redis = favoured_redis();
    let url = restricted_url(&redis);
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &url, 50, false).await;
    let out = saturate(&gws, 30, Duration::from_secs(5), "acl")
        .await
        .await
        .unwrap();
    check("a Redis user without @dangerous", &fake, &out, 50);
}

/// A Redis user without `@dangerous` (so no `INFO`, no `CONFIG`): the gateways tell
/// a restart by their marker scripts instead, join the fleet, and keep N together
/// through the fleet's log (its permits are used, and nothing is denied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_dangerous_commands_joins_the_fleet() {
    let _alone = MACHINE.lock().await;
    let redis = favoured_redis();
    let url = restricted_url(&redis);
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &url, 50, true).await;
    let run = Duration::from_secs(4);
    let out = saturate(&gws, 30, run, "acl-fleet").await.await.unwrap();
    check(
        "a Redis user without @dangerous, in the fleet",
        &fake,
        &out,
        50,
    );
    let leased: f64 = {
        let mut sum = 0.0;
        for gw in &gws {
            sum += metric(
                &metrics_text(gw).await,
                "chat_gateway_ratelimit_permits_used_total{command=\"recentcontact/get_list\"}",
            );
        }
        sum
    };
    assert!(
        leased > 100.0,
        "calls went through the fleet's log: {leased}"
    );
    for gw in &gws {
        assert_eq!(gw.log_count("NOPERM"), 0, "{}", gw.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_while_the_gateways_start_keeps_n() {
    let _alone = MACHINE.lock().await;
    let port = free_addr().port();
    let fake = fake_chat_apart(pages());
    let gws = three(&fake, &format!("redis://127.0.0.1:{port}/0"), 50, false).await;
    let started = Instant::now();
    let load = saturate(&gws, 30, Duration::from_secs(8), "unreachable").await;
    // Redis appears mid-run (the outage ends): the gateways join it one by one.
    tokio::time::sleep_until((started + Duration::from_secs(3)).into()).await;
    let _redis = tokio::task::block_in_place(|| {
        RedisServer::start_with(RedisOpts {
            favoured: true,
            port: Some(port),
            ..Default::default()
        })
    });
    let out = load.await.unwrap();
    let alone = arrivals(&fake)
        .iter()
        .filter(|t| **t < started + Duration::from_secs(3))
        .count();
    check(
        "Redis unreachable while the gateways start",
        &fake,
        &out,
        50,
    );
    eprintln!("{alone} calls at Chat in the 3 s before Redis was reachable");
    assert!(alone > 0 && alone <= 3 * 50, "{alone}");
    assert!(wait_metric(&gws, "chat_gateway_redis_up", 1.0, Duration::from_secs(5)).await);
}

/// The fleet's window budgets `redis.latency_allowance_ms` for the spread of the
/// latency on the way to Chat: with an allowance of a second, N calls are spaced over
/// 1 s + `lease_ms` + 1 s, so even a window of 1.5 s holds at most N arrivals at Chat
/// (a window that left the allowance out would let 2N arrive within 1.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_window_budgets_the_latency_allowance() {
    let _alone = MACHINE.lock().await;
    let redis = favoured_redis();
    let fake = fake_chat_apart(pages());
    let toml = config_toml(
        &fake.url(),
        &[
            (
                "redis",
                &format!(
                    "url = \"{}\"\ntimeout_ms = 250\nlatency_allowance_ms = 1000\n",
                    redis.url()
                ),
            ),
            ("ratelimit", "per_command_per_sec = 10\nmax_wait_ms = 20000"),
            ("chat", "request_timeout_ms = 30000"),
            ("cache", "ttl_secs = 60"),
        ],
    );
    let gw = Gateway::start_prepared(&toml, favoured).await;
    assert!(
        wait_metric(
            std::slice::from_ref(&gw),
            "chat_gateway_redis_up",
            1.0,
            Duration::from_secs(10)
        )
        .await,
        "Redis never up; log:\n{}",
        gw.log_text()
    );
    let base = gw.url("");
    let out = burst(&base, 30, "allowance").await;
    assert!(out.iter().all(|o| o.ok()), "{}", tally(&out));
    let at = arrivals(&fake);
    assert_eq!(at.len(), 30);
    let most = max_in_window(&at, Duration::from_millis(1500));
    let t0 = *at.iter().min().unwrap();
    let mut ms: Vec<u128> = at.iter().map(|t| (*t - t0).as_millis()).collect();
    ms.sort();
    eprintln!(
        "latency allowance 1 s: at most {most} calls at Chat within 1.5 s; arrivals (ms): {ms:?}"
    );
    assert!(
        most <= 10,
        "{most} calls at Chat within 1.5 s (N = 10, window 2.02 s); arrivals (ms): {ms:?}"
    );
}
