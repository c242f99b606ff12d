//! [`DiskSpend`]: spend in an embedded redb file, kept across restarts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::{SpendError, SpendErrorKind, SpendFuture, SpendKey, SpendStore};

/// Store name -> (micro-USD spent, expiry in Unix seconds).
const SPEND: TableDefinition<&str, (u64, u64)> = TableDefinition::new("tower_claude_spend");

/// Every this many adds, keys past their expiry are removed (in the same transaction).
const SWEEP_EVERY: u64 = 1_024;

/// Spend in an embedded [`redb`] file (feature `disk-cache`): reopen the same path after a
/// restart and every settled cost is still there.
///
/// Each [`add`](SpendStore::add) is one write transaction, committed durably: it reads each
/// key's total, adds, writes it back and commits, so concurrent adds (redb serialises write
/// transactions) never lose one, and a crash loses at most the add being committed. redb calls
/// block, so each operation runs on tokio's blocking pool: the store needs a tokio runtime.
/// Keys are removed a day after their period ends (swept every 1,024 adds).
///
/// ```
/// use tower_claude::tenant::budget::BudgetLayer;
/// use tower_claude::tenant::spend::DiskSpend;
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = DiskSpend::open(dir.path().join("spend.redb")).unwrap();
/// let layer = BudgetLayer::new(store);
/// # drop(layer);
/// ```
#[derive(Clone)]
pub struct DiskSpend {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    adds: AtomicU64,
}

impl std::fmt::Debug for DiskSpend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSpend").finish_non_exhaustive()
    }
}

fn backend(e: impl Into<redb::Error>) -> SpendError {
    SpendError::new(SpendErrorKind::Backend, e.into().to_string())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl DiskSpend {
    /// Opens (or creates) the database at `path`.
    ///
    /// Blocking file I/O: call it at start-up or inside `spawn_blocking`. Fails if the file is
    /// not a redb database or is already open in this process.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SpendError> {
        let db = Database::create(path.as_ref())
            .map_err(|e| SpendError::new(SpendErrorKind::Open, e.to_string()))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(SPEND).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                adds: AtomicU64::new(0),
            }),
        })
    }

    fn run<T, F>(&self, f: F) -> SpendFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SpendError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| SpendError::new(SpendErrorKind::Backend, e.to_string()))?
        })
    }
}

impl Inner {
    fn get(&self, names: &[String]) -> Result<Vec<u64>, SpendError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(SPEND).map_err(backend)?;
        names
            .iter()
            .map(|n| {
                Ok(table
                    .get(n.as_str())
                    .map_err(backend)?
                    .map_or(0, |v| v.value().0))
            })
            .collect()
    }

    /// Read, add and write every key in one durable write transaction.
    fn add(&self, keys: &[(String, u64)], micro_usd: u64) -> Result<Vec<u64>, SpendError> {
        let sweep = self.adds.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1;
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate);
        let totals = {
            let mut table = txn.open_table(SPEND).map_err(backend)?;
            if sweep {
                let now = unix_secs(SystemTime::now());
                table
                    .retain(|_, (_, expires)| expires > now)
                    .map_err(backend)?;
            }
            let mut totals = Vec::with_capacity(keys.len());
            for (name, expires) in keys {
                let current = table
                    .get(name.as_str())
                    .map_err(backend)?
                    .map(|v| v.value());
                let total = current.map_or(0, |(v, _)| v).saturating_add(micro_usd);
                table
                    .insert(name.as_str(), (total, *expires))
                    .map_err(backend)?;
                totals.push(total);
            }
            totals
        };
        txn.commit().map_err(backend)?;
        Ok(totals)
    }
}

impl SpendStore for DiskSpend {
    fn get<'a>(&'a self, keys: &'a [SpendKey]) -> SpendFuture<'a, Vec<u64>> {
        let names: Vec<String> = keys.iter().map(|k| k.store_name("")).collect();
        self.run(move |inner| inner.get(&names))
    }

    fn add<'a>(&'a self, keys: &'a [SpendKey], micro_usd: u64) -> SpendFuture<'a, Vec<u64>> {
        let keys: Vec<(String, u64)> = keys
            .iter()
            .map(|k| (k.store_name(""), unix_secs(k.expires_at())))
            .collect();
        self.run(move |inner| inner.add(&keys, micro_usd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::spend::Period;

    #[tokio::test]
    async fn spend_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.redb");
        let now = SystemTime::now();
        let keys = [
            SpendKey::new("a", Period::day_of(now)),
            SpendKey::new("a", Period::month_of(now)),
        ];
        {
            let store = DiskSpend::open(&path).unwrap();
            assert_eq!(store.add(&keys, 7).await.unwrap(), [7, 7]);
            assert_eq!(store.add(&keys[..1], 3).await.unwrap(), [10]);
        }
        let store = DiskSpend::open(&path).unwrap();
        assert_eq!(store.get(&keys).await.unwrap(), [10, 7]);
    }
}
