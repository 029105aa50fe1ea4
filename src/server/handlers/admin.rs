//! `POST /admin/cache/invalidate`: drop cached pages by account, or everything.
//!
//! Body: `{"From_Account":"u"}`, `{"From_Account":["u1","u2"]}` or `{"All":true}`.
//! Answer: Chat's envelope plus `"Invalidated":{"Accounts":n,"Pages":m}`.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde::Deserialize;

use crate::cache::invalidate::Source;
use crate::cache::key::MAX_ACCOUNT_BYTES;
use crate::chat::envelope;
use crate::error::GatewayError;
use crate::server::response::{self, Body};
use crate::server::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest<'a> {
    #[serde(rename = "From_Account", borrow, default)]
    accounts: Option<Accounts<'a>>,
    #[serde(rename = "All", default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Accounts<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

/// Handles one invalidation request.
pub async fn invalidate(state: Arc<AppState>, req: Request<Bytes>) -> Response<Body> {
    let body = req.into_body();
    let parsed: InvalidateRequest<'_> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) if e.is_data() => return GatewayError::InvalidField(e.to_string()).respond(),
        Err(e) => return GatewayError::InvalidJson(e.to_string()).respond(),
    };
    let dropped = match (parsed.all, parsed.accounts) {
        (true, None) => state.invalidator.all(Source::Admin),
        (false, Some(accounts)) => {
            let list: Vec<&str> = match &accounts {
                Accounts::One(a) => vec![a.as_ref()],
                Accounts::Many(v) => v.iter().map(|a| a.as_ref()).collect(),
            };
            let max = state.settings.server.max_invalidate_accounts;
            if list.is_empty() || list.len() > max {
                return GatewayError::InvalidField(format!(
                    "From_Account must name 1 to {max} accounts (server.max_invalidate_accounts)"
                ))
                .respond();
            }
            if let Some(bad) = list
                .iter()
                .find(|a| a.is_empty() || a.len() > MAX_ACCOUNT_BYTES)
            {
                return GatewayError::InvalidField(format!(
                    "From_Account {bad:?} must be 1 to {MAX_ACCOUNT_BYTES} bytes"
                ))
                .respond();
            }
            state.invalidator.accounts(Source::Admin, list)
        }
        _ => {
            return GatewayError::InvalidField(
                "give either From_Account (a string or a list) or \"All\": true".into(),
            )
            .respond()
        }
    };
    tracing::info!(
        accounts = dropped.accounts,
        pages = dropped.pages,
        "admin invalidation"
    );
    response::json(
        StatusCode::OK,
        envelope::ok_body(serde_json::json!({ "Invalidated": dropped })),
    )
}
