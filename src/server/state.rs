//! What every handler shares.

use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Notify;

use crate::cache::assemble::Templates;
use crate::cache::coalesce::{Flights, Inflight};
use crate::cache::items::{ItemKey, ItemStore};
use crate::cache::key::PageKey;
use crate::cache::store::PageStore;
use crate::cache::PageCache;
use crate::chat::commands::{self, CommandClass};
use crate::config::secrets::LiveSecrets;
use crate::config::{LiveSettings, Settings};
use crate::fleet::Fleet;
use crate::invalidate::{Invalidator, Memory};
use crate::metrics::{GetListCounters, ReadCounters};
use crate::server::body::BodyLimits;
use crate::server::handlers::get_list::FetchResult;
use crate::server::handlers::items::Flight;
use crate::upstream::Upstream;

/// The gateway's shared state, one per server.
pub struct AppState {
    /// Settings fixed at start-up.
    pub settings: Arc<Settings>,
    /// The reloadable settings; handlers take a snapshot per request.
    pub live: Arc<ArcSwap<LiveSettings>>,
    /// The way to Chat.
    pub upstream: Arc<Upstream>,
    /// The get_list page cache.
    pub store: Arc<dyn PageCache>,
    /// The one door for invalidations.
    pub invalidator: Invalidator,
    /// get_list fetches in flight, for coalescing.
    pub inflight: Inflight<(Arc<str>, PageKey), FetchResult>,
    /// Hot-path counters, resolved once.
    pub counters: GetListCounters,
    /// The per-item entries of the other cached reads.
    pub items: Arc<ItemStore>,
    /// Their all-success answer templates.
    pub templates: Templates,
    /// Their fetches in flight, per item, for coalescing.
    pub flights: Flights<ItemKey, Flight>,
    /// Their counters, by row of the reads table.
    pub read_counters: Vec<ReadCounters>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Notified by `POST /quitquitquit` to start the graceful shutdown.
    pub quit: Arc<Notify>,
    /// The secrets that may change while the gateway runs (key, callback token,
    /// caller tokens).
    pub secrets: Arc<LiveSecrets>,
    /// Whether callers must present a token (`server.auth_tokens` or
    /// `server.auth_tokens_file` set); fixed at start-up, so the hot path reads a
    /// bool.
    pub auth_required: bool,
    /// The caller tokens, hashed for the constant-time check (hit path and router).
    pub caller_tokens: crate::server::auth::CallerTokens,
    /// The fleet (`[redis]`): shared rate limit, invalidations, L2.
    pub fleet: Option<Arc<Fleet>>,
}

impl AppState {
    /// Whether `command` is a read (retried on transient errors) or a write: the
    /// built-in reads plus `retry.idempotent_commands`.
    pub fn command_class(&self, command: &str) -> CommandClass {
        match commands::builtin_class(command) {
            CommandClass::Read => CommandClass::Read,
            CommandClass::Write if self.live.load().retry.idempotent_commands.contains(command) => {
                CommandClass::Read
            }
            CommandClass::Write => CommandClass::Write,
        }
    }

    /// Whether `routes.allow` / `routes.deny` let `command` through (deny wins).
    pub fn route_allowed(&self, command: &str) -> bool {
        let r = &self.settings.routes;
        let matches = |p: &String| commands::pattern_matches(p, command);
        !r.deny.iter().any(matches) && (r.allow.is_empty() || r.allow.iter().any(matches))
    }

    /// The main listener's body limits: `server.max_body_bytes` and
    /// `server.body_read_timeout_ms`.
    pub fn body_limits(&self) -> BodyLimits {
        let s = &self.settings.server;
        BodyLimits {
            max_bytes: s.max_body_bytes,
            timeout: s.body_read_timeout,
        }
    }

    /// The callback listener's body limits: `callback.max_body_bytes` and
    /// `callback.body_read_timeout_ms`.
    pub fn callback_body_limits(&self) -> BodyLimits {
        let c = &self.settings.callback;
        BodyLimits {
            max_bytes: c.max_body_bytes,
            timeout: c.body_read_timeout,
        }
    }

    /// Builds the state from validated settings.
    pub fn new(settings: Settings) -> Result<Arc<Self>, String> {
        let metrics = crate::metrics::install();
        crate::metrics::set_static(settings.cache.max_bytes, settings.redis.is_some());
        let live = Arc::new(ArcSwap::from_pointee(settings.live.clone()));
        let store: Arc<dyn PageCache> = Arc::new(PageStore::new(
            settings.cache.pages_bytes(),
            settings.cache.max_pages_per_account,
        ));
        let items = Arc::new(ItemStore::new(settings.cache.items_bytes()));
        let memory = Arc::new(Memory {
            pages: store.clone(),
            items: items.clone(),
        });
        // Joining the fleet starts connecting in the background: a Redis that is down
        // delays nothing. Its events reach both stores through `memory`.
        let fleet = Fleet::start(&settings, memory.clone(), live.clone())?;
        let limiter = fleet
            .as_ref()
            .map(|f| f.limiter() as Arc<dyn crate::upstream::ratelimit::RateLimiter>);
        let upstream = Arc::new(Upstream::with_limiter(&settings, live.clone(), limiter)?);
        let signer = upstream.signer().clone();
        let secrets =
            Arc::new(LiveSecrets::new(&settings).on_key_change(move |k| signer.set_key(k.clone())));
        let auth_required = !settings.server.auth_tokens.is_empty();
        let caller_tokens = crate::server::auth::CallerTokens::new(secrets.auth_tokens.load_full());
        Ok(Arc::new(AppState {
            settings: Arc::new(settings),
            invalidator: Invalidator::new(memory)
                .with_fleet(fleet.clone())
                .with_live(live.clone()),
            live,
            upstream,
            store,
            inflight: Inflight::default(),
            counters: GetListCounters::new(),
            items,
            templates: Templates::default(),
            flights: Flights::default(),
            read_counters: ReadCounters::per_row(),
            metrics,
            quit: Arc::new(Notify::new()),
            secrets,
            auth_required,
            caller_tokens,
            fleet,
        }))
    }
}
