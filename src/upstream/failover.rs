//! Failover between the region's primary and backup domains: a connection-level failure
//! (DNS, connect, TLS) on the primary moves new requests to the backup; after
//! `chat.failover_cooldown_secs` they go to the primary again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::counter;

use crate::metrics::names;

/// Which endpoint a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The region's domain (or `chat.base_url`).
    Primary,
    /// The backup domain (or `chat.backup_base_url`).
    Backup,
}

impl Endpoint {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Primary => "primary",
            Endpoint::Backup => "backup",
        }
    }
}

/// The two base URLs and which one is in use.
#[derive(Debug)]
pub struct Failover {
    /// Base URL of the primary.
    primary: String,
    /// Base URL of the backup, if the region has one.
    backup: Option<String>,
    /// How long to stay on the backup.
    cooldown: Duration,
    /// When we moved to the backup (None: on the primary).
    since: Mutex<Option<Instant>>,
}

impl Failover {
    /// A failover pair.
    pub fn new(primary: String, backup: Option<String>, cooldown: Duration) -> Self {
        Failover {
            primary,
            backup,
            cooldown,
            since: Mutex::new(None),
        }
    }

    /// The endpoint new requests use, and its base URL.
    pub fn current(&self) -> (Endpoint, &str) {
        let Some(backup) = &self.backup else {
            return (Endpoint::Primary, &self.primary);
        };
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match *since {
            Some(t) if t.elapsed() < self.cooldown => (Endpoint::Backup, backup),
            Some(_) => {
                *since = None;
                tracing::info!(
                    "failover cooldown over; new requests go to the primary Chat domain again"
                );
                counter!(names::FAILOVERS, "to" => "primary").increment(1);
                (Endpoint::Primary, &self.primary)
            }
            None => (Endpoint::Primary, &self.primary),
        }
    }

    /// A connection-level failure on `endpoint`: move to the backup if it was the
    /// primary. Returns whether a failover happened.
    pub fn connection_failed(&self, endpoint: Endpoint) -> bool {
        if endpoint != Endpoint::Primary || self.backup.is_none() {
            return false;
        }
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_some() {
            return false;
        }
        *since = Some(Instant::now());
        tracing::warn!(
            cooldown_secs = self.cooldown.as_secs(),
            "cannot connect to the primary Chat domain; failing over to the backup domain"
        );
        counter!(names::FAILOVERS, "to" => "backup").increment(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_over_and_comes_back() {
        let f = Failover::new("p".into(), Some("b".into()), Duration::from_millis(30));
        assert_eq!(f.current(), (Endpoint::Primary, "p"));
        assert!(!f.connection_failed(Endpoint::Backup));
        assert!(f.connection_failed(Endpoint::Primary));
        assert_eq!(f.current(), (Endpoint::Backup, "b"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(f.current(), (Endpoint::Primary, "p"));
        let none = Failover::new("p".into(), None, Duration::from_secs(1));
        assert!(!none.connection_failed(Endpoint::Primary));
    }
}
