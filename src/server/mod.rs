//! The HTTP server: the accept loop ([`listener`]), routing ([`router`]) and one
//! handler per route ([`handlers`]).

pub mod auth;
pub mod body;
pub mod handlers;
pub mod listener;
pub mod response;
pub mod router;
pub mod state;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use state::AppState;

/// Connections accepted past `server.max_connections` for the health probes, so
/// that `/healthz` and `/readyz` answer even when slow or idle callers hold every
/// slot; other requests on them wait for a regular slot.
pub const HEALTH_RESERVE: usize = 16;

/// Serves the gateway on `listener` until `shutdown` resolves (or `POST /quitquitquit`),
/// then drains in-flight requests within `server.shutdown_grace_secs`.
/// Returns whether the drain finished in time.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let s = &state.settings.server;
    let opts = listener::ServeOptions {
        max_connections: s.max_connections,
        reserve: Some(listener::Reserve {
            connections: HEALTH_RESERVE,
            admits: |req| matches!(req.uri().path(), "/healthz" | "/readyz"),
        }),
        gauge: Some("main"),
        header_read_timeout: s.header_read_timeout,
        shutdown_grace: s.shutdown_grace,
    };
    let quit = state.quit.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {},
            _ = quit.notified() => tracing::info!("shutdown requested through /quitquitquit"),
        }
    };
    let handler_state = state.clone();
    listener::serve(
        listener,
        move |req, peer| router::route(handler_state.clone(), req, peer),
        stop,
        opts,
    )
    .await
}
