//! A bounded in-memory cache of chunks with single-flight misses.
//!
//! Every server of a fleet keeps one: the first request for a chunk fetches
//! it from the object store, requests for the same chunk that arrive while
//! it is on its way wait for that one fetch (they do not start their own),
//! and later requests are served from memory until the chunk is evicted, the
//! least recently used first, to stay within the capacity. So N restores of
//! one snapshot read each of its chunks from the store once.
//!
//! A fetch runs on its own task: a request that gives up (its client went
//! away) does not cancel the fetch the others wait for. A failed fetch is not
//! cached; the next request tries again.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use metrics::{counter, gauge};

/// Chunk bytes held now.
pub const CACHE_BYTES: &str = "faultline_server_chunk_cache_bytes";
/// Chunks held now.
pub const CACHE_CHUNKS: &str = "faultline_server_chunk_cache_chunks";
/// The capacity, in bytes.
pub const CACHE_CAPACITY_BYTES: &str = "faultline_server_chunk_cache_capacity_bytes";
/// Lookups served from memory.
pub const CACHE_HITS: &str = "faultline_server_chunk_cache_hits_total";
/// Lookups that started a fetch from the store.
pub const CACHE_MISSES: &str = "faultline_server_chunk_cache_misses_total";
/// Lookups that waited for a fetch another lookup had started (a miss that
/// cost no extra store read). Hit ratio: hits / (hits + misses + coalesced).
pub const CACHE_COALESCED: &str = "faultline_server_chunk_cache_coalesced_total";
/// Chunks dropped to make room.
pub const CACHE_EVICTIONS: &str = "faultline_server_chunk_cache_evictions_total";

/// A fetch that several lookups wait for.
type Fetch<E> = Shared<BoxFuture<'static, Result<Bytes, E>>>;

enum Slot<E: Clone> {
    /// In memory; `tick` is its place in the recency order.
    Ready { data: Bytes, tick: u64 },
    /// On its way.
    Loading(Fetch<E>),
}

struct State<K, E: Clone> {
    slots: HashMap<K, Slot<E>>,
    /// Ready chunks by last use, oldest first.
    recency: BTreeMap<u64, K>,
    tick: u64,
    bytes: u64,
}

/// Lookups and evictions so far (this cache only; the metrics are
/// process-wide).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Served from memory.
    pub hits: u64,
    /// Started a fetch.
    pub misses: u64,
    /// Waited for a fetch in flight.
    pub coalesced: u64,
    /// Chunks evicted.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Chunks held now.
    pub chunks: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
}

struct Inner<K, E: Clone> {
    capacity: u64,
    state: Mutex<State<K, E>>,
    counters: Counters,
}

/// The cache; cheap to clone (clones share it).
pub struct ChunkCache<K, E: Clone> {
    inner: Arc<Inner<K, E>>,
}

impl<K, E: Clone> Clone for ChunkCache<K, E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K, E: Clone> std::fmt::Debug for ChunkCache<K, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

impl<K, E> ChunkCache<K, E>
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A cache holding at most `capacity` bytes of chunks. With 0 nothing is
    /// kept, but concurrent lookups of one chunk still share one fetch.
    pub fn new(capacity: u64) -> Self {
        gauge!(CACHE_CAPACITY_BYTES).set(capacity as f64);
        Self {
            inner: Arc::new(Inner {
                capacity,
                state: Mutex::new(State {
                    slots: HashMap::new(),
                    recency: BTreeMap::new(),
                    tick: 0,
                    bytes: 0,
                }),
                counters: Counters::default(),
            }),
        }
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// The chunk `key`: from memory, from a fetch in flight, or from
    /// `fetch()`, run on its own task, whose result is cached if it succeeds.
    pub async fn get<F, Fut>(&self, key: K, fetch: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
    {
        let pending = {
            let mut st = self.inner.state.lock().expect("chunk cache lock poisoned");
            let st = &mut *st;
            st.tick += 1;
            let now = st.tick;
            match st.slots.get_mut(&key) {
                Some(Slot::Ready { data, tick }) => {
                    st.recency.remove(tick);
                    st.recency.insert(now, key.clone());
                    *tick = now;
                    self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                    counter!(CACHE_HITS).increment(1);
                    return Ok(data.clone());
                }
                Some(Slot::Loading(f)) => {
                    self.inner
                        .counters
                        .coalesced
                        .fetch_add(1, Ordering::Relaxed);
                    counter!(CACHE_COALESCED).increment(1);
                    f.clone()
                }
                None => {
                    self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                    counter!(CACHE_MISSES).increment(1);
                    let task = tokio::spawn({
                        let inner = self.inner.clone();
                        let key = key.clone();
                        let fut = fetch();
                        async move {
                            let result = fut.await;
                            inner.complete(key, &result);
                            result
                        }
                    });
                    let shared = async move {
                        match task.await {
                            Ok(r) => r,
                            // The fetch panicked: pass the panic on to
                            // every waiter, as a direct call would.
                            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                            Err(_) => panic!("the runtime shut down during a chunk fetch"),
                        }
                    }
                    .boxed()
                    .shared();
                    st.slots.insert(key, Slot::Loading(shared.clone()));
                    shared
                }
            }
        };
        pending.await
    }

    /// Starts fetching `key` in the background unless it is held or on its
    /// way (read-ahead; counted as a miss if it fetches, never as a hit).
    pub fn warm<F, Fut>(&self, key: K, fetch: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
    {
        let held = self
            .inner
            .state
            .lock()
            .expect("chunk cache lock poisoned")
            .slots
            .contains_key(&key);
        if !held {
            let cache = self.clone();
            tokio::spawn(async move {
                let _ = cache.get(key, fetch).await;
            });
        }
    }

    /// Lookups so far, and what is held.
    pub fn counts(&self) -> CacheCounts {
        let (bytes, chunks) = {
            let st = self.inner.state.lock().expect("chunk cache lock poisoned");
            (st.bytes, st.recency.len() as u64)
        };
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheCounts {
            hits: l(&c.hits),
            misses: l(&c.misses),
            coalesced: l(&c.coalesced),
            evictions: l(&c.evictions),
            bytes,
            chunks,
        }
    }
}

impl<K, E> Inner<K, E>
where
    K: Clone + Eq + Hash,
    E: Clone,
{
    /// Stores a finished fetch (or forgets a failed one) and evicts down to
    /// the capacity.
    fn complete(&self, key: K, result: &Result<Bytes, E>) {
        let mut st = self.state.lock().expect("chunk cache lock poisoned");
        let st = &mut *st;
        match result {
            Ok(data) if (data.len() as u64) <= self.capacity => {
                st.tick += 1;
                let tick = st.tick;
                st.bytes += data.len() as u64;
                st.recency.insert(tick, key.clone());
                st.slots.insert(
                    key,
                    Slot::Ready {
                        data: data.clone(),
                        tick,
                    },
                );
                while st.bytes > self.capacity {
                    let Some((_, old)) = st.recency.pop_first() else {
                        break;
                    };
                    if let Some(Slot::Ready { data, .. }) = st.slots.remove(&old) {
                        st.bytes -= data.len() as u64;
                        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                        counter!(CACHE_EVICTIONS).increment(1);
                    }
                }
            }
            _ => {
                st.slots.remove(&key);
            }
        }
        gauge!(CACHE_BYTES).set(st.bytes as f64);
        gauge!(CACHE_CHUNKS).set(st.recency.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    fn chunk(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    /// Concurrent lookups of one chunk share a single fetch; later lookups hit.
    #[tokio::test]
    async fn single_flight() {
        let cache: ChunkCache<u32, String> = ChunkCache::new(1 << 20);
        let fetches = Arc::new(AtomicUsize::new(0));
        let lookups = (0..16).map(|_| {
            let fetches = fetches.clone();
            cache.get(7, move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(chunk(7, 4096))
            })
        });
        for r in futures::future::join_all(lookups).await {
            assert_eq!(r.unwrap(), chunk(7, 4096));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        cache
            .get(7, || async { Err("must not fetch again".to_owned()) })
            .await
            .unwrap();
        let c = cache.counts();
        assert_eq!((c.misses, c.coalesced, c.hits), (1, 15, 1));
        assert_eq!((c.bytes, c.chunks), (4096, 1));
    }

    /// A failed fetch is given to every waiter and not cached: the next lookup fetches again.
    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache: ChunkCache<u32, String> = ChunkCache::new(1 << 20);
        let err = cache
            .get(1, || async { Err("store down".to_owned()) })
            .await;
        assert_eq!(err, Err("store down".to_owned()));
        let ok = cache.get(1, || async { Ok(chunk(1, 10)) }).await;
        assert_eq!(ok.unwrap(), chunk(1, 10));
        assert_eq!(cache.counts().misses, 2);
    }

    /// The least recently used chunks go first, and the bytes held never exceed the capacity.
    #[tokio::test]
    async fn evicts_least_recently_used() {
        let cache: ChunkCache<u32, String> = ChunkCache::new(3000);
        for k in 0..3 {
            cache
                .get(k, move || async move { Ok(chunk(k as u8, 1000)) })
                .await
                .unwrap();
        }
        // Touch 0, so 1 is the oldest.
        cache
            .get(0, || async { Err("cached".into()) })
            .await
            .unwrap();
        cache.get(3, || async { Ok(chunk(3, 1000)) }).await.unwrap();
        let c = cache.counts();
        assert_eq!((c.bytes, c.chunks, c.evictions), (3000, 3, 1));
        assert!(cache.get(0, || async { Err("gone".into()) }).await.is_ok());
        assert!(cache.get(1, || async { Err("gone".into()) }).await.is_err());
        // Larger than the whole cache: served, not kept.
        let big = cache.get(9, || async { Ok(chunk(9, 5000)) }).await.unwrap();
        assert_eq!(big.len(), 5000);
        assert!(cache.counts().bytes <= 3000);
    }

    /// A lookup that gives up does not cancel the fetch others wait for.
    #[tokio::test]
    async fn cancelled_lookup_keeps_the_fetch() {
        let cache: ChunkCache<u32, String> = ChunkCache::new(1 << 20);
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(chunk(5, 100))
        };
        let first = tokio::time::timeout(Duration::from_millis(5), cache.get(5, slow)).await;
        assert!(first.is_err(), "timed out while the fetch runs");
        let second = cache
            .get(5, || async { Err("a second fetch started".into()) })
            .await;
        assert_eq!(second.unwrap(), chunk(5, 100));
    }
}
