//! One table of cacheable reads: for each command the gateway caches, how a request
//! splits into items, what else is part of the key, how Chat's answer splits back
//! into per-item entries, which entities an entry depends on, and its default TTLs
//! with the reason for each (`shared/chat-api/*.md`).
//!
//! Two kinds of row:
//! - **batched reads** (`portrait_get`, `get_group_info`, `account_check`,
//!   `friend_get_list`): a request names up to N items; each item of the answer is
//!   cached on its own, so requests that share items share entries, and a request
//!   whose items are partly cached asks Chat only for the others;
//! - **single reads** (`friend_get`, `get_joined_group_list`,
//!   `get_group_member_info`, and `recentcontact/get_list`, which keeps its own page
//!   store): the whole answer is the entry, keyed by the one account or group it is
//!   about plus every other field.
//!
//! What goes stale when is the other half: [`super::effects`] names the entities
//! every write and webhook changes. Nothing else decides either.

use super::effects::EntityKind;

/// Longest UserID Chat accepts (bytes).
pub const MAX_ACCOUNT_BYTES: usize = 32;
/// Longest GroupId the gateway caches (bytes): Chat's custom GroupIds are at most
/// 48 bytes; a longer one is forwarded uncached.
pub const MAX_GROUP_ID_BYTES: usize = 48;
/// Groups a `get_joined_group_list` answer may list and still be cached: each one
/// is a dependency checked on every hit.
pub const MAX_LISTED_DEPS: usize = 512;

/// How a request names its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemShape {
    /// An array of strings: `{"To_Account":["a","b"]}`.
    List(&'static str),
    /// An array of objects with one string field each: `{"CheckItem":[{"UserID":"a"}]}`.
    ObjectList(&'static str, &'static str),
    /// One string; the whole answer is its entry: `{"From_Account":"a", ...}`.
    Scalar(&'static str),
}

impl ItemShape {
    /// The request field that holds the items.
    pub fn field(self) -> &'static str {
        match self {
            ItemShape::List(f) | ItemShape::ObjectList(f, _) | ItemShape::Scalar(f) => f,
        }
    }
}

/// How an answer splits into entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerShape {
    /// One object per requested item in `array`, named by its `id` field.
    Items {
        /// The answer's item array (`UserProfileItem`).
        array: &'static str,
        /// The field of an answer item that names it (`To_Account`).
        id: &'static str,
        /// The per-item result code (`ResultCode`, or `ErrorCode` for groups): only
        /// items where it is 0 are cached.
        code: &'static str,
        /// A further condition for caching an item: this field has this value
        /// (`account_check` caches only `"AccountStatus":"Imported"`).
        only_if: Option<(&'static str, &'static str)>,
        /// The top-level list of failed items (`Fail_Account`), recomputed for an
        /// assembled answer; `None` for commands without one.
        fail_list: Option<&'static str>,
        /// An all-cached answer before Chat has shown its own: the top-level members
        /// before the item array, each written `"name":value,`, as the contract
        /// pages show them. Replaced by the members of Chat's latest answer in which
        /// no item failed.
        before: &'static str,
        /// The members after the item array, each written `,"name":value`.
        after: &'static str,
    },
    /// The whole answer is one entry, cached when `ActionStatus` is OK and
    /// `ErrorCode` 0.
    Whole,
}

/// Entities an entry depends on that its answer lists (the groups of a
/// `get_joined_group_list` answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedDeps {
    /// The answer's array.
    pub array: &'static str,
    /// The field of each element naming the entity.
    pub id: &'static str,
    /// The kinds depended on, for each name.
    pub kinds: &'static [EntityKind],
}

/// Where a row's entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The per-account page store of get_list (its own handler, key and hit path).
    Pages,
    /// The per-item store.
    Items,
}

/// One cached command.
#[derive(Debug, Clone, Copy)]
pub struct ReadRow {
    /// `service/command`.
    pub command: &'static str,
    /// How its requests name items.
    pub items: ItemShape,
    /// Most items per request (Chat's documented limit); more is forwarded uncached.
    pub max_items: usize,
    /// Longest item (bytes); a longer one makes the request uncached.
    pub max_item_bytes: usize,
    /// Fields Chat requires besides the items; a request without one is forwarded
    /// uncached (Chat answers its error).
    pub required: &'static [&'static str],
    /// A request field that is part of every entry's dependencies (a string), with
    /// the kind of entity it names: `friend_get_list`'s `From_Account` (its friends).
    pub scope: Option<(&'static str, EntityKind)>,
    /// How answers split into entries.
    pub answer: AnswerShape,
    /// The kinds of entity named by the item that each entry depends on.
    pub item_deps: &'static [EntityKind],
    /// Entities the answer lists that the entry depends on too.
    pub listed_deps: Option<ListedDeps>,
    /// Default `ttl_secs`.
    pub ttl_secs: u64,
    /// Default `stale_if_error_secs`.
    pub stale_if_error_secs: u64,
    /// Why those defaults (for the README and `check-config`).
    pub why: &'static str,
    /// Where its entries live.
    pub store: Store,
}

use AnswerShape::{Items, Whole};
use EntityKind as K;
use ItemShape::{List, ObjectList, Scalar};

/// Every cached command. A row's index is its id everywhere (config, metrics, keys).
pub const READS: &[ReadRow] = &[
    ReadRow {
        command: "profile/portrait_get",
        items: List("To_Account"),
        max_items: 100,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &["TagList"],
        scope: None,
        answer: Items {
            array: "UserProfileItem",
            id: "To_Account",
            code: "ResultCode",
            only_if: None,
            fail_list: Some("Fail_Account"),
            before: "",
            after: r#","ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":"""#,
        },
        item_deps: &[K::Profile],
        listed_deps: None,
        ttl_secs: 60,
        stale_if_error_secs: 300,
        why: "profiles change through portrait_set and account imports, which pass through the gateway, and Profile.CallbackPortraitSet reports changes made by clients; only a missed webhook or an import made elsewhere waits for the TTL",
        store: Store::Items,
    },
    ReadRow {
        command: "group_open_http_svc/get_group_info",
        items: List("GroupIdList"),
        max_items: 50,
        max_item_bytes: MAX_GROUP_ID_BYTES,
        required: &[],
        scope: None,
        answer: Items {
            array: "GroupInfo",
            id: "GroupId",
            code: "ErrorCode",
            only_if: None,
            fail_list: None,
            before: r#""ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","#,
            after: "",
        },
        item_deps: &[K::GroupInfo, K::GroupMembers],
        listed_deps: None,
        ttl_secs: 10,
        stale_if_error_secs: 300,
        why: "LastMsgTime, NextMsgSeq and MemberNum move with every message and join, and many group settings change with no webhook at all; short, like get_list",
        store: Store::Items,
    },
    ReadRow {
        command: "im_open_login_svc/account_check",
        items: ObjectList("CheckItem", "UserID"),
        max_items: 100,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &[],
        scope: None,
        answer: Items {
            array: "ResultItem",
            id: "UserID",
            code: "ResultCode",
            only_if: Some(("AccountStatus", "Imported")),
            fail_list: None,
            before: r#""ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","#,
            after: "",
        },
        item_deps: &[K::Exists],
        listed_deps: None,
        ttl_secs: 300,
        stale_if_error_secs: 300,
        why: "only \"Imported\" answers are cached, and only account_delete (a REST call, which invalidates when it passes through the gateway) undoes that; the TTL covers deletions made elsewhere. \"NotImported\" is never cached: an import can flip it at any moment",
        store: Store::Items,
    },
    ReadRow {
        command: "sns/friend_get_list",
        items: List("To_Account"),
        max_items: 100,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &["TagList"],
        scope: Some(("From_Account", K::Friends)),
        answer: Items {
            array: "InfoItem",
            id: "To_Account",
            code: "ResultCode",
            only_if: None,
            fail_list: Some("Fail_Account"),
            before: "",
            after: r#","ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":"""#,
        },
        item_deps: &[K::Profile],
        listed_deps: None,
        ttl_secs: 30,
        stale_if_error_secs: 300,
        why: "adds and deletes are announced by webhooks and profile changes by Profile.CallbackPortraitSet, but friend_import, friend_update and remark edits made in the client SDKs are not: only the TTL covers those",
        store: Store::Items,
    },
    ReadRow {
        command: "sns/friend_get",
        items: Scalar("From_Account"),
        max_items: 1,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &["StartIndex"],
        scope: None,
        answer: Whole,
        item_deps: &[K::Friends],
        listed_deps: None,
        ttl_secs: 30,
        stale_if_error_secs: 300,
        why: "as friend_get_list: client-side friend edits other than adds and deletes send no webhook",
        store: Store::Items,
    },
    ReadRow {
        command: "group_open_http_svc/get_joined_group_list",
        items: Scalar("Member_Account"),
        max_items: 1,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &[],
        scope: None,
        answer: Whole,
        item_deps: &[K::JoinedGroups],
        listed_deps: Some(ListedDeps {
            array: "GroupIdList",
            id: "GroupId",
            kinds: &[K::GroupInfo, K::GroupMembers],
        }),
        ttl_secs: 10,
        stale_if_error_secs: 300,
        why: "joins and exits are announced, but the group fields and SelfInfo it may carry (MsgSeq moves when the member reads) change without any event",
        store: Store::Items,
    },
    ReadRow {
        command: "group_open_http_svc/get_group_member_info",
        items: Scalar("GroupId"),
        max_items: 1,
        max_item_bytes: MAX_GROUP_ID_BYTES,
        required: &[],
        scope: None,
        answer: Whole,
        item_deps: &[K::GroupMembers],
        listed_deps: None,
        ttl_secs: 10,
        stale_if_error_secs: 300,
        why: "a member's MsgSeq moves when it reads and LastSendMsgTime when it sends, and client-side mutes send no webhook",
        store: Store::Items,
    },
    ReadRow {
        command: super::commands::GET_LIST,
        items: Scalar("From_Account"),
        max_items: 1,
        max_item_bytes: MAX_ACCOUNT_BYTES,
        required: &[],
        scope: None,
        answer: Whole,
        item_deps: &[K::Conversations],
        listed_deps: None,
        ttl_secs: 10,
        stale_if_error_secs: 300,
        why: "set by cache.ttl_secs and cache.stale_if_error_secs; conversation lists change with every message, and client-side pins, deletes and marks send no webhook",
        store: Store::Pages,
    },
];

/// Reads that are never cached, and why.
pub const NEVER_CACHED: &[(&str, &str)] = &[(
    "openim/query_online_status",
    "online state changes with every login and logout, and no webhook the gateway receives reports it",
)];

/// The row of `command` and its id, if the gateway caches it.
pub fn row(command: &str) -> Option<(usize, &'static ReadRow)> {
    READS.iter().enumerate().find(|(_, r)| r.command == command)
}

/// The row of `command` if its entries live in the item store.
pub fn item_row(command: &str) -> Option<(usize, &'static ReadRow)> {
    row(command).filter(|(_, r)| r.store == Store::Items)
}

/// Whether `command` is one of Chat's documented reads (cached or not).
pub fn is_documented_read(command: &str) -> bool {
    row(command).is_some() || super::commands::DEFAULT_IDEMPOTENT.contains(&command)
}

impl ReadRow {
    /// Every kind of entity an entry of this row may depend on.
    pub fn dep_kinds(&self) -> impl Iterator<Item = EntityKind> + '_ {
        self.scope
            .map(|(_, k)| k)
            .into_iter()
            .chain(self.item_deps.iter().copied())
            .chain(
                self.listed_deps
                    .iter()
                    .flat_map(|l| l.kinds.iter().copied()),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_consistent() {
        let mut names: Vec<&str> = READS.iter().map(|r| r.command).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), READS.len());
        for r in READS {
            assert!(
                super::super::commands::DEFAULT_IDEMPOTENT.contains(&r.command),
                "{} must be retried as a read",
                r.command
            );
            assert!(r.ttl_secs > 0);
            assert!(r.max_item_bytes <= 64, "keys are built in a stack buffer");
            match (r.items, r.answer) {
                (ItemShape::Scalar(_), Whole) => assert_eq!(r.max_items, 1),
                (ItemShape::Scalar(_), _) | (_, Whole) => panic!("{}: shapes disagree", r.command),
                _ => assert!(r.max_items > 1),
            }
            assert!(
                r.dep_kinds().count() > 0,
                "{} depends on nothing",
                r.command
            );
        }
        assert_eq!(
            row(super::super::commands::GET_LIST).unwrap().1.store,
            Store::Pages
        );
        assert!(item_row(super::super::commands::GET_LIST).is_none());
        assert!(row("openim/query_online_status").is_none());
        assert!(is_documented_read("openim/query_online_status"));
    }
}
