//! The Redis deployments besides one endpoint (`redis.mode`): a Redis Cluster and a
//! Sentinel-managed primary. Everything else in the fleet talks to a [`Conn`] and
//! does not know which it is.
//!
//! - **Cluster** (`mode = "cluster"`): `redis.url` and `redis.urls` are seed nodes;
//!   redis-rs's cluster client discovers the slots, follows `MOVED` and `ASK` (a
//!   reshard), refreshes the topology on `MOVED`/`READONLY`, and retries `TRYAGAIN`
//!   and `CLUSTERDOWN` with short waits, all within the operation's deadline, so none
//!   of these counts against Redis. Every script touches one hash tag (see
//!   [`super::keys`]); a pipeline whose commands span several slots (a group's index
//!   sets, a chunk of accounts' generations) is split here by hash tag, the parts run
//!   at once, and the answers are put back in order: one round trip per node.
//! - **Sentinel** (`mode = "sentinel"`): every connection asks the sentinels
//!   (`redis.sentinels`) for the primary named `redis.master_name`, checks that it
//!   says it is a primary (`ROLE`), and connects to it.
//! - **Failovers.** A new primary may have lost what the old one acknowledged, so a
//!   failover must count as a restart (generation raised past every value seen,
//!   memory dropped: [`super::heartbeat`]). A Sentinel failover closes the old
//!   primary's connections (or the old primary is gone), so the reconnection finds
//!   another server (`run_id`). A cluster failover keeps every connection, so
//!   [`watch`] asks the cluster every [`WATCH_EVERY`] which nodes own slots and which
//!   process each is (`CLUSTER NODES`, `INFO server`): a slot owner gone or
//!   restarted starts a new session, like a reconnection to another server. Slots
//!   moving between the same nodes (a reshard) lose nothing and start nothing.
//!
//! Auth and TLS apply to every connection: seeds and every node discovered (the
//! credentials and scheme of `redis.url`, the same for every seed), the sentinels
//! (their URLs'), and the primaries they name (`redis.url`'s credentials, scheme and
//! database). TLS is rustls; `redis.ca_file`, when set, is the root these
//! connections trust (else the bundled web PKI roots).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, RedisFuture, RedisResult, TlsCertificates, Value,
};

use super::conn::{Op, Redis};
use crate::config::{RedisMode, RedisSettings, RedisUrl};

/// How often a cluster's slot owners are checked for a failover or a restart.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long connecting to one node (or sentinel) may take.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to Redis, whichever the deployment: one server (standalone, or the
/// primary Sentinel names) or a whole cluster. Cloning is cheap (both are
/// multiplexed handles).
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(MultiplexedConnection),
    /// A Redis Cluster (routing by slot, following redirections).
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => {
                let parts = split_by_tag(pipeline);
                if parts.len() <= 1 || pipeline.is_transaction() {
                    return c.req_packed_commands(pipeline, offset, count);
                }
                let c = c.clone();
                Box::pin(run_split(c, parts, pipeline.len()))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The hash tag (or whole key) a command's first key is slotted by; `None` for a
/// command without a key.
fn command_tag(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            if n == 0 {
                return None;
            }
            *args.get(3)?
        }
        _ => *args.get(1)?,
    };
    Some(hash_tag(key).to_vec())
}

/// The part of `key` Redis Cluster hashes: the first `{...}` if not empty, else all.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// A pipeline's commands grouped by hash tag: (the commands' indexes, a pipeline of
/// them). Keyless commands go with the first group.
fn split_by_tag(pipeline: &Pipeline) -> Vec<(Vec<usize>, Pipeline)> {
    let mut groups: Vec<(Option<Vec<u8>>, Vec<usize>, Pipeline)> = Vec::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let tag = command_tag(cmd);
        let slot = match &tag {
            None if !groups.is_empty() => 0,
            _ => match groups.iter().position(|(t, _, _)| *t == tag) {
                Some(g) => g,
                None => {
                    groups.push((tag, Vec::new(), redis::pipe()));
                    groups.len() - 1
                }
            },
        };
        let (_, idx, p) = &mut groups[slot];
        idx.push(i);
        p.add_command(cmd.clone());
    }
    groups.into_iter().map(|(_, i, p)| (i, p)).collect()
}

/// Runs the parts of a pipeline at once and puts the answers back in its order.
async fn run_split(
    c: ClusterConnection,
    parts: Vec<(Vec<usize>, Pipeline)>,
    len: usize,
) -> RedisResult<Vec<Value>> {
    let runs = parts.into_iter().map(|(idx, p)| {
        let mut c = c.clone();
        async move {
            let n = p.len();
            let v = c.req_packed_commands(&p, 0, n).await?;
            Ok::<_, redis::RedisError>((idx, v))
        }
    });
    let done = futures_util::future::try_join_all(runs).await?;
    let mut out = vec![Value::Nil; len];
    for (idx, values) in done {
        for (i, v) in idx.into_iter().zip(values) {
            if let Some(slot) = out.get_mut(i) {
                *slot = v;
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// Connecting.

/// How to connect to a cluster or through sentinels.
pub enum Topology {
    /// A Redis Cluster.
    Cluster(redis::cluster::ClusterClient),
    /// A primary Sentinel names (the client keeps its sentinel connections).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::Cluster(_) => "Topology::Cluster",
            Topology::Sentinel(_) => "Topology::Sentinel",
        })
    }
}

fn addr_of(u: &RedisUrl) -> ConnectionAddr {
    if u.tls {
        ConnectionAddr::TcpTls {
            host: u.host.clone(),
            port: u.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(u.host.clone(), u.port)
    }
}

fn ca_certs(r: &RedisSettings) -> Result<Option<TlsCertificates>, String> {
    let Some(path) = &r.ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| format!("redis.ca_file {}: {e}", path.display()))?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

impl Topology {
    /// The topology `[redis]` describes; `None` for one endpoint (standalone).
    pub fn new(r: &RedisSettings) -> Result<Option<Topology>, String> {
        // redis-rs builds its rustls configurations with the process's default
        // provider: make it ring, as everywhere else in the gateway.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = ca_certs(r)?;
        match r.mode {
            RedisMode::Standalone => Ok(None),
            RedisMode::Cluster => {
                let seeds: Vec<ConnectionInfo> = std::iter::once(&r.url)
                    .chain(&r.urls)
                    .map(|u| {
                        addr_of(u)
                            .into_connection_info()
                            .map(|i| i.set_redis_settings(RedisConnectionInfo::default()))
                    })
                    .collect::<RedisResult<_>>()
                    .map_err(|e| format!("redis.urls: {e}"))?;
                let mut b = ClusterClientBuilder::new(seeds)
                    .connection_timeout(NODE_CONNECT_TIMEOUT)
                    // Redirections and retries: quick, as our own deadline bounds them.
                    .retries(16)
                    .min_retry_wait(1)
                    .max_retry_wait(100)
                    .retry_wait_formula(2, 2)
                    // Our deadlines apply per operation; the bus blocks on XREAD.
                    .overall_response_timeout(None);
                if let Some(user) = &r.url.username {
                    b = b.username(user);
                }
                if let Some(pw) = &r.url.password {
                    b = b.password(pw.expose());
                }
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                let client = b
                    .build()
                    .map_err(|e| format!("redis.url / redis.urls: {e}"))?;
                Ok(Some(Topology::Cluster(client)))
            }
            RedisMode::Sentinel => {
                let name = r.master_name.clone().unwrap_or_default();
                let first = r
                    .sentinels
                    .first()
                    .ok_or_else(|| "redis.sentinels is empty".to_string())?;
                let mut b = SentinelClientBuilder::new(
                    r.sentinels.iter().map(addr_of),
                    name,
                    SentinelServerType::Master,
                )
                .map_err(|e| format!("redis.sentinels: {e}"))?;
                if let Some(user) = &first.username {
                    b = b.set_client_to_sentinel_username(user);
                }
                if let Some(pw) = &first.password {
                    b = b.set_client_to_sentinel_password(pw.expose());
                }
                if let Some(user) = &r.url.username {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(pw) = &r.url.password {
                    b = b.set_client_to_redis_password(pw.expose());
                }
                b = b.set_client_to_redis_db(r.url.db);
                if r.url.tls {
                    b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
                }
                if let Some(c) = certs {
                    if first.tls {
                        b = b.set_client_to_sentinel_certificates(c.clone());
                    }
                    if r.url.tls {
                        b = b.set_client_to_redis_certificates(c);
                    }
                }
                let client = b.build().map_err(|e| format!("redis.sentinels: {e}"))?;
                Ok(Some(Topology::Sentinel(tokio::sync::Mutex::new(client))))
            }
        }
    }

    /// Opens a connection: to the whole cluster, or to the primary the sentinels name
    /// now.
    pub async fn connect(&self, cfg: AsyncConnectionConfig) -> RedisResult<Conn> {
        match self {
            Topology::Cluster(client) => {
                let c = client
                    .get_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(NODE_CONNECT_TIMEOUT),
                    )
                    .await?;
                Ok(Conn::Cluster(c))
            }
            Topology::Sentinel(client) => {
                let primary = client.lock().await.async_get_client().await?;
                let c = primary
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?;
                Ok(Conn::Single(c))
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Which servers answer.

/// For a cluster connection: `cluster:<node id>=<run_id>,...` over the nodes that
/// own slots now (the cluster's own view, `CLUSTER NODES`), with each one's process
/// (`INFO server`; `-` where not known, e.g. the user may not run `INFO`). `None`
/// for one server.
pub async fn cluster_identity(c: &mut Conn) -> RedisResult<Option<String>> {
    let Conn::Cluster(cc) = c else {
        return Ok(None);
    };
    let nodes: String = match redis::cmd("CLUSTER").arg("NODES").query_async(cc).await {
        Ok(n) => n,
        Err(e) if super::conn::denied(&e) => {
            super::conn::log_denied(
                "CLUSTER NODES",
                "a cluster failover is then told only by the primaries' run_id (INFO)",
            );
            String::new()
        }
        Err(e) => return Err(e),
    };
    // node id -> "host:port" of every primary that owns slots.
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let flags: Vec<&str> = f.get(2).map_or(Vec::new(), |x| x.split(',').collect());
        let down = flags
            .iter()
            .any(|x| matches!(*x, "fail" | "fail?" | "handshake" | "noaddr"));
        if f.len() < 9 || !flags.contains(&"master") || down {
            continue;
        }
        let addr = f[1].split('@').next().unwrap_or("").to_string();
        owners.insert(f[0].to_string(), addr);
    }
    let mut run_ids: BTreeMap<String, String> = BTreeMap::new();
    match redis::cmd("INFO")
        .arg("server")
        .query_async::<Value>(cc)
        .await
    {
        Ok(v) => {
            for (addr, info) in per_node(v) {
                if let Some(id) = info.lines().find_map(|l| l.strip_prefix("run_id:")) {
                    run_ids.insert(addr, id.trim().to_string());
                }
            }
        }
        Err(e) if super::conn::denied(&e) => super::conn::log_denied(
            "INFO",
            "a restarted cluster node is then told only by its node id (a failover still is)",
        ),
        Err(e) => return Err(e),
    }
    let parts: Vec<String> = if owners.is_empty() {
        // No CLUSTER NODES: the primaries the client routes to, by address.
        run_ids.iter().map(|(a, r)| format!("{a}={r}")).collect()
    } else {
        owners
            .iter()
            .map(|(id, addr)| {
                let run = run_ids.get(addr).map_or("-", String::as_str);
                format!("{id}={run}")
            })
            .collect()
    };
    Ok(Some(format!("cluster:{}", parts.join(","))))
}

/// A multi-node answer (address → text).
fn per_node(v: Value) -> Vec<(String, String)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        _ => String::new(),
    };
    match v {
        Value::Map(kv) => kv.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::Array(p) if p.len() == 2 => Some((text(&p[0]), text(&p[1]))),
                _ => None,
            })
            .collect(),
        other => vec![(String::new(), text(&other))],
    }
}

/// Whether the server(s) behind identity `new` may not hold what those behind `old`
/// held: another server process, or, for a cluster, a slot owner of `old` gone
/// (failed over, removed) or restarted. A cluster that only gained nodes holds
/// everything it held.
pub fn server_changed(old: &str, new: &str) -> bool {
    match (old.strip_prefix("cluster:"), new.strip_prefix("cluster:")) {
        (Some(o), Some(n)) => {
            let parse = |s: &str| -> BTreeMap<String, String> {
                s.split(',')
                    .filter_map(|p| p.split_once('='))
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect()
            };
            let (o, n) = (parse(o), parse(n));
            o.iter().any(|(id, run)| match n.get(id) {
                None => true,
                Some(r) => run != "-" && r != "-" && r != run,
            })
        }
        _ => old != new,
    }
}

/// Watches a cluster's slot owners, or a Sentinel primary's role, every
/// [`WATCH_EVERY`] while Redis is up, and starts a new session when they are not
/// the servers of the current one (see the module documentation).
pub fn watch(redis: &Arc<Redis>, mode: RedisMode) {
    if mode == RedisMode::Standalone {
        return;
    }
    let weak = Arc::downgrade(redis);
    tokio::spawn(async move {
        // Whether the user may run ROLE (Sentinel): asked no more once denied.
        let mut role_allowed = true;
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let Some(r) = weak.upgrade() else { return };
            if !r.is_up() {
                continue;
            }
            let current = r.sessions().borrow().identity.clone();
            let why = match mode {
                RedisMode::Cluster => {
                    let id = r
                        .run_long(Op::Heartbeat, |mut c| async move {
                            cluster_identity(&mut c).await
                        })
                        .await;
                    match id {
                        Ok(Some(id)) if server_changed(&current, &id) => {
                            Some("the cluster's slot owners changed (failover or restart)")
                        }
                        Ok(_) => None,
                        Err(e) => {
                            tracing::debug!(error = %e, "the cluster's topology check failed");
                            None
                        }
                    }
                }
                RedisMode::Sentinel if role_allowed => {
                    let role = r
                        .run_long(Op::Heartbeat, |mut c| async move {
                            redis::cmd("ROLE").query_async::<Value>(&mut c).await
                        })
                        .await;
                    match role {
                        Ok(Value::Array(items)) if matches!(items.first(), Some(Value::BulkString(b)) if b != b"master") => {
                            Some("the server is no longer the primary (Sentinel failover)")
                        }
                        Err(super::conn::FleetError::Redis(e)) if e.contains("NOPERM") => {
                            role_allowed = false;
                            None
                        }
                        _ => None,
                    }
                }
                RedisMode::Sentinel | RedisMode::Standalone => None,
            };
            if let Some(why) = why {
                r.renew(why);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_as_redis_cluster_reads_them() {
        assert_eq!(hash_tag(b"p:1:{a:alice}:gen"), b"a:alice");
        assert_eq!(hash_tag(b"p:{}:x"), b"p:{}:x");
        assert_eq!(hash_tag(b"plain"), b"plain");
        let mut e = redis::cmd("EVALSHA");
        e.arg("abc")
            .arg(2)
            .arg("x:{fleet}:gen")
            .arg("y:{fleet}:seq");
        assert_eq!(command_tag(&e), Some(b"fleet".to_vec()));
        let mut none = redis::cmd("EVALSHA");
        none.arg("abc").arg(0);
        assert_eq!(command_tag(&none), None);
    }

    #[test]
    fn a_pipeline_is_split_by_tag_and_keeps_its_order() {
        let mut p = redis::pipe();
        p.cmd("GET")
            .arg("{a}1")
            .cmd("GET")
            .arg("{b}1")
            .cmd("GET")
            .arg("{a}2");
        let parts = split_by_tag(&p);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, vec![0, 2]);
        assert_eq!(parts[1].0, vec![1]);
    }

    #[test]
    fn only_a_lost_or_restarted_slot_owner_is_a_changed_server() {
        let a = "cluster:n1=r1,n2=r2,n3=r3";
        assert!(!server_changed(a, a));
        assert!(!server_changed(a, "cluster:n1=r1,n2=r2,n3=r3,n4=r4"));
        assert!(server_changed(a, "cluster:n1=r1,n2=r2,n4=r4"));
        assert!(server_changed(a, "cluster:n1=r1,n2=r2,n3=rX"));
        assert!(!server_changed("cluster:n1=-", "cluster:n1=r1"));
        assert!(server_changed("run_id:a", "run_id:b"));
        assert!(!server_changed("run_id:a", "run_id:a"));
    }
}
