//! What the emulator speaks on the wire: the commands it knows, Chat's envelope with a
//! `RequestId`, errors, body parsing with Chat's error codes, and the conversation
//! reference (`ContactItem`) several commands share.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::rng::mix64;
use super::world::{Peer, World};
use crate::chat::envelope;

/// The commands the emulator implements; every other `/v4` path gets `60009`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    GetList,
    Delete,
    MarkContact,
    CreateContactGroup,
    UpdateContactGroup,
    DelContactGroup,
    GetContactGroup,
    SearchContactGroup,
    SendMsg,
    SendGroupMsg,
    PortraitGet,
    PortraitSet,
    GetGroupInfo,
    GetGroupMemberInfo,
    GetJoinedGroupList,
    CreateGroup,
    ModifyGroupBaseInfo,
    AddGroupMember,
    DeleteGroupMember,
    ModifyGroupMemberInfo,
    ChangeGroupOwner,
    DestroyGroup,
    ForbidSendMsg,
    FriendGet,
    FriendGetList,
    FriendAdd,
    FriendImport,
    FriendUpdate,
    FriendDelete,
    FriendDeleteAll,
    AccountCheck,
    AccountImport,
    MultiaccountImport,
    AccountDelete,
    QueryOnlineStatus,
    BatchSendMsg,
    ImportMsg,
}

/// Where an answer puts Chat's envelope, as each command family's documentation
/// shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Envelope {
    /// The command's fields, then `ActionStatus, ErrorCode, ErrorInfo, RequestId`
    /// (recentcontact).
    Trailing,
    /// The command's fields, then `ActionStatus, ErrorCode, ErrorInfo,
    /// ErrorDisplay, RequestId` (profile and sns); failures carry `ErrorDisplay` too.
    Display,
    /// `ActionStatus, ErrorCode, ErrorInfo, RequestId`, then the command's fields
    /// (group, account and the openim commands added with them).
    Leading,
}

impl Command {
    /// Every command, in index order.
    pub(crate) const ALL: [Command; 37] = [
        Command::GetList,
        Command::Delete,
        Command::MarkContact,
        Command::CreateContactGroup,
        Command::UpdateContactGroup,
        Command::DelContactGroup,
        Command::GetContactGroup,
        Command::SearchContactGroup,
        Command::SendMsg,
        Command::SendGroupMsg,
        Command::PortraitGet,
        Command::PortraitSet,
        Command::GetGroupInfo,
        Command::GetGroupMemberInfo,
        Command::GetJoinedGroupList,
        Command::CreateGroup,
        Command::ModifyGroupBaseInfo,
        Command::AddGroupMember,
        Command::DeleteGroupMember,
        Command::ModifyGroupMemberInfo,
        Command::ChangeGroupOwner,
        Command::DestroyGroup,
        Command::ForbidSendMsg,
        Command::FriendGet,
        Command::FriendGetList,
        Command::FriendAdd,
        Command::FriendImport,
        Command::FriendUpdate,
        Command::FriendDelete,
        Command::FriendDeleteAll,
        Command::AccountCheck,
        Command::AccountImport,
        Command::MultiaccountImport,
        Command::AccountDelete,
        Command::QueryOnlineStatus,
        Command::BatchSendMsg,
        Command::ImportMsg,
    ];

    /// `service/command` as in the URL.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Command::GetList => "recentcontact/get_list",
            Command::Delete => "recentcontact/delete",
            Command::MarkContact => "recentcontact/mark_contact",
            Command::CreateContactGroup => "recentcontact/create_contact_group",
            Command::UpdateContactGroup => "recentcontact/update_contact_group",
            Command::DelContactGroup => "recentcontact/del_contact_group",
            Command::GetContactGroup => "recentcontact/get_contact_group",
            Command::SearchContactGroup => "recentcontact/search_contact_group",
            Command::SendMsg => "openim/sendmsg",
            Command::SendGroupMsg => "group_open_http_svc/send_group_msg",
            Command::PortraitGet => "profile/portrait_get",
            Command::PortraitSet => "profile/portrait_set",
            Command::GetGroupInfo => "group_open_http_svc/get_group_info",
            Command::GetGroupMemberInfo => "group_open_http_svc/get_group_member_info",
            Command::GetJoinedGroupList => "group_open_http_svc/get_joined_group_list",
            Command::CreateGroup => "group_open_http_svc/create_group",
            Command::ModifyGroupBaseInfo => "group_open_http_svc/modify_group_base_info",
            Command::AddGroupMember => "group_open_http_svc/add_group_member",
            Command::DeleteGroupMember => "group_open_http_svc/delete_group_member",
            Command::ModifyGroupMemberInfo => "group_open_http_svc/modify_group_member_info",
            Command::ChangeGroupOwner => "group_open_http_svc/change_group_owner",
            Command::DestroyGroup => "group_open_http_svc/destroy_group",
            Command::ForbidSendMsg => "group_open_http_svc/forbid_send_msg",
            Command::FriendGet => "sns/friend_get",
            Command::FriendGetList => "sns/friend_get_list",
            Command::FriendAdd => "sns/friend_add",
            Command::FriendImport => "sns/friend_import",
            Command::FriendUpdate => "sns/friend_update",
            Command::FriendDelete => "sns/friend_delete",
            Command::FriendDeleteAll => "sns/friend_delete_all",
            Command::AccountCheck => "im_open_login_svc/account_check",
            Command::AccountImport => "im_open_login_svc/account_import",
            Command::MultiaccountImport => "im_open_login_svc/multiaccount_import",
            Command::AccountDelete => "im_open_login_svc/account_delete",
            Command::QueryOnlineStatus => "openim/query_online_status",
            Command::BatchSendMsg => "openim/batchsendmsg",
            Command::ImportMsg => "openim/importmsg",
        }
    }

    /// The command for `service/command`.
    pub(crate) fn parse(s: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Position in [`Command::ALL`], for per-command counters.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Where this command's answers put the envelope.
    pub(crate) fn envelope(self) -> Envelope {
        match self.as_str().split('/').next() {
            Some("profile" | "sns") => Envelope::Display,
            Some("group_open_http_svc" | "im_open_login_svc") => Envelope::Leading,
            _ => match self {
                Command::QueryOnlineStatus | Command::BatchSendMsg | Command::ImportMsg => {
                    Envelope::Leading
                }
                _ => Envelope::Trailing,
            },
        }
    }

    /// This command's documented call frequency limit when the emulator's
    /// `rate_limit` is `base` (Chat's default 200/s for most commands): the commands
    /// Chat documents at 100 calls/s (account_check, multiaccount_import) get half.
    pub(crate) fn rate_limit(self, base: u32) -> u32 {
        match self {
            Command::AccountCheck | Command::MultiaccountImport => base.div_ceil(2),
            _ => base,
        }
    }
}

/// A failed call: Chat's `ErrorCode` and `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    /// `ErrorCode`.
    pub code: i64,
    /// `ErrorInfo`.
    pub info: Cow<'static, str>,
    /// Whether the answer carries `ErrorDisplay` (profile and sns commands).
    pub display: bool,
}

impl ApiError {
    /// An error with a code and a message.
    pub(crate) fn new(code: i64, info: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            code,
            info: info.into(),
            display: false,
        }
    }

    /// The same error answered with an `ErrorDisplay` field.
    pub(crate) fn with_display(mut self) -> ApiError {
        self.display = true;
        self
    }
}

/// A successful command's own fields, before the envelope is added.
pub(crate) enum Reply {
    /// A serialized JSON object (typed structs, for hot paths).
    Raw(Vec<u8>),
    /// A JSON object value (cold paths; keys come out sorted).
    Value(serde_json::Value),
    /// A serialized JSON object followed by the envelope with `ErrorDisplay`.
    Display(Vec<u8>),
    /// A serialized JSON object preceded by the envelope.
    Leading(Vec<u8>),
}

/// Serializes a typed answer (field order as declared). Serializing these structs
/// cannot fail; an empty object stands in if it ever did.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// A typed answer in `envelope`'s style.
pub(crate) fn reply<T: Serialize>(envelope: Envelope, value: &T) -> Reply {
    let bytes = to_json(value);
    match envelope {
        Envelope::Trailing => Reply::Raw(bytes),
        Envelope::Display => Reply::Display(bytes),
        Envelope::Leading => Reply::Leading(bytes),
    }
}

/// Makes Chat-style request ids: `Id-<32 hex>-O-Seq-<n>`, unique per emulator.
pub(crate) struct RequestIds {
    nonce: u64,
    counter: AtomicU64,
}

impl RequestIds {
    /// A generator salted with `nonce` (e.g. the start time), so two runs differ.
    pub(crate) fn new(nonce: u64) -> RequestIds {
        RequestIds {
            nonce,
            counter: AtomicU64::new(1),
        }
    }

    /// The next id.
    pub(crate) fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!(
            "Id-{:016x}{:016x}-O-Seq-{n}",
            mix64(self.nonce ^ n),
            mix64(n.wrapping_add(self.nonce))
        )
    }
}

/// Appends `"RequestId"` to a JSON object's bytes (request ids need no escaping).
fn with_request_id(mut obj: Vec<u8>, request_id: &str) -> Bytes {
    if obj.last() == Some(&b'}') {
        obj.pop();
        if obj.last() != Some(&b'{') {
            obj.push(b',');
        }
        obj.extend_from_slice(b"\"RequestId\":\"");
        obj.extend_from_slice(request_id.as_bytes());
        obj.extend_from_slice(b"\"}");
    }
    Bytes::from(obj)
}

/// `{"ActionStatus":"FAIL","ErrorCode":..,"ErrorInfo":..,"RequestId":..}`.
pub(crate) fn fail(err: &ApiError, request_id: &str) -> Bytes {
    if err.display {
        #[derive(Serialize)]
        struct FailDisplay<'a> {
            #[serde(rename = "ActionStatus")]
            status: &'static str,
            #[serde(rename = "ErrorCode")]
            code: i64,
            #[serde(rename = "ErrorInfo")]
            info: &'a str,
            #[serde(rename = "ErrorDisplay")]
            display: &'static str,
            #[serde(rename = "RequestId")]
            request_id: &'a str,
        }
        return Bytes::from(to_json(&FailDisplay {
            status: "FAIL",
            code: err.code,
            info: &err.info,
            display: "",
            request_id,
        }));
    }
    with_request_id(
        envelope::fail_body(err.code, &err.info).to_vec(),
        request_id,
    )
}

/// Closes `obj` (a serialized object) with `tail` (`"K":v,...` without braces).
fn close_with(mut obj: Vec<u8>, tail: &[u8], request_id: &str) -> Bytes {
    if obj.last() == Some(&b'}') {
        obj.pop();
        if obj.last() != Some(&b'{') {
            obj.push(b',');
        }
        obj.extend_from_slice(tail);
        obj.extend_from_slice(b"\"RequestId\":\"");
        obj.extend_from_slice(request_id.as_bytes());
        obj.extend_from_slice(b"\"}");
    }
    Bytes::from(obj)
}

/// The command's fields followed by `ActionStatus`, `ErrorCode`, `ErrorInfo` and
/// `RequestId`.
pub(crate) fn ok(reply: Reply, request_id: &str) -> Bytes {
    match reply {
        Reply::Raw(obj) => close_with(
            obj,
            br#""ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","#,
            request_id,
        ),
        Reply::Value(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("RequestId".into(), request_id.into());
            }
            envelope::ok_body(v)
        }
        Reply::Display(obj) => close_with(
            obj,
            br#""ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":"","#,
            request_id,
        ),
        Reply::Leading(obj) => {
            let mut out = Vec::with_capacity(obj.len() + 96);
            out.extend_from_slice(
                br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","RequestId":""#,
            );
            out.extend_from_slice(request_id.as_bytes());
            out.push(b'"');
            match obj.strip_prefix(b"{") {
                Some(rest) if rest != b"}" => {
                    out.push(b',');
                    out.extend_from_slice(rest);
                }
                _ => out.push(b'}'),
            }
            Bytes::from(out)
        }
    }
}

/// Parses a request body. Not JSON → `60003`; JSON of the wrong shape →
/// `param_code` (the command's parameter error) naming the problem.
pub(crate) fn parse_body<'a, T: Deserialize<'a>>(
    body: &'a [u8],
    param_code: i64,
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(param_code, format!("invalid request body: {e}")),
            _ => ApiError::new(60003, format!("request body is not valid JSON: {e}")),
        }
    })
}

/// Who makes a change: the app admin through REST, or a user through a client SDK
/// (the `/__emulator/client/...` control endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Actor<'a> {
    /// The app admin calling the REST API.
    Admin,
    /// A user's app: the user's account slot and the platform it runs on.
    Client {
        /// The acting account.
        user: u32,
        /// `OptPlatform` of the webhooks it causes (`iOS`, `Android`, `Web`, ...).
        platform: &'a str,
    },
}

impl Actor<'_> {
    /// `OptPlatform` of the webhooks this actor's changes send.
    pub(crate) fn platform(&self) -> &str {
        match self {
            Actor::Admin => "RESTAPI",
            Actor::Client { platform, .. } => platform,
        }
    }

    /// The acting user, for a client change.
    pub(crate) fn user(&self) -> Option<u32> {
        match self {
            Actor::Admin => None,
            Actor::Client { user, .. } => Some(*user),
        }
    }
}

/// A conversation reference in a request: `{Type, To_Account | ToGroupId}`
/// (`delete` spells it `ToGroupid`; both are accepted everywhere).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ContactItemIn {
    /// 1 one-to-one, 2 group.
    #[serde(rename = "Type")]
    pub kind: i64,
    /// The peer account, one-to-one only.
    #[serde(rename = "To_Account", default)]
    pub to_account: Option<String>,
    /// The group, group conversations only.
    #[serde(rename = "ToGroupId", alias = "ToGroupid", default)]
    pub to_group: Option<String>,
}

impl ContactItemIn {
    /// The peer this item names; `50002` when it names nothing that exists.
    pub(crate) fn resolve(&self, world: &World) -> Result<Peer, ApiError> {
        match self.kind {
            1 => {
                let name = self.to_account.as_deref().unwrap_or("");
                world
                    .account_index(name)
                    .map(Peer::User)
                    .ok_or_else(|| ApiError::new(50002, format!("unknown To_Account {name:?}")))
            }
            2 => {
                let id = self.to_group.as_deref().unwrap_or("");
                world
                    .group_index(id)
                    .map(Peer::Group)
                    .ok_or_else(|| ApiError::new(50002, format!("unknown ToGroupId {id:?}")))
            }
            k => Err(ApiError::new(
                50002,
                format!("Type must be 1 (one-to-one) or 2 (group), got {k}"),
            )),
        }
    }
}

/// A conversation reference in an answer.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ContactItemOut<'a> {
    /// 1 one-to-one, 2 group.
    #[serde(rename = "Type")]
    pub kind: u8,
    /// The peer account, one-to-one only.
    #[serde(rename = "To_Account", skip_serializing_if = "Option::is_none")]
    pub to_account: Option<&'a str>,
    /// The group, group conversations only.
    #[serde(rename = "ToGroupId", skip_serializing_if = "Option::is_none")]
    pub to_group: Option<&'a str>,
}

impl<'a> ContactItemOut<'a> {
    /// The answer form of `peer`.
    pub(crate) fn of(world: &'a World, peer: Peer) -> ContactItemOut<'a> {
        match peer {
            Peer::User(_) => ContactItemOut {
                kind: 1,
                to_account: Some(world.peer_id(peer)),
                to_group: None,
            },
            Peer::Group(_) => ContactItemOut {
                kind: 2,
                to_account: None,
                to_group: Some(world.peer_id(peer)),
            },
        }
    }
}

/// A conversation group in an answer (`GroupItem`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GroupItemOut<'a> {
    /// The group's name.
    #[serde(rename = "GroupName")]
    pub name: &'a str,
    /// The group's per-user id.
    #[serde(rename = "GroupId")]
    pub id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_carry_request_id() {
        let f = fail(&ApiError::new(50002, "bad \"x\""), "Id-1");
        let v: serde_json::Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["ErrorCode"], 50002);
        assert_eq!(v["RequestId"], "Id-1");
        assert_eq!(v["ActionStatus"], "FAIL");
        let o = ok(Reply::Raw(br#"{"A":1}"#.to_vec()), "Id-2");
        assert_eq!(
            &o[..],
            br#"{"A":1,"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","RequestId":"Id-2"}"#
        );
        let e = ok(Reply::Raw(b"{}".to_vec()), "Id-3");
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["ErrorCode"], 0);
        let v2 = ok(Reply::Value(serde_json::json!({"B": 2})), "Id-4");
        let v2: serde_json::Value = serde_json::from_slice(&v2).unwrap();
        assert_eq!(v2["B"], 2);
        assert_eq!(v2["RequestId"], "Id-4");
    }

    #[test]
    fn parse_errors_map_to_codes() {
        #[derive(Deserialize, Debug)]
        struct X {
            #[allow(dead_code)]
            a: u64,
        }
        assert_eq!(parse_body::<X>(b"{", 50002).unwrap_err().code, 60003);
        assert_eq!(parse_body::<X>(b"", 50002).unwrap_err().code, 60003);
        assert_eq!(parse_body::<X>(b"nope", 50002).unwrap_err().code, 60003);
        assert_eq!(parse_body::<X>(b"{}", 50002).unwrap_err().code, 50002);
        assert_eq!(
            parse_body::<X>(br#"{"a":-1}"#, 90001).unwrap_err().code,
            90001
        );
        assert!(parse_body::<X>(br#"{"a":1}"#, 50002).is_ok());
    }

    #[test]
    fn commands_round_trip_and_ids_are_unique() {
        for c in Command::ALL {
            assert_eq!(Command::parse(c.as_str()), Some(c));
            assert_eq!(Command::ALL[c.index()], c);
        }
        assert_eq!(Command::parse("recentcontact/nope"), None);
        let ids = RequestIds::new(3);
        assert_ne!(ids.next(), ids.next());
    }
}
