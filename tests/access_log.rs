//! The access log against the real binary: a stalled output (stdout a pipe nobody
//! reads) loses no request and blocks none, and every line it could not write is
//! counted; JSON lines; sampling that keeps every error, stale and retried answer.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::RawConn;
use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";

fn get_list_request(account: &str) -> String {
    let body = format!(r#"{{"From_Account":"{account}"}}"#);
    format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nUser-Agent: burst/1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn scrape(gw: &Gateway) -> String {
    String::from_utf8(get(&gw.url("/metrics")).await.unwrap().2.to_vec()).unwrap()
}

/// 100,000 hits with the access log on and its output stalled: a pipe nobody reads
/// fills after 64 KiB, then the log's own buffer. Every request is answered (none
/// waits on the log: a blocked request would time out here), the lines that did
/// not fit are dropped and counted, and once the pipe is read again every other
/// line arrives whole: written + dropped = requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_access_log_loses_no_request_and_blocks_none() {
    let fake = FakeChat::start(echo_pages()).await;
    let listen = free_addr();
    let toml = config_toml(
        &fake.url(),
        &[
            ("server", &format!("listen = \"{listen}\"")),
            ("cache", "ttl_secs = 3600"),
            (
                "log",
                "level = \"warn\"\naccess = true\naccess_output = \"stdout\"\naccess_buffer_bytes = 65536",
            ),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let mut gw = Gateway::start_file_with(dir, path, &[], |c| {
        c.stdout(Stdio::piped());
    })
    .await;
    // Held open and not read: the gateway's stdout fills and stays full.
    let stdout = gw.child.stdout.take().unwrap();
    // Requests made (the /readyz polls of start() apart: their lines are skipped).
    let mut requests = 0usize;
    let fill = post(&gw.url(GET_LIST), r#"{"From_Account":"burst"}"#).await;
    assert_eq!(header(&fill, "x-cache"), "MISS");
    requests += 1;

    const CONNECTIONS: usize = 8;
    const HITS: usize = 100_000;
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let req = get_list_request("burst");
            let mut conn = RawConn::connect(listen).await;
            for _ in 0..HITS / CONNECTIONS {
                conn.send(req.as_bytes()).await.unwrap();
                // A request blocked behind the log would never be answered.
                let r = conn.response(Duration::from_secs(20)).await.unwrap();
                assert_eq!(r.status, 200);
                assert_eq!(r.header("x-cache"), "HIT");
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(answered.load(Ordering::Relaxed), HITS);
    requests += HITS;
    eprintln!(
        "{HITS} hits in {:?} with the log stalled",
        started.elapsed()
    );

    // Lines were dropped (and counted) rather than waited for.
    let dropped = metric(&scrape(&gw).await, "chat_gateway_access_log_dropped_total");
    requests += 1;
    assert!(
        dropped > 0.0,
        "the pipe was full: lines must have been dropped"
    );

    // Read the pipe again: everything that was not dropped arrives, whole and in order.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut stdout = stdout;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut text = Vec::new();
    let drain = |text: &mut Vec<u8>| {
        while let Ok(chunk) = rx.try_recv() {
            text.extend_from_slice(&chunk);
        }
    };
    let has =
        |text: &[u8], needle: &str| text.windows(needle.len()).any(|w| w == needle.as_bytes());
    let tagged = |rid: String| {
        let url = gw.url("/metrics");
        async move {
            send(
                http::Request::get(url)
                    .header("x-request-id", rid)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };
    // A marker whose line arrives means every older line that was kept has arrived
    // (lines are written in order). A marker logged while the buffer was still full
    // is dropped itself: send another.
    let deadline = Instant::now() + Duration::from_secs(60);
    'marked: for k in 0.. {
        let rid = format!("rid-marker-{k}");
        tagged(rid.clone()).await;
        requests += 1;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            drain(&mut text);
            if has(&text, &format!("request_id=\"{rid}\"")) {
                break 'marked;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(Instant::now() < deadline, "no marker line ever arrived");
    }
    // Every drop happened before this scrape; its own line is kept (the pipe is read).
    let last = tagged("rid-final".into()).await;
    requests += 1;
    let dropped = metric(
        std::str::from_utf8(&last.2).unwrap(),
        "chat_gateway_access_log_dropped_total",
    );
    while !has(&text, "request_id=\"rid-final\"") {
        assert!(Instant::now() < deadline, "the last line never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain(&mut text);
    }
    let text = String::from_utf8(text).expect("whole UTF-8 lines");
    let written = text.lines().filter(|l| !l.contains("path=/readyz")).count();
    assert_eq!(
        written as f64 + dropped,
        requests as f64,
        "every request's line was written or counted as dropped"
    );
    for line in text.lines() {
        assert!(
            line.contains("  INFO access method=") && line.ends_with("listener=\"main\""),
            "a whole line: {line:?}"
        );
    }
    assert!(text.lines().any(|l| l.contains("cache=\"HIT\"")));
    let _ = &mut gw;
}

/// `log.access_format = "json"` with `log.access_sample = 0`: successful answers get
/// no line; errors, stale answers and answers that took retries always do, in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_errors_stale_and_retried_answers_in_json() {
    // Chat answers the first call, then fails every call (retried: get_list is a read).
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        if n == 1 {
            let v = r.json();
            let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
            Reply::Json(page_for(&acc, 0), Duration::ZERO)
        } else {
            Reply::Json(chat_error(50005), Duration::ZERO)
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("cache", "ttl_secs = 1\nstale_if_error_secs = 600"),
            (
                "log",
                "level = \"info\"\naccess = true\naccess_format = \"json\"\naccess_sample = 0.0",
            ),
        ],
    ))
    .await;
    let url = gw.url(GET_LIST);
    let send_rid = |rid: &'static str, body: &'static str| {
        let url = url.clone();
        async move {
            send(
                http::Request::post(url)
                    .header("x-request-id", rid)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let miss = send_rid("rid-ok-miss", r#"{"From_Account":"sam"}"#).await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    for _ in 0..20 {
        let hit = send_rid("rid-ok-hit", r#"{"From_Account":"sam"}"#).await;
        assert_eq!(header(&hit, "x-cache"), "HIT");
    }
    let bad = send_rid("rid-bad", r#"{"From_Account":"#).await;
    assert_eq!(json(&bad)["ErrorCode"], 60003);
    // Once the page is past its TTL, Chat's failures make it STALE (after retries).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = send_rid("rid-stale", r#"{"From_Account":"sam"}"#).await;
        if header(&a, "x-cache") == "STALE" {
            break;
        }
        assert_eq!(header(&a, "x-cache"), "HIT");
        assert!(Instant::now() < deadline, "the page never went stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another account: Chat fails, retried, no stale page: an error with attempts.
    let failed = send_rid("rid-failed", r#"{"From_Account":"nobody"}"#).await;
    assert_eq!(json(&failed)["ErrorCode"], 50005);

    assert!(gw.wait_log("rid-failed", Duration::from_secs(5)).await);
    let lines: Vec<serde_json::Value> = gw
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"target\":\"chat_gateway::access\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let of = |rid: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|v| v["fields"]["request_id"] == rid)
            .collect()
    };
    assert!(of("rid-ok-miss").is_empty(), "a success is sampled out");
    assert!(of("rid-ok-hit").is_empty(), "hits are sampled out");
    let bad = of("rid-bad");
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["fields"]["code"], 60003);
    assert_eq!(bad[0]["fields"]["message"], "access");
    assert_eq!(bad[0]["level"], "INFO");
    let stale: Vec<_> = of("rid-stale")
        .into_iter()
        .filter(|v| v["fields"]["cache"] == "STALE")
        .collect();
    assert_eq!(stale.len(), 1, "{lines:#?}");
    assert!(stale[0]["fields"]["attempts"].as_u64().unwrap() > 1);
    assert_eq!(
        of("rid-stale").len(),
        1,
        "the hits before it were sampled out"
    );
    let failed = of("rid-failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["fields"]["code"], 50005);
    assert!(failed[0]["fields"]["attempts"].as_u64().unwrap() > 1);
    for v in &lines {
        let f = &v["fields"];
        for key in [
            "method",
            "path",
            "status",
            "cache",
            "attempts",
            "upstream_us",
            "bytes",
            "duration_us",
            "request_id",
            "peer",
            "user_agent",
            "listener",
        ] {
            assert!(!f[key].is_null(), "{key} in {v}");
        }
    }
}
