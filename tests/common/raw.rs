//! A raw HTTP/1.1 client: we write bytes exactly as a slow or broken caller would,
//! and parse what comes back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A raw HTTP/1.1 connection: we write bytes, and parse what comes back.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

#[derive(Debug, PartialEq)]
pub enum ReadErr {
    /// Nothing complete arrived in time.
    Timeout,
    /// The server closed the connection (or reset it).
    Closed,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads more bytes into the buffer until `deadline`.
    pub async fn fill(&mut self, deadline: Instant) -> Result<(), ReadErr> {
        if self.eof {
            return Err(ReadErr::Closed);
        }
        let mut tmp = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.stream.read(&mut tmp)).await {
            Err(_) => Err(ReadErr::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                Err(ReadErr::Closed)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
        }
    }

    /// The next complete response (an interim `100 Continue` counts as one), within
    /// `within`.
    pub async fn response(&mut self, within: Duration) -> Result<RawResponse, ReadErr> {
        self.read_response(within, true).await
    }

    /// The next response to a `HEAD` request: a head (whatever its
    /// `content-length`) and no body.
    pub async fn head_response(&mut self, within: Duration) -> Result<RawResponse, ReadErr> {
        self.read_response(within, false).await
    }

    async fn read_response(
        &mut self,
        within: Duration,
        with_body: bool,
    ) -> Result<RawResponse, ReadErr> {
        let deadline = Instant::now() + within;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill(deadline).await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length") && with_body)
            .map(|(_, v)| v.parse().expect("content-length"))
            .unwrap_or(0);
        while self.buf.len() < head_end + len {
            self.fill(deadline).await?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// Waits until the server closes the connection, discarding whatever it sends
    /// first (e.g. a 408). `None` if still open at `deadline`.
    pub async fn closed_by(&mut self, deadline: Instant) -> Option<Instant> {
        loop {
            match self.fill(deadline).await {
                Ok(()) => self.buf.clear(),
                Err(ReadErr::Closed) => return Some(Instant::now()),
                Err(ReadErr::Timeout) => return None,
            }
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
