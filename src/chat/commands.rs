//! One table of Chat commands: whether each is a read (safe to retry) and whose cached
//! conversation lists it makes stale.

/// A command's class, which decides how it may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandClass {
    /// Reads nothing changes: retried on transient errors.
    Read,
    /// Anything that may change state: retried only when the request provably never
    /// reached Chat.
    Write,
}

impl CommandClass {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandClass::Read => "read",
            CommandClass::Write => "write",
        }
    }
}

/// Whose cached `get_list` pages a command makes stale once Chat has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Changes no conversation list.
    None,
    /// The body's `From_Account`.
    FromAccount,
    /// The body's `From_Account` and `To_Account` (one-to-one messages).
    FromAndTo,
}

/// The get_list command, the one the gateway caches.
pub const GET_LIST: &str = "recentcontact/get_list";

/// Documented read-only commands: the shipped default of `retry.idempotent_commands`.
pub const DEFAULT_IDEMPOTENT: &[&str] = &[
    "recentcontact/get_list",
    "recentcontact/get_contact_group",
    "recentcontact/search_contact_group",
    "im_open_login_svc/account_check",
    "profile/portrait_get",
    "sns/friend_get",
    "sns/friend_get_list",
    "sns/friend_check",
    "sns/black_list_get",
    "sns/black_list_check",
    "sns/group_get",
    "group_open_http_svc/get_appid_group_list",
    "group_open_http_svc/get_group_info",
    "group_open_http_svc/get_group_member_info",
    "group_open_http_svc/get_joined_group_list",
    "group_open_http_svc/get_role_in_group",
    "group_open_http_svc/get_group_shutted_uin",
    "group_open_http_svc/group_msg_get_simple",
    "openim/query_online_status",
    "openim/admin_getroammsg",
    "openim/get_c2c_unread_msg_num",
    "openconn_svc/get_history",
    "openim_dirty_words/get",
    "ConfigSvc/GetNoSpeaking",
    "openconfigsvr/getappinfo",
];

/// Documented writes that the gateway knows by name (metrics label them by name).
pub const KNOWN_WRITES: &[&str] = &[
    "recentcontact/delete",
    "recentcontact/mark_contact",
    "recentcontact/create_contact_group",
    "recentcontact/update_contact_group",
    "recentcontact/del_contact_group",
    "openim/sendmsg",
    "openim/batchsendmsg",
    "openim/admin_msgwithdraw",
    "group_open_http_svc/send_group_msg",
    "im_open_login_svc/account_import",
    "im_open_login_svc/account_delete",
];

/// The class of a built-in command; commands not listed are writes unless config
/// names them idempotent.
pub fn builtin_class(command: &str) -> CommandClass {
    match command {
        "recentcontact/get_list"
        | "recentcontact/get_contact_group"
        | "recentcontact/search_contact_group" => CommandClass::Read,
        _ => CommandClass::Write,
    }
}

/// Whose lists `command` makes stale (`shared/chat-api/recentcontact-family.md`).
pub fn staleness(command: &str) -> Staleness {
    match command {
        "recentcontact/delete"
        | "recentcontact/mark_contact"
        | "recentcontact/create_contact_group"
        | "recentcontact/update_contact_group"
        | "recentcontact/del_contact_group" => Staleness::FromAccount,
        "openim/sendmsg" => Staleness::FromAndTo,
        _ => Staleness::None,
    }
}

/// Whether a `routes.*` pattern (`service/command`, `service/*` or `*`) matches
/// `command` (`service/command`).
pub fn pattern_matches(pattern: &str, command: &str) -> bool {
    match pattern.strip_suffix("/*") {
        _ if pattern == "*" => true,
        Some(service) => command.split_once('/').is_some_and(|(s, _)| s == service),
        None => pattern == command,
    }
}

/// Splits a request path `/v4/<service>/<command>` into `service/command`, checking
/// that each part is a plain name. Returns `None` for anything else.
pub fn command_of_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v4/")?;
    let (service, command) = rest.split_once('/')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    (plain(service) && plain(command)).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_classes() {
        assert_eq!(
            command_of_path("/v4/recentcontact/get_list"),
            Some(GET_LIST)
        );
        assert_eq!(command_of_path("/v4/recentcontact/get_list/x"), None);
        assert_eq!(command_of_path("/v4/../etc"), None);
        assert_eq!(command_of_path("/v5/a/b"), None);
        assert_eq!(builtin_class(GET_LIST), CommandClass::Read);
        assert_eq!(builtin_class("openim/sendmsg"), CommandClass::Write);
        assert_eq!(staleness("openim/sendmsg"), Staleness::FromAndTo);
        assert!(DEFAULT_IDEMPOTENT.contains(&GET_LIST));
        assert!(pattern_matches("*", "a/b"));
        assert!(pattern_matches("openim/*", "openim/sendmsg"));
        assert!(!pattern_matches("openim/*", "openimx/sendmsg"));
        assert!(pattern_matches("a/b", "a/b"));
        assert!(!pattern_matches("a/b", "a/bc"));
    }
}
