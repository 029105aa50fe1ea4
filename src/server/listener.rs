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

/// How the accept loop treats connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Open connections at most; past it new connections wait in the kernel's
    /// backlog until one closes, and existing ones keep working.
    pub max_connections: usize,
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
    tokio::pin!(shutdown);

    loop {
        // Wait for a connection slot first, so that at the limit we stop accepting and
        // new connections queue in the kernel instead of being served half-way.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
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
        let svc = service_fn(move |req| {
            seen.store(true, Ordering::Relaxed);
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        let first_head_deadline = opts.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header_read_timeout only starts once the auto builder has sniffed
            // the protocol from the first bytes, and HTTP/2 has none: a connection that
            // sends nothing (or a slow HTTP/2 preface) would hold its slot forever. So
            // the first request head must also arrive within the timeout of the accept.
            tokio::pin!(conn);
            let res = tokio::select! {
                res = &mut conn => res,
                _ = tokio::time::sleep(first_head_deadline) => {
                    if !got_request.load(Ordering::Relaxed) {
                        tracing::debug!(%peer, "no request head in time; closing");
                        drop(permit);
                        return;
                    }
                    conn.await
                }
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
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
