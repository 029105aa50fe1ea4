//! The accept loop shared by the gateway and the emulator: connection limits, header
//! read timeout, keep-alive, and graceful shutdown.
//!
//! Graceful shutdown follows one small pattern: when `shutdown` resolves, the listener
//! is dropped (new connections are refused by the kernel), every open connection is
//! told to finish its in-flight request and close, and we wait for them for at most
//! `grace`. Whatever is still running then is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections accepted past `max_connections` so that some requests (the health
/// probes) are still answered when every slot is held, e.g. by slow or idle callers.
#[derive(Debug, Clone, Copy)]
pub struct Reserve {
    /// How many such connections at most.
    pub connections: usize,
    /// Which requests a reserve connection answers at once; any other request on it
    /// waits for a regular slot, as it would have in the kernel's backlog.
    pub admits: fn(&Request<Incoming>) -> bool,
}

/// How the accept loop treats connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Open connections at most; past it new connections wait in the kernel's
    /// backlog until one closes, and existing ones keep working.
    pub max_connections: usize,
    /// Extra connections for the requests that must be answered even at the limit.
    pub reserve: Option<Reserve>,
    /// The `listener` label of `chat_gateway_open_connections` (None: not counted).
    pub gauge: Option<&'static str>,
    /// A connection that has not sent a complete request head by then is closed
    /// (slow-loris protection). Also bounds how long an idle keep-alive
    /// connection waits for its next request head.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown starts.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_connections: 10_000,
            reserve: None,
            gauge: None,
            header_read_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains.
///
/// Returns `true` when every connection finished within the grace period.
pub async fn serve<H, Fut>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    opts: ServeOptions,
) -> bool
where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let reserve_permits = Arc::new(Semaphore::new(opts.reserve.map_or(0, |r| r.connections)));
    let open = opts
        .gauge
        .map(|l| metrics::gauge!(crate::metrics::names::OPEN_CONNECTIONS, "listener" => l));
    tokio::pin!(shutdown);

    loop {
        // Wait for a connection slot first, so that at the limit we stop accepting and
        // new connections queue in the kernel instead of being served half-way. A
        // regular slot is taken whenever there is one; a reserve slot only when every
        // regular one is held.
        let slot = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => Slot::Regular(p),
                Err(_) => break,
            },
            p = reserve_permits.clone().acquire_owned(), if opts.reserve.is_some() => match p {
                Ok(p) => Slot::Reserve(Arc::new(ReserveSlot {
                    reserve: std::sync::Mutex::new(Some(p)),
                    regular: tokio::sync::Mutex::new(None),
                })),
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let got_request = Arc::new(AtomicBool::new(false));
        let seen = got_request.clone();
        let reserve = match (&slot, opts.reserve) {
            (Slot::Reserve(r), Some(cfg)) => Some((r.clone(), permits.clone(), cfg.admits)),
            _ => None,
        };
        let svc = service_fn(move |req| {
            seen.store(true, Ordering::Relaxed);
            let handler = handler.clone();
            let reserve = reserve.clone();
            async move {
                if let Some((slot, permits, admits)) = reserve {
                    if !admits(&req) {
                        // Not a reserve request: wait for a regular slot, then let the
                        // reserve slot go for the next probe.
                        slot.promote(&permits).await;
                    }
                }
                Ok::<_, Infallible>(handler(req, peer).await)
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        let first_head_deadline = opts.header_read_timeout;
        if let Some(g) = &open {
            g.increment(1.0);
        }
        let open = open.clone();
        tokio::spawn(async move {
            // hyper's header_read_timeout only starts once the auto builder has sniffed
            // the protocol from the first bytes, and HTTP/2 has none: a connection that
            // sends nothing (or a slow HTTP/2 preface) would hold its slot forever. So
            // the first request head must also arrive within the timeout of the accept.
            tokio::pin!(conn);
            let res = tokio::select! {
                res = &mut conn => Some(res),
                _ = tokio::time::sleep(first_head_deadline) => {
                    if got_request.load(Ordering::Relaxed) {
                        Some(conn.await)
                    } else {
                        tracing::debug!(%peer, "no request head in time; closing");
                        None
                    }
                }
            };
            if let Some(Err(e)) = res {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            if let Some(g) = open {
                g.decrement(1.0);
            }
            drop(slot);
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!(grace_secs = opts.shutdown_grace.as_secs_f64(), "grace period over; closing the remaining connections");
            false
        }
    }
}

/// The slot a connection holds while it is open.
enum Slot {
    /// One of `max_connections` (held until the connection closes).
    Regular(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// One of the reserve; promoted to a regular slot by its first request that is not
    /// a reserve request.
    Reserve(Arc<ReserveSlot>),
}

/// A reserve connection's slots.
struct ReserveSlot {
    /// The reserve slot, given back once the connection holds a regular one.
    reserve: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// The regular slot, once it has one.
    regular: tokio::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl ReserveSlot {
    /// Waits until the connection holds a regular slot, then frees its reserve slot.
    async fn promote(&self, permits: &Arc<Semaphore>) {
        let mut regular = self.regular.lock().await;
        if regular.is_none() {
            if let Ok(p) = permits.clone().acquire_owned().await {
                *regular = Some(p);
            }
            self.reserve
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
    }
}

/// Pending connections the kernel queues for us (the default of 128 overflows under a
/// burst of new clients, and this queue is where connections wait past
/// `max_connections`).
pub const BACKLOG: u32 = 4096;

/// Binds a listener with a deep backlog and `SO_REUSEADDR`.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
