//! What a valid HTTP/1.x request head is, how its body is framed, and what becomes of
//! its connection: the one definition the gateway's front end ([`super::http1`])
//! applies to every request, whether its answer then comes from the cache-hit path or
//! from the router, and whose target rules also apply to the HTTP/2 requests hyper
//! serves ([`super::router::route`]).
//!
//! The rules (RFC 9112 unless said otherwise), strictest reading where the RFCs allow
//! a choice, since a lenient reading is what request smuggling feeds on:
//!
//! - **Request target** (§3.2): origin-form (`/path?query`), absolute-form
//!   (`http://host/path`), `*` for `OPTIONS` only, authority-form for `CONNECT` only;
//!   anything else (`GET healthz`) is 400. Its bytes are those RFC 3986 allows in a
//!   path and query (`<`, `>`, `"`, `{`, `\`, a fragment, non-ASCII are 400) and a `%`
//!   is followed by two hex digits. Over [`MAX_TARGET`] bytes is 414 (§3: at least
//!   8000 octets must be supported).
//! - **Host** (§3.2): an HTTP/1.1 request has exactly one, and its value is a valid
//!   `host[:port]` (possibly empty); HTTP/1.0 may omit it. Otherwise 400.
//! - **Content-Length** (§6.3, RFC 9110 §8.6): one field line of decimal digits. A
//!   list (`5, 5`), a repeat (even of the same value), a sign or anything else is 400.
//! - **Transfer-Encoding** (§6.1): the gateway decodes `chunked` only. A coding it does
//!   not implement is 501 (`gzip, chunked`); `chunked` twice, `chunked` not last, an
//!   empty or malformed list, `Transfer-Encoding` in HTTP/1.0, and `Transfer-Encoding`
//!   with `Content-Length` are 400 (§6.1 and §6.3 let a server refuse the last two; it
//!   must close the connection after either anyway).
//! - **Connection** (§9.3, RFC 9110 §7.6.1): the tokens of every `Connection` line;
//!   `close` anywhere wins. HTTP/1.1 keeps the connection by default, HTTP/1.0 only
//!   with `keep-alive` and no `close`.
//! - **Expect** (RFC 9110 §10.1.1): `100-continue` is honoured on HTTP/1.1 only (a
//!   server must ignore it from HTTP/1.0); other expectations are ignored.
//! - **Upgrade** (RFC 9110 §7.8): ignored; the gateway answers in HTTP/1.1.
//!
//! Anything refused here closes the connection after its answer: once a head is in
//! doubt, so is where the next request starts.

use std::ops::Range;

use http::StatusCode;

/// Longest request target accepted (414 beyond).
pub const MAX_TARGET: usize = 8 * 1024;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400, with what was wrong.
    BadRequest(&'static str),
    /// 414: the target is over [`MAX_TARGET`] bytes.
    TargetTooLong,
    /// 431: the head is over its size or line limits.
    HeadTooLarge,
    /// 501: a transfer coding the gateway does not implement.
    UnknownCoding,
}

impl Refusal {
    /// The answer's status.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::TargetTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The answer's `ErrorInfo`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadRequest(why) => why,
            Refusal::TargetTooLong => "request target too long",
            Refusal::HeadTooLarge => "request head too large",
            Refusal::UnknownCoding => "transfer coding not implemented",
        }
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` (0 when absent).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What a valid head says about its body and its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the caller wants the connection kept after the answer.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1.
    pub expect_continue: bool,
}

/// What becomes of a connection once an answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Read the next request.
    KeepAlive,
    /// Close it, in stages (see [`super::http1`]'s lingering close).
    Close,
}

impl Fate {
    /// The one rule: a connection is kept only when the caller wants it kept, the
    /// request was read to its end (so the next one starts where it ends), the answer
    /// does not close it (refusals do), and the server is not shutting down.
    #[inline]
    pub fn after(
        wants_keep_alive: bool,
        request_read: bool,
        answer_closes: bool,
        stopping: bool,
    ) -> Fate {
        if wants_keep_alive && request_read && !answer_closes && !stopping {
            Fate::KeepAlive
        } else {
            Fate::Close
        }
    }
}

/// Checks a request line's target (given its method) and returns where its path is
/// within it (empty for `*` and authority-form).
#[inline]
pub fn check_target(method: &[u8], target: &[u8]) -> Result<Range<usize>, Refusal> {
    if target.len() > MAX_TARGET {
        return Err(Refusal::TargetTooLong);
    }
    if method == b"CONNECT" {
        // authority-form, and only for CONNECT (RFC 9112 §3.2.3).
        return if !target.is_empty() && authority(target) {
            Ok(0..0)
        } else {
            Err(Refusal::BadRequest("invalid request target"))
        };
    }
    match target.first() {
        Some(b'/') => {
            let path_end = path_and_query(target)?;
            Ok(0..path_end)
        }
        Some(b'*') if target.len() == 1 => {
            if method == b"OPTIONS" {
                Ok(0..0)
            } else {
                Err(Refusal::BadRequest("'*' is only a target for OPTIONS"))
            }
        }
        _ => absolute_form(target),
    }
}

/// `http://authority/path?query`: where the path is.
fn absolute_form(target: &[u8]) -> Result<Range<usize>, Refusal> {
    const BAD: Refusal = Refusal::BadRequest("invalid request target");
    let rest = if target.len() > 7 && target[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if target.len() > 8 && target[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return Err(BAD);
    };
    let auth_end = target[rest..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?'))
        .map_or(target.len(), |i| rest + i);
    // No userinfo (RFC 9110 §4.2.4), and a host is required.
    if auth_end == rest || !authority(&target[rest..auth_end]) {
        return Err(BAD);
    }
    let tail = &target[auth_end..];
    if tail.is_empty() {
        return Ok(auth_end..auth_end);
    }
    let path_end = path_and_query(tail)?;
    Ok(auth_end..auth_end + path_end)
}

/// RFC 3986 `pchar` plus `/` and `?` (what a path and a query are made of), as a
/// table; `%` is checked apart (two hex digits must follow).
static PCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let ok = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?";
    let mut i = 0;
    while i < ok.len() {
        t[ok[i] as usize] = true;
        i += 1;
    }
    t
};

/// Checks a path with an optional query; returns where the path ends.
#[inline]
fn path_and_query(s: &[u8]) -> Result<usize, Refusal> {
    let mut path_end = None;
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if PCHAR[b as usize] {
            if b == b'?' && path_end.is_none() {
                path_end = Some(i);
            }
            i += 1;
        } else if b == b'%'
            && i + 2 < s.len()
            && s[i + 1].is_ascii_hexdigit()
            && s[i + 2].is_ascii_hexdigit()
        {
            i += 3;
        } else {
            return Err(Refusal::BadRequest("invalid request target"));
        }
    }
    Ok(path_end.unwrap_or(s.len()))
}

/// RFC 3986 `reg-name` characters (unreserved and sub-delims; `%` apart).
static REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let ok = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=";
    let mut i = 0;
    while i < ok.len() {
        t[ok[i] as usize] = true;
        i += 1;
    }
    t
};

/// A `Host` value or the authority of an absolute target: `host [ ":" port ]`, where
/// host is a reg-name (possibly empty), an IPv4 address (a reg-name too) or an IP
/// literal in brackets, and the port is digits.
#[inline]
pub fn authority(v: &[u8]) -> bool {
    let mut i = 0;
    if v.first() == Some(&b'[') {
        // IP-literal: IPv6 (hex digits, ':' and '.') or IPvFuture ("v" ...).
        let Some(close) = v.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &v[1..close];
        let ok = match inner.first() {
            None => false,
            Some(b'v' | b'V') => inner[1..]
                .iter()
                .all(|b| REG_NAME[*b as usize] || *b == b':'),
            Some(_) => inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.'),
        };
        if !ok {
            return false;
        }
        i = close + 1;
    } else {
        while i < v.len() {
            let b = v[i];
            if REG_NAME[b as usize] {
                i += 1;
            } else if b == b'%'
                && i + 2 < v.len()
                && v[i + 1].is_ascii_hexdigit()
                && v[i + 2].is_ascii_hexdigit()
            {
                i += 3;
            } else {
                break;
            }
        }
    }
    match v.get(i) {
        None => true,
        Some(b':') => v[i + 1..].iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

/// Whether a `Cache-Control` field value asks to skip the cache: a `no-cache` or
/// `no-store` directive, matched case-insensitively (RFC 9111 §5.2), with or
/// without an argument. The one definition both the hit path and the get_list
/// handler use.
#[inline]
pub fn cache_control_no_cache(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|d| {
        let name = match d.iter().position(|b| *b == b'=') {
            Some(eq) => &d[..eq],
            None => d,
        };
        let name = name.trim_ascii();
        name.eq_ignore_ascii_case(b"no-cache") || name.eq_ignore_ascii_case(b"no-store")
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The framing and connection headers of one head, fed one field line at a time
/// (the caller matches the names: it reads other headers in the same pass), then
/// [`HeadCheck::finish`]ed.
#[derive(Debug)]
pub struct HeadCheck {
    http11: bool,
    hosts: u8,
    content_length: Option<u64>,
    /// `Transfer-Encoding` seen at all.
    te: bool,
    /// `chunked` seen (it must be the last coding, once).
    chunked: bool,
    /// A coding other than `chunked`, before it.
    unknown_coding: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// The first reason for a 400, reported once every line is read.
    bad: Option<&'static str>,
}

impl HeadCheck {
    /// A head of HTTP/1.1 (else 1.0).
    #[inline]
    pub fn new(http11: bool) -> HeadCheck {
        HeadCheck {
            http11,
            hosts: 0,
            content_length: None,
            te: false,
            chunked: false,
            unknown_coding: false,
            close: false,
            keep_alive: false,
            expect_continue: false,
            bad: None,
        }
    }

    fn bad(&mut self, why: &'static str) {
        self.bad.get_or_insert(why);
    }

    /// A `Host` line; returns whether its value is valid.
    #[inline]
    pub fn host(&mut self, value: &[u8]) -> bool {
        let valid = authority(value);
        if !valid {
            self.bad("invalid Host");
        }
        self.host_valid();
        valid
    }

    /// A `Host` line whose value is known to be valid (the caller checked these very
    /// bytes with [`authority`] before).
    #[inline]
    pub fn host_valid(&mut self) {
        self.hosts = self.hosts.saturating_add(1);
        if self.hosts > 1 {
            self.bad("more than one Host");
        }
    }

    /// A `Content-Length` line.
    #[inline]
    pub fn content_length(&mut self, value: &[u8]) {
        if self.content_length.is_some() {
            self.bad("Content-Length given more than once");
            return;
        }
        if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
            self.bad("invalid Content-Length");
            return;
        }
        let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        self.content_length = Some(n);
    }

    /// A `Transfer-Encoding` line.
    pub fn transfer_encoding(&mut self, value: &[u8]) {
        self.te = true;
        let mut any = false;
        for element in value.split(|b| *b == b',') {
            let element = element.trim_ascii();
            if element.is_empty() {
                continue; // empty list elements are allowed (RFC 9110 §5.6.1)
            }
            any = true;
            if self.chunked {
                self.bad("chunked must be the last transfer coding, once");
                return;
            }
            let name = match element.iter().position(|b| *b == b';') {
                Some(i) => element[..i].trim_ascii(),
                None => element,
            };
            if name.is_empty() || !name.iter().copied().all(is_tchar) {
                self.bad("invalid Transfer-Encoding");
                return;
            }
            if name.eq_ignore_ascii_case(b"chunked") {
                if name.len() != element.len() {
                    self.bad("chunked takes no parameters");
                    return;
                }
                self.chunked = true;
            } else {
                self.unknown_coding = true;
            }
        }
        if !any {
            self.bad("empty Transfer-Encoding");
        }
    }

    /// A `Connection` line.
    #[inline]
    pub fn connection(&mut self, value: &[u8]) {
        for token in value.split(|b| *b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            }
        }
    }

    /// An `Expect` line.
    #[inline]
    pub fn expect(&mut self, value: &[u8]) {
        if value.eq_ignore_ascii_case(b"100-continue") {
            self.expect_continue = self.http11;
        }
    }

    /// The verdict, once every line was fed.
    #[inline]
    pub fn finish(self) -> Result<Facts, Refusal> {
        if let Some(why) = self.bad {
            return Err(Refusal::BadRequest(why));
        }
        if self.http11 && self.hosts == 0 {
            return Err(Refusal::BadRequest("missing Host"));
        }
        let framing = if self.te {
            if !self.http11 {
                return Err(Refusal::BadRequest("Transfer-Encoding in HTTP/1.0"));
            }
            if self.content_length.is_some() {
                return Err(Refusal::BadRequest(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
            if self.unknown_coding {
                return Err(Refusal::UnknownCoding);
            }
            Framing::Chunked
        } else {
            Framing::Length(self.content_length.unwrap_or(0))
        };
        Ok(Facts {
            framing,
            keep_alive: !self.close && (self.http11 || self.keep_alive),
            expect_continue: self.expect_continue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(http11: bool, lines: &[(&str, &str)]) -> Result<Facts, Refusal> {
        let mut c = HeadCheck::new(http11);
        for (name, value) in lines {
            let v = value.as_bytes();
            match name.to_ascii_lowercase().as_str() {
                "host" => {
                    c.host(v);
                }
                "content-length" => c.content_length(v),
                "transfer-encoding" => c.transfer_encoding(v),
                "connection" => c.connection(v),
                "expect" => c.expect(v),
                _ => {}
            }
        }
        c.finish()
    }

    const BAD: fn(&Result<Facts, Refusal>) -> bool = |r| matches!(r, Err(Refusal::BadRequest(_)));

    #[test]
    fn targets() {
        let ok = |m: &str, t: &str| check_target(m.as_bytes(), t.as_bytes());
        assert_eq!(ok("GET", "/healthz"), Ok(0..8));
        assert_eq!(ok("GET", "/a/b?c=d/e?f"), Ok(0..4));
        assert_eq!(ok("GET", "/a%2Fb"), Ok(0..6));
        assert_eq!(ok("GET", "http://gw:80/v4/x?y"), Ok(12..17));
        assert_eq!(ok("GET", "HTTPS://gw"), Ok(10..10));
        assert_eq!(ok("GET", "http://[::1]:8080/x"), Ok(17..19));
        assert_eq!(ok("OPTIONS", "*"), Ok(0..0));
        assert_eq!(ok("CONNECT", "gw:443"), Ok(0..0));
        for (m, t) in [
            ("GET", "healthz"),
            ("GET", "*"),
            ("GET", ""),
            ("GET", "/a?q=<x>"),
            ("GET", "/a?q=\"x\""),
            ("GET", "/a{b}"),
            ("GET", "/a|b"),
            ("GET", "/a\\b"),
            ("GET", "/a^b"),
            ("GET", "/a`b"),
            ("GET", "/a#frag"),
            ("GET", "/a[0]"),
            ("GET", "/%zz"),
            ("GET", "/%4"),
            ("GET", "/caf\u{e9}"),
            ("GET", "ftp://gw/x"),
            ("GET", "http://user@gw/x"),
            ("GET", "http:///x"),
            ("GET", "http://gw:8x/"),
            ("CONNECT", "/x"),
        ] {
            assert!(
                matches!(ok(m, t), Err(Refusal::BadRequest(_))),
                "{m} {t}: {:?}",
                ok(m, t)
            );
        }
        let long = format!("/{}", "a".repeat(MAX_TARGET));
        assert_eq!(ok("GET", &long), Err(Refusal::TargetTooLong));
        assert!(ok("GET", &long[..MAX_TARGET]).is_ok());
    }

    /// Every target accepted here is one the router's URI parser accepts too, so the
    /// hit path and the router can never disagree on it.
    #[test]
    fn accepted_targets_parse_as_uris() {
        for b in 0u8..=255 {
            for t in [
                vec![b'/', b],
                vec![b'/', b'a', b'?', b],
                [b"http://gw/".as_slice(), &[b]].concat(),
                [b"http://g".as_slice(), &[b], b"w/x"].concat(),
            ] {
                if check_target(b"GET", &t).is_ok() {
                    let parsed = http::Uri::from_maybe_shared(bytes::Bytes::from(t.clone()));
                    assert!(parsed.is_ok(), "{:?}", String::from_utf8_lossy(&t));
                }
            }
        }
    }

    #[test]
    fn hosts() {
        for v in [
            "gw",
            "127.0.0.1:8080",
            "",
            "[::1]:1",
            "[v1.x]",
            "a-b.c_d~e",
            "%41b",
            "gw:",
        ] {
            assert!(authority(v.as_bytes()), "{v}");
        }
        for v in [
            "a b", "a/b", "gw:80:80", "[::1", "[]", "a@b", "gw:8o", "<x>", "%4",
        ] {
            assert!(!authority(v.as_bytes()), "{v}");
        }
        assert!(BAD(&head(true, &[])));
        assert!(head(false, &[]).is_ok());
        assert!(BAD(&head(true, &[("Host", "a"), ("Host", "a")])));
        assert!(BAD(&head(false, &[("Host", "a"), ("Host", "b")])));
        assert!(BAD(&head(true, &[("Host", "a b")])));
    }

    #[test]
    fn framing() {
        let h = |lines: &[(&str, &str)]| {
            let mut all = vec![("Host", "gw")];
            all.extend_from_slice(lines);
            head(true, &all)
        };
        let framing = |lines: &[(&str, &str)]| h(lines).map(|f| f.framing);
        assert_eq!(framing(&[]), Ok(Framing::Length(0)));
        assert_eq!(
            framing(&[("Content-Length", "012")]),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", "Chunked")]),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(&[("Transfer-Encoding", ", chunked,")]),
            Ok(Framing::Chunked)
        );
        for lines in [
            &[("Content-Length", "5, 5")][..],
            &[("Content-Length", "5"), ("Content-Length", "5")],
            &[("Content-Length", "5"), ("Content-Length", "6")],
            &[("Content-Length", "+5")],
            &[("Content-Length", "-1")],
            &[("Content-Length", "0x5")],
            &[("Content-Length", "")],
            &[("Content-Length", "99999999999999999999")],
            &[("Transfer-Encoding", "chunked, chunked")],
            &[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ],
            &[("Transfer-Encoding", "chunked, gzip")],
            &[("Transfer-Encoding", "chunked;x=1")],
            &[("Transfer-Encoding", "")],
            &[("Transfer-Encoding", "\"chunked\"")],
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
            &[("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        ] {
            assert!(BAD(&h(lines)), "{lines:?}: {:?}", h(lines));
        }
        for lines in [
            &[("Transfer-Encoding", "gzip, chunked")][..],
            &[
                ("Transfer-Encoding", "gzip"),
                ("Transfer-Encoding", "chunked"),
            ],
            &[("Transfer-Encoding", "xchunked")],
            &[("Transfer-Encoding", "identity")],
            &[("Transfer-Encoding", "gzip")],
        ] {
            assert_eq!(h(lines), Err(Refusal::UnknownCoding), "{lines:?}");
        }
        assert!(BAD(&head(false, &[("Transfer-Encoding", "chunked")])));
    }

    #[test]
    fn connections() {
        let ka = |http11: bool, lines: &[(&str, &str)]| {
            let mut all = vec![("Host", "gw")];
            all.extend_from_slice(lines);
            head(http11, &all).unwrap().keep_alive
        };
        assert!(ka(true, &[]));
        assert!(!ka(false, &[]));
        assert!(ka(false, &[("Connection", "Keep-Alive")]));
        assert!(!ka(false, &[("Connection", "close, keep-alive")]));
        assert!(!ka(false, &[("Connection", "keep-alive, close")]));
        assert!(!ka(
            false,
            &[("Connection", "keep-alive"), ("Connection", "close")]
        ));
        assert!(!ka(
            false,
            &[("Connection", "close"), ("Connection", "keep-alive")]
        ));
        assert!(!ka(true, &[("Connection", "foo, CLOSE")]));
        assert!(ka(true, &[("Connection", "closed")]));
        let expect = |http11| {
            head(http11, &[("Host", "gw"), ("Expect", "100-Continue")])
                .unwrap()
                .expect_continue
        };
        assert!(expect(true));
        assert!(!expect(false));
        assert_eq!(
            Fate::after(true, true, false, false),
            Fate::KeepAlive,
            "the only way to keep a connection"
        );
        for (a, b, c, d) in [
            (false, true, false, false),
            (true, false, false, false),
            (true, true, true, false),
            (true, true, false, true),
        ] {
            assert_eq!(Fate::after(a, b, c, d), Fate::Close);
        }
    }

    #[test]
    fn cache_control() {
        for v in [
            "no-cache",
            "No-Cache",
            "NO-STORE",
            "max-age=0, no-cache",
            " no-store ",
            "no-cache=\"x\"",
        ] {
            assert!(cache_control_no_cache(v.as_bytes()), "{v}");
        }
        for v in ["", "max-age=0", "no-cachex", "private"] {
            assert!(!cache_control_no_cache(v.as_bytes()), "{v}");
        }
    }
}
