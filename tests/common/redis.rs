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
}

/// A test CA and a server certificate for 127.0.0.1 / localhost, as files.
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn make_pki(dir: &std::path::Path) -> TestPki {
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
}

fn free_port() -> u16 {
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
        let pki = opts.tls.then(|| make_pki(dir.path()));
        let mut s = RedisServer {
            port: opts.port.unwrap_or_else(free_port),
            tls_port: opts.tls.then(free_port),
            pki,
            opts,
            child: None,
            dir,
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
        self.child = Some(
            cmd.spawn()
                .expect("redis-server is installed (scripts/test-deps.sh)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
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
