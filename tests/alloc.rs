//! Heap allocations per cache hit, counted: the gateway runs in this process on a
//! runtime of its own whose threads are marked, and a counting allocator counts what
//! those threads allocate while a client on another thread sends hits over one
//! keep-alive connection.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::raw::*;
use common::*;

/// Counts the allocations made on marked threads.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is one of the gateway's.
    static GATEWAY_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if GATEWAY_THREAD.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
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

/// No allocation per hit, plain, with a caller token (checked on the hit path), and
/// with tracing on and the hit not sampled. One test: the counter is shared.
#[test]
fn a_cache_hit_allocates_nothing() {
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
    ALLOCATIONS.store(0, Ordering::Relaxed);
    const HITS: usize = 2000;
    client.block_on(hits(&mut conn, &request, HITS));
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    eprintln!("{what}: {allocations} allocations on the gateway's threads for {HITS} hits");
    // The hit path itself allocates nothing; the cache's epoch-based reclamation
    // flushes a small buffer every hundred or so reads.
    assert!(
        allocations * 50 <= HITS,
        "{what}: {allocations} allocations for {HITS} hits: the hit path must not allocate"
    );

    let _ = stop_tx.send(());
    gateway.block_on(server).unwrap();
}
