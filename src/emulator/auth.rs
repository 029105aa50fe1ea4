//! Authentication of `/v4` calls exactly as Chat does it: the five query parameters,
//! the SDKAppID, the TLSSigAPIv2 UserSig, and the admin check.
//!
//! Order of checks (first failure wins):
//! 1. `sdkappid` missing or empty → 60012; `identifier`, `usersig`, `random` or
//!    `contenttype` missing or empty → 60002; `random` not a u32 or `contenttype` not
//!    `json` → 60002; `sdkappid` not a number → 60002;
//! 2. `sdkappid` is not the emulator's app → 60006 (the app's key cannot be found);
//! 3. the UserSig against the emulator's SDKAppID, key and the URL's identifier:
//!    70003 unparsable, 70014 signed for another SDKAppID, 70013 signed for another
//!    identifier, 70009 wrong key, 70001 expired;
//! 4. a valid UserSig of an identifier that is not the app admin → 60010.
//!
//! Verified admin UserSigs are remembered with their expiry (a small map), so a
//! reused UserSig is not inflated and re-hashed on every call; expiry still applies.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::RwLock;

use super::protocol::ApiError;
use super::world::{read, write};
use crate::chat::usersig;

/// Verified UserSigs remembered at most.
const CACHE_CAPACITY: usize = 64;

/// The five parameters Chat requires, as found in the query string (first
/// occurrence wins, values percent-decoded).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Params<'a> {
    /// `sdkappid`.
    pub sdkappid: Option<Cow<'a, str>>,
    /// `identifier`.
    pub identifier: Option<Cow<'a, str>>,
    /// `usersig`.
    pub usersig: Option<Cow<'a, str>>,
    /// `random`.
    pub random: Option<Cow<'a, str>>,
    /// `contenttype`.
    pub contenttype: Option<Cow<'a, str>>,
}

/// Percent-decodes a query value (`+` stays `+`: Chat's UserSig alphabet has none,
/// and identifiers are matched literally).
pub(crate) fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Finds the parameters in a query string.
pub(crate) fn parse_params(query: &str) -> Params<'_> {
    let mut p = Params::default();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "sdkappid" => &mut p.sdkappid,
            "identifier" => &mut p.identifier,
            "usersig" => &mut p.usersig,
            "random" => &mut p.random,
            "contenttype" => &mut p.contenttype,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(percent_decode(v));
        }
    }
    p
}

/// Every `key=value` pair of a query string, values percent-decoded (for the
/// control endpoints).
pub(crate) fn parse_params_any(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(k).into_owned(),
                percent_decode(v).into_owned(),
            )
        })
        .collect()
}

/// Checks calls against one app's SDKAppID, key and admin.
pub(crate) struct Auth {
    sdkappid: u64,
    key: Vec<u8>,
    admin: String,
    /// Verified admin UserSig → unix second it expires at.
    cache: RwLock<HashMap<Box<str>, u64>>,
}

fn present<'a>(v: &'a Option<Cow<'a, str>>) -> Option<&'a str> {
    v.as_deref().filter(|s| !s.is_empty())
}

impl Auth {
    /// An authenticator for the app `sdkappid` with secret `key` and admin `admin`.
    pub(crate) fn new(sdkappid: u64, key: &str, admin: &str) -> Auth {
        Auth {
            sdkappid,
            key: key.as_bytes().to_vec(),
            admin: admin.to_owned(),
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Authenticates a call from its query string at unix time `now`.
    pub(crate) fn check(&self, query: Option<&str>, now: u64) -> Result<(), ApiError> {
        let p = parse_params(query.unwrap_or(""));
        let missing = |name: &str| ApiError::new(60002, format!("{name} is missing in the URL"));
        let sdkappid = present(&p.sdkappid)
            .ok_or_else(|| ApiError::new(60012, "sdkappid is missing in the URL"))?;
        let identifier = present(&p.identifier).ok_or_else(|| missing("identifier"))?;
        let sig = present(&p.usersig).ok_or_else(|| missing("usersig"))?;
        let random = present(&p.random).ok_or_else(|| missing("random"))?;
        let contenttype = present(&p.contenttype).ok_or_else(|| missing("contenttype"))?;
        if random.parse::<u32>().is_err() {
            return Err(ApiError::new(
                60002,
                "random must be an integer from 0 to 4294967295",
            ));
        }
        if contenttype != "json" {
            return Err(ApiError::new(60002, "contenttype must be json"));
        }
        let app: u64 = sdkappid
            .parse()
            .map_err(|_| ApiError::new(60002, "sdkappid is not a number"))?;
        if app != self.sdkappid {
            return Err(ApiError::new(
                60006,
                format!(
                    "SDKAppID {app} is invalid (this emulator hosts {})",
                    self.sdkappid
                ),
            ));
        }
        if identifier == self.admin {
            if let Some(&expires_at) = read(&self.cache).get(sig) {
                if now <= expires_at {
                    return Ok(());
                }
            }
        }
        let info = usersig::verify(sig, self.sdkappid, &self.key, identifier, now)
            .map_err(|e| ApiError::new(e.chat_code(), e.to_string()))?;
        if identifier != self.admin {
            return Err(ApiError::new(
                60010,
                format!("{identifier:?} is not the app admin"),
            ));
        }
        self.remember(sig, info.expires_at(), now);
        Ok(())
    }

    fn remember(&self, sig: &str, expires_at: u64, now: u64) {
        let mut cache = write(&self.cache);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, &mut e| e >= now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(sig.into(), expires_at);
    }

    /// A fresh UserSig for `identifier` with this app's key, valid `expire` seconds
    /// from `now` (for `GET /__emulator/admin-usersig`).
    pub(crate) fn mint(&self, identifier: &str, expire: u64, now: u64) -> String {
        usersig::generate(self.sdkappid, &self.key, identifier, expire, now, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_770_000_000;

    fn auth() -> Auth {
        Auth::new(1400000000, "k", "administrator")
    }

    fn q(sig: &str, ident: &str) -> String {
        format!("sdkappid=1400000000&identifier={ident}&usersig={sig}&random=7&contenttype=json")
    }

    #[test]
    fn cache_still_honours_expiry() {
        let a = auth();
        let sig = usersig::generate(1400000000, b"k", "administrator", 100, NOW, None);
        assert_eq!(a.check(Some(&q(&sig, "administrator")), NOW + 1), Ok(()));
        assert_eq!(read(&a.cache).len(), 1);
        // Cached, still checked for expiry.
        assert_eq!(a.check(Some(&q(&sig, "administrator")), NOW + 50), Ok(()));
        assert_eq!(
            a.check(Some(&q(&sig, "administrator")), NOW + 101)
                .unwrap_err()
                .code,
            70001
        );
        // A cached admin sig used with another identifier is still a mismatch.
        assert_eq!(
            a.check(Some(&q(&sig, "user_0001")), NOW + 1)
                .unwrap_err()
                .code,
            70013
        );
    }

    #[test]
    fn cache_stays_bounded() {
        let a = auth();
        for i in 0..(CACHE_CAPACITY as u64 * 3) {
            let sig = usersig::generate(1400000000, b"k", "administrator", 1000 + i, NOW, None);
            assert_eq!(a.check(Some(&q(&sig, "administrator")), NOW), Ok(()));
        }
        assert!(read(&a.cache).len() <= CACHE_CAPACITY);
    }

    #[test]
    fn parameter_errors() {
        let a = auth();
        let sig = usersig::generate(1400000000, b"k", "administrator", 100, NOW, None);
        let code = |query: &str| a.check(Some(query), NOW).err().map(|e| e.code);
        assert_eq!(code(""), Some(60012));
        assert_eq!(
            code(&format!(
                "identifier=administrator&usersig={sig}&random=1&contenttype=json"
            )),
            Some(60012)
        );
        assert_eq!(
            code(&format!(
                "sdkappid=1400000000&usersig={sig}&random=1&contenttype=json"
            )),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1400000000&identifier=administrator&random=1&contenttype=json"),
            Some(60002)
        );
        let base = format!("sdkappid=1400000000&identifier=administrator&usersig={sig}");
        assert_eq!(code(&format!("{base}&contenttype=json")), Some(60002));
        assert_eq!(
            code(&format!("{base}&random=4294967296&contenttype=json")),
            Some(60002)
        );
        assert_eq!(
            code(&format!("{base}&random=-1&contenttype=json")),
            Some(60002)
        );
        assert_eq!(
            code(&format!("{base}&random=1&contenttype=xml")),
            Some(60002)
        );
        assert_eq!(code(&format!("{base}&random=1")), Some(60002));
        assert_eq!(
            code(&format!("{base}&random=4294967295&contenttype=json")),
            None
        );
        assert_eq!(
            code(&format!(
                "sdkappid=1400000001&identifier=administrator&usersig={sig}&random=1&contenttype=json"
            )),
            Some(60006)
        );
        assert_eq!(
            code(&format!(
                "sdkappid=abc&identifier=administrator&usersig={sig}&random=1&contenttype=json"
            )),
            Some(60002)
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("abc"), "abc");
        assert_eq!(percent_decode("a%40b%23"), "a@b#");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        let p = parse_params("identifier=a%20b&identifier=c&x&usersig");
        assert_eq!(p.identifier.as_deref(), Some("a b"));
        assert_eq!(p.usersig.as_deref(), Some(""));
    }
}
