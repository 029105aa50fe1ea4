//! The gateway's own HTTP/1.1 front end, for its listeners.
//!
//! A cache hit is the whole point of the gateway, so it is served by the shortest
//! path there is: the request head is parsed in place (`httparse`, the parser hyper
//! uses), no header map is built, the body is scanned by [`crate::cache::key::fast`],
//! the page is looked up, and the answer's head is written from a reused buffer next
//! to the cached body (one `writev`). Everything that is not a hit on that path is
//! turned into an [`http::Request`] and goes through [`super::router::handle`], like
//! the requests hyper serves, so every route behaves the same however it arrived.
//!
//! Every HTTP/1.x request is read here, whichever way it is then answered, and judged
//! by one set of rules ([`super::rules`]): what a valid head is, how its body is
//! framed, whether the connection is kept. What this module implements of HTTP/1.1:
//! keep-alive (HTTP/1.1 by default, HTTP/1.0 with `Connection: keep-alive`),
//! pipelining, `Content-Length` and chunked bodies within the listener's limits
//! (`Expect: 100-continue` answered on HTTP/1.1), the header read timeout (which also
//! closes idle keep-alive connections), `HEAD`, and graceful shutdown (the answers
//! written once it has started say `connection: close`). A connection that starts with
//! the HTTP/2 preface is handed over, with the bytes already read, to hyper
//! ([`super::listener::drive_hyper`]).
//!
//! A connection closed after an answer (a refusal, a body too large or too slow,
//! `Connection: close`, HTTP/1.0, shutdown) is closed in stages, as RFC 9112 §9.6 asks:
//! the write side is shut down after the answer, then whatever the caller still sends
//! is read and dropped for at most [`LINGER_TIME`] and [`LINGER_BYTES`], so that
//! closing with unread bytes does not reset the connection under the answer before
//! the caller has read it (a caller still uploading a refused body would otherwise
//! see a reset instead of its 413).
//!
//! Limits: a request head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] header
//! lines (431 beyond), a target of at most [`super::rules::MAX_TARGET`] bytes (414).

use std::future::Future;
use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use opentelemetry::KeyValue;

use super::access;
use super::auth;
use super::body::{BodyLimits, ChunkError, Chunked};
use super::handlers;
use super::listener::{drive_hyper, Conn};
use super::response::{self, Body};
use super::router::{self, Listener, GET_LIST_PATH};
use super::rules::{self, Facts, Fate, Framing, HeadCheck, Refusal, MAX_TARGET};
use super::AppState;
use crate::cache::key;
use crate::cache::store::Lookup;
use crate::error::GatewayError;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a request head.
pub const MAX_HEADERS: usize = 100;
/// A connection's read buffer to start with (and to shrink back to after a large
/// request).
const INIT_BUF: usize = 8 * 1024;
/// What an HTTP/2 connection starts with (prior knowledge).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// Longest a connection closed after an answer is drained (lingering close).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Most bytes a connection closed after an answer reads and drops (lingering close).
pub const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// Room a request line gets beyond its target (method, version, spaces), to tell an
/// over-long target (414) from a head that is merely incomplete.
const REQUEST_LINE_SLACK: usize = 256;

/// One listener's front end: what its connections share.
pub struct Front {
    /// The gateway.
    pub state: Arc<AppState>,
    /// Which listener (its routes and limits).
    pub listener: Listener,
    /// Deadline for a request head, and for an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Body limits of this listener.
    pub limits: BodyLimits,
    /// Whether get_list hits take the shortest path: on the main listener, when the
    /// route rules let get_list through (they are fixed at start-up; caller tokens
    /// are checked on the path itself).
    pub fast_hits: bool,
    /// The same for the other cached reads: a bit per row of the reads table (off
    /// with tracing on: their spans are made on the general path).
    pub fast_items: u64,
    /// The access log, when `log.access` is on.
    pub access: Option<&'static access::AccessLog>,
}

impl Front {
    /// The front end of `listener`.
    pub fn new(state: Arc<AppState>, listener: Listener, header_read_timeout: Duration) -> Front {
        let limits = listener.body_limits(&state);
        let fast_hits =
            listener == Listener::Main && state.route_allowed(crate::chat::commands::GET_LIST);
        let fast_items = crate::chat::reads::READS
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                *i < 64
                    && r.store == crate::chat::reads::Store::Items
                    && listener == Listener::Main
                    && state.settings.tracing.is_none()
                    && state.route_allowed(r.command)
            })
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        let access = access::get().filter(|_| state.settings.log.access);
        Front {
            state,
            listener,
            header_read_timeout,
            limits,
            fast_hits,
            fast_items,
            access,
        }
    }
}

/// What the head of a request says, read in place.
#[derive(Debug)]
struct Head {
    /// Bytes of the head, the final CRLF included.
    len: usize,
    /// `POST`?
    post: bool,
    /// `HEAD` (the answer carries no body)?
    head_method: bool,
    /// The target's path is the cached route.
    get_list: bool,
    /// The target's path is another cached read: its row of the reads table.
    item_row: Option<u8>,
    /// Range of the target's path in the buffer (for the reserve's admission).
    path: Range<usize>,
    /// HTTP/1.1 (else 1.0).
    http11: bool,
    /// Framing, keep-alive, `Expect`, by [`rules`].
    facts: Facts,
    /// `Cache-Control: no-cache` or `no-store`.
    no_cache: bool,
    /// A sane caller `x-request-id`.
    request_id: Option<Range<usize>>,
    /// The caller's `user-agent` (for the access log).
    user_agent: Option<Range<usize>>,
    /// `Authorization` (for a caller token).
    authorization: Option<Range<usize>>,
    /// W3C `traceparent` and `tracestate` (for tracing).
    traceparent: Option<Range<usize>>,
    tracestate: Option<Range<usize>>,
}

/// The last `Host` value a connection sent that was valid: a keep-alive caller sends
/// the same one every time, and comparing it costs less than checking it again.
#[derive(Debug)]
struct HostMemo {
    len: usize,
    bytes: [u8; 64],
}

impl Default for HostMemo {
    fn default() -> Self {
        HostMemo {
            len: 0,
            bytes: [0; 64],
        }
    }
}

impl HostMemo {
    #[inline]
    fn holds(&self, value: &[u8]) -> bool {
        value.len() == self.len && self.bytes.get(..self.len) == Some(value)
    }

    #[inline]
    fn keep(&mut self, value: &[u8]) {
        if let Some(slot) = self.bytes.get_mut(..value.len()) {
            slot.copy_from_slice(value);
            self.len = value.len();
        }
    }
}

/// Parses the head at the start of `buf` and checks it against [`rules`]: `Ok(None)`
/// while incomplete.
fn parse_head(buf: &[u8], memo: &mut HostMemo) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return incomplete_head(buf).map(|()| None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::BadRequest("malformed request head")),
    };
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("").as_bytes();
    // The cached routes' own targets are valid as they are: no need to scan them.
    let (path, get_list, item_row) = if target == GET_LIST_PATH.as_bytes() {
        (target, true, None)
    } else if let Some(row) = item_row(target) {
        (target, false, Some(row))
    } else {
        let path = &target[rules::check_target(method.as_bytes(), target)?];
        let get_list = path == GET_LIST_PATH.as_bytes();
        (path, get_list, if get_list { None } else { item_row(path) })
    };
    if len > MAX_HEAD {
        return Err(Refusal::HeadTooLarge);
    }
    let http11 = req.version == Some(1);
    let mut check = HeadCheck::new(http11);
    let mut no_cache = false;
    let mut request_id = None;
    let mut user_agent = None;
    let mut authorization = None;
    let mut traceparent = None;
    let mut tracestate = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let is = |n: &str| name_is(name, n.as_bytes());
        match name.len() {
            4 if is("host") => {
                if memo.holds(value) {
                    check.host_valid();
                } else if check.host(value) {
                    memo.keep(value);
                }
            }
            14 if is("content-length") => check.content_length(value),
            17 if is("transfer-encoding") => check.transfer_encoding(value),
            10 if is("connection") => check.connection(value),
            6 if is("expect") => check.expect(value),
            13 if is("cache-control") => no_cache |= rules::cache_control_no_cache(value),
            10 if is("user-agent") => user_agent = Some(offset(value)),
            13 if is("authorization") => authorization = Some(offset(value)),
            11 if is("traceparent") => traceparent = Some(offset(value)),
            10 if is("tracestate") => tracestate = Some(offset(value)),
            12 if is("x-request-id")
                && router::caller_request_id(value)
                && request_id.is_none() =>
            {
                request_id = Some(offset(value));
            }
            _ => {}
        }
    }
    let facts = check.finish()?;
    Ok(Some(Head {
        len,
        post: method == "POST",
        head_method: method == "HEAD",
        get_list,
        item_row,
        path: offset(path),
        http11,
        facts,
        no_cache,
        request_id,
        user_agent,
        authorization,
        traceparent,
        tracestate,
    }))
}

/// Whether the header name `name` (a token, as `httparse` checked it) is `lower`
/// (lowercase letters and `-` only), in any case: a word at a time. Setting
/// bit 5 of every byte lowercases a letter and maps nothing else onto a lowercase
/// letter or `-` but CR, which a token cannot hold.
#[inline(always)]
fn name_is(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|c| c.is_ascii_lowercase() || *c == b'-'));
    if name.len() != lower.len() {
        return false;
    }
    if let (Some(b), Some(d)) = (name.last_chunk::<8>(), lower.last_chunk::<8>()) {
        // Whole words, then the last eight bytes (overlapping the last whole word).
        const CASE: u64 = 0x2020_2020_2020_2020;
        let word = |w: &[u8; 8]| u64::from_ne_bytes(*w);
        let (words, _) = name.as_chunks::<8>();
        let (lower_words, _) = lower.as_chunks::<8>();
        return words
            .iter()
            .zip(lower_words)
            .all(|(a, c)| word(a) | CASE == word(c))
            && word(b) | CASE == word(d);
    }
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        name.first_chunk::<4>(),
        name.last_chunk::<4>(),
        lower.first_chunk::<4>(),
        lower.last_chunk::<4>(),
    ) {
        const CASE: u32 = 0x2020_2020;
        return u32::from_ne_bytes(*a) | CASE == u32::from_ne_bytes(*c)
            && u32::from_ne_bytes(*b) | CASE == u32::from_ne_bytes(*d);
    }
    name.eq_ignore_ascii_case(lower)
}

/// The row of the reads table whose entries are per item, if `path` is exactly its
/// route.
fn item_row(path: &[u8]) -> Option<u8> {
    let command = path.strip_prefix(b"/v4/")?;
    crate::chat::reads::READS
        .iter()
        .position(|r| {
            r.command.len() == command.len()
                && r.command.as_bytes() == command
                && r.store == crate::chat::reads::Store::Items
        })
        .and_then(|i| u8::try_from(i).ok())
}

/// An incomplete head: fine while it may still become a valid one; 414 once its
/// request line cannot hold a target of at most [`MAX_TARGET`] bytes, 431 once it is
/// over [`MAX_HEAD`].
fn incomplete_head(buf: &[u8]) -> Result<(), Refusal> {
    if buf.len() <= MAX_TARGET {
        return Ok(());
    }
    match buf.iter().position(|b| *b == b'\n') {
        None if buf.len() > MAX_TARGET + REQUEST_LINE_SLACK => Err(Refusal::TargetTooLong),
        Some(end) => {
            // The target is what lies between the first and the last space.
            let line = &buf[..end];
            let first = line.iter().position(|b| *b == b' ');
            let last = line.iter().rposition(|b| *b == b' ');
            match (first, last) {
                (Some(f), Some(l)) if l > f && l - f - 1 > MAX_TARGET => {
                    Err(Refusal::TargetTooLong)
                }
                _ if buf.len() >= MAX_HEAD => Err(Refusal::HeadTooLarge),
                _ => Ok(()),
            }
        }
        None => Ok(()),
    }
}

/// A head `httparse` or the `http` types refuse.
const MALFORMED: Refusal = Refusal::BadRequest("malformed request head");

/// The head as an [`http::request::Parts`], for the router. Re-parsed from its bytes
/// (only off the hit path). Whatever [`parse_head`] accepts is accepted here too
/// (a unit test holds it to that), so the two paths cannot disagree.
fn into_parts(head_bytes: &Bytes) -> Result<http::request::Parts, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head_bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(MALFORMED),
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| MALFORMED)?;
    let target = req.path.unwrap_or("");
    let start = target.as_ptr() as usize - head_bytes.as_ptr() as usize;
    let uri = Uri::from_maybe_shared(head_bytes.slice(start..start + target.len()))
        .map_err(|_| MALFORMED)?;
    let mut builder =
        http::Request::builder()
            .method(method)
            .uri(uri)
            .version(if req.version == Some(1) {
                Version::HTTP_11
            } else {
                Version::HTTP_10
            });
    if let Some(map) = builder.headers_mut() {
        map.reserve(req.headers.len());
        for h in req.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| MALFORMED)?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| MALFORMED)?;
            map.append(name, value);
        }
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .map_err(|_| MALFORMED)
}

/// How reading more of a connection ended.
enum Read {
    /// Bytes arrived.
    Data,
    /// The caller closed, or the socket failed.
    Closed,
    /// No head within the header read timeout.
    Timeout,
    /// Shutdown started while the connection was idle.
    Stop,
}

/// A connection: its socket, buffers and timer.
struct Connection<'a> {
    front: &'a Front,
    stream: TcpStream,
    conn: Conn,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The head of the answer being written (reused).
    out: Vec<u8>,
    /// When it started waiting for the next request head, which must arrive within
    /// the header read timeout (the deadline is only worked out when the timer
    /// fires, not at every request).
    idle_since: Instant,
    /// Whether shutdown has started.
    stopping: bool,
    /// The waker the timer and the shutdown signal were last polled with
    /// ([`Connection::read_more`]).
    armed: Option<Waker>,
    /// The last valid `Host` it sent.
    host: HostMemo,
    /// The entries of a full hit of a cached read being written (kept, empty, from
    /// one request to the next: no allocation per hit).
    hits: Vec<Arc<crate::cache::items::ItemEntry>>,
    /// The fast scanner's scratch for cached-read hits (a few KB, made at the
    /// connection's first such request and kept: no hit initializes it).
    fast_req: Option<Box<crate::cache::item_fast::FastRequest>>,
    /// The caller tokens as this connection sees them (made at its first hit).
    tokens: Option<auth::TokenView<'a>>,
}

/// Serves one connection of `front`'s listener until it closes.
pub async fn drive(front: Arc<Front>, stream: TcpStream, conn: Conn) {
    let opened = Instant::now();
    let deadline = opened + front.header_read_timeout;
    let mut c = Connection {
        front: &front,
        stream,
        conn,
        buf: BytesMut::with_capacity(INIT_BUF),
        out: Vec::with_capacity(512),
        idle_since: opened,
        stopping: false,
        armed: None,
        host: HostMemo::default(),
        hits: Vec::new(),
        fast_req: None,
        tokens: None,
    };
    // One timer for the connection's life, re-armed lazily: it fires at most once per
    // header read timeout, not once per request.
    let timer = tokio::time::sleep_until(deadline.into());
    tokio::pin!(timer);
    // The shutdown signal, waited on by one future for the connection's life (a new
    // wait per read would register a new waiter each time).
    let mut stop = c.conn.stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    match c.serve(timer.as_mut(), stopped.as_mut()).await {
        End::Closed => {}
        End::Answered => c.linger().await,
        End::HandOver(prefix) => {
            // HTTP/2 with prior knowledge: hyper takes the connection, with what was
            // already read.
            let Connection { stream, conn, .. } = c;
            let state = front.state.clone();
            let listener = front.listener;
            let io = TokioIo::new(Prefixed { prefix, stream });
            drive_hyper(
                io,
                conn,
                move |req, peer| router::route(state.clone(), req, peer, listener),
                front.header_read_timeout,
                Some(front.header_read_timeout),
            )
            .await;
        }
    }
}

/// How serving a connection ended.
enum End {
    /// Nothing more to do: the caller closed, a timeout or shutdown found it idle, or
    /// a write failed.
    Closed,
    /// An answer was written and the connection is not kept: close it in stages.
    Answered,
    /// HTTP/2: hyper's, with the bytes read so far.
    HandOver(Bytes),
}

impl Connection<'_> {
    /// Serves requests until the connection is done with.
    async fn serve(
        &mut self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopped: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> End {
        let mut first = true;
        loop {
            // The head.
            let head = loop {
                if first && self.buf.len() >= H2_PREFACE.len().min(3) {
                    let n = self.buf.len().min(H2_PREFACE.len());
                    if self.buf[..n] == H2_PREFACE[..n] {
                        if n == H2_PREFACE.len() {
                            return End::HandOver(self.buf.split().freeze());
                        }
                        // Could still be the preface: read on.
                    } else {
                        first = false;
                    }
                }
                if !self.buf.is_empty() && !first {
                    match parse_head(&self.buf, &mut self.host) {
                        Ok(Some(head)) => break head,
                        Ok(None) => {}
                        Err(refusal) => return self.refuse(refusal).await,
                    }
                } else if self.buf.is_empty() && self.stopping {
                    return End::Closed;
                }
                match self.read_more(timer.as_mut(), stopped.as_mut()).await {
                    Read::Data => continue,
                    Read::Closed | Read::Timeout => return End::Closed,
                    Read::Stop if self.buf.is_empty() => return End::Closed,
                    Read::Stop => continue,
                }
            };
            first = false;
            // Only the access log reads when a request started.
            let started = self.front.access.map(|_| Instant::now());
            self.conn.admit(&self.buf[head.path.clone()]).await;
            // The body: once read, it is at buf[head.len..body_end].
            let body = self.read_body(&head).await;
            let body_end = head.len + *body.as_ref().unwrap_or(&0);
            let keep_alive =
                Fate::after(head.facts.keep_alive, body.is_ok(), false, self.stopping())
                    == Fate::KeepAlive;
            // A hit, by the shortest path.
            if body.is_ok() && self.front.fast_hits && head.get_list && head.post && !head.no_cache
            {
                match self.try_hit(&head, body_end, keep_alive, started).await {
                    None => return End::Closed,
                    Some(Some(now)) => {
                        if !keep_alive {
                            return End::Answered;
                        }
                        self.next_request(body_end, now);
                        continue;
                    }
                    Some(None) => {}
                }
            }
            // A full hit of another cached read, by the same path.
            if let Some(row) = head
                .item_row
                .filter(|r| self.front.fast_items & (1 << r) != 0)
            {
                if body.is_ok() && head.post && !head.no_cache {
                    match self
                        .try_item_hit(&head, row, body_end, keep_alive, started)
                        .await
                    {
                        None => return End::Closed,
                        Some(Some(now)) => {
                            if !keep_alive {
                                return End::Answered;
                            }
                            self.next_request(body_end, now);
                            continue;
                        }
                        Some(None) => {}
                    }
                }
            }
            // Everything else, through the router.
            let head_bytes = self.buf.split_to(head.len).freeze();
            let body = match body {
                Ok(len) => Ok(self.buf.split_to(len).freeze()),
                Err(e) => Err(e),
            };
            let parts = match into_parts(&head_bytes) {
                Ok(p) => p,
                Err(refusal) => return self.refuse(refusal).await,
            };
            let read = body.is_ok();
            let resp = router::handle(
                self.front.state.clone(),
                parts,
                body,
                self.conn.peer,
                self.front.listener,
                started.unwrap_or_else(Instant::now),
            )
            .await;
            let closes = resp
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let fate = Fate::after(head.facts.keep_alive, read, closes, self.stopping());
            let keep_alive = fate == Fate::KeepAlive;
            if self.write_response(resp, &head, keep_alive).await.is_err() {
                return End::Closed;
            }
            if !keep_alive {
                return End::Answered;
            }
            self.next_request(0, Instant::now());
        }
    }

    /// Whether shutdown has started (checked before each answer, so that the answers
    /// written after it say `connection: close`). One atomic load.
    #[inline]
    fn stopping(&mut self) -> bool {
        if !self.stopping && self.conn.stop.has_changed().unwrap_or(true) {
            self.stopping = true;
        }
        self.stopping
    }

    /// The second stage of closing after an answer (RFC 9112 §9.6): the write side is
    /// shut down (the caller sees the end of the answer), then what the caller still
    /// sends is read and dropped until it closes too, for at most [`LINGER_TIME`] and
    /// [`LINGER_BYTES`]; only then is the socket closed. Closing at once with unread
    /// bytes would make the kernel reset the connection, and a reset can destroy the
    /// answer before the caller reads it.
    async fn linger(&mut self) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut drained = 0usize;
        self.buf.clear();
        while drained <= LINGER_BYTES {
            if self.buf.capacity() < INIT_BUF {
                self.buf.reserve(INIT_BUF);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    drained += n;
                    self.buf.clear();
                }
                _ => break,
            }
        }
    }

    /// Consumes `consumed` bytes of the buffer and starts waiting for the next head,
    /// from `now`.
    fn next_request(&mut self, consumed: usize, now: Instant) {
        self.buf.advance(consumed);
        if self.buf.is_empty() && self.buf.capacity() > 4 * INIT_BUF {
            // A large request grew the buffer: give it back.
            self.buf = BytesMut::with_capacity(INIT_BUF);
        }
        self.idle_since = now;
    }

    /// Reads more bytes, until the header read deadline.
    ///
    /// The timer and the shutdown signal keep the waker they were last polled with.
    /// While that is this task's (`armed`), they are polled again only once they
    /// have fired (`Sleep::is_elapsed`, the signal's `has_changed`: two loads),
    /// not every time the connection waits for a request.
    async fn read_more(
        &mut self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopped: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Read {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(INIT_BUF);
        }
        let Connection {
            front,
            stream,
            conn,
            buf,
            idle_since,
            stopping,
            armed,
            ..
        } = self;
        let read = stream.read_buf(buf);
        tokio::pin!(read);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(match r {
                    Ok(0) | Err(_) => Read::Closed,
                    Ok(_) => Read::Data,
                });
            }
            let registered = armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
            let mut poll_timer = !registered || timer.is_elapsed();
            while poll_timer {
                if timer.as_mut().poll(cx).is_pending() {
                    poll_timer = false;
                    continue;
                }
                let deadline = *idle_since + front.header_read_timeout;
                if Instant::now() >= deadline {
                    tracing::debug!(peer = %conn.peer, "no request head in time; closing");
                    return Poll::Ready(Read::Timeout);
                }
                // Re-armed: polled again, to register it.
                timer.as_mut().reset(deadline.into());
            }
            if !*stopping
                && (!registered || conn.stop.has_changed().unwrap_or(true))
                && stopped.as_mut().poll(cx).is_ready()
            {
                *stopping = true;
                return Poll::Ready(Read::Stop);
            }
            if !registered {
                *armed = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Reads the request's body, whatever its framing, within the listener's limits:
    /// returns its length, the body then being at `buf[head.len..head.len + length]`
    /// (a chunked body decoded in place) with the next request, if any, after it.
    async fn read_body(&mut self, head: &Head) -> Result<usize, GatewayError> {
        let limits = self.front.limits;
        match head.facts.framing {
            Framing::Length(n) => {
                if n > limits.max_bytes as u64 {
                    return Err(GatewayError::BodyTooLarge(limits.max_bytes));
                }
                let end = head.len + n as usize;
                if self.buf.len() >= end {
                    return Ok(n as usize);
                }
                self.continue_if_expected(head).await?;
                let deadline = tokio::time::Instant::now() + limits.timeout;
                while self.buf.len() < end {
                    self.buf.reserve(end - self.buf.len());
                    self.read_body_bytes(deadline, limits).await?;
                }
                Ok(n as usize)
            }
            Framing::Chunked => {
                let mut chunked = Chunked::new();
                let decode = |c: &mut Chunked, buf: &mut BytesMut| {
                    c.decode(buf, head.len, limits.max_bytes)
                        .map_err(|e| match e {
                            ChunkError::Malformed => GatewayError::BodyRead,
                            ChunkError::TooLarge => GatewayError::BodyTooLarge(limits.max_bytes),
                        })
                };
                if decode(&mut chunked, &mut self.buf)? {
                    return Ok(chunked.len());
                }
                self.continue_if_expected(head).await?;
                let deadline = tokio::time::Instant::now() + limits.timeout;
                loop {
                    if self.buf.capacity() - self.buf.len() < 1024 {
                        self.buf.reserve(INIT_BUF);
                    }
                    self.read_body_bytes(deadline, limits).await?;
                    if decode(&mut chunked, &mut self.buf)? {
                        return Ok(chunked.len());
                    }
                }
            }
        }
    }

    /// Reads more of a body, by `deadline`.
    async fn read_body_bytes(
        &mut self,
        deadline: tokio::time::Instant,
        limits: BodyLimits,
    ) -> Result<(), GatewayError> {
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0) | Err(_)) => Err(GatewayError::BodyRead),
            Ok(Ok(_)) => Ok(()),
            Err(_) => Err(GatewayError::BodyTimeout(limits.timeout)),
        }
    }

    /// `100 Continue` before reading a body the caller holds back for it (HTTP/1.1
    /// only: [`rules`] ignores the expectation from HTTP/1.0).
    async fn continue_if_expected(&mut self, head: &Head) -> Result<(), GatewayError> {
        if head.facts.expect_continue
            && self
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return Err(GatewayError::BodyRead);
        }
        Ok(())
    }

    /// Serves a get_list hit straight from the cache: `Some(Some(when))` once it is
    /// answered, `Some(None)` when it is not a hit (then the router serves it),
    /// `None` when the socket failed.
    async fn try_hit(
        &mut self,
        head: &Head,
        body_end: usize,
        keep_alive: bool,
        started: Option<Instant>,
    ) -> Option<Option<Instant>> {
        let front = self.front;
        let state = &front.state;
        // Caller tokens, checked here in constant time (see `auth`): a caller
        // without a valid one goes to the router, which answers 401.
        if !self.caller_allowed(head) {
            return Some(None);
        }
        let Some(req) = key::fast(&self.buf[head.len..body_end]) else {
            return Some(None);
        };
        let now = Instant::now();
        let page = match state.store.lookup(&req.account, &req.page, now) {
            Lookup::Fresh(page) => page,
            _ => return Some(None),
        };
        state.counters.req_hit.increment(1);
        state.counters.hit.increment(1);
        // With tracing on, the hit's place in a trace: its trace id for the log, and
        // spans only when it is recorded.
        let trace = if crate::trace::enabled() {
            crate::trace::begin(head.traceparent.as_ref().map(|r| &self.buf[r.clone()]))
        } else {
            None
        };
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-cache: HIT\r\nage: ",
        );
        push_u64(out, now.saturating_duration_since(page.stored_at).as_secs());
        out.extend_from_slice(b"\r\nx-request-id: ");
        let fresh_id;
        let request_id: &[u8] = match &head.request_id {
            Some(r) => &self.buf[r.clone()],
            None => {
                fresh_id = router::fresh_request_id_bytes();
                &fresh_id
            }
        };
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\ncontent-length: ");
        let body: &[u8] = if head.head_method { b"" } else { &page.body };
        push_u64(out, page.body.len() as u64);
        finish_head(out, head, keep_alive, now);
        if let (Some(log), Some(started)) = (self.front.access, started) {
            log.log(&access::Line {
                method: "POST",
                path: GET_LIST_PATH,
                status: 200,
                cache: "HIT",
                code: Some(0),
                attempts: 0,
                upstream: Duration::ZERO,
                bytes: body.len() as u64,
                duration: now.saturating_duration_since(started),
                now,
                request_id,
                trace_id: trace.map(|t| t.trace_id),
                peer: self.conn.peer,
                user_agent: head.user_agent.as_ref().map_or(&b""[..], |r| {
                    access::truncate_user_agent_bytes(&self.buf[r.clone()])
                }),
                listener: self.front.listener.as_str(),
            });
        }
        let recorded = match &trace {
            Some(t) if t.sampled => {
                Some(self.hit_spans(t, head, request_id, started.unwrap_or(now)))
            }
            _ => None,
        };
        write_all(&mut self.stream, &self.out, body).await.ok()?;
        if let Some(Some(active)) = recorded {
            active.end(
                vec![
                    KeyValue::new("http.response.status_code", 200),
                    KeyValue::new("chat_gateway.cache", "HIT"),
                    KeyValue::new("chat.error_code", 0),
                ],
                false,
            );
        }
        Some(Some(now))
    }

    /// Whether the request may take a fast path as far as caller tokens go: no
    /// tokens are set, or its `Authorization` carries one (compared in constant time
    /// against this connection's view of the list, made at its first hit).
    #[inline(always)]
    fn caller_allowed(&mut self, head: &Head) -> bool {
        !self.front.state.auth_required || self.token_allowed(head)
    }

    /// [`Connection::caller_allowed`] with caller tokens set.
    #[inline(never)]
    fn token_allowed(&mut self, head: &Head) -> bool {
        let value = head.authorization.as_ref().map(|r| &self.buf[r.clone()]);
        let tokens = match &mut self.tokens {
            Some(view) => view,
            none => {
                let state = &self.front.state;
                none.insert(state.caller_tokens.view(&state.secrets.auth_tokens))
            }
        };
        tokens.check_header(value)
    }

    /// Serves a full hit of a cached read other than get_list (row `row`) straight
    /// from the item store ([`handlers::items::fast_hit`]): the head, then the
    /// answer's pieces (template and items) gathered in one `writev`. Returns as
    /// [`Connection::try_hit`] does.
    async fn try_item_hit(
        &mut self,
        head: &Head,
        row: u8,
        body_end: usize,
        keep_alive: bool,
        started: Option<Instant>,
    ) -> Option<Option<Instant>> {
        // Caller tokens, as for a get_list hit: without a valid one, the router.
        if !self.caller_allowed(head) {
            return Some(None);
        }
        let now = Instant::now();
        let Some(hit) = handlers::items::fast_hit(
            &self.front.state,
            usize::from(row),
            &self.buf[head.len..body_end],
            now,
            self.fast_req
                .get_or_insert_with(crate::cache::item_fast::request),
            &mut self.hits,
        ) else {
            self.hits.clear();
            return Some(None);
        };
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-cache: HIT\r\nage: ",
        );
        push_u64(out, hit.age);
        out.extend_from_slice(b"\r\nx-request-id: ");
        let fresh_id;
        let request_id: &[u8] = match &head.request_id {
            Some(r) => &self.buf[r.clone()],
            None => {
                fresh_id = router::fresh_request_id_bytes();
                &fresh_id
            }
        };
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\ncontent-length: ");
        push_u64(out, hit.len as u64);
        finish_head(out, head, keep_alive, now);
        if let (Some(log), Some(started)) = (self.front.access, started) {
            log.log(&access::Line {
                method: "POST",
                path: std::str::from_utf8(&self.buf[head.path.clone()]).unwrap_or(""),
                status: 200,
                cache: "HIT",
                code: Some(0),
                attempts: 0,
                upstream: Duration::ZERO,
                bytes: hit.len as u64,
                duration: now.saturating_duration_since(started),
                now,
                request_id,
                trace_id: None,
                peer: self.conn.peer,
                user_agent: head.user_agent.as_ref().map_or(&b""[..], |r| {
                    access::truncate_user_agent_bytes(&self.buf[r.clone()])
                }),
                listener: self.front.listener.as_str(),
            });
        }
        let mut slices = [IoSlice::new(&[]); handlers::items::FAST_PIECES + 1];
        slices[0] = IoSlice::new(&self.out);
        let n = hit.pieces(&self.hits, &mut slices[1..]);
        let written = write_slices(&mut self.stream, &mut slices[..=n]).await;
        drop(hit);
        self.hits.clear();
        written.ok()?;
        Some(Some(now))
    }

    /// The spans of a recorded hit: the request's (returned, ended once the answer
    /// is written) and its cache lookup's.
    #[cold]
    fn hit_spans(
        &self,
        trace: &crate::trace::RequestTrace,
        head: &Head,
        request_id: &[u8],
        started: Instant,
    ) -> Option<crate::trace::Active> {
        let start = crate::trace::wall_clock_at(started);
        let active = trace.start(
            concat!("POST ", "/v4/recentcontact/get_list"),
            start,
            head.tracestate.as_ref().map(|r| &self.buf[r.clone()]),
            vec![
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("url.path", GET_LIST_PATH),
                KeyValue::new(
                    "chat_gateway.request_id",
                    String::from_utf8_lossy(request_id).into_owned(),
                ),
                KeyValue::new("chat_gateway.listener", self.front.listener.as_str()),
            ],
        )?;
        active.child(
            "cache lookup",
            start,
            std::time::SystemTime::now(),
            vec![KeyValue::new("chat_gateway.cache.result", "hit")],
        );
        Some(active)
    }

    /// Writes a response the router made.
    async fn write_response(
        &mut self,
        resp: Response<Body>,
        head: &Head,
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let (parts, body) = resp.into_parts();
        let body = response::into_bytes(body);
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("Unknown")
                .as_bytes(),
        );
        for (name, value) in &parts.headers {
            if matches!(
                *name,
                http::header::CONTENT_LENGTH | http::header::CONNECTION | http::header::DATE
            ) {
                continue;
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\r\ncontent-length: ");
        push_u64(out, body.len() as u64);
        finish_head(out, head, keep_alive, Instant::now());
        let body: &[u8] = if head.head_method { b"" } else { &body };
        write_all(&mut self.stream, &self.out, body).await
    }

    /// Answers a head that cannot be served; the connection is then closed.
    async fn refuse(&mut self, refusal: Refusal) -> End {
        let status = refusal.status();
        let body = crate::chat::envelope::fail_body(60008, refusal.reason());
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        push_u64(&mut out, body.len() as u64);
        out.extend_from_slice(b"\r\nconnection: close\r\ndate: ");
        out.extend_from_slice(&http_date(Instant::now()));
        out.extend_from_slice(b"\r\n\r\n");
        match write_all(&mut self.stream, &out, &body).await {
            Ok(()) => End::Answered,
            Err(_) => End::Closed,
        }
    }
}

/// The end of an answer's head: `connection` when it matters, `date` (at `now`), the
/// blank line.
fn finish_head(out: &mut Vec<u8>, head: &Head, keep_alive: bool, now: Instant) {
    if !keep_alive {
        out.extend_from_slice(b"\r\nconnection: close");
    } else if !head.http11 {
        out.extend_from_slice(b"\r\nconnection: keep-alive");
    }
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(&http_date(now));
    out.extend_from_slice(b"\r\n\r\n");
}

/// Writes every slice, gathered (one system call when the socket takes them all).
async fn write_slices(stream: &mut TcpStream, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Writes `head` then `body`, gathered (one system call when the socket takes it all).
async fn write_all(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(body)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    if body.is_empty() {
        bufs = &mut bufs[..1];
    }
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Appends `v` in decimal.
fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// The HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) at `now`, an instant the caller
/// already has: the wall clock is read and formatted once a second per thread, and
/// the text reused until the next second starts.
fn http_date(now: Instant) -> [u8; 29] {
    thread_local! {
        static CACHE: std::cell::Cell<(Option<Instant>, [u8; 29])> =
            const { std::cell::Cell::new((None, [0; 29])) };
    }
    CACHE.with(|c| {
        let (until, text) = c.get();
        if until.is_some_and(|u| now < u) {
            return text;
        }
        let wall = SystemTime::now();
        let into_second = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let text = http_date_at(wall);
        let next = now + Duration::from_nanos(u64::from(1_000_000_000 - into_second));
        c.set((Some(next), text));
        text
    })
}

/// `wall` as an HTTP date, formatted in place (no allocation: it runs on the hit
/// path once a second).
fn http_date_at(wall: SystemTime) -> [u8; 29] {
    use std::io::Write as _;
    let mut text = [b' '; 29];
    // Always 29 bytes ("Sun, 06 Nov 1994 08:49:37 GMT"); a longer one is cut.
    let _ = write!(&mut text[..], "{}", httpdate::HttpDate::from(wall));
    text
}

/// A socket whose first bytes were already read: they are read again first (for
/// handing a connection over to hyper).
struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> Result<Option<Head>, Refusal> {
        parse_head(buf, &mut HostMemo::default())
    }

    /// Header names are told apart as `eq_ignore_ascii_case` tells them, for every
    /// name a token can be: each known name with each byte replaced by every token
    /// character, and cut or grown by one.
    #[test]
    fn header_names_compare_as_ascii_case_insensitive() {
        let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        for known in [
            "host",
            "expect",
            "connection",
            "user-agent",
            "tracestate",
            "traceparent",
            "x-request-id",
            "cache-control",
            "authorization",
            "content-length",
            "transfer-encoding",
        ] {
            let lower = known.as_bytes();
            assert!(name_is(lower, lower));
            assert!(name_is(known.to_ascii_uppercase().as_bytes(), lower));
            assert!(!name_is(&lower[1..], lower));
            assert!(!name_is(format!("{known}s").as_bytes(), lower));
            for i in 0..lower.len() {
                for c in (0..=255u8).filter(|c| tchar(*c)) {
                    let mut name = lower.to_vec();
                    name[i] = c;
                    assert_eq!(
                        name_is(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{:?} against {known}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
        }
    }

    /// The memo of a connection's last valid `Host` changes no verdict.
    #[test]
    fn the_host_memo_changes_nothing() {
        let mut memo = HostMemo::default();
        let ok = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";
        assert!(parse_head(ok, &mut memo).unwrap().is_some());
        assert!(memo.holds(b"127.0.0.1:8080"));
        assert!(parse_head(ok, &mut memo).unwrap().is_some());
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nHost: 127.0.0.1:8080\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1 8080\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(
                parse_head(bad, &mut memo),
                Err(Refusal::BadRequest(_))
            ));
        }
        let long = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", "a".repeat(100));
        assert!(parse_head(long.as_bytes(), &mut memo).unwrap().is_some());
        assert!(memo.holds(b"127.0.0.1:8080"), "too long to keep");
    }

    #[test]
    fn heads_are_read_in_place() {
        let raw = b"POST /v4/recentcontact/get_list?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nCache-Control: max-age=0, No-Cache\r\nX-Request-Id: abc\r\n\r\n{\"a\":1}";
        let h = parse(raw).unwrap().unwrap();
        assert!(h.post && h.get_list && h.http11 && h.facts.keep_alive && h.no_cache);
        assert_eq!(h.facts.framing, Framing::Length(12));
        assert_eq!(&raw[h.request_id.unwrap()], b"abc");
        assert_eq!(&raw[h.path], b"/v4/recentcontact/get_list");
        assert_eq!(parse(&raw[..20]).unwrap().map(|h| h.len), None);

        let abs = b"POST http://gw/v4/recentcontact/get_list HTTP/1.1\r\nHost: gw\r\n\r\n";
        let h = parse(abs).unwrap().unwrap();
        assert!(h.get_list);
        assert_eq!(&abs[h.path], b"/v4/recentcontact/get_list");

        let h10 = parse(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h10.http11 && h10.facts.keep_alive && !h10.post);
        let close = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.facts.keep_alive);
        let chunked = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.facts.framing, Framing::Chunked);
    }

    #[test]
    fn bad_heads_are_refused() {
        let bad = |raw: &[u8]| matches!(parse(raw), Err(Refusal::BadRequest(_)));
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a?<b> HTTP/1.1\r\nHost: a\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(bad(raw), "{}", String::from_utf8_lossy(raw));
        }
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").err(),
            Some(Refusal::UnknownCoding)
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).err(), Some(Refusal::HeadTooLarge));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 1, b'a');
        assert_eq!(parse(&big).err(), Some(Refusal::HeadTooLarge));
    }

    #[test]
    fn over_long_targets_are_414_even_before_the_head_ends() {
        // The request line alone, still arriving.
        let mut line = b"GET /".to_vec();
        line.resize(MAX_TARGET + REQUEST_LINE_SLACK + 1, b'a');
        assert_eq!(parse(&line).err(), Some(Refusal::TargetTooLong));
        line.truncate(MAX_TARGET);
        assert!(parse(&line).unwrap().is_none(), "may still be fine");
        // A complete request line, the head still arriving.
        let mut head = format!("GET /{} HTTP/1.1\r\nX: ", "a".repeat(MAX_TARGET)).into_bytes();
        assert_eq!(parse(&head).err(), Some(Refusal::TargetTooLong));
        // A whole head.
        head.extend_from_slice(b"y\r\nHost: a\r\n\r\n");
        assert_eq!(parse(&head).err(), Some(Refusal::TargetTooLong));
        // A 70 KB target.
        let huge = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000));
        assert_eq!(parse(huge.as_bytes()).err(), Some(Refusal::TargetTooLong));
        assert_eq!(
            parse(&huge.as_bytes()[..MAX_HEAD]).err(),
            Some(Refusal::TargetTooLong)
        );
    }

    proptest::proptest! {
        /// Whatever head the front end accepts, the router's request types accept
        /// too: a request is never a hit on one path and a 400 on the other.
        #[test]
        fn accepted_heads_become_requests(
            method in proptest::sample::select(vec!["GET", "POST", "HEAD", "OPTIONS", "X-Y"]),
            target in "(/|http://[a-z0-9.:\\[\\]-]{0,12}/)[ -~]{0,30}",
            name in "[!-~]{1,12}",
            value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
        ) {
            let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: gw\r\n{name}: ").into_bytes();
            raw.extend_from_slice(&value);
            raw.extend_from_slice(b"\r\n\r\n");
            if let Ok(Some(h)) = parse(&raw) {
                let bytes = Bytes::copy_from_slice(&raw[..h.len]);
                proptest::prop_assert!(into_parts(&bytes).is_ok(), "{:?}", String::from_utf8_lossy(&raw));
            }
        }
    }

    #[test]
    fn parts_keep_every_header() {
        let raw = Bytes::from_static(
            b"POST http://gw/v4/openim/sendmsg?x=1 HTTP/1.0\r\nA: 1\r\nA: 2\r\nB: x\r\n\r\n",
        );
        let p = into_parts(&raw).unwrap();
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.uri.path(), "/v4/openim/sendmsg");
        assert_eq!(p.version, Version::HTTP_10);
        assert_eq!(p.headers.get_all("a").iter().count(), 2);
    }

    #[test]
    fn dates_and_numbers() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(&http_date_at(t), b"Sun, 06 Nov 1994 08:49:37 GMT");
        let mut out = Vec::new();
        push_u64(&mut out, 0);
        out.push(b' ');
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, b"0 18446744073709551615");
    }
}
