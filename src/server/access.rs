//! The access log (`log.access = true`): one line per request once it is answered,
//! in text or JSON (`log.access_format`, else `log.format`), on stderr or stdout
//! (`log.access_output`). Never a body, a header value that may carry a secret, or a
//! query string.
//!
//! A line costs what nginx's does, not what a `tracing` event with fourteen fields
//! does: [`Line`] is formatted by hand into a per-thread buffer (no `fmt` machinery,
//! no allocation once the buffer has grown), then appended to one shared buffer
//! under a mutex held for a copy. A thread of its own ([`AccessLog::start`]) takes
//! that buffer every [`FLUSH_EVERY`] (or sooner when it is half full) and writes it
//! with one system call. The shared buffer holds at most `log.access_buffer_bytes`:
//! when the output is stalled (a pipe nobody reads, a full disk) or slower than the
//! requests, lines that do not fit are dropped and counted in
//! `chat_gateway_access_log_dropped_total`; a request never waits on the log.
//!
//! The lines have the shape the `tracing` formatter gives other log lines (text:
//! `<time>  INFO access method=POST ...`; JSON: `{"timestamp":..,"level":"INFO",
//! "fields":{"message":"access",...},"target":"chat_gateway::access"}`), so one
//! parser reads both.
//!
//! Handlers describe what only they know (Chat's `ErrorCode`, the attempts made)
//! with an [`AccessInfo`] in the response's extensions; the router writes the line.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Response};
use http_body::Body as _;

use super::response::{Body, X_CACHE};
use crate::config::{AccessOutput, LogFormat, LogSettings};

/// The access log's target (the name its JSON lines carry).
pub const TARGET: &str = "chat_gateway::access";
/// The longest `user-agent` written.
const MAX_USER_AGENT: usize = 128;
/// How long a line waits at most before the writer takes it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// What a handler knows about the request it answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessInfo {
    /// The `ErrorCode` of the answer, when it is an envelope.
    pub code: Option<i64>,
    /// Calls this request made to Chat.
    pub attempts: u32,
    /// Time those calls took.
    pub upstream: Duration,
}

impl AccessInfo {
    /// An answer with `code` that made no call to Chat.
    pub fn code(code: i64) -> Self {
        AccessInfo {
            code: Some(code),
            ..Default::default()
        }
    }

    /// Attaches this to `resp`.
    pub fn attach(self, resp: &mut Response<Body>) {
        resp.extensions_mut().insert(self);
    }
}

/// What the router saw of the request, kept until the answer is ready.
#[derive(Debug)]
pub struct RequestLine {
    /// When the request was handed to the router.
    pub started: Instant,
    /// `GET`, `POST`...
    pub method: Method,
    /// The path, without the query string (which may carry Chat credentials).
    pub path: String,
    /// The caller's `user-agent`, truncated.
    pub user_agent: String,
    /// The caller.
    pub peer: SocketAddr,
    /// Which listener took it (`main`, `admin`, `callback`).
    pub listener: &'static str,
    /// The request's trace, when tracing is on.
    pub trace_id: Option<u128>,
}

impl RequestLine {
    /// Captures what the line needs from a request that arrived at `started`.
    pub fn new(
        req: &http::request::Parts,
        peer: SocketAddr,
        listener: &'static str,
        started: Instant,
    ) -> RequestLine {
        let ua = req
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ua = truncate_user_agent(ua);
        RequestLine {
            started,
            method: req.method.clone(),
            path: req.uri.path().chars().take(256).collect(),
            user_agent: ua.to_string(),
            peer,
            listener,
            trace_id: None,
        }
    }

    /// Writes the line for `resp` to `log`.
    pub fn write(self, log: &AccessLog, resp: &Response<Body>, request_id: &HeaderValue) {
        let info = resp
            .extensions()
            .get::<AccessInfo>()
            .copied()
            .unwrap_or_default();
        let cache = resp
            .headers()
            .get(X_CACHE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let bytes = resp.body().size_hint().exact().unwrap_or(0);
        // A cache hit is a stored success: its code is 0 without looking.
        let code = info.code.or((cache == "HIT").then_some(0));
        let now = Instant::now();
        log.log(&Line {
            method: self.method.as_str(),
            path: &self.path,
            status: resp.status().as_u16(),
            cache,
            code,
            attempts: info.attempts,
            upstream: info.upstream,
            bytes,
            duration: now.saturating_duration_since(self.started),
            now,
            request_id: request_id.as_bytes(),
            trace_id: self.trace_id,
            peer: self.peer,
            user_agent: self.user_agent.as_bytes(),
            listener: self.listener,
        });
    }
}

/// One access-log line's fields.
#[derive(Debug)]
pub struct Line<'a> {
    /// `GET`, `POST`...
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The answer's status.
    pub status: u16,
    /// `x-cache`, or `-`.
    pub cache: &'a str,
    /// The answer's `ErrorCode`, when it is an envelope.
    pub code: Option<i64>,
    /// Calls made to Chat.
    pub attempts: u32,
    /// Time spent in them.
    pub upstream: Duration,
    /// Bytes of the answer's body.
    pub bytes: u64,
    /// From the request's arrival to its answer.
    pub duration: Duration,
    /// When it was answered (the line's timestamp).
    pub now: Instant,
    /// The request id (visible ASCII).
    pub request_id: &'a [u8],
    /// The request's trace, when tracing is on.
    pub trace_id: Option<u128>,
    /// The caller.
    pub peer: SocketAddr,
    /// The caller's `user-agent` (truncated; written escaped).
    pub user_agent: &'a [u8],
    /// `main`, `admin` or `callback`.
    pub listener: &'static str,
}

impl Line<'_> {
    /// Whether the line is written whatever `log.access_sample` says: errors (HTTP
    /// 4xx and 5xx, 429 included, or an `ErrorCode` other than 0), stale answers and
    /// answers that took more than one call to Chat.
    pub fn always_logged(&self) -> bool {
        self.status >= 400
            || self.code.is_some_and(|c| c != 0)
            || self.cache == "STALE"
            || self.attempts > 1
    }
}

/// `user-agent` truncated to what the log keeps.
pub fn truncate_user_agent(ua: &str) -> &str {
    match ua.char_indices().nth(MAX_USER_AGENT) {
        Some((i, _)) => &ua[..i],
        None => ua,
    }
}

/// The same for raw header bytes (at most [`MAX_USER_AGENT`] bytes; a cut inside a
/// UTF-8 sequence is written escaped).
pub fn truncate_user_agent_bytes(ua: &[u8]) -> &[u8] {
    &ua[..ua.len().min(MAX_USER_AGENT)]
}

/// The process's access log, once [`install`]ed.
static LOG: OnceLock<Arc<AccessLog>> = OnceLock::new();

/// Starts the access log for `settings` (when `log.access` is on) and makes it the
/// process's; later calls keep the first. Returns it.
pub fn install(settings: &LogSettings) -> Option<&'static AccessLog> {
    if !settings.access {
        return None;
    }
    if LOG.get().is_none() {
        match AccessLog::start(settings) {
            Ok(log) => {
                let _ = LOG.set(log);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the access log's writer");
                return None;
            }
        }
    }
    get()
}

/// The process's access log, if one was installed.
#[inline]
pub fn get() -> Option<&'static AccessLog> {
    LOG.get().map(|l| &**l)
}

/// The access log: formats lines and hands them to its writer thread.
#[derive(Debug)]
pub struct AccessLog {
    format: LogFormat,
    /// A successful answer is logged when a random `u64` is below this
    /// (`u64::MAX` with `access_sample = 1`: every one, and no random number).
    sample_below: u64,
    sink: Arc<Sink>,
    dropped: metrics::Counter,
}

impl AccessLog {
    /// Starts the writer thread for `settings`' output.
    pub fn start(settings: &LogSettings) -> std::io::Result<Arc<AccessLog>> {
        let out: Box<dyn Write + Send> = match settings.access_output {
            AccessOutput::Stderr => Box::new(StdErr),
            AccessOutput::Stdout => Box::new(StdOut),
        };
        Self::start_to(settings, out)
    }

    /// Like [`AccessLog::start`], writing to `out` (tests).
    pub fn start_to(
        settings: &LogSettings,
        out: Box<dyn Write + Send>,
    ) -> std::io::Result<Arc<AccessLog>> {
        let sink = Arc::new(Sink::new(settings.access_buffer_bytes));
        // The recorder first: a counter made before it exists counts nothing.
        crate::metrics::install();
        let dropped = metrics::counter!(crate::metrics::names::ACCESS_LOG_DROPPED);
        let writer = sink.clone();
        let writer_dropped = dropped.clone();
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(out, writer_dropped))?;
        if let Ok(mut h) = sink.handle.lock() {
            *h = Some(handle);
        }
        let sample = settings.access_sample;
        let sample_below = if sample >= 1.0 {
            u64::MAX
        } else {
            (sample.max(0.0) * u64::MAX as f64) as u64
        };
        Ok(Arc::new(AccessLog {
            format: settings.access_format,
            sample_below,
            sink,
            dropped,
        }))
    }

    /// Writes `line` (unless sampled out); never blocks on the output.
    pub fn log(&self, line: &Line<'_>) {
        if self.sample_below != u64::MAX && !line.always_logged() && random() >= self.sample_below {
            return;
        }
        SCRATCH.with(|s| {
            let Ok(mut buf) = s.try_borrow_mut() else {
                return;
            };
            buf.clear();
            match self.format {
                LogFormat::Text => text(&mut buf, line),
                LogFormat::Json => json(&mut buf, line),
            }
            if !self.sink.push(&buf) {
                self.dropped.increment(1);
            }
        });
    }

    /// Writes what is buffered and stops the writer, waiting at most `timeout` (the
    /// output may be stalled). Lines logged afterwards are dropped.
    pub fn flush(&self, timeout: Duration) {
        self.sink.close();
        let deadline = Instant::now() + timeout;
        let handle = self.sink.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

thread_local! {
    /// Each thread formats its lines here (grown once, then reused).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// xorshift64* state for sampling.
    static RNG: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A random `u64` from a per-thread generator (sampling needs no more).
fn random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = rand::random::<u64>() | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// The buffer shared by the request threads and the writer.
#[derive(Debug)]
struct Sink {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Bytes the buffer may hold.
    cap: usize,
    /// Past this the writer is woken at once.
    high_water: usize,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

impl Sink {
    fn new(cap: usize) -> Sink {
        Sink {
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(cap),
                closed: false,
            }),
            wake: Condvar::new(),
            cap,
            high_water: cap / 2,
            handle: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a line; `false` (dropped) when it does not fit or the log is closed.
    #[inline]
    fn push(&self, line: &[u8]) -> bool {
        let mut p = self.lock();
        let before = p.buf.len();
        if p.closed || before + line.len() > self.cap {
            return false;
        }
        p.buf.extend_from_slice(line);
        let after = p.buf.len();
        drop(p);
        // The writer sleeps while the buffer is empty, and gathers lines for
        // FLUSH_EVERY once it is not: wake it for the first line, and when the
        // buffer passes half full.
        if before == 0 || (before < self.high_water && after >= self.high_water) {
            self.wake.notify_one();
        }
        true
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// The writer thread: takes the buffer and writes it, until closed and empty.
    fn run(&self, mut out: Box<dyn Write + Send>, dropped: metrics::Counter) {
        let mut spare: Vec<u8> = Vec::with_capacity(self.cap);
        loop {
            let mut p = self.lock();
            while p.buf.is_empty() && !p.closed {
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.buf.is_empty() && p.closed {
                return;
            }
            if !p.closed && p.buf.len() < self.high_water {
                // Gather more lines: one write for many.
                p = self
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut p.buf, &mut spare);
            drop(p);
            if out.write_all(&spare).and_then(|()| out.flush()).is_err() {
                let lost = spare.iter().filter(|b| **b == b'\n').count();
                dropped.increment(lost as u64);
            }
            spare.clear();
        }
    }
}

/// Standard error, written through std's lock (shared with the other log lines, so
/// lines never interleave).
struct StdErr;

impl Write for StdErr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().lock().flush()
    }
}

/// Standard output.
struct StdOut;

impl Write for StdOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stdout().lock().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

// ------------------------------------------------------------------ formatting

/// Appends `v` in decimal.
#[inline]
fn num(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// The text line: the shape `tracing`'s formatter gives the other lines
/// (`&str` fields quoted and escaped as `Debug` does, numbers and the method, path
/// and peer bare).
fn text(out: &mut Vec<u8>, l: &Line<'_>) {
    timestamp(out, l.now);
    out.extend_from_slice(b"  INFO access method=");
    out.extend_from_slice(l.method.as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(l.path.as_bytes());
    out.extend_from_slice(b" status=");
    num(out, u64::from(l.status));
    out.extend_from_slice(b" cache=\"");
    debug_escaped(out, l.cache.as_bytes());
    if let Some(code) = l.code {
        out.extend_from_slice(b"\" code=");
        signed(out, code);
        out.extend_from_slice(b" attempts=");
    } else {
        out.extend_from_slice(b"\" attempts=");
    }
    num(out, u64::from(l.attempts));
    out.extend_from_slice(b" upstream_us=");
    num(out, l.upstream.as_micros() as u64);
    out.extend_from_slice(b" bytes=");
    num(out, l.bytes);
    out.extend_from_slice(b" duration_us=");
    num(out, l.duration.as_micros() as u64);
    out.extend_from_slice(b" request_id=\"");
    debug_escaped(out, l.request_id);
    if let Some(t) = l.trace_id {
        out.extend_from_slice(b"\" trace_id=\"");
        hex128(out, t);
    }
    out.extend_from_slice(b"\" peer=");
    peer(out, l.peer);
    out.extend_from_slice(b" user_agent=\"");
    debug_escaped(out, l.user_agent);
    out.extend_from_slice(b"\" listener=\"");
    out.extend_from_slice(l.listener.as_bytes());
    out.extend_from_slice(b"\"\n");
}

/// The JSON line: the shape of `tracing`'s JSON formatter.
fn json(out: &mut Vec<u8>, l: &Line<'_>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, l.now);
    out.extend_from_slice(
        b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"access\",\"method\":\"",
    );
    json_escaped(out, l.method.as_bytes());
    out.extend_from_slice(b"\",\"path\":\"");
    json_escaped(out, l.path.as_bytes());
    out.extend_from_slice(b"\",\"status\":");
    num(out, u64::from(l.status));
    out.extend_from_slice(b",\"cache\":\"");
    json_escaped(out, l.cache.as_bytes());
    out.extend_from_slice(b"\"");
    if let Some(code) = l.code {
        out.extend_from_slice(b",\"code\":");
        signed(out, code);
    }
    out.extend_from_slice(b",\"attempts\":");
    num(out, u64::from(l.attempts));
    out.extend_from_slice(b",\"upstream_us\":");
    num(out, l.upstream.as_micros() as u64);
    out.extend_from_slice(b",\"bytes\":");
    num(out, l.bytes);
    out.extend_from_slice(b",\"duration_us\":");
    num(out, l.duration.as_micros() as u64);
    out.extend_from_slice(b",\"request_id\":\"");
    json_escaped(out, l.request_id);
    if let Some(t) = l.trace_id {
        out.extend_from_slice(b"\",\"trace_id\":\"");
        hex128(out, t);
    }
    out.extend_from_slice(b"\",\"peer\":\"");
    peer(out, l.peer);
    out.extend_from_slice(b"\",\"user_agent\":\"");
    json_escaped(out, l.user_agent);
    out.extend_from_slice(b"\",\"listener\":\"");
    json_escaped(out, l.listener.as_bytes());
    out.extend_from_slice(b"\"},\"target\":\"chat_gateway::access\"}\n");
}

fn signed(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// A trace id as 32 lower-case hex digits.
fn hex128(out: &mut Vec<u8>, v: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = [0u8; 32];
    for (i, slot) in b.iter_mut().enumerate() {
        *slot = HEX[((v >> (124 - 4 * i)) & 0xf) as usize];
    }
    out.extend_from_slice(&b);
}

/// `a.b.c.d:port` without `fmt` for IPv4; IPv6 through `Display`.
fn peer(out: &mut Vec<u8>, p: SocketAddr) {
    match p {
        SocketAddr::V4(a) => {
            let [a0, a1, a2, a3] = a.ip().octets();
            for (i, o) in [a0, a1, a2, a3].into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                num(out, u64::from(o));
            }
            out.push(b':');
            num(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{p}");
        }
    }
}

/// Bytes as `Debug` writes a string's content: `"` and `\` escaped, control
/// characters as `\n`, `\r`, `\t` or `\u{..}`; bytes that are not UTF-8 as `\x..`.
fn debug_escaped(out: &mut Vec<u8>, s: &[u8]) {
    // Most values (ids, user-agents) need no escape at all.
    if s.iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(s);
        return;
    }
    for chunk in s.utf8_chunks() {
        let v = chunk.valid().as_bytes();
        let mut start = 0;
        for (i, &b) in v.iter().enumerate() {
            if b >= 0x80 || ((0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
                continue;
            }
            out.extend_from_slice(&v[start..i]);
            start = i + 1;
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    out.extend_from_slice(b"\\u{");
                    hex_byte(out, b, false);
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(&v[start..]);
        for b in chunk.invalid() {
            out.extend_from_slice(b"\\x");
            hex_byte(out, *b, true);
        }
    }
}

/// Bytes as the content of a JSON string (control characters as `\uXXXX` or their
/// short escapes; bytes that are not UTF-8 as U+FFFD).
fn json_escaped(out: &mut Vec<u8>, s: &[u8]) {
    if s.iter()
        .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(s);
        return;
    }
    for chunk in s.utf8_chunks() {
        let v = chunk.valid().as_bytes();
        let mut start = 0;
        for (i, &b) in v.iter().enumerate() {
            if b >= 0x20 && b != b'"' && b != b'\\' {
                continue;
            }
            out.extend_from_slice(&v[start..i]);
            start = i + 1;
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                _ => {
                    out.extend_from_slice(b"\\u00");
                    hex_byte(out, b, true);
                }
            }
        }
        out.extend_from_slice(&v[start..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
}

/// A byte in hex: two digits (`pad`) or as few as needed.
fn hex_byte(out: &mut Vec<u8>, b: u8, pad: bool) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if pad || b >= 0x10 {
        out.push(HEX[usize::from(b >> 4)]);
    }
    out.push(HEX[usize::from(b & 0xf)]);
}

/// `2024-05-01T12:00:00.123456Z` (UTC, microseconds) for the instant `now`: the
/// wall clock is read once a second per thread, and the date formatted then.
fn timestamp(out: &mut Vec<u8>, now: Instant) {
    thread_local! {
        /// (when the cached second started, as an instant; its text up to the
        /// dot; whether set)
        static CLOCK: std::cell::Cell<(Option<Instant>, [u8; 20])> =
            const { std::cell::Cell::new((None, [0; 20])) };
    }
    CLOCK.with(|c| {
        let (start, text) = c.get();
        if let Some(start) = start {
            if let Some(into) = now.checked_duration_since(start) {
                if into < Duration::from_secs(1) {
                    out.extend_from_slice(&text);
                    micros6(out, into.subsec_micros());
                    out.push(b'Z');
                    return;
                }
            }
        }
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // `now` is a little before the wall clock read here: its time is the wall
        // clock minus what passed since (or plus, for an instant yet to come).
        let read = Instant::now();
        let wall = match now.checked_duration_since(read) {
            Some(ahead) => wall + ahead,
            None => wall.saturating_sub(read.saturating_duration_since(now)),
        };
        let text = date_time(wall.as_secs());
        let micros = wall.subsec_micros();
        c.set((
            now.checked_sub(Duration::from_micros(u64::from(micros))),
            text,
        ));
        out.extend_from_slice(&text);
        micros6(out, micros);
        out.push(b'Z');
    });
}

fn micros6(out: &mut Vec<u8>, us: u32) {
    let mut b = [b'0'; 6];
    let mut v = us;
    for slot in b.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&b);
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (UTC).
fn date_time(secs: u64) -> [u8; 20] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let mut t = *b"0000-00-00T00:00:00.";
    let two = |t: &mut [u8; 20], at: usize, v: u64| {
        t[at] = b'0' + (v / 10 % 10) as u8;
        t[at + 1] = b'0' + (v % 10) as u8;
    };
    let y = y.clamp(0, 9999) as u64;
    t[0] = b'0' + (y / 1000) as u8;
    t[1] = b'0' + (y / 100 % 10) as u8;
    two(&mut t, 2, y % 100);
    two(&mut t, 5, u64::from(m));
    two(&mut t, 8, u64::from(d));
    two(&mut t, 11, hh);
    two(&mut t, 14, mm);
    two(&mut t, 17, ss);
    t
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(ua: &'a [u8], rid: &'a [u8]) -> Line<'a> {
        Line {
            method: "POST",
            path: "/v4/recentcontact/get_list",
            status: 200,
            cache: "HIT",
            code: Some(0),
            attempts: 0,
            upstream: Duration::ZERO,
            bytes: 1273,
            duration: Duration::from_micros(12),
            now: Instant::now(),
            request_id: rid,
            trace_id: None,
            peer: "127.0.0.1:43994".parse().unwrap(),
            user_agent: ua,
            listener: "main",
        }
    }

    #[test]
    fn text_lines_have_tracings_shape() {
        let mut out = Vec::new();
        text(&mut out, &line(b"a\"b\\c", b"rid-1"));
        let s = String::from_utf8(out).unwrap();
        let (ts, rest) = s.split_once("  INFO ").unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert_eq!(
            rest,
            "access method=POST path=/v4/recentcontact/get_list status=200 cache=\"HIT\" code=0 attempts=0 upstream_us=0 bytes=1273 duration_us=12 request_id=\"rid-1\" peer=127.0.0.1:43994 user_agent=\"a\\\"b\\\\c\" listener=\"main\"\n"
        );
        let mut l = line(b"x\x01\xff", b"r");
        l.code = None;
        l.trace_id = Some(0x0af7651916cd43dd8448eb211c80319c);
        let mut out = Vec::new();
        text(&mut out, &l);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("cache=\"HIT\" attempts=0"), "{s}");
        assert!(
            s.contains("request_id=\"r\" trace_id=\"0af7651916cd43dd8448eb211c80319c\" peer="),
            "{s}"
        );
        assert!(s.contains("user_agent=\"x\\u{1}\\xff\""), "{s}");
    }

    #[test]
    fn json_lines_parse_and_have_tracings_shape() {
        let mut l = line("ü\"\u{7}\\".as_bytes(), b"rid\"2");
        l.trace_id = Some(1);
        l.peer = "[::1]:8080".parse().unwrap();
        let mut out = Vec::new();
        json(&mut out, &l);
        assert!(out.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], TARGET);
        let f = &v["fields"];
        assert_eq!(f["message"], "access");
        assert_eq!(f["status"], 200);
        assert_eq!(f["code"], 0);
        assert_eq!(f["bytes"], 1273);
        assert_eq!(f["request_id"], "rid\"2");
        assert_eq!(f["trace_id"], "00000000000000000000000000000001");
        assert_eq!(f["peer"], "[::1]:8080");
        assert_eq!(f["user_agent"], "ü\"\u{7}\\");
        assert_eq!(f["listener"], "main");
        // The keys in tracing's order (as the text shows them).
        let text = String::from_utf8(out.clone()).unwrap();
        let mut keys: Vec<(usize, &str)> = f
            .as_object()
            .unwrap()
            .keys()
            .map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k.as_str()))
            .collect();
        keys.sort();
        let keys: Vec<&str> = keys.into_iter().map(|(_, k)| k).collect();
        assert_eq!(
            keys,
            [
                "message",
                "method",
                "path",
                "status",
                "cache",
                "code",
                "attempts",
                "upstream_us",
                "bytes",
                "duration_us",
                "request_id",
                "trace_id",
                "peer",
                "user_agent",
                "listener"
            ]
        );
        let mut bad = Vec::new();
        json(&mut bad, &line(b"\xff\xfe", b"r"));
        assert!(serde_json::from_slice::<serde_json::Value>(&bad).is_ok());
    }

    #[test]
    fn dates() {
        assert_eq!(&date_time(0), b"1970-01-01T00:00:00.");
        assert_eq!(&date_time(784_111_777), b"1994-11-06T08:49:37.");
        assert_eq!(&date_time(951_782_400), b"2000-02-29T00:00:00.");
        assert_eq!(&date_time(4_102_444_799), b"2099-12-31T23:59:59.");
        // Agrees with httpdate's calendar on many days.
        for d in (0..50_000u64).step_by(37) {
            let secs = d * 86_400 + 3_723;
            let http = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            let ours = String::from_utf8(date_time(secs).to_vec()).unwrap();
            let day: u32 = ours[8..10].parse().unwrap();
            assert!(http.contains(&format!("{day:02} ")), "{http} vs {ours}");
            assert!(http.contains(&ours[..4]), "{http} vs {ours}");
        }
        let mut out = Vec::new();
        micros6(&mut out, 42);
        assert_eq!(out, b"000042");
    }

    #[test]
    fn timestamps_follow_the_clock() {
        let now = Instant::now();
        let mut a = Vec::new();
        timestamp(&mut a, now);
        let mut b = Vec::new();
        timestamp(&mut b, now + Duration::from_millis(1500));
        let parse = |v: &[u8]| {
            let s = std::str::from_utf8(v).unwrap();
            let secs: f64 = s[17..26].parse().unwrap();
            let min: f64 = s[14..16].parse().unwrap();
            min * 60.0 + secs
        };
        let d = (parse(&b) - parse(&a)).rem_euclid(3600.0);
        assert!((d - 1.5).abs() < 0.01, "{d}");
    }

    /// A sink that records what is written, and can be stalled.
    #[derive(Clone, Default)]
    struct Recorder {
        data: Arc<Mutex<Vec<u8>>>,
        stall: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.stall;
            let mut s = m.lock().unwrap();
            while *s {
                s = c.wait(s).unwrap();
            }
            self.data.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn settings(sample: f64, buffer: usize) -> LogSettings {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
            access: true,
            access_sample: sample,
            access_format: LogFormat::Text,
            access_output: AccessOutput::Stderr,
            access_buffer_bytes: buffer,
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_and_never_blocks() {
        let rec = Recorder::default();
        *rec.stall.0.lock().unwrap() = true;
        let log = AccessLog::start_to(&settings(1.0, 4096), Box::new(rec.clone())).unwrap();
        let started = Instant::now();
        for _ in 0..10_000 {
            log.log(&line(b"ua", b"rid"));
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never blocked");
        // The buffer holds ~4 KiB (and the writer one more batch): most lines are lost.
        let held = 2 * 4096 / 150 + 2;
        {
            let (m, c) = &*rec.stall;
            *m.lock().unwrap() = false;
            c.notify_all();
        }
        log.flush(Duration::from_secs(10));
        let written = rec
            .data
            .lock()
            .unwrap()
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        assert!(written > 0 && written <= held, "{written}");
    }

    #[test]
    fn lines_are_written_whole_and_in_order() {
        let rec = Recorder::default();
        let log = AccessLog::start_to(&settings(1.0, 1 << 20), Box::new(rec.clone())).unwrap();
        for i in 0..1000u32 {
            let rid = format!("rid-{i}");
            log.log(&line(b"ua", rid.as_bytes()));
        }
        log.flush(Duration::from_secs(10));
        let data = rec.data.lock().unwrap();
        let text = std::str::from_utf8(&data).unwrap();
        let ids: Vec<&str> = text
            .lines()
            .map(|l| {
                l.split("request_id=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(ids.len(), 1000);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(*id, format!("rid-{i}"));
        }
    }

    #[test]
    fn sampling_keeps_every_error_and_a_share_of_the_rest() {
        let rec = Recorder::default();
        let log = AccessLog::start_to(&settings(0.1, 1 << 22), Box::new(rec.clone())).unwrap();
        for i in 0..10_000u32 {
            let mut l = line(b"ua", b"ok");
            match i % 5 {
                0 => {
                    l.status = 429;
                    l.code = Some(60007);
                    l.request_id = b"err";
                }
                1 => {
                    l.cache = "STALE";
                    l.request_id = b"stale";
                }
                2 => {
                    l.attempts = 2;
                    l.cache = "MISS";
                    l.request_id = b"retried";
                }
                _ => {}
            }
            log.log(&l);
        }
        log.flush(Duration::from_secs(10));
        let data = rec.data.lock().unwrap();
        let text = std::str::from_utf8(&data).unwrap();
        let count = |id: &str| text.matches(&format!("request_id=\"{id}\"")).count();
        assert_eq!(count("err"), 2000);
        assert_eq!(count("stale"), 2000);
        assert_eq!(count("retried"), 2000);
        let ok = count("ok");
        assert!((200..=650).contains(&ok), "{ok} of 4000 at 0.1");
    }
}
