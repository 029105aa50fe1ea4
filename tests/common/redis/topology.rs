//! A real Redis Cluster (masters, each with its replicas) and a real Sentinel set (a
//! primary, a replica, three sentinels), on free loopback ports, killed on drop;
//! optionally with a password and TLS (one test CA for every process). With
//! `DEBUG_REDIS_LOGS=<dir>` the data nodes log there (for a failing test).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::die_with_parent;
use super::{command_at, free_port, make_pki, RedisOpts, RedisServer};

/// How to start a cluster or a Sentinel set.
#[derive(Debug, Clone, Default)]
pub struct TopologyOpts {
    /// `requirepass` (and `masterauth`) on every data node.
    pub password: Option<String>,
    /// TLS ports too (clients, replication and the cluster bus over TLS).
    pub tls: bool,
}

impl TopologyOpts {
    /// The credentials part of a URL: `:pw@`, or nothing without a password.
    fn url_auth(&self) -> String {
        self.password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default()
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn data_node(
    opts: &TopologyOpts,
    pki: Option<&PathBuf>,
    extra: Vec<(String, String)>,
) -> RedisServer {
    let mut extra = extra;
    if let Some(pw) = &opts.password {
        extra.push(("masterauth".into(), pw.clone()));
    }
    if opts.tls {
        extra.push(("tls-replication".into(), "yes".into()));
    }
    if let Ok(d) = std::env::var("DEBUG_REDIS_LOGS") {
        extra.push(("logfile".into(), format!("{d}/redis-{}.log", free_port())));
        extra.push(("loglevel".into(), "notice".into()));
    }
    RedisServer::start_with(RedisOpts {
        password: opts.password.clone(),
        tls: opts.tls,
        extra,
        pki_from: pki.cloned(),
        ..RedisOpts::default()
    })
}

// ---------------------------------------------------------------------------------
// Redis Cluster.

/// A Redis Cluster: `masters` nodes owning the 16384 slots in equal ranges, each with
/// `replicas` replicas.
pub struct RedisCluster {
    /// Masters first, then replicas (replica `r` of master `m` at
    /// `masters + m * replicas + r`), in the roles they started with.
    pub nodes: Vec<RedisServer>,
    pub masters: usize,
    pub opts: TopologyOpts,
    pki_dir: Option<tempfile::TempDir>,
}

impl RedisCluster {
    /// Starts and assembles the cluster; returns once every node agrees it is ok.
    pub fn start(masters: usize, replicas: usize, opts: TopologyOpts) -> RedisCluster {
        let pki_dir = opts.tls.then(|| {
            let d = tempfile::tempdir().unwrap();
            make_pki(d.path());
            d
        });
        let pki = pki_dir.as_ref().map(|d| d.path().to_path_buf());
        let n = masters * (1 + replicas);
        let mut nodes = Vec::new();
        for _ in 0..n {
            let mut extra: Vec<(String, String)> = vec![
                ("cluster-enabled".into(), "yes".into()),
                ("cluster-config-file".into(), "nodes.conf".into()),
                ("cluster-node-timeout".into(), "3000".into()),
                ("cluster-port".into(), free_port().to_string()),
                // Replicas never fail over on their own in a test: a test says when.
                ("cluster-replica-no-failover".into(), "yes".into()),
            ];
            if opts.tls {
                extra.push(("tls-cluster".into(), "yes".into()));
            }
            nodes.push(data_node(&opts, pki.as_ref(), extra));
        }
        let c = RedisCluster {
            nodes,
            masters,
            opts,
            pki_dir,
        };
        // Slots in equal ranges.
        let per = 16384 / masters;
        for m in 0..masters {
            let (from, to) = (
                m * per,
                if m + 1 == masters {
                    16383
                } else {
                    (m + 1) * per - 1
                },
            );
            let r = c.cmd(
                m,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &from.to_string(),
                    &to.to_string(),
                ],
            );
            assert_eq!(r, "OK");
        }
        for i in 1..n {
            let bus = c.bus_port(i);
            let r = c.cmd(
                0,
                &[
                    "CLUSTER",
                    "MEET",
                    "127.0.0.1",
                    &c.nodes[i].port.to_string(),
                    &bus,
                ],
            );
            assert_eq!(r, "OK");
        }
        c.wait_known(n);
        for m in 0..masters {
            let id = c.node_id(m);
            for r in 0..replicas {
                let i = masters + m * replicas + r;
                wait_until(
                    "the replica knows its master",
                    Duration::from_secs(20),
                    || c.cmd(i, &["CLUSTER", "REPLICATE", &id]) == "OK",
                );
            }
        }
        for i in masters..n {
            c.nodes[i].wait_synced();
        }
        c.wait_ok();
        c
    }

    fn bus_port(&self, i: usize) -> String {
        let info = self.cmd(i, &["CONFIG", "GET", "cluster-port"]);
        info.lines().nth(1).unwrap_or("0").to_string()
    }

    /// One command to node `i` (plain port), its reply as text.
    pub fn cmd(&self, i: usize, args: &[&str]) -> String {
        command_at(self.nodes[i].port, self.opts.password.as_deref(), args)
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    /// Node `i`'s cluster id.
    pub fn node_id(&self, i: usize) -> String {
        self.cmd(i, &["CLUSTER", "MYID"])
    }

    fn wait_known(&self, n: usize) {
        for i in 0..self.nodes.len() {
            wait_until(
                "every node knows every other",
                Duration::from_secs(20),
                || {
                    self.cmd(i, &["CLUSTER", "INFO"])
                        .contains(&format!("cluster_known_nodes:{n}"))
                },
            );
        }
    }

    /// Waits until every node says the cluster is ok and agrees on who owns each slot.
    pub fn wait_ok(&self) {
        wait_until(
            "cluster_state:ok everywhere",
            Duration::from_secs(30),
            || {
                let views: Vec<BTreeMap<u16, String>> =
                    (0..self.nodes.len()).map(|i| self.slot_owners(i)).collect();
                (0..self.nodes.len()).all(|i| {
                    self.cmd(i, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                }) && views.windows(2).all(|w| w[0] == w[1])
                    && views[0]
                        .values()
                        .collect::<std::collections::BTreeSet<_>>()
                        .len()
                        == self.masters
            },
        );
    }

    /// Node `i`'s view: the first slot of each range → the id of the node owning it.
    fn slot_owners(&self, i: usize) -> BTreeMap<u16, String> {
        let mut out = BTreeMap::new();
        for line in self.cmd(i, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            for range in &f[8..] {
                if range.starts_with('[') {
                    continue;
                }
                let first = range.split('-').next().unwrap_or("0").parse().unwrap_or(0);
                out.insert(first, f[0].to_string());
            }
        }
        out
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.cmd(0, &["CLUSTER", "KEYSLOT", key]).parse().unwrap()
    }

    /// The index of the node that owns `slot` now.
    pub fn owner_of(&self, slot: u16) -> usize {
        for i in 0..self.nodes.len() {
            let nodes = self.cmd(i, &["CLUSTER", "NODES"]);
            let me = nodes.lines().find(|l| l.contains("myself")).unwrap_or("");
            let f: Vec<&str> = me.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let owns = f[8..].iter().any(|r| {
                if r.starts_with('[') {
                    return false;
                }
                let mut p = r.split('-');
                let a: u16 = p.next().and_then(|x| x.parse().ok()).unwrap_or(u16::MAX);
                let b: u16 = p.next().and_then(|x| x.parse().ok()).unwrap_or(a);
                (a..=b).contains(&slot)
            });
            if owns {
                return i;
            }
        }
        panic!("nobody owns slot {slot}");
    }

    /// Moves `slot` with its keys to master `to` the way `redis-cli --cluster
    /// reshard` does: `SETSLOT IMPORTING/MIGRATING`, `MIGRATE` of its keys `batch` at
    /// a time with `pause` between batches (clients meanwhile get `ASK` and
    /// `TRYAGAIN`), then `SETSLOT NODE` everywhere. Returns the keys moved.
    pub fn migrate_slot(&self, slot: u16, to: usize, batch: usize, pause: Duration) -> usize {
        let from = self.owner_of(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let s = slot.to_string();
        assert_eq!(
            self.cmd(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]),
            "OK"
        );
        assert_eq!(
            self.cmd(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]),
            "OK"
        );
        // With tls-cluster, MIGRATE speaks TLS: the target's TLS port.
        let port = self.nodes[to]
            .tls_port
            .filter(|_| self.opts.tls)
            .unwrap_or(self.nodes[to].port)
            .to_string();
        let mut moved = 0;
        loop {
            let keys = self.cmd(from, &["CLUSTER", "GETKEYSINSLOT", &s, &batch.to_string()]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", port.as_str(), "", "0", "5000"];
            if let Some(pw) = &self.opts.password {
                args.push("AUTH");
                args.push(pw);
            }
            args.push("KEYS");
            args.extend(keys.iter().copied());
            let r = self.cmd(from, &args);
            assert!(r == "OK" || r == "NOKEY", "MIGRATE: {r}");
            moved += keys.len();
            std::thread::sleep(pause);
        }
        for i in 0..self.nodes.len() {
            if self.cmd(i, &["ROLE"]).starts_with("master") {
                let r = self.cmd(i, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
                assert_eq!(r, "OK", "SETSLOT NODE on node {i}");
            }
        }
        moved
    }

    /// `CLUSTER FAILOVER` on replica `i` (its master hands over without losing a
    /// write); returns once every node sees `i` as a master.
    pub fn failover(&self, i: usize) {
        let r = self.cmd(i, &["CLUSTER", "FAILOVER"]);
        assert_eq!(r, "OK", "CLUSTER FAILOVER: {r}");
        let id = self.node_id(i);
        wait_until(
            "the replica became a master everywhere",
            Duration::from_secs(20),
            || {
                (0..self.nodes.len()).all(|n| {
                    self.cmd(n, &["CLUSTER", "NODES"])
                        .lines()
                        .any(|l| l.starts_with(&id) && l.contains("master"))
                })
            },
        );
        self.wait_ok();
        // The old master now replicates from the new one: wait until it has synced,
        // so the cluster could fail over again.
        for n in 0..self.nodes.len() {
            if self.cmd(n, &["ROLE"]).starts_with("slave") {
                wait_until("the replicas synced", Duration::from_secs(20), || {
                    let info = self.cmd(n, &["INFO", "replication"]);
                    info.contains("master_link_status:up")
                        && info.contains("master_sync_in_progress:0")
                });
            }
        }
    }

    /// The replica of the master that owns `slot` now (any node replicating it).
    pub fn replica_of_owner(&self, slot: u16) -> usize {
        let owner = self.node_id(self.owner_of(slot));
        (0..self.nodes.len())
            .find(|&i| {
                self.cmd(i, &["CLUSTER", "NODES"])
                    .lines()
                    .any(|l| l.contains("myself") && l.contains("slave") && l.contains(&owner))
            })
            .expect("the owner has a replica")
    }

    /// A seed URL for node `i`: `redis://[:pw@]127.0.0.1:port/0`, or with TLS
    /// `rediss://[:pw@]localhost:tls_port/0`.
    pub fn url(&self, i: usize) -> String {
        let auth = self.opts.url_auth();
        let n = &self.nodes[i];
        match n.tls_port {
            Some(p) if self.opts.tls => format!("rediss://{auth}localhost:{p}/0"),
            _ => format!("redis://{auth}127.0.0.1:{}/0", n.port),
        }
    }

    /// The test CA's file (with `tls`).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.pki_dir.as_ref().map(|d| d.path().join("ca.pem"))
    }

    /// Redis commands run so far, over every node.
    pub fn command_calls(&self) -> u64 {
        self.command_calls_by_name().values().sum()
    }

    /// `calls` of every command over every node (`INFO commandstats`), by name.
    pub fn command_calls_by_name(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            for (k, v) in n.command_calls() {
                *out.entry(k).or_insert(0) += v;
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------
// Sentinel.

/// One redis-sentinel process.
pub struct SentinelProc {
    pub port: u16,
    pub tls_port: Option<u16>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A primary, its replica and three sentinels monitoring it as `master_name`.
pub struct SentinelSet {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelProc>,
    pub master_name: String,
    pub opts: TopologyOpts,
    /// The sentinels' own password (`requirepass` on the sentinels).
    pub sentinel_password: Option<String>,
    pki_dir: Option<tempfile::TempDir>,
}

impl SentinelSet {
    /// Starts the set; returns once every sentinel knows the replica and the others.
    pub fn start(opts: TopologyOpts) -> SentinelSet {
        let pki_dir = opts.tls.then(|| {
            let d = tempfile::tempdir().unwrap();
            make_pki(d.path());
            d
        });
        let pki = pki_dir.as_ref().map(|d| d.path().to_path_buf());
        let primary = data_node(&opts, pki.as_ref(), Vec::new());
        let replica = data_node(&opts, pki.as_ref(), Vec::new());
        // Replication (and so what sentinels discover) on the TLS port with TLS.
        let primary_port = primary.tls_port.unwrap_or(primary.port);
        let r = replica.command(&["REPLICAOF", "127.0.0.1", &primary_port.to_string()]);
        assert_eq!(r.as_deref(), Ok("OK"));
        replica.wait_synced();
        let sentinel_password = opts.password.as_ref().map(|p| format!("{p}-sentinel"));
        let master_name = "fleetprimary".to_string();
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let tls_port = opts.tls.then(free_port);
            let mut conf = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {master_name} 2000\n\
                 sentinel failover-timeout {master_name} 10000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                dir.path().display()
            );
            if let Some(pw) = &opts.password {
                conf.push_str(&format!("sentinel auth-pass {master_name} {pw}\n"));
            }
            if let Some(spw) = &sentinel_password {
                conf.push_str(&format!(
                    "requirepass {spw}\nsentinel sentinel-pass {spw}\n"
                ));
            }
            if let (Some(tp), Some(pki)) = (tls_port, &pki) {
                conf.push_str(&format!(
                    "tls-port {tp}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                     tls-auth-clients no\ntls-replication yes\n",
                    pki.join("redis.crt").display(),
                    pki.join("redis.key").display(),
                    pki.join("ca.pem").display()
                ));
            }
            let file = dir.path().join("sentinel.conf");
            std::fs::write(&file, conf).unwrap();
            let mut cmd = Command::new("redis-sentinel");
            cmd.arg(&file).stdout(Stdio::null()).stderr(Stdio::null());
            die_with_parent(&mut cmd);
            let child = cmd
                .spawn()
                .expect("redis-sentinel is installed (scripts/test-deps.sh)");
            sentinels.push(SentinelProc {
                port,
                tls_port,
                child: Some(child),
                _dir: dir,
            });
        }
        let set = SentinelSet {
            primary,
            replica,
            sentinels,
            master_name,
            opts,
            sentinel_password,
            pki_dir,
        };
        set.wait_settled();
        set
    }

    /// One command to sentinel `i` (plain port).
    pub fn sentinel_cmd(&self, i: usize, args: &[&str]) -> String {
        command_at(
            self.sentinels[i].port,
            self.sentinel_password.as_deref(),
            args,
        )
        .unwrap_or_else(|e| format!("ERR {e}"))
    }

    /// Waits until every sentinel sees one replica and the two other sentinels.
    pub fn wait_settled(&self) {
        for i in 0..self.sentinels.len() {
            wait_until("the sentinels settle", Duration::from_secs(30), || {
                let m = self.sentinel_cmd(i, &["SENTINEL", "MASTER", &self.master_name]);
                let field = |name: &str| {
                    let l: Vec<&str> = m.lines().collect();
                    l.iter()
                        .position(|x| *x == name)
                        .and_then(|p| l.get(p + 1))
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                };
                field("num-slaves") == "1"
                    && field("num-other-sentinels") == "2"
                    && field("flags") == "master"
            });
        }
    }

    /// The port (TLS port with TLS) of the primary sentinel `i` names now.
    pub fn primary_port(&self, i: usize) -> u16 {
        let r = self.sentinel_cmd(
            i,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name],
        );
        r.lines().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// `SENTINEL FAILOVER`: the replica becomes the primary; returns once every
    /// sentinel names it and the old primary replicates from it.
    pub fn failover(&self) {
        let new_port = self.replica.tls_port.unwrap_or(self.replica.port);
        let r = self.sentinel_cmd(0, &["SENTINEL", "FAILOVER", &self.master_name]);
        assert_eq!(r, "OK", "SENTINEL FAILOVER: {r}");
        wait_until(
            "every sentinel names the new primary",
            Duration::from_secs(30),
            || (0..self.sentinels.len()).all(|i| self.primary_port(i) == new_port),
        );
        wait_until(
            "the old primary replicates",
            Duration::from_secs(30),
            || {
                self.primary
                    .command(&["ROLE"])
                    .is_ok_and(|r| r.starts_with("slave"))
            },
        );
    }

    /// `redis[s]://[:pw@]host:port` of every sentinel, for `redis.sentinels`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        let auth = self
            .sentinel_password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        self.sentinels
            .iter()
            .map(|s| match s.tls_port {
                Some(p) => format!("rediss://{auth}localhost:{p}"),
                None => format!("redis://{auth}127.0.0.1:{}", s.port),
            })
            .collect()
    }

    /// `redis.url` for the primaries: their scheme, credentials and database (the
    /// host is not used: the sentinels name the primary).
    pub fn primary_url(&self) -> String {
        let auth = self.opts.url_auth();
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        format!("{scheme}://{auth}{}/0", self.master_name)
    }

    /// The test CA's file (with `tls`).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.pki_dir.as_ref().map(|d| d.path().join("ca.pem"))
    }
}
