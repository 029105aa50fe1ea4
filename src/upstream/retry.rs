//! The retry policy: the one place that decides whether a failed call to Chat is tried
//! again, and how long to wait first.
//!
//! | what happened | read | write |
//! |---|---|---|
//! | connect refused, DNS or TLS handshake failure (never sent) | retry | retry |
//! | reset mid-request, a read's attempt timed out (may have been sent) | retry | never |
//! | HTTP 5xx | retry | never |
//! | ErrorCode 50004, 50005 | retry | never |
//! | any other ErrorCode | return | return |
//!
//! A retry is made only when the deadline leaves room for it, so a timeout is retried
//! only when the attempt had less than the whole deadline: a read's attempt with
//! `chat.attempt_timeout_ms` set. A write's attempt always has the whole remaining
//! deadline.

use std::time::{Duration, Instant};

use rand::Rng;

use super::client::{Reach, TransportError, UpstreamResponse};
use crate::chat::commands::CommandClass;
use crate::chat::envelope::CodeClass;
use crate::config::RetrySettings;

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand this result to the caller.
    Done,
    /// Try again (if attempts and the deadline allow).
    Retry,
}

/// Decides, from one attempt's result and the command's class, whether to retry.
pub fn decide(class: CommandClass, result: &Result<UpstreamResponse, TransportError>) -> Decision {
    let transient = match result {
        Err(e) if e.reach == Reach::NotSent => return Decision::Retry,
        Err(_) => true,
        Ok(resp) if resp.status.is_server_error() => true,
        Ok(resp) => match resp.chat {
            Some(s) => CodeClass::of(s.code) == CodeClass::Transient,
            None => false,
        },
    };
    if transient && class == CommandClass::Read {
        Decision::Retry
    } else {
        Decision::Done
    }
}

/// The wait before retry number `retry` (1 for the first retry): exponential backoff
/// with full jitter, between `base_delay` and `min(max_delay, base_delay * 2^(retry-1))`.
pub fn backoff(settings: &RetrySettings, retry: u32) -> Duration {
    let base = settings.base_delay.as_millis() as u64;
    let cap = settings.max_delay.as_millis() as u64;
    let exp = base.saturating_mul(1u64 << retry.saturating_sub(1).min(20));
    let hi = exp.min(cap).max(base);
    Duration::from_millis(rand::rng().random_range(base..=hi))
}

/// Whether another attempt fits: attempts left, and the wait plus a minimal attempt
/// before the deadline.
pub fn may_attempt_again(
    settings: &RetrySettings,
    attempts_made: u32,
    wait: Duration,
    deadline: Instant,
) -> bool {
    attempts_made < settings.max_attempts
        && Instant::now() + wait + Duration::from_millis(1) < deadline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::envelope::Status;
    use http::StatusCode;

    fn answer(status: u16, code: Option<i64>) -> Result<UpstreamResponse, TransportError> {
        Ok(UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            body: bytes::Bytes::new(),
            chat: code.map(|c| Status {
                ok: c == 0,
                code: c,
            }),
            content_type: None,
        })
    }
    fn failed(reach: Reach) -> Result<UpstreamResponse, TransportError> {
        Err(TransportError {
            reach,
            timeout: false,
            message: String::new(),
        })
    }

    #[test]
    fn reads_retry_transients_writes_only_unsent() {
        use CommandClass::*;
        use Decision::*;
        for (res, read, write) in [
            (answer(200, Some(0)), Done, Done),
            (answer(200, Some(50004)), Retry, Done),
            (answer(200, Some(50005)), Retry, Done),
            (answer(200, Some(50001)), Done, Done),
            (answer(200, Some(50002)), Done, Done),
            (answer(502, None), Retry, Done),
            (answer(200, None), Done, Done),
            (failed(Reach::NotSent), Retry, Retry),
            (failed(Reach::MaybeSent), Retry, Done),
        ] {
            assert_eq!(decide(Read, &res), read, "{res:?}");
            assert_eq!(decide(Write, &res), write, "{res:?}");
        }
    }

    #[test]
    fn backoff_stays_in_bounds() {
        let s = RetrySettings {
            max_attempts: 5,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(300),
            idempotent_commands: Default::default(),
            budget_percent: 20,
            budget_min_per_sec: 10,
        };
        for retry in 1..10 {
            for _ in 0..200 {
                let d = backoff(&s, retry).as_millis() as u64;
                assert!((50..=300).contains(&d), "{d}");
                assert!(d <= 50u64 << (retry - 1), "{d} at retry {retry}");
            }
        }
    }
}
