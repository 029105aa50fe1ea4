//! Chat's response envelope and what each `ErrorCode` means to a gateway.

use bytes::Bytes;
use serde::Deserialize;

/// The two fields of an answer that decide what the gateway does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// `ActionStatus == "OK"`.
    pub ok: bool,
    /// `ErrorCode` (0 on success).
    pub code: i64,
}

impl Status {
    /// A success: `ActionStatus` OK and `ErrorCode` 0. Only these are ever cached.
    pub fn is_success(self) -> bool {
        self.ok && self.code == 0
    }
}

#[derive(Deserialize)]
struct StatusDoc<'a> {
    #[serde(rename = "ActionStatus", borrow, default)]
    action_status: Option<&'a str>,
    #[serde(rename = "ErrorCode", default)]
    error_code: Option<i64>,
}

/// Reads `ActionStatus` and `ErrorCode` from an answer body without building a
/// `serde_json::Value`. `None` when the body is not a JSON object with them.
pub fn parse_status(body: &[u8]) -> Option<Status> {
    let doc: StatusDoc<'_> = serde_json::from_slice(body).ok()?;
    let code = doc.error_code?;
    Some(Status {
        ok: doc.action_status == Some("OK"),
        code,
    })
}

/// How a gateway should treat an upstream `ErrorCode`: the one table every retry
/// and renewal decision reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// 0: success.
    Success,
    /// 50004 (internal error) and 50005 (timeout): transient, the request may have been
    /// processed; retried for reads only.
    Transient,
    /// Chat's throttling codes (60007, 60011, 60018, 60019, 70050).
    Throttled,
    /// The UserSig was refused (70001 expired, 70003 unparsable, 70009 bad signature):
    /// renew it.
    SigRejected,
    /// Anything else: the caller's or the configuration's problem; returned as is.
    Final,
}

impl CodeClass {
    /// Classifies an `ErrorCode`.
    pub fn of(code: i64) -> CodeClass {
        match code {
            0 => CodeClass::Success,
            50004 | 50005 => CodeClass::Transient,
            60007 | 60011 | 60018 | 60019 | 70050 => CodeClass::Throttled,
            70001 | 70003 | 70009 => CodeClass::SigRejected,
            _ => CodeClass::Final,
        }
    }
}

/// Builds `{"ActionStatus":"FAIL","ErrorCode":code,"ErrorInfo":info}`.
pub fn fail_body(code: i64, info: &str) -> Bytes {
    let v = serde_json::json!({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": info});
    Bytes::from(v.to_string())
}

/// Builds `{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}` plus extra fields.
pub fn ok_body(extra: serde_json::Value) -> Bytes {
    let mut v = serde_json::json!({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""});
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_classifies() {
        let s =
            parse_status(br#"{"SessionItem":[],"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#)
                .unwrap();
        assert!(s.is_success());
        let f =
            parse_status(br#"{"ActionStatus":"FAIL","ErrorCode":50004,"ErrorInfo":"x"}"#).unwrap();
        assert!(!f.is_success());
        assert_eq!(CodeClass::of(f.code), CodeClass::Transient);
        assert_eq!(parse_status(b"not json"), None);
        assert_eq!(parse_status(br#"{"ActionStatus":"OK"}"#), None);
        assert_eq!(CodeClass::of(70050), CodeClass::Throttled);
        assert_eq!(CodeClass::of(50001), CodeClass::Final);
    }

    #[test]
    fn fail_body_escapes() {
        let b = fail_body(50002, "bad \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["ErrorCode"], 50002);
        assert_eq!(v["ErrorInfo"], "bad \"x\"");
        assert_eq!(v["ActionStatus"], "FAIL");
    }
}
