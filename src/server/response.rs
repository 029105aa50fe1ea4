//! Response building blocks: header names and values made once, and small builders.

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

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
