//! The HTTP/1.x conformance table (`tests/data/conformance.toml`) against the real
//! binary: raw bytes in; the status of every response, their number and the state of
//! the connection out. Every case runs on both of the front end's paths: with a
//! cached page for its account (a valid get_list request is answered by the
//! cache-hit path) and with a fresh account (the router answers); they must agree,
//! and agree with the table.

mod common;

use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use tokio::io::AsyncWriteExt;

/// One row of the table.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    send: String,
    #[serde(default)]
    then: Option<String>,
    #[serde(default)]
    then_delay_ms: Option<u64>,
    #[serde(default)]
    shutdown: bool,
    expect: Vec<u16>,
    conn: String,
}

#[derive(Debug, serde::Deserialize)]
struct Table {
    case: Vec<Case>,
}

/// What a run of a case saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    statuses: Vec<u16>,
    conn: &'static str,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.statuses, self.conn)
    }
}

/// The get_list body for `account`.
fn body_for(account: &str) -> String {
    format!(r#"{{"From_Account":"{account}"}}"#)
}

/// The case's bytes, placeholders filled in for `account`.
fn fill(text: &str, account: &str) -> Vec<u8> {
    let body = body_for(account);
    let mut s = text
        .replace("{BODY}", &body)
        .replace("{LEN}", &body.len().to_string())
        .replace("{HEX}", &format!("{:x}", body.len()))
        .replace("{ACC}", account);
    // {a*N}: N times 'a'; {hdr*N}: N header lines.
    while let Some(start) = s.find("{a*").or_else(|| s.find("{hdr*")) {
        let end = start + s[start..].find('}').expect("a closing brace");
        let spec = &s[start + 1..end];
        let (what, n) = spec.split_once('*').expect("what*n");
        let n: usize = n.parse().expect("a count");
        let text = match what {
            "a" => "a".repeat(n),
            "hdr" => (0..n).map(|i| format!("X-H{i}: v\r\n")).collect(),
            other => panic!("unknown placeholder {other}"),
        };
        s.replace_range(start..=end, &text);
    }
    // TOML strings are UTF-8: a \u0080..\u00ff escape stands for that one byte only
    // where the case wants raw bytes; here they are sent as UTF-8, which is what a
    // caller sending non-ASCII text would send.
    s.into_bytes()
}

/// Runs one case on a fresh connection.
async fn run(gw: std::net::SocketAddr, case: &Case, account: &str) -> Outcome {
    let mut c = RawConn::connect(gw).await;
    let _ = c.send(&fill(&case.send, account)).await;
    let mut statuses = Vec::new();
    let within = Duration::from_secs(5);
    if let Some(then) = &case.then {
        match case.then_delay_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => match c.response(within).await {
                Ok(r) => statuses.push(r.status),
                Err(_) => {
                    return Outcome {
                        statuses,
                        conn: "closed",
                    }
                }
            },
        }
        let _ = c.send(&fill(then, account)).await;
    }
    if case.shutdown {
        let _ = c.stream.shutdown().await;
    }
    // The expected responses (and no more: the probe below, or the close, tells).
    while statuses.len() < case.expect.len() {
        match c.response(within).await {
            Ok(r) => statuses.push(r.status),
            Err(_) => break,
        }
    }
    // Open: a probe on the same connection is the next answer. Closed: the server
    // closes without another answer.
    let conn = if case.shutdown {
        match c.response(within).await {
            Ok(r) => {
                statuses.push(r.status);
                "open"
            }
            Err(ReadErr::Closed) => "closed",
            Err(ReadErr::Timeout) => "open",
        }
    } else {
        let probe = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Request-Id: conformance-probe\r\n\r\n";
        let _ = c.send(probe).await;
        match c.response(within).await {
            Ok(r) if r.header("x-request-id") == "conformance-probe" => "open",
            Ok(r) => {
                // An answer the case did not expect.
                statuses.push(r.status);
                match c.response(within).await {
                    Ok(r) if r.header("x-request-id") == "conformance-probe" => "open",
                    _ => "closed",
                }
            }
            Err(_) => "closed",
        }
    };
    Outcome { statuses, conn }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_table_on_both_paths() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/conformance.toml"
    ))
    .expect("the table");
    let table: Table = toml::from_str(&text).expect("a valid table");
    assert!(
        table.case.len() >= 100,
        "the table has {}",
        table.case.len()
    );

    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "server",
                "max_body_bytes = 1024\nbody_read_timeout_ms = 1000\nheader_read_timeout_ms = 3000",
            ),
            ("cache", "ttl_secs = 600"),
        ],
    ))
    .await;
    // The hit path's account: its page cached, and checked to be a hit.
    let warm = "warm0000";
    post(&gw.url("/v4/recentcontact/get_list"), body_for(warm)).await;
    let hit = post(&gw.url("/v4/recentcontact/get_list"), body_for(warm)).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");

    let started = Instant::now();
    let addr = gw.addr;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut runs = Vec::new();
    for (i, case) in table.case.iter().enumerate() {
        for (path, account) in [("hit", warm.to_string()), ("router", format!("cold{i:04}"))] {
            let case = case.clone();
            let limit = limit.clone();
            runs.push(tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let got = run(addr, &case, &account).await;
                (case, path, got)
            }));
        }
    }
    let mut failures = Vec::new();
    let mut by_case: std::collections::BTreeMap<String, Vec<(&str, Outcome)>> = Default::default();
    for r in runs {
        let (case, path, got) = r.await.expect("a run");
        let want = Outcome {
            statuses: case.expect.clone(),
            conn: if case.conn == "open" {
                "open"
            } else {
                "closed"
            },
        };
        assert!(
            matches!(case.conn.as_str(), "open" | "closed"),
            "{}: conn must be open or closed",
            case.name
        );
        if got != want {
            failures.push(format!(
                "{:<70} {:<6} want {:<16} got {}",
                case.name, path, want, got
            ));
        }
        by_case.entry(case.name).or_default().push((path, got));
    }
    for (name, outcomes) in &by_case {
        if outcomes.len() == 2 && outcomes[0].1 != outcomes[1].1 {
            failures.push(format!(
                "{name:<70} the paths disagree: {} {} / {} {}",
                outcomes[0].0, outcomes[0].1, outcomes[1].0, outcomes[1].1
            ));
        }
    }
    eprintln!(
        "{} cases x 2 paths in {:?}",
        table.case.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} runs differ from the table:\n{}",
        failures.len(),
        2 * table.case.len(),
        failures.join("\n")
    );
    // Nothing refused reached Chat: the only calls are the warm-up and those of the
    // router runs whose case the table answers 200.
    let answered: std::collections::HashSet<String> = table
        .case
        .iter()
        .enumerate()
        .filter(|(_, c)| c.expect.contains(&200))
        .map(|(i, _)| format!("cold{i:04}"))
        .collect();
    for call in fake.calls() {
        let v = call.json();
        let account = v["From_Account"].as_str().unwrap_or("");
        assert!(
            account == warm || answered.contains(account),
            "a refused request reached Chat: {:?}",
            call.body
        );
    }
}
