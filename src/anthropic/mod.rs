//! The Anthropic Messages API protocol: headers, errors, request metadata, usage and SSE parsing,
//! the model catalogue, and API key ids.
//!
//! Everything here is pure parsing and data: no I/O, no clock other than values passed in.
//! Every parser is total: malformed input gives `None`, a skipped field or a typed error,
//! never a panic.

mod answer;
mod error;
mod estimate;
mod headers;
mod key;
mod meta;
mod models;
pub(crate) mod recent;
mod scan;
mod usage;

pub(crate) use error::is_typed_object;
pub use error::{ApiError, ApiErrorKind, is_spend_limit_message};
pub use estimate::{CacheBreakpoint, CacheTtl, MAX_BREAKPOINTS};
pub(crate) use headers::parsed_names;
pub use headers::{
    BucketSnapshot, MAX_RETRY_AFTER, RateLimitSnapshot, header_names, request_id, retry_after,
    should_retry,
};
pub use key::KeyId;
pub use meta::{RequestMeta, rewrite_model};
pub use models::{ModelCatalog, ModelEntry, ModelFamily, RateLimitGroup};
#[cfg(test)]
pub(crate) use scan::write_canonical_number;
pub use scan::{MetaError, MetaErrorKind};
pub(crate) use scan::{want_canonical_hints, write_canonical};
pub use usage::{BodyState, SseEvent, SseParser, StreamTracker, Usage, UsageTracker};

/// Whether a request is a Messages API call (`POST .../v1/messages`), the requests this crate's
/// layers apply their policies to. Everything else (`count_tokens`, model lists, ...) passes
/// through them untouched.
///
/// ```
/// use http::Method;
/// use tower_claude::anthropic::is_messages_call;
///
/// assert!(is_messages_call(&Method::POST, "/v1/messages"));
/// assert!(!is_messages_call(&Method::POST, "/v1/messages/count_tokens"));
/// assert!(!is_messages_call(&Method::GET, "/v1/messages"));
/// ```
pub fn is_messages_call(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST && path.trim_end_matches('/').ends_with("/v1/messages")
}

/// [`is_messages_call`] of a request's method and URI, out of line: every layer of the stack
/// asks it of every request, and in line each asking layer carried its own copy of
/// `Uri::path` and of the suffix test (~4 lines of the instruction cache each, all run every
/// request); out of line they share one.
#[inline(never)]
pub(crate) fn is_messages_request(method: &http::Method, uri: &http::Uri) -> bool {
    is_messages_call(method, uri.path())
}
