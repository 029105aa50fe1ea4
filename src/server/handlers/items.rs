//! `POST /v4/<service>/<command>` for the cached reads other than get_list
//! ([`crate::chat::reads`]): per-item caching with partial hits.
//!
//! all items fresh: lookups (no allocation per item) → assembled from the template,
//!       no call to Chat → `HIT`
//! some missing: (fleet: the fleet's L2, one pipeline for all of them, waiting for
//!       the items another gateway is fetching) → ONE call naming only the items
//!       still missing (coalesced per item: an item another request is fetching is
//!       awaited, not fetched again) → split back → successes stored (in memory, and
//!       in L2 by a task of its own), per-item failures passed through (never
//!       stored) → assembled in request order → `PARTIAL` (some from memory) or
//!       `MISS` (with `x-cache-l2: HIT` when L2 had every missing item)
//! Chat failing: every missing item with an entry past its TTL but within its stale
//!       window → `STALE`; otherwise Chat's answer (or the gateway's error) as is
//! not splittable (request or answer): forwarded unchanged → `BYPASS`
//! `[cache.commands."…"] enabled = false`: forwarded like any other command.
//!
//! On HTTP/1.1 a full hit of a common body never reaches [`handle`]: the front end
//! asks [`fast_hit`] (the fast scanner, the lookups, no serde, no allocation) and
//! writes the pieces it returns with one `writev`; anything else comes here.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use tracing::Instrument;

use crate::cache::assemble::{self, Template};
use crate::cache::coalesce::Role;
use crate::cache::item_fast::{self, FastRequest};
use crate::cache::item_key::{self, ItemRequest, Parsed};
use crate::cache::items::{Deps, FetchEpoch, ItemEntry, ItemKey, ItemLookup, KeyBuf};
use crate::chat::effects::EntityKind;
use crate::chat::envelope::CodeClass;
use crate::chat::reads::{AnswerShape, ReadRow, Store, MAX_LISTED_DEPS, READS};
use crate::error::GatewayError;
use crate::fleet::conn;
use crate::fleet::items::{self as l2_items, Found, ItemL2};
use crate::server::access::AccessInfo;
use crate::server::handlers::{get_list, passthrough};
use crate::server::response::{self, age_value, Body, X_CACHE};
use crate::server::AppState;
use crate::upstream::CallStats;

const HIT: HeaderValue = HeaderValue::from_static("HIT");
const PARTIAL: HeaderValue = HeaderValue::from_static("PARTIAL");
const MISS: HeaderValue = HeaderValue::from_static("MISS");
const STALE: HeaderValue = HeaderValue::from_static("STALE");
const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
/// `x-cache-l2: HIT`: every item not in this gateway's memory came from the fleet's
/// L2, without calling Chat.
const X_CACHE_L2: http::HeaderName = http::HeaderName::from_static("x-cache-l2");

/// One item of a flight's answer.
#[derive(Debug, Clone)]
pub struct FetchedItem {
    /// Its JSON as Chat returned it (the whole answer, for a single read).
    pub body: Bytes,
    /// Chat listed it as failed.
    pub failed: bool,
    /// The entities it depends on: a request that joined the flight serves it only
    /// if none changed since the flight began.
    pub deps: Deps,
    /// It may be cached (Chat's success for it; stored unless overtaken).
    pub cached: bool,
    /// It came from the fleet's L2, not from Chat.
    pub from_l2: bool,
}

/// What one flight (one call to Chat for some items) produced.
#[derive(Debug)]
pub enum Outcome {
    /// A success, split: the items in the flight's order, and the members around
    /// them (for batched reads).
    Items {
        /// When the flight began.
        epoch: FetchEpoch,
        /// The answer's top-level members.
        template: Option<Template>,
        /// One per item the flight fetched.
        items: Vec<FetchedItem>,
    },
    /// Chat's answer was not a success: given to the caller as is.
    Answer {
        /// Chat's HTTP status.
        status: StatusCode,
        /// Chat's answer.
        body: Bytes,
        /// Its `ErrorCode`.
        code: Option<i64>,
        /// Chat failed in a way that makes stale entries preferable.
        upstream_failed: bool,
    },
    /// The call failed.
    Error(GatewayError),
    /// A success the table cannot split: Chat's answer, given as is to a caller
    /// whose whole request this call was; every other caller forwards its own.
    Unsplittable(Bytes),
    /// A call for some of the flight's items (the others came from L2) could not be
    /// split: every caller forwards its own request.
    Forward,
}

/// A flight's shared result.
pub type Flight = Arc<Outcome>;

/// A full hit, ready for the HTTP/1.1 front end to write: the template's pieces
/// around the entries [`fast_hit`] put, in request order, in the caller's vector.
pub struct FastHit {
    /// `None` for a single read (its one entry is the whole answer).
    template: Option<arc_swap::Guard<Arc<Template>>>,
    /// Seconds since the oldest item was stored.
    pub age: u64,
    /// Bytes of the answer.
    pub len: usize,
}

/// Most pieces a [`FastHit`] is written in: the prefix, the items, the closing.
pub const FAST_PIECES: usize = item_fast::MAX_ITEMS + 2;

impl FastHit {
    /// The answer's pieces, in order, into `out` (room for [`FAST_PIECES`]); returns
    /// how many. `entries` are those [`fast_hit`] found. Written one after the other
    /// they are what [`handle`] answers for the same request.
    pub fn pieces<'s>(
        &'s self,
        entries: &'s [Arc<ItemEntry>],
        out: &mut [std::io::IoSlice<'s>],
    ) -> usize {
        if out.len() < entries.len() + 2 {
            return 0;
        }
        let Some(t) = &self.template else {
            return match entries.first() {
                Some(e) => {
                    out[0] = std::io::IoSlice::new(&e.body);
                    1
                }
                None => 0,
            };
        };
        out[0] = std::io::IoSlice::new(t.prefix.as_bytes());
        let mut k = 1;
        for (i, e) in entries.iter().enumerate() {
            out[k] = std::io::IoSlice::new(if i == 0 { &e.body } else { e.with_comma() });
            k += 1;
        }
        out[k] = std::io::IoSlice::new(t.closing.as_bytes());
        k + 1
    }
}

/// A full hit of `body` as a request of row `row`, by the shortest path: the fast
/// scanner, one lookup per item (the entries, in request order, into `entries`, a
/// vector the caller keeps from one request to the next), counted as [`handle`]
/// counts a hit. `None` when it is anything else (the caller then routes the
/// request to [`handle`]): a body the fast scanner leaves to the general parser, an
/// item named twice, an item not fresh, caching disabled.
pub fn fast_hit(
    state: &AppState,
    row: usize,
    body: &[u8],
    now: Instant,
    req: &mut FastRequest,
    entries: &mut Vec<Arc<ItemEntry>>,
) -> Option<FastHit> {
    entries.clear();
    let r = READS.get(row)?;
    if r.store != Store::Items || !state.live.load().commands[row].enabled {
        return None;
    }
    if !item_fast::scan(r, body, req) {
        return None;
    }
    let vid = state.items.variant_id_of(row, req.variant());
    // Items named twice are Chat's to answer: a bit per hash, and an exact check
    // when two bits meet.
    let mut seen = [0u64; 16];
    let mut len = 0usize;
    let mut oldest = now;
    for i in 0..req.len() {
        let item = req.item(body, i);
        let h = state.items.item_hash(row, vid, item)?;
        let bit = (h & 1023) as usize;
        let (word, mask) = (bit >> 6, 1u64 << (bit & 63));
        if seen[word] & mask != 0 && req.items(body).take(i).any(|o| o == item) {
            return None;
        }
        seen[word] |= mask;
        let ItemLookup::Fresh(e) = state.items.lookup_item(row, vid, item, h, now) else {
            return None;
        };
        len += e.body.len();
        oldest = oldest.min(e.stored_at);
        entries.push(e);
    }
    let items = req.len();
    let mut hit = FastHit {
        template: None,
        age: now.saturating_duration_since(oldest).as_secs(),
        len,
    };
    if let AnswerShape::Items { .. } = r.answer {
        let t = state.templates.guard(row);
        hit.len = t.prefix.len() + len + items.saturating_sub(1) + t.closing.len();
        hit.template = Some(t);
    }
    let c = &state.read_counters[row];
    c.hit.increment(1);
    c.from_memory.increment(items as u64);
    c.saved.increment(1);
    c.request_ok.increment(1);
    Some(hit)
}

/// Handles one request of the cached read `command` (row `row`).
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Bytes>,
    command: &str,
    row: usize,
    request_id: &HeaderValue,
) -> Response<Body> {
    let cfg = state.live.load().commands[row];
    if !cfg.enabled {
        return passthrough::handle(state, req, command).await;
    }
    let (parts, body) = req.into_parts();
    let c = &state.read_counters[row];
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        // Sent as `{}`, like any command: Chat's to answer.
        return forward(&state, command, body.clone()).await;
    }
    let parsed = match item_key::parse(row, &body) {
        Ok(Parsed::Split(p)) => p,
        Ok(Parsed::Bypass(why)) => {
            tracing::debug!(command, reason = why, "forwarded uncached");
            return forward(&state, command, body.clone()).await;
        }
        Err(e) => {
            tracing::debug!(command, error = %e, "request refused");
            c.bypass.increment(1);
            let mut resp = e.respond();
            resp.headers_mut().insert(X_CACHE, BYPASS);
            return resp;
        }
    };
    let no_cache = get_list::wants_no_cache(&parts.headers);
    let now = Instant::now();
    let n = parsed.items.len();
    let vid = state.items.variant_id(row, &parsed.variant);
    let mut keys = Vec::with_capacity(n);
    for item in &parsed.items {
        match KeyBuf::new(row, vid, item) {
            Some(k) => keys.push(k),
            None => return forward(&state, command, body.clone()).await,
        }
    }
    let mut hits: Vec<Option<Arc<ItemEntry>>> = Vec::with_capacity(n);
    let mut stale: Vec<Option<Arc<ItemEntry>>> = Vec::with_capacity(n);
    let mut missing: Vec<usize> = Vec::new();
    let lookup_span = crate::trace::cache_lookup();
    for (i, key) in keys.iter().enumerate() {
        let found = if no_cache {
            ItemLookup::Miss
        } else {
            state.items.lookup(key, now)
        };
        match found {
            ItemLookup::Fresh(e) => {
                hits.push(Some(e));
                stale.push(None);
            }
            ItemLookup::Stale(e) => {
                hits.push(None);
                stale.push(Some(e));
                missing.push(i);
            }
            ItemLookup::Miss => {
                hits.push(None);
                stale.push(None);
                missing.push(i);
            }
        }
    }
    if let Some(s) = lookup_span {
        let result = match missing.len() {
            0 => "hit",
            m if m < n => "partial",
            _ => "miss",
        };
        let result = opentelemetry::KeyValue::new("chat_gateway.cache.result", result);
        s.end(vec![result], false);
    }
    if missing.is_empty() {
        c.hit.increment(1);
        c.from_memory.increment(n as u64);
        c.saved.increment(1);
        let r = parsed.row();
        let answer = match r.answer {
            AnswerShape::Whole => hits[0].as_ref().map(|e| e.body.clone()).unwrap_or_default(),
            AnswerShape::Items { .. } => state
                .templates
                .get(row)
                .write(r, hits.iter().flatten().map(|e| (&e.body[..], None))),
        };
        return answer_with(answer, HIT, oldest(hits.iter().flatten(), now));
    }
    let span = tracing::info_span!(
        "item_miss",
        request_id = request_id.to_str().unwrap_or(""),
        command,
        items = n,
        missing = missing.len(),
        trace_id = tracing::field::Empty,
    );
    if let Some(t) = parts.extensions.get::<crate::trace::LogTraceId>() {
        span.record("trace_id", tracing::field::display(t));
    }
    miss(
        state,
        &parsed,
        keys,
        hits,
        stale,
        missing,
        no_cache,
        body.clone(),
    )
    .instrument(span)
    .await
}

/// The miss path: flights for the missing items, then PARTIAL, MISS, STALE or the
/// failure.
#[allow(clippy::too_many_arguments)]
async fn miss(
    state: Arc<AppState>,
    parsed: &ItemRequest<'_>,
    keys: Vec<KeyBuf>,
    hits: Vec<Option<Arc<ItemEntry>>>,
    stale: Vec<Option<Arc<ItemEntry>>>,
    missing: Vec<usize>,
    no_cache: bool,
    original: Bytes,
) -> Response<Body> {
    let row = parsed.row;
    let r = parsed.row();
    let c = &state.read_counters[row];
    let flight_keys: Vec<ItemKey> = missing.iter().map(|i| keys[*i].to_key()).collect();
    let names: Vec<Arc<str>> = missing
        .iter()
        .map(|i| Arc::from(parsed.items[*i].as_ref()))
        .collect();
    let variant: Arc<str> = Arc::from(parsed.variant.as_str());
    let scope: Option<Arc<str>> = parsed.scope.as_deref().map(Arc::from);
    // What our own flight spends on Chat; stays empty if every item was in flight.
    let stats = Arc::new(CallStats::default());
    let seats = state.flights.board(
        &flight_keys,
        |positions| {
            let items: Vec<Arc<str>> = positions.iter().map(|p| names[*p].clone()).collect();
            let keys: Vec<ItemKey> = positions.iter().map(|p| flight_keys[*p].clone()).collect();
            // Taken before the flight is visible to others: what it answers is checked
            // against invalidations since then.
            let epoch = state.items.begin_fetch();
            // Its own task, carrying this request's span (and id) and its trace (its
            // calls to Chat and Redis are the request's children).
            crate::trace::carry(
                fetch(
                    state.clone(),
                    row,
                    variant.clone(),
                    scope.clone(),
                    items,
                    keys,
                    stats.clone(),
                    epoch,
                    no_cache,
                )
                .instrument(tracing::Span::current()),
            )
        },
        || {
            Arc::new(Outcome::Error(GatewayError::Internal(
                "item fetch task panicked".into(),
            )))
        },
    );
    let mut outcomes: Vec<(Flight, usize)> = Vec::with_capacity(seats.len());
    let (mut led, mut joined) = (false, false);
    for seat in seats {
        led |= seat.role == Role::Leader;
        joined |= seat.role == Role::Follower;
        outcomes.push((seat.flight.await, seat.index));
    }
    if joined {
        // Some (or all) items came from another request's flight.
        c.coalesced.increment(1);
        // A flight that began before an invalidation this request may have followed
        // (a write acknowledged before it arrived) must not answer for it: those
        // items are fetched again, by a call of our own. Nor may an entry from L2
        // answer a request that asked for none (`no-cache`).
        let redo: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, (o, i))| match &**o {
                Outcome::Items { epoch, items, .. } => items.get(*i).is_some_and(|f| {
                    !state.items.unchanged_since(&f.deps, *epoch) || (no_cache && f.from_l2)
                }),
                _ => false,
            })
            .map(|(pos, _)| pos)
            .collect();
        if !redo.is_empty() {
            let items: Vec<Arc<str>> = redo.iter().map(|p| names[*p].clone()).collect();
            let keys: Vec<ItemKey> = redo.iter().map(|p| flight_keys[*p].clone()).collect();
            let epoch = state.items.begin_fetch();
            let again = fetch(
                state.clone(),
                row,
                variant.clone(),
                scope.clone(),
                items,
                keys,
                stats.clone(),
                epoch,
                true,
            )
            .await;
            for (j, pos) in redo.into_iter().enumerate() {
                outcomes[pos] = (again.clone(), j);
            }
            led = true;
        }
    }
    let mut info = AccessInfo {
        code: Some(0),
        attempts: stats.attempts(),
        upstream: stats.upstream_time(),
    };
    let command = r.command;
    if let Some(answer) = outcomes.iter().find_map(|(o, _)| match &**o {
        Outcome::Unsplittable(answer) => Some(Some(answer.clone())),
        Outcome::Forward => Some(None),
        _ => None,
    }) {
        // Our own call named every item of the request with its other fields: its
        // answer is Chat's answer to the request.
        if let (Some(answer), true) = (answer, led && !joined && hits.iter().all(Option::is_none)) {
            tracing::debug!(command, "Chat's answer could not be split; given as is");
            c.bypass.increment(1);
            let mut resp = response::json(StatusCode::OK, answer);
            resp.headers_mut().insert(X_CACHE, BYPASS);
            info.attach(&mut resp);
            return resp;
        }
        tracing::warn!(
            command,
            "Chat's answer could not be split; forwarding the whole request"
        );
        let mut resp = forward(&state, command, original).await;
        if let Some(a) = resp.extensions().get::<AccessInfo>() {
            info.attempts += a.attempts;
            info.upstream += a.upstream;
            info.code = a.code;
        }
        info.attach(&mut resp);
        return resp;
    }
    let now = Instant::now();
    let failure = outcomes
        .iter()
        .map(|(o, _)| o)
        .find(|o| matches!(***o, Outcome::Answer { .. } | Outcome::Error(_)))
        .cloned();
    let mut use_stale = false;
    let mut stale = stale;
    if let Some(f) = &failure {
        // Entries L2 had past their TTL (within their stale window) were put in
        // memory by the flight: they may stand in too.
        for i in &missing {
            if stale[*i].is_none() {
                if let ItemLookup::Stale(e) | ItemLookup::Fresh(e) =
                    state.items.lookup(&keys[*i], now)
                {
                    stale[*i] = Some(e);
                }
            }
        }
        let may_serve_stale = outcomes.iter().zip(&missing).all(|((o, _), i)| match &**o {
            Outcome::Items { .. } => true,
            Outcome::Answer {
                upstream_failed, ..
            } => *upstream_failed && stale[*i].is_some(),
            Outcome::Error(_) => stale[*i].is_some(),
            Outcome::Unsplittable(_) | Outcome::Forward => false,
        });
        if !may_serve_stale {
            c.bypass.increment(1);
            let mut resp = match &**f {
                Outcome::Answer {
                    status, body, code, ..
                } => {
                    info.code = *code;
                    response::json(*status, body.clone())
                }
                Outcome::Error(e) => {
                    info.code = Some(e.code());
                    e.respond()
                }
                _ => GatewayError::Internal("no failure".into()).respond(),
            };
            resp.headers_mut().insert(X_CACHE, BYPASS);
            info.attach(&mut resp);
            return resp;
        }
        tracing::warn!(command, "Chat failing; serving stale items");
        use_stale = true;
    }
    // Assemble, in request order.
    let mut parts: Vec<(Bytes, Option<&str>)> = Vec::with_capacity(parsed.items.len());
    let mut template: Option<&Template> = None;
    let (mut from_memory, mut from_chat, mut from_l2) = (0u64, 0u64, 0u64);
    let mut next_missing = missing.iter().zip(&outcomes).peekable();
    for (i, item) in parsed.items.iter().enumerate() {
        if let Some(e) = &hits[i] {
            parts.push((e.body.clone(), None));
            from_memory += 1;
            continue;
        }
        let Some((_, (o, index))) = next_missing.next() else {
            break;
        };
        match &**o {
            Outcome::Items {
                template: t, items, ..
            } => {
                let Some(f) = items.get(*index) else {
                    return forward(&state, command, original).await;
                };
                if template.is_none() {
                    template = t.as_ref();
                }
                parts.push((f.body.clone(), f.failed.then_some(item.as_ref())));
                if f.from_l2 {
                    from_l2 += 1;
                } else {
                    from_chat += 1;
                }
            }
            _ => match &stale[i] {
                Some(e) => {
                    parts.push((e.body.clone(), None));
                    from_memory += 1;
                }
                None => return forward(&state, command, original).await,
            },
        }
    }
    let age = oldest(
        hits.iter().flatten().chain(if use_stale {
            stale.iter().flatten().collect::<Vec<_>>()
        } else {
            Vec::new()
        }),
        now,
    );
    let answer = match r.answer {
        AnswerShape::Whole => parts.first().map(|(b, _)| b.clone()).unwrap_or_default(),
        AnswerShape::Items { .. } => {
            let learned;
            let t = match template {
                Some(t) => t,
                None => {
                    learned = state.templates.get(row);
                    &learned
                }
            };
            t.write(r, parts.iter().map(|(b, f)| (&b[..], *f)))
        }
    };
    c.from_memory.increment(from_memory);
    c.from_chat.increment(from_chat);
    c.from_l2.increment(from_l2);
    if !led || (from_chat == 0 && !use_stale) {
        c.saved.increment(1);
    }
    let x = if use_stale {
        c.stale.increment(1);
        STALE
    } else if no_cache {
        c.bypass.increment(1);
        BYPASS
    } else if from_memory > 0 {
        c.partial.increment(1);
        PARTIAL
    } else {
        c.miss.increment(1);
        MISS
    };
    let age = if from_memory > 0 { age } else { None };
    let mut resp = answer_with(answer, x, age);
    if from_l2 > 0 && from_chat == 0 && !use_stale {
        resp.headers_mut().insert(X_CACHE_L2, HIT);
    }
    info.attach(&mut resp);
    resp
}

/// The entities an item entry of a batched read (or a single read without listed
/// dependencies) depends on.
fn item_deps(state: &AppState, r: &ReadRow, item: &str, scope: Option<&str>) -> Deps {
    state.items.deps(
        r.item_deps
            .iter()
            .map(|k| (*k, item))
            .chain(r.scope.iter().filter_map(|(_, k)| scope.map(|s| (*k, s)))),
    )
}

/// Runs in its own task: the flight for `items`. In a fleet with L2, the fleet's
/// entries first ([`fetch_fleet`]); then one call to Chat for the items still
/// missing ([`fetch_chat`]).
#[allow(clippy::too_many_arguments)]
async fn fetch(
    state: Arc<AppState>,
    row: usize,
    variant: Arc<str>,
    scope: Option<Arc<str>>,
    items: Vec<Arc<str>>,
    keys: Vec<ItemKey>,
    stats: Arc<CallStats>,
    epoch: FetchEpoch,
    no_cache: bool,
) -> Flight {
    let r = &READS[row];
    let fleet = state.fleet.clone().filter(|_| l2_items::in_l2(r));
    let l2 = fleet.as_ref().and_then(|f| f.item_l2().cloned());
    let outcome = match (fleet, l2) {
        (Some(fleet), Some(l2)) => {
            // All of the flight's Redis work shares one budget of redis.timeout_ms.
            let f = Fleetwide {
                fleet: &fleet,
                l2: &l2,
                no_cache,
            };
            conn::with_budget(
                fleet.redis().timeout(),
                f.fetch(
                    &state,
                    row,
                    &variant,
                    scope.as_deref(),
                    &items,
                    &keys,
                    &stats,
                    epoch,
                ),
            )
            .await
        }
        _ => {
            fetch_chat(
                &state,
                row,
                &variant,
                scope.as_deref(),
                &items,
                &keys,
                &stats,
                epoch,
            )
            .await
        }
    };
    Arc::new(outcome)
}

/// A flight's use of the fleet's L2.
struct Fleetwide<'f> {
    fleet: &'f Arc<crate::fleet::Fleet>,
    l2: &'f Arc<ItemL2>,
    /// The request asked for no cached answer: L2 is not read (but what Chat answers
    /// is stored).
    no_cache: bool,
}

/// How one item of a flight is stored in L2 after Chat answers it: the generations
/// and carried generation its fetch began with, and our lock's token.
type L2Plan = (String, String, Option<String>);

impl Fleetwide<'_> {
    /// The items L2 has fresh (put in memory), then one call to Chat for the others,
    /// stored in memory and in L2.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        state: &Arc<AppState>,
        row: usize,
        variant: &str,
        scope: Option<&str>,
        items: &[Arc<str>],
        keys: &[ItemKey],
        stats: &CallStats,
        epoch: FetchEpoch,
    ) -> Outcome {
        let r = &READS[row];
        let n = items.len();
        let q = self.l2.query(r, variant, scope, items);
        // Not read from L2 (nor stored in it): items whose entities this gateway
        // invalidated and Redis does not have yet.
        let scope_pending =
            matches!((r.scope, scope), (Some((_, k)), Some(s)) if self.fleet.pending(k, s));
        let which: Vec<usize> = (0..n)
            .filter(|i| {
                !scope_pending
                    && !r
                        .item_deps
                        .iter()
                        .any(|k| self.fleet.pending(*k, &items[*i]))
            })
            .collect();
        let found = match (which.is_empty(), self.no_cache) {
            (true, _) => None,
            (false, false) => self.l2.plan(&q, &which).await,
            (false, true) => self.l2.lookup(&q, &which, false).await.ok(),
        };
        let mut plans: Vec<Option<L2Plan>> = vec![None; n];
        let mut out: Vec<Option<FetchedItem>> = vec![None; n];
        let mut to_fetch: Vec<usize> = Vec::with_capacity(n);
        let mut by_item: Vec<Option<Found>> = vec![None; n];
        for (i, f) in which.iter().zip(found.into_iter().flatten()) {
            by_item[*i] = Some(f);
        }
        for (i, f) in by_item.into_iter().enumerate() {
            match f {
                Some(Found::Fresh { item, now_ms, .. }) if !self.no_cache => {
                    let deps = item_deps(state, r, &items[i], scope);
                    let (stored_at, fresh_until, stale_until) = item.instants(now_ms);
                    let entry = state.items.entry_at(
                        &item.body,
                        epoch,
                        deps.clone(),
                        stored_at,
                        fresh_until,
                        stale_until,
                    );
                    let body = entry.body.clone();
                    state.items.insert(keys[i].clone(), Arc::new(entry));
                    out[i] = Some(FetchedItem {
                        body,
                        failed: false,
                        deps,
                        cached: true,
                        from_l2: true,
                    });
                }
                Some(Found::Fresh { gens, carried, .. }) => {
                    plans[i] = Some((gens, carried, None));
                    to_fetch.push(i);
                }
                Some(Found::Fetch {
                    gens,
                    carried,
                    token,
                    stale,
                }) => {
                    if let Some((e, now_ms)) = stale {
                        // For when Chat fails: stale-if-error from L2 too.
                        self.keep_stale(state, r, &items[i], scope, &keys[i], epoch, &e, now_ms);
                    }
                    plans[i] = Some((gens, carried, token));
                    to_fetch.push(i);
                }
                Some(Found::Theirs { gens, carried }) => {
                    plans[i] = Some((gens, carried, None));
                    to_fetch.push(i);
                }
                None => to_fetch.push(i),
            }
        }
        if to_fetch.is_empty() {
            return Outcome::Items {
                epoch,
                template: None,
                items: out.into_iter().flatten().collect(),
            };
        }
        let sub_items: Vec<Arc<str>> = to_fetch.iter().map(|i| items[*i].clone()).collect();
        let sub_keys: Vec<ItemKey> = to_fetch.iter().map(|i| keys[*i].clone()).collect();
        let outcome = fetch_chat(
            state, row, variant, scope, &sub_items, &sub_keys, stats, epoch,
        )
        .await;
        let Outcome::Items {
            template,
            items: fetched,
            ..
        } = outcome
        else {
            let held = to_fetch
                .iter()
                .filter_map(|i| plans[*i].as_ref()?.2.clone().map(|t| (*i, t)))
                .collect();
            self.l2.unlock_later(&q, held);
            return match outcome {
                // Chat's answer to a part of the flight's items is no answer to the
                // request: each caller forwards its own.
                Outcome::Unsplittable(_) if to_fetch.len() < n => Outcome::Forward,
                other => other,
            };
        };
        let mut entries = Vec::new();
        let mut held = Vec::new();
        for (f, i) in fetched.into_iter().zip(&to_fetch) {
            if let Some((gens, carried, token)) = plans[*i].take() {
                if f.cached && state.items.unchanged_since(&f.deps, epoch) {
                    entries.push((*i, f.body.clone(), gens, carried, token));
                } else if let Some(t) = token {
                    held.push((*i, t));
                }
            }
            out[*i] = Some(f);
        }
        self.l2.unlock_later(&q, held);
        if !entries.is_empty() {
            // Stored by a task of its own, so that a slow Redis delays the answer by
            // no more than what is left of the request's budget.
            let cfg = state.live.load().commands[row];
            let l2 = self.l2.clone();
            let store = tokio::spawn(async move {
                if let Err(e) = l2.store(&q, &entries, cfg.ttl, cfg.stale_if_error).await {
                    tracing::debug!(error = %e, "items not stored in L2");
                }
            });
            let _ = conn::within_budget(store).await;
        }
        Outcome::Items {
            epoch,
            template,
            items: out.into_iter().flatten().collect(),
        }
    }

    /// Puts an entry L2 has past its TTL (within its stale window) in memory, unless
    /// memory has one, so that it may stand in if Chat fails.
    #[allow(clippy::too_many_arguments)]
    fn keep_stale(
        &self,
        state: &AppState,
        r: &ReadRow,
        item: &str,
        scope: Option<&str>,
        key: &ItemKey,
        epoch: FetchEpoch,
        e: &l2_items::L2Item,
        now_ms: u64,
    ) {
        let Some(k) = KeyBuf::from_key(key) else {
            return;
        };
        if !matches!(state.items.lookup(&k, Instant::now()), ItemLookup::Miss) {
            return;
        }
        let (stored_at, fresh_until, stale_until) = e.instants(now_ms);
        let entry = state.items.entry_at(
            &e.body,
            epoch,
            item_deps(state, r, item, scope),
            stored_at,
            fresh_until,
            stale_until,
        );
        state.items.insert(key.clone(), Arc::new(entry));
    }
}

/// One call to Chat for `items`, the answer split, the successes stored in memory
/// (unless an invalidation since `epoch` overtook them).
#[allow(clippy::too_many_arguments)]
async fn fetch_chat(
    state: &Arc<AppState>,
    row: usize,
    variant: &str,
    scope: Option<&str>,
    items: &[Arc<str>],
    keys: &[ItemKey],
    stats: &CallStats,
    epoch: FetchEpoch,
) -> Outcome {
    let r = &READS[row];
    let body = item_key::upstream_body(r, items.iter().map(|s| &**s), variant);
    let class = state.command_class(r.command);
    let resp = match state.upstream.call(r.command, class, body, stats).await {
        Ok(resp) => resp,
        Err(e) => return Outcome::Error(e),
    };
    let success = resp.status == StatusCode::OK && resp.chat.is_some_and(|s| s.is_success());
    if !success {
        let class = resp.chat.map(|s| CodeClass::of(s.code));
        return Outcome::Answer {
            status: resp.status,
            code: resp.chat.map(|s| s.code),
            upstream_failed: resp.status.is_server_error()
                || matches!(class, Some(CodeClass::Transient | CodeClass::Throttled)),
            body: resp.body,
        };
    }
    // The settings in force when the answer is stored (a reload may have come).
    let cfg = state.live.load().commands[row];
    let store = |body: &[u8], key: &ItemKey, deps: &Deps| -> Bytes {
        let entry = state
            .items
            .entry(body, epoch, deps.clone(), cfg.ttl, cfg.stale_if_error);
        let copy = entry.body.clone();
        state.items.insert(key.clone(), Arc::new(entry));
        copy
    };
    let outcome = match r.answer {
        AnswerShape::Whole => {
            let item = &*items[0];
            let mut named: Vec<(EntityKind, &str)> =
                r.item_deps.iter().map(|k| (*k, item)).collect();
            let listed = r
                .listed_deps
                .map(|l| assemble::listed(&resp.body, l.array, l.id));
            if let (Some(Some(ids)), Some(l)) = (&listed, r.listed_deps) {
                for id in ids {
                    for k in l.kinds {
                        named.push((*k, id));
                    }
                }
            }
            let deps = state.items.deps(named);
            let cacheable = match &listed {
                None => true,
                Some(Some(ids)) => ids.len() <= MAX_LISTED_DEPS,
                Some(None) => false,
            };
            let body = if cacheable {
                store(&resp.body, &keys[0], &deps)
            } else {
                Bytes::copy_from_slice(&resp.body)
            };
            Outcome::Items {
                epoch,
                template: None,
                items: vec![FetchedItem {
                    body,
                    failed: false,
                    deps,
                    cached: cacheable,
                    from_l2: false,
                }],
            }
        }
        AnswerShape::Items { .. } => match split_for(r, &resp.body, items) {
            None => Outcome::Unsplittable(resp.body.clone()),
            Some((split, order)) => {
                let mut fetched = Vec::with_capacity(items.len());
                for (name, (key, at)) in items.iter().zip(keys.iter().zip(order)) {
                    let a = &split.items[at];
                    let deps = item_deps(state, r, name, scope);
                    let body = if a.cacheable {
                        store(a.raw.as_bytes(), key, &deps)
                    } else {
                        Bytes::copy_from_slice(a.raw.as_bytes())
                    };
                    fetched.push(FetchedItem {
                        body,
                        failed: a.failed,
                        deps,
                        cached: a.cacheable,
                        from_l2: false,
                    });
                }
                if split.items.iter().all(|i| !i.failed) {
                    state.templates.learn(row, &split.template);
                }
                Outcome::Items {
                    epoch,
                    template: Some(split.template),
                    items: fetched,
                }
            }
        },
    };
    outcome
}

/// Splits an answer and finds each of `items` in it: the split and, per item, the
/// index of its answer item. `None` unless the answer has exactly one item per
/// requested item.
fn split_for<'a>(
    r: &ReadRow,
    body: &'a [u8],
    items: &[Arc<str>],
) -> Option<(assemble::Split<'a>, Vec<usize>)> {
    let split = assemble::split(r, body)?;
    if split.items.len() != items.len() {
        return None;
    }
    let mut order = Vec::with_capacity(items.len());
    for name in items {
        order.push(split.items.iter().position(|a| a.id == **name)?);
    }
    Some((split, order))
}

/// Forwards the caller's request unchanged (`x-cache: BYPASS`).
async fn forward(state: &Arc<AppState>, command: &str, body: Bytes) -> Response<Body> {
    if let Some((row, _)) = crate::chat::reads::item_row(command) {
        state.read_counters[row].bypass.increment(1);
    }
    let mut resp = passthrough::forward(state, command, body).await;
    resp.headers_mut().insert(X_CACHE, BYPASS);
    resp
}

/// Seconds since the oldest of `entries` was stored.
fn oldest<'a>(entries: impl IntoIterator<Item = &'a Arc<ItemEntry>>, now: Instant) -> Option<u64> {
    entries
        .into_iter()
        .map(|e| now.saturating_duration_since(e.stored_at).as_secs())
        .max()
}

fn answer_with(body: Bytes, x_cache: HeaderValue, age: Option<u64>) -> Response<Body> {
    let mut resp = response::json(StatusCode::OK, body);
    let h = resp.headers_mut();
    h.insert(X_CACHE, x_cache);
    if let Some(age) = age {
        h.insert(http::header::AGE, age_value(age));
    }
    resp
}
