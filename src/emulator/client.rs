//! Changes "from a client": `POST /__emulator/client/<service>/<command>?as=<UserID>
//! [&platform=<OptPlatform>]` with the REST command's JSON body applies the change
//! as that user's app would (the user is the operator; permissions are the user's:
//! group roles, only one's own profile and friend list), then sends the webhook a
//! client change sends, with `OptPlatform` the client's platform. The answer is the
//! command's answer in Chat's envelope. No UserSig, no faults, no rate limit.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use super::auth::parse_params_any;
use super::protocol::{self, Actor, Command};
use super::state::{read_body, respond, State, MAX_BODY};

/// Commands a client can run, and so the changes whose webhooks a test can cause
/// "from a client".
pub(crate) const CLIENT_COMMANDS: [Command; 14] = [
    Command::PortraitSet,
    Command::FriendAdd,
    Command::FriendUpdate,
    Command::FriendDelete,
    Command::CreateGroup,
    Command::ModifyGroupBaseInfo,
    Command::AddGroupMember,
    Command::DeleteGroupMember,
    Command::ModifyGroupMemberInfo,
    Command::ChangeGroupOwner,
    Command::DestroyGroup,
    Command::ForbidSendMsg,
    Command::SendGroupMsg,
    Command::SendMsg,
];

/// `OptPlatform` values a client may have.
const PLATFORMS: [&str; 7] = ["Web", "Android", "iOS", "Windows", "Mac", "iPad", "Unknown"];

fn error(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    respond(
        status,
        "application/json",
        Bytes::from(json!({ "error": msg }).to_string()),
    )
}

/// Serves `POST /__emulator/client/<command>` (`command` is `service/command`).
pub(crate) async fn handle(
    state: &State,
    command: &str,
    query: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let supported = || {
        CLIENT_COMMANDS
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(command) = Command::parse(command).filter(|c| CLIENT_COMMANDS.contains(c)) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no client command {command:?}; a client can run: {}",
                supported()
            ),
        );
    };
    let params = parse_params_any(query);
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(name) = get("as").filter(|s| !s.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "name the acting user: ?as=<UserID>".into(),
        );
    };
    let Some(user) = state.world.existing(name) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{name:?} is not an imported account"),
        );
    };
    let platform = get("platform").unwrap_or("Android");
    if !PLATFORMS.contains(&platform) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("platform must be one of {}", PLATFORMS.join(", ")),
        );
    }
    let body = match read_body(req, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e.info.into_owned()),
    };
    let actor = Actor::Client { user, platform };
    let request_id = state.request_ids.next();
    let mut who = None;
    let answer = match super::server::dispatch(state, &actor, command, &body, &mut who) {
        Ok(reply) => protocol::ok(reply, &request_id),
        Err(e) => protocol::fail(&e, &request_id),
    };
    tracing::debug!(
        command = command.as_str(),
        user = name,
        platform,
        "client change"
    );
    respond(StatusCode::OK, "application/json", answer)
}
