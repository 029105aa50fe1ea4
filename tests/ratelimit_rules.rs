//! The rate limit's and the retry policy's smaller promises, against the real binary
//! and a fake Chat that records every call: per-command rates, the wait capped by the
//! request's deadline, a rate-limited get_list miss served stale, each of Chat's
//! throttling codes, the UserSig codes, and the retry bucket.

mod common;

use std::time::Duration;

use common::*;

const CONTACT_GROUP: &str = "/v4/recentcontact/get_contact_group";
const ONLINE: &str = "/v4/openim/query_online_status";
const SENDMSG: &str = "/v4/openim/sendmsg";
const SEND_BODY: &str = r#"{"SyncOtherMachine":2,"From_Account":"a","To_Account":"b","MsgRandom":1,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}"#;

fn ok() -> serde_json::Value {
    serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ContactItem":[]})
}

/// Sends `n` requests to `path` at once; returns (served, refused with 60007).
async fn burst(gw: &Gateway, path: &str, n: usize) -> (usize, usize) {
    let url = std::sync::Arc::new(gw.url(path));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                post(
                    &url,
                    format!(r#"{{"From_Account":"u{i}","To_Account":["u{i}"]}}"#),
                )
                .await
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap();
        match json(&a)["ErrorCode"].as_i64() {
            Some(0) => served += 1,
            Some(60007) => {
                assert_eq!(a.0, 429);
                assert_eq!(header(&a, "x-chat-gateway-error"), "rate-limited");
                refused += 1;
            }
            other => panic!("unexpected {other:?}: {:?}", a.2),
        }
    }
    (served, refused)
}

/// `[ratelimit.commands]` gives a command its own rate: 30 callers at once of a
/// command limited to 5 get at most 5 calls a second through, and those whose slot
/// is further than `max_wait_ms` (1 s) are refused, while 30 of a command on the
/// default 200 all go.
#[tokio::test]
async fn a_per_command_rate_holds_that_command_only() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    // The gateway runs favoured: what arrives at Chat is the schedule's, not a busy
    // machine's stalls (the limit leaves 40 ms for the way to Chat).
    let gw = Gateway::start_prepared(
        &config_toml(
            &fake.url(),
            &[
                ("ratelimit", "per_command_per_sec = 200\nmax_wait_ms = 1000"),
                ("ratelimit.commands", "\"openim/query_online_status\" = 5"),
            ],
        ),
        favoured,
    )
    .await;
    let (served, refused) = burst(&gw, ONLINE, 30).await;
    assert_eq!(served + refused, 30);
    let mut times: Vec<_> = fake.calls().iter().map(|c| c.at).collect();
    assert_eq!(times.len(), served);
    times.sort();
    for (i, t) in times.iter().enumerate() {
        let within = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(within <= 5, "{within} calls within a second (limit 5)");
    }
    // Within a wait of 1 s: one window's 5 and a few of the next, never 30.
    assert!(
        (1..=12).contains(&served),
        "{served} calls of a command limited to 5 a second"
    );
    let (served, refused) = burst(&gw, CONTACT_GROUP, 30).await;
    assert_eq!(
        (served, refused),
        (30, 0),
        "another command keeps the default rate"
    );
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "chat_gateway_rate_limited_total{command=\"openim/query_online_status\"}"
        ),
        (30 - times.len()) as f64
    );
}

/// A first attempt waits for its slot up to `ratelimit.max_wait_ms`, but never past
/// the request's deadline: with a slot a second away, `max_wait_ms = 5000` and a
/// 400 ms deadline, the caller is refused at once (429) instead of waiting and going.
#[tokio::test]
async fn the_wait_for_a_slot_is_capped_by_the_deadline() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("chat", "request_timeout_ms = 400"),
            ("ratelimit", "per_command_per_sec = 1\nmax_wait_ms = 5000"),
        ],
    ))
    .await;
    let body = r#"{"From_Account":"a","StartIndex":0}"#;
    let a = post(&gw.url(CONTACT_GROUP), body).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    let b = post(&gw.url(CONTACT_GROUP), body).await;
    assert_eq!(b.0, 429, "{:?}", b.2);
    assert_eq!(json(&b)["ErrorCode"], 60007);
    let after: u64 = header(&b, "retry-after").parse().expect("retry-after");
    assert!(after >= 1, "{after}");
    assert_eq!(fake.count(), 1, "the refused caller never reached Chat");

    // With room in the deadline the same caller waits and goes.
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("chat", "request_timeout_ms = 5000"),
            ("ratelimit", "per_command_per_sec = 1\nmax_wait_ms = 5000"),
        ],
    ))
    .await;
    fake.reset();
    assert_eq!(
        json(&post(&gw.url(CONTACT_GROUP), body).await)["ErrorCode"],
        0
    );
    assert_eq!(
        json(&post(&gw.url(CONTACT_GROUP), body).await)["ErrorCode"],
        0
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1].at.duration_since(calls[0].at) >= Duration::from_secs(1),
        "the second waited for its slot, a window later"
    );
}

/// A get_list miss refused by the rate limit is answered from the stale page when
/// there is one (x-cache STALE, with its age), and reaches Chat no more.
#[tokio::test]
async fn a_rate_limited_get_list_miss_is_served_stale() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        let acc = r.json()["From_Account"].as_str().unwrap_or("").to_string();
        Reply::Json(page_for(&acc, n as u64), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 1\nstale_if_error_secs = 60"),
            ("ratelimit", "per_command_per_sec = 1\nmax_wait_ms = 0"),
        ],
    ))
    .await;
    let url = gw.url("/v4/recentcontact/get_list");
    let first = post(&url, r#"{"From_Account":"u"}"#).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    // The page's TTL passes (a fixed wait for time itself, not for the gateway).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Another account's miss takes the command's one slot of this second...
    let other = post(&url, r#"{"From_Account":"v"}"#).await;
    assert_eq!(header(&other, "x-cache"), "MISS", "{:?}", other.2);
    // ...so u's refresh is refused by the limiter and its stale page served.
    let again = post(&url, r#"{"From_Account":"u"}"#).await;
    assert_eq!(again.0, 200, "{:?}", again.2);
    assert_eq!(header(&again, "x-cache"), "STALE");
    assert!(header(&again, "age").parse::<u64>().unwrap() >= 1);
    assert_eq!(json(&again), json(&first), "the stored page");
    assert_eq!(fake.count(), 2, "the refused refresh never reached Chat");
}

/// Each of Chat's throttling codes pauses the command for a second and a read is
/// retried after the pause (a write gets Chat's answer, sent once); 70050 pauses it
/// for a minute, so the read gets Chat's answer and the next call of that command is
/// refused by the gateway without reaching Chat, while other commands go on.
#[tokio::test]
async fn each_throttling_code_pauses_the_command() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let body = r#"{"From_Account":"a","StartIndex":0}"#;
    for code in [60007, 60011, 60018, 60019] {
        fake.reset();
        fake.set_responder(Box::new(move |_, n| {
            if n == 1 {
                Reply::Json(chat_error(code), Duration::ZERO)
            } else {
                Reply::Json(ok(), Duration::ZERO)
            }
        }));
        let a = post(&gw.url(CONTACT_GROUP), body).await;
        assert_eq!(
            json(&a)["ErrorCode"],
            0,
            "{code}: the read retried after the pause"
        );
        let calls = fake.calls();
        assert_eq!(calls.len(), 2, "{code}");
        assert!(
            calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(950),
            "{code}: the retry waited out the pause"
        );

        fake.reset();
        fake.set_responder(Box::new(move |_, _| {
            Reply::Json(chat_error(code), Duration::ZERO)
        }));
        let w = post(&gw.url(SENDMSG), SEND_BODY).await;
        assert_eq!(json(&w)["ErrorCode"], code, "a write gets Chat's answer");
        assert_eq!(fake.count(), 1, "{code}: a write is sent once");
    }

    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(70050), Duration::ZERO)
    }));
    let a = post(&gw.url(ONLINE), r#"{"To_Account":["a"]}"#).await;
    assert_eq!(
        json(&a)["ErrorCode"],
        70050,
        "the minute's pause never fits a deadline"
    );
    assert_eq!(fake.count(), 1);
    fake.set_responder(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO)));
    let b = post(&gw.url(ONLINE), r#"{"To_Account":["a"]}"#).await;
    assert_eq!(b.0, 429, "{:?}", b.2);
    assert_eq!(json(&b)["ErrorCode"], 60007);
    let after: u64 = header(&b, "retry-after").parse().unwrap();
    assert!((50..=61).contains(&after), "retry-after {after}");
    assert_eq!(fake.count(), 1, "the paused command did not reach Chat");
    assert_eq!(
        json(&post(&gw.url(CONTACT_GROUP), body).await)["ErrorCode"],
        0,
        "another command is not paused"
    );
}

/// Every UserSig refusal code (70001 expired, 70003 unparsable, 70009 bad signature)
/// gets a fresh UserSig and one more try, for a read and for a write alike.
#[tokio::test]
async fn each_usersig_refusal_code_renews_and_tries_once_more() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    for code in [70001, 70003, 70009] {
        for (path, body) in [
            (CONTACT_GROUP, r#"{"From_Account":"a","StartIndex":0}"#),
            (SENDMSG, SEND_BODY),
        ] {
            fake.reset();
            fake.set_responder(Box::new(move |_, n| {
                if n == 1 {
                    Reply::Json(chat_error(code), Duration::ZERO)
                } else {
                    Reply::Json(ok(), Duration::ZERO)
                }
            }));
            let a = post(&gw.url(path), body).await;
            assert_eq!(json(&a)["ErrorCode"], 0, "{code} {path}");
            let calls = fake.calls();
            assert_eq!(calls.len(), 2, "{code} {path}: one more try");
            assert_ne!(calls[0].query["usersig"], calls[1].query["usersig"]);
        }
    }
    let m = metrics_text(&gw).await;
    assert_eq!(metric(&m, "chat_gateway_usersig_renewals_total"), 6.0);
}

/// The retry bucket: 20 tokens, full at start, one per retry. With Chat failing every
/// call and nothing earned (`budget_percent = 0`, no reserve), 30 requests of four
/// attempts each make exactly 30 + 20 calls, and 24 of them find the bucket empty;
/// with `budget_min_per_sec` the bucket refills with time.
#[tokio::test]
async fn the_retry_bucket_holds_twenty_and_refills_per_second() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(50004), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "retry",
            "max_attempts = 4\nbudget_percent = 0\nbudget_min_per_sec = 0",
        )],
    ))
    .await;
    let body = r#"{"From_Account":"a","StartIndex":0}"#;
    for _ in 0..30 {
        let a = post(&gw.url(CONTACT_GROUP), body).await;
        assert_eq!(json(&a)["ErrorCode"], 50004);
    }
    assert_eq!(fake.count(), 50, "30 first attempts and 20 retries");
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "chat_gateway_retry_budget_exhausted_total"),
        24.0
    );

    // A reserve of 10 tokens a second: drain the bucket (until a request gets no
    // retry: less than one token left), then after 1.1 s at least 10 retries again.
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "retry",
            "max_attempts = 4\nbudget_percent = 0\nbudget_min_per_sec = 10",
        )],
    ))
    .await;
    let mut drained = false;
    for _ in 0..200 {
        fake.reset();
        post(&gw.url(CONTACT_GROUP), body).await;
        if fake.count() == 1 {
            drained = true;
            break;
        }
    }
    assert!(drained, "the bucket ran out");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.reset();
    for _ in 0..10 {
        post(&gw.url(CONTACT_GROUP), body).await;
    }
    let retries = fake.count() - 10;
    assert!(
        retries >= 10,
        "a second's reserve paid for at least 10 retries: {retries}"
    );
}
