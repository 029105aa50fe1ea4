//! Friends (the relationship chain): each account's friend list, generated from the
//! seed, and the `sns/*` commands that read and change it.
//!
//! A friend list is an ordered map friend slot → friend data; `friend_get` pages it
//! in that order (ascending account slot: generated accounts by number, then
//! imported ones in import order). Relationships may be one-way.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::RwLockWriteGuard;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::profile::{self, object, req_str, str_list, ProfileTag, TagValueOut};
use super::protocol::{reply, Actor, ApiError, Envelope, Reply};
use super::rng::{mix64, SplitMix64};
use super::state::{unix_now, State};
use super::world::{is_heavy, read, write, Account, Peer, World};

/// Friends per `friend_get` page (the server picks it; Chat does not document it).
pub(crate) const FRIEND_PAGE_SIZE: usize = 100;
/// Most items one friend_add / friend_import / friend_update / friend_get_list takes.
pub(crate) const MAX_FRIEND_ITEMS: usize = 100;
/// Most accounts one friend_delete names.
pub(crate) const MAX_FRIEND_DELETE: usize = 1000;
/// Longest remark (bytes).
const MAX_REMARK: usize = 96;
/// Longest AddWording, group name or custom string value (bytes).
const MAX_SNS_VALUE: usize = 256;

/// `AddSource` values of generated friendships.
const SOURCES: [&str; 4] = [
    "AddSource_Type_Android",
    "AddSource_Type_iOS",
    "AddSource_Type_Web",
    "AddSource_Type_Search",
];
const FRIEND_GROUPS: [&str; 4] = ["Friends", "Work", "Family", "School"];

/// A custom friend field declared in the emulator's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum SnsCustom {
    /// `Tag_SNS_Custom_Note`: a string.
    Note,
    /// `Tag_SNS_Custom_Rank`: an unsigned 32-bit integer.
    Rank,
}

impl SnsCustom {
    const ALL: [SnsCustom; 2] = [SnsCustom::Note, SnsCustom::Rank];

    fn name(self) -> &'static str {
        match self {
            SnsCustom::Note => "Tag_SNS_Custom_Note",
            SnsCustom::Rank => "Tag_SNS_Custom_Rank",
        }
    }

    fn parse(name: &str) -> Option<SnsCustom> {
        SnsCustom::ALL.into_iter().find(|c| c.name() == name)
    }

    fn check(self, v: &Value) -> Result<(), String> {
        match self {
            SnsCustom::Note => match v.as_str() {
                Some(s) if s.len() <= MAX_SNS_VALUE => Ok(()),
                _ => Err(format!(
                    "{} takes a string of at most {MAX_SNS_VALUE} bytes",
                    self.name()
                )),
            },
            SnsCustom::Rank => match v.as_u64() {
                Some(n) if n <= u64::from(u32::MAX) => Ok(()),
                _ => Err(format!("{} takes an unsigned 32-bit integer", self.name())),
            },
        }
    }
}

/// A friend tag (`Tag_SNS_IM_*` and the declared custom ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnsTag {
    Group,
    Remark,
    AddSource,
    AddWording,
    AddTime,
    RemarkTime,
    Custom(SnsCustom),
}

impl SnsTag {
    fn parse(name: &str) -> Option<SnsTag> {
        Some(match name {
            "Tag_SNS_IM_Group" => SnsTag::Group,
            "Tag_SNS_IM_Remark" => SnsTag::Remark,
            "Tag_SNS_IM_AddSource" => SnsTag::AddSource,
            "Tag_SNS_IM_AddWording" => SnsTag::AddWording,
            "Tag_SNS_IM_AddTime" => SnsTag::AddTime,
            "Tag_SNS_IM_RemarkTime" => SnsTag::RemarkTime,
            _ => SnsTag::Custom(SnsCustom::parse(name)?),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SnsTag::Group => "Tag_SNS_IM_Group",
            SnsTag::Remark => "Tag_SNS_IM_Remark",
            SnsTag::AddSource => "Tag_SNS_IM_AddSource",
            SnsTag::AddWording => "Tag_SNS_IM_AddWording",
            SnsTag::AddTime => "Tag_SNS_IM_AddTime",
            SnsTag::RemarkTime => "Tag_SNS_IM_RemarkTime",
            SnsTag::Custom(c) => c.name(),
        }
    }
}

/// One entry of a friend list. A generated friendship stores nothing: its data is
/// derived from the seed and the pair whenever it is read
/// ([`FriendData::generated`]); once something writes it (friend_add,
/// friend_import, friend_update) the data is stored here.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Friend(Option<Box<FriendData>>);

/// A friend entry's data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FriendData {
    /// When the friendship formed (unix seconds).
    pub add_time: u64,
    /// `AddSource_Type_...`.
    pub source: Cow<'static, str>,
    /// `Tag_SNS_IM_Remark` (empty: unset).
    pub remark: String,
    /// `Tag_SNS_IM_RemarkTime` (0: unset).
    pub remark_time: u64,
    /// `Tag_SNS_IM_Group`.
    pub groups: Vec<String>,
    /// `Tag_SNS_IM_AddWording` (empty: unset).
    pub wording: String,
    /// Declared custom fields that are set.
    pub custom: BTreeMap<SnsCustom, Value>,
}

/// The draws behind a generated entry of `owner`'s list about `to`: one shared by
/// both directions (the time the friendship formed), one per direction.
fn draws(seed: u64, owner: u32, to: u32) -> (u64, u64, u64) {
    let (lo, hi) = (owner.min(to), owner.max(to));
    let pair = mix64(mix64(seed ^ 0x00F4_1E4D) ^ ((u64::from(lo) << 32) | u64::from(hi)));
    let own = mix64(pair ^ u64::from(owner).wrapping_add(1).wrapping_mul(0x9E37_79B9));
    (pair, own, mix64(own))
}

/// Whether the generated entry has custom data (for the initial CustomSequence).
fn generated_has_custom(seed: u64, owner: u32, to: u32) -> bool {
    let (_, _, r2) = draws(seed, owner, to);
    (r2 >> 16) % 100 < 10 || (r2 >> 40) % 100 < 10
}

impl FriendData {
    /// The data of a generated entry: formed within 400 days before `epoch`; 25%
    /// have a remark, 15% a friend group, 10% each custom field.
    pub(crate) fn generated(seed: u64, epoch: u64, owner: u32, to: u32) -> FriendData {
        let (pair, own, r2) = draws(seed, owner, to);
        let add_time = epoch - pair % (400 * 86_400);
        let mut d = FriendData {
            add_time,
            source: Cow::Borrowed(SOURCES[(own % 4) as usize]),
            remark: String::new(),
            remark_time: 0,
            groups: Vec::new(),
            wording: String::new(),
            custom: BTreeMap::new(),
        };
        if (own >> 8) % 100 < 25 {
            d.remark = format!("Remark {:04x}", (own >> 16) & 0xFFFF);
            d.remark_time = add_time + (own >> 32) % 86_400;
        }
        if r2 % 100 < 15 {
            d.groups
                .push(FRIEND_GROUPS[((r2 >> 8) % 4) as usize].to_owned());
        }
        if (r2 >> 16) % 100 < 10 {
            d.custom.insert(
                SnsCustom::Note,
                json!(format!("note_{}", (r2 >> 24) % 1000)),
            );
        }
        if (r2 >> 40) % 100 < 10 {
            d.custom.insert(SnsCustom::Rank, json!((r2 >> 48) % 100));
        }
        d
    }

    /// A new entry formed at `now` from `source` with nothing else set.
    fn new(now: u64, source: &str) -> FriendData {
        FriendData {
            add_time: now,
            source: Cow::Owned(source.to_owned()),
            remark: String::new(),
            remark_time: 0,
            groups: Vec::new(),
            wording: String::new(),
            custom: BTreeMap::new(),
        }
    }

    /// The value of `tag`, when set.
    fn value(&self, tag: SnsTag) -> Option<Value> {
        match tag {
            SnsTag::AddSource => Some(json!(self.source)),
            SnsTag::AddTime => Some(json!(self.add_time)),
            SnsTag::Remark => (!self.remark.is_empty()).then(|| json!(self.remark)),
            SnsTag::RemarkTime => (self.remark_time > 0).then(|| json!(self.remark_time)),
            SnsTag::Group => (!self.groups.is_empty()).then(|| json!(self.groups)),
            SnsTag::AddWording => (!self.wording.is_empty()).then(|| json!(self.wording)),
            SnsTag::Custom(c) => self.custom.get(&c).cloned(),
        }
    }

    /// `ValueItem` of friend_get: the standard tags (`AddSource, AddWording, Remark,
    /// Group, AddTime`, the unset ones left out) unless `skip_standard`, then the
    /// custom ones unless `skip_custom`.
    fn value_items(&self, skip_standard: bool, skip_custom: bool) -> Vec<TagValueOut> {
        let mut tags: Vec<SnsTag> = Vec::new();
        if !skip_standard {
            tags.extend([
                SnsTag::AddSource,
                SnsTag::AddWording,
                SnsTag::Remark,
                SnsTag::Group,
                SnsTag::AddTime,
            ]);
        }
        if !skip_custom {
            tags.extend(SnsCustom::ALL.map(SnsTag::Custom));
        }
        tags.into_iter()
            .filter_map(|t| {
                self.value(t).map(|v| TagValueOut {
                    tag: t.name(),
                    value: v,
                })
            })
            .collect()
    }
}

impl Friend {
    /// An entry generated with the world (its data derived on read).
    pub(crate) fn generated() -> Friend {
        Friend(None)
    }

    /// An entry with written data.
    fn stored(data: FriendData) -> Friend {
        Friend(Some(Box::new(data)))
    }

    /// The entry's data: stored, or derived for `owner`'s entry about `to`.
    fn data(&self, world: &World, owner: u32, to: u32) -> Cow<'_, FriendData> {
        match &self.0 {
            Some(d) => Cow::Borrowed(d),
            None => Cow::Owned(FriendData::generated(
                world.seed(),
                world.epoch(),
                owner,
                to,
            )),
        }
    }

    /// The entry's data for writing (stored from now on).
    fn data_mut(&mut self, world: &World, owner: u32, to: u32) -> &mut FriendData {
        self.0.get_or_insert_with(|| {
            Box::new(FriendData::generated(
                world.seed(),
                world.epoch(),
                owner,
                to,
            ))
        })
    }
}

/// Generates friendships over the one-to-one conversation partners of the generated
/// accounts: 40% of pairs are friends (75% when either side is heavy), 85% of those
/// both ways, the rest one way. Only the membership is stored; each entry's data is
/// derived on read. Uses its own random stream, so conversations stay as they were.
pub(crate) fn generate(accts: &mut [Account], seed: u64) {
    let mut rng = SplitMix64::new(mix64(seed ^ 0x5E_F1E0D));
    let n = accts.len() as u32;
    for i in 0..n {
        let mut partners: Vec<u32> = accts[i as usize]
            .top
            .iter()
            .chain(accts[i as usize].general.iter())
            .filter_map(|c| match c.peer {
                Peer::User(j) if j > i => Some(j),
                _ => None,
            })
            .collect();
        partners.sort_unstable();
        for j in partners {
            let p = if is_heavy(i) || is_heavy(j) {
                0.75
            } else {
                0.4
            };
            if !rng.chance(p) {
                continue;
            }
            let (to_i, to_j) = if rng.chance(0.85) {
                (true, true)
            } else if rng.chance(0.5) {
                (true, false)
            } else {
                (false, true)
            };
            if to_i {
                accts[i as usize].friends.insert(j, Friend::generated());
            }
            if to_j {
                accts[j as usize].friends.insert(i, Friend::generated());
            }
        }
    }
    for (i, a) in accts.iter_mut().enumerate() {
        a.std_seq = 1 + a.friends.len() as u64;
        a.custom_seq = 1 + a
            .friends
            .keys()
            .filter(|&&j| generated_has_custom(seed, i as u32, j))
            .count() as u64;
    }
}

/// From_Account of an sns command: for a client change it defaults to the user and
/// must be the user (30004 otherwise: acting for another user needs the admin).
/// 30001 when missing or empty, 30003 when not imported.
fn sns_from(
    state: &State,
    actor: &Actor<'_>,
    obj: &Map<String, Value>,
    who: &mut Option<u32>,
) -> Result<u32, ApiError> {
    let name = match (obj.get("From_Account"), actor.user()) {
        (None, Some(user)) => state.world.name(user),
        _ => req_str(obj, "From_Account", 30001)?,
    };
    if name.is_empty() {
        return Err(ApiError::new(30001, "From_Account is empty"));
    }
    let index = state
        .world
        .existing(name)
        .ok_or_else(|| ApiError::new(30003, format!("account {name:?} does not exist")))?;
    *who = Some(index);
    if actor.user().is_some_and(|u| u != index) {
        return Err(ApiError::new(
            30004,
            "a user may only change their own friend list; this needs the app admin",
        ));
    }
    Ok(index)
}

/// Optional unsigned integer field: absent → `None`, another type → 30001.
fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::new(30001, format!("{key} must be an unsigned integer"))),
    }
}

/// Write-locks accounts `a` and `b` (distinct) in ascending order; returns them as
/// `(a, b)`.
pub(crate) fn lock_pair(
    world: &World,
    a: u32,
    b: u32,
) -> Option<(RwLockWriteGuard<'_, Account>, RwLockWriteGuard<'_, Account>)> {
    let (la, lb) = (world.account(a)?, world.account(b)?);
    Some(if a < b {
        let ga = write(la);
        (ga, write(lb))
    } else {
        let gb = write(lb);
        (write(la), gb)
    })
}

#[derive(Serialize)]
struct UserDataOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ValueItem", skip_serializing_if = "Option::is_none")]
    values: Option<Vec<TagValueOut>>,
}

#[derive(Serialize)]
struct FriendGetOut<'a> {
    #[serde(rename = "UserDataItem")]
    items: Vec<UserDataOut<'a>>,
    #[serde(rename = "StandardSequence")]
    std_seq: u64,
    #[serde(rename = "CustomSequence")]
    custom_seq: u64,
    #[serde(rename = "FriendNum")]
    friend_num: usize,
    #[serde(rename = "CompleteFlag")]
    complete: u8,
    #[serde(rename = "NextStartIndex")]
    next: usize,
}

/// `sns/friend_get`: one page (100) of From_Account's friend list from `StartIndex`,
/// every standard and custom friend tag; a `StandardSequence` / `CustomSequence`
/// equal to the list's leaves that part out (an item left with no tags has no
/// `ValueItem`).
pub(crate) fn friend_get(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, &Actor::Admin, &obj, who)?;
    let start = opt_u64(&obj, "StartIndex")?
        .ok_or_else(|| ApiError::new(30001, "StartIndex is required"))?;
    let std_seen = opt_u64(&obj, "StandardSequence")?;
    let custom_seen = opt_u64(&obj, "CustomSequence")?;
    let world = &state.world;
    let lock = world
        .account(from)
        .ok_or_else(|| ApiError::new(30003, "account does not exist"))?;
    let acct = read(lock);
    if !acct.imported {
        return Err(ApiError::new(30003, "account does not exist"));
    }
    let skip_std = std_seen == Some(acct.std_seq);
    let skip_custom = custom_seen == Some(acct.custom_seq);
    let total = acct.friends.len();
    let start = usize::try_from(start).unwrap_or(usize::MAX).min(total);
    let items: Vec<UserDataOut<'_>> = acct
        .friends
        .iter()
        .skip(start)
        .take(FRIEND_PAGE_SIZE)
        .map(|(&j, f)| {
            let values = f.data(world, from, j).value_items(skip_std, skip_custom);
            UserDataOut {
                to: world.name(j),
                values: (!values.is_empty()).then_some(values),
            }
        })
        .collect();
    let end = start + items.len();
    let out = FriendGetOut {
        items,
        std_seq: acct.std_seq,
        custom_seq: acct.custom_seq,
        friend_num: total,
        complete: u8::from(end >= total),
        next: if end >= total { 0 } else { end },
    };
    Ok(reply(Envelope::Display, &out))
}

/// A tag of friend_get_list: a profile tag or a friend tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListTag {
    Profile(ProfileTag),
    Sns(SnsTag),
}

#[derive(Serialize)]
struct InfoItemOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ResultCode")]
    code: i64,
    #[serde(rename = "ResultInfo")]
    info: &'static str,
    #[serde(rename = "SnsProfileItem", skip_serializing_if = "Option::is_none")]
    items: Option<Vec<TagValueOut>>,
}

#[derive(Serialize)]
struct InfoOut<'a> {
    #[serde(rename = "InfoItem")]
    items: Vec<InfoItemOut<'a>>,
    #[serde(rename = "Fail_Account", skip_serializing_if = "Vec::is_empty")]
    fail: Vec<&'a str>,
}

/// `sns/friend_get_list`: chosen friends of From_Account with the asked friend and
/// profile tags (in TagList order, unset ones left out). One item per requested
/// entry; an entry that is not a friend gets 30001, one that is not imported 30003.
pub(crate) fn friend_get_list(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, &Actor::Admin, &obj, who)?;
    let to = str_list(&obj, "To_Account", 30001)?;
    if to.is_empty() || to.len() > MAX_FRIEND_ITEMS {
        return Err(ApiError::new(
            30001,
            format!("To_Account must name 1 to {MAX_FRIEND_ITEMS} accounts"),
        ));
    }
    let names = str_list(&obj, "TagList", 30001)?;
    if names.is_empty() {
        return Err(ApiError::new(30001, "TagList is empty"));
    }
    let mut tags: Vec<ListTag> = Vec::with_capacity(names.len());
    for name in names {
        let tag = ProfileTag::parse(name)
            .map(ListTag::Profile)
            .or_else(|| SnsTag::parse(name).map(ListTag::Sns))
            .ok_or_else(|| ApiError::new(30001, format!("tag {name:?} does not exist")))?;
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    let world = &state.world;
    // The friend entries first (From's lock only), then each friend's profile
    // (one lock at a time).
    let entries: Vec<Option<FriendData>> = {
        let lock = world
            .account(from)
            .ok_or_else(|| ApiError::new(30003, "account does not exist"))?;
        let acct = read(lock);
        to.iter()
            .map(|name| {
                world.account_index(name).and_then(|j| {
                    acct.friends
                        .get(&j)
                        .map(|f| f.data(world, from, j).into_owned())
                })
            })
            .collect()
    };
    let seed = world.seed();
    let mut out = InfoOut {
        items: Vec::with_capacity(to.len()),
        fail: Vec::new(),
    };
    for (name, entry) in to.iter().zip(entries) {
        let j = world.existing(name);
        let (Some(j), Some(friend)) = (j, entry) else {
            let (code, info) = if j.is_none() {
                (30003, "Err_SNS_Account_Not_Exist")
            } else {
                (30001, "Err_SNS_FriendGetList_Friend_Not_Exist")
            };
            out.items.push(InfoItemOut {
                to: name,
                code,
                info,
                items: None,
            });
            out.fail.push(name);
            continue;
        };
        let profile_acct = tags
            .iter()
            .any(|t| matches!(t, ListTag::Profile(_)))
            .then(|| world.account(j).map(read))
            .flatten();
        let items: Vec<TagValueOut> = tags
            .iter()
            .filter_map(|t| {
                let (tag, v) = match *t {
                    ListTag::Sns(s) => (s.name(), friend.value(s)?),
                    ListTag::Profile(p) => (
                        p.name(),
                        profile::value(seed, j, profile_acct.as_deref()?, p)?,
                    ),
                };
                Some(TagValueOut { tag, value: v })
            })
            .collect();
        out.items.push(InfoItemOut {
            to: name,
            code: 0,
            info: "",
            items: Some(items),
        });
    }
    Ok(reply(Envelope::Display, &out))
}

#[derive(Serialize)]
struct ResultItemOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ResultCode")]
    code: i64,
    #[serde(rename = "ResultInfo")]
    info: Cow<'static, str>,
}

#[derive(Serialize)]
struct ResultOut<'a> {
    #[serde(rename = "ResultItem")]
    items: Vec<ResultItemOut<'a>>,
    #[serde(rename = "Fail_Account", skip_serializing_if = "Option::is_none")]
    fail: Option<Vec<&'a str>>,
}

impl<'a> ResultOut<'a> {
    fn new(n: usize) -> ResultOut<'a> {
        ResultOut {
            items: Vec::with_capacity(n),
            fail: None,
        }
    }

    fn push(&mut self, to: &'a str, result: Result<(), (i64, Cow<'static, str>)>) {
        let (code, info) = result.err().unwrap_or((0, Cow::Borrowed("")));
        self.items.push(ResultItemOut { to, code, info });
    }

    /// The answer, with `Fail_Account` (the failed entries, when any) if `with_fail`.
    fn finish(mut self, with_fail: bool) -> Reply {
        if with_fail {
            let fail: Vec<&str> = self
                .items
                .iter()
                .filter(|i| i.code != 0)
                .map(|i| i.to)
                .collect();
            self.fail = (!fail.is_empty()).then_some(fail);
        }
        reply(Envelope::Display, &self)
    }
}

type ItemResult = Result<(), (i64, Cow<'static, str>)>;

fn item_err(code: i64, info: &'static str) -> ItemResult {
    Err((code, Cow::Borrowed(info)))
}

/// A checked friend_add / friend_import item.
struct AddItem<'a> {
    to: &'a str,
    source: &'a str,
    remark: &'a str,
    remark_time: u64,
    groups: Vec<String>,
    wording: &'a str,
    add_time: Option<u64>,
    custom: Vec<(SnsCustom, Value)>,
}

/// Parses `AddFriendItem`: 1 to 100 objects with a To_Account and an AddSource of
/// the form `AddSource_Type_*`; `GroupName` a string (add) or strings (import).
fn add_items(obj: &Map<String, Value>, import: bool) -> Result<Vec<AddItem<'_>>, ApiError> {
    let Some(list) = obj.get("AddFriendItem").and_then(Value::as_array) else {
        return Err(ApiError::new(30001, "AddFriendItem is required: an array"));
    };
    if list.is_empty() || list.len() > MAX_FRIEND_ITEMS {
        return Err(ApiError::new(
            30001,
            format!("AddFriendItem must hold 1 to {MAX_FRIEND_ITEMS} items"),
        ));
    }
    let bad = |i: usize, what: &str| ApiError::new(30001, format!("AddFriendItem[{i}]: {what}"));
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let Some(item) = item.as_object() else {
            return Err(bad(i, "must be an object"));
        };
        let to = req_str(item, "To_Account", 30001).map_err(|e| bad(i, &e.info))?;
        let source = req_str(item, "AddSource", 30001).map_err(|e| bad(i, &e.info))?;
        if !source.starts_with("AddSource_Type_") || source.len() > 40 {
            return Err(bad(
                i,
                "AddSource must be AddSource_Type_ followed by a suffix",
            ));
        }
        let opt_str = |key: &str, max: usize| -> Result<&str, ApiError> {
            match item.get(key) {
                None | Some(Value::Null) => Ok(""),
                Some(Value::String(s)) if s.len() <= max => Ok(s),
                Some(_) => Err(bad(
                    i,
                    &format!("{key} must be a string of at most {max} bytes"),
                )),
            }
        };
        let remark = opt_str("Remark", MAX_REMARK)?;
        let wording = opt_str("AddWording", MAX_SNS_VALUE)?;
        let groups: Vec<String> = match item.get("GroupName") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) if !import && s.len() <= MAX_SNS_VALUE => {
                if s.is_empty() {
                    Vec::new()
                } else {
                    vec![s.clone()]
                }
            }
            Some(Value::Array(a)) if import => {
                let mut g = Vec::with_capacity(a.len());
                for v in a {
                    match v.as_str() {
                        Some(s) if s.len() <= MAX_SNS_VALUE => g.push(s.to_owned()),
                        _ => return Err(bad(i, "GroupName must hold strings")),
                    }
                }
                g
            }
            Some(_) => {
                return Err(bad(
                    i,
                    if import {
                        "GroupName must be an array of strings"
                    } else {
                        "GroupName must be a string"
                    },
                ))
            }
        };
        let (mut remark_time, mut add_time, mut custom) = (0, None, Vec::new());
        if import {
            remark_time = opt_u64(item, "RemarkTime")
                .map_err(|e| bad(i, &e.info))?
                .unwrap_or(0);
            add_time = opt_u64(item, "AddTime").map_err(|e| bad(i, &e.info))?;
            if let Some(list) = item.get("CustomItem") {
                let Some(list) = list.as_array() else {
                    return Err(bad(i, "CustomItem must be an array of {Tag, Value}"));
                };
                for c in list {
                    let tag = c
                        .get("Tag")
                        .and_then(Value::as_str)
                        .and_then(SnsCustom::parse)
                        .ok_or_else(|| bad(i, "CustomItem tags must be declared Tag_SNS_Custom_ fields (Note, Rank)"))?;
                    let v = c.get("Value").cloned().unwrap_or(Value::Null);
                    tag.check(&v).map_err(|e| bad(i, &e))?;
                    custom.push((tag, v));
                }
            }
        }
        out.push(AddItem {
            to,
            source,
            remark,
            remark_time,
            groups,
            wording,
            add_time,
            custom,
        });
    }
    Ok(out)
}

impl AddItem<'_> {
    /// The entry From_Account's list gets.
    fn entry(&self, now: u64) -> Friend {
        let mut d = FriendData::new(self.add_time.unwrap_or(now), self.source);
        if !self.remark.is_empty() {
            d.remark = self.remark.to_owned();
            d.remark_time = if self.remark_time > 0 {
                self.remark_time
            } else {
                d.add_time
            };
        }
        d.groups = self.groups.clone();
        d.wording = self.wording.to_owned();
        d.custom = self.custom.iter().cloned().collect();
        Friend::stored(d)
    }
}

/// Adds `to` to `acct`'s list and moves both sequences.
fn insert_friend(acct: &mut Account, to: u32, f: Friend) {
    acct.friends.insert(to, f);
    acct.std_seq += 1;
    acct.custom_seq += 1;
}

/// Removes `to` from `acct`'s list (moving both sequences); whether it was there.
pub(crate) fn remove_friend(acct: &mut Account, to: u32) -> bool {
    let had = acct.friends.remove(&to).is_some();
    if had {
        acct.std_seq += 1;
        acct.custom_seq += 1;
    }
    had
}

/// `sns/friend_add`: adds each item's To_Account to From_Account's list (and, with
/// `Add_Type_Both`, From_Account to theirs). Per item: 30001 self or already a
/// friend, 30003 not imported, 30009 From may not send requests, 30516 peer denies
/// everyone, 30539 peer needs to confirm (two-way, not forced: nothing changes).
/// Fires `Sns.CallbackFriendAdd` with every pair that formed.
pub(crate) fn friend_add(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, actor, &obj, who)?;
    let both = match obj.get("AddType").map(|v| v.as_str()) {
        None | Some(Some("Add_Type_Both")) => true,
        Some(Some("Add_Type_Single")) => false,
        _ => {
            return Err(ApiError::new(
                30001,
                "AddType must be Add_Type_Both or Add_Type_Single",
            ))
        }
    };
    let force = match obj.get("ForceAddFlags") {
        None => false,
        Some(v) => {
            let f = v
                .as_u64()
                .ok_or_else(|| ApiError::new(30001, "ForceAddFlags must be an integer"))?;
            // Clients cannot force an add.
            f == 1 && actor.user().is_none()
        }
    };
    let items = add_items(&obj, false)?;
    let world = &state.world;
    let seed = world.seed();
    let now = unix_now();
    let from_name = world.name(from);
    let mut out = ResultOut::new(items.len());
    let mut pairs: Vec<Value> = Vec::new();
    for item in &items {
        let result = (|| -> ItemResult {
            let Some(to) = world.account_index(item.to) else {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            };
            if to == from {
                return item_err(30001, "Err_SNS_FriendAdd_Add_Self");
            }
            let Some((mut a, mut b)) = lock_pair(world, from, to) else {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            };
            if !b.imported {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            }
            if !a.imported {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            }
            if a.friends.contains_key(&to) {
                return item_err(30001, "Err_SNS_FriendAdd_Friend_Exist");
            }
            if !force && !profile::may_send_requests(seed, from, &a) {
                return item_err(30009, "Err_SNS_FriendAdd_Forbidden_By_Admin");
            }
            if !force {
                match profile::allow_type(seed, to, &b) {
                    "AllowType_Type_DenyAny" => {
                        return item_err(30516, "Err_SNS_FriendAdd_Peer_Deny_Any")
                    }
                    "AllowType_Type_NeedConfirm" if both => {
                        return item_err(30539, "Err_SNS_FriendAdd_Need_Confirm")
                    }
                    _ => {}
                }
            }
            insert_friend(&mut a, to, item.entry(now));
            pairs.push(json!({"From_Account": from_name, "To_Account": item.to, "Initiator_Account": from_name}));
            if both && !b.friends.contains_key(&from) {
                let back = Friend::stored(FriendData::new(now, item.source));
                insert_friend(&mut b, from, back);
                pairs.push(json!({"From_Account": item.to, "To_Account": from_name, "Initiator_Account": from_name}));
            }
            Ok(())
        })();
        out.push(item.to, result);
    }
    if !pairs.is_empty() {
        state.fire(
            actor,
            "Sns.CallbackFriendAdd",
            json!({
                "CallbackCommand": "Sns.CallbackFriendAdd",
                "PairList": pairs,
                "ClientCmd": "friend_add",
                "Admin_Account": if actor.user().is_none() { state.cfg.identifier.as_str() } else { "" },
                "ForceFlag": u8::from(force),
            }),
        );
    }
    Ok(out.finish(false))
}

/// `sns/friend_import`: one-way import into From_Account's list with historical
/// data (RemarkTime, AddTime, several groups, custom items). Per item: 30001 self
/// or already a friend, 30003 not imported. Sends no webhook.
pub(crate) fn friend_import(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, &Actor::Admin, &obj, who)?;
    let items = add_items(&obj, true)?;
    let world = &state.world;
    let now = unix_now();
    let mut out = ResultOut::new(items.len());
    for item in &items {
        let result = (|| -> ItemResult {
            let Some(to) = world.existing(item.to) else {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            };
            if to == from {
                return item_err(30001, "Err_SNS_FriendImport_Add_Self");
            }
            let Some(lock) = world.account(from) else {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            };
            let mut a = write(lock);
            if !a.imported {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            }
            if a.friends.contains_key(&to) {
                return item_err(30001, "Err_SNS_FriendImport_Friend_Exist");
            }
            insert_friend(&mut a, to, item.entry(now));
            Ok(())
        })();
        out.push(item.to, result);
    }
    Ok(out.finish(true))
}

/// `sns/friend_update`: changes Remark, Group and custom friend tags of friends in
/// From_Account's list. Per item: 30001 not a friend or a tag that cannot be
/// updated. Sends no webhook (REST or client).
pub(crate) fn friend_update(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, actor, &obj, who)?;
    let Some(list) = obj.get("UpdateItem").and_then(Value::as_array) else {
        return Err(ApiError::new(30001, "UpdateItem is required: an array"));
    };
    if list.is_empty() || list.len() > MAX_FRIEND_ITEMS {
        return Err(ApiError::new(
            30001,
            format!("UpdateItem must hold 1 to {MAX_FRIEND_ITEMS} items"),
        ));
    }
    let mut parsed: Vec<(&str, Value)> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let to = item
            .get("To_Account")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::new(30001, format!("UpdateItem[{i}] needs a string To_Account"))
            })?;
        let sns = item.get("SnsItem").cloned().unwrap_or(Value::Null);
        parsed.push((to, sns));
    }
    let world = &state.world;
    let now = unix_now();
    let lock = world
        .account(from)
        .ok_or_else(|| ApiError::new(30003, "account does not exist"))?;
    let mut out = ResultOut::new(parsed.len());
    for (to_name, sns) in &parsed {
        let result = (|| -> ItemResult {
            let Some(changes) = sns.as_array().filter(|a| !a.is_empty()) else {
                return item_err(30001, "Err_SNS_FriendUpdate_SnsItem_Empty");
            };
            let mut checked: Vec<(SnsTag, &Value)> = Vec::with_capacity(changes.len());
            for c in changes {
                let tag = c.get("Tag").and_then(Value::as_str).and_then(SnsTag::parse);
                let v = c.get("Value").unwrap_or(&Value::Null);
                let ok = match tag {
                    Some(SnsTag::Remark) => v.as_str().is_some_and(|s| s.len() <= MAX_REMARK),
                    Some(SnsTag::Group) => v.as_array().is_some_and(|a| {
                        a.iter()
                            .all(|g| g.as_str().is_some_and(|s| s.len() <= MAX_SNS_VALUE))
                    }),
                    Some(SnsTag::Custom(c)) => c.check(v).is_ok(),
                    _ => false,
                };
                match (ok, tag) {
                    (true, Some(t)) => checked.push((t, v)),
                    _ => return item_err(30001, "Err_SNS_FriendUpdate_Tag_Not_Updatable"),
                }
            }
            let Some(to) = world.account_index(to_name) else {
                return item_err(30001, "Err_SNS_FriendUpdate_Friend_Not_Exist");
            };
            let mut a = write(lock);
            if !a.imported {
                return item_err(30003, "Err_SNS_Account_Not_Exist");
            }
            let Some(f) = a.friends.get_mut(&to) else {
                return item_err(30001, "Err_SNS_FriendUpdate_Friend_Not_Exist");
            };
            let (mut std_changed, mut custom_changed) = (false, false);
            let e = f.data_mut(world, from, to);
            for (tag, v) in checked {
                match tag {
                    SnsTag::Remark => {
                        e.remark = v.as_str().unwrap_or_default().to_owned();
                        e.remark_time = now;
                        std_changed = true;
                    }
                    SnsTag::Group => {
                        e.groups = v
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|g| g.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default();
                        std_changed = true;
                    }
                    SnsTag::Custom(c) => {
                        e.custom.insert(c, v.clone());
                        custom_changed = true;
                    }
                    _ => {}
                }
            }
            if std_changed {
                a.std_seq += 1;
            }
            if custom_changed {
                a.custom_seq += 1;
            }
            Ok(())
        })();
        out.push(to_name, result);
    }
    Ok(out.finish(true))
}

/// `DeleteType`: `Delete_Type_Single` (the default) or `Delete_Type_Both`.
fn delete_both(obj: &Map<String, Value>) -> Result<bool, ApiError> {
    match obj.get("DeleteType").map(|v| v.as_str()) {
        None | Some(Some("Delete_Type_Single")) => Ok(false),
        Some(Some("Delete_Type_Both")) => Ok(true),
        _ => Err(ApiError::new(
            30001,
            "DeleteType must be Delete_Type_Single or Delete_Type_Both",
        )),
    }
}

/// `sns/friend_delete`: removes each To_Account from From_Account's list (and, with
/// `Delete_Type_Both`, From_Account from theirs). Per item: 31704 not in the list.
/// Fires `Sns.CallbackFriendDelete` with every removed pair.
pub(crate) fn friend_delete(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, actor, &obj, who)?;
    let to = str_list(&obj, "To_Account", 30001)?;
    if to.is_empty() || to.len() > MAX_FRIEND_DELETE {
        return Err(ApiError::new(
            30001,
            format!("To_Account must name 1 to {MAX_FRIEND_DELETE} accounts"),
        ));
    }
    let both = delete_both(&obj)?;
    let world = &state.world;
    let from_name = world.name(from);
    let mut out = ResultOut::new(to.len());
    let mut pairs: Vec<Value> = Vec::new();
    for name in &to {
        let result = (|| -> ItemResult {
            let Some(j) = world.account_index(name).filter(|&j| j != from) else {
                return item_err(31704, "Err_SNS_FriendDelete_Not_Friend");
            };
            let Some((mut a, mut b)) = lock_pair(world, from, j) else {
                return item_err(31704, "Err_SNS_FriendDelete_Not_Friend");
            };
            if !remove_friend(&mut a, j) {
                return item_err(31704, "Err_SNS_FriendDelete_Not_Friend");
            }
            pairs.push(json!({"From_Account": from_name, "To_Account": *name}));
            if both && remove_friend(&mut b, from) {
                pairs.push(json!({"From_Account": *name, "To_Account": from_name}));
            }
            Ok(())
        })();
        out.push(name, result);
    }
    if !pairs.is_empty() {
        state.fire(
            actor,
            "Sns.CallbackFriendDelete",
            json!({"CallbackCommand": "Sns.CallbackFriendDelete", "PairList": pairs}),
        );
    }
    Ok(out.finish(false))
}

/// `sns/friend_delete_all`: clears From_Account's list (and with `Delete_Type_Both`
/// removes From_Account from each former friend's list). Sends no webhook (Chat
/// documents none for it).
pub(crate) fn friend_delete_all(
    state: &State,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 30001)?;
    let from = sns_from(state, &Actor::Admin, &obj, who)?;
    let both = delete_both(&obj)?;
    let world = &state.world;
    let lock = world
        .account(from)
        .ok_or_else(|| ApiError::new(30003, "account does not exist"))?;
    let former: Vec<u32> = {
        let mut a = write(lock);
        let former: Vec<u32> = a.friends.keys().copied().collect();
        if !former.is_empty() {
            a.friends.clear();
            a.std_seq += 1;
            a.custom_seq += 1;
        }
        former
    };
    if both {
        for j in former {
            if let Some(l) = world.account(j) {
                remove_friend(&mut write(l), from);
            }
        }
    }
    Ok(reply(Envelope::Display, &json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_and_values_show() {
        assert_eq!(SnsTag::parse("Tag_SNS_IM_Remark"), Some(SnsTag::Remark));
        assert_eq!(
            SnsTag::parse("Tag_SNS_Custom_Rank"),
            Some(SnsTag::Custom(SnsCustom::Rank))
        );
        assert_eq!(SnsTag::parse("Tag_SNS_Custom_Other"), None);
        let mut d = FriendData::new(5, "AddSource_Type_Web");
        let names = |d: &FriendData, s, c| -> Vec<&str> {
            d.value_items(s, c).iter().map(|t| t.tag).collect()
        };
        assert_eq!(
            names(&d, false, false),
            ["Tag_SNS_IM_AddSource", "Tag_SNS_IM_AddTime"]
        );
        d.remark = "r".into();
        d.custom.insert(SnsCustom::Rank, json!(3));
        assert_eq!(
            names(&d, false, false),
            [
                "Tag_SNS_IM_AddSource",
                "Tag_SNS_IM_Remark",
                "Tag_SNS_IM_AddTime",
                "Tag_SNS_Custom_Rank"
            ]
        );
        assert_eq!(names(&d, true, false), ["Tag_SNS_Custom_Rank"]);
        assert!(names(&d, true, true).is_empty());
        assert!(SnsCustom::Rank.check(&json!("x")).is_err());
        assert!(SnsCustom::Note.check(&json!("x")).is_ok());
    }

    #[test]
    fn generated_entries_are_derived_from_the_pair() {
        let a = FriendData::generated(1, 1_768_000_000, 3, 9);
        assert_eq!(a, FriendData::generated(1, 1_768_000_000, 3, 9));
        let back = FriendData::generated(1, 1_768_000_000, 9, 3);
        assert_eq!(a.add_time, back.add_time, "one friendship, one AddTime");
        assert!(a.add_time <= 1_768_000_000);
        let all: Vec<FriendData> = (0..400)
            .map(|j| FriendData::generated(1, 1_768_000_000, 0, j))
            .collect();
        let remarks = all.iter().filter(|d| !d.remark.is_empty()).count();
        assert!((60..140).contains(&remarks), "{remarks}");
        for (j, d) in all.iter().enumerate() {
            assert_eq!(!d.custom.is_empty(), generated_has_custom(1, 0, j as u32));
        }
        assert_ne!(
            all,
            (0..400)
                .map(|j| FriendData::generated(2, 1_768_000_000, 0, j))
                .collect::<Vec<_>>()
        );
    }
}
