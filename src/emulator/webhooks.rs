//! Chat's third-party callbacks, fired after a change: `POST
//! <callback_url>?SdkAppid=..&CallbackCommand=..&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI`
//! plus `&Sign=<hex sha256(token + RequestTime)>&RequestTime=<unix>` when a token is
//! set (`OptPlatform` is the client's platform for changes made "from a client").
//! Each is sent from its own task, so the API answer never waits for it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::stats::Stats;

/// How long one webhook may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Webhooks the log keeps (the oldest go first).
pub(crate) const LOG_CAPACITY: usize = 10_000;

/// Every webhook the emulator's changes produced, newest last, numbered from 1:
/// `GET /__emulator/webhooks?since=<n>` reads it. A webhook is logged when the
/// change is made (before the API answers), whether or not a callback URL is set,
/// so a test can tell synchronously which webhooks a write produced.
#[derive(Debug, Default)]
pub(crate) struct HookLog {
    entries: VecDeque<(u64, Value)>,
    next: u64,
}

impl HookLog {
    /// Appends one webhook: its command, OptPlatform and body.
    pub(crate) fn push(&mut self, command: &str, platform: &str, body: &Value) {
        self.next += 1;
        if self.entries.len() == LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back((
            self.next,
            serde_json::json!({
                "Seq": self.next,
                "CallbackCommand": command,
                "OptPlatform": platform,
                "Body": body,
            }),
        ));
    }

    /// The webhooks numbered above `since`, and the number of the newest.
    pub(crate) fn since(&self, since: u64) -> (Vec<Value>, u64) {
        let list = self
            .entries
            .iter()
            .filter(|(n, _)| *n > since)
            .map(|(_, v)| v.clone())
            .collect();
        (list, self.next)
    }
}

/// Checks a callback URL: plain `http://` with a host (the emulator is loopback
/// tooling; TLS is the real Chat's business).
pub(crate) fn parse_callback_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("callback_url {url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "callback_url {url:?} must be a plain http:// URL with a host"
        ));
    }
    Ok(uri)
}

/// `Sign`: lowercase hex of SHA-256 of `token + request_time`.
pub(crate) fn sign(token: &str, request_time: u64) -> String {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update(request_time.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// The webhook sender.
pub(crate) struct Webhooks {
    /// The callback URL as configured.
    target: String,
    /// The callback URL followed by `?` or `&`, ready for the query.
    base: String,
    token: Option<String>,
    sdkappid: u64,
    client: Client<HttpConnector, Full<Bytes>>,
    stats: Arc<Stats>,
}

impl Webhooks {
    /// A sender to `url` for app `sdkappid`, signing with `token` when set.
    pub(crate) fn new(
        url: &str,
        token: Option<String>,
        sdkappid: u64,
        stats: Arc<Stats>,
    ) -> Result<Webhooks, String> {
        parse_callback_url(url)?;
        let url = url.split('#').next().unwrap_or(url);
        let sep = if url.contains('?') { '&' } else { '?' };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(TIMEOUT));
        Ok(Webhooks {
            target: url.to_owned(),
            base: format!("{url}{sep}"),
            token: token.filter(|t| !t.is_empty()),
            sdkappid,
            client: Client::builder(TokioExecutor::new()).build(connector),
            stats,
        })
    }

    /// The callback URL.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Whether webhooks carry `Sign` (a token is set).
    pub(crate) fn signed(&self) -> bool {
        self.token.is_some()
    }

    /// The full URL for `command` from a REST call at unix time `now`.
    #[cfg(test)]
    pub(crate) fn url(&self, command: &str, now: u64) -> String {
        self.url_as(command, now, "RESTAPI")
    }

    /// The full URL for `command` at unix time `now` with `OptPlatform=platform`.
    pub(crate) fn url_as(&self, command: &str, now: u64, platform: &str) -> String {
        let mut url = format!(
            "{}SdkAppid={}&CallbackCommand={}&contenttype=json&ClientIP=127.0.0.1&OptPlatform={}",
            self.base, self.sdkappid, command, platform
        );
        if let Some(token) = &self.token {
            url.push_str(&format!("&Sign={}&RequestTime={now}", sign(token, now)));
        }
        url
    }

    /// Sends `body` for `command` with `OptPlatform=platform` from a new task; the
    /// outcome only shows in stats and the log.
    pub(crate) fn fire_as(
        self: &Arc<Self>,
        command: &'static str,
        body: Value,
        now: u64,
        platform: &str,
    ) {
        let this = Arc::clone(self);
        let url = this.url_as(command, now, platform);
        tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri(&url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string())));
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook request could not be built");
                    this.stats.webhook(false);
                    return;
                }
            };
            match tokio::time::timeout(TIMEOUT, this.client.request(req)).await {
                Ok(Ok(resp)) => {
                    tracing::debug!(command, status = %resp.status(), "webhook delivered");
                    this.stats.webhook(true);
                }
                Ok(Err(e)) => {
                    tracing::warn!(command, error = %e, "webhook failed");
                    this.stats.webhook(false);
                }
                Err(_) => {
                    tracing::warn!(command, "webhook timed out");
                    this.stats.webhook(false);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_the_documented_example() {
        assert_eq!(
            sign("xxxxyyyy", 1669872112),
            "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
        );
    }

    #[test]
    fn urls_carry_the_query() {
        let stats = Arc::new(Stats::new(1));
        let w = Webhooks::new("http://127.0.0.1:1/cb", Some("t".into()), 7, stats.clone()).unwrap();
        let u = w.url("C2C.CallbackAfterSendMsg", 100);
        assert!(u.starts_with("http://127.0.0.1:1/cb?SdkAppid=7&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign="));
        assert!(u.ends_with("&RequestTime=100"));
        let w = Webhooks::new("http://h/cb?x=1", None, 7, stats).unwrap();
        assert!(w.url("X", 1).starts_with("http://h/cb?x=1&SdkAppid=7"));
        assert!(!w.url("X", 1).contains("Sign"));
        assert!(parse_callback_url("https://h/").is_err());
        assert!(parse_callback_url("/relative").is_err());
    }
}
