//! Validated, typed settings: what the rest of the crate reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::RawConfig;
use super::{secrets, ConfigError, Secret};
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
    /// Which commands may pass.
    pub routes: RouteSettings,
    /// The per-command rate limit towards Chat.
    pub ratelimit: RateLimitSettings,
    /// The fleet (`[redis]`), when `redis.url` is set.
    pub redis: Option<super::redis::RedisSettings>,
    /// OpenTelemetry traces (`[tracing]`), when `tracing.endpoint` is set.
    pub tracing: Option<super::otel::TracingSettings>,
}

/// `[routes]`: command patterns (`service/command`, `service/*` or `*`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteSettings {
    /// When not empty, only matching commands pass.
    pub allow: Vec<String>,
    /// Matching commands never pass (deny wins over allow).
    pub deny: Vec<String>,
}

/// `[ratelimit]`
#[derive(Debug, Clone, Serialize)]
pub struct RateLimitSettings {
    /// Calls per second per command (Chat allows 200).
    pub per_command_per_sec: u32,
    /// Per-command overrides of the rate.
    pub commands: std::collections::BTreeMap<String, u32>,
    /// How long a request may wait for its turn before it fails with 60007.
    #[serde(with = "millis", rename = "max_wait_ms")]
    pub max_wait: Duration,
    /// The burst admitted at once after idle, in percent of a command's rate.
    pub burst_percent: u32,
}

/// `[callback]`
#[derive(Debug, Clone, Serialize)]
pub struct CallbackSettings {
    /// The callback token set in the Chat console; when set, every webhook must carry
    /// a valid `Sign`. Read from `callback.token_file` when that is set (and then
    /// reloaded live by [`super::secrets`]).
    pub token: Option<Secret>,
    /// Where the token is read from, if from a file.
    pub token_file: Option<PathBuf>,
    /// Largest webhook body on `server.callback_listen`.
    pub max_body_bytes: usize,
    /// Open connections at most on `server.callback_listen`.
    pub max_connections: usize,
    /// Deadline for a webhook's request head on `server.callback_listen`.
    #[serde(with = "millis", rename = "header_read_timeout_ms")]
    pub header_read_timeout: Duration,
    /// Deadline for a webhook's body on `server.callback_listen`.
    #[serde(with = "millis", rename = "body_read_timeout_ms")]
    pub body_read_timeout: Duration,
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
    /// Deadline for a connection's request head (slow-loris protection); also how
    /// long an idle keep-alive connection is kept.
    #[serde(with = "millis", rename = "header_read_timeout_ms")]
    pub header_read_timeout: Duration,
    /// Deadline for a request's whole body once its head has arrived; past it the
    /// caller gets 408 and the connection is closed.
    #[serde(with = "millis", rename = "body_read_timeout_ms")]
    pub body_read_timeout: Duration,
    /// Most accounts one invalidation request may name.
    pub max_invalidate_accounts: usize,
    /// Bearer tokens callers must present on `/v4/*` and `/admin/*` (none: no auth),
    /// inline or read from `auth_tokens_file` (then reloaded live).
    pub auth_tokens: Vec<Secret>,
    /// Where the tokens are read from, one per line, if from a file.
    pub auth_tokens_file: Option<PathBuf>,
    /// A second listener for the probes and `/metrics` only (e.g. `0.0.0.0:9901`),
    /// outside `max_connections` and caller auth, for kubelet and Prometheus.
    pub admin_listen: Option<SocketAddr>,
    /// A listener for `POST /callback` only, so Chat's webhooks can reach the pod
    /// through a Service while the API stays on loopback.
    pub callback_listen: Option<SocketAddr>,
    /// Allows a non-loopback `listen` without tokens.
    pub allow_unauthenticated: bool,
    /// Whether `/metrics` requires a token too.
    pub protect_metrics: bool,
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
    /// Where the key is read from, if from a file (then reloaded live).
    pub secret_key_file: Option<PathBuf>,
    /// The app's region, which names the default domains.
    #[serde(serialize_with = "region_str")]
    pub region: Region,
    /// Base URL of the primary upstream (`https://<region domain>` unless overridden).
    pub base_url: String,
    /// Whether `base_url` came from config (only then is `http://` allowed).
    #[serde(skip)]
    pub base_url_overridden: bool,
    /// Whether `backup_base_url` came from config.
    #[serde(skip)]
    pub backup_base_url_overridden: bool,
    /// Base URL of the backup upstream, used after connection-level failures of the
    /// primary: the region's backup domain, or `chat.backup_base_url`.
    pub backup_base_url: Option<String>,
    /// How long new requests stay on the backup before trying the primary again.
    #[serde(with = "secs", rename = "failover_cooldown_secs")]
    pub failover_cooldown: Duration,
    /// Extra PEM roots trusted for the upstream, besides the bundled web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Lifetime of each admin UserSig the gateway issues.
    #[serde(with = "secs", rename = "usersig_ttl_secs")]
    pub usersig_ttl: Duration,
    /// Deadline for one caller request's whole upstream exchange, retries included.
    #[serde(with = "millis", rename = "request_timeout_ms")]
    pub request_timeout: Duration,
    /// How long one attempt of a read may wait for Chat's answer before it is given up
    /// and retried (within `request_timeout`); `None`: the whole remaining deadline. A
    /// write's attempt always has the whole remaining deadline: cutting it short would
    /// only turn answers Chat was about to give into unknown outcomes.
    #[serde(
        with = "opt_millis",
        rename = "attempt_timeout_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub attempt_timeout: Option<Duration>,
}

/// `[cache]` (fixed part)
#[derive(Debug, Clone, Serialize)]
pub struct CacheSettings {
    /// Capacity of the cache, in bytes, weighed at what entries really cost.
    pub max_bytes: u64,
    /// Pages one account may hold; past it the account's oldest page goes.
    pub max_pages_per_account: usize,
    /// The share of `max_bytes` (percent) for per-item entries; the rest holds
    /// get_list pages.
    pub items_percent: u8,
}

impl CacheSettings {
    /// Bytes for per-item entries (and their generation table).
    pub fn items_bytes(&self) -> u64 {
        self.max_bytes / 100 * u64::from(self.items_percent)
            + self.max_bytes % 100 * u64::from(self.items_percent) / 100
    }

    /// Bytes for get_list pages.
    pub fn pages_bytes(&self) -> u64 {
        self.max_bytes - self.items_bytes()
    }
}

/// `[cache.commands."service/command"]`, effective: one per row of
/// [`crate::chat::reads::READS`] (get_list's mirrors `cache.ttl_secs` and
/// `cache.stale_if_error_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CommandCache {
    /// The command.
    pub command: &'static str,
    /// Whether its answers are cached (otherwise it is forwarded like any command).
    pub enabled: bool,
    /// How long an entry is served as fresh.
    #[serde(with = "secs", rename = "ttl_secs")]
    pub ttl: Duration,
    /// How long after its TTL an entry may be served when Chat fails.
    #[serde(with = "secs", rename = "stale_if_error_secs")]
    pub stale_if_error: Duration,
}

/// Longest `ttl_secs` / `stale_if_error_secs` of a cached command (a day).
pub const MAX_COMMAND_SECS: u64 = 86_400;

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
    /// `[cache.commands."…"]`, indexed like [`crate::chat::reads::READS`].
    #[serde(rename = "cache_commands")]
    pub commands: Vec<CommandCache>,
    /// `cache.group_events`: what a group event drops of the conversation lists.
    #[serde(rename = "cache_group_events")]
    pub group_events: crate::chat::effects::GroupEventScope,
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
    /// Commands besides the built-in reads that are safe to retry like reads.
    pub idempotent_commands: std::collections::BTreeSet<String>,
    /// Retry throttling: every request adds this percentage of a retry token...
    pub budget_percent: u32,
    /// ...and this many tokens are added per second (every answered call adds half).
    pub budget_min_per_sec: u32,
}

/// `[log]`
#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    /// Text for people, JSON for log pipelines.
    pub format: LogFormat,
    /// A tracing-subscriber filter directive, e.g. `info` or `chat_gateway=debug`.
    pub level: String,
    /// One line per request on the `access` target, whatever `level` says.
    pub access: bool,
    /// The share of successful answers that get an access-log line (errors, 429s,
    /// stale and retried answers always do).
    pub access_sample: f64,
    /// The access log's format (`log.access_format`, else `log.format`).
    pub access_format: LogFormat,
    /// Where access-log lines go.
    pub access_output: AccessOutput,
    /// Bytes of access-log lines buffered at most before lines are dropped.
    pub access_buffer_bytes: usize,
}

/// `log.access_output`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessOutput {
    /// With the other log lines.
    Stderr,
    /// Standard output, apart from the other log lines.
    Stdout,
}

impl AccessOutput {
    /// The key's value.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessOutput::Stderr => "stderr",
            AccessOutput::Stdout => "stdout",
        }
    }
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

pub(crate) mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

mod opt_millis {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::invalid(key, "must be greater than 0"))
    } else {
        Ok(v)
    }
}

/// A positive number of milliseconds.
fn positive_ms(key: &str, v: u64) -> Result<Duration, ConfigError> {
    positive(key, v).map(Duration::from_millis)
}

/// Largest body any listener accepts.
const MAX_BODY_LIMIT: u64 = 64 * 1024 * 1024;

/// A body limit: 1 byte to 64 MiB.
fn body_limit(key: &str, v: u64) -> Result<usize, ConfigError> {
    match v {
        1..=MAX_BODY_LIMIT => Ok(v as usize),
        _ => Err(ConfigError::invalid(key, "must be 1 to 67108864 (64 MiB)")),
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
        let server = ServerSettings {
            listen,
            max_body_bytes: body_limit("server.max_body_bytes", s.max_body_bytes)?,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
            max_connections: positive("server.max_connections", s.max_connections)? as usize,
            header_read_timeout: positive_ms(
                "server.header_read_timeout_ms",
                s.header_read_timeout_ms,
            )?,
            body_read_timeout: positive_ms("server.body_read_timeout_ms", s.body_read_timeout_ms)?,
            max_invalidate_accounts: positive(
                "server.max_invalidate_accounts",
                s.max_invalidate_accounts,
            )? as usize,
            auth_tokens: match (s.auth_tokens.is_empty(), &s.auth_tokens_file) {
                (false, Some(_)) => {
                    return Err(ConfigError::invalid(
                        "server.auth_tokens",
                        "set either server.auth_tokens or server.auth_tokens_file, not both",
                    ))
                }
                (_, Some(path)) => secrets::read_tokens("server.auth_tokens_file", path)?,
                (_, None) => {
                    secrets::check_tokens("server.auth_tokens", &s.auth_tokens)?;
                    s.auth_tokens
                }
            },
            auth_tokens_file: s.auth_tokens_file,
            allow_unauthenticated: s.allow_unauthenticated,
            protect_metrics: s.protect_metrics,
            admin_listen: optional_addr("server.admin_listen", s.admin_listen.as_deref())?,
            callback_listen: optional_addr("server.callback_listen", s.callback_listen.as_deref())?,
        };
        if !server.listen.ip().is_loopback()
            && server.auth_tokens.is_empty()
            && !server.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                "server.listen",
                format!(
                    "{} is not a loopback address and server.auth_tokens is empty: anyone who can reach it could use the app's admin key. Set server.auth_tokens, or server.allow_unauthenticated = true if the network is trusted",
                    server.listen
                ),
            ));
        }

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
        validate_identifier(&identifier)
            .map_err(|why| ConfigError::invalid("chat.identifier", why))?;
        let secret_key = match (c.secret_key, &c.secret_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "chat.secret_key",
                    "set either chat.secret_key or chat.secret_key_file, not both",
                ))
            }
            (Some(k), None) if k.is_empty() => {
                return Err(ConfigError::invalid("chat.secret_key", "must not be empty"))
            }
            (Some(k), None) => k,
            (None, Some(path)) => secrets::read_secret("chat.secret_key_file", path)?,
            (None, None) => {
                return Err(ConfigError::invalid(
                    "chat.secret_key",
                    "is required (or chat.secret_key_file)",
                ))
            }
        };
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
        let backup_base_url = match (&c.backup_base_url, overridden) {
            (Some(u), _) => Some(validate_base_url("chat.backup_base_url", u)?),
            (None, false) => region.backup_domain().map(|d| format!("https://{d}")),
            // An overridden primary (emulator, proxy) has no implied backup.
            (None, true) => None,
        };
        let chat = ChatSettings {
            sdkappid,
            identifier,
            secret_key,
            secret_key_file: c.secret_key_file,
            region,
            base_url,
            base_url_overridden: overridden,
            backup_base_url_overridden: c.backup_base_url.is_some(),
            backup_base_url,
            failover_cooldown: Duration::from_secs(positive(
                "chat.failover_cooldown_secs",
                c.failover_cooldown_secs,
            )?),
            ca_file: c.ca_file,
            usersig_ttl: Duration::from_secs(usersig_ttl),
            request_timeout: positive_ms("chat.request_timeout_ms", c.request_timeout_ms)?,
            attempt_timeout: c
                .attempt_timeout_ms
                .map(|ms| positive_ms("chat.attempt_timeout_ms", ms))
                .transpose()?,
        };

        let cache = CacheSettings {
            max_bytes: positive("cache.max_bytes", raw.cache.max_bytes)?,
            max_pages_per_account: match raw.cache.max_pages_per_account {
                n @ 1..=4096 => n as usize,
                _ => {
                    return Err(ConfigError::invalid(
                        "cache.max_pages_per_account",
                        "must be 1 to 4096",
                    ))
                }
            },
            items_percent: match raw.cache.items_percent {
                n @ 1..=90 => n as u8,
                _ => {
                    return Err(ConfigError::invalid(
                        "cache.items_percent",
                        "must be 1 to 90 (percent of cache.max_bytes)",
                    ))
                }
            },
        };
        let cache_ttl = Duration::from_secs(positive("cache.ttl_secs", raw.cache.ttl_secs)?);
        let stale_if_error = Duration::from_secs(raw.cache.stale_if_error_secs);
        let commands = command_caches(&raw.cache.commands, cache_ttl, stale_if_error)?;
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
        let group_events = crate::chat::effects::GroupEventScope::from_name(
            &raw.cache.group_events,
        )
        .ok_or_else(|| {
            ConfigError::invalid(
                "cache.group_events",
                "must be \"all-pages\" or \"listing-accounts\"",
            )
        })?;
        let live = LiveSettings {
            cache_ttl,
            stale_if_error,
            commands,
            group_events,
            retry: RetrySettings {
                max_attempts: max_attempts as u32,
                base_delay: Duration::from_millis(r.base_delay_ms),
                max_delay: Duration::from_millis(r.max_delay_ms),
                idempotent_commands: validate_patterns(
                    "retry.idempotent_commands",
                    r.idempotent_commands,
                    false,
                )?
                .into_iter()
                .collect(),
                budget_percent: u32::try_from(r.budget_percent)
                    .ok()
                    .filter(|p| *p <= 1000)
                    .ok_or_else(|| {
                        ConfigError::invalid("retry.budget_percent", "must be 0 to 1000")
                    })?,
                budget_min_per_sec: u32::try_from(r.budget_min_per_sec)
                    .map_err(|_| ConfigError::invalid("retry.budget_min_per_sec", "too large"))?,
            },
        };
        let routes = RouteSettings {
            allow: validate_patterns("routes.allow", raw.routes.allow, true)?,
            deny: validate_patterns("routes.deny", raw.routes.deny, true)?,
        };
        let rl = raw.ratelimit;
        let rate = |key: &str, v: u64| -> Result<u32, ConfigError> {
            u32::try_from(v)
                .ok()
                .filter(|v| (1..=1_000_000).contains(v))
                .ok_or_else(|| ConfigError::invalid(key, "must be 1 to 1000000 calls per second"))
        };
        let mut commands = std::collections::BTreeMap::new();
        for (cmd, v) in rl.commands {
            let key = format!("ratelimit.commands.{cmd}");
            validate_patterns(&key, vec![cmd.clone()], false)?;
            commands.insert(cmd, rate(&key, v)?);
        }
        let ratelimit = RateLimitSettings {
            per_command_per_sec: rate("ratelimit.per_command_per_sec", rl.per_command_per_sec)?,
            commands,
            max_wait: Duration::from_millis(rl.max_wait_ms),
            burst_percent: u32::try_from(rl.burst_percent)
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| {
                    ConfigError::invalid("ratelimit.burst_percent", "must be 1 to 100")
                })?,
        };
        let log_format = |key: &str, v: &str| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ConfigError::invalid(
                key,
                format!("{other:?} is not one of: text, json"),
            )),
        };
        let format = log_format("log.format", &raw.log.format)?;
        let access_format = match &raw.log.access_format {
            Some(f) => log_format("log.access_format", f)?,
            None => format,
        };
        let access_output = match raw.log.access_output.as_str() {
            "stderr" => AccessOutput::Stderr,
            "stdout" => AccessOutput::Stdout,
            other => {
                return Err(ConfigError::invalid(
                    "log.access_output",
                    format!("{other:?} is not one of: stderr, stdout"),
                ))
            }
        };
        if !(0.0..=1.0).contains(&raw.log.access_sample) {
            return Err(ConfigError::invalid(
                "log.access_sample",
                "must be a number from 0.0 to 1.0",
            ));
        }
        let access_buffer_bytes = match raw.log.access_buffer_bytes {
            v @ 4096..=1_073_741_824 => v as usize,
            _ => {
                return Err(ConfigError::invalid(
                    "log.access_buffer_bytes",
                    "must be 4096 to 1073741824 (1 GiB)",
                ))
            }
        };
        validate_log_level(&raw.log.level).map_err(|why| ConfigError::invalid("log.level", why))?;
        let cb = raw.callback;
        let callback = CallbackSettings {
            token: match (cb.token, &cb.token_file) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        "callback.token",
                        "set either callback.token or callback.token_file, not both",
                    ))
                }
                (Some(t), None) if t.is_empty() => {
                    return Err(ConfigError::invalid(
                        "callback.token",
                        "must not be empty (leave it out to accept unsigned callbacks)",
                    ))
                }
                (Some(t), None) => Some(t),
                (None, Some(path)) => Some(secrets::read_secret("callback.token_file", path)?),
                (None, None) => None,
            },
            token_file: cb.token_file,
            max_body_bytes: body_limit("callback.max_body_bytes", cb.max_body_bytes)?,
            max_connections: positive("callback.max_connections", cb.max_connections)? as usize,
            header_read_timeout: positive_ms(
                "callback.header_read_timeout_ms",
                cb.header_read_timeout_ms,
            )?,
            body_read_timeout: positive_ms(
                "callback.body_read_timeout_ms",
                cb.body_read_timeout_ms,
            )?,
        };
        if let Some(addr) = server.callback_listen {
            if !addr.ip().is_loopback() && callback.token.is_none() {
                return Err(ConfigError::invalid(
                    "server.callback_listen",
                    format!(
                        "{addr} is not a loopback address and callback.token is not set: anyone who can reach it could invalidate the cache. Set callback.token (or callback.token_file) to the console's callback token"
                    ),
                ));
            }
        }
        Ok(Settings {
            server,
            chat,
            cache,
            live,
            log: LogSettings {
                format,
                level: raw.log.level,
                access: raw.log.access,
                access_sample: raw.log.access_sample,
                access_format,
                access_output,
                access_buffer_bytes,
            },
            callback,
            routes,
            ratelimit,
            redis: super::redis::from_raw(raw.redis)?,
            tracing: super::otel::from_raw(raw.tracing)?,
        })
    }

    /// The effective configuration as a TOML config file with the file's own keys,
    /// secrets redacted (for `check-config`): loading it gives these settings back,
    /// but for the redacted secrets.
    pub fn to_toml(&self) -> String {
        let raw = self.to_raw();
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render the settings: {e}\n"))
    }

    /// The settings as the file's keys. Secrets read from files are given by their
    /// `*_file` key; inline ones serialize as `<redacted>`.
    pub fn to_raw(&self) -> RawConfig {
        use super::raw::*;
        let s = &self.server;
        let c = &self.chat;
        let secs = |d: Duration| d.as_secs();
        let ms = |d: Duration| d.as_millis() as u64;
        RawConfig {
            server: RawServer {
                listen: s.listen.to_string(),
                max_body_bytes: s.max_body_bytes as u64,
                shutdown_grace_secs: secs(s.shutdown_grace),
                max_connections: s.max_connections as u64,
                header_read_timeout_ms: ms(s.header_read_timeout),
                body_read_timeout_ms: ms(s.body_read_timeout),
                max_invalidate_accounts: s.max_invalidate_accounts as u64,
                auth_tokens: if s.auth_tokens_file.is_some() {
                    Vec::new()
                } else {
                    s.auth_tokens.clone()
                },
                auth_tokens_file: s.auth_tokens_file.clone(),
                allow_unauthenticated: s.allow_unauthenticated,
                protect_metrics: s.protect_metrics,
                admin_listen: s.admin_listen.map(|a| a.to_string()),
                callback_listen: s.callback_listen.map(|a| a.to_string()),
            },
            chat: RawChat {
                sdkappid: Some(c.sdkappid),
                identifier: Some(c.identifier.clone()),
                secret_key: c.secret_key_file.is_none().then(|| c.secret_key.clone()),
                secret_key_file: c.secret_key_file.clone(),
                region: Some(c.region.as_str().to_string()),
                base_url: c.base_url_overridden.then(|| c.base_url.clone()),
                ca_file: c.ca_file.clone(),
                usersig_ttl_secs: secs(c.usersig_ttl),
                request_timeout_ms: ms(c.request_timeout),
                attempt_timeout_ms: c.attempt_timeout.map(ms),
                backup_base_url: c
                    .backup_base_url
                    .clone()
                    .filter(|_| c.backup_base_url_overridden),
                failover_cooldown_secs: secs(c.failover_cooldown),
            },
            cache: RawCache {
                ttl_secs: secs(self.live.cache_ttl),
                max_bytes: self.cache.max_bytes,
                stale_if_error_secs: secs(self.live.stale_if_error),
                max_pages_per_account: self.cache.max_pages_per_account as u64,
                items_percent: u64::from(self.cache.items_percent),
                group_events: self.live.group_events.as_str().to_string(),
                commands: self
                    .live
                    .commands
                    .iter()
                    .zip(crate::chat::reads::READS)
                    .filter(|(_, row)| row.store == crate::chat::reads::Store::Items)
                    .map(|(c, _)| {
                        (
                            c.command.to_string(),
                            RawCommandCache {
                                enabled: Some(c.enabled),
                                ttl_secs: Some(secs(c.ttl)),
                                stale_if_error_secs: Some(secs(c.stale_if_error)),
                            },
                        )
                    })
                    .collect(),
            },
            retry: {
                let r = &self.live.retry;
                RawRetry {
                    max_attempts: u64::from(r.max_attempts),
                    base_delay_ms: ms(r.base_delay),
                    max_delay_ms: ms(r.max_delay),
                    idempotent_commands: r.idempotent_commands.iter().cloned().collect(),
                    budget_percent: u64::from(r.budget_percent),
                    budget_min_per_sec: u64::from(r.budget_min_per_sec),
                }
            },
            log: RawLog {
                format: match self.log.format {
                    LogFormat::Text => "text".into(),
                    LogFormat::Json => "json".into(),
                },
                level: self.log.level.clone(),
                access: self.log.access,
                access_sample: self.log.access_sample,
                access_format: (self.log.access_format != self.log.format).then(|| {
                    match self.log.access_format {
                        LogFormat::Text => "text".into(),
                        LogFormat::Json => "json".into(),
                    }
                }),
                access_output: self.log.access_output.as_str().into(),
                access_buffer_bytes: self.log.access_buffer_bytes as u64,
            },
            callback: {
                let cb = &self.callback;
                RawCallback {
                    token: if cb.token_file.is_some() {
                        None
                    } else {
                        cb.token.clone()
                    },
                    token_file: cb.token_file.clone(),
                    max_body_bytes: cb.max_body_bytes as u64,
                    max_connections: cb.max_connections as u64,
                    header_read_timeout_ms: ms(cb.header_read_timeout),
                    body_read_timeout_ms: ms(cb.body_read_timeout),
                }
            },
            routes: RawRoutes {
                allow: self.routes.allow.clone(),
                deny: self.routes.deny.clone(),
            },
            ratelimit: RawRateLimit {
                per_command_per_sec: u64::from(self.ratelimit.per_command_per_sec),
                max_wait_ms: ms(self.ratelimit.max_wait),
                burst_percent: u64::from(self.ratelimit.burst_percent),
                commands: self
                    .ratelimit
                    .commands
                    .iter()
                    .map(|(k, v)| (k.clone(), u64::from(*v)))
                    .collect(),
            },
            redis: match &self.redis {
                Some(r) => RawRedis {
                    url: Some(Secret::new(r.url.redacted())),
                    key_prefix: r.key_prefix.clone(),
                    timeout_ms: ms(r.timeout),
                    l2_cache: r.l2_cache,
                    ca_file: r.ca_file.clone(),
                    lease_ms: ms(r.lease),
                    latency_allowance_ms: ms(r.latency_allowance),
                    expected_gateways: u64::from(r.expected_gateways),
                    mode: r.mode.as_str().to_string(),
                    urls: r.urls.iter().map(|u| Secret::new(u.redacted())).collect(),
                    sentinels: r
                        .sentinels
                        .iter()
                        .map(|u| Secret::new(u.redacted()))
                        .collect(),
                    master_name: r.master_name.clone(),
                },
                None => RawRedis::default(),
            },
            tracing: super::otel::to_raw(self.tracing.as_ref()),
        }
    }
}

/// The effective settings of every cached read: each row's defaults, overridden by
/// its `[cache.commands."…"]` table. get_list is set by `cache.ttl_secs` and
/// `cache.stale_if_error_secs` (one home for each value), so a table for it is
/// refused, as is one for a command that is not cached.
fn command_caches(
    raw: &std::collections::BTreeMap<String, super::raw::RawCommandCache>,
    cache_ttl: Duration,
    stale_if_error: Duration,
) -> Result<Vec<CommandCache>, ConfigError> {
    use crate::chat::reads::{self, Store, NEVER_CACHED, READS};
    for (command, _) in raw.iter() {
        let key = format!("cache.commands.\"{command}\"");
        if let Some((_, why)) = NEVER_CACHED.iter().find(|(c, _)| c == command) {
            return Err(ConfigError::invalid(
                &key,
                format!("is never cached: {why}"),
            ));
        }
        match reads::row(command) {
            None => {
                let cached: Vec<&str> = READS
                    .iter()
                    .filter(|r| r.store == Store::Items)
                    .map(|r| r.command)
                    .collect();
                return Err(ConfigError::invalid(
                    &key,
                    format!(
                        "is not a cached command; cached commands: {}",
                        cached.join(", ")
                    ),
                ));
            }
            Some((_, r)) if r.store == Store::Pages => {
                return Err(ConfigError::invalid(
                    &key,
                    "get_list is set by cache.ttl_secs and cache.stale_if_error_secs",
                ))
            }
            Some(_) => {}
        }
    }
    let mut out = Vec::with_capacity(READS.len());
    for row in READS {
        if row.store == Store::Pages {
            out.push(CommandCache {
                command: row.command,
                enabled: true,
                ttl: cache_ttl,
                stale_if_error,
            });
            continue;
        }
        let key = format!("cache.commands.\"{}\"", row.command);
        let set = raw.get(row.command).cloned().unwrap_or_default();
        let ttl = set.ttl_secs.unwrap_or(row.ttl_secs);
        if !(1..=MAX_COMMAND_SECS).contains(&ttl) {
            return Err(ConfigError::invalid(
                &format!("{key}.ttl_secs"),
                format!("must be 1 to {MAX_COMMAND_SECS}"),
            ));
        }
        let stale = set.stale_if_error_secs.unwrap_or(row.stale_if_error_secs);
        if stale > MAX_COMMAND_SECS {
            return Err(ConfigError::invalid(
                &format!("{key}.stale_if_error_secs"),
                format!("must be 0 to {MAX_COMMAND_SECS}"),
            ));
        }
        out.push(CommandCache {
            command: row.command,
            enabled: set.enabled.unwrap_or(true),
            ttl: Duration::from_secs(ttl),
            stale_if_error: Duration::from_secs(stale),
        });
    }
    Ok(out)
}

/// An optional `ip:port` key.
fn optional_addr(key: &str, v: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    v.map(|a| {
        a.parse().map_err(|_| {
            ConfigError::invalid(key, format!("{a:?} is not an address like 0.0.0.0:9901"))
        })
    })
    .transpose()
}

/// Checks an admin identifier (Chat's UserID rules): 1 to 32 bytes, no spaces or
/// control characters.
pub fn validate_identifier(identifier: &str) -> Result<(), String> {
    if identifier.is_empty()
        || identifier.len() > 32
        || identifier
            .chars()
            .any(|ch| ch.is_control() || ch.is_whitespace())
    {
        return Err(format!(
            "{identifier:?} must be 1 to 32 bytes with no spaces or control characters"
        ));
    }
    Ok(())
}

/// Log levels a `log.level` directive may end in.
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks `log.level`: comma-separated directives, each a level (`info`) or
/// `target=level` (`chat_gateway=debug`, `hyper=warn`), as tracing's `EnvFilter`
/// reads them. A bare word that is not a level (`verbose`) would be read as a target
/// name and silence everything else, so it is refused.
pub fn validate_log_level(level: &str) -> Result<(), String> {
    let shape = format!(
        "{level:?} is not a level ({}) or comma-separated target=level directives",
        LEVELS.join(", ")
    );
    if level.trim().is_empty() {
        return Err(shape);
    }
    for d in level.split(',').map(str::trim) {
        let lvl = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(shape);
        }
    }
    tracing_subscriber::EnvFilter::try_new(level).map_err(|_| shape)?;
    Ok(())
}

/// Checks command names (`service/command`) or, with `wildcards`, patterns
/// (`service/*`, `*`).
fn validate_patterns(
    key: &str,
    list: Vec<String>,
    wildcards: bool,
) -> Result<Vec<String>, ConfigError> {
    for p in &list {
        let ok = (wildcards && p == "*")
            || p.split_once('/').is_some_and(|(svc, cmd)| {
                let plain = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                };
                plain(svc) && (plain(cmd) || (wildcards && cmd == "*"))
            });
        if !ok {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{p:?} is not a command like \"openim/sendmsg\"{}",
                    if wildcards {
                        " or a pattern like \"openim/*\" or \"*\""
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(list)
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
