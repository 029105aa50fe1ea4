//! `chat-gateway demo`: run it, execute the curl commands it prints (their
//! equivalent over HTTP), see MISS then HIT, then stop it with Ctrl-C (SIGINT).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A printed `curl ... -X POST URL ... -d 'BODY'` line, parsed.
fn parse_post(line: &str) -> (String, String) {
    let url = line
        .split("-X POST ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let start = line.find("-d '").unwrap() + 4;
    let body = line[start..line.len() - 1].to_string();
    (url, body)
}

#[tokio::test]
async fn demo_prints_commands_that_show_miss_then_hit() {
    let mut child = Command::new(bin())
        .arg("demo")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Ctrl-C");
            out.push(line);
            if done {
                break;
            }
        }
        out
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("demo prints its commands")
        .unwrap();
    let curls: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(curls.len(), 4, "{lines:#?}");

    let (url, body) = parse_post(curls[0]);
    let first = post(&url, body).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert_eq!(json(&first)["ErrorCode"], 0);
    assert_eq!(
        json(&first)["CompleteFlag"],
        0,
        "user_0001 has more than one page"
    );

    let (url, body) = parse_post(curls[1]);
    let again = post(&url, body).await;
    assert_eq!(header(&again, "x-cache"), "HIT");
    assert_eq!(again.2, first.2);

    let (url, body) = parse_post(curls[2]);
    let next = post(&url, body).await;
    assert_eq!(header(&next, "x-cache"), "MISS");
    assert_eq!(json(&next)["ErrorCode"], 0);
    assert_ne!(
        json(&next)["SessionItem"],
        json(&first)["SessionItem"],
        "another page"
    );

    let metrics_url = curls[3].split_whitespace().last().unwrap();
    let m = get(metrics_url).await.unwrap();
    assert!(String::from_utf8_lossy(&m.2)
        .contains("chat_gateway_cache_requests_total{result=\"hit\"} 1"));

    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop on Ctrl-C");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status:?}");
}
