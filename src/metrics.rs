//! Prometheus metrics. Handles for the hot path are resolved once, at start-up, so a
//! cache hit costs two atomic increments and no label lookup.
//!
//! [`ALL`] lists every family the gateway exports (name, type, labels, help); it is the
//! contract with dashboards and alerts (`deploy/monitoring/`). [`install`] describes
//! every family and creates a zero-valued series for each known label value, so the
//! first scrape after start-up already shows every family, and `rate()` over a counter
//! that first moves later starts from a sample at zero.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Label};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of the upstream latency histogram, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Buckets of the Redis latency histogram, seconds (Redis answers in well under a
/// millisecond on a healthy local network).
const REDIS_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Buckets of the fleet invalidation lag histogram, seconds.
const FLEET_LAG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets between scrapes, so
/// they do not pile up in memory when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

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
    /// Calls to Chat by `command` and `code` (ErrorCode, or `http_<status>`, or
    /// `timeout`, or `transport`).
    pub const UPSTREAM_CALLS: &str = "chat_gateway_upstream_calls_total";
    /// Retries by `command`.
    pub const RETRIES: &str = "chat_gateway_upstream_retries_total";
    /// Latency of each call to Chat by `command`, seconds.
    pub const UPSTREAM_LATENCY: &str = "chat_gateway_upstream_latency_seconds";
    /// Cached accounts (one cache entry holds an account's pages).
    pub const CACHE_ENTRIES: &str = "chat_gateway_cache_entries";
    /// Cached pages.
    pub const CACHE_PAGES: &str = "chat_gateway_cache_pages";
    /// Weighted size of the cache (pages, item entries and their generation table),
    /// bytes.
    pub const CACHE_BYTES: &str = "chat_gateway_cache_weighted_bytes";
    /// The configured bound of the cache (`cache.max_bytes`), bytes.
    pub const CACHE_MAX_BYTES: &str = "chat_gateway_cache_max_bytes";
    /// Invalidations by `source` (admin, write_through, webhook, fleet).
    pub const INVALIDATIONS: &str = "chat_gateway_invalidations_total";
    /// Pages dropped by invalidations, by `source`.
    pub const INVALIDATED_PAGES: &str = "chat_gateway_invalidated_pages_total";
    /// Webhooks by `outcome` (applied, ignored, rejected).
    pub const CALLBACKS: &str = "chat_gateway_callbacks_total";
    /// Failovers by `to` (backup, primary).
    pub const FAILOVERS: &str = "chat_gateway_upstream_failovers_total";
    /// Calls refused by the gateway's own rate limit, by `command`.
    pub const RATE_LIMITED: &str = "chat_gateway_rate_limited_total";
    /// Retries refused by the retry budget.
    pub const BUDGET_EXHAUSTED: &str = "chat_gateway_retry_budget_exhausted_total";
    /// UserSig renewals after Chat refused one.
    pub const SIG_RENEWALS: &str = "chat_gateway_usersig_renewals_total";
    /// Chat refused even a freshly renewed UserSig (a configuration error).
    pub const SIG_REFUSED: &str = "chat_gateway_usersig_refused_total";
    /// Config reloads by `outcome` (applied, unchanged, rejected).
    pub const RELOADS: &str = "chat_gateway_config_reloads_total";
    /// Secret file reloads by `secret` (secret_key, callback_token, auth_tokens) and
    /// `outcome` (applied, rejected).
    pub const SECRET_RELOADS: &str = "chat_gateway_secret_reloads_total";
    /// Open client connections by `listener` (main, admin, callback).
    pub const OPEN_CONNECTIONS: &str = "chat_gateway_open_connections";
    /// 1, labelled with the gateway's `version`.
    pub const BUILD_INFO: &str = "chat_gateway_build_info";
    /// Whether `[redis]` is configured (0 or 1).
    pub const REDIS_ENABLED: &str = "chat_gateway_redis_enabled";
    /// Whether Redis answers (0 or 1).
    pub const REDIS_UP: &str = "chat_gateway_redis_up";
    /// Latency of Redis operations by `op`, seconds.
    pub const REDIS_LATENCY: &str = "chat_gateway_redis_latency_seconds";
    /// Failed Redis operations by `op` and `kind` (timeout, error).
    pub const REDIS_ERRORS: &str = "chat_gateway_redis_errors_total";
    /// Rate-limit permits leased from the fleet-wide budget, by `command`.
    pub const PERMITS_LEASED: &str = "chat_gateway_ratelimit_permits_leased_total";
    /// Leased rate-limit permits spent on calls to Chat, by `command`.
    pub const PERMITS_USED: &str = "chat_gateway_ratelimit_permits_used_total";
    /// Shared (L2, Redis) cache lookups by `result` (hit, miss, error).
    pub const L2_REQUESTS: &str = "chat_gateway_l2_requests_total";
    /// Invalidations this gateway published to the fleet.
    pub const FLEET_SENT: &str = "chat_gateway_fleet_invalidations_sent_total";
    /// Invalidations this gateway received from the fleet.
    pub const FLEET_RECEIVED: &str = "chat_gateway_fleet_invalidations_received_total";
    /// Time from an invalidation's publication to its application here, seconds.
    pub const FLEET_LAG: &str = "chat_gateway_fleet_invalidation_lag_seconds";
    /// Gateways currently in the fleet, as this gateway sees it.
    pub const FLEET_GATEWAYS: &str = "chat_gateway_fleet_gateways";
    /// Waits on another gateway's identical fetch, by `outcome` (served, timeout).
    pub const FLEET_COALESCED: &str = "chat_gateway_fleet_coalesced_waits_total";
    /// Writes and admin invalidations that waited for every live gateway to apply
    /// their invalidation, by `outcome` (applied, timeout, unavailable).
    pub const FLEET_WAITS: &str = "chat_gateway_fleet_invalidation_waits_total";
    /// Full resynchronisations with the fleet, by `reason` (reconnect, gap, restart,
    /// lost).
    pub const FLEET_RESYNCS: &str = "chat_gateway_fleet_resyncs_total";
    /// Times the fleet-wide generation was raised after an incident (every L2 page
    /// ignored from then on), by `reason` (restart, lost, evicted).
    pub const L2_FLUSHES: &str = "chat_gateway_l2_flushes_total";
    /// 1 when Redis's `maxmemory-policy` may evict the fleet's keys without expiry.
    pub const REDIS_POLICY_UNSUPPORTED: &str = "chat_gateway_redis_maxmemory_policy_unsupported";
    /// Resident memory of the process, bytes (read at scrape time).
    pub const RESIDENT_MEMORY: &str = "chat_gateway_resident_memory_bytes";
    /// Access-log lines dropped because the log's buffer was full.
    pub const ACCESS_LOG_DROPPED: &str = "chat_gateway_access_log_dropped_total";
    /// Spans sent to the OTLP collector.
    pub const SPANS_EXPORTED: &str = "chat_gateway_tracing_spans_exported_total";
    /// Spans lost, by `reason` (queue_full, export_failed).
    pub const SPANS_DROPPED: &str = "chat_gateway_tracing_spans_dropped_total";
    /// Answers of the cached reads other than get_list, by `command` and `result`
    /// (hit, partial, miss, stale, bypass).
    pub const ITEM_REQUESTS: &str = "chat_gateway_item_cache_requests_total";
    /// Items those answers carried, by `command` and `source` (memory, l2, chat).
    pub const ITEMS: &str = "chat_gateway_item_cache_items_total";
    /// Calls to Chat a cached read did not make (every item from memory, or from
    /// another request's fetch), by `command`.
    pub const CALLS_SAVED: &str = "chat_gateway_upstream_calls_saved_total";
    /// Entities invalidated, by `kind`.
    pub const INVALIDATED_ENTITIES: &str = "chat_gateway_invalidated_entities_total";
    /// Entries of the item store.
    pub const CACHE_ITEMS: &str = "chat_gateway_cache_items";
    /// Weighted size of the item store with its generation table, bytes.
    pub const CACHE_ITEM_BYTES: &str = "chat_gateway_cache_item_weighted_bytes";
}

/// The known values of each label, from which the zero-valued series are created.
pub mod values {
    /// `requests_total{route="get_list",outcome}`.
    pub const GET_LIST_OUTCOMES: &[&str] = &["hit", "miss", "stale", "bypass", "error"];
    /// `requests_total{route}` other than get_list.
    pub const ROUTES: &[&str] = &[
        "passthrough",
        "items",
        "admin",
        "callback",
        "health",
        "metrics",
        "quit",
        "other",
    ];
    /// `requests_total{outcome}` for the routes other than get_list.
    pub const ROUTE_OUTCOMES: &[&str] = &["ok", "error"];
    /// `cache_requests_total{result}`.
    pub const CACHE_RESULTS: &[&str] = &["hit", "miss", "stale", "bypass"];
    /// `command` labels shown from the start (others appear on first use).
    pub const COMMANDS: &[&str] = &[crate::chat::commands::GET_LIST];
    /// `upstream_calls_total{code}` shown from the start.
    pub const CODES: &[&str] = &["0"];
    /// `invalidations_total{source}`, `invalidated_pages_total{source}`.
    pub const INVALIDATION_SOURCES: &[&str] = &["admin", "write_through", "webhook", "fleet"];
    /// `callbacks_total{outcome}`.
    pub const CALLBACK_OUTCOMES: &[&str] = &["applied", "ignored", "rejected"];
    /// `config_reloads_total{outcome}`.
    pub const RELOAD_OUTCOMES: &[&str] = &["applied", "unchanged", "rejected"];
    /// `upstream_failovers_total{to}`.
    pub const FAILOVER_TO: &[&str] = &["backup", "primary"];
    /// `open_connections{listener}`.
    pub const LISTENERS: &[&str] = &["main", "admin", "callback"];
    /// `secret_reloads_total{secret}`.
    pub const SECRETS: &[&str] = &["secret_key", "callback_token", "auth_tokens"];
    /// `secret_reloads_total{outcome}`.
    pub const SECRET_OUTCOMES: &[&str] = &["applied", "rejected"];
    /// `redis_latency_seconds{op}`, `redis_errors_total{op}`.
    pub const REDIS_OPS: &[&str] = &[
        "ratelimit",
        "l2_get",
        "l2_put",
        "lock",
        "publish",
        "generation",
        "heartbeat",
    ];
    /// `redis_errors_total{kind}`.
    pub const REDIS_ERROR_KINDS: &[&str] = &["timeout", "error"];
    /// `l2_requests_total{result}`.
    pub const L2_RESULTS: &[&str] = &["hit", "miss", "error"];
    /// `fleet_coalesced_waits_total{outcome}`.
    pub const FLEET_WAIT_OUTCOMES: &[&str] = &["served", "timeout"];
    /// `fleet_invalidation_waits_total{outcome}`.
    pub const FLEET_APPLY_OUTCOMES: &[&str] = &["applied", "timeout", "unavailable"];
    /// `fleet_resyncs_total{reason}`.
    pub const RESYNC_REASONS: &[&str] = &["reconnect", "gap", "restart", "lost"];
    /// `tracing_spans_dropped_total{reason}`.
    pub const SPAN_DROP_REASONS: &[&str] = &["queue_full", "export_failed"];
    /// `l2_flushes_total{reason}`.
    pub const L2_FLUSH_REASONS: &[&str] = &["restart", "lost", "evicted"];
    /// `item_cache_requests_total{result}`.
    pub const ITEM_RESULTS: &[&str] = &["hit", "partial", "miss", "stale", "bypass"];
    /// `item_cache_items_total{source}`.
    pub const ITEM_SOURCES: &[&str] = &["memory", "l2", "chat"];
    /// `invalidated_entities_total{kind}`.
    pub const ENTITY_KINDS: &[&str] = &[
        "Conversations",
        "Profile",
        "Exists",
        "Friends",
        "JoinedGroups",
        "GroupInfo",
        "GroupMembers",
    ];

    /// The `command` label of the item-store reads.
    pub fn item_commands() -> impl Iterator<Item = &'static str> {
        crate::chat::reads::READS
            .iter()
            .filter(|r| r.store == crate::chat::reads::Store::Items)
            .map(|r| r.command)
    }
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    /// The `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its label names, in the order they are rendered.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

const fn family(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        labels,
        help,
    }
}

use names as n;
use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every family the gateway exports; all of them are on `/metrics` from start-up.
pub const ALL: &[Family] = &[
    family(n::REQUESTS, C, &["route", "outcome"], "Requests by route and outcome"),
    family(
        n::ERRORS,
        C,
        &["origin", "reason"],
        "Answers the gateway made itself, by origin (caller, upstream, gateway) and reason (the x-chat-gateway-error value)",
    ),
    family(
        n::CACHE,
        C,
        &["result"],
        "get_list answers by cache result (hit, miss, stale, bypass)",
    ),
    family(
        n::COALESCED,
        C,
        &[],
        "Callers that waited on an identical in-flight fetch instead of calling Chat",
    ),
    family(
        n::UPSTREAM_CALLS,
        C,
        &["command", "code"],
        "Calls to Chat by command and code (Chat ErrorCode, http_<status>, timeout or transport)",
    ),
    family(n::RETRIES, C, &["command"], "Retried calls to Chat by command"),
    family(
        n::UPSTREAM_LATENCY,
        H,
        &["command"],
        "Latency of each call to Chat by command, in seconds",
    ),
    family(
        n::CACHE_ENTRIES,
        G,
        &[],
        "Accounts in the page cache (one entry holds an account's pages)",
    ),
    family(n::CACHE_PAGES, G, &[], "get_list pages in the page cache"),
    family(
        n::CACHE_BYTES,
        G,
        &[],
        "Weighted size of the cache (get_list pages, item entries and their generation table), in bytes",
    ),
    family(
        n::CACHE_MAX_BYTES,
        G,
        &[],
        "Configured bound of the cache, pages and items together (cache.max_bytes), in bytes",
    ),
    family(
        n::INVALIDATIONS,
        C,
        &["source"],
        "Cache invalidations by source (admin, write_through, webhook, fleet)",
    ),
    family(
        n::INVALIDATED_PAGES,
        C,
        &["source"],
        "Cached pages dropped by invalidations, by source",
    ),
    family(
        n::CALLBACKS,
        C,
        &["outcome"],
        "Chat webhooks by outcome (applied, ignored, rejected)",
    ),
    family(
        n::RELOADS,
        C,
        &["outcome"],
        "Configuration reloads by outcome (applied, unchanged, rejected)",
    ),
    family(
        n::SECRET_RELOADS,
        C,
        &["secret", "outcome"],
        "Secret file reloads by secret (secret_key, callback_token, auth_tokens) and outcome (applied, rejected)",
    ),
    family(
        n::FAILOVERS,
        C,
        &["to"],
        "Switches between the primary and backup Chat endpoints, by destination",
    ),
    family(
        n::RATE_LIMITED,
        C,
        &["command"],
        "Calls refused by the gateway's own rate limit, by command",
    ),
    family(
        n::BUDGET_EXHAUSTED,
        C,
        &[],
        "Retries not made because the retry budget was spent",
    ),
    family(
        n::SIG_RENEWALS,
        C,
        &[],
        "UserSig renewals after Chat refused one",
    ),
    family(
        n::SIG_REFUSED,
        C,
        &[],
        "Calls where Chat refused even a freshly renewed UserSig (check chat.sdkappid, chat.identifier and chat.secret_key)",
    ),
    family(
        n::OPEN_CONNECTIONS,
        G,
        &["listener"],
        "Open client connections by listener (main, admin, callback)",
    ),
    family(
        n::BUILD_INFO,
        G,
        &["version"],
        "Always 1; the version label is the gateway's version",
    ),
    family(
        n::REDIS_ENABLED,
        G,
        &[],
        "1 when a [redis] section is configured, else 0",
    ),
    family(
        n::REDIS_UP,
        G,
        &[],
        "1 while Redis answers, else 0",
    ),
    family(
        n::REDIS_LATENCY,
        H,
        &["op"],
        "Latency of Redis operations by op, in seconds",
    ),
    family(
        n::REDIS_ERRORS,
        C,
        &["op", "kind"],
        "Failed Redis operations by op and kind (timeout, error)",
    ),
    family(
        n::PERMITS_LEASED,
        C,
        &["command"],
        "Rate-limit permits leased from the fleet-wide budget in Redis, by command",
    ),
    family(
        n::PERMITS_USED,
        C,
        &["command"],
        "Leased rate-limit permits spent on calls to Chat, by command",
    ),
    family(
        n::L2_REQUESTS,
        C,
        &["result"],
        "Shared (Redis) cache lookups by result (hit, miss, error)",
    ),
    family(
        n::FLEET_SENT,
        C,
        &[],
        "Invalidations this gateway published to the fleet",
    ),
    family(
        n::FLEET_RECEIVED,
        C,
        &[],
        "Invalidations this gateway received from the fleet",
    ),
    family(
        n::FLEET_LAG,
        H,
        &[],
        "Time from an invalidation's publication by another gateway to its application here, in seconds",
    ),
    family(
        n::FLEET_GATEWAYS,
        G,
        &[],
        "Gateways in the fleet, as this gateway sees it",
    ),
    family(
        n::FLEET_COALESCED,
        C,
        &["outcome"],
        "Waits on another gateway's identical fetch, by outcome (served, timeout)",
    ),
    family(
        n::FLEET_WAITS,
        C,
        &["outcome"],
        "Writes and admin invalidations that waited for every live gateway to apply their invalidation, by outcome (applied, timeout, unavailable)",
    ),
    family(
        n::FLEET_RESYNCS,
        C,
        &["reason"],
        "Full resynchronisations with the fleet, by reason (reconnect, gap, restart, lost)",
    ),
    family(
        n::L2_FLUSHES,
        C,
        &["reason"],
        "Times the fleet-wide generation was raised after a Redis incident, so no earlier L2 page is served, by reason (restart, lost, evicted)",
    ),
    family(
        n::REDIS_POLICY_UNSUPPORTED,
        G,
        &[],
        "1 when Redis's maxmemory-policy may evict the fleet's keys that have no expiry (allkeys-*), else 0",
    ),
    family(
        n::RESIDENT_MEMORY,
        G,
        &[],
        "Resident memory of the process, in bytes",
    ),
    family(
        n::ACCESS_LOG_DROPPED,
        C,
        &[],
        "Access-log lines dropped because the log's buffer was full (its output stalled or too slow)",
    ),
    family(
        n::SPANS_EXPORTED,
        C,
        &[],
        "Spans sent to the OTLP collector",
    ),
    family(
        n::SPANS_DROPPED,
        C,
        &["reason"],
        "Spans lost, by reason (queue_full: the export queue was full; export_failed: the collector did not take them)",
    ),
    family(
        n::ITEM_REQUESTS,
        C,
        &["command", "result"],
        "Answers of the cached reads other than get_list, by command and result (hit, partial, miss, stale, bypass)",
    ),
    family(
        n::ITEMS,
        C,
        &["command", "source"],
        "Items in the answers of the cached reads, by command and where each came from (memory, l2, chat)",
    ),
    family(
        n::CALLS_SAVED,
        C,
        &["command"],
        "Calls to Chat a cached read did not make, by command",
    ),
    family(
        n::INVALIDATED_ENTITIES,
        C,
        &["kind"],
        "Entities invalidated (each drops every cached entry that depends on it), by kind",
    ),
    family(n::CACHE_ITEMS, G, &[], "Entries in the item store"),
    family(
        n::CACHE_ITEM_BYTES,
        G,
        &[],
        "Weighted size of the item store, with its generation table, in bytes",
    ),
];

/// The label sets created at zero for `family` at start-up (one empty set for a
/// family without labels).
pub fn known_series(family: &str) -> Vec<Vec<(&'static str, &'static str)>> {
    use values as v;
    let one =
        |key: &'static str, vals: &[&'static str]| -> Vec<Vec<(&'static str, &'static str)>> {
            vals.iter().map(|x| vec![(key, *x)]).collect()
        };
    let cross = |k1: &'static str,
                 v1: &[&'static str],
                 k2: &'static str,
                 v2: &[&'static str]|
     -> Vec<Vec<(&'static str, &'static str)>> {
        v1.iter()
            .flat_map(|a| v2.iter().map(move |b| vec![(k1, *a), (k2, *b)]))
            .collect()
    };
    match family {
        n::REQUESTS => {
            let mut s = cross("route", &["get_list"], "outcome", v::GET_LIST_OUTCOMES);
            s.extend(cross("route", v::ROUTES, "outcome", v::ROUTE_OUTCOMES));
            s
        }
        n::ERRORS => {
            let mut s: Vec<Vec<(&'static str, &'static str)>> = Vec::new();
            for e in crate::error::GatewayError::one_of_each() {
                let set = vec![("origin", e.origin().as_str()), ("reason", e.reason())];
                if !s.contains(&set) {
                    s.push(set);
                }
            }
            s
        }
        n::CACHE => one("result", v::CACHE_RESULTS),
        n::UPSTREAM_CALLS => cross("command", v::COMMANDS, "code", v::CODES),
        n::RETRIES
        | n::UPSTREAM_LATENCY
        | n::RATE_LIMITED
        | n::PERMITS_LEASED
        | n::PERMITS_USED => one("command", v::COMMANDS),
        n::INVALIDATIONS | n::INVALIDATED_PAGES => one("source", v::INVALIDATION_SOURCES),
        n::CALLBACKS => one("outcome", v::CALLBACK_OUTCOMES),
        n::RELOADS => one("outcome", v::RELOAD_OUTCOMES),
        n::SECRET_RELOADS => cross("secret", v::SECRETS, "outcome", v::SECRET_OUTCOMES),
        n::FAILOVERS => one("to", v::FAILOVER_TO),
        n::OPEN_CONNECTIONS => one("listener", v::LISTENERS),
        n::BUILD_INFO => vec![vec![("version", env!("CARGO_PKG_VERSION"))]],
        n::REDIS_LATENCY => one("op", v::REDIS_OPS),
        n::REDIS_ERRORS => cross("op", v::REDIS_OPS, "kind", v::REDIS_ERROR_KINDS),
        n::L2_REQUESTS => one("result", v::L2_RESULTS),
        n::FLEET_COALESCED => one("outcome", v::FLEET_WAIT_OUTCOMES),
        n::FLEET_WAITS => one("outcome", v::FLEET_APPLY_OUTCOMES),
        n::FLEET_RESYNCS => one("reason", v::RESYNC_REASONS),
        n::SPANS_DROPPED => one("reason", v::SPAN_DROP_REASONS),
        n::ITEM_REQUESTS => v::item_commands()
            .flat_map(|c| {
                v::ITEM_RESULTS
                    .iter()
                    .map(move |r| vec![("command", c), ("result", *r)])
            })
            .collect(),
        n::ITEMS => v::item_commands()
            .flat_map(|c| {
                v::ITEM_SOURCES
                    .iter()
                    .map(move |r| vec![("command", c), ("source", *r)])
            })
            .collect(),
        n::CALLS_SAVED => v::item_commands().map(|c| vec![("command", c)]).collect(),
        n::INVALIDATED_ENTITIES => one("kind", v::ENTITY_KINDS),
        n::L2_FLUSHES => one("reason", v::L2_FLUSH_REASONS),
        _ => vec![Vec::new()],
    }
}

/// The process's Prometheus recorder (installed once; later calls reuse it, so tests
/// and the demo can start several servers in one process). The first call also
/// registers every family ([`register_all`]) and starts the upkeep thread.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                (n::UPSTREAM_LATENCY, LATENCY_BUCKETS),
                (n::REDIS_LATENCY, REDIS_LATENCY_BUCKETS),
                (n::FLEET_LAG, FLEET_LAG_BUCKETS),
            ];
            let mut builder = PrometheusBuilder::new();
            for (name, b) in buckets {
                // Fails only on an empty bucket list, which these are not.
                builder = match builder.set_buckets_for_metric(Matcher::Full(name.into()), b) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(metric = name, error = %e, "histogram buckets refused");
                        PrometheusBuilder::new()
                    }
                };
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case ours stays
            // local and /metrics shows what it records.
            let _ = metrics::set_global_recorder(recorder);
            register_all();
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Describes every family in [`ALL`] (`# HELP`, `# TYPE`) and creates its known
/// series at zero. Histograms get a handle and no observation: the exporter renders
/// a registered histogram with zero buckets, `_sum 0` and `_count 0`.
pub fn register_all() {
    for f in ALL {
        let labels = |set: &[(&'static str, &'static str)]| -> Vec<Label> {
            set.iter()
                .map(|(k, v)| Label::from_static_parts(k, v))
                .collect()
        };
        match f.kind {
            Kind::Counter => {
                metrics::describe_counter!(f.name, f.help);
                for set in known_series(f.name) {
                    let _ = counter!(f.name, labels(&set));
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(f.name, f.help);
                for set in known_series(f.name) {
                    let _ = gauge!(f.name, labels(&set));
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(f.name, f.help);
                for set in known_series(f.name) {
                    let _ = histogram!(f.name, labels(&set));
                }
            }
        }
    }
    gauge!(n::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    refresh_process();
}

/// Sets the gauges that come from settings fixed at start-up: the cache bound and
/// whether Redis is configured.
pub fn set_static(cache_max_bytes: u64, redis_enabled: bool) {
    gauge!(n::CACHE_MAX_BYTES).set(cache_max_bytes as f64);
    gauge!(n::REDIS_ENABLED).set(if redis_enabled { 1.0 } else { 0.0 });
}

/// Refreshes the process gauges (resident memory); called when `/metrics` renders.
pub fn refresh_process() {
    if let Some(bytes) = resident_bytes() {
        gauge!(n::RESIDENT_MEMORY).set(bytes as f64);
    }
}

/// Resident set size from `/proc/self/statm` (Linux), bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages * p)
}

/// Folds histogram samples into their buckets every few seconds. The recorder is not
/// driven by the exporter's own HTTP listener, so without this, samples recorded
/// between scrapes would only be drained by a scrape.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread");
    }
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
    /// `requests_total{route="items",outcome="ok"}`, for the hits the HTTP/1.1 front
    /// end answers itself (the router counts the others).
    pub request_ok: Counter,
}

impl GetListCounters {
    /// Resolves the handles.
    pub fn new() -> Self {
        let r = |o: &'static str| counter!(n::REQUESTS, "route" => "get_list", "outcome" => o);
        let c = |o: &'static str| counter!(n::CACHE, "result" => o);
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
            coalesced: counter!(n::COALESCED),
            request_ok: counter!(n::REQUESTS, "route" => "items", "outcome" => "ok"),
        }
    }
}

impl Default for GetListCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// Pre-resolved counters of one cached read (other than get_list).
#[derive(Clone)]
pub struct ReadCounters {
    /// `item_cache_requests_total{result="hit"}`: every item from memory.
    pub hit: Counter,
    /// `{result="partial"}`: some items from memory, the others from Chat.
    pub partial: Counter,
    /// `{result="miss"}`: every item from Chat.
    pub miss: Counter,
    /// `{result="stale"}`: Chat failed; stale items served.
    pub stale: Counter,
    /// `{result="bypass"}`: not cacheable (forwarded, refused, Chat's error).
    pub bypass: Counter,
    /// `item_cache_items_total{source="memory"}`
    pub from_memory: Counter,
    /// `item_cache_items_total{source="chat"}`
    pub from_chat: Counter,
    /// `item_cache_items_total{source="l2"}`
    pub from_l2: Counter,
    /// `upstream_calls_saved_total`
    pub saved: Counter,
    /// `coalesced_waits_total`
    pub coalesced: Counter,
    /// `requests_total{route="items",outcome="ok"}`, for the hits the HTTP/1.1 front
    /// end answers itself (the router counts the others).
    pub request_ok: Counter,
}

impl ReadCounters {
    /// The counters of `command`.
    pub fn new(command: &'static str) -> Self {
        let r = |x: &'static str| counter!(n::ITEM_REQUESTS, "command" => command, "result" => x);
        let i = |x: &'static str| counter!(n::ITEMS, "command" => command, "source" => x);
        ReadCounters {
            hit: r("hit"),
            partial: r("partial"),
            miss: r("miss"),
            stale: r("stale"),
            bypass: r("bypass"),
            from_memory: i("memory"),
            from_chat: i("chat"),
            from_l2: i("l2"),
            saved: counter!(n::CALLS_SAVED, "command" => command),
            coalesced: counter!(n::COALESCED),
            request_ok: counter!(n::REQUESTS, "route" => "items", "outcome" => "ok"),
        }
    }

    /// Counters that count nothing (for get_list's row, which counts its own).
    fn noop() -> Self {
        ReadCounters {
            hit: Counter::noop(),
            partial: Counter::noop(),
            miss: Counter::noop(),
            stale: Counter::noop(),
            bypass: Counter::noop(),
            from_memory: Counter::noop(),
            from_chat: Counter::noop(),
            from_l2: Counter::noop(),
            saved: Counter::noop(),
            coalesced: Counter::noop(),
            request_ok: Counter::noop(),
        }
    }

    /// One per row of [`crate::chat::reads::READS`] (get_list's count nothing).
    pub fn per_row() -> Vec<ReadCounters> {
        crate::chat::reads::READS
            .iter()
            .map(|r| match r.store {
                crate::chat::reads::Store::Items => ReadCounters::new(r.command),
                crate::chat::reads::Store::Pages => ReadCounters::noop(),
            })
            .collect()
    }
}

/// Counts one request on a route other than get_list (which counts its own, with
/// pre-resolved handles).
pub fn request(route: &'static str, outcome: &'static str) {
    counter!(n::REQUESTS, "route" => route, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_unique_and_well_named() {
        let mut seen = std::collections::HashSet::new();
        for f in ALL {
            assert!(seen.insert(f.name), "{} listed twice", f.name);
            assert!(f.name.starts_with("chat_gateway_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                f.name
            );
            assert!(!f.help.is_empty(), "{} has no help", f.name);
        }
    }

    #[test]
    fn every_family_has_series_with_its_labels() {
        for f in ALL {
            let series = known_series(f.name);
            assert!(!series.is_empty(), "{}", f.name);
            for set in series {
                let keys: Vec<&str> = set.iter().map(|(k, _)| *k).collect();
                assert_eq!(keys, f.labels, "{}", f.name);
            }
        }
    }

    #[test]
    fn errors_cover_every_variant() {
        let series = known_series(names::ERRORS);
        for e in crate::error::GatewayError::one_of_each() {
            assert!(series.contains(&vec![
                ("origin", e.origin().as_str()),
                ("reason", e.reason())
            ]));
        }
    }

    #[test]
    fn resident_memory_is_read() {
        let rss = resident_bytes().expect("/proc/self/statm is readable");
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
