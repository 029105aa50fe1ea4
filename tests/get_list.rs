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

/// One deadline covers a request's whole exchange with Chat, retries included: an
/// attempt that times out has spent it, so nothing is retried and the caller gets 504.
#[tokio::test]
async fn upstream_timeout_is_504_and_connection_refused_is_502() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(0), Duration::from_secs(10))
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 300")],
    ))
    .await;
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 504);
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-timeout");
    assert_eq!(header(&a, "x-cache"), "BYPASS");
    // A deadline per attempt would have made max_attempts = 3 calls.
    assert_eq!(fake.count(), 1, "the timed-out attempt spent the deadline");

    // A transient error, then a hang: the retry gets what is left of the deadline,
    // not a deadline of its own, so there is no third call.
    let fake = FakeChat::start(Box::new(|_, n| {
        if n == 1 {
            Reply::Json(chat_error(50004), Duration::from_millis(100))
        } else {
            Reply::Json(chat_error(0), Duration::from_secs(10))
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 1000")],
    ))
    .await;
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 504, "{:?}", json(&a));
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-timeout");
    let calls = fake.count();
    // 2 (50004, then the retry that times out); 1 if this machine was so slow that
    // the first answer came after the deadline.
    assert!(
        (1..=2).contains(&calls),
        "{calls} calls within one deadline"
    );

    // Nothing listens on the port any more.
    let dead = dead_addr();
    let gw = Gateway::start(&config_toml(&format!("http://{dead}"), &[])).await;
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 502);
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-unavailable");
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
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
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
    let status = gw.exited(Duration::from_secs(5)).await.expect("exits");
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

/// Waits until `cond` holds, at most 10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A counter or gauge of the gateway's `/metrics`.
async fn scrape(gw: &Gateway, name: &str) -> f64 {
    let m = get(&gw.url("/metrics")).await.unwrap();
    metric(&String::from_utf8_lossy(&m.2), name)
}

/// A get_list request with a `Cache-Control` header.
async fn post_cc(gw: &Gateway, body: &str, cache_control: &str) -> Answer {
    send(
        http::Request::post(gw.url(GET_LIST))
            .header("content-type", "application/json")
            .header("cache-control", cache_control)
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap(),
    )
    .await
    .unwrap()
}

/// `Cache-Control: no-cache` and `no-store` skip the lookup (`BYPASS`, Chat asked)
/// and refresh the stored page: the next plain request is a hit on the new page.
#[tokio::test]
async fn no_cache_and_no_store_refresh_the_stored_page() {
    // Every call to Chat answers a new version of the page (its TimeStamp).
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        let acc = r.json()["From_Account"].as_str().unwrap().to_string();
        Reply::Json(page_for(&acc, n as u64), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[("cache", "ttl_secs = 600")])).await;
    let body = r#"{"From_Account":"refresh"}"#;
    let first = post(&gw.url(GET_LIST), body).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(json(&first)["TimeStamp"], 1);
    assert_eq!(
        header(&post(&gw.url(GET_LIST), body).await, "x-cache"),
        "HIT"
    );
    for (i, directive) in ["no-cache", "no-store"].into_iter().enumerate() {
        let version = i as u64 + 2;
        let b = post_cc(&gw, body, directive).await;
        assert_eq!(header(&b, "x-cache"), "BYPASS", "{directive}");
        assert_eq!(
            json(&b)["TimeStamp"],
            version,
            "{directive}: Chat's new page"
        );
        assert_eq!(fake.count() as u64, version, "{directive}: Chat was asked");
        let h = post(&gw.url(GET_LIST), body).await;
        assert_eq!(header(&h, "x-cache"), "HIT", "{directive}");
        assert_eq!(
            h.2, b.2,
            "{directive}: the stored page is the refreshed one"
        );
    }
    assert_eq!(fake.count(), 3);
}

/// The fetch of a miss runs as its own task: a caller that goes away while it is at
/// Chat cancels nothing, neither for the callers waiting on the same fetch nor for
/// the page it stores. The callers leave over HTTP/2, where a closed connection
/// drops the request's handler.
#[tokio::test]
async fn a_caller_that_disconnects_cancels_nothing() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = FakeChat::start({
        let gate = gate.clone();
        Box::new(move |r: &Recorded, _| {
            let acc = r.json()["From_Account"].as_str().unwrap().to_string();
            Reply::Gated(page_for(&acc, 0), gate.clone())
        })
    })
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 600"),
            ("chat", "request_timeout_ms = 60000"),
        ],
    ))
    .await;
    let connections = "chat_gateway_open_connections{listener=\"main\"}";

    // An HTTP/2 caller whose request for `account` is at Chat; dropping the two
    // handles closes its connection.
    let h2_caller = |account: &'static str| {
        let addr = gw.addr;
        async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            let conn = tokio::spawn(conn);
            let req = http::Request::post(format!("http://{addr}{GET_LIST}"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                    r#"{{"From_Account":"{account}"}}"#
                ))))
                .unwrap();
            let request = tokio::spawn(async move { sender.send_request(req).await.map(|_| ()) });
            (request, conn)
        }
    };

    for (round, account) in ["alone", "with_a_follower"].into_iter().enumerate() {
        let (request, conn) = h2_caller(account).await;
        wait_until("the request is at Chat", || fake.count() == round + 1).await;
        // A second caller of the same page joins the fetch (over HTTP/1.1).
        let follower = (account == "with_a_follower").then(|| {
            let url = gw.url(GET_LIST);
            tokio::spawn(
                async move { post(&url, format!(r#"{{"From_Account":"{account}"}}"#)).await },
            )
        });
        if follower.is_some() {
            // Its connection is open (with the first caller's and the scrape's).
            let deadline = Instant::now() + Duration::from_secs(10);
            while scrape(&gw, connections).await < 3.0 {
                assert!(Instant::now() < deadline, "the follower never connected");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // The first caller goes away, and the gateway sees its connection close
        // (the scrape's own connection is the one left, with the follower's).
        request.abort();
        conn.abort();
        let left = if follower.is_some() { 2.0 } else { 1.0 };
        let deadline = Instant::now() + Duration::from_secs(10);
        while scrape(&gw, connections).await > left {
            assert!(Instant::now() < deadline, "the connection never closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Chat answers now.
        gate.add_permits(1);
        if let Some(f) = follower {
            let a = f.await.unwrap();
            assert_eq!(a.0, 200);
            assert_eq!(json(&a)["ErrorCode"], 0, "the follower got the page");
            assert_eq!(header(&a, "x-cache"), "MISS");
            assert_eq!(
                scrape(&gw, "chat_gateway_coalesced_waits_total").await,
                1.0,
                "it waited on the first caller's fetch"
            );
        }
        // The fetch runs to its end and stores the page with nobody asking again
        // (an abandoned fetch would wait for the next caller to resume it).
        let deadline = Instant::now() + Duration::from_secs(10);
        while scrape(&gw, "chat_gateway_cache_pages").await < (round + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "{account}: the page was never stored"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let a = post(
            &gw.url(GET_LIST),
            format!(r#"{{"From_Account":"{account}"}}"#),
        )
        .await;
        assert_eq!(header(&a, "x-cache"), "HIT", "{account}");
        assert_eq!(json(&a)["ErrorCode"], 0);
        assert_eq!(fake.count(), round + 1, "{account}: one call to Chat");
    }
}

/// A failed fetch is not cached, and every caller waiting on it gets its error:
/// Chat's envelope, or the gateway's own error when Chat did not answer in time.
///
/// Nothing tells when a caller has joined a fetch (the coalesced-wait counter moves
/// once the fetch is done), so a caller that came late may start a fetch of its
/// own: what holds whatever the timing is that each call to Chat answered its
/// caller and every caller that waited on it, all with the error.
#[tokio::test]
async fn every_waiter_gets_the_failed_fetchs_error() {
    const CALLERS: usize = 20;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = FakeChat::start({
        let gate = gate.clone();
        Box::new(move |r: &Recorded, _| {
            match r.json()["From_Account"].as_str().unwrap() {
                // Chat's final answer (not retried), held until the test lets it go.
                "refused" => Reply::Gated(chat_error(50001), gate.clone()),
                // No answer within the deadline.
                _ => Reply::Json(chat_error(0), Duration::from_secs(30)),
            }
        })
    })
    .await;
    for (account, timeout_ms) in [("refused", 60_000), ("silent", 1_500)] {
        let gw = Gateway::start(&config_toml(
            &fake.url(),
            &[("chat", &format!("request_timeout_ms = {timeout_ms}"))],
        ))
        .await;
        let before = fake.count();
        let url = Arc::new(gw.url(GET_LIST));
        let mut callers = Vec::new();
        for _ in 0..CALLERS {
            let url = url.clone();
            callers.push(tokio::spawn(async move {
                post(&url, format!(r#"{{"From_Account":"{account}"}}"#)).await
            }));
        }
        wait_until("the fetch is at Chat", || fake.count() > before).await;
        if account == "refused" {
            // Every caller's connection is open (and the scrape's) before Chat answers.
            let deadline = Instant::now() + Duration::from_secs(10);
            while scrape(&gw, "chat_gateway_open_connections{listener=\"main\"}").await
                < (CALLERS + 1) as f64
            {
                assert!(Instant::now() < deadline, "the callers never all connected");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gate.add_permits(CALLERS);
        }
        for c in callers {
            let a = c.await.unwrap();
            assert_eq!(header(&a, "x-cache"), "BYPASS", "{account}");
            if account == "refused" {
                assert_eq!(a.0, 200);
                assert_eq!(json(&a)["ErrorCode"], 50001, "{account}: Chat's envelope");
            } else {
                assert_eq!(a.0, 504);
                assert_eq!(json(&a)["ErrorCode"], 50005, "{account}");
                assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-timeout");
            }
        }
        let calls = fake.count() - before;
        let waited = scrape(&gw, "chat_gateway_coalesced_waits_total").await as usize;
        eprintln!("{account}: {CALLERS} callers, {calls} calls to Chat, {waited} waited");
        assert_eq!(
            calls + waited,
            CALLERS,
            "{account}: each caller called or waited"
        );
        assert!(waited >= 1, "{account}: no caller waited on a fetch");
        // Not cached: the next request asks Chat again.
        if account == "refused" {
            gate.add_permits(1);
            let a = post(&url, r#"{"From_Account":"refused"}"#).await;
            assert_eq!(json(&a)["ErrorCode"], 50001);
            assert_eq!(fake.count() - before, calls + 1);
        }
    }
}

/// A fetch that began before an invalidation of its account answers its caller
/// (Chat's success, `x-cache: BYPASS`) but does not store the possibly pre-write page.
#[tokio::test]
async fn a_fetch_overtaken_by_an_invalidation_is_answered_not_stored() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = FakeChat::start({
        let gate = gate.clone();
        Box::new(move |r: &Recorded, n| {
            let acc = r.json()["From_Account"].as_str().unwrap().to_string();
            if n == 1 {
                Reply::Gated(page_for(&acc, 1), gate.clone())
            } else {
                Reply::Json(page_for(&acc, n as u64), Duration::ZERO)
            }
        })
    })
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 600"),
            ("chat", "request_timeout_ms = 60000"),
        ],
    ))
    .await;
    let body = r#"{"From_Account":"overtaken"}"#;
    let url = gw.url(GET_LIST);
    let first = tokio::spawn(async move { post(&url, body).await });
    wait_until("the fetch is at Chat", || fake.count() == 1).await;
    // A write lands (here: the admin endpoint) while Chat is answering the read.
    let inv = post(
        &gw.url("/admin/cache/invalidate"),
        r#"{"From_Account":"overtaken"}"#,
    )
    .await;
    assert_eq!(json(&inv)["ErrorCode"], 0);
    gate.add_permits(1);
    let a = first.await.unwrap();
    assert_eq!(a.0, 200);
    assert_eq!(json(&a)["ErrorCode"], 0, "the caller gets Chat's answer");
    assert_eq!(json(&a)["TimeStamp"], 1);
    assert_eq!(header(&a, "x-cache"), "BYPASS", "answered, not stored");
    // Not stored: the next request asks Chat, and that page is stored.
    let b = post(&gw.url(GET_LIST), body).await;
    assert_eq!(header(&b, "x-cache"), "MISS");
    assert_eq!(json(&b)["TimeStamp"], 2);
    let c = post(&gw.url(GET_LIST), body).await;
    assert_eq!(header(&c, "x-cache"), "HIT");
    assert_eq!(c.2, b.2);
    assert_eq!(fake.count(), 2);
    assert_eq!(
        scrape(&gw, "chat_gateway_cache_requests_total{result=\"bypass\"}").await,
        1.0
    );
}
