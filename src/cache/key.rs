//! What a cached page's key is: the one place that parses a get_list request, checks
//! it, normalizes it and builds the body sent upstream.
//!
//! The key is the account plus the five cursor/flag fields (defaults applied) plus a
//! canonical form of any extra fields, and **the body sent to Chat is built from the
//! key alone** ([`upstream_body`]), so two requests that share a key are forwarded
//! byte for byte alike. The canonical form ([`canonical`]) keeps every distinction
//! the caller's JSON can make: numbers keep their exact text (so
//! `18446744073709551616` and `...617` differ), strings are decoded and re-encoded
//! one way, object members are sorted by name, whitespace goes, and a name that
//! appears twice in one object, at any depth, is refused (50002): which of the two
//! Chat would use is not ours to guess.
//!
//! Two parsers produce it:
//! - [`fast`], a scanner for the common body (only the six known fields, no escapes,
//!   plain integers), which parses and keys without a heap allocation;
//! - the general parser (serde_json), for everything else, which also produces
//!   every error. The fast scanner never refuses a body: on anything it does not
//!   handle it steps aside, so errors come from one place. A property test
//!   (`tests/key_props.rs`) shows the two agree on every body the scanner accepts.
//!
//! Limits: at most [`MAX_EXTRA_FIELDS`] extra top-level fields (50002 beyond);
//! duplicate detection and canonicalization sort members, O(n log n).

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
/// Most extra (unknown) top-level fields a get_list body may carry.
pub const MAX_EXTRA_FIELDS: usize = 256;

/// The five cursor/flag fields, in the order they are sent upstream.
const NUMERIC_FIELDS: [&str; 5] = [
    "TimeStamp",
    "StartIndex",
    "TopTimeStamp",
    "TopStartIndex",
    "AssistFlags",
];

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
    /// The extra fields, canonical: `,"name":value` for each, sorted by name (None
    /// when there are none). Appended as is to the body sent upstream.
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

impl PageKey {
    fn from_fields(nums: [Option<u64>; 5], extra: Option<Box<str>>) -> Self {
        let d = PageKey::default();
        PageKey {
            time_stamp: nums[0].unwrap_or(d.time_stamp),
            start_index: nums[1].unwrap_or(d.start_index),
            top_time_stamp: nums[2].unwrap_or(d.top_time_stamp),
            top_start_index: nums[3].unwrap_or(d.top_start_index),
            assist_flags: nums[4].unwrap_or(d.assist_flags),
            extra,
        }
    }

    fn numbers(&self) -> [u64; 5] {
        [
            self.time_stamp,
            self.start_index,
            self.top_time_stamp,
            self.top_start_index,
            self.assist_flags,
        ]
    }
}

/// A checked get_list request, borrowing from the body it was parsed from.
#[derive(Debug, PartialEq, Eq)]
pub struct GetListRequest<'a> {
    /// `From_Account`.
    pub account: Cow<'a, str>,
    /// The page within the account.
    pub page: PageKey,
}

impl GetListRequest<'_> {
    /// The body sent to Chat (see [`upstream_body`]).
    pub fn upstream_body(&self) -> Bytes {
        upstream_body(&self.account, &self.page)
    }
}

/// The body sent to Chat for `account`'s page `key`: all six fields, then the
/// canonical extra fields. A function of the key alone, so equal keys are forwarded
/// byte for byte alike.
pub fn upstream_body(account: &str, key: &PageKey) -> Bytes {
    let extra = key.extra.as_deref().unwrap_or("");
    let mut out = String::with_capacity(128 + account.len() + extra.len());
    out.push_str("{\"From_Account\":");
    canonical::write_str(&mut out, account);
    let mut digits = itoa_buf();
    for (name, v) in NUMERIC_FIELDS.iter().zip(key.numbers()) {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        out.push_str(format_u64(&mut digits, v));
    }
    out.push_str(extra);
    out.push('}');
    Bytes::from(out.into_bytes())
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// Formats `v` in decimal into `buf` (no allocation).
fn format_u64(buf: &mut [u8; 20], mut v: u64) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Parses and checks a get_list body: the fast scanner when it applies, otherwise the
/// general parser. Invalid JSON is 60003; a missing or bad field is 50002; both with
/// a reason naming the field.
pub fn parse(body: &[u8]) -> Result<GetListRequest<'_>, GatewayError> {
    match fast(body) {
        Some(req) => Ok(req),
        None => parse_general(body),
    }
}

/// The general parser (serde_json): every body, every error.
pub fn parse_general(body: &[u8]) -> Result<GetListRequest<'_>, GatewayError> {
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

/// The fast scanner: a body that is one object of only the six known fields (each at
/// most once, names and `From_Account` without escapes, cursors as plain integers of
/// at most 19 digits or null, JSON whitespace anywhere), checked exactly as the
/// general parser checks it. Returns `None` (never an error) for anything else, so
/// that the general parser decides.
pub fn fast(body: &[u8]) -> Option<GetListRequest<'_>> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
    let mut account: Option<&str> = None;
    let mut nums: [Option<u64>; 5] = [None; 5];
    let mut seen = [false; 5];
    loop {
        let (name, j) = plain_string(body, i)?;
        i = skip_ws(body, j);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        // Told apart by length and first byte, then compared once.
        let known: &[u8] = match (name.len(), name.first()) {
            (12, Some(b'F')) => b"From_Account",
            (9, _) => b"TimeStamp",
            (10, _) => b"StartIndex",
            (12, _) => b"TopTimeStamp",
            (13, _) => b"TopStartIndex",
            (11, _) => b"AssistFlags",
            _ => return None,
        };
        if !same_name(name, known) {
            return None;
        }
        let slot = match name.len() {
            12 if name[0] == b'F' => {
                let (a, j) = plain_string(body, i)?;
                if account.is_some() || a.is_empty() || a.len() > MAX_ACCOUNT_BYTES {
                    return None;
                }
                account = Some(std::str::from_utf8(a).ok()?);
                i = j;
                None
            }
            9 => Some(0),
            10 => Some(1),
            12 => Some(2),
            13 => Some(3),
            _ => Some(4),
        };
        if let Some(slot) = slot {
            if seen[slot] {
                return None;
            }
            seen[slot] = true;
            let (v, j) = cursor(body, i)?;
            nums[slot] = v;
            i = j;
        }
        i = skip_ws(body, i);
        match body.get(i) {
            Some(b',') => i = skip_ws(body, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if skip_ws(body, i + 1) != body.len() {
        return None;
    }
    Some(GetListRequest {
        account: Cow::Borrowed(account?),
        page: PageKey::from_fields(nums, None),
    })
}

/// `name == known`, for a `known` of 8 to 16 bytes (the fields' names): its first
/// and its last eight bytes compared as two words, not by a call to `memcmp`.
#[inline(always)]
fn same_name(name: &[u8], known: &[u8]) -> bool {
    match (
        name.first_chunk::<8>(),
        name.last_chunk::<8>(),
        known.first_chunk::<8>(),
        known.last_chunk::<8>(),
    ) {
        (Some(a), Some(b), Some(c), Some(d)) if name.len() == known.len() && known.len() <= 16 => {
            a == c && b == d
        }
        _ => name == known,
    }
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// A string at `i` with no escapes and no control characters: its raw bytes and the
/// index after its closing quote.
fn plain_string(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let rest = b.get(i + 1..)?;
    let end = first_special(rest)?;
    if rest[end] != b'"' {
        return None;
    }
    Some((&rest[..end], i + 1 + end + 1))
}

/// The index of the first `"`, `\` or control character in `s`, eight bytes at a
/// time (each test flags the lowest matching byte of a word exactly).
fn first_special(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = s.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let hits = zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x & HIGHS);
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| at + p)
}

/// `null` or a non-negative integer in JSON's form, at most 19 digits (so it fits a
/// u64 without checks), at `i`: the value and the index after it.
fn cursor(b: &[u8], i: usize) -> Option<(Option<u64>, usize)> {
    let rest = b.get(i..)?;
    if rest.starts_with(b"null") {
        return Some((None, i + 4));
    }
    // The digits, read and added up in one pass.
    let mut v = 0u64;
    let mut digits = 0;
    while let Some(c) = rest.get(digits).filter(|c| c.is_ascii_digit()) {
        if digits == 19 {
            return None; // too many digits
        }
        v = v * 10 + u64::from(c - b'0');
        digits += 1;
    }
    // No digits, a leading zero, or a fraction/exponent: not ours.
    if digits == 0 || (digits > 1 && rest[0] == b'0') {
        return None;
    }
    if matches!(rest.get(digits), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some((Some(v), i + digits))
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
                    if key == "From_Account" {
                        if account.is_some() {
                            return Err(de::Error::custom("duplicate field From_Account"));
                        }
                        // A syntax error reported as this message is put right by
                        // `parse_general`, which re-checks the whole body's syntax.
                        let MaybeBorrowed(a) = map
                            .next_value()
                            .map_err(|_| de::Error::custom("From_Account must be a string"))?;
                        account = Some(a);
                        continue;
                    }
                    let Some(slot) = NUMERIC_FIELDS.iter().position(|f| *f == key) else {
                        if extras.len() == MAX_EXTRA_FIELDS {
                            return Err(de::Error::custom(format!(
                                "at most {MAX_EXTRA_FIELDS} fields besides the six of get_list"
                            )));
                        }
                        let v: &'de RawValue = map.next_value()?;
                        extras.push((key, v));
                        continue;
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
                let extra = canonical_extras(extras).map_err(de::Error::custom)?;
                Ok(GetListRequest {
                    account,
                    page: PageKey::from_fields(nums, extra),
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// The extra fields, canonical (`,"name":value` each, sorted by name), or `None`
/// when there are none. A name given twice is an error.
fn canonical_extras(
    mut extras: Vec<(Cow<'_, str>, &RawValue)>,
) -> Result<Option<Box<str>>, String> {
    if extras.is_empty() {
        return Ok(None);
    }
    extras.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = extras.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("duplicate field {}", w[0].0));
    }
    let mut out = String::new();
    for (k, v) in &extras {
        out.push(',');
        canonical::write_str(&mut out, k);
        out.push(':');
        canonical::value(v.get(), &mut out)?;
    }
    Ok(Some(out.into_boxed_str()))
}

/// The canonical form of a JSON value, for keys and forwarded bodies.
pub mod canonical {
    /// Writes `s` as a JSON string, escaped one way: `"` and `\` escaped, control
    /// characters as `\b \f \n \r \t` or `\u00XX`, everything else as UTF-8.
    pub fn write_str(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 => {
                    out.push_str("\\u00");
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push(HEX[(c as usize) >> 4] as char);
                    out.push(HEX[(c as usize) & 0xf] as char);
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    /// Appends the canonical form of `json` (one valid JSON value, as serde_json
    /// accepted it, so nesting is at most serde_json's recursion limit) to `out`.
    /// Object members are sorted by their decoded names; a name repeated within one
    /// object is an error.
    pub fn value(json: &str, out: &mut String) -> Result<(), String> {
        let mut p = Parser {
            s: json.as_bytes(),
            i: 0,
            depth: 0,
        };
        p.ws();
        p.value(out)?;
        p.ws();
        if p.i != p.s.len() {
            return Err("trailing characters in a field".into());
        }
        Ok(())
    }

    /// Deepest nesting of arrays and objects within one field.
    pub const MAX_DEPTH: usize = 64;

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
        depth: usize,
    }

    fn bad() -> String {
        "malformed JSON in a field".to_string()
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.i += 1;
            }
        }

        fn value(&mut self, out: &mut String) -> Result<(), String> {
            match self.s.get(self.i).copied().ok_or_else(bad)? {
                b'{' | b'[' if self.depth == MAX_DEPTH => Err(format!(
                    "fields may nest at most {MAX_DEPTH} arrays or objects deep"
                )),
                b'{' => {
                    self.depth += 1;
                    let r = self.object(out);
                    self.depth -= 1;
                    r
                }
                b'[' => {
                    self.depth += 1;
                    let r = self.array(out);
                    self.depth -= 1;
                    r
                }
                b'"' => {
                    let s = self.string()?;
                    write_str(out, &s);
                    Ok(())
                }
                _ => {
                    // A number or a literal: kept as its exact text.
                    let start = self.i;
                    while matches!(
                        self.s.get(self.i),
                        Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' | b'a'..=b'z')
                    ) {
                        self.i += 1;
                    }
                    if start == self.i {
                        return Err(bad());
                    }
                    let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|_| bad())?;
                    out.push_str(text);
                    Ok(())
                }
            }
        }

        fn array(&mut self, out: &mut String) -> Result<(), String> {
            self.i += 1;
            out.push('[');
            self.ws();
            if self.s.get(self.i) == Some(&b']') {
                self.i += 1;
                out.push(']');
                return Ok(());
            }
            loop {
                self.ws();
                self.value(out)?;
                self.ws();
                match self.s.get(self.i) {
                    Some(b',') => {
                        self.i += 1;
                        out.push(',');
                    }
                    Some(b']') => {
                        self.i += 1;
                        out.push(']');
                        return Ok(());
                    }
                    _ => return Err(bad()),
                }
            }
        }

        fn object(&mut self, out: &mut String) -> Result<(), String> {
            self.i += 1;
            let mut members: Vec<(String, String)> = Vec::new();
            self.ws();
            if self.s.get(self.i) == Some(&b'}') {
                self.i += 1;
                out.push_str("{}");
                return Ok(());
            }
            loop {
                self.ws();
                let name = self.string()?;
                self.ws();
                if self.s.get(self.i) != Some(&b':') {
                    return Err(bad());
                }
                self.i += 1;
                self.ws();
                let mut v = String::new();
                self.value(&mut v)?;
                members.push((name, v));
                self.ws();
                match self.s.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        break;
                    }
                    _ => return Err(bad()),
                }
            }
            members.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(w) = members.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(format!("duplicate field {} in a nested object", w[0].0));
            }
            out.push('{');
            for (n, (name, v)) in members.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                write_str(out, name);
                out.push(':');
                out.push_str(v);
            }
            out.push('}');
            Ok(())
        }

        /// A string's decoded value.
        fn string(&mut self) -> Result<String, String> {
            if self.s.get(self.i) != Some(&b'"') {
                return Err(bad());
            }
            self.i += 1;
            let mut out = String::new();
            loop {
                let start = self.i;
                while matches!(self.s.get(self.i), Some(c) if *c != b'"' && *c != b'\\') {
                    self.i += 1;
                }
                out.push_str(std::str::from_utf8(&self.s[start..self.i]).map_err(|_| bad())?);
                match self.s.get(self.i) {
                    Some(b'"') => {
                        self.i += 1;
                        return Ok(out);
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        let c = self.escape()?;
                        out.push(c);
                    }
                    _ => return Err(bad()),
                }
            }
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let h = self.s.get(self.i..self.i + 4).ok_or_else(bad)?;
            let h = std::str::from_utf8(h).map_err(|_| bad())?;
            let v = u32::from_str_radix(h, 16).map_err(|_| bad())?;
            self.i += 4;
            Ok(v)
        }

        fn escape(&mut self) -> Result<char, String> {
            let c = *self.s.get(self.i).ok_or_else(bad)?;
            self.i += 1;
            Ok(match c {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{08}',
                b'f' => '\u{0c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let hi = self.hex4()?;
                    let code = if (0xD800..0xDC00).contains(&hi) {
                        if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                            return Err("lone surrogate in a string".into());
                        }
                        self.i += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return Err("lone surrogate in a string".into());
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    } else {
                        hi
                    };
                    char::from_u32(code).ok_or_else(|| "lone surrogate in a string".to_string())?
                }
                _ => return Err(bad()),
            })
        }
    }
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
        assert_eq!(
            &r.upstream_body()[..],
            br#"{"From_Account":"user_0001","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}"#
        );
    }

    #[test]
    fn the_fast_scanner_takes_the_common_body_and_steps_aside_otherwise() {
        let r =
            fast(b" {\"From_Account\" : \"u\",\n\"TimeStamp\":17, \"AssistFlags\":null} ").unwrap();
        assert_eq!(r.account, "u");
        assert_eq!(r.page.time_stamp, 17);
        assert_eq!(r.page.assist_flags, 63);
        let r = fast(br#"{"From_Account":"u","TopStartIndex":9999999999999999999}"#).unwrap();
        assert_eq!(r.page.top_start_index, 9_999_999_999_999_999_999);
        for body in [
            &br#"{}"#[..],
            br#"{"From_Account":"u","TimeStamq":1}"#,
            br#"{"From_Account":"u","TimeXtamp":1}"#,
            br#"{"From_Accounu":"u"}"#,
            br#"{"From_Account":"u","TimeStamp":12345678901234567890}"#,
            br#"{"From_Account":"a\"b"}"#,
            br#"{"From_Account":"u","X":1}"#,
            br#"{"From_Account":"u","TimeStamp":01}"#,
            br#"{"From_Account":"u","TimeStamp":1.0}"#,
            br#"{"From_Account":"u","TimeStamp":-1}"#,
            br#"{"From_Account":"u","TimeStamp":18446744073709551616}"#,
            br#"{"From_Account":"u","TimeStamp":1,"TimeStamp":2}"#,
            br#"{"From_Account":"u"} x"#,
            br#"{"From_Account":""}"#,
            br#"{"From_Account":"u",}"#,
        ] {
            assert!(fast(body).is_none(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn order_and_whitespace_do_not_change_the_key() {
        let a = parse(br#"{"From_Account":"u","TimeStamp":5,"X":{"b":1,"a":[1, 2]},"Y":true}"#)
            .unwrap();
        let b = parse(b"{ \"Y\" : true , \"X\":{\"a\":[1,2], \"b\":1},\n\"TimeStamp\":5, \"From_Account\":\"u\"}")
            .unwrap();
        assert_eq!(a.page, b.page);
        assert_eq!(a.account, b.account);
        assert_eq!(a.upstream_body(), b.upstream_body());
        let c =
            parse(br#"{"From_Account":"u","TimeStamp":5,"X":{"b":2,"a":[1,2]},"Y":true}"#).unwrap();
        assert_ne!(a.page, c.page);
        assert_eq!(
            &a.upstream_body()[..],
            br#"{"From_Account":"u","TimeStamp":5,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63,"X":{"a":[1,2],"b":1},"Y":true}"#
        );
    }

    #[test]
    fn keys_keep_every_distinction_the_body_makes() {
        let a = parse(br#"{"From_Account":"u","X":18446744073709551616}"#).unwrap();
        let b = parse(br#"{"From_Account":"u","X":18446744073709551617}"#).unwrap();
        assert_ne!(a.page, b.page);
        assert!(a.upstream_body().ends_with(b"\"X\":18446744073709551616}"));
        // Escapes are decoded and re-encoded one way: the same string, the same key.
        let c = parse(br#"{"From_Account":"u","X":"\u0041\/"}"#).unwrap();
        let d = parse(br#"{"From_Account":"u","X":"A/"}"#).unwrap();
        assert_eq!(c.page, d.page);
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
            (br#"{"From_Account":"u","X":1,"X":2}"#, 50002),
            (br#"{"From_Account":"u","Z":{"a":1,"a":2}}"#, 50002),
            (br#"{"From_Account":"u","Z":[{"b":{"a":1,"a":2}}]}"#, 50002),
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
    fn extra_fields_are_capped() {
        let body = |n: usize| {
            let mut s = String::from(r#"{"From_Account":"u""#);
            for i in 0..n {
                s.push_str(&format!(r#","f{i}":{i}"#));
            }
            s.push('}');
            s
        };
        assert!(parse(body(MAX_EXTRA_FIELDS).as_bytes()).is_ok());
        let e = parse(body(MAX_EXTRA_FIELDS + 1).as_bytes()).unwrap_err();
        assert_eq!(e.code(), 50002);
        assert!(e.to_string().contains("at most 256"), "{e}");
    }

    #[test]
    fn special_bytes_are_found_wherever_they_are() {
        for len in 0..40 {
            for pos in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut s = vec![b'a'; len];
                    // Bytes just past the control range and high bytes must not match.
                    for (i, c) in s.iter_mut().enumerate() {
                        *c = [b'a', 0x20, 0x7f, 0xff, b'!', b'#', b'[', b']'][i % 8];
                    }
                    s[pos] = special;
                    assert_eq!(first_special(&s), Some(pos), "{len} {pos} {special}");
                }
            }
            let clean: Vec<u8> = (0..len).map(|i| [b'a', 0x20, 0xff][i % 3]).collect();
            assert_eq!(first_special(&clean), None);
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_into_it() {
        for depth in [100, 20_000] {
            let body = format!(
                r#"{{"From_Account":"u","X":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            let e = parse(body.as_bytes()).unwrap_err();
            assert!(matches!(e.code(), 50002 | 60003), "{depth}: {e}");
        }
        let ok = format!(
            r#"{{"From_Account":"u","X":{}{}}}"#,
            "[".repeat(canonical::MAX_DEPTH),
            "]".repeat(canonical::MAX_DEPTH)
        );
        assert!(parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn escaped_account_is_owned_and_reencoded() {
        let r = parse(br#"{"From_Account":"a\"b"}"#).unwrap();
        assert_eq!(r.account, "a\"b");
        let v: serde_json::Value = serde_json::from_slice(&r.upstream_body()).unwrap();
        assert_eq!(v["From_Account"], "a\"b");
    }
}
