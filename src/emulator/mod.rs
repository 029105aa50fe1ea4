//! A local Tencent Cloud Chat emulator: the Chat admin REST API over plain HTTP on
//! loopback, for development, tests, demos and load tests without a Tencent account.
//!
//! What it does (the full manual is `docs/emulator.md`):
//! - authenticates every `/v4` call exactly as Chat does (query parameters, the
//!   TLSSigAPIv2 UserSig, the admin check) and answers with Chat's envelope and codes;
//! - serves a deterministic synthetic world generated from a seed (`world`): accounts,
//!   symmetric one-to-one conversations, groups, pinned and marked conversations and
//!   conversation groups, with accounts that need several pages; every account's
//!   profile (`profile`) and friend list (`sns`), every group's profile and members
//!   (`groups`);
//! - implements `recentcontact/get_list` with Chat's two cursors (`paging`), the
//!   conversation writes and the message commands keeping the world consistent
//!   (`writes`, `contact_groups`), the profile, group, friend and account reads and
//!   writes with Chat's limits and per-item codes (`profile`, `groups`, `sns`,
//!   `accounts`), and fires Chat's webhooks (`webhooks`), also for changes made "from
//!   a client" (`client`);
//! - injects faults on demand: 50004/50005, latency and jitter, dropped connections
//!   and Chat's per-command rate limit (`faults`), changeable at run time through the
//!   control endpoints (`control`).
//!
//! The request pipeline is `server`; what it and the command modules share (the
//! state, the clock, body reading) is `state`.
//!
//! Start it with [`run`] on a listener (the `chat-gateway emulator` command) or with
//! [`spawn`] in a background task (tests, `chat-gateway demo`).

mod accounts;
mod auth;
mod client;
mod config;
mod contact_groups;
mod control;
mod faults;
mod groups;
mod paging;
mod profile;
mod protocol;
mod rng;
mod server;
mod sns;
mod state;
mod stats;
mod webhooks;
mod world;
mod writes;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{
    EmulatorConfig, FaultSettings, DEFAULT_PAGE_SIZE, DEFAULT_TOP_PAGE_SIZE, MAX_ACCOUNTS,
};

use crate::server::listener::{serve, ServeOptions};
use state::State;
use world::World;

/// How long in-flight calls may finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Validates `cfg` and generates its world (off the async threads: a large world
/// takes a moment).
async fn build(cfg: EmulatorConfig) -> io::Result<Arc<State>> {
    cfg.validate().map_err(invalid)?;
    let (accounts, seed) = (cfg.accounts, cfg.seed);
    let started = std::time::Instant::now();
    let world = tokio::task::spawn_blocking(move || World::generate(accounts, seed))
        .await
        .map_err(io::Error::other)?;
    tracing::info!(
        accounts,
        seed,
        groups = world.generated_groups(),
        millis = started.elapsed().as_millis() as u64,
        "emulator world generated"
    );
    State::new(cfg, world).map(Arc::new).map_err(invalid)
}

async fn serve_state(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        sdkappid = state.cfg.sdkappid,
        identifier = %state.cfg.identifier,
        faults = ?state.cfg.faults,
        "Chat emulator listening"
    );
    let handler = move |req, _peer: SocketAddr| server::handle(Arc::clone(&state), req);
    let opts = ServeOptions {
        shutdown_grace: SHUTDOWN_GRACE,
        ..ServeOptions::default()
    };
    if !serve(listener, handler, shutdown, opts).await {
        tracing::warn!("emulator stopped with calls still in flight");
    }
    tracing::info!(%addr, "Chat emulator stopped");
    Ok(())
}

/// Serves the emulator on `listener` until `shutdown` resolves, then drains in-flight
/// calls (up to 5 s). Fails early (`InvalidInput`) when `cfg` does not validate.
pub async fn run(
    listener: TcpListener,
    cfg: EmulatorConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let state = build(cfg).await?;
    serve_state(listener, state, shutdown).await
}

/// Binds `cfg.listen` (by default `127.0.0.1:0`, a free port), generates the world and
/// serves it from a background task. Dropping the handle also stops the emulator.
pub async fn spawn(cfg: EmulatorConfig) -> io::Result<EmulatorHandle> {
    cfg.validate().map_err(invalid)?;
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let state = build(cfg).await?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_state(listener, Arc::clone(&state), async move {
        // Resolves on `shutdown()` and when the handle is dropped.
        let _ = rx.await;
    }));
    Ok(EmulatorHandle {
        addr,
        stop: Some(tx),
        task: Some(task),
        state,
    })
}

/// A running emulator started by [`spawn`].
pub struct EmulatorHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
    state: Arc<State>,
}

impl std::fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorHandle")
            .field("addr", &self.addr)
            .field("config", &self.state.cfg)
            .finish()
    }
}

impl EmulatorHandle {
    /// The address the emulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the base to put `/v4/...` after.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration it was started with (fault settings may have changed since;
    /// see `GET /__emulator/faults`).
    pub fn config(&self) -> &EmulatorConfig {
        &self.state.cfg
    }

    /// A fresh admin UserSig valid for a day, signed with the emulator's key.
    pub fn admin_usersig(&self) -> String {
        self.state
            .auth
            .mint(&self.state.cfg.identifier, 86_400, state::unix_now())
    }

    /// Stops accepting, lets in-flight calls finish (up to 5 s) and waits until the
    /// emulator has stopped.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "emulator stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "emulator task failed"),
            }
        }
    }
}
