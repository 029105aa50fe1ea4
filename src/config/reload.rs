//! Live reload: the config file is watched (and re-read on SIGHUP); a valid edit
//! replaces the reloadable [`LiveSettings`] at once, an invalid one is logged and
//! ignored, and edits to keys that need a restart are reported as such.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::counter;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{LiveSettings, Settings};
use crate::metrics::names;

/// Editors write a file in several steps; events closer than this are one reload.
const SETTLE: Duration = Duration::from_millis(30);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// New live values are in force; the strings name what changed.
    Applied(Vec<String>),
    /// The file is valid and the live values did not change.
    Unchanged,
    /// The file is invalid; the old values stay.
    Rejected(String),
}

impl Outcome {
    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Applied(_) => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Rejected(_) => "rejected",
        }
    }
}

/// Re-reads the config and swaps in its live part.
#[derive(Debug)]
pub struct Reloader {
    /// The file (None: env only).
    path: Option<PathBuf>,
    /// The settings the process started with (for "needs a restart").
    started: Arc<Settings>,
    /// Where handlers read live settings from.
    live: Arc<ArcSwap<LiveSettings>>,
}

impl Reloader {
    /// A reloader for `path`.
    pub fn new(
        path: Option<PathBuf>,
        started: Arc<Settings>,
        live: Arc<ArcSwap<LiveSettings>>,
    ) -> Self {
        Reloader {
            path,
            started,
            live,
        }
    }

    /// Reloads once, logging and counting the outcome.
    pub fn reload(&self) -> Outcome {
        let outcome = match super::load(self.path.as_deref()) {
            Err(e) => Outcome::Rejected(e.to_string()),
            Ok(new) => {
                let old = self.live.load_full();
                for key in restart_only_changes(&self.started, &new) {
                    tracing::warn!(
                        key,
                        "config key changed in the file; it takes effect only after a restart"
                    );
                }
                let changed = live_changes(&old, &new.live);
                if changed.is_empty() {
                    Outcome::Unchanged
                } else {
                    self.live.store(Arc::new(new.live));
                    Outcome::Applied(changed)
                }
            }
        };
        match &outcome {
            Outcome::Applied(changes) => {
                tracing::info!(changes = %changes.join(", "), "config reloaded")
            }
            Outcome::Unchanged => tracing::info!("config re-read; no live setting changed"),
            Outcome::Rejected(e) => {
                tracing::error!(error = %e, "config reload rejected; keeping the current settings")
            }
        }
        counter!(names::RELOADS, "outcome" => outcome.as_str()).increment(1);
        outcome
    }

    /// Watches the file and SIGHUP until the process ends. Returns the watcher, which
    /// must be kept alive.
    pub fn spawn(self) -> Option<notify::RecommendedWatcher> {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = self.path.as_deref().and_then(|p| watch(p, tx.clone()));
        #[cfg(unix)]
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received; reloading the config");
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
                self.reload();
            }
        });
        watcher
    }
}

/// Watches the file's directory, not the file: editors replace files by renaming, and
/// a Kubernetes ConfigMap volume updates by swapping its `..data` symlink. The path is
/// deliberately not canonicalized, so the watch stays on the directory the operator
/// named while the symlink targets come and go.
fn watch(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name()?.to_os_string();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|f| f == name.as_os_str() || f.to_string_lossy().starts_with(".."))
            });
            if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads"))
    .ok()?;
    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, "cannot watch the config directory; SIGHUP still reloads");
        return None;
    }
    Some(w)
}

/// The live keys whose values differ, as `key: old -> new`.
fn live_changes(old: &LiveSettings, new: &LiveSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut cmp = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key}: {a} -> {b}"));
        }
    };
    cmp(
        "cache.ttl_secs",
        old.cache_ttl.as_secs().to_string(),
        new.cache_ttl.as_secs().to_string(),
    );
    cmp(
        "cache.stale_if_error_secs",
        old.stale_if_error.as_secs().to_string(),
        new.stale_if_error.as_secs().to_string(),
    );
    cmp(
        "cache.group_events",
        old.group_events.as_str().to_string(),
        new.group_events.as_str().to_string(),
    );
    for (a, b) in old.commands.iter().zip(&new.commands) {
        if a.command == crate::chat::commands::GET_LIST {
            continue;
        }
        let key = |k: &str| format!("cache.commands.\"{}\".{k}", a.command);
        cmp(
            &key("enabled"),
            a.enabled.to_string(),
            b.enabled.to_string(),
        );
        cmp(
            &key("ttl_secs"),
            a.ttl.as_secs().to_string(),
            b.ttl.as_secs().to_string(),
        );
        cmp(
            &key("stale_if_error_secs"),
            a.stale_if_error.as_secs().to_string(),
            b.stale_if_error.as_secs().to_string(),
        );
    }
    cmp(
        "retry.max_attempts",
        old.retry.max_attempts.to_string(),
        new.retry.max_attempts.to_string(),
    );
    cmp(
        "retry.base_delay_ms",
        old.retry.base_delay.as_millis().to_string(),
        new.retry.base_delay.as_millis().to_string(),
    );
    cmp(
        "retry.max_delay_ms",
        old.retry.max_delay.as_millis().to_string(),
        new.retry.max_delay.as_millis().to_string(),
    );
    out
}

/// Sections (other than the live ones) whose values differ from start-up.
fn restart_only_changes(started: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let a = serde_json::to_value(started).unwrap_or_default();
    let b = serde_json::to_value(new).unwrap_or_default();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (section, av) in a {
            if section == "live" {
                continue;
            }
            if let (Some(ao), Some(bo)) =
                (av.as_object(), b.get(section).and_then(|v| v.as_object()))
            {
                for (k, v) in ao {
                    if bo.get(k) != Some(v) {
                        out.push(format!("{section}.{k}"));
                    }
                }
            }
        }
    }
    if started.chat.secret_key != new.chat.secret_key {
        out.push("chat.secret_key".into());
    }
    if started.callback.token != new.callback.token {
        out.push("callback.token".into());
    }
    out
}
