//! Reading a request body with a bound, enforced while it streams in.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::error::GatewayError;

/// Reads the whole body, refusing (without reading on) anything over `max` bytes:
/// at once from `content-length`, or as soon as the streamed bytes pass the bound.
pub async fn read_bounded(
    headers: &http::HeaderMap,
    body: Incoming,
    max: usize,
) -> Result<Bytes, GatewayError> {
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(GatewayError::BodyTooLarge(max));
        }
    }
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge(max))
        }
        Err(_) => Err(GatewayError::BodyRead),
    }
}
