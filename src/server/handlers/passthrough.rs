//! `POST /v4/<service>/<command>` for every command that is not cached (or whose
//! caching is disabled): forwarded with the gateway's credentials, the body as is
//! (an empty body as `{}`), Chat's answer returned as is. A write invalidates what
//! the table of invalidations ([`crate::chat::effects`]) says it changes once Chat
//! has answered, whatever the outcome (a failed write may still have been applied),
//! and, in a fleet, answers once every gateway has applied it (or after
//! `redis.timeout_ms`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};

use crate::chat::commands::CommandClass;
use crate::chat::effects;
use crate::invalidate::Source;
use crate::server::access::AccessInfo;
use crate::server::response::{self, Body};
use crate::server::AppState;
use crate::upstream::CallStats;

/// Forwards one command.
pub async fn handle(state: Arc<AppState>, req: Request<Bytes>, command: &str) -> Response<Body> {
    forward(&state, command, req.into_body()).await
}

/// Forwards `body` as `command`, then invalidates what a write changed.
pub async fn forward(state: &Arc<AppState>, command: &str, mut body: Bytes) -> Response<Body> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        body = Bytes::from_static(b"{}");
    }
    let class = state.command_class(command);
    let stats = CallStats::default();
    let result = state
        .upstream
        .call(command, class, body.clone(), &stats)
        .await;
    let changed = effects::of_write(command, class == CommandClass::Write, &body);
    state
        .invalidator
        .apply_and_wait(Source::WriteThrough, &changed)
        .await;
    let (mut resp, code) = match result {
        Ok(r) => {
            let code = r.chat.map(|s| s.code);
            (response::json(r.status, r.body), code)
        }
        Err(e) => (e.respond(), Some(e.code())),
    };
    AccessInfo {
        code,
        attempts: stats.attempts(),
        upstream: stats.upstream_time(),
    }
    .attach(&mut resp);
    resp
}
