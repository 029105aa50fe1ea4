//! `GET /metrics` in Prometheus text format.

use http::{HeaderValue, Response, StatusCode};

use crate::metrics::names;
use crate::server::response::{self, Body};
use crate::server::AppState;

/// Renders every metric; the cache and process gauges are read at scrape time.
pub fn render(state: &AppState) -> Response<Body> {
    let stats = state.store.stats();
    metrics::gauge!(names::CACHE_ENTRIES).set(stats.accounts as f64);
    metrics::gauge!(names::CACHE_PAGES).set(stats.pages as f64);
    let items = state.items.stats();
    let item_bytes = items.weighted_bytes + items.table_bytes;
    metrics::gauge!(names::CACHE_BYTES).set((stats.weighted_bytes + item_bytes) as f64);
    metrics::gauge!(names::CACHE_ITEMS).set(items.entries as f64);
    metrics::gauge!(names::CACHE_ITEM_BYTES).set(item_bytes as f64);
    crate::metrics::refresh_process();
    let mut resp = response::text(StatusCode::OK, state.metrics.render());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
