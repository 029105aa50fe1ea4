//! The client examples in `examples/clients/` (Python, Node.js, Java), run for real
//! against the gateway in front of the emulator (`chat-gateway emulator`, a separate
//! process on a free loopback port).
//!
//! For each language: the example lists a multi-page
//! account, and what it prints must equal what this test gets by paging the gateway
//! itself (checked in turn against the emulator's whole list); an unknown account must
//! give Chat's error and exit status 1; against a gateway with caller tokens and a rate
//! limit of 1 call per second, the example must send the token, ride out the gateway's
//! HTTP 429 answers and still print the whole list; without the token it must report
//! the 401 and exit 1.
//!
//! The runtimes (`python3`, `node` >= 18, `java` >= 17 with its compiler) are test
//! dependencies, installed by `scripts/test-deps.sh`: a missing one fails the test.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The emulator's default secret key (`chat-gateway emulator --secret-key`).
const EMULATOR_SECRET: &str = "emulator-secret-key";
/// The caller token of the second gateway.
const TOKEN: &str = "examples-caller-token-0123456789";
/// A heavy account of the emulator's default world: more than one page.
const ACCOUNT: &str = "user_0001";
/// Another heavy account, listed through the rate-limited gateway.
const THROTTLED_ACCOUNT: &str = "user_0010";
/// Not in the default world of 1000 accounts: Chat answers 50001.
const UNKNOWN_ACCOUNT: &str = "user_9999";
/// How long one run of an example may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// `chat-gateway emulator` as a child process.
struct Emulator {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Emulator {
    /// Starts the emulator on a free port (port 0: it binds, then logs the address)
    /// and waits until it answers its health endpoint.
    async fn start() -> Emulator {
        let mut cmd = Command::new(bin());
        cmd.args(["emulator", "--listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, log, rx) = spawn_logged(cmd, |line| {
            if !line.contains("Chat emulator listening") {
                return None;
            }
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("addr=").and_then(|a| a.parse().ok()))
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .unwrap_or_else(|_| {
                panic!(
                    "the emulator did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        let emu = Emulator {
            child,
            url: format!("http://{addr}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((s, _, _)) = get(&format!("{}/__emulator/health", emu.url)).await {
                if s == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the emulator never answered; log:\n{}",
                emu.log.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        emu
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What listing an account prints: one line per conversation, then the total.
#[derive(Debug)]
struct Listing {
    lines: Vec<String>,
    pinned: usize,
    pages: usize,
}

impl Listing {
    fn total_line(&self) -> String {
        format!(
            "total: {} conversations ({} pinned) in {} pages",
            self.lines.len(),
            self.pinned,
            self.pages
        )
    }

    /// The examples' whole standard output.
    fn stdout(&self) -> Vec<String> {
        let mut out = self.lines.clone();
        out.push(self.total_line());
        out
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (days to civil date: H. Hinnant's
/// algorithm), the examples' time format.
fn iso_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The line the examples print for one `SessionItem`.
fn conversation_line(item: &Value) -> String {
    let group = item["Type"] == 2;
    let peer = if group {
        &item["GroupId"]
    } else {
        &item["To_Account"]
    };
    format!(
        "{}\t{}\t{}\t{}",
        if group { "group" } else { "c2c" },
        peer.as_str().expect("peer is a string"),
        iso_utc(item["MsgTime"].as_u64().expect("MsgTime")),
        if item["TopFlag"] == 1 { "pinned" } else { "-" }
    )
}

/// Pages `account` through the gateway the way Chat documents it: from all-zero
/// cursors, sending back the four cursors of each answer until `CompleteFlag` is 1.
async fn walk(gw: &Gateway, account: &str) -> (Listing, Vec<Value>) {
    let mut cursor = [0u64; 4];
    let names = ["TimeStamp", "StartIndex", "TopTimeStamp", "TopStartIndex"];
    let (mut lines, mut items, mut pinned, mut pages) = (Vec::new(), Vec::new(), 0, 0);
    loop {
        let body = json!({"From_Account": account, "TimeStamp": cursor[0], "StartIndex": cursor[1],
                          "TopTimeStamp": cursor[2], "TopStartIndex": cursor[3], "AssistFlags": 63});
        let a = post(&gw.url("/v4/recentcontact/get_list"), body.to_string()).await;
        assert_eq!(a.0, 200);
        let v = json(&a);
        assert_eq!(v["ErrorCode"], 0, "{v}");
        pages += 1;
        for item in v["SessionItem"].as_array().expect("SessionItem") {
            lines.push(conversation_line(item));
            pinned += usize::from(item["TopFlag"] == 1);
            items.push(item.clone());
        }
        if v["CompleteFlag"] == 1 {
            break;
        }
        let next = names.map(|n| v[n].as_u64().expect("cursor field"));
        assert_ne!(next, cursor, "the cursor moves while CompleteFlag is 0");
        cursor = next;
        assert!(pages < 100, "get_list never completed");
    }
    (
        Listing {
            lines,
            pinned,
            pages,
        },
        items,
    )
}

/// The expected listing of `account`, paged through `gw`; checked against the
/// emulator's whole list of the account (same conversations, each exactly once) and
/// required to span more than one page.
async fn expected(emu: &Emulator, gw: &Gateway, account: &str) -> Listing {
    let (listing, mut items) = walk(gw, account).await;
    assert!(
        listing.pages > 1,
        "{account} must span several pages: {listing:?}"
    );
    let whole = get(&format!("{}/__emulator/accounts/{account}", emu.url))
        .await
        .expect("emulator account");
    let mut whole = json(&whole)["SessionItem"]
        .as_array()
        .expect("SessionItem")
        .clone();
    let key = |v: &Value| v.to_string();
    items.sort_by_key(key);
    whole.sort_by_key(key);
    assert_eq!(items, whole, "paging {account} returns its whole list once");
    listing
}

/// A runnable example: its runtime and how to start it.
#[derive(Clone, Copy)]
enum Lang {
    Python,
    Node,
    Java,
}

impl Lang {
    fn example(self) -> PathBuf {
        let file = match self {
            Lang::Python => "list_conversations.py",
            Lang::Node => "list_conversations.mjs",
            Lang::Java => "ListConversations.java",
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples/clients")
            .join(file)
    }

    fn program(self) -> &'static str {
        match self {
            Lang::Python => "python3",
            Lang::Node => "node",
            Lang::Java => "java",
        }
    }

    /// `None` when the runtime is there and new enough; otherwise why not.
    fn missing(self) -> Option<String> {
        let (flag, min) = match self {
            Lang::Python => ("--version", 3),
            Lang::Node => ("--version", 18), // the built-in fetch (Debian 12 ships 18)
            Lang::Java => ("-version", 17),  // single-file launch, pattern matching
        };
        let out = match Command::new(self.program()).arg(flag).output() {
            Ok(o) if o.status.success() => o,
            Ok(o) => return Some(format!("`{} {flag}` failed: {}", self.program(), o.status)),
            Err(e) => return Some(format!("`{}` not found: {e}", self.program())),
        };
        // "Python 3.11.2", "v20.19.2", `openjdk version "17.0.16" ...` (on stderr).
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let major = text
            .split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
            .and_then(|s| s.parse::<u32>().ok());
        match major {
            Some(m) if m >= min => None,
            _ => Some(format!(
                "{} is older than {min} or unrecognised: {}",
                self.program(),
                text.trim()
            )),
        }
    }

    /// Runs the example with `args` and `env` (the caller's CHAT_* variables removed
    /// first); returns (exit code, stdout lines, stderr).
    async fn run(self, args: &[&str], env: &[(&str, &str)]) -> (i32, Vec<String>, String) {
        let mut cmd = tokio::process::Command::new(self.program());
        cmd.arg(self.example())
            .args(args)
            .env_remove("CHAT_GATEWAY_URL")
            .env_remove("CHAT_GATEWAY_TOKEN")
            .env_remove("CHAT_ACCOUNT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{} {args:?} did not finish", self.program()))
            .expect("run the example");
        let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let code = out.status.code().unwrap_or(-1);
        (code, stdout.lines().map(str::to_owned).collect(), stderr)
    }
}

async fn check_example(lang: Lang) {
    // The runtimes are test dependencies (scripts/test-deps.sh installs them): a
    // missing one fails the test rather than skipping the example.
    if let Some(why) = lang.missing() {
        panic!(
            "{}: {why} (scripts/test-deps.sh installs it)",
            lang.example().display()
        );
    }
    let emu = Emulator::start().await;
    let open = Gateway::start(&config_toml_with(&emu.url, EMULATOR_SECRET, &[])).await;
    // Caller tokens, and one get_list call per second that never waits: each page
    // after the first meets HTTP 429 (ErrorCode 60007) at least once.
    let guarded = Gateway::start(&config_toml_with(
        &emu.url,
        EMULATOR_SECRET,
        &[
            ("server", &format!("auth_tokens = [\"{TOKEN}\"]")),
            ("ratelimit", "per_command_per_sec = 1\nmax_wait_ms = 0"),
        ],
    ))
    .await;
    let base = format!("http://{}", open.addr);
    let guarded_base = format!("http://{}", guarded.addr);

    // 1. A multi-page account: exactly what paging the gateway yields.
    let want = expected(&emu, &open, ACCOUNT).await;
    let (code, out, err) = lang.run(&[ACCOUNT, &base], &[]).await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, want.stdout(), "stderr: {err}");

    // 2. Chat's error: message naming the code, exit status 1, no total.
    let (code, out, err) = lang.run(&[UNKNOWN_ACCOUNT, &base], &[]).await;
    assert_eq!(code, 1, "stdout: {out:?}\nstderr: {err}");
    assert!(err.contains("ErrorCode 50001"), "stderr: {err}");
    assert!(!out.iter().any(|l| l.starts_with("total:")), "{out:?}");

    // 3. Token and rate limit; the URL from CHAT_GATEWAY_URL.
    let want = expected(&emu, &open, THROTTLED_ACCOUNT).await;
    let (code, out, err) = lang
        .run(
            &[THROTTLED_ACCOUNT],
            &[
                ("CHAT_GATEWAY_URL", &guarded_base),
                ("CHAT_GATEWAY_TOKEN", TOKEN),
            ],
        )
        .await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, want.stdout(), "stderr: {err}");
    let retries = err.matches("rate limited (HTTP 429), retrying").count();
    assert!(
        retries >= want.pages - 1,
        "{} pages at 1 call/s: expected at least {} retries after HTTP 429, stderr: {err}",
        want.pages,
        want.pages - 1
    );
    assert!(
        !err.contains(TOKEN) && !out.iter().any(|l| l.contains(TOKEN)),
        "the token is never printed"
    );

    // 4. No token: the gateway's 401, reported, exit status 1; the account from
    //    CHAT_ACCOUNT.
    let (code, _, err) = lang
        .run(
            &[],
            &[
                ("CHAT_GATEWAY_URL", &guarded_base),
                ("CHAT_ACCOUNT", THROTTLED_ACCOUNT),
            ],
        )
        .await;
    assert_eq!(code, 1, "stderr: {err}");
    assert!(
        err.contains("HTTP 401") && err.contains("ErrorCode 60004") && err.contains("unauthorized"),
        "stderr: {err}"
    );
}

#[tokio::test]
async fn python_example_pages_through_the_gateway() {
    check_example(Lang::Python).await;
}

#[tokio::test]
async fn node_example_pages_through_the_gateway() {
    check_example(Lang::Node).await;
}

#[tokio::test]
async fn java_example_pages_through_the_gateway() {
    check_example(Lang::Java).await;
}

#[test]
fn iso_utc_matches_known_dates() {
    assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(iso_utc(1_772_612_017), "2026-03-04T08:13:37Z");
    assert_eq!(iso_utc(4_107_542_399), "2100-02-28T23:59:59Z");
}
