//! Everything between a handler and Chat: the signer (cached UserSig), the retry policy
//! and the pooled rustls client. Handlers call [`Upstream::call`] and get either Chat's
//! answer or one [`GatewayError`].

pub mod client;
pub mod retry;
pub mod signer;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use metrics::{counter, histogram};

use crate::chat::commands::CommandClass;
use crate::config::{LiveSettings, Settings};
use crate::error::GatewayError;
use crate::metrics::names;
use client::{ChatClient, TransportError, UpstreamResponse};
use retry::Decision;
use signer::Signer;

/// The way to Chat, shared by every handler.
#[derive(Debug)]
pub struct Upstream {
    /// The pooled client (and signer).
    client: ChatClient,
    /// Base URL of Chat: the region's domain or `chat.base_url`.
    base_url: String,
    /// Deadline of one caller request, retries included.
    request_timeout: std::time::Duration,
    /// Retry settings, reloadable.
    live: Arc<ArcSwap<LiveSettings>>,
}

impl Upstream {
    /// Builds the client from settings.
    pub fn new(settings: &Settings, live: Arc<ArcSwap<LiveSettings>>) -> Result<Self, String> {
        let c = &settings.chat;
        let signer = Arc::new(Signer::new(
            c.sdkappid,
            c.identifier.clone(),
            c.secret_key.clone(),
            c.usersig_ttl,
        ));
        let client = ChatClient::new(c.sdkappid, signer, c.ca_file.as_deref(), c.request_timeout)?;
        Ok(Upstream {
            client,
            base_url: c.base_url.clone(),
            request_timeout: c.request_timeout,
            live,
        })
    }

    /// The signer (readiness checks and renewals).
    pub fn signer(&self) -> &Arc<Signer> {
        self.client.signer()
    }

    /// Calls `command` with `body`, retrying as the policy allows for `class`, all within
    /// `chat.request_timeout_ms`. Returns Chat's last answer when there was one with an
    /// envelope (success or not); otherwise the failure.
    pub async fn call(
        &self,
        command: &str,
        class: CommandClass,
        body: Bytes,
    ) -> Result<UpstreamResponse, GatewayError> {
        let deadline = Instant::now() + self.request_timeout;
        let retry = self.live.load().retry.clone();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let started = Instant::now();
            let result = self
                .client
                .send(&self.base_url, command, body.clone(), deadline)
                .await;
            record_call(command, &result, started);
            if retry::decide(class, &result) == Decision::Retry {
                let wait = retry::backoff(&retry, attempts);
                if retry::may_attempt_again(&retry, attempts, wait, deadline) {
                    counter!(names::RETRIES, "command" => command_label(command)).increment(1);
                    tracing::debug!(
                        command,
                        attempts,
                        wait_ms = wait.as_millis() as u64,
                        "retrying"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            return finish(result);
        }
    }
}

/// Turns the last attempt's result into what the caller gets.
fn finish(
    result: Result<UpstreamResponse, TransportError>,
) -> Result<UpstreamResponse, GatewayError> {
    match result {
        Ok(resp) if resp.chat.is_some() => Ok(resp),
        Ok(resp) => Err(GatewayError::UpstreamUnavailable(format!(
            "Chat answered HTTP {} without an envelope",
            resp.status.as_u16()
        ))),
        Err(e) if e.timeout => Err(GatewayError::UpstreamTimeout),
        Err(e) => Err(GatewayError::UpstreamUnavailable(e.message)),
    }
}

/// The metric label for a command: itself for known commands, `other` otherwise, so a
/// caller cannot blow up label cardinality.
pub fn command_label(command: &str) -> &'static str {
    crate::chat::commands::DEFAULT_IDEMPOTENT
        .iter()
        .chain(crate::chat::commands::KNOWN_WRITES.iter())
        .find(|c| **c == command)
        .copied()
        .unwrap_or("other")
}

fn record_call(command: &str, result: &Result<UpstreamResponse, TransportError>, started: Instant) {
    let label = command_label(command);
    let code: String = match result {
        Ok(r) => match r.chat {
            Some(s) => s.code.to_string(),
            None => format!("http_{}", r.status.as_u16()),
        },
        Err(e) if e.timeout => "timeout".into(),
        Err(_) => "transport".into(),
    };
    counter!(names::UPSTREAM_CALLS, "command" => label, "code" => code).increment(1);
    histogram!(names::UPSTREAM_LATENCY, "command" => label).record(started.elapsed().as_secs_f64());
    if let Err(e) = result {
        tracing::warn!(command, error = %e.message, "call to Chat failed");
    }
}
