//! Where cached responses live: the [`CacheStore`] trait and its backends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{CacheKey, CacheSecret};

mod memory;
pub use memory::MemoryStore;

#[cfg(feature = "disk-cache")]
mod disk;
#[cfg(feature = "disk-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk-cache")))]
pub use disk::DiskStore;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;

/// The future returned by [`CacheStore`] methods: boxed, `Send` and `'static`, so that stores
/// can be used as trait objects and do network I/O.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// A backend for [`CacheLayer`](super::CacheLayer): a map from [`CacheKey`] to
/// [`CachedResponse`] with a time to live per entry.
///
/// Methods take `&self` and return `'static` futures (implementations clone the handles they
/// need), so a store can be shared behind an `Arc` and can be asynchronous (a network store).
/// The layer treats a failing `get` as a miss and a failing `put` as "not stored": a store
/// error never fails a request. A store must never return an expired entry.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::cache::{CacheKey, CacheStore, CachedResponse, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new(1 << 20);
/// let key = CacheKey::from_bytes([1; 32]);
/// let resp = CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), "{}".into(), false);
/// store.put(&key, resp.clone(), Duration::from_secs(60)).await.unwrap();
/// assert_eq!(store.get(&key).await.unwrap(), Some(resp));
/// store.remove(&key).await.unwrap();
/// assert_eq!(store.get(&key).await.unwrap(), None);
/// # }
/// ```
pub trait CacheStore: Send + Sync + 'static {
    /// The entry for `key`, if there is one that has not expired. An entry that cannot be
    /// decoded is a miss (`Ok(None)`) and should be removed.
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>>;

    /// Stores `value` under `key` for `ttl`, replacing any previous entry. A store may refuse
    /// an entry (too large) silently.
    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()>;

    /// What [`get`](Self::get) would resolve to, when the store can tell at once without
    /// waiting (an in-process map, an index held in memory); `None` when only `get` can tell
    /// (a network store). Default `None`.
    ///
    /// The [`CacheLayer`](super::CacheLayer) settles a request whose lookup this answers in
    /// its `call`, without an asynchronous step of its own: a hit is answered at once, and a
    /// miss goes to the inner service without a boxed future or a clone of the service.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_claude::cache::{CacheKey, CacheStore, CachedResponse, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new(1 << 20);
    /// let key = CacheKey::from_bytes([1; 32]);
    /// assert_eq!(store.get_now(&key).unwrap().unwrap(), None);
    /// let resp = CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), "{}".into(), false);
    /// store.put(&key, resp.clone(), Duration::from_secs(60)).await.unwrap();
    /// assert_eq!(store.get_now(&key).unwrap().unwrap(), Some(resp));
    /// # }
    /// ```
    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<CachedResponse>, StoreError>> {
        let _ = key;
        None
    }

    /// Removes the entry for `key`, if any.
    fn remove(&self, key: &CacheKey) -> StoreFuture<()>;

    /// Whether [`put`](Self::put) does its work at call time, at the cost of a map insert (an
    /// in-process store): the layer then stores answers inline instead of queuing them for its
    /// background writer, which saves a task wake-up per answer. Default `false`.
    fn writes_at_once(&self) -> bool {
        false
    }

    /// Whether the store may hold an entry written by a model other than `model` (see
    /// [`CachedResponse::model`]; an entry without a recorded model counts as any model).
    ///
    /// On a miss, the [`CacheLayer`](super::CacheLayer) asks this before it asks the fallback
    /// layer whether another model's answer may be served now, a fallback decision that costs
    /// about 7k instructions for a three-model chain: `false` skips that question. A store
    /// must answer `false` only when it is certain; the default is `true`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_claude::cache::{CacheKey, CacheStore, CachedResponse, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new(1 << 20);
    /// assert!(!store.may_hold_other_models("claude-opus-4-7"));
    /// let answer = CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), "{}".into(), false)
    ///     .with_model("claude-sonnet-4-6");
    /// store.put(&CacheKey::from_bytes([1; 32]), answer, Duration::from_secs(60)).await.unwrap();
    /// assert!(store.may_hold_other_models("claude-opus-4-7"));
    /// assert!(!store.may_hold_other_models("claude-sonnet-4-6"));
    /// # }
    /// ```
    fn may_hold_other_models(&self, model: &str) -> bool {
        let _ = model;
        true
    }

    /// The secret of the keys of this store's entries, when the store keeps one: a store
    /// whose entries outlive the process (a file) or are shared between processes (a server)
    /// should keep its secret with them, so that every [`CacheLayer`](super::CacheLayer) over
    /// it derives the same keys. [`MemoryStore`] has a random one of its own, `DiskStore`
    /// keeps one in its file, `RedisStore` shares one through the server. Default `None`: the
    /// layer then uses a random secret of its own, and entries written by another process
    /// (or before a restart) are unreachable. [`CacheLayer::secret`] overrides it.
    ///
    /// It is asked once, when the layer is built.
    ///
    /// [`CacheLayer::secret`]: super::CacheLayer::secret
    ///
    /// ```
    /// use tower_claude::cache::{CacheStore, MemoryStore};
    ///
    /// let a = MemoryStore::new(1 << 20);
    /// assert_eq!(a.secret(), a.secret());
    /// assert_ne!(a.secret(), MemoryStore::new(1 << 20).secret());
    /// ```
    fn secret(&self) -> Option<CacheSecret> {
        None
    }

    /// Stores several entries at once. The [`CacheLayer`](super::CacheLayer) stores answers
    /// in batches from a background task, so a store that can write a batch in one go (one
    /// transaction, one round trip) should override this; the default stores the entries one
    /// after the other and reports the first error after trying them all.
    fn put_batch(&self, entries: Vec<(CacheKey, CachedResponse, Duration)>) -> StoreFuture<()> {
        let puts: Vec<_> = entries
            .into_iter()
            .map(|(key, value, ttl)| self.put(&key, value, ttl))
            .collect();
        Box::pin(async move {
            let mut first = Ok(());
            for put in puts {
                if let Err(e) = put.await {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
            first
        })
    }

    /// [`put_batch`](Self::put_batch) of entries that the caller shares: the
    /// [`CacheLayer`](super::CacheLayer)'s write queue keeps serving each entry until it is
    /// written, so it hands the store an `Arc` of it. The default copies each entry still shared
    /// and calls `put_batch`; a store that only reads the entries (to encode them) should
    /// override it and save the copy (`DiskStore` does: ~1k instructions per stored answer).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use tower_claude::cache::{CacheKey, CacheStore, CachedResponse, MemoryStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = MemoryStore::new(1 << 20);
    /// let key = CacheKey::from_bytes([1; 32]);
    /// let resp = Arc::new(CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), "{}".into(), false));
    /// store.put_batch_shared(vec![(key, resp.clone(), Duration::from_secs(60))]).await.unwrap();
    /// assert_eq!(store.get(&key).await.unwrap().as_ref(), Some(&*resp));
    /// # }
    /// ```
    fn put_batch_shared(
        &self,
        entries: Vec<(CacheKey, Arc<CachedResponse>, Duration)>,
    ) -> StoreFuture<()> {
        self.put_batch(
            entries
                .into_iter()
                .map(|(key, entry, ttl)| (key, Arc::unwrap_or_clone(entry), ttl))
                .collect(),
        )
    }
}

impl<T: CacheStore + ?Sized> CacheStore for Arc<T> {
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
        (**self).get(key)
    }

    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
        (**self).put(key, value, ttl)
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        (**self).remove(key)
    }

    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<CachedResponse>, StoreError>> {
        (**self).get_now(key)
    }

    fn put_batch(&self, entries: Vec<(CacheKey, CachedResponse, Duration)>) -> StoreFuture<()> {
        (**self).put_batch(entries)
    }

    fn put_batch_shared(
        &self,
        entries: Vec<(CacheKey, Arc<CachedResponse>, Duration)>,
    ) -> StoreFuture<()> {
        (**self).put_batch_shared(entries)
    }

    fn writes_at_once(&self) -> bool {
        (**self).writes_at_once()
    }

    fn may_hold_other_models(&self, model: &str) -> bool {
        (**self).may_hold_other_models(model)
    }

    fn secret(&self) -> Option<CacheSecret> {
        (**self).secret()
    }
}

/// A stored response: status, a filtered set of headers, the complete body, whether the body
/// is an SSE stream (replayed as such), and the model that produced it.
///
/// Only headers that describe the answer are kept (see [`CachedResponse::keeps_header`]); no
/// request data and no secret is ever part of an entry. The kept headers are held as bytes,
/// laid out as in [`encode`](Self::encode)'s output (one allocation, no header map: a miss
/// stores an entry far more often than a hit reads one), and [`headers`](Self::headers) makes
/// a map of them. They and the body are copied into allocations of their own: a header value
/// parsed by hyper is a slice of the connection's read buffer, and an entry holding such a
/// slice would keep the whole buffer (kilobytes) alive for as long as it is cached.
///
/// ```
/// use tower_claude::cache::CachedResponse;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("content-type", "application/json".parse().unwrap());
/// headers.insert("set-cookie", "session=1".parse().unwrap());
/// let resp = CachedResponse::new(http::StatusCode::OK, headers, "{}".into(), false);
/// assert!(resp.headers().get("set-cookie").is_none());
/// assert_eq!(resp.headers()["content-type"], "application/json");
/// let decoded = CachedResponse::decode(&resp.encode()).unwrap();
/// assert_eq!(decoded, resp);
/// ```
#[derive(Clone)]
pub struct CachedResponse {
    status: StatusCode,
    /// The kept headers as [`encode`](Self::encode) writes them: their count, then each name
    /// and value, length-prefixed (u32, little endian). Valid names and values only.
    head: Bytes,
    /// Bit `i`: the `i`-th kept header was marked sensitive (the first 32; not encoded).
    sensitive: u32,
    body: Bytes,
    stream: bool,
    /// Shared: the cache's miss takes it from the fallback layer's [`ServedModel`] or the
    /// request's catalogue entry without a copy, and a hit clones it without one.
    ///
    /// [`ServedModel`]: crate::fallback::ServedModel
    model: Option<Arc<str>>,
}

/// Equal when status, headers (in order, names and values; not the sensitive flags, which
/// the encoding does not keep), body, stream flag and model are.
impl PartialEq for CachedResponse {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status
            && self.head == other.head
            && self.body == other.body
            && self.stream == other.stream
            && self.model == other.model
    }
}

impl Eq for CachedResponse {}

/// The headers of an entry's `head`, as (name, value) byte ranges into it.
struct HeadIter<'a> {
    head: &'a [u8],
    at: usize,
    left: usize,
}

impl<'a> HeadIter<'a> {
    fn new(head: &'a [u8]) -> Self {
        let left = head
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        Self { head, at: 4, left }
    }

    fn range(&mut self) -> Option<std::ops::Range<usize>> {
        let b = self.head.get(self.at..self.at + 4)?;
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let start = self.at + 4;
        let end = start.checked_add(len).filter(|&e| e <= self.head.len())?;
        self.at = end;
        Some(start..end)
    }
}

impl Iterator for HeadIter<'_> {
    type Item = (std::ops::Range<usize>, std::ops::Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some((self.range()?, self.range()?))
    }
}

/// Whether bytes make a valid header value (`http`'s rule: visible ASCII, obs-text, space and
/// tab), checked without making one.
fn is_header_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Encoding version of [`CachedResponse::encode`]. Version 1 (before the served model was
/// recorded) is refused: such an entry may hold a fallback model's answer under the key of
/// the model that was asked for, so it is a miss and is removed.
const ENCODING_VERSION: u8 = 2;

/// The usual `content-type` of an answer: an entry keeps it as a static header value.
const APPLICATION_JSON: &str = "application/json";

/// What an entry costs in memory beyond the bytes of its kept headers (one buffer, `head`),
/// its body and its model's name: the ring slot that holds it (key, response, expiry), the
/// store's index bucket, allocator rounding of the two buffers and the share of a growing
/// index's and ring's spare room. Measured (issue 13, 2026-12-07): `memory_store_rss_per_entry`
/// in `tests/cache.rs` gave 1,034 bytes of resident memory per entry for 770 bytes of headers,
/// body and name (264 around them) while the index kept the key again in 36-byte buckets and
/// a slot its weight; `scripts/cache-rss.sh` (1M distinct requests through the proxy, 256 MiB
/// bound) then gave 1.006× the bound with 400 here and 0.97× with 450. Since the index holds
/// 8-byte buckets and the slot 144 bytes (1,046 → 1,004 bytes per entry in that test, and no
/// large table left behind by each doubling of the index), the same run gives 0.855× with 450
/// and 0.897× with 400, so 320 (0.983×: within the bound, with a small margin): `docs/benchmarks.md`,
/// "The store's overhead, measured again".
const ENTRY_OVERHEAD: usize = 320;

/// The headers an entry keeps ([`CachedResponse::keeps_header`]), picked from an answer's
/// head in one pass and written as [`CachedResponse::encode`] lays them out, and what that pass
/// saw of `content-type`: the cache reads an answer's headers once, when its head arrives,
/// for both (issue 13, ms13: a `content-type` lookup by name was ~0.18k instructions of a
/// miss, beside the walk).
pub(crate) struct KeptHeaders {
    head: Bytes,
    sensitive: u32,
    event_stream: bool,
}

impl KeptHeaders {
    /// Picks the kept headers of `headers`: counted (with their bytes) in one pass, then
    /// written into one buffer of exactly their size; no map, no allocation per value, no
    /// name hashed.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        const PICKED: usize = 8;
        let mut picked = [None; PICKED];
        let mut count = 0;
        let mut len = 4;
        let mut content_type = None;
        for (name, value) in headers {
            if CachedResponse::keeps_header(name) {
                if let Some(slot) = picked.get_mut(count) {
                    *slot = Some((name, value));
                }
                count += 1;
                len += 8 + name.as_str().len() + value.len();
                // The first value, as `HeaderMap::get` returns it.
                if content_type.is_none() && *name == http::header::CONTENT_TYPE {
                    content_type = Some(value);
                }
            }
        }
        let mut head = Vec::with_capacity(len);
        let mut sensitive = 0u32;
        head.extend_from_slice(&(count as u32).to_le_bytes());
        // Inlined in both loops (a call per header was ~0.1k for two kept headers).
        #[inline(always)]
        fn put(
            head: &mut Vec<u8>,
            sensitive: &mut u32,
            i: usize,
            name: &HeaderName,
            value: &HeaderValue,
        ) {
            put_bytes(head, name.as_str().as_bytes());
            put_bytes(head, value.as_bytes());
            if i < 32 && value.is_sensitive() {
                *sensitive |= 1 << i;
            }
        }
        if count <= PICKED {
            // The slots filled, by reference (moving the array out was a copy of it).
            for (i, (name, value)) in picked[..count].iter().flatten().enumerate() {
                put(&mut head, &mut sensitive, i, name, value);
            }
        } else {
            let kept = headers
                .iter()
                .filter(|(n, _)| CachedResponse::keeps_header(n));
            for (i, (name, value)) in kept.enumerate() {
                put(&mut head, &mut sensitive, i, name, value);
            }
        }
        // `body::is_event_stream`'s rule, on the value the walk found: its bytes first (the
        // usual `application/json` is told at its first byte), the whole value checked only
        // for a stream (a value that is not visible ASCII is not one). A value that passes
        // `to_str` holds no whitespace but spaces and tabs, which both trims remove.
        let event_stream = content_type.is_some_and(|v| {
            v.as_bytes()
                .trim_ascii_start()
                .starts_with(b"text/event-stream")
                && v.to_str().is_ok()
        });
        Self {
            head: Bytes::from(head),
            sensitive,
            event_stream,
        }
    }

    /// Whether the answer's `content-type` (its first value) is `text/event-stream`.
    pub(crate) fn is_event_stream(&self) -> bool {
        self.event_stream
    }
}

impl CachedResponse {
    /// A response to store; headers that [`keeps_header`](Self::keeps_header) rejects are
    /// dropped.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, stream: bool) -> Self {
        Self::from_parts(status, &headers, &body, stream)
    }

    /// [`new`](Self::new) from borrowed headers and body (both are copied anyway): the cache
    /// builds an entry from the head it forwards, without cloning the whole header map first.
    pub(crate) fn from_parts(
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        stream: bool,
    ) -> Self {
        Self::from_kept(
            status,
            KeptHeaders::of(headers),
            Bytes::copy_from_slice(body),
            stream,
        )
    }

    /// An entry of the headers [`KeptHeaders::of`] picked and a body of its own (not a slice
    /// of a connection's buffer: see the type's docs).
    pub(crate) fn from_kept(
        status: StatusCode,
        kept: KeptHeaders,
        body: Bytes,
        stream: bool,
    ) -> Self {
        Self {
            status,
            head: kept.head,
            sensitive: kept.sensitive,
            body,
            stream,
            model: None,
        }
    }

    /// Records the model that produced the answer (the served model, after any fallback).
    ///
    /// ```
    /// use tower_claude::cache::CachedResponse;
    ///
    /// let resp = CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), "{}".into(), false)
    ///     .with_model("claude-sonnet-4-6");
    /// assert_eq!(resp.model(), Some("claude-sonnet-4-6"));
    /// ```
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        let model: String = model.into();
        self.model = (!model.is_empty()).then(|| model.into());
        self
    }

    /// [`with_model`](Self::with_model) with a name the caller shares (no copy); `None` or
    /// an empty name records none.
    pub(crate) fn with_shared_model(mut self, model: Option<Arc<str>>) -> Self {
        self.model = model.filter(|m| !m.is_empty());
        self
    }

    /// The recorded model, shared.
    pub(crate) fn shared_model(&self) -> Option<&Arc<str>> {
        self.model.as_ref()
    }

    /// The model that produced the answer, when it was recorded.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether the entry is a complete, valid Messages API answer, the only kind the
    /// [`CacheLayer`](super::CacheLayer) stores: a 2xx status and either a JSON object whose
    /// `type` is `"message"`, or an SSE stream whose every event carries JSON data, that
    /// starts with `message_start` (a `"message"`) and ends with `message_stop`, with no
    /// `error` event. Invalid JSON, HTML, a JSON array or garbage events ending in
    /// `message_stop` are not.
    ///
    /// ```
    /// use tower_claude::cache::CachedResponse;
    ///
    /// let ok = |body: &'static str, stream| {
    ///     CachedResponse::new(http::StatusCode::OK, http::HeaderMap::new(), body.into(), stream)
    ///         .is_complete_message()
    /// };
    /// assert!(ok(r#"{"type":"message","content":[]}"#, false));
    /// assert!(!ok("[1,2,3]", false));
    /// assert!(!ok("<html>oops</html>", false));
    /// assert!(!ok("event: message_stop\ndata: {}\n\n", true));
    /// ```
    pub fn is_complete_message(&self) -> bool {
        if !self.status.is_success() {
            return false;
        }
        if self.stream {
            is_complete_stream(&self.body)
        } else {
            is_message_json(&self.body)
        }
    }

    /// Whether a response header is stored: `content-type`, `request-id` and `anthropic-*`
    /// except `anthropic-ratelimit-*` (a replayed rate-limit snapshot would be stale and would
    /// mislead the layers that re-seed their buckets from it). Never `set-cookie`, auth,
    /// `retry-after`, hop-by-hop or length headers.
    #[inline]
    pub fn keeps_header(name: &HeaderName) -> bool {
        // Asked of every header of every answer stored (a dozen `anthropic-ratelimit-*`
        // among them): the name's length and words, no `memcmp` call per prefix.
        const ANTHROPIC_RATELI: u128 = u128::from_le_bytes(*b"anthropic-rateli");
        const MIT: u32 = u32::from_le_bytes(*b"mit-");
        const ANTHROPI: u64 = u64::from_le_bytes(*b"anthropi");
        const C_DASH: u16 = u16::from_le_bytes(*b"c-");
        let n = name.as_str().as_bytes();
        // 16 bytes or more: `anthropic-` and something, but not `anthropic-ratelimit-` (the
        // usual answer's rate-limit headers are ruled out by two compares).
        if let Some((head, rest)) = n.split_first_chunk::<16>() {
            let head = u128::from_le_bytes(*head);
            if head == ANTHROPIC_RATELI
                && rest
                    .first_chunk::<4>()
                    .is_some_and(|tail| u32::from_le_bytes(*tail) == MIT)
            {
                return false;
            }
            return head as u64 == ANTHROPI && (head >> 64) as u16 == C_DASH;
        }
        match n.len() {
            12 => n == b"content-type",
            10 => n == b"request-id" || n == b"anthropic-",
            // `anthropic-` and something.
            11.. => {
                n.first_chunk::<8>()
                    .is_some_and(|w| u64::from_le_bytes(*w) == ANTHROPI)
                    && n[8..10] == *b"c-"
            }
            _ => false,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers, in a map made for them (an entry holds them as bytes). Values
    /// other than the usual `content-type` share the entry's buffer (no copy).
    ///
    /// ```
    /// use tower_claude::cache::CachedResponse;
    ///
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("request-id", "req_1".parse().unwrap());
    /// headers.insert("anthropic-ratelimit-requests-remaining", "9".parse().unwrap());
    /// let resp = CachedResponse::new(http::StatusCode::OK, headers, "{}".into(), false);
    /// let map = resp.headers();
    /// assert_eq!(map["request-id"], "req_1");
    /// assert!(map.get("anthropic-ratelimit-requests-remaining").is_none());
    /// ```
    pub fn headers(&self) -> HeaderMap {
        self.headers_with_room(0)
    }

    /// How many headers are stored (without making the map).
    ///
    /// ```
    /// use tower_claude::cache::CachedResponse;
    ///
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("content-type", "application/json".parse().unwrap());
    /// headers.insert("set-cookie", "a=b".parse().unwrap());
    /// let resp = CachedResponse::new(http::StatusCode::OK, headers, "{}".into(), false);
    /// assert_eq!(resp.headers_len(), 1);
    /// ```
    pub fn headers_len(&self) -> usize {
        HeadIter::new(&self.head).left
    }

    /// [`headers`](Self::headers) in a map with room for `extra` more (a hit adds its own).
    pub(crate) fn headers_with_room(&self, extra: usize) -> HeaderMap {
        const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
        const JSON: HeaderValue = HeaderValue::from_static(APPLICATION_JSON);
        let iter = HeadIter::new(&self.head);
        let mut map = HeaderMap::with_capacity(iter.left + extra);
        for (i, (name, value)) in iter.enumerate() {
            let name = match &self.head[name] {
                b"content-type" => http::header::CONTENT_TYPE,
                b"request-id" => REQUEST_ID,
                other => match HeaderName::from_bytes(other) {
                    Ok(name) => name,
                    Err(_) => continue,
                },
            };
            let mut value = if self.head[value.clone()] == *APPLICATION_JSON.as_bytes() {
                JSON
            } else {
                match HeaderValue::from_maybe_shared(self.head.slice(value)) {
                    Ok(value) => value,
                    Err(_) => continue,
                }
            };
            if i < 32 && self.sensitive & (1 << i) != 0 {
                value.set_sensitive(true);
            }
            map.append(name, value);
        }
        map
    }

    /// The complete body (JSON, or the whole SSE stream).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether the body is an SSE stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// What the entry costs in memory, in bytes: the body, the kept headers' buffer, the
    /// model name, and a fixed overhead for the structures around them (the key, the store's
    /// index and ring slot, allocator rounding). [`MemoryStore`] bounds the sum of these, so
    /// that its resident memory follows its bound.
    pub fn weight(&self) -> usize {
        self.body.len()
            + self.head.len()
            + self.model.as_ref().map_or(0, |m| m.len())
            + ENTRY_OVERHEAD
    }

    /// A compact binary encoding for stores that keep bytes (disk, network).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight());
        self.encode_into(&mut out);
        out
    }

    /// The length of [`encode`](Self::encode)'s output, without encoding (a store that
    /// lays several entries out in one buffer sizes it first).
    #[cfg(feature = "disk-cache")]
    pub(crate) fn encoded_len(&self) -> usize {
        1 + 2
            + 1
            + 4
            + self.model.as_ref().map_or(0, |m| m.len())
            + self.head.len()
            + 4
            + self.body.len()
    }

    /// [`encode`](Self::encode), appended to `out` (a store that prefixes the encoding with
    /// its own fields writes both into one buffer).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.status.as_u16().to_le_bytes());
        out.push(u8::from(self.stream));
        put_bytes(out, self.model.as_deref().unwrap_or("").as_bytes());
        // The kept headers are held as encoded.
        out.extend_from_slice(&self.head);
        put_bytes(out, &self.body);
    }

    /// The model recorded in an [`encode`](Self::encode)d entry, read without decoding the
    /// rest: `Some(None)` when none is recorded, `None` when the bytes are not an entry.
    #[cfg(feature = "disk-cache")]
    pub(crate) fn encoded_model(mut bytes: &[u8]) -> Option<Option<&str>> {
        let buf = &mut bytes;
        if take(buf, 1)?[0] != ENCODING_VERSION {
            return None;
        }
        take(buf, 3)?;
        let model = std::str::from_utf8(take_bytes(buf)?).ok()?;
        Some((!model.is_empty()).then_some(model))
    }

    /// Decodes [`encode`](Self::encode)'s output. Any inconsistency (truncation, unknown
    /// version, invalid status or header) is an error of kind [`StoreErrorKind::Corrupt`].
    pub fn decode(mut bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |what: &'static str| StoreError::new(StoreErrorKind::Corrupt, what);
        let buf = &mut bytes;
        if take(buf, 1).ok_or_else(|| corrupt("empty entry"))?[0] != ENCODING_VERSION {
            return Err(corrupt("unknown entry version"));
        }
        let status = take(buf, 2).ok_or_else(|| corrupt("truncated status"))?;
        let status = StatusCode::from_u16(u16::from_le_bytes([status[0], status[1]]))
            .map_err(|_| corrupt("invalid status"))?;
        let stream = match take(buf, 1).ok_or_else(|| corrupt("truncated flags"))?[0] {
            0 => false,
            1 => true,
            _ => return Err(corrupt("invalid flags")),
        };
        let model = take_bytes(buf).ok_or_else(|| corrupt("truncated model"))?;
        let model = std::str::from_utf8(model).map_err(|_| corrupt("invalid model"))?;
        let model = (!model.is_empty()).then(|| model.into());
        let head_start = *buf;
        let n = take_u32(buf).ok_or_else(|| corrupt("truncated header count"))?;
        for _ in 0..n {
            let name = take_bytes(buf).ok_or_else(|| corrupt("truncated header"))?;
            let value = take_bytes(buf).ok_or_else(|| corrupt("truncated header"))?;
            // Held as stored: a name must be one as `encode` writes it (lowercase, valid).
            let valid = HeaderName::from_bytes(name).is_ok_and(|n| n.as_str().as_bytes() == name);
            if !valid || !is_header_value(value) {
                return Err(corrupt("invalid header"));
            }
        }
        let head = &head_start[..head_start.len() - buf.len()];
        let body = take_bytes(buf).ok_or_else(|| corrupt("truncated body"))?;
        if !buf.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self {
            status,
            head: Bytes::copy_from_slice(head),
            sensitive: 0,
            body: Bytes::copy_from_slice(body),
            stream,
            model,
        })
    }
}

/// The models a store has held entries of, for [`CacheStore::may_hold_other_models`]; shared
/// by the clones of a store. It never shrinks: an evicted model stays listed, which only costs
/// a needless question.
///
/// Most stores hold the answers of one model: the first model recorded is kept apart and
/// read without a lock (a miss records its entry's model and asks whether another may be
/// held: two read locks and their scans were ~0.14k instructions of a memory-store miss).
#[derive(Default)]
pub(crate) struct ModelSet {
    /// The first model recorded: shared with the entry that recorded it (the catalogue's
    /// name, usually), so that the names asked about next are told equal by their address
    /// before their bytes (a `memcmp` call per stored answer and per miss).
    first: std::sync::OnceLock<Arc<str>>,
    /// `others` holds something (set under its lock, after it is written).
    mixed: std::sync::atomic::AtomicBool,
    /// The models recorded after the first, and whether an entry without a model was.
    others: std::sync::RwLock<Models>,
}

#[derive(Default)]
struct Models {
    names: Vec<Box<str>>,
    /// An entry without a recorded model was held: it may be any model's.
    unknown: bool,
}

impl ModelSet {
    /// Records the model of an entry held (`None`: not recorded, any model). The disk store's
    /// way in, from a name read out of its file (the memory store records shared names).
    #[cfg_attr(not(feature = "disk-cache"), allow(dead_code))]
    pub(crate) fn record(&self, model: Option<&str>) {
        if let Some(m) = model {
            if same_name(self.first.get_or_init(|| m.into()), m) {
                return;
            }
        }
        self.record_other(model);
    }

    /// [`record`](Self::record) of an entry's shared name: the first is kept without a copy.
    pub(crate) fn record_shared(&self, model: Option<&Arc<str>>) {
        if let Some(m) = model {
            if same_name(self.first.get_or_init(|| m.clone()), m) {
                return;
            }
        }
        self.record_other(model.map(|m| &**m));
    }

    fn record_other(&self, model: Option<&str>) {
        use std::sync::atomic::Ordering;
        let known = |models: &Models| match model {
            None => models.unknown,
            Some(m) => models.names.iter().any(|n| &**n == m),
        };
        if self.mixed.load(Ordering::Acquire)
            && known(&self.others.read().unwrap_or_else(|e| e.into_inner()))
        {
            return;
        }
        let mut models = self.others.write().unwrap_or_else(|e| e.into_inner());
        if !known(&models) {
            match model {
                None => models.unknown = true,
                Some(m) => models.names.push(m.into()),
            }
        }
        self.mixed.store(true, Ordering::Release);
    }

    /// Whether an entry of a model other than `model` may have been held.
    pub(crate) fn others_than(&self, model: &str) -> bool {
        use std::sync::atomic::Ordering;
        if self
            .first
            .get()
            .is_some_and(|first| !same_name(first, model))
        {
            return true;
        }
        if !self.mixed.load(Ordering::Acquire) {
            return false;
        }
        let models = self.others.read().unwrap_or_else(|e| e.into_inner());
        models.unknown || models.names.iter().any(|n| &**n != model)
    }
}

/// Whether two model names are equal: the same bytes at the same address (both shared from
/// the catalogue's entry, the usual case) without comparing them.
#[inline]
fn same_name(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// A JSON object whose `type` is `"message"` (the whole document is checked for validity).
fn is_message_json(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        ty: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Head<'_>>(body).is_ok_and(|h| h.ty == "message")
}

/// A stream of SSE events with JSON data from `message_start` (a `"message"`) to
/// `message_stop`, `ping`s allowed anywhere, no `error` event, nothing after the stop.
fn is_complete_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Start<'a> {
        #[serde(borrow)]
        message: Head<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(rename = "type", borrow)]
        ty: std::borrow::Cow<'a, str>,
    }
    let mut parser = crate::anthropic::SseParser::new();
    let mut events = Vec::new();
    parser.push(body, &mut events);
    parser.finish(&mut events);
    let mut events = events.iter().filter(|e| e.event.as_deref() != Some("ping"));
    let Some(first) = events.next() else {
        return false;
    };
    let started = first.event.as_deref() == Some("message_start")
        && serde_json::from_str::<Start<'_>>(&first.data).is_ok_and(|s| s.message.ty == "message");
    if !started {
        return false;
    }
    let mut stopped = false;
    for event in events {
        if stopped
            || event.event.as_deref() == Some("error")
            || serde_json::from_str::<serde::de::IgnoredAny>(&event.data).is_err()
        {
            return false;
        }
        stopped = event.event.as_deref() == Some("message_stop");
    }
    stopped
}

impl fmt::Debug for CachedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedResponse")
            .field("status", &self.status)
            .field("headers", &self.headers())
            .field("body_len", &self.body.len())
            .field("stream", &self.stream)
            .field("model", &self.model)
            .finish()
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Some(head)
}

fn take_u32(buf: &mut &[u8]) -> Option<usize> {
    let b = take(buf, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn take_bytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = take_u32(buf)?;
    take(buf, n)
}

/// The kind of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// An entry could not be decoded.
    Corrupt,
    /// The backend failed (I/O, database, network).
    Backend,
    /// The store could not be opened.
    Open,
}

/// A cache store failed.
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
}

impl StoreError {
    /// A new error.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            StoreErrorKind::Corrupt => "corrupt cache entry",
            StoreErrorKind::Backend => "cache store failed",
            StoreErrorKind::Open => "cannot open cache store",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pass that picks an answer's kept headers tells a stream as every layer does
    /// (`body::is_event_stream`: the first `content-type`, leading whitespace allowed, a
    /// value that is visible ASCII), and keeps what `from_parts` kept.
    #[test]
    fn kept_headers_tell_a_stream_as_every_layer_does() {
        let values: [&[u8]; 12] = [
            b"text/event-stream",
            b"text/event-stream; charset=utf-8",
            b"  \ttext/event-stream",
            b"text/event-strea",
            b"application/json",
            b"TEXT/EVENT-STREAM",
            b"text/event-stream\xff",
            b"\xfftext/event-stream",
            b"\x0ctext/event-stream",
            b"",
            b" ",
            b"x text/event-stream",
        ];
        for value in values {
            let Ok(value) = HeaderValue::from_bytes(value) else {
                continue;
            };
            for first in [true, false] {
                let mut headers = HeaderMap::new();
                headers.insert("request-id", HeaderValue::from_static("req_1"));
                if first {
                    headers.append(http::header::CONTENT_TYPE, value.clone());
                    headers.append(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/event-stream"),
                    );
                } else {
                    headers.append(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    headers.append(http::header::CONTENT_TYPE, value.clone());
                }
                let kept = KeptHeaders::of(&headers);
                assert_eq!(
                    kept.is_event_stream(),
                    crate::body::is_event_stream(&headers),
                    "{value:?} first: {first}"
                );
                let entry = CachedResponse::from_kept(StatusCode::OK, kept, "{}".into(), false);
                assert_eq!(
                    entry,
                    CachedResponse::new(StatusCode::OK, headers, "{}".into(), false)
                );
            }
        }
        assert!(!KeptHeaders::of(&HeaderMap::new()).is_event_stream());
    }

    /// The first model is answered without a lock; the others, and an entry without a
    /// model, as before: `others_than` is true exactly when a model other than the one asked
    /// about (or an unknown one) was recorded.
    #[test]
    fn a_model_set_knows_its_models() {
        let set = ModelSet::default();
        assert!(!set.others_than("opus"));
        set.record(Some("opus"));
        set.record(Some("opus"));
        assert!(!set.others_than("opus"));
        assert!(set.others_than("sonnet"));
        assert!(!set.mixed.load(std::sync::atomic::Ordering::Relaxed));
        set.record(Some("sonnet"));
        assert!(set.others_than("opus"));
        assert!(set.others_than("sonnet"));
        assert!(set.others_than("haiku"));
        let unknown = ModelSet::default();
        unknown.record(None);
        assert!(unknown.others_than("opus"));
        let later = ModelSet::default();
        later.record(Some("opus"));
        later.record(None);
        assert!(later.others_than("opus"));
        // Recorded twice, listed once.
        set.record(Some("sonnet"));
        assert_eq!(set.others.read().unwrap().names.len(), 1);
    }

    /// A shared name is kept without a copy, and the same name at another address is still
    /// the same model.
    #[test]
    fn a_model_set_shares_the_first_name() {
        let set = ModelSet::default();
        let opus: Arc<str> = "opus".into();
        set.record_shared(Some(&opus));
        assert!(Arc::ptr_eq(set.first.get().unwrap(), &opus));
        set.record_shared(Some(&"opus".into()));
        set.record(Some("opus"));
        assert!(!set.others_than("opus") && !set.others_than(&opus));
        assert!(!set.mixed.load(std::sync::atomic::Ordering::Relaxed));
        set.record_shared(Some(&"sonnet".into()));
        set.record_shared(None);
        assert!(set.others_than(&opus));
        assert_eq!(set.others.read().unwrap().names.len(), 1);
        assert!(set.others.read().unwrap().unknown);
    }

    /// An entry holds the headers it keeps in one buffer of exactly their encoded size (it
    /// lives for hours in the memory store), and the map made of them on a hit is made for
    /// them. Also with more kept headers than the first pass picks.
    #[test]
    fn an_entry_holds_exactly_the_headers_it_keeps() {
        let mut h = HeaderMap::new();
        for i in 0..12 {
            h.insert(
                HeaderName::try_from(format!("anthropic-ratelimit-x-{i}")).unwrap(),
                "1".parse().unwrap(),
            );
        }
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("request-id", "req_1".parse().unwrap());
        h.insert("anthropic-organization-id", "org".parse().unwrap());
        let entry = CachedResponse::from_parts(StatusCode::OK, &h, b"{}", false);
        assert_eq!(entry.headers_len(), 3);
        let bytes = |names: &[(&str, &str)]| -> usize {
            4 + names
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
        };
        let kept = [
            ("content-type", "application/json"),
            ("request-id", "req_1"),
            ("anthropic-organization-id", "org"),
        ];
        assert_eq!(entry.head.len(), bytes(&kept));
        let map = entry.headers();
        assert_eq!(map.len(), 3);
        assert!(map.capacity() <= 4, "{}", map.capacity());
        for (name, value) in kept {
            assert_eq!(map[name], value);
        }
        for i in 0..12 {
            h.insert(
                HeaderName::try_from(format!("anthropic-x-{i}")).unwrap(),
                "1".parse().unwrap(),
            );
        }
        let entry = CachedResponse::from_parts(StatusCode::OK, &h, b"{}", false);
        assert_eq!(entry.headers_len(), 15);
        let map = entry.headers();
        assert_eq!(map.len(), 15);
        assert_eq!(map["request-id"], "req_1");
        assert_eq!(map["anthropic-x-11"], "1");
        assert!(!map.contains_key("anthropic-ratelimit-x-0"));
        assert!(map.capacity() <= 24, "{}", map.capacity());
        // The weight counts the kept headers' buffer: a count, each header's two lengths,
        // its name and value bytes.
        assert_eq!(
            entry.weight(),
            2 + 4
                + 15 * 8
                + kept.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
                + 12 * ("anthropic-x-1".len() + 1)
                + 2 // the second digit of `anthropic-x-10` and `-11`
                + ENTRY_OVERHEAD
        );
    }

    /// The usual `content-type` and the `request-id` name are kept as static values: the
    /// entry holds the same headers, the sensitive flag included, and another content type
    /// is copied as it came.
    #[test]
    fn static_header_values_are_the_same_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let mut id = HeaderValue::from_static("req_1");
        id.set_sensitive(true);
        h.insert("request-id", id);
        let entry = CachedResponse::from_parts(StatusCode::OK, &h, b"{}", false);
        assert_eq!(entry.headers(), h);
        assert!(entry.headers()["request-id"].is_sensitive());
        assert!(!entry.headers()["content-type"].is_sensitive());
        h.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        let entry = CachedResponse::from_parts(StatusCode::OK, &h, b"{}", false);
        assert_eq!(entry.headers(), h);
        assert_eq!(CachedResponse::decode(&entry.encode()).unwrap(), entry);
    }

    /// A decoded entry's headers are held as stored, so they are checked as `encode` writes
    /// them: an upper-case name or a control byte in a value is corrupt, not a header.
    #[test]
    fn decoding_refuses_headers_encode_never_writes() {
        let mut h = HeaderMap::new();
        h.insert("request-id", "req_1".parse().unwrap());
        let entry = CachedResponse::from_parts(StatusCode::OK, &h, b"{}", false);
        let good = entry.encode();
        let at = |needle: &[u8]| {
            good.windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
        };
        let mut upper = good.clone();
        upper[at(b"request-id")] = b'R';
        let mut control = good.clone();
        control[at(b"req_1")] = 0x01;
        for bad in [upper, control] {
            let err = CachedResponse::decode(&bad).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        }
        assert_eq!(CachedResponse::decode(&good).unwrap().headers(), h);
    }

    fn sample() -> CachedResponse {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/event-stream".parse().unwrap());
        h.insert("request-id", "req_1".parse().unwrap());
        h.insert("anthropic-organization-id", "org".parse().unwrap());
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "3".parse().unwrap(),
        );
        h.insert("set-cookie", "a=b".parse().unwrap());
        h.insert("retry-after", "3".parse().unwrap());
        h.insert("x-api-key", "sk-secret".parse().unwrap());
        CachedResponse::new(StatusCode::OK, h, Bytes::from_static(b"data: {}\n\n"), true)
    }

    #[test]
    fn filters_headers() {
        let r = sample();
        let map = r.headers();
        let names: Vec<_> = map.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(r.headers().contains_key("anthropic-organization-id"));
        assert!(
            !r.headers()
                .contains_key("anthropic-ratelimit-requests-remaining")
        );
    }

    /// The word-wise check is the definition: `content-type`, `request-id`, and `anthropic-*`
    /// but not `anthropic-ratelimit-*`.
    #[test]
    fn keeps_header_is_its_definition() {
        let reference = |n: &str| {
            n == "content-type"
                || n == "request-id"
                || (n.starts_with("anthropic-") && !n.starts_with("anthropic-ratelimit-"))
        };
        let mut names = vec![
            "content-type",
            "content-typf",
            "content-length",
            "request-id",
            "request-ie",
            "x-request-id",
            "anthropic-",
            "anthropic",
            "anthropic-x",
            "anthropic-version",
            "anthropic-organization-id",
            "anthropic-ratelimit",
            "anthropic-ratelimit-",
            "anthropic-ratelimit-x",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimitx-y",
            "anthropic-ratelimi",
            "anthropic_ratelimit-x",
            "anthropicx-version",
            "anthropi-c-version",
            "set-cookie",
            "retry-after",
            "a",
            "",
        ];
        let long = format!("anthropic-{}", "z".repeat(300));
        names.push(&long);
        for n in names {
            let Ok(name) = HeaderName::from_bytes(n.as_bytes()) else {
                continue;
            };
            assert_eq!(CachedResponse::keeps_header(&name), reference(n), "{n}");
        }
        for standard in [
            http::header::CONTENT_TYPE,
            http::header::DATE,
            http::header::SERVER,
        ] {
            assert_eq!(
                CachedResponse::keeps_header(&standard),
                reference(standard.as_str()),
                "{standard}"
            );
        }
    }

    #[test]
    fn encode_round_trip() {
        let r = sample();
        assert_eq!(CachedResponse::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            let err = CachedResponse::decode(&enc[..n]).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(CachedResponse::decode(&extra).is_err());
        assert!(CachedResponse::decode(b"garbage garbage garbage").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = CachedResponse::decode(&bytes);
        }

        #[test]
        fn decode_of_a_damaged_entry_never_panics(flip in 0usize..200, bit in 0u8..8) {
            let mut enc = sample().encode();
            let i = flip % enc.len();
            enc[i] ^= 1 << bit;
            if let Ok(r) = CachedResponse::decode(&enc) {
                // A flip that still decodes gives a valid response (e.g. a changed body byte).
                proptest::prop_assert_eq!(CachedResponse::decode(&r.encode()).unwrap(), r);
            }
        }
    }
}
