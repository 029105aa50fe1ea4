//! The accept loop shared by the gateway and the emulator: connection limits, a
//! reserve for health probes, the open-connections gauge, and graceful shutdown. What
//! happens on a connection is a *driver*'s job: [`drive_hyper`] (hyper's HTTP/1 and
//! HTTP/2 for the emulator; HTTP/2 for the gateway, whose own HTTP/1 front end,
//! [`super::http1`], hands over the connections that open with the HTTP/2 preface)
//! or that front end.
//!
//! Graceful shutdown follows one small pattern: when `shutdown` resolves, the listener
//! is dropped (new connections are refused by the kernel), every open connection is
//! told through [`Conn::stop`] to finish its in-flight request and close (HTTP/1.1:
//! `connection: close` on the answers written from then on; HTTP/2: GOAWAY), and we
//! wait for them for at most `grace`. Whatever is still running then is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};

/// Connections accepted past `max_connections` so that some requests (the health
/// probes) are still answered when every slot is held, e.g. by slow or idle callers.
#[derive(Debug, Clone, Copy)]
pub struct Reserve {
    /// How many such connections at most.
    pub connections: usize,
    /// Which request paths a reserve connection answers at once; any other request on
    /// it waits for a regular slot, as it would have in the kernel's backlog.
    pub admits: fn(&[u8]) -> bool,
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

/// What a driver gets with its socket: who called, the shutdown signal, and the
/// connection's slot (held until this is dropped).
pub struct Conn {
    /// The caller.
    pub peer: SocketAddr,
    /// Turns `true` when the server starts shutting down: finish the request in
    /// flight, then close.
    pub stop: watch::Receiver<bool>,
    /// The connection's slot, and what its requests need to be admitted; shared by
    /// the requests (hyper serves several at once over HTTP/2).
    admission: Arc<Admission>,
    /// Counts the connection as open (for draining and the gauge) until dropped.
    _open: OpenGuard,
}

impl Conn {
    /// Called before serving a request for `path`: a connection on a reserve slot
    /// waits for a regular slot unless the reserve admits the request.
    pub async fn admit(&self, path: &[u8]) {
        self.admission.admit(path).await
    }

    /// Whether shutdown has started.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Open connections, for draining.
#[derive(Default)]
struct Tracker {
    /// Connections not yet closed.
    open: AtomicUsize,
    /// Notified when `open` drops to zero.
    idle: Notify,
}

/// Keeps a connection counted as open (and in the gauge) while it lives.
struct OpenGuard {
    tracker: Arc<Tracker>,
    gauge: Option<metrics::Gauge>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.decrement(1.0);
        }
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// Serves `handler` with hyper on `listener` until `shutdown` resolves, then drains
/// (the emulator's server). Returns `true` when every connection finished within the
/// grace period.
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
    let header_read_timeout = opts.header_read_timeout;
    accept_loop(
        listener,
        move |stream, conn| {
            drive_hyper(
                TokioIo::new(stream),
                conn,
                handler.clone(),
                header_read_timeout,
                None,
            )
        },
        shutdown,
        opts,
    )
    .await
}

/// Accepts connections on `listener` and runs `driver` on each, within the limits of
/// `opts`, until `shutdown` resolves; then drains. Returns `true` when every
/// connection finished within the grace period.
pub async fn accept_loop<D, F>(
    listener: TcpListener,
    driver: D,
    shutdown: impl Future<Output = ()>,
    opts: ServeOptions,
) -> bool
where
    D: Fn(TcpStream, Conn) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let reserve_permits = Arc::new(Semaphore::new(opts.reserve.map_or(0, |r| r.connections)));
    let gauge = opts
        .gauge
        .map(|l| metrics::gauge!(crate::metrics::names::OPEN_CONNECTIONS, "listener" => l));
    let tracker = Arc::new(Tracker::default());
    let (stop_tx, stop_rx) = watch::channel(false);
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
                Ok(p) => Slot::Reserve(ReserveSlot {
                    reserve: std::sync::Mutex::new(Some(p)),
                    regular: tokio::sync::Mutex::new(None),
                }),
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
        tracker.open.fetch_add(1, Ordering::AcqRel);
        if let Some(g) = &gauge {
            g.increment(1.0);
        }
        let conn = Conn {
            peer,
            stop: stop_rx.clone(),
            admission: Arc::new(Admission {
                slot,
                permits: permits.clone(),
                reserve: opts.reserve,
            }),
            _open: OpenGuard {
                tracker: tracker.clone(),
                gauge: gauge.clone(),
            },
        };
        tokio::spawn(driver(stream, conn));
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drained = async {
        loop {
            let idle = tracker.idle.notified();
            if tracker.open.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    };
    tokio::select! {
        _ = drained => true,
        _ = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!(grace_secs = opts.shutdown_grace.as_secs_f64(), "grace period over; closing the remaining connections");
            false
        }
    }
}

/// How long a connection hyper is closing gracefully (GOAWAY sent, no request in
/// flight) may wait for the caller's part of the exchange (HTTP/2: the PING that
/// follows the first GOAWAY answered) before it is dropped.
pub const GOAWAY_WAIT: Duration = Duration::from_secs(1);

/// A timer's "never".
const FAR: Duration = Duration::from_secs(365 * 86_400);

/// hyper's HTTP/1 and HTTP/2 (by protocol sniffing) on one connection, with
/// `handler` for every request, the header read timeout, the reserve's admission and
/// graceful shutdown (HTTP/2: GOAWAY, then the requests in flight finish). With
/// `idle_timeout`, a connection with no request in flight for that long is closed the
/// same way.
pub async fn drive_hyper<I, H, Fut>(
    io: I,
    mut conn: Conn,
    handler: H,
    header_read_timeout: Duration,
    idle_timeout: Option<Duration>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true)
        // A caller may shut down its sending side once its request is sent: it still
        // gets its answer (RFC 9112 §9.6 lets either side half-close).
        .half_close(true)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    let peer = conn.peer;
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let admission = conn.admission.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let busy = seen.begin();
        let handler = handler.clone();
        let admission = admission.clone();
        async move {
            admission.admit(req.uri().path().as_bytes()).await;
            let resp = handler(req, peer).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let served = builder.serve_connection(io, svc);
    tokio::pin!(served);
    // hyper's header_read_timeout only starts once the auto builder has sniffed the
    // protocol from the first bytes, and HTTP/2 has none: a connection that sends
    // nothing (or a slow HTTP/2 preface) would hold its slot forever. So the first
    // request head must also arrive within the timeout of the accept.
    let first_head = tokio::time::sleep(header_read_timeout);
    tokio::pin!(first_head);
    let mut first_head_due = true;
    // hyper has no idle timeout for HTTP/2: one timer, re-armed from the last
    // request's end, closes a connection idle for `idle_timeout`.
    let idle = tokio::time::sleep(idle_timeout.unwrap_or(FAR));
    tokio::pin!(idle);
    let mut stopping = false;
    let mut closing_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            res = &mut served => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            _ = &mut first_head, if first_head_due => {
                first_head_due = false;
                if !activity.ever() && closing_since.is_none() {
                    // Closed as an idle one is (HTTP/2: GOAWAY), within GOAWAY_WAIT.
                    tracing::debug!(%peer, "no request head in time; closing");
                    served.as_mut().graceful_shutdown();
                    let now = tokio::time::Instant::now();
                    closing_since = Some(now);
                    idle.as_mut().reset(now + GOAWAY_WAIT);
                }
            }
            _ = conn.stop.changed(), if !stopping => {
                stopping = true;
                served.as_mut().graceful_shutdown();
                closing_since.get_or_insert_with(tokio::time::Instant::now);
                idle.as_mut().reset(tokio::time::Instant::now() + GOAWAY_WAIT);
            }
            _ = &mut idle, if idle_timeout.is_some() || closing_since.is_some() => {
                let now = tokio::time::Instant::now();
                let quiet = activity.quiet_since(now);
                match (closing_since, idle_timeout) {
                    // Closing, nothing in flight and the caller had its time: drop it.
                    (Some(since), _) if quiet.is_some_and(|q| q >= GOAWAY_WAIT)
                        && now - since >= GOAWAY_WAIT =>
                    {
                        tracing::debug!(%peer, "closing a connection after GOAWAY");
                        return;
                    }
                    (Some(_), _) => idle.as_mut().reset(now + GOAWAY_WAIT / 4),
                    (None, Some(limit)) => match quiet {
                        Some(q) if q >= limit => {
                            tracing::debug!(%peer, "idle connection; closing (GOAWAY)");
                            served.as_mut().graceful_shutdown();
                            closing_since = Some(now);
                            idle.as_mut().reset(now + GOAWAY_WAIT);
                        }
                        Some(q) => idle.as_mut().reset(now + (limit - q)),
                        None => idle.as_mut().reset(now + limit),
                    },
                    (None, None) => idle.as_mut().reset(now + FAR),
                }
            }
        }
    }
}

/// Requests in flight on a connection hyper serves, and since when it has had none.
struct Activity {
    /// Requests in flight.
    in_flight: AtomicUsize,
    /// Whether any request arrived.
    ever: AtomicBool,
    /// When the connection last had nothing in flight (None while busy).
    quiet_from: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            ever: AtomicBool::new(false),
            quiet_from: std::sync::Mutex::new(Some(tokio::time::Instant::now())),
        }
    }
}

impl Activity {
    /// A request starts; it ends when the guard is dropped.
    fn begin(self: &Arc<Self>) -> Busy {
        self.ever.store(true, Ordering::Relaxed);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            *self.quiet_from.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Busy(self.clone())
    }

    fn ever(&self) -> bool {
        self.ever.load(Ordering::Relaxed)
    }

    /// How long the connection has had nothing in flight (None: busy).
    fn quiet_since(&self, now: tokio::time::Instant) -> Option<Duration> {
        let from = *self.quiet_from.lock().unwrap_or_else(|p| p.into_inner());
        from.map(|f| now.saturating_duration_since(f))
    }
}

/// A request in flight on a connection hyper serves.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut quiet = self.0.quiet_from.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *quiet = Some(tokio::time::Instant::now());
        }
    }
}

/// A connection's slot and what it needs for [`Conn::admit`].
struct Admission {
    /// The slot, held until the connection closes.
    slot: Slot,
    /// The regular slots, for a reserve connection's promotion.
    permits: Arc<Semaphore>,
    /// What the reserve admits.
    reserve: Option<Reserve>,
}

impl Admission {
    async fn admit(&self, path: &[u8]) {
        if let (Slot::Reserve(r), Some(cfg)) = (&self.slot, self.reserve) {
            if !(cfg.admits)(path) {
                r.promote(&self.permits).await;
            }
        }
    }
}

/// The slot a connection holds while it is open.
enum Slot {
    /// One of `max_connections` (held until the connection closes).
    Regular(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    /// One of the reserve; promoted to a regular slot by its first request that is not
    /// a reserve request.
    Reserve(ReserveSlot),
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

/// Tells systemd (a `Type=notify` unit) about the service's state, e.g. `READY=1`
/// once it listens and `STOPPING=1` when it starts to shut down. Does nothing when
/// `NOTIFY_SOCKET` is not set (not started by systemd).
pub fn sd_notify(state: &str) {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let path = path.to_string_lossy().into_owned();
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        };
        let sent = addr.and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.send_to_addr(state.as_bytes(), &addr)
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = state;
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
