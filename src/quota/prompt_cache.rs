//! [`PromptCacheMemory`]: the prompt-cache prefixes a key sent to a model recently, so that the
//! input estimate leaves out what the server will read from its prompt cache, and the cache
//! tokens each `(key, group)` used.
//!
//! Anthropic's rate limits count `input_tokens + cache_creation_input_tokens` toward the
//! input-tokens-per-minute limit; `cache_read_input_tokens` do not count for current models
//! (they do for a few older ones: [`ModelCatalog::cache_reads_count`]). The server caches
//! the prefix of a request up to each `cache_control` breakpoint (in the order tools, system,
//! messages) for 5 minutes, or 1 hour with `"ttl": "1h"`, refreshed on every use.
//! [`RequestMeta`] learns those prefixes in its single scan (hashes and token estimates, see
//! [`CacheBreakpoint`]); this memory remembers which of them the same key sent to the same
//! model within their TTL, so the rate limiter reserves only what counts.
//!
//! [`ModelCatalog::cache_reads_count`]: crate::anthropic::ModelCatalog::cache_reads_count

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use tokio::time::Instant;

use crate::anthropic::{CacheBreakpoint, KeyId, RateLimitGroup, RequestMeta, Usage};

/// The default number of prefixes remembered (about 7 MB at most; see [`PromptCacheMemory`]).
pub const DEFAULT_PREFIX_CAPACITY: u64 = 20_000;

/// The most `(key, group)` usage totals kept (least recently used ones go first).
const MAX_USAGE_ENTRIES: usize = 10_000;

/// A prefix estimated below this many tokens is not remembered: the API caches nothing
/// shorter than 1,024 tokens (the smallest minimum of any model; some models need 2,048 or
/// 4,096), so such a prefix is counted in full.
pub(crate) const MIN_CACHEABLE_TOKENS: u64 = 1_024;

/// Remembered prefixes and cache-token totals; cheap to clone (an `Arc`), every clone shares
/// the same memory. A [`QuotaBoard`](super::QuotaBoard) holds one
/// ([`QuotaBoard::prompt_cache`](super::QuotaBoard::prompt_cache)).
///
/// **Memory.** At most `capacity` prefixes are remembered (least recently used ones are
/// forgotten first), each as a 128-bit hash of (key id, model, prefix bytes) and its expiry
/// in a `moka` cache: measured at about 370 bytes of resident memory per prefix, 37 MB for
/// 100,000 (`tests/prompt_cache.rs`, `the_prefix_memory_is_bounded`).
/// A forgotten prefix only makes the estimate high again (a first sighting counts in full).
///
/// ```
/// use tower_claude::anthropic::{KeyId, RequestMeta};
/// use tower_claude::quota::PromptCacheMemory;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let prefix = "You are a careful assistant. ".repeat(400);
/// let body = format!(
///     r#"{{"model":"claude-sonnet-4-6","max_tokens":100,
///         "system":[{{"type":"text","text":"{prefix}","cache_control":{{"type":"ephemeral"}}}}],
///         "messages":[{{"role":"user","content":"Hi"}}]}}"#
/// );
/// let meta = RequestMeta::scan(body.as_bytes()).unwrap();
/// let memory = PromptCacheMemory::new(1_000);
/// let key = KeyId::named("agent");
///
/// // A first sighting counts in full (the server writes the cache).
/// let first = memory.estimate(&key, &meta, false);
/// assert_eq!(first.counted_input_tokens(), meta.input_tokens);
/// memory.remember(&first);
/// // The same prefix again: only the part after the breakpoint counts.
/// let again = memory.estimate(&key, &meta, false);
/// assert_eq!(again.expected_read_tokens(), meta.cache_breakpoints[0].tokens);
/// assert!(again.counted_input_tokens() < 100);
/// # }
/// ```
#[derive(Clone)]
pub struct PromptCacheMemory {
    inner: Arc<Inner>,
}

struct Inner {
    /// Prefix id -> when its cache entry expires (tokio time).
    prefixes: Cache<u128, Instant, Hasher>,
    /// Cache-token totals per `(key, group)`, at most `max_usage` of them. A map under a
    /// read-write lock rather than a `moka` cache: every answer records into it, and a
    /// `moka` lookup cost ~1k instructions where this one is a read lock and one hash.
    usage: RwLock<hashbrown::HashMap<(KeyId, RateLimitGroup), Arc<Counters>, Hasher>>,
    max_usage: usize,
    /// The totals recorded into last, with their pair as the shared strings it was asked
    /// with: an answer of the same key and group (two `Arc`s the request carries from its
    /// key id's memo and its catalogue entry) finds them by two pointer tests, without the
    /// read lock, the hash of both names and their comparison (issue 14, sixteenth pass: ~150
    /// instructions an answer). Set only under a lock of `usage`, and cleared when totals are
    /// forgotten, so that it never holds totals the map no longer has.
    last: Mutex<Last>,
    capacity: u64,
}

/// What [`Inner::last`] guards: the totals recorded into last, and the count of answers
/// recorded. The count is kept under the same lock as the pair, which every answer takes
/// anyway, rather than in an atomic of its own: one locked instruction less an answer.
#[derive(Default)]
struct Last {
    /// Counts the answers recorded: each totals' `used` is the count when they were last
    /// recorded into (which ones were least recently used, when the map is full).
    tick: u64,
    pair: Option<(KeyId, RateLimitGroup, Arc<Counters>)>,
}

/// foldhash (randomly seeded) rather than SipHash, which cost ~350 instructions per answer
/// (`record_usage` hashes a `(key, group)` on every one): the prefix ids are already
/// digests, a key id is a digest too, and both maps are bounded (least recently used entries
/// go first), so a client choosing model names cannot grow a chain without bound.
type Hasher = hashbrown::DefaultHashBuilder;

/// A `(key, group)` pair borrowed, to look up the totals without cloning either name: hashed
/// as the owned tuple is (each element in turn).
#[derive(Clone, Copy)]
struct Pair<'a>(&'a KeyId, &'a RateLimitGroup);

impl Hash for Pair<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
        self.1.hash(state);
    }
}

impl hashbrown::Equivalent<(KeyId, RateLimitGroup)> for Pair<'_> {
    fn equivalent(&self, key: &(KeyId, RateLimitGroup)) -> bool {
        *self.0 == key.0 && *self.1 == key.1
    }
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    write: AtomicU64,
    uncached: AtomicU64,
    expected_read: AtomicU64,
    /// The memory's tick when an answer was last recorded here.
    used: AtomicU64,
}

impl fmt::Debug for PromptCacheMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PromptCacheMemory")
            .field("capacity", &self.inner.capacity)
            .field("prefixes", &self.inner.prefixes.entry_count())
            .finish()
    }
}

impl Default for PromptCacheMemory {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX_CAPACITY)
    }
}

/// The cache-aware input estimate of one request, from
/// [`PromptCacheMemory::estimate`]; hand it to [`PromptCacheMemory::remember`] once the server
/// answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCacheEstimate {
    counted: u64,
    expected_read: u64,
    /// (prefix id, TTL) of every breakpoint, to remember after the answer.
    marks: Vec<(u128, Duration)>,
}

impl PromptCacheEstimate {
    /// Input tokens expected to count toward the input-tokens-per-minute limit: the whole
    /// estimate minus the longest prefix expected to be read from the cache (nothing is left
    /// out for a model whose cache reads count).
    pub fn counted_input_tokens(&self) -> u64 {
        self.counted
    }

    /// Tokens of the longest remembered prefix (expected to be read from the cache); 0 for a
    /// first sighting.
    pub fn expected_read_tokens(&self) -> u64 {
        self.expected_read
    }

    /// Whether the request has cache breakpoints at all.
    pub fn has_breakpoints(&self) -> bool {
        !self.marks.is_empty()
    }
}

/// Cache tokens of one `(key, group)` since the board started, as reported by the server's
/// `usage` (status page and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PromptCacheUsage {
    /// `cache_read_input_tokens`: served from the prompt cache.
    pub read_tokens: u64,
    /// `cache_creation_input_tokens`: written to the prompt cache.
    pub write_tokens: u64,
    /// `input_tokens`: not cached (after the last breakpoint).
    pub uncached_tokens: u64,
    /// Tokens the estimate expected to be read from the cache (left out of reservations).
    pub expected_read_tokens: u64,
}

impl PromptCacheUsage {
    /// The prompt-cache hit ratio: `read / (read + write + uncached)`, the share of input
    /// tokens served from the cache (0 when nothing was sent).
    ///
    /// ```
    /// use tower_claude::quota::PromptCacheUsage;
    ///
    /// let usage = PromptCacheUsage { read_tokens: 90, write_tokens: 5, uncached_tokens: 5, ..Default::default() };
    /// assert_eq!(usage.hit_ratio(), 0.9);
    /// ```
    pub fn hit_ratio(&self) -> f64 {
        let total = self
            .read_tokens
            .saturating_add(self.write_tokens)
            .saturating_add(self.uncached_tokens);
        if total == 0 {
            0.0
        } else {
            self.read_tokens as f64 / total as f64
        }
    }
}

impl PromptCacheMemory {
    /// A memory of at most `capacity` prefixes (least recently used ones are forgotten first).
    pub fn new(capacity: u64) -> Self {
        let prefixes = Cache::builder()
            .max_capacity(capacity)
            .eviction_policy(EvictionPolicy::lru())
            // Expiry is checked against tokio's clock on lookup; this only lets entries past
            // the longest TTL go in wall time too.
            .time_to_live(Duration::from_secs(3_600 + 300))
            .build_with_hasher(Hasher::default());
        Self {
            inner: Arc::new(Inner {
                prefixes,
                usage: RwLock::default(),
                max_usage: MAX_USAGE_ENTRIES,
                last: Mutex::default(),
                capacity,
            }),
        }
    }

    /// The number of prefixes remembered (expired ones may still be counted until evicted).
    pub fn len(&self) -> u64 {
        self.inner.prefixes.run_pending_tasks();
        self.inner.prefixes.entry_count()
    }

    /// Whether no prefix is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most prefixes remembered.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// The cache-aware estimate of `meta` sent with `key`: its
    /// [`input_tokens`](RequestMeta::input_tokens) minus the longest prefix (up to a
    /// `cache_control` breakpoint) that the same key sent to the same model within its TTL.
    /// `cache_reads_count`: the model counts cache reads toward the limit
    /// ([`ModelCatalog::cache_reads_count`](crate::anthropic::ModelCatalog::cache_reads_count)),
    /// so nothing is left out.
    pub fn estimate(
        &self,
        key: &KeyId,
        meta: &RequestMeta,
        cache_reads_count: bool,
    ) -> PromptCacheEstimate {
        let total = meta.input_tokens;
        if meta.cache_breakpoints.is_empty() {
            return PromptCacheEstimate {
                counted: total,
                expected_read: 0,
                marks: Vec::new(),
            };
        }
        let model = meta.model.as_deref().unwrap_or("");
        let now = Instant::now();
        let mut expected_read = 0;
        let mut marks = Vec::with_capacity(meta.cache_breakpoints.len());
        for bp in &meta.cache_breakpoints {
            if bp.tokens < MIN_CACHEABLE_TOKENS {
                continue;
            }
            let id = prefix_id(key, model, bp);
            if self
                .inner
                .prefixes
                .get(&id)
                .is_some_and(|expires| expires > now)
            {
                expected_read = expected_read.max(bp.tokens);
            }
            marks.push((id, bp.ttl.duration()));
        }
        let expected_read = expected_read.min(total);
        let counted = if cache_reads_count {
            total
        } else {
            total - expected_read
        };
        tracing::debug!(
            key = %key,
            model,
            breakpoints = meta.cache_breakpoints.len(),
            estimate = total,
            expected_read,
            counted,
            "prompt cache: cache-aware input estimate"
        );
        PromptCacheEstimate {
            counted,
            expected_read,
            marks,
        }
    }

    /// Remembers the prefixes of `estimate` for their TTL from now (the server caches, or
    /// refreshes, every prefix of a request it answered).
    pub fn remember(&self, estimate: &PromptCacheEstimate) {
        let now = Instant::now();
        for &(id, ttl) in &estimate.marks {
            self.inner.prefixes.insert(id, now + ttl);
        }
    }

    /// Adds a response's cache tokens to the totals of `(key, group)`; `expected_read` is what
    /// the estimate left out.
    pub fn record_usage(
        &self,
        key: &KeyId,
        group: &RateLimitGroup,
        usage: &Usage,
        expected_read: u64,
    ) {
        self.with_counters(key, group, |counters| {
            add(&counters.read, usage.cache_read_input_tokens);
            add(&counters.write, usage.cache_creation_input_tokens);
            add(&counters.uncached, usage.input_tokens);
            add(&counters.expected_read, expected_read);
        });
    }

    /// Gives the totals of `(key, group)`, made when absent, to `record`. The totals recorded
    /// into last are used under the lock that found them (not cloned out of it: an `Arc`'s
    /// clone and drop are two locked instructions an answer). Otherwise a hit takes the read
    /// lock (the usual case: a deployment has a few keys and groups); a miss takes the write
    /// lock, and when the map is full first forgets the least recently used eighth of it
    /// (one pass over the map per `max_usage / 8` new pairs, not one per pair).
    fn with_counters(&self, key: &KeyId, group: &RateLimitGroup, record: impl FnOnce(&Counters)) {
        let inner = &self.inner;
        let last = || inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        let tick = {
            let mut guard = last();
            let tick = guard.tick;
            guard.tick += 1;
            if let Some((_, _, counters)) =
                (guard.pair.as_ref()).filter(|(k, g, _)| k.same(key) && g.same(group))
            {
                counters.used.store(tick, Ordering::Relaxed);
                record(counters);
                return;
            }
            tick
        };
        let counters = self.counters_slow(key, group);
        counters.used.store(tick, Ordering::Relaxed);
        record(&counters);
    }

    /// The totals of `(key, group)` from the map, made when absent, remembered as the last
    /// ones (see [`with_counters`](Self::with_counters)).
    #[inline(never)]
    fn counters_slow(&self, key: &KeyId, group: &RateLimitGroup) -> Arc<Counters> {
        let inner = &self.inner;
        let last = || inner.last.lock().unwrap_or_else(PoisonError::into_inner);
        let pair = Pair(key, group);
        let usage = inner.usage.read().unwrap_or_else(PoisonError::into_inner);
        // Remembered under the lock (see `Inner::last`).
        let found = usage.get(&pair).cloned().inspect(|counters| {
            last().pair = Some((key.clone(), group.clone(), counters.clone()));
        });
        drop(usage);
        if let Some(counters) = found {
            return counters;
        }
        let mut usage = inner.usage.write().unwrap_or_else(PoisonError::into_inner);
        if usage.len() >= inner.max_usage && usage.get(&pair).is_none() {
            last().pair = None;
            forget_oldest(&mut usage, inner.max_usage.div_ceil(8));
        }
        let counters = usage
            .entry((key.clone(), group.clone()))
            .or_default()
            .clone();
        last().pair = Some((key.clone(), group.clone(), counters.clone()));
        counters
    }

    /// The cache-token totals of `(key, group)`, if any response was recorded.
    pub fn usage(&self, key: &KeyId, group: &RateLimitGroup) -> Option<PromptCacheUsage> {
        self.inner
            .usage
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&Pair(key, group))
            .map(|c| c.snapshot())
    }

    /// Every `(key, group)` with recorded cache tokens, sorted by key then group.
    pub fn usages(&self) -> Vec<(KeyId, RateLimitGroup, PromptCacheUsage)> {
        let mut out: Vec<_> = self
            .inner
            .usage
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, c)| (k.0.clone(), k.1.clone(), c.snapshot()))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

/// Adds `n` to a total; an answer without cache tokens (most of them, and every one whose
/// estimate expected no cache read) leaves those totals as they are without a locked
/// instruction each.
fn add(total: &AtomicU64, n: u64) {
    if n != 0 {
        total.fetch_add(n, Ordering::Relaxed);
    }
}

/// Forgets the `count` least recently used totals of `usage` (the oldest `used` ticks).
fn forget_oldest(
    usage: &mut hashbrown::HashMap<(KeyId, RateLimitGroup), Arc<Counters>, Hasher>,
    count: usize,
) {
    let mut ticks: Vec<u64> = usage
        .values()
        .map(|c| c.used.load(Ordering::Relaxed))
        .collect();
    let count = count.min(ticks.len());
    if count == 0 {
        return;
    }
    let (_, &mut cut, _) = ticks.select_nth_unstable(count - 1);
    let mut left = count;
    usage.retain(|_, c| {
        if left > 0 && c.used.load(Ordering::Relaxed) <= cut {
            left -= 1;
            false
        } else {
            true
        }
    });
    tracing::debug!(
        forgotten = count - left,
        kept = usage.len(),
        "prompt cache: the usage totals were full; the least recently used forgotten"
    );
}

impl Counters {
    fn snapshot(&self) -> PromptCacheUsage {
        PromptCacheUsage {
            read_tokens: self.read.load(Ordering::Relaxed),
            write_tokens: self.write.load(Ordering::Relaxed),
            uncached_tokens: self.uncached.load(Ordering::Relaxed),
            expected_read_tokens: self.expected_read.load(Ordering::Relaxed),
        }
    }
}

/// The memory's id of a prefix: a 128-bit hash of the key id, the model and the prefix hash
/// (MockClaude's prompt cache uses the same ids).
pub(crate) fn prefix_id(key: &KeyId, model: &str, bp: &CacheBreakpoint) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(key.as_str().as_bytes());
    h.update(&[0]);
    h.update(model.as_bytes());
    h.update(&[0]);
    h.update(&bp.prefix.to_le_bytes());
    h.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(read: u64, write: u64, input: u64) -> Usage {
        Usage {
            cache_read_input_tokens: read,
            cache_creation_input_tokens: write,
            input_tokens: input,
            ..Default::default()
        }
    }

    #[test]
    fn totals_stay_per_memory_key_and_group() {
        let a = PromptCacheMemory::new(10);
        let b = PromptCacheMemory::new(10);
        let (k1, k2) = (KeyId::named("one"), KeyId::named("two"));
        let (g1, g2) = (RateLimitGroup::new("sonnet"), RateLimitGroup::new("haiku"));
        // Repeats and switches of memory, key and group.
        a.record_usage(&k1, &g1, &usage(1, 2, 3), 4);
        a.record_usage(&k1, &g1, &usage(10, 20, 30), 40);
        b.record_usage(&k1, &g1, &usage(100, 0, 0), 0);
        a.record_usage(&k2, &g1, &usage(1_000, 0, 0), 0);
        a.record_usage(&k2, &g2, &usage(0, 1_000, 0), 0);
        a.record_usage(&k1, &g1, &usage(5, 0, 0), 0);
        let one = |read, write, uncached, expected_read| {
            Some(PromptCacheUsage {
                read_tokens: read,
                write_tokens: write,
                uncached_tokens: uncached,
                expected_read_tokens: expected_read,
            })
        };
        assert_eq!(a.usage(&k1, &g1), one(16, 22, 33, 44));
        assert_eq!(b.usage(&k1, &g1), one(100, 0, 0, 0));
        assert_eq!(a.usage(&k2, &g1), one(1_000, 0, 0, 0));
        assert_eq!(a.usage(&k2, &g2), one(0, 1_000, 0, 0));
        assert_eq!(b.usage(&k2, &g1), None);
        // A memory dropped and another made (perhaps at the same address): nothing carried.
        drop(b);
        let c = PromptCacheMemory::new(10);
        c.record_usage(&k1, &g1, &usage(7, 0, 0), 0);
        assert_eq!(c.usage(&k1, &g1), one(7, 0, 0, 0));
        assert_eq!(c.usages().len(), 1);
    }

    /// An answer without cache tokens (nothing added to three of the four totals) still
    /// counts its uncached tokens and makes its pair known, as one with cache tokens does;
    /// zeros never disturb totals recorded before or after them.
    #[test]
    fn an_answer_without_cache_tokens_is_recorded() {
        let memory = PromptCacheMemory::new(10);
        let (k, g) = (KeyId::named("one"), RateLimitGroup::new("sonnet"));
        memory.record_usage(&k, &g, &usage(0, 0, 0), 0);
        assert_eq!(memory.usage(&k, &g), Some(PromptCacheUsage::default()));
        assert_eq!(memory.usages().len(), 1);
        memory.record_usage(&k, &g, &usage(0, 0, 12), 0);
        memory.record_usage(&k, &g, &usage(3, 4, 5), 6);
        memory.record_usage(&k, &g, &usage(0, 0, 7), 0);
        let totals = memory.usage(&k, &g).unwrap();
        assert_eq!(
            (totals.read_tokens, totals.write_tokens),
            (3, 4),
            "{totals:?}"
        );
        assert_eq!(
            (totals.uncached_tokens, totals.expected_read_tokens),
            (24, 6)
        );
    }

    /// A body settled by a thread-local destructor as its thread exits: recorded, no panic
    /// (the totals once had a per-thread hint, which is destroyed first).
    #[test]
    fn totals_are_recorded_while_a_thread_exits() {
        struct SettleOnExit(PromptCacheMemory);
        impl Drop for SettleOnExit {
            fn drop(&mut self) {
                let (key, group) = (KeyId::named("one"), RateLimitGroup::new("sonnet"));
                self.0.record_usage(&key, &group, &usage(5, 0, 0), 0);
            }
        }
        use std::cell::RefCell;
        thread_local! {
            static ON_EXIT: RefCell<Option<SettleOnExit>> = const { RefCell::new(None) };
        }
        let memory = PromptCacheMemory::new(10);
        let (key, group) = (KeyId::named("one"), RateLimitGroup::new("sonnet"));
        let in_thread = memory.clone();
        std::thread::spawn(move || {
            ON_EXIT.with_borrow_mut(|o| *o = Some(SettleOnExit(in_thread.clone())));
            in_thread.record_usage(&key, &group, &usage(1, 0, 0), 0);
        })
        .join()
        .unwrap();
        let (key, group) = (KeyId::named("one"), RateLimitGroup::new("sonnet"));
        assert_eq!(memory.usage(&key, &group).unwrap().read_tokens, 6);
    }

    /// A full map forgets the least recently used totals (an eighth of the bound at once),
    /// never the ones in use; a pair forgotten starts again from zero.
    #[test]
    fn full_totals_forget_the_least_recently_used() {
        let mut memory = PromptCacheMemory::new(10);
        Arc::get_mut(&mut memory.inner).unwrap().max_usage = 16;
        let group = RateLimitGroup::new("sonnet");
        let key = |i: usize| KeyId::named(&format!("k{i}"));
        for i in 0..16 {
            memory.record_usage(&key(i), &group, &usage(1, 0, 0), 0);
        }
        // k0 and k1 used again: k2 and k3 are now the least recently used.
        memory.record_usage(&key(0), &group, &usage(1, 0, 0), 0);
        memory.record_usage(&key(1), &group, &usage(1, 0, 0), 0);
        memory.record_usage(&key(16), &group, &usage(1, 0, 0), 0);
        let kept: Vec<_> = memory.usages().into_iter().map(|(k, _, _)| k).collect();
        assert_eq!(kept.len(), 15);
        assert!(!kept.contains(&key(2)) && !kept.contains(&key(3)));
        assert_eq!(memory.usage(&key(0), &group).unwrap().read_tokens, 2);
        assert_eq!(memory.usage(&key(16), &group).unwrap().read_tokens, 1);
        memory.record_usage(&key(2), &group, &usage(5, 0, 0), 0);
        assert_eq!(memory.usage(&key(2), &group).unwrap().read_tokens, 5);
    }

    /// The totals recorded into last are found again by the same shared names (and only by
    /// them): answers of one pair, switches between pairs, the same names in other `Arc`s,
    /// and a pair forgotten while it was the last one recorded each count where a look-up in
    /// the map alone would.
    #[test]
    fn the_last_totals_count_where_the_map_would() {
        let mut memory = PromptCacheMemory::new(10);
        Arc::get_mut(&mut memory.inner).unwrap().max_usage = 1;
        let (a, b) = (KeyId::named("a"), KeyId::named("b"));
        let (g, h) = (RateLimitGroup::new("g"), RateLimitGroup::new("h"));
        memory.record_usage(&a, &g, &usage(1, 0, 0), 0);
        memory.record_usage(&a, &g, &usage(2, 0, 0), 0);
        assert_eq!(memory.usage(&a, &g).unwrap().read_tokens, 3);
        // A bound of one: each new pair forgets the last one, and starts from zero.
        memory.record_usage(&a, &h, &usage(4, 0, 0), 0);
        assert_eq!(memory.usage(&a, &g), None);
        assert_eq!(memory.usage(&a, &h).unwrap().read_tokens, 4);
        memory.record_usage(&a, &g, &usage(8, 0, 0), 0);
        assert_eq!(memory.usage(&a, &g).unwrap().read_tokens, 8);
        assert_eq!(memory.usage(&a, &h), None);
        // The same names in other `Arc`s are the same pair.
        memory.record_usage(
            &KeyId::named("a"),
            &RateLimitGroup::new("g"),
            &usage(16, 0, 0),
            0,
        );
        assert_eq!(memory.usage(&a, &g).unwrap().read_tokens, 24);
        memory.record_usage(&a, &g, &usage(32, 0, 0), 0);
        assert_eq!(memory.usage(&a, &g).unwrap().read_tokens, 56);
        // Room for many: switching pairs keeps each one's totals.
        Arc::get_mut(&mut memory.inner).unwrap().max_usage = 100;
        for round in 0..3u64 {
            for (k, grp) in [(&a, &g), (&b, &g), (&a, &h), (&b, &h)] {
                memory.record_usage(k, grp, &usage(1 + round, 0, 0), 0);
                memory.record_usage(k, grp, &usage(1, 0, 0), 0);
            }
        }
        assert_eq!(memory.usage(&a, &g).unwrap().read_tokens, 56 + 9);
        for (k, grp) in [(&b, &g), (&a, &h), (&b, &h)] {
            assert_eq!(memory.usage(k, grp).unwrap().read_tokens, 9);
        }
    }
}
