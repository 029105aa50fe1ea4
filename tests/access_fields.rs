//! The access log's fields, as the README documents them (Operating it, Access log):
//! `bytes` is the answer's body length, `upstream_us` the time spent in calls to
//! Chat, `duration_us` the request's whole time (at least that), `peer` the caller's
//! address and port, `listener` the listener that took the request; in the text
//! format and in JSON. Written against the README's example line
//!
//! ```text
//! INFO access method=POST path=/v4/recentcontact/get_list status=200 cache="MISS" code=0 attempts=1 upstream_us=1063 bytes=322 duration_us=1550 request_id="rid-1" peer=127.0.0.1:56786 user_agent="svc-orders/1.2" listener="main"
//! ```

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";
/// How long the fake Chat takes to answer a get_list.
const CHAT_DELAY: Duration = Duration::from_millis(100);

/// The fields of one access-log line: `key=value` pairs of the text format (quotes
/// taken off), or the members of a JSON line (at its top level or under `fields`).
fn fields(line: &str) -> HashMap<String, String> {
    if let Some(start) = line.find('{') {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[start..]) {
            let mut out = HashMap::new();
            for obj in [Some(&v), v.get("fields")].into_iter().flatten() {
                for (k, v) in obj.as_object().into_iter().flatten() {
                    let s = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    out.insert(k.clone(), s);
                }
            }
            return out;
        }
    }
    let mut out = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].rsplit(' ').next().unwrap_or("").to_string();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (
                quoted[..end].to_string(),
                &quoted[(end + 1).min(quoted.len())..],
            )
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.insert(key, value);
        rest = next;
    }
    out
}

/// The access-log line of the request with id `rid`, once it is written.
async fn line_of(gw: &Gateway, rid: &str) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<String> = gw
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("access") && l.contains(rid))
            .cloned()
            .collect();
        if let [line] = &found[..] {
            let f = fields(line);
            if f.get("request_id").map(String::as_str) == Some(rid) {
                return f;
            }
        }
        assert!(found.len() <= 1, "one line per request: {found:#?}");
        assert!(
            Instant::now() < deadline,
            "no access line for {rid}: {}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` on a fresh connection to `addr`; returns the answer and the
/// connection's own address (what the gateway sees as the peer).
async fn exchange(addr: SocketAddr, request: String) -> (RawResponse, SocketAddr) {
    let mut c = RawConn::connect(addr).await;
    let local = c.stream.local_addr().unwrap();
    c.send(request.as_bytes()).await.unwrap();
    let r = c
        .response(Duration::from_secs(10))
        .await
        .expect("an answer");
    (r, local)
}

fn post_request(path: &str, rid: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Request-Id: {rid}\r\nUser-Agent: svc-orders/1.2\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn num(f: &HashMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .unwrap_or_else(|| panic!("no {key} in {f:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {f:?}"))
}

/// Checks the fields every line has, for an answer `r` to a request from `peer`.
fn assert_common(f: &HashMap<String, String>, r: &RawResponse, peer: SocketAddr, listener: &str) {
    assert_eq!(f["status"], r.status.to_string(), "{f:?}");
    assert_eq!(
        num(f, "bytes"),
        r.body.len() as u64,
        "bytes: the body's length: {f:?}"
    );
    assert_eq!(
        f["peer"],
        peer.to_string(),
        "peer: the caller's address and port"
    );
    assert_eq!(f["listener"], listener, "{f:?}");
    assert!(
        num(f, "duration_us") >= num(f, "upstream_us"),
        "the request took at least its calls to Chat: {f:?}"
    );
}

async fn access_fields_in(format: &str) {
    let fake = FakeChat::start(Box::new(|r: &Recorded, _| {
        let acc = r.json()["From_Account"].as_str().unwrap_or("?").to_string();
        Reply::Json(page_for(&acc, 0), CHAT_DELAY)
    }))
    .await;
    // At level warn (the access log is written whatever the level), so no serving
    // line announces the ports: fixed ones.
    let (main, admin, callback) = (free_addr(), free_addr(), free_addr());
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "log",
                &format!("level = \"warn\"\naccess = true\nformat = \"{format}\""),
            ),
            (
                "server",
                &format!(
                    "listen = \"{main}\"\nadmin_listen = \"{admin}\"\ncallback_listen = \"{callback}\""
                ),
            ),
        ],
    ))
    .await;
    let body = r#"{"From_Account":"alice"}"#;

    // A miss: one call to Chat, which took CHAT_DELAY.
    let (r, peer) = exchange(main, post_request(GET_LIST, "rid-miss", body)).await;
    assert_eq!(r.header("x-cache"), "MISS");
    let f = line_of(&gw, "rid-miss").await;
    assert_common(&f, &r, peer, "main");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], GET_LIST);
    assert_eq!(f["cache"], "MISS");
    assert_eq!(f["code"], "0");
    assert_eq!(f["attempts"], "1");
    assert_eq!(f["user_agent"], "svc-orders/1.2");
    assert!(
        num(&f, "upstream_us") >= CHAT_DELAY.as_micros() as u64,
        "upstream_us counts the time Chat took: {f:?}"
    );

    // A hit: no call to Chat.
    let (r, peer) = exchange(main, post_request(GET_LIST, "rid-hit", body)).await;
    assert_eq!(r.header("x-cache"), "HIT");
    let f = line_of(&gw, "rid-hit").await;
    assert_common(&f, &r, peer, "main");
    assert_eq!(f["attempts"], "0");
    assert_eq!(num(&f, "upstream_us"), 0, "no call, no upstream time");

    // The gateway's own refusal, on the router's path.
    let (r, peer) = exchange(main, post_request("/nope", "rid-404", "{}")).await;
    assert_eq!(r.status, 404);
    let f = line_of(&gw, "rid-404").await;
    assert_common(&f, &r, peer, "main");
    assert_eq!(f["code"], "60009");

    // The admin and callback listeners say who they are.
    let (r, peer) = exchange(
        admin,
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Request-Id: rid-admin\r\n\r\n".to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let f = line_of(&gw, "rid-admin").await;
    assert_common(&f, &r, peer, "admin");
    let hook = format!(
        "/callback?SdkAppid={SDKAPPID}&CallbackCommand=State.StateChange&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI"
    );
    let (r, peer) = exchange(callback, post_request(&hook, "rid-callback", "{}")).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let f = line_of(&gw, "rid-callback").await;
    assert_common(&f, &r, peer, "callback");
    assert_eq!(f["path"], "/callback", "never the query string");
}

#[tokio::test]
async fn access_log_fields_in_text() {
    access_fields_in("text").await;
}

#[tokio::test]
async fn access_log_fields_in_json() {
    access_fields_in("json").await;
}
