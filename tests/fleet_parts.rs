//! The fleet's parts against a real redis-server (started by the test on a free port):
//! the fleet-wide limiter (N in any window, from several limiters; pauses; Redis lost
//! and back), the invalidation bus (delivery, and loss detection: gap, restart, and a
//! dropped connection that loses nothing), L2 and the fetch lock.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use chat_gateway::cache::key::PageKey;
use chat_gateway::cache::store::{Lookup, Page, PageStore};
use chat_gateway::cache::PageCache;
use chat_gateway::chat::effects::EntityKind;
use chat_gateway::config::{self, RedisUrl, Settings};
use chat_gateway::fleet::conn::{Connector, Redis};
use chat_gateway::fleet::keys::Keys;
use chat_gateway::fleet::l2::{self, FetchPlan, Lock, MissPlan, L2};
use chat_gateway::fleet::limiter::FleetLimiter;
use chat_gateway::fleet::{Event, Fleet, Shared};
use chat_gateway::upstream::ratelimit::RateLimiter;
use common::redis::RedisServer;

const CMD: &str = "recentcontact/get_list";

fn settings(url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = [
        ("CHAT_GATEWAY__CHAT__SDKAPPID", "1400000000"),
        ("CHAT_GATEWAY__CHAT__IDENTIFIER", "administrator"),
        ("CHAT_GATEWAY__CHAT__SECRET_KEY", "k"),
        ("CHAT_GATEWAY__CHAT__REGION", "singapore"),
        ("CHAT_GATEWAY__CHAT__BASE_URL", "http://127.0.0.1:1"),
        ("CHAT_GATEWAY__REDIS__URL", url),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    config::load_with_env(None, env).unwrap()
}

async fn limiter(url: &str, id: &str, rate: u32) -> Arc<FleetLimiter> {
    let u = RedisUrl::parse("redis.url", url).unwrap();
    let redis = Redis::start(
        Connector::new(u, None, id).unwrap(),
        Duration::from_millis(50),
    );
    let rate = rate.to_string();
    let s = settings(
        url,
        &[(
            "CHAT_GATEWAY__RATELIMIT__PER_COMMAND_PER_SEC",
            rate.as_str(),
        )],
    );
    let l = FleetLimiter::start(
        redis,
        Keys::new("test", 1),
        id.to_string(),
        &s.ratelimit,
        s.redis.as_ref().unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !l.fleet_mode() {
        assert!(Instant::now() < deadline, "limiter never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    l
}

/// The most instants in any half-open window of `w`.
fn max_in_window(times: &mut [Instant], w: Duration) -> usize {
    times.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] >= times[j] + w {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

fn script_calls(r: &RedisServer) -> u64 {
    let c = r.command_calls();
    ["evalsha", "eval", "script|load"]
        .iter()
        .map(|k| c.get(*k).copied().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_limiters_keep_n_in_any_second_and_lease_in_batches() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ls = [
        limiter(&url, "g1", 50).await,
        limiter(&url, "g2", 50).await,
        limiter(&url, "g3", 50).await,
    ];
    let before = script_calls(&redis);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..150 {
        let l = ls[i % 3].clone();
        tasks.push(tokio::spawn(async move {
            l.acquire(CMD, Duration::from_secs(10)).await.map(|p| {
                assert!(p.go());
                Instant::now()
            })
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(
            t.await
                .unwrap()
                .expect("every call admitted within its wait"),
        );
    }
    let ops = script_calls(&redis) - before;
    let most = max_in_window(&mut times, Duration::from_secs(1));
    assert!(most <= 50, "{most} calls in one second (limit 50)");
    // Paced: one call every W / N from the first to the last (a burst at the start).
    let span = times[times.len() - 1] - times[0];
    let rate = times.len() as f64 / span.as_secs_f64();
    assert!(rate >= 40.0, "{rate:.1} calls/s while demand lasted");
    // Leases are batched, not one per call (how few per call is bench/fleet.sh's
    // figure: 0.04 on a quiet machine; a starved one batches less).
    let per_call = ops as f64 / times.len() as f64;
    assert!(
        per_call <= 0.5,
        "{ops} Redis script calls for {} admitted calls",
        times.len()
    );
    eprintln!(
        "150 calls over {:?}: max {most} in a second, {rate:.1}/s, {per_call:.3} Redis ops per call",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_from_one_gateway_holds_the_others() {
    let redis = RedisServer::start();
    let a = limiter(&redis.url(), "a", 100).await;
    let b = limiter(&redis.url(), "b", 100).await;
    assert!(b.acquire(CMD, Duration::ZERO).await.is_ok_and(|p| p.go()));
    a.pause(CMD, Duration::from_secs(2)).await;
    // The pause is in Redis once `pause` returns.
    let deadline = Instant::now() + Duration::from_secs(2);
    let refused = loop {
        match b.acquire(CMD, Duration::from_millis(100)).await {
            Err(t) => break t,
            Ok(p) => {
                assert!(p.go());
                assert!(Instant::now() < deadline, "the pause never reached b");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert!(
        refused.retry_after > Duration::from_millis(1500),
        "{:?}",
        refused.retry_after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_redis_counts_a_full_window_then_a_share_and_coming_back_replays() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let ls = [
        limiter(&url, "x1", 30).await,
        limiter(&url, "x2", 30).await,
        limiter(&url, "x3", 30).await,
    ];
    for l in &ls {
        l.set_live_gateways(3);
    }
    // Steady demand of 3 × 8 calls/s (under N = 30) for 6 s, across a kill (at 1.2 s)
    // and an empty restart (at 3.6 s, after the local shares took over).
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = started + Duration::from_millis(40 * i as u64);
            while next < started + Duration::from_secs(6) {
                tokio::time::sleep_until(next.into()).await;
                let asked = Instant::now();
                let r = l
                    .acquire(CMD, Duration::from_millis(500))
                    .await
                    .map(|p| assert!(p.go()));
                out.push((asked, Instant::now(), r.is_ok()));
                next += Duration::from_millis(125);
            }
            out
        }));
    }
    tokio::time::sleep_until((started + Duration::from_millis(1200)).into()).await;
    redis.kill();
    tokio::time::sleep_until((started + Duration::from_millis(3600)).into()).await;
    redis.restart();
    let mut times = Vec::new();
    let mut slowest = Duration::ZERO;
    let (mut local, mut after) = (0, 0);
    for t in tasks {
        for (asked, at, ok) in t.await.unwrap() {
            slowest = slowest.max(at - asked);
            if ok {
                times.push(at);
                let since = at - started;
                if since > Duration::from_millis(2400) && since < Duration::from_millis(3600) {
                    local += 1;
                }
                if since > Duration::from_millis(5000) {
                    after += 1;
                }
            }
        }
    }
    let most = max_in_window(&mut times, Duration::from_secs(1));
    assert!(most <= 30, "{most} calls in one second (limit 30)");
    assert!(
        slowest < Duration::from_millis(600),
        "a call waited {slowest:?}: nothing waits on a dead Redis"
    );
    assert!(local > 0, "the local shares took over");
    assert!(after > 0, "calls went on after the restart");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ls.iter().all(|l| l.fleet_mode()) {
        assert!(
            Instant::now() < deadline,
            "limiters never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn page(body: &str, groups: &[&str]) -> Page {
    let now = Instant::now();
    Page {
        key: PageKey::default(),
        body: Bytes::from(body.to_string()),
        stored_at: now,
        fresh_until: now + Duration::from_secs(60),
        stale_until: now + Duration::from_secs(120),
        groups: groups
            .iter()
            .map(|g| chat_gateway::cache::groups::group_key(g))
            .collect(),
    }
}

struct Member {
    fleet: Arc<Fleet>,
    store: Arc<PageStore>,
}

async fn member(url: &str) -> Member {
    member_with(url, &[]).await
}

async fn member_with(url: &str, extra: &[(&str, &str)]) -> Member {
    let s = settings(url, extra);
    let store = Arc::new(PageStore::new(1 << 20, 64));
    let live = Arc::new(ArcSwap::from_pointee(s.live.clone()));
    let fleet = Fleet::start(&s, store.clone(), live).unwrap().unwrap();
    assert!(fleet.wait_ready(Duration::from_secs(5)).await);
    Member { fleet, store }
}

impl Member {
    fn cache(&self, account: &str, groups: &[&str]) {
        assert!(self
            .store
            .insert(account, page(account, groups), self.store.begin_fetch()));
    }
    fn has(&self, account: &str) -> bool {
        matches!(
            self.store
                .lookup(account, &PageKey::default(), Instant::now()),
            Lookup::Fresh(_)
        )
    }
    async fn wait_gone(&self, account: &str) -> Duration {
        let started = Instant::now();
        while self.has(account) {
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{account} was never invalidated"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        started.elapsed()
    }
    fn bus_client(&self) -> String {
        format!("chat-gateway:{}:bus", self.fleet.id)
    }
}

/// Waits until the member's bus connection shows in CLIENT LIST.
async fn bus_client_id(redis: &RedisServer, m: &Member) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(id) = redis.client_id(&m.bus_client()) {
            return id;
        }
        assert!(Instant::now() < deadline, "no bus connection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// "Every conversation list" events sent together share one raise of the
/// conversation pages' generation (a flood of group webhooks is not one Redis round
/// trip per event), and every gateway learns it and drops its pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conversation_list_events_sent_together_share_one_raise() {
    let redis = RedisServer::start();
    let a = member(&redis.url()).await;
    let b = member(&redis.url()).await;
    bus_client_id(&redis, &b).await;
    b.cache("alice", &[]);
    // Writes paused: the events wait in the queue and go out together.
    redis
        .command(&["CLIENT", "PAUSE", "1500", "WRITE"])
        .unwrap();
    for _ in 0..5 {
        a.fleet.publish(Event::Every(EntityKind::Conversations));
    }
    b.wait_gone("alice").await;
    let entries = redis
        .command(&["XRANGE", "chat-gateway:1400000000:{fleet}:bus", "-", "+"])
        .unwrap();
    let lines: Vec<&str> = entries.lines().collect();
    let raised: Vec<&str> = lines
        .windows(2)
        .filter(|w| w[0] == "p")
        .map(|w| w[1])
        .collect();
    assert_eq!(raised.len(), 5, "{entries}");
    let mut distinct = raised.clone();
    distinct.sort();
    distinct.dedup();
    // The first event may have gone out alone before the others were queued.
    assert!(distinct.len() <= 2, "one raise per event: {raised:?}");
    let pgen: u64 = redis
        .command(&["GET", "chat-gateway:1400000000:{fleet}:pgen"])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(raised.last().unwrap().parse::<u64>().unwrap(), pgen);
}

/// Every command Redis runs, as MONITOR shows it (a thread reading until Redis goes).
fn monitor(port: u16) -> Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, Write};
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"MONITOR\r\n").unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut first = String::new();
    r.read_line(&mut first).unwrap();
    assert_eq!(first.trim_end(), "+OK");
    let out = lines.clone();
    std::thread::spawn(move || {
        for l in r.lines() {
            let Ok(l) = l else { return };
            out.lock().unwrap().push(l);
        }
    });
    lines
}

/// An event whose append ran but whose answer was lost (writes paused past the
/// publisher's wait: it sends the batch again, on a new session when its connection is
/// given up) is in the stream once, and the others apply it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_again_after_its_answer_was_lost_is_appended_once() {
    let redis = RedisServer::start();
    // Without L2 the append is the event's only write: the pause holds the append.
    let a = member_with(&redis.url(), &[("CHAT_GATEWAY__REDIS__L2_CACHE", "false")]).await;
    let stream = "chat-gateway:1400000000:{fleet}:bus";
    let seen = monitor(redis.port);
    redis
        .command(&["CLIENT", "PAUSE", "4000", "WRITE"])
        .unwrap();
    a.fleet.publish(Event::accounts(&["alice"]));
    let started = Instant::now();
    while a.fleet.bus().queued() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the event never left the queue"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every attempt the pause held has run once the last one answered; the monitor
    // has shown them all once it shows a command sent after.
    redis.command(&["ECHO", "monitor-sync"]).unwrap();
    let started = Instant::now();
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("monitor-sync"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "MONITOR shows nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The publish script's calls naming the event (its receipt key is its mark).
    let attempts = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"EVALSHA\"") && l.contains(":sent:") && l.contains("alice"))
        .count();
    assert!(
        attempts >= 2,
        "the publisher sent the event {attempts} time(s): this test shows nothing"
    );
    let entries = redis.command(&["XRANGE", stream, "-", "+"]).unwrap();
    let appended = entries.lines().filter(|l| l.contains("alice")).count();
    assert_eq!(appended, 1, "sent {attempts} times: {entries}");
    // A later event goes out as usual.
    a.fleet.publish(Event::accounts(&["bob"]));
    let started = Instant::now();
    loop {
        let entries = redis.command(&["XRANGE", stream, "-", "+"]).unwrap();
        if entries.lines().any(|l| l.contains("bob")) {
            assert_eq!(entries.lines().filter(|l| l.contains("alice")).count(), 1);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{entries}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_other_gateways_memory() {
    let redis = RedisServer::start();
    let a = member(&redis.url()).await;
    let b = member(&redis.url()).await;
    bus_client_id(&redis, &b).await;
    b.cache("alice", &[]);
    b.cache("bob", &["@g1"]);
    b.cache("carol", &[]);
    a.fleet.publish(Event::accounts(&["alice"]));
    let lag = b.wait_gone("alice").await;
    assert!(b.has("bob") && b.has("carol"));
    a.fleet.publish(Event::Group("@g1".into()));
    b.wait_gone("bob").await;
    assert!(b.has("carol"));
    a.fleet.publish(Event::All);
    b.wait_gone("carol").await;
    // A gateway does not apply its own events twice: it applied erin's when it took
    // it, then cached a page fetched after it; when its reader passes that event on
    // the stream, the newer page stays.
    b.cache("erin", &[]);
    a.fleet.publish(Event::accounts(&["erin"]));
    a.cache("erin", &[]);
    b.wait_gone("erin").await;
    // An event from b after erin's: once a has applied it, its reader has passed erin's.
    a.cache("gina", &[]);
    b.fleet.publish(Event::accounts(&["gina"]));
    a.wait_gone("gina").await;
    assert!(
        a.has("erin"),
        "a applied its own event again and dropped a newer page"
    );
    eprintln!("first event applied after {lag:?}");
}

/// An `EVAL` that publishes an "accounts" event the way a gateway does: numbered from
/// the fleet's counter.
fn publish_as_someone<'a>(stream: &'a str, seq: &'a str, accounts: &'a str) -> [&'a str; 6] {
    [
        "EVAL",
        "local n = redis.call('INCR', KEYS[2]) \
         return redis.call('XADD', KEYS[1], '*', 'o', 'someone', 'k', 'a', 'v', ARGV[1], 'n', n)",
        "2",
        stream,
        seq,
        accounts,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_loses_nothing_and_a_gap_or_restart_drops_memory() {
    let mut redis = RedisServer::start();
    let a = member(&redis.url()).await;
    let b = member(&redis.url()).await;
    let keys = Keys::new("chat-gateway", 1400000000);
    let (stream, seq) = (keys.bus(), keys.bus_seq());

    // A dropped connection while an event is published: read on reconnection,
    // nothing else dropped.
    b.cache("erin", &[]);
    b.cache("keep", &[]);
    let id = bus_client_id(&redis, &b).await;
    redis
        .atomically(&[
            &["CLIENT", "KILL", "ID", &id],
            &publish_as_someone(&stream, &seq, "[\"erin\"]"),
        ])
        .unwrap();
    b.wait_gone("erin").await;
    assert!(
        b.has("keep"),
        "a reconnection that lost nothing drops nothing"
    );

    // The stream trimmed past b's position while b was away: b drops everything.
    let id = bus_client_id(&redis, &b).await;
    assert_ne!(redis.client_id(&b.bus_client()), None);
    redis
        .atomically(&[
            &["CLIENT", "KILL", "ID", &id],
            &publish_as_someone(&stream, &seq, "[\"x\"]"),
            &["XTRIM", &stream, "MAXLEN", "0"],
        ])
        .unwrap();
    b.wait_gone("keep").await;

    // Redis restarted empty: both drop everything.
    bus_client_id(&redis, &b).await;
    a.cache("p", &[]);
    b.cache("q", &[]);
    redis.restart();
    a.wait_gone("p").await;
    b.wait_gone("q").await;
    // And the fleet works again after it.
    bus_client_id(&redis, &b).await;
    assert!(a.fleet.wait_ready(Duration::from_secs(5)).await);
    b.cache("r", &[]);
    a.fleet.publish(Event::accounts(&["r"]));
    b.wait_gone("r").await;
}

fn l2_for(url: &str, id: &str, timeout: Duration) -> (Arc<Redis>, L2, Arc<Shared>) {
    let u = RedisUrl::parse("redis.url", url).unwrap();
    let redis = Redis::start(
        Connector::new(u, None, id).unwrap(),
        Duration::from_millis(50),
    );
    let shared = Arc::new(Shared::default());
    let l2 = L2::new(
        redis.clone(),
        Keys::new("t", 1),
        shared.clone(),
        id.to_string(),
        timeout,
        64,
    );
    (redis, l2, shared)
}

/// A page body listing the group `@g`.
fn body(text: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"SessionItem":[{{"Type":2,"GroupId":"@g"}}],"Text":"{text}","ErrorCode":0}}"#
    ))
}

fn plan(f: &l2::Found, token: Option<&str>) -> FetchPlan {
    FetchPlan {
        gen: f.gen,
        gens: f.gens,
        token: token.map(str::to_string),
        stale: None,
        since_ms: f.now_ms,
    }
}

/// "Every conversation list" raises the conversation pages' generation: every L2 page
/// is out of reach of a gateway that learned it, a fetch that began before it stores
/// where no such gateway looks, and a gateway that has not learned it yet still
/// reads under the old value (until its event arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_conversation_list_puts_every_l2_page_out_of_reach() {
    let redis = RedisServer::start();
    let (r1, g1, s1) = l2_for(&redis.url(), "one", Duration::from_millis(600));
    let (r2, g2, s2) = l2_for(&redis.url(), "two", Duration::from_millis(600));
    assert!(r1.wait_up(Duration::from_secs(5)).await && r2.wait_up(Duration::from_secs(5)).await);
    let key = PageKey::default();
    let (ttl, stale) = (Duration::from_secs(30), Duration::from_secs(30));
    let keys = Keys::new("t", 1);
    for a in ["alice", "bob"] {
        let f = g1.lookup(a, &key, false).await.unwrap();
        assert!(g1
            .store(a, &body(a), &key, &plan(&f, None), ttl, stale)
            .await
            .unwrap());
        assert!(g2.lookup(a, &key, false).await.unwrap().page.is_some());
    }
    // A fetch of carol's page begins before the event.
    let early = g2.lookup("carol", &key, false).await.unwrap();

    let raised = l2::bump_pages(&r1, &keys, &s1).await.unwrap();
    assert_eq!(s1.pages_gen.load(Ordering::Acquire), raised);
    for a in ["alice", "bob"] {
        assert!(
            g1.lookup(a, &key, false).await.unwrap().page.is_none(),
            "{a}"
        );
        // The other gateway has not applied the event yet: the old value, the old page.
        assert!(
            g2.lookup(a, &key, false).await.unwrap().page.is_some(),
            "{a}"
        );
    }
    // Its event arrives.
    s2.pages_gen.fetch_max(raised, Ordering::AcqRel);
    assert!(g2
        .lookup("alice", &key, false)
        .await
        .unwrap()
        .page
        .is_none());
    // The early fetch stores, under the generations it began with: nobody reads it.
    assert!(g2
        .store(
            "carol",
            &body("carol old"),
            &key,
            &plan(&early, None),
            ttl,
            stale
        )
        .await
        .unwrap());
    assert!(g1
        .lookup("carol", &key, false)
        .await
        .unwrap()
        .page
        .is_none());
    assert!(g2
        .lookup("carol", &key, false)
        .await
        .unwrap()
        .page
        .is_none());
    // A fetch that begins after it is shared again.
    let f = g2.lookup("carol", &key, false).await.unwrap();
    assert!(g2
        .store(
            "carol",
            &body("carol new"),
            &key,
            &plan(&f, None),
            ttl,
            stale
        )
        .await
        .unwrap());
    let got = g1.lookup("carol", &key, false).await.unwrap().page.unwrap();
    assert_eq!(got.body, body("carol new"));
    // The value only moves forward, even with its key gone (evicted).
    redis.command(&["DEL", &keys.pages_gen()]).unwrap();
    let again = l2::bump_pages(&r2, &keys, &s2).await.unwrap();
    assert!(again > raised, "{again} <= {raised}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_generations_locks_and_waiting_for_another_gateway() {
    let redis = RedisServer::start();
    let (r1, g1, s1) = l2_for(&redis.url(), "one", Duration::from_millis(600));
    let (r2, g2, _) = l2_for(&redis.url(), "two", Duration::from_millis(600));
    assert!(r1.wait_up(Duration::from_secs(5)).await && r2.wait_up(Duration::from_secs(5)).await);
    let key = PageKey::default();
    let (ttl, stale) = (Duration::from_secs(30), Duration::from_secs(30));

    // A miss takes the lock; another gateway sees it taken.
    let f = g1.lookup("alice", &key, true).await.unwrap();
    assert!(f.page.is_none());
    let Lock::Mine(token) = f.lock.clone() else {
        panic!("{:?}", f.lock)
    };
    assert_eq!(
        g2.lookup("alice", &key, true).await.unwrap().lock,
        Lock::Theirs
    );
    // The other waits for the page...
    let k = key.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let plan = g2.plan_miss("alice", &k).await;
        (plan, started.elapsed(), g2)
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let p = body("alice v1");
    assert!(g1
        .store("alice", &p, &key, &plan(&f, Some(&token)), ttl, stale)
        .await
        .unwrap());
    let (got, waited, g2) = waiter.await.unwrap();
    match got {
        MissPlan::Serve(got, _) => assert_eq!(got.body, p),
        other => panic!("{other:?}"),
    }
    assert!(waited < Duration::from_millis(300), "{waited:?}");

    // An invalidation raises the generation: the page is gone, and a fetch that began
    // before it does not store.
    let old = f.clone();
    let keys = Keys::new("t", 1);
    l2::bump_accounts(&r1, &keys, &["alice".to_string()])
        .await
        .unwrap();
    let f = g1.lookup("alice", &key, false).await.unwrap();
    assert!(f.page.is_none() && f.gen > old.gen);
    assert!(!g1
        .store("alice", &p, &key, &plan(&old, None), ttl, stale)
        .await
        .unwrap());
    assert!(g1
        .store("alice", &p, &key, &plan(&f, None), ttl, stale)
        .await
        .unwrap());

    // A group event bumps the accounts whose L2 pages list the group, and empties the
    // group's index of them.
    let done = l2::group_event(&r1, &keys, &s1, "@g").await.unwrap();
    assert_eq!((done.accounts, done.raised), (1, None));
    let after = g1.lookup("alice", &key, false).await.unwrap();
    assert!(after.page.is_none() && after.gen > f.gen);
    let done = l2::group_event(&r1, &keys, &s1, "@g").await.unwrap();
    assert_eq!(done.accounts, 0);
    // A fetch that began before the group's event does not store.
    assert!(!g1
        .store("alice", &p, &key, &plan(&f, None), ttl, stale)
        .await
        .unwrap());

    // A holder that dies leaves a lock that others wait out (bounded), then fetch.
    let held = g1.lookup("bob", &key, true).await.unwrap();
    assert!(matches!(held.lock, Lock::Mine(_)));
    let started = Instant::now();
    match g2.plan_miss("bob", &key).await {
        MissPlan::Fetch(FetchPlan { token: None, .. }) => {}
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1000),
        "{waited:?}"
    );

    // A page past its TTL is offered for stale-if-error, with the lock to refresh it.
    let old_carol = body("carol old");
    let f = g1.lookup("carol", &key, false).await.unwrap();
    assert!(g1
        .store(
            "carol",
            &old_carol,
            &key,
            &plan(&f, None),
            Duration::from_millis(1),
            stale
        )
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    match g2.plan_miss("carol", &key).await {
        MissPlan::Fetch(FetchPlan {
            token: Some(_),
            stale: Some((s, _)),
            ..
        }) => assert_eq!(s.body, old_carol),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_gateway_keeps_to_its_share_and_reports_it_on_return() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let a = limiter(&url, "s1", 30).await;
    a.set_live_gateways(3);
    redis.kill();
    // The next call finds Redis gone (connection error) and falls back.
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.fleet_mode() {
        let _ = a.acquire("other/cmd", Duration::ZERO).await;
        assert!(Instant::now() < deadline, "Redis loss never noticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The fleet may have leased up to the hold ahead: the local share counts that
    // and a whole window more as used. Nothing waits on the dead Redis meanwhile.
    let lost = Instant::now();
    let started = Instant::now();
    let t = a.acquire(CMD, Duration::ZERO).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "nothing waits on a dead Redis"
    );
    assert!(
        t.retry_after > a.hold() + Duration::from_secs(1),
        "{:?}",
        t.retry_after
    );
    tokio::time::sleep(t.retry_after).await;
    // Then N / 3 per span, never unlimited: twelve callers, ten in the first span.
    // Counted by their slots (a permit is valid until its slot + MAX_LATE): when each
    // task got to run after its slot is this machine's scheduling, not the limiter's.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            a.acquire(CMD, Duration::from_secs(2)).await.map(|p| {
                let slot = p.until() - chat_gateway::upstream::ratelimit::MAX_LATE;
                assert!(p.go());
                (slot, Instant::now())
            })
        }));
    }
    let mut slots = Vec::new();
    let mut local = Vec::new();
    for t in tasks {
        let (slot, left) = t.await.unwrap().expect("admitted on the local share");
        slots.push(slot);
        local.push(left);
    }
    slots.sort();
    local.sort();
    let span = chat_gateway::upstream::ratelimit::SPAN;
    assert_eq!(
        slots.iter().filter(|t| **t < slots[0] + span).count(),
        10,
        "N / 3 without Redis: slots {:?}",
        slots.iter().map(|t| *t - slots[0]).collect::<Vec<_>>()
    );
    assert!(slots[0] - lost > a.hold() + Duration::from_secs(1));
    // Redis comes back empty: a's ten calls are written into the log before it
    // leases again, so another gateway gets only the rest of N in that window.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.fleet_mode() {
        assert!(Instant::now() < deadline, "never back to Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = limiter(&url, "s2", 30).await;
    let mut times = local.clone();
    for _ in 0..30 {
        if b.acquire(CMD, Duration::from_millis(300))
            .await
            .is_ok_and(|p| p.go())
        {
            times.push(Instant::now());
        }
    }
    let w = b.window();
    let most = max_in_window(&mut times, w);
    assert!(most <= 30, "{most} calls in one window with a's (limit 30)");
    assert!(times.len() > 30, "b was admitted too");
}
