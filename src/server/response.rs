//! Response building blocks: header names and values made once, and small builders.

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::error::GatewayError;
use crate::server::access::AccessInfo;

/// `content-type: application/json`
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// `x-cache`: HIT, MISS, STALE or BYPASS on every get_list answer.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `x-chat-gateway-error`: a short reason on answers the gateway made itself.
pub const X_CHAT_GATEWAY_ERROR: HeaderName = HeaderName::from_static("x-chat-gateway-error");
/// `x-request-id`: taken from the caller or made up, echoed on the answer.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The body type of every response.
pub type Body = Full<Bytes>;

/// A JSON response with `status`.
pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, JSON);
    resp
}

/// The bytes of a body (one frame, always ready).
pub fn into_bytes(mut body: Body) -> Bytes {
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    match body.frame().now_or_never() {
        Some(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// The answer to a request refused by [`super::rules`]: its status, `ErrorCode` 60008.
pub fn refused(refusal: super::rules::Refusal) -> Response<Body> {
    json(
        refusal.status(),
        crate::chat::envelope::fail_body(60008, refusal.reason()),
    )
}

/// A plain-text response with `status`.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `age` header values for 0..=`AGE_TABLE` seconds, made once so a cache hit does not
/// format a number.
const AGE_TABLE: usize = 3600;

/// The `age` header value for `secs`.
pub fn age_value(secs: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| (0..=AGE_TABLE as u64).map(HeaderValue::from).collect());
    match table.get(secs as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(secs),
    }
}

impl GatewayError {
    /// The whole response; counts it in `chat_gateway_errors_total{origin,reason}`.
    pub fn respond(&self) -> Response<Body> {
        metrics::counter!(
            crate::metrics::names::ERRORS,
            "origin" => self.origin().as_str(),
            "reason" => self.reason()
        )
        .increment(1);
        let mut resp = json(self.status(), self.body());
        resp.extensions_mut().insert(AccessInfo::code(self.code()));
        let h = resp.headers_mut();
        h.insert(
            X_CHAT_GATEWAY_ERROR,
            HeaderValue::from_static(self.reason()),
        );
        // The rest of the body was not read: the connection cannot carry another
        // request, and a slow sender must not keep it.
        if matches!(
            self,
            GatewayError::BodyTimeout(_) | GatewayError::BodyTooLarge(_) | GatewayError::BodyRead
        ) {
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let GatewayError::RateLimited(wait) = self {
            // Whole seconds, rounded up (never 0: "retry at once" is not what we mean).
            let secs = wait.as_millis().div_ceil(1000).max(1) as u64;
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // RFC 9110 §15.5.6: a 405 names the methods the resource allows.
        if let GatewayError::MethodNotAllowed(allowed) = self {
            h.insert(http::header::ALLOW, HeaderValue::from_static(allowed));
        }
        if let GatewayError::Unauthorized = self {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
