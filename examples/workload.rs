//! The workload of `bench/workload.sh`: a Chat backend's reads and writes over a
//! world of accounts picked Zipf(1.1), sent to one or more gateways (or straight to
//! the emulator, for the baseline), every read checked against the emulator's state.
//!
//! ```sh
//! cargo build --release --example workload
//! target/release/examples/workload --targets http://127.0.0.1:8080,http://127.0.0.1:8081 \
//!     --emulator http://127.0.0.1:9000 --usersig "$USERSIG" --accounts 100000 --ops 30000
//! ```
//!
//! The mix, per operation: 60% `profile/portrait_get` of 20 accounts, 15%
//! `recentcontact/get_list` (an account's first page), 10%
//! `group_open_http_svc/get_group_info` (one group), 10%
//! `group_open_http_svc/get_joined_group_list` (an account's groups), 5% writes
//! (`profile/portrait_set` 30%, `openim/sendmsg` 40%, `group_open_http_svc/send_group_msg`
//! 20%, `group_open_http_svc/modify_group_base_info` 10%). Accounts and groups are
//! picked Zipf(1.1) (rank 1 most often). A portrait_get is the 20 accounts one screen
//! shows (`--portraits screens`, the default): the viewer is picked Zipf(1.1), and
//! its 20 accounts are 20 Zipf(1.1) picks drawn from the viewer's own seed, so the
//! same screen names the same accounts and popular accounts are on many screens; with
//! `--portraits independent` each request draws 20 fresh picks.
//!
//! Each worker (`--concurrency`) runs its operations one after the other, each on a
//! target picked at random. Every read is checked (`--verify`, the default with
//! targets): right after the target answers, the same request goes straight to the
//! emulator; when no write was in flight from before the read to after the check,
//! the two answers must be equal (`RequestId` aside), else it is a stale answer.
//!
//! A read answered with an error (`ErrorCode` not 0, e.g. 60007 from a rate limit)
//! is counted by its code in `error_answers` and not compared.
//!
//! Output: one JSON object on stdout (operations, reads per command, `x-cache`
//! values, answers from L2, checked reads, stale answers with the first few shown,
//! error answers, elapsed time).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Args {
    targets: Vec<String>,
    direct: bool,
    emulator: String,
    usersig: String,
    accounts: usize,
    ops: usize,
    concurrency: usize,
    seed: u64,
    screens: bool,
    verify: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        targets: Vec::new(),
        direct: false,
        emulator: String::new(),
        usersig: String::new(),
        accounts: 100_000,
        ops: 30_000,
        concurrency: 4,
        seed: 1,
        screens: true,
        verify: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--targets" => a.targets = v()?.split(',').map(String::from).collect(),
            "--direct" => a.direct = true,
            "--emulator" => a.emulator = v()?,
            "--usersig" => a.usersig = v()?,
            "--accounts" => a.accounts = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--ops" => a.ops = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--concurrency" => a.concurrency = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--seed" => a.seed = v()?.parse().map_err(|e| format!("{k}: {e}"))?,
            "--portraits" => a.screens = v()? != "independent",
            "--no-verify" => a.verify = false,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.emulator.is_empty() || a.usersig.is_empty() {
        return Err("--emulator and --usersig are required".into());
    }
    if a.targets.is_empty() && !a.direct {
        return Err("--targets URL,... or --direct".into());
    }
    if a.direct {
        a.verify = false;
    }
    Ok(a)
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Zipf(s) over ranks 0..n, by its cumulative distribution.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn pick(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// The world the operations name.
struct World {
    accounts: Zipf,
    width: usize,
    groups: Vec<String>,
    group_zipf: Zipf,
}

impl World {
    fn account(&self, rank: usize) -> String {
        format!("user_{:0w$}", rank + 1, w = self.width)
    }

    fn some_accounts(&self, rng: &mut Rng, n: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(n);
        while out.len() < n {
            let a = self.account(self.accounts.pick(rng));
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// One operation: a command and its body.
struct Op {
    command: &'static str,
    body: Value,
    read: bool,
}

fn op(world: &World, rng: &mut Rng, screens: bool) -> Op {
    let r = rng.below(100);
    let read = |command, body| Op {
        command,
        body,
        read: true,
    };
    if r < 60 {
        let accounts = if screens {
            let viewer = world.accounts.pick(rng) as u64;
            let mut screen = Rng(0x5C2E_E100 ^ viewer.wrapping_mul(0x9E37_79B9));
            world.some_accounts(&mut screen, 20)
        } else {
            world.some_accounts(rng, 20)
        };
        return read(
            "profile/portrait_get",
            json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick", "Tag_Profile_IM_Image"]}),
        );
    }
    if r < 75 {
        let a = world.account(world.accounts.pick(rng));
        return read(
            "recentcontact/get_list",
            json!({"From_Account": a, "TimeStamp": 0, "StartIndex": 0, "TopTimeStamp": 0, "TopStartIndex": 0, "AssistFlags": 15}),
        );
    }
    if r < 85 {
        let g = &world.groups[world.group_zipf.pick(rng)];
        return read(
            "group_open_http_svc/get_group_info",
            json!({"GroupIdList": [g], "ResponseFilter": {"GroupBaseInfoFilter": ["Type", "Name", "MemberNum", "NextMsgSeq"]}}),
        );
    }
    if r < 95 {
        let a = world.account(world.accounts.pick(rng));
        return read(
            "group_open_http_svc/get_joined_group_list",
            json!({"Member_Account": a, "ResponseFilter": {"GroupBaseInfoFilter": ["Name", "MemberNum"]}}),
        );
    }
    let w = rng.below(10);
    let n = rng.next() % 100_000;
    let (command, body) = if w < 3 {
        let a = world.account(world.accounts.pick(rng));
        (
            "profile/portrait_set",
            json!({"From_Account": a, "ProfileItem": [{"Tag": "Tag_Profile_IM_Nick", "Value": format!("nick {n}")}]}),
        )
    } else if w < 7 {
        let pair = world.some_accounts(rng, 2);
        (
            "openim/sendmsg",
            json!({"From_Account": pair[0], "To_Account": pair[1], "MsgRandom": n, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hi"}}]}),
        )
    } else if w < 9 {
        let g = &world.groups[world.group_zipf.pick(rng)];
        (
            "group_open_http_svc/send_group_msg",
            json!({"GroupId": g, "Random": n, "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "x"}}]}),
        )
    } else {
        let g = &world.groups[world.group_zipf.pick(rng)];
        (
            "group_open_http_svc/modify_group_base_info",
            json!({"GroupId": g, "Name": format!("group {n}")}),
        )
    };
    Op {
        command,
        body,
        read: false,
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(
    client: &HttpClient,
    url: &str,
    body: &str,
) -> Result<(http::HeaderMap, Value), String> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, b) = resp.into_parts();
    let b = b.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let v = serde_json::from_slice(&b).map_err(|e| format!("not JSON from {url}: {e}"))?;
    Ok((parts.headers, v))
}

fn sans_request_id(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("RequestId");
    }
    v
}

#[derive(Default)]
struct Tally {
    reads: BTreeMap<String, u64>,
    writes: u64,
    x_cache: BTreeMap<String, u64>,
    from_l2: u64,
    checked: u64,
    unchecked: u64,
    stale: u64,
    stale_examples: Vec<Value>,
    /// Reads the target answered with an error (`ErrorCode` not 0): not compared.
    error_answers: BTreeMap<String, u64>,
    errors: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("workload: {e}");
            std::process::exit(2);
        }
    };
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let groups_v: Value = {
        let url = format!("{}/__emulator/groups", a.emulator);
        let resp = client
            .request(
                Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .expect("a request"),
            )
            .await
            .expect("the emulator answers");
        let b = resp.into_body().collect().await.expect("a body").to_bytes();
        serde_json::from_slice(&b).expect("groups as JSON")
    };
    let groups: Vec<String> = groups_v["Groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|x| x["GroupId"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(!groups.is_empty(), "the emulator lists no group");
    let world = Arc::new(World {
        accounts: Zipf::new(a.accounts, 1.1),
        width: a.accounts.to_string().len().max(4),
        group_zipf: Zipf::new(groups.len(), 1.1),
        groups,
    });
    let direct_query = format!(
        "?sdkappid=1400000000&identifier=administrator&usersig={}&random=1&contenttype=json",
        a.usersig
    );
    // Writes started and done: a write is in flight while they differ.
    let writes = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let (a, world, client, writes, tally, direct_query) = (
            a.clone(),
            world.clone(),
            client.clone(),
            writes.clone(),
            tally.clone(),
            direct_query.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(a.seed.wrapping_mul(1_000_003) ^ (w as u64 + 1));
            let mut pick = Rng(a.seed ^ 0xABCD ^ (w as u64) << 20);
            let share = a.ops / a.concurrency + usize::from(w < a.ops % a.concurrency);
            for _ in 0..share {
                let o = op(&world, &mut rng, a.screens);
                let body = o.body.to_string();
                let direct_url = format!("{}/v4/{}{direct_query}", a.emulator, o.command);
                let url = if a.direct {
                    direct_url.clone()
                } else {
                    let t = &a.targets[pick.below(a.targets.len())];
                    format!("{t}/v4/{}", o.command)
                };
                if !o.read {
                    // Serialised with the checks: a read is checked only when no write
                    // was in flight from its start to its check.
                    writes.0.fetch_add(1, Ordering::AcqRel);
                    let r = post(&client, &url, &body).await;
                    writes.1.fetch_add(1, Ordering::AcqRel);
                    {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.writes += 1;
                        t.errors += u64::from(r.is_err());
                    }
                    continue;
                }
                let done = writes.1.load(Ordering::Acquire);
                let before = writes.0.load(Ordering::Acquire);
                let got = post(&client, &url, &body).await;
                let (x_cache, got) = {
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    *t.reads.entry(o.command.to_string()).or_default() += 1;
                    let Ok((headers, got)) = got else {
                        t.errors += 1;
                        continue;
                    };
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    *t.x_cache.entry(h("x-cache")).or_default() += 1;
                    t.from_l2 += u64::from(h("x-cache-l2") == "HIT");
                    let code = got["ErrorCode"].as_i64().unwrap_or(-1);
                    if code != 0 {
                        // An error is not an answer to compare (nor a stale one).
                        *t.error_answers.entry(code.to_string()).or_default() += 1;
                        continue;
                    }
                    (h("x-cache"), got)
                };
                if !a.verify {
                    continue;
                }
                let want = post(&client, &direct_url, &body).await;
                let after = writes.0.load(Ordering::Acquire);
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                match want {
                    Ok((_, want)) if before == done && after == before => {
                        t.checked += 1;
                        let (got, want) = (sans_request_id(got), sans_request_id(want));
                        if got != want {
                            t.stale += 1;
                            if t.stale_examples.len() < 3 {
                                t.stale_examples.push(json!({
                                    "command": o.command, "body": o.body,
                                    "x-cache": x_cache, "got": got, "want": want
                                }));
                            }
                        }
                    }
                    Ok(_) => t.unchecked += 1,
                    Err(_) => t.errors += 1,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    let reads: u64 = t.reads.values().sum();
    let out = json!({
        "ops": reads + t.writes,
        "reads": reads,
        "reads_per_command": t.reads,
        "writes": t.writes,
        "x_cache": t.x_cache,
        "from_l2": t.from_l2,
        "checked": t.checked,
        "unchecked": t.unchecked,
        "stale": t.stale,
        "stale_examples": t.stale_examples,
        "error_answers": t.error_answers,
        "errors": t.errors,
        "elapsed_secs": elapsed,
        "ops_per_sec": (reads + t.writes) as f64 / elapsed,
        "portraits": if a.screens { "screens" } else { "independent" },
    });
    println!("{out}");
}
