//! The binary's life: health endpoints, graceful shutdown, config errors, secrets.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn healthz_readyz_then_sigterm_exits_zero_within_grace() {
    let fake = FakeChat::start(echo_pages()).await;
    let mut gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let h = get(&gw.url("/healthz")).await.unwrap();
    assert_eq!(h.0, 200);
    let r = get(&gw.url("/readyz")).await.unwrap();
    assert_eq!(r.0, 200);
    assert!(
        !header(&r, "x-request-id").is_empty(),
        "a request id is put on every answer"
    );
    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("exits within the 5 s grace");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn request_id_is_taken_from_the_caller() {
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let a = send(
        http::Request::get(gw.url("/healthz"))
            .header("x-request-id", "abc-123")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(header(&a, "x-request-id"), "abc-123");
}

#[tokio::test]
async fn quitquitquit_from_loopback_shuts_down_gracefully() {
    let fake = FakeChat::start(echo_pages()).await;
    let mut gw = Gateway::start(&config_toml(&fake.url(), &[])).await;
    let a = post(&gw.url("/quitquitquit"), "").await;
    assert_eq!(a.0, 200);
    let status = gw.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(0));
}

fn run_with(toml: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_config_key_exits_non_zero_naming_the_key() {
    let good = config_toml("http://127.0.0.1:9", &[]);
    for (section, line, key) in [
        ("cache", "ttl_secs = 0", "cache.ttl_secs"),
        ("chat", "region = \"mars\"", "chat.region"),
        ("server", "listen = \"nowhere\"", "server.listen"),
        ("log", "format = \"xml\"", "log.format"),
        ("cache", "ttl_sec = 5", "ttl_sec"),
    ] {
        let toml = config_toml("http://127.0.0.1:9", &[(section, line)]);
        assert_ne!(toml, good);
        for args in [&[][..], &["check-config"][..]] {
            let out = run_with(&toml, args, &[]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{line} accepted");
            assert_eq!(out.status.code(), Some(1));
            assert!(
                err.contains(key),
                "{line}: message does not name {key}: {err}"
            );
        }
    }
    let err = String::from_utf8_lossy(
        &run_with(
            &config_toml("http://127.0.0.1:9", &[("chat", "region = \"mars\"")]),
            &["check-config"],
            &[],
        )
        .stderr,
    )
    .to_string();
    assert!(
        err.contains("silicon-valley"),
        "unknown region lists the valid ones: {err}"
    );
}

#[test]
fn check_config_prints_effective_config_without_the_secret() {
    let toml = config_toml("http://127.0.0.1:9", &[]);
    let out = run_with(
        &toml,
        &["check-config"],
        &[("CHAT_GATEWAY__CACHE__TTL_SECS", "42")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!stdout.contains(SECRET), "secret printed: {stdout}");
    assert!(stdout.contains("secret_key = \"<redacted>\""));
    let v: toml::Table = stdout.parse().expect("check-config prints TOML");
    assert_eq!(
        v["cache"]["ttl_secs"].as_integer(),
        Some(42),
        "env override is applied"
    );
    assert_eq!(v["chat"]["sdkappid"].as_integer(), Some(SDKAPPID as i64));
    // Fed back as a config file, it is accepted and prints the same.
    let again = run_with(&stdout, &["check-config"], &[]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
}

#[test]
fn the_cli_says_how_to_configure_and_validates_its_arguments() {
    // No config at all: how to get one.
    let out = Command::new(bin())
        .env_remove("CHAT_GATEWAY_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for hint in ["--config FILE", "chat-gateway demo", "CHAT_GATEWAY__"] {
        assert!(err.contains(hint), "{hint} missing from: {err}");
    }
    // --help names the environment convention.
    let help = Command::new(bin()).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("CHAT_GATEWAY__<SECTION>__<KEY>"));
    // The demo and the emulator read no config file and do not offer --config.
    for sub in ["demo", "emulator"] {
        let help = Command::new(bin()).args([sub, "--help"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&help.stdout).contains("--config"),
            "{sub}"
        );
        let out = Command::new(bin())
            .args(["--config", "x.toml", sub])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{sub} --config is refused");
    }
    // usersig: --expire must be > 0, the identifier a valid UserID.
    let toml = config_toml("http://127.0.0.1:9", &[]);
    for args in [
        &["usersig", "--expire", "0"][..],
        &["usersig", "--identifier", "has space"],
        &[
            "usersig",
            "--identifier",
            "123456789012345678901234567890123",
        ],
    ] {
        let out = run_with(&toml, args, &[]);
        assert!(!out.status.success(), "{args:?} accepted");
    }
}

#[test]
fn usersig_subcommand_prints_a_sig_that_verifies() {
    let toml = config_toml("http://127.0.0.1:9", &[]);
    let out = run_with(
        &toml,
        &["usersig", "--identifier", "ops", "--expire", "600"],
        &[],
    );
    assert!(out.status.success());
    let sig = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let now = chat_gateway::upstream::signer::unix_now();
    let info =
        chat_gateway::chat::usersig::verify(&sig, SDKAPPID, SECRET.as_bytes(), "ops", now).unwrap();
    assert_eq!(info.expire, 600);
}

#[tokio::test]
async fn secret_never_appears_in_debug_logs() {
    let fake = FakeChat::start(echo_pages()).await;
    let toml = config_toml(&fake.url(), &[("log", "level = \"debug\"")]);
    let mut gw = Gateway::start(&toml).await;
    let a = post(
        &gw.url("/v4/recentcontact/get_list"),
        r#"{"From_Account":"user_0001"}"#,
    )
    .await;
    assert_eq!(a.0, 200);
    let _ = post(&gw.url("/v4/recentcontact/get_list"), "not json").await;
    gw.signal(libc::SIGTERM);
    gw.wait_exit(Duration::from_secs(5)).expect("exits");
    let log = gw.log_text();
    assert!(log.contains("DEBUG"), "debug logging was on: {log}");
    assert!(!log.contains(SECRET), "secret in logs");
    let sig = fake.calls()[0].query["usersig"].clone();
    assert!(!log.contains(&sig), "UserSig in logs");
}
