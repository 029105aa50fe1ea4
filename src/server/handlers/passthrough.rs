//! `POST /v4/<service>/<command>` for every command but get_list: forwarded with the
//! gateway's credentials, the body as is (an empty body as `{}`), Chat's answer
//! returned as is. Writes that change conversation lists invalidate the accounts
//! they name once Chat has answered, whatever the outcome (a failed write may still
//! have been applied).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use serde::Deserialize;

use crate::cache::invalidate::Source;
use crate::chat::commands::{self, Staleness};
use crate::server::access::AccessInfo;
use crate::server::response::{self, Body};
use crate::server::AppState;
use crate::upstream::CallStats;

#[derive(Deserialize, Default)]
struct Accounts<'a> {
    #[serde(rename = "From_Account", borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(rename = "To_Account", borrow, default)]
    to: Option<Cow<'a, str>>,
}

/// Forwards one command.
pub async fn handle(state: Arc<AppState>, req: Request<Bytes>, command: &str) -> Response<Body> {
    let mut body = req.into_body();
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        body = Bytes::from_static(b"{}");
    }
    let class = state.command_class(command);
    let staleness = commands::staleness(command);
    let stats = CallStats::default();
    let result = state
        .upstream
        .call(command, class, body.clone(), &stats)
        .await;
    if staleness != Staleness::None {
        let a: Accounts<'_> = serde_json::from_slice(&body).unwrap_or_default();
        let named = match staleness {
            Staleness::FromAndTo => vec![a.from, a.to],
            _ => vec![a.from],
        };
        let names: Vec<&str> = named.iter().flatten().map(|c| c.as_ref()).collect();
        state.invalidator.accounts(Source::WriteThrough, names);
    }
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
