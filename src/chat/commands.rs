//! The command table: whether each command is a read (safe to retry), and the names
//! metrics know. What a write makes stale is the table of invalidations
//! ([`super::effects`]); what is cached, the table of reads ([`super::reads`]).

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

/// The get_list command (its own route, key and page store).
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
    "openim/importmsg",
    "profile/portrait_set",
    "im_open_login_svc/multiaccount_import",
    "sns/friend_add",
    "sns/friend_import",
    "sns/friend_update",
    "sns/friend_delete",
    "sns/friend_delete_all",
    "sns/black_list_add",
    "sns/group_add",
    "sns/group_delete",
    "group_open_http_svc/create_group",
    "group_open_http_svc/modify_group_base_info",
    "group_open_http_svc/add_group_member",
    "group_open_http_svc/delete_group_member",
    "group_open_http_svc/destroy_group",
    "group_open_http_svc/change_group_owner",
    "group_open_http_svc/modify_group_member_info",
    "group_open_http_svc/forbid_send_msg",
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
        for w in super::super::effects::WRITES {
            assert!(
                KNOWN_WRITES.contains(&w.name),
                "{} has no metric label",
                w.name
            );
        }
        assert!(DEFAULT_IDEMPOTENT.contains(&GET_LIST));
        assert!(pattern_matches("*", "a/b"));
        assert!(pattern_matches("openim/*", "openim/sendmsg"));
        assert!(!pattern_matches("openim/*", "openimx/sendmsg"));
        assert!(pattern_matches("a/b", "a/b"));
        assert!(!pattern_matches("a/b", "a/bc"));
    }
}
