//! Secrets read from files, and kept live: `chat.secret_key_file`,
//! `callback.token_file` and `server.auth_tokens_file` are watched like the config
//! file (their directories, so a Kubernetes Secret's `..data` symlink swap is seen),
//! and a change takes effect without a restart. A change is logged once, by key,
//! never with the value; a file that becomes unreadable or empty keeps the old value
//! and logs an error. Each outcome is counted in
//! `chat_gateway_secret_reloads_total{secret,outcome}`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use metrics::counter;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{ConfigError, Secret, Settings};
use crate::metrics::names;

/// Shortest accepted caller token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Editors and the kubelet write in several steps; events closer than this are one.
const SETTLE: Duration = Duration::from_millis(30);

/// Reads a one-value secret file; trailing newlines are ignored. An empty file is an
/// error naming `key` (the `*_file` key), never showing the content.
pub fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(key, format!("cannot read {}: {}", path.display(), e.kind()))
    })?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(Secret::new(value.to_string()))
}

/// Reads a tokens file: one token per line; blank lines and `#` comments skipped.
pub fn read_tokens(key: &str, path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(key, format!("cannot read {}: {}", path.display(), e.kind()))
    })?;
    let tokens: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Secret::new(l.to_string()))
        .collect();
    if tokens.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} holds no token", path.display()),
        ));
    }
    check_tokens(key, &tokens)?;
    Ok(tokens)
}

/// Every caller token must be at least [`MIN_TOKEN_LEN`] characters.
pub fn check_tokens(key: &str, tokens: &[Secret]) -> Result<(), ConfigError> {
    if tokens
        .iter()
        .any(|t| t.expose().trim().len() < MIN_TOKEN_LEN)
    {
        return Err(ConfigError::invalid(
            key,
            format!("every token must be at least {MIN_TOKEN_LEN} characters"),
        ));
    }
    Ok(())
}

/// What runs when the secret key changes.
type KeyHook = Box<dyn Fn(&Secret) + Send + Sync>;

/// The secrets that may change while the gateway runs. Readers take a snapshot per
/// use (an atomic load).
pub struct LiveSecrets {
    /// The app's secret key (the signer signs new UserSigs with it).
    pub secret_key: ArcSwap<Secret>,
    /// The callback token, if webhooks must be signed.
    pub callback_token: ArcSwapOption<Secret>,
    /// Caller tokens (empty: no caller auth).
    pub auth_tokens: ArcSwap<Vec<Secret>>,
    /// Called with the new secret key after it changed (the signer signs with it).
    on_key_change: Option<KeyHook>,
}

impl std::fmt::Debug for LiveSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSecrets").finish_non_exhaustive()
    }
}

/// One watched secret file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretFile {
    /// `chat.secret_key_file`
    SecretKey,
    /// `callback.token_file`
    CallbackToken,
    /// `server.auth_tokens_file`
    AuthTokens,
}

impl SecretFile {
    /// The config key naming the file.
    pub fn key(self) -> &'static str {
        match self {
            SecretFile::SecretKey => "chat.secret_key_file",
            SecretFile::CallbackToken => "callback.token_file",
            SecretFile::AuthTokens => "server.auth_tokens_file",
        }
    }

    /// The `secret` label of the reload metric.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretFile::SecretKey => "secret_key",
            SecretFile::CallbackToken => "callback_token",
            SecretFile::AuthTokens => "auth_tokens",
        }
    }
}

/// What re-reading a secret file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// A new value is in force.
    Applied,
    /// The file holds the value already in force.
    Unchanged,
    /// The file is unreadable or invalid; the old value stays.
    Rejected(String),
}

impl LiveSecrets {
    /// The secrets as the settings loaded them.
    pub fn new(settings: &Settings) -> Self {
        LiveSecrets {
            secret_key: ArcSwap::from_pointee(settings.chat.secret_key.clone()),
            callback_token: ArcSwapOption::from(settings.callback.token.clone().map(Arc::new)),
            auth_tokens: ArcSwap::from_pointee(settings.server.auth_tokens.clone()),
            on_key_change: None,
        }
    }

    /// Runs `f` after every change of the secret key.
    pub fn on_key_change(mut self, f: impl Fn(&Secret) + Send + Sync + 'static) -> Self {
        self.on_key_change = Some(Box::new(f));
        self
    }

    /// Re-reads `which` from `path`; logs and counts the outcome.
    pub fn reload(&self, which: SecretFile, path: &Path) -> Reloaded {
        let outcome = match which {
            SecretFile::SecretKey => match read_secret(which.key(), path) {
                Err(e) => Reloaded::Rejected(e.to_string()),
                Ok(k) if **self.secret_key.load() == k => Reloaded::Unchanged,
                Ok(k) => {
                    if let Some(f) = &self.on_key_change {
                        f(&k);
                    }
                    self.secret_key.store(Arc::new(k));
                    Reloaded::Applied
                }
            },
            SecretFile::CallbackToken => match read_secret(which.key(), path) {
                Err(e) => Reloaded::Rejected(e.to_string()),
                Ok(t) if self.callback_token.load().as_deref() == Some(&t) => Reloaded::Unchanged,
                Ok(t) => {
                    self.callback_token.store(Some(Arc::new(t)));
                    Reloaded::Applied
                }
            },
            SecretFile::AuthTokens => match read_tokens(which.key(), path) {
                Err(e) => Reloaded::Rejected(e.to_string()),
                Ok(t) if **self.auth_tokens.load() == t => Reloaded::Unchanged,
                Ok(t) => {
                    self.auth_tokens.store(Arc::new(t));
                    Reloaded::Applied
                }
            },
        };
        match &outcome {
            Reloaded::Applied => {
                tracing::info!(
                    key = which.key(),
                    "secret changed; the new value is in force"
                );
                counter!(names::SECRET_RELOADS, "secret" => which.as_str(), "outcome" => "applied")
                    .increment(1);
            }
            Reloaded::Unchanged => {}
            Reloaded::Rejected(why) => {
                tracing::error!(key = which.key(), error = %why, "secret file unusable; keeping the current value");
                counter!(names::SECRET_RELOADS, "secret" => which.as_str(), "outcome" => "rejected")
                    .increment(1);
            }
        }
        outcome
    }
}

/// The secret files named in `settings`.
pub fn files(settings: &Settings) -> Vec<(SecretFile, PathBuf)> {
    [
        (SecretFile::SecretKey, settings.chat.secret_key_file.clone()),
        (
            SecretFile::CallbackToken,
            settings.callback.token_file.clone(),
        ),
        (
            SecretFile::AuthTokens,
            settings.server.auth_tokens_file.clone(),
        ),
    ]
    .into_iter()
    .filter_map(|(w, p)| p.map(|p| (w, p)))
    .collect()
}

/// Watches the secret files (their directories) and re-reads them on change, until
/// the process ends. Returns the watcher, which must be kept alive; `None` when there
/// is nothing to watch or watching is impossible (then a restart picks changes up).
pub fn watch(
    secrets: Arc<LiveSecrets>,
    files: Vec<(SecretFile, PathBuf)>,
) -> Option<notify::RecommendedWatcher> {
    if files.is_empty() {
        return None;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|(_, p)| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|f| names.contains(f) || f.to_string_lossy().starts_with(".."))
            });
            if ours && !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(());
            }
        }
    })
    .map_err(
        |e| tracing::warn!(error = %e, "cannot watch the secret files; a restart picks changes up"),
    )
    .ok()?;
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .map(|(_, p)| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    for d in &dirs {
        if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %d.display(), "cannot watch a secret file's directory");
        }
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            for (which, path) in &files {
                secrets.reload(*which, path);
            }
        }
    });
    Some(w)
}
