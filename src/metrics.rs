//! Prometheus metrics. Handles for the hot path are resolved once, at start-up, so a
//! cache hit costs two atomic increments and no label lookup.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Buckets of the upstream latency histogram, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Metric names (a contract with dashboards).
pub mod names {
    /// Answers the gateway made itself, by `origin` (caller, upstream, gateway) and
    /// `reason` (the `x-chat-gateway-error` value).
    pub const ERRORS: &str = "chat_gateway_errors_total";
    /// Requests by `route` and `outcome`.
    pub const REQUESTS: &str = "chat_gateway_requests_total";
    /// get_list answers by `result` (hit, miss, stale, bypass).
    pub const CACHE: &str = "chat_gateway_cache_requests_total";
    /// Callers that waited on another caller's identical upstream fetch.
    pub const COALESCED: &str = "chat_gateway_coalesced_waits_total";
    /// Calls to Chat by `command` and `code` (ErrorCode, or `http_<status>`, or `transport`).
    pub const UPSTREAM_CALLS: &str = "chat_gateway_upstream_calls_total";
    /// Retries by `command`.
    pub const RETRIES: &str = "chat_gateway_upstream_retries_total";
    /// Latency of each call to Chat by `command`, seconds.
    pub const UPSTREAM_LATENCY: &str = "chat_gateway_upstream_latency_seconds";
    /// Cached accounts (one cache entry holds an account's pages).
    pub const CACHE_ENTRIES: &str = "chat_gateway_cache_entries";
    /// Cached pages.
    pub const CACHE_PAGES: &str = "chat_gateway_cache_pages";
    /// Weighted size of the cache, bytes.
    pub const CACHE_BYTES: &str = "chat_gateway_cache_weighted_bytes";
    /// Invalidations by `source` (admin, write_through, webhook).
    pub const INVALIDATIONS: &str = "chat_gateway_invalidations_total";
    /// Pages dropped by invalidations, by `source`.
    pub const INVALIDATED_PAGES: &str = "chat_gateway_invalidated_pages_total";
    /// Webhooks by `command` class and `outcome` (accepted, rejected).
    pub const CALLBACKS: &str = "chat_gateway_callbacks_total";
    /// Failovers by `to` (backup, primary).
    pub const FAILOVERS: &str = "chat_gateway_upstream_failovers_total";
    /// Calls refused by the gateway's own rate limit, by `command`.
    pub const RATE_LIMITED: &str = "chat_gateway_rate_limited_total";
    /// Retries refused by the retry budget.
    pub const BUDGET_EXHAUSTED: &str = "chat_gateway_retry_budget_exhausted_total";
    /// UserSig renewals after Chat refused one.
    pub const SIG_RENEWALS: &str = "chat_gateway_usersig_renewals_total";
    /// Config reloads by `outcome` (applied, unchanged, rejected).
    pub const RELOADS: &str = "chat_gateway_config_reloads_total";
    /// 1 when `[redis]` is set (the gateway is part of a fleet).
    pub const REDIS_ENABLED: &str = "chat_gateway_redis_enabled";
    /// 1 while Redis is usable, 0 while the gateway runs without it.
    pub const REDIS_UP: &str = "chat_gateway_redis_up";
    /// Round trip of each Redis operation by `op` (ratelimit, l2_get, l2_put, lock,
    /// publish, generation, heartbeat), seconds.
    pub const REDIS_LATENCY: &str = "chat_gateway_redis_latency_seconds";
    /// Failed Redis operations by `op` and `kind` (timeout, error).
    pub const REDIS_ERRORS: &str = "chat_gateway_redis_errors_total";
    /// Rate-limit permits leased from the fleet, by `command`.
    pub const PERMITS_LEASED: &str = "chat_gateway_ratelimit_permits_leased_total";
    /// Leased permits a call actually went out on, by `command`.
    pub const PERMITS_USED: &str = "chat_gateway_ratelimit_permits_used_total";
    /// L2 (Redis) page lookups by `result` (hit, miss, error).
    pub const L2_REQUESTS: &str = "chat_gateway_l2_requests_total";
    /// Invalidation events this gateway published to the fleet.
    pub const FLEET_INV_SENT: &str = "chat_gateway_fleet_invalidations_sent_total";
    /// Invalidation events from other gateways applied here.
    pub const FLEET_INV_RECEIVED: &str = "chat_gateway_fleet_invalidations_received_total";
    /// Time from an event's publication to its application here, seconds.
    pub const FLEET_INV_LAG: &str = "chat_gateway_fleet_invalidation_lag_seconds";
    /// Gateways of the fleet seen alive (heartbeats of the last few seconds).
    pub const FLEET_GATEWAYS: &str = "chat_gateway_fleet_gateways";
    /// Misses that waited on another gateway's fetch, by `outcome` (served, timeout).
    pub const FLEET_COALESCED: &str = "chat_gateway_fleet_coalesced_waits_total";
    /// In-memory pages dropped because invalidations may have been missed, by
    /// `reason` (reconnect, gap, restart).
    pub const FLEET_RESYNCS: &str = "chat_gateway_fleet_resyncs_total";
}

/// Buckets of the Redis round-trip and invalidation-lag histograms, seconds.
const FLEET_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The process's Prometheus recorder (installed once; later calls reuse it, so tests
/// and the demo can start several servers in one process).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(names::UPSTREAM_LATENCY.into()),
                    LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(names::REDIS_LATENCY.into()),
                        FLEET_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(names::FLEET_INV_LAG.into()),
                        FLEET_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours stays
            // local and /metrics shows what it records.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(names::REQUESTS, "Requests by route and outcome");
    describe_counter!(
        names::ERRORS,
        "Answers the gateway made itself, by origin and reason"
    );
    describe_counter!(names::CACHE, "get_list answers by cache result");
    describe_counter!(
        names::COALESCED,
        "Callers that waited on an identical in-flight fetch"
    );
    describe_counter!(
        names::UPSTREAM_CALLS,
        "Calls to Chat by command and ErrorCode"
    );
    describe_counter!(names::RETRIES, "Retried calls to Chat by command");
    describe_histogram!(
        names::UPSTREAM_LATENCY,
        metrics::Unit::Seconds,
        "Latency of calls to Chat"
    );
    describe_gauge!(names::CACHE_ENTRIES, "Cached accounts");
    describe_gauge!(names::CACHE_PAGES, "Cached get_list pages");
    describe_gauge!(
        names::CACHE_BYTES,
        metrics::Unit::Bytes,
        "Weighted size of the page cache"
    );
}

/// Pre-resolved counters for the get_list path.
#[derive(Clone)]
pub struct GetListCounters {
    /// `requests_total{route="get_list",outcome="hit"}`
    pub req_hit: Counter,
    /// `requests_total{route="get_list",outcome="miss"}`
    pub req_miss: Counter,
    /// `requests_total{route="get_list",outcome="stale"}`
    pub req_stale: Counter,
    /// `requests_total{route="get_list",outcome="bypass"}`
    pub req_bypass: Counter,
    /// `requests_total{route="get_list",outcome="error"}`
    pub req_error: Counter,
    /// `cache_requests_total{result="hit"}`
    pub hit: Counter,
    /// `cache_requests_total{result="miss"}`
    pub miss: Counter,
    /// `cache_requests_total{result="stale"}`
    pub stale: Counter,
    /// `cache_requests_total{result="bypass"}`
    pub bypass: Counter,
    /// `coalesced_waits_total`
    pub coalesced: Counter,
}

impl GetListCounters {
    /// Resolves the handles.
    pub fn new() -> Self {
        let r = |o: &'static str| counter!(names::REQUESTS, "route" => "get_list", "outcome" => o);
        let c = |o: &'static str| counter!(names::CACHE, "result" => o);
        GetListCounters {
            req_hit: r("hit"),
            req_miss: r("miss"),
            req_stale: r("stale"),
            req_bypass: r("bypass"),
            req_error: r("error"),
            hit: c("hit"),
            miss: c("miss"),
            stale: c("stale"),
            bypass: c("bypass"),
            coalesced: counter!(names::COALESCED),
        }
    }
}

impl Default for GetListCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one request on a route other than get_list (which counts its own, with
/// pre-resolved handles).
pub fn request(route: &'static str, outcome: &'static str) {
    counter!(names::REQUESTS, "route" => route, "outcome" => outcome).increment(1);
}
