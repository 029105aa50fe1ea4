//! `POST /v4/recentcontact/get_list`: the cached route.
//!
//! hit:  parse (borrowing) → key → store lookup → shared `Bytes`, `x-cache: HIT`
//! miss: coalesced fetch task → (fleet: L2 page, or wait for the gateway that holds
//!       the fetch lock; one Redis round trip when nobody does) → upstream (signer,
//!       retries) → store insert (+ L2, by a task of its own) → `MISS`
//! fleet: all of a request's Redis work shares one budget of `redis.timeout_ms`; the
//!       L2 lookup and the rate limit's lease are sent together (one round trip)
//! Chat failing: a page past its TTL but within `cache.stale_if_error_secs` (from
//! memory, or from L2) → `STALE`

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use opentelemetry::KeyValue;
use tracing::Instrument;

use crate::cache::coalesce::Role;
use crate::cache::key::{self, PageKey};
use crate::cache::store::{Lookup, Page};
use crate::chat::commands::{CommandClass, GET_LIST};
use crate::chat::envelope::CodeClass;
use crate::error::GatewayError;
use crate::fleet::conn;
use crate::fleet::l2::{FetchPlan, MissPlan, L2};
use crate::server::access::AccessInfo;
use crate::server::response::{self, age_value, Body, X_CACHE};
use crate::server::AppState;
use crate::upstream::ratelimit::{Permit, Throttled};
use crate::upstream::CallStats;

const HIT: HeaderValue = HeaderValue::from_static("HIT");
const MISS: HeaderValue = HeaderValue::from_static("MISS");
const STALE: HeaderValue = HeaderValue::from_static("STALE");
const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
/// `x-cache-l2: HIT`: a MISS in this gateway's memory answered from the fleet's L2.
const X_CACHE_L2: http::HeaderName = http::HeaderName::from_static("x-cache-l2");

/// What one coalesced fetch produced.
#[derive(Debug)]
pub struct Fetched {
    /// Chat's HTTP status.
    pub status: StatusCode,
    /// Chat's answer.
    pub body: Bytes,
    /// Whether it was stored (a success not overtaken by an invalidation).
    pub cached: bool,
    /// Whether Chat failed in a way that makes a stale page preferable.
    pub upstream_failed: bool,
    /// Chat's `ErrorCode`, when the answer is an envelope.
    pub code: Option<i64>,
    /// Served from the fleet's L2 (stored when then), not from Chat.
    pub from_l2: Option<Instant>,
    /// A page from L2 past its TTL but within the stale window, for when Chat fails.
    pub l2_stale: Option<Arc<Page>>,
}

/// The shared result of a fetch, handed to every waiter.
pub type FetchResult = Result<Arc<Fetched>, GatewayError>;

/// Handles one get_list request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Bytes>,
    request_id: &HeaderValue,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let c = &state.counters;
    let parsed = match key::parse(&body) {
        Ok(p) => p,
        Err(e) => return refuse(&state, e),
    };
    let no_cache = wants_no_cache(&parts.headers);
    let now = Instant::now();
    let mut stale = None;
    let lookup_span = crate::trace::cache_lookup();
    let result = if no_cache {
        "skip"
    } else {
        match state.store.lookup(&parsed.account, &parsed.page, now) {
            Lookup::Fresh(page) => {
                c.req_hit.increment(1);
                c.hit.increment(1);
                if let Some(s) = lookup_span {
                    s.end(
                        vec![KeyValue::new("chat_gateway.cache.result", "hit")],
                        false,
                    );
                }
                return cached(&page, HIT, now);
            }
            Lookup::Stale(page) => {
                stale = Some(page);
                "stale"
            }
            Lookup::Miss => "miss",
        }
    };
    if let Some(s) = lookup_span {
        s.end(
            vec![KeyValue::new("chat_gateway.cache.result", result)],
            false,
        );
    }

    // Past the cache: an info-level span, so what the miss path logs carries the id
    // (and the trace id, with tracing on).
    let span = tracing::info_span!(
        "get_list_miss",
        request_id = request_id.to_str().unwrap_or(""),
        account = &*parsed.account,
        trace_id = tracing::field::Empty,
    );
    if let Some(t) = parts.extensions.get::<crate::trace::LogTraceId>() {
        span.record("trace_id", tracing::field::display(t));
    }
    miss(state, parsed, no_cache, stale).instrument(span).await
}

/// The miss path: a coalesced fetch, then MISS, STALE or BYPASS.
async fn miss(
    state: Arc<AppState>,
    parsed: key::GetListRequest<'_>,
    no_cache: bool,
    stale: Option<Arc<Page>>,
) -> Response<Body> {
    let c = &state.counters;
    let account: Arc<str> = Arc::from(&*parsed.account);
    let page_key = parsed.page.clone();
    let upstream_body = parsed.upstream_body();
    let fetch_state = state.clone();
    // What the fetch spends on Chat; a follower's stays empty (it made no call).
    let stats = Arc::new(CallStats::default());
    let fetch_stats = stats.clone();
    let (result, role) = state
        .inflight
        .run(
            (account.clone(), page_key.clone()),
            // The fetch runs as its own task: it carries this request's span, so what
            // it logs has the request id, and its trace (its calls to Chat and Redis
            // are the request's children).
            move || {
                crate::trace::carry(
                    fetch(
                        fetch_state,
                        account,
                        page_key,
                        upstream_body,
                        fetch_stats,
                        no_cache,
                    )
                    .instrument(tracing::Span::current()),
                )
            },
            || {
                Err(GatewayError::Internal(
                    "get_list fetch task panicked".into(),
                ))
            },
        )
        .await;
    if role == Role::Follower {
        c.coalesced.increment(1);
    }

    let mut info = AccessInfo {
        code: None,
        attempts: stats.attempts(),
        upstream: stats.upstream_time(),
    };
    let mut resp = match result {
        // Not in this gateway's memory, but in the fleet's L2: a MISS here (this
        // gateway did not have the page), answered without calling Chat.
        Ok(f) if f.from_l2.is_some() => {
            c.req_miss.increment(1);
            c.miss.increment(1);
            info.code = f.code;
            let mut resp = upstream_answer(&f, MISS);
            let h = resp.headers_mut();
            h.insert(X_CACHE_L2, HIT);
            if let Some(at) = f.from_l2 {
                h.insert(
                    http::header::AGE,
                    age_value(Instant::now().saturating_duration_since(at).as_secs()),
                );
            }
            resp
        }
        Ok(f) if f.cached => {
            c.req_miss.increment(1);
            c.miss.increment(1);
            info.code = f.code;
            upstream_answer(&f, if no_cache { BYPASS } else { MISS })
        }
        Ok(f) if f.upstream_failed && (stale.is_some() || f.l2_stale.is_some()) => {
            info.code = Some(0);
            serve_stale(&state, stale.or_else(|| f.l2_stale.clone()), "Chat failed")
        }
        Ok(f) => {
            c.req_bypass.increment(1);
            c.bypass.increment(1);
            info.code = f.code;
            upstream_answer(&f, BYPASS)
        }
        Err(e) if stale.is_some() => {
            info.code = Some(0);
            serve_stale(&state, stale, e.reason())
        }
        Err(e) => {
            c.req_error.increment(1);
            c.bypass.increment(1);
            info.code = Some(e.code());
            let mut resp = e.respond();
            resp.headers_mut().insert(X_CACHE, BYPASS);
            resp
        }
    };
    info.attach(&mut resp);
    resp
}

/// Runs in its own task: asks the fleet's L2 (when there is one), else calls Chat
/// and stores a success (in memory, and in L2). All of its Redis work shares one
/// budget of `redis.timeout_ms`.
async fn fetch(
    state: Arc<AppState>,
    account: Arc<str>,
    page_key: PageKey,
    body: Bytes,
    stats: Arc<CallStats>,
    no_cache: bool,
) -> FetchResult {
    match state.fleet.as_ref().map(|f| f.redis().timeout()) {
        Some(budget) => {
            conn::with_budget(
                budget,
                fetch_within_budget(state, account, page_key, body, stats, no_cache),
            )
            .await
        }
        None => fetch_within_budget(state, account, page_key, body, stats, no_cache).await,
    }
}

async fn fetch_within_budget(
    state: Arc<AppState>,
    account: Arc<str>,
    page_key: PageKey,
    body: Bytes,
    stats: Arc<CallStats>,
    no_cache: bool,
) -> FetchResult {
    let epoch = state.store.begin_fetch();
    let l2 = state.fleet.as_ref().and_then(|f| f.l2().cloned());
    // How to store in L2 what Chat answers (generation, our fetch lock's token).
    let mut l2_plan: Option<FetchPlan> = None;
    let mut l2_stale = None;
    // The first attempt's rate-limit slot, asked for together with the L2 lookup: a
    // miss that goes to Chat costs one Redis round trip, not two. Unused (L2 answered),
    // the permit goes to the next caller.
    let mut admitted: Option<Result<Permit, Throttled>> = None;
    if let Some(l2) = &l2 {
        let admit = state.upstream.admit(GET_LIST);
        tokio::pin!(admit);
        if no_cache {
            // A refresh: no L2 answer, but the page it fetches goes to L2 too.
            let found = {
                let lookup = l2.lookup(&account, &page_key, false);
                tokio::pin!(lookup);
                loop {
                    tokio::select! {
                        f = &mut lookup => break f,
                        r = &mut admit, if admitted.is_none() => admitted = Some(r),
                    }
                }
            };
            if let Ok(found) = found {
                l2_plan = Some(FetchPlan {
                    gen: found.gen,
                    gens: found.gens,
                    token: None,
                    stale: None,
                    since_ms: found.now_ms,
                });
            }
        } else {
            let plan = {
                let plan = l2.plan_miss(&account, &page_key);
                tokio::pin!(plan);
                loop {
                    tokio::select! {
                        p = &mut plan => break p,
                        r = &mut admit, if admitted.is_none() => admitted = Some(r),
                    }
                }
            };
            match plan {
                MissPlan::Serve(p, now_ms) => {
                    let page = p.to_page(page_key, now_ms);
                    let (stored_at, body) = (page.stored_at, page.body.clone());
                    let cached = state.store.insert(&account, page, epoch);
                    return Ok(Arc::new(Fetched {
                        status: StatusCode::OK,
                        body,
                        cached,
                        upstream_failed: false,
                        code: Some(0),
                        from_l2: Some(stored_at),
                        l2_stale: None,
                    }));
                }
                MissPlan::Fetch(mut plan) => {
                    l2_stale = plan
                        .stale
                        .take()
                        .map(|(p, now_ms)| Arc::new(p.to_page(page_key.clone(), now_ms)));
                    l2_plan = Some(plan);
                }
                MissPlan::Bypass => {}
            }
        }
        if admitted.is_none() {
            admitted = Some(admit.await);
        }
    }
    let resp = match state
        .upstream
        .call_admitted(GET_LIST, CommandClass::Read, body, &stats, admitted)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            release(&l2, &l2_plan, &account, &page_key);
            if l2_stale.is_some() {
                tracing::debug!(error = %e, "Chat failed; an L2 page may be served stale");
                return Ok(Arc::new(Fetched {
                    status: StatusCode::BAD_GATEWAY,
                    body: Bytes::new(),
                    cached: false,
                    upstream_failed: true,
                    code: Some(e.code()),
                    from_l2: None,
                    l2_stale,
                }));
            }
            return Err(e);
        }
    };
    let class = resp.chat.map(|s| CodeClass::of(s.code));
    let success = resp.status == StatusCode::OK && resp.chat.is_some_and(|s| s.is_success());
    let upstream_failed = resp.status.is_server_error()
        || matches!(class, Some(CodeClass::Transient | CodeClass::Throttled));
    let mut cached = false;
    let mut body = resp.body;
    if success {
        let live = state.live.load();
        let now = Instant::now();
        let fresh_until = now + live.cache_ttl;
        let page = Page::new(
            page_key.clone(),
            &body,
            now,
            fresh_until,
            fresh_until + live.stale_if_error,
            crate::cache::groups::group_keys(&body),
        );
        // Answer with the stored copy: the buffer Chat's answer was read into is
        // freed as soon as this request is done.
        body = page.body.clone();
        cached = state.store.insert(&account, page, epoch);
        match (&l2, l2_plan.take()) {
            (Some(l2), Some(plan)) if cached => {
                // Stored in L2 by a task of its own, so that a slow Redis delays this
                // answer by no more than what is left of the request's budget.
                let (l2, account, key, page_body) =
                    (l2.clone(), account.clone(), page_key.clone(), body.clone());
                let (ttl, stale) = (live.cache_ttl, live.stale_if_error);
                let store = tokio::spawn(async move {
                    if let Err(e) = l2
                        .store(&account, &page_body, &key, &plan, ttl, stale)
                        .await
                    {
                        tracing::debug!(error = %e, "page not stored in L2");
                    }
                });
                let _ = conn::within_budget(store).await;
            }
            (_, plan) => release(&l2, &plan, &account, &page_key),
        }
    } else {
        release(&l2, &l2_plan, &account, &page_key);
    }
    Ok(Arc::new(Fetched {
        status: resp.status,
        body,
        cached,
        upstream_failed,
        code: resp.chat.map(|s| s.code),
        from_l2: None,
        l2_stale,
    }))
}

/// Releases our L2 fetch lock, if we hold one (in the background: the answer does not
/// wait for it).
fn release(l2: &Option<Arc<L2>>, plan: &Option<FetchPlan>, account: &str, key: &PageKey) {
    if let (
        Some(l2),
        Some(FetchPlan {
            token: Some(token), ..
        }),
    ) = (l2, plan)
    {
        let (l2, account, key, token) =
            (l2.clone(), account.to_string(), key.clone(), token.clone());
        tokio::spawn(async move { l2.unlock(&account, &key, &token).await });
    }
}

/// Whether the request asks to skip the cache (`Cache-Control: no-cache` or
/// `no-store`): the lookup is skipped, the answer fetched and stored.
pub fn wants_no_cache(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .any(|v| crate::server::rules::cache_control_no_cache(v.as_bytes()))
}

fn cached(page: &Page, x_cache: HeaderValue, now: Instant) -> Response<Body> {
    let mut resp = response::json(StatusCode::OK, page.body.clone());
    let h = resp.headers_mut();
    h.insert(X_CACHE, x_cache);
    h.insert(
        http::header::AGE,
        age_value(now.saturating_duration_since(page.stored_at).as_secs()),
    );
    resp
}

fn serve_stale(state: &AppState, page: Option<Arc<Page>>, why: &str) -> Response<Body> {
    let Some(page) = page else {
        return GatewayError::Internal("stale page vanished".into()).respond();
    };
    tracing::warn!(reason = why, "Chat failing; serving a stale page");
    state.counters.req_stale.increment(1);
    state.counters.stale.increment(1);
    cached(&page, STALE, Instant::now())
}

fn upstream_answer(f: &Fetched, x_cache: HeaderValue) -> Response<Body> {
    let mut resp = response::json(f.status, f.body.clone());
    resp.headers_mut().insert(X_CACHE, x_cache);
    resp
}

/// Answers a get_list request the gateway refuses itself (its body could not be
/// read, or is invalid).
pub fn refuse(state: &AppState, e: GatewayError) -> Response<Body> {
    tracing::debug!(error = %e, "get_list request refused");
    state.counters.req_error.increment(1);
    state.counters.bypass.increment(1);
    let mut resp = e.respond();
    resp.headers_mut().insert(X_CACHE, BYPASS);
    resp
}
