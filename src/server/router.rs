//! Routing: one match on method and path per listener, a request id, a span and
//! (with `log.access`) an access-log line per request.
//!
//! Each listener serves its own routes: the main one everything; the admin one
//! (`server.admin_listen`) only the probes and `/metrics`; the callback one
//! (`server.callback_listen`) only `POST /callback`. Anything else there is 404.
//!
//! Handlers get the request with its body already read within the listener's
//! limits ([`Listener::body_limits`]): by [`super::http1`] for the connections it
//! serves, by [`route`] for those hyper serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use opentelemetry::KeyValue;

use super::access::{self, RequestLine};
use super::body::{read_bounded, BodyLimits};
use super::handlers;
use super::response::{self, Body, X_REQUEST_ID};
use super::rules;
use super::AppState;
use crate::chat::{commands, reads};
use crate::error::GatewayError;

/// The cached route's path.
pub const GET_LIST_PATH: &str = "/v4/recentcontact/get_list";

/// The longest caller-supplied `x-request-id` we keep; longer ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// The `route` label of `requests_total` for paths other than get_list.
fn route_label(path: &str) -> Option<&'static str> {
    Some(match path {
        GET_LIST_PATH => return None,
        "/healthz" | "/readyz" => "health",
        "/metrics" => "metrics",
        "/quitquitquit" => "quit",
        "/callback" => "callback",
        p if p.starts_with("/admin/") => "admin",
        p if commands::command_of_path(p).is_some_and(|c| reads::item_row(c).is_some()) => "items",
        p if p.starts_with("/v4/") => "passthrough",
        _ => "other",
    })
}

/// The caller's `x-request-id` if it is sane (1 to 128 visible ASCII characters).
pub fn caller_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_REQUEST_ID && value.iter().all(|c| c.is_ascii_graphic())
}

/// A fresh request id as a header value.
pub fn fresh_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&fresh_request_id_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A fresh request id: 16 hex digits from a per-thread generator (no system call,
/// no formatting machinery, no allocation).
pub fn fresh_request_id_bytes() -> [u8; 16] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(rand::random::<u64>() | 1);
    }
    // xorshift64*: fast, and ids need to be distinct, not secret.
    let n = STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    });
    hex16(n)
}

/// `n` as 16 lowercase hex digits, most significant first, eight at a time: each
/// half's nibbles are spread to one byte each, then turned into digits or letters
/// all at once (no table, no loop).
fn hex16(n: u64) -> [u8; 16] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let half = |x: u64| -> [u8; 8] {
        // 0x0000_0000_abcd_efgh -> 0x0a0b_0c0d_0e0f_0g0h (one nibble per byte).
        let x = (x | x << 16) & 0x0000_ffff_0000_ffff;
        let x = (x | x << 8) & 0x00ff_00ff_00ff_00ff;
        let x = (x | x << 4) & 0x0f0f_0f0f_0f0f_0f0f;
        // 1 in each byte that is 10 or more (no carry: each byte is at most 0x15).
        let letters = ((x + 6 * ONES) >> 4) & ONES;
        (x + u64::from(b'0') * ONES + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
    };
    let (hi, lo) = (half(n >> 32), half(n & 0xffff_ffff));
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&hi);
    buf[8..].copy_from_slice(&lo);
    buf
}

/// The caller's `x-request-id` if it is sane, else a fresh one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if caller_request_id(v.as_bytes()) => v.clone(),
        _ => fresh_request_id(),
    }
}

/// The listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `server.listen`: every route.
    Main,
    /// `server.admin_listen`: `/healthz`, `/readyz`, `/metrics`.
    Admin,
    /// `server.callback_listen`: `POST /callback`.
    Callback,
}

impl Listener {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Main => "main",
            Listener::Admin => "admin",
            Listener::Callback => "callback",
        }
    }

    /// How much body, for how long, requests on this listener may send.
    pub fn body_limits(self, state: &AppState) -> BodyLimits {
        match self {
            Listener::Callback => state.callback_body_limits(),
            Listener::Main | Listener::Admin => state.body_limits(),
        }
    }
}

/// Routes one request of a connection hyper serves (HTTP/2): checks its target as
/// [`rules`] says, reads its body within the listener's limits, then [`handle`]s it.
/// Never fails: every failure is a response.
pub async fn route(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: Listener,
) -> Response<Body> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    // The target rules every HTTP/1.x request is held to hold for HTTP/2 as well.
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Err(refusal) = rules::check_target(parts.method.as_str().as_bytes(), target.as_bytes()) {
        return response::refused(refusal);
    }
    let limits = listener.body_limits(&state);
    let body = read_bounded(&parts.headers, body, limits.max_bytes, limits.timeout).await;
    handle(state, parts, body, peer, listener, started).await
}

/// Routes one request whose body has been read (or failed to be): request id, span,
/// trace, metrics, access log, and the listener's routes. Never fails.
pub async fn handle(
    state: Arc<AppState>,
    mut parts: Parts,
    body: Result<Bytes, GatewayError>,
    peer: SocketAddr,
    listener: Listener,
    started: Instant,
) -> Response<Body> {
    let rid = request_id(&parts.headers);
    let path = parts.uri.path();
    // Probes and scrapes are not traced: they would drown the traces that matter.
    let trace = match path {
        "/healthz" | "/readyz" | "/metrics" => None,
        _ => crate::trace::begin_from(&parts.headers),
    };
    let mut access = match access::get() {
        Some(log) if state.settings.log.access => Some((
            log,
            RequestLine::new(&parts, peer, listener.as_str(), started),
        )),
        _ => None,
    };
    let id = rid.to_str().unwrap_or("");
    // The get_list route's span is at debug level: a cache hit logs nothing, and an
    // enabled span costs a formatted allocation per request on the hot path. Its miss
    // path opens an info-level span with the same request id (see get_list.rs).
    let span = if path == GET_LIST_PATH {
        tracing::debug_span!("request", request_id = id, method = %parts.method, path = GET_LIST_PATH, trace_id = tracing::field::Empty)
    } else {
        tracing::info_span!("request", request_id = id, method = %parts.method, path, trace_id = tracing::field::Empty)
    };
    // get_list counts its own outcomes (hit, miss, ...) with pre-resolved handles.
    let route = route_label(path);
    let mut active = None;
    if let Some(t) = &trace {
        let trace_id = crate::trace::LogTraceId(t.trace_id);
        span.record("trace_id", tracing::field::display(trace_id));
        if let Some((_, line)) = &mut access {
            line.trace_id = Some(t.trace_id);
        }
        active = t.start(
            span_name(&parts.method, path),
            crate::trace::wall_clock_at(started),
            parts.headers.get("tracestate").map(|v| v.as_bytes()),
            vec![
                KeyValue::new("http.request.method", parts.method.to_string()),
                KeyValue::new("url.path", path.chars().take(256).collect::<String>()),
                KeyValue::new("chat_gateway.request_id", id.to_string()),
                KeyValue::new("chat_gateway.listener", listener.as_str()),
            ],
        );
        parts.extensions.insert(trace_id);
    }
    let path = parts.uri.path();
    let mut resp = match body {
        Err(e) if path == GET_LIST_PATH && listener == Listener::Main => {
            handlers::get_list::refuse(&state, e)
        }
        Err(e) => e.respond(),
        Ok(body) => {
            let req = Request::from_parts(parts, body);
            match listener {
                Listener::Main => {
                    crate::trace::within(
                        active.as_ref(),
                        dispatch(state, req, peer, &rid).instrument(span),
                    )
                    .await
                }
                Listener::Admin => dispatch_admin(&state, &req),
                Listener::Callback => {
                    crate::trace::within(
                        active.as_ref(),
                        dispatch_callback(state, req).instrument(span),
                    )
                    .await
                }
            }
        }
    };
    if let Some(route) = route {
        let outcome = if resp.status().is_success() {
            "ok"
        } else {
            "error"
        };
        crate::metrics::request(route, outcome);
    }
    if let Some(a) = active {
        let status = resp.status().as_u16();
        let mut attributes = vec![KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        )];
        if let Some(c) = resp
            .headers()
            .get(response::X_CACHE)
            .and_then(|v| v.to_str().ok())
        {
            attributes.push(KeyValue::new("chat_gateway.cache", c.to_string()));
        }
        if let Some(code) = resp
            .extensions()
            .get::<access::AccessInfo>()
            .and_then(|i| i.code)
        {
            attributes.push(KeyValue::new("chat.error_code", code));
        }
        a.end(attributes, status >= 500);
    }
    if let Some((log, line)) = access {
        line.write(log, &resp, &rid);
    }
    resp.headers_mut().insert(X_REQUEST_ID, rid);
    resp
}

/// A server span's name: the method and the route (`POST /v4/openim/sendmsg`); the
/// method alone for paths that are no route (their number has no bound).
fn span_name(method: &Method, path: &str) -> String {
    let route = matches!(
        path,
        GET_LIST_PATH | "/callback" | "/admin/cache/invalidate" | "/quitquitquit"
    ) || commands::command_of_path(path).is_some();
    if route && path.len() <= 128 {
        format!("{method} {path}")
    } else {
        method.to_string()
    }
}

/// The admin listener: the probes and `/metrics`, open to anyone who reaches it.
fn dispatch_admin(state: &AppState, req: &Request<Bytes>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => handlers::health::healthz(),
        (&Method::GET, "/readyz") => handlers::health::readyz(state),
        (&Method::GET, "/metrics") => handlers::metrics::render(state),
        (_, "/healthz" | "/readyz" | "/metrics") => GatewayError::MethodNotAllowed("GET").respond(),
        (_, path) => GatewayError::NotFound(path.to_string()).respond(),
    }
}

/// The callback listener: `POST /callback`.
async fn dispatch_callback(state: Arc<AppState>, req: Request<Bytes>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/callback") => handlers::callback::handle(state, req).await,
        (_, "/callback") => GatewayError::MethodNotAllowed("POST").respond(),
        (_, path) => GatewayError::NotFound(path.to_string()).respond(),
    }
}

async fn dispatch(
    state: Arc<AppState>,
    req: Request<Bytes>,
    peer: SocketAddr,
    rid: &HeaderValue,
) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    let server = &state.settings.server;
    if state.auth_required
        && !super::auth::is_open(path, server.protect_metrics)
        && !state
            .caller_tokens
            .authorized(&state.secrets.auth_tokens, req.headers())
    {
        // Never log the header: it may hold a real token with a typo.
        tracing::debug!(%peer, "caller not authorized");
        return GatewayError::Unauthorized.respond();
    }
    if let Some(command) = commands::command_of_path(path) {
        if !state.route_allowed(command) {
            tracing::info!(command, "command refused by routes.allow / routes.deny");
            return GatewayError::RouteDenied(command.to_string()).respond();
        }
    }
    match (method, path) {
        (&Method::POST, GET_LIST_PATH) => handlers::get_list::handle(state, req, rid).await,
        (_, GET_LIST_PATH) => GatewayError::MethodNotAllowed("POST").respond(),
        (&Method::GET, "/healthz") => handlers::health::healthz(),
        (&Method::GET, "/readyz") => handlers::health::readyz(&state),
        (&Method::GET, "/metrics") => handlers::metrics::render(&state),
        (&Method::POST, "/quitquitquit") => handlers::health::quit(&state, peer),
        (_, "/healthz" | "/readyz" | "/metrics") => GatewayError::MethodNotAllowed("GET").respond(),
        (_, "/quitquitquit") => GatewayError::MethodNotAllowed("POST").respond(),
        (&Method::POST, "/admin/cache/invalidate") => handlers::admin::invalidate(state, req).await,
        (_, "/admin/cache/invalidate") => GatewayError::MethodNotAllowed("POST").respond(),
        (&Method::POST, "/callback") => handlers::callback::handle(state, req).await,
        (_, "/callback") => GatewayError::MethodNotAllowed("POST").respond(),
        _ => match commands::command_of_path(path) {
            Some(command) if method == Method::POST => {
                let command = command.to_string();
                match reads::item_row(&command) {
                    Some((row, _)) => handlers::items::handle(state, req, &command, row, rid).await,
                    None => handlers::passthrough::handle(state, req, &command).await,
                }
            }
            Some(_) => GatewayError::MethodNotAllowed("POST").respond(),
            None => GatewayError::NotFound(path.to_string()).respond(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_sixteen_hex_digits() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xabcdef,
            u64::MAX,
            1 << 63,
            0x0123_4567_89ab_cdef,
        ]
        .into_iter()
        .chain(std::iter::repeat_with(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }))
        .take(10_000)
        {
            assert_eq!(hex16(n), format!("{n:016x}").as_bytes(), "{n:#x}");
        }
        let (a, b) = (fresh_request_id_bytes(), fresh_request_id_bytes());
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
