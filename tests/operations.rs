//! Operating the gateway in a cluster: the admin listener (probes and `/metrics`
//! under any load), the webhook listener, secrets rotated through mounted files
//! without a restart, the access log, and systemd's readiness notification.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use sha2::{Digest, Sha256};

const GET_LIST: &str = "/v4/recentcontact/get_list";

fn ok() -> serde_json::Value {
    serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""})
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    c.send(format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    c.response(Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e:?}"))
}

async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &str) -> RawResponse {
    let mut c = RawConn::connect(addr).await;
    c.send(
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    c.response(Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e:?}"))
}

/// The admin port answers the probes and `/metrics` while every one of the main
/// listener's `max_connections` (and its probe reserve) is held by idle callers, and
/// serves nothing else.
#[tokio::test]
async fn the_admin_port_answers_while_the_main_listener_is_saturated() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "server",
            "max_connections = 10\nheader_read_timeout_ms = 10000\nadmin_listen = \"127.0.0.1:0\"\nauth_tokens = [\"caller-token-0123456789\"]\nprotect_metrics = true",
        )],
    ))
    .await;
    let admin = gw.logged_addr("admin");
    // Hold every regular slot and the whole probe reserve with half-sent heads.
    let mut held = Vec::new();
    for _ in 0..(10 + chat_gateway::server::HEALTH_RESERVE) {
        let mut c = RawConn::connect(gw.addr).await;
        c.send(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    // The main listener no longer answers a probe ...
    let mut probe = RawConn::connect(gw.addr).await;
    probe
        .send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert!(probe.response(Duration::from_millis(500)).await.is_err());
    // ... the admin port does, without a token, and serves the metrics.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(raw_get(admin, path).await.status, 200, "{path}");
    }
    let m = raw_get(admin, "/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        metric(&text, "chat_gateway_open_connections{listener=\"main\"}") >= 10.0,
        "{text}"
    );
    // Nothing else is served there.
    for (method, path) in [
        ("POST", GET_LIST),
        ("POST", "/v4/openim/sendmsg"),
        ("POST", "/admin/cache/invalidate"),
        ("POST", "/callback"),
        ("POST", "/quitquitquit"),
        ("GET", "/"),
    ] {
        let r = if method == "GET" {
            raw_get(admin, path).await
        } else {
            raw_post(admin, path, "{}").await
        };
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.json()["ErrorCode"], 60009);
    }
    assert_eq!(fake.count(), 0);
    drop(held);
}

fn sign(token: &str, t: u64) -> String {
    hex::encode(Sha256::digest(format!("{token}{t}")))
}

fn callback_path(token: &str) -> String {
    let t = chat_gateway::upstream::signer::unix_now();
    format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=C2C.CallbackAfterSendMsg&ClientIP=1.2.3.4&OptPlatform=RESTAPI&contenttype=json&Sign={}&RequestTime={t}",
        sign(token, t)
    )
}

/// The webhook port takes signed webhooks (and invalidates), and serves nothing else.
#[tokio::test]
async fn the_callback_port_serves_only_webhooks() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("server", "callback_listen = \"127.0.0.1:0\""),
            (
                "callback",
                "token = \"console-token\"\nmax_body_bytes = 2048",
            ),
            ("cache", "ttl_secs = 600"),
        ],
    ))
    .await;
    let cb = gw.logged_addr("callback");
    let page = r#"{"From_Account":"alice"}"#;
    assert_eq!(
        header(&post(&gw.url(GET_LIST), page).await, "x-cache"),
        "MISS"
    );
    assert_eq!(
        header(&post(&gw.url(GET_LIST), page).await, "x-cache"),
        "HIT"
    );
    let event = r#"{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"alice","To_Account":"bob"}"#;
    let r = raw_post(cb, &callback_path("console-token"), event).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        header(&post(&gw.url(GET_LIST), page).await, "x-cache"),
        "MISS"
    );
    // A wrong Sign is refused; a body over callback.max_body_bytes too.
    assert_eq!(
        raw_post(cb, &callback_path("wrong"), event).await.status,
        403
    );
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(4096));
    assert_eq!(
        raw_post(cb, &callback_path("console-token"), &big)
            .await
            .status,
        413
    );
    for path in [
        GET_LIST,
        "/v4/openim/sendmsg",
        "/admin/cache/invalidate",
        "/healthz",
    ] {
        assert_eq!(raw_post(cb, path, "{}").await.status, 404, "{path}");
    }
    assert_eq!(raw_get(cb, "/callback").await.status, 405);
    assert_eq!(
        fake.count(),
        2,
        "nothing but the two get_list misses reached Chat"
    );
}

/// A fake Chat that checks every UserSig against the key it currently holds.
fn strict_chat(key: Arc<Mutex<String>>) -> Responder {
    Box::new(move |r: &Recorded, _| {
        let k = key.lock().unwrap().clone();
        let now = chat_gateway::upstream::signer::unix_now();
        match chat_gateway::chat::usersig::verify(
            &r.query["usersig"],
            SDKAPPID,
            k.as_bytes(),
            IDENTIFIER,
            now,
        ) {
            Ok(_) => Reply::Json(ok(), Duration::ZERO),
            Err(_) => Reply::Json(chat_error(70009), Duration::ZERO),
        }
    })
}

/// Secrets mounted the Kubernetes way are swapped without a restart: the next call
/// to Chat is signed with the new key (a strict fake Chat accepts it at once), old
/// caller tokens stop working, a new callback token is required; an emptied file
/// keeps the old value and logs an error. No value is ever logged.
#[tokio::test]
async fn secrets_rotate_without_a_restart() {
    let key = Arc::new(Mutex::new(SECRET.to_string()));
    let fake = FakeChat::start(strict_chat(key.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key_file = k8s_mount(d, "secret_key", &format!("{SECRET}\n"));
    let sub = d.join("tokens");
    std::fs::create_dir(&sub).unwrap();
    let tokens_file = k8s_mount(&sub, "auth_tokens", "old-caller-token-000000\n");
    let cbdir = d.join("cb");
    std::fs::create_dir(&cbdir).unwrap();
    let cb_file = k8s_mount(&cbdir, "token", "old-callback-token\n");
    let toml = config_toml(
        &fake.url(),
        &[
            (
                "server",
                &format!("auth_tokens_file = \"{}\"", tokens_file.display()),
            ),
            (
                "callback",
                &format!("token_file = \"{}\"", cb_file.display()),
            ),
        ],
    )
    .replace(
        &format!("secret_key = \"{SECRET}\""),
        &format!("secret_key_file = \"{}\"", key_file.display()),
    );
    let gw = Gateway::start(&toml).await;
    let call = |token: &'static str| {
        let url = gw.url("/v4/openim/sendmsg");
        async move {
            send(
                http::Request::post(url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        br#"{"From_Account":"a","To_Account":"b"}"#,
                    )))
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(json(&call("old-caller-token-000000").await)["ErrorCode"], 0);

    // The key: Chat starts verifying with a new one, the file is swapped.
    *key.lock().unwrap() = "the-new-secret-key-42".into();
    k8s_swap(d, "secret_key", "v2", "the-new-secret-key-42\n");
    assert!(
        gw.wait_log("chat.secret_key_file", Duration::from_secs(3))
            .await,
        "{}",
        gw.log_text()
    );
    fake.reset();
    assert_eq!(json(&call("old-caller-token-000000").await)["ErrorCode"], 0);
    assert_eq!(fake.count(), 1, "accepted at once: signed with the new key");

    // The caller tokens: the old one stops working, the new one works.
    k8s_swap(
        &sub,
        "auth_tokens",
        "v2",
        "# rotated\nnew-caller-token-111111\n",
    );
    assert!(
        gw.wait_log("server.auth_tokens_file", Duration::from_secs(3))
            .await
    );
    assert_eq!(call("old-caller-token-000000").await.0, 401);
    assert_eq!(json(&call("new-caller-token-111111").await)["ErrorCode"], 0);

    // The callback token.
    k8s_swap(&cbdir, "token", "v2", "new-callback-token\n");
    assert!(
        gw.wait_log("callback.token_file", Duration::from_secs(3))
            .await
    );
    let event =
        r#"{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"a","To_Account":"b"}"#;
    assert_eq!(
        raw_post(gw.addr, &callback_path("old-callback-token"), event)
            .await
            .status,
        403
    );
    assert_eq!(
        raw_post(gw.addr, &callback_path("new-callback-token"), event)
            .await
            .status,
        200
    );

    // An emptied file keeps the current value, with an error.
    k8s_swap(&sub, "auth_tokens", "v3", "\n");
    assert!(
        gw.wait_log("secret file unusable", Duration::from_secs(3))
            .await
    );
    assert_eq!(json(&call("new-caller-token-111111").await)["ErrorCode"], 0);

    let log = gw.log_text();
    for secret in [
        "the-new-secret-key-42",
        "new-caller-token-111111",
        "old-caller-token-000000",
        "new-callback-token",
        SECRET,
    ] {
        assert!(!log.contains(secret), "{secret} logged");
    }
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned();
    assert_eq!(
        metric(
            &m,
            "chat_gateway_secret_reloads_total{secret=\"secret_key\",outcome=\"applied\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "chat_gateway_secret_reloads_total{secret=\"auth_tokens\",outcome=\"rejected\"}"
        ),
        1.0
    );
}

/// With `log.access = true` every request gets one line once answered, with its
/// id, even at `log.level = "warn"`; never a body or a secret.
#[tokio::test]
async fn the_access_log_has_one_line_per_request() {
    let fake = FakeChat::start(echo_pages()).await;
    // At level warn the serving line is not logged: give a port.
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("log", "level = \"warn\"\naccess = true"),
            ("server", &format!("listen = \"{}\"", free_addr())),
        ],
    ))
    .await;
    let requests = [
        ("rid-miss-1", GET_LIST, r#"{"From_Account":"alice"}"#),
        ("rid-hit-2", GET_LIST, r#"{"From_Account":"alice"}"#),
        ("rid-bad-3", GET_LIST, r#"{"From_Account":"#),
        (
            "rid-pass-4",
            "/v4/openim/sendmsg",
            r#"{"From_Account":"a"}"#,
        ),
    ];
    for (rid, path, body) in requests {
        send(
            http::Request::post(gw.url(path))
                .header("x-request-id", rid)
                .header("user-agent", "svc-orders/1.2")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while gw.log_count("request_id=\"rid-") < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lines: Vec<String> = gw
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(" access ") && l.contains("request_id=\"rid-"))
        .cloned()
        .collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let line = |rid: &str| {
        let found: Vec<&String> = lines.iter().filter(|l| l.contains(rid)).collect();
        assert_eq!(found.len(), 1, "one line for {rid}: {lines:#?}");
        found[0].clone()
    };
    let miss = line("rid-miss-1");
    for field in [
        "method=POST",
        "path=/v4/recentcontact/get_list",
        "status=200",
        "cache=\"MISS\"",
        "code=0",
        "attempts=1",
        "user_agent=\"svc-orders/1.2\"",
    ] {
        assert!(miss.contains(field), "{field} in {miss}");
    }
    // The hit is served by the shortest path, and still logged alike.
    let hit = line("rid-hit-2");
    for field in [
        "method=POST",
        "path=/v4/recentcontact/get_list",
        "cache=\"HIT\"",
        "code=0",
        "attempts=0",
        "user_agent=\"svc-orders/1.2\"",
    ] {
        assert!(hit.contains(field), "{field} in {hit}");
    }
    let bad = line("rid-bad-3");
    assert!(
        bad.contains("code=60003") && bad.contains("attempts=0"),
        "{bad}"
    );
    assert!(line("rid-pass-4").contains("path=/v4/openim/sendmsg"));
    assert!(!gw.log_text().contains("From_Account"), "no bodies");
}

/// Started by systemd (`Type=notify`), the gateway says READY=1 once it listens and
/// STOPPING=1 when it shuts down.
#[tokio::test]
async fn systemd_is_told_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let fake = FakeChat::start(echo_pages()).await;
    let mut gw = Gateway::start_with_env(
        &config_toml(&fake.url(), &[]),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .await;
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    gw.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
}
