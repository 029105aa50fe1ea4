//! `/healthz`, `/readyz` and `/quitquitquit`.

use std::net::SocketAddr;

use http::{Response, StatusCode};

use crate::error::GatewayError;
use crate::server::response::{self, Body};
use crate::server::AppState;

/// The process is alive and serving.
pub fn healthz() -> Response<Body> {
    response::text(StatusCode::OK, "ok\n")
}

/// Ready to take traffic: config valid (it is, or we would not run) and the signer
/// holds a UserSig. Deliberately does not depend on Chat being reachable, so a Chat
/// outage does not take every sidecar out of its Service.
pub fn readyz(state: &AppState) -> Response<Body> {
    let sig = state.upstream.signer().usersig();
    if sig.sig.is_empty() {
        return response::text(StatusCode::SERVICE_UNAVAILABLE, "signer not ready\n");
    }
    response::text(StatusCode::OK, "ready\n")
}

/// Starts the graceful shutdown, for Jobs whose main container has finished. Only
/// loopback callers may ask (an IPv4 caller reaching a dual-stack `[::]` listener
/// arrives as `::ffff:127.0.0.1`: loopback too).
pub fn quit(state: &AppState, peer: SocketAddr) -> Response<Body> {
    if !peer.ip().to_canonical().is_loopback() {
        return GatewayError::LoopbackOnly.respond();
    }
    state.quit.notify_one();
    response::text(StatusCode::OK, "shutting down\n")
}
