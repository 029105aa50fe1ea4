//! Bounded by construction: each defect a hostile or buggy caller, a misbehaving
//! upstream or a large cache could provoke, reproduced against the real binary and a
//! fake Chat, and shown fixed. (Process RSS under a full cache is measured by
//! `bench/rss.sh`, not here.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";
const GET_CONTACT_GROUP: &str = "/v4/recentcontact/get_contact_group";

fn ok() -> serde_json::Value {
    serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""})
}

async fn scrape(gw: &Gateway) -> String {
    String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned()
}

/// A deterministic "random" in [0, 1) from a string: the same request and attempt
/// always get the same fate, whatever order concurrent requests arrive in.
fn unit_hash(s: &str) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------- 1. memory

/// An account holds at most `cache.max_pages_per_account` pages; past it its oldest
/// page goes (and the cache's weight follows).
#[tokio::test]
async fn an_account_holds_at_most_max_pages_per_account() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("cache", "ttl_secs = 600\nmax_pages_per_account = 4")],
    ))
    .await;
    let page = |ts: u64| format!(r#"{{"From_Account":"u","TimeStamp":{ts}}}"#);
    for ts in 0..6 {
        assert_eq!(
            header(&post(&gw.url(GET_LIST), page(ts)).await, "x-cache"),
            "MISS"
        );
    }
    let m = scrape(&gw).await;
    assert_eq!(metric(&m, "chat_gateway_cache_pages"), 4.0, "{m}");
    // The two oldest are gone, the four newest are hits.
    for ts in 2..6 {
        assert_eq!(
            header(&post(&gw.url(GET_LIST), page(ts)).await, "x-cache"),
            "HIT"
        );
    }
    fake.reset();
    assert_eq!(
        header(&post(&gw.url(GET_LIST), page(0)).await, "x-cache"),
        "MISS"
    );
    assert_eq!(fake.count(), 1);
}

/// The cache's weighed size never passes `cache.max_bytes`, however much is offered,
/// and what is weighed per page covers its real cost, not just the body.
#[tokio::test]
async fn the_cache_stays_within_max_bytes() {
    let fake = FakeChat::start(echo_pages()).await;
    let max = 256 * 1024;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("cache", &format!("ttl_secs = 600\nmax_bytes = {max}"))],
    ))
    .await;
    for i in 0..2000 {
        post(&gw.url(GET_LIST), format!(r#"{{"From_Account":"acc{i}"}}"#)).await;
    }
    let m = scrape(&gw).await;
    // Pages only: the item store's share holds nothing but its table here.
    let weighted = metric(&m, "chat_gateway_cache_weighted_bytes")
        - metric(&m, "chat_gateway_cache_item_weighted_bytes");
    let pages = metric(&m, "chat_gateway_cache_pages");
    assert!(weighted <= max as f64, "{weighted} > {max}");
    assert!(
        pages > 100.0 && pages < 2000.0,
        "evicted some, kept some: {pages}"
    );
    let body_len = post(&gw.url(GET_LIST), r#"{"From_Account":"acc1999"}"#)
        .await
        .2
        .len();
    let per_page = weighted / pages;
    assert!(
        per_page > body_len as f64 + 500.0,
        "a page weighs its body ({body_len}) plus its overheads: {per_page}"
    );
}

/// Per-item entries stay within their share of `cache.max_bytes`
/// (`cache.items_percent`), generation table included, however many are offered,
/// and each is weighed at more than its bytes; pages keep the rest.
#[tokio::test]
async fn item_entries_stay_within_their_share() {
    let (fake, _world) = common::world::start().await;
    let max: u64 = 512 * 1024;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("cache", &format!("max_bytes = {max}\nitems_percent = 40"))],
    ))
    .await;
    let share = max * 40 / 100;
    let url = gw.url("/v4/profile/portrait_get");
    for round in 0..400 {
        let accounts: Vec<String> = (0..50).map(|i| format!("u{round}_{i}")).collect();
        let body = serde_json::json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick"]});
        let a = post(&url, body.to_string()).await;
        assert_eq!(header(&a, "x-cache"), "MISS");
    }
    for i in (0..2000).step_by(7) {
        post(&gw.url(GET_LIST), format!(r#"{{"From_Account":"acc{i}"}}"#)).await;
    }
    let m = scrape(&gw).await;
    let items = metric(&m, "chat_gateway_cache_item_weighted_bytes");
    let entries = metric(&m, "chat_gateway_cache_items");
    let pages = metric(&m, "chat_gateway_cache_weighted_bytes") - items;
    assert!(items <= share as f64, "{items} > {share}");
    assert!(
        pages > 0.0 && pages <= (max - share) as f64,
        "{pages} > {}",
        max - share
    );
    assert!(
        entries > 100.0 && entries < 20_000.0,
        "evicted some, kept some: {entries}"
    );
    // An item's bytes: its slice of the answer (about 100 bytes here).
    let item_len = r#"{"To_Account":"u0_0","ResultCode":0,"ResultInfo":"","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"Tag_Profile_IM_Nick/u0_0/0"}]}"#.len();
    assert!(
        items / entries > item_len as f64 + 400.0,
        "an item weighs its bytes ({item_len}) plus its overheads: {}",
        items / entries
    );
}

// ------------------------------------------------- 2. invalidation memory

/// Invalidating a great many distinct accounts does not grow the process (the memory
/// of recent invalidations is a fixed table), and one request names at most
/// `server.max_invalidate_accounts` accounts.
#[tokio::test]
async fn invalidation_memory_is_bounded() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = gw.url("/admin/cache/invalidate");
    let names = |round: usize, n: usize| {
        let list: Vec<String> = (0..n).map(|i| format!("gone_{round}_{i:05}")).collect();
        serde_json::json!({ "From_Account": list }).to_string()
    };
    // Warm up allocator arenas, then measure.
    for round in 0..20 {
        assert_eq!(json(&post(&url, names(round, 1000)).await)["ErrorCode"], 0);
    }
    let before = metric(&scrape(&gw).await, "chat_gateway_resident_memory_bytes");
    for round in 20..320 {
        assert_eq!(json(&post(&url, names(round, 1000)).await)["ErrorCode"], 0);
    }
    let after = metric(&scrape(&gw).await, "chat_gateway_resident_memory_bytes");
    assert!(before > 0.0);
    assert!(
        after - before < 16.0 * 1024.0 * 1024.0,
        "300,000 invalidated names grew RSS by {} MiB",
        (after - before) / 1048576.0
    );
    let a = post(&url, names(999, 1001)).await;
    assert_eq!(json(&a)["ErrorCode"], 50002);
    assert!(json(&a)["ErrorInfo"]
        .as_str()
        .unwrap()
        .contains("server.max_invalidate_accounts"));
    assert_eq!(fake.count(), 0);
}

// ------------------------------------------------------- 3. body timeout

/// A head that promises 100 bytes followed by one byte, and a body trickling in a
/// byte at a time: both get 408 (60008, `body-timeout`) at the deadline and are
/// closed.
#[tokio::test]
async fn slow_bodies_get_408_and_are_closed() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", "body_read_timeout_ms = 500")],
    ))
    .await;
    let head = format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let mut stuck = RawConn::connect(gw.addr).await;
    stuck.send(head.as_bytes()).await.unwrap();
    stuck.send(b"{").await.unwrap();
    let mut trickle = RawConn::connect(gw.addr).await;
    trickle.send(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickler = tokio::spawn(async move {
        for _ in 0..30 {
            if trickle.send(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        trickle
    });
    let r = stuck.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.status, 408);
    assert_eq!(r.header("x-chat-gateway-error"), "body-timeout");
    assert_eq!(r.header("connection"), "close");
    assert_eq!(r.json()["ErrorCode"], 60008);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(stuck
        .closed_by(Instant::now() + Duration::from_secs(2))
        .await
        .is_some());
    let mut trickle = trickler.await.unwrap();
    let r = trickle.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.status, 408, "a trickle does not extend the deadline");
    assert!(trickle
        .closed_by(Instant::now() + Duration::from_secs(2))
        .await
        .is_some());
    assert_eq!(fake.count(), 0, "nothing reached Chat");
}

/// With every one of `server.max_connections` held by a caller that never finishes
/// its body, the health probes still answer (a small reserve), and a real request
/// waits for a slot instead of being refused.
#[tokio::test]
async fn health_answers_while_slow_bodies_hold_every_connection() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "server",
            "max_connections = 20\nbody_read_timeout_ms = 3000\nheader_read_timeout_ms = 3000",
        )],
    ))
    .await;
    let head = format!("POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{{");
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut c = RawConn::connect(gw.addr).await;
        c.send(head.as_bytes()).await.unwrap();
        held.push(c);
    }
    // Every slot is held: new connections are served from the reserve.
    let deadline = Instant::now() + Duration::from_secs(1);
    for probe in ["/healthz", "/readyz"] {
        let mut c = RawConn::connect(gw.addr).await;
        c.send(format!("GET {probe} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let r = c
            .response(deadline.saturating_duration_since(Instant::now()))
            .await
            .expect("a probe answered while every connection is held");
        assert_eq!(r.status, 200, "{probe}");
    }
    // A real request waits for a regular slot: the held ones time out at 3 s.
    let started = Instant::now();
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"u"}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it waited for a slot: {:?}",
        started.elapsed()
    );
    drop(held);
}

// ------------------------------------------------------ 4. linear parsing

/// A body with thousands of extra fields is refused at the cap (50002), before any
/// quadratic work, and never reaches Chat.
#[tokio::test]
async fn thousands_of_extra_fields_are_refused_at_the_cap() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", "max_body_bytes = 1048576")],
    ))
    .await;
    let mut body = String::from(r#"{"From_Account":"u""#);
    for i in 0..7000 {
        body.push_str(&format!(r#","F{i}":{i}"#));
    }
    body.push('}');
    let a = post(&gw.url(GET_LIST), body).await;
    assert_eq!(json(&a)["ErrorCode"], 50002);
    assert!(json(&a)["ErrorInfo"]
        .as_str()
        .unwrap()
        .contains("at most 256"));
    assert_eq!(header(&a, "x-chat-gateway-error"), "invalid-field");
    // 256 are fine and forwarded (sorted).
    let mut body = String::from(r#"{"From_Account":"u""#);
    for i in (0..256).rev() {
        body.push_str(&format!(r#","F{i:03}":{i}"#));
    }
    body.push('}');
    let a = post(&gw.url(GET_LIST), body).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    let sent = fake.calls()[0].body.clone();
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.find("\"F000\"").unwrap() < sent.find("\"F255\"").unwrap());
}

// ----------------------------------------------------------- 5. faithful keys

/// Requests forwarded differently never share a key: big integers keep their exact
/// text, and repeated names (at any depth) are refused.
#[tokio::test]
async fn keys_are_faithful_to_the_forwarded_body() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[("cache", "ttl_secs = 600")])).await;
    let a = post(
        &gw.url(GET_LIST),
        r#"{"From_Account":"u","X":18446744073709551616}"#,
    )
    .await;
    let b = post(
        &gw.url(GET_LIST),
        r#"{"From_Account":"u","X":18446744073709551617}"#,
    )
    .await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(
        header(&b, "x-cache"),
        "MISS",
        "a different request, a different key"
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert!(String::from_utf8_lossy(&calls[0].body).contains("\"X\":18446744073709551616"));
    assert!(String::from_utf8_lossy(&calls[1].body).contains("\"X\":18446744073709551617"));
    for body in [
        r#"{"From_Account":"u","Z":{"a":1,"a":2}}"#,
        r#"{"From_Account":"u","Z":[{"b":{"a":1,"a":2}}]}"#,
    ] {
        let r = post(&gw.url(GET_LIST), body).await;
        assert_eq!(json(&r)["ErrorCode"], 50002, "{body}");
    }
    let c = post(&gw.url(GET_LIST), r#"{"From_Account":"u","Z":{"a":2}}"#).await;
    assert_eq!(header(&c, "x-cache"), "MISS");
    assert_eq!(fake.count(), 3, "the refused ones never reached Chat");
}

// ------------------------------------------------------- 6. secrets never echoed

/// A syntax error on a secret's line names the key and the line, never the value,
/// in `check-config` and in the hot-reload log.
#[tokio::test]
async fn config_errors_never_echo_secrets() {
    let dir = tempfile::tempdir().unwrap();
    for (section, key, value) in [
        ("chat", "secret_key", "SECRET-KEY-VALUE-42"),
        ("callback", "token", "CALLBACK-TOKEN-VALUE-42"),
        ("server", "auth_tokens", "AUTH-TOKEN-VALUE-0042"),
    ] {
        // The key's line, broken (no closing quote), in its own section.
        let broken = |value_text: &str| {
            let line = format!("{key} = {value_text}");
            if section == "chat" {
                config_toml("http://127.0.0.1:9", &[])
                    .replace(&format!("secret_key = \"{SECRET}\""), &line)
            } else {
                config_toml("http://127.0.0.1:9", &[(section, &line)])
            }
        };
        let text = broken(&format!("\"{value}"));
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains(value), "{err}");
        assert!(err.contains(&format!("{section}.{key}")), "{err}");
        let line = text.lines().position(|l| l.contains(value)).unwrap() + 1;
        assert!(err.contains(&format!("line {line}")), "{err}");
        // A value of the wrong type is not echoed either.
        std::fs::write(&path, broken(&format!("{{ x = \"{value}\" }}"))).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains(value), "{err}");
    }

    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let mut text = std::fs::read_to_string(&gw.config_path).unwrap();
    text = text.replace(
        &format!("secret_key = \"{SECRET}\""),
        "secret_key = \"NEW-SECRET-VALUE-4242",
    );
    std::fs::write(&gw.config_path, text).unwrap();
    assert!(
        gw.wait_log("config reload rejected", Duration::from_secs(3))
            .await
    );
    let log = gw.log_text();
    assert!(!log.contains("NEW-SECRET-VALUE-4242"), "{log}");
    assert!(log.contains("chat.secret_key"), "{log}");
}

// --------------------------------------------------------------- 7. logs

/// Every line a get_list miss causes carries its request id, also from the fetch
/// task; an answer that is not an envelope is logged at WARN with its status,
/// content-type and length, never its body.
#[tokio::test]
async fn get_list_failures_are_logged_with_the_request_id() {
    const PAGE: &str = "<html>SECRET-PAGE-BODY</html>";
    let fake = FakeChat::start(Box::new(|_, _| Reply::Status(200, PAGE.into()))).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[("retry", "max_attempts = 1")])).await;
    let a = send(
        http::Request::post(gw.url(GET_LIST))
            .header("x-request-id", "req-nonenvelope-1")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"From_Account":"u"}"#,
            )))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(a.0, 502);
    assert!(
        gw.wait_log("without an envelope", Duration::from_secs(2))
            .await
    );
    let line = gw
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("without an envelope"))
        .cloned()
        .unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("req-nonenvelope-1"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains(&format!("length={}", PAGE.len())), "{line}");
    assert!(!gw.log_text().contains("SECRET-PAGE-BODY"));

    // A transport failure in the fetch task: its line carries the request id too.
    fake.stop();
    let gw2 = Gateway::start(&config_toml(
        &format!("http://{}", dead_addr()),
        &[("retry", "max_attempts = 1")],
    ))
    .await;
    send(
        http::Request::post(gw2.url(GET_LIST))
            .header("x-request-id", "req-transport-2")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                r#"{"From_Account":"u"}"#,
            )))
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(
        gw2.wait_log("call to Chat failed", Duration::from_secs(2))
            .await
    );
    let text = gw2.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("call to Chat failed"))
        .unwrap();
    assert!(line.contains("req-transport-2"), "{line}");
}

// ----------------------------------------------------------- 8. log.level

/// A `log.level` that is no level (`verbose`) is refused, naming the key, at
/// start-up and on reload.
#[tokio::test]
async fn a_bad_log_level_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        config_toml("http://127.0.0.1:9", &[("log", "level = \"verbose\"")]),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.level"));

    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let text = std::fs::read_to_string(&gw.config_path)
        .unwrap()
        .replace("level = \"info\"", "level = \"chatty\"");
    std::fs::write(&gw.config_path, text).unwrap();
    assert!(
        gw.wait_log("config reload rejected", Duration::from_secs(3))
            .await
    );
    assert!(gw.log_text().contains("log.level"));
}

// ---------------------------------------------------------- 9. retry budget

/// A gateway with four attempts and the stock 20% budget, a reserve of one retry a
/// second, and a rate limit high enough not to matter.
async fn budget_gateway(fake: &FakeChat) -> Gateway {
    Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "retry",
                "max_attempts = 4\nbudget_percent = 20\nbudget_min_per_sec = 1",
            ),
            ("ratelimit", "per_command_per_sec = 100000"),
        ],
    ))
    .await
}

/// 600 distinct get_list requests, ten callers at a time; how many got ErrorCode 0.
async fn six_hundred_requests(gw: &Gateway, prefix: &str) -> usize {
    let ok_count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..10 {
        let (url, ok_count, prefix) = (gw.url(GET_LIST), ok_count.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            for i in 0..60 {
                let a = post(&url, format!(r#"{{"From_Account":"{prefix}_{w}_{i}"}}"#)).await;
                if json(&a)["ErrorCode"] == 0 {
                    ok_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ok_count.load(Ordering::Relaxed)
}

/// With 30% of calls failing 50004/50005 (each request and attempt fated by a hash,
/// so the run is the same whatever the interleaving) and four attempts, at least
/// 98.5% of 600 distinct get_list requests succeed: successful retries earn budget.
#[tokio::test]
async fn retries_that_work_are_not_starved_by_the_budget() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        // The attempt number is not in the request: count per account.
        static SEEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, u32>>> =
            std::sync::LazyLock::new(Default::default);
        let attempt = {
            let mut seen = SEEN.lock().unwrap();
            let n = seen.entry(acc.clone()).or_default();
            *n += 1;
            *n
        };
        let x = unit_hash(&format!("{acc}#{attempt}"));
        if x < 0.15 {
            Reply::Json(chat_error(50004), Duration::ZERO)
        } else if x < 0.30 {
            Reply::Json(chat_error(50005), Duration::ZERO)
        } else {
            Reply::Json(page_for(&acc, 0), Duration::ZERO)
        }
    }))
    .await;
    let gw = budget_gateway(&fake).await;
    let succeeded = six_hundred_requests(&gw, "flaky").await;
    let calls = fake.count();
    eprintln!("30% faults: {succeeded} of 600 succeeded with {calls} upstream calls");
    // What 30% independent faults and four attempts allow at best: 1 - 0.3^4.
    assert!(
        succeeded >= 591,
        "{succeeded} of 600 succeeded ({calls} calls)"
    );
    let fault_rate = 1.0 - 600.0 / calls as f64;
    assert!(
        (0.2..0.4).contains(&fault_rate),
        "about 30% of calls failed: {fault_rate:.3}"
    );
}

/// With Chat failing every call, the budget holds the load on Chat to at most 1.25
/// calls per request (20% plus the small per-second reserve), four attempts or not.
#[tokio::test]
async fn futile_retries_stay_within_the_budget() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(50004), Duration::ZERO)
    }))
    .await;
    let gw = budget_gateway(&fake).await;
    assert_eq!(six_hundred_requests(&gw, "down").await, 0);
    let per_request = fake.count() as f64 / 600.0;
    eprintln!(
        "100% faults: {} upstream calls for 600 requests",
        fake.count()
    );
    assert!(per_request <= 1.25, "{per_request:.3} calls per request");
    assert!(
        per_request >= 1.1,
        "retries were still made: {per_request:.3}"
    );
}

// ------------------------------------------------------------ 10. limiter

/// "N per second" means N in any one-second window with bursts, not a refusal
/// whenever the next slot is not free at once: a retry (after 50004, or after a
/// UserSig renewal) right after its first attempt, which finds its slot one pace
/// (1.06 s / 2 = 530 ms) away, waits for that slot within the deadline, even with
/// `max_wait_ms = 0`, instead of failing with 60007.
#[tokio::test]
async fn a_retry_waits_for_its_slot_instead_of_failing() {
    let fail_next = Arc::new(AtomicUsize::new(0));
    let f = fail_next.clone();
    let fake = FakeChat::start(Box::new(move |_, _| match f.swap(0, Ordering::SeqCst) {
        0 => Reply::Json(ok(), Duration::ZERO),
        code => Reply::Json(chat_error(code as i64), Duration::ZERO),
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("ratelimit", "per_command_per_sec = 2\nmax_wait_ms = 0"),
            ("retry", "max_attempts = 3"),
        ],
    ))
    .await;
    let url = gw.url(GET_CONTACT_GROUP);
    for code in [50004, 70001] {
        // Idle for more than a window: the first attempt goes at once.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        fake.reset();
        fail_next.store(code, Ordering::SeqCst);
        let a = post(&url, r#"{"From_Account":"u"}"#).await;
        assert_eq!(json(&a)["ErrorCode"], 0, "after {code}: {:?}", a.2);
        let calls = fake.calls();
        assert_eq!(
            calls.len(),
            2,
            "after {code}: the first attempt and its retry"
        );
        let gap = calls[1].at.duration_since(calls[0].at);
        assert!(
            gap >= Duration::from_millis(500),
            "after {code}: the retry waited for its slot, one pace later ({gap:?})"
        );
    }
    // A first attempt with max_wait_ms = 0 is refused while the next slot is ahead.
    let a = post(&url, r#"{"From_Account":"u"}"#).await;
    assert_eq!(a.0, 429, "{:?}", a.2);
    assert_eq!(json(&a)["ErrorCode"], 60007);
}
