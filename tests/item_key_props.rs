//! Property tests of the item key (`src/cache/item_key.rs`), for every cached read
//! other than get_list:
//! - parsing never panics, on generated bodies (hostile ones included: repeated
//!   names and items, non-string items, escapes, huge numbers) or arbitrary bytes;
//! - the key is faithful: the body forwarded to Chat for any subset of the items
//!   parses back to exactly those items and the same variant, so what is fetched
//!   for a key is what was asked under that key;
//! - the key does not depend on how the caller wrote the JSON: the same members in
//!   another order and with other whitespace give the same outcome (the same items
//!   and variant, hence the same forwarded body; or the same error; or both
//!   forwarded uncached).
//! - the fast scanner the HTTP/1.1 hit path uses (`src/cache/item_fast.rs`) finds
//!   what the general parser finds whenever it takes a body (the same items and the
//!   same variant), on the same hostile bodies and on common ones it must take.

use chat_gateway::cache::item_fast;
use chat_gateway::cache::item_key::{self, Parsed};
use chat_gateway::chat::reads::{self, Store, READS};
use proptest::prelude::*;

fn item_rows() -> Vec<usize> {
    READS
        .iter()
        .enumerate()
        .filter(|(_, r)| r.store == Store::Items)
        .map(|(i, _)| i)
        .collect()
}

fn ws() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just(String::new()), 1 => "[ \t\r\n]{1,3}"]
}

/// An item as a JSON literal: usually a plain string, sometimes escaped, empty,
/// long, or not a string at all.
fn item() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z@_]{1,6}[0-9]{0,2}".prop_map(|s| format!("\"{s}\"")),
        1 => "[a-z]{1,3}".prop_map(|s| format!("\"{s}\\u0041\\n\"")),
        1 => Just("\"\\ud83d\\ude00\"".to_string()),
        1 => Just("\"\"".to_string()),
        1 => Just(format!("\"{}\"", "x".repeat(49))),
        1 => any::<u8>().prop_map(|n| n.to_string()),
        1 => Just("null".to_string()),
    ]
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551617".to_string()),
        Just("1.0".to_string()),
        "[a-zA-Z_]{0,6}".prop_map(|s| format!("\"{s}\"")),
        Just("\"\\u00e9\\/\"".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone()), 0..4).prop_map(|v| {
                let items: Vec<String> = v.into_iter().map(|(w, x)| format!("{w}{x}")).collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((prop_oneof![Just("a"), Just("b"), Just("c")], inner), 0..3)
                .prop_map(|v| {
                    let items: Vec<String> =
                        v.into_iter().map(|(k, x)| format!("\"{k}\":{x}")).collect();
                    format!("{{{}}}", items.join(","))
                }),
        ]
    })
}

/// A request body's members (name, raw value) for row `row`.
fn members(row: usize) -> impl Strategy<Value = Vec<(String, String)>> {
    let r = &READS[row];
    let field = r.items.field().to_string();
    let object_key = match r.items {
        reads::ItemShape::ObjectList(_, k) => Some(k.to_string()),
        _ => None,
    };
    let scalar = matches!(r.items, reads::ItemShape::Scalar(_));
    let items = prop::collection::vec(item(), 0..6).prop_map(move |list| {
        if scalar {
            return list.first().cloned().unwrap_or_else(|| "\"only\"".into());
        }
        let rendered: Vec<String> = list
            .into_iter()
            .map(|i| match &object_key {
                Some(k) => format!("{{\"{k}\":{i}}}"),
                None => i,
            })
            .collect();
        format!("[{}]", rendered.join(","))
    });
    let required: Vec<String> = r.required.iter().map(|s| s.to_string()).collect();
    let scope = r.scope.map(|(f, _)| f.to_string());
    let others = prop::collection::vec(
        (
            prop_oneof![
                Just("TagList"),
                Just("From_Account"),
                Just("StartIndex"),
                Just("a"),
                Just("Z")
            ],
            value(),
        ),
        0..4,
    );
    (
        items,
        others,
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.1),
    )
        .prop_map(move |(items, others, with_req, dup)| {
            let mut m = vec![(field.clone(), items)];
            if with_req {
                for req in &required {
                    m.push((req.clone(), "[\"Tag_Profile_IM_Nick\"]".into()));
                }
                if let Some(s) = &scope {
                    m.push((s.clone(), "\"owner\"".into()));
                }
            }
            for (k, v) in others {
                m.push((k.to_string(), v));
            }
            if dup {
                let first = m[0].clone();
                m.push(first);
            }
            m
        })
}

fn render(members: &[(String, String)], order: &[usize], spaces: &[String]) -> String {
    let parts: Vec<String> = order
        .iter()
        .enumerate()
        .map(|(n, i)| {
            let (k, v) = &members[*i];
            let w = &spaces[n % spaces.len().max(1)];
            format!("{w}\"{k}\"{w}:{w}{v}{w}")
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// What a parse decided, owned, for comparison.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Split(Vec<String>, String, Option<String>),
    Bypass,
    Error(i64),
}

fn outcome(row: usize, body: &[u8]) -> Outcome {
    match item_key::parse(row, body) {
        Ok(Parsed::Split(r)) => Outcome::Split(
            r.items.iter().map(|c| c.to_string()).collect(),
            r.variant.clone(),
            r.scope.as_deref().map(String::from),
        ),
        Ok(Parsed::Bypass(_)) => Outcome::Bypass,
        Err(e) => Outcome::Error(e.code()),
    }
}

/// A row, a body's members, another order of them, and whitespace to write them with.
type Case = (usize, Vec<(String, String)>, Vec<usize>, Vec<String>);

fn case() -> impl Strategy<Value = Case> {
    prop::sample::select(item_rows()).prop_flat_map(|row| {
        members(row).prop_flat_map(move |m| {
            let n = m.len();
            (
                Just(row),
                Just(m),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                prop::collection::vec(ws(), 1..4),
            )
        })
    })
}

/// What the fast scanner makes of `body`: `None` when it leaves it to the general
/// parser; otherwise its items and variant, which must be the general parser's (or,
/// for a repeated item, the general parser forwards it uncached).
fn fast_agrees(row: usize, body: &[u8]) -> Result<Option<Vec<String>>, String> {
    let mut f = item_fast::request();
    if !item_fast::scan(&READS[row], body, &mut f) {
        return Ok(None);
    }
    let items: Vec<String> = f
        .items(body)
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    let mut sorted = items.clone();
    sorted.sort();
    sorted.dedup();
    let general = outcome(row, body);
    let text = String::from_utf8_lossy(body);
    match general {
        Outcome::Split(gi, gv, _) if sorted.len() == items.len() => {
            if gi != items || gv.as_bytes() != f.variant() {
                return Err(format!(
                    "{text}: fast {items:?} {:?}, general {gi:?} {gv:?}",
                    String::from_utf8_lossy(f.variant())
                ));
            }
        }
        Outcome::Bypass if sorted.len() < items.len() => {}
        other => return Err(format!("{text}: fast took it, general {other:?}")),
    }
    Ok(Some(items))
}

/// A value the fast scanner must take: no escapes, objects' members in order.
fn clean_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("-0.5e10".to_string()),
        "[a-zA-Z_ é]{0,8}".prop_map(|s| format!("\"{s}\"")),
        Just("false".to_string()),
        Just("null".to_string()),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(" , "))),
            (inner.clone(), inner).prop_map(|(x, y)| format!("{{ \"a\" : {x}, \"b\":{y} }}")),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_fast_scanner_agrees_with_the_general_parser((row, m, order, spaces) in case()) {
        let plain: Vec<usize> = (0..m.len()).collect();
        for body in [render(&m, &plain, &[String::new()]), render(&m, &order, &spaces)] {
            fast_agrees(row, body.as_bytes()).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn the_fast_scanner_takes_common_bodies(
        row in prop::sample::select(item_rows()),
        items in prop::collection::btree_set("[a-z_]{1,8}[0-9]{0,3}", 1..40),
        others in prop::collection::btree_map("[A-Za-z]{1,10}", clean_value(), 0..4),
        spaces in prop::collection::vec(ws(), 1..4),
    ) {
        let r = &READS[row];
        let items: Vec<String> = items.into_iter().take(r.max_items).collect();
        let rendered: Vec<String> = items.iter().map(|i| match r.items {
            reads::ItemShape::ObjectList(_, k) => format!("{{\"{k}\":\"{i}\"}}"),
            _ => format!("\"{i}\""),
        }).collect();
        let items_json = match r.items {
            reads::ItemShape::Scalar(_) => rendered[0].clone(),
            _ => format!("[{}]", rendered.join(",")),
        };
        let mut m: Vec<(String, String)> = vec![(r.items.field().to_string(), items_json)];
        for req in r.required {
            m.push((req.to_string(), "[\"Tag_Profile_IM_Nick\"]".into()));
        }
        if let Some((f, _)) = r.scope {
            m.push((f.to_string(), "\"owner\"".into()));
        }
        for (k, v) in others {
            if !m.iter().any(|(n, _)| *n == k) {
                m.push((k, v));
            }
        }
        let order: Vec<usize> = (0..m.len()).rev().collect();
        let body = render(&m, &order, &spaces);
        let got = fast_agrees(row, body.as_bytes()).map_err(TestCaseError::fail)?;
        let want: Vec<String> = match r.items {
            reads::ItemShape::Scalar(_) => vec![items[0].clone()],
            _ => items,
        };
        prop_assert_eq!(got, Some(want), "{}", body);
    }

    #[test]
    fn keys_are_faithful_and_independent_of_the_writing((row, m, order, spaces) in case()) {
        let plain: Vec<usize> = (0..m.len()).collect();
        let a = render(&m, &plain, &[String::new()]);
        let b = render(&m, &order, &spaces);
        let oa = outcome(row, a.as_bytes());
        let ob = outcome(row, b.as_bytes());
        prop_assert_eq!(&oa, &ob, "{} vs {}", a, b);
        if let Outcome::Split(items, variant, scope) = oa {
            let r = &READS[row];
            // The forwarded body of every item, and of a suffix (the "missing" ones),
            // parse back to exactly those items under the same variant.
            for skip in [0, items.len() / 2] {
                let sub: Vec<&str> = items.iter().skip(skip).map(String::as_str).collect();
                let body = item_key::upstream_body(r, sub.iter().copied(), &variant);
                let back = outcome(row, &body);
                prop_assert_eq!(
                    back,
                    Outcome::Split(sub.iter().map(|s| s.to_string()).collect(), variant.clone(), scope.clone()),
                    "{}", String::from_utf8_lossy(&body)
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(row in prop::sample::select(item_rows()), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = item_key::parse(row, &bytes);
    }
}
