//! A response cache for Messages API calls, partitioned by tenant, with request coalescing.
//!
//! Identical prompts are common in code-generation pipelines (re-runs of whole jobs, CI); a
//! hit costs no quota at all, and because [`Cache`] is always ready and answers hits itself, a
//! hit never waits for the rate limiter or the concurrency cap below it.
//!
//! # Keys
//!
//! Every cache has a **secret** ([`CacheSecret`], 32 random bytes; see [`CacheLayer::secret`]
//! for where it comes from), from which two independent keys are derived. A [`CacheKey`] is
//! a keyed BLAKE3 hash (the PRF) under the request's **request-line key**, itself a keyed
//! BLAKE3 under the request's **tenant partition** of the request line; the partition is a
//! keyed BLAKE3 hash (under the first key) of the request's [`Tenant`] extension, else of the
//! layer's [`tenant`](CacheLayer::tenant), else of the API key (`x-api-key` or
//! `authorization: Bearer`), else of a shared anonymous tenant: a secret key per tenant, and
//! per tenant and request line. Two tenants never share an entry, and the API key itself
//! appears nowhere. Length-prefixed:
//! - the request line (what keys the PRF): the method, the path and query,
//!   `anthropic-version`, and `anthropic-beta` (flags sorted);
//! - the canonical JSON body (what the PRF hashes): object members sorted by key
//!   recursively, no insignificant whitespace, numbers written from their value (an integer
//!   as an integer, any other number as the shortest round-tripping `f64`), so the key does
//!   not depend on `serde_json`'s `arbitrary_precision` or `preserve_order` features being
//!   enabled elsewhere. It enters as its length and the **NH digest** (under the second key)
//!   of each of its 4 KiB chunks: 40 bytes for the usual body, one BLAKE3 compression (key
//!   layout v4: keys of v3 are misses). The body is read once: the scan of
//!   [`RequestMeta`](crate::anthropic::RequestMeta) records where a compact body (as the SDKs
//!   send it) differs from its canonical form, the members of which objects are out of order,
//!   and the key copies it span by span; a body with whitespace or escapes `serde_json` would
//!   write otherwise is written canonically by a second pass. The key is the same either way.
//!
//! The request-line key of a caller is the same from one request to the next: each thread
//! remembers the last few it derived, as it remembers partitions (in its memory only).
//!
//! **Why NH, and what the secret protects.** NH (the universal hash of UMAC, RFC 4418, here
//! with 64-bit words and two Toeplitz-shifted passes) is not collision resistant: whoever
//! knows its key can write two bodies with the same digest. It is *universal*: for two
//! different bodies of equal length and a key drawn at random, their digests are equal with
//! probability at most 2^-128. A universal hash followed by a PRF is a PRF ("hash then
//! PRF", as Wegman–Carter MACs and AES-GCM-SIV's tag are built): as long as no two bodies a
//! client sent collide under NH, every key it can observe (hit or miss, timing, or the key
//! itself in a Redis key name) is an output of the keyed BLAKE3 on distinct inputs (requests
//! of one partition and request line under one key; of different ones, under different keys,
//! themselves outputs of the keyed BLAKE3 on distinct length-prefixed inputs), and so tells
//! it nothing about the NH key; the chance that any two of `q` requests collide is at
//! most `q²/2^129`. NH costs ~1.2 instructions per byte where BLAKE3 cost ~3.7 (a 2 KB body:
//! ~2.4k instructions instead of 7.6k; measured candidates in `docs/benchmarks.md`, pv13).
//!
//! - A client that can send requests but does **not know the secret** cannot find two
//!   requests with one key (a wrong answer served for another prompt), cannot tell which
//!   request a key it sees belongs to, and cannot link a partition to an API key: all of that
//!   needs the secret, or about 2^64 requests in one partition for even odds of one accidental
//!   collision.
//! - Whoever **can read the secret** (the redb file of a `DiskStore`, where it is kept; the
//!   `<prefix>secret` key of a `RedisStore`; the proxy's configuration) can also read every
//!   cached answer there: the secret adds no confidentiality beyond that. What it adds is
//!   this: with the secret, one can write a request whose NH digest equals that of a known
//!   request of the same length, and a client that can send in the victim's partition (the
//!   same API key, or the same shared tenant) could then store its answer under the victim's
//!   key. Whoever can *write* the file or Redis could store any answer anyway. Protect the
//!   file and the Redis server as you protect the answers, and give the secret elsewhere
//!   ([`CacheLayer::secret`], the proxy's `--cache-secret`) when the store is more exposed
//!   than the configuration.
//! - A memory store's secret is random per process and never leaves it.
//!
//! BLAKE3 for the PRF and the partition because it is a keyed hash of its own (no separate
//! MAC construction) and fast on the ~200 bytes it hashes per key.
//!
//! # What is cached: modes and the request header
//!
//! [`CacheMode`] ([`CacheLayer::mode`]) says which `POST /v1/messages` requests are cached;
//! everything else, and messages requests whose body is not a JSON object, pass through
//! (`bypass`):
//!
//! - [`CacheMode::Deterministic`] (**the default**, for the library as for the proxy): only
//!   requests whose body has `"temperature": 0` (`0` or `0.0`, read from the request's one
//!   [`RequestMeta`](crate::anthropic::RequestMeta) scan). At temperature 0 the API takes the
//!   most likely token at each step, and `top_k` / `top_p` only narrow the choice around that
//!   token, so they do not make such a request sample. A request without `temperature` gets
//!   the API default, 1.0: it is sampled, and two identical calls should get two samples, so
//!   it is not cached unless it opts in;
//! - [`CacheMode::All`]: every request;
//! - [`CacheMode::Off`]: none, whatever the request says.
//!
//! A request can opt in or out with the header `x-tower-claude-cache` (the same name as the
//! response header; removed before the request goes upstream):
//!
//! | value | effect |
//! |---|---|
//! | `use` | cache it even if the mode would not (a sampled request in `deterministic` mode) |
//! | `bypass` | neither read nor store (`bypass`), like `cache-control: no-store` |
//! | `refresh` | do not read; store the fresh answer (`miss`), like `cache-control: no-cache` |
//!
//! `cache-control: no-store` on the request: neither read nor written (`bypass`);
//! `cache-control: no-cache` (or `max-age=0`): not read, but the fresh answer is stored
//! (`miss`), which refreshes the entry. With several directives the most restrictive wins.
//!
//! # What is stored
//!
//! Only complete, valid Messages API answers ([`CachedResponse::is_complete_message`]): a 2xx
//! JSON object whose `type` is `"message"`, or an SSE stream of JSON events from
//! `message_start` to `message_stop`. Never an error status, invalid JSON, HTML, a JSON array,
//! garbage events that end in `message_stop`, a stream that fails, carries `event: error`,
//! ends early, is dropped early, or outgrows [`max_entry_bytes`](CacheLayer::max_entry_bytes).
//! A filtered set of headers is kept ([`CachedResponse::keeps_header`]) and never anything
//! from the request. A JSON answer is read whole (it arrives whole anyway); a streaming answer
//! is forwarded chunk by chunk while a tee records it. A hit for a streaming request replays
//! the stored SSE bytes (a valid stream with the same events and usage); a hit for a JSON
//! request returns the JSON. `stream` is part of the body, so the two never share an entry.
//! TTL: [`ttl`](CacheLayer::ttl), 4 hours by default.
//!
//! # Models
//!
//! An answer is stored under the key of the request **for the model that produced it** (the
//! fallback layer's [`ServedModel`](crate::fallback::ServedModel) extension or
//! `x-tower-claude-model` header; the requested model when there is none), and the entry
//! records that model. A request is served:
//!
//! 1. its own model's entry, if there is one;
//! 2. else, with a [fallback handle](CacheLayer::fallback) (what
//!    [`ClaudeStack`](crate::stack::ClaudeStack) sets up), the entry of the model the fallback
//!    layer below would send this request to **now**: an Opus request gets a cached Sonnet
//!    answer only while Opus is short of quota and fallback would choose Sonnet, never once
//!    Opus has quota back, and never when the request turned fallback off
//!    (`x-tower-claude-fallback: off` or [`NoFallback`](crate::fallback::NoFallback)).
//!
//! Every hit carries `x-tower-claude-model: <the model that wrote it>`, a
//! [`ServedModel`](crate::fallback::ServedModel) extension and `x-tower-claude-cache: hit`.
//!
//! # Storing: after delivery, in batches
//!
//! The store is never on the request path. A complete answer is handed to a bounded queue
//! ([`write_queue`](CacheLayer::write_queue), 4096 by default) and the response goes on at
//! once; a background task writes the queue in batches ([`CacheStore::put_batch`]: one redb
//! transaction, committed durably, so a crash loses at most that batch). A batch is what
//! arrives within 100 ms of its first answer, written at once when 1024 answers wait; answers
//! that queued while the store was busy with the previous batch are written together, up to
//! 4096 (a slow commit is paid once for all of them). Until its batch is written an answer is
//! served from the queue. A full queue drops the answer (not stored),
//! a failing store (full or read-only disk, Redis down) is a miss on lookup and "not stored"
//! on write: both are counted in `tower_claude_cache_writes_total{result="dropped"|"failed"}`
//! (feature `metrics`) with at most one log line per 10 s, never a failed or slower request.
//! [`CacheLayer::flush`] waits for the queue (the proxy calls it on shutdown).
//!
//! # Every response
//!
//! Gets an `x-tower-claude-cache: hit|miss|bypass` header and a [`CacheStatus`] extension.
//!
//! # Coalescing
//!
//! Concurrent identical requests (same key) send one upstream call: the first leads, the
//! others follow and are served as a `hit`.
//!
//! * **JSON**: the followers wait for the leader's stored answer. If the leader fails, gets a
//!   non-2xx answer, is cancelled, or its answer cannot be stored, the followers are released
//!   without an answer (an error is never shared), look the key up again, and one of them
//!   leads.
//! * **Streams**: the followers read the leader's stream **live**, each chunk as it arrives,
//!   from the first event (a follower that joins mid-stream gets the start at once). A task
//!   reads the upstream stream for all of them, so a caller that leaves (the leader's
//!   included) does not cut the others off; when the last one leaves, the upstream stream is
//!   dropped (the request is cancelled upstream) and nothing is stored unless `message_stop`
//!   had arrived. Up to the head of the answer, followers wait as for JSON (a failed leader
//!   is not shared); after it they see what the leader sees, a mid-stream `event: error` or
//!   a broken connection included (the [`RetryLayer`](crate::retry::RetryLayer) below has
//!   already retried what could be retried), and such a stream is not stored. A stream
//!   larger than [`max_entry_bytes`](CacheLayer::max_entry_bytes) takes no new followers.
//!   Outside a Tokio runtime streams are not coalesced.
//!
//! A leader whose caller stops polling its future before the answer's head holds its
//! followers (they wait for it as they would for the upstream answer).
//!
//! # Stores
//!
//! [`MemoryStore`] (a few shards of a map with CLOCK eviction, bounded by what entries really
//! cost, so resident memory follows the bound) and, with the `disk-cache` feature, `DiskStore` (a redb file that survives restarts,
//! bounded by size, oldest evicted first, compacted so the file shrinks). Any other backend
//! implements [`CacheStore`]. A store error is a miss, never a failed request.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_claude::body::RequestBody;
//! use tower_claude::cache::{CacheLayer, CacheStatus};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let upstream = service_fn(|_req: Request<RequestBody>| async {
//!     let res = Response::builder()
//!         .header("content-type", "application/json")
//!         .body(Full::new(bytes::Bytes::from_static(br#"{"type":"message","content":[]}"#)))
//!         .unwrap();
//!     Ok::<_, Infallible>(res)
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(CacheLayer::memory(64 * 1024 * 1024)) // mode `deterministic`: temperature 0
//!     .service(upstream);
//!
//! let request = |body: &'static str| {
//!     Request::post("https://api.anthropic.com/v1/messages")
//!         .header("x-api-key", "sk-ant-example")
//!         .header("anthropic-version", "2023-06-01")
//!         .body(RequestBody::from(body))
//!         .unwrap()
//! };
//! let first = svc.clone()
//!     .oneshot(request(r#"{"model":"claude-haiku-4-5","max_tokens":64,"temperature":0,"messages":[]}"#))
//!     .await
//!     .unwrap();
//! assert_eq!(first.extensions().get::<CacheStatus>(), Some(&CacheStatus::Miss));
//!
//! // Same request, members in another order: a hit.
//! let second = svc
//!     .oneshot(request(r#"{ "messages":[], "temperature":0, "max_tokens":64, "model":"claude-haiku-4-5" }"#))
//!     .await
//!     .unwrap();
//! assert_eq!(second.headers()["x-tower-claude-cache"], "hit");
//! let body = second.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], br#"{"type":"message","content":[]}"#);
//! # }
//! ```

mod body;
mod config;
mod flights;
mod future;
mod hints;
mod key;

mod layer;
mod live;
mod secret;
mod service;
mod store;
mod writer;

pub use body::CacheBody;
pub use future::ResponseFuture;
pub use key::{CacheKey, Tenant};
pub use layer::{CacheLayer, DEFAULT_MAX_ENTRY_BYTES, DEFAULT_TTL, DEFAULT_WRITE_QUEUE};
pub use secret::CacheSecret;
pub use service::Cache;
#[cfg(feature = "disk-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "disk-cache")))]
pub use store::DiskStore;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{CacheStore, CachedResponse, MemoryStore, StoreError, StoreErrorKind, StoreFuture};

/// Which requests a [`CacheLayer`] caches.
///
/// ```
/// use tower_claude::cache::CacheMode;
///
/// assert_eq!(CacheMode::default(), CacheMode::Deterministic);
/// assert_eq!("all".parse::<CacheMode>().unwrap(), CacheMode::All);
/// assert_eq!(CacheMode::Off.as_str(), "off");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CacheMode {
    /// Nothing is read or stored, whatever the request says (`bypass`).
    Off,
    /// Only deterministic requests: `temperature` present and 0 (see the module docs). Others
    /// are cached only when they ask with `x-tower-claude-cache: use`. The default.
    #[default]
    Deterministic,
    /// Every Messages API request (a request can still opt out).
    All,
}

impl CacheMode {
    /// `off`, `deterministic` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Off => "off",
            CacheMode::Deterministic => "deterministic",
            CacheMode::All => "all",
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;

    /// `off` (or `false`, as the proxy's `--cache false`), `deterministic` or `all`,
    /// case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "false" => Ok(CacheMode::Off),
            "deterministic" => Ok(CacheMode::Deterministic),
            "all" => Ok(CacheMode::All),
            other => Err(format!(
                "unknown cache mode `{other}` (expected off, deterministic or all)"
            )),
        }
    }
}

/// What the cache did with a request: a response extension, also sent as the
/// `x-tower-claude-cache` header.
///
/// ```
/// use tower_claude::cache::CacheStatus;
///
/// assert_eq!(CacheStatus::Hit.as_str(), "hit");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Served from the cache (or from a concurrent identical request's answer).
    Hit,
    /// Sent upstream; the answer is stored if it is storable.
    Miss,
    /// Not cached (not a messages call, `no-store` or `x-tower-claude-cache: bypass`, not a
    /// JSON body, not deterministic in mode `deterministic`, mode `off`).
    Bypass,
}

impl CacheStatus {
    /// `hit`, `miss` or `bypass`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

impl std::fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
