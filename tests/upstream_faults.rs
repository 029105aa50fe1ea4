//! How the gateway meets a Chat that fails below HTTP, against the real binary:
//! failover to the backup after a DNS or TLS failure on the primary (and none without
//! a backup), and a connection closed mid-request (a read is retried, a write never).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SENDMSG: &str = "/v4/openim/sendmsg";
const SEND_BODY: &str = r#"{"SyncOtherMachine":2,"From_Account":"a","To_Account":"b","MsgRandom":1,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]}"#;

fn ok() -> serde_json::Value {
    serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","MsgTime":1,"MsgKey":"k"})
}

/// A TLS server whose certificate no one trusts (a test CA the gateway was not
/// given): every handshake fails. Counts the connections it took.
async fn untrusted_tls() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let ca = TestCa::new();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![ca.leaf_der.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key_der.clone().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = taken.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(s).await;
            });
        }
    });
    (addr, taken)
}

/// The primary cannot be resolved, or its TLS handshake fails: the call (a write:
/// it never reached Chat) is sent once, to the backup, and new requests stay there.
#[tokio::test]
async fn a_dns_or_tls_failure_fails_over_to_the_backup() {
    let (tls, handshakes) = untrusted_tls().await;
    for (what, primary) in [
        // RFC 6761: `.invalid` never resolves.
        ("DNS", "http://chat-gateway-test.invalid:9".to_string()),
        ("TLS", format!("https://127.0.0.1:{}", tls.port())),
    ] {
        let backup = FakeChat::start(Box::new(|_, _| Reply::Json(ok(), Duration::ZERO))).await;
        let gw = Gateway::start(&config_toml(
            &primary,
            &[(
                "chat",
                &format!(
                    "backup_base_url = \"{}\"\nfailover_cooldown_secs = 600",
                    backup.url()
                ),
            )],
        ))
        .await;
        let before = handshakes.load(Ordering::SeqCst);
        let a = post(&gw.url(SENDMSG), SEND_BODY).await;
        assert_eq!(a.0, 200, "{what}: {:?}", a.2);
        assert_eq!(json(&a)["ErrorCode"], 0, "{what}: answered by the backup");
        assert_eq!(backup.count(), 1, "{what}: sent exactly once");
        backup.calls()[0].assert_gateway_credentials();
        if what == "TLS" {
            assert_eq!(
                handshakes.load(Ordering::SeqCst) - before,
                1,
                "one handshake with the primary"
            );
        }
        // New requests go to the backup at once.
        let a = post(&gw.url(SENDMSG), SEND_BODY).await;
        assert_eq!(json(&a)["ErrorCode"], 0);
        assert_eq!(backup.count(), 2, "{what}: new requests on the backup");
        if what == "TLS" {
            assert_eq!(handshakes.load(Ordering::SeqCst) - before, 1);
        }
        assert!(
            gw.wait_log("failing over to the backup", Duration::from_secs(5))
                .await,
            "{what}: {}",
            gw.log_text()
        );
        let m = metrics_text(&gw).await;
        assert_eq!(
            metric(&m, "chat_gateway_upstream_failovers_total{to=\"backup\"}"),
            1.0,
            "{what}"
        );
        assert_eq!(
            metric(
                &m,
                "chat_gateway_upstream_calls_total{command=\"openim/sendmsg\",code=\"transport\"}"
            ),
            1.0,
            "{what}: the one failed attempt"
        );
    }
}

/// With `chat.base_url` overridden and no `chat.backup_base_url` there is no
/// failover: a call that never reached Chat is retried on the primary, and the
/// caller gets 502.
#[tokio::test]
async fn no_failover_when_base_url_is_overridden_without_a_backup() {
    let (tls, handshakes) = untrusted_tls().await;
    let gw = Gateway::start(&config_toml(
        &format!("https://127.0.0.1:{}", tls.port()),
        &[("retry", "max_attempts = 3")],
    ))
    .await;
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(a.0, 502, "{:?}", a.2);
    assert_eq!(json(&a)["ErrorCode"], 50005);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-unavailable");
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        3,
        "every attempt on the primary (never sent: retried even for a write)"
    );
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "chat_gateway_upstream_failovers_total{to=\"backup\"}"),
        0.0
    );
    assert!(!gw.log_text().contains("failing over"), "{}", gw.log_text());
}

/// Without `chat.base_url`, the backup is the region's backup domain (all regions
/// but riyadh); with it overridden and no `chat.backup_base_url`, there is none.
/// (Checked on the settings: the region's real domains are never called in tests.)
#[test]
fn the_backup_is_the_regions_unless_base_url_is_overridden() {
    let load = |chat: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[chat]\nsdkappid = {SDKAPPID}\nidentifier = \"{IDENTIFIER}\"\nsecret_key = \"{SECRET}\"\n{chat}\n"
            ),
        )
        .unwrap();
        chat_gateway::config::load_with_env(Some(&path), Vec::new()).unwrap()
    };
    let s = load("region = \"singapore\"");
    assert_eq!(s.chat.base_url, "https://adminapisgp.im.qcloud.com");
    assert_eq!(
        s.chat.backup_base_url.as_deref(),
        Some("https://adminapisgp.my-imcloud.com")
    );
    let s = load("region = \"riyadh\"");
    assert_eq!(s.chat.backup_base_url, None, "riyadh has no backup domain");
    let s = load("region = \"singapore\"\nbase_url = \"http://127.0.0.1:9000\"");
    assert_eq!(
        s.chat.backup_base_url, None,
        "an overridden primary has no backup"
    );
    let s = load(
        "region = \"singapore\"\nbase_url = \"http://127.0.0.1:9000\"\nbackup_base_url = \"http://127.0.0.1:9001\"",
    );
    assert_eq!(
        s.chat.backup_base_url.as_deref(),
        Some("http://127.0.0.1:9001")
    );
}

/// A connection Chat closes before answering may have carried the request: a read
/// is retried (and answered), a write is not (the caller gets 502, never a second
/// send).
#[tokio::test]
async fn a_reset_mid_request_retries_a_read_never_a_write() {
    let fake = FakeChat::start(Box::new(|_, _| Reply::Close)).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;

    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(a.0, 502, "{:?}", a.2);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-unavailable");
    assert_eq!(
        fake.count(),
        1,
        "a write that may have reached Chat: sent once"
    );

    // A read: the first connection is closed under it, the retry is answered.
    fake.reset();
    fake.set_responder(Box::new(|_, n| {
        if n == 1 {
            Reply::Close
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ContactItem":[]}),
                Duration::ZERO,
            )
        }
    }));
    let a = post(
        &gw.url("/v4/recentcontact/get_contact_group"),
        r#"{"From_Account":"a","StartIndex":0}"#,
    )
    .await;
    assert_eq!(a.0, 200, "{:?}", a.2);
    assert_eq!(json(&a)["ErrorCode"], 0, "the retry's answer");
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one retry");
    assert_ne!(
        calls[0].query["random"], calls[1].query["random"],
        "a fresh random for the retry"
    );
    assert_eq!(calls[0].body, calls[1].body, "the same request");

    // get_list, the cached read: retried the same way, and stored.
    fake.reset();
    fake.set_responder(Box::new(|r: &Recorded, n| {
        if n == 1 {
            Reply::Close
        } else {
            let acc = r.json()["From_Account"].as_str().unwrap().to_string();
            Reply::Json(page_for(&acc, 0), Duration::ZERO)
        }
    }));
    let a = post(
        &gw.url("/v4/recentcontact/get_list"),
        r#"{"From_Account":"u"}"#,
    )
    .await;
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(fake.count(), 2);
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "chat_gateway_upstream_retries_total{command=\"recentcontact/get_list\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "chat_gateway_upstream_retries_total{command=\"openim/sendmsg\"}"
        ),
        0.0
    );
}

/// `chat.attempt_timeout_ms`: a read whose attempt Chat does not answer in time is
/// given up and retried within the request's deadline (answered by the retry); a
/// write's attempt is never cut short (answered by the slow attempt, sent once); and
/// without the setting a read's single attempt has the whole deadline (504, sent once).
#[tokio::test]
async fn a_read_attempt_that_times_out_is_retried_a_write_is_never_cut_short() {
    // The first call hangs for 2 s; later ones are answered at once.
    let fake = FakeChat::start(Box::new(|_, n| {
        let delay = if n == 1 {
            Duration::from_secs(2)
        } else {
            Duration::ZERO
        };
        Reply::Json(
            serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ContactItem":[],"n":n}),
            delay,
        )
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "chat",
            "request_timeout_ms = 3000\nattempt_timeout_ms = 300",
        )],
    ))
    .await;
    let a = post(
        &gw.url("/v4/recentcontact/get_contact_group"),
        r#"{"From_Account":"a","StartIndex":0}"#,
    )
    .await;
    assert_eq!(a.0, 200, "{:?}", a.2);
    assert_eq!(json(&a)["ErrorCode"], 0);
    assert_eq!(
        json(&a)["n"],
        2,
        "the retry's answer, not the hung attempt's"
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 2, "one retry after the attempt timed out");
    // Timed where the fake Chat reads the two calls: the first may be read a little
    // after the gateway's attempt timer started (a busy machine), so the gap can be
    // a few ms under 300. A retry sent without waiting out the attempt would come
    // within a few ms.
    assert!(
        calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(250),
        "the retry came after the attempt's timeout: {:?}",
        calls[1].at.duration_since(calls[0].at)
    );
    assert_ne!(calls[0].query["random"], calls[1].query["random"]);
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(&m, "chat_gateway_upstream_calls_total{command=\"recentcontact/get_contact_group\",code=\"timeout\"}"),
        1.0,
        "{m}"
    );

    // A write whose answer takes longer than attempt_timeout_ms: waited for, sent once.
    fake.reset();
    fake.set_responder(Box::new(|_, _| {
        Reply::Json(ok(), Duration::from_millis(900))
    }));
    let a = post(&gw.url(SENDMSG), SEND_BODY).await;
    assert_eq!(a.0, 200, "{:?}", a.2);
    assert_eq!(json(&a)["ErrorCode"], 0, "the slow write's own answer");
    assert_eq!(fake.count(), 1, "a write is sent once");

    // Without attempt_timeout_ms, one attempt has the whole deadline: no retry.
    let plain = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 600")],
    ))
    .await;
    fake.reset();
    fake.set_responder(Box::new(|_, _| Reply::Json(ok(), Duration::from_secs(2))));
    let a = post(
        &plain.url("/v4/recentcontact/get_contact_group"),
        r#"{"From_Account":"a","StartIndex":0}"#,
    )
    .await;
    assert_eq!(a.0, 504, "{:?}", a.2);
    assert_eq!(header(&a, "x-chat-gateway-error"), "upstream-timeout");
    assert_eq!(fake.count(), 1, "the attempt spent the deadline");
}
