//! `[tracing]`: OpenTelemetry traces exported over OTLP/HTTP (protobuf). Without
//! `tracing.endpoint` tracing is off and costs nothing.

use std::time::Duration;

use serde::Serialize;

use super::raw::RawTracing;
use super::ConfigError;

/// Most spans the export queue may hold.
const MAX_QUEUE: u64 = 1_000_000;

/// `[tracing]`, present when `tracing.endpoint` is set.
#[derive(Debug, Clone, Serialize)]
pub struct TracingSettings {
    /// The OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces` (used as
    /// given: no path is appended).
    pub endpoint: String,
    /// The share of new traces (requests without a sampled `traceparent`) that are
    /// recorded; a caller's `traceparent` decides for its own requests.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Spans waiting for export at most; past it spans are dropped (and counted).
    pub max_queue_spans: usize,
    /// Spans per export request at most.
    pub max_batch_spans: usize,
    /// How long a span waits at most before its batch is sent.
    #[serde(with = "super::settings::millis", rename = "export_interval_ms")]
    pub export_interval: Duration,
    /// Deadline of one export request.
    #[serde(with = "super::settings::millis", rename = "export_timeout_ms")]
    pub export_timeout: Duration,
}

/// Validates `[tracing]`: `None` when `endpoint` is not set.
pub fn from_raw(raw: RawTracing) -> Result<Option<TracingSettings>, ConfigError> {
    let Some(endpoint) = raw.endpoint else {
        return Ok(None);
    };
    let endpoint = endpoint.trim().to_string();
    check_endpoint(&endpoint).map_err(|why| ConfigError::invalid("tracing.endpoint", why))?;
    if !(0.0..=1.0).contains(&raw.sample_ratio) {
        return Err(ConfigError::invalid(
            "tracing.sample_ratio",
            "must be a number from 0.0 to 1.0",
        ));
    }
    let name = raw.service_name.trim();
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(ConfigError::invalid(
            "tracing.service_name",
            "must be 1 to 255 bytes with no control characters",
        ));
    }
    if !(1..=MAX_QUEUE).contains(&raw.max_queue_spans) {
        return Err(ConfigError::invalid(
            "tracing.max_queue_spans",
            format!("must be 1 to {MAX_QUEUE}"),
        ));
    }
    if raw.max_batch_spans == 0 || raw.max_batch_spans > raw.max_queue_spans {
        return Err(ConfigError::invalid(
            "tracing.max_batch_spans",
            "must be 1 to tracing.max_queue_spans",
        ));
    }
    let ms = |key: &str, v: u64| match v {
        1..=3_600_000 => Ok(Duration::from_millis(v)),
        _ => Err(ConfigError::invalid(key, "must be 1 to 3600000 ms")),
    };
    Ok(Some(TracingSettings {
        endpoint,
        sample_ratio: raw.sample_ratio,
        service_name: name.to_string(),
        max_queue_spans: raw.max_queue_spans as usize,
        max_batch_spans: raw.max_batch_spans as usize,
        export_interval: ms("tracing.export_interval_ms", raw.export_interval_ms)?,
        export_timeout: ms("tracing.export_timeout_ms", raw.export_timeout_ms)?,
    }))
}

/// The settings as the file's keys (the defaults when tracing is off).
pub fn to_raw(t: Option<&TracingSettings>) -> RawTracing {
    match t {
        None => RawTracing::default(),
        Some(t) => RawTracing {
            endpoint: Some(t.endpoint.clone()),
            sample_ratio: t.sample_ratio,
            service_name: t.service_name.clone(),
            max_queue_spans: t.max_queue_spans as u64,
            max_batch_spans: t.max_batch_spans as u64,
            export_interval_ms: t.export_interval.as_millis() as u64,
            export_timeout_ms: t.export_timeout.as_millis() as u64,
        },
    }
}

/// An `http://` or `https://` URL with a host, and no user name or password (a
/// collector that needs credentials gets them through `OTEL_EXPORTER_OTLP_HEADERS`,
/// never in a URL that is printed).
fn check_endpoint(s: &str) -> Result<(), String> {
    let u = url::Url::parse(s)
        .map_err(|e| format!("not a URL like http://127.0.0.1:4318/v1/traces ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("must start with http:// or https://".into());
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "must not hold a user name or password (use OTEL_EXPORTER_OTLP_HEADERS)".into(),
        );
    }
    if u.fragment().is_some() {
        return Err("must have no fragment".into());
    }
    if s.parse::<http::Uri>().is_err() {
        return Err("is not a valid HTTP URI".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(endpoint: &str) -> RawTracing {
        RawTracing {
            endpoint: Some(endpoint.into()),
            ..RawTracing::default()
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        assert!(from_raw(RawTracing::default()).unwrap().is_none());
    }

    #[test]
    fn endpoints() {
        for ok in [
            "http://127.0.0.1:4318/v1/traces",
            "https://collector.example:4318/v1/traces",
            "http://otel/",
        ] {
            assert!(from_raw(raw(ok)).unwrap().is_some(), "{ok}");
        }
        for bad in [
            "127.0.0.1:4318",
            "grpc://x:4317",
            "http://user:pw@x/v1/traces",
            "http://user@x/v1/traces",
            "http:///v1/traces",
            "http://x/v1/traces#a",
        ] {
            let e = from_raw(raw(bad)).unwrap_err().to_string();
            assert!(e.contains("tracing.endpoint"), "{bad}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn bounds() {
        let mut r = raw("http://x/v1/traces");
        r.sample_ratio = 1.5;
        assert!(from_raw(r)
            .unwrap_err()
            .to_string()
            .contains("sample_ratio"));
        let mut r = raw("http://x/v1/traces");
        r.max_batch_spans = 5000;
        assert!(from_raw(r)
            .unwrap_err()
            .to_string()
            .contains("max_batch_spans"));
        let mut r = raw("http://x/v1/traces");
        r.max_queue_spans = 0;
        assert!(from_raw(r)
            .unwrap_err()
            .to_string()
            .contains("max_queue_spans"));
        let mut r = raw("http://x/v1/traces");
        r.export_timeout_ms = 0;
        assert!(from_raw(r)
            .unwrap_err()
            .to_string()
            .contains("export_timeout_ms"));
    }

    #[test]
    fn round_trips() {
        let t = from_raw(raw("http://x:4318/v1/traces")).unwrap();
        let back = from_raw(to_raw(t.as_ref())).unwrap().unwrap();
        assert_eq!(back.endpoint, "http://x:4318/v1/traces");
        assert_eq!(back.max_queue_spans, 2048);
    }
}
