//! Caller authentication: `Authorization: Bearer <token>` against `server.auth_tokens`.
//!
//! With no tokens configured nothing is checked (the router tests `is_empty()` first,
//! so the hot path pays nothing). With tokens, every route is protected except the
//! ones [`is_open`] names: the probes, `/metrics` (unless `server.protect_metrics`),
//! `/quitquitquit` (loopback-only on its own) and `/callback` (it checks Chat's `Sign`).
//!
//! The comparison is constant-time: the presented token and every configured token are
//! hashed to SHA-256 digests of equal length, and the digests are compared with
//! [`subtle::ConstantTimeEq`] against every configured token without stopping at the
//! first match, so neither the length of a configured token nor which one matched shows
//! in the timing. Token values are never logged.

use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
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
    let value = headers.get(AUTHORIZATION)?.as_bytes();
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

/// Whether `headers` carry a bearer token equal to one of `tokens`.
///
/// Returns `false` when `tokens` is empty; callers skip the check altogether in that
/// case. Every configured token is compared, in constant time, whatever the outcome.
pub fn authorized(tokens: &[Secret], headers: &HeaderMap) -> bool {
    let Some(presented) = bearer_token(headers) else {
        return false;
    };
    let presented = Sha256::digest(presented);
    let mut ok = Choice::from(0u8);
    for t in tokens {
        let expected = Sha256::digest(t.expose().trim().as_bytes());
        ok |= presented.as_slice().ct_eq(expected.as_slice());
    }
    ok.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
