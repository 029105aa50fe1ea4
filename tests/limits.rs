//! Connection and request limits against the real binary over real sockets:
//! header read timeout (slow-loris), idle keep-alive timeout, many keep-alive clients,
//! `server.max_connections`, and `server.max_body_bytes` while the body streams in.
//!
//! Every wait has a deadline; nothing sleeps and hopes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use tokio::net::TcpStream;

use common::raw::*;
use common::*;

const GET_LIST: &str = "/v4/recentcontact/get_list";
const BODY: &str = r#"{"From_Account":"user_0001"}"#;

/// The thousand-client test takes this exclusively, the timing-sensitive tests shared:
/// on a small machine a thousand busy clients would otherwise slow the others' clocks.
static HEAVY: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)
/// and returns the new soft limit.
fn raise_nofile() -> libc::rlim_t {
    chat_gateway::cmd::raise_fd_limit();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

/// This process's hard open-files limit.
fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

/// Makes `cmd` start with a soft open-files limit of `soft` (the hard one kept).
fn lower_nofile(cmd: &mut std::process::Command, soft: libc::rlim_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getrlimit/setrlimit are async-signal-safe and touch only the struct.
    unsafe {
        cmd.pre_exec(move || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = soft.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The soft open-files limit of process `pid`, from `/proc/<pid>/limits`.
fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A limits config in front of `upstream`, with `server` keys on top of the shared
/// `header_read_timeout_ms = 1000`.
fn limits_config(upstream: &str, server: &str) -> String {
    config_toml(
        upstream,
        &[
            ("server", "header_read_timeout_ms = 1000"),
            ("server", server),
            ("cache", "ttl_secs = 600"),
        ],
    )
}

/// A complete get_list request for `account`.
fn get_list_request(account: &str) -> Vec<u8> {
    let body = format!(r#"{{"From_Account":"{account}"}}"#);
    format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Asserts a 200 cache hit.
fn assert_hit(r: &RawResponse) {
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-cache"), "HIT");
}

/// Slow-loris: connections that never finish their request head are closed at the
/// header read timeout (not before), and real requests are served all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_connections_are_closed_and_others_are_served() {
    let _guard = HEAVY.read().await;
    const LORIS: usize = 300;
    // Long enough that the lorises are all connected well before the first is closed.
    const TIMEOUT: Duration = Duration::from_secs(3);
    raise_nofile();
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&limits_config(
        &fake.url(),
        &format!("header_read_timeout_ms = {}", TIMEOUT.as_millis()),
    ))
    .await;
    let url = gw.url(GET_LIST);
    assert_eq!(header(&post(&url, BODY).await, "x-cache"), "MISS");

    let addr = gw.addr;
    let mut lorises = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    // At most 64 connects at a time: the gateway's listen backlog is only 128, and a
    // connection dropped from a full accept queue would muddle the timings.
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    for _ in 0..LORIS {
        let (ready_tx, connecting) = (ready_tx.clone(), connecting.clone());
        lorises.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let mut c = RawConn::connect(addr).await;
            drop(permit);
            let start = Instant::now();
            let _ = c
                .send(format!("POST {GET_LIST} HTTP/1.1\r\nHost: x\r\nX-Slow: ").as_bytes())
                .await;
            let _ = ready_tx.send(());
            let deadline = start + TIMEOUT + Duration::from_secs(10);
            loop {
                // One more header byte every 200 ms, never the end of the head.
                let tick = (Instant::now() + Duration::from_millis(200)).min(deadline);
                if let Some(at) = c.closed_by(tick).await {
                    return Some((start, at));
                }
                if Instant::now() >= deadline {
                    return None;
                }
                if c.send(b"a").await.is_err() {
                    return Some((start, Instant::now()));
                }
            }
        }));
    }

    // Every loris is connected before the real requests start, so that those do not
    // compete with the lorises for the listen backlog (a dropped SYN costs 1 s).
    let connected = Instant::now() + Duration::from_secs(10);
    for i in 0..LORIS {
        tokio::time::timeout_at(connected.into(), ready_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {LORIS} lorises connected in 10 s"));
    }

    // Real requests while the lorises drip, until they are all gone.
    let done = Arc::new(AtomicBool::new(false));
    let prober = {
        let (url, done) = (url.clone(), done.clone());
        tokio::spawn(async move {
            let mut answered = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let a = post(&url, BODY).await;
                assert_eq!(a.0, 200);
                assert_eq!(header(&a, "x-cache"), "HIT");
                answered.push(Instant::now());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answered
        })
    };

    let mut closed = Vec::new();
    for l in lorises {
        closed.push(l.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    let answered = prober.await.unwrap();

    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{open} slow-loris connections never closed");
    let closed: Vec<(Instant, Instant)> = closed.into_iter().flatten().collect();
    let after: Vec<Duration> = closed.iter().map(|(s, c)| *c - *s).collect();
    let (min, max) = (after.iter().min().unwrap(), after.iter().max().unwrap());
    let first_close = closed.iter().map(|(_, c)| *c).min().unwrap();
    let during = answered.iter().filter(|a| **a < first_close).count();
    eprintln!(
        "slow-loris: {LORIS} closed after {min:?}..{max:?}; {} requests answered, {during} of them while every loris was open",
        answered.len()
    );
    assert!(
        *min >= TIMEOUT.mul_f64(0.8),
        "closed before the {TIMEOUT:?} header timeout: {min:?}"
    );
    assert!(
        *max <= TIMEOUT + Duration::from_secs(5),
        "closed long after the header timeout: {max:?}"
    );
    // Served during the attack, not only after it.
    assert!(
        during >= 3,
        "only {during} requests answered while the lorises held their connections"
    );
    assert_eq!(fake.count(), 1);
}

/// 1000 concurrent keep-alive connections, 10 requests each, all cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_keep_alive_clients_see_no_errors() {
    let _guard = HEAVY.write().await;
    const CLIENTS: usize = 1000;
    const REQUESTS: usize = 10;
    let nofile = raise_nofile();
    assert!(
        nofile >= (2 * CLIENTS + 100) as libc::rlim_t,
        "the open-files limit {nofile} is too low for this test"
    );
    let fake = FakeChat::start(echo_pages()).await;
    // The default 5 s header timeout: a client delayed by the scheduler between its
    // requests must not count as idle. The gateway starts with a soft open-files
    // limit far below what a thousand clients need (this process's is raised, and
    // would be inherited): it raises its own to the hard limit.
    let gw = Gateway::start_prepared(
        &config_toml(&fake.url(), &[("cache", "ttl_secs = 600")]),
        |cmd| lower_nofile(cmd, 256),
    )
    .await;
    let gw_nofile = nofile_of(gw.child.id()).expect("/proc/<pid>/limits");
    assert_eq!(
        gw_nofile,
        hard_nofile(),
        "the gateway raised its soft open-files limit to the hard limit"
    );
    assert_eq!(
        header(&post(&gw.url(GET_LIST), BODY).await, "x-cache"),
        "MISS"
    );

    let addr = gw.addr;
    let start = Instant::now();
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("client {i}: connect: {e}"))?;
            let connect_time = t.elapsed();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("client {i}: handshake: {e}"))?;
            let conn = tokio::spawn(conn);
            // Every connection is open before any request is sent.
            barrier.wait().await;
            for n in 0..REQUESTS {
                sender
                    .ready()
                    .await
                    .map_err(|e| format!("client {i} request {n}: not ready: {e}"))?;
                let req = http::Request::post(GET_LIST)
                    .header("host", "gw")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                    .unwrap();
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("client {i} request {n}: {e}"))?;
                let (parts, body) = resp.into_parts();
                let body = body
                    .collect()
                    .await
                    .map_err(|e| format!("client {i} request {n}: body: {e}"))?;
                if parts.status != 200 || parts.headers.get("x-cache").is_none_or(|v| v != "HIT") {
                    return Err(format!(
                        "client {i} request {n}: {} {:?} {:?}",
                        parts.status,
                        parts.headers.get("x-cache"),
                        body.to_bytes()
                    ));
                }
            }
            drop(sender);
            let _ = conn.await;
            Ok::<_, String>((REQUESTS, connect_time))
        }));
    }
    let mut ok = 0;
    let mut slowest_connect = Duration::ZERO;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((n, c)) => {
                ok += n;
                slowest_connect = slowest_connect.max(c);
            }
            Err(e) => errors.push(e),
        }
    }
    eprintln!(
        "{CLIENTS} keep-alive clients: {ok} answers in {:?}, slowest connect {slowest_connect:?}; gateway open-files limit {gw_nofile:?}",
        start.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} clients failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(ok, CLIENTS * REQUESTS);
    assert_eq!(fake.count(), 1);
}

/// At `server.max_connections` a new connection waits (in the kernel's backlog) until
/// one of the open ones closes; the open ones keep working.
#[tokio::test]
async fn max_connections_queues_new_connections_until_one_closes() {
    let _guard = HEAVY.read().await;
    let fake = FakeChat::start(echo_pages()).await;
    // A long header timeout, so the idle connections are not closed under us.
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "server",
            "max_connections = 5\nheader_read_timeout_ms = 60000",
        )],
    ))
    .await;
    assert_eq!(
        header(&post(&gw.url(GET_LIST), BODY).await, "x-cache"),
        "MISS"
    );

    let mut open = Vec::new();
    for _ in 0..5 {
        let mut c = RawConn::connect(gw.addr).await;
        c.send(&get_list_request("user_0001")).await.unwrap();
        // Connections of earlier helpers may take a moment to be noticed as closed.
        let r = c.response(Duration::from_secs(5)).await.expect("served");
        assert_hit(&r);
        open.push(c);
    }

    // The sixth connects (the kernel accepts it) but is not served.
    let mut sixth = RawConn::connect(gw.addr).await;
    sixth.send(&get_list_request("user_0001")).await.unwrap();
    assert_eq!(
        sixth
            .response(Duration::from_millis(500))
            .await
            .unwrap_err(),
        ReadErr::Timeout,
        "a sixth connection was served past max_connections = 5"
    );

    // The open ones keep working meanwhile.
    for c in open.iter_mut() {
        c.send(&get_list_request("user_0001")).await.unwrap();
        assert_hit(&c.response(Duration::from_secs(2)).await.expect("served"));
    }
    assert_eq!(
        sixth
            .response(Duration::from_millis(200))
            .await
            .unwrap_err(),
        ReadErr::Timeout
    );

    // One closes: the sixth is served promptly.
    drop(open.pop());
    let t = Instant::now();
    let r = sixth
        .response(Duration::from_secs(5))
        .await
        .expect("the queued connection is served once a slot frees");
    assert_hit(&r);
    eprintln!(
        "queued connection served {:?} after a slot freed",
        t.elapsed()
    );
    // And it is now a normal keep-alive connection.
    sixth.send(&get_list_request("user_0001")).await.unwrap();
    assert_hit(
        &sixth
            .response(Duration::from_secs(2))
            .await
            .expect("served"),
    );
    assert_eq!(fake.count(), 1);
}

/// The body bound holds for chunked bodies while they stream in, and a declared
/// length over the bound is refused before any of the body is sent.
#[tokio::test]
async fn body_bound_is_enforced_while_streaming() {
    let _guard = HEAVY.read().await;
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&limits_config(&fake.url(), "max_body_bytes = 1024")).await;
    let head = format!(
        "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let assert_413 = |r: &RawResponse| {
        assert_eq!(r.status, 413, "{:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-chat-gateway-error"), "body-too-large");
        let v = r.json();
        assert_eq!(v["ActionStatus"], "FAIL");
        assert_eq!(v["ErrorCode"], 60008);
    };

    // A small chunked body is fine.
    let mut c = RawConn::connect(gw.addr).await;
    let small = format!("{head}{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    c.send(small.as_bytes()).await.unwrap();
    let r = c.response(Duration::from_secs(5)).await.expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(fake.count(), 1);

    // A chunked body past the bound: 413 as soon as 1024 bytes have passed, while the
    // body is still unfinished (no last chunk is ever sent).
    let mut c = RawConn::connect(gw.addr).await;
    c.send(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 800, "a".repeat(800));
    c.send(chunk.as_bytes()).await.unwrap();
    assert_eq!(
        c.response(Duration::from_millis(300)).await.unwrap_err(),
        ReadErr::Timeout,
        "800 bytes are within the bound: the gateway waits for more"
    );
    c.send(chunk.as_bytes()).await.unwrap();
    let r = c
        .response(Duration::from_secs(3))
        .await
        .expect("a 413 before the body ends");
    assert_413(&r);
    assert!(
        c.closed_by(Instant::now() + Duration::from_secs(3))
            .await
            .is_some(),
        "the connection with the unread rest of the body is closed"
    );

    // A declared length over the bound: 413 at once, without sending the body.
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut c = RawConn::connect(gw.addr).await;
        let head = format!(
            "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n{expect}\r\n"
        );
        c.send(head.as_bytes()).await.unwrap();
        let r = c
            .response(Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("no answer to the head alone ({expect:?}): {e:?}"));
        assert_ne!(r.status, 100, "100-continue must not be granted");
        assert_413(&r);
    }
    assert_eq!(fake.count(), 1, "no oversized body reached Chat");
}

/// An idle keep-alive connection is closed about `header_read_timeout_ms` after its
/// last answer; until then it is reusable.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_timeout() {
    let _guard = HEAVY.read().await;
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&limits_config(&fake.url(), "")).await;
    let mut c = RawConn::connect(gw.addr).await;
    c.send(&get_list_request("user_0001")).await.unwrap();
    assert_eq!(
        c.response(Duration::from_secs(5)).await.unwrap().status,
        200
    );
    // Idle for 600 ms (under the 1 s timeout), then reused.
    assert!(
        c.closed_by(Instant::now() + Duration::from_millis(600))
            .await
            .is_none(),
        "closed while idle for less than the timeout"
    );
    c.send(&get_list_request("user_0001")).await.unwrap();
    assert_hit(&c.response(Duration::from_secs(2)).await.unwrap());
    let idle_from = Instant::now();
    let closed = c
        .closed_by(idle_from + Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection is closed");
    let idle = closed - idle_from;
    eprintln!("idle keep-alive connection closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(900) && idle <= Duration::from_secs(3),
        "closed after {idle:?}, not about 1 s"
    );
}

/// A connection that sends nothing at all is closed at the header timeout too.
#[tokio::test]
async fn silent_connections_are_closed_after_the_header_timeout() {
    let _guard = HEAVY.read().await;
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&limits_config(&fake.url(), "")).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push((RawConn::connect(gw.addr).await, Instant::now()));
    }
    // One that starts what looks like the HTTP/2 preface, and stops.
    let mut h2ish = RawConn::connect(gw.addr).await;
    h2ish.send(b"PRI * HTTP/2.0\r\n").await.unwrap();
    silent.push((h2ish, Instant::now()));
    for (i, (c, start)) in silent.iter_mut().enumerate() {
        let closed = c
            .closed_by(*start + Duration::from_secs(6))
            .await
            .unwrap_or_else(|| panic!("silent connection {i} still open after 6 s"));
        let after = closed - *start;
        // Not on accept, nor before the 1 s timeout; at it, give or take a busy box.
        assert!(
            after >= Duration::from_millis(800),
            "silent connection {i} closed after {after:?}, before the header timeout"
        );
        assert!(
            after <= Duration::from_secs(4),
            "silent connection {i} closed after {after:?}"
        );
    }
}

/// Silent connections cannot hold every slot of `server.max_connections` for long:
/// each is closed at the header timeout, and a real caller gets in then (not
/// before: the slots were held).
#[tokio::test]
async fn silent_connections_do_not_starve_the_connection_limit() {
    let _guard = HEAVY.read().await;
    let fake = FakeChat::start(echo_pages()).await;
    // The main listener's connections are watched from the admin listener, whose
    // own connections take none of the main listener's slots.
    let gw = Gateway::start(&limits_config(
        &fake.url(),
        "max_connections = 5\nadmin_listen = \"127.0.0.1:0\"",
    ))
    .await;
    let admin = gw.logged_addr("admin");
    let main_connections = || async move {
        let m = get(&format!("http://{admin}/metrics")).await.unwrap();
        metric(
            &String::from_utf8_lossy(&m.2),
            "chat_gateway_open_connections{listener=\"main\"}",
        )
    };
    let wait_connections = |n: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while main_connections().await != n {
            assert!(Instant::now() < deadline, "never {n} open connections");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    assert_eq!(
        header(&post(&gw.url(GET_LIST), BODY).await, "x-cache"),
        "MISS"
    );
    // That caller's connection is gone, so the silent ones take every regular slot
    // (and five of the reserve kept for the probes).
    wait_connections(0.0).await;
    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(RawConn::connect(gw.addr).await);
    }
    wait_connections(10.0).await;
    let mut c = RawConn::connect(gw.addr).await;
    c.send(&get_list_request("user_0001")).await.unwrap();
    let r = c
        .response(Duration::from_secs(10))
        .await
        .expect("served once the silent connections time out");
    assert_hit(&r);
    let waited = start.elapsed();
    eprintln!("a caller behind 10 silent connections was served {waited:?} after they connected");
    assert!(
        waited >= Duration::from_millis(800),
        "served after {waited:?}: before the 1 s header timeout freed a slot"
    );
    assert!(waited <= Duration::from_secs(6), "waited {waited:?}");
}
