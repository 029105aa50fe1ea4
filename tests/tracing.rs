//! OpenTelemetry traces, end to end: the gateway binary exports to a real OTLP/HTTP
//! receiver on a free port, which decodes each export with the OpenTelemetry proto
//! types (prost). Checked: a caller's `traceparent` is continued (its trace, its
//! span as parent), the calls to Chat are children of the request with their
//! attempt numbers and codes, the trace id is in the access-log line and in the
//! request's other log lines, no secret is in anything exported, unsampled requests
//! export nothing; and with the collector down or stalled, requests are answered
//! as usual while the lost spans are counted.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::RawConn;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

const GET_LIST: &str = "/v4/recentcontact/get_list";
const TOKEN: &str = "caller-token-abcdefghijklmnop";

/// Spans received, each with its resource's attributes.
type Received = Arc<Mutex<Vec<(Span, HashMap<String, String>)>>>;

/// A real OTLP/HTTP (protobuf) traces receiver.
struct Receiver {
    addr: std::net::SocketAddr,
    /// Every export request's raw body.
    bodies: Arc<Mutex<Vec<Bytes>>>,
    /// Every span received, with its resource's attributes.
    spans: Received,
    /// Request paths and content types seen.
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let spans: Received = Arc::default();
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (b, s, n) = (bodies.clone(), spans.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (b, s, n) = (b.clone(), s.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (b, s, n) = (b.clone(), s.clone(), n.clone());
                        async move {
                            let ct = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            n.lock().unwrap().push((req.uri().path().to_string(), ct));
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body.clone())
                                .expect("an OTLP protobuf export");
                            b.lock().unwrap().push(body);
                            for rs in export.resource_spans {
                                let resource = rs
                                    .resource
                                    .map(|r| attributes(&r.attributes))
                                    .unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        s.lock().unwrap().push((span, resource.clone()));
                                    }
                                }
                            }
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            bodies,
            spans,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The spans of trace `trace_id` received so far.
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| hex::encode(&s.trace_id) == trace_id)
            .map(|(s, _)| s.clone())
            .collect()
    }

    /// Waits until trace `trace_id` has at least `n` spans (at most 20 s).
    async fn wait_for(&self, trace_id: &str, n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.trace(trace_id);
            if spans.len() >= n {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id}: {} of {n} spans arrived",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Attributes as strings (ints and bools formatted).
fn attributes(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    attributes(&span.attributes).remove(key)
}

fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "one {what} in {spans:#?}");
    found[0]
}

/// A POST with headers.
async fn call(url: String, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_is_continued_and_exported() {
    let receiver = Receiver::start().await;
    // The first call to Chat fails without an envelope (502): get_list is a read,
    // so it is retried; everything else is answered.
    let fake = FakeChat::start(Box::new(|r: &Recorded, n| {
        if n == 1 {
            return Reply::Status(502, "bad gateway".into());
        }
        let v = r.json();
        let acc = v["From_Account"].as_str().unwrap_or("?").to_string();
        if r.path.ends_with("get_list") {
            Reply::Json(page_for(&acc, 0), Duration::ZERO)
        } else {
            Reply::Json(
                serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}),
                Duration::ZERO,
            )
        }
    }))
    .await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            ("server", &format!("auth_tokens = [\"{TOKEN}\"]")),
            ("cache", "ttl_secs = 600"),
            ("log", "level = \"info\"\naccess = true"),
            (
                "tracing",
                &format!(
                    "endpoint = \"{}\"\nsample_ratio = 0.0\nexport_interval_ms = 50\nservice_name = \"gw-under-test\"",
                    receiver.url()
                ),
            ),
        ],
    ))
    .await;
    let bearer = format!("Bearer {TOKEN}");
    let body = r#"{"From_Account":"alice-traced"}"#;
    // A: a miss with a sampled traceparent: retried once, then answered.
    let t1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let p1 = "00f067aa0ba902b7";
    let a = call(
        gw.url(GET_LIST),
        body,
        &[
            ("authorization", &bearer),
            ("x-request-id", "rid-trace-a"),
            ("traceparent", &format!("00-{t1}-{p1}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-cache"), "MISS");
    // C: a write with an unsampled traceparent: no spans, but its trace id is logged.
    let t3 = "0af7651916cd43dd8448eb211c80319c";
    let c = call(
        gw.url("/v4/openim/sendmsg"),
        r#"{"From_Account":"a","To_Account":"b"}"#,
        &[
            ("authorization", &bearer),
            ("x-request-id", "rid-trace-c"),
            ("traceparent", &format!("00-{t3}-b7ad6b7169203331-00")),
        ],
    )
    .await;
    assert_eq!(c.0, 200);
    // D: no traceparent, sample_ratio 0: a new trace, not recorded.
    let d = call(
        gw.url(GET_LIST),
        r#"{"From_Account":"dave"}"#,
        &[("authorization", &bearer), ("x-request-id", "rid-trace-d")],
    )
    .await;
    assert_eq!(d.0, 200);
    // B: the same page again, a hit on the shortest path, in another sampled trace.
    let t2 = "5bf92f3577b34da6a3ce929d0e0e4737";
    let p2 = "10f067aa0ba902b8";
    let b = call(
        gw.url(GET_LIST),
        body,
        &[
            ("authorization", &bearer),
            ("x-request-id", "rid-trace-b"),
            ("traceparent", &format!("00-{t2}-{p2}-01")),
        ],
    )
    .await;
    assert_eq!(header(&b, "x-cache"), "HIT");

    // A's trace: the request's server span, child of the caller's span; the cache
    // lookup and both calls to Chat, children of the request.
    let spans = receiver.wait_for(t1, 4).await;
    let server = one(&spans, "server span", |s| s.kind == SpanKind::Server as i32);
    assert_eq!(
        hex::encode(&server.parent_span_id),
        p1,
        "the caller's span is the parent"
    );
    assert_eq!(server.name, "POST /v4/recentcontact/get_list");
    assert_eq!(
        attr(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(server, "chat_gateway.cache").as_deref(), Some("MISS"));
    assert_eq!(
        attr(server, "chat_gateway.request_id").as_deref(),
        Some("rid-trace-a")
    );
    assert_eq!(attr(server, "url.path").as_deref(), Some(GET_LIST));
    assert_eq!(
        server.trace_state, "vendor=opaque",
        "tracestate is carried along"
    );
    let lookup = one(&spans, "cache lookup", |s| s.name == "cache lookup");
    assert_eq!(lookup.parent_span_id, server.span_id);
    assert_eq!(
        attr(lookup, "chat_gateway.cache.result").as_deref(),
        Some("miss")
    );
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32 && s.name.starts_with("Chat "))
        .collect();
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    attempts.sort_by_key(|s| attr(s, "chat.attempt"));
    for (i, s) in attempts.iter().enumerate() {
        assert_eq!(
            s.parent_span_id, server.span_id,
            "attempts are the request's children"
        );
        assert_eq!(s.name, "Chat recentcontact/get_list");
        assert_eq!(
            attr(s, "chat.command").as_deref(),
            Some("recentcontact/get_list")
        );
        assert_eq!(attr(s, "chat.attempt"), Some((i + 1).to_string()));
    }
    assert_eq!(
        attr(attempts[0], "http.response.status_code").as_deref(),
        Some("502")
    );
    assert_eq!(attr(attempts[0], "chat.error_code"), None, "no envelope");
    assert!(
        attempts[0].status.as_ref().is_some_and(|s| s.code == 2),
        "an error"
    );
    assert_eq!(attr(attempts[1], "chat.error_code").as_deref(), Some("0"));
    assert_eq!(
        attr(attempts[1], "http.response.status_code").as_deref(),
        Some("200")
    );
    for s in &spans {
        assert!(s.start_time_unix_nano <= s.end_time_unix_nano, "{s:?}");
        assert!(
            s.start_time_unix_nano >= server.start_time_unix_nano
                && s.end_time_unix_nano <= server.end_time_unix_nano + 1_000_000,
            "{} within the request",
            s.name
        );
    }

    // B's trace: the hit, served by the shortest path, still traced.
    let spans = receiver.wait_for(t2, 2).await;
    let server = one(&spans, "server span", |s| s.kind == SpanKind::Server as i32);
    assert_eq!(hex::encode(&server.parent_span_id), p2);
    assert_eq!(attr(server, "chat_gateway.cache").as_deref(), Some("HIT"));
    let lookup = one(&spans, "cache lookup", |s| s.name == "cache lookup");
    assert_eq!(lookup.parent_span_id, server.span_id);
    assert_eq!(
        attr(lookup, "chat_gateway.cache.result").as_deref(),
        Some("hit")
    );

    // Nothing of the unsampled requests (exported before B's spans if at all).
    assert!(
        receiver.trace(t3).is_empty(),
        "an unsampled parent is not recorded"
    );
    let all = receiver.spans.lock().unwrap().clone();
    let traces: std::collections::BTreeSet<String> =
        all.iter().map(|(s, _)| hex::encode(&s.trace_id)).collect();
    assert_eq!(traces.len(), 2, "only A's and B's traces: {traces:?}");
    for (_, resource) in &all {
        assert_eq!(
            resource.get("service.name").map(String::as_str),
            Some("gw-under-test")
        );
    }
    // OTLP/HTTP with protobuf, to the configured path.
    for (path, ct) in receiver.seen.lock().unwrap().iter() {
        assert_eq!(path, "/v1/traces");
        assert_eq!(ct, "application/x-protobuf");
    }

    // No secret anywhere in what was exported: not the app key, not a UserSig, not
    // the caller token, not the account or the body.
    let calls = fake.calls();
    let sigs: Vec<String> = calls.iter().map(|c| c.query["usersig"].clone()).collect();
    assert!(!sigs.is_empty());
    let exported: Vec<u8> = receiver
        .bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.to_vec())
        .collect();
    let holds = |needle: &str| {
        exported
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    for secret in [SECRET, TOKEN, "alice-traced", "From_Account", IDENTIFIER]
        .iter()
        .map(|s| s.to_string())
        .chain(sigs)
    {
        assert!(!holds(&secret), "{secret:?} was exported");
    }
    for (s, _) in &all {
        for (k, v) in attributes(&s.attributes) {
            assert!(
                !v.contains("usersig") && !v.contains('?'),
                "{}: {k}={v}",
                s.name
            );
        }
    }

    // The trace id is in each request's access-log line (B's is the last written)...
    assert!(
        gw.wait_log("request_id=\"rid-trace-b\"", Duration::from_secs(5))
            .await
    );
    let log = gw.log_text();
    let access = |rid: &str| {
        log.lines()
            .find(|l| l.contains(" access ") && l.contains(&format!("request_id=\"{rid}\"")))
            .unwrap_or_else(|| panic!("no access line for {rid}:\n{log}"))
            .to_string()
    };
    assert!(access("rid-trace-a").contains(&format!("trace_id=\"{t1}\"")));
    assert!(access("rid-trace-b").contains(&format!("trace_id=\"{t2}\"")));
    assert!(access("rid-trace-c").contains(&format!("trace_id=\"{t3}\"")));
    let d_line = access("rid-trace-d");
    let d_trace = d_line
        .split("trace_id=\"")
        .nth(1)
        .and_then(|r| r.get(..32))
        .expect("a new trace id");
    assert!(d_trace.bytes().all(|b| b.is_ascii_hexdigit()) && d_trace != "0".repeat(32));
    // ...and in the request's other log lines (here: Chat's answer without an
    // envelope, logged by the fetch task).
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Chat answered without an envelope"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains(t1), "{}", warned[0]);
    assert!(!log.contains(TOKEN) && !log.contains(SECRET));
}

/// A collector that is down (connection refused) or stalled (accepts, never
/// answers): every request is answered as usual, and the lost spans are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_or_stalled_costs_requests_nothing() {
    // Stalled: accepts connections and reads nothing.
    let stalled = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled_addr = stalled.local_addr().unwrap();
    let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Arc::default();
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = stalled.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    for (what, endpoint) in [
        ("down", format!("http://{}/v1/traces", dead_addr())),
        ("stalled", format!("http://{stalled_addr}/v1/traces")),
    ] {
        let fake = FakeChat::start(echo_pages()).await;
        let gw = Gateway::start(&config_toml(
            &fake.url(),
            &[
                ("cache", "ttl_secs = 600"),
                (
                    "tracing",
                    &format!(
                        "endpoint = \"{endpoint}\"\nsample_ratio = 1.0\nexport_interval_ms = 20\nexport_timeout_ms = 200\nmax_queue_spans = 32\nmax_batch_spans = 8"
                    ),
                ),
            ],
        ))
        .await;
        // Misses (server span, cache lookup, a call to Chat) and hits.
        let mut conn = RawConn::connect(gw.addr).await;
        for i in 0..300 {
            let body = format!(r#"{{"From_Account":"u{}"}}"#, i % 60);
            let req = format!(
                "POST {GET_LIST} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.send(req.as_bytes()).await.unwrap();
            let r = conn.response(Duration::from_secs(10)).await.unwrap();
            assert_eq!(r.status, 200, "{what}: request {i}");
            assert_eq!(
                r.header("x-cache"),
                if i < 60 { "MISS" } else { "HIT" },
                "{what}: request {i}"
            );
        }
        assert_eq!(fake.count(), 60, "{what}: Chat was called once per page");
        // The spans that could not be sent are counted, by reason.
        let deadline = Instant::now() + Duration::from_secs(30);
        let dropped = |m: &str, reason: &str| {
            metric(
                m,
                &format!("chat_gateway_tracing_spans_dropped_total{{reason=\"{reason}\"}}"),
            )
        };
        loop {
            let m = String::from_utf8(get(&gw.url("/metrics")).await.unwrap().2.to_vec()).unwrap();
            let (failed, full) = (dropped(&m, "export_failed"), dropped(&m, "queue_full"));
            if failed > 0.0 && full > 0.0 {
                assert_eq!(metric(&m, "chat_gateway_tracing_spans_exported_total"), 0.0);
                // 60 misses of 3 spans and 240 hits of 2: at most this many lost.
                assert!(failed + full <= 660.0, "{what}: {failed} + {full}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: export_failed {failed}, queue_full {full}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Still serving.
        let a = post(&gw.url(GET_LIST), r#"{"From_Account":"u1"}"#).await;
        assert_eq!(header(&a, "x-cache"), "HIT", "{what}");
        assert!(
            gw.wait_log("cannot export spans", Duration::from_secs(5))
                .await,
            "{what}: the failure is logged"
        );
    }
}

/// With `[redis]`, the Redis round trips a request makes (its L2 lookup, the fetch
/// lock, the fleet's rate limit) are children of its span; no key is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_round_trips_are_children_of_the_request() {
    let redis = common::redis::RedisServer::start();
    let receiver = Receiver::start().await;
    let fake = FakeChat::start(echo_pages()).await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[
            (
                "redis",
                &format!("url = \"{}\"\ntimeout_ms = 500", redis.url()),
            ),
            (
                "tracing",
                &format!(
                    "endpoint = \"{}\"\nsample_ratio = 0.0\nexport_interval_ms = 50",
                    receiver.url()
                ),
            ),
        ],
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        std::str::from_utf8(&get(&gw.url("/metrics")).await.unwrap().2).unwrap(),
        "chat_gateway_redis_up",
    ) != 1.0
    {
        assert!(Instant::now() < deadline, "Redis never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = "6bf92f3577b34da6a3ce929d0e0e4738";
    let a = call(
        gw.url(GET_LIST),
        r#"{"From_Account":"rita-redis"}"#,
        &[("traceparent", &format!("00-{t}-20f067aa0ba902b9-01"))],
    )
    .await;
    assert_eq!(header(&a, "x-cache"), "MISS");
    // Server span, cache lookup, at least one Redis round trip, the call to Chat.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = receiver.trace(t);
        if spans.iter().any(|s| s.name.starts_with("Chat "))
            && spans.iter().any(|s| s.name.starts_with("redis "))
            && spans.iter().any(|s| s.kind == SpanKind::Server as i32)
        {
            break spans;
        }
        assert!(Instant::now() < deadline, "{spans:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let server = one(&spans, "server span", |s| s.kind == SpanKind::Server as i32);
    let round_trips: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("redis "))
        .collect();
    for s in &round_trips {
        assert_eq!(s.parent_span_id, server.span_id, "{}", s.name);
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(attr(s, "db.system.name").as_deref(), Some("redis"));
        let op = attr(s, "db.operation.name").expect("an operation");
        assert_eq!(s.name, format!("redis {op}"));
    }
    let exported: Vec<u8> = receiver
        .bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.to_vec())
        .collect();
    assert!(
        !exported.windows(10).any(|w| w == b"rita-redis"),
        "no account (nor a key holding one) is exported"
    );
}

/// An item read (here portrait_get, half of it cached) is traced like get_list: its
/// cache lookup (partial) and its one call to Chat, for the missing item, are
/// children of the request's span; no account is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_reads_lookup_and_call_to_chat_are_children_of_the_request() {
    let receiver = Receiver::start().await;
    let (fake, _world) = world::start().await;
    let gw = Gateway::start(&config_toml(
        &fake.url(),
        &[(
            "tracing",
            &format!(
                "endpoint = \"{}\"\nsample_ratio = 0.0\nexport_interval_ms = 50",
                receiver.url()
            ),
        )],
    ))
    .await;
    const PORTRAIT: &str = "/v4/profile/portrait_get";
    let body = |accounts: &[&str]| {
        serde_json::json!({"To_Account": accounts, "TagList": ["Tag_Profile_IM_Nick"]}).to_string()
    };
    // Not sampled: fills the cache with one of the two.
    let warm = call(gw.url(PORTRAIT), &body(&["user_0001"]), &[]).await;
    assert_eq!(header(&warm, "x-cache"), "MISS");
    fake.reset();
    let t = "6bf92f3577b34da6a3ce929d0e0e4738";
    let p = "20f067aa0ba902b9";
    let a = call(
        gw.url(PORTRAIT),
        &body(&["user_0001", "user_0002"]),
        &[("traceparent", &format!("00-{t}-{p}-01"))],
    )
    .await;
    assert_eq!(a.0, 200);
    assert_eq!(header(&a, "x-cache"), "PARTIAL");
    assert_eq!(fake.count(), 1, "one call, for the missing item");

    let spans = receiver.wait_for(t, 3).await;
    let server = one(&spans, "server span", |s| s.kind == SpanKind::Server as i32);
    assert_eq!(hex::encode(&server.parent_span_id), p);
    assert_eq!(server.name, format!("POST {PORTRAIT}"));
    assert_eq!(
        attr(server, "chat_gateway.cache").as_deref(),
        Some("PARTIAL")
    );
    let lookup = one(&spans, "cache lookup", |s| s.name == "cache lookup");
    assert_eq!(lookup.parent_span_id, server.span_id);
    assert_eq!(
        attr(lookup, "chat_gateway.cache.result").as_deref(),
        Some("partial")
    );
    let attempt = one(&spans, "call to Chat", |s| s.name.starts_with("Chat "));
    assert_eq!(
        attempt.parent_span_id, server.span_id,
        "the fetch task carries the request's trace"
    );
    assert_eq!(attempt.name, "Chat profile/portrait_get");
    assert_eq!(attr(attempt, "chat.attempt").as_deref(), Some("1"));
    assert_eq!(attr(attempt, "chat.error_code").as_deref(), Some("0"));
    let exported: Vec<u8> = receiver
        .bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.to_vec())
        .collect();
    for secret in ["user_0001", "user_0002", "To_Account", SECRET] {
        assert!(
            !exported
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "{secret:?} was exported"
        );
    }
}
