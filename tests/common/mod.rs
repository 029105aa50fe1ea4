//! Shared test helpers: a fake Chat that records and asserts what it receives, the
//! real gateway binary started on a free loopback port, and a small HTTP client.
#![allow(dead_code)]

pub mod raw;
pub mod world;

/// A test certificate authority and a server certificate it signed, for 127.0.0.1
/// and localhost.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The CA certificate, DER.
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    /// The server certificate, PEM and DER.
    pub leaf_pem: String,
    pub leaf_der: rustls::pki_types::CertificateDer<'static>,
    /// The server key, PEM and PKCS#8 DER.
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A fresh CA and server certificate.
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names for the CA and the leaf: OpenSSL (redis-server's TLS between
        // replicas, cluster nodes and sentinels) takes a leaf named like its issuer
        // for a self-signed one.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "chat-gateway test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let mut leaf_params = leaf_params;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        TestCa {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            leaf_pem: leaf.pem(),
            leaf_der: leaf.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            key_der: leaf_key.serialize_der(),
        }
    }
}
pub mod load;
pub mod redis;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub const SDKAPPID: u64 = 1400000000;
pub const IDENTIFIER: &str = "administrator";
pub const SECRET: &str = "test-secret-key-0123456789abcdef";

/// What the fake Chat received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub path: String,
    pub query: HashMap<String, String>,
    pub raw_query: String,
    pub body: Bytes,
}

impl Recorded {
    /// Asserts the gateway's credentials: sdkappid, identifier, contenttype, a u32
    /// `random` and a UserSig that verifies for the configured app.
    pub fn assert_gateway_credentials(&self) {
        assert_eq!(self.query["sdkappid"], SDKAPPID.to_string());
        assert_eq!(self.query["identifier"], IDENTIFIER);
        assert_eq!(self.query["contenttype"], "json");
        let random: u64 = self.query["random"].parse().expect("random is a number");
        assert!(random <= u32::MAX as u64);
        let now = chat_gateway::upstream::signer::unix_now();
        chat_gateway::chat::usersig::verify(
            &self.query["usersig"],
            SDKAPPID,
            SECRET.as_bytes(),
            IDENTIFIER,
            now,
        )
        .expect("UserSig verifies for the configured app");
        assert_eq!(
            self.query.len(),
            5,
            "exactly the five parameters: {}",
            self.raw_query
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream body is JSON")
    }
}

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// HTTP 200 with this JSON, after an optional delay.
    Json(serde_json::Value, Duration),
    /// An HTTP status with a body.
    Status(u16, String),
    /// HTTP 200 with this JSON once the test adds a permit to the semaphore (each
    /// answer takes one): holds a call at Chat until the test lets it go.
    Gated(serde_json::Value, Arc<tokio::sync::Semaphore>),
    /// No answer: the connection is closed once the request has been read (a reset
    /// mid-request, as the caller sees it).
    Close,
}

pub type Responder = Box<dyn FnMut(&Recorded, usize) -> Reply + Send>;

/// A fake Chat on a loopback port.
pub struct FakeChat {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Vec<Recorded>>>,
    responder: Arc<Mutex<Responder>>,
    task: tokio::task::JoinHandle<()>,
}

/// A get_list success page for `account`, distinguishable per request.
pub fn page_for(account: &str, ts: u64) -> serde_json::Value {
    serde_json::json!({
        "SessionItem": [
            {"Type": 1, "To_Account": format!("{account}_peer"), "MsgTime": 1775552160u64 + ts, "TopFlag": 0},
            {"Type": 2, "GroupId": "@TGS#1B2AUI7RZ", "MsgTime": 1775185968u64, "TopFlag": 0}
        ],
        "CompleteFlag": 1, "TimeStamp": ts, "StartIndex": 0, "TopTimeStamp": 0, "TopStartIndex": 0,
        "GroupItem": [], "ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": "", "RequestId": "fake"
    })
}

pub fn chat_error(code: i64) -> serde_json::Value {
    serde_json::json!({"ActionStatus": "FAIL", "ErrorCode": code, "ErrorInfo": format!("fake error {code}")})
}

/// Answers every get_list with a page for its account.
pub fn echo_pages() -> Responder {
    Box::new(|r: &Recorded, _n| {
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        let ts = v["TimeStamp"].as_u64().unwrap_or(0);
        Reply::Json(page_for(&acc, ts), Duration::ZERO)
    })
}

impl FakeChat {
    pub async fn start(responder: Responder) -> FakeChat {
        Self::start_on("127.0.0.1:0".parse().unwrap(), responder).await
    }

    /// Starts on a given address (e.g. a port reserved earlier).
    pub async fn start_on(addr: SocketAddr, responder: Responder) -> FakeChat {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let responder = Arc::new(Mutex::new(responder));
        let (c, r) = (calls.clone(), responder.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (c, r) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (c, r) = (c.clone(), r.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let raw_query = req.uri().query().unwrap_or("").to_string();
                            let query = raw_query
                                .split('&')
                                .filter_map(|kv| kv.split_once('='))
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let rec = Recorded {
                                at: Instant::now(),
                                path,
                                query,
                                raw_query,
                                body,
                            };
                            let reply = {
                                let mut calls = c.lock().unwrap();
                                calls.push(rec.clone());
                                let n = calls.len();
                                drop(calls);
                                (r.lock().unwrap())(&rec, n)
                            };
                            let json = |v: serde_json::Value| {
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(v.to_string())))
                                    .unwrap()
                            };
                            let resp = match reply {
                                Reply::Json(v, delay) => {
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    json(v)
                                }
                                Reply::Status(s, b) => Response::builder()
                                    .status(s)
                                    .body(Full::new(Bytes::from(b)))
                                    .unwrap(),
                                Reply::Gated(v, gate) => {
                                    gate.acquire().await.expect("gate open").forget();
                                    json(v)
                                }
                                // An error from the service: hyper closes the
                                // connection without an answer.
                                Reply::Close => {
                                    return Err(std::io::Error::other("closed without an answer"))
                                }
                            };
                            Ok::<_, std::io::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeChat {
            addr,
            calls,
            responder,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_responder(&self, r: Responder) {
        *self.responder.lock().unwrap() = r;
    }

    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn reset(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Stops accepting new connections.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The real binary, started with a config file.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A complete config for the gateway in front of `upstream`, plus `extra` TOML
/// (which may repeat a table: tables are merged by appending keys).
pub fn config_toml(upstream: &str, sections: &[(&str, &str)]) -> String {
    config_toml_with(upstream, SECRET, sections)
}

/// Like [`config_toml`] with another secret key (e.g. the emulator's).
pub fn config_toml_with(upstream: &str, secret: &str, sections: &[(&str, &str)]) -> String {
    let mut tables: Vec<(String, String)> = vec![
        ("server".into(), "listen = \"127.0.0.1:0\"\nshutdown_grace_secs = 5\n".into()),
        (
            "chat".into(),
            format!(
                "sdkappid = {SDKAPPID}\nidentifier = \"{IDENTIFIER}\"\nsecret_key = \"{secret}\"\nregion = \"singapore\"\nbase_url = \"{upstream}\"\nrequest_timeout_ms = 3000\n"
            ),
        ),
        ("cache".into(), String::new()),
        ("retry".into(), "base_delay_ms = 1\nmax_delay_ms = 5\n".into()),
        ("log".into(), "level = \"info\"\n".into()),
    ];
    for (name, body) in sections {
        match tables.iter_mut().find(|(n, _)| n == name) {
            Some((_, b)) => {
                // Later keys override earlier ones: drop the earlier line of the same key.
                for line in body.lines() {
                    if let Some((k, _)) = line.split_once('=') {
                        let k = k.trim();
                        *b = b
                            .lines()
                            .filter(|l| l.split_once('=').map(|(x, _)| x.trim()) != Some(k))
                            .map(|l| format!("{l}\n"))
                            .collect();
                    }
                }
                b.push_str(body);
                b.push('\n');
            }
            None => tables.push((name.to_string(), format!("{body}\n"))),
        }
    }
    tables
        .into_iter()
        .map(|(n, b)| format!("[{n}]\n{b}\n"))
        .collect()
}

/// A free loopback port (bound and released; a test that needs a fixed port
/// takes it at once).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A loopback address where nothing listens (connections are refused).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Reads a counter or gauge from a Prometheus text page (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Makes the child die when the thread that started it does (Linux), so a gateway
/// held in a `static` by a test never outlives the test process.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Runs `cmd` at a higher scheduling priority (nice −10; ignored where not
/// permitted), for processes whose timing a test measures while the machine builds
/// other things: the measurement then shows the product, not the machine's load.
pub fn favoured(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setpriority is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            Ok(())
        });
    }
}

/// Runs the calling thread, and the threads it starts from now on (they inherit it),
/// at a higher scheduling priority (nice −10; ignored where not permitted): for a
/// test's own clocks, fakes and proxies whose timing it measures while the machine
/// builds other things, as [`favoured`] does for processes.
pub fn favour_this_thread() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10);
    }
}

/// Spawns `cmd` (stderr piped; it dies with this test), collects its log lines, and
/// sends the first address `announced` finds in a line.
pub fn spawn_logged(
    mut cmd: Command,
    announced: fn(&str) -> Option<SocketAddr>,
) -> (
    Child,
    Arc<Mutex<Vec<String>>>,
    std::sync::mpsc::Receiver<SocketAddr>,
) {
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("start the child process");
    let stderr = child.stderr.take().expect("stderr piped");
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = announced(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(a);
                }
            }
            log2.lock().unwrap().push(line);
        }
    });
    (child, log, rx)
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_chat-gateway")
}

impl Gateway {
    /// Starts the binary with `toml` and waits until `/readyz` answers 200.
    pub async fn start(toml: &str) -> Gateway {
        Self::start_with_env(toml, &[]).await
    }

    pub async fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_with_env_prepared(toml, env, |_| {}).await
    }

    /// Like [`Gateway::start_with_env`], after `prepare` has had its say on the command.
    pub async fn start_with_env_prepared(
        toml: &str,
        env: &[(&str, &str)],
        prepare: fn(&mut Command),
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(toml.as_bytes())
            .unwrap();
        Self::start_file_with(dir, path, env, prepare).await
    }

    /// Starts the binary with the config at `path` (kept alive with `dir`).
    pub async fn start_file(
        dir: tempfile::TempDir,
        path: std::path::PathBuf,
        env: &[(&str, &str)],
    ) -> Gateway {
        Self::start_file_with(dir, path, env, |_| {}).await
    }

    /// Starts the binary with `toml`, after `prepare` has had its say on the command
    /// (e.g. a `pre_exec` that lowers a resource limit).
    pub async fn start_prepared(toml: &str, prepare: impl FnOnce(&mut Command)) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        Self::start_file_with(dir, path, &[], prepare).await
    }

    /// Like [`Gateway::start_file`], after `prepare` has had its say on the command
    /// (e.g. `stdout(Stdio::piped())`, the pipe then in `child.stdout`).
    pub async fn start_file_with(
        dir: tempfile::TempDir,
        path: std::path::PathBuf,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Gateway {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        prepare(&mut cmd);
        let (child, log, rx) = spawn_logged(cmd, |line| {
            let i = line.find("listen=")?;
            let addr: String = line[i + 7..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            addr.parse().ok()
        });
        // A fixed port in the config is where it listens; port 0 is announced in the
        // log (at info: a config that logs less must give a port).
        let fixed = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok())
            .and_then(|t| {
                t.get("server")?
                    .get("listen")?
                    .as_str()?
                    .parse::<SocketAddr>()
                    .ok()
            })
            .filter(|a| a.port() != 0);
        let addr = match fixed {
            Some(a) => a,
            None => tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
                .await
                .unwrap()
                .unwrap_or_else(|_| {
                    panic!(
                        "gateway did not start; log:\n{}",
                        log.lock().unwrap().join("\n")
                    )
                }),
        };
        let gw = Gateway {
            child,
            addr,
            log,
            config_path: path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((s, _, _)) = get(&gw.url("/readyz")).await {
                if s == StatusCode::OK {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "gateway never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`Gateway::wait_exit`] off the runtime's threads (it polls with sleeps), for
    /// async tests.
    pub async fn exited(self, timeout: Duration) -> Option<ExitStatus> {
        let mut gw = self;
        tokio::task::spawn_blocking(move || gw.wait_exit(timeout))
            .await
            .expect("the waiting thread")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle` (at most `timeout`).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The address a `chat-gateway serving` log line gives for `field` (`admin`,
    /// `callback`).
    pub fn logged_addr(&self, field: &str) -> SocketAddr {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("chat-gateway serving"))
            .expect("the serving line");
        let key = format!(" {field}=");
        let i = line.find(&key).expect("field in the serving line") + key.len();
        line[i..]
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address for {field}: {line}"))
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub type Answer = (StatusCode, http::HeaderMap, Bytes);

pub async fn send(req: Request<Full<Bytes>>) -> Result<Answer, String> {
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

pub async fn get(url: &str) -> Result<Answer, String> {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

pub async fn post(url: &str, body: impl Into<Bytes>) -> Answer {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap(),
    )
    .await
    .expect("request")
}

pub fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.1.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

pub fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.2).unwrap_or_else(|_| panic!("not JSON: {:?}", a.2))
}

/// A file mounted the way Kubernetes mounts a ConfigMap or Secret key:
/// `dir/name -> ..data/name`, `..data -> ..<version>/`. Returns `dir/name`.
pub fn k8s_mount(dir: &std::path::Path, name: &str, content: &str) -> std::path::PathBuf {
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1").join(name), content).unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    dir.join(name)
}

/// Updates a [`k8s_mount`]ed file the way the kubelet does: a new version directory,
/// then an atomic swap of the `..data` symlink.
pub fn k8s_swap(dir: &std::path::Path, name: &str, version: &str, content: &str) {
    let v = format!("..{version}");
    std::fs::create_dir(dir.join(&v)).unwrap();
    std::fs::write(dir.join(&v).join(name), content).unwrap();
    std::os::unix::fs::symlink(&v, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

/// The gateway's `/metrics` text.
pub async fn metrics_text(gw: &Gateway) -> String {
    String::from_utf8_lossy(&get(&gw.url("/metrics")).await.unwrap().2).into_owned()
}

/// Waits until `gw`'s metric `name` (with its labels) reads `want`, for 10 s at most.
pub async fn wait_metric(gw: &Gateway, name: &str, want: f64) {
    wait_metric_within(gw, name, want, Duration::from_secs(10)).await
}

/// [`wait_metric`] with its own limit (a fleet of many processes starts slower).
pub async fn wait_metric_within(gw: &Gateway, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = metrics_text(gw).await;
        if metric(&m, name) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {want}; Redis and fleet metrics:\n{}\nlog:\n{}",
            m.lines()
                .filter(|l| l.contains("redis") || l.contains("fleet"))
                .collect::<Vec<_>>()
                .join("\n"),
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks `gw` for `account`'s first get_list page (Chat's own body, no credentials).
pub async fn page_of(gw: &Gateway, account: &str) -> Answer {
    post(
        &gw.url("/v4/recentcontact/get_list"),
        format!(r#"{{"From_Account":"{account}"}}"#),
    )
    .await
}

/// The `Version` of a get_list answer: the fake Chat of the fleet tests numbers every
/// page it serves, so a higher one is a fresher page.
pub fn page_version(a: &Answer) -> u64 {
    json(a)["Version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version: {a:?}"))
}
