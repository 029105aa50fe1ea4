//! What the emulator's request pipeline (`server`) and its command modules share:
//! the state behind every request, the clock, and how a body is read and an answer
//! built.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::auth::Auth;
use super::config::EmulatorConfig;
use super::faults::{LiveFaults, RateLimiter};
use super::protocol::{Actor, ApiError, Command, RequestIds};
use super::stats::Stats;
use super::webhooks::{HookLog, Webhooks};
use super::world::World;

/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix milliseconds now.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An imported message's identity: (lower account, higher account, MsgSeq,
/// MsgRandom, MsgTimeStamp).
pub(crate) type ImportedMsg = (u32, u32, u64, u64, u64);

/// Everything a request handler needs, shared by all connections.
pub(crate) struct State {
    /// The configuration the emulator started with (faults live in `faults`).
    pub cfg: EmulatorConfig,
    /// The synthetic world.
    pub world: World,
    /// UserSig and parameter checks.
    pub auth: Auth,
    /// Fault settings in force.
    pub faults: LiveFaults,
    /// Per-command rate limit windows.
    pub limiter: RateLimiter,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Webhook sender, when a callback URL is configured (changeable at run time
    /// through `POST /__emulator/callback`).
    pub webhooks: RwLock<Option<Arc<Webhooks>>>,
    /// Request id generator.
    pub request_ids: RequestIds,
    /// Message sequence numbers (MsgSeq, MsgKey).
    pub msg_seq: AtomicU64,
    /// Messages `importmsg` has placed: (lower account, higher account, MsgSeq,
    /// MsgRandom, MsgTimeStamp), so a repeat import is the same message.
    pub imported_msgs: Mutex<HashSet<ImportedMsg>>,
    /// Every webhook produced, for `GET /__emulator/webhooks`.
    pub hook_log: Mutex<HookLog>,
}

impl State {
    /// State for `cfg` around a generated `world`.
    pub(crate) fn new(cfg: EmulatorConfig, world: World) -> Result<State, String> {
        let stats = Arc::new(Stats::new(world.account_count()));
        let webhooks = match &cfg.callback_url {
            Some(url) => Some(Arc::new(Webhooks::new(
                url,
                cfg.callback_token.clone(),
                cfg.sdkappid,
                Arc::clone(&stats),
            )?)),
            None => None,
        };
        Ok(State {
            auth: Auth::new(cfg.sdkappid, &cfg.secret_key, &cfg.identifier),
            faults: LiveFaults::new(cfg.faults, cfg.seed),
            limiter: RateLimiter::new(Command::ALL.len(), Instant::now()),
            stats,
            webhooks: RwLock::new(webhooks),
            request_ids: RequestIds::new(unix_now_ms()),
            msg_seq: AtomicU64::new(0),
            imported_msgs: Mutex::new(HashSet::new()),
            hook_log: Mutex::new(HookLog::default()),
            world,
            cfg,
        })
    }
}

impl State {
    /// The name webhooks and answers show for `actor`: the admin identifier or the
    /// user's UserID.
    pub(crate) fn operator<'s>(&'s self, actor: &Actor<'_>) -> &'s str {
        match actor {
            Actor::Admin => &self.cfg.identifier,
            Actor::Client { user, .. } => self.world.name(*user),
        }
    }

    /// Points webhooks at `url` (signed with `token` when set), or turns them off.
    pub(crate) fn set_callback(
        &self,
        url: Option<&str>,
        token: Option<String>,
    ) -> Result<(), String> {
        let hooks = match url {
            Some(url) => Some(Arc::new(Webhooks::new(
                url,
                token,
                self.cfg.sdkappid,
                Arc::clone(&self.stats),
            )?)),
            None => None,
        };
        *self.webhooks.write().unwrap_or_else(|e| e.into_inner()) = hooks;
        Ok(())
    }

    /// The callback URL in force and whether webhooks are signed.
    pub(crate) fn callback(&self) -> (Option<String>, bool) {
        match &*self.webhooks.read().unwrap_or_else(|e| e.into_inner()) {
            Some(h) => (Some(h.target().to_owned()), h.signed()),
            None => (None, false),
        }
    }

    /// Logs webhook `command` with `body` and sends it when a callback URL is
    /// configured, with `OptPlatform` from `actor`.
    pub(crate) fn fire(&self, actor: &Actor<'_>, command: &'static str, body: serde_json::Value) {
        self.hook_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command, actor.platform(), &body);
        let hooks = self
            .webhooks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(hooks) = hooks {
            hooks.fire_as(command, body, unix_now(), actor.platform());
        }
    }
}

/// A response with a body and a content type.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Reads a body of at most `limit` bytes; 60008 when larger or unreadable.
pub(crate) async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::new(
            60008,
            format!("request body is over {limit} bytes"),
        ));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            60008,
            format!("request body is over {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(
            60008,
            format!("could not read the request body: {e}"),
        )),
    }
}
