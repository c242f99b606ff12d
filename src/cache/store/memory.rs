//! In-process store: a few shards of a map and a CLOCK ring each, bounded by weight.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as IndexEntry;
use tokio::time::Instant;

use super::{CacheStore, CachedResponse, ModelSet, StoreError, StoreFuture};
use crate::cache::key::KeyHashBuilder;
use crate::cache::{CacheKey, CacheSecret};

/// An answer held, in its slot (no allocation of its own: a lookup clones the response under
/// the shard's lock, which is two `Bytes` and a name shared).
struct Entry {
    response: CachedResponse,
    expires_at: Instant,
}

impl Entry {
    /// What the entry counts for in the bound ([`CachedResponse::weight`]: read from the
    /// response, not kept beside it, so that a slot is 8 bytes smaller).
    fn weight(&self) -> u64 {
        self.response.weight() as u64
    }
}

/// One slot of a shard's ring.
struct Slot {
    key: CacheKey,
    /// `None`: a free slot (its index is in `Shard::free`).
    entry: Option<Entry>,
    /// Looked up since the clock hand last passed: spared once.
    referenced: bool,
}

/// A part of the store: its keys map to slots of a ring that a clock hand walks to evict.
#[derive(Default)]
struct Shard {
    /// Where each key's slot is: the slot's index and 32 bits of the key's hash ([`hash32`]),
    /// 8 bytes a bucket. The key itself is only in the slot (a map from key to index held it
    /// twice: 36-byte buckets, 4.5× the memory, copied at every doubling). With the hash in
    /// the bucket, a probe whose tag matches by chance reads no slot, and the index grows
    /// without reading any.
    index: HashTable<(u32, u32)>,
    slots: Ring,
    free: Vec<u32>,
    /// The clock hand: the next slot to consider for eviction.
    hand: usize,
    /// The next slot checked for expiry (two per insert, while an entry may have expired).
    sweep: usize,
    /// No entry held expires before this (`None`: none was put since it was last raised).
    /// Lowered by every insert, raised when the sweep ends a lap of the ring.
    earliest: Option<Instant>,
    /// The least expiry of the entries the sweep passed in its current lap and of those put
    /// since the lap began: `earliest` once the lap ends.
    lap_earliest: Option<Instant>,
    weight: u64,
    max: u64,
}

impl Shard {
    /// The slot of `key` (`h`: its [`hash32`]). In line: asked on every lookup and every
    /// put (a call was ~40 instructions of a memory-store miss, mk18).
    #[inline]
    fn find(&self, key: &CacheKey, h: u32) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(spread(h), |&(at, tag)| {
                tag == h && slots[at as usize].key == *key
            })
            .map(|&(at, _)| at as usize)
    }

    fn remove_slot(&mut self, at: usize) -> Option<Entry> {
        let slot = &mut self.slots[at];
        let entry = slot.entry.take()?;
        let h = hash32(&slot.key);
        if let Ok(found) = self.index.find_entry(spread(h), |&(i, _)| i as usize == at) {
            found.remove();
        }
        self.weight -= entry.weight();
        self.free.push(at as u32);
        Some(entry)
    }

    /// Evicts one entry: the first, from the hand on, that is expired or was not looked up
    /// since the hand last passed (the referenced ones it passes lose their mark). `false`
    /// when the shard is empty.
    fn evict_one(&mut self, now: Instant) -> bool {
        if self.index.is_empty() {
            return false;
        }
        loop {
            let at = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let slot = &mut self.slots[at];
            let Some(entry) = &slot.entry else { continue };
            if slot.referenced && now < entry.expires_at {
                slot.referenced = false;
                continue;
            }
            // Dropped outside the lock would be better for a large entry; its memory is
            // returned to the allocator either way (a few hundred instructions).
            drop(self.remove_slot(at));
            return true;
        }
    }

    /// Frees up to two expired entries after the sweep cursor: the memory of expired entries
    /// is given back while the store is used, not only when the bound is reached.
    ///
    /// Nothing is read while no entry can have expired (`earliest` is still ahead): the slots
    /// the cursor reaches were written long before, and reading them was most of the time of
    /// an insert into a large store (a cache miss per slot; `perf annotate`, issue 13).
    fn sweep(&mut self, now: Instant) {
        if self.earliest.is_none_or(|earliest| now < earliest) {
            return;
        }
        for _ in 0..2 {
            if self.slots.is_empty() {
                return;
            }
            let at = self.sweep % self.slots.len();
            self.sweep = at + 1;
            if at == 0 {
                // A lap ended: every entry held was passed in it or put since it began.
                self.earliest = self.lap_earliest.take();
            }
            let Some(expires_at) = self.slots[at].entry.as_ref().map(|e| e.expires_at) else {
                continue;
            };
            if now >= expires_at {
                drop(self.remove_slot(at));
            } else {
                self.lap_earliest = Some(earlier(self.lap_earliest, expires_at));
            }
        }
    }

    /// Puts `entry` under `key` (`h`: its [`hash32`]).
    fn insert(&mut self, key: CacheKey, h: u32, entry: Entry, weight: u64, now: Instant) {
        self.sweep(now);
        self.earliest = Some(earlier(self.earliest, entry.expires_at));
        self.lap_earliest = Some(earlier(self.lap_earliest, entry.expires_at));
        let slot = Slot {
            key,
            entry: Some(entry),
            referenced: false,
        };
        let slots = &self.slots;
        let held = |&(at, tag): &(u32, u32)| tag == h && slots[at as usize].key == key;
        match self.index.entry(spread(h), held, rehash) {
            IndexEntry::Occupied(found) => {
                let old = &mut self.slots[found.get().0 as usize];
                let replaced = old.entry.as_ref().map_or(0, Entry::weight);
                self.weight = self.weight - replaced + weight;
                *old = slot;
            }
            // Room without evicting (a store that is not full): one probe of the map.
            IndexEntry::Vacant(vacant) if self.weight + weight <= self.max => {
                vacant.insert((place(&mut self.slots, &mut self.free, slot), h));
                self.weight += weight;
            }
            IndexEntry::Vacant(_) => {
                // The new entry is not in the ring yet: the hand cannot evict it.
                while self.weight + weight > self.max && self.evict_one(now) {}
                let at = place(&mut self.slots, &mut self.free, slot);
                self.index.insert_unique(spread(h), (at, h), rehash);
                self.weight += weight;
            }
        }
        // Another entry replaced by a heavier one may leave the shard over its bound.
        while self.weight > self.max && self.evict_one(now) {}
    }
}

/// The 32 bits of a key's hash that its shard's index uses (the shard is picked by the other
/// 32: see [`MemoryStore::shard`]). Keys are BLAKE3 digests: folded, not hashed again (see
/// `KeyHasher`).
fn hash32(key: &CacheKey) -> u32 {
    KeyHashBuilder::default().hash_one(key) as u32
}

/// The index's hash of a key's [`hash32`]: `hashbrown` picks a bucket by the low bits and a
/// 7-bit tag by the top ones, so the 32 bits are in both halves (they would share bits only
/// in an index of 2^25 buckets or more).
fn spread(h: u32) -> u64 {
    (u64::from(h) << 32) | u64::from(h)
}

/// An index bucket's hash, when the index grows: from the bits it keeps (no slot read).
fn rehash(&(_, h): &(u32, u32)) -> u64 {
    spread(h)
}

/// The earlier of a bound (`None`: none yet) and `at`.
fn earlier(bound: Option<Instant>, at: Instant) -> Instant {
    bound.map_or(at, |bound| bound.min(at))
}

/// Puts `slot` in a free slot of the ring, or a new one; returns where.
#[inline(always)]
fn place(slots: &mut Ring, free: &mut Vec<u32>, slot: Slot) -> u32 {
    match free.pop() {
        Some(at) => {
            slots[at as usize] = slot;
            at
        }
        None => slots.push(slot),
    }
}

/// The slots of a shard's ring, in chunks of [`CHUNK`] that never move: a slot holds its
/// entry (no allocation of its own), and a growing store adds a chunk instead of copying
/// every slot into a vector twice the size (which, with entries in their slots, cost more
/// per answer stored than the allocation it saved while a store fills).
#[derive(Default)]
struct Ring {
    chunks: Vec<Vec<Slot>>,
    len: usize,
}

/// Slots per chunk of a [`Ring`].
const CHUNK: usize = 256;

impl Ring {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a slot at the end; returns where.
    fn push(&mut self, slot: Slot) -> u32 {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(slot),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(slot);
                self.chunks.push(chunk);
            }
        }
        self.len += 1;
        (self.len - 1) as u32
    }
}

impl std::ops::Index<usize> for Ring {
    type Output = Slot;

    fn index(&self, at: usize) -> &Slot {
        &self.chunks[at / CHUNK][at % CHUNK]
    }
}

impl std::ops::IndexMut<usize> for Ring {
    fn index_mut(&mut self, at: usize) -> &mut Slot {
        &mut self.chunks[at / CHUNK][at % CHUNK]
    }
}

/// An in-memory store bounded by bytes: a few shards, each a hash map from key to a slot of
/// a ring, evicted in CLOCK order (an approximation of least recently used: the hand walks
/// the ring and evicts the first entry that was not looked up since it last passed, or that
/// has expired).
///
/// The bound counts what entries really cost ([`CachedResponse::weight`]: body, headers, the
/// model name, and a measured fixed overhead for the key, the maps and the store's
/// bookkeeping), so the process's resident memory for the cache follows the bound (measured
/// in `docs/benchmarks.md`: 1M distinct requests through the proxy). An entry heavier than
/// a shard's part of the bound (an eighth of it at most) is not stored.
///
/// A lookup is a lock of one shard and a map probe; storing puts the entry in a slot of the
/// ring (the slot holds it: no allocation of its own, and the ring grows by chunks of slots
/// that never move) and evicts what the bound needs (this store was on
/// `moka` until issue 13's cm13 pass: its insert and the lookup of a missing key with their
/// housekeeping cost ~2.7k instructions of every cache miss; see `docs/benchmarks.md`).
///
/// Time to live: each entry records its expiry as a [`tokio::time::Instant`], checked on
/// every lookup, so an entry is never served past its TTL and under
/// `#[tokio::test(start_paused = true)]` TTLs follow `tokio::time::advance`. Expired entries
/// are freed when looked up, when the clock hand passes them, and two slots per insert by a
/// sweep that walks the ring once an entry may have expired (each shard keeps a bound under
/// the expiry of every entry it holds: until then the sweep reads nothing).
///
/// Clones share the same store.
///
/// ```
/// use tower_claude::cache::MemoryStore;
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // 64 MiB
/// assert_eq!(store.entry_count(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shards: Arc<[Mutex<Shard>]>,
    /// The models of every entry ever put (see [`CacheStore::may_hold_other_models`]).
    models: Arc<ModelSet>,
    /// Random, of this store: its entries do not outlive the process.
    secret: CacheSecret,
}

/// A shard holds at least this much of the bound (so that a large entry fits one), and
/// there are at most [`MAX_SHARDS`].
const SHARD_BYTES: u64 = 32 * 1024 * 1024;
const MAX_SHARDS: u64 = 8;

impl MemoryStore {
    /// A store whose entries weigh ([`CachedResponse::weight`]) at most about `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let shards = (max_bytes / SHARD_BYTES).clamp(1, MAX_SHARDS);
        // A power of two, to pick a shard with a mask.
        let shards = 1u64 << (63 - shards.leading_zeros());
        let max = max_bytes / shards;
        Self {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        max,
                        ..Shard::default()
                    })
                })
                .collect(),
            models: Arc::default(),
            secret: CacheSecret::random(),
        }
    }

    /// The number of entries.
    pub fn entry_count(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).index.len() as u64).sum()
    }

    /// The total weight of the entries in bytes.
    pub fn weighted_size(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).weight).sum()
    }

    /// The shard of `key`, locked, and the key's [`hash32`] for its index.
    fn shard(&self, key: &CacheKey) -> (MutexGuard<'_, Shard>, u32) {
        // Keys are BLAKE3 digests: folded, not hashed again (see `KeyHasher`); the index in
        // the shard uses the low bits, the shard the high ones.
        let h = KeyHashBuilder::default().hash_one(key);
        let shard = lock(&self.shards[(h >> 32) as usize & (self.shards.len() - 1)]);
        (shard, h as u32)
    }

    fn find(&self, key: &CacheKey) -> Option<CachedResponse> {
        let (mut shard, h) = self.shard(key);
        let at = shard.find(key, h)?;
        let slot = &mut shard.slots[at];
        let entry = slot.entry.as_ref()?;
        // The clock is read only for a key that is held (a miss does not read it).
        if Instant::now() < entry.expires_at {
            slot.referenced = true;
            return Some(entry.response.clone());
        }
        // Expired: freed now, its memory given back outside the lock.
        let removed = shard.remove_slot(at);
        drop(shard);
        drop(removed);
        None
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.entry_count())
            .field("weighted_size", &self.weighted_size())
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
        let now = Instant::now();
        // `Instant + Duration` panics on overflow; a TTL too large to represent is "forever".
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let weight = value.weight() as u64;
        self.models.record_shared(value.shared_model());
        let (mut shard, h) = self.shard(key);
        if weight > shard.max {
            tracing::debug!(key = %key, weight, "cache entry heavier than the store's shard: not stored");
            return Box::pin(Done);
        }
        let entry = Entry {
            response: value,
            expires_at,
        };
        shard.insert(*key, h, entry, weight, now);
        Box::pin(Done)
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        let (mut shard, h) = self.shard(key);
        if let Some(at) = shard.find(key, h) {
            let removed = shard.remove_slot(at);
            drop(shard);
            drop(removed);
        }
        Box::pin(Done)
    }

    /// `put` inserts at call time (a map insert).
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

    /// The `i`-th of a run of distinct keys.
    fn key(i: u64) -> CacheKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        CacheKey::from_bytes(k)
    }

    impl Shard {
        /// Where `key`'s entry is held.
        fn slot_of(&self, key: &CacheKey) -> Option<usize> {
            self.find(key, hash32(key))
        }
    }

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

    /// The clock: an entry looked up since the hand last passed survives an eviction that
    /// takes one that was not; the bound holds across shards and replacements.
    #[tokio::test]
    async fn eviction_spares_what_was_looked_up() {
        // 1 MiB: one shard. Entries of ~10 KB: about 100 fit.
        let store = MemoryStore::new(1 << 20);
        let w = resp(10_000).weight() as u64;
        let fit = (1 << 20) / w;
        for i in 0..fit {
            store
                .put(&key(i), resp(10_000), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert_eq!(store.entry_count(), fit);
        // Entry 0 is looked up; the next put evicts one entry: 1 (the first not looked up).
        assert!(store.get(&key(0)).await.unwrap().is_some());
        store
            .put(&key(fit), resp(10_000), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(store.get(&key(0)).await.unwrap().is_some(), "spared once");
        assert!(store.get(&key(1)).await.unwrap().is_none(), "evicted");
        assert_eq!(store.entry_count(), fit);
        // Many more: the bound holds, and a replacement by a heavier entry evicts too.
        for i in fit + 1..fit * 5 {
            store
                .put(&key(i), resp(10_000), Duration::from_secs(60))
                .await
                .unwrap();
            assert!(store.weighted_size() <= 1 << 20);
        }
        store
            .put(&key(fit * 5 - 1), resp(300_000), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(store.weighted_size() <= 1 << 20);
        assert!(store.get(&key(fit * 5 - 1)).await.unwrap().is_some());
        // Too heavy for the store: not stored, nothing evicted.
        let before = store.entry_count();
        store
            .put(&key(u64::MAX), resp(2 << 20), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(store.get(&key(u64::MAX)).await.unwrap().is_none());
        assert_eq!(store.entry_count(), before);
        // A large bound has several shards: the bound is theirs together.
        let big = MemoryStore::new(512 << 20);
        assert_eq!(big.shards.len(), 8);
        for i in 0..1_000 {
            big.put(&key(i), resp(10), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert_eq!(big.entry_count(), 1_000);
        for i in 0..1_000 {
            assert!(big.get(&key(i)).await.unwrap().is_some());
        }
        big.remove(&key(7)).await.unwrap();
        assert_eq!(big.entry_count(), 999);
        assert_eq!(big.weighted_size(), 999 * resp(10).weight() as u64);
    }

    /// A shard's ring spans several chunks: every entry is found where it was put, a freed
    /// slot is reused, and the clock hand walks across the chunks when the bound is reached.
    #[tokio::test]
    async fn a_ring_of_several_chunks() {
        let n = 3 * CHUNK as u64 + 7;
        // One shard, room for exactly `n` entries.
        let store = MemoryStore::new(n * resp(10).weight() as u64);
        assert_eq!(store.shards.len(), 1);
        for i in 0..n {
            store
                .put(&key(i), resp(10), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert_eq!(store.entry_count(), n);
        assert_eq!(lock(&store.shards[0]).slots.chunks.len(), 4);
        for i in 0..n {
            assert!(store.get(&key(i)).await.unwrap().is_some(), "{i}");
        }
        // A removed entry's slot (in the second chunk) is the next one used.
        store.remove(&key(CHUNK as u64 + 3)).await.unwrap();
        store
            .put(&key(n), resp(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lock(&store.shards[0]).slots.len(), n as usize);
        assert_eq!(
            lock(&store.shards[0]).slot_of(&key(n)),
            Some(CHUNK + 3),
            "the freed slot"
        );
        // Full: each new entry evicts one (all were looked up once: the hand clears their
        // marks around the whole ring, then evicts), and the bound holds.
        for i in n + 1..n + 2 * CHUNK as u64 {
            store
                .put(&key(i), resp(10), Duration::from_secs(60))
                .await
                .unwrap();
            assert!(store.weighted_size() <= n * resp(10).weight() as u64);
        }
        assert!(
            store
                .get(&key(n + 2 * CHUNK as u64 - 1))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(lock(&store.shards[0]).slots.len(), n as usize);
    }

    /// The sweep reads nothing while no entry can have expired, and the bound it waits for
    /// follows every put: an entry with a shorter TTL than those before it is swept once it
    /// expires, also one put behind the sweep's cursor in its lap (the lap's end raises the
    /// bound to the least expiry the lap saw, which must count the puts made during it).
    #[tokio::test(start_paused = true)]
    async fn the_sweep_waits_for_an_expiry() {
        // 1 MiB: one shard.
        let store = MemoryStore::new(1 << 20);
        let put = |k: u64, secs: u64| store.put(&key(k), resp(10), Duration::from_secs(secs));
        let held = |k: u64| lock(&store.shards[0]).slot_of(&key(k)).is_some();
        for k in 0..10 {
            put(k, 3600).await.unwrap();
        }
        assert_eq!(lock(&store.shards[0]).sweep, 0, "nothing can have expired");
        // Slot 10, expiring first.
        put(100, 5).await.unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        // Each put sweeps two slots from slot 0: the sixth frees slot 10 and takes it.
        for k in 10..15 {
            put(k, 3600).await.unwrap();
        }
        assert!(held(100));
        put(101, 5).await.unwrap();
        assert!(!held(100), "swept once expired");
        assert_eq!(
            lock(&store.shards[0]).slot_of(&key(101)),
            Some(10),
            "behind the cursor"
        );
        assert!(lock(&store.shards[0]).sweep > 10);
        // The lap ends (the bound is raised) and the next one reaches slot 10 again.
        tokio::time::advance(Duration::from_secs(6)).await;
        for k in 200..240 {
            put(k, 3600).await.unwrap();
        }
        assert!(
            !held(101),
            "swept once expired, after the lap it was put in"
        );
        assert_eq!(store.entry_count(), 55);
    }

    /// What an entry costs the store beyond its response: its slot (the key, the response and
    /// its expiry, no weight beside them) and its bucket in the shard's index (the slot's index
    /// and 32 bits of the key's hash, not the key again).
    #[test]
    fn an_entry_costs_a_slot_and_eight_bytes_of_index() {
        assert!(
            std::mem::size_of::<Slot>() <= 144,
            "{}",
            std::mem::size_of::<Slot>()
        );
        assert_eq!(std::mem::size_of::<(u32, u32)>(), 8);
    }

    /// The index finds every key through its growth and after removals (of keys that are
    /// BLAKE3 digests, as the layer's are, and of keys that differ in one byte).
    #[tokio::test]
    async fn the_index_finds_every_key_as_it_grows_and_shrinks() {
        let store = MemoryStore::new(1 << 30);
        let digest = |i: u64| CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes());
        let n = 20_000;
        for i in 0..n {
            let k = if i % 2 == 0 { digest(i) } else { key(i) };
            store
                .put(&k, resp(1), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert_eq!(store.entry_count(), n);
        for i in (0..n).step_by(3) {
            let k = if i % 2 == 0 { digest(i) } else { key(i) };
            store.remove(&k).await.unwrap();
        }
        for i in 0..n {
            let k = if i % 2 == 0 { digest(i) } else { key(i) };
            let found = store.get(&k).await.unwrap().is_some();
            assert_eq!(found, i % 3 != 0, "{i}");
        }
        assert_eq!(store.entry_count(), n - n.div_ceil(3));
        assert_eq!(
            store.weighted_size(),
            (n - n.div_ceil(3)) * resp(1).weight() as u64
        );
    }

    /// Expired entries are freed while the store is used (two per put), not only when
    /// looked up or when the bound is reached.
    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept_by_puts() {
        let store = MemoryStore::new(1 << 20);
        for i in 0..10u8 {
            store
                .put(
                    &CacheKey::from_bytes([i; 32]),
                    resp(10),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for i in 10..16u8 {
            store
                .put(
                    &CacheKey::from_bytes([i; 32]),
                    resp(10),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
        }
        // Six puts swept twelve slots: the ten expired entries are gone, the six fresh stay.
        assert_eq!(store.entry_count(), 6);
        assert_eq!(store.weighted_size(), 6 * resp(10).weight() as u64);
    }
}
