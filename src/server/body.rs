//! Reading a request body with a bound on its size and on the time it takes.

use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::GatewayError;

/// How much of a body, and for how long, a listener reads.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Deadline for the whole body once its head has arrived.
    pub timeout: Duration,
}

/// Reads the whole body, refusing anything over `max` bytes (at once from
/// `content-length`, or as soon as the streamed bytes pass the bound) and anything
/// that has not fully arrived within `timeout` (`server.body_read_timeout_ms`).
///
/// A small body usually arrives with its head: then it is taken as the one buffer
/// hyper read it into, with no copy and no timer. Only a body still on its way is
/// read under the timeout.
pub async fn read_bounded(
    headers: &http::HeaderMap,
    body: Incoming,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, GatewayError> {
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(GatewayError::BodyTooLarge(max));
        }
    }
    let read = collect(body, max);
    tokio::pin!(read);
    match futures_util::poll!(&mut read) {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::BodyTimeout(timeout)),
        },
    }
}

/// Collects the data frames of `body`, at most `max` bytes. One frame is returned as
/// is; several are joined.
async fn collect(mut body: Incoming, max: usize) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| GatewayError::BodyRead)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > max {
            return Err(GatewayError::BodyTooLarge(max));
        }
        if first.is_none() && joined.is_empty() {
            first = Some(data);
        } else {
            if let Some(f) = first.take() {
                joined.reserve(total);
                joined.extend_from_slice(&f);
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(match first {
        Some(f) => f,
        None => joined.freeze(),
    })
}

/// Longest line of a chunked body's framing (a chunk size with its extensions).
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most bytes of chunk extensions a body may carry in all (they are read and
/// ignored; the bound keeps them from costing more than the body).
pub const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Most bytes of trailer fields after the last chunk (read and ignored).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// Not chunked framing (RFC 9112 §7.1), or over its bounds: 400.
    Malformed,
    /// The data is over the listener's body limit: 413.
    TooLarge,
}

/// Where a chunked body's decoding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section, then the final CRLF.
    Trailers,
    /// The whole body is in.
    Done,
}

/// A chunked body (RFC 9112 §7.1) decoded in place as it arrives: chunk data is moved
/// down next to the data before it and the framing is dropped, so that once decoded
/// the body sits right after its head in the connection's buffer, exactly as a
/// `Content-Length` body would, with the next request (if pipelined) right after it.
///
/// Strict: a chunk size is 1 to 16 hex digits; extensions must start with `;` and hold
/// no control characters; every line ends with CRLF (a bare LF or CR is malformed);
/// chunk data is followed by CRLF; trailers are parsed as header fields, then dropped.
#[derive(Debug)]
pub struct Chunked {
    /// Data decoded so far, at `buf[start..start + decoded]`.
    decoded: usize,
    /// Data announced so far (decoded plus what the current chunk still owes).
    announced: u64,
    /// Bytes of chunk extensions seen.
    extensions: usize,
    state: ChunkState,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::new()
    }
}

impl Chunked {
    /// A body whose decoding has not started.
    pub fn new() -> Chunked {
        Chunked {
            decoded: 0,
            announced: 0,
            extensions: 0,
            state: ChunkState::Size,
        }
    }

    /// Bytes of data decoded so far (the body's length once [`Chunked::decode`] has
    /// returned `true`).
    pub fn len(&self) -> usize {
        self.decoded
    }

    /// Whether no data has been decoded.
    pub fn is_empty(&self) -> bool {
        self.decoded == 0
    }

    /// Decodes what `buf` holds past the data decoded so far; the body starts at
    /// `start`, and `max` bounds its data. Returns `true` once the body is complete:
    /// then `buf[start..start + self.len()]` is the data and what follows is the next
    /// request. Framing already read is removed from `buf` either way.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        start: usize,
        max: usize,
    ) -> Result<bool, ChunkError> {
        let end = buf.len();
        let mut w = start + self.decoded;
        let mut r = w;
        let result = loop {
            match self.state {
                ChunkState::Done => break Ok(true),
                ChunkState::Size => {
                    let window = &buf[r..end.min(r + MAX_CHUNK_LINE)];
                    let Some(nl) = window.iter().position(|b| *b == b'\n') else {
                        if window.len() >= MAX_CHUNK_LINE {
                            break Err(ChunkError::Malformed);
                        }
                        break Ok(false);
                    };
                    let (size, ext) = match chunk_size_line(&window[..nl]) {
                        Some(s) => s,
                        None => break Err(ChunkError::Malformed),
                    };
                    self.extensions += ext;
                    if self.extensions > MAX_CHUNK_EXTENSIONS {
                        break Err(ChunkError::Malformed);
                    }
                    self.announced = match self.announced.checked_add(size) {
                        Some(a) if a <= max as u64 => a,
                        _ => break Err(ChunkError::TooLarge),
                    };
                    r += nl + 1;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    let n = ((end - r) as u64).min(left) as usize;
                    if n == 0 {
                        break Ok(false);
                    }
                    buf.copy_within(r..r + n, w);
                    r += n;
                    w += n;
                    self.state = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                }
                ChunkState::DataEnd => {
                    if end - r < 2 {
                        if end > r && buf[r] != b'\r' {
                            break Err(ChunkError::Malformed);
                        }
                        break Ok(false);
                    }
                    if &buf[r..r + 2] != b"\r\n" {
                        break Err(ChunkError::Malformed);
                    }
                    r += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; 64];
                    let window = &buf[r..end.min(r + MAX_TRAILERS)];
                    match httparse::parse_headers(window, &mut fields) {
                        Ok(httparse::Status::Complete((n, _))) => {
                            r += n;
                            self.state = ChunkState::Done;
                        }
                        Ok(httparse::Status::Partial) if window.len() < MAX_TRAILERS => {
                            break Ok(false)
                        }
                        _ => break Err(ChunkError::Malformed),
                    }
                }
            }
        };
        // Drop the framing read: what follows moves down to the end of the data.
        if r > w {
            buf.copy_within(r..end, w);
            buf.truncate(end - (r - w));
        }
        self.decoded = w - start;
        result
    }
}

/// A chunk-size line without its LF: the size, and how many bytes of extensions it
/// carries; `None` when malformed.
fn chunk_size_line(line: &[u8]) -> Option<(u64, usize)> {
    let line = line.strip_suffix(b"\r")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let mut size = 0u64;
    for d in &line[..digits] {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        size = (size << 4) | u64::from(v);
    }
    let ext = &line[digits..];
    if !ext.is_empty() {
        // BWS ";" ...: the rest must be extensions, with no control characters
        // (a CR here would be a bare CR).
        let after_ws = ext.trim_ascii_start();
        if after_ws.first() != Some(&b';')
            || ext.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
        {
            return None;
        }
    }
    Some((size, ext.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` after a 3-byte "head", fed in pieces of `step` bytes.
    fn decode(input: &[u8], step: usize, max: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut buf = BytesMut::from(&b"HD:"[..]);
        let mut c = Chunked::new();
        let mut fed = 0;
        loop {
            let next = (fed + step).min(input.len());
            buf.extend_from_slice(&input[fed..next]);
            fed = next;
            if c.decode(&mut buf, 3, max)? {
                assert_eq!(&buf[..3], b"HD:");
                let body = buf[3..3 + c.len()].to_vec();
                let rest = buf[3 + c.len()..].to_vec();
                // The rest of the input is not consumed.
                let mut rest_all = rest.clone();
                rest_all.extend_from_slice(&input[fed..]);
                return Ok((body, rest_all));
            }
            if fed == input.len() {
                return Err(ChunkError::Malformed); // incomplete
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_place_whatever_the_pieces() {
        let input = b"5\r\nhello\r\n6;ext=\"a b\"\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (body, rest) = decode(input, step, 1024).unwrap();
            assert_eq!(body, b"hello world", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        let (body, rest) = decode(b"A\r\n0123456789\r\n0\r\n\r\n", 64, 10).unwrap();
        assert_eq!(
            (body.as_slice(), rest.as_slice()),
            (&b"0123456789"[..], &b""[..])
        );
        let (body, _) = decode(b"0\r\n\r\n", 1, 0).unwrap();
        assert!(body.is_empty());
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],     // bare LF
            b"5\r\nhello\n0\r\n\r\n",          // bare LF after data
            b"5\r\nhelloXX0\r\n\r\n",          // no CRLF after data
            b"5\rhello\r\n0\r\n\r\n",          // bare CR
            b" 5\r\nhello\r\n0\r\n\r\n",       // leading space
            b"0x5\r\nhello\r\n0\r\n\r\n",      // 0x prefix
            b"-5\r\nhello\r\n0\r\n\r\n",       // sign
            b"5 \r\nhello\r\n0\r\n\r\n",       // trailing space, no extension
            b"5;a\x00b\r\nhello\r\n0\r\n\r\n", // NUL in an extension
            b"\r\nhello\r\n0\r\n\r\n",         // no size
            b"g\r\n",                          // not hex
            b"10000000000000000\r\n",          // 17 digits
            b"0\r\nBad Trailer: x\r\n\r\n",    // malformed trailer
            b"0\r\n\rX",                       // bare CR in the final CRLF
        ] {
            assert_eq!(
                decode(bad, 64, 1 << 20).map(|_| ()),
                Err(ChunkError::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode(long.as_bytes(), 512, 100).map(|_| ()),
            Err(ChunkError::Malformed)
        );
        let trailers = format!("0\r\nX-T: {}\r\n\r\n", "t".repeat(MAX_TRAILERS));
        assert_eq!(
            decode(trailers.as_bytes(), 1024, 100).map(|_| ()),
            Err(ChunkError::Malformed),
            "trailers are bounded"
        );
        let fine = format!("0\r\nX-T: {}\r\n\r\n", "t".repeat(MAX_TRAILERS - 64));
        assert!(decode(fine.as_bytes(), 1024, 100).is_ok());
        let mut many = String::new();
        for _ in 0..20 {
            many.push_str(&format!("1;{}\r\nx\r\n", "e".repeat(1000)));
        }
        assert_eq!(
            decode(many.as_bytes(), 4096, 100).map(|_| ()),
            Err(ChunkError::Malformed),
            "extensions are bounded in all"
        );
    }

    #[test]
    fn chunked_bodies_over_the_limit_are_refused_on_the_size_line() {
        assert_eq!(
            decode(b"8\r\n", 64, 7).map(|_| ()),
            Err(ChunkError::TooLarge)
        );
        assert_eq!(
            decode(b"4\r\nabcd\r\n4\r\n", 64, 7).map(|_| ()),
            Err(ChunkError::TooLarge)
        );
        assert_eq!(
            decode(b"ffffffffffffffff\r\n", 64, 1 << 20).map(|_| ()),
            Err(ChunkError::TooLarge)
        );
    }
}
