//! The access log (`log.access = true`): one line per request once it is answered,
//! on the `chat_gateway::access` target, in the configured format (text or JSON).
//! Never a body, a header value that may carry a secret, or a query string.
//!
//! Handlers describe what only they know (Chat's `ErrorCode`, the attempts made)
//! with an [`AccessInfo`] in the response's extensions; the router writes the line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Response};
use http_body::Body as _;

use super::response::{Body, X_CACHE};

/// The access log's tracing target.
pub const TARGET: &str = "chat_gateway::access";
/// The longest `user-agent` written.
const MAX_USER_AGENT: usize = 128;

/// What a handler knows about the request it answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessInfo {
    /// The `ErrorCode` of the answer, when it is an envelope.
    pub code: Option<i64>,
    /// Calls this request made to Chat.
    pub attempts: u32,
    /// Time those calls took.
    pub upstream: Duration,
}

impl AccessInfo {
    /// An answer with `code` that made no call to Chat.
    pub fn code(code: i64) -> Self {
        AccessInfo {
            code: Some(code),
            ..Default::default()
        }
    }

    /// Attaches this to `resp`.
    pub fn attach(self, resp: &mut Response<Body>) {
        resp.extensions_mut().insert(self);
    }
}

/// What the router saw of the request, kept until the answer is ready.
#[derive(Debug)]
pub struct RequestLine {
    /// When the request was handed to the router.
    pub started: Instant,
    /// `GET`, `POST`...
    pub method: Method,
    /// The path, without the query string (which may carry Chat credentials).
    pub path: String,
    /// The caller's `user-agent`, truncated.
    pub user_agent: String,
    /// The caller.
    pub peer: SocketAddr,
    /// Which listener took it (`main`, `admin`, `callback`).
    pub listener: &'static str,
}

impl RequestLine {
    /// Captures what the line needs from a request that arrived at `started`.
    pub fn new(
        req: &http::request::Parts,
        peer: SocketAddr,
        listener: &'static str,
        started: Instant,
    ) -> RequestLine {
        let ua = req
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ua = truncate_user_agent(ua);
        RequestLine {
            started,
            method: req.method.clone(),
            path: req.uri.path().chars().take(256).collect(),
            user_agent: ua.to_string(),
            peer,
            listener,
        }
    }

    /// Writes the line for `resp`.
    pub fn write(self, resp: &Response<Body>, request_id: &HeaderValue) {
        let info = resp
            .extensions()
            .get::<AccessInfo>()
            .copied()
            .unwrap_or_default();
        let cache = resp
            .headers()
            .get(X_CACHE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let bytes = resp.body().size_hint().exact().unwrap_or(0);
        // A cache hit is a stored success: its code is 0 without looking.
        let code = info.code.or((cache == "HIT").then_some(0));
        line(&Line {
            method: self.method.as_str(),
            path: &self.path,
            status: resp.status().as_u16(),
            cache,
            code,
            attempts: info.attempts,
            upstream: info.upstream,
            bytes,
            duration: self.started.elapsed(),
            request_id: request_id.to_str().unwrap_or(""),
            peer: self.peer,
            user_agent: &self.user_agent,
            listener: self.listener,
        });
    }
}

/// One access-log line's fields.
#[derive(Debug)]
pub struct Line<'a> {
    /// `GET`, `POST`...
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The answer's status.
    pub status: u16,
    /// `x-cache`, or `-`.
    pub cache: &'a str,
    /// The answer's `ErrorCode`, when it is an envelope.
    pub code: Option<i64>,
    /// Calls made to Chat.
    pub attempts: u32,
    /// Time spent in them.
    pub upstream: Duration,
    /// Bytes of the answer's body.
    pub bytes: u64,
    /// From the request's arrival to its answer.
    pub duration: Duration,
    /// The request id.
    pub request_id: &'a str,
    /// The caller.
    pub peer: SocketAddr,
    /// The caller's `user-agent` (truncated).
    pub user_agent: &'a str,
    /// `main`, `admin` or `callback`.
    pub listener: &'static str,
}

/// Writes one access-log line (the one place that decides its shape).
pub fn line(l: &Line<'_>) {
    tracing::info!(
        target: TARGET,
        method = %l.method,
        path = %l.path,
        status = l.status,
        cache = l.cache,
        code = l.code,
        attempts = l.attempts,
        upstream_us = l.upstream.as_micros() as u64,
        bytes = l.bytes,
        duration_us = l.duration.as_micros() as u64,
        request_id = l.request_id,
        peer = %l.peer,
        user_agent = l.user_agent,
        listener = l.listener,
        "access"
    );
}

/// `user-agent` truncated to what the log keeps.
pub fn truncate_user_agent(ua: &str) -> &str {
    match ua.char_indices().nth(MAX_USER_AGENT) {
        Some((i, _)) => &ua[..i],
        None => ua,
    }
}
