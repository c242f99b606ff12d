//! The write-behind queue: answers are stored after they are delivered, in batches, by a
//! background task, so that a slow, full or failing store never delays or fails a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use super::key::{CacheKey, KeyMap};
use super::store::{CacheStore, CachedResponse, ModelSet};

/// A batch the writer does not linger for more of: it is written as soon as this many
/// answers wait (or the whole queue, when it is smaller: see [`full_batch`]).
pub(crate) const FULL_BATCH: usize = 256;

/// The batch the writer stops lingering at for a queue of `capacity`: [`FULL_BATCH`], or the
/// whole queue when it holds fewer (a full queue drops answers: never linger into that).
fn full_batch(capacity: usize) -> usize {
    FULL_BATCH.min(capacity).max(1)
}

/// The most entries stored in one batch (one redb transaction, one Redis pipeline). Above
/// [`FULL_BATCH`]: answers that queued while the store was busy (a durable commit that took
/// tens of milliseconds on a disk shared with other work) are written together, so that a slow
/// commit is paid once for all of them and the queue drains instead of overflowing.
pub(crate) const MAX_BATCH: usize = 1024;

/// After the first entry of a batch arrives, the writer waits this long for more, so that a
/// busy proxy commits a few large transactions a second rather than one per answer (each a
/// durable commit on disk: its fsync, and for redb about 60k instructions of its own, which
/// a batch shares). A crash loses at most this window's answers (misses afterwards). It was
/// 20 ms; at 100 ms a proxy serving 50 answers a second commits 10 times a second, not 50.
const LINGER: Duration = Duration::from_millis(100);

/// At most one log line about failing stores per this interval (with the count since).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// An entry to store, its time to live, and when it was queued (the TTL counts from there).
/// The entry is shared with `pending` (one allocation on the request path instead of a copy
/// of its header map and model name) and handed to the store shared
/// ([`CacheStore::put_batch_shared`]: the disk store encodes it without a copy).
type Job = (
    CacheKey,
    Arc<CachedResponse>,
    Duration,
    tokio::time::Instant,
);

/// The queue in front of one store, shared by the clones of a [`Cache`](super::Cache).
///
/// Entries wait in a bounded channel; a task started on first use (in the runtime of the
/// first request) drains it in batches of up to [`MAX_BATCH`] into
/// [`CacheStore::put_batch`]. While an entry waits it is also kept in `pending`, so that a
/// lookup finds it before the store has it. The task lingers up to [`LINGER`] after a batch's
/// first entry for more, and stops lingering as soon as a whole batch waits (so that a queue of
/// a few batches never fills at any rate the store keeps up with). A full queue drops the
/// entry (a later identical request is a miss). Outside a Tokio runtime the entry is handed to the store directly (an
/// in-memory store writes at call time; a store that needs a runtime then stores nothing).
/// A store that [writes at once](CacheStore::writes_at_once) skips the queue altogether.
pub(crate) struct Writer {
    store: Arc<dyn CacheStore>,
    capacity: usize,
    tx: OnceLock<mpsc::Sender<Job>>,
    pending: Mutex<KeyMap<Arc<CachedResponse>>>,
    /// Signalled when a whole batch waits: the writer's linger ends early.
    batch_ready: Arc<Notify>,
    /// The models of the entries ever queued: a store learns an entry's model when the batch
    /// is written, and a lookup meanwhile may be served from `pending`.
    models: ModelSet,
    /// Entries queued and not yet written (or given up), and a signal when it drops to 0.
    outstanding: AtomicU64,
    idle: Notify,
    failures: AtomicU64,
    /// Milliseconds since `epoch` of the last failure log line (0: never).
    last_log: AtomicU64,
    epoch: Instant,
}

impl Writer {
    pub(crate) fn new(store: Arc<dyn CacheStore>, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            capacity: capacity.max(1),
            tx: OnceLock::new(),
            pending: Mutex::new(KeyMap::default()),
            batch_ready: Arc::new(Notify::new()),
            models: ModelSet::default(),
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            failures: AtomicU64::new(0),
            last_log: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// An entry waiting to be stored under `key`.
    pub(crate) fn pending(&self, key: &CacheKey) -> Option<CachedResponse> {
        // Nothing queued (always, over a store that writes at once): no lock. An entry is
        // counted before it is put in `pending`, and a lookup that misses one being queued
        // at that instant is a miss, as it would be a moment earlier.
        if self.outstanding.load(Ordering::Acquire) == 0 {
            return None;
        }
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            return None;
        }
        pending.get(key).map(|entry| CachedResponse::clone(entry))
    }

    /// Whether an entry of a model other than `model` was ever queued (see
    /// [`CacheStore::may_hold_other_models`]; the store answers for what it has written).
    pub(crate) fn queued_other_models(&self, model: &str) -> bool {
        self.models.others_than(model)
    }

    /// Queues `entry` for storing under `key`; never waits. A store that
    /// [writes at once](CacheStore::writes_at_once) (in memory) is written inline.
    pub(crate) fn enqueue(self: &Arc<Self>, key: CacheKey, entry: CachedResponse, ttl: Duration) {
        if self.store.writes_at_once() {
            drop(self.store.put(&key, entry, ttl));
            record("stored", 1);
            return;
        }
        let Some(tx) = self.sender() else {
            // No runtime to run the writer: hand it over at once (see the type's docs).
            drop(self.store.put(&key, entry, ttl));
            return;
        };
        self.models.record(entry.model());
        let entry = Arc::new(entry);
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry.clone());
        let queued = tokio::time::Instant::now();
        match tx.try_send((key, entry, ttl, queued)) {
            Ok(()) => {
                // The writer holds a batch's first entry while it lingers: with the queue's
                // it has a whole batch, and need not wait longer.
                if tx.max_capacity() - tx.capacity() >= full_batch(self.capacity) - 1 {
                    self.batch_ready.notify_waiters();
                }
            }
            Err(e) => {
                let full = matches!(e, mpsc::error::TrySendError::Full(_));
                self.unpend(&[key]);
                self.done(1);
                record(if full { "dropped" } else { "failed" }, 1);
                tracing::debug!(key = %key, full, "cache write queue full: answer not stored");
            }
        }
    }

    /// Resolves once every entry queued so far is written (or given up).
    pub(crate) async fn flush(&self) {
        loop {
            let idle = self.idle.notified();
            if self.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn done(&self, n: u64) {
        if self.outstanding.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }

    fn sender(self: &Arc<Self>) -> Option<&mpsc::Sender<Job>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut started = false;
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.capacity);
            started = true;
            runtime.spawn(run(Arc::downgrade(self), self.batch_ready.clone(), rx));
            tx
        });
        if started {
            tracing::debug!(capacity = self.capacity, "cache writer started");
        }
        Some(tx)
    }

    fn unpend(&self, keys: &[CacheKey]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            pending.remove(key);
        }
    }

    fn failed(&self, n: usize, error: &super::StoreError) {
        record("failed", n as u64);
        let failures = self.failures.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let now = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_log.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.failures.store(0, Ordering::Relaxed);
            tracing::warn!(
                error = %error,
                not_stored = failures,
                "cache store failed; answers were delivered but not stored (at most one such line per 10 s)"
            );
        }
    }
}

/// Drains the queue until the writer is gone (the layer and its services dropped: entries
/// still queued then are lost, as in a crash; [`Writer::flush`] first to keep them). The task
/// holds the store only while it writes a batch, so that dropping the layer closes the store.
///
/// After a batch's first entries it lingers [`LINGER`] for more, or until `batch_ready` says
/// that a whole batch waits: the linger shares a durable commit among the answers of a quiet
/// proxy, and a busy one writes whole batches as fast as they fill (a linger that always
/// lasted 100 ms let a queue of 1024 overflow above ~10k answers a second: 15 % of the answers
/// of `scripts/bench-proxy.sh` at 32 connections were dropped). The task is not woken per
/// entry while it lingers.
async fn run(
    writer: std::sync::Weak<Writer>,
    batch_ready: Arc<Notify>,
    mut rx: mpsc::Receiver<Job>,
) {
    let full = full_batch(rx.max_capacity());
    let mut batch = Vec::with_capacity(full);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if batch.len() < full {
            let ready = batch_ready.notified();
            if batch.len() + rx.len() < full {
                // `futures_util`'s select, not `tokio::select!`: the crate's tokio has no
                // `macros` feature.
                let linger = std::pin::pin!(tokio::time::sleep(LINGER));
                let ready = std::pin::pin!(ready);
                let outcome = match futures_util::future::select(ready, linger).await {
                    futures_util::future::Either::Left(_) => "full",
                    futures_util::future::Either::Right(_) => "linger",
                };
                tracing::trace!(ended = outcome, "cache writer batch ready");
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let Some(store) = writer.upgrade().map(|w| w.store.clone()) else {
            return;
        };
        let keys: Vec<CacheKey> = batch.iter().map(|(k, ..)| *k).collect();
        let n = batch.len();
        // Shared with `pending`, which serves them until they are written (a store that
        // only encodes them copies nothing: `CacheStore::put_batch_shared`).
        let jobs = batch
            .drain(..)
            .map(|(key, entry, ttl, queued)| (key, entry, ttl.saturating_sub(queued.elapsed())))
            .collect();
        let started = tokio::time::Instant::now();
        let result = store.put_batch_shared(jobs).await;
        drop(store);
        tracing::debug!(
            entries = n,
            took_us = started.elapsed().as_micros() as u64,
            queued = rx.len(),
            "cache batch written"
        );
        let Some(writer) = writer.upgrade() else {
            return;
        };
        writer.unpend(&keys);
        match result {
            Ok(()) => record("stored", n as u64),
            Err(e) => writer.failed(n, &e),
        }
        writer.done(n as u64);
    }
}

#[cfg(feature = "metrics")]
fn record(result: &'static str, n: u64) {
    let counter = || {
        metrics::counter!(crate::metrics::names::CACHE_WRITES_TOTAL,
            crate::metrics::names::LABEL_RESULT => result)
    };
    if result != "stored" {
        counter().increment(n);
        return;
    }
    // Counted for every answer a memory store writes inline: the handle is kept (by the
    // recorder it belongs to) instead of being looked up in the registry each time (building
    // the key and hashing it, ~0.7k instructions per miss).
    static STORED: Mutex<Option<(usize, metrics::Counter)>> = Mutex::new(None);
    let recorder =
        metrics::with_recorder(|recorder| std::ptr::from_ref(recorder).cast::<()>() as usize);
    let mut stored = STORED.lock().unwrap_or_else(|e| e.into_inner());
    match &*stored {
        Some((at, handle)) if *at == recorder => handle.increment(n),
        _ => {
            let handle = counter();
            handle.increment(n);
            *stored = Some((recorder, handle));
        }
    }
}

#[cfg(not(feature = "metrics"))]
fn record(_result: &'static str, _n: u64) {}

#[cfg(all(test, feature = "disk-cache"))]
mod tests {
    use super::*;

    /// An entry waiting in the queue can be served (from `pending`) before the store has it,
    /// so the queue answers for the models it was given.
    #[tokio::test]
    async fn knows_the_models_it_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::cache::DiskStore::open(dir.path().join("c.redb"), 1 << 20).unwrap();
        let writer = Writer::new(Arc::new(store), 16);
        assert!(!writer.queued_other_models("opus"));
        let entry = CachedResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            "{}".into(),
            false,
        )
        .with_model("sonnet");
        let key = CacheKey::from_bytes([1; 32]);
        writer.enqueue(key, entry, Duration::from_secs(60));
        assert!(writer.pending(&key).is_some());
        assert!(writer.queued_other_models("opus"));
        assert!(!writer.queued_other_models("sonnet"));
        writer.flush().await;
    }
}

#[cfg(test)]
mod batching {
    use futures_util::FutureExt;

    use super::*;
    use crate::cache::StoreFuture;

    /// A store that records the size of every batch it is given and stores nothing; a batch
    /// takes `.1` to write.
    #[derive(Default)]
    struct Batches(Mutex<Vec<usize>>, Duration);

    impl CacheStore for Batches {
        fn get(&self, _key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
            Box::pin(std::future::ready(Ok(None)))
        }

        fn put(&self, _key: &CacheKey, _value: CachedResponse, _ttl: Duration) -> StoreFuture<()> {
            self.0.lock().unwrap().push(1);
            Box::pin(std::future::ready(Ok(())))
        }

        fn remove(&self, _key: &CacheKey) -> StoreFuture<()> {
            Box::pin(std::future::ready(Ok(())))
        }

        fn put_batch(&self, entries: Vec<(CacheKey, CachedResponse, Duration)>) -> StoreFuture<()> {
            self.0.lock().unwrap().push(entries.len());
            Box::pin(tokio::time::sleep(self.1).map(Ok))
        }
    }

    fn key(i: usize) -> CacheKey {
        let mut bytes = [0; 32];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        CacheKey::from_bytes(bytes)
    }

    fn entry() -> CachedResponse {
        CachedResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            "{}".into(),
            false,
        )
    }

    const TTL: Duration = Duration::from_secs(60);

    /// A burst is written in whole batches as they fill, without waiting out the linger, so
    /// a queue of two batches takes a burst of eight without dropping an answer. (With a
    /// linger that always lasted 100 ms, the queue filled and the rest was dropped.)
    #[tokio::test(start_paused = true)]
    async fn a_burst_is_written_in_whole_batches_at_once() {
        let store = Arc::new(Batches::default());
        let writer = Writer::new(store.clone(), 2 * FULL_BATCH);
        let start = tokio::time::Instant::now();
        for i in 0..8 * FULL_BATCH {
            writer.enqueue(key(i), entry(), TTL);
            // The writer task runs between requests, as in a server.
            tokio::task::yield_now().await;
        }
        writer.flush().await;
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 8 * FULL_BATCH, "{batches:?}");
        assert!(batches.iter().all(|&n| n == FULL_BATCH), "{batches:?}");
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
    }

    /// A few answers share one batch: the writer lingers for more after the first.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_queue_lingers_to_share_a_batch() {
        let store = Arc::new(Batches::default());
        let writer = Writer::new(store.clone(), 2 * FULL_BATCH);
        let start = tokio::time::Instant::now();
        writer.enqueue(key(0), entry(), TTL);
        tokio::time::sleep(LINGER / 4).await;
        writer.enqueue(key(1), entry(), TTL);
        writer.enqueue(key(2), entry(), TTL);
        assert!(writer.pending(&key(2)).is_some());
        writer.flush().await;
        assert_eq!(*store.0.lock().unwrap(), [3]);
        assert!(start.elapsed() >= LINGER);
        assert!(writer.pending(&key(2)).is_none());
    }

    /// Answers that queue while the store is slow are written together (up to `MAX_BATCH`),
    /// so that the queue drains instead of overflowing: 10k answers a second into a store that
    /// takes 50 ms per batch, a queue of 1024, nothing dropped. (Batches of at most 256 drained
    /// 5k a second and dropped the rest.)
    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_written_in_larger_batches() {
        let store = Arc::new(Batches(Mutex::default(), Duration::from_millis(50)));
        let writer = Writer::new(store.clone(), 4 * FULL_BATCH);
        // Ten a millisecond (the timer's resolution).
        for i in 0..10_000 {
            writer.enqueue(key(i), entry(), TTL);
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        writer.flush().await;
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10_000, "{batches:?}");
        assert!(batches.iter().any(|&n| n > FULL_BATCH), "{batches:?}");
        assert!(batches.iter().all(|&n| n <= MAX_BATCH), "{batches:?}");
    }

    /// A queue smaller than a batch is written when it is full, not after the linger (it
    /// would drop what arrives meanwhile).
    #[tokio::test(start_paused = true)]
    async fn a_small_queue_is_written_when_full() {
        let store = Arc::new(Batches::default());
        let writer = Writer::new(store.clone(), 8);
        let start = tokio::time::Instant::now();
        for i in 0..64 {
            writer.enqueue(key(i), entry(), TTL);
            tokio::task::yield_now().await;
        }
        writer.flush().await;
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 64, "{batches:?}");
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
    }
}
