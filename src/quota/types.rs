//! Plain data types of the quota board: costs, limits, reservation policies and read views.

use std::time::Duration;

use super::prompt_cache::PromptCacheUsage;
use crate::anthropic::{KeyId, RateLimitGroup, RateLimitSnapshot};

/// The cost of one request in the three buckets Anthropic limits: requests, input tokens and
/// output tokens per minute.
///
/// ```
/// use tower_claude::quota::Cost;
///
/// let cost = Cost::new(1, 1_200, 1_024);
/// assert_eq!(cost.input_tokens, 1_200);
/// assert_eq!(Cost::default(), Cost::new(0, 0, 0));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Request units (1 per request).
    pub requests: u64,
    /// Input tokens that count toward the input-tokens-per-minute limit.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

impl Cost {
    /// A cost of `requests` requests, `input_tokens` and `output_tokens`.
    pub const fn new(requests: u64, input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            requests,
            input_tokens,
            output_tokens,
        }
    }

    pub(crate) fn as_array(&self) -> [u64; 3] {
        [self.requests, self.input_tokens, self.output_tokens]
    }
}

/// Per-minute limits of one `(key, rate-limit group)`: requests (RPM), input tokens (ITPM) and
/// output tokens (OTPM), as on Anthropic's limits page.
///
/// A limit of 0 admits nothing (every request is
/// [`RequestTooLarge`](crate::quota::AcquireErrorKind::RequestTooLarge)).
///
/// ```
/// use tower_claude::quota::Limits;
///
/// let tier1_opus = Limits { rpm: 50, itpm: 30_000, otpm: 8_000 };
/// assert_eq!(tier1_opus, Limits::new(50, 30_000, 8_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: u64,
    /// Input tokens per minute.
    pub itpm: u64,
    /// Output tokens per minute.
    pub otpm: u64,
}

impl Limits {
    /// Limits of `rpm` requests, `itpm` input tokens and `otpm` output tokens per minute.
    pub const fn new(rpm: u64, itpm: u64, otpm: u64) -> Self {
        Self { rpm, itpm, otpm }
    }

    pub(crate) fn as_array(&self) -> [u64; 3] {
        [self.rpm, self.itpm, self.otpm]
    }
}

/// How many output tokens to reserve when a request is admitted (settled from the real usage
/// when the response ends).
///
/// ```
/// use tower_claude::quota::OutputReservation;
///
/// assert_eq!(OutputReservation::default().reserve(Some(4_096)), 4_096);
/// assert_eq!(OutputReservation::Fraction(0.25).reserve(Some(4_096)), 1_024);
/// assert_eq!(OutputReservation::None.reserve(Some(4_096)), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub enum OutputReservation {
    /// Reserve the request's `max_tokens` (what the API itself does): never overshoots the
    /// output limit, and refunds make the unused part available again at once.
    #[default]
    MaxTokens,
    /// Reserve this fraction (clamped to `0.0..=1.0`) of `max_tokens`: more throughput when
    /// answers are usually short, with some risk of upstream 429s when they are not.
    Fraction(f64),
    /// Reserve nothing; output is only charged when the response ends.
    None,
}

impl OutputReservation {
    /// The number of output tokens to reserve for a request with this `max_tokens` (a request
    /// without `max_tokens` reserves nothing).
    pub fn reserve(&self, max_tokens: Option<u64>) -> u64 {
        let max = max_tokens.unwrap_or(0);
        match *self {
            OutputReservation::MaxTokens => max,
            OutputReservation::Fraction(f) => {
                let f = if f.is_finite() {
                    f.clamp(0.0, 1.0)
                } else {
                    1.0
                };
                (max as f64 * f).ceil() as u64
            }
            OutputReservation::None => 0,
        }
    }
}

/// The state of one bucket as the board sees it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketHeadroom {
    /// The per-minute limit (the bucket's capacity).
    pub limit: u64,
    /// Units available now (0 while the bucket is in debt).
    pub remaining: u64,
    /// `remaining / limit`, in `0.0..=1.0`.
    pub fraction: f64,
    /// Time until the bucket is full again, without further use.
    pub full_in: Duration,
}

/// How much quota a `(key, group)` has left, as seen by the board.
///
/// A bucket whose limit is neither configured nor learned yet is `None` and does not count in
/// [`Headroom::fraction`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headroom {
    /// Requests per minute.
    pub requests: Option<BucketHeadroom>,
    /// Input tokens per minute.
    pub input_tokens: Option<BucketHeadroom>,
    /// Output tokens per minute.
    pub output_tokens: Option<BucketHeadroom>,
    /// The binding fraction: the minimum over the known buckets (1.0 when none is known).
    pub fraction: f64,
    /// Time until every known bucket is full.
    pub full_in: Duration,
    /// Requests waiting in the board's queue for this `(key, group)`.
    pub queued: usize,
}

/// Everything the board knows about one `(key, group)`, for status pages and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaStatus {
    /// The key id (never the key).
    pub key: KeyId,
    /// The rate-limit group.
    pub group: RateLimitGroup,
    /// Whether the limits come from configuration (`true`) or were learned from response
    /// headers (`false`).
    pub configured: bool,
    /// The current headroom (limits, remaining, fractions).
    pub headroom: Headroom,
    /// Requests waiting for capacity.
    pub queue_depth: usize,
    /// Admitted requests whose reservation is not settled yet (in flight).
    pub in_flight: usize,
    /// The last `anthropic-ratelimit-*` snapshot observed, and how long ago.
    pub last_snapshot: Option<(RateLimitSnapshot, Duration)>,
    /// Prompt-cache tokens (read, written, uncached) reported by the server for this
    /// `(key, group)`, when any response was settled by a rate limiter of this board.
    pub prompt_cache: Option<PromptCacheUsage>,
}
