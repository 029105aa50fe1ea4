//! The HTTP server: the accept loop ([`listener`]), routing ([`router`]) and one
//! handler per route ([`handlers`]).

pub mod access;
pub mod auth;
pub mod body;
pub mod handlers;
pub mod http1;
pub mod listener;
pub mod response;
pub mod router;
pub mod rules;
pub mod state;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use state::AppState;

/// Connections accepted past `server.max_connections` for the health probes, so
/// that `/healthz` and `/readyz` answer even when slow or idle callers hold every
/// slot; other requests on them wait for a regular slot.
pub const HEALTH_RESERVE: usize = 16;

/// Connections the admin listener (`server.admin_listen`) keeps open at most: it
/// serves probes and scrapes, outside `server.max_connections`.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The sockets the gateway serves on, bound before [`run`] so that a port in use is
/// an error at start-up.
#[derive(Debug)]
pub struct Listeners {
    /// `server.listen`: every route.
    pub main: TcpListener,
    /// `server.admin_listen`: the probes and `/metrics`.
    pub admin: Option<TcpListener>,
    /// `server.callback_listen`: `POST /callback`.
    pub callback: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener `settings` names.
    pub fn bind(settings: &crate::config::ServerSettings) -> Result<Listeners, String> {
        let bind = |key: &str, addr| {
            listener::bind(addr).map_err(|e| format!("cannot listen on {addr} ({key}): {e}"))
        };
        Ok(Listeners {
            main: bind("server.listen", settings.listen)?,
            admin: settings
                .admin_listen
                .map(|a| bind("server.admin_listen", a))
                .transpose()?,
            callback: settings
                .callback_listen
                .map(|a| bind("server.callback_listen", a))
                .transpose()?,
        })
    }
}

/// Serves the gateway on `listeners` until `shutdown` resolves (or `POST
/// /quitquitquit`), then drains in-flight requests within
/// `server.shutdown_grace_secs`. Returns whether the drain finished in time.
pub async fn run(
    listeners: Listeners,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let s = &state.settings.server;
    let c = &state.settings.callback;
    // One shutdown for every listener: the first to see it tells the others.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let quit = state.quit.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => {},
            _ = quit.notified() => tracing::info!("shutdown requested through /quitquitquit"),
        }
        listener::sd_notify("STOPPING=1");
        let _ = stop_tx.send(true);
    };
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let serve = |l: TcpListener, which: router::Listener, opts: listener::ServeOptions| {
        let front = Arc::new(http1::Front::new(
            state.clone(),
            which,
            opts.header_read_timeout,
        ));
        listener::accept_loop(
            l,
            move |stream, conn| http1::drive(front.clone(), stream, conn),
            stopped(),
            opts,
        )
    };
    let main = serve(
        listeners.main,
        router::Listener::Main,
        listener::ServeOptions {
            max_connections: s.max_connections,
            reserve: Some(listener::Reserve {
                connections: HEALTH_RESERVE,
                admits: |path| matches!(path, b"/healthz" | b"/readyz"),
            }),
            gauge: Some("main"),
            header_read_timeout: s.header_read_timeout,
            shutdown_grace: s.shutdown_grace,
        },
    );
    let admin = listeners.admin.map(|l| {
        serve(
            l,
            router::Listener::Admin,
            listener::ServeOptions {
                max_connections: ADMIN_MAX_CONNECTIONS,
                reserve: None,
                gauge: Some("admin"),
                header_read_timeout: s.header_read_timeout,
                shutdown_grace: s.shutdown_grace,
            },
        )
    });
    let callback = listeners.callback.map(|l| {
        serve(
            l,
            router::Listener::Callback,
            listener::ServeOptions {
                max_connections: c.max_connections,
                reserve: None,
                gauge: Some("callback"),
                header_read_timeout: c.header_read_timeout,
                shutdown_grace: s.shutdown_grace,
            },
        )
    });
    let optional = |f: Option<_>| async move {
        match f {
            Some(f) => f.await,
            None => true,
        }
    };
    let (_, main, admin, callback) = tokio::join!(stop, main, optional(admin), optional(callback));
    main && admin && callback
}
