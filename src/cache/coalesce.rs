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

/// Where one key of a [`Flights::board`] is answered: a flight (shared by every
/// key it fetches) and the key's position in that flight's list.
pub struct Seat<V: Clone> {
    /// The flight's shared result.
    pub flight: SharedResult<V>,
    /// The key's position among the keys the flight fetches.
    pub index: usize,
    /// Whether this caller started the flight.
    pub role: Role,
}

/// A key's flight: its id, its shared result, the key's position in it.
type Boarded<V> = (u64, SharedResult<V>, usize);

/// In-flight fetches of many keys at once: each key is fetched by at most one
/// flight at a time, and a flight fetches many keys in one upstream call (the
/// missing items of a batched read).
pub struct Flights<K, V: Clone> {
    /// key → (flight id, its shared result, the key's position in it).
    map: Arc<Mutex<HashMap<K, Boarded<V>>>>,
    next: std::sync::atomic::AtomicU64,
}

impl<K, V: Clone> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// For each of `keys` (distinct): a seat on the flight already fetching it, or on
    /// one new flight that fetches all the others with `fetch(positions)` (spawned as
    /// a task; `positions` are indexes into `keys`, in order, and the result's items
    /// follow that order). `on_panic` makes the value every waiter gets if the task
    /// panics.
    pub fn board<F, Fut>(&self, keys: &[K], fetch: F, on_panic: fn() -> V) -> Vec<Seat<V>>
    where
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut seats: Vec<Option<Seat<V>>> = Vec::with_capacity(keys.len());
        let mut mine = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match map.get(k) {
                Some((_, shared, index)) => seats.push(Some(Seat {
                    flight: shared.clone(),
                    index: *index,
                    role: Role::Follower,
                })),
                None => {
                    seats.push(None);
                    mine.push(i);
                }
            }
        }
        if !mine.is_empty() {
            let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let led: Vec<K> = mine.iter().map(|i| keys[*i].clone()).collect();
            let fut = fetch(mine.clone());
            let remove = {
                let map = self.map.clone();
                let led = led.clone();
                move || {
                    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
                    for k in &led {
                        if m.get(k).is_some_and(|(fid, _, _)| *fid == id) {
                            m.remove(k);
                        }
                    }
                }
            };
            let on_done = remove.clone();
            let task = tokio::spawn(async move {
                let v = fut.await;
                on_done();
                v
            });
            let shared = async move {
                match task.await {
                    Ok(v) => v,
                    Err(_) => {
                        // The task panicked before removing its keys.
                        remove();
                        on_panic()
                    }
                }
            }
            .boxed()
            .shared();
            // Registered under the same lock that found none of these keys, so each
            // key has at most one flight.
            for (index, (i, k)) in mine.iter().zip(led).enumerate() {
                map.insert(k, (id, shared.clone(), index));
                seats[*i] = Some(Seat {
                    flight: shared.clone(),
                    index,
                    role: Role::Leader,
                });
            }
        }
        seats.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_key_in_flight_is_fetched_once() {
        let flights: Flights<&'static str, Arc<Vec<String>>> = Flights::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let c = calls.clone();
        let keys = ["a", "b"];
        let first = flights.board(
            &keys,
            move |pos| async move {
                c.fetch_add(1, Ordering::SeqCst);
                let _ = rx.await;
                Arc::new(pos.iter().map(|i| format!("v{i}")).collect())
            },
            || Arc::new(Vec::new()),
        );
        assert!(first.iter().all(|s| s.role == Role::Leader));
        let c = calls.clone();
        let second = flights.board(
            &["b", "c"],
            move |pos| async move {
                c.fetch_add(1, Ordering::SeqCst);
                assert_eq!(pos, vec![1], "only c is fetched again");
                Arc::new(vec!["c!".to_string()])
            },
            || Arc::new(Vec::new()),
        );
        assert_eq!(second[0].role, Role::Follower);
        assert_eq!(second[0].index, 1);
        assert_eq!(second[1].role, Role::Leader);
        tx.send(()).unwrap();
        let b = second[0].flight.clone().await;
        assert_eq!(b[second[0].index], "v1");
        let c = second[1].flight.clone().await;
        assert_eq!(c[second[1].index], "c!");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Done flights leave the map.
        let _ = first[0].flight.clone().await;
        assert!(flights.map.lock().unwrap().is_empty());
    }
}
