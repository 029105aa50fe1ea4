//! Profiles: the standard and declared custom tags, each account's generated profile,
//! and `profile/portrait_get` / `profile/portrait_set`.
//!
//! An account's profile is generated from the seed on demand (every tag its own
//! draw, so reading one tag never computes the others) until something writes it:
//! then the whole profile is stored with the account (`Account::profile`). A tag
//! that was never set is left out of answers (the documented example leaves unset
//! tags out; the docs do not say more).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::protocol::{reply, Actor, ApiError, Envelope, Reply};
use super::rng::mix64;
use super::state::{unix_now_ms, State};
use super::world::{read, write, Account};

/// Most accounts one portrait_get may name.
pub(crate) const MAX_PORTRAIT_GET: usize = 100;
/// Longest string value (bytes) of most tags.
const MAX_VALUE: usize = 500;
/// Longest `Tag_Profile_IM_Location` (bytes).
const MAX_LOCATION: usize = 16;

/// A profile tag the emulator's app knows: every standard tag and the two custom
/// tags its console declares (`Tag_Profile_Custom_Level`, `Tag_Profile_Custom_Team`,
/// both strings, readable and writable by the admin and by users).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ProfileTag {
    Nick,
    Gender,
    BirthDay,
    Location,
    SelfSignature,
    AllowType,
    Language,
    Image,
    MsgSettings,
    AdminForbidType,
    Level,
    Role,
    CustomLevel,
    CustomTeam,
}

/// What a tag's value must be.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A string of at most this many bytes.
    Str(usize),
    /// An unsigned 32-bit integer.
    U32,
    /// One of these strings.
    Enum(&'static [&'static str]),
}

const GENDERS: &[&str] = &[
    "Gender_Type_Unknown",
    "Gender_Type_Female",
    "Gender_Type_Male",
];
const ALLOW_TYPES: &[&str] = &[
    "AllowType_Type_NeedConfirm",
    "AllowType_Type_AllowAny",
    "AllowType_Type_DenyAny",
];
const FORBID_TYPES: &[&str] = &["AdminForbid_Type_None", "AdminForbid_Type_SendOut"];

impl ProfileTag {
    /// Every tag, in the order answers list them when asked for all.
    pub(crate) const ALL: [ProfileTag; 14] = [
        ProfileTag::Nick,
        ProfileTag::Gender,
        ProfileTag::BirthDay,
        ProfileTag::Location,
        ProfileTag::SelfSignature,
        ProfileTag::AllowType,
        ProfileTag::Language,
        ProfileTag::Image,
        ProfileTag::MsgSettings,
        ProfileTag::AdminForbidType,
        ProfileTag::Level,
        ProfileTag::Role,
        ProfileTag::CustomLevel,
        ProfileTag::CustomTeam,
    ];

    /// The tag's name on the wire.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ProfileTag::Nick => "Tag_Profile_IM_Nick",
            ProfileTag::Gender => "Tag_Profile_IM_Gender",
            ProfileTag::BirthDay => "Tag_Profile_IM_BirthDay",
            ProfileTag::Location => "Tag_Profile_IM_Location",
            ProfileTag::SelfSignature => "Tag_Profile_IM_SelfSignature",
            ProfileTag::AllowType => "Tag_Profile_IM_AllowType",
            ProfileTag::Language => "Tag_Profile_IM_Language",
            ProfileTag::Image => "Tag_Profile_IM_Image",
            ProfileTag::MsgSettings => "Tag_Profile_IM_MsgSettings",
            ProfileTag::AdminForbidType => "Tag_Profile_IM_AdminForbidType",
            ProfileTag::Level => "Tag_Profile_IM_Level",
            ProfileTag::Role => "Tag_Profile_IM_Role",
            ProfileTag::CustomLevel => "Tag_Profile_Custom_Level",
            ProfileTag::CustomTeam => "Tag_Profile_Custom_Team",
        }
    }

    /// The tag called `name` (case sensitive).
    pub(crate) fn parse(name: &str) -> Option<ProfileTag> {
        ProfileTag::ALL.into_iter().find(|t| t.name() == name)
    }

    fn kind(self) -> Kind {
        match self {
            ProfileTag::Gender => Kind::Enum(GENDERS),
            ProfileTag::AllowType => Kind::Enum(ALLOW_TYPES),
            ProfileTag::AdminForbidType => Kind::Enum(FORBID_TYPES),
            ProfileTag::BirthDay
            | ProfileTag::Language
            | ProfileTag::MsgSettings
            | ProfileTag::Level
            | ProfileTag::Role => Kind::U32,
            ProfileTag::Location => Kind::Str(MAX_LOCATION),
            _ => Kind::Str(MAX_VALUE),
        }
    }

    /// Whether a user may write the tag from a client (`AdminForbidType` is the
    /// admin's).
    fn user_writable(self) -> bool {
        self != ProfileTag::AdminForbidType
    }

    /// Checks `value` for this tag: 40610 wrong type, 40605 not an allowed value,
    /// 40601 too long.
    fn check(self, value: &Value) -> Result<(), ApiError> {
        let name = self.name();
        match self.kind() {
            Kind::U32 => match value.as_u64() {
                Some(v) if v <= u64::from(u32::MAX) => Ok(()),
                _ => Err(ApiError::new(
                    40610,
                    format!("{name} takes an unsigned 32-bit integer"),
                )),
            },
            Kind::Str(max) => match value.as_str() {
                Some(s) if s.len() <= max => Ok(()),
                Some(_) => Err(ApiError::new(
                    40601,
                    format!("{name} is longer than {max} bytes"),
                )),
                None => Err(ApiError::new(40610, format!("{name} takes a string"))),
            },
            Kind::Enum(values) => match value.as_str() {
                Some(s) if values.contains(&s) => Ok(()),
                Some(s) => Err(ApiError::new(
                    40605,
                    format!("{s:?} is not a value of {name}: {}", values.join(", ")),
                )),
                None => Err(ApiError::new(40610, format!("{name} takes a string"))),
            },
        }
    }
}

const FIRST: [&str; 32] = [
    "Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Iris", "Jon", "Kai", "Lea", "Max",
    "Nia", "Otto", "Pia", "Quinn", "Rosa", "Sam", "Tia", "Uma", "Vik", "Wen", "Xia", "Yuri", "Zoe",
    "Aki", "Bo", "Cai", "Dev", "Eli", "Fay",
];
const LAST: [&str; 16] = [
    "Stone", "Rivers", "Lark", "Moss", "Reed", "Vale", "Frost", "Hale", "Wren", "Ash", "Brook",
    "Cole", "Dale", "Fox", "Gray", "Hart",
];
const SIGNATURES: [&str; 8] = [
    "Busy, text me",
    "On holiday",
    "Coffee first",
    "Work hard, rest well",
    "Back on Monday",
    "Hello there",
    "Only urgent calls",
    "Learning Rust",
];
const LEVELS: [&str; 3] = ["gold", "silver", "bronze"];

/// The generated value of `tag` for account slot `index` of the world of `seed`
/// (`None`: never set). Each tag is its own draw.
pub(crate) fn generated(seed: u64, index: u32, tag: ProfileTag) -> Option<Value> {
    let r = mix64(mix64(seed ^ 0x9F0F_11E5) ^ (u64::from(index) << 8) ^ tag as u64);
    // The low 8 bits decide whether the tag is set (chance in 1/256), the rest pick
    // the value.
    let roll = r & 0xFF;
    let v = r >> 8;
    let set = |percent: u64| roll < percent * 256 / 100;
    match tag {
        ProfileTag::Nick => Some(json!(format!(
            "{} {}",
            FIRST[(v % 32) as usize],
            LAST[((v >> 5) % 16) as usize]
        ))),
        ProfileTag::Gender => set(85).then(|| json!(GENDERS[(v % 3) as usize])),
        ProfileTag::BirthDay => set(70).then(|| {
            let year = 1960 + v % 50;
            let month = 1 + (v >> 6) % 12;
            let day = 1 + (v >> 10) % 28;
            json!(year * 10_000 + month * 100 + day)
        }),
        ProfileTag::Location => set(40).then(|| {
            json!(format!(
                "{}-{}-{}",
                1 + v % 250,
                1 + (v >> 8) % 40,
                1 + (v >> 16) % 100
            ))
        }),
        ProfileTag::SelfSignature => set(50).then(|| json!(SIGNATURES[(v % 8) as usize])),
        ProfileTag::AllowType => set(80).then(|| {
            let pick = v % 100;
            json!(if pick < 70 {
                "AllowType_Type_AllowAny"
            } else if pick < 95 {
                "AllowType_Type_NeedConfirm"
            } else {
                "AllowType_Type_DenyAny"
            })
        }),
        ProfileTag::Language => set(40).then(|| json!(v % 21)),
        ProfileTag::Image => set(75).then(|| {
            json!(format!(
                "https://img.example.com/avatar/{:016x}.png",
                mix64(v)
            ))
        }),
        ProfileTag::MsgSettings => set(15).then(|| json!(v % 2)),
        ProfileTag::AdminForbidType => {
            if roll < 13 {
                Some(json!("AdminForbid_Type_SendOut"))
            } else if roll < 38 {
                Some(json!("AdminForbid_Type_None"))
            } else {
                None
            }
        }
        ProfileTag::Level => set(50).then(|| json!(v % 100)),
        ProfileTag::Role => set(25).then(|| json!(v % 6)),
        ProfileTag::CustomLevel => set(50).then(|| json!(LEVELS[(v % 3) as usize])),
        ProfileTag::CustomTeam => set(35).then(|| json!(format!("team_{:02}", v % 40))),
    }
}

/// The current value of `tag` in account slot `index` (whose state is `acct`).
pub(crate) fn value(seed: u64, index: u32, acct: &Account, tag: ProfileTag) -> Option<Value> {
    match &acct.profile {
        Some(p) => p.get(&tag).cloned(),
        None => generated(seed, index, tag),
    }
}

/// The whole profile of `index`, stored with the account from now on.
fn materialize(seed: u64, index: u32, acct: &mut Account) -> &mut BTreeMap<ProfileTag, Value> {
    acct.profile.get_or_insert_with(|| {
        ProfileTag::ALL
            .into_iter()
            .filter_map(|t| generated(seed, index, t).map(|v| (t, v)))
            .collect()
    })
}

/// Writes `items` (already checked) into the profile of `index`.
pub(crate) fn set_tags(seed: u64, index: u32, acct: &mut Account, items: &[(ProfileTag, Value)]) {
    let profile = materialize(seed, index, acct);
    for (tag, v) in items {
        profile.insert(*tag, v.clone());
    }
}

/// A friend-add request from `from` is refused when the admin forbade it to send
/// them (`AdminForbid_Type_SendOut`).
pub(crate) fn may_send_requests(seed: u64, index: u32, acct: &Account) -> bool {
    value(seed, index, acct, ProfileTag::AdminForbidType)
        .as_ref()
        .and_then(Value::as_str)
        != Some("AdminForbid_Type_SendOut")
}

/// The account's `AllowType`; unset means `AllowType_Type_NeedConfirm` (Chat's
/// default).
pub(crate) fn allow_type(seed: u64, index: u32, acct: &Account) -> &'static str {
    match value(seed, index, acct, ProfileTag::AllowType)
        .as_ref()
        .and_then(Value::as_str)
    {
        Some("AllowType_Type_AllowAny") => "AllowType_Type_AllowAny",
        Some("AllowType_Type_DenyAny") => "AllowType_Type_DenyAny",
        _ => "AllowType_Type_NeedConfirm",
    }
}

/// A `{Tag, Value}` pair in an answer.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TagValueOut {
    /// The tag's name.
    #[serde(rename = "Tag")]
    pub tag: &'static str,
    /// Its value.
    #[serde(rename = "Value")]
    pub value: Value,
}

/// The body as a JSON object; anything else is `code`.
pub(crate) fn object(body: &[u8], code: i64) -> Result<Map<String, Value>, ApiError> {
    super::protocol::parse_body::<Map<String, Value>>(body, code)
}

/// Field `key` as a string: missing or another type is `code`.
pub(crate) fn req_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    code: i64,
) -> Result<&'a str, ApiError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::new(code, format!("{key} must be a string"))),
        None => Err(ApiError::new(code, format!("{key} is required"))),
    }
}

/// Field `key` as an array of strings: missing or another type is `code`.
pub(crate) fn str_list<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    code: i64,
) -> Result<Vec<&'a str>, ApiError> {
    let Some(v) = obj.get(key) else {
        return Err(ApiError::new(code, format!("{key} is required")));
    };
    let Some(list) = v.as_array() else {
        return Err(ApiError::new(
            code,
            format!("{key} must be an array of strings"),
        ));
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| ApiError::new(code, format!("{key}[{i}] must be a string")))
        })
        .collect()
}

/// Parses a TagList of profile tags: each known, in order, each once.
fn profile_tags(obj: &Map<String, Value>) -> Result<Vec<ProfileTag>, ApiError> {
    let names = str_list(obj, "TagList", 40001)?;
    if names.is_empty() {
        return Err(ApiError::new(40001, "TagList is empty"));
    }
    let mut tags: Vec<ProfileTag> = Vec::with_capacity(names.len());
    for name in names {
        let tag = ProfileTag::parse(name).ok_or_else(|| {
            ApiError::new(
                40009,
                format!("tag {name:?} does not exist (standard tags and the declared Tag_Profile_Custom_Level, Tag_Profile_Custom_Team)"),
            )
        })?;
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    Ok(tags)
}

#[derive(Serialize)]
struct UserProfileItemOut<'a> {
    #[serde(rename = "To_Account")]
    to: &'a str,
    #[serde(rename = "ResultCode")]
    code: i64,
    #[serde(rename = "ResultInfo")]
    info: &'static str,
    #[serde(rename = "ProfileItem", skip_serializing_if = "Option::is_none")]
    items: Option<Vec<TagValueOut>>,
}

#[derive(Serialize)]
struct PortraitGetOut<'a> {
    #[serde(rename = "UserProfileItem")]
    items: Vec<UserProfileItemOut<'a>>,
    #[serde(rename = "Fail_Account", skip_serializing_if = "Vec::is_empty")]
    fail: Vec<&'a str>,
}

/// The ProfileItem list of one account: the asked tags that are set, in TagList
/// order.
pub(crate) fn profile_items(
    seed: u64,
    index: u32,
    acct: &Account,
    tags: &[ProfileTag],
) -> Vec<TagValueOut> {
    tags.iter()
        .filter_map(|&t| {
            value(seed, index, acct, t).map(|v| TagValueOut {
                tag: t.name(),
                value: v,
            })
        })
        .collect()
}

/// `profile/portrait_get`: `To_Account` (1 to 100 UserIDs) and `TagList`. One item per
/// requested entry, in request order; an account that is not imported gets its own
/// item with ResultCode 40003 and is listed in `Fail_Account`.
pub(crate) fn portrait_get(state: &State, body: &[u8]) -> Result<Reply, ApiError> {
    let obj = object(body, 40001)?;
    if !obj.contains_key("To_Account") {
        return Err(ApiError::new(40002, "To_Account is required"));
    }
    let to = str_list(&obj, "To_Account", 40001)?;
    if to.is_empty() {
        return Err(ApiError::new(40002, "To_Account is empty"));
    }
    if to.len() > MAX_PORTRAIT_GET {
        return Err(ApiError::new(
            40001,
            format!(
                "To_Account names {} accounts; at most {MAX_PORTRAIT_GET} per call",
                to.len()
            ),
        ));
    }
    let tags = profile_tags(&obj)?;
    let world = &state.world;
    let seed = world.seed();
    let mut out = PortraitGetOut {
        items: Vec::with_capacity(to.len()),
        fail: Vec::new(),
    };
    for name in to {
        let found = world.account_index(name).and_then(|i| {
            let acct = read(world.account(i)?);
            acct.imported.then(|| profile_items(seed, i, &acct, &tags))
        });
        match found {
            Some(items) => out.items.push(UserProfileItemOut {
                to: name,
                code: 0,
                info: "",
                items: Some(items),
            }),
            None => {
                out.items.push(UserProfileItemOut {
                    to: name,
                    code: 40003,
                    info: "Err_Profile_Account_Not_Exist",
                    items: None,
                });
                out.fail.push(name);
            }
        }
    }
    Ok(reply(Envelope::Display, &out))
}

/// `profile/portrait_set`: `From_Account` and `ProfileItem [{Tag, Value}]`. Checked
/// whole before anything is written (all or nothing); a tag given twice keeps its
/// last value. Fires `Profile.CallbackPortraitSet` with the written tags.
pub(crate) fn portrait_set(
    state: &State,
    actor: &Actor<'_>,
    body: &[u8],
    who: &mut Option<u32>,
) -> Result<Reply, ApiError> {
    let obj = object(body, 40001)?;
    let from_name = match (obj.get("From_Account"), actor.user()) {
        (None, Some(user)) => state.world.name(user),
        _ => req_str(&obj, "From_Account", 40001)?,
    };
    if from_name.is_empty() {
        return Err(ApiError::new(40001, "From_Account is empty"));
    }
    let from = state
        .world
        .existing(from_name)
        .ok_or_else(|| ApiError::new(40003, format!("account {from_name:?} does not exist")))?;
    *who = Some(from);
    if actor.user().is_some_and(|u| u != from) {
        return Err(ApiError::new(
            40004,
            "a user may only set their own profile; this needs the app admin",
        ));
    }
    let Some(list) = obj.get("ProfileItem").and_then(Value::as_array) else {
        return Err(ApiError::new(
            40001,
            "ProfileItem is required: an array of {Tag, Value}",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::new(40001, "ProfileItem is empty"));
    }
    let mut items: Vec<(ProfileTag, Value)> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let (Some(name), Some(v)) = (item.get("Tag").and_then(Value::as_str), item.get("Value"))
        else {
            return Err(ApiError::new(
                40001,
                format!("ProfileItem[{i}] needs a string Tag and a Value"),
            ));
        };
        let tag = ProfileTag::parse(name)
            .ok_or_else(|| ApiError::new(40009, format!("tag {name:?} does not exist")))?;
        if actor.user().is_some() && !tag.user_writable() {
            return Err(ApiError::new(40008, format!("a user may not write {name}")));
        }
        tag.check(v)?;
        match items.iter_mut().find(|(t, _)| *t == tag) {
            Some(slot) => slot.1 = v.clone(),
            None => items.push((tag, v.clone())),
        }
    }
    let lock = state
        .world
        .account(from)
        .ok_or_else(|| ApiError::new(40003, "account does not exist"))?;
    {
        let mut acct = write(lock);
        if !acct.imported {
            return Err(ApiError::new(
                40003,
                format!("account {from_name:?} does not exist"),
            ));
        }
        set_tags(state.world.seed(), from, &mut acct, &items);
    }
    let profile_item: Vec<Value> = items
        .iter()
        .map(|(t, v)| json!({"Tag": t.name(), "Value": v}))
        .collect();
    state.fire(
        actor,
        "Profile.CallbackPortraitSet",
        json!({
            "CallbackCommand": "Profile.CallbackPortraitSet",
            "Operator_Account": state.operator(actor),
            "From_Account": state.world.name(from),
            "EventTime": unix_now_ms(),
            "ProfileItem": profile_item,
        }),
    );
    Ok(reply(Envelope::Display, &json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_values_are_checked() {
        for t in ProfileTag::ALL {
            assert_eq!(ProfileTag::parse(t.name()), Some(t));
        }
        assert_eq!(ProfileTag::parse("Tag_Profile_IM_nick"), None);
        assert_eq!(ProfileTag::parse("Tag_Profile_Custom_Other"), None);
        let code = |t: ProfileTag, v: Value| t.check(&v).err().map(|e| e.code);
        assert_eq!(code(ProfileTag::Nick, json!("x")), None);
        assert_eq!(code(ProfileTag::Nick, json!(1)), Some(40610));
        assert_eq!(code(ProfileTag::Nick, json!("a".repeat(501))), Some(40601));
        assert_eq!(
            code(ProfileTag::Location, json!("a".repeat(17))),
            Some(40601)
        );
        assert_eq!(code(ProfileTag::Gender, json!("Gender_Type_Male")), None);
        assert_eq!(code(ProfileTag::Gender, json!("Male")), Some(40605));
        assert_eq!(code(ProfileTag::BirthDay, json!(20190419)), None);
        assert_eq!(code(ProfileTag::BirthDay, json!("20190419")), Some(40610));
        assert_eq!(code(ProfileTag::BirthDay, json!(-1)), Some(40610));
        assert_eq!(
            code(ProfileTag::Level, json!(4_294_967_296u64)),
            Some(40610)
        );
    }

    #[test]
    fn generated_profiles_are_deterministic_and_varied() {
        let a: Vec<_> = (0..200)
            .map(|i| generated(1, i, ProfileTag::Image))
            .collect();
        let b: Vec<_> = (0..200)
            .map(|i| generated(1, i, ProfileTag::Image))
            .collect();
        let c: Vec<_> = (0..200)
            .map(|i| generated(2, i, ProfileTag::Image))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let unset = a.iter().filter(|v| v.is_none()).count();
        assert!(unset > 10 && unset < 120, "{unset}");
        for i in 0..200 {
            assert!(generated(1, i, ProfileTag::Nick).is_some());
            for t in ProfileTag::ALL {
                if let Some(v) = generated(1, i, t) {
                    assert!(t.check(&v).is_ok(), "{t:?} {v}");
                }
            }
        }
    }
}
