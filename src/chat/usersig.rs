//! TLSSigAPIv2 UserSig generation and verification (see `shared/chat-api/usersig.md`).
//!
//! A UserSig is `base64url'(zlib(json))` where the JSON carries the identifier, the
//! SDKAppID, the issue time, the lifetime and an HMAC-SHA256 over those fields keyed
//! with the app's secret key. Chat's URL-safe alphabet replaces `+ / =` with `* - _`.

use std::io::{Read, Write};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The largest decoded UserSig we are willing to inflate. Real ones are ~200 bytes;
/// the bound keeps a hostile caller from making the emulator inflate a zip bomb.
const MAX_INFLATED: u64 = 4096;

/// Why a UserSig was rejected, in the order Chat checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not base64, not zlib, not JSON, or a field is missing (Chat: 70003).
    #[error("UserSig could not be parsed")]
    Malformed,
    /// `TLS.sdkappid` is not the expected SDKAppID (Chat: 70014).
    #[error("SDKAppID in the UserSig does not match")]
    SdkAppIdMismatch,
    /// `TLS.identifier` is not the request's identifier (Chat: 70013).
    #[error("identifier in the UserSig does not match")]
    IdentifierMismatch,
    /// The HMAC does not verify: wrong key (Chat: 70009).
    #[error("UserSig signature verification failed")]
    SigMismatch,
    /// `now > time + expire` (Chat: 70001).
    #[error("UserSig expired")]
    Expired,
}

impl VerifyError {
    /// The Chat error code the real service answers for this rejection.
    pub fn chat_code(self) -> i64 {
        match self {
            VerifyError::Malformed => 70003,
            VerifyError::SdkAppIdMismatch => 70014,
            VerifyError::IdentifierMismatch => 70013,
            VerifyError::SigMismatch => 70009,
            VerifyError::Expired => 70001,
        }
    }
}

/// The fields of a decoded UserSig (returned by [`verify`] on success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSigInfo {
    /// Who the UserSig was issued to.
    pub identifier: String,
    /// Which app issued it.
    pub sdkappid: u64,
    /// Issue time, unix seconds.
    pub time: u64,
    /// Lifetime in seconds from `time`.
    pub expire: u64,
}

impl UserSigInfo {
    /// Unix second after which Chat answers 70001.
    pub fn expires_at(&self) -> u64 {
        self.time.saturating_add(self.expire)
    }
}

#[derive(Serialize)]
struct SigDocOut<'a> {
    #[serde(rename = "TLS.ver")]
    ver: &'a str,
    #[serde(rename = "TLS.identifier")]
    identifier: &'a str,
    #[serde(rename = "TLS.sdkappid")]
    sdkappid: u64,
    #[serde(rename = "TLS.expire")]
    expire: u64,
    #[serde(rename = "TLS.time")]
    time: u64,
    #[serde(rename = "TLS.userbuf", skip_serializing_if = "Option::is_none")]
    userbuf: Option<&'a str>,
    #[serde(rename = "TLS.sig")]
    sig: &'a str,
}

#[derive(Deserialize)]
struct SigDocIn {
    #[serde(rename = "TLS.identifier")]
    identifier: String,
    #[serde(rename = "TLS.sdkappid")]
    sdkappid: u64,
    #[serde(rename = "TLS.expire")]
    expire: u64,
    #[serde(rename = "TLS.time")]
    time: u64,
    #[serde(rename = "TLS.userbuf", default)]
    userbuf: Option<String>,
    #[serde(rename = "TLS.sig")]
    sig: String,
}

fn content_mac(
    key: &[u8],
    identifier: &str,
    sdkappid: u64,
    time: u64,
    expire: u64,
    userbuf_b64: Option<&str>,
) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(b"TLS.identifier:");
    mac.update(identifier.as_bytes());
    mac.update(b"\nTLS.sdkappid:");
    mac.update(sdkappid.to_string().as_bytes());
    mac.update(b"\nTLS.time:");
    mac.update(time.to_string().as_bytes());
    mac.update(b"\nTLS.expire:");
    mac.update(expire.to_string().as_bytes());
    mac.update(b"\n");
    if let Some(ub) = userbuf_b64 {
        mac.update(b"TLS.userbuf:");
        mac.update(ub.as_bytes());
        mac.update(b"\n");
    }
    mac
}

/// Generates a UserSig for `identifier`, valid from `time` for `expire` seconds.
pub fn generate(
    sdkappid: u64,
    key: &[u8],
    identifier: &str,
    expire: u64,
    time: u64,
    userbuf: Option<&[u8]>,
) -> String {
    let userbuf_b64 = userbuf.map(|b| STANDARD.encode(b));
    let sig = STANDARD.encode(
        content_mac(
            key,
            identifier,
            sdkappid,
            time,
            expire,
            userbuf_b64.as_deref(),
        )
        .finalize()
        .into_bytes(),
    );
    let doc = SigDocOut {
        ver: "2.0",
        identifier,
        sdkappid,
        expire,
        time,
        userbuf: userbuf_b64.as_deref(),
        sig: &sig,
    };
    // Serializing a struct of strings and integers into a Vec cannot fail.
    let json = serde_json::to_vec(&doc).unwrap_or_default();
    let mut enc = ZlibEncoder::new(Vec::with_capacity(json.len()), Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(&json);
    let compressed = enc.finish().unwrap_or_default();
    let mut out = STANDARD.encode(compressed);
    // SAFETY-free byte swap: the alphabet replacement is ASCII for ASCII.
    out = out
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect();
    out
}

/// Decodes a UserSig without checking it (step 5 to 3 reversed).
fn decode(usersig: &str) -> Result<SigDocIn, VerifyError> {
    if usersig.is_empty() || usersig.len() > 2048 {
        return Err(VerifyError::Malformed);
    }
    let std_b64: Vec<u8> = usersig
        .bytes()
        .map(|c| match c {
            b'*' => b'+',
            b'-' => b'/',
            b'_' => b'=',
            c => c,
        })
        .collect();
    let compressed = STANDARD
        .decode(&std_b64)
        .map_err(|_| VerifyError::Malformed)?;
    let mut json = Vec::new();
    ZlibDecoder::new(&compressed[..])
        .take(MAX_INFLATED)
        .read_to_end(&mut json)
        .map_err(|_| VerifyError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| VerifyError::Malformed)
}

/// Verifies `usersig` for the expected app, key and identifier at unix time `now`,
/// with Chat's checks in Chat's order.
pub fn verify(
    usersig: &str,
    sdkappid: u64,
    key: &[u8],
    identifier: &str,
    now: u64,
) -> Result<UserSigInfo, VerifyError> {
    let doc = decode(usersig)?;
    if doc.sdkappid != sdkappid {
        return Err(VerifyError::SdkAppIdMismatch);
    }
    if doc.identifier != identifier {
        return Err(VerifyError::IdentifierMismatch);
    }
    let expected = content_mac(
        key,
        &doc.identifier,
        doc.sdkappid,
        doc.time,
        doc.expire,
        doc.userbuf.as_deref(),
    )
    .finalize()
    .into_bytes();
    let given = STANDARD
        .decode(doc.sig.as_bytes())
        .map_err(|_| VerifyError::SigMismatch)?;
    if given.len() != expected.len() || !bool::from(given.ct_eq(&expected[..])) {
        return Err(VerifyError::SigMismatch);
    }
    let info = UserSigInfo {
        identifier: doc.identifier,
        sdkappid: doc.sdkappid,
        time: doc.time,
        expire: doc.expire,
    };
    if now > info.expires_at() {
        return Err(VerifyError::Expired);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Vectors {
        vectors: Vec<Vector>,
    }
    #[derive(Deserialize)]
    struct Vector {
        sdkappid: u64,
        key: String,
        identifier: String,
        expire: u64,
        time: u64,
        usersig: String,
    }

    fn vectors() -> Vec<Vector> {
        let text = include_str!("../../tests/data/usersig-vectors.json");
        let v: Vectors = serde_json::from_str(text).expect("vectors parse");
        assert!(v.vectors.len() >= 5);
        v.vectors
    }

    #[test]
    fn official_vectors_verify_inside_their_lifetime() {
        for v in vectors() {
            for now in [v.time, v.time + v.expire / 2, v.time + v.expire] {
                let info = verify(&v.usersig, v.sdkappid, v.key.as_bytes(), &v.identifier, now)
                    .unwrap_or_else(|e| panic!("{} at {now}: {e}", v.identifier));
                assert_eq!(info.identifier, v.identifier);
                assert_eq!(info.expires_at(), v.time + v.expire);
            }
        }
    }

    #[test]
    fn official_vectors_rejected_after_expiry_or_for_other_parties() {
        for v in vectors() {
            let k = v.key.as_bytes();
            let t = v.time + 1;
            assert_eq!(
                verify(
                    &v.usersig,
                    v.sdkappid,
                    k,
                    &v.identifier,
                    v.time + v.expire + 1
                ),
                Err(VerifyError::Expired)
            );
            assert_eq!(
                verify(&v.usersig, v.sdkappid, b"another-key", &v.identifier, t),
                Err(VerifyError::SigMismatch)
            );
            assert_eq!(
                verify(&v.usersig, v.sdkappid + 1, k, &v.identifier, t),
                Err(VerifyError::SdkAppIdMismatch)
            );
            assert_eq!(
                verify(&v.usersig, v.sdkappid, k, "someone-else", t),
                Err(VerifyError::IdentifierMismatch)
            );
        }
    }

    #[test]
    fn generated_sig_round_trips_with_and_without_userbuf() {
        let key = b"0123456789abcdef";
        for ub in [None, Some(&b"abc"[..])] {
            let s = generate(1400000000, key, "admin", 86400, 1_700_000_000, ub);
            assert!(!s.contains(['+', '/', '=']), "not URL-safe: {s}");
            let info = verify(&s, 1400000000, key, "admin", 1_700_000_100).expect("verifies");
            assert_eq!(info.time, 1_700_000_000);
            assert_eq!(info.expire, 86400);
        }
    }

    #[test]
    fn tampered_sig_rejected() {
        let key = b"k";
        let s = generate(1, key, "admin", 100, 1000, None);
        // Re-encode the document with a longer lifetime but the old HMAC.
        let mut doc = decode(&s).unwrap();
        doc.expire = 1_000_000;
        let forged = generate_raw_for_test(&doc);
        assert_eq!(
            verify(&forged, 1, key, "admin", 1001),
            Err(VerifyError::SigMismatch)
        );
        // Truncation and garbage.
        assert_eq!(
            verify(&s[..s.len() / 2], 1, key, "admin", 1001),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            verify("not a sig!", 1, key, "admin", 1001),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            verify("", 1, key, "admin", 1001),
            Err(VerifyError::Malformed)
        );
    }

    fn generate_raw_for_test(doc: &SigDocIn) -> String {
        let json = serde_json::json!({
            "TLS.ver": "2.0", "TLS.identifier": doc.identifier, "TLS.sdkappid": doc.sdkappid,
            "TLS.expire": doc.expire, "TLS.time": doc.time, "TLS.sig": doc.sig,
        });
        let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
        enc.write_all(json.to_string().as_bytes()).unwrap();
        STANDARD
            .encode(enc.finish().unwrap())
            .replace('+', "*")
            .replace('/', "-")
            .replace('=', "_")
    }
}
