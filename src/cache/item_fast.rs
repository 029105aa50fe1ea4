//! The fast scanner of cached-read requests: what the HTTP/1.1 hit path uses to find
//! the items and the variant of a request without serde and without allocating.
//!
//! It accepts the common body only: one object of at most [`MAX_FIELDS`] members, no
//! escape in any string, numbers as JSON writes them, objects nested in the other
//! fields with their members already in sorted order (so their canonical form is
//! their text without whitespace), at most [`MAX_DEPTH`] deep, the variant at most
//! [`MAX_VARIANT`] bytes. For such a body it finds what [`super::item_key::parse`]
//! finds: the same items and the same canonical variant (`tests/item_key_props.rs`
//! checks it on generated bodies). For anything else it answers `None` and the
//! general parser decides (an item too long, too many items, a missing required
//! field, invalid JSON: all `None`). It does not look for an item named twice: the
//! caller does (the hit path hashes every item anyway), and must then leave the
//! request to the general parser too.

use crate::chat::reads::{ItemShape, ReadRow};

/// Most items (every row's limit).
pub const MAX_ITEMS: usize = 100;
/// Most top-level members besides the items.
pub const MAX_FIELDS: usize = 16;
/// Longest canonical variant.
pub const MAX_VARIANT: usize = 512;
/// Deepest nesting in the other fields.
pub const MAX_DEPTH: usize = 8;

/// A request the fast scanner read: where its items are in the body, and the
/// variant. Meant to be kept and reused (one per connection): scanning a request
/// initializes nothing in it beyond what it writes.
pub struct FastRequest {
    /// Each item's `(start, end)` in the body scanned.
    items: [(u32, u32); MAX_ITEMS],
    n: usize,
    variant: [u8; MAX_VARIANT],
    variant_len: usize,
    /// The other fields' canonical values, one after the other (scratch).
    values: [u8; MAX_VARIANT],
}

impl FastRequest {
    /// How many items.
    #[inline]
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it holds no item (never, after a successful scan).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Item `i` of the request scanned from `body` (valid UTF-8: the body was
    /// checked). `body` must be the body scanned.
    #[inline]
    pub fn item<'b>(&self, body: &'b [u8], i: usize) -> &'b [u8] {
        let (s, e) = self.items[i];
        body.get(s as usize..e as usize).unwrap_or_default()
    }

    /// The items of the request scanned from `body`, in request order.
    pub fn items<'b>(&'b self, body: &'b [u8]) -> impl Iterator<Item = &'b [u8]> + 'b {
        (0..self.n).map(move |i| self.item(body, i))
    }

    /// The other fields, canonical (as [`super::item_key::ItemRequest::variant`]),
    /// as bytes (valid UTF-8: whole strings of a checked body and ASCII).
    #[inline]
    pub fn variant(&self) -> &[u8] {
        &self.variant[..self.variant_len]
    }
}

/// A bounded output buffer.
struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl Out<'_> {
    #[inline]
    fn push(&mut self, b: &[u8]) -> Option<()> {
        let end = self.len + b.len();
        self.buf.get_mut(self.len..end)?.copy_from_slice(b);
        self.len = end;
        Some(())
    }
}

/// A word with each byte set to `b`.
const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// The high bit of every byte of `w` that is zero (possibly more above a true one:
/// only ever a false alarm, which the byte loop then settles).
#[inline]
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(splat(1)) & !w & splat(0x80)
}

/// The high bit of each byte of a word of string content that may be a `"`, a `\`,
/// a control character or a byte that is not ASCII (zero when none is; the lowest
/// one set is always a true one).
#[inline]
fn special(w: u64) -> u64 {
    let ctrl = w.wrapping_sub(splat(0x20)) & !w & splat(0x80);
    zero_bytes(w ^ splat(b'"')) | zero_bytes(w ^ splat(b'\\')) | ctrl | (w & splat(0x80))
}

struct Scan<'a> {
    s: &'a [u8],
    i: usize,
    /// A string held a byte that is not ASCII: the body is checked as UTF-8 at the
    /// end (everything outside strings is ASCII by the grammar).
    non_ascii: bool,
}

impl<'a> Scan<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    /// `c`, after any whitespace (the next byte first: compact JSON has none).
    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        if self.s.get(self.i) != Some(&c) {
            self.ws();
            if self.s.get(self.i) != Some(&c) {
                return None;
            }
        }
        self.i += 1;
        Some(())
    }

    /// The next byte that is not whitespace (whitespace is at most a space).
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        match self.s.get(self.i) {
            Some(&b) if b > b' ' => Some(b),
            _ => {
                self.ws();
                self.s.get(self.i).copied()
            }
        }
    }

    /// A string without escapes or control characters: its content. Eight bytes at
    /// a time, each word's first byte that may end it found at once.
    #[inline]
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            while let Some(chunk) = self.s.get(self.i..self.i + 8) {
                let w = u64::from_le_bytes(<[u8; 8]>::try_from(chunk).ok()?);
                let m = special(w);
                if m != 0 {
                    // The lowest flagged byte is a true one (false alarms only
                    // ever sit above a true one).
                    self.i += (m.trailing_zeros() / 8) as usize;
                    break;
                }
                self.i += 8;
            }
            match *self.s.get(self.i)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                0x80.. => {
                    self.non_ascii = true;
                    self.i += 1;
                }
                _ => self.i += 1,
            }
        }
        let content = &self.s[start..self.i];
        self.i += 1;
        Some(content)
    }

    /// A JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`), copied.
    fn number(&mut self, out: &mut Out<'_>) -> Option<()> {
        let start = self.i;
        let digits = |sc: &mut Scan<'_>| {
            let d = sc.i;
            while sc.s.get(sc.i).is_some_and(u8::is_ascii_digit) {
                sc.i += 1;
            }
            sc.i > d
        };
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.s.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return None,
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !digits(self) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.s.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.s.get(self.i) {
                self.i += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        // What follows a number in valid JSON.
        match self.s.get(self.i) {
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b']' | b'}') => {}
            _ => return None,
        }
        out.push(&self.s[start..self.i])
    }

    /// Any value, written in canonical form (see the module docs for what is taken).
    fn value(&mut self, out: &mut Out<'_>, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => {
                let s = self.string()?;
                out.push(b"\"")?;
                out.push(s)?;
                out.push(b"\"")
            }
            b'[' if depth < MAX_DEPTH => {
                self.i += 1;
                out.push(b"[")?;
                if self.peek()? == b']' {
                    self.i += 1;
                    return out.push(b"]");
                }
                loop {
                    self.value(out, depth + 1)?;
                    match self.peek()? {
                        b',' => {
                            self.i += 1;
                            out.push(b",")?;
                        }
                        b']' => {
                            self.i += 1;
                            return out.push(b"]");
                        }
                        _ => return None,
                    }
                }
            }
            b'{' if depth < MAX_DEPTH => {
                self.i += 1;
                out.push(b"{")?;
                if self.peek()? == b'}' {
                    self.i += 1;
                    return out.push(b"}");
                }
                let mut last: Option<&[u8]> = None;
                loop {
                    let name = self.string()?;
                    // In sorted order already (which also rules out repeats).
                    if last.is_some_and(|l| l >= name) {
                        return None;
                    }
                    last = Some(name);
                    self.eat(b':')?;
                    out.push(b"\"")?;
                    out.push(name)?;
                    out.push(b"\":")?;
                    self.value(out, depth + 1)?;
                    match self.peek()? {
                        b',' => {
                            self.i += 1;
                            out.push(b",")?;
                        }
                        b'}' => {
                            self.i += 1;
                            return out.push(b"}");
                        }
                        _ => return None,
                    }
                }
            }
            b't' => self.literal(b"true", out),
            b'f' => self.literal(b"false", out),
            b'n' => self.literal(b"null", out),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => None,
        }
    }

    fn literal(&mut self, lit: &[u8], out: &mut Out<'_>) -> Option<()> {
        if self.s.get(self.i..self.i + lit.len()) != Some(lit) {
            return None;
        }
        self.i += lit.len();
        match self.s.get(self.i) {
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b']' | b'}') => out.push(lit),
            _ => None,
        }
    }

    /// An item: a string of 1 to `max` bytes; where its content is in the body.
    #[inline]
    fn item(&mut self, max: usize) -> Option<(u32, u32)> {
        let s = self.string()?;
        // The closing quote is the last byte read.
        let end = self.i - 1;
        (!s.is_empty() && s.len() <= max).then_some(((end - s.len()) as u32, end as u32))
    }
}

/// Reads `body` as a request of `row` into `out`; `false` when the general parser
/// must decide.
pub fn scan(row: &ReadRow, body: &[u8], out: &mut FastRequest) -> bool {
    scan_inner(row, body, out).is_some()
}

/// A request to scan into (boxed: it is a few kilobytes, kept and reused).
pub fn request() -> Box<FastRequest> {
    Box::new(FastRequest {
        items: [(0, 0); MAX_ITEMS],
        n: 0,
        variant: [0; MAX_VARIANT],
        variant_len: 0,
        values: [0; MAX_VARIANT],
    })
}

fn scan_inner(row: &ReadRow, body: &[u8], out: &mut FastRequest) -> Option<()> {
    let mut sc = Scan {
        s: body,
        i: 0,
        non_ascii: false,
    };
    let field = row.items.field().as_bytes();
    let max = row.max_items.min(MAX_ITEMS);
    // The other members: name, and where its canonical value is in `values`.
    let mut names: [&[u8]; MAX_FIELDS] = [b""; MAX_FIELDS];
    let mut spans: [(u16, u16); MAX_FIELDS] = [(0, 0); MAX_FIELDS];
    let mut fields = 0usize;
    let mut vals = Out {
        buf: &mut out.values,
        len: 0,
    };
    let mut items_seen = false;
    out.n = 0;
    sc.eat(b'{')?;
    if sc.peek()? == b'}' {
        return None;
    }
    loop {
        let name = sc.string()?;
        sc.eat(b':')?;
        if name == field {
            if items_seen {
                return None;
            }
            items_seen = true;
            match row.items {
                ItemShape::Scalar(_) => {
                    out.items[0] = sc.item(row.max_item_bytes)?;
                    out.n = 1;
                }
                ItemShape::List(_) | ItemShape::ObjectList(..) => {
                    sc.eat(b'[')?;
                    loop {
                        if out.n == max {
                            return None;
                        }
                        let item = match row.items {
                            ItemShape::ObjectList(_, key) => {
                                sc.eat(b'{')?;
                                if sc.string()? != key.as_bytes() {
                                    return None;
                                }
                                sc.eat(b':')?;
                                let item = sc.item(row.max_item_bytes)?;
                                sc.eat(b'}')?;
                                item
                            }
                            _ => sc.item(row.max_item_bytes)?,
                        };
                        out.items[out.n] = item;
                        out.n += 1;
                        match sc.peek()? {
                            b',' => sc.i += 1,
                            b']' => {
                                sc.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
        } else {
            if fields == MAX_FIELDS {
                return None;
            }
            let start = vals.len;
            sc.value(&mut vals, 1)?;
            names[fields] = name;
            spans[fields] = (start as u16, vals.len as u16);
            fields += 1;
        }
        match sc.peek()? {
            b',' => sc.i += 1,
            b'}' => {
                sc.i += 1;
                break;
            }
            _ => return None,
        }
    }
    sc.ws();
    if sc.i != body.len() || !items_seen {
        return None;
    }
    if sc.non_ascii && std::str::from_utf8(body).is_err() {
        return None;
    }
    let values = &out.values;
    let value = |k: usize| &values[spans[k].0 as usize..spans[k].1 as usize];
    for req in row.required {
        let k = (0..fields).find(|k| names[*k] == req.as_bytes())?;
        if value(k) == b"null" {
            return None;
        }
    }
    if let Some((f, _)) = row.scope {
        let k = (0..fields).find(|k| names[*k] == f.as_bytes())?;
        let v = value(k);
        // A string of 1 to 32 bytes (no escapes: its text is its value).
        if v.len() < 3 || v[0] != b'"' || v.len() - 2 > crate::chat::reads::MAX_ACCOUNT_BYTES {
            return None;
        }
    }
    // Sorted by name, each `,"name":value`.
    let mut order: [u8; MAX_FIELDS] = [0; MAX_FIELDS];
    for (k, o) in order.iter_mut().enumerate().take(fields) {
        *o = k as u8;
    }
    order[..fields].sort_unstable_by(|a, b| names[*a as usize].cmp(names[*b as usize]));
    let mut v = Out {
        buf: &mut out.variant,
        len: 0,
    };
    for (j, k) in order[..fields].iter().enumerate() {
        let k = *k as usize;
        if j > 0 && names[order[j - 1] as usize] == names[k] {
            return None;
        }
        v.push(b",\"")?;
        v.push(names[k])?;
        v.push(b"\":")?;
        v.push(value(k))?;
    }
    out.variant_len = v.len;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::item_key::{parse, Parsed};
    use crate::chat::reads::{row, READS};

    fn both(command: &str, body: &str) -> Option<(Vec<String>, String)> {
        let (id, r) = row(command).unwrap();
        let mut f = request();
        let fast = scan(r, body.as_bytes(), &mut f).then(|| {
            (
                f.items(body.as_bytes())
                    .map(|s| String::from_utf8(s.to_vec()).unwrap())
                    .collect::<Vec<_>>(),
                String::from_utf8(f.variant().to_vec()).unwrap(),
            )
        });
        if let Some(fast) = &fast {
            match parse(id, body.as_bytes()) {
                Ok(Parsed::Split(g)) => {
                    let items: Vec<String> = g.items.iter().map(|c| c.to_string()).collect();
                    assert_eq!(fast.0, items, "{body}");
                    assert_eq!(fast.1, g.variant, "{body}");
                }
                other => panic!("{body}: fast took it, general says {other:?}"),
            }
        }
        fast
    }

    #[test]
    fn common_bodies_are_read_as_the_general_parser_reads_them() {
        let p = "profile/portrait_get";
        let (items, variant) = both(
            p,
            r#"{"To_Account":["a","b"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]}"#,
        )
        .unwrap();
        assert_eq!(items, ["a", "b"]);
        assert_eq!(
            variant,
            r#","TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Image"]"#
        );
        // Whitespace and field order do not matter.
        let (_, v2) = both(
            p,
            " {\n \"TagList\" : [ \"Tag_Profile_IM_Nick\" ,\"Tag_Profile_IM_Image\" ] , \"To_Account\" : [ \"a\" , \"b\" ] } ",
        )
        .unwrap();
        assert_eq!(v2, variant);
        let g = "group_open_http_svc/get_group_info";
        let (_, v) = both(
            g,
            r#"{"GroupIdList":["@a"],"ResponseFilter":{"GroupBaseInfoFilter":["Name"],"MemberInfoFilter":["Role"]},"X":[1,-2.5e3,true,null,{}]}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            r#","ResponseFilter":{"GroupBaseInfoFilter":["Name"],"MemberInfoFilter":["Role"]},"X":[1,-2.5e3,true,null,{}]"#
        );
        let (items, _) = both(
            "im_open_login_svc/account_check",
            r#"{"CheckItem":[{"UserID":"x"},{ "UserID" : "y" }]}"#,
        )
        .unwrap();
        assert_eq!(items, ["x", "y"]);
        let (items, v) = both(
            "sns/friend_get",
            r#"{"From_Account":"o","StartIndex":0,"StandardSequence":12}"#,
        )
        .unwrap();
        assert_eq!(items, ["o"]);
        assert_eq!(v, r#","StandardSequence":12,"StartIndex":0"#);
        assert!(both(
            "sns/friend_get_list",
            r#"{"From_Account":"o","To_Account":["p"],"TagList":[]}"#
        )
        .is_some());
        // Non-ASCII is fine; bytes that are not UTF-8 are not.
        assert!(both(p, r#"{"To_Account":["é"],"TagList":["ü"]}"#).is_some());
        let mut bad = br#"{"To_Account":["a"],"TagList":["#.to_vec();
        bad.extend_from_slice(b"\xff\xfe\"]}");
        assert!(!scan(row(p).unwrap().1, &bad, &mut request()));
    }

    #[test]
    fn what_it_leaves_to_the_general_parser() {
        let p = "profile/portrait_get";
        for body in [
            r#"{"To_Account":["a\u0041"],"TagList":[]}"#,
            r#"{"To_Account":["a"],"TagList":["\n"]}"#,
            r#"{"To_Account":["a","a"],"TagList":[]}"#,
            r#"{"To_Account":[],"TagList":[]}"#,
            r#"{"To_Account":["a"]}"#,
            r#"{"To_Account":["a"],"TagList":null}"#,
            r#"{"To_Account":["a"],"TagList":[],"TagList":[]}"#,
            r#"{"To_Account":["a"],"To_Account":["b"],"TagList":[]}"#,
            r#"{"To_Account":["a"],"TagList":[],"X":{"b":1,"a":2}}"#,
            r#"{"To_Account":["a"],"TagList":[],"X":01}"#,
            r#"{"To_Account":["a"],"TagList":[],"X":1.}"#,
            r#"{"To_Account":["a"],"TagList":[],"X":tru}"#,
            r#"{"To_Account":["a"],"TagList":[]} x"#,
            r#"{"To_Account":[""],"TagList":[]}"#,
            r#"{"To_Account":["123456789012345678901234567890123"],"TagList":[]}"#,
            r#"{"To_Account":[1],"TagList":[]}"#,
            r#"[1]"#,
            "",
            "{}",
        ] {
            let (_, r) = row(p).unwrap();
            let mut f = request();
            let fast = scan(r, body.as_bytes(), &mut f);
            // Duplicates are found by the hit path (it hashes the items anyway).
            if body.contains(r#"["a","a"]"#) {
                assert!(fast);
                continue;
            }
            assert!(!fast, "{body}");
        }
        let many: Vec<String> = (0..101).map(|i| format!("\"u{i}\"")).collect();
        let body = format!(r#"{{"To_Account":[{}],"TagList":[]}}"#, many.join(","));
        assert!(!scan(row(p).unwrap().1, body.as_bytes(), &mut request()));
        assert!(!scan(
            row("sns/friend_get_list").unwrap().1,
            br#"{"From_Account":"","To_Account":["p"],"TagList":[]}"#,
            &mut request()
        ));
        assert!(!scan(
            row("im_open_login_svc/account_check").unwrap().1,
            br#"{"CheckItem":[{"UserID":"x","Y":1}]}"#,
            &mut request()
        ));
        assert!(READS.iter().all(|r| r.max_items <= MAX_ITEMS));
    }
}
