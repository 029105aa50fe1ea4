//! One error type for a request's failures. Each variant records where the failure
//! came from (the caller, the upstream, the gateway itself) and what the caller is
//! told: status, `ErrorCode`, reason. `GatewayError::respond` (in
//! [`crate::server::response`]) is the one place that turns a failure into a response.

use bytes::Bytes;
use http::StatusCode;

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
    /// The body did not fully arrive within `server.body_read_timeout_ms`.
    #[error("request body did not arrive within {} ms", .0.as_millis())]
    BodyTimeout(std::time::Duration),
    /// A webhook failed its checks (`SdkAppid`, `Sign`, `RequestTime`).
    #[error("callback rejected: {0}")]
    CallbackRejected(&'static str),
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
    /// One value of every variant, so metrics can show each `(origin, reason)` pair
    /// at zero from the first scrape. A variant added to the enum must be added here:
    /// the test below fails otherwise.
    pub fn one_of_each() -> Vec<GatewayError> {
        use std::time::Duration;
        vec![
            GatewayError::InvalidJson(String::new()),
            GatewayError::InvalidField(String::new()),
            GatewayError::BodyTooLarge(0),
            GatewayError::BodyRead,
            GatewayError::BodyTimeout(Duration::ZERO),
            GatewayError::CallbackRejected(""),
            GatewayError::NotFound(String::new()),
            GatewayError::MethodNotAllowed("POST"),
            GatewayError::Unauthorized,
            GatewayError::LoopbackOnly,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamUnavailable(String::new()),
            GatewayError::RateLimited(Duration::ZERO),
            GatewayError::RouteDenied(String::new()),
            GatewayError::Internal(String::new()),
        ]
    }

    /// Who is at fault.
    pub fn origin(&self) -> Origin {
        match self {
            GatewayError::InvalidJson(_)
            | GatewayError::InvalidField(_)
            | GatewayError::BodyTooLarge(_)
            | GatewayError::BodyRead
            | GatewayError::BodyTimeout(_)
            | GatewayError::CallbackRejected(_)
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
            GatewayError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::CallbackRejected(_) => StatusCode::FORBIDDEN,
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
            GatewayError::BodyTooLarge(_)
            | GatewayError::BodyRead
            | GatewayError::BodyTimeout(_) => 60008,
            GatewayError::CallbackRejected(_) => 60004,
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
            GatewayError::BodyTimeout(_) => "body-timeout",
            GatewayError::CallbackRejected(_) => "callback-rejected",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a variant is added without a line here, and fails when
    /// `one_of_each` misses one.
    #[test]
    fn one_of_each_lists_every_variant() {
        let all = GatewayError::one_of_each();
        let ordinal = |e: &GatewayError| match e {
            GatewayError::InvalidJson(_) => 0,
            GatewayError::InvalidField(_) => 1,
            GatewayError::BodyTooLarge(_) => 2,
            GatewayError::BodyRead => 3,
            GatewayError::BodyTimeout(_) => 4,
            GatewayError::CallbackRejected(_) => 5,
            GatewayError::NotFound(_) => 6,
            GatewayError::MethodNotAllowed(_) => 7,
            GatewayError::Unauthorized => 8,
            GatewayError::LoopbackOnly => 9,
            GatewayError::UpstreamTimeout => 10,
            GatewayError::UpstreamUnavailable(_) => 11,
            GatewayError::RateLimited(_) => 12,
            GatewayError::RouteDenied(_) => 13,
            GatewayError::Internal(_) => 14,
        };
        let mut seen: Vec<usize> = all.iter().map(ordinal).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..15).collect::<Vec<_>>());
        let mut reasons: Vec<&str> = all.iter().map(|e| e.reason()).collect();
        reasons.sort();
        reasons.dedup();
        assert_eq!(reasons.len(), 15, "every variant has its own reason");
    }
}
