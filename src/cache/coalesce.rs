//! Request coalescing: concurrent misses for the same key make one upstream fetch.
//!
//! The first caller spawns the fetch as its own task and registers a shared handle to
//! its result; later callers await the same handle. Because the fetch is a task, a
//! caller that disconnects (its future dropped) cancels nothing for the others. The
//! task removes its key when it finishes, after the result has been cached, so a
//! request arriving later finds the page in the cache instead.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

type SharedResult<V> = Shared<BoxFuture<'static, V>>;

/// In-flight fetches by key.
pub struct Inflight<K, V: Clone> {
    /// key → the shared result of its fetch. Locked briefly on misses only.
    map: Arc<Mutex<HashMap<K, SharedResult<V>>>>,
}

impl<K, V: Clone> Default for Inflight<K, V> {
    fn default() -> Self {
        Inflight {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Whether this caller started the fetch or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started the fetch.
    Leader,
    /// Waited for another caller's fetch.
    Follower,
}

impl<K, V> Inflight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the fetch of `key`, or starts it with `fetch` (spawned as a task).
    /// `on_panic` makes the value every waiter gets if the task panics.
    pub async fn run<F, Fut>(&self, key: K, fetch: F, on_panic: fn() -> V) -> (V, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (shared, role) = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&key) {
                Some(s) => (s.clone(), Role::Follower),
                None => {
                    let fut = fetch();
                    let task_map = self.map.clone();
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let v = fut.await;
                        task_map
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&task_key);
                        v
                    });
                    let panic_map = self.map.clone();
                    let panic_key = key.clone();
                    let shared = async move {
                        match task.await {
                            Ok(v) => v,
                            Err(_) => {
                                // The task panicked before removing its key.
                                panic_map
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&panic_key);
                                on_panic()
                            }
                        }
                    }
                    .boxed()
                    .shared();
                    // Registered under the same lock that found no entry, so exactly
                    // one caller per key starts a fetch.
                    map.insert(key, shared.clone());
                    (shared, Role::Leader)
                }
            }
        };
        (shared.await, role)
    }
}
