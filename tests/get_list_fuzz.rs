//! Property test: arbitrary bytes and arbitrary JSON thrown at the running binary's
//! get_list route. It never panics and always answers with a Chat envelope.

mod common;

use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{TestError, TestRunner};

struct Env {
    rt: tokio::runtime::Runtime,
    gw: Gateway,
    _fake: FakeChat,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        // Started on a runtime worker thread, which lives as long as this static: the
        // gateway dies with the thread that started it (see `die_with_parent`).
        let started = rt.spawn(async {
            let fake = FakeChat::start(echo_pages()).await;
            let gw = Gateway::start(&config_toml(
                &fake.url(),
                &[("server", "max_body_bytes = 4096")],
            ))
            .await;
            (fake, gw)
        });
        let (fake, gw) = rt.block_on(started).expect("start");
        Env {
            rt,
            gw,
            _fake: fake,
        }
    })
}

fn check(body: Vec<u8>) -> Result<(), TestCaseError> {
    let e = env();
    let a =
        e.rt.block_on(post(&e.gw.url("/v4/recentcontact/get_list"), body));
    let v: serde_json::Value = serde_json::from_slice(&a.2)
        .map_err(|_| TestCaseError::fail(format!("not JSON: {:?}", a.2)))?;
    prop_assert!(
        v["ActionStatus"] == "OK" || v["ActionStatus"] == "FAIL",
        "{v}"
    );
    prop_assert!(v["ErrorCode"].is_i64(), "{v}");
    prop_assert!(["HIT", "MISS", "BYPASS"].contains(&header(&a, "x-cache")));
    if v["ActionStatus"] == "FAIL" {
        prop_assert!(!header(&a, "x-chat-gateway-error").is_empty());
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("From_Account".to_string()),
                    Just("TimeStamp".to_string()),
                    Just("StartIndex".to_string()),
                    Just("TopTimeStamp".to_string()),
                    Just("TopStartIndex".to_string()),
                    Just("AssistFlags".to_string()),
                    ".{0,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The three properties, in turn, then the check that the process lived through
/// them: one test, so that the check cannot run before (or beside) them.
#[test]
fn arbitrary_input_gets_an_envelope_and_the_process_lives_on() {
    let config = ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    fn run<T: std::fmt::Debug>(what: &str, result: Result<(), TestError<T>>) {
        if let Err(e) = result {
            panic!("{what}: {e}");
        }
    }
    run(
        "arbitrary bytes get an envelope",
        TestRunner::new(config.clone()).run(&prop::collection::vec(any::<u8>(), 0..6000), check),
    );
    run(
        "arbitrary JSON gets an envelope",
        TestRunner::new(config.clone())
            .run(&json_value(), |v| check(serde_json::to_vec(&v).unwrap())),
    );
    run(
        "near-valid requests get an envelope",
        TestRunner::new(config).run(
            &(
                prop_oneof![".{0,40}", "user_[0-9]{4}"],
                any::<i64>(),
                json_value(),
            ),
            |(account, ts, extra)| {
                let body =
                    serde_json::json!({"From_Account": account, "TimeStamp": ts, "X": extra});
                check(serde_json::to_vec(&body).unwrap())
            },
        ),
    );

    // Still alive: the same process answers, and nothing panicked in it.
    let e = env();
    let a = e.rt.block_on(get(&e.gw.url("/healthz"))).unwrap();
    assert_eq!(a.0, 200);
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(
        unsafe { libc::kill(e.gw.child.id() as i32, 0) },
        0,
        "the gateway process is gone"
    );
    assert!(!e.gw.log_text().contains("panicked"), "{}", e.gw.log_text());
}
