//! The upstream client over HTTPS: a local TLS server with a test CA.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use chat_gateway::config::Secret;
use chat_gateway::upstream::client::{ChatClient, Reach};
use chat_gateway::upstream::signer::Signer;
use common::TestCa;

struct Pki {
    ca_pem: String,
    server: rustls::ServerConfig,
}

fn pki() -> Pki {
    let ca = TestCa::new();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![ca.leaf_der.clone(), ca.ca_der.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(ca.key_der.clone().into()),
    )
    .unwrap();
    Pki {
        ca_pem: ca.ca_pem,
        server,
    }
}

async fn tls_server(mut cfg: rustls::ServerConfig) -> std::net::SocketAddr {
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                break;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!(
                            r#"{{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","Version":"{:?}","Path":"{}"}}"#,
                            req.version(),
                            req.uri().path()
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    addr
}

fn client(ca: Option<&std::path::Path>) -> ChatClient {
    let signer = Arc::new(Signer::new(
        1400000000,
        "admin".into(),
        Secret::new("k"),
        Duration::from_secs(3600),
    ));
    ChatClient::new(1400000000, signer, ca, Duration::from_secs(2)).unwrap()
}

#[tokio::test]
async fn reaches_https_upstream_with_ca_file_and_fails_clearly_without() {
    let pki = pki();
    let addr = tls_server(pki.server).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem).unwrap();
    let base = format!("https://localhost:{}", addr.port());
    let deadline = || Instant::now() + Duration::from_secs(3);

    let ok = client(Some(&ca_path))
        .send(
            &base,
            "recentcontact/get_list",
            Bytes::from_static(b"{}"),
            deadline(),
        )
        .await
        .expect("HTTPS with the test CA works");
    assert_eq!(ok.status, 200);
    assert!(ok.chat.unwrap().is_success());
    let v: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(v["Path"], "/v4/recentcontact/get_list");
    assert_eq!(v["Version"], "HTTP/2.0", "HTTP/2 negotiated by ALPN");

    let err = client(None)
        .send(
            &base,
            "recentcontact/get_list",
            Bytes::from_static(b"{}"),
            deadline(),
        )
        .await
        .expect_err("an unknown CA must fail");
    assert_eq!(
        err.reach,
        Reach::NotSent,
        "a TLS handshake failure never sent the request"
    );
    let msg = err.message.to_lowercase();
    assert!(
        msg.contains("certificate") || msg.contains("issuer"),
        "unclear TLS error: {}",
        err.message
    );
}

#[test]
fn ca_file_without_certificates_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.pem");
    std::fs::write(&p, "nothing here").unwrap();
    let e = chat_gateway::upstream::client::tls_config(Some(&p)).unwrap_err();
    assert!(e.contains("no PEM certificate"), "{e}");
}
