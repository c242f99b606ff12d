//! Cache keys: a keyed BLAKE3 hash (under the cache's secret) over the tenant partition, the
//! request line, the protocol headers, the canonical JSON body's length and its NH digests.

use std::fmt;
#[cfg(test)]
use std::io::{self, Write};
#[cfg(test)]
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
#[cfg(test)]
use serde_json::Value;

use super::secret::{Keys, NH_CHUNK};
use crate::anthropic::header_names;
use crate::anthropic::parsed_names as names;

/// The context string of the BLAKE3 key derivation of [`CacheKey::variant`]. Changing it (or
/// the layout of the hashed fields) changes every key, which makes old disk entries
/// unreachable.
///
/// v2 (issue 13, third pass): the canonical body entered the key as its length and its own
/// BLAKE3 hash. v3 (issue 13, pv13): the key is a keyed BLAKE3 under a key derived from the
/// cache's secret ([`CacheSecret`](super::CacheSecret)), and the body enters as its length and
/// its NH digests under another (see [`KeyBase::key`]). v4 (issue 13, cm13): the request
/// line keys the PRF instead of entering it (see [`KeyBase`]), and NH digests 4 KiB chunks
/// instead of 1 KiB: one BLAKE3 compression per key for the usual body instead of two.
const KEY_CONTEXT: &str = "tower-claude 2026-12 response cache key v4";

/// A hasher in [`KEY_CONTEXT`]'s key-derivation mode, to clone: deriving the context key
/// hashes the context string, once per process instead of once per key.
fn key_hasher() -> blake3::Hasher {
    static HASHER: std::sync::LazyLock<blake3::Hasher> =
        std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key(KEY_CONTEXT));
    HASHER.clone()
}

/// A tenant id supplied by the application, as a request extension.
///
/// When a request carries this extension, its cache partition is derived from this id instead
/// of from the API key, so that, for example, every key of one organisation shares entries, or
/// so that an application that authenticates its users itself partitions by user.
///
/// ```
/// use tower_claude::body::RequestBody;
/// use tower_claude::cache::Tenant;
///
/// let mut req = http::Request::new(RequestBody::empty());
/// req.extensions_mut().insert(Tenant::new("team-42"));
/// assert_eq!(req.extensions().get::<Tenant>().unwrap().as_str(), "team-42");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tenant(String);

impl Tenant {
    /// A tenant with the given id.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The tenant id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Tenant").field(&self.0).finish()
    }
}

impl From<String> for Tenant {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for Tenant {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

/// The partition of the cache a request belongs to: a keyed BLAKE3 hash (under a key derived
/// from the cache's secret) of its tenant id or of its API key. The key itself is never
/// stored; only this 32-byte hash enters the cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Partition([u8; 32]);

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Partition({})", CacheKey(self.0))
    }
}

impl Partition {
    /// The partition of `req`: the [`Tenant`] extension, else `default_tenant`, else the API key
    /// (`x-api-key`, or `authorization: Bearer ...`), else the shared anonymous partition.
    #[cfg(test)]
    pub(crate) fn of(
        secret: &[u8; 32],
        extensions: &http::Extensions,
        headers: &HeaderMap,
        default_tenant: Option<&Tenant>,
    ) -> Self {
        Self::of_seen(
            secret,
            extensions,
            &RequestHeaders::of(headers),
            default_tenant,
        )
    }

    /// `of` (the tests' form), the API key read from the request's headers as one pass found them.
    pub(crate) fn of_seen(
        secret: &[u8; 32],
        extensions: &http::Extensions,
        headers: &RequestHeaders<'_>,
        default_tenant: Option<&Tenant>,
    ) -> Self {
        let (tag, value): (&[u8], &[u8]) =
            if let Some(t) = extensions.get::<Tenant>().or(default_tenant) {
                (b"tenant\0", t.as_str().as_bytes())
            } else if let Some(key) = headers.api_key() {
                (b"api-key\0", key)
            } else {
                (b"anonymous\0", b"")
            };
        let derive = || {
            let mut h = blake3::Hasher::new_keyed(secret);
            h.update(tag);
            h.update(value);
            Self(*h.finalize().as_bytes())
        };
        // The same caller sends request after request: remember the last few partitions
        // this thread derived (a keyed BLAKE3 is ~1k instructions per request), by the
        // secret, the tag and the value (the memo holds them in this thread's memory only,
        // as `KeyId`'s memo holds API keys; never logged).
        let len = secret.len() + tag.len() + value.len();
        if len > MEMO_INPUT {
            return derive();
        }
        // The input is written into the memo's own buffer (a zeroed array on the stack was a
        // `memset` of 272 bytes per request).
        RECENT
            .try_with(|memo| {
                let (recent, input) = &mut *memo.borrow_mut();
                input[..32].copy_from_slice(secret);
                input[32..32 + tag.len()].copy_from_slice(tag);
                input[32 + tag.len()..len].copy_from_slice(value);
                let input = &input[..len];
                recent.get(input).unwrap_or_else(|| {
                    let derived = derive();
                    recent.put(input, derived);
                    derived
                })
            })
            .unwrap_or_else(|_| derive())
    }
}

/// The longest input [`Partition::of_seen`] remembers: the secret, a tag and a tenant id or API
/// key of up to 256 bytes (API keys are about 100).
const MEMO_INPUT: usize = 32 + 16 + 256;

thread_local! {
    /// The memo, and the buffer its input is written into.
    static RECENT: std::cell::RefCell<(crate::anthropic::recent::Recent<Partition>, [u8; MEMO_INPUT])> =
        const { std::cell::RefCell::new((crate::anthropic::recent::Recent::new(MEMO_INPUT), [0; MEMO_INPUT])) };
}

/// The request headers the cache reads, found in one pass over the request's headers
/// (issue 13, cx13: a lookup by name hashes the name; the five the cache made per request,
/// most for headers a request does not send, were ~1k instructions of a miss). Only the
/// first value of a name is kept, as [`HeaderMap::get`] returns it; for the headers that may
/// repeat, only whether they are present, and the cache reads all their values then.
#[derive(Default)]
pub(crate) struct RequestHeaders<'a> {
    api_key: Option<&'a HeaderValue>,
    authorization: Option<&'a HeaderValue>,
    version: Option<&'a HeaderValue>,
    /// `anthropic-beta` is present.
    pub(crate) betas: bool,
    /// `cache-control` is present.
    pub(crate) cache_control: bool,
    /// `x-tower-claude-cache` is present.
    pub(crate) directive: bool,
    /// `x-tower-claude-fallback` is present.
    pub(crate) fallback: bool,
}

impl<'a> RequestHeaders<'a> {
    pub(crate) fn of(headers: &'a HeaderMap) -> Self {
        let mut seen = Self::default();
        for (name, value) in headers {
            if *name == http::header::CACHE_CONTROL {
                seen.cache_control = true;
                continue;
            }
            if *name == http::header::AUTHORIZATION {
                seen.authorization.get_or_insert(value);
                continue;
            }
            // The names of `parsed_names`, told apart by their length first.
            let n = name.as_str();
            match n.len() {
                9 if n == header_names::X_API_KEY => {
                    seen.api_key.get_or_insert(value);
                }
                14 if n == header_names::ANTHROPIC_BETA => seen.betas = true,
                17 if n == header_names::ANTHROPIC_VERSION => {
                    seen.version.get_or_insert(value);
                }
                20 if n == header_names::X_TOWER_CLAUDE_CACHE => seen.directive = true,
                23 if n == header_names::X_TOWER_CLAUDE_FALLBACK => seen.fallback = true,
                _ => {}
            }
        }
        seen
    }

    /// The API key: `x-api-key`, else `authorization: Bearer ...` (trimmed, not empty).
    fn api_key(&self) -> Option<&'a [u8]> {
        if let Some(v) = self.api_key {
            let v = v.as_bytes().trim_ascii();
            if !v.is_empty() {
                return Some(v);
            }
        }
        let auth = self.authorization?.as_bytes();
        let token = auth
            .strip_prefix(b"Bearer ")
            .or_else(|| auth.strip_prefix(b"bearer "))?
            .trim_ascii();
        (!token.is_empty()).then_some(token)
    }

    /// `anthropic-version`, trimmed (empty when absent).
    fn version(&self) -> &'a [u8] {
        self.version.map_or(&b""[..], |v| v.as_bytes().trim_ascii())
    }
}

/// A cache key: 32 bytes of BLAKE3 over the tenant partition, the method, the path and query,
/// `anthropic-version`, `anthropic-beta` and the canonical JSON body.
///
/// It reveals nothing about the request; `Debug` and `Display` print it in hex.
///
/// ```
/// use tower_claude::cache::CacheKey;
///
/// let key = CacheKey::from_bytes([7; 32]);
/// assert_eq!(key.as_bytes(), &[7; 32]);
/// assert_eq!(key.to_string().len(), 64);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// A key from its 32 bytes (for stores that read keys back).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Computes the key of a request whose body is already parsed (the tests' oracle: the
    /// layer writes the canonical body from the bytes, see [`KeyBase::key`]).
    #[cfg(test)]
    pub(crate) fn compute(
        keys: &Arc<Keys>,
        partition: &Partition,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &Value,
    ) -> Self {
        let mut canonical = Vec::new();
        let _ = write_canonical(body, &mut canonical);
        KeyBase::new(partition, method, uri, headers).key(keys, &canonical)
    }

    /// Another key derived from this one (e.g. the flight of requests that opted out of
    /// fallback, which must not share a fallback answer).
    pub(crate) fn variant(&self, tag: &[u8]) -> Self {
        let mut h = key_hasher();
        field(&mut h, &self.0);
        field(&mut h, tag);
        Self(*h.finalize().as_bytes())
    }
}

/// A [`Hasher`](std::hash::Hasher) for maps keyed by [`CacheKey`]: the key is already a
/// BLAKE3 digest, so its bytes are folded into a `u64` (8 bytes at a time) instead of being
/// hashed again with SipHash (about 1k instructions per map operation saved on a miss).
/// Keys come from our own keyed hash of the request, not from input an attacker picks byte by
/// byte, so there is no hash-flooding concern: finding keys that collide here means finding
/// BLAKE3 outputs that share 64 folded bits, which takes about 2^32 distinct requests per
/// colliding pair and gains nothing but a longer probe.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            self.0 = self.0.rotate_left(23) ^ w;
        }
        for &b in words.remainder() {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    /// The length prefix `Hash` writes before a slice: constant for keys, skipped.
    fn write_usize(&mut self, _: usize) {}
}

/// Builds [`KeyHasher`]s.
pub(crate) type KeyHashBuilder = std::hash::BuildHasherDefault<KeyHasher>;

/// A map keyed by [`CacheKey`], hashed with [`KeyHasher`].
pub(crate) type KeyMap<V> = std::collections::HashMap<CacheKey, V, KeyHashBuilder>;

/// Everything of a key but the body: the cache's keys and the **request-line key**, a keyed
/// BLAKE3 under the request's partition of its method, path and query, `anthropic-version`
/// and `anthropic-beta`; [`KeyBase::key`] adds a body. The cache keeps it to derive the key of
/// the same request for another model.
///
/// The request-line key is the same for every request of one caller (one tenant or API key,
/// one endpoint, one API version): each thread remembers the last few it derived (by the
/// partition and the fields; the memo is this thread's memory only, as `Partition::of`'s
/// is), so that a request usually pays a memo lookup instead of a BLAKE3 (~0.9k instructions
/// with the fields' bytes it wrote) and no allocation.
///
/// It holds no reference to the cache's keys (its methods are given them): a miss keeps it
/// until the answer's head arrives, and a shared reference there was a count taken and
/// given back per request.
#[derive(Clone)]
pub(crate) struct KeyBase {
    /// The key of the PRF: the request-line key.
    line: [u8; 32],
}

impl fmt::Debug for KeyBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBase").finish_non_exhaustive()
    }
}

/// The longest input of the request-line memo: the partition (32 bytes) and the four
/// length-prefixed fields (a Messages call: about 40 bytes without betas).
const MEMO_LINE: usize = 32 + 480;

thread_local! {
    /// The memo, and the buffer its input is written into.
    static LINES: std::cell::RefCell<(crate::anthropic::recent::Recent<[u8; 32]>, StackBytes<MEMO_LINE>)> =
        const {
            std::cell::RefCell::new((
                crate::anthropic::recent::Recent::new(MEMO_LINE),
                StackBytes { bytes: [0; MEMO_LINE], len: 0, overflow: false },
            ))
        };
}

/// A `Sink` of fixed capacity on the stack, that remembers whether it overflowed.
struct StackBytes<const N: usize> {
    bytes: [u8; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> Sink for StackBytes<N> {
    fn put(&mut self, bytes: &[u8]) {
        match self.bytes.get_mut(self.len..self.len + bytes.len()) {
            Some(to) if !self.overflow => {
                to.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            _ => self.overflow = true,
        }
    }
}

impl KeyBase {
    #[cfg(test)]
    pub(crate) fn new(
        partition: &Partition,
        method: &http::Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Self {
        Self::new_seen(
            partition,
            method,
            uri,
            &RequestHeaders::of(headers),
            headers,
        )
    }

    /// `new` (the tests' form), `anthropic-version` as one pass over the headers found it (the
    /// betas are read from `headers` when there are some).
    pub(crate) fn new_seen(
        partition: &Partition,
        method: &http::Method,
        uri: &http::Uri,
        seen: &RequestHeaders<'_>,
        headers: &HeaderMap,
    ) -> Self {
        let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        let version = seen.version();
        // Most requests send none: no list to build and join.
        let betas = if seen.betas {
            canonical_betas(headers)
        } else {
            String::new()
        };
        // Every variable-length field is length-prefixed, so that no two different field
        // sequences hash the same bytes. The partition is not among them: it keys the hash.
        let fields = |sink: &mut dyn Sink| {
            field(sink, method.as_str().as_bytes());
            field(sink, path.as_bytes());
            field(sink, version);
            field(sink, betas.as_bytes());
        };
        let derive = |fields: &[u8]| *blake3::keyed_hash(&partition.0, fields).as_bytes();
        // The input is written into the memo's own buffer (a zeroed array on the stack was a
        // `memset` of ~500 bytes per request).
        let remembered = LINES.try_with(|memo| {
            let (recent, input) = &mut *memo.borrow_mut();
            input.len = 0;
            input.overflow = false;
            input.put(&partition.0);
            fields(input);
            if input.overflow {
                return None;
            }
            let input = &input.bytes[..input.len];
            Some(recent.get(input).unwrap_or_else(|| {
                let line = derive(&input[32..]);
                recent.put(input, line);
                line
            }))
        });
        // Long betas or a long query (or no thread-local memo left): derived every time.
        let line = remembered.ok().flatten().unwrap_or_else(|| {
            let mut all = Vec::new();
            fields(&mut all);
            derive(&all)
        });
        Self { line }
    }

    /// The key of the request whose canonical body (see
    /// [`write_canonical`](crate::anthropic::write_canonical)) is `canonical`.
    ///
    /// A keyed BLAKE3 (the PRF) under the request-line key (see [`KeyBase`]: itself a keyed
    /// BLAKE3 under the partition, which is a keyed BLAKE3 of the tenant under a key derived
    /// from the cache's secret: a secret key per tenant and request line) over the body's
    /// length and the NH digest of each 4 KiB chunk of the body (32 bytes per chunk, under
    /// another derived key; see `Keys::nh`). For a body of up to 4 KiB that is 40 bytes: one
    /// BLAKE3 compression (key layout v3 hashed the request-line fields, the length and two
    /// digests of 1 KiB chunks for a 2 KB body: two). NH is a universal hash, not a
    /// collision-resistant one: it costs ~1.2 instructions per byte where BLAKE3 cost ~3.7
    /// (2 KB bodies: ~2.4k instructions instead of 7.6k with BLAKE3's padding trick), and it
    /// needs its key to be secret, which is what the cache's secret is for (the argument is in
    /// the module docs, *Keys*). The length tells the zero padding of the last chunk from
    /// bytes, and fixes the number of digests.
    pub(crate) fn key(&self, keys: &Keys, canonical: &[u8]) -> CacheKey {
        // The length and the digests in one buffer (the same bytes as several updates: the
        // same key); a body of more than `STACK_CHUNKS` chunks is hashed as it goes.
        const STACK_CHUNKS: usize = 8;
        let len = (canonical.len() as u64).to_le_bytes();
        let chunks = canonical.len().div_ceil(NH_CHUNK);
        if chunks == 1 {
            // The usual body (up to 4 KiB): its 40 bytes, not a zeroed buffer of eight digests.
            let mut one = [0u8; 8 + 32];
            one[..8].copy_from_slice(&len);
            one[8..].copy_from_slice(&keys.nh(canonical));
            return CacheKey(*blake3::keyed_hash(&self.line, &one).as_bytes());
        }
        let mut all = [0u8; 8 + 32 * STACK_CHUNKS];
        all[..8].copy_from_slice(&len);
        if chunks <= STACK_CHUNKS {
            for (i, chunk) in canonical.chunks(NH_CHUNK).enumerate() {
                all[8 + 32 * i..8 + 32 * (i + 1)].copy_from_slice(&keys.nh(chunk));
            }
            return CacheKey(*blake3::keyed_hash(&self.line, &all[..8 + 32 * chunks]).as_bytes());
        }
        let mut h = blake3::Hasher::new_keyed(&self.line);
        h.update(&all[..8]);
        for chunk in canonical.chunks(NH_CHUNK) {
            h.update(&keys.nh(chunk));
        }
        CacheKey(*h.finalize().as_bytes())
    }

    /// The key of the request with this body (its bytes), `None` when the body is not a JSON
    /// object.
    pub(crate) fn key_of_body(&self, keys: &Keys, body: &[u8]) -> Option<CacheKey> {
        self.key_of(keys, body, None)
    }

    /// The key of the request with this body, as [`key_of_body`](Self::key_of_body), written
    /// from what the scan of `meta` recorded about the body when it can (no second walk over
    /// the body: see `anthropic::scan::CanonicalHints`). The same key either way.
    pub(crate) fn key_of_scanned(
        &self,
        keys: &Keys,
        body: &[u8],
        meta: &crate::anthropic::RequestMeta,
    ) -> Option<CacheKey> {
        self.key_of(keys, body, Some(meta))
    }

    fn key_of(
        &self,
        keys: &Keys,
        body: &[u8],
        meta: Option<&crate::anthropic::RequestMeta>,
    ) -> Option<CacheKey> {
        // The canonical body is written to this thread's buffer (a request's body is a few
        // KB: one allocation and free fewer per key), kept only while it is small.
        let mut canonical = CANONICAL.try_with(|c| c.take()).unwrap_or_default();
        canonical.clear();
        // The canonical body is rarely longer than the body.
        canonical.reserve(body.len());
        let written = if meta.is_some_and(|m| m.canonical.write(body, &mut canonical)) {
            tracing::trace!("cache key: canonical body from the scan's hints");
            true
        } else {
            canonical.clear();
            crate::anthropic::write_canonical(body, &mut canonical).is_ok()
        };
        let key = written.then(|| self.key(keys, &canonical));
        if canonical.capacity() <= KEPT_CANONICAL {
            let _ = CANONICAL.try_with(|c| c.set(canonical));
        }
        key
    }
}

/// The largest buffer [`KeyBase::key_of`] keeps for the next key of its thread.
const KEPT_CANONICAL: usize = 64 * 1024;

thread_local! {
    static CANONICAL: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Something the fields of a key are written to: a hasher, or the bytes of a request-line
/// key's input.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A field, prefixed with its length as 4 bytes (no field of a request comes near 4 GiB: the
/// body, the only long part, enters as a `u64` length and its digests).
fn field(h: &mut (impl Sink + ?Sized), bytes: &[u8]) {
    h.put(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    h.put(bytes);
}

/// `anthropic-beta` values: every header line split on commas, trimmed, sorted and
/// deduplicated (the order of beta flags has no meaning).
fn canonical_betas(headers: &HeaderMap) -> String {
    let mut betas: Vec<&str> = headers
        .get_all(&names::ANTHROPIC_BETA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    betas.sort_unstable();
    betas.dedup();
    betas.join(",")
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Writes the canonical form of a parsed JSON value: the tests' oracle for
/// [`crate::anthropic::write_canonical`], which writes the same bytes from the raw body.
/// Object members sorted by key (byte order of the
/// UTF-8 key, recursively), no insignificant whitespace, strings escaped as `serde_json` does.
///
/// Numbers are written from their parsed value, not from their source text: an integer that
/// fits `u64` / `i64` as an integer, anything else as the shortest `f64` that round-trips. The
/// result is the same whether or not another crate enables `serde_json`'s
/// `arbitrary_precision` feature, and sorting is explicit, so `preserve_order` does not change
/// it either. `1` and `1.0` stay different keys (a miss, never a wrong hit).
#[cfg(test)]
pub(crate) fn write_canonical<W: Write>(value: &Value, w: &mut W) -> io::Result<()> {
    match value {
        Value::Null => w.write_all(b"null"),
        Value::Bool(true) => w.write_all(b"true"),
        Value::Bool(false) => w.write_all(b"false"),
        Value::Number(n) => crate::anthropic::write_canonical_number(n, w),
        Value::String(s) => serde_json::to_writer(&mut *w, s).map_err(io::Error::other),
        Value::Array(items) => {
            w.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                write_canonical(item, w)?;
            }
            w.write_all(b"]")
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            w.write_all(b"{")?;
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                serde_json::to_writer(&mut *w, k).map_err(io::Error::other)?;
                w.write_all(b":")?;
                write_canonical(v, w)?;
            }
            w.write_all(b"}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canonical form the layer writes, from the bytes.
    fn canon(s: &str) -> String {
        let mut out = Vec::new();
        crate::anthropic::write_canonical(s.as_bytes(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The canonical form of the parsed value (the oracle).
    fn canon_value(s: &str) -> String {
        let v: Value = serde_json::from_str(s).unwrap();
        let mut out = Vec::new();
        write_canonical(&v, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn keys(secret: u8) -> Arc<Keys> {
        Arc::new(Keys::derive(&super::super::CacheSecret::from_bytes(
            [secret; 32],
        )))
    }

    fn key(headers: &HeaderMap, body: &str) -> CacheKey {
        let keys = keys(1);
        let p = Partition::of(&keys.partition, &http::Extensions::new(), headers, None);
        let uri = "/v1/messages".parse().unwrap();
        let base = KeyBase::new(&p, &http::Method::POST, &uri, headers);
        let from_bytes = base.key_of_body(&keys, body.as_bytes()).unwrap();
        crate::anthropic::want_canonical_hints();
        let meta = crate::anthropic::RequestMeta::scan(body.as_bytes()).unwrap();
        assert_eq!(
            base.key_of_scanned(&keys, body.as_bytes(), &meta),
            Some(from_bytes),
            "the key from the scan's hints is the key from the bytes"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            from_bytes,
            CacheKey::compute(&keys, &p, &http::Method::POST, &uri, headers, &v),
            "the key from the bytes is the key of the parsed value"
        );
        from_bytes
    }

    /// One pass over the headers finds what lookups by name would: the first value of a name,
    /// and which of the optional headers are present.
    #[test]
    fn one_pass_over_the_headers_finds_what_lookups_find() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.append("x-api-key", " sk-first ".parse().unwrap());
        h.append("x-api-key", "sk-second".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        let seen = RequestHeaders::of(&h);
        assert_eq!(seen.api_key(), Some(&b"sk-first"[..]));
        assert_eq!(seen.version(), b"2023-06-01");
        assert!(!seen.betas && !seen.cache_control && !seen.directive && !seen.fallback);
        h.insert("x-api-key", "  ".parse().unwrap());
        h.insert("authorization", "Bearer sk-bearer".parse().unwrap());
        h.insert("anthropic-beta", "a".parse().unwrap());
        h.insert("cache-control", "no-cache".parse().unwrap());
        h.insert("x-tower-claude-cache", "use".parse().unwrap());
        h.insert("x-tower-claude-fallback", "off".parse().unwrap());
        let seen = RequestHeaders::of(&h);
        assert_eq!(
            seen.api_key(),
            Some(&b"sk-bearer"[..]),
            "an empty x-api-key is none"
        );
        assert!(seen.betas && seen.cache_control && seen.directive && seen.fallback);
        assert_eq!(RequestHeaders::of(&HeaderMap::new()).version(), b"");
    }

    #[test]
    fn canonical_sorts_keys_recursively_and_drops_whitespace() {
        assert_eq!(
            canon(r#"{ "b" : [ {"z":1, "a":2} ], "a": "x\"y\n" }"#),
            r#"{"a":"x\"y\n","b":[{"a":2,"z":1}]}"#
        );
        assert_eq!(
            canon(r#"{"a": [1, -2, 1.5, 1.0, 1e3, true, null]}"#),
            r#"{"a":[1,-2,1.5,1.0,1000.0,true,null]}"#
        );
    }

    #[test]
    fn canonical_unicode_escapes_are_normalised() {
        assert_eq!(
            canon(r#"{"\u00e9":"\u00e9\/"}"#),
            canon("{\"\u{e9}\":\"\u{e9}/\"}")
        );
    }

    #[test]
    fn canonical_from_the_bytes_matches_the_parsed_value() {
        for body in [
            r#"{}"#,
            r#" { "b" : [ {"z":1, "a":2}, [], {} ], "a": "x\"y\n\u0001\u007f" } "#,
            r#"{"n":[0,-0,-1,18446744073709551615,18446744073709551616,-9223372036854775808,1.5,1e3,1E-2,-0.0,123456789012345678901234567890]}"#,
            r#"{"a":1,"a":2,"b":{"y":1,"x":2,"y":3},"\u0061":4}"#,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"h\u00e9 \ud83d\ude00"}]}"#,
            r#"{"t":true,"f":false,"n":null,"s":"\b\f\r\t\\"}"#,
        ] {
            assert_eq!(canon(body), canon_value(body), "{body}");
        }
    }

    #[test]
    fn canonical_refuses_what_is_not_an_object() {
        for body in [&b"[1]"[..], b"\"s\"", b"{", b"{\"a\":}", b"{} x", b""] {
            assert!(crate::anthropic::write_canonical(body, &mut Vec::new()).is_err());
        }
    }

    /// The per-thread memo of partitions gives what a fresh derivation gives, for every
    /// secret, tenant, API key and the anonymous partition, also after it evicted them, and
    /// inputs too long for it are derived each time.
    #[test]
    fn remembered_partitions_are_the_derived_ones() {
        fn derived(secret: &[u8; 32], tag: &[u8], value: &[u8]) -> Partition {
            let mut h = blake3::Hasher::new_keyed(secret);
            h.update(tag);
            h.update(value);
            Partition(*h.finalize().as_bytes())
        }
        let long = "k".repeat(400);
        let ext = http::Extensions::new();
        // One API key under two secrets (two cache layers), back to back: two partitions.
        let mut same = HeaderMap::new();
        same.insert("x-api-key", "sk-ant-same".parse().unwrap());
        for secret in [[1u8; 32], [2; 32], [1; 32], [2; 32]] {
            let want = derived(&secret, b"api-key\0", b"sk-ant-same");
            assert_eq!(Partition::of(&secret, &ext, &same, None), want);
            let tenant = Tenant::new("sk-ant-same");
            let want = derived(&secret, b"tenant\0", b"sk-ant-same");
            assert_eq!(Partition::of(&secret, &ext, &same, Some(&tenant)), want);
        }
        for round in 0..3 {
            for secret in [[1u8; 32], [2; 32]] {
                for i in 0..6 {
                    let api_key = format!("sk-ant-{i}");
                    let mut h = HeaderMap::new();
                    h.insert("x-api-key", api_key.parse().unwrap());
                    let want = derived(&secret, b"api-key\0", api_key.as_bytes());
                    assert_eq!(Partition::of(&secret, &ext, &h, None), want, "{round} {i}");
                    let tenant = Tenant::new(format!("team-{i}"));
                    let want = derived(&secret, b"tenant\0", tenant.as_str().as_bytes());
                    assert_eq!(Partition::of(&secret, &ext, &h, Some(&tenant)), want);
                }
                let none = HeaderMap::new();
                let want = derived(&secret, b"anonymous\0", b"");
                assert_eq!(Partition::of(&secret, &ext, &none, None), want);
                let mut h = HeaderMap::new();
                h.insert("x-api-key", long.parse().unwrap());
                let want = derived(&secret, b"api-key\0", long.as_bytes());
                assert_eq!(Partition::of(&secret, &ext, &h, None), want);
            }
        }
    }

    #[test]
    fn reordered_keys_give_the_same_key_and_content_changes_it() {
        let h = HeaderMap::new();
        let a = key(
            &h,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let b = key(
            &h,
            r#"{ "messages":[{"content":"hi","role":"user"}], "max_tokens":5, "model":"m" }"#,
        );
        let c = key(
            &h,
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi!"}]}"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// Bodies whose reordered members (duplicates among them) and long strings straddle
    /// NH's pairs and chunks, up to and past 32 KiB: the key from the hints is the writer's
    /// (`key` checks it), and equal bodies in another member order share it.
    #[test]
    fn hinted_keys_of_long_bodies_are_the_writers() {
        let h = HeaderMap::new();
        for len in [
            0, 1, 9, 15, 16, 17, 1000, 4050, 4090, 4100, 8200, 32_700, 32_800, 40_000,
        ] {
            let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let sorted = format!(
                r#"{{"a":{{"x":1,"y":"{text}"}},"max_tokens":5,"messages":[{{"content":"{text}","role":"user"}}],"model":"m"}}"#
            );
            let scrambled = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}],"a":{{"y":"{text}","x":1}},"max_tokens":5,"model":"m"}}"#
            );
            assert_eq!(key(&h, &sorted), key(&h, &scrambled), "{len}");
        }
    }

    /// The request-line memo gives the line derived from the fields, for lines it holds, lines
    /// it evicted and lines too long for it, under several partitions, back to back.
    #[test]
    fn remembered_request_lines_are_the_derived_ones() {
        let keys = keys(1);
        let derived = |p: &Partition, path: &str, version: &str, betas: &str| {
            let mut fields = Vec::new();
            field(&mut fields, b"POST");
            field(&mut fields, path.as_bytes());
            field(&mut fields, version.as_bytes());
            field(&mut fields, betas.as_bytes());
            *blake3::keyed_hash(&p.0, &fields).as_bytes()
        };
        let long_query = format!("/v1/messages?{}", "q".repeat(600));
        for round in 0..3 {
            for tenant in ["a", "b"] {
                let p = Partition::of(
                    &keys.partition,
                    &http::Extensions::new(),
                    &HeaderMap::new(),
                    Some(&Tenant::new(tenant)),
                );
                for path in [
                    "/v1/messages",
                    "/v1/messages?beta=true",
                    long_query.as_str(),
                ] {
                    for version in ["", "2023-06-01", "2023-01-01"] {
                        let mut h = HeaderMap::new();
                        if !version.is_empty() {
                            h.insert("anthropic-version", version.parse().unwrap());
                        }
                        let uri = path.parse().unwrap();
                        let base = KeyBase::new(&p, &http::Method::POST, &uri, &h);
                        let want = derived(&p, path, version, "");
                        assert_eq!(base.line, want, "{round} {tenant} {path} {version}");
                    }
                }
            }
        }
    }

    #[test]
    fn beta_order_is_insignificant_but_version_is_not() {
        let body = r#"{"model":"m"}"#;
        let mut h1 = HeaderMap::new();
        h1.insert("anthropic-beta", "b-2, a-1".parse().unwrap());
        let mut h2 = HeaderMap::new();
        h2.append("anthropic-beta", "a-1".parse().unwrap());
        h2.append("anthropic-beta", "b-2".parse().unwrap());
        assert_eq!(key(&h1, body), key(&h2, body));
        let mut h3 = h2.clone();
        h3.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert_ne!(key(&h2, body), key(&h3, body));
        assert_ne!(key(&HeaderMap::new(), body), key(&h2, body));
    }

    #[test]
    fn partitions_differ_by_key_tenant_and_secret() {
        let ext = http::Extensions::new();
        let mut k1 = HeaderMap::new();
        k1.insert("x-api-key", "sk-one".parse().unwrap());
        let mut k2 = HeaderMap::new();
        k2.insert("x-api-key", "sk-two".parse().unwrap());
        let mut bearer = HeaderMap::new();
        bearer.insert("authorization", "Bearer sk-one".parse().unwrap());
        let s = [3; 32];
        let p1 = Partition::of(&s, &ext, &k1, None);
        assert_ne!(p1, Partition::of(&s, &ext, &k2, None));
        assert_eq!(p1, Partition::of(&s, &ext, &bearer, None));
        assert_ne!(p1, Partition::of(&[4; 32], &ext, &k1, None));
        assert_ne!(p1, Partition::of(&s, &ext, &HeaderMap::new(), None));
        let mut with_tenant = http::Extensions::new();
        with_tenant.insert(Tenant::new("t"));
        let t = Partition::of(&s, &with_tenant, &k1, None);
        assert_eq!(t, Partition::of(&s, &with_tenant, &k2, None));
        assert_eq!(t, Partition::of(&s, &ext, &k2, Some(&Tenant::new("t"))));
        assert_ne!(t, p1);
    }

    #[test]
    fn padding_to_whole_pairs_never_merges_two_bodies() {
        let keys = keys(1);
        let p = Partition::of(
            &keys.partition,
            &http::Extensions::new(),
            &HeaderMap::new(),
            None,
        );
        let uri = "/v1/messages".parse().unwrap();
        let base = KeyBase::new(&p, &http::Method::POST, &uri, &HeaderMap::new());
        // NH pads the last chunk with zeros to whole 16 bytes: 1,500 bytes hash as this body
        // followed by 4 zeros, and a body of 2,048 bytes as 128 whole pairs; the length keeps
        // them apart.
        let short = vec![b'x'; 1_500];
        for pad in [1, 4, 548] {
            let mut long = short.clone();
            long.resize(1_500 + pad, 0);
            assert_ne!(base.key(&keys, &short), base.key(&keys, &long), "{pad}");
        }
        // One, two, three chunks: equal bodies give equal keys, and any difference, in the
        // first or last byte of any chunk too, changes the key.
        for len in [
            0, 10, 1_024, 1_025, 2_030, 2_500, 4_000, 4_096, 4_097, 9_000, 40_000,
        ] {
            let body = vec![b'y'; len];
            assert_eq!(base.key(&keys, &body), base.key(&keys, &body.clone()));
            for at in [
                0,
                1_023,
                1_024,
                2_047,
                2_048,
                4_095,
                4_096,
                8_191,
                8_192,
                len.saturating_sub(1),
            ] {
                if at < len {
                    let mut other = body.clone();
                    other[at] = b'z';
                    assert_ne!(
                        base.key(&keys, &body),
                        base.key(&keys, &other),
                        "{len} {at}"
                    );
                }
            }
        }
    }

    /// Keys differ by secret (two caches), by partition (tenants, API keys) and by model
    /// (the body), and the same request under one secret always has one key.
    #[test]
    fn keys_differ_across_secrets_partitions_and_models() {
        let uri: http::Uri = "/v1/messages".parse().unwrap();
        let ext = http::Extensions::new();
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-ant-one".parse().unwrap());
        let body = |model: &str| {
            format!(
                r#"{{"model":"{model}","max_tokens":5,"x":"{}"}}"#,
                "y".repeat(2_000)
            )
        };
        let key = |secret: u8, tenant: Option<&str>, model: &str| {
            let keys = keys(secret);
            let tenant = tenant.map(Tenant::new);
            let p = Partition::of(&keys.partition, &ext, &h, tenant.as_ref());
            let base = KeyBase::new(&p, &http::Method::POST, &uri, &h);
            base.key_of_body(&keys, body(model).as_bytes()).unwrap()
        };
        let a = key(1, None, "claude-opus-4-7");
        assert_eq!(a, key(1, None, "claude-opus-4-7"));
        for other in [
            key(2, None, "claude-opus-4-7"),
            key(1, Some("team-a"), "claude-opus-4-7"),
            key(1, None, "claude-sonnet-4-6"),
        ] {
            assert_ne!(a, other);
        }
        assert_ne!(
            key(1, Some("team-a"), "claude-opus-4-7"),
            key(1, Some("team-b"), "claude-opus-4-7")
        );
    }

    /// Key layout v4, pinned: a disk cache written by an earlier build of the same layout
    /// keeps its entries (under the same secret). And the key is the documented composition:
    /// a keyed BLAKE3 under the request-line key (a keyed BLAKE3 under the partition of the
    /// length-prefixed method, path and query, version and sorted betas) of the canonical
    /// body's length and its NH digests, for bodies hashed in one buffer and for bodies of
    /// more chunks than that buffer holds (hashed as they go).
    #[test]
    fn key_layout_v4_is_stable_and_the_documented_composition() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "sk-golden".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        h.insert("anthropic-beta", "b, a".parse().unwrap());
        let keys = keys(7);
        let p = Partition::of(&keys.partition, &http::Extensions::new(), &h, None);
        let uri = "/v1/messages?beta=true".parse().unwrap();
        let base = KeyBase::new(&p, &http::Method::POST, &uri, &h);
        let body = |n: usize| format!(r#"{{"model":"m","max_tokens":5,"x":"{}"}}"#, "y".repeat(n));
        let key = base.key_of_body(&keys, body(1_500).as_bytes()).unwrap();
        assert_eq!(
            key.to_string(),
            "e6f80c60647bb53a558151869501bf3f4f2ee1355ae5f948d7289c7a0181ffb8"
        );
        let mut fields = Vec::new();
        for f in [
            &b"POST"[..],
            b"/v1/messages?beta=true",
            b"2023-06-01",
            b"a,b",
        ] {
            fields.extend_from_slice(&(f.len() as u32).to_le_bytes());
            fields.extend_from_slice(f);
        }
        let line = blake3::keyed_hash(&p.0, &fields);
        for n in [0, 1_500, 4_050, 4_100, 40_000] {
            let mut canonical = Vec::new();
            crate::anthropic::write_canonical(body(n).as_bytes(), &mut canonical).unwrap();
            let mut input = (canonical.len() as u64).to_le_bytes().to_vec();
            for chunk in canonical.chunks(NH_CHUNK) {
                input.extend_from_slice(&keys.nh(chunk));
            }
            let want = CacheKey(*blake3::keyed_hash(line.as_bytes(), &input).as_bytes());
            assert_eq!(
                base.key_of_body(&keys, body(n).as_bytes()),
                Some(want),
                "{n}"
            );
        }
        // The remembered request-line key is the derived one, and another line is another key.
        let again = KeyBase::new(&p, &http::Method::POST, &uri, &h);
        assert_eq!(again.line, *line.as_bytes());
        let other = KeyBase::new(
            &p,
            &http::Method::POST,
            &"/v1/messages".parse().unwrap(),
            &h,
        );
        assert_ne!(other.line, again.line);
        // A request line too long to remember (600 bytes of betas) is derived each time.
        let mut long = h.clone();
        long.insert("anthropic-beta", "z".repeat(600).parse().unwrap());
        let mut fields = Vec::new();
        let z = "z".repeat(600);
        for f in [
            &b"POST"[..],
            b"/v1/messages?beta=true",
            b"2023-06-01",
            z.as_bytes(),
        ] {
            fields.extend_from_slice(&(f.len() as u32).to_le_bytes());
            fields.extend_from_slice(f);
        }
        let want = *blake3::keyed_hash(&p.0, &fields).as_bytes();
        for _ in 0..2 {
            let base = KeyBase::new(&p, &http::Method::POST, &uri, &long);
            assert_eq!(base.line, want);
        }
    }

    #[test]
    fn key_hasher_uses_every_byte_of_the_key() {
        use std::hash::BuildHasher;
        let hash = |k: &CacheKey| KeyHashBuilder::default().hash_one(k);
        let base = CacheKey::from_bytes([7; 32]);
        for i in 0..32 {
            let mut bytes = [7; 32];
            bytes[i] = 8;
            assert_ne!(hash(&CacheKey::from_bytes(bytes)), hash(&base), "byte {i}");
        }
        assert_eq!(hash(&base), hash(&CacheKey::from_bytes([7; 32])));
    }

    #[test]
    fn key_display_is_hex() {
        assert_eq!(
            CacheKey::from_bytes([0xab; 32]).to_string(),
            "ab".repeat(32)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                // Exactly representable fractions: `serde_json`'s default float parser is not always
                // correctly rounded, so arbitrary floats may not survive a print-parse cycle.
                (-1_000_000i32..1_000_000).prop_map(|i| Value::from(f64::from(i) / 8.0)),
                "[a-z\\\\\"\u{e9}\u{1f600} ]{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Writes `v` as JSON with object members in reverse order and extra whitespace.
        fn scrambled(v: &Value, out: &mut String) {
            match v {
                Value::Array(items) => {
                    out.push_str("[ ");
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(" ,\n ");
                        }
                        scrambled(item, out);
                    }
                    out.push_str(" ]");
                }
                Value::Object(map) => {
                    out.push_str("{\t");
                    let mut members: Vec<_> = map.iter().collect();
                    members.sort_by(|a, b| b.0.cmp(a.0));
                    for (i, (k, item)) in members.into_iter().enumerate() {
                        if i > 0 {
                            out.push_str(" , ");
                        }
                        out.push_str(&serde_json::to_string(k).unwrap());
                        out.push_str(" : ");
                        scrambled(item, out);
                    }
                    out.push_str(" }");
                }
                other => out.push_str(&serde_json::to_string(other).unwrap()),
            }
        }

        /// Writes `v` as compact JSON (as the SDKs send it) with object members in reverse
        /// order, some repeated (an earlier duplicate with another value, which the last one
        /// overrides).
        fn compact_reversed(v: &Value, out: &mut String) {
            match v {
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        compact_reversed(item, out);
                    }
                    out.push(']');
                }
                Value::Object(map) => {
                    out.push('{');
                    let mut members: Vec<_> = map.iter().collect();
                    members.sort_by(|a, b| b.0.cmp(a.0));
                    for (i, (k, item)) in members.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let name = serde_json::to_string(k).unwrap();
                        if k.len() % 2 == 0 {
                            out.push_str(&name);
                            out.push_str(":null,");
                        }
                        out.push_str(&name);
                        out.push(':');
                        compact_reversed(item, out);
                    }
                    out.push('}');
                }
                other => out.push_str(&serde_json::to_string(other).unwrap()),
            }
        }

        proptest! {
            #[test]
            fn the_key_from_the_scans_hints_is_the_canonical_key(v in json()) {
                crate::anthropic::want_canonical_hints();
                // Compact bodies, members in order or reversed (with duplicates): the hints
                // write them, and the key is the one of the canonical writer (`key` checks
                // the three ways of computing it agree).
                let v = serde_json::json!({ "v": v, "model": "m" });
                let mut reversed = String::new();
                compact_reversed(&v, &mut reversed);
                let h = HeaderMap::new();
                for body in [serde_json::to_string(&v).unwrap(), reversed] {
                    let meta = crate::anthropic::RequestMeta::scan(body.as_bytes()).unwrap();
                    let mut out = Vec::new();
                    let hinted = meta.canonical.write(body.as_bytes(), &mut out);
                    let odd = body.matches(['.', '-']).count();
                    // Every body without negative or fractional numbers takes the hints.
                    prop_assert!(hinted || odd > 0, "{}", body);
                    if hinted {
                        prop_assert_eq!(String::from_utf8(out).unwrap(), canon(&body));
                    }
                    prop_assert_eq!(key(&h, &body), key(&h, &serde_json::to_string(&v).unwrap()));
                }
            }

            #[test]
            fn member_order_and_whitespace_never_change_the_key(v in json()) {
                // A request body is an object: the value goes in one.
                let v = serde_json::json!({ "v": v, "model": "m" });
                let plain = serde_json::to_string(&v).unwrap();
                let mut messy = String::new();
                scrambled(&v, &mut messy);
                let h = HeaderMap::new();
                prop_assert_eq!(key(&h, &plain), key(&h, &messy));
                // And the canonical form is itself valid JSON with the same value, the same
                // whether written from the bytes or from the parsed value.
                let c = canon(&messy);
                prop_assert_eq!(&c, &canon_value(&messy));
                prop_assert_eq!(serde_json::from_str::<Value>(&c).unwrap(), v);
            }

            #[test]
            fn different_values_give_different_keys(a in json(), b in json()) {
                prop_assume!(a != b);
                let h = HeaderMap::new();
                let body = |v| serde_json::to_string(&serde_json::json!({ "v": v })).unwrap();
                let (a, b) = (body(a), body(b));
                prop_assert_ne!(key(&h, &a), key(&h, &b));
            }
        }
    }
}
