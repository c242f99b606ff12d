//! Where cached responses live: the [`CacheStore`] trait and its backends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::CacheKey;

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

    /// Removes the entry for `key`, if any.
    fn remove(&self, key: &CacheKey) -> StoreFuture<()>;
}

impl<T: CacheStore + ?Sized> CacheStore for std::sync::Arc<T> {
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<CachedResponse>> {
        (**self).get(key)
    }

    fn put(&self, key: &CacheKey, value: CachedResponse, ttl: Duration) -> StoreFuture<()> {
        (**self).put(key, value, ttl)
    }

    fn remove(&self, key: &CacheKey) -> StoreFuture<()> {
        (**self).remove(key)
    }
}

/// A stored response: status, a filtered set of headers, the complete body, and whether the
/// body is an SSE stream (replayed as such).
///
/// Only headers that describe the answer are kept (see [`CachedResponse::keeps_header`]); no
/// request data and no secret is ever part of an entry.
///
/// ```
/// use tower_claude::cache::CachedResponse;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("content-type", "application/json".parse().unwrap());
/// headers.insert("set-cookie", "session=1".parse().unwrap());
/// let resp = CachedResponse::new(http::StatusCode::OK, headers, "{}".into(), false);
/// assert!(resp.headers().get("set-cookie").is_none());
/// let decoded = CachedResponse::decode(&resp.encode()).unwrap();
/// assert_eq!(decoded, resp);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct CachedResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stream: bool,
}

/// Encoding version of [`CachedResponse::encode`].
const ENCODING_VERSION: u8 = 1;

impl CachedResponse {
    /// A response to store; headers that [`keeps_header`](Self::keeps_header) rejects are
    /// dropped.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, stream: bool) -> Self {
        let mut kept = HeaderMap::new();
        for (name, value) in &headers {
            if Self::keeps_header(name) {
                kept.append(name.clone(), value.clone());
            }
        }
        Self {
            status,
            headers: kept,
            body,
            stream,
        }
    }

    /// Whether a response header is stored: `content-type`, `request-id` and `anthropic-*`
    /// except `anthropic-ratelimit-*` (a replayed rate-limit snapshot would be stale and would
    /// mislead the layers that re-seed their buckets from it). Never `set-cookie`, auth,
    /// `retry-after`, hop-by-hop or length headers.
    pub fn keeps_header(name: &HeaderName) -> bool {
        let n = name.as_str();
        n == "content-type"
            || n == "request-id"
            || (n.starts_with("anthropic-") && !n.starts_with("anthropic-ratelimit-"))
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The complete body (JSON, or the whole SSE stream).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether the body is an SSE stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The approximate memory size of the entry in bytes (body plus headers).
    pub fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 16)
            .sum();
        self.body.len() + headers + 64
    }

    /// A compact binary encoding for stores that keep bytes (disk, network).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight());
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.status.as_u16().to_le_bytes());
        out.push(u8::from(self.stream));
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, &self.body);
        out
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
        let n = take_u32(buf).ok_or_else(|| corrupt("truncated header count"))?;
        let mut headers = HeaderMap::new();
        for _ in 0..n {
            let name = take_bytes(buf).ok_or_else(|| corrupt("truncated header"))?;
            let value = take_bytes(buf).ok_or_else(|| corrupt("truncated header"))?;
            let name = HeaderName::from_bytes(name).map_err(|_| corrupt("invalid header"))?;
            let value = HeaderValue::from_bytes(value).map_err(|_| corrupt("invalid header"))?;
            headers.append(name, value);
        }
        let body = take_bytes(buf).ok_or_else(|| corrupt("truncated body"))?;
        if !buf.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Self {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
            stream,
        })
    }
}

impl fmt::Debug for CachedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("stream", &self.stream)
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
        let names: Vec<_> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(r.headers().contains_key("anthropic-organization-id"));
        assert!(
            !r.headers()
                .contains_key("anthropic-ratelimit-requests-remaining")
        );
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
