//! `POST /callback`: Chat's third-party callbacks (webhooks), which tell us what
//! changed (`shared/chat-api/callbacks.md`, `callbacks-more.md`); the table of
//! invalidations ([`crate::chat::effects::WEBHOOKS`]) says which entities each
//! command announces.
//!
//! Checked first: `SdkAppid` must be ours and, with `callback.token` set, `Sign` must
//! be hex sha256(token + RequestTime) (compared in constant time) with `RequestTime`
//! within 60 s of now. A rejected callback invalidates nothing. Accepted ones are
//! acknowledged with Chat's OK envelope at once; unknown commands are acknowledged and
//! ignored.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use metrics::counter;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::chat::effects;
use crate::error::GatewayError;
use crate::invalidate::Source;
use crate::metrics::names;
use crate::server::response::{self, Body};
use crate::server::AppState;
use crate::upstream::signer::unix_now;

/// How far `RequestTime` may be from now.
pub const MAX_SKEW_SECS: u64 = 60;

/// Rejected callbacks are logged at most once a second.
static REJECTION_LOG: LogLimit = LogLimit::new();

/// Lets one log line through per second and counts the ones held back.
struct LogLimit {
    /// The second (since the process started) of the last line let through.
    last: AtomicU64,
    /// Lines held back since.
    held: AtomicU64,
}

impl LogLimit {
    const fn new() -> Self {
        LogLimit {
            last: AtomicU64::new(u64::MAX),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when this line may be written.
    fn permit(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs();
        let last = self.last.load(Ordering::Relaxed);
        if last != u64::MAX && last >= now {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| self.held.swap(0, Ordering::Relaxed))
            .or_else(|| {
                self.held.fetch_add(1, Ordering::Relaxed);
                None
            })
    }
}

/// Chat's acknowledgement.
const ACK: &[u8] = br#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#;

/// The command, when the query does not name it.
#[derive(Deserialize, Default)]
struct Command<'a> {
    #[serde(rename = "CallbackCommand", borrow, default)]
    command: Option<Cow<'a, str>>,
}

/// The query parameters Chat puts on a callback.
#[derive(Default, Debug)]
struct CallbackQuery<'a> {
    sdkappid: Option<&'a str>,
    command: Option<&'a str>,
    sign: Option<&'a str>,
    request_time: Option<&'a str>,
}

fn parse_query(q: &str) -> CallbackQuery<'_> {
    let mut out = CallbackQuery::default();
    for kv in q.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "SdkAppid" => out.sdkappid = Some(v),
            "CallbackCommand" => out.command = Some(v),
            "Sign" => out.sign = Some(v),
            "RequestTime" => out.request_time = Some(v),
            _ => {}
        }
    }
    out
}

/// Why a callback was refused (logged; the caller only learns it was refused).
fn verify(state: &AppState, q: &CallbackQuery<'_>, now: u64) -> Result<(), &'static str> {
    let ours = state.settings.chat.sdkappid;
    match q.sdkappid.and_then(|s| s.parse::<u64>().ok()) {
        Some(id) if id == ours => {}
        Some(_) => return Err("SdkAppid is not ours"),
        None => return Err("SdkAppid missing"),
    }
    let token = state.secrets.callback_token.load();
    let Some(token) = token.as_deref() else {
        return Ok(());
    };
    let (Some(sign), Some(rt)) = (q.sign, q.request_time) else {
        return Err("Sign or RequestTime missing");
    };
    let t: u64 = rt.parse().map_err(|_| "RequestTime is not a number")?;
    if now.abs_diff(t) > MAX_SKEW_SECS {
        return Err("RequestTime is more than 60 s from now");
    }
    let expected = hex::encode(Sha256::digest(format!("{}{}", token.expose(), rt)));
    if expected.len() == sign.len() && bool::from(expected.as_bytes().ct_eq(sign.as_bytes())) {
        Ok(())
    } else {
        Err("Sign does not match")
    }
}

/// Handles one callback.
pub async fn handle(state: Arc<AppState>, req: Request<Bytes>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query().unwrap_or("");
    let q = parse_query(query);
    if let Err(why) = verify(&state, &q, unix_now()) {
        // At most one line a second, however many are sent (the port may be public);
        // the metric counts them all.
        if let Some(suppressed) = REJECTION_LOG.permit() {
            tracing::warn!(
                reason = why,
                suppressed,
                "callback rejected; nothing invalidated"
            );
        }
        counter!(names::CALLBACKS, "outcome" => "rejected").increment(1);
        return GatewayError::CallbackRejected(why).respond();
    }
    let named: Command<'_> = serde_json::from_slice(&body).unwrap_or_default();
    let command = q.command.map(Cow::Borrowed).or(named.command);
    let command = command.as_deref().unwrap_or("");
    let handled = match effects::of_webhook(command, &body) {
        Some(changed) => {
            state.invalidator.apply(Source::Webhook, &changed);
            true
        }
        None => false,
    };
    counter!(names::CALLBACKS, "outcome" => if handled { "applied" } else { "ignored" })
        .increment(1);
    response::json(StatusCode::OK, Bytes::from_static(ACK))
}
