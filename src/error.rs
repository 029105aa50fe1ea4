//! One error type for a request's failures. Each variant records where the failure
//! came from (the caller, the upstream, the gateway itself); [`GatewayError::respond`]
//! is the one place that turns a failure into a response in Chat's envelope.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::chat::envelope;

/// Where a failure originated, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The caller sent something we refuse.
    Caller,
    /// Chat (or the network to it) failed.
    Upstream,
    /// The gateway itself.
    Gateway,
}

impl Origin {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Caller => "caller",
            Origin::Upstream => "upstream",
            Origin::Gateway => "gateway",
        }
    }
}

/// A request-level failure that the gateway answers itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A field is missing or has the wrong type or size.
    #[error("{0}")]
    InvalidField(String),
    /// The body is larger than `server.max_body_bytes`.
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The body could not be read from the caller.
    #[error("request body could not be read")]
    BodyRead,
    /// No such route.
    #[error("no such route: {0}")]
    NotFound(String),
    /// A known route with the wrong method.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// `server.auth_tokens` is set and the caller sent no valid bearer token.
    #[error("missing or invalid bearer token in Authorization")]
    Unauthorized,
    /// The route is only for callers on loopback.
    #[error("this endpoint only answers loopback callers")]
    LoopbackOnly,
    /// Chat did not answer within `chat.request_timeout_ms` (retries included).
    #[error("Chat did not answer in time")]
    UpstreamTimeout,
    /// Chat could not be reached or answered garbage, after retries.
    #[error("Chat is unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The gateway's own per-command rate limit: no slot within `ratelimit.max_wait_ms`.
    #[error("over the rate limit for this command; retry in {} ms", .0.as_millis())]
    RateLimited(std::time::Duration),
    /// The command is refused by `routes.allow` / `routes.deny`.
    #[error("command {0} is not allowed through this gateway")]
    RouteDenied(String),
    /// A bug or an unexpected state in the gateway.
    #[error("internal gateway error")]
    Internal(String),
}

impl GatewayError {
    /// Who is at fault.
    pub fn origin(&self) -> Origin {
        match self {
            GatewayError::InvalidJson(_)
            | GatewayError::InvalidField(_)
            | GatewayError::BodyTooLarge(_)
            | GatewayError::BodyRead
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::Unauthorized
            | GatewayError::LoopbackOnly => Origin::Caller,
            GatewayError::UpstreamTimeout | GatewayError::UpstreamUnavailable(_) => {
                Origin::Upstream
            }
            GatewayError::RouteDenied(_) => Origin::Caller,
            GatewayError::RateLimited(_) => Origin::Gateway,
            GatewayError::Internal(_) => Origin::Gateway,
        }
    }

    /// The HTTP status. Chat answers 200 for request errors, and so do we, so that
    /// Chat clients parse the envelope; transport-level failures use 4xx/5xx.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidJson(_) | GatewayError::InvalidField(_) => StatusCode::OK,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyRead => StatusCode::BAD_REQUEST,
            GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::LoopbackOnly => StatusCode::FORBIDDEN,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::RouteDenied(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The Chat `ErrorCode` in the envelope.
    pub fn code(&self) -> i64 {
        match self {
            GatewayError::InvalidJson(_) => 60003,
            GatewayError::InvalidField(_) => 50002,
            GatewayError::BodyTooLarge(_) | GatewayError::BodyRead => 60008,
            GatewayError::NotFound(_) | GatewayError::MethodNotAllowed(_) => 60009,
            GatewayError::Unauthorized => 60004,
            GatewayError::LoopbackOnly => 60021,
            GatewayError::UpstreamTimeout | GatewayError::UpstreamUnavailable(_) => 50005,
            GatewayError::Internal(_) => 50004,
            GatewayError::RateLimited(_) => 60007,
            GatewayError::RouteDenied(_) => 60009,
        }
    }

    /// The `x-chat-gateway-error` header: a short, stable reason for scripts.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::InvalidJson(_) => "invalid-json",
            GatewayError::InvalidField(_) => "invalid-field",
            GatewayError::BodyTooLarge(_) => "body-too-large",
            GatewayError::BodyRead => "body-read",
            GatewayError::NotFound(_) => "not-found",
            GatewayError::MethodNotAllowed(_) => "method-not-allowed",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::LoopbackOnly => "loopback-only",
            GatewayError::UpstreamTimeout => "upstream-timeout",
            GatewayError::UpstreamUnavailable(_) => "upstream-unavailable",
            GatewayError::Internal(_) => "internal",
            GatewayError::RateLimited(_) => "rate-limited",
            GatewayError::RouteDenied(_) => "route-denied",
        }
    }

    /// The envelope body. Internal details stay in the logs.
    pub fn body(&self) -> Bytes {
        let info = match self {
            GatewayError::Internal(_) => "internal gateway error".to_string(),
            other => other.to_string(),
        };
        envelope::fail_body(self.code(), &info)
    }

    /// The whole response; counts it in `chat_gateway_errors_total{origin,reason}`.
    pub fn respond(&self) -> http::Response<http_body_util::Full<Bytes>> {
        metrics::counter!(
            crate::metrics::names::ERRORS,
            "origin" => self.origin().as_str(),
            "reason" => self.reason()
        )
        .increment(1);
        let mut resp = http::Response::new(http_body_util::Full::new(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            crate::server::response::JSON.clone(),
        );
        h.insert(
            crate::server::response::X_CHAT_GATEWAY_ERROR,
            HeaderValue::from_static(self.reason()),
        );
        if let GatewayError::Unauthorized = self {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
