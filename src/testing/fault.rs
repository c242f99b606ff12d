//! Scripted outcomes.

use std::time::Duration;

/// A scripted outcome for the next Messages request, queued with
/// [`MockClaude::push_fault`](super::MockClaude::push_fault).
///
/// Scripted faults are consumed in order, one per valid `POST /v1/messages` request (requests
/// rejected by validation — 400, 401, 404, 413 — do not consume them), before the spend cap, the
/// in-flight cap, the random faults and the rate limits are looked at. A faulted request takes
/// nothing from the token buckets.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::testing::{Fault, MockClaude};
///
/// let mock = MockClaude::builder().build();
/// mock.push_fault(Fault::Overloaded);
/// mock.push_fault(Fault::RateLimited { retry_after: Duration::from_secs(2) });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// 529 `overloaded_error`.
    Overloaded,
    /// 500 `api_error`.
    ServerError,
    /// 429 `rate_limit_error` with `retry-after` = the duration rounded up to whole seconds.
    RateLimited {
        /// The delay announced in `retry-after`.
        retry_after: Duration,
    },
    /// 429 with `error.details.error_code = "enforced_spend_limit_reached"`, no `retry-after`.
    SpendCap,
    /// A spend cap in another shape seen in the wild: a 429 `rate_limit_error` without an error
    /// code whose message says the request "would exceed your account's monthly spend limit".
    SpendCapMessage,
    /// A spend cap in another shape seen in the wild: a 400 `invalid_request_error` saying
    /// "You have reached your specified API usage limits".
    UsageLimitReached,
    /// A streaming request is admitted (and charged) and fails after its first content delta
    /// with `event: error` (`overloaded_error`); a non-streaming request gets a 529. If the
    /// rate limits reject the request, it gets its 429 and the fault is used up.
    MidStreamError,
    /// An error response with this status and the envelope of
    /// [`ApiErrorKind::from_status`](crate::anthropic::ApiErrorKind::from_status). Codes below
    /// 400 or above 599 are answered as 500.
    Status(u16),
}
