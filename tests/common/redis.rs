//! A real `redis-server` on a free loopback port, in a temporary directory, killed on
//! drop; restartable (empty) on the same port; optionally with `requirepass` and a TLS
//! port whose certificate a test CA signs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::die_with_parent;

pub mod topology;

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct RedisOpts {
    /// `--requirepass`.
    pub password: Option<String>,
    /// Also listen with TLS (a test CA signs the server's certificate).
    pub tls: bool,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
    /// Listen on this port (e.g. one gateways were told about before it ran).
    pub port: Option<u16>,
    /// With `tls`: the CA and certificate in this directory (as [`make_pki`] writes
    /// them) instead of a CA of its own, so several servers trust each other.
    pub pki_from: Option<PathBuf>,
    /// At a higher scheduling priority (see [`super::favoured`]).
    pub favoured: bool,
}

/// A test CA and a server certificate for 127.0.0.1 / localhost, as files.
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_pki(dir: &std::path::Path) -> TestPki {
    let ca = super::TestCa::new();
    let pki = TestPki {
        ca_pem: dir.join("ca.pem"),
        cert: dir.join("redis.crt"),
        key: dir.join("redis.key"),
    };
    std::fs::write(&pki.ca_pem, &ca.ca_pem).unwrap();
    std::fs::write(&pki.cert, &ca.leaf_pem).unwrap();
    std::fs::write(&pki.key, &ca.key_pem).unwrap();
    pki
}

/// A running (or killed) redis-server.
pub struct RedisServer {
    pub port: u16,
    pub tls_port: Option<u16>,
    pub pki: Option<TestPki>,
    opts: RedisOpts,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Starts retried on another port (its first one was taken meanwhile).
    respawns: u32,
    /// Whether it has answered once (a restart keeps its port, whatever happens).
    up_once: bool,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl RedisServer {
    /// A plain server.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOpts::default())
    }

    /// A server with options.
    pub fn start_with(opts: RedisOpts) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = opts.tls.then(|| match &opts.pki_from {
            Some(d) => TestPki {
                ca_pem: d.join("ca.pem"),
                cert: d.join("redis.crt"),
                key: d.join("redis.key"),
            },
            None => make_pki(dir.path()),
        });
        let mut s = RedisServer {
            port: opts.port.unwrap_or_else(free_port),
            tls_port: opts.tls.then(free_port),
            pki,
            opts,
            child: None,
            dir,
            respawns: 0,
            up_once: false,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--daemonize")
            .arg("no")
            .arg("--loglevel")
            .arg("warning");
        if let Some(pw) = &self.opts.password {
            cmd.arg("--requirepass").arg(pw);
        }
        if let (Some(port), Some(pki)) = (self.tls_port, &self.pki) {
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&pki.cert)
                .arg("--tls-key-file")
                .arg(&pki.key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca_pem)
                .arg("--tls-auth-clients")
                .arg("no");
        }
        for (k, v) in &self.opts.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        die_with_parent(&mut cmd);
        if self.opts.favoured {
            super::favoured(&mut cmd);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server is installed (scripts/test-deps.sh)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            // Exited at once: most likely its free port was taken meanwhile by
            // another test; a server started on a port of its own choosing tries others.
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited && !self.up_once && self.opts.port.is_none() && self.respawns < 5 {
                self.respawns += 1;
                self.port = free_port();
                self.tls_port = self.tls_port.map(|_| free_port());
                return self.spawn();
            }
            assert!(
                !exited && Instant::now() < deadline,
                "redis-server did not answer PING (exited: {exited})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.up_once = true;
    }

    /// Whether the server answers PING on its plain port.
    pub fn ping(&self) -> bool {
        self.command(&["PING"]).is_ok_and(|r| r.contains("PONG"))
    }

    /// `redis://[:password@]127.0.0.1:port/0`
    pub fn url(&self) -> String {
        match &self.opts.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// `rediss://...` on the TLS port, named by `host` (the certificate has
    /// `localhost` and `127.0.0.1`).
    pub fn tls_url(&self, host: &str) -> String {
        let port = self.tls_port.expect("started with tls");
        match &self.opts.password {
            Some(pw) => format!("rediss://:{pw}@{host}:{port}/0"),
            None => format!("rediss://{host}:{port}/0"),
        }
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again, empty, on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends one command (RESP) on the plain port and returns the reply as text: a
    /// status or bulk string as is, an integer as digits, an error as `ERR...`, an
    /// array as its elements one per line.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        command_at(self.port, self.opts.password.as_deref(), args)
    }

    /// Sends several commands in one `MULTI`/`EXEC` (atomic).
    pub fn atomically(&self, cmds: &[&[&str]]) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut req = Vec::new();
        let mut push = |parts: &[&str]| {
            req.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
            for p in parts {
                req.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
            }
        };
        let mut replies = 2 + cmds.len();
        if let Some(pw) = &self.opts.password {
            push(&["AUTH", pw]);
            replies += 1;
        }
        push(&["MULTI"]);
        for c in cmds {
            push(c);
        }
        push(&["EXEC"]);
        s.write_all(&req).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut last = String::new();
        for _ in 0..replies {
            last = read_reply(&mut r)?;
        }
        Ok(last)
    }

    /// The id of the client named `name` (from `CLIENT LIST`).
    pub fn client_id(&self, name: &str) -> Option<String> {
        let list = self.command(&["CLIENT", "LIST"]).ok()?;
        list.lines()
            .find(|l| l.split(' ').any(|f| f == format!("name={name}")))
            .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
            .map(str::to_string)
    }

    /// `calls` of every command in `INFO commandstats`, by command name.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let info = self.command(&["INFO", "commandstats"]).unwrap_or_default();
        info.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("cmdstat_")?;
                let (name, stats) = rest.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect()
    }
}

/// Sends one command to the server on `port` (see [`RedisServer::command`]).
pub fn command_at(port: u16, password: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut req = Vec::new();
    let mut push = |parts: &[&str]| {
        req.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for p in parts {
            req.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
        }
    };
    if let Some(pw) = password {
        push(&["AUTH", pw]);
    }
    push(args);
    s.write_all(&req).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    if password.is_some() {
        read_reply(&mut r)?;
    }
    read_reply(&mut r)
}

fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(1.min(line.len()));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Ok(rest.to_string()),
        "$" => {
            let n: i64 = rest.parse().map_err(|_| "bad bulk length".to_string())?;
            if n < 0 {
                return Ok(String::new());
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(n as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| "bad array length".to_string())?;
            let mut out = Vec::new();
            for _ in 0..n.max(0) {
                out.push(read_reply(r)?);
            }
            Ok(out.join("\n"))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RedisServer {
    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Makes this server a replica of `addr` (`REPLICAOF`) and waits until it has
    /// synchronised.
    pub fn replicate(&self, addr: std::net::SocketAddr) {
        let r = self.command(&["REPLICAOF", "127.0.0.1", &addr.port().to_string()]);
        assert_eq!(r.as_deref(), Ok("OK"), "{r:?}");
        self.wait_synced();
    }

    /// Waits until this replica's link to its primary is up and it has loaded the
    /// primary's data.
    pub fn wait_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.command(&["INFO", "replication"]).unwrap_or_default();
            if info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
            {
                return;
            }
            assert!(Instant::now() < deadline, "replica never synced:\n{info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes a replica (`REPLICAOF NO ONE`).
    pub fn promote(&self) {
        let r = self.command(&["REPLICAOF", "NO", "ONE"]);
        assert_eq!(r.as_deref(), Ok("OK"), "{r:?}");
    }

    /// Creates an ACL user with `rules` (key patterns and commands, e.g. `~*`,
    /// `+@all`, `-@dangerous`); returns its `redis://user:password@...` URL.
    pub fn acl_user(&self, user: &str, password: &str, rules: &[&str]) -> String {
        let pw = format!(">{password}");
        let mut args = vec!["ACL", "SETUSER", user, "reset", "on", pw.as_str()];
        args.extend_from_slice(rules);
        let r = self.command(&args);
        assert_eq!(r.as_deref(), Ok("OK"), "{r:?}");
        format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// Keys matching `pattern` (`SCAN`, which skips expired keys).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut cursor = "0".to_string();
        let mut out = Vec::new();
        loop {
            let r = self
                .command(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"])
                .unwrap_or_default();
            let mut lines = r.lines();
            cursor = lines.next().unwrap_or("0").to_string();
            out.extend(lines.map(str::to_string));
            if cursor == "0" {
                return out;
            }
        }
    }

    /// Sends many commands on one connection (pipelined), returning the last reply.
    pub fn pipeline(&self, cmds: &[Vec<String>]) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut req = Vec::new();
        let mut n = cmds.len();
        let mut push = |parts: &[&str]| {
            req.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
            for p in parts {
                req.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
            }
        };
        if let Some(pw) = &self.opts.password {
            push(&["AUTH", pw]);
            n += 1;
        }
        for c in cmds {
            let parts: Vec<&str> = c.iter().map(String::as_str).collect();
            push(&parts);
        }
        s.write_all(&req).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut last = String::new();
        for _ in 0..n {
            last = read_reply(&mut r)?;
        }
        Ok(last)
    }
}

/// A TCP proxy on a free loopback port, in threads of its own, standing between
/// clients and a server (gateways and Redis, or a replica and its primary). It can
/// hold traffic (nothing is forwarded, so a replica lags), delay what the server
/// sends (a Redis that answers late), cut every connection, and point new ones
/// elsewhere (a failover behind a fixed address).
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    target: std::sync::Mutex<std::net::SocketAddr>,
    held: std::sync::atomic::AtomicBool,
    delay_us: std::sync::atomic::AtomicU64,
    /// Bumped by `cut`: connections of an older epoch close.
    epoch: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

impl TcpProxy {
    /// A proxy to `target`.
    pub fn start(target: std::net::SocketAddr) -> TcpProxy {
        use std::sync::atomic::*;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = std::sync::Arc::new(ProxyState {
            target: std::sync::Mutex::new(target),
            held: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || loop {
            if st.stop.load(Ordering::Acquire) {
                return;
            }
            match listener.accept() {
                Ok((client, _)) => {
                    let target = *st.target.lock().unwrap();
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let epoch = st.epoch.load(Ordering::Acquire);
                    pump(
                        &st,
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        epoch,
                        false,
                    );
                    pump(&st, server, client, epoch, true);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        });
        TcpProxy { port, state }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/0` (with `user:password@` from `auth`, if given).
    pub fn redis_url(&self, auth: Option<&str>) -> String {
        match auth {
            Some(a) => format!("redis://{a}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Stops (or resumes) forwarding in both directions; held bytes stay in the
    /// sockets' buffers.
    pub fn hold(&self, held: bool) {
        self.state
            .held
            .store(held, std::sync::atomic::Ordering::Release);
    }

    /// Delays everything the server sends by `d`.
    pub fn delay_replies(&self, d: Duration) {
        self.state
            .delay_us
            .store(d.as_micros() as u64, std::sync::atomic::Ordering::Release);
    }

    /// Closes every connection made so far (held bytes are lost).
    pub fn cut(&self) {
        self.state
            .epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// New connections go to `target`.
    pub fn retarget(&self, target: std::net::SocketAddr) {
        *self.state.target.lock().unwrap() = target;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        self.cut();
    }
}

/// Copies `from` to `to` until either closes or the proxy cuts it; `replies` marks
/// the server-to-client direction (the one delays apply to).
fn pump(
    st: &std::sync::Arc<ProxyState>,
    mut from: TcpStream,
    to: TcpStream,
    epoch: u64,
    replies: bool,
) {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let st = st.clone();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let st2 = st.clone();
    let mut out = to;
    // The writer: sends each chunk when it is due.
    std::thread::spawn(move || {
        while let Ok((due, buf)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if st2.epoch.load(Ordering::Acquire) != epoch || out.write_all(&buf).is_err() {
                let _ = out.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
        let _ = out.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_millis(5)));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if st.epoch.load(Ordering::Acquire) != epoch || st.stop.load(Ordering::Acquire) {
                let _ = from.shutdown(std::net::Shutdown::Both);
                return;
            }
            if st.held.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let delay = if replies {
                        Duration::from_micros(st.delay_us.load(Ordering::Acquire))
                    } else {
                        Duration::ZERO
                    };
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    });
}
