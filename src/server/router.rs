//! Routing: one match on method and path per listener, a request id, a span and
//! (with `log.access`) an access-log line per request.
//!
//! Each listener serves its own routes: the main one everything; the admin one
//! (`server.admin_listen`) only the probes and `/metrics`; the callback one
//! (`server.callback_listen`) only `POST /callback`. Anything else there is 404.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use super::access::RequestLine;
use super::auth;
use super::handlers;
use super::response::{Body, X_REQUEST_ID};
use super::AppState;
use crate::chat::commands;
use crate::error::GatewayError;

/// The cached route's path.
const GET_LIST_PATH: &str = "/v4/recentcontact/get_list";

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
        p if p.starts_with("/v4/") => "passthrough",
        _ => "other",
    })
}

/// The caller's `x-request-id` if it is sane, else a fresh random one.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
    if let Some(v) = req.headers().get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let n: u64 = rand::random();
    let mut buf = [0u8; 16];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in buf.iter_mut().enumerate() {
        *slot = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
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
}

/// Routes one request. Never fails: every failure is a response.
pub async fn route(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    listener: Listener,
) -> Response<Body> {
    let rid = request_id(&req);
    let access = state
        .settings
        .log
        .access
        .then(|| RequestLine::new(&req, peer, listener.as_str()));
    let id = rid.to_str().unwrap_or("");
    // The get_list route's span is at debug level: a cache hit logs nothing, and an
    // enabled span costs a formatted allocation per request on the hot path. Its miss
    // path opens an info-level span with the same request id (see get_list.rs).
    let span = if req.uri().path() == GET_LIST_PATH {
        tracing::debug_span!("request", request_id = id, method = %req.method(), path = GET_LIST_PATH)
    } else {
        tracing::info_span!("request", request_id = id, method = %req.method(), path = req.uri().path())
    };
    // get_list counts its own outcomes (hit, miss, ...) with pre-resolved handles.
    let route = route_label(req.uri().path());
    let mut resp = match listener {
        Listener::Main => dispatch(state, req, peer, &rid).instrument(span).await,
        Listener::Admin => dispatch_admin(&state, &req),
        Listener::Callback => dispatch_callback(state, req).instrument(span).await,
    };
    if let Some(route) = route {
        let outcome = if resp.status().is_success() {
            "ok"
        } else {
            "error"
        };
        crate::metrics::request(route, outcome);
    }
    if let Some(line) = access {
        line.write(&resp, &rid);
    }
    resp.headers_mut().insert(X_REQUEST_ID, rid);
    resp
}

/// The admin listener: the probes and `/metrics`, open to anyone who reaches it.
fn dispatch_admin(state: &AppState, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => handlers::health::healthz(),
        (&Method::GET, "/readyz") => handlers::health::readyz(state),
        (&Method::GET, "/metrics") => handlers::metrics::render(state),
        (_, "/healthz" | "/readyz" | "/metrics") => GatewayError::MethodNotAllowed("GET").respond(),
        (_, path) => GatewayError::NotFound(path.to_string()).respond(),
    }
}

/// The callback listener: `POST /callback`, with its own body limits.
async fn dispatch_callback(state: Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/callback") => {
            let limits = state.callback_body_limits();
            handlers::callback::handle(state, req, limits).await
        }
        (_, "/callback") => GatewayError::MethodNotAllowed("POST").respond(),
        (_, path) => GatewayError::NotFound(path.to_string()).respond(),
    }
}

async fn dispatch(
    state: Arc<AppState>,
    req: Request<Incoming>,
    peer: SocketAddr,
    rid: &HeaderValue,
) -> Response<Body> {
    let path = req.uri().path();
    let method = req.method();
    let server = &state.settings.server;
    if state.auth_required
        && !auth::is_open(path, server.protect_metrics)
        && !auth::authorized(&state.secrets.auth_tokens.load(), req.headers())
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
        (&Method::POST, "/callback") => {
            let limits = state.body_limits();
            handlers::callback::handle(state, req, limits).await
        }
        (_, "/callback") => GatewayError::MethodNotAllowed("POST").respond(),
        _ => match commands::command_of_path(path) {
            Some(command) if method == Method::POST => {
                let command = command.to_string();
                handlers::passthrough::handle(state, req, &command).await
            }
            Some(_) => GatewayError::MethodNotAllowed("POST").respond(),
            None => GatewayError::NotFound(path.to_string()).respond(),
        },
    }
}
