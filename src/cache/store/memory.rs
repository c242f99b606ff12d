//! In-process store on `moka`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use super::{CacheStore, CachedResponse, ModelSet, StoreError, StoreFuture};
use crate::cache::key::KeyHashBuilder;
use crate::cache::{CacheKey, CacheSecret};

struct Entry {
    response: CachedResponse,
    expires_at: Instant,
    ttl: Duration,
}

struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// An in-memory store bounded by bytes, on a [`moka`] cache (TinyLFU admission, LRU eviction).
///
/// The bound counts what entries really cost ([`CachedResponse::weight`]: body, headers, the
/// model name, and a measured fixed overhead for the key, the maps and moka's bookkeeping), so
/// the process's resident memory for the cache follows the bound (measured in
/// `docs/benchmarks.md`: 1M distinct requests through the proxy).
///
/// Time to live: moka expires entries on its own (real) clock, which does not follow tokio's
/// paused test clock. So each entry also records its expiry as a [`tokio::time::Instant`] and
/// [`get`](CacheStore::get) checks it: an entry is never served past its TTL on either clock,
/// and under `#[tokio::test(start_paused = true)]` TTLs follow `tokio::time::advance`. moka's
/// own expiry only frees memory.
///
/// Clones share the same cache.
///
/// ```
/// use tower_claude::cache::MemoryStore;
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // 64 MiB
/// assert_eq!(store.entry_count(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    /// Values behind an `Arc`: moka clones the value it is given on insert (and on every
    /// hit), which for an entry copied its header map and model name and dropped the original
    /// (~1.1k instructions of a miss); an `Arc` is cloned by a count.
    cache: Cache<CacheKey, Arc<Entry>, KeyHashBuilder>,
    /// The models of every entry ever put (see [`CacheStore::may_hold_other_models`]).
    models: Arc<ModelSet>,
    /// Random, of this store: its entries do not outlive the process.
    secret: CacheSecret,
}

impl MemoryStore {
    /// A store whose entries weigh ([`CachedResponse::weight`]) at most about `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<Entry>| {
                u32::try_from(v.response.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            // Keys are BLAKE3 digests: folded, not hashed again (see `KeyHasher`).
            .build_with_hasher(KeyHashBuilder::default());
        Self {
            cache,
            models: Arc::default(),
            secret: CacheSecret::random(),
        }
    }

    /// The number of entries (approximate: moka applies writes in batches).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// The total weight of the entries in bytes (approximate, like `entry_count`).
    pub fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }

    fn find(&self, key: &CacheKey) -> Option<CachedResponse> {
        let entry = self.cache.get(key)?;
        if Instant::now() >= entry.expires_at {
            self.cache.invalidate(key);
            return None;
        }
        Some(entry.response.clone())
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("weighted_size", &self.cache.weighted_size())
            .finish()
    }
}

impl CacheStore for MemoryStore {
    fn secret(&self) -> Option<CacheSecret> {
        Some(self.secret.clone())
    }

    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
        let found = self.find(key);
        Box::pin(std::future::ready(Ok(found)))
    }

    /// Always answers: a map lookup.
    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<CachedResponse>, StoreError>> {
        Some(Ok(self.find(key)))
    }

    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
        // `Instant + Duration` panics on overflow; a TTL too large to represent is "forever".
        let expires_at = Instant::now()
            .checked_add(ttl)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let ttl = ttl.min(Duration::from_secs(100 * 365 * 86_400));
        self.models.record(value.model());
        self.cache.insert(
            *key,
            Arc::new(Entry {
                response: value,
                expires_at,
                ttl,
            }),
        );
        Box::pin(Done)
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        self.cache.invalidate(key);
        Box::pin(Done)
    }

    /// `put` inserts at call time (a moka insert).
    fn writes_at_once(&self) -> bool {
        true
    }

    /// Answered from the models of every entry ever put (not only of those still held).
    fn may_hold_other_models(&self, model: &str) -> bool {
        self.models.others_than(model)
    }
}

/// A write already done: boxed without an allocation (the type has no size), where
/// `ready(Ok(()))` allocated on every `put`.
struct Done;

impl std::future::Future for Done {
    type Output = Result<(), StoreError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn resp(n: usize) -> CachedResponse {
        CachedResponse::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; n]),
            false,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_follows_tokio_time() {
        let store = MemoryStore::new(1 << 20);
        let k = CacheKey::from_bytes([1; 32]);
        store
            .put(&k, resp(10), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(store.get(&k).await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(store.get(&k).await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn put_replaces_and_renews_ttl() {
        let store = MemoryStore::new(1 << 20);
        let k = CacheKey::from_bytes([1; 32]);
        store
            .put(&k, resp(1), Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        store
            .put(&k, resp(2), Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(store.get(&k).await.unwrap().unwrap().body().len(), 2);
    }

    #[tokio::test]
    async fn bounded_by_bytes() {
        let store = MemoryStore::new(100_000);
        for i in 0..100u8 {
            let k = CacheKey::from_bytes([i; 32]);
            store
                .put(&k, resp(10_000), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(
            store.weighted_size() <= 100_000,
            "{}",
            store.weighted_size()
        );
        assert!(store.entry_count() <= 10);
    }

    #[tokio::test]
    async fn knows_which_models_it_may_hold_across_clones() {
        let store = MemoryStore::new(1 << 20);
        let clone = store.clone();
        assert!(!store.may_hold_other_models("opus"));
        let put = |n: u8, r: CachedResponse| {
            clone.put(&CacheKey::from_bytes([n; 32]), r, Duration::from_secs(60))
        };
        put(1, resp(1).with_model("opus")).await.unwrap();
        assert!(!store.may_hold_other_models("opus"));
        assert!(store.may_hold_other_models("sonnet"));
        put(2, resp(1).with_model("sonnet")).await.unwrap();
        assert!(store.may_hold_other_models("opus"));
        let fresh = MemoryStore::new(1 << 20);
        fresh
            .put(
                &CacheKey::from_bytes([3; 32]),
                resp(1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(
            fresh.may_hold_other_models("opus"),
            "an entry without a model may be any model's"
        );
    }

    #[tokio::test]
    async fn huge_ttl_does_not_panic() {
        let store = MemoryStore::new(1 << 20);
        let k = CacheKey::from_bytes([1; 32]);
        store.put(&k, resp(1), Duration::MAX).await.unwrap();
        assert!(store.get(&k).await.unwrap().is_some());
    }
}
