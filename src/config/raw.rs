//! The configuration file's shape, key for key. Unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, ENV_PREFIX, ENV_SEPARATOR};

/// The whole file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: RawServer,
    pub chat: RawChat,
    pub cache: RawCache,
    pub retry: RawRetry,
    pub log: RawLog,
    pub callback: RawCallback,
    pub routes: RawRoutes,
    pub ratelimit: RawRateLimit,
    pub redis: RawRedis,
    pub tracing: RawTracing,
}

/// `[tracing]`: OpenTelemetry traces, exported over OTLP/HTTP. Off without
/// `endpoint`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTracing {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub sample_ratio: f64,
    pub service_name: String,
    pub max_queue_spans: u64,
    pub max_batch_spans: u64,
    pub export_interval_ms: u64,
    pub export_timeout_ms: u64,
}

impl Default for RawTracing {
    fn default() -> Self {
        RawTracing {
            endpoint: None,
            sample_ratio: 1.0,
            service_name: "chat-gateway".into(),
            max_queue_spans: 2048,
            max_batch_spans: 512,
            export_interval_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

/// `[redis]`: the fleet. Without `url`, the gateway runs alone.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// Serialized with its password (only) redacted.
    #[serde(serialize_with = "redacted_redis_url")]
    pub url: Option<Secret>,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub l2_cache: bool,
    pub ca_file: Option<PathBuf>,
    pub lease_ms: u64,
    pub latency_allowance_ms: u64,
    pub expected_gateways: u64,
    /// `standalone`, `cluster` or `sentinel`.
    pub mode: String,
    /// More cluster seed nodes (besides `url`); each may hold a password.
    #[serde(serialize_with = "redacted_redis_urls")]
    pub urls: Vec<Secret>,
    /// The sentinels (`mode = "sentinel"`); each may hold a password.
    #[serde(serialize_with = "redacted_redis_urls")]
    pub sentinels: Vec<Secret>,
    /// The name the sentinels know the primary by.
    pub master_name: Option<String>,
}

/// Redis URLs, each as [`redacted_redis_url`] shows one.
fn redacted_redis_urls<S: serde::Serializer>(u: &[Secret], s: S) -> Result<S::Ok, S::Error> {
    let shown: Vec<String> = u
        .iter()
        .map(|u| {
            super::redis::RedisUrl::parse("redis.urls", u.expose())
                .map(|u| u.redacted())
                .unwrap_or_else(|_| "<redacted>".to_string())
        })
        .collect();
    s.collect_seq(shown)
}

/// A Redis URL as `redis://user:<redacted>@host:port/db`; all of it redacted if it
/// does not parse.
fn redacted_redis_url<S: serde::Serializer>(u: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        None => s.serialize_none(),
        Some(u) => s.serialize_some(
            &super::redis::RedisUrl::parse("redis.url", u.expose())
                .map(|u| u.redacted())
                .unwrap_or_else(|_| "<redacted>".to_string()),
        ),
    }
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: None,
            key_prefix: "chat-gateway".into(),
            timeout_ms: 50,
            l2_cache: true,
            ca_file: None,
            lease_ms: 20,
            latency_allowance_ms: 40,
            expected_gateways: 1,
            mode: "standalone".into(),
            urls: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
        }
    }
}

/// `[routes]`
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoutes {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// `[ratelimit]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub per_command_per_sec: u64,
    pub max_wait_ms: u64,
    pub burst_percent: u64,
    pub commands: std::collections::BTreeMap<String, u64>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            per_command_per_sec: 200,
            max_wait_ms: 500,
            burst_percent: 75,
            commands: Default::default(),
        }
    }
}

/// `[callback]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCallback {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    pub max_body_bytes: u64,
    pub max_connections: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
}

impl Default for RawCallback {
    fn default() -> Self {
        RawCallback {
            token: None,
            token_file: None,
            max_body_bytes: 65536,
            max_connections: 1024,
            header_read_timeout_ms: 5000,
            body_read_timeout_ms: 5000,
        }
    }
}

/// `[server]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_body_bytes: u64,
    pub shutdown_grace_secs: u64,
    pub max_connections: u64,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    pub max_invalidate_accounts: u64,
    pub auth_tokens: Vec<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_tokens_file: Option<PathBuf>,
    pub allow_unauthenticated: bool,
    pub protect_metrics: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_listen: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 65536,
            shutdown_grace_secs: 10,
            max_connections: 10_000,
            header_read_timeout_ms: 5000,
            body_read_timeout_ms: 10_000,
            max_invalidate_accounts: 1000,
            auth_tokens: Vec::new(),
            auth_tokens_file: None,
            allow_unauthenticated: false,
            protect_metrics: false,
            admin_listen: None,
            callback_listen: None,
        }
    }
}

/// `[chat]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawChat {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdkappid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    pub usersig_ttl_secs: u64,
    pub request_timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_base_url: Option<String>,
    pub failover_cooldown_secs: u64,
}

impl Default for RawChat {
    fn default() -> Self {
        RawChat {
            sdkappid: None,
            identifier: None,
            secret_key: None,
            secret_key_file: None,
            region: None,
            base_url: None,
            ca_file: None,
            usersig_ttl_secs: 86400,
            request_timeout_ms: 3000,
            attempt_timeout_ms: None,
            backup_base_url: None,
            failover_cooldown_secs: 60,
        }
    }
}

/// `[cache]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub ttl_secs: u64,
    pub max_bytes: u64,
    pub stale_if_error_secs: u64,
    pub max_pages_per_account: u64,
    pub items_percent: u64,
    /// What a group event drops of the conversation lists: `all-pages` or
    /// `listing-accounts`.
    pub group_events: String,
    /// `[cache.commands."service/command"]`, one table per cached read.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub commands: std::collections::BTreeMap<String, RawCommandCache>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            ttl_secs: 10,
            max_bytes: 64 * 1024 * 1024,
            stale_if_error_secs: 300,
            max_pages_per_account: 64,
            items_percent: 25,
            group_events: "all-pages".into(),
            commands: Default::default(),
        }
    }
}

/// `[cache.commands."service/command"]`: each key left out takes the command's
/// default (`chat::reads`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCommandCache {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_if_error_secs: Option<u64>,
}

/// `[retry]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    pub max_attempts: u64,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
    pub idempotent_commands: Vec<String>,
    pub budget_percent: u64,
    pub budget_min_per_sec: u64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 3,
            base_delay_ms: 50,
            max_delay_ms: 1000,
            idempotent_commands: crate::chat::commands::DEFAULT_IDEMPOTENT
                .iter()
                .map(|c| c.to_string())
                .collect(),
            budget_percent: 5,
            budget_min_per_sec: 0,
        }
    }
}

/// `[log]`
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
    pub access: bool,
    pub access_sample: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_format: Option<String>,
    pub access_output: String,
    pub access_buffer_bytes: u64,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
            access: false,
            access_sample: 1.0,
            access_format: None,
            access_output: "stderr".into(),
            access_buffer_bytes: 1024 * 1024,
        }
    }
}

/// Keys whose values are secrets (or hold one, like a password in a URL): an error
/// about them names the key and the line, never the value or the line's text.
pub const SECRET_KEYS: &[&str] = &[
    "chat.secret_key",
    "callback.token",
    "server.auth_tokens",
    "redis.url",
    "redis.urls",
    "redis.sentinels",
];

impl RawConfig {
    /// Reads the file (if any) over the defaults, then `env` over both.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Load(format!(
                    "config file {} cannot be read: {}",
                    path.display(),
                    e.kind()
                ))
            })?;
            // Syntax errors are reported here, where their position is known: the
            // parser's own message quotes the line, which may hold a secret.
            if let Err(e) = text.parse::<toml::Table>() {
                return Err(ConfigError::Load(syntax_error(path, &text, &e)));
            }
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("server.auth_tokens")
                .with_list_parse_key("retry.idempotent_commands")
                .with_list_parse_key("routes.allow")
                .with_list_parse_key("routes.deny")
                .with_list_parse_key("redis.urls")
                .with_list_parse_key("redis.sentinels")
                .source(Some(env_map)),
        );
        let cfg = builder
            .build()
            .map_err(|e| ConfigError::Load(describe(&e)))?;
        cfg.try_deserialize::<RawConfig>()
            .map_err(|e| ConfigError::Load(describe(&e)))
    }
}

/// A TOML syntax error as `file: line L, column C: what`, without the line's text.
/// When the line sets a secret (or continues a value that started on such a line),
/// even the parser's short message is left out.
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let secret = secret_key_at(text, line);
    match secret {
        Some(key) => format!(
            "config file {}: TOML syntax error at line {line}, column {column}, in the value of `{key}` (not shown: it is a secret)",
            path.display()
        ),
        None => format!(
            "config file {}: TOML syntax error at line {line}, column {column}: {}",
            path.display(),
            e.message().lines().next().unwrap_or("invalid TOML")
        ),
    }
}

/// The secret key whose value line `line` (1-based) is part of: the last `key =`
/// at or above it, within its `[section]`.
fn secret_key_at(text: &str, line: usize) -> Option<&'static str> {
    let mut section = String::new();
    let mut current: Option<String> = None;
    for l in text.lines().take(line) {
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix('[') {
            section = rest.split(']').next().unwrap_or("").trim().to_string();
            current = None;
        } else if let Some((k, _)) = t.split_once('=') {
            let k = k.trim().trim_matches('"');
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
            {
                current = Some(format!("{section}.{k}"));
            }
        }
    }
    let key = current?;
    SECRET_KEYS.iter().copied().find(|s| *s == key)
}

/// A config-crate error in words that never include a secret's value.
fn describe(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type {
            key: Some(key),
            expected,
            ..
        } if SECRET_KEYS.contains(&key.as_str()) => {
            format!("invalid type for key `{key}`: expected {expected} (the value is not shown: it is a secret)")
        }
        config::ConfigError::At {
            error,
            key: Some(key),
            ..
        } if SECRET_KEYS.contains(&key.as_str()) => {
            let expected = match &**error {
                config::ConfigError::Type { expected, .. } => format!(": expected {expected}"),
                _ => String::new(),
            };
            format!(
                "invalid value for key `{key}`{expected} (the value is not shown: it is a secret)"
            )
        }
        config::ConfigError::At { error, .. } => {
            let inner = describe(error);
            let text = e.to_string();
            // Keep the config crate's wording (it names the key) unless the inner
            // message had to be redacted.
            if text.contains(&inner) {
                text
            } else {
                inner
            }
        }
        other => {
            let text = other.to_string();
            match SECRET_KEYS.iter().find(|k| text.contains(*k)) {
                Some(k) => format!("invalid value for key `{k}` (not shown: it is a secret)"),
                None => text,
            }
        }
    }
}
