//! The whole admin API through the gateway: passthrough, routes, retry safety, rate
//! limits, UserSig renewal, the retry budget and failover.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const SENDMSG: &str = "/v4/openim/sendmsg";
const SEND_BODY: &str = r#"{"SyncOtherMachine":2,"From_Account":"a","To_Account":"b","MsgRandom":1,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}"#;

fn ok() -> serde_json::Value {
    serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgTime":1,"MsgKey":"k"})
}

#[tokio::test]
async fn any_command_is_forwarded_with_the_gateways_credentials() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let a = post(
        &gw.url("/v4/sns/friend_check?usersig=forged&identifier=mallory"),
        r#"{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}"#,
    )
    .await;
    assert_eq!(a.0, 200);
    assert_eq!(json(&a), ok(), "Chat's answer as is");
    let calls = fake.calls();
    assert_eq!(calls[0].path, "/v4/sns/friend_check");
    calls[0].assert_gateway_credentials();
    assert!(!calls[0].raw_query.contains("forged") && !calls[0].raw_query.contains("mallory"));
    assert_eq!(
        &calls[0].body[..],
        br#"{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}"#,
        "body as is"
    );

    post(&gw.url("/v4/im_open_login_svc/account_check"), "").await;
    assert_eq!(
        &fake.calls()[1].body[..],
        b"{}",
        "an empty body is sent as {{}}"
    );
}

#[tokio::test]
async fn denied_commands_never_reach_chat() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("routes", "allow = [\"openim/*\", \"recentcontact/*\", \"im_open_login_svc/*\"]\ndeny = [\"im_open_login_svc/account_delete\"]")],
    ))
    .await;
    for path in [
        "/v4/im_open_login_svc/account_delete",
        "/v4/group_open_http_svc/destroy_group",
    ] {
        let a = post(&gw.url(path), "{}").await;
        assert_eq!(a.0, 403, "{path}");
        assert_eq!(json(&a)["ErrorCode"], 60009);
        assert_eq!(header(&a, "x-chat-gateway-error"), "route-denied");
    }
    assert_eq!(fake.count(), 0);
    assert_eq!(post(&gw.url(SENDMSG), SEND_BODY).await.0, 200);
    assert_eq!(
        post(&gw.url("/v4/im_open_login_svc/kick"), "{}").await.0,
        200
    );
    assert_eq!(fake.count(), 2);
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).to_string();
    assert_eq!(
        metric(
            &m,
            "chat_gateway_errors_total{origin=\"caller\",reason=\"route-denied\"}"
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "chat_gateway_requests_total{route=\"passthrough\",outcome=\"ok\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "chat_gateway_requests_total{route=\"passthrough\",outcome=\"error\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn a_send_that_may_have_reached_chat_is_never_retried() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(50005), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 500")],
    ))
    .await;
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert_eq!(fake.count(), 1, "50005 on sendmsg: one call");

    fake.reset();
    fake.set_responder(Box::new(|_, _| Reply::Status(502, "bad".into())));
    post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(fake.count(), 1, "HTTP 5xx on sendmsg: one call");

    fake.reset();
    fake.set_responder(Box::new(|_, _| Reply::Json(ok(), Duration::from_secs(2))));
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(a.0, 504);
    assert_eq!(fake.count(), 1, "timed-out sendmsg: one call");

    // The same failures on a read are retried.
    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(50005), Duration::ZERO)
    }));
    post(
        &gw.url("/v4/recentcontact/get_contact_group"),
        r#"{"From_Account":"a","StartIndex":0}"#,
    )
    .await;
    assert_eq!(fake.count(), 3, "reads are retried");
    // And commands named in retry.idempotent_commands.
    fake.reset();
    post(
        &gw.url("/v4/profile/portrait_get"),
        r#"{"To_Account":["a"]}"#,
    )
    .await;
    assert_eq!(fake.count(), 3, "profile/portrait_get ships as idempotent");
}

#[tokio::test]
async fn connect_refused_is_retried_even_for_a_send_on_the_backup() {
    let backup = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let primary = dead_addr();
    let gw = Gateway::start(&config_toml(
        &format!("http://{primary}"),
        &[(
            "chat",
            &format!(
                "backup_base_url = \"{}\"\nfailover_cooldown_secs = 1",
                backup.url()
            ),
        )],
    ))
    .await;
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(
        json(&a)["ErrorCode"],
        0,
        "connect refused never reached Chat: retried on the backup"
    );
    assert_eq!(backup.count(), 1, "sent exactly once");
    let failed_over = Instant::now();
    assert!(
        gw.wait_log("failing over to the backup", Duration::from_secs(2))
            .await
    );

    // New requests stay on the backup during the cooldown...
    post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(backup.count(), 2);
    // ...and go back to the primary after it.
    let primary_fake =
        FakeChat::start_on(primary, Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    let wait = Duration::from_millis(1100).saturating_sub(failed_over.elapsed());
    tokio::time::sleep(wait).await;
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert_eq!(
        primary_fake.count(),
        1,
        "back on the primary after the cooldown"
    );
    assert_eq!(backup.count(), 2);
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).to_string();
    assert_eq!(
        metric(&m, "chat_gateway_upstream_failovers_total{to=\"backup\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "chat_gateway_upstream_failovers_total{to=\"primary\"}"),
        1.0
    );
}

#[tokio::test]
async fn an_expired_usersig_is_renewed_and_the_call_succeeds() {
    let fake = FakeChat::start(Box::new(|_, n| {
        if n == 1 {
            Reply::Json(chat_error(70001), Duration::ZERO)
        } else {
            Reply::Json(ok(), Duration::ZERO)
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one renewal, one retry");
    assert_ne!(
        calls[0].query["usersig"], calls[1].query["usersig"],
        "a fresh UserSig"
    );
    calls[1].assert_gateway_credentials();

    // Repeated refusal: returned after one renewal, and logged as a configuration error.
    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(70009), Duration::ZERO)
    }));
    for _ in 0..3 {
        let a = post(&gw.url(SENDMSG), SEND_BODY).await;
        assert_eq!(json(&a)["ErrorCode"], 70009);
    }
    assert_eq!(fake.count(), 6, "one renewal per request, never more");
    assert!(
        gw.wait_log("CONFIGURATION ERROR", Duration::from_secs(2))
            .await
    );
    assert_eq!(
        gw.log_count("CONFIGURATION ERROR"),
        1,
        "at most once a minute"
    );
    let text = get(&gw.url("/metrics")).await.unwrap().2;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(metric(&text, "chat_gateway_usersig_renewals_total"), 4.0);
    assert_eq!(metric(&text, "chat_gateway_usersig_refused_total"), 3.0);
}

#[tokio::test]
async fn one_command_is_held_under_its_rate_limit() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
    // Favoured, as the other rate-limit tests: the arrivals show the schedule.
    let gw = Gateway::start_prepared(
        &config_toml(&fake.url(), &[("ratelimit", "max_wait_ms = 500")]),
        favoured,
    )
    .await;
    let url = Arc::new(gw.url("/v4/openim/query_online_status"));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, format!(r#"{{"To_Account":["u{i}"]}}"#)).await })
        })
        .collect();
    let (mut served, mut limited) = (0, 0);
    for t in tasks {
        let a = t.await.unwrap();
        match json(&a)["ErrorCode"].as_i64() {
            Some(0) => served += 1,
            Some(60007) => {
                assert_eq!(a.0, 429);
                assert_eq!(header(&a, "x-chat-gateway-error"), "rate-limited");
                let after: u64 = header(&a, "retry-after").parse().expect("retry-after");
                assert!((1..=2).contains(&after), "{after}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(served + limited, 300);
    // What the schedule promises within max_wait_ms (500 ms) of a cold start: those
    // that arrive before the first call comes back go at once (up to 75% of 200), the
    // rest of the window is spread over the span (one every 1.06 s / 51 = 21 ms at
    // the widest), so at least 500 / 21 = 23 go within the wait; never more than the
    // window's 200. Everyone past that is refused.
    assert!(
        (24..=200).contains(&served),
        "{served} served: what the burst and the pace allow within max_wait_ms"
    );
    assert!(limited >= 100, "the excess callers got 60007: {limited}");
    let times: Vec<Instant> = fake.calls().iter().map(|c| c.at).collect();
    assert_eq!(times.len(), served);
    // In any one-second window Chat saw at most 200 calls.
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 200, "{in_window} calls within a second");
    }
    // Another command has its own budget.
    assert_eq!(
        json(&post(&gw.url(SENDMSG), SEND_BODY).await)["ErrorCode"],
        0
    );
}

#[tokio::test]
async fn chat_throttling_pauses_the_command_and_reads_retry_after_the_pause() {
    let fake = FakeChat::start(Box::new(|_, n| {
        if n == 1 {
            Reply::Json(chat_error(60007), Duration::ZERO)
        } else {
            Reply::Json(ok(), Duration::ZERO)
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let started = Instant::now();
    let a = post(
        &gw.url("/v4/recentcontact/get_contact_group"),
        r#"{"From_Account":"a","StartIndex":0}"#,
    )
    .await;
    assert_eq!(
        json(&a)["ErrorCode"],
        0,
        "the read was retried after the pause"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited out Chat's pause"
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(900));

    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(chat_error(60007), Duration::ZERO)
    }));
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(json(&a)["ErrorCode"], 60007, "a write gets Chat's answer");
    assert_eq!(fake.count(), 1);
}

#[tokio::test]
async fn a_failing_upstream_gets_no_more_than_the_retry_budget() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(50004), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("ratelimit", "per_command_per_sec = 100000"),
            (
                "retry",
                "max_attempts = 3\nbudget_percent = 20\nbudget_min_per_sec = 1",
            ),
        ],
    ))
    .await;
    let url = Arc::new(gw.url("/v4/recentcontact/get_list"));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(
                async move { post(&url, format!(r#"{{"From_Account":"user_{i}"}}"#)).await },
            )
        })
        .collect();
    for t in tasks {
        assert_eq!(
            json(&t.await.unwrap())["ErrorCode"],
            50004,
            "the first error is returned"
        );
    }
    let calls = fake.count();
    // 300 requests; retries within 20% of them plus 1/s over the 10 s window.
    assert!(calls > 300, "some retries were allowed");
    assert!(
        calls <= 300 + 60 + 10,
        "{calls} calls: over budget (900 without one)"
    );
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).to_string();
    assert!(metric(&m, "chat_gateway_retry_budget_exhausted_total") > 0.0);
}
