use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::CacheMode;
use super::config::Config;
use super::key::Tenant;
use super::secret::{CacheSecret, Keys};
use super::service::Cache;
use super::store::{CacheStore, MemoryStore};
use super::writer::Writer;
use crate::fallback::FallbackHandle;

/// The default time to live of an entry: 4 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(4 * 3600);

/// The default size cap of one entry: 8 MiB.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 8 * 1024 * 1024;

/// The default capacity of the write-behind queue: 4096 answers waiting to be stored.
///
/// A durable commit on a disk shared with other work took up to ~215 ms in
/// `scripts/bench-proxy.sh` runs; at 12k answers a second a queue of 1024 (the default before
/// issue 13's sixth pass) overflowed in 85 ms and dropped answers. 4096 answers of ~1.5 KB
/// wait in about 6 MiB.
pub const DEFAULT_WRITE_QUEUE: usize = 4096;

/// Builds [`Cache`]: a response cache partitioned by tenant, with request coalescing.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::cache::{CacheLayer, CacheMode};
///
/// let layer = CacheLayer::memory(256 * 1024 * 1024)
///     .ttl(Duration::from_secs(3600))
///     .mode(CacheMode::All)
///     .max_entry_bytes(1024 * 1024);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct CacheLayer {
    config: Config,
}

impl CacheLayer {
    /// A cache layer over `store`.
    pub fn new(store: impl CacheStore) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A cache layer over a store shared with other code (to inspect or clear it).
    pub fn with_shared_store(store: Arc<dyn CacheStore>) -> Self {
        let secret = store.secret().unwrap_or_else(|| {
            tracing::debug!("cache: the store keeps no secret; a random one for this layer");
            CacheSecret::random()
        });
        Self {
            config: Config {
                writer: Writer::new(store.clone(), DEFAULT_WRITE_QUEUE),
                store,
                ttl: DEFAULT_TTL,
                mode: CacheMode::default(),
                max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
                keys: Arc::new(Keys::derive(&secret)),
                tenant: None,
                fallback: None,
                flights: Arc::default(),
            },
        }
    }

    /// A cache layer over a new [`MemoryStore`] of at most `max_bytes`.
    pub fn memory(max_bytes: u64) -> Self {
        Self::new(MemoryStore::new(max_bytes))
    }

    /// How long an entry lives (default [`DEFAULT_TTL`], 4 hours).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl;
        self
    }

    /// Which requests are cached (default [`CacheMode::Deterministic`]: only requests with
    /// `"temperature": 0`); a request's `x-tower-claude-cache` header can opt in or out (see
    /// the [module docs](super)).
    pub fn mode(mut self, mode: CacheMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// The fallback layer below, whose current choice decides whether an answer another
    /// model produced may be served (see [`FallbackLayer::handle`](crate::fallback::FallbackLayer::handle)
    /// and the module docs, *Models*). Without it, only answers of the requested model are
    /// served. [`ClaudeStack`](crate::stack::ClaudeStack) connects the two.
    pub fn fallback(mut self, handle: FallbackHandle) -> Self {
        self.config.fallback = Some(handle);
        self
    }

    /// How many answers may wait to be stored (default [`DEFAULT_WRITE_QUEUE`]). Answers are
    /// stored after they are delivered, in batches, by a background task; when the queue is
    /// full (a store slower than the traffic) an answer is not stored and
    /// `tower_claude_cache_writes_total{result="dropped"}` counts it.
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.config.writer = Writer::new(self.config.store.clone(), capacity);
        self
    }

    /// The largest response body stored (default [`DEFAULT_MAX_ENTRY_BYTES`], 8 MiB). Larger
    /// responses are forwarded without being stored.
    pub fn max_entry_bytes(mut self, max: usize) -> Self {
        self.config.max_entry_bytes = max;
        self
    }

    /// The cache's secret: every hash of its keys (the tenant partition, the body digest, the
    /// key itself) is keyed by it (see the [module docs](super), *Keys*).
    ///
    /// The default is the store's own ([`CacheStore::secret`]: random per [`MemoryStore`],
    /// generated at the first open and kept in the file of a `DiskStore`, shared through the
    /// server by `RedisStore`s), else a random secret of this layer. Give one to share entries
    /// between stores that do not share a secret, or to keep a store's secret elsewhere than
    /// in the store. Entries written under one secret are unreachable under another.
    ///
    /// ```
    /// use tower_claude::cache::{CacheLayer, CacheSecret};
    ///
    /// let layer = CacheLayer::memory(1 << 20).secret(CacheSecret::from_bytes([7; 32]));
    /// assert!(!format!("{layer:?}").contains("07"));
    /// ```
    pub fn secret(mut self, secret: CacheSecret) -> Self {
        self.config.keys = Arc::new(Keys::derive(&secret));
        self
    }

    /// The cache's secret as bytes: the same as [`secret`](Self::secret), whose name this
    /// was before the one secret keyed every hash of a key (it keyed only the tenant
    /// partition, with a fixed public default).
    #[deprecated(note = "use `CacheLayer::secret`: one secret keys every hash of a cache key")]
    pub fn tenant_secret(self, secret: [u8; 32]) -> Self {
        self.secret(CacheSecret::from_bytes(secret))
    }

    /// Partitions every request as `tenant` instead of by API key (a request's own [`Tenant`]
    /// extension still wins). For a single-tenant deployment where several keys should share
    /// entries.
    pub fn tenant(mut self, tenant: impl Into<Tenant>) -> Self {
        self.config.tenant = Some(tenant.into());
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.config.store
    }

    /// Waits until every answer queued for storing so far is in the store (or given up after
    /// a store error). Answers are stored after they are delivered, by a background task; call
    /// this before a graceful shutdown, or in tests before reading the store directly.
    ///
    /// ```
    /// use tower_claude::cache::CacheLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = CacheLayer::memory(1 << 20);
    /// layer.flush().await; // nothing queued: at once
    /// # }
    /// ```
    pub async fn flush(&self) {
        self.config.writer.flush().await;
    }
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("ttl", &self.config.ttl)
            .field("mode", &self.config.mode)
            .field("fallback", &self.config.fallback.is_some())
            .field("max_entry_bytes", &self.config.max_entry_bytes)
            .field("tenant", &self.config.tenant)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        // Each service built coalesces its own requests (its own flights).
        let config = Config {
            flights: Arc::default(),
            ..self.config.clone()
        };
        Cache::from_config(inner, Arc::new(config))
    }
}
