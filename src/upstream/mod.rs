//! Everything between a handler and Chat: the signer (cached UserSig), the per-command
//! rate limit, the retry policy and budget, failover between domains, and the pooled
//! rustls client. Handlers call [`Upstream::call`] and get either Chat's answer or one
//! [`GatewayError`].

pub mod budget;
pub mod client;
pub mod failover;
pub mod ratelimit;
pub mod retry;
pub mod signer;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use metrics::{counter, histogram};

use crate::chat::commands::CommandClass;
use crate::chat::envelope::CodeClass;
use crate::config::{LiveSettings, Settings};
use crate::error::GatewayError;
use crate::metrics::names;
use budget::RetryBudget;
use client::{ChatClient, Reach, TransportError, UpstreamResponse};
use failover::{Endpoint, Failover};
use ratelimit::{LocalRateLimiter, Permit, RateLimiter, Throttled};
use retry::Decision;
use signer::Signer;

/// How long Chat's 70050 asks callers to pause.
const PAUSE_70050: Duration = Duration::from_secs(60);
/// How long other throttling codes pause a command.
const PAUSE_THROTTLED: Duration = Duration::from_secs(1);
/// At most one "Chat keeps refusing our UserSig" error log per this interval.
const SIG_ALARM_INTERVAL: Duration = Duration::from_secs(60);

/// What one request's exchange with Chat took: attempts made and time spent in them
/// (for the access log). Shared with a spawned fetch task, hence atomics.
#[derive(Debug, Default)]
pub struct CallStats {
    /// Calls sent to Chat.
    attempts: AtomicU32,
    /// Microseconds spent in those calls.
    upstream_us: AtomicU64,
}

impl CallStats {
    /// Calls sent to Chat.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Time spent in calls to Chat.
    pub fn upstream_time(&self) -> Duration {
        Duration::from_micros(self.upstream_us.load(Ordering::Relaxed))
    }

    fn record(&self, took: Duration) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        self.upstream_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The way to Chat, shared by every handler.
pub struct Upstream {
    /// The pooled client (and signer).
    client: ChatClient,
    /// Primary and backup base URLs, and which is in use.
    failover: Failover,
    /// Per-command rate limit.
    limiter: Arc<dyn RateLimiter>,
    /// How long a call may wait for its rate-limit slot.
    max_wait: Duration,
    /// Retry throttling across all commands.
    budget: RetryBudget,
    /// Deadline of one caller request, retries included.
    request_timeout: Duration,
    /// How long one attempt of a read may take (`chat.attempt_timeout_ms`).
    attempt_timeout: Option<Duration>,
    /// Retry settings, reloadable.
    live: Arc<ArcSwap<LiveSettings>>,
    /// Milliseconds since `started` of the last loud UserSig-refusal log.
    last_sig_alarm: AtomicU64,
    /// Time origin for `last_sig_alarm`.
    started: Instant,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("client", &self.client)
            .field("failover", &self.failover)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the client from settings.
    pub fn new(settings: &Settings, live: Arc<ArcSwap<LiveSettings>>) -> Result<Self, String> {
        Self::with_limiter(settings, live, None)
    }

    /// Like [`Upstream::new`] with another rate limiter (the fleet's); `None` is the
    /// local one.
    pub fn with_limiter(
        settings: &Settings,
        live: Arc<ArcSwap<LiveSettings>>,
        limiter: Option<Arc<dyn RateLimiter>>,
    ) -> Result<Self, String> {
        let c = &settings.chat;
        let signer = Arc::new(Signer::new(
            c.sdkappid,
            c.identifier.clone(),
            c.secret_key.clone(),
            c.usersig_ttl,
        ));
        let client = ChatClient::new(c.sdkappid, signer, c.ca_file.as_deref(), c.request_timeout)?;
        let rl = &settings.ratelimit;
        Ok(Upstream {
            client,
            failover: Failover::new(
                c.base_url.clone(),
                c.backup_base_url.clone(),
                c.failover_cooldown,
            ),
            limiter: limiter.unwrap_or_else(|| {
                Arc::new(LocalRateLimiter::new(
                    rl.per_command_per_sec,
                    rl.commands.clone(),
                    rl.burst_percent,
                ))
            }),
            max_wait: rl.max_wait,
            budget: RetryBudget::new(),
            request_timeout: c.request_timeout,
            attempt_timeout: c.attempt_timeout,
            live,
            last_sig_alarm: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        })
    }

    /// The signer (readiness checks and renewals).
    pub fn signer(&self) -> &Arc<Signer> {
        self.client.signer()
    }

    /// Calls `command` with `body` within `chat.request_timeout_ms`: waits for the
    /// command's rate-limit slot, renews a refused UserSig once, and retries as the
    /// policy and the retry budget allow for `class`. Returns Chat's last answer when
    /// it had an envelope (success or not); otherwise the failure.
    pub async fn call(
        &self,
        command: &str,
        class: CommandClass,
        body: Bytes,
        stats: &CallStats,
    ) -> Result<UpstreamResponse, GatewayError> {
        self.call_admitted(command, class, body, stats, None).await
    }

    /// Asks for the first attempt's rate-limit slot of a call of `command` (waiting
    /// up to `ratelimit.max_wait_ms`), so that the wait can overlap other work (a
    /// fleet miss asks Redis for its L2 page and its slot together). Hand the result
    /// to [`Upstream::call_admitted`]; a permit dropped unused goes back.
    pub async fn admit(&self, command: &str) -> Result<Permit, Throttled> {
        let max_wait = self.max_wait.min(self.request_timeout);
        self.limiter.acquire(command, max_wait).await
    }

    /// Like [`Upstream::call`], with the first attempt's slot already asked for
    /// ([`Upstream::admit`]). A permit that expired meanwhile is asked for again.
    pub async fn call_admitted(
        &self,
        command: &str,
        class: CommandClass,
        body: Bytes,
        stats: &CallStats,
        admitted: Option<Result<Permit, Throttled>>,
    ) -> Result<UpstreamResponse, GatewayError> {
        let deadline = Instant::now() + self.request_timeout;
        let live = self.live.load_full();
        let retry = &live.retry;
        self.budget.record_request(retry.budget_percent);
        let mut attempts = 0u32;
        let mut renewed = false;
        let mut admitted = admitted;
        loop {
            // A first attempt waits for its rate-limit slot up to ratelimit.max_wait_ms;
            // a retry (or the attempt after a renewal) was already admitted once, so it
            // waits for its slot up to the request's deadline.
            let permit = match admitted.take() {
                Some(r) => r,
                None => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let max_wait = if attempts == 0 {
                        self.max_wait.min(remaining)
                    } else {
                        remaining
                    };
                    self.limiter.acquire(command, max_wait).await
                }
            };
            let permit = match permit {
                Ok(p) => p,
                Err(t) => {
                    counter!(names::RATE_LIMITED, "command" => command_label(command)).increment(1);
                    return Err(GatewayError::RateLimited(t.retry_after));
                }
            };
            if !permit.go() {
                // It expired before the call could leave: ask again.
                continue;
            }
            attempts += 1;
            let (endpoint, base) = self.failover.current();
            let span = crate::trace::attempt(command, attempts, endpoint.as_str());
            let started = Instant::now();
            let result = self
                .client
                .send(
                    base,
                    command,
                    body.clone(),
                    self.attempt_deadline(class, started, deadline),
                )
                .await;
            self.limiter.returned(command);
            record_call(command, endpoint, &result, started);
            if let Some(span) = span {
                end_attempt_span(span, &result);
            }
            stats.record(started.elapsed());
            if answered(&result) {
                self.budget.answered();
            }
            if matches!(&result, Err(e) if e.reach == Reach::NotSent) {
                self.failover.connection_failed(endpoint);
            }
            let code_class = match &result {
                Ok(r) => r.chat.map(|s| CodeClass::of(s.code)),
                Err(_) => None,
            };
            match code_class {
                // Chat refused the UserSig before doing anything: renew it and try once
                // more, whatever the command.
                Some(CodeClass::SigRejected) if !renewed => {
                    renewed = true;
                    self.client.signer().force_renew();
                    counter!(names::SIG_RENEWALS).increment(1);
                    tracing::warn!(
                        command,
                        "Chat refused the UserSig; renewed it, trying once more"
                    );
                    continue;
                }
                Some(CodeClass::SigRejected) => {
                    counter!(names::SIG_REFUSED).increment(1);
                    self.sig_alarm(&result)
                }
                Some(CodeClass::Throttled) => {
                    let code = result
                        .as_ref()
                        .ok()
                        .and_then(|r| r.chat)
                        .map_or(0, |s| s.code);
                    let pause = if code == 70050 {
                        PAUSE_70050
                    } else {
                        PAUSE_THROTTLED
                    };
                    self.limiter.pause(command, pause).await;
                    tracing::warn!(
                        command,
                        code,
                        pause_ms = pause.as_millis() as u64,
                        "Chat throttled us; pausing the command"
                    );
                    if class == CommandClass::Read
                        && attempts < retry.max_attempts
                        && Instant::now() + pause < deadline
                        && self.budget.try_retry(retry.budget_min_per_sec)
                    {
                        counter!(names::RETRIES, "command" => command_label(command)).increment(1);
                        continue;
                    }
                    return finish(result);
                }
                _ => {}
            }
            if retry::decide(class, &result) == Decision::Retry {
                let wait = retry::backoff(retry, attempts);
                if retry::may_attempt_again(retry, attempts, wait, deadline) {
                    if self.budget.try_retry(retry.budget_min_per_sec) {
                        counter!(names::RETRIES, "command" => command_label(command)).increment(1);
                        tracing::debug!(
                            command,
                            class = class.as_str(),
                            attempts,
                            wait_ms = wait.as_millis() as u64,
                            "retrying"
                        );
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    counter!(names::BUDGET_EXHAUSTED).increment(1);
                    tracing::debug!(command, "retry budget exhausted; returning the first error");
                }
            }
            return finish(result);
        }
    }

    /// When the attempt starting at `now` gives up waiting for Chat: a read's at
    /// `chat.attempt_timeout_ms` (then retried as a timeout, if the deadline allows), a
    /// write's only at the request's deadline.
    fn attempt_deadline(&self, class: CommandClass, now: Instant, deadline: Instant) -> Instant {
        match (class, self.attempt_timeout) {
            (CommandClass::Read, Some(t)) => deadline.min(now + t),
            _ => deadline,
        }
    }

    /// Logs, at most once a minute, that Chat keeps refusing a freshly made UserSig:
    /// a configuration error (key, SDKAppID or region).
    fn sig_alarm(&self, result: &Result<UpstreamResponse, TransportError>) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_sig_alarm.load(Ordering::Relaxed);
        let due =
            last == u64::MAX || now.saturating_sub(last) >= SIG_ALARM_INTERVAL.as_millis() as u64;
        if due
            && self
                .last_sig_alarm
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let code = result
                .as_ref()
                .ok()
                .and_then(|r| r.chat)
                .map_or(0, |s| s.code);
            tracing::error!(
                code,
                "CONFIGURATION ERROR: Chat refuses even a freshly made UserSig; check chat.secret_key, chat.sdkappid, chat.identifier and chat.region"
            );
        }
    }
}

/// Whether an attempt got a real answer from a working Chat: an envelope that is
/// neither a transient failure nor throttling (each one earns retry budget).
fn answered(result: &Result<UpstreamResponse, TransportError>) -> bool {
    matches!(result, Ok(r) if !r.status.is_server_error()
        && r.chat.is_some_and(|s| !matches!(CodeClass::of(s.code), CodeClass::Transient | CodeClass::Throttled)))
}

/// Ends an attempt's span with what came back: HTTP status and Chat's `ErrorCode`,
/// or the kind of failure.
fn end_attempt_span(span: crate::trace::Child, result: &Result<UpstreamResponse, TransportError>) {
    match result {
        Ok(r) => span.end_attempt(Some(r.status.as_u16()), r.chat.map(|s| s.code), None),
        Err(e) => span.end_attempt(
            None,
            None,
            Some(if e.timeout { "timeout" } else { "transport" }),
        ),
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

fn record_call(
    command: &str,
    endpoint: Endpoint,
    result: &Result<UpstreamResponse, TransportError>,
    started: Instant,
) {
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
    match result {
        Err(e) => {
            tracing::warn!(command, endpoint = endpoint.as_str(), error = %e.message, "call to Chat failed")
        }
        // Never the body: it is not ours to log, and may be large.
        Ok(r) if r.chat.is_none() => tracing::warn!(
            command,
            endpoint = endpoint.as_str(),
            status = r.status.as_u16(),
            content_type = r
                .content_type
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(none)"),
            length = r.body.len(),
            "Chat answered without an envelope"
        ),
        Ok(_) => {}
    }
}
