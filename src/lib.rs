//! # chat-gateway
//!
//! A sidecar between internal services and the Tencent Cloud Chat REST admin API.
//! Services call it over plain HTTP on loopback with Chat's own request bodies and no
//! credentials; it injects the SDKAppID, the admin identifier, a fresh UserSig and a
//! `random`, calls Chat over HTTPS (rustls), caches `v4/recentcontact/get_list` pages
//! per account and the other hot reads per item, coalesces identical misses and
//! retries transient failures safely.
//! Many gateways act as one through Redis; every resource one holds is bounded by a
//! setting.
//!
//! ## Layout
//!
//! Modules follow a request's path; each decision has one home.
//!
//! - [`cli`]: clap definitions of the subcommands. [`cmd`]: one function per
//!   subcommand (`main.rs` only parses and dispatches).
//! - [`config`]: loading (defaults < TOML file < `CHAT_GATEWAY__*` env; errors that
//!   never echo a secret), validation into typed [`config::Settings`], the redacted
//!   [`config::Secret`], live reload ([`config::reload`]), secrets read from watched
//!   files ([`config::secrets`]) and the `[redis]` settings ([`config::redis`]).
//! - [`chat`]: the upstream's contract and nothing else: UserSig
//!   ([`chat::usersig`]), regions ([`chat::region`]), the envelope and what each
//!   `ErrorCode` means ([`chat::envelope`]), the command table: which commands are
//!   reads ([`chat::commands`]), the table of cacheable reads: how each splits into
//!   items and what its entries depend on ([`chat::reads`]), and the table of
//!   invalidations: the entities each write and webhook changes
//!   ([`chat::effects`]).
//! - [`server`]: the accept loop with limits, the probes' reserve and graceful
//!   shutdown, and hyper as the HTTP/2 driver ([`server::listener`]); the gateway's
//!   own HTTP/1.1 front end with the cache-hit path ([`server::http1`]); what a valid
//!   request head is and what becomes of its connection ([`server::rules`]); routing
//!   per listener and request ids ([`server::router`]); bounded and chunked bodies
//!   ([`server::body`]); caller tokens, checked in constant time on the hit path
//!   and by the router alike ([`server::auth`]); the access log, with its own
//!   formatter and writer thread ([`server::access`]); response building
//!   ([`server::response`]); and one handler per route ([`server::handlers`]:
//!   get_list, the per-item cached reads, passthrough, callbacks, admin, probes,
//!   metrics).
//! - [`cache`]: what a page key is and what is forwarded ([`cache::key`]: the get_list
//!   parsers, fast and general, and the canonical form), the per-account page store
//!   with O(1) invalidation and weighed memory ([`cache::store`]), the GroupId index
//!   ([`cache::groups`]); for the other cached reads, what an item's key is and what
//!   is forwarded ([`cache::item_key`]), answers split and assembled
//!   ([`cache::assemble`]), the item store validated by a generation table
//!   ([`cache::items`]) and its fast path for full hits ([`cache::item_fast`]); and
//!   miss coalescing, per key and per item ([`cache::coalesce`]).
//! - [`invalidate`]: the one door for invalidations, above `cache` and `fleet`: it
//!   applies the effects the table names to both stores and publishes them to the
//!   fleet.
//! - [`upstream`]: the cached admin UserSig ([`upstream::signer`]), the per-command
//!   rate limit ([`upstream::ratelimit`]), the retry policy ([`upstream::retry`]: the
//!   only place that decides to retry) and its budget ([`upstream::budget`]), failover
//!   ([`upstream::failover`]) and the pooled rustls client ([`upstream::client`]);
//!   [`upstream::Upstream::call`] ties them.
//! - [`fleet`]: many gateways as one through Redis (`[redis]`): the connection and its
//!   health ([`fleet::conn`]), the keys ([`fleet::keys`]), the fleet-wide rate limit
//!   ([`fleet::limiter`]), invalidation events and loss detection ([`fleet::bus`]), the
//!   shared L2 page cache and fetch lock ([`fleet::l2`]), the item entries in L2
//!   ([`fleet::items`]), the heartbeat ([`fleet::heartbeat`]), and Redis Cluster
//!   and Sentinel behind one connection type ([`fleet::topology`]).
//! - [`error`]: the request error type: where each failure came from and what the
//!   caller is told (its response is built in [`server::response`]).
//! - [`metrics`]: every metric family (registered from the first scrape) and
//!   pre-resolved hot-path counters.
//! - [`telemetry`]: what operators see, set up in one place: log lines (text or
//!   JSON), the access log ([`server::access`]) and traces.
//! - [`trace`]: OpenTelemetry traces (`[tracing]`): W3C trace context continued,
//!   parent-based ratio sampling decided before any span exists, spans for the
//!   request, the cache lookup, each call to Chat and each Redis round trip, and
//!   their bounded, counted OTLP/HTTP export.
//! - [`emulator`]: a local Chat (auth, a synthetic world, paging, writes, faults,
//!   webhooks) for tests, benchmarks and the `demo` command.

pub mod cache;
pub mod chat;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod emulator;
pub mod error;
pub mod fleet;
pub mod invalidate;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod trace;
pub mod upstream;
