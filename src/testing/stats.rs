//! Counters for assertions.

use std::collections::BTreeMap;

/// What the simulator has seen, for assertions ([`MockClaude::stats`](super::MockClaude::stats)
/// returns a copy).
///
/// ```
/// use tower_claude::testing::{MockClaude, MockStats};
///
/// let mock = MockClaude::builder().build();
/// assert_eq!(mock.stats(), MockStats::default());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Every request the service was called with, valid or not, on any path.
    pub received: u64,
    /// `POST /v1/messages` requests admitted with a 200 (a stream that later fails mid-stream
    /// counts here too).
    pub accepted: u64,
    /// Responses by HTTP status, counted when the response head is produced (every received
    /// request gets exactly one, unless its future is dropped before).
    pub by_status: BTreeMap<u16, u64>,
    /// Input tokens charged to admitted requests (what counts toward the input limit: uncached
    /// input and cache writes, plus cache reads for the models whose reads count), per
    /// rate-limit group name. The simulator charges the crate's own estimate
    /// ([`RequestMeta::input_tokens`]) split by its prompt cache: `usage.input_tokens` is the
    /// part after the last cache breakpoint.
    ///
    /// [`RequestMeta::input_tokens`]: crate::anthropic::RequestMeta::input_tokens
    pub input_tokens: BTreeMap<String, u64>,
    /// `cache_read_input_tokens` of admitted requests (read from the simulated prompt cache),
    /// per rate-limit group name.
    pub cache_read_tokens: BTreeMap<String, u64>,
    /// `cache_creation_input_tokens` of admitted requests (written to the simulated prompt
    /// cache), per rate-limit group name.
    pub cache_write_tokens: BTreeMap<String, u64>,
    /// Output tokens delivered by admitted requests, per rate-limit group name, counted when the
    /// answer ends: all of them for a complete answer, those sent before the error or the drop
    /// for one cut short.
    pub output_tokens: BTreeMap<String, u64>,
    /// The largest number of admitted requests in flight at once.
    pub max_in_flight: u64,
    /// Admitted requests in flight now (admitted, body not yet fully sent nor dropped).
    pub in_flight: u64,
    /// 429 `rate_limit_error` responses: over a bucket, or a scripted
    /// [`Fault::RateLimited`](super::Fault::RateLimited). The spend cap is not counted here.
    pub rate_limited: u64,
    /// The part of `rate_limited` refused by the acceleration model
    /// ([`MockClaudeBuilder::acceleration_limit`](super::MockClaudeBuilder::acceleration_limit)):
    /// the acceleration ceiling, not a bucket, set the wait.
    pub acceleration_limited: u64,
}
