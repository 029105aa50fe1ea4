//! The request pipeline for `/v4` calls (the state behind it is in `state`, which the
//! command modules use too).
//!
//! Every `/v4` call goes through these steps; the first that fails answers:
//! 1. added latency (fault injection);
//! 2. the path must be a known `/v4/<service>/<command>` → else 60009;
//! 3. POST only → else 60002;
//! 4. authentication (see `auth`) → 600xx / 700xx;
//! 5. the body: at most 1 MiB (60008), not empty (60003);
//! 6. the per-command rate limit → 60007;
//! 7. injected 50004 / 50005, instead of running the command (nothing changes);
//! 8. the command itself;
//! 9. an injected drop: the command ran, then the connection closes unanswered.
//!
//! All answers are HTTP 200 with Chat's envelope and a `RequestId`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;

use super::config::FaultSettings;
use super::faults::Fate;
use super::protocol::{self, Actor, ApiError, Command, Envelope, Reply};
use super::state::{read_body, respond, unix_now, State, MAX_BODY};
use super::stats::FaultKind;
use super::{accounts, contact_groups, control, groups, paging, profile, sns, writes};
use crate::chat::commands::command_of_path;

/// A response hyper refuses to write: it carries both `Transfer-Encoding` and a
/// later `Content-Length`, which hyper's HTTP/1 encoder rejects before writing a
/// byte, and then it closes the connection. The client sees the connection closed
/// without an answer, which is exactly the fault being injected.
fn dropped_connection() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// Routes one request: control endpoints or the Chat API.
pub(crate) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/__emulator" || path.starts_with("/__emulator/") {
        return control::handle(&state, req).await;
    }
    api(&state, req).await
}

async fn api(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let request_id = state.request_ids.next();
    let settings = state.faults.get();
    if let Some(delay) = state.faults.delay(&settings) {
        state.stats.fault(FaultKind::Delay);
        tokio::time::sleep(delay).await;
    }
    let dropped = state.faults.drops(&settings);
    let body = match process(state, req, &settings).await {
        Ok(reply) => {
            state.stats.answered(0);
            protocol::ok(reply, &request_id)
        }
        Err(e) => {
            state.stats.answered(e.code);
            protocol::fail(&e, &request_id)
        }
    };
    if dropped {
        state.stats.fault(FaultKind::Drop);
        return dropped_connection();
    }
    respond(StatusCode::OK, "application/json", body)
}

#[derive(Deserialize)]
struct AccountPeek {
    #[serde(rename = "From_Account", default)]
    from: Option<String>,
}

/// Counts a call that did not reach its command under its From_Account, if any.
fn count_account(state: &State, body: &[u8]) {
    if let Ok(peek) = serde_json::from_slice::<AccountPeek>(body) {
        if let Some(i) = peek.from.and_then(|n| state.world.account_index(&n)) {
            state.stats.account(i);
        }
    }
}

async fn process(
    state: &State,
    req: Request<Incoming>,
    settings: &FaultSettings,
) -> Result<Reply, ApiError> {
    let command = command_of_path(req.uri().path()).and_then(Command::parse);
    state.stats.call(command);
    let Some(command) = command else {
        return Err(ApiError::new(
            60009,
            format!(
                "unknown API {:?}: expected /v4/<service>/<command> of a known command",
                req.uri().path()
            ),
        ));
    };
    if req.method() != Method::POST {
        return Err(ApiError::new(60002, "only POST is accepted"));
    }
    state.auth.check(req.uri().query(), unix_now())?;
    let body = read_body(req, MAX_BODY).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            60003,
            "request body is empty (send {} for no fields)",
        ));
    }
    let limit = command.rate_limit(settings.rate_limit);
    if !state.limiter.admit(command.index(), limit, Instant::now()) {
        count_account(state, &body);
        return Err(ApiError::new(
            60007,
            format!(
                "{} is limited to {limit} calls per second",
                command.as_str()
            ),
        ));
    }
    if let Fate::Fail(code) = state.faults.fate(settings) {
        state.stats.fault(if code == 50004 {
            FaultKind::Fail50004
        } else {
            FaultKind::Fail50005
        });
        count_account(state, &body);
        let info = if code == 50004 {
            "internal server error (injected by the emulator); try again"
        } else {
            "network timeout (injected by the emulator); try again later"
        };
        return Err(ApiError::new(code, info));
    }
    let mut who = None;
    let result = dispatch(state, &Actor::Admin, command, &body, &mut who);
    if let Some(i) = who {
        state.stats.account(i);
    }
    result
}

/// Runs `command` for `actor`. Errors of the profile and sns commands carry
/// `ErrorDisplay`, as their answers do.
pub(crate) fn dispatch(
    state: &State,
    actor: &Actor<'_>,
    command: Command,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let result = run(state, actor, command, body, who);
    match command.envelope() {
        Envelope::Display => result.map_err(ApiError::with_display),
        _ => result,
    }
}

fn run(
    state: &State,
    actor: &Actor<'_>,
    command: Command,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    match command {
        Command::GetList => paging::get_list(
            &state.world,
            state.cfg.page_size,
            state.cfg.top_page_size,
            body,
            who,
        ),
        Command::Delete => writes::delete(state, body, who),
        Command::SendMsg => writes::sendmsg(state, actor, body, who),
        Command::SendGroupMsg => groups::send_group_msg(state, actor, body, who),
        Command::MarkContact => contact_groups::mark_contact(state, body, who),
        Command::CreateContactGroup => contact_groups::create_contact_group(state, body, who),
        Command::UpdateContactGroup => contact_groups::update_contact_group(state, body, who),
        Command::DelContactGroup => contact_groups::del_contact_group(state, body, who),
        Command::GetContactGroup => contact_groups::get_contact_group(state, body, who),
        Command::SearchContactGroup => contact_groups::search_contact_group(state, body, who),
        Command::PortraitGet => profile::portrait_get(state, body),
        Command::PortraitSet => profile::portrait_set(state, actor, body, who),
        Command::GetGroupInfo => groups::get_group_info(state, body),
        Command::GetGroupMemberInfo => groups::get_group_member_info(state, body),
        Command::GetJoinedGroupList => groups::get_joined_group_list(state, body, who),
        Command::CreateGroup => groups::create_group(state, actor, body, who),
        Command::ModifyGroupBaseInfo => groups::modify_group_base_info(state, actor, body, who),
        Command::AddGroupMember => groups::add_group_member(state, actor, body, who),
        Command::DeleteGroupMember => groups::delete_group_member(state, actor, body, who),
        Command::ModifyGroupMemberInfo => groups::modify_group_member_info(state, actor, body, who),
        Command::ChangeGroupOwner => groups::change_group_owner(state, actor, body, who),
        Command::DestroyGroup => groups::destroy_group(state, actor, body, who),
        Command::ForbidSendMsg => groups::forbid_send_msg(state, actor, body, who),
        Command::FriendGet => sns::friend_get(state, body, who),
        Command::FriendGetList => sns::friend_get_list(state, body, who),
        Command::FriendAdd => sns::friend_add(state, actor, body, who),
        Command::FriendImport => sns::friend_import(state, body, who),
        Command::FriendUpdate => sns::friend_update(state, actor, body, who),
        Command::FriendDelete => sns::friend_delete(state, actor, body, who),
        Command::FriendDeleteAll => sns::friend_delete_all(state, body, who),
        Command::AccountCheck => accounts::account_check(state, body),
        Command::AccountImport => accounts::account_import(state, body, who),
        Command::MultiaccountImport => accounts::multiaccount_import(state, body),
        Command::AccountDelete => accounts::account_delete(state, body),
        Command::QueryOnlineStatus => accounts::query_online_status(state, body),
        Command::BatchSendMsg => writes::batchsendmsg(state, body, who),
        Command::ImportMsg => writes::importmsg(state, body, who),
    }
}
