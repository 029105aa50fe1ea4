//! Configuration: loading (built-in defaults < TOML file < `CHAT_GATEWAY__*` env),
//! validation into typed [`Settings`], and live reload of the reloadable part.
//!
//! The raw serde structs in [`raw`] mirror the TOML keys one to one (a public
//! contract) and reject unknown keys, so a typo fails loudly instead of silently
//! falling back to a default. They are converted once, in [`settings`], into the
//! library's own types; nothing else reads raw config.

pub mod otel;
pub mod raw;
pub mod redis;
pub mod reload;
pub mod secret;
pub mod secrets;
pub mod settings;

use std::path::Path;

pub use otel::TracingSettings;
pub use redis::{RedisMode, RedisSettings, RedisUrl};
pub use secret::Secret;
pub use settings::{
    AccessOutput, CacheSettings, ChatSettings, CommandCache, LiveSettings, LogFormat, LogSettings,
    RetrySettings, ServerSettings, Settings,
};

/// Prefix of environment overrides: `CHAT_GATEWAY__CACHE__TTL_SECS=5`.
pub const ENV_PREFIX: &str = "CHAT_GATEWAY";
/// Separator between the prefix and key path segments in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a bad value (or is missing).
    #[error("invalid config key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `chat.sdkappid`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file could not be read or parsed, or a key is unknown.
    #[error("config: {0}")]
    Load(String),
}

impl ConfigError {
    pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Loads and validates the configuration: defaults, then `file` (if any), then the
/// process environment.
pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
    load_with_env(file, std::env::vars())
}

/// Like [`load`] with an explicit environment, so precedence can be tested without
/// touching the process's.
pub fn load_with_env(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let raw = raw::RawConfig::load(file, env)?;
    Settings::from_raw(raw)
}
