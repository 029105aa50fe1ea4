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
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 65536,
            shutdown_grace_secs: 10,
            max_connections: 10_000,
            header_read_timeout_ms: 5000,
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
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 3,
            base_delay_ms: 50,
            max_delay_ms: 1000,
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
                .source(Some(env_map)),
        );
        let cfg = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.try_deserialize::<RawConfig>()
            .map_err(|e| ConfigError::Load(e.to_string()))
    }
}
