//! The emulator's settings: what the CLI flags become, their defaults, and the checks
//! that run before anything is bound or generated.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::cli::EmulatorArgs;

/// General (not pinned) conversations per `get_list` page by default.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Pinned conversations per `get_list` page by default.
pub const DEFAULT_TOP_PAGE_SIZE: usize = 20;
/// The most accounts a world may have (such a world takes about 0.9 GB of memory).
pub const MAX_ACCOUNTS: u32 = 200_000;

/// Fault injection, as set by the CLI flags and changed at run time through
/// `POST /__emulator/faults`. Applies only to `/v4` calls.
#[derive(Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaultSettings {
    /// Share of calls answered `50004` (internal error) instead of running the
    /// command, 0.0 to 1.0: exercises a client's retry of transient failures.
    pub fail_50004: f64,
    /// Share of calls answered `50005` (timeout) instead of running the command,
    /// 0.0 to 1.0; `fail_50004 + fail_50005` is at most 1.
    pub fail_50005: f64,
    /// Share of calls whose connection is closed without an answer *after* the
    /// command ran, 0.0 to 1.0: the worst case a client must handle for writes.
    pub drop_rate: f64,
    /// Fixed delay added before every call is handled, milliseconds: models the
    /// round trip to a far region.
    pub latency_ms: u64,
    /// Uniform random extra delay, 0 to this many milliseconds: models jitter.
    pub jitter_ms: u64,
    /// Calls per second per command before `60007` (Chat documents 200 for every
    /// recentcontact command); 0 disables the limit.
    pub rate_limit: u32,
}

impl Default for FaultSettings {
    fn default() -> Self {
        FaultSettings {
            fail_50004: 0.0,
            fail_50005: 0.0,
            drop_rate: 0.0,
            latency_ms: 0,
            jitter_ms: 0,
            rate_limit: 200,
        }
    }
}

impl fmt::Debug for FaultSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultSettings")
            .field("fail_50004", &self.fail_50004)
            .field("fail_50005", &self.fail_50005)
            .field("drop_rate", &self.drop_rate)
            .field("latency_ms", &self.latency_ms)
            .field("jitter_ms", &self.jitter_ms)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

impl FaultSettings {
    /// Checks that every rate is a probability and the two failure rates together
    /// are at most 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("fail_50004", self.fail_50004),
            ("fail_50005", self.fail_50005),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be between 0.0 and 1.0, got {v}"));
            }
        }
        if self.fail_50004 + self.fail_50005 > 1.0 + 1e-9 {
            return Err("fail_50004 + fail_50005 must be at most 1.0".into());
        }
        if self.latency_ms > 600_000 || self.jitter_ms > 600_000 {
            return Err("latency_ms and jitter_ms must be at most 600000 (10 minutes)".into());
        }
        Ok(())
    }
}

/// Everything the emulator needs to start. Build it with [`EmulatorConfig::from_args`]
/// or start from [`Default`] and change fields.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Where [`spawn`](super::spawn) binds (plain HTTP; meant for loopback). The
    /// default `127.0.0.1:0` picks a free port, which is what tests want.
    pub listen: SocketAddr,
    /// The one SDKAppID the emulator hosts; any other in the URL gets `60006`.
    pub sdkappid: u64,
    /// The app admin: the only identifier allowed to call (others get `60010`).
    pub identifier: String,
    /// The app's secret key, UserSigs are verified with it. Redacted in `Debug`.
    pub secret_key: String,
    /// Number of synthetic accounts `user_0001`...; the world's size.
    pub accounts: u32,
    /// Seed of the synthetic world: the same seed gives the same world, byte for byte.
    pub seed: u64,
    /// Fault injection at start; changeable at run time.
    pub faults: FaultSettings,
    /// Where to POST Chat webhooks after a change (plain `http://` only); changeable
    /// at run time through `POST /__emulator/callback`.
    pub callback_url: Option<String>,
    /// Token for the webhooks' `Sign`; without it webhooks are unsigned. Redacted in
    /// `Debug`.
    pub callback_token: Option<String>,
    /// General conversations per `get_list` page, so clients see several pages.
    pub page_size: usize,
    /// Pinned conversations per `get_list` page (paged by their own cursor).
    pub top_page_size: usize,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            sdkappid: 1_400_000_000,
            identifier: "administrator".into(),
            secret_key: "emulator-secret-key".into(),
            accounts: 1000,
            seed: 1,
            faults: FaultSettings::default(),
            callback_url: None,
            callback_token: None,
            page_size: DEFAULT_PAGE_SIZE,
            top_page_size: DEFAULT_TOP_PAGE_SIZE,
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("EmulatorConfig")
            .field("listen", &self.listen)
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field("secret_key", &"<redacted>")
            .field("accounts", &self.accounts)
            .field("seed", &self.seed)
            .field("faults", &self.faults)
            .field("callback_url", &self.callback_url)
            .field("callback_token", &redact(&self.callback_token))
            .field("page_size", &self.page_size)
            .field("top_page_size", &self.top_page_size)
            .finish()
    }
}

impl EmulatorConfig {
    /// The configuration the `chat-gateway emulator` flags describe.
    pub fn from_args(args: &EmulatorArgs) -> EmulatorConfig {
        EmulatorConfig {
            listen: args.listen,
            sdkappid: args.sdkappid,
            identifier: args.identifier.clone(),
            secret_key: args.secret_key.clone(),
            accounts: args.accounts,
            seed: args.seed,
            faults: FaultSettings {
                fail_50004: args.fail_50004,
                fail_50005: args.fail_50005,
                drop_rate: args.drop_rate,
                latency_ms: args.latency_ms,
                jitter_ms: args.jitter_ms,
                rate_limit: args.rate_limit,
            },
            callback_url: args.callback_url.clone().filter(|s| !s.is_empty()),
            callback_token: args.callback_token.clone().filter(|s| !s.is_empty()),
            ..EmulatorConfig::default()
        }
    }

    /// Checks the settings; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.accounts == 0 || self.accounts > MAX_ACCOUNTS {
            return Err(format!(
                "accounts must be between 1 and {MAX_ACCOUNTS}, got {}",
                self.accounts
            ));
        }
        if self.identifier.is_empty() {
            return Err("identifier must not be empty".into());
        }
        if self.secret_key.is_empty() {
            return Err("secret_key must not be empty".into());
        }
        if self.page_size == 0 || self.page_size > 10_000 {
            return Err("page_size must be between 1 and 10000".into());
        }
        if self.top_page_size == 0 || self.top_page_size > 10_000 {
            return Err("top_page_size must be between 1 and 10000".into());
        }
        self.faults.validate()?;
        if let Some(url) = &self.callback_url {
            super::webhooks::parse_callback_url(url)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let cfg = EmulatorConfig {
            callback_token: Some("tok-123".into()),
            ..EmulatorConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("emulator-secret-key"), "{s}");
        assert!(!s.contains("tok-123"), "{s}");
        assert!(s.contains("<redacted>"));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cfg = EmulatorConfig::default();
        assert_eq!(cfg.sdkappid, 1_400_000_000);
        assert_eq!(cfg.identifier, "administrator");
        assert_eq!(cfg.accounts, 1000);
        assert_eq!(cfg.seed, 1);
        assert_eq!(cfg.faults.rate_limit, 200);
        assert_eq!(cfg.faults.fail_50004, 0.0);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn validation_rejects_bad_rates_and_urls() {
        let mut cfg = EmulatorConfig::default();
        cfg.faults.fail_50004 = 0.7;
        cfg.faults.fail_50005 = 0.7;
        assert!(cfg.validate().is_err());
        let mut cfg = EmulatorConfig::default();
        cfg.faults.drop_rate = -0.1;
        assert!(cfg.validate().is_err());
        let cfg = EmulatorConfig {
            callback_url: Some("https://example.com/x".into()),
            ..EmulatorConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = EmulatorConfig {
            accounts: 0,
            ..EmulatorConfig::default()
        };
        assert!(cfg.validate().is_err());
    }
}
