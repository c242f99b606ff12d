use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::CacheMode;
use super::config::Config;
use super::key::{Tenant, default_tenant_secret};
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
        Self {
            config: Config {
                writer: Writer::new(store.clone(), DEFAULT_WRITE_QUEUE),
                store,
                ttl: DEFAULT_TTL,
                mode: CacheMode::default(),
                max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
                tenant_secret: default_tenant_secret(),
                tenant: None,
                fallback: None,
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

    /// The secret key of the keyed BLAKE3 hash that turns an API key into a cache partition.
    ///
    /// The default is a fixed derivation, the same in every process and every build of this
    /// crate, so that a disk cache is still reachable after a restart. The trade-off: someone
    /// who can read the cache file *and* holds a candidate API key can tell whether that key
    /// has entries (API keys are high-entropy, so a key cannot be recovered from the hash).
    /// With a secret of your own, partitions cannot be linked to keys without it, but entries
    /// written under one secret are unreachable under another; keep it stable across restarts
    /// for a persistent cache.
    pub fn tenant_secret(mut self, secret: [u8; 32]) -> Self {
        self.config.tenant_secret = secret;
        self
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
        Cache::from_config(inner, Arc::new(self.config.clone()))
    }
}
