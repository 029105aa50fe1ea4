//! The rate limit of one gateway, end to end: the real binary in front of a fake Chat
//! that records when each call arrives. Over the limit, callers wait their turn on a
//! smooth schedule instead of being refused; a burst after idle goes at once; Chat
//! never sees more than N in any one-second window.

mod common;

use std::time::{Duration, Instant};

use common::load::*;
use common::*;

/// These tests measure throughput: one at a time.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fake Chat answering every get_list with its account's page after `delay`.
fn pages_after(delay: Duration) -> Responder {
    Box::new(move |r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        Reply::Json(page_for(&acc, 0), delay)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_callers_over_the_limit_wait_their_turn_instead_of_429() {
    let _alone = MACHINE.lock().await;
    let fake = fake_chat_apart(pages_after(Duration::ZERO));
    // Defaults: 200 per second, max_wait_ms 500, burst_percent 75.
    // The gateway at a higher priority: the test measures when calls reach Chat, not
    // what else the machine builds meanwhile.
    let gw = Gateway::start_prepared(&config_toml(&fake.url(), &[]), favoured).await;
    let run = Duration::from_secs(4);
    let started = Instant::now();
    let out = closed_loop(&[gw.url("")], 20, run, "twenty").await;
    let refused = out.iter().filter(|o| o.status == 429).count();
    let served = out
        .iter()
        .filter(|o| o.ok() && o.done <= started + run)
        .count();
    let at_chat = arrivals(&fake);
    let most = max_per_second(&at_chat);
    let rate = served as f64 / run.as_secs_f64();
    let worst = out
        .iter()
        .map(|o| o.done - o.sent)
        .max()
        .unwrap_or_default();
    eprintln!(
        "20 callers, 4 s: {served} served ({rate:.1}/s), {refused} refused (429), busiest second at Chat {most}, slowest answer {worst:?}; {}",
        tally(&out)
    );
    assert_eq!(refused, 0, "{}", tally(&out));
    assert!(out.iter().all(|o| o.ok()), "{}", tally(&out));
    assert!(
        most <= 200,
        "Chat saw {most} calls in one second: {}",
        busiest_second(&at_chat)
    );
    assert!(rate >= 180.0, "{rate:.1} served per second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_150_concurrent_misses_after_idle_goes_at_once() {
    let _alone = MACHINE.lock().await;
    // Chat takes a second, as a far region under load might: the 150 are in flight
    // together however slowly this machine delivers them.
    let fake = fake_chat_apart(pages_after(Duration::from_secs(1)));
    let gw = Gateway::start_prepared(
        &config_toml(&fake.url(), &[("log", "access = true")]),
        favoured,
    )
    .await;
    let base = gw.url("");
    let out = burst(&base, 150, "burst").await;
    assert!(out.iter().all(|o| o.ok()), "{}", tally(&out));
    assert_eq!(arrivals(&fake).len(), 150);
    // How long each waited in the gateway besides its call to Chat (the access log's
    // duration less its upstream time). Paced, the last of 150 would wait 0.8 s (and
    // be refused past max_wait_ms); a new window, a second.
    let field = |line: &str, name: &str| -> u64 {
        let i = line.find(name).expect(name) + name.len();
        line[i..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    };
    // The access log is written by its own thread: wait for the 150 lines.
    let lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("access") && l.contains("get_list"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines(&gw.log_text()) < 150 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = gw.log_text();
    let waits: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("access") && l.contains("get_list"))
        .map(|l| field(l, "duration_us=").saturating_sub(field(l, "upstream_us=")))
        .collect();
    assert_eq!(waits.len(), 150, "{log}");
    let longest = Duration::from_micros(*waits.iter().max().unwrap());
    eprintln!("150 concurrent after idle: all served; the longest time in the gateway besides Chat's {longest:?}");
    assert!(longest < Duration::from_millis(250), "{longest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_burst_callers_are_paced_and_refused_only_past_max_wait() {
    let _alone = MACHINE.lock().await;
    // N = 20, burst 50% (10): 40 concurrent callers with a slow Chat (in flight
    // together). Ten go at once; the other ten slots of the span are spread over it
    // (one every ~93 ms); with max_wait 500 ms five of them fit, the rest are refused
    // at once with the wait they would have had.
    let fake = fake_chat_apart(pages_after(Duration::from_millis(600)));
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "ratelimit",
            "per_command_per_sec = 20\nburst_percent = 50\nmax_wait_ms = 500",
        )],
    ))
    .await;
    let base = gw.url("");
    let started = Instant::now();
    let out = burst(&base, 40, "paced").await;
    let ok = out.iter().filter(|o| o.ok()).count();
    let refused: Vec<&Outcome> = out.iter().filter(|o| o.status == 429).collect();
    let mut at_chat = arrivals(&fake);
    at_chat.sort();
    let gaps: Vec<u128> = at_chat
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    eprintln!(
        "N = 20, burst 10, 40 at once: {ok} served, {} refused; gaps at Chat (ms) {gaps:?}",
        refused.len()
    );
    assert_eq!(ok + refused.len(), 40, "{}", tally(&out));
    assert!((14..=16).contains(&ok), "{}", tally(&out));
    // The refusals came at once, not after waiting.
    assert!(refused
        .iter()
        .all(|o| o.done - started < Duration::from_millis(400)));
    // Ten together, then paced about 93 ms apart.
    assert!(at_chat[9] - at_chat[0] < Duration::from_millis(200));
    for g in &gaps[10..] {
        assert!((70..=130).contains(g), "{gaps:?}");
    }
    assert!(max_per_second(&at_chat) <= 20);
}

#[test]
fn check_config_shows_the_rate_limit_and_retry_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config_toml(
            "http://127.0.0.1:9",
            &[
                ("ratelimit", "burst_percent = 40"),
                (
                    "redis",
                    "url = \"redis://127.0.0.1:6379/0\"\nexpected_gateways = 6",
                ),
            ],
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let table = |name: &str| -> toml::Table {
        text.parse::<toml::Table>().unwrap()[name]
            .as_table()
            .unwrap()
            .clone()
    };
    let rl = table("ratelimit");
    assert_eq!(rl["per_command_per_sec"].as_integer(), Some(200));
    assert_eq!(rl["max_wait_ms"].as_integer(), Some(500));
    assert_eq!(rl["burst_percent"].as_integer(), Some(40));
    let retry = table("retry");
    assert_eq!(retry["budget_percent"].as_integer(), Some(5));
    assert_eq!(retry["budget_min_per_sec"].as_integer(), Some(0));
    let redis = table("redis");
    assert_eq!(redis["expected_gateways"].as_integer(), Some(6));
    assert_eq!(redis["lease_ms"].as_integer(), Some(20));
    assert_eq!(redis["latency_allowance_ms"].as_integer(), Some(40));
    // Out of range: refused, naming the key.
    std::fs::write(
        &path,
        config_toml("http://127.0.0.1:9", &[("ratelimit", "burst_percent = 0")]),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ratelimit.burst_percent"));
}
