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
//! What this module implements of HTTP/1.1: keep-alive (HTTP/1.1 by default,
//! HTTP/1.0 with `Connection: keep-alive`), pipelining, `Content-Length` bodies within
//! the listener's limits (`Expect: 100-continue` answered), the header read timeout
//! (which also closes idle keep-alive connections), graceful shutdown, and `HEAD`.
//! What it does not: a connection that starts with the HTTP/2 preface, or a request
//! with `Transfer-Encoding` or `Upgrade`, is handed over, with the bytes already read,
//! to hyper ([`super::listener::drive_hyper`]) for the rest of its life.
//!
//! Limits: a request head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] header
//! lines (431 beyond); a malformed head gets 400. Both close the connection.

use std::io::IoSlice;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::access;
use super::body::BodyLimits;
use super::listener::{drive_hyper, Conn};
use super::response::{self, Body};
use super::router::{self, Listener, GET_LIST_PATH};
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
    /// Whether get_list hits take the shortest path: on the main listener, when no
    /// caller token or route rule needs the whole request.
    pub fast_hits: bool,
}

impl Front {
    /// The front end of `listener`.
    pub fn new(state: Arc<AppState>, listener: Listener, header_read_timeout: Duration) -> Front {
        let limits = listener.body_limits(&state);
        let fast_hits = listener == Listener::Main
            && !state.auth_required
            && state.route_allowed(crate::chat::commands::GET_LIST);
        Front {
            state,
            listener,
            header_read_timeout,
            limits,
            fast_hits,
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
    /// The target's path is the cached route (origin-form).
    get_list: bool,
    /// Range of the target's path in the buffer (for the reserve's admission).
    path: Range<usize>,
    /// HTTP/1.1 (else 1.0).
    http11: bool,
    /// `Content-Length`, checked.
    content_length: usize,
    /// Whether the caller wants the connection kept (by version and `Connection`).
    keep_alive: bool,
    /// `Transfer-Encoding` or `Upgrade` present: hyper's job.
    hand_over: bool,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// `Cache-Control: no-cache` or `no-store`.
    no_cache: bool,
    /// A sane caller `x-request-id`.
    request_id: Option<Range<usize>>,
    /// The caller's `user-agent` (for the access log).
    user_agent: Option<Range<usize>>,
}

/// Why a head cannot be served.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// Over [`MAX_HEADERS`] lines or [`MAX_HEAD`] bytes: 431.
    TooLarge,
    /// Not HTTP/1.x, or a bad `Content-Length`: 400.
    Malformed,
}

/// Parses the head at the start of `buf`: `Ok(None)` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let http11 = req.version == Some(1);
    let path = match target.as_bytes().iter().position(|b| *b == b'?') {
        Some(q) => &target[..q],
        None => target,
    };
    let mut head = Head {
        len,
        post: method == "POST",
        head_method: method == "HEAD",
        get_list: path == GET_LIST_PATH,
        path: offset(path.as_bytes()),
        http11,
        content_length: 0,
        keep_alive: http11,
        hand_over: false,
        expect_continue: false,
        no_cache: false,
        request_id: None,
        user_agent: None,
    };
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            14 if is("content-length") => {
                // Repeats must agree (as must a comma-separated list).
                for v in value.split(|b| *b == b',') {
                    let v = v.trim_ascii();
                    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                        return Err(HeadError::Malformed);
                    }
                    let n: usize = std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or(HeadError::Malformed)?;
                    if content_length.is_some_and(|c| c != n) {
                        return Err(HeadError::Malformed);
                    }
                    content_length = Some(n);
                }
            }
            17 if is("transfer-encoding") => head.hand_over = true,
            7 if is("upgrade") => head.hand_over = true,
            10 if is("connection") => {
                for token in value.split(|b| *b == b',') {
                    let t = token.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        head.keep_alive = false;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                        head.keep_alive = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        head.hand_over = true;
                    }
                }
            }
            6 if is("expect") => {
                head.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
            }
            13 if is("cache-control") => {
                head.no_cache |= value.split(|b| *b == b',').any(|d| {
                    let d = d.trim_ascii();
                    d.eq_ignore_ascii_case(b"no-cache") || d.eq_ignore_ascii_case(b"no-store")
                })
            }
            10 if is("user-agent") => head.user_agent = Some(offset(value)),
            12 if is("x-request-id")
                && router::caller_request_id(value)
                && head.request_id.is_none() =>
            {
                head.request_id = Some(offset(value));
            }
            _ => {}
        }
    }
    if req.version.is_none() {
        return Err(HeadError::Malformed);
    }
    head.content_length = content_length.unwrap_or(0);
    Ok(Some(head))
}

/// The head as an [`http::request::Parts`], for the router. Re-parsed from its bytes
/// (only off the hit path).
fn into_parts(head_bytes: &Bytes) -> Result<http::request::Parts, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head_bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadError::Malformed),
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed)?;
    let target = req.path.unwrap_or("");
    let start = target.as_ptr() as usize - head_bytes.as_ptr() as usize;
    let uri = Uri::from_maybe_shared(head_bytes.slice(start..start + target.len()))
        .map_err(|_| HeadError::Malformed)?;
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
            let name =
                HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed)?;
            let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed)?;
            map.append(name, value);
        }
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .map_err(|_| HeadError::Malformed)
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
    /// When the next request head must have arrived.
    deadline: Instant,
    /// Whether shutdown has started.
    stopping: bool,
}

/// Serves one connection of `front`'s listener until it closes.
pub async fn drive(front: Arc<Front>, stream: TcpStream, conn: Conn) {
    let deadline = Instant::now() + front.header_read_timeout;
    let mut c = Connection {
        front: &front,
        stream,
        conn,
        buf: BytesMut::with_capacity(INIT_BUF),
        out: Vec::with_capacity(512),
        deadline,
        stopping: false,
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
    if let Some(prefix) = c.serve(timer.as_mut(), stopped.as_mut()).await {
        // Hyper takes the connection, with what was already read.
        let Connection { stream, conn, .. } = c;
        let state = front.state.clone();
        let listener = front.listener;
        let io = TokioIo::new(Prefixed { prefix, stream });
        drive_hyper(
            io,
            conn,
            move |req, peer| router::route(state.clone(), req, peer, listener),
            front.header_read_timeout,
        )
        .await;
    }
}

impl Connection<'_> {
    /// Serves requests until the connection closes (`None`) or must be handed over
    /// to hyper (`Some(bytes read so far)`).
    async fn serve(
        &mut self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopped: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Option<Bytes> {
        let mut first = true;
        loop {
            // The head.
            let head = loop {
                if first && self.buf.len() >= H2_PREFACE.len().min(3) {
                    let n = self.buf.len().min(H2_PREFACE.len());
                    if self.buf[..n] == H2_PREFACE[..n] {
                        if n == H2_PREFACE.len() {
                            return Some(self.buf.split().freeze());
                        }
                        // Could still be the preface: read on.
                    } else {
                        first = false;
                    }
                }
                if !self.buf.is_empty() && !first {
                    match parse_head(&self.buf) {
                        Ok(Some(head)) => break head,
                        Ok(None) => {}
                        Err(HeadError::TooLarge) => {
                            self.refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                                .await;
                            return None;
                        }
                        Err(HeadError::Malformed) => {
                            self.refuse(StatusCode::BAD_REQUEST).await;
                            return None;
                        }
                    }
                } else if self.buf.is_empty() && self.stopping {
                    return None;
                }
                match self.read_more(timer.as_mut(), stopped.as_mut()).await {
                    Read::Data => continue,
                    Read::Closed | Read::Timeout => return None,
                    Read::Stop if self.buf.is_empty() => return None,
                    Read::Stop => continue,
                }
            };
            first = false;
            if head.hand_over {
                return Some(self.buf.split().freeze());
            }
            // Only the access log reads when a request started.
            let started = self.front.state.settings.log.access.then(Instant::now);
            self.conn.admit(&self.buf[head.path.clone()]).await;
            // The body.
            let body_end = head.len + head.content_length;
            let body = if head.content_length > self.front.limits.max_bytes {
                Err(GatewayError::BodyTooLarge(self.front.limits.max_bytes))
            } else if self.buf.len() < body_end {
                self.read_body(&head, body_end).await
            } else {
                Ok(())
            };
            let keep_alive = head.keep_alive && body.is_ok() && !self.stopping;
            // A hit, by the shortest path.
            if body.is_ok() && self.front.fast_hits && head.get_list && head.post && !head.no_cache
            {
                if let Some(now) = self.try_hit(&head, body_end, keep_alive, started).await? {
                    if !keep_alive {
                        return None;
                    }
                    self.next_request(body_end, now);
                    continue;
                }
            }
            // Everything else, through the router.
            let head_bytes = self.buf.split_to(head.len).freeze();
            let body = match body {
                Ok(()) => Ok(self.buf.split_to(head.content_length).freeze()),
                Err(e) => Err(e),
            };
            let parts = match into_parts(&head_bytes) {
                Ok(p) => p,
                Err(_) => {
                    self.refuse(StatusCode::BAD_REQUEST).await;
                    return None;
                }
            };
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
            let keep_alive = keep_alive && !closes && !self.stopping;
            if self.write_response(resp, &head, keep_alive).await.is_err() || !keep_alive {
                return None;
            }
            self.next_request(0, Instant::now());
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
        self.deadline = now + self.front.header_read_timeout;
    }

    /// Reads more bytes, until the header read deadline.
    async fn read_more(
        &mut self,
        mut timer: Pin<&mut tokio::time::Sleep>,
        mut stopped: Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Read {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(INIT_BUF);
        }
        loop {
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.buf) => {
                    return match r {
                        Ok(0) | Err(_) => Read::Closed,
                        Ok(_) => Read::Data,
                    };
                }
                _ = timer.as_mut() => {
                    let now = Instant::now();
                    if now >= self.deadline {
                        tracing::debug!(peer = %self.conn.peer, "no request head in time; closing");
                        return Read::Timeout;
                    }
                    timer.as_mut().reset(self.deadline.into());
                }
                _ = stopped.as_mut(), if !self.stopping => {
                    self.stopping = true;
                    return Read::Stop;
                }
            }
        }
    }

    /// Reads the rest of a body, within the body read timeout.
    async fn read_body(&mut self, head: &Head, body_end: usize) -> Result<(), GatewayError> {
        let limits = self.front.limits;
        if head.expect_continue
            && self
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return Err(GatewayError::BodyRead);
        }
        let read = async {
            while self.buf.len() < body_end {
                self.buf.reserve(body_end - self.buf.len());
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Err(GatewayError::BodyRead),
                    Ok(_) => {}
                }
            }
            Ok(())
        };
        match tokio::time::timeout(limits.timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::BodyTimeout(limits.timeout)),
        }
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
        let state = &self.front.state;
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
        if let Some(started) = started {
            let text = |r: &Option<Range<usize>>| {
                r.as_ref()
                    .and_then(|r| std::str::from_utf8(&self.buf[r.clone()]).ok())
                    .unwrap_or("")
            };
            access::line(&access::Line {
                method: "POST",
                path: GET_LIST_PATH,
                status: 200,
                cache: "HIT",
                code: Some(0),
                attempts: 0,
                upstream: Duration::ZERO,
                bytes: body.len() as u64,
                duration: now.saturating_duration_since(started),
                request_id: std::str::from_utf8(request_id).unwrap_or(""),
                peer: self.conn.peer,
                user_agent: access::truncate_user_agent(text(&head.user_agent)),
                listener: self.front.listener.as_str(),
            });
        }
        write_all(&mut self.stream, &self.out, body).await.ok()?;
        Some(Some(now))
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

    /// Answers a head that cannot be served, then the connection closes.
    async fn refuse(&mut self, status: StatusCode) {
        let e = match status {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request head too large",
            _ => "malformed request",
        };
        let body = crate::chat::envelope::fail_body(60008, e);
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
        let _ = write_all(&mut self.stream, &out, &body).await;
        let _ = self.stream.shutdown().await;
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

/// `wall` as an HTTP date.
fn http_date_at(wall: SystemTime) -> [u8; 29] {
    let mut text = [b' '; 29];
    let s = httpdate::fmt_http_date(wall);
    let n = s.len().min(29);
    text[..n].copy_from_slice(&s.as_bytes()[..n]);
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

    #[test]
    fn heads_are_read_in_place() {
        let raw = b"POST /v4/recentcontact/get_list?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nCache-Control: max-age=0, No-Cache\r\nX-Request-Id: abc\r\n\r\n{\"a\":1}";
        let h = parse_head(raw).unwrap().unwrap();
        assert!(h.post && h.get_list && h.http11 && h.keep_alive && h.no_cache);
        assert_eq!(h.content_length, 12);
        assert_eq!(&raw[h.request_id.unwrap()], b"abc");
        assert_eq!(&raw[h.path], b"/v4/recentcontact/get_list");
        assert_eq!(parse_head(&raw[..20]).unwrap().map(|h| h.len), None);

        let h10 = parse_head(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h10.http11 && h10.keep_alive && !h10.post);
        let close = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.keep_alive);
        let chunked = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(chunked.hand_over);
    }

    #[test]
    fn bad_heads_are_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(raw).err(),
                Some(HeadError::Malformed),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let same = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(same.content_length, 3);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many).err(), Some(HeadError::TooLarge));
        let big = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse_head(&big).err(), Some(HeadError::TooLarge));
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
