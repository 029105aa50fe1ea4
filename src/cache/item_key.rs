//! What an item's key is, and what is forwarded: the one place that parses a request
//! of a cached read ([`crate::chat::reads`]), checks it and builds the body sent to
//! Chat for the items it misses.
//!
//! A request is split into its **items** (in order) and its **variant**: every other
//! top-level field in canonical form (names sorted, values as
//! [`super::key::canonical`] writes them: numbers as their exact text, strings
//! re-encoded one way, object members sorted). The key of an item is (row,
//! variant, item), and **the body sent to Chat is built from the variant and the
//! items alone** ([`upstream_body`]), so requests that share keys are forwarded alike
//! and parsing a forwarded body gives its keys back (`tests/item_key_props.rs`).
//!
//! Outcomes:
//! - not JSON: 60003; a field name repeated at any depth, more than
//!   [`MAX_OTHER_FIELDS`] other fields, nesting deeper than
//!   [`super::key::canonical::MAX_DEPTH`]: 50002 (the gateway's own envelope; nothing
//!   reaches Chat);
//! - anything the table cannot split safely (no items, items that are not
//!   non-empty strings of at most the row's length, a repeated item, more than the
//!   row's limit, a required field missing, a body that is not an object):
//!   [`Parsed::Bypass`], forwarded unchanged so the caller gets exactly Chat's answer.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::key::canonical;
use crate::chat::reads::{ItemShape, ReadRow, READS};
use crate::error::GatewayError;

/// Most top-level fields a request may carry besides its items.
pub const MAX_OTHER_FIELDS: usize = 256;

/// A checked request of a cached read, borrowing from its body.
#[derive(Debug, PartialEq, Eq)]
pub struct ItemRequest<'a> {
    /// The row's id ([`READS`] index).
    pub row: usize,
    /// The items, in request order (one for a single read).
    pub items: Vec<Cow<'a, str>>,
    /// The other fields, canonical: `,"name":value` each, sorted by name.
    pub variant: String,
    /// The row's scope field (`friend_get_list`'s `From_Account`), when it has one.
    pub scope: Option<Cow<'a, str>>,
}

impl ItemRequest<'_> {
    /// The row.
    pub fn row(&self) -> &'static ReadRow {
        &READS[self.row]
    }

    /// The body sent to Chat for these items (see [`upstream_body`]).
    pub fn upstream_body<'s>(&self, items: impl IntoIterator<Item = &'s str>) -> Bytes {
        upstream_body(self.row(), items, &self.variant)
    }
}

/// What parsing decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Cacheable: items and variant.
    Split(ItemRequest<'a>),
    /// Not splittable: forwarded unchanged. The reason, for the debug log.
    Bypass(&'static str),
}

/// The body sent to Chat: the item field with `items`, then `variant`. A function
/// of the key alone.
pub fn upstream_body<'s>(
    row: &ReadRow,
    items: impl IntoIterator<Item = &'s str>,
    variant: &str,
) -> Bytes {
    let mut out = String::with_capacity(64 + variant.len());
    out.push('{');
    canonical::write_str(&mut out, row.items.field());
    out.push(':');
    match row.items {
        ItemShape::Scalar(_) => {
            for item in items.into_iter().take(1) {
                canonical::write_str(&mut out, item);
            }
        }
        ItemShape::List(_) => {
            out.push('[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical::write_str(&mut out, item);
            }
            out.push(']');
        }
        ItemShape::ObjectList(_, key) => {
            out.push('[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('{');
                canonical::write_str(&mut out, key);
                out.push(':');
                canonical::write_str(&mut out, item);
                out.push('}');
            }
            out.push(']');
        }
    }
    out.push_str(variant);
    out.push('}');
    Bytes::from(out.into_bytes())
}

/// A string that borrows from the input when it has no escapes.
#[derive(Deserialize)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

/// A top-level object's members, in order, values raw.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(Str(k)) = map.next_key::<Str<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The top-level members of a JSON object, in order, values raw; `None` when the
/// body is not a JSON object. Shared with the answer splitter.
pub(crate) fn members(body: &[u8]) -> Result<Vec<(Cow<'_, str>, &RawValue)>, serde_json::Error> {
    serde_json::from_slice::<Members<'_>>(body).map(|m| m.0)
}

/// Parses `body` as a request of row `row`.
pub fn parse(row: usize, body: &[u8]) -> Result<Parsed<'_>, GatewayError> {
    let r = &READS[row];
    let members = match members(body) {
        Ok(m) => m,
        Err(e) => {
            // A data error is only ours to report when the whole body is JSON.
            return match (
                e.classify(),
                serde_json::from_slice::<de::IgnoredAny>(body).err(),
            ) {
                // Valid JSON that is not an object: Chat's to answer.
                (serde_json::error::Category::Data, None) => {
                    Ok(Parsed::Bypass("body is not an object"))
                }
                (_, Some(syntax)) => Err(GatewayError::InvalidJson(syntax.to_string())),
                (_, None) => Err(GatewayError::InvalidJson(e.to_string())),
            };
        }
    };
    if members.len() > MAX_OTHER_FIELDS + 1 {
        return Err(GatewayError::InvalidField(format!(
            "at most {MAX_OTHER_FIELDS} fields besides the items"
        )));
    }
    let mut sorted: Vec<&(Cow<'_, str>, &RawValue)> = members.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(GatewayError::InvalidField(format!(
            "duplicate field {}",
            w[0].0
        )));
    }
    // The variant (and every nested duplicate in it, which is an error).
    let field = r.items.field();
    let mut variant = String::new();
    let mut items_raw = None;
    for (name, value) in &sorted {
        if name == field {
            items_raw = Some(*value);
            continue;
        }
        variant.push(',');
        canonical::write_str(&mut variant, name);
        variant.push(':');
        canonical::value(value.get(), &mut variant).map_err(GatewayError::InvalidField)?;
    }
    let Some(items_raw) = items_raw else {
        return Ok(Parsed::Bypass("no items"));
    };
    let items = match items_of(r, items_raw) {
        Ok(items) => items,
        Err(why) => {
            // Items that split are plain strings (or one-string objects), which
            // cannot repeat a name; others may, and a name repeated at any depth is
            // refused whatever else is wrong.
            canonical::value(items_raw.get(), &mut String::new())
                .map_err(GatewayError::InvalidField)?;
            return Ok(Parsed::Bypass(why));
        }
    };
    for req in r.required {
        if !members.iter().any(|(n, v)| n == req && v.get() != "null") {
            return Ok(Parsed::Bypass("a required field is missing"));
        }
    }
    let scope = match r.scope {
        None => None,
        Some((f, _)) => {
            let Some((_, v)) = members.iter().find(|(n, _)| n == f) else {
                return Ok(Parsed::Bypass("the scope field is missing"));
            };
            match serde_json::from_str::<Str<'_>>(v.get()) {
                Ok(Str(s)) if valid_name(&s, crate::chat::reads::MAX_ACCOUNT_BYTES) => Some(s),
                _ => return Ok(Parsed::Bypass("the scope field is not a valid name")),
            }
        }
    };
    Ok(Parsed::Split(ItemRequest {
        row,
        items,
        variant,
        scope,
    }))
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max
}

/// The items of `raw` for row `r`, or why they cannot be split.
fn items_of<'a>(r: &ReadRow, raw: &'a RawValue) -> Result<Vec<Cow<'a, str>>, &'static str> {
    let item = |v: &'a RawValue| -> Result<Cow<'a, str>, &'static str> {
        match serde_json::from_str::<Str<'a>>(v.get()) {
            Ok(Str(s)) if valid_name(&s, r.max_item_bytes) => Ok(s),
            Ok(_) => Err("an item is empty or too long"),
            Err(_) => Err("an item is not a string"),
        }
    };
    let items = match r.items {
        ItemShape::Scalar(_) => vec![item(raw)?],
        ItemShape::List(_) | ItemShape::ObjectList(..) => {
            let list: Vec<&'a RawValue> =
                serde_json::from_str(raw.get()).map_err(|_| "the items are not an array")?;
            if list.is_empty() {
                return Err("no items");
            }
            if list.len() > r.max_items {
                return Err("more items than Chat allows");
            }
            let mut out = Vec::with_capacity(list.len());
            for v in list {
                out.push(match r.items {
                    ItemShape::ObjectList(_, key) => {
                        let m =
                            members(v.get().as_bytes()).map_err(|_| "an item is not an object")?;
                        match m.as_slice() {
                            [(k, v)] if k == key => item(v)?,
                            _ => return Err("an item object has other fields"),
                        }
                    }
                    _ => item(v)?,
                });
            }
            let mut sorted: Vec<&str> = out.iter().map(|c| c.as_ref()).collect();
            sorted.sort_unstable();
            if sorted.windows(2).any(|w| w[0] == w[1]) {
                return Err("an item is repeated");
            }
            out
        }
    };
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::reads::row;

    fn id(command: &str) -> usize {
        row(command).unwrap().0
    }

    fn split(command: &str, body: &str) -> ItemRequest<'static> {
        let body: &'static str = Box::leak(body.to_string().into_boxed_str());
        match parse(id(command), body.as_bytes()).unwrap() {
            Parsed::Split(r) => r,
            other => panic!("{body}: {other:?}"),
        }
    }

    fn bypass(command: &str, body: &str) -> &'static str {
        match parse(id(command), body.as_bytes()).unwrap() {
            Parsed::Bypass(why) => why,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_batch_splits_into_items_and_a_canonical_variant() {
        let r = split(
            "profile/portrait_get",
            r#"{ "TagList" : ["Tag_Profile_IM_Nick", "Tag_Profile_IM_Image"], "To_Account":["a","b\u0041"]}"#,
        );
        assert_eq!(r.items, vec!["a", "bA"]);
        assert!(matches!(r.items[0], Cow::Borrowed(_)));
        assert_eq!(
            r.variant,
            r#","TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]"#
        );
        assert_eq!(
            &r.upstream_body(["b"])[..],
            br#"{"To_Account":["b"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]}"#
        );
        let c = split(
            "im_open_login_svc/account_check",
            r#"{"CheckItem":[{"UserID":"x"},{"UserID":"y"}]}"#,
        );
        assert_eq!(c.items, vec!["x", "y"]);
        assert_eq!(
            &c.upstream_body(["y"])[..],
            br#"{"CheckItem":[{"UserID":"y"}]}"#
        );
        let f = split(
            "sns/friend_get_list",
            r#"{"From_Account":"o","To_Account":["p"],"TagList":[]}"#,
        );
        assert_eq!(f.scope.as_deref(), Some("o"));
        assert_eq!(f.variant, r#","From_Account":"o","TagList":[]"#);
        let s = split("sns/friend_get", r#"{"StartIndex":0,"From_Account":"o"}"#);
        assert_eq!(s.items, vec!["o"]);
        assert_eq!(
            &s.upstream_body(["o"])[..],
            br#"{"From_Account":"o","StartIndex":0}"#
        );
    }

    #[test]
    fn what_cannot_be_split_is_forwarded() {
        let p = "profile/portrait_get";
        for body in [
            r#"{"TagList":[]}"#,
            r#"{"To_Account":["a"]}"#,
            r#"{"To_Account":["a"],"TagList":null}"#,
            r#"{"To_Account":"a","TagList":[]}"#,
            r#"{"To_Account":[],"TagList":[]}"#,
            r#"{"To_Account":[1],"TagList":[]}"#,
            r#"{"To_Account":[""],"TagList":[]}"#,
            r#"{"To_Account":["a","a"],"TagList":[]}"#,
            r#"{"To_Account":["123456789012345678901234567890123"],"TagList":[]}"#,
            r#"[1,2]"#,
            r#""x""#,
        ] {
            bypass(p, body);
        }
        let many: Vec<String> = (0..101).map(|i| format!("\"u{i}\"")).collect();
        bypass(
            p,
            &format!(r#"{{"To_Account":[{}],"TagList":[]}}"#, many.join(",")),
        );
        let c = "im_open_login_svc/account_check";
        bypass(c, r#"{"CheckItem":[{"UserID":"x","Extra":1}]}"#);
        bypass(c, r#"{"CheckItem":["x"]}"#);
        bypass(
            "sns/friend_get_list",
            r#"{"From_Account":7,"To_Account":["p"],"TagList":[]}"#,
        );
    }

    #[test]
    fn bad_bodies_are_refused_before_chat() {
        let p = id("profile/portrait_get");
        for (body, code) in [
            (&b"{"[..], 60003),
            (b"not json", 60003),
            (b"{} x", 60003),
            (
                br#"{"To_Account":["a"],"To_Account":["b"],"TagList":[]}"#,
                50002,
            ),
            (
                br#"{"To_Account":["a"],"TagList":[],"X":{"a":1,"a":2}}"#,
                50002,
            ),
            (br#"{"To_Account":[{"a":1,"a":2}],"TagList":[]}"#, 50002),
        ] {
            let e = parse(p, body).unwrap_err();
            assert_eq!(e.code(), code, "{}: {e}", String::from_utf8_lossy(body));
        }
        let mut s = String::from(r#"{"To_Account":["a"],"TagList":[]"#);
        for i in 0..MAX_OTHER_FIELDS + 2 {
            s.push_str(&format!(r#","f{i}":1"#));
        }
        s.push('}');
        assert_eq!(parse(p, s.as_bytes()).unwrap_err().code(), 50002);
    }

    #[test]
    fn forwarded_bodies_parse_back_to_the_same_key() {
        let r = split(
            "group_open_http_svc/get_group_info",
            r#"{"ResponseFilter":{"GroupBaseInfoFilter":["Name","Type"]},"GroupIdList":["@a","@b"]}"#,
        );
        let body = r.upstream_body(r.items.iter().map(|c| c.as_ref()));
        let again = match parse(r.row, &body).unwrap() {
            Parsed::Split(a) => (
                a.items.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                a.variant,
            ),
            other => panic!("{other:?}"),
        };
        assert_eq!(again.0, vec!["@a", "@b"]);
        assert_eq!(again.1, r.variant);
    }
}
