//! On-disk store in an embedded `redb` file.

use std::borrow::Borrow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};

use super::{CacheStore, CachedResponse, ModelSet, StoreError, StoreErrorKind, StoreFuture};
use crate::cache::key::KeyMap;
use crate::cache::{CacheKey, CacheSecret};

/// `[row sequence u64]` -> a row: the entries of one batch (or of a part of a large one),
///
/// ```text
/// [count u32 LE]
/// count × [cache key, 32 bytes][expires unix ms u64 LE][offset u32 LE][length u32 LE]
/// the entries (`CachedResponse::encode`), at those offsets from the end of the directory
/// ```
///
/// A slot whose length is 0 is a removed entry. Rows are keyed by insertion order, so a batch
/// appends one row to the end of the B-tree and eviction takes the first rows. One row per
/// batch, not one per entry: every redb insert rebuilds the leaf it lands in (about 22k
/// instructions for a 1 KB entry), which was most of what a stored answer cost; a batch now
/// pays one insert (see `docs/benchmarks.md`, issue 13, fourth pass). Lookups by cache key go
/// through an index in memory ([`Inner::index`]), built from the rows' directories when the
/// file is opened; so are the accounted size and the next row's sequence number
/// ([`Inner::totals`]), which the previous layout kept in a table of their own, written by
/// every batch (two inserts and a second table's root per commit, ~35k instructions a batch).
const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("tower_claude_cache_rows_v2");
/// The rows of the layout before (the same rows, with [`OLD_META`]), dropped on open: a build
/// of that layout reads the next sequence number from `OLD_META`, so it must not find these
/// rows without it (it would write over them). An upgrade starts with an empty cache.
const OLD_ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("tower_claude_cache_rows");
/// `bytes` (accounted size) and `seq` (next row sequence number) of the layout before.
const OLD_META: TableDefinition<&str, u64> = TableDefinition::new("tower_claude_cache_rows_meta");
/// The store's secret ([`CacheStore::secret`]), under the name `secret`: generated at the
/// first open, so that the keys of the entries are the same after a restart. Whoever can read
/// the file can read it (and the entries): see the cache's module docs, *Keys*.
const SECRET: TableDefinition<&str, &[u8]> = TableDefinition::new("tower_claude_cache_secret");
/// The tables of the previous layouts (rows keyed by cache key and an order table; then one
/// row per entry keyed by insertion order), dropped on open: their keys (cache key v1) are
/// unreachable anyway, and a one-row-per-entry file is a cache that refills.
const OLD_TABLES: [&str; 5] = [
    "tower_claude_cache_entries",
    "tower_claude_cache_order",
    "tower_claude_cache_meta",
    "tower_claude_cache_log",
    "tower_claude_cache_log_meta",
];

const SEQ_LEN: usize = 8;
const COUNT_LEN: usize = 4;
const KEY_LEN: usize = 32;
const SLOT_LEN: usize = KEY_LEN + 8 + 4 + 4;
/// Accounted bytes of a row holding one entry, beyond the encoded entry: the row key, the
/// count and the entry's directory slot. A row of `n` entries adds `SLOT_LEN` per entry.
const ROW_OVERHEAD: u64 = (SEQ_LEN + COUNT_LEN + SLOT_LEN) as u64;
/// The most encoded bytes a row of several entries holds (a row holds one entry of any size):
/// a hit reads its entry's whole row, and eviction drops whole rows. Also at most an eighth
/// of the bound, so that a row evicted takes a small part of the cache with it.
const ROW_MAX: usize = 64 * 1024;

/// What redb adds to a value in a leaf of its own: the leaf's header (4 bytes), the value's
/// end offset (4) and the `u64` key (8).
const LEAF_OVERHEAD: usize = 4 + 4 + SEQ_LEN;
/// The largest leaf a row of several entries fills: [`ROW_MAX`] counted with the directory
/// and the leaf's overhead, 16 pages. redb writes a value larger than a page into a leaf of its
/// own, allocated in a power of two of pages, and every allocated byte is zeroed, copied and
/// written: a row of 64 KiB of entries and their directory (12 KiB for 256 answers) took a
/// leaf of 128 KiB. (Cutting the rest of a batch at smaller powers of two as well cost more
/// than it saved: a row smaller than a page is rebuilt with the next batch's, which redb
/// appends without a rebuild only after a leaf of a page or more.)
const LEAF_MAX: usize = ROW_MAX;

/// Where an entry is: its row and its slot in the row's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    row: u64,
    at: u32,
}

/// One directory slot of a row.
struct SlotView<'a> {
    key: CacheKey,
    expires: u64,
    entry: &'a [u8],
}

/// A row's directory and entries, bounds-checked.
struct Row<'a> {
    dir: &'a [u8],
    data: &'a [u8],
}

impl<'a> Row<'a> {
    fn parse(value: &'a [u8]) -> Option<Self> {
        let count = u32_at(value, 0)? as usize;
        let end = count.checked_mul(SLOT_LEN)?.checked_add(COUNT_LEN)?;
        Some(Self {
            dir: value.get(COUNT_LEN..end)?,
            data: value.get(end..)?,
        })
    }

    fn len(&self) -> usize {
        self.dir.len() / SLOT_LEN
    }

    /// Slot `at`; `None` if it is out of range, removed or points outside the row.
    fn slot(&self, at: usize) -> Option<SlotView<'a>> {
        let s = self.dir.get(at * SLOT_LEN..(at + 1) * SLOT_LEN)?;
        let key: [u8; KEY_LEN] = s[..KEY_LEN].try_into().ok()?;
        let expires = u64_at(s, KEY_LEN)?;
        let offset = u32_at(s, KEY_LEN + 8)? as usize;
        let len = u32_at(s, KEY_LEN + 12)? as usize;
        if len == 0 {
            return None;
        }
        Some(SlotView {
            key: CacheKey::from_bytes(key),
            expires,
            entry: self.data.get(offset..offset.checked_add(len)?)?,
        })
    }

    /// The live entries, with their slot numbers.
    fn live(&self) -> impl Iterator<Item = (u32, SlotView<'a>)> + '_ {
        (0..self.len()).filter_map(|at| Some((at as u32, self.slot(at)?)))
    }
}

/// Encodes a row of `(key, expires, encoded entry)`; removed slots are `None`.
fn encode_row<'e>(
    entries: impl ExactSizeIterator<Item = Option<(CacheKey, u64, &'e [u8])>> + Clone,
) -> Vec<u8> {
    let count = entries.len();
    let data: usize = entries.clone().flatten().map(|(.., e)| e.len()).sum();
    let mut row = Vec::with_capacity(COUNT_LEN + count * SLOT_LEN + data);
    row.extend_from_slice(&(count as u32).to_le_bytes());
    let mut offset = 0usize;
    for slot in entries.clone() {
        let (key, expires, len) = slot.map_or(([0; KEY_LEN], 0, 0), |(k, x, e)| {
            (*k.as_bytes(), x, e.len())
        });
        row.extend_from_slice(&key);
        row.extend_from_slice(&expires.to_le_bytes());
        row.extend_from_slice(&(offset as u32).to_le_bytes());
        row.extend_from_slice(&(len as u32).to_le_bytes());
        offset += len;
    }
    for (.., entry) in entries.flatten() {
        row.extend_from_slice(entry);
    }
    row
}

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

struct Inner {
    /// Read-locked by every transaction; write-locked only to compact the file (redb's
    /// `compact` needs `&mut`). A lookup that finds it write-locked is a miss: it never waits.
    db: RwLock<Database>,
    /// Cache key -> its row and slot. Updated as rows are written (before their commit: a
    /// lookup that meanwhile finds no row is a miss) and removed. A key missing here is a miss
    /// without a read transaction: most lookups are misses.
    index: Mutex<KeyMap<Slot>>,
    /// The models of the entries written (and found when the file was opened).
    models: ModelSet,
    path: PathBuf,
    max_bytes: u64,
    /// When the file was last compacted (or opened).
    last_compaction: Mutex<std::time::Instant>,
    /// Rows were removed or rewritten (eviction, a replaced or removed entry) since the file was
    /// last compacted (or opened): only then can a compaction shrink it (see
    /// [`Inner::compaction_wanted`]).
    freed: AtomicBool,
    clock: Clock,
    /// Commits since the last durable one.
    unsynced: AtomicU32,
    /// Kept in the file (see [`SECRET`]).
    secret: CacheSecret,
    /// When the last durable commit happened.
    last_sync: Mutex<std::time::Instant>,
    /// The accounted size and the next row's sequence number: computed from the rows when the
    /// file is opened, read by each write transaction and set after it commits (write
    /// transactions are one at a time).
    totals: Mutex<Totals>,
}

/// What the rows add up to (see [`Inner::totals`]).
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    /// Accounted bytes: each row's value and its key.
    bytes: u64,
    /// The next row's sequence number.
    seq: u64,
}

/// A durable commit (one `fdatasync`) at least every this many writes...
const SYNC_EVERY_WRITES: u32 = 64;
/// ...and at least this often while writes happen.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// redb's page cache (read cache and write buffer). redb's default, 1 GiB, is memory the
/// process keeps: after 1M distinct answers stored with the default 256 MiB bound the proxy's
/// resident size was 695 MB, most of it redb's cache of the pages it had written. Lookups go
/// to one row each, which the kernel's page cache keeps anyway.
const REDB_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The file is compacted when it is larger than twice the accounted entries plus this (and
/// rows were removed since the last compaction: [`Inner::compaction_wanted`])...
const COMPACT_SLACK: u64 = 4 * 1024 * 1024;
/// ...at most this often (compaction rewrites the file and blocks lookups meanwhile: they
/// are misses).
const COMPACT_EVERY: Duration = Duration::from_secs(60);

impl Drop for Inner {
    fn drop(&mut self) {
        // Persist what the non-durable commits wrote since the last durable one.
        if *self.unsynced.get_mut() > 0 {
            let db = self.db.get_mut().unwrap_or_else(|e| e.into_inner());
            if let Ok(mut txn) = db.begin_write() {
                txn.set_durability(Durability::Immediate);
                let _ = txn.commit();
            }
        }
    }
}

/// A store in an embedded [`redb`] database file: entries survive restarts (reopen the same
/// path), the total size is bounded (the oldest entries are evicted first), and expiry is
/// checked on read against the wall clock ([`SystemTime`], since entries outlive the
/// process).
///
/// Lookups go through an index in memory (cache key to row and slot, about 60 bytes per
/// entry, built from the rows' directories when the file is opened): a key that is not there
/// is a miss without touching the file. A corrupted or undecodable entry is a miss and is
/// removed. Writes run on tokio's blocking pool (`spawn_blocking`, redb calls block); lookups
/// are read inline. The store needs a tokio runtime. redb's page cache is bounded at 32 MiB
/// (redb's default is 1 GiB, which the process kept as its file grew).
///
/// The bound (`--cache-max-bytes` in the proxy) counts key and entry bytes: a write that
/// would exceed it first evicts the oldest entries. The file itself is larger (redb pages and
/// free space, which redb reuses); when it grows past twice the entries plus 4 MiB (after
/// evictions, expiries, or reopening with a smaller bound) it is compacted
/// ([`Database::compact`], at most once a minute, or on demand with
/// [`compact`](DiskStore::compact)), so the file shrinks back. A file that only grew, with
/// nothing removed since it was last compacted or opened, is not: it cannot shrink.
///
/// Batches ([`CacheStore::put_batch`], what the [`CacheLayer`](crate::cache::CacheLayer)'s
/// write-behind task uses) are written in one transaction, committed durably, as one row
/// (several for a batch over 64 KiB): a crash loses at most the batch being written, and
/// redb's commits keep the file consistent. Eviction drops whole rows, oldest first.
///
/// ```
/// use tower_claude::cache::{CacheLayer, DiskStore};
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = DiskStore::open(dir.path().join("cache.redb"), 512 * 1024 * 1024).unwrap();
/// let layer = CacheLayer::new(store);
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

impl DiskStore {
    /// Opens (or creates) the database at `path`, bounded to `max_bytes` of entries.
    ///
    /// This is blocking file I/O: call it at start-up or inside `spawn_blocking`. Fails if the
    /// file is not a redb database or is already open in this process.
    pub fn open(path: impl AsRef<Path>, max_bytes: u64) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path.as_ref())
            .map_err(|e| StoreError::new(StoreErrorKind::Open, e.to_string()))?;
        let txn = db.begin_write().map_err(backend)?;
        let secret;
        let mut index = KeyMap::default();
        let models = ModelSet::default();
        let mut totals = Totals::default();
        {
            for old in OLD_TABLES {
                let old: TableDefinition<&[u8], &[u8]> = TableDefinition::new(old);
                // A table of another type under that name fails to delete: an error, not an
                // open; absent is fine.
                txn.delete_table(old).map_err(backend)?;
            }
            txn.delete_table(OLD_ROWS).map_err(backend)?;
            txn.delete_table(OLD_META).map_err(backend)?;
            secret = Self::secret_of(&txn)?;
            let rows = txn.open_table(ROWS).map_err(backend)?;
            for row in rows.iter().map_err(backend)? {
                let (seq, value) = row.map_err(backend)?;
                // Counted as eviction uncounts it, whether it parses or not.
                totals.bytes += (SEQ_LEN + value.value().len()) as u64;
                totals.seq = seq.value().saturating_add(1);
                // A row that does not parse holds nothing reachable; eviction drops it.
                let Some(parsed) = Row::parse(value.value()) else {
                    continue;
                };
                for (at, slot) in parsed.live() {
                    let row = seq.value();
                    index.insert(slot.key, Slot { row, at });
                    if let Some(model) = CachedResponse::encoded_model(slot.entry) {
                        models.record(model);
                    }
                }
            }
        }
        txn.commit().map_err(backend)?;
        let store = Self {
            inner: Arc::new(Inner {
                db: RwLock::new(db),
                index: Mutex::new(index),
                models,
                path: path.as_ref().to_path_buf(),
                max_bytes,
                last_compaction: Mutex::new(std::time::Instant::now()),
                freed: AtomicBool::new(false),
                clock: Arc::new(SystemTime::now),
                unsynced: AtomicU32::new(0),
                last_sync: Mutex::new(std::time::Instant::now()),
                secret,
                totals: Mutex::new(totals),
            }),
        };
        // A smaller bound than the file was written with applies at once, and the file
        // shrinks to match.
        store.inner.write(|tables| tables.evict(0))?;
        if store.inner.oversized() {
            store.compact()?;
        }
        Ok(store)
    }

    /// The file's secret, generated (and the rows of an earlier key layout dropped: no key
    /// of this build can reach them) when it has none.
    fn secret_of(txn: &WriteTransaction) -> Result<CacheSecret, StoreError> {
        let mut table = txn.open_table(SECRET).map_err(backend)?;
        if let Some(kept) = table.get("secret").map_err(backend)? {
            if let Ok(bytes) = <[u8; 32]>::try_from(kept.value()) {
                return Ok(CacheSecret::from_bytes(bytes));
            }
        }
        // Written before the file kept a secret (key layout v2 or earlier), or damaged:
        // every entry's key is unreachable.
        txn.delete_table(ROWS).map_err(backend)?;
        let secret = CacheSecret::random();
        table
            .insert("secret", &secret.as_bytes()[..])
            .map_err(backend)?;
        tracing::info!("cache: a new secret for this file (its earlier entries, if any, dropped)");
        Ok(secret)
    }

    /// Compacts the file now (blocking): redb moves the live pages to the front and truncates
    /// the free space. Lookups meanwhile are misses. Returns the file size afterwards.
    pub fn compact(&self) -> Result<u64, StoreError> {
        self.inner.compact()
    }

    /// The size of the database file in bytes (blocking).
    pub fn file_bytes(&self) -> Result<u64, StoreError> {
        std::fs::metadata(&self.inner.path)
            .map(|m| m.len())
            .map_err(|e| StoreError::new(StoreErrorKind::Backend, e.to_string()))
    }

    /// Replaces the wall clock (tests).
    #[cfg(test)]
    pub(crate) fn with_clock(self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        let mut inner = Arc::into_inner(self.inner).expect("with_clock before sharing the store");
        inner.clock = Arc::new(clock);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The number of entries.
    pub fn entry_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len() as u64)
    }

    /// The accounted size of the entries in bytes, as of the last write committed.
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.inner.totals().bytes)
    }

    fn run<T, F>(&self, f: F) -> StoreFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| StoreError::new(StoreErrorKind::Backend, e.to_string()))?
        })
    }
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    StoreError::new(StoreErrorKind::Backend, e.into().to_string())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

enum Lookup {
    Missing,
    Found(CachedResponse),
    /// Expired or undecodable: remove it.
    Stale,
}

impl Inner {
    fn totals(&self) -> Totals {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database, for a transaction; waits only while the file is being compacted.
    fn db(&self) -> Result<RwLockReadGuard<'_, Database>, StoreError> {
        Ok(self.db.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the file is more than twice the accounted entries plus [`COMPACT_SLACK`].
    fn oversized(&self) -> bool {
        let file = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let entries = self.totals().bytes;
        file > entries.saturating_mul(2).saturating_add(COMPACT_SLACK)
    }

    fn compact(&self) -> Result<u64, StoreError> {
        let before = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        {
            let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
            // Make every earlier non-durable commit durable first: compaction needs it.
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate);
            txn.commit().map_err(backend)?;
            self.unsynced.store(0, Ordering::Relaxed);
            // What is removed from now on counts for the next compaction (writes wait for the
            // lock, which this holds).
            self.freed.store(false, Ordering::Relaxed);
            let compacted = loop {
                match db.compact() {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = compacted {
                // Not compacted: what was removed before still counts.
                self.freed.store(true, Ordering::Relaxed);
                return Err(StoreError::new(StoreErrorKind::Backend, e.to_string()));
            }
        }
        *self
            .last_compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        tracing::info!(before, after, "disk cache compacted");
        Ok(after)
    }

    /// Whether a compaction would shrink the file: it is [oversized](Inner::oversized) and rows
    /// were removed since the last compaction. A file that only grew cannot shrink: redb grows
    /// it when its free pages are used up, by doubling it, so right after a growth the file is
    /// about twice the pages in use, and (the pages of a row rounded up to a power of two, redb's
    /// own pages besides) above twice the accounted entries plus [`COMPACT_SLACK`] once they
    /// pass a few tens of MiB (in the proxy's benchmark, at the growths to 64 and 128 MiB); a
    /// compaction then moved nothing and left the file as it was, after five durable commits
    /// (nine `fdatasync`s) with lookups turned into misses meanwhile and the writer's queue
    /// filling (`docs/benchmarks.md`, issue 13, dk20).
    fn compaction_wanted(&self) -> bool {
        self.freed.load(Ordering::Relaxed) && self.oversized()
    }

    /// Compacts when it would shrink the file ([`compaction_wanted`](Inner::compaction_wanted))
    /// and the last compaction is old enough.
    fn maybe_compact(&self) {
        let due = self
            .last_compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            >= COMPACT_EVERY;
        if due && self.compaction_wanted() {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "disk cache compaction failed");
            }
        }
    }

    /// Writes a batch of entries in one durable transaction (rows of up to [`ROW_MAX`]
    /// bytes, usually one), evicting the oldest rows to make room, then compacts the file if
    /// it is due.
    fn put_batch<E: Borrow<CachedResponse>>(
        &self,
        entries: &[(CacheKey, E, Duration)],
    ) -> Result<(), StoreError> {
        let now = unix_ms((self.clock)());
        {
            let db = self.db()?;
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate);
            let totals = {
                let mut tables = Tables::open(&txn, self)?;
                tables.put(entries, now)?;
                tables.close()
            };
            txn.commit().map_err(backend)?;
            self.set_totals(totals);
            self.unsynced.store(0, Ordering::Relaxed);
        }
        self.maybe_compact();
        Ok(())
    }

    /// Runs `f` on the tables in one write transaction (non-durable, with a durable one now
    /// and then) and commits it.
    fn write(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(backend)?;
        // A cache may lose its newest entries in a crash (they are misses afterwards), so it
        // does not pay an fdatasync per stored answer, which capped the proxy at about a
        // thousand stored answers a second: commits are non-durable, with a durable one every
        // SYNC_EVERY_WRITES writes or SYNC_EVERY (which also lets redb free pages), and on
        // drop. redb stays consistent either way. (redb's `Eventual` is an fdatasync on Linux.)
        let durable = {
            let mut last = self.last_sync.lock().unwrap_or_else(|e| e.into_inner());
            let writes = self.unsynced.fetch_add(1, Ordering::Relaxed) + 1;
            if writes >= SYNC_EVERY_WRITES || last.elapsed() >= SYNC_EVERY {
                self.unsynced.store(0, Ordering::Relaxed);
                *last = std::time::Instant::now();
                true
            } else {
                false
            }
        };
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        });
        let totals = {
            let mut tables = Tables::open(&txn, self)?;
            f(&mut tables)?;
            tables.close()
        };
        txn.commit().map_err(backend)?;
        self.set_totals(totals);
        Ok(())
    }

    /// What a committed write transaction left (see [`Inner::totals`]).
    fn set_totals(&self, totals: Totals) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = totals;
    }

    fn lookup(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let Some(slot) = self.slot_of(key) else {
            return Ok(Lookup::Missing);
        };
        let db = match self.db.try_read() {
            Ok(db) => db,
            // Being compacted: a miss rather than a wait.
            Err(std::sync::TryLockError::WouldBlock) => return Ok(Lookup::Missing),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        let txn = db.begin_read().map_err(backend)?;
        let table = txn.open_table(ROWS).map_err(backend)?;
        let Some(guard) = table.get(slot.row).map_err(backend)? else {
            return Ok(Lookup::Missing);
        };
        let Some(found) = Row::parse(guard.value()).and_then(|row| row.slot(slot.at as usize))
        else {
            return Ok(Lookup::Stale);
        };
        if found.key != *key {
            return Ok(Lookup::Stale);
        }
        if unix_ms((self.clock)()) >= found.expires {
            return Ok(Lookup::Stale);
        }
        Ok(match CachedResponse::decode(found.entry) {
            Ok(resp) => Lookup::Found(resp),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "removing undecodable disk cache entry");
                Lookup::Stale
            }
        })
    }

    /// Where `key`'s entry is, if it has one.
    fn slot_of(&self, key: &CacheKey) -> Option<Slot> {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration) -> Result<(), StoreError> {
        let now = unix_ms((self.clock)());
        self.write(|tables| tables.put(&[(*key, value, ttl)], now))
    }

    fn remove(&self, key: &CacheKey) -> Result<(), StoreError> {
        self.write(|tables| tables.remove(key))
    }
}

/// The rows table of one write transaction, opened once, with the accounted size and the
/// next sequence number ([`Inner::totals`]) taken once and handed back by
/// [`close`](Tables::close), to be kept once the transaction commits.
struct Tables<'t> {
    rows: redb::Table<'t, u64, &'static [u8]>,
    inner: &'t Inner,
    total: u64,
    seq: u64,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction, inner: &'t Inner) -> Result<Self, StoreError> {
        let Totals { bytes, seq } = inner.totals();
        Ok(Self {
            rows: txn.open_table(ROWS).map_err(backend)?,
            inner,
            total: bytes,
            seq,
        })
    }

    /// The accounted size and the next sequence number, for [`Inner::set_totals`] after the
    /// commit.
    fn close(self) -> Totals {
        Totals {
            bytes: self.total,
            seq: self.seq,
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, KeyMap<Slot>> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the index entries that point into row `seq` (its directory `value`, if it
    /// parses; otherwise every entry of that row, by a scan of the index).
    fn unindex(inner: &Inner, seq: u64, value: &[u8]) {
        let mut index = inner.index.lock().unwrap_or_else(|e| e.into_inner());
        match Row::parse(value) {
            Some(row) => {
                for (at, slot) in row.live() {
                    if index.get(&slot.key) == Some(&Slot { row: seq, at }) {
                        index.remove(&slot.key);
                    }
                }
            }
            None => index.retain(|_, slot| slot.row != seq),
        }
    }

    /// Removes `key`'s entry, if it has one: its row is rewritten without it (same place in
    /// the eviction order), or dropped when it was the row's last entry. A row that does not
    /// parse is dropped whole.
    fn remove(&mut self, key: &CacheKey) -> Result<(), StoreError> {
        let Some(slot) = self.index().remove(key) else {
            return Ok(());
        };
        self.remove_slot(slot)
    }

    /// [`remove`](Self::remove) of an entry whose key is out of the index already.
    fn remove_slot(&mut self, slot: Slot) -> Result<(), StoreError> {
        let Some(old) = self
            .rows
            .remove(slot.row)
            .map_err(backend)?
            .map(|old| old.value().to_vec())
        else {
            return Ok(());
        };
        self.inner.freed.store(true, Ordering::Relaxed);
        self.total = self.total.saturating_sub((SEQ_LEN + old.len()) as u64);
        let Some(row) = Row::parse(&old) else {
            Self::unindex(self.inner, slot.row, &old);
            return Ok(());
        };
        let kept = (0..row.len()).map(|at| {
            row.slot(at)
                .filter(|_| at != slot.at as usize)
                .map(|s| (s.key, s.expires, s.entry))
        });
        if kept.clone().flatten().next().is_none() {
            return Ok(());
        }
        let value = encode_row(kept);
        self.rows.insert(slot.row, &value[..]).map_err(backend)?;
        self.total += (SEQ_LEN + value.len()) as u64;
        Ok(())
    }

    /// Evicts the oldest rows until `extra` more bytes fit under the bound.
    fn evict(&mut self, extra: u64) -> Result<(), StoreError> {
        let max = self.inner.max_bytes;
        while self.total.saturating_add(extra) > max {
            let Some((seq, value)) = self.rows.pop_first().map_err(backend)? else {
                break;
            };
            self.inner.freed.store(true, Ordering::Relaxed);
            let value = value.value();
            self.total = self.total.saturating_sub((SEQ_LEN + value.len()) as u64);
            Self::unindex(self.inner, seq.value(), value);
        }
        if self.total.saturating_add(extra) > max {
            // Nothing left to evict: the accounting is off. Start over from zero rather than
            // refuse every entry.
            self.total = 0;
            self.index().clear();
        }
        Ok(())
    }

    /// Stores entries (the last of several with one key wins), replacing previous entries
    /// under their keys, in rows of up to [`ROW_MAX`] encoded bytes (and an eighth of the
    /// bound) appended in order, evicting the oldest rows to stay under the bound. An entry
    /// whose own row is larger than the whole bound is not stored.
    fn put<E: Borrow<CachedResponse>>(
        &mut self,
        entries: &[(CacheKey, E, Duration)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let max = self.inner.max_bytes;
        let row_max = usize::try_from(max / 8).unwrap_or(usize::MAX).min(ROW_MAX);
        // The entries to write, each once (its last occurrence), in order, with their encoded
        // lengths: each is encoded straight into its row (no buffer of its own, one copy).
        let mut seen = std::collections::HashSet::with_capacity_and_hasher(
            entries.len(),
            crate::cache::key::KeyHashBuilder::default(),
        );
        let mut todo: Vec<(CacheKey, u64, &CachedResponse, usize)> =
            Vec::with_capacity(entries.len());
        // The model of the entry before, recorded: a batch is usually one model's (a lock
        // and a scan of the names per entry otherwise).
        let mut recorded = None;
        for (key, value, ttl) in entries.iter().rev() {
            if !seen.insert(*key) {
                continue;
            }
            let value = value.borrow();
            let len = value.encoded_len();
            if recorded != Some(value.model()) {
                self.inner.models.record_shared(value.shared_model());
                recorded = Some(value.model());
            }
            if ROW_OVERHEAD + len as u64 > max {
                continue;
            }
            let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            todo.push((*key, now_ms.saturating_add(ttl), value, len));
        }
        todo.reverse();
        let mut rest = &todo[..];
        let mut value = Vec::new();
        while !rest.is_empty() {
            // As many entries as fit in one row (at least one): `row_max` encoded bytes, and
            // a leaf of at most `LEAF_MAX`.
            let mut n = 1;
            let mut bytes = rest[0].3;
            let mut leaf = LEAF_OVERHEAD + COUNT_LEN + SLOT_LEN + bytes;
            while n < rest.len()
                && bytes + rest[n].3 <= row_max
                && leaf + SLOT_LEN + rest[n].3 <= LEAF_MAX
            {
                bytes += rest[n].3;
                leaf += SLOT_LEN + rest[n].3;
                n += 1;
            }
            let (row, next) = rest.split_at(n);
            rest = next;
            // The entries these replace, out of the index under one lock (a lock per entry
            // before; a new key, the usual one, has none).
            let replaced: Vec<Slot> = {
                let mut index = self.index();
                row.iter()
                    .filter_map(|(key, ..)| index.remove(key))
                    .collect()
            };
            for slot in replaced {
                self.remove_slot(slot)?;
            }
            value.clear();
            encode_row_of(row, bytes, &mut value);
            let size = (SEQ_LEN + value.len()) as u64;
            self.evict(size)?;
            let seq = self.seq;
            self.rows.insert(seq, &value[..]).map_err(backend)?;
            let mut index = self.index();
            for (at, (key, ..)) in row.iter().enumerate() {
                index.insert(
                    *key,
                    Slot {
                        row: seq,
                        at: at as u32,
                    },
                );
            }
            drop(index);
            self.total += size;
            self.seq += 1;
        }
        Ok(())
    }
}

/// A row of entries, as [`encode_row`] writes it, each entry encoded into the row itself
/// (`data`: the sum of their encoded lengths, to size the buffer). The directory is written
/// after the entries, from the lengths they took.
fn encode_row_of(row: &[(CacheKey, u64, &CachedResponse, usize)], data: usize, out: &mut Vec<u8>) {
    let dir = COUNT_LEN + row.len() * SLOT_LEN;
    out.reserve(dir + data);
    out.resize(dir, 0);
    out[..COUNT_LEN].copy_from_slice(&(row.len() as u32).to_le_bytes());
    let mut offset = 0usize;
    for (i, (key, expires, entry, _)) in row.iter().enumerate() {
        entry.encode_into(out);
        let len = out.len() - dir - offset;
        let slot = &mut out[COUNT_LEN + i * SLOT_LEN..COUNT_LEN + (i + 1) * SLOT_LEN];
        slot[..KEY_LEN].copy_from_slice(key.as_bytes());
        slot[KEY_LEN..KEY_LEN + 8].copy_from_slice(&expires.to_le_bytes());
        slot[KEY_LEN + 8..KEY_LEN + 12].copy_from_slice(&(offset as u32).to_le_bytes());
        slot[KEY_LEN + 12..].copy_from_slice(&(len as u32).to_le_bytes());
        offset += len;
    }
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStore")
            .field("max_bytes", &self.inner.max_bytes)
            .finish_non_exhaustive()
    }
}

impl DiskStore {
    /// The lookup of `get` and `get_now`.
    fn look(&self, key: &CacheKey) -> Result<Option<CachedResponse>, StoreError> {
        let key = *key;
        match self.inner.lookup(&key) {
            Ok(Lookup::Missing) => Ok(None),
            Ok(Lookup::Found(resp)) => Ok(Some(resp)),
            Ok(Lookup::Stale) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let inner = self.inner.clone();
                    handle.spawn_blocking(move || {
                        if let Err(e) = inner.remove(&key) {
                            tracing::debug!(error = %e, "removing a stale disk cache entry failed");
                        }
                    });
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl CacheStore for DiskStore {
    fn secret(&self) -> Option<CacheSecret> {
        Some(self.inner.secret.clone())
    }

    /// Read inline, not on the blocking pool: a read transaction on pages in the page cache
    /// takes microseconds, less than a hand-off to another thread, and a miss (every request
    /// before its answer is stored) pays it. It never waits for a writer (redb readers do not)
    /// nor for a compaction (a miss meanwhile). An expired or undecodable entry is removed on
    /// the blocking pool.
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
        Box::pin(std::future::ready(self.look(key)))
    }

    /// Always answers: the in-memory index says whether the key is held (a miss touches no
    /// file), and a held entry is read from the file as `get` reads it.
    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<CachedResponse>, StoreError>> {
        Some(self.look(key))
    }

    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
        let key = *key;
        self.run(move |inner| inner.put(&key, &value, ttl))
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        let key = *key;
        self.run(move |inner| inner.remove(&key))
    }

    fn put_batch(&self, entries: Vec<(CacheKey, CachedResponse, Duration)>) -> StoreFuture<()> {
        self.run(move |inner| inner.put_batch(&entries))
    }

    /// Encodes the shared entries as they are (no copy).
    fn put_batch_shared(
        &self,
        entries: Vec<(CacheKey, Arc<CachedResponse>, Duration)>,
    ) -> StoreFuture<()> {
        self.run(move |inner| inner.put_batch(&entries))
    }

    /// Answered from the models of every entry written since the file was opened and of
    /// those it held then (so a store that only ever held the requested model's answers
    /// saves the [`CacheLayer`](crate::cache::CacheLayer) a fallback question per miss).
    fn may_hold_other_models(&self, model: &str) -> bool {
        self.inner.models.others_than(model)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;

    fn resp(n: usize) -> CachedResponse {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        CachedResponse::new(StatusCode::OK, h, Bytes::from(vec![b'x'; n]), false)
    }

    fn k(i: u8) -> CacheKey {
        CacheKey::from_bytes([i; 32])
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Waits (up to 5 s) for the entry count to come down to `left`: a lookup removes a stale
    /// entry on the blocking pool.
    async fn removed(store: &DiskStore, left: u64) {
        for _ in 0..500 {
            if store.entry_count().unwrap() == left {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.entry_count().unwrap(), left);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            store.put(&k(1), resp(100), HOUR).await.unwrap();
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.get(&k(1)).await.unwrap(), Some(resp(100)));
        assert_eq!(store.get(&k(2)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn ttl_is_checked_on_read_with_the_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = now.clone();
        let store = DiskStore::open(dir.path().join("c.redb"), 1 << 20)
            .unwrap()
            .with_clock(move || UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst)));
        store.put(&k(1), resp(10), HOUR).await.unwrap();
        now.fetch_add(3599, Ordering::SeqCst);
        assert!(store.get(&k(1)).await.unwrap().is_some());
        now.fetch_add(1, Ordering::SeqCst);
        assert!(store.get(&k(1)).await.unwrap().is_none());
        removed(&store, 0).await;
        // The index forgets the entry before the removal's write transaction commits: wait
        // for the file's accounted size too.
        for _ in 0..500 {
            if store.size_bytes().unwrap() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.size_bytes().unwrap(), 0);
    }

    #[tokio::test]
    async fn corrupted_entry_is_a_miss_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("c.redb"), 1 << 20).unwrap();
        store.put(&k(1), resp(10), HOUR).await.unwrap();
        store.put(&k(2), resp(10), HOUR).await.unwrap();
        let far_future = u64::MAX.to_le_bytes();
        for garbage in [&b"xx"[..], &[&far_future[..], b"not an entry"].concat()] {
            store.put(&k(1), resp(10), HOUR).await.unwrap();
            {
                let db = store.inner.db().unwrap();
                let txn = db.begin_write().unwrap();
                let slot = store.inner.slot_of(&k(1)).unwrap();
                txn.open_table(ROWS)
                    .unwrap()
                    .insert(slot.row, garbage)
                    .unwrap();
                txn.commit().unwrap();
            }
            assert_eq!(store.get(&k(1)).await.unwrap(), None);
            // Garbage removed (on the blocking pool), k(2) kept.
            removed(&store, 1).await;
            assert_eq!(store.get(&k(2)).await.unwrap(), Some(resp(10)));
        }
        // The store still works for that key.
        store.put(&k(1), resp(20), HOUR).await.unwrap();
        assert_eq!(store.get(&k(1)).await.unwrap(), Some(resp(20)));
    }

    #[tokio::test]
    async fn bounded_by_size_evicting_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let one = ROW_OVERHEAD + resp(1000).encode().len() as u64;
        let store = DiskStore::open(dir.path().join("c.redb"), 3 * one).unwrap();
        for i in 0..5 {
            store.put(&k(i), resp(1000), HOUR).await.unwrap();
        }
        assert_eq!(store.entry_count().unwrap(), 3);
        assert_eq!(store.size_bytes().unwrap(), 3 * one);
        assert_eq!(store.get(&k(0)).await.unwrap(), None);
        assert_eq!(store.get(&k(1)).await.unwrap(), None);
        assert!(store.get(&k(4)).await.unwrap().is_some());
        // Replacing an entry does not double-count it, and refreshes its age.
        store.put(&k(2), resp(1000), HOUR).await.unwrap();
        store.put(&k(5), resp(1000), HOUR).await.unwrap();
        assert_eq!(store.size_bytes().unwrap(), 3 * one);
        assert_eq!(store.get(&k(3)).await.unwrap(), None);
        assert!(store.get(&k(2)).await.unwrap().is_some());
        // An entry larger than the whole bound is not stored.
        store.put(&k(9), resp(10_000), HOUR).await.unwrap();
        assert_eq!(store.get(&k(9)).await.unwrap(), None);
        store.remove(&k(2)).await.unwrap();
        assert_eq!(store.size_bytes().unwrap(), 2 * one);
    }

    #[tokio::test]
    async fn reopening_with_a_smaller_bound_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            for i in 0..4 {
                store.put(&k(i), resp(1000), HOUR).await.unwrap();
            }
        }
        let store = DiskStore::open(&path, 2500).unwrap();
        assert_eq!(store.entry_count().unwrap(), 2);
        assert!(store.get(&k(3)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_batch_is_one_transaction_under_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let one = ROW_OVERHEAD + resp(1000).encode().len() as u64;
        let store = DiskStore::open(dir.path().join("c.redb"), 3 * one).unwrap();
        let batch = (0..5).map(|i| (k(i), resp(1000), HOUR)).collect();
        store.put_batch(batch).await.unwrap();
        assert_eq!(store.entry_count().unwrap(), 3);
        assert_eq!(store.get(&k(1)).await.unwrap(), None);
        assert!(store.get(&k(4)).await.unwrap().is_some());
    }

    /// The file shrinks after eviction: reopening with a smaller bound evicts and compacts,
    /// and so does `compact` after entries expire or are evicted.
    #[tokio::test]
    async fn the_file_shrinks_after_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let big;
        {
            let store = DiskStore::open(&path, 64 << 20).unwrap();
            for chunk in 0..4u8 {
                let batch = (0..50u8)
                    .map(|i| (k(chunk * 50 + i), resp(100_000), HOUR))
                    .collect();
                store.put_batch(batch).await.unwrap();
            }
            assert_eq!(store.entry_count().unwrap(), 200);
            big = store.file_bytes().unwrap();
            assert!(big > 20 << 20, "{big}");
        }
        let store = DiskStore::open(&path, 2 << 20).unwrap();
        assert!(store.entry_count().unwrap() <= 20);
        let small = store.file_bytes().unwrap();
        assert!(small < big / 3, "{big} -> {small}");
        assert!(small < (2 << 20) * 2 + COMPACT_SLACK, "{small}");
        // Evicting by writing: the bound holds, and compaction brings the file back down.
        let batch = (0..60u8).map(|i| (k(i), resp(100_000), HOUR)).collect();
        store.put_batch(batch).await.unwrap();
        assert!(store.size_bytes().unwrap() <= 2 << 20);
        let after = store.compact().unwrap();
        assert!(after < (2 << 20) * 2 + COMPACT_SLACK, "{after}");
        assert!(store.get(&k(59)).await.unwrap().is_some());
    }

    /// A file that only grew is not compacted, even past twice its entries plus the slack
    /// (right after redb doubled it): a compaction could not shrink it. Once rows are removed,
    /// it is. (Each entry here takes a leaf of 64 KiB for its ~40 KB, so the file passes that
    /// mark after about a hundred entries.)
    #[tokio::test]
    async fn a_file_that_only_grew_is_not_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("c.redb"), 256 << 20).unwrap();
        let mut n = 0u8;
        while !store.inner.oversized() {
            assert!(n < 240, "not past twice the entries after {n} entries");
            let batch = (n..n + 16).map(|i| (k(i), resp(40_000), HOUR)).collect();
            store.put_batch(batch).await.unwrap();
            n += 16;
        }
        assert!(!store.inner.compaction_wanted());
        let before = store.file_bytes().unwrap();
        assert_eq!(
            store.compact().unwrap(),
            before,
            "compaction would not shrink it"
        );
        // A replaced entry (its row removed) makes it worth trying.
        store
            .put_batch(vec![(k(0), resp(40_000), HOUR)])
            .await
            .unwrap();
        assert!(store.inner.oversized());
        assert!(store.inner.compaction_wanted());
        store.compact().unwrap();
        assert!(!store.inner.compaction_wanted());
        assert_eq!(store.entry_count().unwrap(), u64::from(n));
    }

    /// A file written by the previous layouts (rows keyed by cache key, an order table, a
    /// meta table; then one row per entry) opens, empty, without those tables.
    #[tokio::test]
    async fn a_file_of_the_previous_layout_opens_empty() {
        use redb::TableHandle;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let entries: TableDefinition<&[u8], &[u8]> = TableDefinition::new(OLD_TABLES[0]);
                let order: TableDefinition<u64, &[u8]> = TableDefinition::new(OLD_TABLES[1]);
                let meta: TableDefinition<&str, u64> = TableDefinition::new(OLD_TABLES[2]);
                let mut t = txn.open_table(entries).unwrap();
                t.insert(&[1u8; 32][..], &b"old row"[..]).unwrap();
                txn.open_table(order)
                    .unwrap()
                    .insert(0, &[1u8; 32][..])
                    .unwrap();
                txn.open_table(meta).unwrap().insert("bytes", 40).unwrap();
                // The one-row-per-entry layout of before issue 13's fourth pass.
                let log: TableDefinition<&[u8], &[u8]> = TableDefinition::new(OLD_TABLES[3]);
                let log_meta: TableDefinition<&str, u64> = TableDefinition::new(OLD_TABLES[4]);
                txn.open_table(log)
                    .unwrap()
                    .insert(&[0u8; 40][..], &b"old row"[..])
                    .unwrap();
                txn.open_table(log_meta)
                    .unwrap()
                    .insert("bytes", 47)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.entry_count().unwrap(), 0);
        assert_eq!(store.size_bytes().unwrap(), 0);
        {
            let db = store.inner.db().unwrap();
            let txn = db.begin_read().unwrap();
            let names: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect();
            assert!(OLD_TABLES.iter().all(|old| !names.iter().any(|n| n == old)));
        }
        store.put(&k(1), resp(10), HOUR).await.unwrap();
        assert_eq!(store.get(&k(1)).await.unwrap(), Some(resp(10)));
    }

    /// A file of the layout before (the same rows with a table of the accounted size and the
    /// next sequence number) opens empty, keeps its secret, and loses the old tables: a build
    /// of that layout would write over rows that it finds without its table.
    #[tokio::test]
    async fn a_file_of_the_rows_and_meta_layout_opens_empty() {
        use redb::TableHandle;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let secret = {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            store.secret().unwrap()
        };
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let entry = resp(10).encode();
                let row = encode_row([Some((k(1), u64::MAX, &entry[..]))].into_iter());
                txn.delete_table(ROWS).unwrap();
                txn.open_table(OLD_ROWS)
                    .unwrap()
                    .insert(0, &row[..])
                    .unwrap();
                let mut meta = txn.open_table(OLD_META).unwrap();
                meta.insert("bytes", (SEQ_LEN + row.len()) as u64).unwrap();
                meta.insert("seq", 1).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.secret().unwrap(), secret);
        assert_eq!(store.entry_count().unwrap(), 0);
        assert_eq!(store.size_bytes().unwrap(), 0);
        assert_eq!(store.get(&k(1)).await.unwrap(), None);
        {
            let db = store.inner.db().unwrap();
            let txn = db.begin_read().unwrap();
            let names: Vec<String> = txn
                .list_tables()
                .unwrap()
                .map(|t| t.name().to_owned())
                .collect();
            assert!(
                !names
                    .iter()
                    .any(|n| n == OLD_ROWS.name() || n == OLD_META.name())
            );
        }
    }

    /// The accounted size and the next row's number are rebuilt from the rows when the file
    /// is opened: rows written afterwards follow the last one (none is written over).
    #[tokio::test]
    async fn reopening_continues_after_the_last_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let size = {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            for b in 0..3u8 {
                let batch = (0..4).map(|i| (k(b * 4 + i), resp(100), HOUR)).collect();
                store.put_batch(batch).await.unwrap();
            }
            // The first row's entries go: the row is dropped, the sequence goes on.
            for i in 0..4 {
                store.remove(&k(i)).await.unwrap();
            }
            store.size_bytes().unwrap()
        };
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.size_bytes().unwrap(), size);
        assert_eq!(store.entry_count().unwrap(), 8);
        let batch = (12..16).map(|i| (k(i), resp(100), HOUR)).collect();
        store.put_batch(batch).await.unwrap();
        assert_eq!(row_count(&store), 3);
        assert_eq!(store.inner.slot_of(&k(12)).unwrap().row, 3);
        for i in 4..16 {
            assert_eq!(store.get(&k(i)).await.unwrap(), Some(resp(100)), "{i}");
        }
        assert_eq!(store.size_bytes().unwrap(), size * 3 / 2);
    }

    fn row_count(store: &DiskStore) -> u64 {
        use redb::ReadableTableMetadata;
        let db = store.inner.db().unwrap();
        let txn = db.begin_read().unwrap();
        txn.open_table(ROWS).unwrap().len().unwrap()
    }

    /// A batch is written as one row (one B-tree insert), and each of its entries is found,
    /// also after reopening; a large batch is split into rows of at most `ROW_MAX` bytes.
    #[tokio::test]
    async fn a_batch_is_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let store = DiskStore::open(&path, 64 << 20).unwrap();
            let batch = (0..20)
                .map(|i| (k(i), resp(500 + i as usize), HOUR))
                .collect();
            store.put_batch(batch).await.unwrap();
            assert_eq!(row_count(&store), 1);
            assert_eq!(store.entry_count().unwrap(), 20);
            let row = ROW_OVERHEAD + (19 * SLOT_LEN) as u64;
            let encoded: u64 = (0..20).map(|i| resp(500 + i).encode().len() as u64).sum();
            assert_eq!(store.size_bytes().unwrap(), row + encoded);
            for i in 0..20 {
                assert_eq!(
                    store.get(&k(i)).await.unwrap(),
                    Some(resp(500 + i as usize))
                );
            }
            // 200 entries of ~1 KB: rows of at most 64 KiB.
            let batch = (0..200).map(|i| (k(i), resp(1000), HOUR)).collect();
            store.put_batch(batch).await.unwrap();
            assert_eq!(
                row_count(&store),
                4,
                "the first row's entries were all replaced"
            );
            assert_eq!(store.entry_count().unwrap(), 200);
        }
        let store = DiskStore::open(&path, 64 << 20).unwrap();
        assert_eq!(store.entry_count().unwrap(), 200);
        for i in [0, 63, 64, 199] {
            assert_eq!(store.get(&k(i)).await.unwrap(), Some(resp(1000)));
        }
    }

    /// A row of many small entries fits redb's 16-page leaf with its directory: 256 answers
    /// of ~350 bytes (a full batch at 32 connections) took a 64 KiB row of entries plus a
    /// 9 KiB directory, which redb allocates as 128 KiB.
    #[tokio::test]
    async fn a_row_with_its_directory_fits_a_leaf_of_sixteen_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("c.redb"), 64 << 20).unwrap();
        let batch = (0..=255).map(|i| (k(i), resp(300), HOUR)).collect();
        store.put_batch(batch).await.unwrap();
        assert_eq!(store.entry_count().unwrap(), 256);
        let db = store.inner.db().unwrap();
        let txn = db.begin_read().unwrap();
        let rows = txn.open_table(ROWS).unwrap();
        let mut lens = Vec::new();
        for row in rows.iter().unwrap() {
            lens.push(row.unwrap().1.value().len());
        }
        assert_eq!(lens.len(), 2, "{lens:?}");
        assert!(
            lens.iter().all(|len| len + LEAF_OVERHEAD <= LEAF_MAX),
            "{lens:?}"
        );
        // The first row is filled: the next entry would not have fitted.
        let one = resp(300).encode().len() + SLOT_LEN;
        assert!(lens[0] + LEAF_OVERHEAD + one > LEAF_MAX, "{lens:?}");
    }

    /// Removing or replacing one entry of a row keeps the row's other entries (accounting
    /// exact), also after reopening; the last of several entries with one key in a batch
    /// wins.
    #[tokio::test]
    async fn one_entry_of_a_row_is_removed_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let one = resp(300).encode().len() as u64;
        {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            let batch = vec![
                (k(1), resp(300), HOUR),
                (k(2), resp(10), HOUR),
                (k(3), resp(300), HOUR),
                (k(2), resp(300), HOUR),
            ];
            store.put_batch(batch).await.unwrap();
            assert_eq!(store.entry_count().unwrap(), 3);
            assert_eq!(store.get(&k(2)).await.unwrap(), Some(resp(300)));
            store.remove(&k(1)).await.unwrap();
            assert_eq!(store.get(&k(1)).await.unwrap(), None);
            assert_eq!(store.get(&k(3)).await.unwrap(), Some(resp(300)));
            // The row keeps its three slots, one of them empty.
            assert_eq!(
                store.size_bytes().unwrap(),
                ROW_OVERHEAD + 2 * SLOT_LEN as u64 + 2 * one
            );
            store.put(&k(3), resp(20), HOUR).await.unwrap();
            assert_eq!(row_count(&store), 2);
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.entry_count().unwrap(), 2);
        assert_eq!(store.get(&k(1)).await.unwrap(), None);
        assert_eq!(store.get(&k(2)).await.unwrap(), Some(resp(300)));
        assert_eq!(store.get(&k(3)).await.unwrap(), Some(resp(20)));
        store.remove(&k(2)).await.unwrap();
        assert_eq!(row_count(&store), 1, "a row without entries is dropped");
        assert_eq!(
            store.size_bytes().unwrap(),
            ROW_OVERHEAD + resp(20).encode().len() as u64
        );
    }

    /// An undecodable entry in a row of several is a miss and is removed alone.
    #[tokio::test]
    async fn an_undecodable_entry_of_a_row_is_removed_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path().join("c.redb"), 1 << 20).unwrap();
        let batch = (1..=3).map(|i| (k(i), resp(100), HOUR)).collect();
        store.put_batch(batch).await.unwrap();
        {
            let db = store.inner.db().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let slot = store.inner.slot_of(&k(2)).unwrap();
                let mut rows = txn.open_table(ROWS).unwrap();
                let mut value = rows.get(slot.row).unwrap().unwrap().value().to_vec();
                let row = Row::parse(&value).unwrap();
                let at = value.len() - row.data.len()
                    + (row.slot(1).unwrap().entry.as_ptr() as usize - row.data.as_ptr() as usize);
                value[at] = 0xff; // the encoding version of k(2)'s entry
                rows.insert(slot.row, &value[..]).unwrap();
            }
            txn.commit().unwrap();
        }
        assert_eq!(store.get(&k(2)).await.unwrap(), None);
        removed(&store, 2).await;
        assert_eq!(store.get(&k(1)).await.unwrap(), Some(resp(100)));
        assert_eq!(store.get(&k(3)).await.unwrap(), Some(resp(100)));
    }

    /// A crash (the file as it is on disk while the store is open, copied after a batch was
    /// committed) loses nothing committed: the copy opens, with every batch written.
    #[tokio::test]
    async fn a_crash_keeps_every_committed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let copy = dir.path().join("crashed.redb");
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        for b in 0..3u8 {
            let batch = (0..10).map(|i| (k(b * 10 + i), resp(200), HOUR)).collect();
            store.put_batch(batch).await.unwrap();
        }
        std::fs::copy(&path, &copy).unwrap();
        drop(store);
        let crashed = DiskStore::open(&copy, 1 << 20).unwrap();
        assert_eq!(crashed.entry_count().unwrap(), 30);
        for i in 0..30 {
            assert_eq!(crashed.get(&k(i)).await.unwrap(), Some(resp(200)));
        }
    }

    /// The store knows which models it may hold entries of, also after reopening.
    #[tokio::test]
    async fn knows_which_models_it_may_hold_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            assert!(!store.may_hold_other_models("opus"));
            store
                .put(&k(1), resp(10).with_model("opus"), HOUR)
                .await
                .unwrap();
            assert!(!store.may_hold_other_models("opus"));
            assert!(store.may_hold_other_models("sonnet"));
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert!(!store.may_hold_other_models("opus"));
        assert!(store.may_hold_other_models("sonnet"));
        let batch = vec![(k(2), resp(10).with_model("sonnet"), HOUR)];
        store.put_batch(batch).await.unwrap();
        assert!(store.may_hold_other_models("opus"));
        // An entry without a recorded model may be any model's.
        let fresh = DiskStore::open(dir.path().join("d.redb"), 1 << 20).unwrap();
        fresh.put(&k(3), resp(10), HOUR).await.unwrap();
        assert!(fresh.may_hold_other_models("opus"));
    }

    /// The secret is generated at the first open and read back at the next, so entries
    /// survive a restart; another file has another; a file written before files kept a secret
    /// (its rows under unreachable keys) gets one and loses its rows.
    #[tokio::test]
    async fn the_secret_is_kept_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let first = {
            let store = DiskStore::open(&path, 1 << 20).unwrap();
            store.put(&k(1), resp(10), HOUR).await.unwrap();
            store.secret().unwrap()
        };
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.secret().unwrap(), first);
        assert_eq!(store.get(&k(1)).await.unwrap(), Some(resp(10)));
        drop(store);
        let other = DiskStore::open(dir.path().join("t.redb"), 1 << 20).unwrap();
        assert_ne!(other.secret().unwrap(), first);
        drop(other);
        // The secret removed, as in a file of an earlier build.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(SECRET).unwrap();
            txn.commit().unwrap();
        }
        let store = DiskStore::open(&path, 1 << 20).unwrap();
        assert_ne!(store.secret().unwrap(), first);
        assert_eq!(store.get(&k(1)).await.unwrap(), None);
        assert_eq!(store.entry_count().unwrap(), 0);
        assert_eq!(store.size_bytes().unwrap(), 0);
    }

    #[test]
    fn a_file_that_is_not_a_database_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = DiskStore::open(&path, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Open);
    }
}
