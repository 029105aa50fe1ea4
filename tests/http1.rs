//! The gateway's own HTTP/1.1 front end, over raw sockets: keep-alive and
//! pipelining, HTTP/1.0, `Expect: 100-continue`, `HEAD`, the hand-over to hyper
//! (chunked bodies, HTTP/2), malformed and oversized heads, and arbitrary bytes.

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;
use proptest::prelude::*;

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

/// A chunked body and an HTTP/2 connection are served (by hyper, which takes the
/// connection over with what was read).
#[tokio::test]
async fn chunked_bodies_and_http2_are_handed_over() {
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
    // The connection carries on (now hyper's).
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

/// Malformed heads get 400, oversized ones 431, an oversized body 413, and the
/// connection closes; none reaches Chat.
#[tokio::test]
async fn bad_requests_are_refused_and_closed() {
    let (fake, gw) = gateway().await;
    let mut many = String::from("GET /healthz HTTP/1.1\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let too_long = format!("POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Length: 70000\r\n\r\n");
    for (raw, status) in [
        ("NOT HTTP AT ALL\r\n\r\n".to_string(), 400),
        (
            format!("POST {GET_LIST} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            400,
        ),
        (
            "GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n".to_string(),
            400,
        ),
        (many, 431),
        (huge, 431),
        (too_long, 413),
    ] {
        let mut c = RawConn::connect(gw.addr).await;
        let _ = c.send(raw.as_bytes()).await;
        let r = c
            .response(Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("{status}: {e:?}"));
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["ErrorCode"].is_i64());
        assert!(c
            .closed_by(std::time::Instant::now() + Duration::from_secs(2))
            .await
            .is_some());
    }
    assert_eq!(fake.count(), 0);
}

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
        let (fake, gw) = rt.block_on(rt.spawn(gateway())).unwrap();
        Env {
            rt,
            gw,
            _fake: fake,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever bytes arrive, the gateway answers with a status line or closes the
    /// connection, and keeps serving others.
    #[test]
    fn arbitrary_bytes_get_an_answer_or_a_close(
        prefix in prop_oneof![
            Just(String::new()),
            Just("POST /v4/recentcontact/get_list HTTP/1.1\r\n".to_string()),
            Just("GET /healthz HTTP/1.".to_string()),
        ],
        junk in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let e = env();
        let addr = e.gw.addr;
        e.rt.block_on(async move {
            let mut c = RawConn::connect(addr).await;
            let mut bytes = prefix.into_bytes();
            bytes.extend_from_slice(&junk);
            bytes.extend_from_slice(b"\r\n\r\n");
            let _ = c.send(&bytes).await;
            match c.response(Duration::from_secs(3)).await {
                Ok(r) => assert!((100..600).contains(&r.status)),
                Err(ReadErr::Closed) => {}
                Err(ReadErr::Timeout) => {
                    // Waiting for more of a head or body is fine; the timeouts close it.
                }
            }
            let ok = get(&format!("http://{addr}/healthz")).await.unwrap();
            assert_eq!(ok.0, 200);
        });
    }
}
