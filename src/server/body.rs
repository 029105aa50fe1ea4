//! Reading a request body with a bound on its size and on the time it takes.

use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::GatewayError;

/// How much of a body, and for how long, a listener reads.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Deadline for the whole body once its head has arrived.
    pub timeout: Duration,
}

/// Reads the whole body, refusing anything over `max` bytes (at once from
/// `content-length`, or as soon as the streamed bytes pass the bound) and anything
/// that has not fully arrived within `timeout` (`server.body_read_timeout_ms`).
///
/// A small body usually arrives with its head: then it is taken as the one buffer
/// hyper read it into, with no copy and no timer. Only a body still on its way is
/// read under the timeout.
pub async fn read_bounded(
    headers: &http::HeaderMap,
    body: Incoming,
    max: usize,
    timeout: Duration,
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
    let read = collect(body, max);
    tokio::pin!(read);
    match futures_util::poll!(&mut read) {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::BodyTimeout(timeout)),
        },
    }
}

/// Collects the data frames of `body`, at most `max` bytes. One frame is returned as
/// is; several are joined.
async fn collect(mut body: Incoming, max: usize) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| GatewayError::BodyRead)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > max {
            return Err(GatewayError::BodyTooLarge(max));
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                joined.reserve(total);
                joined.extend_from_slice(&f);
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(match first {
        Some(f) => f,
        None => joined.freeze(),
    })
}
