//! The one place every Redis operation goes through: the connection (TCP or rustls
//! TLS), `redis.timeout_ms` on every operation, the health state, and the reconnect
//! loop.
//!
//! - Every operation runs under `redis.timeout_ms` and is recorded in
//!   `chat_gateway_redis_latency_seconds{op}` or `chat_gateway_redis_errors_total{op,kind}`.
//! - While Redis is down, operations fail at once with [`FleetError::Down`]: nothing
//!   waits on a Redis that is known to be gone.
//! - A connection error marks Redis down at once; timeouts and server errors do after
//!   [`STRIKES`] in a row (a slow or full Redis is as unusable as a dead one).
//! - A background task reconnects with exponential backoff and jitter (50 ms up to
//!   [`MAX_BACKOFF`]). The loss and the recovery are logged once each and shown in
//!   `chat_gateway_redis_up`.
//! - Each (re)connection is a [`Session`] with Redis's `run_id`, so the invalidation bus
//!   and the rate limiter can tell a reconnection to the same server from a restarted
//!   (possibly empty) one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use metrics::{counter, gauge, histogram};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisConnectionInfo, RedisResult};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::config::RedisUrl;
use crate::metrics::names;

/// Timeouts or server errors in a row that mark Redis down.
pub const STRIKES: u32 = 3;
/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// First pause between reconnection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How long establishing a connection may take (off the request path).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What an operation is, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Leasing rate-limit permits, pausing a command.
    Ratelimit,
    /// Reading a page from L2.
    L2Get,
    /// Storing a page in L2 (and indexing its groups).
    L2Put,
    /// Taking or releasing a fleet fetch lock.
    Lock,
    /// Publishing invalidation events.
    Publish,
    /// Bumping generations (per account, or the fleet-wide one).
    Generation,
    /// The heartbeat (live gateways, the fleet-wide generation).
    Heartbeat,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 7] = [
        Op::Ratelimit,
        Op::L2Get,
        Op::L2Put,
        Op::Lock,
        Op::Publish,
        Op::Generation,
        Op::Heartbeat,
    ];

    /// The `op` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Ratelimit => "ratelimit",
            Op::L2Get => "l2_get",
            Op::L2Put => "l2_put",
            Op::Lock => "lock",
            Op::Publish => "publish",
            Op::Generation => "generation",
            Op::Heartbeat => "heartbeat",
        }
    }
}

/// Why an operation did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    /// Redis is known to be unusable; nothing was sent.
    #[error("Redis is unusable")]
    Down,
    /// No answer within `redis.timeout_ms`.
    #[error("Redis did not answer within redis.timeout_ms")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(String),
}

/// One connection's life: which connection it is and which server answered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Increases with every successful (re)connection; 0 before the first.
    pub seq: u64,
    /// The server's `run_id` (changes when Redis restarts).
    pub run_id: String,
    /// Whether the server is not the one of the previous session (restarted, or
    /// failed over): whatever it held may be gone.
    pub restarted: bool,
}

/// How to reach Redis.
#[derive(Clone)]
pub struct Connector {
    url: RedisUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `CLIENT SETNAME` prefix: `chat-gateway:<gateway id>`.
    name: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector for `url`, trusting the web PKI plus `ca_file` for `rediss://`.
    pub fn new(
        url: RedisUrl,
        ca_file: Option<&std::path::Path>,
        gateway_id: &str,
    ) -> Result<Self, String> {
        let tls = if url.tls {
            let cfg = crate::upstream::client::tls_config_for("redis.ca_file", ca_file)?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        Ok(Connector {
            url,
            tls,
            name: format!("chat-gateway:{gateway_id}"),
        })
    }

    /// The URL, for logs (password redacted).
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Opens a new multiplexed connection (authenticated, database selected, named
    /// `chat-gateway:<gateway id>:<role>` in `CLIENT LIST`). Its driver runs as a
    /// task; it ends when the connection does.
    pub async fn connect(&self, role: &str) -> RedisResult<MultiplexedConnection> {
        let u = &self.url;
        let tcp = TcpStream::connect((u.host.as_str(), u.port)).await?;
        tcp.set_nodelay(true)?;
        let mut info = RedisConnectionInfo::default().set_db(u.db);
        if let Some(user) = &u.username {
            info = info.set_username(user);
        }
        if let Some(pw) = &u.password {
            info = info.set_password(pw.expose());
        }
        // Timeouts are ours (per operation); the connection itself never times out
        // a response (the bus blocks on XREAD).
        let cfg = AsyncConnectionConfig::new().set_response_timeout(None);
        let (conn, driver) = match &self.tls {
            Some(tls) => {
                let name =
                    rustls::pki_types::ServerName::try_from(u.host.clone()).map_err(|e| {
                        redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("redis.url host: {e}"),
                        ))
                    })?;
                let stream = tls.connect(name, tcp).await?;
                let (c, d) = MultiplexedConnection::new_with_config(&info, stream, cfg).await?;
                (c, tokio::spawn(d))
            }
            None => {
                let (c, d) = MultiplexedConnection::new_with_config(&info, tcp, cfg).await?;
                (c, tokio::spawn(d))
            }
        };
        drop(driver);
        let mut conn = conn;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("{}:{role}", self.name))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(conn)
    }
}

/// Reads `run_id` from `INFO server`.
pub async fn run_id(conn: &mut MultiplexedConnection) -> RedisResult<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// The shared connection and its health.
pub struct Redis {
    connector: Connector,
    timeout: Duration,
    /// The connection in use; `None` while Redis is down.
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Timeouts or errors in a row.
    strikes: AtomicU32,
    /// Wakes the reconnect loop.
    wake: Arc<Notify>,
    /// The current session; every (re)connection sends a new one.
    session: watch::Sender<Session>,
    /// Whether the loss was logged (so the recovery is logged, once).
    lost_logged: AtomicBool,
    /// Losses so far (each loss gets its number).
    losses: AtomicU64,
    /// Whether the last loss was Redis being slow (timeouts, errors) rather than
    /// gone (a connection error): a slow Redis may be slow for this gateway only.
    lost_slow: AtomicBool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", self.connector.url())
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Starts the reconnect loop; Redis is down until the first connection succeeds.
    pub fn start(connector: Connector, timeout: Duration) -> Arc<Redis> {
        gauge!(names::REDIS_ENABLED).set(1.0);
        gauge!(names::REDIS_UP).set(0.0);
        let r = Arc::new(Redis {
            connector,
            timeout,
            conn: ArcSwapOption::empty(),
            strikes: AtomicU32::new(0),
            wake: Arc::new(Notify::new()),
            session: watch::channel(Session::default()).0,
            lost_logged: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            lost_slow: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&r);
        tokio::spawn(async move { reconnect_loop(weak).await });
        r
    }

    /// Whether Redis is usable now.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// The number of the last loss, and whether Redis was slow then (timeouts or
    /// errors in a row) rather than gone (a connection error).
    pub fn last_loss(&self) -> (u64, bool) {
        (
            self.losses.load(Ordering::Acquire),
            self.lost_slow.load(Ordering::Acquire),
        )
    }

    /// `redis.timeout_ms`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How to open more connections (the bus reads on its own).
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Sessions, as they start.
    pub fn sessions(&self) -> watch::Receiver<Session> {
        self.session.subscribe()
    }

    /// The current session's number (0: never connected).
    pub fn session_seq(&self) -> u64 {
        self.session.borrow().seq
    }

    /// Waits until Redis is up, at most `timeout`; returns whether it is.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let mut rx = self.sessions();
        let wait = rx.wait_for(|s| s.seq > 0);
        let _ = tokio::time::timeout(timeout, wait).await;
        self.is_up()
    }

    /// Runs one operation on the shared connection within `redis.timeout_ms`, and
    /// records it. Fails at once while Redis is down.
    pub async fn run<T, F, Fut>(&self, op: Op, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.load_full() else {
            return Err(FleetError::Down);
        };
        let started = Instant::now();
        // With tracing on, a round trip made for a recorded request is its child.
        let span = crate::trace::redis(op.as_str());
        let result = tokio::time::timeout(self.timeout, f((*conn).clone())).await;
        if let Some(span) = span {
            let error = match &result {
                Ok(Ok(_)) => None,
                Ok(Err(_)) => Some("error"),
                Err(_) => Some("timeout"),
            };
            span.end(
                error.map_or_else(Vec::new, |e| {
                    vec![opentelemetry::KeyValue::new("error.type", e)]
                }),
                error.is_some(),
            );
        }
        match result {
            Ok(Ok(v)) => {
                histogram!(names::REDIS_LATENCY, "op" => op.as_str())
                    .record(started.elapsed().as_secs_f64());
                self.strikes.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "error").increment(1);
                let broken =
                    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error();
                tracing::debug!(op = op.as_str(), error = %e, "Redis operation failed");
                if broken {
                    self.lost(&conn, &format!("{e}"), false);
                } else {
                    self.strike(&conn, "errors");
                }
                Err(FleetError::Redis(e.to_string()))
            }
            Err(_) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "timeout")
                    .increment(1);
                self.strike(&conn, "timeouts");
                Err(FleetError::Timeout)
            }
        }
    }

    fn strike(&self, conn: &Arc<MultiplexedConnection>, what: &str) {
        if self.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES {
            self.lost(conn, &format!("{STRIKES} {what} in a row"), true);
        }
    }

    /// Drops `conn` (if it is still the one in use) and starts reconnecting.
    fn lost(&self, conn: &Arc<MultiplexedConnection>, why: &str, slow: bool) {
        let cur = self.conn.load();
        let same = cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn));
        if !same {
            return;
        }
        let prev = self.conn.compare_and_swap(&*cur, None);
        if prev.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            self.lost_slow.store(slow, Ordering::Release);
            self.losses.fetch_add(1, Ordering::AcqRel);
            gauge!(names::REDIS_UP).set(0.0);
            if !self.lost_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    redis = %self.connector.url(),
                    reason = why,
                    "lost Redis; serving without it (memory cache, then Chat; rate limit at this gateway's share) until it is back"
                );
            }
            self.wake.notify_one();
        }
    }
}

async fn reconnect_loop(weak: std::sync::Weak<Redis>) {
    let mut backoff = MIN_BACKOFF;
    let mut last_run_id: Option<String> = None;
    let mut seq = 0u64;
    loop {
        let Some(r) = weak.upgrade() else { return };
        if r.is_up() {
            let wake = r.wake.clone();
            let notified = wake.notified();
            drop(r);
            notified.await;
            continue;
        }
        let attempt = async {
            let mut c = r.connector.connect("main").await?;
            let id = run_id(&mut c).await?;
            for script in super::all_scripts() {
                script.load_async(&mut c).await?;
            }
            Ok::<_, redis::RedisError>((c, id))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok((c, id))) => {
                seq += 1;
                let restarted = last_run_id.as_ref().is_some_and(|prev| *prev != id);
                last_run_id = Some(id.clone());
                r.strikes.store(0, Ordering::Relaxed);
                r.conn.store(Some(Arc::new(c)));
                gauge!(names::REDIS_UP).set(1.0);
                if r.lost_logged.swap(false, Ordering::Relaxed) {
                    tracing::warn!(redis = %r.connector.url(), restarted, "Redis is back; the fleet is whole again");
                } else {
                    tracing::info!(redis = %r.connector.url(), "connected to Redis; part of the fleet");
                }
                r.session.send_replace(Session {
                    seq,
                    run_id: id,
                    restarted,
                });
                backoff = MIN_BACKOFF;
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => "connecting timed out".to_string(),
                };
                if !r.lost_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        redis = %r.connector.url(),
                        error = %why,
                        "cannot reach Redis; serving without it (single-gateway mode) until it answers"
                    );
                } else {
                    tracing::debug!(error = %why, "Redis still unreachable");
                }
                drop(r);
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A connection error in words an operator can act on (never the password).
pub fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("invalid password")
    {
        format!("Redis refused the credentials in redis.url ({text})")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation's series is on the first scrape.
    #[test]
    fn every_op_label_is_registered() {
        for op in Op::ALL {
            assert!(
                crate::metrics::values::REDIS_OPS.contains(&op.as_str()),
                "{op:?}"
            );
        }
        assert_eq!(crate::metrics::values::REDIS_OPS.len(), Op::ALL.len());
    }
}
