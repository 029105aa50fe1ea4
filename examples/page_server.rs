//! A stand-in for Chat that answers every `get_list` for any account with a realistic
//! page, fast: the upstream of `bench/rss.sh`, which fills the gateway's cache with a
//! million distinct accounts (more than the emulator's world holds).
//!
//! Usage: `cargo run --release --example page_server -- 127.0.0.1:9100 [ITEMS]`
//!
//! Each page lists ITEMS conversations (default 20, about 3 KB), a quarter of them
//! group conversations with GroupIds drawn from a pool of 50,000, derived from the
//! account's name so the same account always gets the same page.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn hash(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn page(account: &str, items: usize) -> String {
    let mut h = hash(account.as_bytes());
    let mut out = String::with_capacity(160 * items + 200);
    out.push_str(r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","CompleteFlag":1,"TimeStamp":1775552160,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"SessionItem":["#);
    for i in 0..items {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if i > 0 {
            out.push(',');
        }
        let t = 1_775_000_000 + (h >> 40) % 500_000;
        if h.is_multiple_of(4) {
            out.push_str(&format!(
                r#"{{"Type":2,"GroupId":"@TGS#{:010}","MsgTime":{t},"TopFlag":0,"UnreadMsgCount":{},"C2CPeerReadTime":0,"C2CPeerReadSeq":0,"C2CPeerReadFlag":0,"StandardMark":"","CustomMark":""}}"#,
                (h >> 20) % 50_000,
                h % 7
            ));
        } else {
            out.push_str(&format!(
                r#"{{"Type":1,"To_Account":"peer_{:08}","MsgTime":{t},"TopFlag":0,"UnreadMsgCount":{},"C2CPeerReadTime":0,"C2CPeerReadSeq":0,"C2CPeerReadFlag":0,"StandardMark":"","CustomMark":""}}"#,
                (h >> 16) % 100_000_000,
                h % 7
            ));
        }
    }
    out.push_str(r#"],"GroupItem":[]}"#);
    out
}

fn account_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["From_Account"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9100".into())
        .parse()
        .expect("an address like 127.0.0.1:9100");
    let items: usize = args.next().map_or(20, |n| n.parse().expect("a number"));
    let listener = TcpListener::bind(addr).await.expect("bind");
    eprintln!(
        "page_server listening on {}",
        listener.local_addr().expect("addr")
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let text = page(&account_of(&body), items);
                let resp = Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(text)))
                    .expect("a response");
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
