//! A cache store on Redis, shared by every process that uses the same server and prefix.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use super::{CacheStore, CachedResponse, StoreError, StoreErrorKind, StoreFuture};
use crate::cache::{CacheKey, CacheSecret};

/// A [`CacheStore`] on Redis (feature `redis`): every proxy node that connects to the same
/// server with the same [`key_prefix`](RedisStore::key_prefix) shares the entries, so a
/// response one node fetched is a hit on every other.
///
/// * Entries are `SET` with `PX` (the layer's TTL in milliseconds): Redis expires them on its
///   own clock, so TTLs follow real time, not tokio's paused test clock.
/// * The value is [`CachedResponse::encode`]; an entry that does not decode is a miss and is
///   deleted.
/// * Every command has a timeout (250 ms by default). A failure is an error the
///   [`CacheLayer`](crate::cache::CacheLayer) treats as a miss (or "not stored"): a Redis
///   outage never fails a request. If the server is unreachable when the store is created,
///   it keeps trying to connect in the background (at most once per second, on use).
/// * A circuit breaker keeps an outage from costing every request a timeout: after a failed
///   command the store answers at once with an error (a miss) for one second; then one
///   command is let through as a probe, and its success closes the breaker (its failure
///   opens it for another second). Without it, each lookup during an outage waited for the
///   reconnect and command timeouts (p50 755 ms, issue 18).
///
/// Keys are `<prefix><64 hex digits of the CacheKey>`; nothing from the request (no API key,
/// no prompt) appears in them.
///
/// The cache's secret ([`CacheStore::secret`]) is shared through the server: `<prefix>secret`
/// holds 32 random bytes, set with `SET ... NX` by the first store that connects (no TTL) and
/// read by every other, when the store is created and when its prefix is set. If the server
/// is unreachable then, the store has no secret and the layer uses a random one of its own
/// (a warning says so): that process's entries are then its own until it restarts. Give the
/// layer a secret ([`CacheLayer::secret`](crate::cache::CacheLayer::secret), the proxy's
/// `--cache-secret`) not to depend on it, or when the server may evict keys without a TTL
/// (an `allkeys-*` eviction policy).
///
/// ```no_run
/// use tower_claude::cache::{CacheLayer, RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379/")
///     .await?
///     .key_prefix("myapp:cache:")
///     .await;
/// let layer = CacheLayer::new(store);
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    prefix: Arc<str>,
    timeout: Duration,
    /// `<prefix>secret`, read when the store was created or its prefix set.
    secret: Option<CacheSecret>,
}

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    connecting: AtomicBool,
    connect_timeout: Duration,
    breaker: Breaker,
}

/// How long the breaker stays open after a failed command before one probe is let through.
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(1);

/// The store's circuit breaker (see the type docs of [`RedisStore`]). Hand-written rather
/// than a crate: it is a dozen lines on tokio's clock, and the crates that offer one bring
/// their own timers and policies.
#[derive(Default)]
struct Breaker {
    /// `Some(t)`: open; commands fail at once until `t`, then one probe goes through.
    open_until: Mutex<Option<Instant>>,
    /// A probe is out (the others still fail at once until it answers).
    probing: AtomicBool,
}

impl Breaker {
    /// Whether a command may go to Redis now.
    fn admit(&self) -> Result<(), StoreError> {
        let open_until = *self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        match open_until {
            None => Ok(()),
            Some(t) if Instant::now() >= t && !self.probing.swap(true, Ordering::AcqRel) => Ok(()),
            Some(_) => Err(backend("Redis unreachable (circuit open)")),
        }
    }

    /// Records the outcome of an admitted command.
    fn record(&self, ok: bool) {
        let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_open = open_until.is_some();
        *open_until = (!ok).then(|| Instant::now() + BREAKER_OPEN_FOR);
        self.probing.store(false, Ordering::Release);
        drop(open_until);
        match (was_open, ok) {
            (false, false) => tracing::warn!(
                "cache: Redis command failed; lookups are misses until a probe succeeds"
            ),
            (true, true) => tracing::info!("cache: Redis is back"),
            _ => {}
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("connected", &self.inner.connection().is_some())
            .finish()
    }
}

fn backend(e: impl fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, e.to_string())
}

impl Inner {
    fn connection(&self) -> Option<ConnectionManager> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn connect(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_number_of_retries(1)
            .set_max_delay(100);
        let fut = ConnectionManager::new_with_config(self.client.clone(), config);
        match tokio::time::timeout(self.connect_timeout.saturating_mul(3), fut).await {
            Ok(Ok(conn)) => {
                *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => Err(backend(e)),
            Err(_) => Err(backend("timed out connecting to Redis")),
        }
    }

    /// The connection, or an error after starting a background connection attempt.
    fn get(self: &Arc<Self>) -> Result<ConnectionManager, StoreError> {
        if let Some(conn) = self.connection() {
            return Ok(conn);
        }
        if !self.connecting.swap(true, Ordering::AcqRel) {
            let inner = self.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if inner.connect().await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    inner.connecting.store(false, Ordering::Release);
                });
            } else {
                self.connecting.store(false, Ordering::Release);
            }
        }
        Err(backend("not connected to Redis"))
    }
}

impl RedisStore {
    /// A store on the Redis server at `url` (`redis://host:port/db`), with the key prefix
    /// `tower-claude:cache:`, a 500 ms connect timeout and a 250 ms command timeout.
    ///
    /// Errors: an invalid URL ([`StoreErrorKind::Open`]). An unreachable server is not an
    /// error (see the type's docs). Must be called within a Tokio runtime.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::new(StoreErrorKind::Open, format!("invalid Redis URL: {e}"))
        })?;
        let inner = Arc::new(Inner {
            client,
            conn: Mutex::new(None),
            connecting: AtomicBool::new(false),
            connect_timeout: Duration::from_millis(500),
            breaker: Breaker::default(),
        });
        if let Err(e) = inner.connect().await {
            tracing::warn!(error = %e, "cache: Redis unreachable; entries are missed until it is back");
        }
        let mut store = Self {
            inner,
            prefix: Arc::from("tower-claude:cache:"),
            timeout: Duration::from_millis(250),
            secret: None,
        };
        store.secret = store.shared_secret().await;
        Ok(store)
    }

    /// The prefix of every key this store writes; the cache's secret is the one under this
    /// prefix (read, or set if there is none, now: hence `async`).
    pub async fn key_prefix(mut self, prefix: impl AsRef<str>) -> Self {
        self.prefix = Arc::from(prefix.as_ref());
        self.secret = self.shared_secret().await;
        self
    }

    /// `<prefix>secret`: set to a fresh random secret unless it is set (`SET NX`), then
    /// read. `None` (and a warning) when the server is unreachable or holds something else
    /// than 32 bytes there.
    async fn shared_secret(&self) -> Option<CacheSecret> {
        if self.inner.connection().is_none() {
            tracing::warn!(
                "cache: Redis unreachable, its shared secret unread; this process's entries are its own until restart (give --cache-secret not to depend on it)"
            );
            return None;
        }
        let key = format!("{}secret", self.prefix);
        let fresh = CacheSecret::random();
        let read = self
            .command(async |mut conn| {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&fresh.as_bytes()[..])
                    .arg("NX")
                    .query_async::<()>(&mut conn)
                    .await?;
                conn.get::<_, Option<Vec<u8>>>(&key).await
            })
            .await;
        match read {
            Ok(Some(bytes)) => match <[u8; 32]>::try_from(bytes.as_slice()) {
                Ok(bytes) => Some(CacheSecret::from_bytes(bytes)),
                Err(_) => {
                    tracing::warn!(key = %key, "cache: the shared secret in Redis is not 32 bytes; not used");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cache: the shared secret could not be read from Redis");
                None
            }
        }
    }

    /// The timeout of each command (250 ms by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}{key}", self.prefix)
    }
}

impl RedisStore {
    /// Runs one command through the breaker, with the command timeout.
    async fn command<T>(
        &self,
        run: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        self.inner.breaker.admit()?;
        let conn = match self.inner.get() {
            Ok(conn) => conn,
            Err(e) => {
                self.inner.breaker.record(false);
                return Err(e);
            }
        };
        let result = timed(self.timeout, run(conn)).await;
        self.inner.breaker.record(result.is_ok());
        result
    }
}

async fn timed<T>(
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(backend(e)),
        Err(_) => Err(backend("Redis command timed out")),
    }
}

impl CacheStore for RedisStore {
    fn secret(&self) -> Option<CacheSecret> {
        self.secret.clone()
    }

    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
        let this = self.clone();
        let key = self.redis_key(key);
        Box::pin(async move {
            let raw: Option<Vec<u8>> = this.command(async |mut conn| conn.get(&key).await).await?;
            let Some(raw) = raw else {
                return Ok(None);
            };
            match CachedResponse::decode(&raw) {
                Ok(resp) => Ok(Some(resp)),
                Err(_) => {
                    let _: Result<(), _> = this
                        .command(async |mut conn| conn.del::<_, ()>(&key).await)
                        .await;
                    Ok(None)
                }
            }
        })
    }

    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
        let this = self.clone();
        let key = self.redis_key(key);
        Box::pin(async move {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 {
                return Ok(());
            }
            let bytes = value.encode();
            this.command(async |mut conn| conn.pset_ex::<_, _, ()>(&key, bytes, ms).await)
                .await
        })
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        let this = self.clone();
        let key = self.redis_key(key);
        Box::pin(async move {
            this.command(async |mut conn| conn.del::<_, ()>(&key).await)
                .await
        })
    }

    /// One pipeline (one round trip) of `SET ... PX` for the whole batch.
    fn put_batch(&self, entries: Vec<(CacheKey, CachedResponse, Duration)>) -> StoreFuture<()> {
        let this = self.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for (key, value, ttl) in &entries {
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                if ms > 0 {
                    pipe.pset_ex(this.redis_key(key), value.encode(), ms)
                        .ignore();
                }
            }
            this.command(async |mut conn| pipe.query_async::<()>(&mut conn).await)
                .await
        })
    }
}
