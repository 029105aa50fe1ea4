//! # chat-gateway
//!
//! A sidecar between internal services and the Tencent Cloud Chat REST admin API.
//! Services call it over plain HTTP on loopback with Chat's own request bodies and no
//! credentials; it injects the SDKAppID, the admin identifier, a fresh UserSig and a
//! `random`, calls Chat over HTTPS (rustls), caches `v4/recentcontact/get_list` pages
//! per account, coalesces identical misses and retries transient failures safely.
//!
//! ## Layout
//!
//! Modules follow a request's path; each decision has one home.
//!
//! - [`cli`]: clap definitions of the subcommands. [`cmd`]: one function per
//!   subcommand (`main.rs` only parses and dispatches).
//! - [`config`]: loading (defaults < TOML file < `CHAT_GATEWAY__*` env), validation into
//!   typed [`config::Settings`], the redacted [`config::Secret`], and live reload.
//! - [`chat`]: the upstream's contract and nothing else: UserSig
//!   ([`chat::usersig`]), regions ([`chat::region`]), the envelope and what each
//!   `ErrorCode` means ([`chat::envelope`]), and the command table: which commands
//!   are reads and whose lists they make stale ([`chat::commands`]).
//! - [`server`]: the accept loop with limits and graceful shutdown
//!   ([`server::listener`]), routing and request ids ([`server::router`]), bounded
//!   bodies ([`server::body`]), and one handler per route ([`server::handlers`]).
//! - [`cache`]: what a page key is ([`cache::key`]: the only get_list parser), the
//!   per-account page store with O(1) invalidation ([`cache::store`]), and miss
//!   coalescing ([`cache::coalesce`]).
//! - [`upstream`]: the cached admin UserSig ([`upstream::signer`]), the retry policy
//!   ([`upstream::retry`]: the only place that decides to retry) and the pooled
//!   rustls client ([`upstream::client`]); [`upstream::Upstream::call`] ties them.
//! - [`fleet`]: many gateways as one through Redis (`[redis]`): the connection and its
//!   health ([`fleet::conn`]), the keys ([`fleet::keys`]), the fleet-wide rate limit
//!   ([`fleet::limiter`]), invalidation events and loss detection ([`fleet::bus`]), the
//!   shared L2 page cache and fetch lock ([`fleet::l2`]), and the heartbeat
//!   ([`fleet::heartbeat`]).
//! - [`error`]: the request error type; each failure maps to one envelope response.
//! - [`metrics`]: Prometheus names and pre-resolved hot-path counters.
//! - [`telemetry`]: tracing set-up (text or JSON).
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
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod upstream;
