//! A response cache for Messages API calls, partitioned by tenant, with request coalescing.
//!
//! Identical prompts are common in code-generation pipelines (re-runs of whole jobs, CI); a
//! hit costs no quota at all, and because [`Cache`] is always ready and answers hits itself, a
//! hit never waits for the rate limiter or the concurrency cap below it.
//!
//! # Keys
//!
//! A [`CacheKey`] is BLAKE3 (a derived-key hash) over, length-prefixed:
//! - the **tenant partition**: a keyed BLAKE3 hash of the request's [`Tenant`] extension, else
//!   of the layer's [`tenant`](CacheLayer::tenant), else of the API key (`x-api-key` or
//!   `authorization: Bearer`), else a shared anonymous partition. Two tenants never share an
//!   entry, and the key itself appears nowhere (see [`CacheLayer::tenant_secret`]);
//! - the method, the path and query, `anthropic-version`, and `anthropic-beta` (flags sorted);
//! - the canonical JSON body: object members sorted by key recursively, no insignificant
//!   whitespace, numbers written from their value (an integer as an integer, any other number
//!   as the shortest round-tripping `f64`), so the key does not depend on `serde_json`'s
//!   `arbitrary_precision` or `preserve_order` features being enabled elsewhere.
//!
//! BLAKE3 rather than SHA-256 because it is several times faster on prompt-sized inputs (the
//! `cache` bench measures both on 10 KB).
//!
//! # What is stored
//!
//! Only `POST /v1/messages` requests are cached; everything else, and messages requests whose
//! body is not a JSON object, pass through (`bypass`). Only complete 2xx responses are stored,
//! with a filtered set of headers ([`CachedResponse::keeps_header`]) and never anything from
//! the request. A JSON answer is read whole and stored before it is returned. A streaming
//! (SSE) answer is forwarded chunk by chunk while a tee records it, and it is stored only
//! after `message_stop`: never a stream that fails, carries `event: error`, ends early, is
//! dropped early, or outgrows [`max_entry_bytes`](CacheLayer::max_entry_bytes). A hit for a
//! streaming request replays the stored SSE bytes (a valid stream with the same events and
//! usage); a hit for a JSON request returns the JSON. `stream` is part of the body, so the two
//! never share an entry.
//!
//! # Policy
//!
//! - TTL: [`ttl`](CacheLayer::ttl), 4 hours by default.
//! - `cache-control: no-store` on the request: neither read nor written (`bypass`).
//!   `cache-control: no-cache` (or `max-age=0`): not read, but the fresh answer is stored
//!   (`miss`), which refreshes the entry.
//! - [`only_deterministic`](CacheLayer::only_deterministic): only `"temperature": 0`.
//! - Every response gets an `x-tower-claude-cache: hit|miss|bypass` header and a
//!   [`CacheStatus`] extension.
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
//! [`MemoryStore`] (moka, bounded by bytes) and, with the `disk-cache` feature, `DiskStore`
//! (a redb file that survives restarts, bounded by size, oldest evicted first). Any other
//! backend implements [`CacheStore`]. A store error is a miss, never a failed request.
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
//!     .layer(CacheLayer::memory(64 * 1024 * 1024))
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
//!     .oneshot(request(r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[]}"#))
//!     .await
//!     .unwrap();
//! assert_eq!(first.extensions().get::<CacheStatus>(), Some(&CacheStatus::Miss));
//!
//! // Same request, members in another order: a hit.
//! let second = svc
//!     .oneshot(request(r#"{ "messages":[], "max_tokens":64, "model":"claude-haiku-4-5" }"#))
//!     .await
//!     .unwrap();
//! assert_eq!(second.headers()["x-tower-claude-cache"], "hit");
//! let body = second.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], br#"{"type":"message","content":[]}"#);
//! # }
//! ```

mod body;
mod future;
mod key;
mod layer;
mod live;
mod service;
mod store;
mod writer;

pub use body::CacheBody;
pub use future::ResponseFuture;
pub use key::{CacheKey, Tenant};
pub use layer::{CacheLayer, DEFAULT_MAX_ENTRY_BYTES, DEFAULT_TTL, DEFAULT_WRITE_QUEUE};
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
    /// Not cacheable (not a messages call, `no-store`, not a JSON body, not deterministic).
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
