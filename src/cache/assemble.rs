//! How a batched read's answer splits into per-item entries, and how an answer is
//! assembled back from entries and Chat's answers: in the request's order, every
//! item byte for byte as Chat returned it, the top-level members of Chat's answer,
//! and the fail list (`Fail_Account`) recomputed from what Chat reported for each
//! item ([`crate::chat::reads::AnswerShape::Items`]).
//!
//! An answer the table cannot split (no item array, an item without its id, an id
//! twice, a fail list that is not a list of strings) is never guessed at: the
//! caller forwards the whole request instead.

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::value::RawValue;

use super::item_key::members;
use super::key::canonical;
use crate::chat::reads::{AnswerShape, ReadRow, READS};

/// The top-level members around the item array of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// `{`, the members before the item array (each `"name":value,`), then
    /// `"<array>":[`.
    pub prefix: Box<str>,
    /// The members after the item array (each `,"name":value`), then `}`.
    pub tail: Box<str>,
    /// Whether the answer had a fail list (written even when empty, as Chat did).
    pub has_fail: bool,
    /// What follows the items of an answer in which none failed: `]`, the empty fail
    /// list if the answer had one, then `tail` (the hit path writes it as is).
    pub closing: Box<str>,
}

impl Template {
    /// The row's documented all-success answer.
    pub fn of_row(row: &ReadRow) -> Template {
        match row.answer {
            AnswerShape::Items {
                array,
                before,
                after,
                ..
            } => {
                let mut prefix = String::from("{");
                prefix.push_str(before);
                canonical::write_str(&mut prefix, array);
                prefix.push_str(":[");
                Template::new(row, prefix, format!("{after}}}"), false)
            }
            AnswerShape::Whole => Template::new(row, String::new(), String::new(), false),
        }
    }

    /// A template of these members.
    fn new(row: &ReadRow, prefix: String, tail: String, has_fail: bool) -> Template {
        let mut closing = String::from("]");
        if let (
            AnswerShape::Items {
                fail_list: Some(name),
                ..
            },
            true,
        ) = (row.answer, has_fail)
        {
            closing.push(',');
            canonical::write_str(&mut closing, name);
            closing.push_str(":[]");
        }
        closing.push_str(&tail);
        Template {
            prefix: prefix.into(),
            tail: tail.into(),
            has_fail,
            closing: closing.into(),
        }
    }

    /// Writes the answer: `items` in order, each with `Some(id)` when Chat listed it
    /// as failed.
    pub fn write<'a>(
        &self,
        row: &ReadRow,
        items: impl Iterator<Item = (&'a [u8], Option<&'a str>)> + Clone,
    ) -> Bytes {
        let fail_list = match row.answer {
            AnswerShape::Items { fail_list, .. } => fail_list,
            AnswerShape::Whole => None,
        };
        let len: usize = items
            .clone()
            .map(|(b, f)| b.len() + 1 + f.map_or(0, |f| f.len() + 3))
            .sum();
        let mut out = Vec::with_capacity(self.prefix.len() + len + self.tail.len() + 32);
        out.extend_from_slice(self.prefix.as_bytes());
        for (i, (body, _)) in items.clone().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(body);
        }
        out.push(b']');
        if let Some(name) = fail_list {
            let mut failed = items.filter_map(|(_, f)| f).peekable();
            if self.has_fail || failed.peek().is_some() {
                let mut s = String::from(",");
                canonical::write_str(&mut s, name);
                s.push_str(":[");
                for (i, id) in failed.enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    canonical::write_str(&mut s, id);
                }
                s.push(']');
                out.extend_from_slice(s.as_bytes());
            }
        }
        out.extend_from_slice(self.tail.as_bytes());
        Bytes::from(out)
    }
}

/// One item of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerItem<'a> {
    /// Its id (decoded).
    pub id: Cow<'a, str>,
    /// Its JSON, exactly as Chat returned it.
    pub raw: &'a str,
    /// Chat listed it in the fail list.
    pub failed: bool,
    /// Its code is 0, it is not listed as failed, and the row's further condition
    /// holds: it may be cached.
    pub cacheable: bool,
}

/// An answer split into items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The items, in the answer's order.
    pub items: Vec<AnswerItem<'a>>,
    /// The members around them.
    pub template: Template,
}

/// Splits a successful answer (`ActionStatus` OK, `ErrorCode` 0) of a batched read;
/// `None` when its shape is not the documented one.
pub fn split<'a>(row: &ReadRow, body: &'a [u8]) -> Option<Split<'a>> {
    let AnswerShape::Items {
        array,
        id,
        code,
        only_if,
        fail_list,
        ..
    } = row.answer
    else {
        return None;
    };
    let top = members(body).ok()?;
    let mut failed_ids: Vec<Cow<'a, str>> = Vec::new();
    let mut has_fail = false;
    if let Some(name) = fail_list {
        for (_, v) in top.iter().filter(|(n, _)| n == name) {
            if has_fail {
                return None;
            }
            has_fail = true;
            failed_ids = strings(v)?;
        }
    }
    let mut prefix = String::from("{");
    let mut tail = String::new();
    let mut raw_items: Option<&'a RawValue> = None;
    for (name, v) in &top {
        if Some(name.as_ref()) == fail_list {
            continue;
        }
        if name == array {
            if raw_items.is_some() {
                return None;
            }
            raw_items = Some(v);
            continue;
        }
        let out = if raw_items.is_some() {
            tail.push(',');
            &mut tail
        } else {
            &mut prefix
        };
        canonical::write_str(out, name);
        out.push(':');
        out.push_str(v.get());
        if raw_items.is_none() {
            prefix.push(',');
        }
    }
    canonical::write_str(&mut prefix, array);
    prefix.push_str(":[");
    tail.push('}');
    let list: Vec<&'a RawValue> = serde_json::from_str(raw_items?.get()).ok()?;
    let mut items = Vec::with_capacity(list.len());
    for raw in list {
        let fields = members(raw.get().as_bytes()).ok()?;
        let field = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        let item_id = match serde_json::from_str::<Cow<'a, str>>(field(id)?.get()) {
            Ok(Cow::Owned(s)) => Cow::Owned(s),
            Ok(Cow::Borrowed(s)) => Cow::Owned(s.to_string()),
            Err(_) => return None,
        };
        let ok = field(code).and_then(|c| c.get().parse::<i64>().ok()) == Some(0);
        let extra = only_if.is_none_or(|(f, want)| {
            field(f)
                .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
                .as_deref()
                == Some(want)
        });
        let failed = failed_ids.contains(&item_id);
        items.push(AnswerItem {
            id: item_id,
            raw: raw.get(),
            failed,
            cacheable: ok && extra && !failed,
        });
    }
    let mut ids: Vec<&str> = items.iter().map(|i| i.id.as_ref()).collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    Some(Split {
        items,
        template: Template::new(row, prefix, tail, has_fail),
    })
}

/// The names an answer lists: the string `id` of each object of its top-level
/// `array` (the GroupIds of a joined-group list); `None` when the answer does not
/// have that shape. An element without the field names nothing.
pub fn listed(body: &[u8], array: &str, id: &str) -> Option<Vec<String>> {
    let top = members(body).ok()?;
    let Some((_, raw)) = top.iter().find(|(n, _)| n == array) else {
        // No list at all (an empty answer leaves it out): nothing listed.
        return Some(Vec::new());
    };
    let list: Vec<&RawValue> = serde_json::from_str(raw.get()).ok()?;
    let mut out = Vec::with_capacity(list.len());
    for v in list {
        let fields = members(v.get().as_bytes()).ok()?;
        if let Some((_, g)) = fields.iter().find(|(n, _)| n == id) {
            out.push(serde_json::from_str::<String>(g.get()).ok()?);
        }
    }
    Some(out)
}

/// A JSON array of strings.
fn strings<'a>(v: &'a RawValue) -> Option<Vec<Cow<'a, str>>> {
    #[derive(serde::Deserialize)]
    struct S<'a>(#[serde(borrow)] Cow<'a, str>);
    let list: Vec<S<'a>> = serde_json::from_str(v.get()).ok()?;
    Some(list.into_iter().map(|S(s)| s).collect())
}

/// The all-success template of each batched read: the documented one until Chat
/// answers with no failed item, then the members of Chat's latest such answer (so
/// fields the docs do not show, like `RequestId`, are kept).
pub struct Templates {
    rows: Box<[ArcSwap<Template>]>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Templates {
            rows: READS
                .iter()
                .map(|r| ArcSwap::from_pointee(Template::of_row(r)))
                .collect(),
        }
    }
}

impl Templates {
    /// The current template of `row`.
    pub fn get(&self, row: usize) -> Arc<Template> {
        self.rows[row].load_full()
    }

    /// The current template of `row`, borrowed (no reference count touched: the
    /// hit path's).
    #[inline]
    pub fn guard(&self, row: usize) -> arc_swap::Guard<Arc<Template>> {
        self.rows[row].load()
    }

    /// Learns `template` from an answer in which no item failed.
    pub fn learn(&self, row: usize, template: &Template) {
        if **self.rows[row].load() != *template {
            self.rows[row].store(Arc::new(template.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::reads::row;

    fn r(c: &str) -> &'static ReadRow {
        row(c).unwrap().1
    }

    #[test]
    fn a_portrait_answer_splits_and_reassembles_to_itself() {
        let body = br#"{"UserProfileItem":[
            {"To_Account":"alice","ResultCode":0,"ResultInfo":"","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"Alice"}]},
            {"To_Account":"ghost","ResultCode":40006,"ResultInfo":"Err"}],
            "Fail_Account":["ghost"],"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":""}"#;
        let row = r("profile/portrait_get");
        let s = split(row, body).unwrap();
        assert_eq!(s.items.len(), 2);
        assert!(s.items[0].cacheable && !s.items[0].failed);
        assert!(!s.items[1].cacheable && s.items[1].failed);
        let again = s.template.write(
            row,
            s.items
                .iter()
                .map(|i| (i.raw.as_bytes(), i.failed.then_some(i.id.as_ref()))),
        );
        let a: serde_json::Value = serde_json::from_slice(&again).unwrap();
        let b: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(a, b);
        // Without the failure, the fail list stays (empty), as Chat had one.
        let one = s
            .template
            .write(row, [(s.items[0].raw.as_bytes(), None)].into_iter());
        let v: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert_eq!(v["Fail_Account"], serde_json::json!([]));
        assert_eq!(v["UserProfileItem"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_documented_template_is_an_answer() {
        for c in [
            "profile/portrait_get",
            "group_open_http_svc/get_group_info",
            "im_open_login_svc/account_check",
            "sns/friend_get_list",
        ] {
            let row = r(c);
            let t = Template::of_row(row);
            let empty = t.write(row, std::iter::empty());
            let v: serde_json::Value =
                serde_json::from_slice(&empty).unwrap_or_else(|e| panic!("{c}: {e}"));
            assert_eq!(v["ErrorCode"], 0);
            let two = t.write(
                row,
                [(&b"{}"[..], Some("x")), (&b"{}"[..], None)].into_iter(),
            );
            let v: serde_json::Value = serde_json::from_slice(&two).unwrap();
            if c.ends_with("portrait_get") || c.ends_with("friend_get_list") {
                assert_eq!(v["Fail_Account"], serde_json::json!(["x"]));
            } else {
                assert!(v.get("Fail_Account").is_none());
            }
        }
    }

    #[test]
    fn the_closing_piece_is_what_write_puts_after_successful_items() {
        let body = br#"{"UserProfileItem":[{"To_Account":"a","ResultCode":0}],"Fail_Account":[],"ActionStatus":"OK","ErrorCode":0}"#;
        let row = r("profile/portrait_get");
        for t in [split(row, body).unwrap().template, Template::of_row(row)] {
            let w = t.write(row, [(&b"{}"[..], None), (&b"{}"[..], None)].into_iter());
            let pieces = format!("{}{{}},{{}}{}", t.prefix, t.closing);
            assert_eq!(&w[..], pieces.as_bytes());
        }
    }

    #[test]
    fn account_check_caches_only_imported() {
        let body = br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ResultItem":[
            {"UserID":"a","ResultCode":0,"ResultInfo":"","AccountStatus":"Imported"},
            {"UserID":"b","ResultCode":0,"ResultInfo":"","AccountStatus":"NotImported"}]}"#;
        let s = split(r("im_open_login_svc/account_check"), body).unwrap();
        assert!(s.items[0].cacheable);
        assert!(!s.items[1].cacheable && !s.items[1].failed);
        assert_eq!(
            &*s.template.prefix,
            r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ResultItem":["#
        );
        assert_eq!(&*s.template.tail, "}");
    }

    #[test]
    fn unexpected_shapes_are_not_split() {
        let row = r("group_open_http_svc/get_group_info");
        for body in [
            &br#"{"ActionStatus":"OK","ErrorCode":0}"#[..],
            br#"{"GroupInfo":{}}"#,
            br#"{"GroupInfo":[1]}"#,
            br#"{"GroupInfo":[{"ErrorCode":0}]}"#,
            br#"{"GroupInfo":[{"GroupId":"a"},{"GroupId":"a"}]}"#,
            br#"{"GroupInfo":[],"GroupInfo":[]}"#,
            b"nope",
        ] {
            assert!(
                split(row, body).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A group without its own ErrorCode is not cached.
        let s = split(row, br#"{"GroupInfo":[{"GroupId":"a","Name":"n"}]}"#).unwrap();
        assert!(!s.items[0].cacheable);
        let p = r("profile/portrait_get");
        assert!(split(p, br#"{"UserProfileItem":[],"Fail_Account":"x"}"#).is_none());
    }
}
