//! The write-behind queue: answers are stored after they are delivered, in batches, by a
//! background task, so that a slow, full or failing store never delays or fails a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::key::{CacheKey, KeyMap};
use super::store::{CacheStore, CachedResponse, ModelSet};

/// A batch the writer does not linger for more of: it is written as soon as this many
/// answers wait (or the whole queue, when it is smaller: see [`full_batch`]).
///
/// It was 256: at 32 connections (~10–20k answers a second) the writer then committed every
/// 13–25 ms, each batch paying the disk store's fixed costs (a durable commit and its
/// `fdatasync`, redb's branch and system pages and header rewritten, the hand-over to the
/// blocking pool and back, the row buffers allocated and freed) and a last row of the batch
/// rounded up to a power of two of pages. 1024 divides those by four and fills within the
/// [`LINGER`] above ~10k answers a second. What a crash can lose keeps its bound (the answers
/// of one linger and the batch being written); at 32 connections that is now up to ~1024
/// answers rather than ~256 (see `docs/benchmarks.md`, issue 13, dk18).
pub(crate) const FULL_BATCH: usize = 1024;

/// The batch the writer stops lingering at for a queue of `capacity`: [`FULL_BATCH`], or the
/// whole queue when it holds fewer (a full queue drops answers: never linger into that).
fn full_batch(capacity: usize) -> usize {
    FULL_BATCH.min(capacity).max(1)
}

/// The most entries stored in one batch (one redb transaction, one Redis pipeline). Above
/// [`FULL_BATCH`]: answers that queued while the store was busy (a durable commit that took
/// tens of milliseconds on a disk shared with other work) are written together, so that a slow
/// commit is paid once for all of them and the queue drains instead of overflowing. The
/// default queue ([`DEFAULT_WRITE_QUEUE`](super::DEFAULT_WRITE_QUEUE)) in one batch.
pub(crate) const MAX_BATCH: usize = 4096;

/// After the first entry of a batch arrives, the writer waits this long for more, so that a
/// busy proxy commits a few large transactions a second rather than one per answer (each a
/// durable commit on disk: its fsync, and for redb about 60k instructions of its own, which
/// a batch shares). A crash loses at most this window's answers (misses afterwards). It was
/// 20 ms; at 100 ms a proxy serving 50 answers a second commits 10 times a second, not 50.
const LINGER: Duration = Duration::from_millis(100);

/// At most one log line about failing stores per this interval (with the count since).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// An entry to store, its time to live, and when it was queued (the TTL counts from there).
/// The entry is handed to the store shared ([`CacheStore::put_batch_shared`]: the disk store
/// encodes it without a copy) while the queue keeps serving it.
type Job = (
    CacheKey,
    Arc<CachedResponse>,
    Duration,
    tokio::time::Instant,
);

/// The answers waiting to be stored and the batch being written, each with where its keys
/// are: one structure is the queue, the lookup of the answers not yet stored, and the batch.
/// The writer swaps the waiting answers out whole and clears the batch once written, so that
/// an answer costs a push and one map insert (before: a bounded channel's send and receive
/// and their permits, a map of its own, and a removal per answer after the write).
#[derive(Default)]
struct Queue {
    /// Waiting, in order.
    jobs: Vec<Job>,
    /// Key -> its last position in `jobs`.
    at: KeyMap<usize>,
    /// Being written (taken from `jobs`), until the store has it.
    writing: Vec<Job>,
    /// Key -> its last position in `writing`.
    writing_at: KeyMap<usize>,
}

impl Queue {
    fn get(&self, key: &CacheKey) -> Option<&CachedResponse> {
        if let Some(&i) = self.at.get(key) {
            return Some(&self.jobs[i].1);
        }
        self.writing_at.get(key).map(|&i| &*self.writing[i].1)
    }

    /// Moves up to `max` of the waiting answers to `writing` (empty: the batch before is
    /// cleared) and returns what the store is given for them.
    fn take(&mut self, max: usize) -> Vec<(CacheKey, Arc<CachedResponse>, Duration)> {
        debug_assert!(self.writing.is_empty());
        if self.jobs.len() <= max {
            // The cleared batch's vector becomes the queue's: no allocation per batch.
            std::mem::swap(&mut self.jobs, &mut self.writing);
            std::mem::swap(&mut self.at, &mut self.writing_at);
        } else {
            // A backlog larger than a batch (a queue above `MAX_BATCH`): the rest stays.
            let rest = self.jobs.split_off(max);
            std::mem::swap(&mut self.writing, &mut self.jobs);
            self.jobs = rest;
            self.writing_at.clear();
            for (i, (key, ..)) in self.writing.iter().enumerate() {
                self.writing_at.insert(*key, i);
            }
            self.at.clear();
            for (i, (key, ..)) in self.jobs.iter().enumerate() {
                self.at.insert(*key, i);
            }
        }
        // One reading of the clock for the batch (a reading per answer was a clock call each).
        let now = tokio::time::Instant::now();
        self.writing
            .iter()
            .map(|(key, entry, ttl, queued)| {
                let waited = now.saturating_duration_since(*queued);
                (*key, entry.clone(), ttl.saturating_sub(waited))
            })
            .collect()
    }

    /// The batch is in the store (or given up): its answers are no longer served from here.
    fn written(&mut self) {
        self.writing.clear();
        self.writing_at.clear();
    }
}

/// The queue in front of one store, shared by the clones of a [`Cache`](super::Cache).
///
/// Entries wait in a bounded [`Queue`]; a task started on first use (in the runtime of the
/// first request) takes them in batches of up to [`MAX_BATCH`] into
/// [`CacheStore::put_batch_shared`]. Until the store has an entry, a lookup finds it in the
/// queue ([`pending`](Writer::pending)). The task lingers up to [`LINGER`] after a batch's
/// first entry for more, and stops lingering as soon as a whole batch waits (so that a queue of
/// a few batches never fills at any rate the store keeps up with). A full queue drops the
/// entry (a later identical request is a miss). Outside a Tokio runtime the entry is handed to the store directly (an
/// in-memory store writes at call time; a store that needs a runtime then stores nothing).
/// A store that [writes at once](CacheStore::writes_at_once) skips the queue altogether.
pub(crate) struct Writer {
    store: Arc<dyn CacheStore>,
    capacity: usize,
    /// Set once the task is started.
    started: OnceLock<()>,
    queue: Mutex<Queue>,
    /// Signalled when a batch's first entry is queued (and when the writer is dropped).
    wake: Arc<Notify>,
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
            started: OnceLock::new(),
            queue: Mutex::new(Queue::default()),
            wake: Arc::new(Notify::new()),
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
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.get(key).cloned()
    }

    /// Whether an entry of a model other than `model` was ever queued (see
    /// [`CacheStore::may_hold_other_models`]; the store answers for what it has written).
    pub(crate) fn queued_other_models(&self, model: &str) -> bool {
        // Nothing ever queued (always, over a store that writes at once): nothing to ask.
        self.started.get().is_some() && self.models.others_than(model)
    }

    /// Queues `entry` for storing under `key`; never waits. A store that
    /// [writes at once](CacheStore::writes_at_once) (in memory) is written inline.
    pub(crate) fn enqueue(self: &Arc<Self>, key: CacheKey, entry: CachedResponse, ttl: Duration) {
        if self.store.writes_at_once() {
            drop(self.store.put(&key, entry, ttl));
            record("stored", 1);
            return;
        }
        if !self.start() {
            // No runtime to run the writer: hand it over at once (see the type's docs).
            drop(self.store.put(&key, entry, ttl));
            return;
        }
        self.models.record_shared(entry.shared_model());
        let entry = Arc::new(entry);
        let queued = tokio::time::Instant::now();
        // Counted before it can be found (`pending` looks at the count first).
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let waiting = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = queue.jobs.len();
            if waiting < self.capacity {
                queue.at.insert(key, waiting);
                queue.jobs.push((key, entry, ttl, queued));
                Some(waiting + 1)
            } else {
                None
            }
        };
        match waiting {
            // A batch's first entry: the task waits for one.
            Some(1) => self.wake.notify_one(),
            // A whole batch waits: the task's linger ends.
            Some(n) if n >= full_batch(self.capacity) => self.batch_ready.notify_waiters(),
            Some(_) => {}
            None => {
                self.done(1);
                record("dropped", 1);
                tracing::debug!(key = %key, "cache write queue full: answer not stored");
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

    /// Starts the task (once, in the current runtime); false outside a runtime.
    fn start(self: &Arc<Self>) -> bool {
        if self.started.get().is_some() {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let mut started = false;
        self.started.get_or_init(|| {
            started = true;
            runtime.spawn(run(
                Arc::downgrade(self),
                self.wake.clone(),
                self.batch_ready.clone(),
            ));
        });
        if started {
            tracing::debug!(capacity = self.capacity, "cache writer started");
        }
        true
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

/// Takes batches from the queue until the writer is gone (the layer and its services dropped: entries
/// still queued then are lost, as in a crash; [`Writer::flush`] first to keep them). The task
/// holds the store only while it writes a batch, so that dropping the layer closes the store.
///
/// After a batch's first entries it lingers [`LINGER`] for more, or until `batch_ready` says
/// that a whole batch waits: the linger shares a durable commit among the answers of a quiet
/// proxy, and a busy one writes whole batches as fast as they fill (a linger that always
/// lasted 100 ms let a queue of 1024 overflow above ~10k answers a second: 15 % of the answers
/// of `scripts/bench-proxy.sh` at 32 connections were dropped). The task is not woken per
/// entry while it lingers.
async fn run(writer: std::sync::Weak<Writer>, wake: Arc<Notify>, batch_ready: Arc<Notify>) {
    let Some(full) = writer.upgrade().map(|w| full_batch(w.capacity)) else {
        return;
    };
    loop {
        // A batch's first entry (one may already wait: a backlog above `MAX_BATCH`, or one
        // queued while the batch before was written).
        loop {
            let woken = wake.notified();
            match waiting(&writer) {
                None => return,
                Some(0) => woken.await,
                Some(_) => break,
            }
        }
        let ready = batch_ready.notified();
        match waiting(&writer) {
            None => return,
            Some(n) if n < full => {
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
            Some(_) => {}
        }
        let (store, jobs) = {
            let Some(w) = writer.upgrade() else {
                return;
            };
            let jobs = w
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(MAX_BATCH);
            (w.store.clone(), jobs)
        };
        let n = jobs.len();
        let started = tokio::time::Instant::now();
        let result = store.put_batch_shared(jobs).await;
        drop(store);
        let Some(writer) = writer.upgrade() else {
            return;
        };
        let queued = {
            let mut queue = writer.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.written();
            queue.jobs.len()
        };
        tracing::debug!(
            entries = n,
            took_us = started.elapsed().as_micros() as u64,
            queued,
            "cache batch written"
        );
        match result {
            Ok(()) => record("stored", n as u64),
            Err(e) => writer.failed(n, &e),
        }
        writer.done(n as u64);
    }
}

/// How many answers wait (`None`: the writer is gone).
fn waiting(writer: &std::sync::Weak<Writer>) -> Option<usize> {
    let writer = writer.upgrade()?;
    let queue = writer.queue.lock().unwrap_or_else(|e| e.into_inner());
    Some(queue.jobs.len())
}

impl Drop for Writer {
    /// Wakes the task, which finds the writer gone and ends.
    fn drop(&mut self) {
        self.wake.notify_one();
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
    // the key and hashing it, ~0.7k instructions per miss), by each thread (no lock shared by
    // the threads that serve misses).
    thread_local! {
        static STORED: std::cell::RefCell<Option<(usize, metrics::Counter)>> =
            const { std::cell::RefCell::new(None) };
    }
    let recorder =
        metrics::with_recorder(|recorder| std::ptr::from_ref(recorder).cast::<()>() as usize);
    let counted = STORED.try_with(|stored| {
        let mut stored = stored.borrow_mut();
        match &*stored {
            Some((at, handle)) if *at == recorder => handle.increment(n),
            _ => {
                let handle = counter();
                handle.increment(n);
                *stored = Some((recorder, handle));
            }
        }
    });
    if counted.is_err() {
        // The thread is exiting.
        counter().increment(n);
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
    /// so that the queue drains instead of overflowing: 40k answers a second into a store that
    /// takes 50 ms per batch, a queue of 4096, nothing dropped. (Batches of at most
    /// `FULL_BATCH`, 1024, drain 20k a second and drop the rest; with `FULL_BATCH` at 256 this
    /// test sent 10k a second into a queue of 1024.)
    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_written_in_larger_batches() {
        let store = Arc::new(Batches(Mutex::default(), Duration::from_millis(50)));
        let writer = Writer::new(store.clone(), 4 * FULL_BATCH);
        // Forty a millisecond (the timer's resolution).
        for i in 0..10_000 {
            writer.enqueue(key(i), entry(), TTL);
            if i % 40 == 39 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        writer.flush().await;
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10_000, "{batches:?}");
        assert!(batches.iter().any(|&n| n > FULL_BATCH), "{batches:?}");
        assert!(batches.iter().all(|&n| n <= MAX_BATCH), "{batches:?}");
    }

    /// At a busy proxy's rate (20 answers a millisecond: 32 connections) the writer commits
    /// 1024 answers at a time, every ~50 ms, not 256 every ~13 ms: each commit's fixed cost
    /// (a durable redb commit and its `fdatasync`, the pages besides the rows, the hand-over
    /// to the blocking pool) is shared by four times as many answers, and nothing waits longer
    /// than the linger.
    #[tokio::test(start_paused = true)]
    async fn a_busy_proxy_commits_a_thousand_answers_at_a_time() {
        let store = Arc::new(Batches(Mutex::default(), Duration::from_millis(5)));
        let writer = Writer::new(store.clone(), crate::cache::DEFAULT_WRITE_QUEUE);
        for i in 0..8 * 1024 {
            writer.enqueue(key(i), entry(), TTL);
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        writer.flush().await;
        let batches = store.0.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 8 * 1024, "{batches:?}");
        // Each batch but the last (what was left, after its linger) 1024 answers or a few
        // more (those queued in the same millisecond before the writer ran).
        assert!(batches.len() <= 8, "{batches:?}");
        let (last, full) = batches.split_last().unwrap();
        assert!(
            full.iter().all(|&n| (1024..1024 + 20).contains(&n)),
            "{batches:?}"
        );
        assert!(*last <= 1024, "{batches:?}");
    }

    /// An answer is found from the moment it is queued until the store has it: while it
    /// waits, while its batch is being written, and when a backlog larger than a batch is
    /// split (the rest waits for the next batch); not once written.
    #[tokio::test(start_paused = true)]
    async fn an_answer_is_found_until_the_store_has_it() {
        let store = Arc::new(Batches(Mutex::default(), Duration::from_millis(50)));
        let writer = Writer::new(store.clone(), 2 * MAX_BATCH);
        for i in 0..MAX_BATCH + 10 {
            writer.enqueue(key(i), entry(), TTL);
        }
        assert!(writer.pending(&key(0)).is_some());
        // The writer takes the first `MAX_BATCH` at once (a whole batch waits) and writes
        // them for 50 ms; the rest waits.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*store.0.lock().unwrap(), [MAX_BATCH]);
        for i in [0, MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 9] {
            assert!(writer.pending(&key(i)).is_some(), "{i}");
        }
        assert!(writer.pending(&key(MAX_BATCH + 10)).is_none());
        writer.flush().await;
        assert_eq!(*store.0.lock().unwrap(), [MAX_BATCH, 10]);
        for i in [0, MAX_BATCH + 9] {
            assert!(writer.pending(&key(i)).is_none(), "{i}");
        }
        // A key queued twice is found as queued last.
        let other = CachedResponse::new(
            http::StatusCode::CREATED,
            http::HeaderMap::new(),
            "{}".into(),
            false,
        );
        writer.enqueue(key(1), entry(), TTL);
        writer.enqueue(key(1), other, TTL);
        assert_eq!(
            writer.pending(&key(1)).unwrap().status(),
            http::StatusCode::CREATED
        );
        writer.flush().await;
    }

    /// Dropping the writer releases the store: its task holds neither between batches.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_writer_releases_the_store() {
        let store = Arc::new(Batches::default());
        let writer = Writer::new(store.clone(), 16);
        writer.enqueue(key(0), entry(), TTL);
        writer.flush().await;
        assert_eq!(Arc::strong_count(&store), 2);
        drop(writer);
        tokio::time::sleep(LINGER).await;
        assert_eq!(Arc::strong_count(&store), 1);
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
