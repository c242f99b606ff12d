//! Rate-limit and retry headers.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Header names used by the Anthropic API and by this crate.
pub mod header_names {
    /// API key header.
    pub const X_API_KEY: &str = "x-api-key";
    /// API version header.
    pub const ANTHROPIC_VERSION: &str = "anthropic-version";
    /// Beta features header.
    pub const ANTHROPIC_BETA: &str = "anthropic-beta";
    /// Request id set by the server on every response.
    pub const REQUEST_ID: &str = "request-id";
    /// Seconds (or an HTTP date) to wait before retrying.
    pub const RETRY_AFTER: &str = "retry-after";
    /// Milliseconds to wait before retrying (set by the SDK-facing edge).
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// `true` / `false`: whether the server wants the client to retry.
    pub const X_SHOULD_RETRY: &str = "x-should-retry";
    /// Prefix of every rate-limit header.
    pub const RATELIMIT_PREFIX: &str = "anthropic-ratelimit-";
    /// The attempt number this crate adds to a replayed request (1 for the first attempt).
    pub const X_TOWER_CLAUDE_ATTEMPT: &str = "x-tower-claude-attempt";
    /// The model that served the request, set by the fallback layer.
    pub const X_TOWER_CLAUDE_MODEL: &str = "x-tower-claude-model";
    /// `hit`, `miss` or `bypass`, set by the cache layer.
    pub const X_TOWER_CLAUDE_CACHE: &str = "x-tower-claude-cache";
    /// Per-request opt-out of model fallback (`off`).
    pub const X_TOWER_CLAUDE_FALLBACK: &str = "x-tower-claude-fallback";
}

/// One rate-limit bucket as the server reported it.
///
/// Token `remaining` values are rounded by the server (to thousands); `reset` is the time at
/// which the bucket is full again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketSnapshot {
    /// `anthropic-ratelimit-*-limit`.
    pub limit: Option<u64>,
    /// `anthropic-ratelimit-*-remaining`.
    pub remaining: Option<u64>,
    /// `anthropic-ratelimit-*-reset` (RFC 3339).
    pub reset: Option<SystemTime>,
}

/// Every `anthropic-ratelimit-*` header of one response.
///
/// ```
/// use http::HeaderMap;
/// use tower_claude::anthropic::RateLimitSnapshot;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-remaining", "49".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z".parse().unwrap());
/// headers.insert("anthropic-ratelimit-input-tokens-remaining", "oops".parse().unwrap());
/// let snap = RateLimitSnapshot::from_headers(&headers);
/// assert_eq!(snap.requests.limit, Some(50));
/// assert_eq!(snap.requests.remaining, Some(49));
/// assert!(snap.requests.reset.is_some());
/// assert_eq!(snap.input_tokens.remaining, None); // malformed: skipped
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// `anthropic-ratelimit-requests-*`.
    pub requests: BucketSnapshot,
    /// `anthropic-ratelimit-tokens-*` (the most restrictive token limit).
    pub tokens: BucketSnapshot,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: BucketSnapshot,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: BucketSnapshot,
}

impl RateLimitSnapshot {
    /// Reads every rate-limit header; missing or malformed values are skipped.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        todo!()
    }

    /// Whether no rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Writes the snapshot as `anthropic-ratelimit-*` headers (used by the simulator and proxy).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        todo!()
    }
}

/// The delay the server asked for: `retry-after-ms`, then `retry-after` as (fractional) seconds
/// or an HTTP date (measured from `now`). `None` when absent or malformed.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tower_claude::anthropic::retry_after;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "2".parse().unwrap());
/// assert_eq!(retry_after(&headers, SystemTime::now()), Some(Duration::from_secs(2)));
/// headers.insert("retry-after-ms", "1500".parse().unwrap());
/// assert_eq!(retry_after(&headers, SystemTime::now()), Some(Duration::from_millis(1500)));
/// ```
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    todo!()
}

/// The `x-should-retry` header: `Some(true)` / `Some(false)` when present and valid.
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    todo!()
}

/// The `request-id` header, when present and valid UTF-8.
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    todo!()
}
