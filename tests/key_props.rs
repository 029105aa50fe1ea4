//! Property tests of the get_list key (`src/cache/key.rs`):
//! - the fast scanner and the general parser agree: same account, same key, same
//!   forwarded body, and the same error code, on generated bodies including hostile
//!   ones (duplicate names at any depth, huge numbers, escapes, odd whitespace);
//! - keys are faithful: the body forwarded to Chat is a function of the key, and
//!   parsing that body again gives the same key back, so two requests forwarded
//!   differently never share a key.

use chat_gateway::cache::key::{self, GetListRequest};
use proptest::prelude::*;

/// JSON whitespace, sometimes none.
fn ws() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        1 => "[ \t\r\n]{1,3}",
    ]
}

/// A string literal, sometimes with escapes.
fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_]{0,8}".prop_map(|s| format!("\"{s}\"")),
        "[a-z]{0,4}".prop_map(|s| format!("\"{s}\\u0041\\n\\\"\\/\"")),
        Just("\"\\ud83d\\ude00\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"é\"".to_string()),
    ]
}

/// A number literal, including ones that do not fit 64 bits.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_string()),
        Just("18446744073709551617".to_string()),
        Just("1.0".to_string()),
        Just("1e3".to_string()),
        Just("-0".to_string()),
        Just("01".to_string()),
    ]
}

/// Any JSON-ish value (sometimes not quite JSON), objects possibly with repeated
/// names.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        json_number(),
        json_string(),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone()), 0..4).prop_map(|v| {
                let items: Vec<String> = v.into_iter().map(|(w, x)| format!("{w}{x}")).collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec(
                (
                    prop_oneof![Just("a"), Just("b"), Just("c\\u0041")],
                    ws(),
                    inner
                ),
                0..4
            )
            .prop_map(|v| {
                let items: Vec<String> = v
                    .into_iter()
                    .map(|(k, w, x)| format!("\"{k}\":{w}{x}"))
                    .collect();
                format!("{{{}}}", items.join(","))
            }),
        ]
    })
}

/// A get_list body: some of the six fields (sometimes twice), some extras, shuffled.
fn body() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        6 => Just("From_Account".to_string()),
        2 => Just("TimeStamp".to_string()),
        2 => Just("StartIndex".to_string()),
        1 => Just("TopTimeStamp".to_string()),
        1 => Just("TopStartIndex".to_string()),
        2 => Just("AssistFlags".to_string()),
        1 => Just("From_\\u0041ccount".to_string()),
        2 => "[A-Z][a-z]{0,3}",
    ];
    let field = (name, ws(), ws()).prop_flat_map(|(n, w1, w2)| {
        let v = if n == "From_Account" {
            prop_oneof![
                4 => "[a-z_0-9]{1,10}".prop_map(|s| format!("\"{s}\"")),
                1 => json_string(),
                1 => Just("\"123456789012345678901234567890123\"".to_string()),
                1 => value(),
            ]
            .boxed()
        } else if n.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && [
                "TimeStamp",
                "StartIndex",
                "TopTimeStamp",
                "TopStartIndex",
                "AssistFlags",
            ]
            .contains(&n.as_str())
        {
            prop_oneof![4 => json_number(), 1 => Just("null".to_string()), 1 => value()].boxed()
        } else {
            value().boxed()
        };
        v.prop_map(move |v| format!("{w1}\"{n}\"{w2}:{v}"))
    });
    (
        prop::collection::vec(field, 0..7),
        ws(),
        ws(),
        any::<bool>(),
    )
        .prop_map(|(fields, a, b, trailing)| {
            let mut s = format!("{a}{{{}}}{b}", fields.join(","));
            if trailing {
                s.push('x');
            }
            s
        })
}

fn agree(body: &str) -> Result<(), TestCaseError> {
    let general = key::parse_general(body.as_bytes());
    if let Some(fast) = key::fast(body.as_bytes()) {
        let g = general.as_ref().map_err(|e| {
            TestCaseError::fail(format!("fast accepted, general refused ({e}): {body}"))
        })?;
        prop_assert_eq!(&fast, g, "{}", body);
        prop_assert_eq!(fast.upstream_body(), g.upstream_body());
    }
    // What the handler uses gives the general parser's answer, error code included.
    match (key::parse(body.as_bytes()), &general) {
        (Ok(a), Ok(b)) => prop_assert_eq!(&a, b),
        (Err(a), Err(b)) => prop_assert_eq!(a.code(), b.code()),
        (a, b) => prop_assert!(false, "{body}: {a:?} vs {b:?}"),
    }
    if let Ok(req) = general {
        faithful(&req)?;
    }
    Ok(())
}

/// The forwarded body is a function of the key, and carries exactly the key.
fn faithful(req: &GetListRequest<'_>) -> Result<(), TestCaseError> {
    let forwarded = key::upstream_body(&req.account, &req.page);
    prop_assert_eq!(&forwarded, &req.upstream_body());
    let again = key::parse(&forwarded).map_err(|e| {
        TestCaseError::fail(format!(
            "forwarded body does not parse ({e}): {}",
            String::from_utf8_lossy(&forwarded)
        ))
    })?;
    prop_assert_eq!(&again, req);
    // Chat gets JSON.
    prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&forwarded).is_ok());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn fast_and_general_agree(b in body()) {
        agree(&b)?;
    }

    #[test]
    fn common_bodies_take_the_fast_path(
        account in "[a-z_0-9]{1,32}",
        nums in prop::collection::vec(prop::option::of(any::<u64>()), 5),
        w in ws(),
    ) {
        let names = ["TimeStamp", "StartIndex", "TopTimeStamp", "TopStartIndex", "AssistFlags"];
        let mut fields = vec![format!("\"From_Account\":{w}\"{account}\"")];
        for (n, v) in names.iter().zip(&nums) {
            if let Some(v) = v {
                fields.push(format!("{w}\"{n}\":{v}"));
            }
        }
        let body = format!("{{{}}}", fields.join(","));
        prop_assert!(key::fast(body.as_bytes()).is_some(), "{}", body);
        agree(&body)?;
    }

    #[test]
    fn equal_keys_mean_identical_forwarded_bodies(a in body(), b in body()) {
        if let (Ok(x), Ok(y)) = (key::parse(a.as_bytes()), key::parse(b.as_bytes())) {
            let same_key = x.account == y.account && x.page == y.page;
            prop_assert_eq!(same_key, x.upstream_body() == y.upstream_body(), "{} / {}", a, b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = key::parse(&bytes);
        if let Ok(s) = std::str::from_utf8(&bytes) {
            agree(s)?;
        }
    }
}

#[test]
fn examples_of_hostile_bodies() {
    for body in [
        r#"{"From_Account":"u","X":18446744073709551616}"#,
        r#"{"From_Account":"u","Z":{"a":1,"a":2}}"#,
        r#"{"From_Account":"u","Z":{"a":2}}"#,
        r#"{"From_Account":"u","Z":{"c\u0041":1,"cA":2}}"#,
        r#"{"From_Account":"u","X":"\ud800"}"#,
        r#"{"From_\u0041ccount":"u","From_Account":"v"}"#,
        " {\"From_Account\":\"u\"}\n",
    ] {
        agree(body).unwrap();
    }
    let a = key::parse(br#"{"From_Account":"u","X":18446744073709551616}"#).unwrap();
    let b = key::parse(br#"{"From_Account":"u","X":18446744073709551617}"#).unwrap();
    assert_ne!(a.page, b.page);
    assert!(key::parse(br#"{"From_Account":"u","Z":{"a":1,"a":2}}"#).is_err());
}
