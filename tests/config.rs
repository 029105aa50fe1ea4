//! Config precedence and validation, through the library's loader.

use std::io::Write;

use chat_gateway::chat::effects::GroupEventScope;
use chat_gateway::config::{load_with_env, ConfigError};

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

const BASE: &str = r#"
[chat]
sdkappid = 1400000000
identifier = "administrator"
secret_key = "k"
region = "tokyo"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn precedence_is_default_then_file_then_env() {
    let f = file(BASE);
    let s = load_with_env(Some(f.path()), env(&[])).unwrap();
    assert_eq!(s.live.cache_ttl.as_secs(), 10, "built-in default");
    assert_eq!(
        s.chat.base_url, "https://adminapijpn.im.qcloud.com",
        "region's domain"
    );
    assert_eq!(s.server.max_body_bytes, 65536);
    assert_eq!(s.live.retry.max_attempts, 3);

    let f = file(&format!(
        "{BASE}\n[cache]\nttl_secs = 20\n[retry]\nmax_attempts = 5\n"
    ));
    let s = load_with_env(Some(f.path()), env(&[])).unwrap();
    assert_eq!(s.live.cache_ttl.as_secs(), 20, "file beats default");
    assert_eq!(s.live.retry.max_attempts, 5);

    let s = load_with_env(
        Some(f.path()),
        env(&[
            ("CHAT_GATEWAY__CACHE__TTL_SECS", "5"),
            ("CHAT_GATEWAY__CHAT__BASE_URL", "http://127.0.0.1:9000"),
            ("CHAT_GATEWAY_CONFIG", "/not/a/key"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(s.live.cache_ttl.as_secs(), 5, "env beats file");
    assert_eq!(
        s.live.retry.max_attempts, 5,
        "file value kept where env is silent"
    );
    assert_eq!(s.chat.base_url, "http://127.0.0.1:9000");
}

#[test]
fn invalid_values_name_their_key() {
    let cases = [
        ("[cache]\nttl_secs = 0", "cache.ttl_secs"),
        ("[chat]\nsdkappid = 1400000000\nidentifier = \"a\"\nsecret_key = \"k\"\nregion = \"atlantis\"", "chat.region"),
        ("[chat]\nsdkappid = 1400000000\nidentifier = \"a\"\nregion = \"tokyo\"", "chat.secret_key"),
        ("[chat]\nidentifier = \"a\"\nsecret_key = \"k\"\nregion = \"tokyo\"", "chat.sdkappid"),
        ("[retry]\nbase_delay_ms = 100\nmax_delay_ms = 10", "retry.max_delay_ms"),
        ("[server]\nmax_body_bytes = 0", "server.max_body_bytes"),
        ("[log]\nformat = \"yaml\"", "log.format"),
        ("[chat]\nsdkappid = 1\nidentifier = \"a\"\nsecret_key = \"k\"\nregion = \"tokyo\"\nbase_url = \"ftp://x\"", "chat.base_url"),
        ("[chat]\nsdkappid = 1\nidentifier = \"a\"\nsecret_key = \"k\"\nregion = \"tokyo\"\nca_file = \"/nonexistent.pem\"", "chat.ca_file"),
    ];
    for (extra, key) in cases {
        // Put the override after BASE where the section differs; for [chat] replace it.
        let text = if extra.starts_with("[chat]") {
            extra.to_string()
        } else {
            format!("{BASE}\n{extra}")
        };
        let f = file(&text);
        let e = load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(e.to_string().contains(key), "{extra:?}: {e}");
    }
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let f = file(&format!("{BASE}\n[cache]\nttl_sec = 5\n"));
    let e = load_with_env(Some(f.path()), env(&[])).unwrap_err();
    assert!(matches!(e, ConfigError::Load(_)));
    assert!(e.to_string().contains("ttl_sec"), "{e}");
    let f = file(BASE);
    let e = load_with_env(
        Some(f.path()),
        env(&[("CHAT_GATEWAY__CACHE__TLL_SECS", "5")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("tll_secs"), "{e}");
}

#[test]
fn secret_key_file_is_read_and_never_debug_printed() {
    let key = file("super-secret-value\n");
    let f = file(&format!(
        "[chat]\nsdkappid = 1\nidentifier = \"a\"\nregion = \"tokyo\"\nsecret_key_file = \"{}\"\n",
        key.path().display()
    ));
    let s = load_with_env(Some(f.path()), env(&[])).unwrap();
    assert_eq!(s.chat.secret_key.expose(), "super-secret-value");
    assert!(!format!("{s:?}").contains("super-secret-value"));
    let toml = s.to_toml();
    assert!(!toml.contains("super-secret-value"));
    assert!(toml.contains(&format!("secret_key_file = \"{}\"", key.path().display())));

    // An empty key file is an error that names the file's key.
    let empty = file("\n");
    let f = file(&format!(
        "[chat]\nsdkappid = 1\nidentifier = \"a\"\nregion = \"tokyo\"\nsecret_key_file = \"{}\"\n",
        empty.path().display()
    ));
    let e = load_with_env(Some(f.path()), env(&[])).unwrap_err();
    assert!(e.to_string().contains("chat.secret_key_file"), "{e}");
}

#[test]
fn the_effective_configuration_loads_back_as_a_config_file() {
    let f = file(&format!(
        "{BASE}\n[server]\nadmin_listen = \"127.0.0.1:9901\"\nbody_read_timeout_ms = 700\n\
         [cache]\nttl_secs = 7\nmax_pages_per_account = 9\n[retry]\nmax_attempts = 5\n\
         [ratelimit.commands]\n\"openim/sendmsg\" = 100\n[log]\naccess = true\n\
         [routes]\ndeny = [\"openim/*\"]\n[callback]\ntoken = \"cb-token-value\"\n"
    ));
    let s = load_with_env(
        Some(f.path()),
        env(&[("CHAT_GATEWAY__CACHE__STALE_IF_ERROR_SECS", "42")]),
    )
    .unwrap();
    let text = s.to_toml();
    assert!(!text.contains("cb-token-value"));
    assert!(!text.contains("base_url_overridden") && !text.contains("live"));
    let again = load_with_env(Some(file(&text).path()), env(&[])).unwrap();
    // Everything but the redacted secrets comes back.
    assert_eq!(again.to_toml(), text);
    assert_eq!(again.live.cache_ttl.as_secs(), 7);
    assert_eq!(again.live.stale_if_error.as_secs(), 42);
    assert_eq!(again.cache.max_pages_per_account, 9);
    assert_eq!(again.server.admin_listen, s.server.admin_listen);
    assert_eq!(again.ratelimit.commands["openim/sendmsg"], 100);
    assert!(again.log.access);
    assert_eq!(again.routes.deny, vec!["openim/*"]);
    assert_eq!(again.chat.base_url, "https://adminapijpn.im.qcloud.com");
}

#[test]
fn a_public_callback_listener_needs_a_callback_token() {
    let f = file(&format!(
        "{BASE}\n[server]\ncallback_listen = \"0.0.0.0:8081\"\n"
    ));
    let e = load_with_env(Some(f.path()), env(&[])).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("server.callback_listen") && msg.contains("callback.token"),
        "{msg}"
    );
    let f = file(&format!(
        "{BASE}\n[server]\ncallback_listen = \"0.0.0.0:8081\"\n[callback]\ntoken = \"t\"\n"
    ));
    assert!(load_with_env(Some(f.path()), env(&[])).is_ok());
    let f = file(&format!(
        "{BASE}\n[server]\ncallback_listen = \"127.0.0.1:8081\"\n"
    ));
    assert!(
        load_with_env(Some(f.path()), env(&[])).is_ok(),
        "loopback needs none"
    );
}

#[test]
fn per_command_cache_settings_default_override_and_are_checked() {
    use chat_gateway::chat::reads::{row, READS};
    let f = file(BASE);
    let s = load_with_env(Some(f.path()), env(&[])).unwrap();
    assert_eq!(s.live.commands.len(), READS.len());
    for (c, r) in s.live.commands.iter().zip(READS) {
        assert_eq!(c.command, r.command);
        assert!(
            c.enabled,
            "{}: every cached command is on by default",
            r.command
        );
    }
    let (id, r) = row("profile/portrait_get").unwrap();
    assert_eq!(s.live.commands[id].ttl.as_secs(), r.ttl_secs);
    assert_eq!(s.cache.items_percent, 25);
    assert_eq!(s.live.group_events, GroupEventScope::AllPages);
    assert_eq!(
        s.cache.items_bytes() + s.cache.pages_bytes(),
        s.cache.max_bytes
    );

    let f = file(&format!(
        "{BASE}\n[cache]\nitems_percent = 40\n[cache.commands.\"profile/portrait_get\"]\nttl_secs = 5\n\
         [cache.commands.\"im_open_login_svc/account_check\"]\nenabled = false\nstale_if_error_secs = 0\n"
    ));
    let s = load_with_env(Some(f.path()), env(&[])).unwrap();
    assert_eq!(s.live.commands[id].ttl.as_secs(), 5);
    assert_eq!(
        s.live.commands[id].stale_if_error.as_secs(),
        r.stale_if_error_secs,
        "default kept"
    );
    let (check, _) = row("im_open_login_svc/account_check").unwrap();
    assert!(!s.live.commands[check].enabled);
    assert_eq!(s.live.commands[check].stale_if_error.as_secs(), 0);
    assert_eq!(s.cache.items_percent, 40);
    let listing = load_with_env(
        Some(
            file(&format!(
                "{BASE}\n[cache]\ngroup_events = \"listing-accounts\"\n"
            ))
            .path(),
        ),
        env(&[]),
    )
    .unwrap();
    assert_eq!(listing.live.group_events, GroupEventScope::ListingAccounts);
    let from_env = load_with_env(
        Some(file(BASE).path()),
        env(&[("CHAT_GATEWAY__CACHE__GROUP_EVENTS", "listing-accounts")]),
    )
    .unwrap();
    assert_eq!(from_env.live.group_events, GroupEventScope::ListingAccounts);
    let again = load_with_env(Some(file(&listing.to_toml()).path()), env(&[])).unwrap();
    assert_eq!(again.live.group_events, GroupEventScope::ListingAccounts);
    // get_list's row mirrors cache.ttl_secs.
    let (gl, _) = row("recentcontact/get_list").unwrap();
    assert_eq!(s.live.commands[gl].ttl, s.live.cache_ttl);
    let again = load_with_env(Some(file(&s.to_toml()).path()), env(&[])).unwrap();
    assert_eq!(again.live.commands, s.live.commands);

    for (extra, needle) in [
        (
            "[cache.commands.\"recentcontact/get_list\"]\nttl_secs = 5",
            "cache.ttl_secs",
        ),
        (
            "[cache.commands.\"openim/query_online_status\"]\nenabled = true",
            "never cached",
        ),
        (
            "[cache.commands.\"openim/sendmsg\"]\nenabled = true",
            "not a cached command",
        ),
        (
            "[cache.commands.\"profile/portrait_get\"]\nttl_secs = 0",
            "cache.commands.\"profile/portrait_get\".ttl_secs",
        ),
        (
            "[cache.commands.\"profile/portrait_get\"]\nstale_if_error_secs = 86401",
            "stale_if_error_secs",
        ),
        ("[cache.commands.\"profile/portrait_get\"]\nttl = 5", "ttl"),
        ("[cache]\nitems_percent = 0", "cache.items_percent"),
        ("[cache]\nitems_percent = 91", "cache.items_percent"),
        ("[cache]\ngroup_events = \"members\"", "cache.group_events"),
    ] {
        let f = file(&format!("{BASE}\n{extra}\n"));
        let e = load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert!(e.to_string().contains(needle), "{extra:?}: {e}");
    }
}
