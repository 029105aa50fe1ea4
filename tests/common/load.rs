//! Load for rate-limit and retry tests: closed-loop callers sending distinct get_list
//! misses, and the busiest window of arrivals at the fake Chat.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// The get_list path.
pub const GET_LIST: &str = "/v4/recentcontact/get_list";

/// The most instants in any half-open window of `w`.
pub fn max_in_window(times: &[Instant], w: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let mut best = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[i] >= times[j] + w {
            j += 1;
        }
        best = best.max(i - j + 1);
    }
    best
}

/// The most instants in any one-second window.
pub fn max_per_second(times: &[Instant]) -> usize {
    max_in_window(times, Duration::from_secs(1))
}

/// The busiest one-second window of `times`, for a failure message: how many, and
/// the gaps (ms) around its first and last arrivals (a call that arrived late shows as
/// a long gap before the window's first, or a short run at its end).
pub fn busiest_second(times: &[Instant]) -> String {
    let mut t = times.to_vec();
    t.sort();
    let w = Duration::from_secs(1);
    let (mut best, mut at, mut j) = (0, (0, 0), 0);
    for i in 0..t.len() {
        while t[i] >= t[j] + w {
            j += 1;
        }
        if i - j + 1 > best {
            best = i - j + 1;
            at = (j, i);
        }
    }
    if t.is_empty() {
        return "no arrivals".into();
    }
    let ms = |k: usize| t[k].duration_since(t[0]).as_secs_f64() * 1000.0;
    let around = |k: usize| -> Vec<String> {
        (k.saturating_sub(3)..(k + 4).min(t.len()))
            .map(|x| format!("{x}@{:.2}", ms(x)))
            .collect()
    };
    format!(
        "{best} in [{:.2} ms, {:.2} ms] of {} arrivals; around its first: {:?}; around its last: {:?}",
        ms(at.0),
        ms(at.0) + 1000.0,
        t.len(),
        around(at.0),
        around(at.1)
    )
}

/// When the fake Chat received each get_list call.
pub fn arrivals(fake: &super::FakeChat) -> Vec<Instant> {
    fake.calls()
        .iter()
        .filter(|c| c.path == GET_LIST)
        .map(|c| c.at)
        .collect()
}

/// One caller request and what it got.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The account asked for (distinct per request).
    pub account: String,
    /// When it was sent and answered.
    pub sent: Instant,
    pub done: Instant,
    /// HTTP status (0: no answer).
    pub status: u16,
    /// Chat's or the gateway's `ErrorCode` (-1: none).
    pub code: i64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.code == 0
    }
}

/// A keep-alive HTTP client (one per caller: its connection is reused).
pub type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// A keep-alive client.
pub fn http() -> Http {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Sends one get_list for `account` to `base` (a gateway's address), on a new
/// connection.
pub async fn get_list(base: &str, account: &str) -> Outcome {
    get_list_on(&http(), base, account).await
}

/// Sends one get_list for `account` to `base` with `client`.
pub async fn get_list_on(client: &Http, base: &str, account: &str) -> Outcome {
    use http_body_util::BodyExt;
    let sent = Instant::now();
    let req = http::Request::post(format!("{base}{GET_LIST}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
            r#"{{"From_Account":"{account}"}}"#
        ))))
        .unwrap();
    let r: Result<(http::StatusCode, bytes::Bytes), String> = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    let (status, code) = match &r {
        Ok((s, body)) => (
            s.as_u16(),
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["ErrorCode"].as_i64())
                .unwrap_or(-1),
        ),
        Err(_) => (0, -1),
    };
    Outcome {
        account: account.to_string(),
        sent,
        done: Instant::now(),
        status,
        code,
    }
}

/// `n` get_list misses sent to `base` all at once (accounts `{tag}_0` to
/// `{tag}_{n-1}`, each on a connection of its own); their outcomes, in that order.
pub async fn burst(base: &str, n: usize, tag: &str) -> Vec<Outcome> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (base, account) = (base.to_string(), format!("{tag}_{i}"));
            tokio::spawn(async move { get_list(&base, &account).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("a caller task"));
    }
    out
}

/// `callers` closed-loop callers (caller i on `bases[i % len]`), each sending distinct
/// get_list misses one after another on a keep-alive connection until `run` has
/// passed. A caller refused with 429 waits 100 ms before its next request (as a
/// client honouring `retry-after` would, only sooner: demand stays over the limit
/// without a storm of refusals).
pub async fn closed_loop(
    bases: &[String],
    callers: usize,
    run: Duration,
    tag: &str,
) -> Vec<Outcome> {
    let until = Instant::now() + run;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let base = bases[i % bases.len()].clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let client = http();
            let mut out = Vec::new();
            let mut j = 0;
            while Instant::now() < until {
                let o = get_list_on(&client, &base, &format!("{tag}_{i}_{j}")).await;
                let refused = o.status == 429;
                out.push(o);
                j += 1;
                if refused {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// A summary of outcomes for assertion messages.
pub fn tally(out: &[Outcome]) -> String {
    let mut by: std::collections::BTreeMap<(u16, i64), usize> = Default::default();
    for o in out {
        *by.entry((o.status, o.code)).or_default() += 1;
    }
    by.iter()
        .map(|((s, c), n)| format!("{n}× HTTP {s} ErrorCode {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A fake Chat on a thread and runtime of its own, so that when it records a call's
/// arrival does not depend on how busy the test's callers keep the test's runtime
/// (Chat is another machine).
pub fn fake_chat_apart(responder: super::Responder) -> super::FakeChat {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Chat's clock should not stall with this machine's load.
        super::favour_this_thread();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the fake Chat");
        rt.block_on(async move {
            let _ = tx.send(super::FakeChat::start(responder).await);
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("the fake Chat started")
}
