//! Heap allocations per cache hit, counted: the gateway runs in this process on a
//! runtime of its own whose threads are marked, and a counting allocator counts what
//! those threads allocate while a client on another thread sends hits over one
//! keep-alive connection. Each allocation's stack is recorded, so the test tells the
//! gateway's own code (which must allocate nothing) from the cache library's
//! housekeeping, which moka runs inline in a read every 64 reads and which may hand
//! one node to crossbeam-epoch's global garbage queue each time.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::raw::*;
use common::*;

/// Counts the allocations made on marked threads.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Whether each counted allocation's stack is recorded.
static RECORDING: AtomicBool = AtomicBool::new(false);
/// The recorded stacks (unresolved until printed, on the test's thread). Room is
/// reserved before recording starts.
static STACKS: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());

thread_local! {
    /// Whether this thread is one of the gateway's.
    static GATEWAY_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Set while this thread records a stack (whose own allocations are not counted).
    static IN_RECORDING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if !GATEWAY_THREAD.with(Cell::get) || IN_RECORDING.with(Cell::get) {
        return;
    }
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    if RECORDING.load(Ordering::Relaxed) {
        IN_RECORDING.with(|r| r.set(true));
        let stack = Backtrace::force_capture();
        if let Ok(mut stacks) = STACKS.lock() {
            stacks.push(stack);
        }
        IN_RECORDING.with(|r| r.set(false));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The frame of moka's housekeeping (run inline by a read every 64 reads).
const HOUSEKEEPING: &str = "run_pending_tasks";

/// No allocation per hit, plain, with a caller token (checked on the hit path), and
/// with tracing on and the hit not sampled. One test: the counter is shared.
#[test]
fn a_cache_hit_allocates_nothing_but_the_caches_amortized_housekeeping() {
    hits_allocate_nothing("plain", &[], None);
    hits_allocate_nothing(
        "caller token",
        &[("server", "auth_tokens = [\"alloc-test-token-0123456789\"]")],
        Some("alloc-test-token-0123456789"),
    );
    // Last: tracing, once started, stays on in this process.
    let receiver = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!(
        "endpoint = \"http://{}/v1/traces\"\nsample_ratio = 0.0",
        receiver.local_addr().unwrap()
    );
    hits_allocate_nothing("tracing, not sampled", &[("tracing", &endpoint)], None);
}

fn hits_allocate_nothing(what: &str, extra: &[(&str, &str)], token: Option<&str>) {
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fake = client.block_on(FakeChat::start(echo_pages()));
    let listen = free_addr();
    let listen_line = format!("listen = \"{listen}\"");
    let mut sections = vec![
        ("server", listen_line.as_str()),
        ("cache", "ttl_secs = 600"),
        ("log", "level = \"warn\""),
    ];
    sections.extend_from_slice(extra);
    let toml = config_toml(&fake.url(), &sections);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, toml).unwrap();
    let settings = chat_gateway::config::load_with_env(Some(&path), Vec::new()).unwrap();

    // The gateway, on a runtime whose threads count.
    let gateway = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(|| GATEWAY_THREAD.with(|t| t.set(true)))
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = gateway.spawn(async move {
        chat_gateway::telemetry::start_tracing(&settings).unwrap();
        let listeners = chat_gateway::server::Listeners::bind(&settings.server).unwrap();
        let state = chat_gateway::server::AppState::new(settings).unwrap();
        chat_gateway::server::run(listeners, state, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let body = r#"{"From_Account":"alloc","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}"#;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "POST /v4/recentcontact/get_list HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    async fn hits(conn: &mut RawConn, request: &str, n: usize) {
        for _ in 0..n {
            conn.send(request.as_bytes()).await.unwrap();
            let r = conn.response(Duration::from_secs(5)).await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-cache"), "HIT");
        }
    }
    let mut conn = client.block_on(async {
        // Ready, then one miss to fill the cache.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while get(&format!("http://{listen}/readyz")).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "gateway never came up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut req = http::Request::post(format!("http://{listen}/v4/recentcontact/get_list"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let a = send(
            req.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(header(&a, "x-cache"), "MISS", "{what}");
        RawConn::connect(listen).await
    });
    // Warm up: buffers, the connection, the cache's bookkeeping.
    client.block_on(hits(&mut conn, &request, 200));
    STACKS.lock().unwrap().reserve(4096);
    ALLOCATIONS.store(0, Ordering::Relaxed);
    RECORDING.store(true, Ordering::Relaxed);
    // At least 2,000 hits, over more than a second: the answers' `date` changes
    // within the window, so its once-a-second refresh is counted too.
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < 2000 || started.elapsed() < Duration::from_millis(1100) {
        client.block_on(hits(&mut conn, &request, 100));
        done += 100;
    }
    RECORDING.store(false, Ordering::Relaxed);
    let hits_made = done;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let stacks: Vec<String> = STACKS
        .lock()
        .unwrap()
        .drain(..)
        .map(|b| b.to_string())
        .collect();
    assert_eq!(
        stacks.len(),
        allocations,
        "every allocation's stack recorded"
    );
    let (housekeeping, own): (Vec<&String>, Vec<&String>) =
        stacks.iter().partition(|s| s.contains(HOUSEKEEPING));
    eprintln!(
        "{what}: {allocations} allocations on the gateway's threads for {hits_made} hits: {} in the cache's housekeeping, {} elsewhere",
        housekeeping.len(),
        own.len()
    );
    // The gateway's own code on the hit path allocates nothing.
    assert!(
        own.is_empty(),
        "{what}: {} allocations outside the cache's housekeeping, e.g.:\n{}",
        own.len(),
        own[0]
    );
    // The housekeeping runs once per 64 reads and allocates at most one queue node
    // each time (a hit is one read).
    assert!(
        housekeeping.len() <= hits_made / 64 + 1,
        "{what}: {} allocations in the cache's housekeeping for {hits_made} hits",
        housekeeping.len()
    );

    let _ = stop_tx.send(());
    gateway.block_on(server).unwrap();
}
