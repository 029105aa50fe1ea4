//! The configuration file's shape, key for key. Unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Secret, ENV_PREFIX, ENV_SEPARATOR};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
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
}

/// `[redis]`: the fleet. Without `url`, the gateway runs alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    pub url: Option<Secret>,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub l2_cache: bool,
    pub ca_file: Option<PathBuf>,
    pub lease_ms: u64,
    pub latency_allowance_ms: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            url: None,
            key_prefix: "chat-gateway".into(),
            timeout_ms: 50,
            l2_cache: true,
            ca_file: None,
            lease_ms: 50,
            latency_allowance_ms: 50,
        }
    }
}

/// `[routes]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoutes {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// `[ratelimit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub per_command_per_sec: u64,
    pub max_wait_ms: u64,
    pub commands: std::collections::BTreeMap<String, u64>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            per_command_per_sec: 200,
            max_wait_ms: 500,
            commands: Default::default(),
        }
    }
}

/// `[callback]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCallback {
    pub token: Option<Secret>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub max_body_bytes: u64,
    pub shutdown_grace_secs: u64,
    pub max_connections: u64,
    pub header_read_timeout_ms: u64,
    pub auth_tokens: Vec<Secret>,
    pub allow_unauthenticated: bool,
    pub protect_metrics: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 65536,
            shutdown_grace_secs: 10,
            max_connections: 10_000,
            header_read_timeout_ms: 5000,
            auth_tokens: Vec::new(),
            allow_unauthenticated: false,
            protect_metrics: false,
        }
    }
}

/// `[chat]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawChat {
    pub sdkappid: Option<u64>,
    pub identifier: Option<String>,
    pub secret_key: Option<Secret>,
    pub secret_key_file: Option<PathBuf>,
    pub region: Option<String>,
    pub base_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub usersig_ttl_secs: u64,
    pub request_timeout_ms: u64,
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
            backup_base_url: None,
            failover_cooldown_secs: 60,
        }
    }
}

/// `[cache]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub ttl_secs: u64,
    pub max_bytes: u64,
    pub stale_if_error_secs: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            ttl_secs: 10,
            max_bytes: 64 * 1024 * 1024,
            stale_if_error_secs: 300,
        }
    }
}

/// `[retry]`
#[derive(Debug, Deserialize)]
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
            budget_percent: 20,
            budget_min_per_sec: 10,
        }
    }
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl RawConfig {
    /// Reads the file (if any) over the defaults, then `env` over both.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
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
                .source(Some(env_map)),
        );
        let cfg = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.try_deserialize::<RawConfig>()
            .map_err(|e| ConfigError::Load(e.to_string()))
    }
}
