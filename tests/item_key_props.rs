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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

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
