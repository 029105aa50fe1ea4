//! One table of invalidations: for every write that passes through the gateway and
//! every webhook Chat sends, the entities it changes (`shared/chat-api/*.md`).
//!
//! An **entity** is a piece of Chat's state that cached answers depend on: an
//! account's conversation list, profile, friend list, joined groups or existence; a
//! group's info or members. A cached entry names the entities it depends on
//! ([`super::reads`]); an invalidation names the entities that changed; nothing
//! else links the two, so this table and the reads table are the whole story of
//! what goes stale.
//!
//! Where the docs are silent or disagree, the table invalidates more, never less
//! (for example `friend_delete` drops both sides' friend lists whatever its
//! `DeleteType`, and `account_delete` drops every cached friend list and group
//! member list, since others' lists may mention the deleted account).
//!
//! A write's effects are applied once Chat has answered, whatever the outcome (a
//! failed write may still have been applied).

use serde_json::Value;

/// What kind of state an entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    /// An account's conversation list (`recentcontact/get_list` pages).
    Conversations,
    /// An account's profile tags (`portrait_get`, and the profile tags of
    /// `friend_get_list`).
    Profile,
    /// Whether an account is imported (`account_check`).
    Exists,
    /// An account's friend list and friend tags (`friend_get`, `friend_get_list`).
    Friends,
    /// The groups an account is in (`get_joined_group_list`).
    JoinedGroups,
    /// A group's profile (`get_group_info`, and the group fields of
    /// `get_joined_group_list`).
    GroupInfo,
    /// A group's members and their fields (`get_group_member_info`, the member lists
    /// of `get_group_info`, the `SelfInfo` of `get_joined_group_list`).
    GroupMembers,
}

impl EntityKind {
    /// Every kind, in a fixed order (its index is [`EntityKind::index`]).
    pub const ALL: [EntityKind; 7] = [
        EntityKind::Conversations,
        EntityKind::Profile,
        EntityKind::Exists,
        EntityKind::Friends,
        EntityKind::JoinedGroups,
        EntityKind::GroupInfo,
        EntityKind::GroupMembers,
    ];

    /// The kinds keyed by an account (UserID); the others are keyed by a GroupId.
    pub const OF_ACCOUNT: [EntityKind; 5] = [
        EntityKind::Conversations,
        EntityKind::Profile,
        EntityKind::Exists,
        EntityKind::Friends,
        EntityKind::JoinedGroups,
    ];

    /// The name used in logs, metrics and `POST /admin/cache/invalidate`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Conversations => "Conversations",
            EntityKind::Profile => "Profile",
            EntityKind::Exists => "Exists",
            EntityKind::Friends => "Friends",
            EntityKind::JoinedGroups => "JoinedGroups",
            EntityKind::GroupInfo => "GroupInfo",
            EntityKind::GroupMembers => "GroupMembers",
        }
    }

    /// The kind named `name` (as [`EntityKind::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Position in [`EntityKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the entity is keyed by an account (else by a GroupId).
    pub fn of_account(self) -> bool {
        !matches!(self, EntityKind::GroupInfo | EntityKind::GroupMembers)
    }
}

/// One entity: a kind and the account or GroupId it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity {
    /// What kind of state.
    pub kind: EntityKind,
    /// The UserID or GroupId.
    pub id: String,
}

impl Entity {
    /// An entity.
    pub fn new(kind: EntityKind, id: impl Into<String>) -> Entity {
        Entity {
            kind,
            id: id.into(),
        }
    }
}

/// What an invalidation drops.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// One entity.
    Entity(Entity),
    /// A group event: the group's info and members, and the conversation lists of
    /// every account the gateway knows lists the group (a group message changes
    /// every member's list, and no event names the members).
    Group(String),
    /// Every entity of a kind (when the entities that changed cannot be named, e.g.
    /// the former friends of an account whose whole friend list was deleted both
    /// ways).
    Every(EntityKind),
    /// Everything.
    All,
}

impl Effect {
    /// One entity.
    pub fn one(kind: EntityKind, id: impl Into<String>) -> Effect {
        Effect::Entity(Entity::new(kind, id))
    }
}

/// How far a group event reaches into conversation lists (`cache.group_events`).
///
/// A group message (and a group's creation, a member joining or leaving, the group's
/// destruction, a change of its profile) changes the conversation list of **every
/// member** (`recentcontact-family.md`), and no write or webhook names the members.
/// The gateway knows only the accounts whose cached pages list the group; a member
/// whose cached pages do not (the group below the first page, or not yet in the
/// list) would have its old first page served until the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupEventScope {
    /// Every cached conversation page goes (memory and L2), so none is served that
    /// a group event may have changed. The default.
    #[default]
    AllPages,
    /// Only the pages of the accounts whose cached pages list the group: more
    /// get_list hits when groups are busy, and a member whose cached pages do not
    /// list the group is served its old pages until the TTL.
    ListingAccounts,
}

impl GroupEventScope {
    /// Every scope.
    pub const ALL: [GroupEventScope; 2] =
        [GroupEventScope::AllPages, GroupEventScope::ListingAccounts];

    /// The name `cache.group_events` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupEventScope::AllPages => "all-pages",
            GroupEventScope::ListingAccounts => "listing-accounts",
        }
    }

    /// The scope named `name`.
    pub fn from_name(name: &str) -> Option<GroupEventScope> {
        GroupEventScope::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
    }

    /// `effects` as they reach under this scope: with [`GroupEventScope::AllPages`],
    /// a group event is its group's info and members, and every conversation list;
    /// with [`GroupEventScope::ListingAccounts`] it stays a group event (which drops
    /// the pages of the accounts that list the group).
    pub fn widen(self, effects: &[Effect]) -> std::borrow::Cow<'_, [Effect]> {
        let groups = effects.iter().any(|e| matches!(e, Effect::Group(_)));
        if self == GroupEventScope::ListingAccounts || !groups {
            return std::borrow::Cow::Borrowed(effects);
        }
        let mut out: Vec<Effect> = Vec::with_capacity(effects.len() + 2);
        for e in effects {
            match e {
                Effect::Group(g) => {
                    out.push(Effect::one(EntityKind::GroupInfo, g.as_str()));
                    out.push(Effect::one(EntityKind::GroupMembers, g.as_str()));
                }
                other => out.push(other.clone()),
            }
        }
        let every = Effect::Every(EntityKind::Conversations);
        if !out.contains(&every) {
            out.push(every);
        }
        std::borrow::Cow::Owned(out)
    }
}

/// Where the names an effect applies to are found in a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A top-level field: a string, or an array of strings.
    Field(&'static str),
    /// A field of each object in a top-level array.
    EachOf(&'static str, &'static str),
}

impl Path {
    /// Every non-empty string the path finds in `body` (an object).
    fn names<'a>(self, body: &'a Value, out: &mut Vec<&'a str>) {
        let strings = |v: &'a Value, out: &mut Vec<&'a str>| match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => out.extend(a.iter().filter_map(Value::as_str)),
            _ => {}
        };
        match self {
            Path::Field(f) => {
                if let Some(v) = body.get(f) {
                    strings(v, out);
                }
            }
            Path::EachOf(list, f) => {
                if let Some(Value::Array(items)) = body.get(list) {
                    for item in items {
                        if let Some(v) = item.get(f) {
                            strings(v, out);
                        }
                    }
                }
            }
        }
        out.retain(|s| !s.is_empty());
    }

    /// How the README writes it.
    pub fn describe(self) -> String {
        match self {
            Path::Field(f) => format!("`{f}`"),
            Path::EachOf(list, f) => format!("`{list}[].{f}`"),
        }
    }
}

/// One rule of a row: which entities, named where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The entities of `kinds` of each name found at the path.
    Named(&'static [EntityKind], Path),
    /// A group event for each GroupId found at the path.
    GroupEvent(Path),
    /// Every entity of a kind.
    Every(EntityKind),
    /// Every entity of a kind, unless `field` is absent or equals `value`.
    EveryUnless(EntityKind, &'static str, &'static str),
}

impl Rule {
    fn apply(&self, body: &Value, out: &mut Vec<Effect>) {
        let mut names = Vec::new();
        match *self {
            Rule::Named(kinds, path) => {
                path.names(body, &mut names);
                for n in names {
                    for k in kinds {
                        out.push(Effect::one(*k, n));
                    }
                }
            }
            Rule::GroupEvent(path) => {
                path.names(body, &mut names);
                out.extend(names.into_iter().map(|g| Effect::Group(g.to_string())));
            }
            Rule::Every(kind) => out.push(Effect::Every(kind)),
            Rule::EveryUnless(kind, field, value) => match body.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s == value => {}
                Some(_) => out.push(Effect::Every(kind)),
            },
        }
    }

    /// How the README writes it.
    pub fn describe(&self) -> String {
        let kinds = |ks: &[EntityKind]| {
            ks.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        };
        match self {
            Rule::Named(ks, p) => format!("{} of {}", kinds(ks), p.describe()),
            Rule::GroupEvent(p) => format!("group event of {}", p.describe()),
            Rule::Every(k) => format!("every {}", k.as_str()),
            Rule::EveryUnless(k, f, v) => {
                format!("every {} unless `{f}` is absent or `{v}`", k.as_str())
            }
        }
    }
}

/// A write or a webhook and the rules of what it changes.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// `service/command` for a write, the `CallbackCommand` for a webhook.
    pub name: &'static str,
    /// What it changes.
    pub rules: &'static [Rule],
}

use EntityKind as K;
use Path::{EachOf, Field};
use Rule::{Every, EveryUnless, GroupEvent, Named};

const CONV: &[EntityKind] = &[K::Conversations];
const PROFILE: &[EntityKind] = &[K::Profile];
const FRIENDS: &[EntityKind] = &[K::Friends];
const MEMBERS: &[EntityKind] = &[K::GroupMembers];
const JOINED: &[EntityKind] = &[K::JoinedGroups];
const JOINED_CONV: &[EntityKind] = &[K::JoinedGroups, K::Conversations];
const ACCOUNT_CREATED: &[EntityKind] = &[K::Profile, K::Exists];
const ACCOUNT_ALL: &[EntityKind] = &EntityKind::OF_ACCOUNT;

const fn row(name: &'static str, rules: &'static [Rule]) -> Row {
    Row { name, rules }
}

/// Every write the gateway knows, and what it changes once Chat has answered.
pub const WRITES: &[Row] = &[
    // Conversations (recentcontact-family.md).
    row(
        "recentcontact/delete",
        &[Named(CONV, Field("From_Account"))],
    ),
    row(
        "recentcontact/mark_contact",
        &[Named(CONV, Field("From_Account"))],
    ),
    row(
        "recentcontact/create_contact_group",
        &[Named(CONV, Field("From_Account"))],
    ),
    row(
        "recentcontact/update_contact_group",
        &[Named(CONV, Field("From_Account"))],
    ),
    row(
        "recentcontact/del_contact_group",
        &[Named(CONV, Field("From_Account"))],
    ),
    // One-to-one messages (account.md, recentcontact-family.md).
    row(
        "openim/sendmsg",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    row(
        "openim/batchsendmsg",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    row(
        "openim/importmsg",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    row(
        "openim/admin_msgwithdraw",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    // Profiles (profile.md).
    row(
        "profile/portrait_set",
        &[Named(PROFILE, Field("From_Account"))],
    ),
    // Accounts (account.md): import writes Nick/FaceUrl and flips NotImported;
    // delete erases everything of the account, and others' friend lists and group
    // member lists may mention it, which no index reaches.
    row(
        "im_open_login_svc/account_import",
        &[Named(ACCOUNT_CREATED, Field("UserID"))],
    ),
    row(
        "im_open_login_svc/multiaccount_import",
        &[
            Named(ACCOUNT_CREATED, Field("Accounts")),
            Named(ACCOUNT_CREATED, EachOf("AccountList", "UserID")),
        ],
    ),
    row(
        "im_open_login_svc/account_delete",
        &[
            Named(ACCOUNT_ALL, EachOf("DeleteItem", "UserID")),
            Every(K::Friends),
            Every(K::GroupMembers),
            Every(K::GroupInfo),
        ],
    ),
    // Friends (sns.md). Both sides, whatever AddType/DeleteType say.
    row(
        "sns/friend_add",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, EachOf("AddFriendItem", "To_Account")),
        ],
    ),
    row(
        "sns/friend_import",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, EachOf("AddFriendItem", "To_Account")),
        ],
    ),
    row(
        "sns/friend_update",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, EachOf("UpdateItem", "To_Account")),
        ],
    ),
    row(
        "sns/friend_delete",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, Field("To_Account")),
        ],
    ),
    // With Delete_Type_Both every former friend's list changes, and they are not
    // named: every cached friend list goes.
    row(
        "sns/friend_delete_all",
        &[
            Named(FRIENDS, Field("From_Account")),
            EveryUnless(K::Friends, "DeleteType", "Delete_Type_Single"),
        ],
    ),
    // Blacklisting a friend deletes the friendship (callbacks-more.md).
    row(
        "sns/black_list_add",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, Field("To_Account")),
        ],
    ),
    // Friend groups are the Tag_SNS_IM_Group of friends.
    row(
        "sns/group_add",
        &[
            Named(FRIENDS, Field("From_Account")),
            Named(FRIENDS, Field("To_Account")),
        ],
    ),
    row("sns/group_delete", &[Named(FRIENDS, Field("From_Account"))]),
    // Groups (group.md).
    row(
        "group_open_http_svc/create_group",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, Field("Owner_Account")),
            Named(JOINED_CONV, EachOf("MemberList", "Member_Account")),
        ],
    ),
    row(
        "group_open_http_svc/modify_group_base_info",
        &[GroupEvent(Field("GroupId"))],
    ),
    row(
        "group_open_http_svc/add_group_member",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, EachOf("MemberList", "Member_Account")),
        ],
    ),
    row(
        "group_open_http_svc/delete_group_member",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, Field("MemberToDel_Account")),
        ],
    ),
    row(
        "group_open_http_svc/destroy_group",
        &[GroupEvent(Field("GroupId"))],
    ),
    row(
        "group_open_http_svc/change_group_owner",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED, Field("NewOwner_Account")),
        ],
    ),
    row(
        "group_open_http_svc/modify_group_member_info",
        &[
            Named(MEMBERS, Field("GroupId")),
            Named(JOINED, Field("Member_Account")),
        ],
    ),
    row(
        "group_open_http_svc/forbid_send_msg",
        &[Named(MEMBERS, Field("GroupId"))],
    ),
    row(
        "group_open_http_svc/send_group_msg",
        &[GroupEvent(Field("GroupId"))],
    ),
];

/// What a write of a service the table does not list changes, for writes only
/// (never for the documented reads): any other group command is a group event of
/// its `GroupId`, any other friend command changes `From_Account`'s friends, any
/// other profile command its profile.
pub const SERVICE_FALLBACKS: &[Row] = &[
    row("group_open_http_svc/*", &[GroupEvent(Field("GroupId"))]),
    row("sns/*", &[Named(FRIENDS, Field("From_Account"))]),
    row("profile/*", &[Named(PROFILE, Field("From_Account"))]),
];

/// Every webhook the gateway acts on, and what it announces.
pub const WEBHOOKS: &[Row] = &[
    // callbacks.md
    row(
        "C2C.CallbackAfterSendMsg",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    row(
        "C2C.CallbackAfterMsgWithDraw",
        &[
            Named(CONV, Field("From_Account")),
            Named(CONV, Field("To_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterSendMsg",
        &[GroupEvent(Field("GroupId"))],
    ),
    row(
        "Group.CallbackAfterRecallMsg",
        &[GroupEvent(Field("GroupId"))],
    ),
    row(
        "Group.CallbackAfterNewMemberJoin",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, EachOf("NewMemberList", "Member_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterMemberExit",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, EachOf("ExitMemberList", "Member_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterGroupDestroyed",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, EachOf("MemberList", "Member_Account")),
        ],
    ),
    // callbacks-more.md
    row(
        "Profile.CallbackPortraitSet",
        &[Named(PROFILE, Field("From_Account"))],
    ),
    row(
        "Sns.CallbackFriendAdd",
        &[
            Named(FRIENDS, EachOf("PairList", "From_Account")),
            Named(FRIENDS, EachOf("PairList", "To_Account")),
        ],
    ),
    row(
        "Sns.CallbackFriendDelete",
        &[
            Named(FRIENDS, EachOf("PairList", "From_Account")),
            Named(FRIENDS, EachOf("PairList", "To_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterCreateGroup",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED_CONV, Field("Owner_Account")),
            Named(JOINED_CONV, EachOf("MemberList", "Member_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterGroupInfoChanged",
        &[GroupEvent(Field("GroupId"))],
    ),
    // The doc names the member `Member_Account`, the Java SDK `Modified_Account`.
    row(
        "Group.CallbackAfterMemberFieldChanged",
        &[
            Named(MEMBERS, Field("GroupId")),
            Named(JOINED, Field("Member_Account")),
            Named(JOINED, Field("Modified_Account")),
        ],
    ),
    row(
        "Group.CallbackAfterChangeGroupOwner",
        &[
            GroupEvent(Field("GroupId")),
            Named(JOINED, Field("OldOwner_Account")),
            Named(JOINED, Field("NewOwner_Account")),
        ],
    ),
];

fn apply_rules(rules: &[Rule], body: &[u8]) -> Vec<Effect> {
    // An unparsable body names nothing (Chat refuses it too); an empty one is `{}`.
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for r in rules {
        r.apply(&v, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The row of a write, if the table lists it (a service fallback otherwise, when
/// `is_write`).
pub fn write_row(command: &str, is_write: bool) -> Option<&'static Row> {
    if let Some(r) = WRITES.iter().find(|r| r.name == command) {
        return Some(r);
    }
    if !is_write || super::reads::is_documented_read(command) {
        return None;
    }
    SERVICE_FALLBACKS
        .iter()
        .find(|r| super::commands::pattern_matches(r.name, command))
}

/// What the write `command` with `body` changes. `is_write` is the command's class
/// (a command configured as idempotent is a read and gets no service fallback).
pub fn of_write(command: &str, is_write: bool, body: &[u8]) -> Vec<Effect> {
    match write_row(command, is_write) {
        Some(r) => apply_rules(r.rules, body),
        None => Vec::new(),
    }
}

/// What the webhook `command` with `body` announces; `None` when the gateway does not
/// act on it (acknowledged and ignored).
pub fn of_webhook(command: &str, body: &[u8]) -> Option<Vec<Effect>> {
    WEBHOOKS
        .iter()
        .find(|r| r.name == command)
        .map(|r| apply_rules(r.rules, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(k: EntityKind, id: &str) -> Effect {
        Effect::one(k, id)
    }

    #[test]
    fn kinds_round_trip_their_names() {
        for (i, k) in EntityKind::ALL.into_iter().enumerate() {
            assert_eq!(EntityKind::from_name(k.as_str()), Some(k));
            assert_eq!(k.index(), i);
            assert_eq!(k.of_account(), EntityKind::OF_ACCOUNT.contains(&k));
        }
        assert_eq!(EntityKind::from_name("GroupId"), None);
    }

    #[test]
    fn a_group_event_reaches_every_conversation_list_unless_scoped_to_listing_accounts() {
        let effects = [
            Effect::Group("@g".into()),
            one(K::Profile, "a"),
            Effect::Group("@h".into()),
        ];
        assert_eq!(
            GroupEventScope::AllPages.widen(&effects).into_owned(),
            vec![
                one(K::GroupInfo, "@g"),
                one(K::GroupMembers, "@g"),
                one(K::Profile, "a"),
                one(K::GroupInfo, "@h"),
                one(K::GroupMembers, "@h"),
                Effect::Every(K::Conversations),
            ]
        );
        assert_eq!(
            GroupEventScope::ListingAccounts
                .widen(&effects)
                .into_owned(),
            effects.to_vec()
        );
        let none = [one(K::Profile, "a")];
        assert_eq!(
            GroupEventScope::AllPages.widen(&none).into_owned(),
            none.to_vec()
        );
        for s in GroupEventScope::ALL {
            assert_eq!(GroupEventScope::from_name(s.as_str()), Some(s));
        }
        assert_eq!(GroupEventScope::default(), GroupEventScope::AllPages);
    }

    #[test]
    fn batchsendmsg_names_the_sender_and_every_receiver() {
        let e = of_write(
            "openim/batchsendmsg",
            true,
            br#"{"From_Account":"a","To_Account":["b","c",""],"MsgBody":[]}"#,
        );
        assert_eq!(
            e,
            vec![
                one(K::Conversations, "a"),
                one(K::Conversations, "b"),
                one(K::Conversations, "c")
            ]
        );
        // Without a sender, only the receivers.
        let e = of_write("openim/batchsendmsg", true, br#"{"To_Account":["b"]}"#);
        assert_eq!(e, vec![one(K::Conversations, "b")]);
    }

    #[test]
    fn account_delete_drops_everything_of_the_account_and_lists_that_may_mention_it() {
        let e = of_write(
            "im_open_login_svc/account_delete",
            true,
            br#"{"DeleteItem":[{"UserID":"u1"},{"UserID":"u2"}]}"#,
        );
        for k in EntityKind::OF_ACCOUNT {
            assert!(
                e.contains(&one(k, "u1")) && e.contains(&one(k, "u2")),
                "{k:?}"
            );
        }
        for k in [K::Friends, K::GroupMembers, K::GroupInfo] {
            assert!(e.contains(&Effect::Every(k)));
        }
    }

    #[test]
    fn friend_delete_all_is_wide_only_both_ways() {
        let single = of_write("sns/friend_delete_all", true, br#"{"From_Account":"a"}"#);
        assert_eq!(single, vec![one(K::Friends, "a")]);
        let single = of_write(
            "sns/friend_delete_all",
            true,
            br#"{"From_Account":"a","DeleteType":"Delete_Type_Single"}"#,
        );
        assert_eq!(single, vec![one(K::Friends, "a")]);
        let both = of_write(
            "sns/friend_delete_all",
            true,
            br#"{"From_Account":"a","DeleteType":"Delete_Type_Both"}"#,
        );
        assert!(both.contains(&Effect::Every(K::Friends)));
        // Anything unexpected is treated as Both.
        let odd = of_write(
            "sns/friend_delete_all",
            true,
            br#"{"From_Account":"a","DeleteType":7}"#,
        );
        assert!(odd.contains(&Effect::Every(K::Friends)));
    }

    #[test]
    fn group_writes_are_group_events_plus_the_members_named() {
        let e = of_write(
            "group_open_http_svc/add_group_member",
            true,
            br#"{"GroupId":"@g","MemberList":[{"Member_Account":"x"},{"Member_Account":"y"}]}"#,
        );
        assert!(e.contains(&Effect::Group("@g".into())));
        for u in ["x", "y"] {
            assert!(e.contains(&one(K::JoinedGroups, u)));
            assert!(e.contains(&one(K::Conversations, u)));
        }
        let e = of_write(
            "group_open_http_svc/delete_group_member",
            true,
            br#"{"GroupId":"@g","MemberToDel_Account":["x"]}"#,
        );
        assert!(e.contains(&one(K::JoinedGroups, "x")));
        // An unlisted group write: a group event of its GroupId.
        let e = of_write(
            "group_open_http_svc/import_group_member",
            true,
            br#"{"GroupId":"@h"}"#,
        );
        assert_eq!(e, vec![Effect::Group("@h".into())]);
        // ... but never for a read, nor a command configured as idempotent.
        assert!(of_write(
            "group_open_http_svc/get_group_info",
            true,
            br#"{"GroupId":"@h"}"#
        )
        .is_empty());
        assert!(of_write("group_open_http_svc/import_group_member", false, b"{}").is_empty());
    }

    #[test]
    fn webhooks_name_what_they_announce() {
        let e = of_webhook(
            "Sns.CallbackFriendAdd",
            br#"{"PairList":[{"From_Account":"a","To_Account":"b","Initiator_Account":"a"}]}"#,
        )
        .unwrap();
        assert_eq!(e, vec![one(K::Friends, "a"), one(K::Friends, "b")]);
        let e = of_webhook(
            "Group.CallbackAfterMemberFieldChanged",
            br#"{"GroupId":"@g","Modified_Account":"m"}"#,
        )
        .unwrap();
        assert_eq!(
            e,
            vec![one(K::JoinedGroups, "m"), one(K::GroupMembers, "@g")]
        );
        let e = of_webhook(
            "Profile.CallbackPortraitSet",
            br#"{"From_Account":"alice","ProfileItem":[]}"#,
        )
        .unwrap();
        assert_eq!(e, vec![one(K::Profile, "alice")]);
        assert_eq!(of_webhook("State.StateChange", b"{}"), None);
        // A body that is not JSON names nothing, and does not panic.
        assert_eq!(
            of_webhook("Profile.CallbackPortraitSet", b"\xff{"),
            Some(vec![])
        );
    }

    #[test]
    fn every_row_is_named_once() {
        for table in [WRITES, WEBHOOKS, SERVICE_FALLBACKS] {
            let mut names: Vec<&str> = table.iter().map(|r| r.name).collect();
            names.sort();
            let n = names.len();
            names.dedup();
            assert_eq!(names.len(), n);
        }
        for r in WRITES {
            assert!(
                !super::super::reads::is_documented_read(r.name),
                "{} is a read",
                r.name
            );
        }
    }
}
