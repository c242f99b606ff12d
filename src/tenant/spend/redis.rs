//! [`RedisSpend`]: spend shared by every process that uses the same Redis and prefix.

use std::time::{Duration, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use super::{SpendError, SpendErrorKind, SpendFuture, SpendKey, SpendStore};

/// Spend in Redis (feature `redis`), shared by several proxies: one integer key per tenant and
/// period (`<prefix><tenant>:d:<YYYY-MM-DD>`, `<prefix><tenant>:m:<YYYY-MM>`), increased with
/// `INCRBY` (atomic on the server, so concurrent adds from any number of nodes never lose one)
/// in a `MULTI` with an `EXPIREAT` a day past the period's end.
///
/// Each command has a timeout (500 ms by default): a slow or unreachable Redis is an error,
/// which the [`BudgetLayer`](crate::tenant::budget::BudgetLayer) absorbs (the request goes on;
/// the spend is kept locally and added later).
///
/// ```no_run
/// use tower_claude::tenant::budget::BudgetLayer;
/// use tower_claude::tenant::spend::RedisSpend;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let conn = redis::aio::ConnectionManager::new(client).await?;
/// let layer = BudgetLayer::new(RedisSpend::new(conn, "myapp:spend:"));
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisSpend {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisSpend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSpend")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn backend(e: redis::RedisError) -> SpendError {
    // A `RedisError` names the command and the server's answer, never the URL.
    SpendError::new(SpendErrorKind::Backend, e.to_string())
}

impl RedisSpend {
    /// A store on `conn`, its keys prefixed with `prefix` (e.g. `"tower-claude:spend:"`).
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            timeout: Duration::from_millis(500),
        }
    }

    /// Connects to `url` (a `redis://` URL) with the prefix `tower-claude:spend:`.
    pub async fn connect(url: &str) -> Result<Self, SpendError> {
        // The URL may hold a password: never in the error.
        let client = redis::Client::open(url)
            .map_err(|_| SpendError::new(SpendErrorKind::Open, "invalid Redis URL"))?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(|e| SpendError::new(SpendErrorKind::Open, e.to_string()))?;
        Ok(Self::new(conn, "tower-claude:spend:"))
    }

    /// The longest a command may take (500 ms by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, SpendError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(backend),
            Err(_) => Err(SpendError::new(
                SpendErrorKind::Timeout,
                format!("Redis did not answer within {:?}", self.timeout),
            )),
        }
    }
}

impl SpendStore for RedisSpend {
    fn get<'a>(&'a self, keys: &'a [SpendKey]) -> SpendFuture<'a, Vec<u64>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let names: Vec<String> = keys.iter().map(|k| k.store_name(&self.prefix)).collect();
            let mut conn = self.conn.clone();
            let values: Vec<Option<u64>> = self
                .bounded(redis::cmd("MGET").arg(&names).query_async(&mut conn))
                .await?;
            Ok(values.into_iter().map(Option::unwrap_or_default).collect())
        })
    }

    fn add<'a>(&'a self, keys: &'a [SpendKey], micro_usd: u64) -> SpendFuture<'a, Vec<u64>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let amount = i64::try_from(micro_usd).unwrap_or(i64::MAX);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for key in keys {
                let name = key.store_name(&self.prefix);
                let expires = key
                    .expires_at()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                pipe.cmd("INCRBY").arg(&name).arg(amount);
                pipe.cmd("EXPIREAT").arg(&name).arg(expires).ignore();
            }
            let mut conn = self.conn.clone();
            let totals: Vec<i64> = self.bounded(pipe.query_async(&mut conn)).await?;
            Ok(totals
                .into_iter()
                .map(|t| u64::try_from(t).unwrap_or(0))
                .collect())
        })
    }
}
