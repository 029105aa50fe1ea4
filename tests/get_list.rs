//! The cached get_list route against the real binary and a fake Chat that asserts what
//! it receives.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";

/// Asserts everything Chat must see on a get_list call.
fn assert_upstream_request(r: &Recorded, account: &str) {
    assert_eq!(r.path, GET_LIST);
    r.assert_gateway_credentials();
    let b = r.json();
    assert_eq!(b["From_Account"], account);
    for f in [
        "TimeStamp",
        "StartIndex",
        "TopTimeStamp",
        "TopStartIndex",
        "AssistFlags",
    ] {
        assert!(b[f].is_u64(), "{f} missing from {b}");
    }
}

#[tokio::test]
async fn hit_miss_and_ttl() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[("cache", "ttl_secs = 1")])).await;
    let url = gw.url(GET_LIST);

    let a = post(&url, r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-cache"), "MISS");
    let stored = Instant::now();
    assert_eq!(fake.count(), 1);
    assert_upstream_request(&fake.calls()[0], "user_0001");
    let b = fake.calls()[0].json();
    assert_eq!(b["AssistFlags"], 63, "default AssistFlags");
    assert_eq!(b["TimeStamp"], 0);

    // Same page, other field order and spacing: a HIT, byte for byte, no upstream call.
    let h = post(
        &url,
        "{ \"AssistFlags\": 63, \"TimeStamp\":0,\n \"From_Account\" : \"user_0001\" }",
    )
    .await;
    assert_eq!(header(&h, "x-cache"), "HIT");
    assert_eq!(h.2, a.2);
    assert!(header(&h, "age").parse::<u64>().is_ok(), "age on hits");
    assert_eq!(fake.count(), 1);

    // Another page, another account: MISSes.
    let p = post(&url, r#"{"From_Account":"user_0001","TimeStamp":5}"#).await;
    assert_eq!(header(&p, "x-cache"), "MISS");
    let o = post(&url, r#"{"From_Account":"user_0002"}"#).await;
    assert_eq!(header(&o, "x-cache"), "MISS");
    assert_eq!(fake.count(), 3);
    assert_ne!(json(&o)["SessionItem"], json(&a)["SessionItem"]);

    // After the 1 s TTL it is a MISS again.
    let elapsed = stored.elapsed();
    if elapsed < Duration::from_millis(1100) {
        tokio::time::sleep(Duration::from_millis(1100) - elapsed).await;
    }
    let m = post(&url, r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(header(&m, "x-cache"), "MISS");
    assert_eq!(fake.count(), 4);
}

#[tokio::test]
async fn concurrent_identical_cold_requests_make_one_upstream_call() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _| {
        Reply::Json(
            page_for(r.json()["From_Account"].as_str().unwrap(), 0),
            Duration::from_millis(300),
        )
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = Arc::new(gw.url(GET_LIST));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            post(&url, r#"{"From_Account":"user_0042"}"#).await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.0, 200);
        bodies.push(a.2);
    }
    assert_eq!(fake.count(), 1, "exactly one upstream call");
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "all got the same body"
    );
    let m = get(&gw.url("/metrics")).await.unwrap();
    let text = String::from_utf8_lossy(&m.2);
    let coalesced = metric(&text, "chat_gateway_coalesced_waits_total");
    let hits = metric(&text, "chat_gateway_cache_requests_total{result=\"hit\"}");
    assert_eq!(coalesced + hits, 199.0, "the others waited or hit: {text}");
}

#[tokio::test]
async fn transient_errors_are_retried_and_final_ones_are_not() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        if n <= 2 {
            Reply::Json(chat_error(50004), Duration::ZERO)
        } else {
            Reply::Json(
                page_for(r.json()["From_Account"].as_str().unwrap(), 0),
                Duration::ZERO,
            )
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = gw.url(GET_LIST);
    let a = post(&url, r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 0, "50004 twice then success");
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(fake.count(), 3);
    let randoms: std::collections::HashSet<_> = fake
        .calls()
        .iter()
        .map(|c| c.query["random"].clone())
        .collect();
    assert_eq!(randoms.len(), 3, "a fresh random per attempt");

    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(50004), Duration::ZERO)
    }));
    let a = post(&url, r#"{"From_Account":"user_0002"}"#).await;
    assert_eq!(a.0, 200);
    assert_eq!(json(&a)["ErrorCode"], 50004, "the last upstream envelope");
    assert_eq!(fake.count(), 3, "max_attempts = 3 calls");

    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(50001), Duration::ZERO)
    }));
    let a = post(&url, r#"{"From_Account":"nobody"}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 50001);
    assert_eq!(header(&a, "x-cache"), "BYPASS");
    assert_eq!(fake.count(), 1, "50001 is not retried");
    let a = post(&url, r#"{"From_Account":"nobody"}"#).await;
    assert_eq!(json(&a)["ErrorCode"], 50001);
    assert_eq!(fake.count(), 2, "50001 is not cached");

    fake.reset();
    fake.set_responder(Box::new(|_, _| Reply::Status(502, "bad gateway".into())));
    let a = post(&url, r#"{"From_Account":"user_0003"}"#).await;
    assert_eq!(a.0, 502, "no envelope after retries: 502");
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-unavailable");
    assert_eq!(fake.count(), 3);
}

#[tokio::test]
async fn upstream_timeout_is_504_and_connection_refused_is_502() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(0), Duration::from_secs(5))
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 300")],
    ))
    .await;
    let started = Instant::now();
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 504);
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the deadline covers the retries"
    );

    // Nothing listens on the port any more.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = Gateway::start(&config_toml(&format!("http://{dead}"), &[])).await;
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 502);
    assert_eq!(json(&a)["ErrorCode"], 50005);
}

#[tokio::test]
async fn invalid_requests_get_envelopes_and_never_reach_chat() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", "max_body_bytes = 1024")],
    ))
    .await;
    let url = gw.url(GET_LIST);
    for (body, status, code, reason) in [
        ("{not json".to_string(), 200, 60003, "invalid-json"),
        ("".to_string(), 200, 60003, "invalid-json"),
        (
            r#"{"TimeStamp":0}"#.to_string(),
            200,
            50002,
            "invalid-field",
        ),
        (
            r#"{"From_Account":""}"#.to_string(),
            200,
            50002,
            "invalid-field",
        ),
        (
            r#"{"From_Account":"u","StartIndex":"x"}"#.to_string(),
            200,
            50002,
            "invalid-field",
        ),
        (
            format!(r#"{{"From_Account":"u","Pad":"{}"}}"#, "x".repeat(2000)),
            413,
            60008,
            "body-too-large",
        ),
    ] {
        let a = post(&url, body.clone()).await;
        assert_eq!(a.0, status, "{body:.40}");
        let v = json(&a);
        assert_eq!(v["ActionStatus"], "FAIL");
        assert_eq!(v["ErrorCode"], code, "{body:.40}");
        assert!(v["ErrorInfo"].as_str().unwrap().len() > 5, "a clear reason");
        assert_eq!(header(&a, "x-chat-gateway-error"), reason);
    }
    let a = get(&url).await.unwrap();
    assert_eq!(a.0, 405);
    assert_eq!(fake.count(), 0, "no invalid request reached Chat");
}

#[tokio::test]
async fn caller_credentials_in_the_query_never_reach_chat() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = gw.url(&format!(
        "{GET_LIST}?sdkappid=1&identifier=someone&usersig=forged&random=7&contenttype=xml"
    ));
    let a = post(
        &url,
        r#"{"From_Account":"user_0009","Extra":{"b":1,"a":2}}"#,
    )
    .await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_upstream_request(&calls[0], "user_0009");
    assert!(!calls[0].raw_query.contains("forged") && !calls[0].raw_query.contains("someone"));
    assert_eq!(
        calls[0].json()["Extra"]["a"],
        2,
        "unknown fields are forwarded"
    );
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_and_refuses_new_connections() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _| {
        Reply::Json(
            page_for(r.json()["From_Account"].as_str().unwrap(), 0),
            Duration::from_secs(1),
        )
    }))
    .await;
    let mut gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = gw.url(GET_LIST);
    let slow = tokio::spawn(async move { post(&url, r#"{"From_Account":"user_0001"}"#).await });
    // Wait until the request is at Chat, then signal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.count() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.signal(libc::SIGTERM);
    // New connections are refused once the listener is closed.
    let addr = gw.addr;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(_) => {
                assert!(Instant::now() < deadline, "still accepting after SIGTERM");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let a = slow.await.unwrap();
    assert_eq!(a.0, 200);
    assert_eq!(
        json(&a)["ErrorCode"],
        0,
        "the in-flight caller got its answer"
    );
    let status = tokio::task::spawn_blocking(move || gw.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn cache_metrics_are_exported() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let url = gw.url(GET_LIST);
    post(&url, r#"{"From_Account":"user_0001"}"#).await;
    post(&url, r#"{"From_Account":"user_0001"}"#).await;
    let m = get(&gw.url("/metrics")).await.unwrap();
    let text = String::from_utf8_lossy(&m.2).to_string();
    assert_eq!(
        metric(&text, "chat_gateway_cache_requests_total{result=\"hit\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "chat_gateway_cache_requests_total{result=\"miss\"}"),
        1.0
    );
    assert_eq!(metric(&text, "chat_gateway_cache_entries"), 1.0);
    assert_eq!(metric(&text, "chat_gateway_cache_pages"), 1.0);
    assert!(metric(&text, "chat_gateway_cache_weighted_bytes") > 100.0);
    assert!(
        text.contains(
            "chat_gateway_upstream_calls_total{command=\"recentcontact/get_list\",code=\"0\"} 1"
        ),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "chat_gateway_upstream_latency_seconds_count{command=\"recentcontact/get_list\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(text.contains("chat_gateway_requests_total{route=\"get_list\",outcome=\"hit\"} 1"));
    assert!(!text.contains(SECRET));
}
