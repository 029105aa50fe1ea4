//! Caller auth: `server.auth_tokens`, `server.protect_metrics`, and the refusal to
//! serve a non-loopback address without tokens.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";
const TOKEN_A: &str = "token-aaaaaaaaaaaaaaaa";
const TOKEN_B: &str = "token-bbbbbbbbbbbbbbbb";
const WRONG: &str = "token-cccccccccccccccc";
const TOKENS: &str = "auth_tokens = [\"token-aaaaaaaaaaaaaaaa\", \"token-bbbbbbbbbbbbbbbb\"]";

/// A request with an optional `Authorization` header.
async fn call(method: &str, url: &str, auth: Option<&str>, body: &str) -> Answer {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    send(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .expect("request")
}

/// Asserts a 401 in Chat's envelope with the gateway's reason and a challenge.
fn assert_unauthorized(a: &Answer, what: &str) {
    assert_eq!(a.0, 401, "{what}: {:?}", a.2);
    let v = json(a);
    assert_eq!(v["ActionStatus"], "FAIL", "{what}");
    assert_eq!(v["ErrorCode"], 60004, "{what}");
    assert!(v["ErrorInfo"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(header(a, "x-chat-gateway-error"), "unauthorized", "{what}");
    assert_eq!(header(a, "www-authenticate"), "Bearer", "{what}");
    assert!(!header(a, "x-request-id").is_empty(), "{what}");
}

#[tokio::test]
async fn tokens_guard_v4_and_admin_but_not_the_probes() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", TOKENS), ("log", "level = \"debug\"")],
    ))
    .await;
    let get_list = gw.url(GET_LIST);
    let body = r#"{"From_Account":"user_0001"}"#;

    // No header, a wrong token, a wrong scheme, an empty token: 401, Chat never asked.
    for (auth, what) in [
        (None, "no authorization"),
        (Some(format!("Bearer {WRONG}")), "wrong token"),
        (Some(format!("Bearer {TOKEN_A}x")), "token with a suffix"),
        (
            Some(format!("Bearer {}", &TOKEN_A[..TOKEN_A.len() - 1])),
            "prefix of a token",
        ),
        (Some(format!("Basic {TOKEN_A}")), "wrong scheme"),
        (Some(TOKEN_A.to_string()), "no scheme"),
        (Some("Bearer ".to_string()), "empty token"),
    ] {
        let a = call("POST", &get_list, auth.as_deref(), body).await;
        assert_unauthorized(&a, what);
    }
    assert_eq!(fake.count(), 0, "no upstream call without a valid token");

    // Either configured token works, the scheme in any case.
    let a = call("POST", &get_list, Some(&format!("Bearer {TOKEN_B}")), body).await;
    assert_eq!(a.0, 200, "{:?}", a.2);
    assert_eq!(header(&a, "x-cache"), "MISS");
    assert_eq!(fake.count(), 1);
    let a = call("POST", &get_list, Some(&format!("bearer {TOKEN_A}")), body).await;
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-cache"), "HIT");

    // Passthrough commands and unknown routes are guarded too (nothing is revealed).
    let a = call("POST", &gw.url("/v4/openim/sendmsg"), None, "{}").await;
    assert_unauthorized(&a, "passthrough without token");
    let a = call("GET", &gw.url("/nowhere"), None, "").await;
    assert_unauthorized(&a, "unknown route without token");
    let a = call("GET", &gw.url(GET_LIST), None, "").await;
    assert_unauthorized(&a, "wrong method without token");
    assert_eq!(fake.count(), 1);

    // The admin API.
    let inv = gw.url("/admin/cache/invalidate");
    let a = call("POST", &inv, None, r#"{"All":true}"#).await;
    assert_unauthorized(&a, "admin without token");
    let a = call(
        "POST",
        &inv,
        Some(&format!("Bearer {WRONG}")),
        r#"{"All":true}"#,
    )
    .await;
    assert_unauthorized(&a, "admin with a wrong token");
    let a = call("POST", &get_list, Some(&format!("Bearer {TOKEN_A}")), body).await;
    assert_eq!(
        header(&a, "x-cache"),
        "HIT",
        "the failed invalidations did nothing"
    );
    let a = call(
        "POST",
        &inv,
        Some(&format!("Bearer {TOKEN_B}")),
        r#"{"All":true}"#,
    )
    .await;
    assert_eq!(a.0, 200, "{:?}", a.2);
    assert_eq!(json(&a)["ActionStatus"], "OK");
    let a = call("POST", &get_list, Some(&format!("Bearer {TOKEN_A}")), body).await;
    assert_eq!(header(&a, "x-cache"), "MISS", "the invalidation ran");

    // The probes and (by default) /metrics stay open.
    for p in ["/healthz", "/readyz", "/metrics"] {
        let a = get(&gw.url(p)).await.unwrap();
        assert_eq!(a.0, 200, "{p} is open");
    }
    // /callback has its own Sign check: it is not behind the bearer token.
    let a = call("POST", &gw.url("/callback"), None, "{}").await;
    assert_ne!(a.0, 401, "/callback is not behind the token");

    // No token, right or wrong, ever reaches the log (it runs at debug here).
    let log = gw.log_text();
    for t in [TOKEN_A, TOKEN_B, WRONG] {
        assert!(!log.contains(t), "a token was logged:\n{log}");
    }
}

#[tokio::test]
async fn protect_metrics_puts_metrics_behind_the_token() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", TOKENS), ("server", "protect_metrics = true")],
    ))
    .await;
    let a = call("GET", &gw.url("/metrics"), None, "").await;
    assert_unauthorized(&a, "/metrics without token");
    let a = call(
        "GET",
        &gw.url("/metrics"),
        Some(&format!("Bearer {WRONG}")),
        "",
    )
    .await;
    assert_unauthorized(&a, "/metrics with a wrong token");
    let a = call(
        "GET",
        &gw.url("/metrics"),
        Some(&format!("Bearer {TOKEN_A}")),
        "",
    )
    .await;
    assert_eq!(a.0, 200);
    for p in ["/healthz", "/readyz"] {
        assert_eq!(get(&gw.url(p)).await.unwrap().0, 200, "{p} is open");
    }
}

#[tokio::test]
async fn without_tokens_nothing_is_checked() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let a = call(
        "POST",
        &gw.url(GET_LIST),
        Some("Bearer whatever"),
        r#"{"From_Account":"user_0001"}"#,
    )
    .await;
    assert_eq!(a.0, 200);
    let a = post(&gw.url(GET_LIST), r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-cache"), "HIT");
}

/// Runs the binary with `toml` and `args`; returns (exit code, stderr), or panics if
/// it has not exited within 20 s.
fn run_to_exit(toml: &str, args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

#[test]
fn non_loopback_listen_without_tokens_is_refused() {
    let toml = config_toml(
        "http://127.0.0.1:9",
        &[("server", "listen = \"0.0.0.0:0\"")],
    );
    for args in [&["check-config"][..], &[][..], &["serve"][..]] {
        let (code, err) = run_to_exit(&toml, args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains("server.listen"), "{args:?}: {err}");
        assert!(err.contains("auth_tokens"), "{args:?}: {err}");
    }
    // Loopback without tokens is fine.
    let (code, err) = run_to_exit(&config_toml("http://127.0.0.1:9", &[]), &["check-config"]);
    assert_eq!(code, Some(0), "{err}");
}

/// The gateway on all interfaces, reached through loopback.
fn loopback(gw: &Gateway) -> SocketAddr {
    assert!(gw.addr.ip().is_unspecified(), "listening on {}", gw.addr);
    SocketAddr::from(([127, 0, 0, 1], gw.addr.port()))
}

#[tokio::test]
async fn non_loopback_listen_starts_when_allowed_or_with_tokens() {
    let fake = FakeChat::start(echo_pages()).await;
    let body = r#"{"From_Account":"user_0001"}"#;

    let open = config_toml(
        &fake.url(),
        &[(
            "server",
            "listen = \"0.0.0.0:0\"\nallow_unauthenticated = true",
        )],
    );
    let (code, err) = run_to_exit(&open, &["check-config"]);
    assert_eq!(code, Some(0), "{err}");
    let gw = Gateway::start(&open).await;
    let addr = loopback(&gw);
    assert_eq!(get(&format!("http://{addr}/readyz")).await.unwrap().0, 200);
    let a = call("POST", &format!("http://{addr}{GET_LIST}"), None, body).await;
    assert_eq!(a.0, 200, "allow_unauthenticated: no token needed");
    drop(gw);

    let guarded = config_toml(
        &fake.url(),
        &[("server", "listen = \"0.0.0.0:0\""), ("server", TOKENS)],
    );
    let (code, err) = run_to_exit(&guarded, &["check-config"]);
    assert_eq!(code, Some(0), "{err}");
    let gw = Gateway::start(&guarded).await;
    let addr = loopback(&gw);
    assert_eq!(get(&format!("http://{addr}/readyz")).await.unwrap().0, 200);
    let url = format!("http://{addr}{GET_LIST}");
    assert_unauthorized(&call("POST", &url, None, body).await, "0.0.0.0, no token");
    let a = call("POST", &url, Some(&format!("Bearer {TOKEN_A}")), body).await;
    assert_eq!(a.0, 200);
}

/// On the cache-hit path too: a cached page is served only with a valid token, and a
/// rotation of `server.auth_tokens_file` applies at once, on a connection kept open
/// across it (the hit path keeps a per-connection view of the token list).
#[tokio::test]
async fn the_hit_path_checks_tokens_and_follows_a_rotation() {
    use common::raw::RawConn;
    let fake = FakeChat::start(echo_pages()).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens_file = k8s_mount(dir.path(), "auth_tokens", "old-caller-token-000000\n");
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "server",
                &format!("auth_tokens_file = \"{}\"", tokens_file.display()),
            ),
            ("cache", "ttl_secs = 600"),
        ],
    ))
    .await;
    let body = r#"{"From_Account":"user_0001"}"#;
    let request = |auth: Option<&str>| {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        format!(
            "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut conn = RawConn::connect(gw.addr).await;
    let mut ask = async |auth: Option<&str>| {
        conn.send(request(auth).as_bytes()).await.unwrap();
        let r = conn.response(Duration::from_secs(5)).await.unwrap();
        (r.status, r.header("x-cache").to_string())
    };
    assert_eq!(
        ask(Some("Bearer old-caller-token-000000")).await,
        (200, "MISS".into())
    );
    assert_eq!(
        ask(Some("Bearer old-caller-token-000000")).await,
        (200, "HIT".into())
    );
    assert_eq!(
        ask(Some("bearer   old-caller-token-000000")).await,
        (200, "HIT".into())
    );
    for auth in [
        None,
        Some("Bearer old-caller-token-00000"),
        Some("Bearer old-caller-token-0000000"),
        Some("Basic old-caller-token-000000"),
        Some("Bearer "),
    ] {
        let (status, _) = ask(auth).await;
        assert_eq!(status, 401, "{auth:?} on a cached page");
    }
    k8s_swap(dir.path(), "auth_tokens", "v2", "new-caller-token-111111\n");
    assert!(
        gw.wait_log("server.auth_tokens_file", Duration::from_secs(3))
            .await
    );
    // The same connection sees the new list.
    assert_eq!(ask(Some("Bearer old-caller-token-000000")).await.0, 401);
    assert_eq!(
        ask(Some("Bearer new-caller-token-111111")).await,
        (200, "HIT".into())
    );
    assert_eq!(fake.count(), 1, "every other answer came from the cache");
}

/// Runs `chat-gateway check-config` with `toml` and `env`; returns (exit code,
/// stdout, stderr).
fn check_config(toml: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A caller token must be at least 16 characters, in the file or in the
/// environment; the refusal names the key, never the token.
#[test]
fn tokens_shorter_than_16_characters_are_refused() {
    let fifteen = "short-token-015";
    let sixteen = "token-of-16-char";
    assert_eq!((fifteen.len(), sixteen.len()), (15, 16));
    let with = |tokens: &str| config_toml("http://127.0.0.1:9", &[("server", tokens)]);

    for (toml, env) in [
        (
            with(&format!("auth_tokens = [\"{sixteen}\", \"{fifteen}\"]")),
            None,
        ),
        (
            config_toml("http://127.0.0.1:9", &[]),
            Some(format!("{sixteen},{fifteen}")),
        ),
    ] {
        let env: Vec<(&str, &str)> = env
            .as_deref()
            .map(|v| vec![("CHAT_GATEWAY__SERVER__AUTH_TOKENS", v)])
            .unwrap_or_default();
        let (code, out, err) = check_config(&toml, &env);
        assert_eq!(code, Some(1), "{env:?}: {out}{err}");
        assert!(err.contains("server.auth_tokens"), "{err}");
        assert!(err.contains("16"), "the rule is stated: {err}");
        assert!(
            !err.contains(fifteen) && !err.contains(sixteen) && !out.contains(fifteen),
            "a token was echoed: {err}"
        );
        if env.is_empty() {
            // The binary refuses to serve with it too (the same loading as above).
            let (code, err) = run_to_exit(&toml, &[]);
            assert_eq!(code, Some(1), "{err}");
            assert!(!err.contains(fifteen), "{err}");
        }
    }
    let (code, out, err) = check_config(&with(&format!("auth_tokens = [\"{sixteen}\"]")), &[]);
    assert_eq!(code, Some(0), "16 characters are enough: {err}");
    assert!(
        !out.contains(sixteen),
        "check-config never prints a token: {out}"
    );
    assert!(out.contains("auth_tokens"), "{out}");
}

/// `CHAT_GATEWAY__SERVER__AUTH_TOKENS` is a comma-separated list: each token works
/// on its own, the whole string is no token. No token appears in `/metrics`, in the
/// log, or in `check-config`'s output.
#[tokio::test]
async fn tokens_from_the_environment_are_a_comma_separated_list_never_shown() {
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(&fake.url(), &[("log", "level = \"debug\"\naccess = true")]);
    let env = [(
        "CHAT_GATEWAY__SERVER__AUTH_TOKENS",
        "token-aaaaaaaaaaaaaaaa,token-bbbbbbbbbbbbbbbb",
    )];
    let gw = Gateway::start_with_env(&toml, &env).await;
    let url = gw.url(GET_LIST);
    let body = r#"{"From_Account":"user_0001"}"#;
    for token in [TOKEN_A, TOKEN_B] {
        let a = call("POST", &url, Some(&format!("Bearer {token}")), body).await;
        assert_eq!(a.0, 200, "{token}");
        assert_eq!(json(&a)["ErrorCode"], 0);
    }
    for (what, auth) in [
        ("none", None),
        (
            "the whole list",
            Some(format!("Bearer {TOKEN_A},{TOKEN_B}")),
        ),
        ("another", Some(format!("Bearer {WRONG}"))),
    ] {
        let a = call("POST", &url, auth.as_deref(), body).await;
        assert_unauthorized(&a, what);
    }
    let metrics = get(&gw.url("/metrics")).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics.2);
    let (code, out, err) = check_config(&toml, &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("auth_tokens"), "{out}");
    for token in [TOKEN_A, TOKEN_B, WRONG] {
        // Any 8 characters of a token are too many.
        let tail = &token[token.len() - 8..];
        assert!(!metrics.contains(tail), "{token} in /metrics");
        assert!(
            !out.contains(tail) && !err.contains(tail),
            "{token} in check-config"
        );
        assert!(!gw.log_text().contains(tail), "{token} in the log");
    }
}
