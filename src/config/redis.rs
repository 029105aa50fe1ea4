//! `[redis]`: the fleet's settings, and the Redis URL whose password is a secret.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::RawRedis;
use super::{ConfigError, Secret};

/// `[redis]`, present when `redis.url` is set.
#[derive(Debug, Clone, Serialize)]
pub struct RedisSettings {
    /// Where Redis is; the password is redacted wherever this is printed.
    pub url: RedisUrl,
    /// Gateways sharing `url`, `key_prefix` and `chat.sdkappid` form one fleet.
    pub key_prefix: String,
    /// The longest any request waits on Redis.
    #[serde(with = "super::settings::millis", rename = "timeout_ms")]
    pub timeout: Duration,
    /// Whether pages are kept in Redis as well as in memory.
    pub l2_cache: bool,
    /// Extra PEM roots trusted for `rediss://`, besides the bundled web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// How long a leased rate-limit permit stays usable.
    #[serde(with = "super::settings::millis", rename = "lease_ms")]
    pub lease: Duration,
    /// The spread of the latency between the gateway and Chat that the fleet's
    /// window budgets for.
    #[serde(with = "super::settings::millis", rename = "latency_allowance_ms")]
    pub latency_allowance: Duration,
    /// How many gateways the fleet has, as far as the operator knows: the local share
    /// of the rate limit is N divided by this (or by the live gateways last seen, if
    /// more) while Redis is unusable.
    pub expected_gateways: u32,
    /// Which kind of Redis deployment `url` (and `urls`, `sentinels`) name.
    pub mode: RedisMode,
    /// More cluster seed nodes, besides `url` (`mode = "cluster"`).
    pub urls: Vec<RedisUrl>,
    /// The sentinels (`mode = "sentinel"`).
    pub sentinels: Vec<RedisUrl>,
    /// The name the sentinels know the primary by (`mode = "sentinel"`).
    pub master_name: Option<String>,
}

/// `redis.mode`: what kind of Redis deployment the fleet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedisMode {
    /// One endpoint (`redis.url`): a server, a proxy, or a managed primary endpoint.
    #[default]
    Standalone,
    /// A Redis Cluster: `redis.url` (and `redis.urls`) are seed nodes, the topology is
    /// discovered and followed.
    Cluster,
    /// A primary managed by Sentinel: `redis.sentinels` name it by
    /// `redis.master_name`; `redis.url` gives the primary's credentials, TLS and
    /// database.
    Sentinel,
}

impl RedisMode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }

    fn parse(s: &str) -> Option<RedisMode> {
        match s.trim() {
            "" | "standalone" => Some(RedisMode::Standalone),
            "cluster" => Some(RedisMode::Cluster),
            "sentinel" => Some(RedisMode::Sentinel),
            _ => None,
        }
    }
}

impl Serialize for RedisMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A parsed `redis://` or `rediss://` URL. `Debug`, `Display` and `Serialize` show it
/// with the password replaced by `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `rediss://`: TLS.
    pub tls: bool,
    /// Host name or IP address.
    pub host: String,
    /// Port (6379 unless given).
    pub port: u16,
    /// Database number (the URL's path, 0 unless given).
    pub db: i64,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
}

impl RedisUrl {
    /// Parses a URL; errors never contain the password.
    pub fn parse(key: &str, s: &str) -> Result<RedisUrl, ConfigError> {
        let bad = |why: &str| ConfigError::invalid(key, why.to_string());
        let u = url::Url::parse(s.trim())
            .map_err(|e| bad(&format!("not a URL like redis://host:6379/0 ({e})")))?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            _ => return Err(bad("must start with redis:// or rediss://")),
        };
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err(bad("has no host")),
        };
        let port = u.port().unwrap_or(6379);
        let db = match u.path().trim_start_matches('/') {
            "" => 0,
            p => p
                .parse::<i64>()
                .ok()
                .filter(|d| (0..=1_000_000).contains(d))
                .ok_or_else(|| bad("the path must be a database number, e.g. /0"))?,
        };
        if u.query().is_some() || u.fragment().is_some() {
            return Err(bad("must have no query or fragment"));
        }
        let decode = |v: &str| -> Result<String, ConfigError> {
            percent_decode(v)
                .ok_or_else(|| bad("the user or password is not valid percent-encoding"))
        };
        let username = match u.username() {
            "" => None,
            n => Some(decode(n)?),
        };
        let password = match u.password() {
            None | Some("") => None,
            Some(p) => Some(Secret::new(decode(p)?)),
        };
        Ok(RedisUrl {
            tls,
            host,
            port,
            db,
            username,
            password,
        })
    }

    /// The URL with the password replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:<redacted>@"),
            (None, Some(_)) => ":<redacted>@".to_string(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Validates `[redis]`; `None` when no URL is set (the gateway runs alone).
pub fn from_raw(r: RawRedis) -> Result<Option<RedisSettings>, ConfigError> {
    let Some(url) = r.url.filter(|u| !u.expose().trim().is_empty()) else {
        return Ok(None);
    };
    let url = RedisUrl::parse("redis.url", url.expose())?;
    let prefix = r.key_prefix;
    if prefix.is_empty()
        || prefix.len() > 64
        || prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}'))
    {
        return Err(ConfigError::invalid(
            "redis.key_prefix",
            "must be 1 to 64 characters with no spaces, control characters or braces",
        ));
    }
    if !(1..=10_000).contains(&r.timeout_ms) {
        return Err(ConfigError::invalid(
            "redis.timeout_ms",
            "must be 1 to 10000 milliseconds",
        ));
    }
    if !(5..=1000).contains(&r.lease_ms) {
        return Err(ConfigError::invalid(
            "redis.lease_ms",
            "must be 5 to 1000 milliseconds",
        ));
    }
    if r.latency_allowance_ms > 1000 {
        return Err(ConfigError::invalid(
            "redis.latency_allowance_ms",
            "must be 0 to 1000 milliseconds",
        ));
    }
    let expected_gateways = u32::try_from(r.expected_gateways)
        .ok()
        .filter(|g| (1..=10_000).contains(g))
        .ok_or_else(|| ConfigError::invalid("redis.expected_gateways", "must be 1 to 10000"))?;
    let mode = RedisMode::parse(&r.mode).ok_or_else(|| {
        ConfigError::invalid(
            "redis.mode",
            "must be \"standalone\", \"cluster\" or \"sentinel\"",
        )
    })?;
    let parse_all = |key: &str, list: &[Secret]| -> Result<Vec<RedisUrl>, ConfigError> {
        list.iter()
            .filter(|u| !u.expose().trim().is_empty())
            .map(|u| RedisUrl::parse(key, u.expose()))
            .collect()
    };
    let urls = parse_all("redis.urls", &r.urls)?;
    let sentinels = parse_all("redis.sentinels", &r.sentinels)?;
    let master_name = r
        .master_name
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty());
    let only_for = |key: &str, mode: &str| {
        ConfigError::invalid(key, format!("is only used with redis.mode = \"{mode}\""))
    };
    match mode {
        RedisMode::Standalone => {
            if !urls.is_empty() {
                return Err(only_for("redis.urls", "cluster"));
            }
        }
        RedisMode::Cluster => {
            if url.db != 0 {
                return Err(ConfigError::invalid(
                    "redis.url",
                    "a Redis Cluster has database 0 only (the path must be /0 or empty)",
                ));
            }
            // One client for every node: the same scheme and credentials.
            for u in &urls {
                if u.tls != url.tls || u.username != url.username || u.password != url.password {
                    return Err(ConfigError::invalid(
                        "redis.urls",
                        "every seed node needs the same scheme, user and password as redis.url",
                    ));
                }
                if u.db != 0 {
                    return Err(ConfigError::invalid(
                        "redis.urls",
                        "a Redis Cluster has database 0 only (the path must be /0 or empty)",
                    ));
                }
            }
        }
        RedisMode::Sentinel => {
            if !urls.is_empty() {
                return Err(only_for("redis.urls", "cluster"));
            }
            let Some(first) = sentinels.first() else {
                return Err(ConfigError::invalid(
                    "redis.sentinels",
                    "must list at least one sentinel (redis://host:26379) with redis.mode = \"sentinel\"",
                ));
            };
            if sentinels.iter().any(|s| {
                s.tls != first.tls || s.username != first.username || s.password != first.password
            }) {
                return Err(ConfigError::invalid(
                    "redis.sentinels",
                    "every sentinel needs the same scheme, user and password",
                ));
            }
            if master_name.is_none() {
                return Err(ConfigError::invalid(
                    "redis.master_name",
                    "must be set with redis.mode = \"sentinel\" (the name the sentinels monitor)",
                ));
            }
        }
    }
    if mode != RedisMode::Sentinel {
        if !sentinels.is_empty() {
            return Err(only_for("redis.sentinels", "sentinel"));
        }
        if master_name.is_some() {
            return Err(only_for("redis.master_name", "sentinel"));
        }
    }
    let any_tls = url.tls || sentinels.iter().any(|s| s.tls);
    if let Some(ca) = &r.ca_file {
        if !ca.is_file() {
            return Err(ConfigError::invalid(
                "redis.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        if !any_tls {
            return Err(ConfigError::invalid(
                "redis.ca_file",
                "is only used with a rediss:// URL",
            ));
        }
    }
    Ok(Some(RedisSettings {
        url,
        key_prefix: prefix,
        timeout: Duration::from_millis(r.timeout_ms),
        l2_cache: r.l2_cache,
        ca_file: r.ca_file,
        lease: Duration::from_millis(r.lease_ms),
        latency_allowance: Duration::from_millis(r.latency_allowance_ms),
        expected_gateways,
        mode,
        urls,
        sentinels,
        master_name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let u =
            RedisUrl::parse("redis.url", "rediss://app:s3cr%40t@redis.internal:6380/2").unwrap();
        assert!(u.tls);
        assert_eq!(u.host, "redis.internal");
        assert_eq!(u.port, 6380);
        assert_eq!(u.db, 2);
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_ref().unwrap().expose(), "s3cr@t");
        let shown = format!("{u} {u:?} {}", serde_json::to_string(&u).unwrap());
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(shown.contains("rediss://app:<redacted>@redis.internal:6380/2"));
        let bare = RedisUrl::parse("redis.url", "redis://127.0.0.1").unwrap();
        assert_eq!(bare.redacted(), "redis://127.0.0.1:6379/0");
        let e = RedisUrl::parse("redis.url", "http://:pw@x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.url") && !e.contains("pw"), "{e}");
    }

    fn raw(mode: &str, url: &str) -> RawRedis {
        RawRedis {
            url: Some(Secret::new(url)),
            mode: mode.into(),
            ..RawRedis::default()
        }
    }

    fn refused(r: RawRedis, key: &str) {
        let e = from_raw(r).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn each_mode_takes_its_own_keys() {
        let s = from_raw(raw("", "redis://h/1")).unwrap().unwrap();
        assert_eq!(s.mode, RedisMode::Standalone);
        refused(raw("replicated", "redis://h"), "redis.mode");

        let mut c = raw("cluster", "rediss://:s3cret@n1:7000");
        c.urls = vec![Secret::new("rediss://:s3cret@n2:7000"), Secret::new("")];
        let s = from_raw(c).unwrap().unwrap();
        assert_eq!((s.mode, s.urls.len()), (RedisMode::Cluster, 1));
        let shown = serde_json::to_string(&s).unwrap();
        assert!(shown.contains("\"mode\":\"cluster\"") && !shown.contains("s3cret"));
        refused(raw("cluster", "redis://n1:7000/2"), "redis.url");
        let mut c = raw("cluster", "rediss://:s3cret@n1:7000");
        c.urls = vec![Secret::new("redis://:s3cret@n2:7000")];
        refused(c, "redis.urls");
        let mut c = raw("standalone", "redis://n1");
        c.urls = vec![Secret::new("redis://n2")];
        refused(c, "redis.urls");

        let mut t = raw("sentinel", "rediss://:s3cret@mymaster/3");
        t.sentinels = vec![
            Secret::new("redis://:s3cret@s1:26379"),
            Secret::new("redis://:s3cret@s2:26379"),
        ];
        t.master_name = Some(" mymaster ".into());
        let s = from_raw(t).unwrap().unwrap();
        assert_eq!(s.master_name.as_deref(), Some("mymaster"));
        assert_eq!(s.sentinels.len(), 2);
        refused(raw("sentinel", "redis://x"), "redis.sentinels");
        let mut t = raw("sentinel", "redis://x");
        t.sentinels = vec![Secret::new("redis://s1:26379")];
        refused(t, "redis.master_name");
        let mut t = raw("cluster", "redis://x");
        t.master_name = Some("m".into());
        refused(t, "redis.master_name");
    }
}
