//! The gateway's own HTTP/1.1 front end, over raw sockets: keep-alive and
//! pipelining, HTTP/1.0, `Expect: 100-continue`, `HEAD`, chunked bodies, the
//! hand-over of HTTP/2 to hyper, malformed and oversized heads, arbitrary bytes,
//! half-closed requests, lingering close and its bounds, `Cache-Control` in any case,
//! the HTTP/2 idle timeout, and graceful shutdown on both protocols. The table of
//! RFC cases and request-smuggling families is `tests/conformance.rs`.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

const GET_LIST: &str = "/v4/recentcontact/get_list";

fn post_head(path: &str, body: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

async fn gateway() -> (FakeChat, Gateway) {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[("cache", "ttl_secs = 600")])).await;
    (fake, gw)
}

/// Pipelined requests on one connection are answered in order: a miss, then hits
/// (the hit path), then another route (the router's path), all on one socket.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (fake, gw) = gateway().await;
    let mut c = RawConn::connect(gw.addr).await;
    let body = r#"{"From_Account":"pipe"}"#;
    let mut batch = String::new();
    for i in 0..3 {
        batch.push_str(&post_head(
            GET_LIST,
            body,
            &format!("X-Request-Id: r{i}\r\n"),
        ));
    }
    batch.push_str("GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n");
    c.send(batch.as_bytes()).await.unwrap();
    let mut caches = Vec::new();
    for i in 0..3 {
        let r = c.response(Duration::from_secs(3)).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), format!("r{i}"));
        assert_eq!(r.json()["ErrorCode"], 0);
        assert!(!r.header("date").is_empty());
        caches.push(r.header("x-cache").to_string());
    }
    assert_eq!(caches, ["MISS", "HIT", "HIT"]);
    let h = c.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.body, b"ok\n");
    assert_eq!(fake.count(), 1);
}

/// HTTP/1.0 keeps the connection only when asked; `Connection: close` is honoured;
/// `HEAD` gets the head alone; `Expect: 100-continue` gets its interim answer.
#[tokio::test]
async fn connection_semantics() {
    let (_fake, gw) = gateway().await;
    let body = r#"{"From_Account":"semantics"}"#;
    // Warm the cache.
    post(&gw.url(GET_LIST), body).await;

    let mut c = RawConn::connect(gw.addr).await;
    let req10 = format!(
        "POST {GET_LIST} HTTP/1.0\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    c.send(req10.as_bytes()).await.unwrap();
    let r = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(r.header("x-cache"), "HIT");
    assert_eq!(r.header("connection"), "keep-alive");
    let plain10 = format!(
        "POST {GET_LIST} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.send(plain10.as_bytes()).await.unwrap();
    let r = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(r.header("connection"), "close");
    assert!(c
        .closed_by(std::time::Instant::now() + Duration::from_secs(2))
        .await
        .is_some());

    let mut c = RawConn::connect(gw.addr).await;
    c.send(post_head(GET_LIST, body, "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let r = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), "close");
    assert!(c
        .closed_by(std::time::Instant::now() + Duration::from_secs(2))
        .await
        .is_some());

    let mut c = RawConn::connect(gw.addr).await;
    c.send(b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    // A HEAD answer has a content-length but no body: the next answer follows it.
    let head = c.head_response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(head.status, 405);
    assert!(head.header("content-length").parse::<usize>().unwrap() > 0);
    let next = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(next.status, 200);
    assert_eq!(next.body, b"ok\n");

    let mut c = RawConn::connect(gw.addr).await;
    let head = format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.send(head.as_bytes()).await.unwrap();
    let interim = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(interim.status, 100);
    c.send(body.as_bytes()).await.unwrap();
    let r = c.response(Duration::from_secs(2)).await.unwrap();
    assert_eq!(r.header("x-cache"), "HIT");
}

/// A chunked body is served by the front end (the connection carries on), and an
/// HTTP/2 connection by hyper, which takes it over with what was read.
#[tokio::test]
async fn chunked_bodies_are_served_and_http2_is_handed_over() {
    let (fake, gw) = gateway().await;
    let mut c = RawConn::connect(gw.addr).await;
    let body = r#"{"From_Account":"chunky"}"#;
    let chunked = format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    c.send(chunked.as_bytes()).await.unwrap();
    let r = c.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), "MISS");
    // The connection carries on.
    c.send(post_head(GET_LIST, body, "").as_bytes())
        .await
        .unwrap();
    let r = c.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.header("x-cache"), "HIT");
    assert_eq!(fake.count(), 1);

    // HTTP/2 with prior knowledge.
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{GET_LIST}", gw.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "HIT");
}

/// Malformed heads get 400, oversized ones 431, an oversized body 413, each in
/// Chat's envelope with `ErrorCode` 60008, and the connection closes; none reaches
/// Chat. A head refused by the HTTP rules gets no `x-request-id` (even when it
/// carried one); a body refused after a valid head does.
#[tokio::test]
async fn bad_requests_are_refused_and_closed() {
    let (fake, gw) = gateway().await;
    let rid = "X-Request-Id: rid-refused\r\n";
    let mut many = format!("GET /healthz HTTP/1.1\r\nHost: gw\r\n{rid}");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: gw\r\n{rid}X-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let too_long =
        format!("POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\n{rid}Content-Length: 70000\r\n\r\n");
    // (request, status, x-chat-gateway-error; None: a head refused, no request id)
    for (raw, status, reason) in [
        ("NOT HTTP AT ALL\r\n\r\n".to_string(), 400, None),
        (
            format!("POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\n{rid}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400,
            None,
        ),
        (
            format!("GET /healthz HTTP/1.1\r\nHost: gw\r\n{rid}Bad Header: x\r\n\r\n"),
            400,
            None,
        ),
        (many, 431, None),
        (huge, 431, None),
        (too_long, 413, Some("body-too-large")),
    ] {
        let mut c = RawConn::connect(gw.addr).await;
        let _ = c.send(raw.as_bytes()).await;
        let r = c
            .response(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{status}: {e:?}"));
        let what = format!("{status} for {:?}", &raw[..raw.len().min(60)]);
        assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["ActionStatus"], "FAIL", "{what}");
        assert_eq!(v["ErrorCode"], 60008, "{what}");
        assert!(v["ErrorInfo"].as_str().is_some_and(|s| !s.is_empty()), "{what}");
        assert_eq!(r.header("content-type"), "application/json", "{what}");
        assert_eq!(r.header("connection"), "close", "{what}");
        match reason {
            None => assert!(
                r.headers
                    .iter()
                    .all(|(k, _)| !k.eq_ignore_ascii_case("x-request-id")),
                "{what}: a refused head gets no x-request-id: {:?}",
                r.headers
            ),
            Some(reason) => {
                assert_eq!(r.header("x-chat-gateway-error"), reason, "{what}");
                assert_eq!(r.header("x-request-id"), "rid-refused", "{what}");
            }
        }
        assert!(
            c.closed_by(std::time::Instant::now() + Duration::from_secs(5))
                .await
                .is_some(),
            "{what}: closed"
        );
    }
    assert_eq!(fake.count(), 0);
}

/// The socket property's gateway: short header and body timeouts, so that every
/// connection is answered or closed soon.
const PROP_HEADER_TIMEOUT: Duration = Duration::from_millis(300);
const PROP_BODY_TIMEOUT: Duration = Duration::from_millis(300);

struct Env {
    rt: tokio::runtime::Runtime,
    gw: Gateway,
    _fake: FakeChat,
}

fn env() -> &'static Env {
    static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        // Started on a runtime worker thread, which lives as long as this static.
        let (fake, gw) = rt
            .block_on(rt.spawn(async {
                let fake = FakeChat::start(echo_pages()).await;
                let server = format!(
                    "header_read_timeout_ms = {}\nbody_read_timeout_ms = {}",
                    PROP_HEADER_TIMEOUT.as_millis(),
                    PROP_BODY_TIMEOUT.as_millis()
                );
                let gw = Gateway::start(&config_toml(&fake.url(), &[("server", &server)])).await;
                (fake, gw)
            }))
            .unwrap();
        Env {
            rt,
            gw,
            _fake: fake,
        }
    })
}

/// What an answer to arbitrary bytes may be: a valid request's answer (the probe's
/// `ok`, or an envelope from get_list), or a refusal in Chat's envelope with the
/// code the README's table gives its status (and no request id for a refused head).
fn check_answer(r: &RawResponse) -> Result<(), String> {
    let text = String::from_utf8_lossy(&r.body).into_owned();
    if r.status == 200 && text == "ok\n" {
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|_| format!("{}: not JSON: {text:?}", r.status))?;
    let code = v["ErrorCode"]
        .as_i64()
        .ok_or(format!("{}: no ErrorCode: {v}", r.status))?;
    let want = match r.status {
        200 => return Ok(()),
        400 | 408 | 413 | 414 | 431 | 501 => 60008,
        404 | 405 => 60009,
        other => return Err(format!("unexpected status {other}: {v}")),
    };
    if code != want || v["ActionStatus"] != "FAIL" {
        return Err(format!("{} with {v}", r.status));
    }
    let head_refused =
        matches!(r.status, 400 | 414 | 431 | 501) && r.header("x-chat-gateway-error").is_empty();
    if head_refused && !r.header("x-request-id").is_empty() {
        return Err(format!("{}: a refused head with an x-request-id", r.status));
    }
    if r.status >= 400 && r.header("connection") != "close" && r.status != 404 && r.status != 405 {
        return Err(format!("{}: a refusal that keeps the connection", r.status));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever bytes arrive, the gateway answers in Chat's envelope with the code
    /// of its status, or closes the connection, within its header and body read
    /// timeouts; and it keeps serving others.
    #[test]
    fn arbitrary_bytes_get_an_answer_or_a_close(
        prefix in prop_oneof![
            3 => Just(String::new()),
            3 => Just("POST /v4/recentcontact/get_list HTTP/1.1\r\n".to_string()),
            3 => Just("GET /healthz HTTP/1.".to_string()),
            // A valid head whose body never fully arrives.
            1 => Just("POST /v4/recentcontact/get_list HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n".to_string()),
        ],
        junk in prop::collection::vec(any::<u8>(), 0..300),
        // Usually the end of a head; sometimes nothing, so the head may never end.
        end in prop_oneof![9 => Just(&b"\r\n\r\n"[..]), 1 => Just(&b""[..])],
    ) {
        let e = env();
        let addr = e.gw.addr;
        let outcome: Result<(), String> = e.rt.block_on(async move {
            let mut c = RawConn::connect(addr).await;
            let mut bytes = prefix.into_bytes();
            bytes.extend_from_slice(&junk);
            bytes.extend_from_slice(end);
            let _ = c.send(&bytes).await;
            // Slack for a busy machine on top of the two documented bounds.
            let deadline = std::time::Instant::now()
                + PROP_HEADER_TIMEOUT
                + PROP_BODY_TIMEOUT
                + Duration::from_secs(4);
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match c.response(left).await {
                    Ok(r) if r.status == 100 => continue,
                    Ok(r) => {
                        check_answer(&r)?;
                        if r.header("connection") == "close" {
                            c.closed_by(deadline)
                                .await
                                .ok_or(format!("{} with connection: close, still open", r.status))?;
                        }
                        break;
                    }
                    Err(ReadErr::Closed) => break,
                    Err(ReadErr::Timeout) => {
                        return Err("neither an answer nor a close within the read timeouts".into())
                    }
                }
            }
            let ok = get(&format!("http://{addr}/healthz")).await?;
            if ok.0 != 200 {
                return Err(format!("the probe got {}", ok.0));
            }
            Ok(())
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

/// A request whose sender shuts down its sending side once the request is sent (a
/// half-close) is answered, chunked or not: a write that reached Chat gets its
/// answer, so the caller has no reason to send it again.
#[tokio::test]
async fn half_closed_requests_are_answered() {
    let fake = FakeChat::start(Box::new(|_r: &Recorded, _n| {
        Reply::Json(
            serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","QueryResult":[]}),
            Duration::from_millis(50),
        )
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let body = r#"{"To_Account":["u1"]}"#;
    for i in 0..5 {
        for chunked in [true, false] {
            let mut c = RawConn::connect(gw.addr).await;
            let req = if chunked {
                format!(
                    "POST /v4/openim/querystate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                    body.len()
                )
            } else {
                post_head("/v4/openim/querystate", body, "")
            };
            c.send(req.as_bytes()).await.unwrap();
            c.stream.shutdown().await.unwrap();
            let r = c
                .response(Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("try {i}, chunked {chunked}: no answer ({e:?})"));
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["ErrorCode"], 0);
            assert!(c
                .closed_by(std::time::Instant::now() + Duration::from_secs(3))
                .await
                .is_some());
        }
    }
    assert_eq!(
        fake.count(),
        10,
        "every request reached Chat once, and was answered"
    );
}

/// `Cache-Control: no-cache` / `no-store` skip the cache in any letter case
/// (directives are case-insensitive, RFC 9111 §5.2), whichever path the request takes.
#[tokio::test]
async fn no_cache_in_any_case_bypasses_the_cache() {
    let (fake, gw) = gateway().await;
    let body = r#"{"From_Account":"nocache"}"#;
    post(&gw.url(GET_LIST), body).await;
    assert_eq!(fake.count(), 1);
    for (i, directive) in ["No-Cache", "NO-STORE", "max-age=0, No-Store", "no-cache"]
        .iter()
        .enumerate()
    {
        let a = send(
            http::Request::post(gw.url(GET_LIST))
                .header("cache-control", *directive)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(header(&a, "x-cache"), "BYPASS", "{directive}");
        assert_eq!(fake.count(), i + 2, "{directive}: Chat was asked");
    }
}

/// Runs `python3` with `script`; returns its stdout.
fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `requests` does underneath: Python's `http.client` sends the whole body before
/// it reads the answer. A body far over the limit gets its 413, every time, instead of
/// a connection reset (the gateway drains the body it refused: lingering close).
#[tokio::test]
async fn python_upload_over_the_limit_gets_its_413() {
    let (fake, gw) = gateway().await;
    let script = r#"
import http.client, sys
port = int(sys.argv[1])
ok = 0
for i in range(10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        c.request("POST", "/v4/recentcontact/get_list", body=b"x" * (8 * 1024 * 1024),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status == 413 and b"60008" in data:
            ok += 1
        else:
            print("try", i, "status", r.status, file=sys.stderr)
    except Exception as e:
        print("try", i, repr(e), file=sys.stderr)
    c.close()
print(ok)
"#;
    let port = gw.addr.port().to_string();
    let ok = tokio::task::spawn_blocking(move || python(script, &[&port]))
        .await
        .unwrap();
    assert_eq!(ok.trim(), "10", "413s out of 10 tries");
    assert_eq!(fake.count(), 0);
}

/// What a caller writes: bytes, each after a pause.
type Writes = Vec<(Vec<u8>, Duration)>;

/// Writes all of `bytes` (as a caller that sends before it reads), then reads the
/// answer: `(whether every write succeeded, the answer, whether the connection then
/// ended with a clean close)`.
async fn send_all_then_read(
    addr: std::net::SocketAddr,
    parts: Writes,
) -> (bool, Option<RawResponse>, bool) {
    let mut c = RawConn::connect(addr).await;
    let mut sent = true;
    for (bytes, pause) in parts {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        if c.send(&bytes).await.is_err() {
            sent = false;
            break;
        }
    }
    let answer = c.response(Duration::from_secs(5)).await.ok();
    let mut clean = false;
    if answer.is_some() {
        let mut rest = [0u8; 4096];
        clean = matches!(
            tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read(&mut c.stream, &mut rest)
            )
            .await,
            Ok(Ok(0))
        );
    }
    (sent, answer, clean)
}

/// Every answer after which the gateway closes the connection reaches a caller that
/// is still sending: `Connection: close` and HTTP/1.0 with more bytes behind them,
/// a malformed head, a body over the limit, a body too slow (408). The gateway
/// shuts down its side, drains what still comes, then closes (RFC 9112 §9.6), where
/// closing at once would reset the connection: the caller's writes fail, and a caller
/// that sends everything before it reads (Python's `http.client`) never reads the
/// answer at all.
#[tokio::test]
async fn answers_that_close_are_not_lost_to_a_reset() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", "body_read_timeout_ms = 500")],
    ))
    .await;
    // More than the two sockets' buffers hold, so that the caller is still writing
    // when the gateway closes.
    let junk = vec![b'x'; 16 * 1024 * 1024];
    let now = Duration::ZERO;
    let cases: Vec<(&str, Writes, u16)> = vec![
        (
            "Connection: close",
            vec![
                (
                    b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".to_vec(),
                    now,
                ),
                (junk.clone(), now),
            ],
            200,
        ),
        (
            "HTTP/1.0",
            vec![
                (b"GET /healthz HTTP/1.0\r\n\r\n".to_vec(), now),
                (junk.clone(), now),
            ],
            200,
        ),
        (
            "malformed head",
            vec![
                (
                    b"GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec(),
                    now,
                ),
                (junk.clone(), now),
            ],
            400,
        ),
        (
            "body over the limit",
            vec![
                (
                    post_head(GET_LIST, "", "")
                        .replace("Content-Length: 0", "Content-Length: 4194304")
                        .into_bytes(),
                    now,
                ),
                (junk.clone(), now),
            ],
            413,
        ),
        (
            "body too slow",
            {
                let mut parts = vec![(
                    post_head(GET_LIST, "", "")
                        .replace("Content-Length: 0", "Content-Length: 10000")
                        .into_bytes(),
                    now,
                )];
                // Still trickling in well after the 408 (at 500 ms).
                for _ in 0..12 {
                    parts.push((vec![b'x'; 100], Duration::from_millis(100)));
                }
                parts
            },
            408,
        ),
    ];
    let mut failures = Vec::new();
    for (name, parts, status) in cases {
        let (sent, answer, clean) = send_all_then_read(gw.addr, parts).await;
        let got = answer
            .as_ref()
            .map(|a| (a.status, a.header("connection").to_string()));
        if !sent || got != Some((status, "close".to_string())) || !clean {
            failures.push(format!(
                "{name}: writes all sent {sent}, answer {got:?}, clean close {clean}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(fake.count(), 0);
}

/// Lingering close is bounded: a caller that keeps sending after an answer that
/// closes the connection is cut off after `LINGER_TIME` (slowly) or `LINGER_BYTES`
/// (fast), whichever comes first.
#[tokio::test]
async fn lingering_close_is_bounded_in_time_and_bytes() {
    use chat_gateway::server::http1::{LINGER_BYTES, LINGER_TIME};
    let (_fake, gw) = gateway().await;
    let closing = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";

    // Slowly: a kilobyte every 50 ms, until the gateway closes.
    let mut c = RawConn::connect(gw.addr).await;
    c.send(closing).await.unwrap();
    let r = c.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.status, 200);
    let answered = std::time::Instant::now();
    let cut = loop {
        if c.send(&[b'x'; 1024]).await.is_err() {
            break answered.elapsed();
        }
        assert!(
            answered.elapsed() < LINGER_TIME + Duration::from_secs(10),
            "still draining long past LINGER_TIME"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("slow sender cut off after {cut:?}");
    assert!(
        cut >= LINGER_TIME - Duration::from_millis(200),
        "cut off after {cut:?}, before LINGER_TIME"
    );

    // Fast: as fast as the socket takes it, until the gateway closes.
    let mut c = RawConn::connect(gw.addr).await;
    c.send(closing).await.unwrap();
    let r = c.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.status, 200);
    let chunk = vec![b'x'; 256 * 1024];
    let mut written = 0usize;
    let started = std::time::Instant::now();
    while c.send(&chunk).await.is_ok() {
        written += chunk.len();
        assert!(
            written < 4 * LINGER_BYTES,
            "still draining long past LINGER_BYTES"
        );
    }
    eprintln!(
        "fast sender cut off after {} MiB in {:?}",
        written >> 20,
        started.elapsed()
    );
    // What the gateway drained, plus what the two sockets' buffers held: cut by the
    // byte bound (cut by the time bound, it would be less than LINGER_BYTES).
    assert!(
        written >= LINGER_BYTES,
        "cut off after {written} bytes, before LINGER_BYTES"
    );
    assert!(
        written <= LINGER_BYTES + 32 * 1024 * 1024,
        "drained {written} bytes"
    );
}

/// The frames of a raw HTTP/2 connection, by type, until it closes or `within` ends:
/// `(frame types seen, whether it closed)`. Never acknowledges the server's PING.
async fn h2_frames(stream: &mut tokio::net::TcpStream, within: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut types = Vec::new();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            types.push(buf[3]);
            buf.drain(..9 + len);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut tmp)).await {
            Err(_) => return (types, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (types, true),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// HTTP/2 frame type GOAWAY.
const GOAWAY: u8 = 0x7;

/// An HTTP/2 (prior knowledge) connection idle for `server.header_read_timeout_ms`
/// gets GOAWAY and is closed, even when the client never answers the PING that
/// follows it; one with a request in flight longer than that is not.
#[tokio::test]
async fn idle_http2_connections_get_goaway_and_are_closed() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        Reply::Json(page_for(&acc, 0), Duration::from_millis(1500))
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("server", "header_read_timeout_ms = 1000")],
    ))
    .await;

    // Idle: a preface and SETTINGS, then nothing.
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let opened = std::time::Instant::now();
    let (types, closed) = h2_frames(&mut raw, Duration::from_secs(10)).await;
    let after = opened.elapsed();
    eprintln!("idle HTTP/2 connection: frames {types:?}, closed after {after:?}");
    assert!(types.contains(&GOAWAY), "no GOAWAY: {types:?}");
    assert!(closed, "still open after 10 s");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the idle timeout"
    );
    // The idle timeout, then GOAWAY_WAIT for the PING this client never answers
    // (slack for a busy machine).
    let bound = Duration::from_secs(1) + chat_gateway::server::listener::GOAWAY_WAIT;
    assert!(
        after <= bound + Duration::from_secs(3),
        "closed after {after:?}, well past {bound:?}"
    );

    // Busy for 1.5 s (longer than the idle timeout): the request is answered.
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{GET_LIST}", gw.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"From_Account":"h2busy"}"#,
        )))
        .unwrap();
    let resp = send_req.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    // Then idle: the gateway closes it (the client's connection task ends).
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .ok();
}

/// SIGTERM: a request in flight on an HTTP/1.1 keep-alive connection is answered with
/// `connection: close` and the connection closed; one in flight on HTTP/2 is answered,
/// and HTTP/2 connections get GOAWAY; the process then exits 0.
#[tokio::test]
async fn sigterm_tells_keep_alive_clients_and_finishes_in_flight_requests() {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        Reply::Json(page_for(&acc, 0), Duration::from_millis(1000))
    }))
    .await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;

    // HTTP/1.1 keep-alive, one answered request, then one in flight.
    let mut h1 = RawConn::connect(gw.addr).await;
    h1.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let r = h1.response(Duration::from_secs(3)).await.unwrap();
    assert_eq!(r.header("connection"), "", "kept alive before shutdown");
    h1.send(post_head(GET_LIST, r#"{"From_Account":"term1"}"#, "").as_bytes())
        .await
        .unwrap();

    // HTTP/2, one request in flight.
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{GET_LIST}", gw.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"From_Account":"term2"}"#,
        )))
        .unwrap();
    let h2_answer = tokio::spawn(async move { send_req.send_request(req).await });

    // HTTP/2, idle.
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();

    // Both requests are in flight once Chat has seen both.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never reached Chat"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gw.signal(libc::SIGTERM);

    let r = h1.response(Duration::from_secs(5)).await.expect("answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), "close");
    assert!(h1
        .closed_by(std::time::Instant::now() + Duration::from_secs(5))
        .await
        .is_some());
    drop(h1);
    let resp = h2_answer
        .await
        .unwrap()
        .expect("the HTTP/2 request in flight is answered");
    assert_eq!(resp.status(), 200);
    let (types, closed) = h2_frames(&mut raw, Duration::from_secs(5)).await;
    assert!(types.contains(&GOAWAY), "no GOAWAY: {types:?}");
    assert!(closed);
    let status = gw.exited(Duration::from_secs(10)).await.expect("exited");
    assert!(status.success(), "{status:?}");
}

/// SIGTERM: an idle HTTP/1.1 keep-alive connection, waiting for its next request
/// after a hit, is closed at once (not at the header read timeout, nor at the end
/// of the shutdown grace), and the process exits 0.
#[tokio::test]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "server",
                "shutdown_grace_secs = 60
header_read_timeout_ms = 60000",
            ),
            ("cache", "ttl_secs = 600"),
        ],
    ))
    .await;
    let mut c = RawConn::connect(gw.addr).await;
    let request = post_head(GET_LIST, r#"{"From_Account":"idle1"}"#, "");
    for expect in ["MISS", "HIT", "HIT"] {
        c.send(request.as_bytes()).await.unwrap();
        let r = c.response(Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), expect);
        assert_eq!(r.header("connection"), "", "kept alive");
    }
    // Idle: still open a while later.
    assert!(c
        .closed_by(std::time::Instant::now() + Duration::from_millis(300))
        .await
        .is_none());
    let signalled = std::time::Instant::now();
    gw.signal(libc::SIGTERM);
    let closed = c
        .closed_by(signalled + Duration::from_secs(10))
        .await
        .expect("the idle connection is closed after SIGTERM");
    eprintln!(
        "idle keep-alive connection closed {:?} after SIGTERM",
        closed - signalled
    );
    let status = gw
        .exited(Duration::from_secs(20))
        .await
        .expect("exited before the shutdown grace ended");
    assert!(status.success(), "{status:?}");
    assert_eq!(fake.count(), 1, "one call to Chat: the miss");
}

/// HTTP/2 requests (served by hyper) are held to the target rules every HTTP/1.x
/// request is: what hyper's URI parser lets through and the rules refuse is 400.
#[tokio::test]
async fn http2_requests_are_held_to_the_same_target_rules() {
    let (_fake, gw) = gateway().await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (target, status) in [
        ("/healthz", 200),
        ("/healthz?q={x}", 400),
        ("/healthz?x=%G1", 400),
        ("/a{b}", 400),
        ("/healthz?a|b", 400),
    ] {
        let req = http::Request::get(format!("http://{}{target}", gw.addr))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = send_req.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), status, "{target}");
        if status == 400 {
            use http_body_util::BodyExt;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["ErrorCode"], 60008, "{target}");
        }
    }
}
