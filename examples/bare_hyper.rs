//! The floor for a cache hit: a bare hyper 1.x HTTP/1 server that answers every
//! request with one fixed body and the headers a gateway cache hit carries
//! (`content-type`, `x-cache`, `age`, `x-request-id`, `content-length`; hyper adds
//! `date`), and does nothing else: no routing, no parsing, no cache, no metrics, no
//! tracing. One tokio current-thread runtime, so one thread serves everything.
//!
//! `bench/instructions.sh` runs it under callgrind next to the gateway and nginx to
//! show how many instructions a hit costs with no logic at all.
//!
//! ```sh
//! cargo build --release --example bare_hyper
//! target/release/examples/bare_hyper 127.0.0.1:9300 page.json
//! ```
//!
//! Arguments: the address to listen on, and a file holding the body to answer
//! with. It prints `listening on ADDR` once bound. The request body is read to its
//! end (as the gateway must, to parse it) and dropped. `x-request-id` is a fixed
//! 16-hex-digit value, as long as the gateway's made-up ids; `age` is always 0.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const HIT: HeaderValue = HeaderValue::from_static("HIT");
const AGE: HeaderValue = HeaderValue::from_static("0");
const REQUEST_ID: HeaderValue = HeaderValue::from_static("5f0c2a9e81d3b7c4");

async fn answer(req: Request<Incoming>, body: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the request body to its end so the connection stays reusable; an error
    // here only means the client went away, and the answer is then never sent.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(body));
    let h = resp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, JSON);
    h.insert("x-cache", HIT);
    h.insert(http::header::AGE, AGE);
    h.insert("x-request-id", REQUEST_ID);
    Ok(resp)
}

async fn serve(addr: SocketAddr, body: Bytes) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, body.clone()));
            // A connection error only ends that connection.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: bare_hyper LISTEN_ADDR BODY_FILE");
        std::process::exit(2);
    }
    let addr: SocketAddr = match args[1].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bare_hyper: bad address {:?}: {e}", args[1]);
            std::process::exit(2);
        }
    };
    let body = match std::fs::read(&args[2]) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            eprintln!("bare_hyper: cannot read {}: {e}", args[2]);
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare_hyper: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(addr, body)) {
        eprintln!("bare_hyper: {e}");
        std::process::exit(1);
    }
}
