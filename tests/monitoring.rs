//! Metrics and the monitoring kit (`deploy/monitoring/`) against the real binary:
//! every family is on the first scrape, `promtool check metrics` is clean before and
//! after traffic, the alert rules pass their unit tests, and the dashboard and alerts
//! only use families the gateway exports.
//!
//! `promtool` comes from Debian's `prometheus` package (`bash scripts/test-deps.sh`
//! installs it); without it these tests fail rather than skip.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chat_gateway::metrics::{known_series, Kind, ALL};
use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";
const MAX_BYTES: u64 = 12_345_678;

fn kit(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(file)
}

/// Runs promtool with `args` (and `stdin`), from `deploy/monitoring`.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args)
        .current_dir(kit(""))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run promtool ({e}): install Debian's `prometheus` package \
             (`bash scripts/test-deps.sh` does)"
        )
    });
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn assert_promtool_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}: promtool exited {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` on a scrape: exits 0 and reports nothing.
fn assert_metrics_clean(what: &str, scrape: &str) {
    let out = promtool(&["check", "metrics"], Some(scrape));
    assert_promtool_ok(what, &out);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.trim().is_empty(),
        "{what}: promtool check metrics reported:\n{said}"
    );
}

async fn scrape(gw: &Gateway) -> String {
    let (status, headers, body) = get(&gw.url("/metrics")).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );
    String::from_utf8(body.to_vec()).unwrap()
}

/// `# TYPE` lines of a scrape: family -> type.
fn types(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// The value of the sample line `series` (name and labels as rendered).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn rendered(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", l.join(","))
}

/// Words of `text` that look like one of our metric names.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "chat_gateway_";
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(PREFIX) {
        let start = from + i;
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let mut end = start + PREFIX.len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            out.insert(text[start..end].to_string());
        }
        from = end;
    }
    out
}

/// The family a name in a query refers to: itself, or a histogram's `_bucket`,
/// `_sum` or `_count` series.
fn family_of<'a>(name: &'a str, exported: &BTreeMap<String, String>) -> Option<&'a str> {
    if exported.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|s| {
        let base = name.strip_suffix(s)?;
        (exported.get(base).map(String::as_str) == Some("histogram")).then_some(base)
    })
}

/// Every PromQL expression in the dashboard (targets and template variables).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

async fn start() -> (FakeChat, Gateway) {
    // Answers every get_list with a page, except for the account "broken", whose
    // calls fail with HTTP 500.
    let fake = FakeChat::start(Box::new(|r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        if acc == "broken" {
            return Reply::Status(500, "down".into());
        }
        Reply::Json(page_for(&acc, 0), Duration::ZERO)
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[("cache", &format!("max_bytes = {MAX_BYTES}"))],
    ))
    .await;
    (fake, gw)
}

#[tokio::test]
async fn first_scrape_holds_every_family_with_its_known_series() {
    let (fake, gw) = start().await;
    let text = scrape(&gw).await;
    assert_eq!(fake.count(), 0, "no call to Chat before the scrape");
    let exported = types(&text);

    for f in ALL {
        assert_eq!(
            exported.get(f.name).map(String::as_str),
            Some(f.kind.as_str()),
            "{} is not on the first scrape as a {}:\n{text}",
            f.name,
            f.kind.as_str()
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {} ", f.name))),
            "{} has no HELP line",
            f.name
        );
        for set in known_series(f.name) {
            let series = match f.kind {
                Kind::Histogram => rendered(&format!("{}_count", f.name), &set),
                _ => rendered(f.name, &set),
            };
            let v = sample(&text, &series)
                .unwrap_or_else(|| panic!("{series} missing from the first scrape:\n{text}"));
            // Nothing happened yet on anything but the probes (/readyz) and the gauges.
            if f.kind != Kind::Gauge && f.name != chat_gateway::metrics::names::REQUESTS {
                assert_eq!(v, 0.0, "{series}");
            }
        }
    }
    // Nothing is exported that the list does not describe.
    let listed: BTreeSet<&str> = ALL.iter().map(|f| f.name).collect();
    for name in exported.keys() {
        assert!(
            listed.contains(name.as_str()),
            "{name} is not in metrics::ALL"
        );
    }

    // The errors family shows every (origin, reason) pair of GatewayError.
    for e in chat_gateway::error::GatewayError::one_of_each() {
        let series = rendered(
            chat_gateway::metrics::names::ERRORS,
            &[("origin", e.origin().as_str()), ("reason", e.reason())],
        );
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    // Gauges set at start-up and at scrape time.
    assert_eq!(
        metric(&text, "chat_gateway_cache_max_bytes"),
        MAX_BYTES as f64
    );
    assert_eq!(metric(&text, "chat_gateway_redis_enabled"), 0.0);
    let version = format!(
        "chat_gateway_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");
    let rss = metric(&text, "chat_gateway_resident_memory_bytes");
    assert!(rss > 1_000_000.0, "resident memory {rss}");
    // Histograms with no observation: every bucket at zero, up to +Inf.
    assert_eq!(
        sample(
            &text,
            "chat_gateway_upstream_latency_seconds_bucket{command=\"recentcontact/get_list\",le=\"+Inf\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "chat_gateway_fleet_invalidation_lag_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn promtool_check_metrics_is_clean_before_and_after_traffic() {
    let (fake, gw) = start().await;
    assert_metrics_clean("first scrape", &scrape(&gw).await);

    let url = gw.url(GET_LIST);
    let miss = post(&url, r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(header(&miss, "x-cache"), "MISS");
    let hit = post(&url, r#"{"From_Account":"user_0001"}"#).await;
    assert_eq!(header(&hit, "x-cache"), "HIT");
    let bad = post(&url, "{not json").await;
    assert_eq!(header(&bad, "x-chat-gateway-error"), "invalid-json");
    let down = post(&url, r#"{"From_Account":"broken"}"#).await;
    assert_eq!(
        header(&down, "x-chat-gateway-error"),
        "upstream-unavailable"
    );
    assert!(fake.count() >= 2);

    let text = scrape(&gw).await;
    // The traffic shows: new series (http_500) next to the pre-registered ones.
    assert_eq!(
        metric(&text, "chat_gateway_cache_requests_total{result=\"hit\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "chat_gateway_errors_total{origin=\"caller\",reason=\"invalid-json\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "chat_gateway_errors_total{origin=\"upstream\",reason=\"upstream-unavailable\"}"
        ),
        1.0
    );
    assert!(
        metric(
            &text,
            "chat_gateway_upstream_calls_total{command=\"recentcontact/get_list\",code=\"http_500\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "chat_gateway_upstream_latency_seconds_count{command=\"recentcontact/get_list\"}"
        ) >= 2.0,
        "{text}"
    );
    assert_metrics_clean("scrape after traffic", &text);
}

#[test]
fn alert_rules_are_valid_and_pass_their_unit_tests() {
    assert_promtool_ok(
        "check rules",
        &promtool(&["check", "rules", "alerts.yaml"], None),
    );
    let out = promtool(&["test", "rules", "alerts.test.yaml"], None);
    assert_promtool_ok("test rules", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));

    // Every alert has a unit test.
    let rules = std::fs::read_to_string(kit("alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(kit("alerts.test.yaml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "alert {a} has no test in alerts.test.yaml"
        );
    }
}

#[tokio::test]
async fn dashboard_and_alerts_only_use_exported_families() {
    let (_fake, gw) = start().await;
    let exported = types(&scrape(&gw).await);

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kit("dashboard.json")).unwrap()).unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "{queries:?}");

    let mut shown = BTreeSet::new();
    for q in &queries {
        for name in metric_tokens(q) {
            let family = family_of(&name, &exported)
                .unwrap_or_else(|| panic!("dashboard query uses {name}, not exported: {q}"));
            shown.insert(family.to_string());
        }
    }
    // The dashboard shows every family.
    for f in ALL {
        assert!(
            shown.contains(f.name),
            "dashboard.json never shows {}",
            f.name
        );
    }

    // Every panel query parses: promtool checks them as recording rules (with
    // Grafana's variables replaced by values).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries
        .iter()
        .filter(|q| !q.starts_with("label_values("))
        .enumerate()
    {
        let expr = q
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::Value::String(expr)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&path, rules).unwrap();
    assert_promtool_ok(
        "dashboard queries",
        &promtool(&["check", "rules", path.to_str().unwrap()], None),
    );

    // The alert rules and their tests name only exported families.
    for file in ["alerts.yaml", "alerts.test.yaml"] {
        let text = std::fs::read_to_string(kit(file)).unwrap();
        let names = metric_tokens(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                family_of(&name, &exported).is_some(),
                "{file} uses {name}, which the gateway does not export"
            );
        }
    }
}
