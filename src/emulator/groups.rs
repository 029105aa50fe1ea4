//! Groups: their profiles and member rows (generated from the seed), the group reads
//! (`get_group_info`, `get_group_member_info`, `get_joined_group_list`) and the group
//! writes, with Chat's webhooks.
//!
//! All groups live in one [`GroupTable`] behind one lock (taken before any account
//! lock). Members are kept in join order, which is the order answers list them.
//! Every member has the group's conversation in its list at the group's
//! `LastMsgTime`: creating a group is its first event (it gets a MsgTime like a
//! message), joining puts the conversation into the new member's list, leaving and
//! destroying take it out.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::profile::{object, req_str, str_list};
use super::protocol::{reply, Actor, ApiError, Envelope, Reply};
use super::rng::{mix64, SplitMix64};
use super::state::{unix_now, unix_now_ms, State};
use super::world::{write, Conv, Peer, World};

/// Most groups one get_group_info names.
pub(crate) const MAX_GROUP_INFO: usize = 50;
/// Largest get_group_member_info `Limit` (the SDKs' and the older field table's
/// figure; the pagination text says 200).
pub(crate) const MAX_MEMBER_LIMIT: u64 = 6000;
/// Largest get_joined_group_list `Limit`.
pub(crate) const MAX_JOINED_LIMIT: u64 = 5000;
/// Most members one create_group MemberList holds.
pub(crate) const MAX_CREATE_MEMBERS: usize = 100;
/// Most members one add_group_member adds (trtc.io / tencentcloud.com; one newer
/// page says 20).
pub(crate) const MAX_ADD_MEMBERS: usize = 300;
/// Most members one delete_group_member removes.
pub(crate) const MAX_DELETE_MEMBERS: usize = 100;
/// Most members one forbid_send_msg names.
pub(crate) const MAX_FORBID_MEMBERS: usize = 500;
/// Group custom fields declared in the emulator's console.
const GROUP_KEYS: [&str; 2] = ["Topic", "Region"];
/// Member custom fields declared in the emulator's console.
const MEMBER_KEYS: [&str; 2] = ["Title", "Badge"];
/// MuteTime meaning "muted forever".
const MUTE_FOREVER: u64 = 4_294_967_295;

/// A group type as Chat spells it (the new names Work and Meeting are aliases of
/// Private and ChatRoom and are kept as given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupType {
    Private,
    Work,
    Public,
    ChatRoom,
    Meeting,
    AVChatRoom,
    Community,
}

impl GroupType {
    const ALL: [GroupType; 7] = [
        GroupType::Private,
        GroupType::Work,
        GroupType::Public,
        GroupType::ChatRoom,
        GroupType::Meeting,
        GroupType::AVChatRoom,
        GroupType::Community,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GroupType::Private => "Private",
            GroupType::Work => "Work",
            GroupType::Public => "Public",
            GroupType::ChatRoom => "ChatRoom",
            GroupType::Meeting => "Meeting",
            GroupType::AVChatRoom => "AVChatRoom",
            GroupType::Community => "Community",
        }
    }

    fn parse(s: &str) -> Option<GroupType> {
        GroupType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The type with aliases folded (Work → Private, Meeting → ChatRoom).
    fn base(self) -> GroupType {
        match self {
            GroupType::Work => GroupType::Private,
            GroupType::Meeting => GroupType::ChatRoom,
            t => t,
        }
    }

    /// Default (and largest) MaxMemberNum.
    fn max_members(self) -> u64 {
        match self.base() {
            GroupType::Private => 200,
            GroupType::Public => 2000,
            GroupType::ChatRoom => 10_000,
            GroupType::Community => 100_000,
            _ => 1_000_000,
        }
    }

    fn is_av(self) -> bool {
        self == GroupType::AVChatRoom
    }
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "Owner",
            Role::Admin => "Admin",
            Role::Member => "Member",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        [Role::Owner, Role::Admin, Role::Member]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    fn manages(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

const MSG_FLAGS: [&str; 3] = ["AcceptAndNotify", "AcceptNotNotify", "Discard"];
const APPLY_OPTIONS: [&str; 3] = ["FreeAccess", "NeedPermission", "DisableApply"];
const INVITE_OPTIONS: [&str; 3] = ["FreeAccess", "NeedPermission", "DisableInvite"];

/// One member row.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub account: u32,
    pub role: Role,
    pub join_time: u64,
    pub msg_seq: u64,
    pub msg_flag: &'static str,
    pub last_send_msg_time: u64,
    pub mute_until: u64,
    pub name_card: String,
    pub app_defined: Vec<(String, String)>,
}

impl Member {
    fn new(account: u32, role: Role, now: u64, next_msg_seq: u64) -> Member {
        Member {
            account,
            role,
            join_time: now,
            msg_seq: next_msg_seq.saturating_sub(1),
            msg_flag: "AcceptAndNotify",
            last_send_msg_time: 0,
            mute_until: 0,
            name_card: String::new(),
            app_defined: Vec::new(),
        }
    }
}

/// A group's profile and members.
#[derive(Debug, Clone)]
pub(crate) struct GroupData {
    pub kind: GroupType,
    pub name: String,
    pub introduction: String,
    pub notification: String,
    pub face_url: String,
    pub owner: Option<u32>,
    pub create_time: u64,
    pub info_seq: u64,
    pub last_info_time: u64,
    pub last_msg_time: u64,
    pub next_msg_seq: u64,
    pub max_member_num: u64,
    pub apply_join: &'static str,
    pub invite_join: &'static str,
    pub mute_all: bool,
    pub app_defined: Vec<(String, String)>,
    /// In join order.
    pub members: Vec<Member>,
}

impl GroupData {
    fn member(&self, account: u32) -> Option<&Member> {
        self.members.iter().find(|m| m.account == account)
    }

    fn member_mut(&mut self, account: u32) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.account == account)
    }

    /// Member slots, ascending: the order to lock their accounts in.
    pub(crate) fn sorted_members(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.members.iter().map(|m| m.account).collect();
        v.sort_unstable();
        v
    }

    fn profile_changed(&mut self, now: u64) {
        self.info_seq += 1;
        self.last_info_time = now;
    }
}

/// Every group, by slot, plus the account → groups index.
#[derive(Debug, Default)]
pub(crate) struct GroupTable {
    /// By group slot; `None` once destroyed.
    pub slots: Vec<Option<GroupData>>,
    /// Per account slot: the live groups it is a member of.
    pub joined: Vec<BTreeSet<u32>>,
    /// Groups created so far (seeds the next automatic GroupId).
    pub created: u64,
}

impl GroupTable {
    /// The live group in slot `g`.
    pub(crate) fn get(&self, g: u32) -> Option<&GroupData> {
        self.slots.get(g as usize).and_then(Option::as_ref)
    }

    /// Live groups.
    pub(crate) fn live(&self) -> impl Iterator<Item = (u32, &GroupData)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(g, d)| d.as_ref().map(|d| (g as u32, d)))
    }

    fn join(&mut self, account: u32, g: u32) {
        if let Some(set) = self.joined.get_mut(account as usize) {
            set.insert(g);
        }
    }

    fn leave(&mut self, account: u32, g: u32) {
        if let Some(set) = self.joined.get_mut(account as usize) {
            set.remove(&g);
        }
    }
}

/// A generated group before its profile is drawn: id, members in join order, and
/// the time of its last message.
#[derive(Debug, Clone)]
pub(crate) struct RawGroup {
    pub id: String,
    pub members: Vec<u32>,
    pub last_msg_time: u64,
}

const ADJECTIVES: [&str; 16] = [
    "Blue", "Quiet", "Rapid", "Golden", "North", "Bright", "Lucky", "Silver", "Green", "Brave",
    "Calm", "Wild", "Early", "Happy", "Round", "Urban",
];
const NOUNS: [&str; 16] = [
    "Team", "Club", "Circle", "Crew", "Guild", "Lounge", "Squad", "Forum", "Society", "Band",
    "League", "Room", "Hub", "Camp", "Table", "Corner",
];

/// Draws every generated group's profile and member rows from its own stream (so
/// conversations stay as they were) and indexes them: the table and GroupId → slot.
pub(crate) fn generate(
    raw: Vec<RawGroup>,
    seed: u64,
    epoch: u64,
    slots: usize,
) -> (GroupTable, HashMap<Box<str>, u32>) {
    let mut by_id: HashMap<Box<str>, u32> = HashMap::with_capacity(raw.len());
    let mut rng = SplitMix64::new(mix64(seed ^ 0x6_2001));
    let span = 8 * 7 * 86_400;
    let mut table = GroupTable {
        slots: Vec::with_capacity(raw.len()),
        joined: vec![BTreeSet::new(); slots],
        created: 0,
    };
    for (g, r) in raw.into_iter().enumerate() {
        let pick = rng.below(100);
        let kind = if pick < 40 {
            GroupType::Public
        } else if pick < 70 {
            GroupType::Private
        } else if pick < 90 {
            GroupType::ChatRoom
        } else {
            GroupType::Community
        };
        let name = format!(
            "{} {}",
            ADJECTIVES[rng.below(16) as usize],
            NOUNS[rng.below(16) as usize]
        );
        let create_time = epoch - span - 1 - rng.below(60 * 86_400);
        let next_msg_seq = rng.range(10, 5000);
        let mut members: Vec<Member> = Vec::with_capacity(r.members.len());
        let mut join = create_time;
        let owned = rng.chance(0.95);
        for (k, &m) in r.members.iter().enumerate() {
            let role = if k == 0 && owned {
                Role::Owner
            } else if rng.chance(0.08) {
                Role::Admin
            } else {
                Role::Member
            };
            if k > 0 {
                join += 1 + rng.below(3 * 86_400);
            }
            let flag = rng.below(100);
            let mut row = Member {
                account: m,
                role,
                join_time: join,
                msg_seq: rng.below(next_msg_seq),
                msg_flag: MSG_FLAGS[if flag < 85 {
                    0
                } else if flag < 95 {
                    1
                } else {
                    2
                }],
                last_send_msg_time: 0,
                mute_until: 0,
                name_card: String::new(),
                app_defined: Vec::new(),
            };
            if rng.chance(0.6) {
                row.last_send_msg_time = join + rng.below(r.last_msg_time.saturating_sub(join) + 1);
            }
            if rng.chance(0.03) {
                row.mute_until = epoch + 1 + rng.below(30 * 86_400);
            }
            if rng.chance(0.2) {
                row.name_card = format!("card {:03}", rng.below(1000));
            }
            if rng.chance(0.1) {
                let title = ["lead", "ops", "guest"][rng.below(3) as usize];
                row.app_defined.push(("Title".into(), title.into()));
            }
            members.push(row);
        }
        let mut app_defined = Vec::new();
        if rng.chance(0.3) {
            app_defined.push(("Topic".to_owned(), format!("topic {}", rng.below(100))));
        }
        if rng.chance(0.2) {
            let region = ["eu", "us", "ap"][rng.below(3) as usize];
            app_defined.push(("Region".to_owned(), region.to_owned()));
        }
        let data = GroupData {
            kind,
            introduction: if rng.chance(0.6) {
                format!("About the {name}")
            } else {
                String::new()
            },
            notification: if rng.chance(0.4) {
                format!("Rule {}: be kind", rng.below(10))
            } else {
                String::new()
            },
            face_url: if rng.chance(0.5) {
                format!("https://img.example.com/group/{:016x}.png", rng.next_u64())
            } else {
                String::new()
            },
            name,
            owner: owned.then(|| r.members[0]),
            create_time,
            info_seq: rng.range(1, 20),
            last_info_time: create_time + rng.below(span),
            last_msg_time: r.last_msg_time,
            next_msg_seq,
            max_member_num: kind.max_members(),
            apply_join: if kind == GroupType::Private {
                "DisableApply"
            } else {
                APPLY_OPTIONS[rng.below(3) as usize]
            },
            invite_join: INVITE_OPTIONS[rng.below(3) as usize],
            mute_all: rng.chance(0.1),
            app_defined,
            members,
        };
        for &m in &r.members {
            table.join(m, g as u32);
        }
        by_id.insert(r.id.into_boxed_str(), g as u32);
        table.slots.push(Some(data));
    }
    (table, by_id)
}

/// A base group field get_group_info and get_joined_group_list can return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaseField {
    Type,
    Name,
    Introduction,
    Notification,
    FaceUrl,
    OwnerAccount,
    CreateTime,
    InfoSeq,
    LastInfoTime,
    LastMsgTime,
    NextMsgSeq,
    MemberNum,
    MaxMemberNum,
    ApplyJoinOption,
    InviteJoinOption,
    MuteAllMember,
}

impl BaseField {
    const ALL: [BaseField; 16] = [
        BaseField::Type,
        BaseField::Name,
        BaseField::Introduction,
        BaseField::Notification,
        BaseField::FaceUrl,
        BaseField::OwnerAccount,
        BaseField::CreateTime,
        BaseField::InfoSeq,
        BaseField::LastInfoTime,
        BaseField::LastMsgTime,
        BaseField::NextMsgSeq,
        BaseField::MemberNum,
        BaseField::MaxMemberNum,
        BaseField::ApplyJoinOption,
        BaseField::InviteJoinOption,
        BaseField::MuteAllMember,
    ];

    fn parse(s: &str) -> Option<BaseField> {
        Some(match s {
            "Type" => BaseField::Type,
            "Name" => BaseField::Name,
            "Introduction" => BaseField::Introduction,
            "Notification" => BaseField::Notification,
            "FaceUrl" => BaseField::FaceUrl,
            "Owner_Account" => BaseField::OwnerAccount,
            "CreateTime" => BaseField::CreateTime,
            "InfoSeq" => BaseField::InfoSeq,
            "LastInfoTime" => BaseField::LastInfoTime,
            "LastMsgTime" => BaseField::LastMsgTime,
            "NextMsgSeq" => BaseField::NextMsgSeq,
            "MemberNum" => BaseField::MemberNum,
            "MaxMemberNum" => BaseField::MaxMemberNum,
            "ApplyJoinOption" => BaseField::ApplyJoinOption,
            "InviteJoinOption" => BaseField::InviteJoinOption,
            "MuteAllMember" | "ShutUpAllMember" => BaseField::MuteAllMember,
            _ => return None,
        })
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A member field get_group_info, get_group_member_info and SelfInfo can return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberField {
    Role,
    JoinTime,
    MsgSeq,
    MsgFlag,
    LastSendMsgTime,
    MuteUntil,
    NameCard,
    UnreadMsgNum,
}

impl MemberField {
    /// What "all member fields" means (UnreadMsgNum only on request, in SelfInfo).
    const DEFAULT: [MemberField; 7] = [
        MemberField::Role,
        MemberField::JoinTime,
        MemberField::MsgSeq,
        MemberField::MsgFlag,
        MemberField::LastSendMsgTime,
        MemberField::MuteUntil,
        MemberField::NameCard,
    ];

    fn parse(s: &str) -> Option<MemberField> {
        Some(match s {
            "Role" => MemberField::Role,
            "JoinTime" => MemberField::JoinTime,
            "MsgSeq" => MemberField::MsgSeq,
            "MsgFlag" => MemberField::MsgFlag,
            "LastSendMsgTime" => MemberField::LastSendMsgTime,
            "MuteUntil" | "ShutUpUntil" => MemberField::MuteUntil,
            "NameCard" => MemberField::NameCard,
            "UnreadMsgNum" => MemberField::UnreadMsgNum,
            _ => return None,
        })
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// Which fields an answer carries.
#[derive(Debug, Clone, Default)]
struct Selection {
    /// Bits of [`BaseField`].
    base: u32,
    /// `AppDefinedData`: `None` left out, `Some(None)` every key, `Some(Some(keys))`
    /// those keys.
    group_keys: Option<Option<Vec<String>>>,
    /// The member list / rows: `None` left out, otherwise bits of [`MemberField`].
    members: Option<u32>,
    /// `AppMemberDefinedData`, as `group_keys`.
    member_keys: Option<Option<Vec<String>>>,
}

impl Selection {
    /// Everything (get_group_info without ResponseFilter).
    fn all() -> Selection {
        Selection {
            base: BaseField::ALL.iter().fold(0, |b, f| b | f.bit()),
            group_keys: Some(None),
            members: Some(MemberField::DEFAULT.iter().fold(0, |b, f| b | f.bit())),
            member_keys: Some(None),
        }
    }
}

/// A filter that must be an array of strings (10004 otherwise); unknown names are
/// ignored.
fn filter_names<'a>(v: &'a Value, key: &str) -> Result<Vec<&'a str>, ApiError> {
    let bad = || ApiError::new(10004, format!("{key} must be an array of strings"));
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|s| s.as_str().ok_or_else(bad))
        .collect()
}

fn base_bits(v: &Value, key: &str) -> Result<u32, ApiError> {
    Ok(filter_names(v, key)?
        .into_iter()
        .filter_map(BaseField::parse)
        .fold(0, |b, f| b | f.bit()))
}

fn member_bits(v: &Value, key: &str) -> Result<u32, ApiError> {
    Ok(filter_names(v, key)?
        .into_iter()
        .filter_map(MemberField::parse)
        .fold(0, |b, f| b | f.bit()))
}

fn key_list(v: &Value, key: &str) -> Result<Vec<String>, ApiError> {
    Ok(filter_names(v, key)?
        .into_iter()
        .map(str::to_owned)
        .collect())
}

/// `{Key, Value}` in an answer.
#[derive(Serialize)]
struct KeyValueOut<'a> {
    #[serde(rename = "Key")]
    key: &'a str,
    #[serde(rename = "Value")]
    value: &'a str,
}

fn key_values<'a>(
    data: &'a [(String, String)],
    keys: &Option<Option<Vec<String>>>,
) -> Option<Vec<KeyValueOut<'a>>> {
    let keys = keys.as_ref()?;
    let out: Vec<KeyValueOut<'a>> = data
        .iter()
        .filter(|(k, _)| keys.as_ref().is_none_or(|ks| ks.iter().any(|x| x == k)))
        .map(|(k, v)| KeyValueOut { key: k, value: v })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// The base fields of a group, in canonical order (unselected ones left out).
#[derive(Serialize, Default)]
struct BaseOut<'a> {
    #[serde(rename = "Type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(rename = "Name", skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(rename = "Introduction", skip_serializing_if = "Option::is_none")]
    introduction: Option<&'a str>,
    #[serde(rename = "Notification", skip_serializing_if = "Option::is_none")]
    notification: Option<&'a str>,
    #[serde(rename = "FaceUrl", skip_serializing_if = "Option::is_none")]
    face_url: Option<&'a str>,
    #[serde(rename = "Owner_Account", skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
    #[serde(rename = "CreateTime", skip_serializing_if = "Option::is_none")]
    create_time: Option<u64>,
    #[serde(rename = "InfoSeq", skip_serializing_if = "Option::is_none")]
    info_seq: Option<u64>,
    #[serde(rename = "LastInfoTime", skip_serializing_if = "Option::is_none")]
    last_info_time: Option<u64>,
    #[serde(rename = "LastMsgTime", skip_serializing_if = "Option::is_none")]
    last_msg_time: Option<u64>,
    #[serde(rename = "NextMsgSeq", skip_serializing_if = "Option::is_none")]
    next_msg_seq: Option<u64>,
    #[serde(rename = "MemberNum", skip_serializing_if = "Option::is_none")]
    member_num: Option<u64>,
    #[serde(rename = "MaxMemberNum", skip_serializing_if = "Option::is_none")]
    max_member_num: Option<u64>,
    #[serde(rename = "ApplyJoinOption", skip_serializing_if = "Option::is_none")]
    apply_join: Option<&'a str>,
    #[serde(rename = "InviteJoinOption", skip_serializing_if = "Option::is_none")]
    invite_join: Option<&'a str>,
    #[serde(rename = "MuteAllMember", skip_serializing_if = "Option::is_none")]
    mute_all: Option<&'a str>,
    #[serde(rename = "AppDefinedData", skip_serializing_if = "Option::is_none")]
    app_defined: Option<Vec<KeyValueOut<'a>>>,
}

fn base_out<'a>(world: &'a World, d: &'a GroupData, sel: &Selection) -> BaseOut<'a> {
    let on = |f: BaseField| sel.base & f.bit() != 0;
    let av = d.kind.is_av();
    BaseOut {
        kind: on(BaseField::Type).then_some(d.kind.as_str()),
        name: on(BaseField::Name).then_some(d.name.as_str()),
        introduction: on(BaseField::Introduction).then_some(d.introduction.as_str()),
        notification: on(BaseField::Notification).then_some(d.notification.as_str()),
        face_url: on(BaseField::FaceUrl).then_some(d.face_url.as_str()),
        owner: on(BaseField::OwnerAccount).then(|| d.owner.map_or("", |o| world.name(o))),
        create_time: on(BaseField::CreateTime).then_some(d.create_time),
        info_seq: on(BaseField::InfoSeq).then_some(d.info_seq),
        last_info_time: on(BaseField::LastInfoTime).then_some(d.last_info_time),
        last_msg_time: on(BaseField::LastMsgTime).then_some(d.last_msg_time),
        next_msg_seq: on(BaseField::NextMsgSeq).then_some(d.next_msg_seq),
        member_num: (on(BaseField::MemberNum) && !av).then_some(d.members.len() as u64),
        max_member_num: on(BaseField::MaxMemberNum).then_some(d.max_member_num),
        apply_join: on(BaseField::ApplyJoinOption).then_some(d.apply_join),
        invite_join: on(BaseField::InviteJoinOption).then_some(d.invite_join),
        mute_all: on(BaseField::MuteAllMember).then_some(if d.mute_all { "On" } else { "Off" }),
        app_defined: key_values(&d.app_defined, &sel.group_keys),
    }
}

/// A member row in an answer.
#[derive(Serialize)]
struct MemberOut<'a> {
    #[serde(rename = "Member_Account")]
    account: &'a str,
    #[serde(rename = "Role", skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(rename = "JoinTime", skip_serializing_if = "Option::is_none")]
    join_time: Option<u64>,
    #[serde(rename = "MsgSeq", skip_serializing_if = "Option::is_none")]
    msg_seq: Option<u64>,
    #[serde(rename = "MsgFlag", skip_serializing_if = "Option::is_none")]
    msg_flag: Option<&'static str>,
    #[serde(rename = "LastSendMsgTime", skip_serializing_if = "Option::is_none")]
    last_send: Option<u64>,
    #[serde(rename = "MuteUntil", skip_serializing_if = "Option::is_none")]
    mute_until: Option<u64>,
    #[serde(rename = "NameCard", skip_serializing_if = "Option::is_none")]
    name_card: Option<&'a str>,
    #[serde(
        rename = "AppMemberDefinedData",
        skip_serializing_if = "Option::is_none"
    )]
    app_defined: Option<Vec<KeyValueOut<'a>>>,
}

fn member_out<'a>(
    world: &'a World,
    m: &'a Member,
    bits: u32,
    keys: &Option<Option<Vec<String>>>,
) -> MemberOut<'a> {
    let on = |f: MemberField| bits & f.bit() != 0;
    MemberOut {
        account: world.name(m.account),
        role: on(MemberField::Role).then_some(m.role.as_str()),
        join_time: on(MemberField::JoinTime).then_some(m.join_time),
        msg_seq: on(MemberField::MsgSeq).then_some(m.msg_seq),
        msg_flag: on(MemberField::MsgFlag).then_some(m.msg_flag),
        last_send: on(MemberField::LastSendMsgTime).then_some(m.last_send_msg_time),
        mute_until: on(MemberField::MuteUntil).then_some(m.mute_until),
        name_card: on(MemberField::NameCard).then_some(m.name_card.as_str()),
        app_defined: key_values(&m.app_defined, keys),
    }
}

#[derive(Serialize)]
struct GroupInfoOut<'a> {
    #[serde(rename = "GroupId")]
    id: &'a str,
    #[serde(rename = "ErrorCode")]
    code: i64,
    #[serde(rename = "ErrorInfo")]
    info: &'static str,
    #[serde(flatten)]
    base: BaseOut<'a>,
    #[serde(rename = "MemberList", skip_serializing_if = "Option::is_none")]
    members: Option<Vec<MemberOut<'a>>>,
}

#[derive(Serialize)]
struct GroupInfoListOut<'a> {
    #[serde(rename = "GroupInfo")]
    items: Vec<GroupInfoOut<'a>>,
}

/// The GroupId of a request (10004 when missing or not a string).
fn group_id_field(obj: &Map<String, Value>) -> Result<&str, ApiError> {
    req_str(obj, "GroupId", 10004)
}

/// Looks up a live group: 10015 for an empty id, 10010 for an unknown one.
fn find(world: &World, id: &str) -> Result<u32, ApiError> {
    if id.is_empty() {
        return Err(ApiError::new(10015, "GroupId is empty"));
    }
    world.group_index(id).ok_or_else(|| {
        ApiError::new(
            10010,
            format!("group {id:?} does not exist or was destroyed"),
        )
    })
}

/// `group_open_http_svc/get_group_info`: 1 to 50 groups; without ResponseFilter every
/// base field, the group's custom data and the member list with every member field;
/// with it, only the parts and fields it names. One item per requested entry, each
/// with its own ErrorCode (10010 gone, 10015 empty id).
pub(crate) fn get_group_info(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let ids = str_list(&obj, "GroupIdList", 10004)?;
    if ids.is_empty() || ids.len() > MAX_GROUP_INFO {
        return Err(ApiError::new(
            10004,
            format!("GroupIdList must name 1 to {MAX_GROUP_INFO} groups"),
        ));
    }
    let sel = match obj.get("ResponseFilter") {
        None | Some(Value::Null) => Selection::all(),
        Some(Value::Object(f)) => {
            let mut sel = Selection::default();
            if let Some(v) = f.get("GroupBaseInfoFilter") {
                sel.base = base_bits(v, "GroupBaseInfoFilter")?;
            }
            if let Some(v) = f.get("MemberInfoFilter") {
                sel.members =
                    Some(member_bits(v, "MemberInfoFilter")? & !MemberField::UnreadMsgNum.bit());
            }
            if let Some(v) = f.get("AppDefinedDataFilter_Group") {
                sel.group_keys = Some(Some(key_list(v, "AppDefinedDataFilter_Group")?));
            }
            if let Some(v) = f.get("AppDefinedDataFilter_GroupMember") {
                sel.member_keys = Some(Some(key_list(v, "AppDefinedDataFilter_GroupMember")?));
            }
            sel
        }
        Some(_) => return Err(ApiError::new(10004, "ResponseFilter must be an object")),
    };
    let world = &state.world;
    let table = super::world::read(world.groups());
    let items: Vec<GroupInfoOut<'_>> = ids
        .iter()
        .map(
            |&id| match find(world, id).ok().and_then(|g| table.get(g)) {
                Some(d) => GroupInfoOut {
                    id,
                    code: 0,
                    info: "",
                    base: base_out(world, d, &sel),
                    members: sel.members.filter(|_| !d.kind.is_av()).map(|bits| {
                        d.members
                            .iter()
                            .map(|m| member_out(world, m, bits, &sel.member_keys))
                            .collect()
                    }),
                },
                None => {
                    let (code, info) = if id.is_empty() {
                        (10015, "invalid group id")
                    } else {
                        (10010, "this group does not exist")
                    };
                    GroupInfoOut {
                        id,
                        code,
                        info,
                        base: BaseOut::default(),
                        members: None,
                    }
                }
            },
        )
        .collect();
    Ok(reply(Envelope::Leading, &GroupInfoListOut { items }))
}

/// An optional unsigned integer field (10004 when another type).
fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::new(10004, format!("{key} must be an unsigned integer"))),
    }
}

#[derive(Serialize)]
struct MemberInfoOut<'a> {
    #[serde(rename = "MemberNum")]
    member_num: usize,
    #[serde(rename = "MemberList")]
    members: Vec<MemberOut<'a>>,
    #[serde(rename = "Next", skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// `group_open_http_svc/get_group_member_info`: a group's members in join order,
/// filtered by role, paged by Limit/Offset (Community: Limit and the `Next` cursor).
/// MemberNum is the group's total.
pub(crate) fn get_group_member_info(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let bits = match obj.get("MemberInfoFilter") {
        None | Some(Value::Null) => MemberField::DEFAULT.iter().fold(0, |b, f| b | f.bit()),
        Some(v) => member_bits(v, "MemberInfoFilter")? & !MemberField::UnreadMsgNum.bit(),
    };
    let roles: Option<Vec<Role>> = match obj.get("MemberRoleFilter") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            filter_names(v, "MemberRoleFilter")?
                .into_iter()
                .map(|s| {
                    Role::parse(s).ok_or_else(|| {
                        ApiError::new(10004, format!("MemberRoleFilter: unknown role {s:?}"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let keys = match obj.get("AppDefinedDataFilter_GroupMember") {
        None | Some(Value::Null) => Some(None),
        Some(v) => Some(Some(key_list(v, "AppDefinedDataFilter_GroupMember")?)),
    };
    let limit = opt_u64(&obj, "Limit")?;
    if limit.is_some_and(|l| l > MAX_MEMBER_LIMIT) {
        return Err(ApiError::new(
            10004,
            format!("Limit is at most {MAX_MEMBER_LIMIT}"),
        ));
    }
    let offset = opt_u64(&obj, "Offset")?.unwrap_or(0);
    let next_in = match obj.get("Next") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(ApiError::new(10004, "Next must be a string")),
    };
    let world = &state.world;
    let table = super::world::read(world.groups());
    let g = find(world, id)?;
    let d = table
        .get(g)
        .ok_or_else(|| ApiError::new(10010, "group does not exist"))?;
    if d.kind.is_av() {
        return Err(ApiError::new(
            10007,
            "get_group_member_info does not support AVChatRoom groups",
        ));
    }
    let community = d.kind == GroupType::Community;
    let start = if community {
        match next_in {
            None | Some("") => 0,
            Some(s) => s.parse::<u64>().map_err(|_| {
                ApiError::new(10004, format!("Next {s:?} is not a cursor this group gave"))
            })?,
        }
    } else {
        offset
    };
    let matching: Vec<&Member> = d
        .members
        .iter()
        .filter(|m| roles.as_ref().is_none_or(|r| r.contains(&m.role)))
        .collect();
    let start = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(matching.len());
    let take = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let page: Vec<MemberOut<'_>> = matching[start..]
        .iter()
        .take(take)
        .map(|m| member_out(world, m, bits, &keys))
        .collect();
    let end = start + page.len();
    let out = MemberInfoOut {
        member_num: d.members.len(),
        members: page,
        next: community.then(|| {
            if end < matching.len() {
                end.to_string()
            } else {
                String::new()
            }
        }),
    };
    Ok(reply(Envelope::Leading, &out))
}

#[derive(Serialize)]
struct SelfInfoOut<'a> {
    #[serde(rename = "Role", skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(rename = "JoinTime", skip_serializing_if = "Option::is_none")]
    join_time: Option<u64>,
    #[serde(rename = "MsgFlag", skip_serializing_if = "Option::is_none")]
    msg_flag: Option<&'static str>,
    #[serde(rename = "MsgSeq", skip_serializing_if = "Option::is_none")]
    msg_seq: Option<u64>,
    #[serde(rename = "UnreadMsgNum", skip_serializing_if = "Option::is_none")]
    unread: Option<u64>,
    #[serde(rename = "LastSendMsgTime", skip_serializing_if = "Option::is_none")]
    last_send: Option<u64>,
    #[serde(rename = "MuteUntil", skip_serializing_if = "Option::is_none")]
    mute_until: Option<u64>,
    #[serde(rename = "NameCard", skip_serializing_if = "Option::is_none")]
    name_card: Option<&'a str>,
}

#[derive(Serialize)]
struct JoinedItemOut<'a> {
    #[serde(rename = "GroupId")]
    id: &'a str,
    #[serde(flatten)]
    base: BaseOut<'a>,
    #[serde(rename = "SelfInfo", skip_serializing_if = "Option::is_none")]
    self_info: Option<SelfInfoOut<'a>>,
}

#[derive(Serialize)]
struct JoinedOut<'a> {
    #[serde(rename = "TotalCount")]
    total: usize,
    #[serde(rename = "GroupIdList")]
    items: Vec<JoinedItemOut<'a>>,
}

/// `group_open_http_svc/get_joined_group_list`: the groups Member_Account is in, in
/// group creation order, filtered by GroupType (AVChatRoom only with
/// WithHugeGroups 1), paged by Limit/Offset; TotalCount counts every match. Items
/// carry only GroupId unless ResponseFilter asks for base fields or SelfInfo.
pub(crate) fn get_joined_group_list(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let name = req_str(&obj, "Member_Account", 10004)?;
    let limit = opt_u64(&obj, "Limit")?;
    if limit.is_some_and(|l| l > MAX_JOINED_LIMIT) {
        return Err(ApiError::new(
            10004,
            format!("Limit is at most {MAX_JOINED_LIMIT}"),
        ));
    }
    let offset = opt_u64(&obj, "Offset")?.unwrap_or(0);
    let kind = match obj.get("GroupType") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            GroupType::parse(s)
                .ok_or_else(|| ApiError::new(10004, format!("unknown GroupType {s:?}")))?,
        ),
        Some(_) => return Err(ApiError::new(10004, "GroupType must be a string")),
    };
    let huge = opt_u64(&obj, "WithHugeGroups")?.unwrap_or(0) == 1;
    opt_u64(&obj, "WithNoActiveGroups")?;
    let mut sel = Selection::default();
    let mut self_bits: Option<u32> = None;
    match obj.get("ResponseFilter") {
        None | Some(Value::Null) => {}
        Some(Value::Object(f)) => {
            if let Some(v) = f.get("GroupBaseInfoFilter") {
                sel.base = base_bits(v, "GroupBaseInfoFilter")?;
            }
            if let Some(v) = f.get("SelfInfoFilter") {
                self_bits = Some(member_bits(v, "SelfInfoFilter")?);
            }
        }
        Some(_) => return Err(ApiError::new(10004, "ResponseFilter must be an object")),
    }
    let world = &state.world;
    let index = world
        .existing(name)
        .ok_or_else(|| ApiError::new(10019, format!("account {name:?} does not exist")))?;
    *who = Some(index);
    let table = super::world::read(world.groups());
    let matching: Vec<(u32, &GroupData)> = table
        .joined
        .get(index as usize)
        .into_iter()
        .flatten()
        .filter_map(|&g| table.get(g).map(|d| (g, d)))
        .filter(|(_, d)| kind.is_none_or(|k| d.kind.base() == k.base()))
        .filter(|(_, d)| !d.kind.is_av() || huge)
        .collect();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(matching.len());
    let take = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
    let items: Vec<JoinedItemOut<'_>> = matching[start..]
        .iter()
        .take(take)
        .map(|&(g, d)| JoinedItemOut {
            id: world.group_id(g),
            base: base_out(world, d, &sel),
            self_info: self_bits.and_then(|bits| {
                let m = d.member(index)?;
                let on = |f: MemberField| bits & f.bit() != 0;
                Some(SelfInfoOut {
                    role: on(MemberField::Role).then_some(m.role.as_str()),
                    join_time: on(MemberField::JoinTime).then_some(m.join_time),
                    msg_flag: on(MemberField::MsgFlag).then_some(m.msg_flag),
                    msg_seq: on(MemberField::MsgSeq).then_some(m.msg_seq),
                    unread: on(MemberField::UnreadMsgNum)
                        .then(|| d.next_msg_seq.saturating_sub(1).saturating_sub(m.msg_seq)),
                    last_send: on(MemberField::LastSendMsgTime).then_some(m.last_send_msg_time),
                    mute_until: on(MemberField::MuteUntil).then_some(m.mute_until),
                    name_card: on(MemberField::NameCard).then_some(m.name_card.as_str()),
                })
            }),
        })
        .collect();
    Ok(reply(
        Envelope::Leading,
        &JoinedOut {
            total: matching.len(),
            items,
        },
    ))
}

// ---------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------

/// `{Key, Value}` pairs of a request: declared keys only (10004 otherwise), values
/// of at most `max` bytes.
fn parse_key_values(
    v: &Value,
    field: &str,
    declared: &[&str],
    max: usize,
) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |what: String| ApiError::new(10004, format!("{field}: {what}"));
    let list = v
        .as_array()
        .ok_or_else(|| bad("must be an array of {Key, Value}".into()))?;
    let mut out: Vec<(String, String)> = Vec::with_capacity(list.len());
    for item in list {
        let (Some(k), Some(val)) = (
            item.get("Key").and_then(Value::as_str),
            item.get("Value").and_then(Value::as_str),
        ) else {
            return Err(bad("each item needs a string Key and Value".into()));
        };
        if !declared.contains(&k) {
            return Err(bad(format!(
                "key {k:?} is not declared (declared: {})",
                declared.join(", ")
            )));
        }
        if val.len() > max {
            return Err(bad(format!("value of {k:?} is over {max} bytes")));
        }
        out.retain(|(x, _)| x != k);
        out.push((k.to_owned(), val.to_owned()));
    }
    Ok(out)
}

/// Applies `changes` to `data`: an empty value deletes the key.
fn merge_key_values(data: &mut Vec<(String, String)>, changes: Vec<(String, String)>) {
    for (k, v) in changes {
        match data.iter().position(|(x, _)| *x == k) {
            Some(i) if v.is_empty() => {
                data.remove(i);
            }
            Some(i) => data[i].1 = v,
            None if v.is_empty() => {}
            None => data.push((k, v)),
        }
    }
}

/// An optional string field with a byte limit (10004 otherwise).
fn opt_text<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    max: usize,
) -> Result<Option<&'a str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::new(
            10004,
            format!("{key} is longer than {max} bytes"),
        )),
        Some(_) => Err(ApiError::new(10004, format!("{key} must be a string"))),
    }
}

/// An optional field that must be one of `allowed`.
fn opt_choice(
    obj: &Map<String, Value>,
    key: &str,
    allowed: &[&'static str],
) -> Result<Option<&'static str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => allowed
            .iter()
            .find(|a| **a == s.as_str())
            .copied()
            .map(Some)
            .ok_or_else(|| {
                ApiError::new(
                    10004,
                    format!("{key} must be one of {}", allowed.join(", ")),
                )
            }),
        Some(_) => Err(ApiError::new(10004, format!("{key} must be a string"))),
    }
}

/// An account a group write names: 10019 when it is not imported.
fn account_arg(world: &World, name: &str) -> Result<u32, ApiError> {
    world
        .existing(name)
        .ok_or_else(|| ApiError::new(10019, format!("account {name:?} does not exist")))
}

/// A client change needs `user` to be a member (and with `manage`, owner or admin).
fn require_role(d: &GroupData, actor: &Actor<'_>, manage: bool) -> Result<(), ApiError> {
    let Some(user) = actor.user() else {
        return Ok(());
    };
    match d.member(user) {
        Some(m) if !manage || m.role.manages() => Ok(()),
        Some(_) => Err(ApiError::new(
            10007,
            "only the owner or an admin may do this",
        )),
        None => Err(ApiError::new(
            10007,
            "the user is not a member of the group",
        )),
    }
}

/// Gives every member in `sorted` the group's conversation at a new MsgTime
/// `max(now, newest MsgTime of each + 1)`; returns that time. Locks the accounts in
/// ascending order (the caller holds the group table).
fn touch_members(world: &World, sorted: &[u32], g: u32, now: u64) -> u64 {
    let mut guards: Vec<_> = sorted
        .iter()
        .filter_map(|&m| world.account(m))
        .map(write)
        .collect();
    let newest = guards.iter().map(|a| a.max_time).max().unwrap_or(0);
    let t = now.max(newest.saturating_add(1));
    for acct in guards.iter_mut() {
        acct.touch(Peer::Group(g), t);
    }
    t
}

/// Puts the group's conversation into `account`'s list at `t` (joining).
fn add_conversation(world: &World, account: u32, g: u32, t: u64) {
    if let Some(lock) = world.account(account) {
        let mut acct = write(lock);
        let top = acct.remove(Peer::Group(g)).is_some_and(|(_, top)| top);
        acct.insert(
            Conv {
                msg_time: t,
                peer: Peer::Group(g),
            },
            top,
        );
    }
}

/// Takes the group's conversation out of `account`'s list (leaving).
fn remove_conversation(world: &World, account: u32, g: u32) {
    if let Some(lock) = world.account(account) {
        write(lock).remove(Peer::Group(g));
    }
}

fn member_list_json(world: &World, accounts: impl IntoIterator<Item = u32>) -> Value {
    Value::Array(
        accounts
            .into_iter()
            .map(|a| json!({"Member_Account": world.name(a)}))
            .collect(),
    )
}

/// The operator a REST write shows: its `From_Account` when given, else the admin.
fn operator_name(state: &State, actor: &Actor<'_>, obj: &Map<String, Value>) -> String {
    match actor {
        Actor::Admin => obj
            .get("From_Account")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(&state.cfg.identifier)
            .to_owned(),
        _ => state.operator(actor).to_owned(),
    }
}

/// A new automatic GroupId: `@TGS#` and nine characters from the seed and the
/// creation count.
fn auto_group_id(seed: u64, n: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = SplitMix64::new(mix64(seed ^ 0xC4EA_7E00 ^ n.wrapping_mul(0x9E37)));
    let mut s = String::with_capacity(14);
    s.push_str("@TGS#");
    s.push(char::from(b'1' + rng.below(9) as u8));
    for _ in 0..8 {
        s.push(char::from(
            ALPHABET[rng.below(ALPHABET.len() as u64) as usize],
        ));
    }
    s
}

/// Checks a custom GroupId: printable ASCII, at most 48 bytes, not starting with
/// `@TGS#` (reserved) unless the group is a Community, whose ids must start with
/// `@TGS#_`.
fn check_custom_id(id: &str, kind: GroupType) -> Result<(), ApiError> {
    let printable =
        !id.is_empty() && id.len() <= 48 && id.bytes().all(|b| (0x20..=0x7e).contains(&b));
    let prefix_ok = if kind == GroupType::Community {
        id.starts_with("@TGS#_")
    } else {
        !id.starts_with("@TGS#")
    };
    if printable && prefix_ok {
        Ok(())
    } else {
        Err(ApiError::new(
            10015,
            format!("GroupId {id:?} is invalid: printable ASCII, at most 48 bytes, no @TGS# prefix (Community groups need @TGS#_)"),
        ))
    }
}

/// A create_group member: account, role, custom member data.
type InitialMember = (u32, Role, Vec<(String, String)>);

#[derive(Serialize)]
struct CreateOut<'a> {
    #[serde(rename = "GroupId")]
    id: &'a str,
}

/// `group_open_http_svc/create_group`. Fires `Group.CallbackAfterCreateGroup`.
pub(crate) fn create_group(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let world = &state.world;
    let kind_name = req_str(&obj, "Type", 10004)?;
    let kind = GroupType::parse(kind_name)
        .ok_or_else(|| ApiError::new(10004, format!("unknown group Type {kind_name:?}")))?;
    let name = req_str(&obj, "Name", 10004)?;
    if name.is_empty() || name.len() > 30 {
        return Err(ApiError::new(10004, "Name must be 1 to 30 bytes"));
    }
    let owner = match (obj.get("Owner_Account"), actor.user()) {
        (None, Some(user)) => Some(user),
        (None | Some(Value::Null), None) => None,
        (Some(Value::String(s)), _) if s.is_empty() && actor.user().is_none() => None,
        (Some(Value::String(s)), _) => Some(account_arg(world, s)?),
        (Some(_), _) => return Err(ApiError::new(10004, "Owner_Account must be a string")),
    };
    if actor.user().is_some() && owner != actor.user() {
        return Err(ApiError::new(
            10007,
            "a user creates groups that the user owns",
        ));
    }
    *who = owner;
    let introduction = opt_text(&obj, "Introduction", 240)?.unwrap_or("");
    let notification = opt_text(&obj, "Notification", 300)?.unwrap_or("");
    let face_url = opt_text(&obj, "FaceUrl", 100)?.unwrap_or("");
    let max_members = match opt_u64(&obj, "MaxMemberCount")? {
        None => kind.max_members(),
        Some(n) if (1..=kind.max_members()).contains(&n) => n,
        Some(_) => {
            return Err(ApiError::new(
                10004,
                format!(
                    "MaxMemberCount must be 1 to {} for {}",
                    kind.max_members(),
                    kind.as_str()
                ),
            ))
        }
    };
    let apply_join =
        opt_choice(&obj, "ApplyJoinOption", &APPLY_OPTIONS)?.unwrap_or("NeedPermission");
    let invite_join =
        opt_choice(&obj, "InviteJoinOption", &INVITE_OPTIONS)?.unwrap_or("NeedPermission");
    let app_defined = match obj.get("AppDefinedData") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => parse_key_values(v, "AppDefinedData", &GROUP_KEYS, 512)?,
    };
    let custom_id = match obj.get("GroupId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            check_custom_id(s, kind)?;
            Some(s.as_str())
        }
        Some(_) => return Err(ApiError::new(10004, "GroupId must be a string")),
    };
    // Initial members (besides the owner): [{Member_Account, Role, AppMemberDefinedData}].
    let mut initial: Vec<InitialMember> = Vec::new();
    if let Some(list) = obj.get("MemberList").filter(|v| !v.is_null()) {
        let list = list
            .as_array()
            .ok_or_else(|| ApiError::new(10004, "MemberList must be an array"))?;
        if kind.is_av() && !list.is_empty() {
            return Err(ApiError::new(
                10007,
                "an AVChatRoom group cannot be created with members",
            ));
        }
        if list.len() > MAX_CREATE_MEMBERS {
            return Err(ApiError::new(
                10005,
                format!("MemberList holds at most {MAX_CREATE_MEMBERS} members"),
            ));
        }
        for (i, m) in list.iter().enumerate() {
            let acct = m
                .get("Member_Account")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::new(
                        10004,
                        format!("MemberList[{i}] needs a string Member_Account"),
                    )
                })?;
            let index = account_arg(world, acct)?;
            let role = match m.get("Role").and_then(Value::as_str) {
                None => Role::Member,
                Some("Admin") => Role::Admin,
                Some("Member") => Role::Member,
                Some(r) => {
                    return Err(ApiError::new(
                        10004,
                        format!("MemberList[{i}].Role {r:?}: Admin or Member"),
                    ))
                }
            };
            let data = match m.get("AppMemberDefinedData") {
                None | Some(Value::Null) => Vec::new(),
                Some(v) => parse_key_values(v, "AppMemberDefinedData", &MEMBER_KEYS, 64)?,
            };
            if Some(index) != owner && !initial.iter().any(|(a, _, _)| *a == index) {
                initial.push((index, role, data));
            }
        }
    }
    if (initial.len() + usize::from(owner.is_some())) as u64 > max_members {
        return Err(ApiError::new(
            10014,
            "more initial members than MaxMemberCount",
        ));
    }

    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let id = match custom_id {
        Some(id) => {
            if world.group_index(id).is_some() {
                return Err(ApiError::new(
                    10021,
                    format!("GroupId {id:?} is already used"),
                ));
            }
            id.to_owned()
        }
        None => loop {
            table.created += 1;
            let id = auto_group_id(world.seed(), table.created);
            if world.group_index(&id).is_none() {
                break id;
            }
        },
    };
    let g = table.slots.len() as u32;
    if g >= world.group_capacity() || !world.set_group_id(g, &id) {
        return Err(ApiError::new(
            10036,
            "the emulator's group quota is used up (restart it to reset)",
        ));
    }
    let mut members: Vec<Member> = Vec::with_capacity(initial.len() + 1);
    if let Some(o) = owner {
        members.push(Member::new(o, Role::Owner, now, 1));
    }
    for (a, role, data) in &initial {
        let mut m = Member::new(*a, *role, now, 1);
        m.app_defined = data.clone();
        members.push(m);
    }
    let mut data = GroupData {
        kind,
        name: name.to_owned(),
        introduction: introduction.to_owned(),
        notification: notification.to_owned(),
        face_url: face_url.to_owned(),
        owner,
        create_time: now,
        info_seq: 1,
        last_info_time: now,
        last_msg_time: now,
        next_msg_seq: 1,
        max_member_num: max_members,
        apply_join,
        invite_join,
        mute_all: false,
        app_defined: app_defined.clone(),
        members,
    };
    let sorted = data.sorted_members();
    if !kind.is_av() {
        data.last_msg_time = touch_members(world, &sorted, g, now);
    }
    for &m in &sorted {
        table.join(m, g);
    }
    world.index_group(&id, g);
    table.slots.push(Some(data));
    drop(table);

    let initial_members = member_list_json(world, initial.iter().map(|(a, _, _)| *a));
    let user_defined: Vec<Value> = app_defined
        .iter()
        .map(|(k, v)| json!({"Key": k, "Value": v}))
        .collect();
    state.fire(
        actor,
        "Group.CallbackAfterCreateGroup",
        json!({
            "CallbackCommand": "Group.CallbackAfterCreateGroup",
            "GroupId": id,
            "Operator_Account": state.operator(actor),
            "Owner_Account": owner.map_or("", |o| world.name(o)),
            "Type": kind.as_str(),
            "Name": name,
            "MemberList": initial_members,
            "UserDefinedDataList": user_defined,
            "EventTime": unix_now_ms(),
        }),
    );
    Ok(reply(Envelope::Leading, &CreateOut { id: &id }))
}

/// `group_open_http_svc/modify_group_base_info`. Every call that changes something
/// moves InfoSeq and LastInfoTime. Fires `Group.CallbackAfterGroupInfoChanged`
/// only when Name, Introduction, Notification or FaceUrl is in the request.
pub(crate) fn modify_group_base_info(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let name = opt_text(&obj, "Name", 30)?;
    if name == Some("") {
        return Err(ApiError::new(10004, "Name must be 1 to 30 bytes"));
    }
    let introduction = opt_text(&obj, "Introduction", 240)?;
    let notification = opt_text(&obj, "Notification", 300)?;
    let face_url = opt_text(&obj, "FaceUrl", 100)?;
    let max_members = opt_u64(&obj, "MaxMemberNum")?;
    let apply_join = opt_choice(&obj, "ApplyJoinOption", &APPLY_OPTIONS)?;
    let invite_join = opt_choice(&obj, "InviteJoinOption", &INVITE_OPTIONS)?;
    let mute_all = match (obj.get("MuteAllMember"), obj.get("ShutUpAllMember")) {
        (Some(v), _) | (None, Some(v)) => match v.as_str() {
            Some("On") => Some(true),
            Some("Off") => Some(false),
            _ => return Err(ApiError::new(10004, "MuteAllMember must be On or Off")),
        },
        (None, None) => None,
    };
    let app_defined = match obj.get("AppDefinedData") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_key_values(v, "AppDefinedData", &GROUP_KEYS, 512)?),
    };
    let world = &state.world;
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    require_role(d, actor, true)?;
    if let Some(n) = max_members {
        if d.kind.is_av() {
            return Err(ApiError::new(
                10007,
                "AVChatRoom groups have no MaxMemberNum",
            ));
        }
        if n < d.members.len() as u64 || n > d.kind.max_members() {
            return Err(ApiError::new(
                10004,
                format!(
                    "MaxMemberNum must be {} to {}",
                    d.members.len(),
                    d.kind.max_members()
                ),
            ));
        }
    }
    let mut changed = false;
    let mut set = |field: &mut String, v: Option<&str>| {
        if let Some(v) = v {
            *field = v.to_owned();
            changed = true;
        }
    };
    set(&mut d.name, name);
    set(&mut d.introduction, introduction);
    set(&mut d.notification, notification);
    set(&mut d.face_url, face_url);
    if let Some(n) = max_members {
        d.max_member_num = n;
        changed = true;
    }
    if let Some(a) = apply_join {
        d.apply_join = a;
        changed = true;
    }
    if let Some(i) = invite_join {
        d.invite_join = i;
        changed = true;
    }
    if let Some(m) = mute_all {
        d.mute_all = m;
        changed = true;
    }
    if let Some(kv) = app_defined {
        merge_key_values(&mut d.app_defined, kv);
        changed = true;
    }
    if changed {
        d.profile_changed(now);
    }
    let kind = d.kind;
    drop(table);
    if name.is_some() || introduction.is_some() || notification.is_some() || face_url.is_some() {
        let mut body = json!({
            "CallbackCommand": "Group.CallbackAfterGroupInfoChanged",
            "GroupId": id,
            "Type": kind.as_str(),
            "Operator_Account": operator_name(state, actor, &obj),
            "EventTime": unix_now_ms(),
        });
        for (k, v) in [
            ("Name", name),
            ("Introduction", introduction),
            ("Notification", notification),
            ("FaceUrl", face_url),
        ] {
            if let (Some(v), Some(o)) = (v, body.as_object_mut()) {
                o.insert(k.into(), v.into());
            }
        }
        state.fire(actor, "Group.CallbackAfterGroupInfoChanged", body);
    }
    Ok(reply(Envelope::Leading, &json!({})))
}

#[derive(Serialize)]
struct AddResultOut<'a> {
    #[serde(rename = "Member_Account")]
    account: &'a str,
    #[serde(rename = "Result")]
    result: u8,
}

#[derive(Serialize)]
struct AddOut<'a> {
    #[serde(rename = "MemberList")]
    items: Vec<AddResultOut<'a>>,
}

/// `group_open_http_svc/add_group_member`: per member Result 1 added, 2 already a
/// member, 0 failed (not imported). 10014 when the group would be over
/// MaxMemberNum (nothing is added). Fires `Group.CallbackAfterNewMemberJoin`.
pub(crate) fn add_group_member(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    opt_u64(&obj, "Silence")?;
    let Some(list) = obj.get("MemberList").and_then(Value::as_array) else {
        return Err(ApiError::new(
            10004,
            "MemberList is required: [{Member_Account}]",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::new(10004, "MemberList is empty"));
    }
    if list.len() > MAX_ADD_MEMBERS {
        return Err(ApiError::new(
            10005,
            format!("MemberList holds at most {MAX_ADD_MEMBERS} members"),
        ));
    }
    let names: Vec<&str> = list
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.get("Member_Account")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::new(
                        10004,
                        format!("MemberList[{i}] needs a string Member_Account"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let world = &state.world;
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    require_role(d, actor, false)?;
    if d.kind.is_av() {
        return Err(ApiError::new(
            10007,
            "members cannot be added to an AVChatRoom group",
        ));
    }
    let mut results: Vec<u8> = Vec::with_capacity(names.len());
    let mut added: Vec<u32> = Vec::new();
    for name in &names {
        let r = match world.existing(name) {
            None => 0,
            Some(a) if d.member(a).is_some() || added.contains(&a) => 2,
            Some(a) => {
                added.push(a);
                1
            }
        };
        results.push(r);
    }
    if (d.members.len() + added.len()) as u64 > d.max_member_num {
        return Err(ApiError::new(10014, "the group is full"));
    }
    let (t, seq, kind) = (d.last_msg_time, d.next_msg_seq, d.kind);
    for &a in &added {
        d.members.push(Member::new(a, Role::Member, now, seq));
    }
    for &a in &added {
        table.join(a, g);
        add_conversation(world, a, g, t);
    }
    drop(table);
    if !added.is_empty() {
        state.fire(
            actor,
            "Group.CallbackAfterNewMemberJoin",
            json!({
                "CallbackCommand": "Group.CallbackAfterNewMemberJoin",
                "GroupId": id,
                "Type": kind.as_str(),
                "JoinType": "Invited",
                "Operator_Account": state.operator(actor),
                "NewMemberList": member_list_json(world, added.iter().copied()),
                "EventTime": unix_now_ms(),
            }),
        );
    }
    let items = names
        .iter()
        .zip(results)
        .map(|(&account, result)| AddResultOut { account, result })
        .collect();
    Ok(reply(Envelope::Leading, &AddOut { items }))
}

/// `group_open_http_svc/delete_group_member`: removes the named members (others are
/// ignored); the owner cannot be removed (10007). A client may remove itself (quit)
/// or, as owner or admin, others. Fires `Group.CallbackAfterMemberExit`.
pub(crate) fn delete_group_member(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    opt_u64(&obj, "Silence")?;
    opt_text(&obj, "Reason", 1024)?;
    let names = str_list(&obj, "MemberToDel_Account", 10004)?;
    if names.is_empty() {
        return Err(ApiError::new(10004, "MemberToDel_Account is empty"));
    }
    if names.len() > MAX_DELETE_MEMBERS {
        return Err(ApiError::new(
            10005,
            format!("MemberToDel_Account holds at most {MAX_DELETE_MEMBERS} accounts"),
        ));
    }
    let world = &state.world;
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    if d.kind.is_av() {
        return Err(ApiError::new(
            10007,
            "AVChatRoom groups have no member list",
        ));
    }
    let targets: Vec<u32> = names
        .iter()
        .filter_map(|n| world.account_index(n))
        .filter(|&a| d.member(a).is_some())
        .fold(Vec::new(), |mut v, a| {
            if !v.contains(&a) {
                v.push(a);
            }
            v
        });
    let quitting = actor.user().is_some_and(|u| targets == [u]);
    if !quitting {
        require_role(d, actor, true)?;
    }
    if targets.iter().any(|&a| d.owner == Some(a)) {
        return Err(ApiError::new(
            10007,
            "the owner cannot be removed; change the owner first",
        ));
    }
    d.members.retain(|m| !targets.contains(&m.account));
    let kind = d.kind;
    for &a in &targets {
        table.leave(a, g);
        remove_conversation(world, a, g);
    }
    drop(table);
    if !targets.is_empty() {
        state.fire(
            actor,
            "Group.CallbackAfterMemberExit",
            json!({
                "CallbackCommand": "Group.CallbackAfterMemberExit",
                "GroupId": id,
                "Type": kind.as_str(),
                "ExitType": if quitting { "Quit" } else { "Kicked" },
                "Operator_Account": state.operator(actor),
                "ExitMemberList": member_list_json(world, targets.iter().copied()),
                "EventTime": unix_now_ms(),
            }),
        );
    }
    Ok(reply(Envelope::Leading, &json!({})))
}

/// `group_open_http_svc/destroy_group`: the group is gone (later reads give 10010)
/// and every member loses its conversation. Fires `Group.CallbackAfterGroupDestroyed`.
pub(crate) fn destroy_group(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let world = &state.world;
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    if let (Some(user), Some(d)) = (actor.user(), table.get(g)) {
        if d.owner != Some(user) {
            return Err(ApiError::new(10007, "only the owner may destroy the group"));
        }
    }
    let Some(d) = table.slots.get_mut(g as usize).and_then(Option::take) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    world.unindex_group(id);
    let sorted = d.sorted_members();
    for &a in &sorted {
        table.leave(a, g);
        remove_conversation(world, a, g);
    }
    drop(table);
    state.fire(
        actor,
        "Group.CallbackAfterGroupDestroyed",
        json!({
            "CallbackCommand": "Group.CallbackAfterGroupDestroyed",
            "GroupId": id,
            "Type": d.kind.as_str(),
            "Owner_Account": d.owner.map_or("", |o| world.name(o)),
            "Operator_Account": state.operator(actor),
            "Name": d.name,
            "MemberList": member_list_json(world, d.members.iter().map(|m| m.account)),
            "EventTime": unix_now_ms(),
        }),
    );
    Ok(reply(Envelope::Leading, &json!({})))
}

/// `group_open_http_svc/change_group_owner`: NewOwner_Account (a member; 10007
/// otherwise) becomes Owner, the old owner Member; InfoSeq moves. Fires
/// `Group.CallbackAfterChangeGroupOwner` (not when the owner stays the same).
pub(crate) fn change_group_owner(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let new_name = req_str(&obj, "NewOwner_Account", 10004)?;
    let world = &state.world;
    let new_owner = account_arg(world, new_name)?;
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    if let Some(user) = actor.user() {
        if d.owner != Some(user) {
            return Err(ApiError::new(
                10007,
                "only the owner may hand the group over",
            ));
        }
    }
    if d.member(new_owner).is_none() {
        return Err(ApiError::new(
            10007,
            format!("{new_name:?} is not a member of the group"),
        ));
    }
    let old = d.owner;
    if old == Some(new_owner) {
        return Ok(reply(Envelope::Leading, &json!({})));
    }
    if let Some(o) = old.and_then(|o| d.member_mut(o)) {
        o.role = Role::Member;
    }
    if let Some(m) = d.member_mut(new_owner) {
        m.role = Role::Owner;
    }
    d.owner = Some(new_owner);
    d.profile_changed(now);
    let kind = d.kind;
    drop(table);
    state.fire(
        actor,
        "Group.CallbackAfterChangeGroupOwner",
        json!({
            "CallbackCommand": "Group.CallbackAfterChangeGroupOwner",
            "GroupId": id,
            "Type": kind.as_str(),
            "Operator_Account": operator_name(state, actor, &obj),
            "OldOwner_Account": old.map_or("", |o| world.name(o)),
            "NewOwner_Account": world.name(new_owner),
            "EventTime": unix_now_ms(),
        }),
    );
    Ok(reply(Envelope::Leading, &json!({})))
}

/// MuteUntil for a MuteTime given at `now`.
fn mute_until(mute_time: u64, now: u64) -> u64 {
    match mute_time {
        0 => 0,
        MUTE_FOREVER => MUTE_FOREVER,
        t => now.saturating_add(t),
    }
}

/// `group_open_http_svc/modify_group_member_info`: Role (Admin/Member), MsgFlag,
/// NameCard (≤50 bytes), AppMemberDefinedData, MuteTime of one member. Fires
/// `Group.CallbackAfterMemberFieldChanged` when Role or NameCard is in the request.
pub(crate) fn modify_group_member_info(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let member_name = req_str(&obj, "Member_Account", 10004)?;
    let role = match obj.get("Role") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str() {
            Some("Admin") => Some(Role::Admin),
            Some("Member") => Some(Role::Member),
            _ => return Err(ApiError::new(10004, "Role must be Admin or Member")),
        },
    };
    let msg_flag = opt_choice(&obj, "MsgFlag", &MSG_FLAGS)?;
    let name_card = opt_text(&obj, "NameCard", 50)?;
    let app_defined = match obj.get("AppMemberDefinedData") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_key_values(
            v,
            "AppMemberDefinedData",
            &MEMBER_KEYS,
            64,
        )?),
    };
    let mute = match (opt_u64(&obj, "MuteTime")?, opt_u64(&obj, "ShutUpTime")?) {
        (Some(t), _) | (None, Some(t)) if t <= MUTE_FOREVER => Some(t),
        (None, None) => None,
        _ => return Err(ApiError::new(10004, "MuteTime is at most 4294967295")),
    };
    let world = &state.world;
    let target = account_arg(world, member_name)?;
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    if let Some(user) = actor.user() {
        let me = d
            .member(user)
            .map(|m| m.role)
            .ok_or_else(|| ApiError::new(10007, "the user is not a member of the group"))?;
        let own = user == target;
        let allowed = (role.is_none() || me == Role::Owner)
            && (msg_flag.is_none() || own)
            && (mute.is_none() || (me.manages() && !own))
            && ((name_card.is_none() && app_defined.is_none()) || own || me.manages());
        if !allowed {
            return Err(ApiError::new(
                10007,
                "the user may not change this member field",
            ));
        }
    }
    let is_owner = d.owner == Some(target);
    let kind = d.kind;
    let Some(m) = d.member_mut(target) else {
        return Err(ApiError::new(
            10007,
            format!("{member_name:?} is not a member of the group"),
        ));
    };
    if role.is_some() && is_owner {
        return Err(ApiError::new(10007, "the owner's role cannot be changed"));
    }
    if let Some(r) = role {
        m.role = r;
    }
    if let Some(f) = msg_flag {
        m.msg_flag = f;
    }
    if let Some(c) = name_card {
        m.name_card = c.to_owned();
    }
    if let Some(kv) = app_defined {
        merge_key_values(&mut m.app_defined, kv);
    }
    if let Some(t) = mute {
        m.mute_until = mute_until(t, now);
    }
    let (role_now, card_now) = (m.role.as_str(), m.name_card.clone());
    drop(table);
    if role.is_some() || name_card.is_some() {
        state.fire(
            actor,
            "Group.CallbackAfterMemberFieldChanged",
            json!({
                "CallbackCommand": "Group.CallbackAfterMemberFieldChanged",
                "GroupId": id,
                "Type": kind.as_str(),
                "Operator_Account": state.operator(actor),
                "Member_Account": member_name,
                "Role": role_now,
                "NameCard": card_now,
                "EventTime": unix_now_ms(),
            }),
        );
    }
    Ok(reply(Envelope::Leading, &json!({})))
}

/// `group_open_http_svc/forbid_send_msg`: sets MuteUntil of the named members
/// (non-members are ignored). Sends no webhook.
pub(crate) fn forbid_send_msg(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    _who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 10004)?;
    let id = group_id_field(&obj)?;
    let names = str_list(&obj, "Members_Account", 10004)?;
    if names.is_empty() {
        return Err(ApiError::new(10004, "Members_Account is empty"));
    }
    if names.len() > MAX_FORBID_MEMBERS {
        return Err(ApiError::new(
            10005,
            format!("Members_Account holds at most {MAX_FORBID_MEMBERS} accounts"),
        ));
    }
    let mute = match (opt_u64(&obj, "MuteTime")?, opt_u64(&obj, "ShutUpTime")?) {
        (Some(t), _) | (None, Some(t)) if t <= MUTE_FOREVER => t,
        (None, None) => return Err(ApiError::new(10004, "MuteTime is required")),
        _ => return Err(ApiError::new(10004, "MuteTime is at most 4294967295")),
    };
    let world = &state.world;
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    require_role(d, actor, true)?;
    for name in names {
        if let Some(a) = world.account_index(name) {
            if let Some(m) = d.member_mut(a) {
                m.mute_until = mute_until(mute, now);
            }
        }
    }
    Ok(reply(Envelope::Leading, &json!({})))
}

/// A message body: a non-empty array of `{MsgType, MsgContent}` elements (`code`
/// otherwise).
pub(crate) fn check_msg_body(body: Option<&Value>, code: i64) -> Result<Vec<Value>, ApiError> {
    let Some(list) = body.and_then(Value::as_array) else {
        return Err(ApiError::new(code, "MsgBody must be an array"));
    };
    if list.is_empty() {
        return Err(ApiError::new(code, "MsgBody must not be empty"));
    }
    for (i, el) in list.iter().enumerate() {
        let ok = el.get("MsgType").is_some_and(Value::is_string)
            && el.get("MsgContent").is_some_and(Value::is_object);
        if !ok {
            return Err(ApiError::new(
                code,
                format!("MsgBody[{i}] must have a string MsgType and an object MsgContent"),
            ));
        }
    }
    Ok(list.clone())
}

#[derive(Serialize)]
struct SendOut {
    #[serde(rename = "MsgTime")]
    msg_time: u64,
    #[serde(rename = "MsgSeq")]
    msg_seq: u64,
}

/// `group_open_http_svc/send_group_msg`: a message to a group, from a member (or
/// from the admin when From_Account is absent). Every member's group conversation
/// becomes the newest (re-created for members who deleted it); the group's
/// NextMsgSeq and LastMsgTime and the sender's LastSendMsgTime move. Fires
/// `Group.CallbackAfterSendMsg`.
pub(crate) fn send_group_msg(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 90001)?;
    let id = req_str(&obj, "GroupId", 90001)?;
    let random = obj
        .get("Random")
        .and_then(Value::as_u64)
        .filter(|r| *r <= u64::from(u32::MAX))
        .ok_or_else(|| ApiError::new(90001, "Random is required: a uint32"))?;
    let from = match (obj.get("From_Account"), actor.user()) {
        (None, Some(user)) => Some(state.world.name(user)),
        (None | Some(Value::Null), None) => None,
        (Some(Value::String(s)), _) if s.is_empty() => None,
        (Some(Value::String(s)), _) => Some(s.as_str()),
        (Some(_), _) => return Err(ApiError::new(90001, "From_Account must be a string")),
    };
    let msg_body = check_msg_body(obj.get("MsgBody"), 90001)?;
    let cloud = obj
        .get("CloudCustomData")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let world = &state.world;
    let sender = match from {
        Some(name) => {
            let i = world.existing(name).ok_or_else(|| {
                ApiError::new(70107, format!("account {name:?} has not been imported"))
            })?;
            *who = Some(i);
            Some(i)
        }
        None => None,
    };
    if actor.user().is_some() && sender != actor.user() {
        return Err(ApiError::new(10007, "a user sends as itself"));
    }
    let now = unix_now();
    let mut table = super::world::write(world.groups());
    let g = find(world, id)?;
    let Some(Some(d)) = table.slots.get_mut(g as usize) else {
        return Err(ApiError::new(10010, "group does not exist"));
    };
    if let Some(s) = sender {
        if d.member(s).is_none() {
            return Err(ApiError::new(
                10007,
                format!("{:?} is not a member of {id}", world.name(s)),
            ));
        }
    }
    let sorted = d.sorted_members();
    let t = touch_members(world, &sorted, g, now);
    let seq = d.next_msg_seq;
    d.next_msg_seq += 1;
    d.last_msg_time = t;
    if let Some(m) = sender.and_then(|s| d.member_mut(s)) {
        m.last_send_msg_time = t;
        m.msg_seq = seq;
    }
    let kind = d.kind;
    drop(table);
    let sender_name = sender.map_or(state.cfg.identifier.as_str(), |s| world.name(s));
    state.fire(
        actor,
        "Group.CallbackAfterSendMsg",
        json!({
            "CallbackCommand": "Group.CallbackAfterSendMsg",
            "GroupId": id,
            "Type": kind.as_str(),
            "From_Account": sender_name,
            "Operator_Account": sender_name,
            "Random": random,
            "MsgSeq": seq,
            "MsgTime": t,
            "OnlineOnlyFlag": 0,
            "MsgBody": msg_body,
            "CloudCustomData": cloud,
            "EventTime": unix_now_ms(),
        }),
    );
    Ok(reply(
        Envelope::Leading,
        &SendOut {
            msg_time: t,
            msg_seq: seq,
        },
    ))
}

/// Takes `account` out of every group (account_delete): an owner leaves its group
/// ownerless. Silent. The caller holds the table; the account's own conversations
/// are cleared by the caller.
pub(crate) fn remove_account(table: &mut GroupTable, account: u32) {
    let groups: Vec<u32> = table
        .joined
        .get_mut(account as usize)
        .map(std::mem::take)
        .unwrap_or_default()
        .into_iter()
        .collect();
    for g in groups {
        if let Some(Some(d)) = table.slots.get_mut(g as usize) {
            d.members.retain(|m| m.account != account);
            if d.owner == Some(account) {
                d.owner = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_and_auto_ids() {
        assert!(check_custom_id("team-1", GroupType::Public).is_ok());
        assert!(check_custom_id("@TGS#abc", GroupType::Public).is_err());
        assert!(check_custom_id("@TGS#_abc", GroupType::Community).is_ok());
        assert!(check_custom_id("abc", GroupType::Community).is_err());
        assert!(check_custom_id(&"x".repeat(49), GroupType::Public).is_err());
        assert!(check_custom_id("tab\there", GroupType::Public).is_err());
        let a = auto_group_id(1, 1);
        assert_eq!(a, auto_group_id(1, 1));
        assert_ne!(a, auto_group_id(1, 2));
        assert!(a.starts_with("@TGS#") && a.len() == 14);
    }

    #[test]
    fn key_values_merge_and_check() {
        let kv = parse_key_values(
            &json!([{"Key": "Topic", "Value": "a"}, {"Key": "Topic", "Value": "b"}]),
            "AppDefinedData",
            &GROUP_KEYS,
            512,
        )
        .unwrap();
        assert_eq!(kv, vec![("Topic".to_owned(), "b".to_owned())]);
        assert!(
            parse_key_values(&json!([{"Key": "X", "Value": "a"}]), "A", &GROUP_KEYS, 512).is_err()
        );
        let mut data = vec![("Topic".to_owned(), "a".to_owned())];
        merge_key_values(&mut data, vec![("Region".into(), "eu".into())]);
        merge_key_values(&mut data, vec![("Topic".into(), String::new())]);
        assert_eq!(data, vec![("Region".to_owned(), "eu".to_owned())]);
        assert_eq!(mute_until(0, 10), 0);
        assert_eq!(mute_until(5, 10), 15);
        assert_eq!(mute_until(MUTE_FOREVER, 10), MUTE_FOREVER);
    }
}
