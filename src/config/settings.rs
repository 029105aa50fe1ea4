//! Validated, typed settings: what the rest of the crate reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::RawConfig;
use super::{ConfigError, Secret};
use crate::chat::region::Region;

/// Everything the gateway needs to run, validated.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The listening side.
    pub server: ServerSettings,
    /// Where Chat is and how we authenticate to it.
    pub chat: ChatSettings,
    /// Cache capacity (fixed at start-up; TTLs are in `live`).
    pub cache: CacheSettings,
    /// The part ops may change while the gateway runs.
    pub live: LiveSettings,
    /// Log output.
    pub log: LogSettings,
    /// Chat's webhooks.
    pub callback: CallbackSettings,
}

/// `[callback]`
#[derive(Debug, Clone, Serialize)]
pub struct CallbackSettings {
    /// The callback token set in the Chat console; when set, every webhook must carry
    /// a valid `Sign`.
    pub token: Option<Secret>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones are answered 413 without reading on.
    pub max_body_bytes: usize,
    /// How long in-flight requests may finish after SIGTERM.
    #[serde(with = "secs", rename = "shutdown_grace_secs")]
    pub shutdown_grace: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// Deadline for a connection's request head (slow-loris protection).
    #[serde(with = "millis", rename = "header_read_timeout_ms")]
    pub header_read_timeout: Duration,
}

/// `[chat]`
#[derive(Debug, Clone, Serialize)]
pub struct ChatSettings {
    /// The app's SDKAppID.
    pub sdkappid: u64,
    /// The app admin account every call is made as.
    pub identifier: String,
    /// The app's secret key; never printed.
    pub secret_key: Secret,
    /// The app's region, which names the default domains.
    #[serde(serialize_with = "region_str")]
    pub region: Region,
    /// Base URL of the primary upstream (`https://<region domain>` unless overridden).
    pub base_url: String,
    /// Whether `base_url` came from config (only then is `http://` allowed).
    pub base_url_overridden: bool,
    /// Extra PEM roots trusted for the upstream, besides the bundled web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Lifetime of each admin UserSig the gateway issues.
    #[serde(with = "secs", rename = "usersig_ttl_secs")]
    pub usersig_ttl: Duration,
    /// Deadline for one caller request's whole upstream exchange, retries included.
    #[serde(with = "millis", rename = "request_timeout_ms")]
    pub request_timeout: Duration,
}

/// `[cache]` (fixed part)
#[derive(Debug, Clone, Serialize)]
pub struct CacheSettings {
    /// Capacity of the page cache, in bytes of stored bodies and keys.
    pub max_bytes: u64,
}

/// The settings that may change while the gateway runs (hot reload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveSettings {
    /// `cache.ttl_secs`: how long a page is served as fresh.
    #[serde(with = "secs", rename = "cache_ttl_secs")]
    pub cache_ttl: Duration,
    /// `cache.stale_if_error_secs`: how long after its TTL a page may still be served
    /// when Chat fails.
    #[serde(with = "secs", rename = "cache_stale_if_error_secs")]
    pub stale_if_error: Duration,
    /// `[retry]`
    pub retry: RetrySettings,
}

/// `[retry]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetrySettings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Lower bound of the backoff before the first retry.
    #[serde(with = "millis", rename = "base_delay_ms")]
    pub base_delay: Duration,
    /// Upper bound of any backoff.
    #[serde(with = "millis", rename = "max_delay_ms")]
    pub max_delay: Duration,
}

/// `[log]`
#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    /// Text for people, JSON for log pipelines.
    pub format: LogFormat,
    /// A tracing-subscriber filter directive, e.g. `info` or `chat_gateway=debug`.
    pub level: String,
}

/// `log.format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn region_str<S: serde::Serializer>(r: &Region, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(key, "must be greater than 0"))
    } else {
        Ok(v)
    }
}

impl Settings {
    /// Validates raw config into settings; the error names the first bad key.
    pub fn from_raw(raw: RawConfig) -> Result<Settings, ConfigError> {
        let s = raw.server;
        let listen: SocketAddr = s.listen.parse().map_err(|_| {
            ConfigError::invalid(
                "server.listen",
                format!("{:?} is not an address like 127.0.0.1:8080", s.listen),
            )
        })?;
        let max_body = positive("server.max_body_bytes", s.max_body_bytes)?;
        if max_body > 64 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        let server = ServerSettings {
            listen,
            max_body_bytes: max_body as usize,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
            max_connections: positive("server.max_connections", s.max_connections)? as usize,
            header_read_timeout: Duration::from_millis(positive(
                "server.header_read_timeout_ms",
                s.header_read_timeout_ms,
            )?),
        };

        let c = raw.chat;
        let sdkappid = c
            .sdkappid
            .ok_or_else(|| ConfigError::invalid("chat.sdkappid", "is required"))?;
        if sdkappid == 0 || sdkappid > u32::MAX as u64 {
            return Err(ConfigError::invalid(
                "chat.sdkappid",
                "must be the app's SDKAppID (1 to 4294967295)",
            ));
        }
        let identifier = c
            .identifier
            .filter(|i| !i.trim().is_empty())
            .ok_or_else(|| {
                ConfigError::invalid("chat.identifier", "is required (the app admin account)")
            })?;
        if identifier.len() > 32
            || identifier
                .chars()
                .any(|ch| ch.is_control() || ch.is_whitespace())
        {
            return Err(ConfigError::invalid(
                "chat.identifier",
                "must be at most 32 bytes with no spaces or control characters",
            ));
        }
        let secret_key = match (c.secret_key, c.secret_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "chat.secret_key",
                    "set either chat.secret_key or chat.secret_key_file, not both",
                ))
            }
            (Some(k), None) => k,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::invalid(
                        "chat.secret_key_file",
                        format!("cannot read {}: {}", path.display(), e.kind()),
                    )
                })?;
                Secret::new(text.trim_end_matches(['\r', '\n']).to_string())
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "chat.secret_key",
                    "is required (or chat.secret_key_file)",
                ))
            }
        };
        if secret_key.is_empty() {
            return Err(ConfigError::invalid("chat.secret_key", "must not be empty"));
        }
        let region: Region = c
            .region
            .as_deref()
            .ok_or_else(|| {
                ConfigError::invalid(
                    "chat.region",
                    format!("is required; valid regions are: {}", Region::valid_names()),
                )
            })?
            .parse()
            .map_err(|e: crate::chat::region::UnknownRegion| {
                ConfigError::invalid("chat.region", e.to_string())
            })?;
        let (base_url, overridden) = match c.base_url {
            Some(u) => (validate_base_url("chat.base_url", &u)?, true),
            None => (format!("https://{}", region.domain()), false),
        };
        if let Some(ca) = &c.ca_file {
            if !ca.is_file() {
                return Err(ConfigError::invalid(
                    "chat.ca_file",
                    format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        let usersig_ttl = positive("chat.usersig_ttl_secs", c.usersig_ttl_secs)?;
        if usersig_ttl < 60 {
            return Err(ConfigError::invalid(
                "chat.usersig_ttl_secs",
                "must be at least 60 (Chat advises 86400 or more)",
            ));
        }
        let chat = ChatSettings {
            sdkappid,
            identifier,
            secret_key,
            region,
            base_url,
            base_url_overridden: overridden,
            ca_file: c.ca_file,
            usersig_ttl: Duration::from_secs(usersig_ttl),
            request_timeout: Duration::from_millis(positive(
                "chat.request_timeout_ms",
                c.request_timeout_ms,
            )?),
        };

        let cache = CacheSettings {
            max_bytes: positive("cache.max_bytes", raw.cache.max_bytes)?,
        };
        let r = raw.retry;
        let max_attempts = positive("retry.max_attempts", r.max_attempts)?;
        if max_attempts > 10 {
            return Err(ConfigError::invalid(
                "retry.max_attempts",
                "must be at most 10",
            ));
        }
        if r.max_delay_ms < r.base_delay_ms {
            return Err(ConfigError::invalid(
                "retry.max_delay_ms",
                "must be at least retry.base_delay_ms",
            ));
        }
        let live = LiveSettings {
            cache_ttl: Duration::from_secs(positive("cache.ttl_secs", raw.cache.ttl_secs)?),
            stale_if_error: Duration::from_secs(raw.cache.stale_if_error_secs),
            retry: RetrySettings {
                max_attempts: max_attempts as u32,
                base_delay: Duration::from_millis(r.base_delay_ms),
                max_delay: Duration::from_millis(r.max_delay_ms),
            },
        };
        let format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::invalid(
                    "log.format",
                    format!("{other:?} is not one of: text, json"),
                ))
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                format!("{:?} is not a level or filter directive", raw.log.level),
            ));
        }
        Ok(Settings {
            server,
            chat,
            cache,
            live,
            log: LogSettings {
                format,
                level: raw.log.level,
            },
            callback: CallbackSettings {
                token: match raw.callback.token {
                    Some(t) if t.is_empty() => {
                        return Err(ConfigError::invalid(
                            "callback.token",
                            "must not be empty (leave it out to accept unsigned callbacks)",
                        ))
                    }
                    t => t,
                },
            },
        })
    }

    /// The effective settings as TOML-like JSON, secrets redacted (for `check-config`).
    pub fn to_redacted_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into())
    }
}

fn validate_base_url(key: &str, u: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = u
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("{u:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{u:?} must start with https:// (or http:// for a local emulator)"),
            ))
        }
    }
    if uri.host().is_none() {
        return Err(ConfigError::invalid(key, format!("{u:?} has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{u:?} must be scheme://host[:port] with no path or query"),
        ));
    }
    Ok(u.trim_end_matches('/').to_string())
}
