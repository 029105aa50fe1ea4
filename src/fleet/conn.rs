//! The one place every Redis operation goes through: the connection (TCP or rustls
//! TLS; or, with `redis.mode`, a cluster or a Sentinel-named primary, see
//! [`super::topology`]), the deadlines, the health state, the reconnect loop, and
//! what each new session finds out about the server.
//!
//! - **Deadlines.** An operation on behalf of a request runs under that request's
//!   Redis budget ([`with_budget`]): `redis.timeout_ms` for all of the request's Redis
//!   work together, not per operation. Other operations get `redis.timeout_ms` each
//!   ([`Redis::run`]); the invalidation bus's bulk work, L2 stores and lock releases
//!   (off the request path) get [`BACKGROUND_TIMEOUT`]
//!   ([`Redis::run_long`]). Every operation is recorded in
//!   `chat_gateway_redis_latency_seconds{op}` or `chat_gateway_redis_errors_total{op,kind}`.
//! - **Health.** While Redis is down, operations fail at once with [`FleetError::Down`]:
//!   nothing waits on a Redis that is known to be gone. A connection error marks Redis
//!   down at once; timeouts and server errors do after [`STRIKES`] in a row.
//! - **Slow or paused.** An operation that runs out of time is [`FleetError::Timeout`]
//!   (Redis is slow, maybe for this gateway only) unless, on a side connection, Redis
//!   meanwhile answered a `PING` but not a no-op script: then it is
//!   [`FleetError::Blocked`] (Redis is alive but runs no script or write now:
//!   `CLIENT PAUSE WRITE`, as during a failover, holds every client's alike).
//! - **Reconnection** with exponential backoff and jitter (50 ms up to
//!   [`MAX_BACKOFF`]). A new session is only declared once Redis has run a write (the
//!   fleet's session script), so a Redis that accepts connections but not writes
//!   (paused, full) stays down instead of flapping. The loss and the recovery are
//!   logged once each and shown in `chat_gateway_redis_up`.
//! - **Sessions.** Each (re)connection is a [`Session`]. Its `identity` tells a
//!   reconnection to the same server from a restarted or failed-over one: the server's
//!   `run_id` from `INFO`, or, for a Redis user that may not run `INFO` (no
//!   `@dangerous`), a marker script this gateway loaded (`SCRIPT LOAD` is neither
//!   replicated nor persisted, so a restarted server or a promoted replica does not
//!   have it). `restarted` is also set when the fleet's state in Redis went back
//!   (see [`super::heartbeat`]): whatever the server held may be gone.
//! - **Checks.** Each session reads `maxmemory-policy` with `CONFIG GET` where the
//!   user may, and reports a policy the fleet does not support (log and
//!   `chat_gateway_redis_maxmemory_policy_unsupported`). A command Redis denies to the
//!   user (`NOPERM`) is logged once, by name.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use metrics::{counter, gauge, histogram};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisConnectionInfo, RedisResult};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use super::keys::Keys;
pub use super::topology::Conn;
use super::topology::{self, Topology};
use super::Shared;
use crate::config::RedisUrl;
use crate::metrics::names;

/// Whether an operation whose timer has just fired was in fact answered: on a
/// starved process (a busy machine runs it late) the timer and Redis's reply become
/// ready in the same turn, and the reply is read by the connection's own task, which
/// may not have run yet. One yield lets it run; an answer found then is an answer,
/// not a timeout, so a late scheduler never passes for a slow Redis (strikes, "Redis
/// lost", the limiter's full window). Costs nothing unless the timer fired.
async fn answered_meanwhile<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    tokio::task::yield_now().await;
    futures_util::FutureExt::now_or_never(fut)
}

/// Timeouts or errors in a row that mark Redis down.
pub const STRIKES: u32 = 3;
/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// First pause between reconnection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How long establishing a session may take (off the request path).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the probe's no-op script may stay pending (Redis holding scripts).
const PROBE_SCRIPT_WAIT: Duration = Duration::from_secs(30);
/// The deadline of Redis work off the request path: one step of the bus's bulk work
/// (a chunk of a group's accounts), an L2 store (it runs in a task of its own once
/// the caller is answered, or while the request waits what is left of its budget)
/// and the release of a fetch lock. Never less than `redis.timeout_ms`. A store cut
/// off at `redis.timeout_ms` on a Redis that answers a little later would leave its
/// lock held, and the next gateway's miss would wait for it.
pub const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(1);

/// `maxmemory-policy` values the fleet supports: Redis never evicts, or evicts only
/// keys with an expiry (pages, locks, group indexes: their loss costs a Chat call or
/// is detected; the fleet-wide keys have no expiry).
pub const SUPPORTED_POLICIES: [&str; 5] = [
    "noeviction",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

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
    /// Bumping generations (per account, for a group, or the fleet-wide one).
    Generation,
    /// The heartbeat and the fleet-wide state (live gateways, generation, checks).
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
    /// No answer within the operation's deadline: Redis is slow (maybe for this
    /// gateway only).
    #[error("Redis did not answer within redis.timeout_ms")]
    Timeout,
    /// No answer within the deadline, while Redis answered other commands: it holds
    /// this operation (writes paused, as during a failover), for every client alike.
    #[error("Redis holds this operation (writes paused)")]
    Blocked,
    /// The request's Redis budget (`redis.timeout_ms` in all) is spent.
    #[error("this request spent its redis.timeout_ms")]
    Budget,
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(String),
}

/// One connection's life: which connection it is and which server answered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Increases with every successful (re)connection; 0 before the first.
    pub seq: u64,
    /// Which server process answered: `run_id:<id>` from `INFO`, or `marker:<n>` when
    /// the user may not run `INFO` (`n` changes whenever this gateway's marker script
    /// was missing, i.e. on another server process).
    pub identity: String,
    /// Whether whatever the server held may be gone: it is not the server of the
    /// previous session (restarted, failed over), or the fleet's state in it went
    /// back (a lagging replica, an older snapshot, eviction).
    pub restarted: bool,
}

// ---------------------------------------------------------------------------------
// The request's Redis budget.

tokio::task_local! {
    static BUDGET: Budget;
}

/// What is left of one request's Redis time. Operations that overlap (the L2 lookup
/// and the rate limit's lease of a miss, sent together) are charged once: the budget
/// counts the time during which at least one of them was waited for.
#[derive(Debug)]
struct Budget {
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    /// What was left when no operation was being waited for.
    left: Duration,
    /// Operations being waited for now.
    active: u32,
    /// Since when at least one has been.
    since: Option<Instant>,
}

impl Budget {
    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `f` (a request's work) with a Redis budget of `limit`: every operation it runs
/// through [`Redis::run`] waits at most what is left, and the time spent waiting for
/// one or more of them is charged.
pub async fn with_budget<F: Future>(limit: Duration, f: F) -> F::Output {
    let b = Budget {
        state: std::sync::Mutex::new(BudgetState {
            left: limit,
            active: 0,
            since: None,
        }),
    };
    BUDGET.scope(b, f).await
}

/// What is left of the current request's Redis budget (`None` outside a request).
pub fn budget_left() -> Option<Duration> {
    BUDGET
        .try_with(|b| {
            let st = b.state();
            let spent = st.since.map_or(Duration::ZERO, |s| s.elapsed());
            st.left.saturating_sub(spent)
        })
        .ok()
}

/// While it lives, the current request is waiting on Redis (its budget runs down).
#[derive(Debug)]
pub struct BudgetWait {
    _private: (),
}

impl BudgetWait {
    /// Starts charging the current request's budget, if there is one.
    pub fn begin() -> Option<BudgetWait> {
        BUDGET
            .try_with(|b| {
                let mut st = b.state();
                if st.active == 0 {
                    st.since = Some(Instant::now());
                }
                st.active += 1;
            })
            .ok()
            .map(|()| BudgetWait { _private: () })
    }
}

impl Drop for BudgetWait {
    fn drop(&mut self) {
        let _ = BUDGET.try_with(|b| {
            let mut st = b.state();
            st.active = st.active.saturating_sub(1);
            if st.active == 0 {
                if let Some(since) = st.since.take() {
                    st.left = st.left.saturating_sub(since.elapsed());
                }
            }
        });
    }
}

/// Waits for `f` (Redis work running elsewhere, e.g. a store in its own task) at most
/// what is left of the current request's budget, and charges the wait. `None` if it
/// did not finish in time (it goes on without us).
pub async fn within_budget<F: Future>(f: F) -> Option<F::Output> {
    let Some(left) = budget_left() else {
        return Some(f.await);
    };
    let _wait = BudgetWait::begin();
    tokio::time::timeout(left, f).await.ok()
}

// ---------------------------------------------------------------------------------
// Connecting.

/// How to reach Redis.
#[derive(Clone)]
pub struct Connector {
    url: RedisUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `CLIENT SETNAME` prefix: `chat-gateway:<gateway id>`.
    name: String,
    /// A cluster or a Sentinel-managed primary (`redis.mode`); `None`: `url` itself.
    topology: Option<Arc<Topology>>,
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
            topology: None,
        })
    }

    /// Connects through `topology` (a cluster, sentinels) instead of to `url`.
    pub fn with_topology(mut self, topology: Option<Topology>) -> Self {
        self.topology = topology.map(Arc::new);
        self
    }

    /// The URL, for logs (password redacted).
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// The marker script of this gateway's `role` connection: loaded on a server, it
    /// tells that server process from any other (see [`identify`]).
    pub fn marker(&self, role: &str) -> redis::Script {
        redis::Script::new(&format!("return '{}:{role}'", self.name))
    }

    /// Opens a new multiplexed connection (authenticated, database selected, named
    /// `chat-gateway:<gateway id>:<role>` in `CLIENT LIST`). Its driver runs as a
    /// task; it ends when the connection does.
    pub async fn connect(&self, role: &str) -> RedisResult<Conn> {
        let mut conn = match &self.topology {
            Some(t) => {
                let cfg = AsyncConnectionConfig::new().set_response_timeout(None);
                t.connect(cfg).await?
            }
            None => Conn::Single(self.connect_url().await?),
        };
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!("{}:{role}", self.name))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(conn)
    }

    /// A connection to `url` itself.
    async fn connect_url(&self) -> RedisResult<MultiplexedConnection> {
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
        Ok(conn)
    }
}

/// Whether Redis refused a command to this user (ACL), or does not know it (managed
/// services rename or remove some).
pub fn denied(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        || e.to_string().contains("unknown command")
}

/// Logs, once per process and command, that Redis denies `command` to this user.
pub fn log_denied(command: &str, consequence: &str) {
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.iter().any(|c| c == command) || seen.len() >= 64 {
        return;
    }
    seen.push(command.to_string());
    tracing::warn!(
        command,
        "Redis denies {command} to this user (ACL); {consequence}"
    );
}

/// Which server process `c` talks to: `run_id:<id>` from `INFO server`, or, when the
/// user may not run `INFO`, `marker:<n>` where `n` is `markers` plus one if `marker`
/// had to be loaded (it was not on this server process).
pub async fn identify(
    c: &mut Conn,
    marker: &redis::Script,
    markers: &AtomicU64,
) -> RedisResult<String> {
    if let Some(id) = topology::cluster_identity(c).await? {
        return Ok(id);
    }
    match redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(c)
        .await
    {
        Ok(info) => {
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .unwrap_or("")
                .trim();
            return Ok(format!("run_id:{id}"));
        }
        Err(e) if denied(&e) => log_denied(
            "INFO",
            "restarts and failovers are detected with a marker script instead (SCRIPT LOAD is neither replicated nor persisted)",
        ),
        Err(e) => return Err(e),
    }
    let present: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(marker.get_hash())
        .query_async(c)
        .await?;
    if !present.first().copied().unwrap_or(false) {
        marker.load_async(c).await?;
        markers.fetch_add(1, Ordering::AcqRel);
    }
    Ok(format!("marker:{}", markers.load(Ordering::Acquire)))
}

/// Reads `maxmemory-policy` (when the user may) and reports one the fleet does not
/// support. Returns the policy, if read.
async fn check_policy(c: &mut Conn, last: &Mutex<Option<String>>) {
    let policy = match redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async::<Vec<String>>(c)
        .await
    {
        Ok(v) => v.get(1).cloned(),
        Err(e) => {
            if denied(&e) {
                log_denied(
                    "CONFIG GET",
                    "maxmemory-policy cannot be checked: make sure it is noeviction or volatile-* (see the README)",
                );
            } else {
                tracing::debug!(error = %e, "CONFIG GET maxmemory-policy failed");
            }
            None
        }
    };
    let Some(policy) = policy else { return };
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if last.as_deref() == Some(policy.as_str()) {
        return;
    }
    let supported = SUPPORTED_POLICIES.contains(&policy.as_str());
    gauge!(names::REDIS_POLICY_UNSUPPORTED).set(if supported { 0.0 } else { 1.0 });
    if supported {
        tracing::info!(policy = %policy, "Redis maxmemory-policy is supported by the fleet");
    } else {
        tracing::error!(
            policy = %policy,
            "Redis maxmemory-policy may evict the fleet's keys that have no expiry; set it to noeviction or a volatile-* policy (see the README)"
        );
    }
    *last = Some(policy);
}

// ---------------------------------------------------------------------------------
// The connection and its health.

/// A script that does nothing: the probe's stand-in for our held operations.
pub(crate) static NOOP_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return 1"));

/// What the fleet checks on every new session (see [`super::heartbeat::session`]).
#[derive(Debug, Clone)]
pub struct FleetHook {
    /// The fleet's keys.
    pub keys: Keys,
    /// What this gateway has seen of the fleet's state.
    pub shared: Arc<Shared>,
}

/// Why Redis was marked down (the rate limiter falls back differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// The connection failed (refused, reset, closed): Redis is gone, restarting, or
    /// unreachable from here.
    Gone,
    /// Timeouts: slow, maybe for this gateway only.
    Slow,
    /// Operations held while Redis answered others: it holds every client's writes
    /// (`CLIENT PAUSE WRITE`), so nothing is written to it by anyone meanwhile.
    Held,
    /// Answers that are errors (full, read-only, denied).
    Refusing,
}

impl LossKind {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LossKind::Gone => "gone",
            LossKind::Slow => "slow",
            LossKind::Held => "held",
            LossKind::Refusing => "refusing",
        }
    }
}

/// The shared connection and its health.
pub struct Redis {
    connector: Connector,
    timeout: Duration,
    fleet: Option<FleetHook>,
    /// The connection in use; `None` while Redis is down.
    conn: ArcSwapOption<Conn>,
    /// Side connections (`PING`, a no-op script): tell a slow Redis from one that
    /// holds our operations while it answers others.
    probe: ArcSwapOption<Probes>,
    /// What the probes found.
    probe_state: Arc<ProbeState>,
    born: Instant,
    /// Timeouts or errors in a row.
    strikes: AtomicU32,
    /// When the last one counted (µs since `born`): operations already under way then
    /// that fail too are the same trouble, and count once.
    last_strike_us: AtomicU64,
    /// Wakes the reconnect loop.
    wake: Arc<Notify>,
    /// The current session; every (re)connection sends a new one.
    session: watch::Sender<Session>,
    /// A new session is wanted while this one works (the servers behind it changed:
    /// [`topology::watch`]).
    renew: AtomicBool,
    /// Whether the loss was logged (so the recovery is logged, once).
    lost_logged: AtomicBool,
    /// Losses so far (each loss gets its number).
    losses: AtomicU64,
    /// What the last loss was, and when.
    loss: Mutex<(LossKind, Instant)>,
    /// After a loss to held writes: the connection, kept open (and unused) so that
    /// what it sent runs when the pause ends.
    held: ArcSwapOption<Conn>,
    /// A smoothed round trip of successful operations (µs; 0 until one).
    rtt_us: AtomicU64,
    /// Marker scripts found missing so far (see [`identify`]).
    markers: AtomicU64,
    /// The last `maxmemory-policy` read.
    policy: Mutex<Option<String>>,
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
        Self::start_with(connector, timeout, None)
    }

    /// Like [`Redis::start`], checking the fleet's state on every new session.
    pub fn start_with(
        connector: Connector,
        timeout: Duration,
        fleet: Option<FleetHook>,
    ) -> Arc<Redis> {
        gauge!(names::REDIS_ENABLED).set(1.0);
        gauge!(names::REDIS_UP).set(0.0);
        let r = Arc::new(Redis {
            connector,
            timeout,
            fleet,
            conn: ArcSwapOption::empty(),
            probe: ArcSwapOption::empty(),
            probe_state: Arc::default(),
            born: Instant::now(),
            strikes: AtomicU32::new(0),
            last_strike_us: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            session: watch::channel(Session::default()).0,
            renew: AtomicBool::new(false),
            lost_logged: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            loss: Mutex::new((LossKind::Gone, Instant::now())),
            held: ArcSwapOption::empty(),
            rtt_us: AtomicU64::new(0),
            markers: AtomicU64::new(0),
            policy: Mutex::new(None),
        });
        let weak = Arc::downgrade(&r);
        tokio::spawn(async move { reconnect_loop(weak).await });
        r
    }

    /// Whether Redis is usable now.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// The number of the last loss (0: none yet), what it was and when.
    pub fn last_loss(&self) -> (u64, LossKind, Instant) {
        let (kind, at) = *self.loss.lock().unwrap_or_else(|p| p.into_inner());
        (self.losses.load(Ordering::Acquire), kind, at)
    }

    /// A smoothed round trip of recent successful operations (zero until one).
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_us.load(Ordering::Relaxed))
    }

    fn record_rtt(&self, took: Duration) {
        let us = took.as_micros().min(u64::MAX as u128) as u64;
        let _ = self
            .rtt_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { us } else { (old * 7 + us) / 8 })
            });
    }

    /// Wakes the reconnect loop from its backoff (something suggests Redis works
    /// again).
    pub fn nudge(&self) {
        if !self.is_up() {
            self.wake.notify_one();
        }
    }

    /// Runs a write on the connection that Redis holds (after a loss to held writes),
    /// or on the current one: it is queued behind what Redis holds, and runs when the
    /// pause ends. Waits `redis.timeout_ms` for the answer: [`FleetError::Blocked`]
    /// means it is still held (the probes say Redis holds writes); no strike either
    /// way.
    pub async fn run_behind_held<T, F, Fut>(&self, op: Op, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.held.load_full().or_else(|| self.conn.load_full()) else {
            return Err(FleetError::Down);
        };
        let fut = f((*conn).clone());
        tokio::pin!(fut);
        let half = self.timeout / 2;
        let res = match tokio::time::timeout(half, &mut fut).await {
            Ok(r) => Ok(r),
            Err(_) => {
                self.start_probe();
                match tokio::time::timeout(self.timeout - half, &mut fut).await {
                    Ok(r) => Ok(r),
                    Err(e) => answered_meanwhile(&mut fut).await.ok_or(e),
                }
            }
        };
        match res {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "error").increment(1);
                Err(FleetError::Redis(e.to_string()))
            }
            Err(_) if self.holds_writes() => Err(FleetError::Blocked),
            Err(_) => Err(FleetError::Timeout),
        }
    }

    /// Runs a read on the side connection that answers `PING` (never held by a
    /// pause of writes): reads work while Redis holds writes. No strike; waits
    /// `redis.timeout_ms`.
    pub async fn read_side<T, F, Fut>(&self, op: Op, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(probes) = self.probe.load_full() else {
            return Err(FleetError::Down);
        };
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, f(probes.ping.clone())).await {
            Ok(Ok(v)) => {
                histogram!(names::REDIS_LATENCY, "op" => op.as_str())
                    .record(started.elapsed().as_secs_f64());
                Ok(v)
            }
            Ok(Err(e)) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "error").increment(1);
                Err(FleetError::Redis(e.to_string()))
            }
            Err(_) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "timeout")
                    .increment(1);
                Err(FleetError::Timeout)
            }
        }
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

    /// Marker scripts found missing so far (for [`identify`] on other connections).
    pub fn markers(&self) -> &AtomicU64 {
        &self.markers
    }

    /// Waits until Redis is up, at most `timeout`; returns whether it is.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let mut rx = self.sessions();
        let wait = rx.wait_for(|s| s.seq > 0);
        let _ = tokio::time::timeout(timeout, wait).await;
        self.is_up()
    }

    /// Runs one operation on the shared connection and records it. Within a request
    /// ([`with_budget`]) it waits at most what is left of the request's budget, else
    /// `redis.timeout_ms`. Fails at once while Redis is down.
    pub async fn run<T, F, Fut>(&self, op: Op, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let budget = budget_left();
        let limit = budget.map_or(self.timeout, |b| b.min(self.timeout));
        if limit.is_zero() {
            return Err(FleetError::Budget);
        }
        let _wait = BudgetWait::begin();
        self.run_within(op, limit, Duration::ZERO, f).await
    }

    /// Like [`Redis::run`] off any request (`redis.timeout_ms`), but an answer that
    /// comes later, within `patience` more, is still returned: the operation counts
    /// as a timeout for Redis's health all the same. (A lease's slot stays usable a
    /// little past the timeout: see [`super::limiter`].) A held operation (writes
    /// paused) is not waited for beyond the timeout.
    pub async fn run_patient<T, F, Fut>(
        &self,
        op: Op,
        patience: Duration,
        f: F,
    ) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_within(op, self.timeout, patience, f).await
    }

    /// Like [`Redis::run`] for the bus's bulk work, off any request: waits up to
    /// [`BACKGROUND_TIMEOUT`] (or `redis.timeout_ms` if longer).
    pub async fn run_long<T, F, Fut>(&self, op: Op, f: F) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_within(op, self.timeout.max(BACKGROUND_TIMEOUT), Duration::ZERO, f)
            .await
    }

    async fn run_within<T, F, Fut>(
        &self,
        op: Op,
        limit: Duration,
        patience: Duration,
        f: F,
    ) -> Result<T, FleetError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.load_full() else {
            return Err(FleetError::Down);
        };
        let started = Instant::now();
        // With tracing on, a round trip made for a recorded request is its child.
        let span = crate::trace::redis(op.as_str());
        let cut_short = limit < self.timeout;
        let fut = f((*conn).clone());
        tokio::pin!(fut);
        // Half way without an answer: ask the probe connection whether Redis answers
        // at all, so a timeout can tell "slow" from "holding our operation".
        let half = limit / 2;
        let res = match tokio::time::timeout(half, &mut fut).await {
            Ok(r) => Ok(r),
            Err(_) => {
                if !cut_short {
                    self.start_probe();
                }
                match tokio::time::timeout(limit - half, &mut fut).await {
                    Ok(r) => Ok(r),
                    Err(e) => answered_meanwhile(&mut fut).await.ok_or(e),
                }
            }
        };
        if let Some(span) = span {
            let error = match &res {
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
        match res {
            Ok(Ok(v)) => {
                let took = started.elapsed();
                histogram!(names::REDIS_LATENCY, "op" => op.as_str()).record(took.as_secs_f64());
                self.strikes.store(0, Ordering::Relaxed);
                self.record_rtt(took);
                Ok(v)
            }
            Ok(Err(e)) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "error").increment(1);
                let broken =
                    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error();
                tracing::debug!(op = op.as_str(), error = %e, "Redis operation failed");
                if denied(&e) {
                    log_denied(
                        &denied_command(&e),
                        "the fleet cannot work without it (see the README for the commands it needs)",
                    );
                }
                if broken {
                    self.lost(&conn, &format!("{e}"), LossKind::Gone);
                } else {
                    self.strike(&conn, LossKind::Refusing, "errors", started);
                }
                Err(FleetError::Redis(e.to_string()))
            }
            Err(_) => {
                counter!(names::REDIS_ERRORS, "op" => op.as_str(), "kind" => "timeout")
                    .increment(1);
                if cut_short {
                    // The request's budget, not Redis, ran out: no strike.
                    return Err(FleetError::Budget);
                }
                if self.holds_writes() {
                    self.strike(
                        &conn,
                        LossKind::Held,
                        "held operations (writes paused)",
                        started,
                    );
                    Err(FleetError::Blocked)
                } else {
                    self.strike(&conn, LossKind::Slow, "timeouts", started);
                    if patience.is_zero() {
                        return Err(FleetError::Timeout);
                    }
                    // Late, but its answer may still be of use.
                    match tokio::time::timeout(patience, &mut fut).await {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(FleetError::Redis(e.to_string())),
                        Err(_) => Err(FleetError::Timeout),
                    }
                }
            }
        }
    }

    /// Sends a `PING` (unless one is in flight) and a no-op script (unless one is
    /// pending) on the probe connection, and records when each answered. Redis
    /// answering the `PING` while the script stays pending holds scripts and writes
    /// (`CLIENT PAUSE WRITE`); answering both, it is not Redis that holds our
    /// operation (our own connection is congested).
    fn start_probe(&self) {
        let Some(probes) = self.probe.load_full() else {
            return;
        };
        let st = &self.probe_state;
        let born = self.born;
        let us = move || born.elapsed().as_micros() as u64;
        if !st.script_pending.swap(true, Ordering::AcqRel) {
            st.script_sent_us.store(us(), Ordering::Release);
            let (st, mut c) = (st.clone(), probes.script.clone());
            tokio::spawn(async move {
                let run = NOOP_SCRIPT.invoke_async::<_, i64>(&mut c);
                let _ = tokio::time::timeout(PROBE_SCRIPT_WAIT, run).await;
                st.script_pending.store(false, Ordering::Release);
            });
        }
        if !st.ping_inflight.swap(true, Ordering::AcqRel) {
            let (st, timeout, mut c) = (st.clone(), self.timeout, probes.ping.clone());
            tokio::spawn(async move {
                let sent = us();
                let cmd = redis::cmd("PING");
                let ping = cmd.query_async::<String>(&mut c);
                if matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(ref s)) if s == "PONG")
                {
                    let mut last = st.ping.lock().unwrap_or_else(|p| p.into_inner());
                    if sent >= last.0 {
                        *last = (sent, us().saturating_sub(sent));
                    }
                }
                st.ping_inflight.store(false, Ordering::Release);
            });
        }
    }

    /// Whether Redis holds writes now, as the probes tell: the no-op script has been
    /// pending well past the round trip of a `PING` sent after it (and answered). A
    /// Redis that is merely slow answers both alike.
    fn holds_writes(&self) -> bool {
        let st = &self.probe_state;
        if !st.script_pending.load(Ordering::Acquire) {
            return false;
        }
        let sent = st.script_sent_us.load(Ordering::Acquire);
        let (ping_sent, ping_rtt) = *st.ping.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.born.elapsed().as_micros() as u64;
        ping_sent >= sent && now.saturating_sub(sent) > 2 * ping_rtt + 5_000
    }

    /// Counts a failed operation begun at `started`: once per run of failures (those
    /// already under way when the last one counted do not count again), so that
    /// operations sent together and failing together are one strike, not three.
    fn strike(&self, conn: &Arc<Conn>, kind: LossKind, what: &str, started: Instant) {
        let began = started.saturating_duration_since(self.born).as_micros() as u64;
        let now = self.born.elapsed().as_micros() as u64;
        let last = self.last_strike_us.load(Ordering::Acquire);
        if began < last
            || self
                .last_strike_us
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        if self.strikes.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES {
            self.lost(conn, &format!("{STRIKES} {what} in a row"), kind);
        }
    }

    /// Starts a new session while this one keeps serving (the servers behind the
    /// connection changed, e.g. a cluster failover): once established, it replaces
    /// the connection and is announced like a reconnection.
    pub fn renew(&self, why: &str) {
        if !self.renew.swap(true, Ordering::AcqRel) {
            tracing::warn!(redis = %self.connector.url(), reason = why, "Redis topology changed; starting a new session");
            self.wake.notify_one();
        }
    }

    /// Drops `conn` (if it is still the one in use) and starts reconnecting. When
    /// Redis holds writes, the connection is kept open (not used) until the next
    /// session: what it sent is executed when the pause ends (the rate limiter's
    /// markers, see [`super::limiter`]), and the side connections stay for reads.
    fn lost(&self, conn: &Arc<Conn>, why: &str, kind: LossKind) {
        let cur = self.conn.load();
        let same = cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn));
        if !same {
            return;
        }
        let prev = self.conn.compare_and_swap(&*cur, None);
        if prev.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *self.loss.lock().unwrap_or_else(|p| p.into_inner()) = (kind, Instant::now());
            self.losses.fetch_add(1, Ordering::AcqRel);
            if kind == LossKind::Held {
                self.held.store(Some(conn.clone()));
            } else {
                self.probe.store(None);
            }
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

/// The side connections that tell a slow Redis from one that holds scripts.
struct Probes {
    /// For `PING`.
    ping: Conn,
    /// For the no-op script.
    script: Conn,
}

/// What the probe connections found.
#[derive(Debug, Default)]
struct ProbeState {
    /// The last `PING` answered: when it was sent (µs since [`Redis::born`]) and its
    /// round trip (µs).
    ping: Mutex<(u64, u64)>,
    /// When the pending no-op script was sent.
    script_sent_us: AtomicU64,
    /// Whether a `PING` is in flight.
    ping_inflight: AtomicBool,
    /// Whether the no-op script is pending.
    script_pending: AtomicBool,
}

/// The command a `NOPERM` error names, for the log.
fn denied_command(e: &redis::RedisError) -> String {
    let text = e.to_string();
    text.split('\'')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_else(|| "a command".to_string())
}

/// What one successful attempt established.
struct Established {
    conn: Conn,
    probes: Probes,
    identity: String,
    /// The fleet's state in Redis went back (see [`super::heartbeat::session`]).
    lost: bool,
}

/// One attempt at a new session: connect, identify the server, load the scripts,
/// check the policy, run the fleet's session script (a write: a Redis that does not
/// take writes now does not count as back), open the probe connection.
async fn establish(r: &Redis, last_identity: Option<&str>) -> RedisResult<Established> {
    let marker = r.connector.marker("main");
    let mut c = r.connector.connect("main").await?;
    let identity = identify(&mut c, &marker, &r.markers).await?;
    for script in super::all_scripts() {
        script.load_async(&mut c).await?;
    }
    check_policy(&mut c, &r.policy).await;
    let changed = last_identity.is_some_and(|prev| topology::server_changed(prev, &identity));
    let lost = match &r.fleet {
        Some(h) => super::heartbeat::session(&mut c, &h.keys, &h.shared, changed).await?,
        None => false,
    };
    // Two: a client whose script is held holds its later commands too.
    let probes = Probes {
        ping: r.connector.connect("probe").await?,
        script: r.connector.connect("probe-script").await?,
    };
    Ok(Established {
        conn: c,
        probes,
        identity,
        lost,
    })
}

async fn reconnect_loop(weak: std::sync::Weak<Redis>) {
    let mut backoff = MIN_BACKOFF;
    let mut last_identity: Option<String> = None;
    let mut seq = 0u64;
    loop {
        let Some(r) = weak.upgrade() else { return };
        if r.is_up() && !r.renew.swap(false, Ordering::AcqRel) {
            let wake = r.wake.clone();
            let notified = wake.notified();
            drop(r);
            notified.await;
            continue;
        }
        let attempt = establish(&r, last_identity.as_deref());
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(e)) => {
                seq += 1;
                let changed = last_identity
                    .as_ref()
                    .is_some_and(|p| topology::server_changed(p, &e.identity));
                let restarted = changed || e.lost;
                last_identity = Some(e.identity.clone());
                r.strikes.store(0, Ordering::Relaxed);
                // Writes run again: what the held connection sent has run.
                r.held.store(None);
                r.probe.store(Some(Arc::new(e.probes)));
                r.conn.store(Some(Arc::new(e.conn)));
                gauge!(names::REDIS_UP).set(1.0);
                if r.lost_logged.swap(false, Ordering::Relaxed) {
                    tracing::warn!(redis = %r.connector.url(), restarted, "Redis is back; the fleet is whole again");
                } else if seq == 1 {
                    tracing::info!(redis = %r.connector.url(), "connected to Redis; part of the fleet");
                } else {
                    tracing::info!(redis = %r.connector.url(), restarted, "reconnected to Redis");
                }
                r.session.send_replace(Session {
                    seq,
                    identity: e.identity,
                    restarted,
                });
                backoff = MIN_BACKOFF;
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => "connecting timed out (or Redis does not take writes now)".to_string(),
                };
                if r.is_up() {
                    // A renewal failed; the current session still serves: try again.
                    r.renew.store(true, Ordering::Release);
                    tracing::debug!(error = %why, "new Redis session not established yet");
                } else if !r.lost_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        redis = %r.connector.url(),
                        error = %why,
                        "cannot reach Redis; serving without it (single-gateway mode) until it answers"
                    );
                } else {
                    tracing::debug!(error = %why, "Redis still unusable");
                }
                let wake = r.wake.clone();
                drop(r);
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                // A nudge (see Redis::nudge) ends the pause early.
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = wake.notified() => {}
                }
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
    } else if denied(e) {
        format!(
            "Redis denies a command the fleet needs to this user ({text}); see the README for the commands it needs"
        )
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

    #[tokio::test]
    async fn a_budget_is_shared_by_the_operations_of_a_request_and_overlaps_count_once() {
        assert_eq!(budget_left(), None);
        assert!(BudgetWait::begin().is_none());
        let ms = Duration::from_millis;
        with_budget(ms(1000), async {
            assert_eq!(budget_left(), Some(ms(1000)));
            // Two operations waited for together: charged once.
            let t = Instant::now();
            let a = BudgetWait::begin();
            let b = BudgetWait::begin();
            tokio::time::sleep(ms(100)).await;
            drop(a);
            drop(b);
            let took = t.elapsed();
            let left = budget_left().unwrap();
            assert!(left >= ms(1000) - took, "{left:?} after {took:?}");
            assert!(left < ms(1000) - took / 2, "{left:?} after {took:?}");
            // Time not spent waiting on Redis is not charged.
            tokio::time::sleep(ms(50)).await;
            assert_eq!(budget_left(), Some(left));
            // A wait past what is left spends it all.
            {
                let _c = BudgetWait::begin();
                tokio::time::sleep(left + ms(10)).await;
                assert_eq!(budget_left(), Some(Duration::ZERO));
            }
            assert_eq!(budget_left(), Some(Duration::ZERO));
            // A future already done is not refused.
            assert_eq!(within_budget(async { 1 }).await, Some(1));
        })
        .await;
    }
}
