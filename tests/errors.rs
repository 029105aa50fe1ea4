//! The README's table of errors the gateway makes itself, against the real binary:
//! the HTTP status, Chat's envelope with its `ErrorCode`, the `x-chat-gateway-error`
//! header, and the metric that counts it, for the rows no other test file checks
//! whole: an unknown path, a wrong method, Chat not answering in time, a rejected
//! webhook, and `/quitquitquit` from a caller that is not on loopback.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use common::*;

/// Asserts one of the gateway's own errors: status, envelope, header, and that a
/// request id came with it.
fn assert_error(a: &Answer, status: u16, code: i64, reason: &str) {
    let what = format!("{status} {reason}");
    assert_eq!(a.0, status, "{what}: {:?}", a.2);
    let v = json(a);
    assert_eq!(v["ActionStatus"], "FAIL", "{what}");
    assert_eq!(v["ErrorCode"], code, "{what}");
    assert!(
        v["ErrorInfo"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: a reason in ErrorInfo"
    );
    assert_eq!(header(a, "x-chat-gateway-error"), reason, "{what}");
    assert_eq!(header(a, "content-type"), "application/json", "{what}");
    assert!(!header(a, "x-request-id").is_empty(), "{what}");
}

async fn call(method: &str, url: &str, body: &str) -> Answer {
    send(
        http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
    .expect("request")
}

#[tokio::test]
async fn unknown_paths_wrong_methods_and_a_silent_chat() {
    let fake = FakeChat::start(Box::new(|_, _| {
        Reply::Json(chat_error(0), Duration::from_secs(30))
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("chat", "request_timeout_ms = 300")],
    ))
    .await;

    for path in ["/nope", "/v4", "/v4/onlyone", "/admin/other"] {
        let a = call("POST", &gw.url(path), "{}").await;
        assert_error(&a, 404, 60009, "not-found");
    }
    // A wrong method names the right one in `Allow` (RFC 9110 §15.5.6).
    for (method, path, allow) in [
        ("GET", "/v4/recentcontact/get_list", "POST"),
        ("PUT", "/v4/openim/sendmsg", "POST"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/metrics", "GET"),
        ("GET", "/quitquitquit", "POST"),
        ("GET", "/admin/cache/invalidate", "POST"),
        ("GET", "/callback", "POST"),
    ] {
        let a = call(method, &gw.url(path), "").await;
        assert_error(&a, 405, 60009, "method-not-allowed");
        assert_eq!(header(&a, "allow"), allow, "{method} {path}");
    }
    assert_eq!(fake.count(), 0, "none of these reached Chat");

    // Chat does not answer within chat.request_timeout_ms: a write (never retried)
    // and a read of the passthrough.
    for path in ["/v4/openim/sendmsg", "/v4/openim/query_online_status"] {
        let calls = fake.count();
        let a = post(&gw.url(path), r#"{"From_Account":"a","To_Account":["b"]}"#).await;
        assert_error(&a, 504, 50005, "upstream-timeout");
        assert_eq!(
            fake.count(),
            calls + 1,
            "{path}: one attempt spent the deadline"
        );
    }

    let m = metrics_text(&gw).await;
    for (series, n) in [
        (
            "chat_gateway_errors_total{origin=\"caller\",reason=\"not-found\"}",
            4.0,
        ),
        (
            "chat_gateway_errors_total{origin=\"caller\",reason=\"method-not-allowed\"}",
            7.0,
        ),
        (
            "chat_gateway_errors_total{origin=\"upstream\",reason=\"upstream-timeout\"}",
            2.0,
        ),
    ] {
        assert_eq!(metric(&m, series), n, "{series}");
    }
}

/// A webhook that is not signed by us is refused with 403 and 60004, on the main
/// listener and on the callback listener alike, and invalidates nothing.
#[tokio::test]
async fn a_rejected_webhook_is_403_with_60004() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("callback", "token = \"callback-token-0123\""),
            ("server", "callback_listen = \"127.0.0.1:0\""),
        ],
    ))
    .await;
    let callback = gw.logged_addr("callback");
    let get_list = gw.url("/v4/recentcontact/get_list");
    post(&get_list, r#"{"From_Account":"alice"}"#).await;
    let now = chat_gateway::upstream::signer::unix_now();
    let query = format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign=0000&RequestTime={now}"
    );
    let body = r#"{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"alice","To_Account":"bob"}"#;
    for url in [gw.url(&query), format!("http://{callback}{query}")] {
        let a = post(&url, body).await;
        assert_error(&a, 403, 60004, "callback-rejected");
    }
    let hit = post(&get_list, r#"{"From_Account":"alice"}"#).await;
    assert_eq!(header(&hit, "x-cache"), "HIT", "nothing was invalidated");
    let m = metrics_text(&gw).await;
    assert_eq!(
        metric(
            &m,
            "chat_gateway_errors_total{origin=\"caller\",reason=\"callback-rejected\"}"
        ),
        2.0
    );
}

/// This machine's own addresses that are not loopback (an interface's), IPv4 first.
fn non_loopback_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list we only read, then free with freeifaddrs.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        // Link-local addresses need a scope: not usable here.
                        if ip.segments()[0] & 0xffc0 != 0xfe80 {
                            out.push(IpAddr::V6(ip));
                        }
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.retain(|ip| !ip.is_loopback() && !ip.is_unspecified());
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

/// `/quitquitquit` is for loopback callers: from the machine's own interface
/// address it is refused (403, 60021) and the gateway keeps serving; from loopback,
/// including loopback reaching a dual-stack `[::]` listener (`::ffff:127.0.0.1`), it
/// shuts the gateway down.
#[tokio::test]
async fn quitquitquit_is_for_loopback_callers_only() {
    let fake = FakeChat::start(echo_pages()).await;
    let Some(own) = non_loopback_addresses().into_iter().next() else {
        // A machine with loopback only (a network-less container) cannot make a
        // non-loopback connection to itself; said loudly, not passed silently.
        panic!("no non-loopback address on this machine to call /quitquitquit from");
    };
    let any = if own.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "server",
            &format!("listen = \"{any}\"\nallow_unauthenticated = true"),
        )],
    ))
    .await;
    let from_outside = SocketAddr::new(own, gw.addr.port());
    let a = post(&format!("http://{from_outside}/quitquitquit"), "").await;
    assert_error(&a, 403, 60021, "loopback-only");
    assert_eq!(
        get(&format!("http://{from_outside}/readyz"))
            .await
            .unwrap()
            .0,
        200,
        "still serving"
    );
    let m = String::from_utf8_lossy(
        &get(&format!("http://{from_outside}/metrics"))
            .await
            .unwrap()
            .2,
    )
    .into_owned();
    assert_eq!(
        metric(
            &m,
            "chat_gateway_errors_total{origin=\"caller\",reason=\"loopback-only\"}"
        ),
        1.0
    );
    let a = post(
        &format!("http://127.0.0.1:{}/quitquitquit", gw.addr.port()),
        "",
    )
    .await;
    assert_eq!(a.0, 200);
    let status = gw
        .exited(Duration::from_secs(10))
        .await
        .expect("exits after /quitquitquit from loopback");
    assert_eq!(status.code(), Some(0));

    // A dual-stack listener sees an IPv4 loopback caller as ::ffff:127.0.0.1.
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "server",
            "listen = \"[::]:0\"\nallow_unauthenticated = true",
        )],
    ))
    .await;
    let a = post(
        &format!("http://127.0.0.1:{}/quitquitquit", gw.addr.port()),
        "",
    )
    .await;
    assert_eq!(a.0, 200, "IPv4 loopback through [::]: {:?}", a.2);
    let status = gw.exited(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(status.code(), Some(0));
}
