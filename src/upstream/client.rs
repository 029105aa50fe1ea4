//! The pooled HTTPS client to Chat: rustls with the bundled web PKI roots plus
//! `chat.ca_file`, HTTP/2 by ALPN where offered and HTTP/1.1 keep-alive otherwise.
//! It sends exactly one request per call; retrying is [`super::retry`]'s job.

use std::fmt::Write as _;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::signer::Signer;
use crate::chat::envelope::{self, Status};

/// The largest answer we read from Chat. A conversation page is a few tens of KiB.
pub const MAX_UPSTREAM_BODY: usize = 8 * 1024 * 1024;

/// Whether a failed request can have reached Chat: the fact every retry decision of a
/// write depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Failed before any byte of the request was sent (DNS, connect, TLS handshake).
    NotSent,
    /// May have been received and processed (timeout, reset mid-request, bad answer).
    MaybeSent,
}

/// A failure to get an answer from Chat.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    /// Whether Chat may have seen the request.
    pub reach: Reach,
    /// Whether the failure was the deadline running out.
    pub timeout: bool,
    /// What happened, with the underlying cause chain (never any secret).
    pub message: String,
}

/// One answer from Chat.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// HTTP status (Chat answers 200 for every application-level outcome).
    pub status: StatusCode,
    /// The body, byte for byte.
    pub body: Bytes,
    /// `ActionStatus`/`ErrorCode`, when the body is an envelope.
    pub chat: Option<Status>,
    /// The answer's `content-type`, for logging answers that are not envelopes.
    pub content_type: Option<http::HeaderValue>,
}

/// The pooled client plus what it needs to build Chat URLs.
pub struct ChatClient {
    /// Pooled connections, shared by all requests.
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `?sdkappid=..&identifier=..&usersig=` prefix, built once.
    query_prefix: String,
    /// Issues the admin UserSig.
    signer: Arc<Signer>,
}

impl std::fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatClient")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// Builds the rustls config: web PKI roots plus the PEM certificates in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    tls_config_for("chat.ca_file", ca_file)
}

/// [`tls_config`] for the config key `key` (named in errors).
pub fn tls_config_for(key: &str, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let file =
            std::fs::File::open(path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert = cert.map_err(|e| format!("{key} {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{key} {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "{key} {}: no PEM certificate found",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass as is).
pub fn encode_query_value(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

impl ChatClient {
    /// A client that signs as `signer` and trusts the web PKI plus `ca_file`.
    pub fn new(
        sdkappid: u64,
        signer: Arc<Signer>,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let tls = tls_config(ca_file)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let mut query_prefix = format!("?sdkappid={sdkappid}&identifier=");
        encode_query_value(&mut query_prefix, signer.identifier());
        query_prefix.push_str("&usersig=");
        Ok(ChatClient {
            http: client,
            query_prefix,
            signer,
        })
    }

    /// The signer, for renewals.
    pub fn signer(&self) -> &Arc<Signer> {
        &self.signer
    }

    /// The full URL of `command` at `base`, with a fresh `random`.
    pub fn url(&self, base: &str, command: &str) -> String {
        let sig = self.signer.usersig();
        let random: u32 = rand::random();
        let mut url = String::with_capacity(base.len() + command.len() + 400);
        url.push_str(base);
        url.push_str("/v4/");
        url.push_str(command);
        url.push_str(&self.query_prefix);
        url.push_str(&sig.sig);
        let _ = write!(url, "&random={random}&contenttype=json");
        url
    }

    /// Sends one `POST` of `body` to `command` at `base` and reads the answer, all
    /// before `deadline`.
    pub async fn send(
        &self,
        base: &str,
        command: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<UpstreamResponse, TransportError> {
        let url = self.url(base, command);
        let req = Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| TransportError {
                reach: Reach::NotSent,
                timeout: false,
                message: format!("could not build the request: {e}"),
            })?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|e| {
                let reach = if e.is_connect() {
                    Reach::NotSent
                } else {
                    Reach::MaybeSent
                };
                TransportError {
                    reach,
                    timeout: false,
                    message: error_chain(&e),
                }
            })?;
            let status = resp.status();
            let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
            let body = Limited::new(resp.into_body(), MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| TransportError {
                    reach: Reach::MaybeSent,
                    timeout: false,
                    message: format!("reading Chat's answer: {e}"),
                })?
                .to_bytes();
            let chat = envelope::parse_status(&body);
            Ok(UpstreamResponse {
                status,
                body,
                chat,
                content_type,
            })
        };
        match tokio::time::timeout(remaining, exchange).await {
            Ok(r) => r,
            Err(_) => Err(TransportError {
                reach: Reach::MaybeSent,
                timeout: true,
                message: "Chat did not answer before the deadline".into(),
            }),
        }
    }
}

/// An error and its causes, joined with `: ` (hyper's top-level message alone says
/// little; the TLS reason is in the chain).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
