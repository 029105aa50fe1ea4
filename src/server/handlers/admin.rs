//! `POST /admin/cache/invalidate`: drop cached entries by entity, or everything.
//!
//! Body: one or more of
//! - `"From_Account"`: every entity of each account (its conversation list,
//!   profile, existence, friends, joined groups);
//! - `"GroupId"`: a group event for each group (its info and members, and the
//!   conversation lists the gateway knows list it);
//! - an entity kind (`"Conversations"`, `"Profile"`, `"Exists"`, `"Friends"`,
//!   `"JoinedGroups"`, `"GroupInfo"`, `"GroupMembers"`): those entities;
//!
//! each a string or a list of strings, at most `server.max_invalidate_accounts`
//! names in all; or `{"All":true}` alone.
//! Answer: Chat's envelope plus `"Invalidated":{"Accounts":n,"Pages":m,"Entities":k}`.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use serde::Deserialize;

use crate::chat::effects::{Effect, EntityKind};
use crate::chat::envelope;
use crate::chat::reads::{MAX_ACCOUNT_BYTES, MAX_GROUP_ID_BYTES};
use crate::error::GatewayError;
use crate::invalidate::Source;
use crate::server::response::{self, Body};
use crate::server::AppState;

#[derive(Deserialize)]
#[serde(untagged)]
enum Names<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

impl Names<'_> {
    fn list(&self) -> Vec<&str> {
        match self {
            Names::One(a) => vec![a.as_ref()],
            Names::Many(v) => v.iter().map(|a| a.as_ref()).collect(),
        }
    }
}

/// What a key of the body names.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Every entity of an account.
    Account,
    /// A group event.
    Group,
    /// One kind.
    Kind(EntityKind),
}

fn target(key: &str) -> Option<Target> {
    match key {
        "From_Account" => Some(Target::Account),
        "GroupId" => Some(Target::Group),
        k => EntityKind::from_name(k).map(Target::Kind),
    }
}

fn accepted() -> String {
    let mut keys = vec!["From_Account", "GroupId"];
    keys.extend(EntityKind::ALL.iter().map(|k| k.as_str()));
    keys.join(", ")
}

/// The effects a body asks for, or why it is refused.
fn effects(body: &[u8], max: usize) -> Result<Vec<Effect>, GatewayError> {
    let map: std::collections::BTreeMap<Cow<'_, str>, &serde_json::value::RawValue> =
        match serde_json::from_slice(body) {
            Ok(m) => m,
            Err(e) if e.is_data() => return Err(GatewayError::InvalidField(e.to_string())),
            Err(e) => return Err(GatewayError::InvalidJson(e.to_string())),
        };
    if let Some(all) = map.get("All") {
        return match (all.get(), map.len()) {
            ("true", 1) => Ok(vec![Effect::All]),
            _ => Err(GatewayError::InvalidField(
                "\"All\" must be true and alone".into(),
            )),
        };
    }
    if map.is_empty() {
        return Err(GatewayError::InvalidField(format!(
            "name what to invalidate ({}), or \"All\": true",
            accepted()
        )));
    }
    let mut out = Vec::new();
    let mut total = 0usize;
    for (key, raw) in &map {
        let Some(t) = target(key) else {
            return Err(GatewayError::InvalidField(format!(
                "unknown field {key:?}; give {} (a string or a list), or \"All\": true",
                accepted()
            )));
        };
        let names: Names<'_> = serde_json::from_str(raw.get()).map_err(|_| {
            GatewayError::InvalidField(format!("{key} must be a string or a list of strings"))
        })?;
        let list = names.list();
        total += list.len();
        if list.is_empty() || total > max {
            return Err(GatewayError::InvalidField(format!(
                "name 1 to {max} accounts or groups in all (server.max_invalidate_accounts)"
            )));
        }
        let limit = match t {
            Target::Account => MAX_ACCOUNT_BYTES,
            Target::Kind(k) if k.of_account() => MAX_ACCOUNT_BYTES,
            _ => MAX_GROUP_ID_BYTES,
        };
        if let Some(bad) = list.iter().find(|a| a.is_empty() || a.len() > limit) {
            return Err(GatewayError::InvalidField(format!(
                "{key} {bad:?} must be 1 to {limit} bytes"
            )));
        }
        for name in list {
            match t {
                Target::Account => {
                    out.extend(EntityKind::OF_ACCOUNT.iter().map(|k| Effect::one(*k, name)))
                }
                Target::Group => out.push(Effect::Group(name.to_string())),
                Target::Kind(k) => out.push(Effect::one(k, name)),
            }
        }
    }
    Ok(out)
}

/// Handles one invalidation request.
pub async fn invalidate(state: Arc<AppState>, req: Request<Bytes>) -> Response<Body> {
    let body = req.into_body();
    let wanted = match effects(&body, state.settings.server.max_invalidate_accounts) {
        Ok(e) => e,
        Err(e) => return e.respond(),
    };
    // Answered once every gateway of the fleet has applied it (or after
    // `redis.timeout_ms`).
    let dropped = state
        .invalidator
        .apply_and_wait(Source::Admin, &wanted)
        .await;
    tracing::info!(
        accounts = dropped.accounts,
        pages = dropped.pages,
        entities = dropped.entities,
        "admin invalidation"
    );
    response::json(
        StatusCode::OK,
        envelope::ok_body(serde_json::json!({ "Invalidated": dropped })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_forms() {
        let e = effects(br#"{"From_Account":"u"}"#, 10).unwrap();
        assert_eq!(e.len(), EntityKind::OF_ACCOUNT.len());
        let e = effects(br#"{"Profile":["a","b"],"GroupId":"@g"}"#, 10).unwrap();
        assert!(e.contains(&Effect::one(EntityKind::Profile, "b")));
        assert!(e.contains(&Effect::Group("@g".into())));
        assert_eq!(effects(br#"{"All":true}"#, 10).unwrap(), vec![Effect::All]);
        for (body, code) in [
            (&br#"{"All":true,"Profile":"a"}"#[..], 50002),
            (br#"{"All":false}"#, 50002),
            (br#"{}"#, 50002),
            (br#"{"Nope":"a"}"#, 50002),
            (br#"{"Profile":[]}"#, 50002),
            (br#"{"Profile":[1]}"#, 50002),
            (br#"{"Profile":""}"#, 50002),
            (br#"{"Profile":["a","b"],"Friends":["c","d"]}"#, 50002),
            (br#"{"Profile":"123456789012345678901234567890123"}"#, 50002),
            (b"{", 60003),
        ] {
            let max = 3;
            assert_eq!(
                effects(body, max).unwrap_err().code(),
                code,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
