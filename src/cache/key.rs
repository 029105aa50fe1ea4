//! What a cached page's key is: the one place that parses a get_list request, checks
//! it, normalizes it and builds the body sent upstream.
//!
//! The key is the account plus the five cursor/flag fields (defaults applied) plus a
//! canonical form of any extra fields (sorted keys, no whitespace), so field order and
//! spacing in the caller's JSON do not matter. Parsing borrows from the request body:
//! a request without extra fields is parsed and keyed without a heap allocation.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GatewayError;

/// `AssistFlags` when the caller omits it: complete conversation data.
pub const DEFAULT_ASSIST_FLAGS: u64 = 63;
/// Longest `From_Account` accepted (Chat's UserID limit).
pub const MAX_ACCOUNT_BYTES: usize = 32;

/// One page of one account's list, within that account's cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// `TimeStamp`: cursor of general conversations.
    pub time_stamp: u64,
    /// `StartIndex`: cursor of general conversations.
    pub start_index: u64,
    /// `TopTimeStamp`: cursor of pinned conversations.
    pub top_time_stamp: u64,
    /// `TopStartIndex`: cursor of pinned conversations.
    pub top_start_index: u64,
    /// `AssistFlags`.
    pub assist_flags: u64,
    /// Canonical JSON of the fields beyond the six (None when there are none).
    pub extra: Option<Box<str>>,
}

impl Default for PageKey {
    /// The first page, as a request with only `From_Account` asks for it: all cursors
    /// 0, `AssistFlags` 63, no extra fields.
    fn default() -> Self {
        PageKey {
            time_stamp: 0,
            start_index: 0,
            top_time_stamp: 0,
            top_start_index: 0,
            assist_flags: DEFAULT_ASSIST_FLAGS,
            extra: None,
        }
    }
}

/// A checked get_list request, borrowing from the body it was parsed from.
#[derive(Debug)]
pub struct GetListRequest<'a> {
    /// `From_Account`.
    pub account: Cow<'a, str>,
    /// The page within the account.
    pub page: PageKey,
    /// Extra fields as the caller sent them, forwarded upstream.
    extras: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Parses and checks a get_list body. Invalid JSON is 60003; a missing or bad field
/// is 50002; both with a reason naming the field.
pub fn parse(body: &[u8]) -> Result<GetListRequest<'_>, GatewayError> {
    serde_json::from_slice::<GetListRequest<'_>>(body).map_err(|e| {
        // A field error is only a field error if the whole body is JSON.
        let syntax = serde_json::from_slice::<serde::de::IgnoredAny>(body).err();
        match (e.classify(), syntax) {
            (serde_json::error::Category::Data, None) => GatewayError::InvalidField(e.to_string()),
            (serde_json::error::Category::Data, Some(s)) => {
                GatewayError::InvalidJson(s.to_string())
            }
            _ => GatewayError::InvalidJson(e.to_string()),
        }
    })
}

impl GetListRequest<'_> {
    /// The body sent to Chat: all six fields, then the extras as given.
    pub fn upstream_body(&self) -> Bytes {
        let mut out = Vec::with_capacity(160 + self.account.len());
        out.extend_from_slice(b"{\"From_Account\":");
        write_json_str(&mut out, &self.account);
        let p = &self.page;
        for (name, v) in [
            ("TimeStamp", p.time_stamp),
            ("StartIndex", p.start_index),
            ("TopTimeStamp", p.top_time_stamp),
            ("TopStartIndex", p.top_start_index),
            ("AssistFlags", p.assist_flags),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(v.to_string().as_bytes());
        }
        for (k, v) in &self.extras {
            out.push(b',');
            write_json_str(&mut out, k);
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A string that borrows from the input when it has no escapes.
struct MaybeBorrowed<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for MaybeBorrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeBorrowed<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeBorrowed(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeBorrowed(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A non-negative integer field, or null for "use the default".
struct Cursor(Option<u64>);

impl<'de> Deserialize<'de> for Cursor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Option::<u64>::deserialize(d).map(Cursor)
    }
}

impl<'de> Deserialize<'de> for GetListRequest<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GetListRequest<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object with From_Account")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut account: Option<Cow<'de, str>> = None;
                let mut nums: [Option<u64>; 5] = [None; 5];
                let mut seen = [false; 5];
                let mut extras: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                while let Some(MaybeBorrowed(key)) = map.next_key::<MaybeBorrowed<'de>>()? {
                    let slot = match &*key {
                        "From_Account" => {
                            if account.is_some() {
                                return Err(de::Error::custom("duplicate field From_Account"));
                            }
                            // A syntax error reported as this message is put right by
                            // `parse`, which re-checks the whole body's syntax on error.
                            let MaybeBorrowed(a) = map
                                .next_value()
                                .map_err(|_| de::Error::custom("From_Account must be a string"))?;
                            account = Some(a);
                            continue;
                        }
                        "TimeStamp" => 0,
                        "StartIndex" => 1,
                        "TopTimeStamp" => 2,
                        "TopStartIndex" => 3,
                        "AssistFlags" => 4,
                        _ => {
                            if extras.iter().any(|(k, _)| *k == key) {
                                return Err(de::Error::custom(format!("duplicate field {key}")));
                            }
                            let v: &'de RawValue = map.next_value()?;
                            extras.push((key, v));
                            continue;
                        }
                    };
                    if seen[slot] {
                        return Err(de::Error::custom(format!("duplicate field {key}")));
                    }
                    seen[slot] = true;
                    let Cursor(v) = map.next_value().map_err(|_| {
                        de::Error::custom(format!("{key} must be a non-negative integer"))
                    })?;
                    nums[slot] = v;
                }
                let account =
                    account.ok_or_else(|| de::Error::custom("From_Account is required"))?;
                if account.is_empty() {
                    return Err(de::Error::custom("From_Account must not be empty"));
                }
                if account.len() > MAX_ACCOUNT_BYTES {
                    return Err(de::Error::custom(format!(
                        "From_Account must be at most {MAX_ACCOUNT_BYTES} bytes"
                    )));
                }
                let extra = canonical_extras(&mut extras).map_err(de::Error::custom)?;
                Ok(GetListRequest {
                    account,
                    page: {
                        let d = PageKey::default();
                        PageKey {
                            time_stamp: nums[0].unwrap_or(d.time_stamp),
                            start_index: nums[1].unwrap_or(d.start_index),
                            top_time_stamp: nums[2].unwrap_or(d.top_time_stamp),
                            top_start_index: nums[3].unwrap_or(d.top_start_index),
                            assist_flags: nums[4].unwrap_or(d.assist_flags),
                            extra,
                        }
                    },
                    extras,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// Sorts the extras by name and renders them canonically (nested objects with sorted
/// keys, no whitespace). `None` when there are none.
fn canonical_extras(
    extras: &mut [(Cow<'_, str>, &RawValue)],
) -> Result<Option<Box<str>>, serde_json::Error> {
    if extras.is_empty() {
        return Ok(None);
    }
    extras.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    out.push(b'{');
    for (i, (k, v)) in extras.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(&mut out, k);
        out.push(b':');
        // serde_json's map is sorted (BTreeMap), so this is canonical.
        let value: serde_json::Value = serde_json::from_str(v.get())?;
        serde_json::to_writer(&mut out, &value)?;
    }
    out.push(b'}');
    Ok(Some(
        String::from_utf8_lossy(&out).into_owned().into_boxed_str(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_borrowing() {
        let r = parse(br#"{"From_Account":"user_0001"}"#).unwrap();
        assert!(matches!(r.account, Cow::Borrowed("user_0001")));
        assert_eq!(r.page, PageKey::default());
        assert_eq!(r.page.assist_flags, 63);
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"From_Account":"user_0001","TimeStamp":0,"StartIndex":0,
                "TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63})
        );
    }

    #[test]
    fn order_and_whitespace_do_not_change_the_key() {
        let a = parse(br#"{"From_Account":"u","TimeStamp":5,"X":{"b":1,"a":[1, 2]},"Y":true}"#)
            .unwrap();
        let b = parse(b"{ \"Y\" : true , \"X\":{\"a\":[1,2], \"b\":1},\n\"TimeStamp\":5, \"From_Account\":\"u\"}")
            .unwrap();
        assert_eq!(a.page, b.page);
        assert_eq!(a.account, b.account);
        let c =
            parse(br#"{"From_Account":"u","TimeStamp":5,"X":{"b":2,"a":[1,2]},"Y":true}"#).unwrap();
        assert_ne!(a.page, c.page);
        let body: serde_json::Value = serde_json::from_slice(&a.upstream_body()).unwrap();
        assert_eq!(body["X"]["a"][1], 2);
        assert_eq!(body["Y"], true);
    }

    #[test]
    fn errors_are_classified() {
        for (body, code) in [
            (&b"{"[..], 60003),
            (b"not json", 60003),
            (b"{} trailing", 60003),
            (br#"{"From_Account": }"#, 60003),
            (br#"{"From_Account":"u","TimeStamp":}"#, 60003),
            (b"{}", 50002),
            (b"[]", 50002),
            (br#"{"From_Account":""}"#, 50002),
            (br#"{"From_Account":7}"#, 50002),
            (br#"{"From_Account":"u","TimeStamp":-1}"#, 50002),
            (br#"{"From_Account":"u","TimeStamp":"1"}"#, 50002),
            (br#"{"From_Account":"u","From_Account":"v"}"#, 50002),
            (
                br#"{"From_Account":"123456789012345678901234567890123"}"#,
                50002,
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.code(), code, "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn escaped_account_is_owned_and_reencoded() {
        let r = parse(br#"{"From_Account":"a\"b"}"#).unwrap();
        assert_eq!(r.account, "a\"b");
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(v["From_Account"], "a\"b");
    }
}
