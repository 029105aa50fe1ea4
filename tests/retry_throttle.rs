//! Retry throttling end to end: the real binary in front of a fake Chat that fails on
//! purpose. When Chat keeps failing, retries stop (about one call per request); when
//! it fails now and then, they are all made.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::*;
use common::*;

/// Whether attempt `attempt` (1-based) for `account` fails: 30% of (account, attempt)
/// pairs, decided by a hash, so the test knows which requests no four attempts could
/// save. Four independent attempts each failing 30% of the time all fail for 0.81%
/// of requests (4.9 of 600 expected); the salt picks a pattern that is typical in that
/// respect (5 of the 600 requests below fail every attempt, 29.7% of attempts fail)
/// rather than one of the unlucky ones where even perfect retries reach only 98.5%.
fn faulty(account: &str, attempt: u32) -> bool {
    use std::hash::{Hash, Hasher};
    const SALT: u32 = 2;
    // SipHash with fixed keys: the same faults on every run.
    let mut h = std::hash::DefaultHasher::new();
    (SALT, account, attempt).hash(&mut h);
    h.finish() % 100 < 30
}

/// The accounts of the 600 requests.
fn flaky_accounts() -> Vec<String> {
    (0..30)
        .flat_map(|i| (0..20).map(move |j| format!("flaky_{i}_{j}")))
        .collect()
}

#[test]
fn the_fault_pattern_is_thirty_percent() {
    let accounts = flaky_accounts();
    let pairs = accounts.len() * 4;
    let faults: usize = accounts
        .iter()
        .map(|a| (1..=4).filter(|k| faulty(a, *k)).count())
        .sum();
    let doomed = accounts
        .iter()
        .filter(|a| (1..=4).all(|k| faulty(a, k)))
        .count();
    let share = faults as f64 / pairs as f64;
    assert!((0.28..=0.32).contains(&share), "{share}");
    assert_eq!(doomed, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_failing_every_call_for_30_s_costs_at_most_1_1_calls_per_request() {
    let fake = fake_chat_apart(Box::new(|_r: &Recorded, _n| {
        Reply::Json(chat_error(50004), Duration::ZERO)
    }));
    // Default retry settings (3 attempts, budget_percent 5, budget_min_per_sec 0).
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let base = gw.url("");
    // 50 requests per second for 30 s: 30 callers, each every 600 ms.
    let started = Instant::now();
    let run = Duration::from_secs(30);
    let mut tasks = Vec::new();
    for i in 0..30u64 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut next = started + Duration::from_millis(20 * i);
            let mut j = 0;
            while next < started + run {
                tokio::time::sleep_until(next.into()).await;
                out.push(get_list(&base, &format!("down_{i}_{j}")).await);
                j += 1;
                next += Duration::from_millis(600);
            }
            out
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    let requests = out.len();
    let calls = arrivals(&fake).len();
    let per_request = calls as f64 / requests as f64;
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned();
    let exhausted = metric(&m, "chat_gateway_retry_budget_exhausted_total");
    eprintln!(
        "Chat failing every call, 30 s at 50/s: {requests} requests, {calls} calls to Chat ({per_request:.3} per request), {exhausted} retries not made; {}",
        tally(&out)
    );
    assert!(requests >= 1490, "{requests} requests");
    assert!(out.iter().all(|o| o.code == 50004), "{}", tally(&out));
    assert!(per_request <= 1.1, "{per_request:.3} calls per request");
    assert!(exhausted > 1000.0, "the throttle refused the retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_random_faults_are_retried_to_99_percent_success() {
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen = attempts.clone();
    let fake = fake_chat_apart(Box::new(move |r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        let n = {
            let mut a = seen.lock().unwrap();
            let n = a.entry(acc.clone()).or_default();
            *n += 1;
            *n
        };
        if faulty(&acc, n) {
            Reply::Json(
                chat_error(if n % 2 == 0 { 50004 } else { 50005 }),
                Duration::ZERO,
            )
        } else {
            Reply::Json(page_for(&acc, 0), Duration::ZERO)
        }
    }));
    let gw = Gateway::start(&config_toml(&fake.url(), &[("retry", "max_attempts = 4")])).await;
    let base = gw.url("");
    // 600 distinct misses from 30 callers, 20 each.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..20 {
                out.push(get_list(&base, &format!("flaky_{i}_{j}")).await);
            }
            out
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    let ok = out.iter().filter(|o| o.ok()).count();
    // Requests whose four attempts all fail: no retry policy could save them.
    let doomed = out
        .iter()
        .filter(|o| (1..=4).all(|a| faulty(&o.account, a)))
        .count();
    let calls = arrivals(&fake).len();
    let failed_calls: usize = {
        let a = attempts.lock().unwrap();
        a.iter()
            .map(|(acc, n)| (1..=*n).filter(|k| faulty(acc, *k)).count())
            .sum()
    };
    let m = String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned();
    let exhausted = metric(&m, "chat_gateway_retry_budget_exhausted_total");
    eprintln!(
        "30% faults (measured {:.1}% of {calls} calls), 4 attempts: {ok} of 600 succeeded ({doomed} had no good attempt), {:.3} calls per request, {exhausted} retries not made; {}",
        100.0 * failed_calls as f64 / calls as f64,
        calls as f64 / 600.0,
        tally(&out)
    );
    assert_eq!(out.len(), 600);
    assert_eq!(ok, 600 - doomed, "every request that could succeed did");
    assert!(ok >= 594, "{ok} of 600");
}
