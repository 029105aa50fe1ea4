//! Caller authentication: `Authorization: Bearer <token>` against `server.auth_tokens`.
//!
//! With no tokens configured nothing is checked (the router tests `is_empty()` first,
//! so the hot path pays nothing). With tokens, every route is protected except the
//! ones [`is_open`] names: the probes, `/metrics` (unless `server.protect_metrics`),
//! `/quitquitquit` (loopback-only on its own) and `/callback` (it checks Chat's `Sign`).
//!
//! [`CallerTokens`] is the one check, used by the cache-hit path and the router
//! alike. It is constant-time and cheap enough for the hit path: the presented token
//! is hashed with a keyed 128-bit SipHash (keys drawn at random per process, so the
//! hash of a token cannot be predicted or precomputed), and the hash is compared
//! with the precomputed hash of every configured token, all of them, without
//! stopping at the first match ([`subtle::ConstantTimeEq`]). The time taken depends
//! on the length of what the caller sent and the number of tokens, never on the
//! configured tokens' contents or lengths, nor on which one matched. On the hit
//! path a connection also remembers the `Authorization` value it last had accepted
//! ([`TokenView`]) and compares the next one with it, in constant time, before
//! hashing. Token values are never logged.

use std::sync::Arc;

use std::ops::Deref;

use arc_swap::{ArcSwap, Cache};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use siphasher::sip128::SipHasher13;
use subtle::{Choice, ConstantTimeEq};

use crate::config::Secret;

/// Whether `path` is answered without a token even when tokens are configured.
pub fn is_open(path: &str, protect_metrics: bool) -> bool {
    match path {
        "/healthz" | "/readyz" | "/quitquitquit" | "/callback" => true,
        "/metrics" => !protect_metrics,
        _ => false,
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// case-insensitively), or `None` when the header is missing, not Bearer, or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    bearer(headers.get(AUTHORIZATION)?.as_bytes())
}

/// The token of an `Authorization` field value `Bearer <token>`, or `None`.
#[inline]
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    // At least one space between the scheme and the token.
    if !matches!(rest.first(), Some(b' ' | b'\t')) {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The configured caller tokens, as keyed hashes, following the live token list
/// (`server.auth_tokens_file` may change it).
pub struct CallerTokens {
    hasher: SipHasher13,
    prepared: ArcSwap<Prepared>,
}

/// The hashes of one token list.
struct Prepared {
    /// The list they were made from.
    source: Arc<Vec<Secret>>,
    hashes: Vec<u128>,
}

impl std::fmt::Debug for CallerTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerTokens").finish_non_exhaustive()
    }
}

impl CallerTokens {
    /// Hashes `tokens` under fresh random keys.
    pub fn new(tokens: Arc<Vec<Secret>>) -> CallerTokens {
        let hasher = SipHasher13::new_with_keys(rand::random(), rand::random());
        let prepared = ArcSwap::from_pointee(Prepared::of(&hasher, tokens));
        CallerTokens { hasher, prepared }
    }

    /// Whether `presented` (a bearer token, `None` when there was none) is one of
    /// `live`'s tokens. Returns `false` when there are none; callers skip the check
    /// altogether in that case. Every configured token is compared, in constant time,
    /// whatever the outcome.
    pub fn check(&self, live: &ArcSwap<Vec<Secret>>, presented: Option<&[u8]>) -> bool {
        let Some(presented) = presented else {
            return false;
        };
        let h = self.hasher.hash(presented).as_u128();
        self.prepared_for(&live.load()).verdict(h)
    }

    /// Whether `headers` carry a bearer token that is one of `live`'s tokens.
    pub fn authorized(&self, live: &ArcSwap<Vec<Secret>>, headers: &HeaderMap) -> bool {
        self.check(live, bearer_token(headers))
    }

    /// A view for one connection of the hit path: it follows `live` by one pointer
    /// comparison per check instead of two shared loads.
    pub fn view<'a>(&'a self, live: &'a ArcSwap<Vec<Secret>>) -> TokenView<'a> {
        let live = Cache::new(live);
        let prepared = self.prepared_for(live.arc_swap().load().deref());
        TokenView {
            tokens: self,
            live,
            prepared,
            memo: [0; MEMO],
            memo_len: 0,
        }
    }

    /// The hashes of `current` (hashed now if the list changed since).
    fn prepared_for(&self, current: &Arc<Vec<Secret>>) -> Arc<Prepared> {
        let prepared = self.prepared.load_full();
        if Arc::ptr_eq(&prepared.source, current) {
            return prepared;
        }
        let fresh = Arc::new(Prepared::of(&self.hasher, Arc::clone(current)));
        self.prepared.store(fresh.clone());
        fresh
    }
}

/// Longest `Authorization` value a connection remembers.
const MEMO: usize = 256;

/// One connection's view of the caller tokens ([`CallerTokens::view`]).
///
/// It remembers the `Authorization` value it last accepted (a keep-alive caller
/// sends the same one every time) while the token list stays the same, and compares
/// the next value with it before hashing. That comparison is constant-time too: it
/// reads as many bytes as the caller sent, whatever the remembered value, and only
/// an exact match (which is then accepted, as it would be anyway) ends it early. A
/// caller learns nothing it could not learn from the answer.
pub struct TokenView<'a> {
    tokens: &'a CallerTokens,
    live: Cache<&'a ArcSwap<Vec<Secret>>, Arc<Vec<Secret>>>,
    prepared: Arc<Prepared>,
    memo: [u8; MEMO],
    /// Bytes of `memo` in use; 0: none.
    memo_len: usize,
}

impl std::fmt::Debug for TokenView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenView").finish_non_exhaustive()
    }
}

impl TokenView<'_> {
    /// [`CallerTokens::check`], for this connection.
    #[inline]
    pub fn check(&mut self, presented: Option<&[u8]>) -> bool {
        self.follow();
        let Some(presented) = presented else {
            return false;
        };
        let h = self.tokens.hasher.hash(presented).as_u128();
        self.prepared.verdict(h)
    }

    /// Whether an `Authorization` field value (`None`: no such field) carries one of
    /// the tokens: the value this connection last had accepted passes at the cost of
    /// a comparison; any other is parsed and checked ([`TokenView::check`]).
    #[inline]
    pub fn check_header(&mut self, value: Option<&[u8]>) -> bool {
        self.follow();
        let Some(value) = value else {
            return false;
        };
        match self.memo.get(..value.len()) {
            Some(memo) if same(value, memo, self.memo_len) => true,
            _ => self.check_and_remember(value),
        }
    }

    /// An `Authorization` value other than the one remembered: parsed, checked, and
    /// remembered when accepted.
    #[cold]
    #[inline(never)]
    fn check_and_remember(&mut self, value: &[u8]) -> bool {
        let ok = self.check(bearer(value));
        if let Some(memo) = self.memo.get_mut(..value.len()).filter(|_| ok) {
            memo.copy_from_slice(value);
            self.memo_len = value.len();
        }
        ok
    }

    /// Follows a change of the token list (and forgets what was accepted before).
    #[inline]
    fn follow(&mut self) {
        let current = self.live.load();
        if !Arc::ptr_eq(&self.prepared.source, current) {
            self.prepared = self.tokens.prepared_for(current);
            self.memo_len = 0;
        }
    }
}

/// Whether `a` equals the remembered `b[..len]` (`len` 0: nothing remembered), in
/// time that depends on `a.len()` only: every byte of `a` is compared, words at a
/// time (the last word overlapping the one before when the length is not a multiple
/// of eight), the differences OR-ed together, and only the total is looked at.
#[inline]
fn same(a: &[u8], b: &[u8], len: usize) -> bool {
    debug_assert_eq!(a.len(), b.len());
    let mut diff = (a.len() ^ len) as u64 | u64::from(len == 0);
    let (ac, at) = a.as_chunks::<8>();
    let (bc, bt) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        diff |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y);
    }
    match (a.last_chunk::<8>(), b.last_chunk::<8>()) {
        (Some(x), Some(y)) => diff |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y),
        _ => {
            for (x, y) in at.iter().zip(bt) {
                diff |= u64::from(x ^ y);
            }
        }
    }
    std::hint::black_box(diff) == 0
}

impl Prepared {
    /// Whether `h` is one of the hashes: all compared, in constant time.
    #[inline]
    fn verdict(&self, h: u128) -> bool {
        let mut ok = Choice::from(0u8);
        for t in &self.hashes {
            ok |= t.ct_eq(&h);
        }
        bool::from(ok)
    }

    fn of(hasher: &SipHasher13, source: Arc<Vec<Secret>>) -> Prepared {
        let hashes = source
            .iter()
            .map(|t| hasher.hash(t.expose().trim().as_bytes()).as_u128())
            .collect();
        Prepared { source, hashes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn authorized(tokens: &[Secret], headers: &HeaderMap) -> bool {
        let live = ArcSwap::from_pointee(tokens.to_vec());
        CallerTokens::new(live.load_full()).authorized(&live, headers)
    }

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn tokens() -> Vec<Secret> {
        vec![
            Secret::new("token-aaaaaaaaaaaaaaaa"),
            Secret::new("token-bbbbbbbbbbbbbbbb"),
        ]
    }

    #[test]
    fn accepts_any_configured_token_and_scheme_case() {
        let t = tokens();
        assert!(authorized(&t, &with_auth("Bearer token-aaaaaaaaaaaaaaaa")));
        assert!(authorized(&t, &with_auth("Bearer token-bbbbbbbbbbbbbbbb")));
        assert!(authorized(&t, &with_auth("bearer token-bbbbbbbbbbbbbbbb")));
        assert!(authorized(
            &t,
            &with_auth("BEARER   token-aaaaaaaaaaaaaaaa")
        ));
    }

    #[test]
    fn refuses_everything_else() {
        let t = tokens();
        assert!(!authorized(&t, &HeaderMap::new()));
        for v in [
            "Bearer",
            "Bearer ",
            "Bearertoken-aaaaaaaaaaaaaaaa",
            "Basic token-aaaaaaaaaaaaaaaa",
            "token-aaaaaaaaaaaaaaaa",
            "Bearer token-aaaaaaaaaaaaaaa",
            "Bearer token-aaaaaaaaaaaaaaaaa",
            "Bearer token-cccccccccccccccc",
            "Bearer token-aaaaaaaaaaaaaaaa token-bbbbbbbbbbbbbbbb",
        ] {
            assert!(!authorized(&t, &with_auth(v)), "{v:?} was accepted");
        }
        assert!(!authorized(
            &[],
            &with_auth("Bearer token-aaaaaaaaaaaaaaaa")
        ));
    }

    #[test]
    fn configured_whitespace_is_ignored() {
        let t = vec![Secret::new("token-aaaaaaaaaaaaaaaa\n")];
        assert!(authorized(&t, &with_auth("Bearer token-aaaaaaaaaaaaaaaa")));
    }

    #[test]
    fn a_changed_token_list_is_followed() {
        let live = ArcSwap::from_pointee(tokens());
        let check = CallerTokens::new(live.load_full());
        let old = Some(&b"token-aaaaaaaaaaaaaaaa"[..]);
        let new = Some(&b"token-dddddddddddddddd"[..]);
        assert!(check.check(&live, old));
        assert!(!check.check(&live, new));
        let mut view = check.view(&live);
        assert!(view.check(old) && !view.check(new));
        live.store(Arc::new(vec![Secret::new("token-dddddddddddddddd")]));
        assert!(!check.check(&live, old));
        assert!(check.check(&live, new));
        assert!(!check.check(&live, None));
        assert!(!view.check(old) && view.check(new), "the view follows too");
        assert!(!view.check(None));
    }

    #[test]
    fn a_connection_remembers_only_what_it_accepted() {
        let live = ArcSwap::from_pointee(tokens());
        let check = CallerTokens::new(live.load_full());
        let mut view = check.view(&live);
        let good = &b"Bearer token-aaaaaaaaaaaaaaaa"[..];
        assert!(!view.check_header(None));
        assert!(!view.check_header(Some(b"")), "nothing remembered yet");
        assert!(view.check_header(Some(good)));
        assert_eq!(view.memo_len, good.len());
        assert!(view.check_header(Some(good)), "remembered");
        for bad in [
            &b""[..],
            b"Bearer token-aaaaaaaaaaaaaaa",
            b"Bearer token-aaaaaaaaaaaaaaaab",
            b"Bearer token-aaaaaaaaaaaaaaab",
            b"Basic token-aaaaaaaaaaaaaaaa",
        ] {
            assert!(
                !view.check_header(Some(bad)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(view.check_header(Some(b"bearer  token-bbbbbbbbbbbbbbbb")));
        assert!(
            view.check_header(Some(good)),
            "another token, checked again"
        );
        // A rotation drops the remembered value.
        live.store(Arc::new(vec![Secret::new("token-dddddddddddddddd")]));
        assert!(!view.check_header(Some(good)));
        assert!(view.check_header(Some(b"Bearer token-dddddddddddddddd")));
        // Values longer than what is remembered are always checked.
        let long = format!("Bearer {}", "x".repeat(300));
        live.store(Arc::new(vec![Secret::new("x".repeat(300))]));
        assert!(view.check_header(Some(long.as_bytes())));
        assert!(view.check_header(Some(long.as_bytes())));
        assert!(!view.check_header(Some(&long.as_bytes()[..299])));
    }

    #[test]
    fn same_compares_every_byte() {
        let b = *b"0123456789abcdefXYZ";
        assert!(same(&b, &b, b.len()));
        assert!(!same(&b, &b, 0), "nothing remembered");
        assert!(!same(&b, &b, b.len() - 1), "another length");
        for i in 0..b.len() {
            let mut a = b;
            a[i] ^= 1;
            assert!(!same(&a, &b, b.len()), "byte {i}");
        }
        assert!(!same(b"", b"", 0));
    }

    #[test]
    fn hashes_are_keyed_per_process_instance() {
        let t = Arc::new(tokens());
        let (a, b) = (CallerTokens::new(t.clone()), CallerTokens::new(t));
        assert_ne!(a.prepared.load().hashes, b.prepared.load().hashes);
    }

    #[test]
    fn open_paths() {
        for p in [
            "/healthz",
            "/readyz",
            "/quitquitquit",
            "/callback",
            "/metrics",
        ] {
            assert!(is_open(p, false), "{p}");
        }
        assert!(!is_open("/metrics", true));
        for p in [
            "/v4/recentcontact/get_list",
            "/admin/cache/invalidate",
            "/",
            "/nope",
            "//v4/recentcontact/get_list",
            "/healthz/",
        ] {
            assert!(!is_open(p, false), "{p}");
        }
    }
}
