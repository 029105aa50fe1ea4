//! OpenTelemetry traces (`[tracing]`): spans exported over OTLP/HTTP (protobuf) by
//! the OpenTelemetry SDK's batch processor and the `opentelemetry-otlp` exporter.
//!
//! **Off** (no `tracing.endpoint`), nothing here runs: [`enabled`] is one atomic
//! load, and every hook returns at once.
//!
//! **On**, every request is placed in a trace ([`begin`]): the caller's W3C
//! `traceparent` (and `tracestate`) is continued, or a new trace starts. Sampling is
//! parent-based with a ratio (the SDK's `ParentBased(TraceIdRatioBased)`): a caller's
//! sampled flag decides for its request; a new trace is recorded when its id falls
//! in `tracing.sample_ratio`. The decision is taken here first, by the same rule on
//! the same trace id ([`ratio_samples`]), so a request that is not recorded costs a
//! header parse or a random id and nothing more: no span object, no context, no
//! allocation. Its trace id still goes into its access-log and log lines.
//!
//! A recorded request gets a server span ([`Active`]); its children are the cache
//! lookup, each call to Chat ([`attempt`]: command, attempt number, HTTP status,
//! Chat's `ErrorCode`) and each Redis round trip ([`redis`]). Children find their
//! parent in OpenTelemetry's current [`Context`], which the router attaches to the
//! request's future ([`within`]), and the get_list fetch task carries along.
//!
//! **What spans hold.** Method, path (never the query string, which may carry
//! Chat's credentials), status, `x-cache`, request id, command, attempt, codes,
//! Redis operation names. Never a body, an account, a cache key, a header value, a
//! token, the app key or a UserSig.
//!
//! **Export.** Finished spans queue for the SDK's batch processor (its own thread),
//! at most `tracing.max_queue_spans` of them: past that a span is dropped
//! ([`Bounded`]). Batches go out every `tracing.export_interval_ms` (or when
//! `max_batch_spans` are waiting) through the gateway's hyper + rustls client
//! ([`OtlpClient`]). A collector that is down or slow costs requests nothing:
//! spans are dropped and counted in `chat_gateway_tracing_spans_dropped_total`
//! (`queue_full`, `export_failed`), and export failures are logged at most once a
//! minute.

use std::borrow::Cow;
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, Sampler, SdkTracer,
    SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::config::TracingSettings;
use crate::metrics::names;

/// Most bytes of a collector's answer read.
const MAX_RESPONSE: usize = 64 * 1024;
/// At most one "cannot export spans" log per this interval.
const EXPORT_ALARM_INTERVAL: Duration = Duration::from_secs(60);

/// The tracer, once [`start`]ed.
static TRACING: OnceLock<Tracing> = OnceLock::new();

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// New traces are recorded when `(trace_id as u64) >> 1` is below this
    /// (`None`: all of them).
    ratio_bound: Option<u64>,
}

/// Whether tracing is on (one atomic load).
#[inline]
pub fn enabled() -> bool {
    TRACING.get().is_some()
}

/// Starts tracing for `settings`: the exporter, the batch processor and the tracer
/// provider. Call within the Tokio runtime (exports run on it). A second call
/// changes nothing.
pub fn start(settings: &TracingSettings) -> Result<(), String> {
    if enabled() {
        return Ok(());
    }
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| "tracing must be started within the runtime".to_string())?;
    let client = OtlpClient::new(handle, settings.export_timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .with_timeout(settings.export_timeout)
        .build()
        .map_err(|e| format!("tracing.endpoint: cannot build the OTLP exporter: {e}"))?;
    let pending = Arc::new(AtomicUsize::new(0));
    // The recorder first: a counter made before it exists counts nothing.
    crate::metrics::install();
    let counted = Counted {
        inner: exporter,
        pending: pending.clone(),
        exported: metrics::counter!(names::SPANS_EXPORTED),
        failed: metrics::counter!(names::SPANS_DROPPED, "reason" => "export_failed"),
        last_alarm: AtomicU64::new(u64::MAX),
        started: Instant::now(),
    };
    let batch = BatchSpanProcessor::builder(counted)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(settings.max_queue_spans)
                .with_max_export_batch_size(settings.max_batch_spans)
                .with_scheduled_delay(settings.export_interval)
                .build(),
        )
        .build();
    let bounded = Bounded {
        inner: batch,
        pending,
        max: settings.max_queue_spans,
        dropped: metrics::counter!(names::SPANS_DROPPED, "reason" => "queue_full"),
    };
    let ratio = settings.sample_ratio;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(bounded)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_id_generator(PresetIds::default())
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("chat-gateway");
    let _ = TRACING.set(Tracing {
        provider,
        tracer,
        ratio_bound: ratio_bound(ratio),
    });
    Ok(())
}

/// Exports what is queued and stops, waiting at most `timeout` (blocks: call from a
/// blocking thread).
pub fn shutdown(timeout: Duration) {
    if let Some(t) = TRACING.get() {
        let _ = t.provider.shutdown_with_timeout(timeout);
    }
}

// ------------------------------------------------------------------ sampling

/// The SDK's `TraceIdRatioBased` bound for `ratio` (`None`: every trace).
fn ratio_bound(ratio: f64) -> Option<u64> {
    (ratio < 1.0).then(|| (ratio.max(0.0) * (1u64 << 63) as f64) as u64)
}

/// Whether a new trace with id `trace_id` is recorded: the SDK's
/// `TraceIdRatioBased` rule (the id's last 8 bytes, shifted right by one, below the
/// bound), so the SDK's own sampler agrees when the span is built.
#[inline]
pub fn ratio_samples(bound: Option<u64>, trace_id: u128) -> bool {
    match bound {
        None => true,
        Some(b) => ((trace_id as u64) >> 1) < b,
    }
}

/// A caller's `traceparent`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace_id: u128,
    /// The caller's span.
    pub span_id: u64,
    /// The caller recorded it (flag 01).
    pub sampled: bool,
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, lower-case hex;
/// later versions may append fields after a `-`). `None` when it is invalid (then
/// a new trace starts, as the Trace Context spec says).
#[inline]
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    let v = v.trim_ascii();
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id = hex(&v[3..35])?;
    let span_id = hex(&v[36..52])? as u64;
    let flags = hex(&v[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Lower-case hex digits as a number (at most 32 of them).
#[inline]
fn hex(digits: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(v);
    }
    Some(n)
}

/// A request's place in a trace.
#[derive(Debug, Clone, Copy)]
pub struct RequestTrace {
    /// The trace (the caller's, or a new one).
    pub trace_id: u128,
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<Parent>,
    /// Whether this request is recorded.
    pub sampled: bool,
}

/// Places a request with this `traceparent` in a trace: `None` when tracing is off.
#[inline]
pub fn begin(traceparent: Option<&[u8]>) -> Option<RequestTrace> {
    let t = TRACING.get()?;
    match traceparent.and_then(parse_traceparent) {
        Some(p) => Some(RequestTrace {
            trace_id: p.trace_id,
            parent: Some(p),
            sampled: p.sampled,
        }),
        None => {
            let id = u128::from_be_bytes(RandomIdGenerator::default().new_trace_id().to_bytes());
            Some(RequestTrace {
                trace_id: id,
                parent: None,
                sampled: ratio_samples(t.ratio_bound, id),
            })
        }
    }
}

/// [`begin`] for a request's header map.
pub fn begin_from(headers: &http::HeaderMap) -> Option<RequestTrace> {
    if !enabled() {
        return None;
    }
    begin(headers.get("traceparent").map(|v| v.as_bytes()))
}

thread_local! {
    /// The trace id the next root span must take (the one [`begin`] sampled by).
    static PRESET: Cell<Option<u128>> = const { Cell::new(None) };
}

/// The SDK's random ids, except for a root span whose trace id [`begin`] chose.
#[derive(Debug, Default)]
struct PresetIds(RandomIdGenerator);

impl IdGenerator for PresetIds {
    fn new_trace_id(&self) -> TraceId {
        match PRESET.with(Cell::take) {
            Some(id) => TraceId::from(id),
            None => self.0.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

impl RequestTrace {
    /// Starts the request's server span when it is recorded: `name` (e.g.
    /// `POST /v4/recentcontact/get_list`), from `start`, with `attributes`.
    /// `tracestate` is the caller's, carried along with its parent.
    pub fn start(
        &self,
        name: impl Into<Cow<'static, str>>,
        start: SystemTime,
        tracestate: Option<&[u8]>,
        attributes: Vec<KeyValue>,
    ) -> Option<Active> {
        if !self.sampled {
            return None;
        }
        let t = TRACING.get()?;
        let parent_cx = match self.parent {
            Some(p) => {
                let state = tracestate
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default();
                Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from(p.trace_id),
                    SpanId::from(p.span_id),
                    TraceFlags::SAMPLED,
                    true,
                    state,
                ))
            }
            None => {
                PRESET.with(|c| c.set(Some(self.trace_id)));
                Context::new()
            }
        };
        let span = t
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &parent_cx);
        PRESET.with(|c| c.set(None));
        let cx = parent_cx.with_span(span);
        cx.span()
            .span_context()
            .is_sampled()
            .then_some(Active { cx })
    }
}

/// A recorded request: its server span, current while its children run.
#[derive(Debug)]
pub struct Active {
    cx: Context,
}

impl Active {
    /// The context whose current span is the request's.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Records a finished child span `name`, from `start` to `end`.
    pub fn child(
        &self,
        name: &'static str,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        let Some(t) = TRACING.get() else { return };
        let mut span = t
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&t.tracer, &self.cx);
        span.end_with_timestamp(end);
    }

    /// Ends the request's span with `attributes`, as an error when `error`.
    pub fn end(self, attributes: Vec<KeyValue>, error: bool) {
        self.end_at(attributes, error, SystemTime::now());
    }

    /// Ends the request's span at `at`.
    pub fn end_at(self, attributes: Vec<KeyValue>, error: bool, at: SystemTime) {
        let span = self.cx.span();
        span.set_attributes(attributes);
        if error {
            span.set_status(Status::error(""));
        }
        span.end_with_timestamp(at);
    }
}

/// Runs `fut` with `active`'s span current (for its children), or as it is.
pub fn within<F: Future>(
    active: Option<&Active>,
    fut: F,
) -> futures_util::future::Either<opentelemetry::context::WithContext<F>, F> {
    use futures_util::future::Either;
    match active {
        Some(a) => Either::Left(fut.with_context(a.cx.clone())),
        None => Either::Right(fut),
    }
}

/// Carries the current context (the request's span, if any) into `fut`, which will
/// run elsewhere (a spawned task).
pub fn carry<F: Future>(
    fut: F,
) -> futures_util::future::Either<opentelemetry::context::WithContext<F>, F> {
    use futures_util::future::Either;
    if !enabled() {
        return Either::Right(fut);
    }
    let cx = Context::current();
    if cx.span().span_context().is_sampled() {
        Either::Left(fut.with_context(cx))
    } else {
        Either::Right(fut)
    }
}

/// A child of the current span, while it runs.
#[derive(Debug)]
pub struct Child {
    span: opentelemetry_sdk::trace::Span,
}

impl Child {
    /// Ends it with `attributes`, as an error when `error`.
    pub fn end(mut self, attributes: Vec<KeyValue>, error: bool) {
        self.span.set_attributes(attributes);
        if error {
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }
}

/// Starts a child span of the current request when it is recorded (`what` names it
/// and gives its first attributes, made only then), or `None`.
fn child<N: Into<Cow<'static, str>>>(
    kind: SpanKind,
    what: impl FnOnce() -> (N, Vec<KeyValue>),
) -> Option<Child> {
    let t = TRACING.get()?;
    let cx = Context::current();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    let (name, attributes) = what();
    let span = t
        .tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&t.tracer, &cx);
    Some(Child { span })
}

/// A span for the cache lookup of the current request (ended with its result).
pub fn cache_lookup() -> Option<Child> {
    if !enabled() {
        return None;
    }
    child(SpanKind::Internal, || ("cache lookup", Vec::new()))
}

/// A span for attempt number `attempt` of a call of `command` to Chat (through
/// `endpoint`: primary or backup).
pub fn attempt(command: &str, attempt: u32, endpoint: &'static str) -> Option<Child> {
    if !enabled() {
        return None;
    }
    child(SpanKind::Client, || {
        (
            format!("Chat {command}"),
            vec![
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("chat.command", command.to_string()),
                KeyValue::new("chat.attempt", i64::from(attempt)),
                KeyValue::new("chat.endpoint", endpoint),
            ],
        )
    })
}

impl Child {
    /// Ends an attempt's span: the HTTP status and Chat's `ErrorCode` when there was
    /// an answer, else `error` (`timeout`, `transport`).
    pub fn end_attempt(self, status: Option<u16>, code: Option<i64>, error: Option<&'static str>) {
        let mut a = Vec::with_capacity(3);
        if let Some(s) = status {
            a.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        if let Some(c) = code {
            a.push(KeyValue::new("chat.error_code", c));
        }
        if let Some(e) = error {
            a.push(KeyValue::new("error.type", e));
        }
        let failed = error.is_some() || status.is_some_and(|s| s >= 500) || code.is_none();
        self.end(a, failed);
    }
}

/// A span for a Redis round trip (`op`: ratelimit, l2_get, ...).
pub fn redis(op: &'static str) -> Option<Child> {
    if !enabled() {
        return None;
    }
    child(SpanKind::Client, || {
        (
            format!("redis {op}"),
            vec![
                KeyValue::new("db.system.name", "redis"),
                KeyValue::new("db.operation.name", op),
            ],
        )
    })
}

/// The wall-clock time of the instant `at` (in the past).
pub fn wall_clock_at(at: Instant) -> SystemTime {
    let now = SystemTime::now();
    now.checked_sub(at.elapsed()).unwrap_or(now)
}

/// A trace id for logs and request extensions: 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTraceId(pub u128);

impl std::fmt::Display for LogTraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

// ------------------------------------------------------------------ export

/// The batch processor, with its queue held to `max` spans by this wrapper, which
/// counts the spans it turns away (the SDK's own count is not readable).
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet given to the exporter.
    pending: Arc<AtomicUsize>,
    max: usize,
    dropped: metrics::Counter,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.dropped.increment(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it sends and what fails.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
    exported: metrics::Counter,
    failed: metrics::Counter,
    /// Milliseconds since `started` of the last export-failure log.
    last_alarm: AtomicU64,
    started: Instant,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    #[allow(clippy::manual_async_fn)]
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.pending.fetch_sub(n, Ordering::AcqRel);
        async move {
            let result = self.inner.export(batch).await;
            match &result {
                Ok(()) => self.exported.increment(n as u64),
                Err(e) => {
                    self.failed.increment(n as u64);
                    self.alarm(n, e);
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E> Counted<E> {
    /// Logs a failed export, at most once a minute.
    fn alarm(&self, spans: usize, e: &dyn std::fmt::Display) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_alarm.load(Ordering::Relaxed);
        let due = last == u64::MAX
            || now.saturating_sub(last) >= EXPORT_ALARM_INTERVAL.as_millis() as u64;
        if due
            && self
                .last_alarm
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                spans,
                error = %e,
                "cannot export spans to tracing.endpoint; they are dropped (chat_gateway_tracing_spans_dropped_total counts them)"
            );
        }
    }
}

/// The exporter's HTTP client: the gateway's hyper client with rustls (web PKI
/// roots), each request run on the gateway's runtime (the batch processor's thread
/// has none) within the export timeout, its answer read up to [`MAX_RESPONSE`].
#[derive(Debug)]
struct OtlpClient {
    handle: tokio::runtime::Handle,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl OtlpClient {
    fn new(handle: tokio::runtime::Handle, timeout: Duration) -> Result<OtlpClient, String> {
        let tls = crate::upstream::client::tls_config_for("tracing.endpoint", None)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(OtlpClient {
            handle,
            client,
            timeout,
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let task = self.handle.spawn(async move {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, Full::new(body));
            let exchange = async {
                let resp = client.request(request).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE).collect().await?.to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(HttpError::from("the collector did not answer in time")),
            }
        });
        task.await
            .map_err(|e| HttpError::from(format!("export task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};

    #[test]
    fn traceparents() {
        let ok =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(ok.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(ok.span_id, 0x00f067aa0ba902b7);
        assert!(ok.sampled);
        let off =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!off.sampled);
        // A later version may append fields.
        assert!(parse_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-extra"
        )
        .is_some_and(|p| p.sampled));
        for bad in [
            &b""[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// The fast decision agrees with the SDK's sampler on the same trace ids.
    #[test]
    fn ratio_decisions_agree_with_the_sdk() {
        for ratio in [0.0, 0.001, 0.1, 0.5, 0.9, 1.0] {
            let sdk = Sampler::TraceIdRatioBased(ratio);
            let bound = ratio_bound(ratio);
            let mut sampled = 0;
            for i in 0..20_000u64 {
                let id = u128::from(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | (u128::from(i) << 64);
                let ours = ratio_samples(bound, id);
                let theirs = sdk
                    .should_sample(None, TraceId::from(id), "x", &SpanKind::Server, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample;
                assert_eq!(ours, theirs, "ratio {ratio}, id {id:x}");
                sampled += usize::from(ours);
            }
            let share = sampled as f64 / 20_000.0;
            assert!((share - ratio).abs() < 0.02, "{ratio}: {share}");
        }
    }

    #[test]
    fn off_by_default() {
        // Nothing in the unit tests starts tracing.
        assert!(!enabled());
        assert!(begin(Some(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ))
        .is_none());
        assert!(attempt("openim/sendmsg", 1, "primary").is_none());
        assert!(redis("l2_get").is_none());
        assert_eq!(
            LogTraceId(0x4bf92f3577b34da6a3ce929d0e0e4736).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
