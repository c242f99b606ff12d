//! Retries for Messages API calls that failed for a transient reason: 429 / 529 aware, with
//! server-directed delays, jittered backoff, a per-request deadline and a shared budget.
//!
//! The official SDKs retry twice and give up, so a batch of tasks dies in a 529 storm or a
//! tight quota. [`RetryLayer`] keeps going (8 attempts by default, waits of up to 90 s) while
//! never sleeping past the caller's deadline and never feeding a retry storm.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_claude::body::RequestBody;
//! use tower_claude::retry::{Deadline, RetryInfo, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_claude::BoxError> {
//! // An upstream that is overloaded once, then answers.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let upstream = service_fn(move |_req: Request<RequestBody>| {
//!     let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let response = if n == 0 {
//!             Response::builder().status(529).body(Full::new(Bytes::from_static(
//!                 br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
//!             )))?
//!         } else {
//!             Response::new(Full::new(Bytes::from_static(br#"{"type":"message"}"#)))
//!         };
//!         Ok::<_, tower_claude::BoxError>(response)
//!     }
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(RetryLayer::new().max_attempts(4).deadline(Duration::from_secs(120)))
//!     .service(upstream);
//!
//! let mut request = Request::post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .body(RequestBody::from(r#"{"model":"claude-sonnet-4-6","max_tokens":64,"messages":[]}"#))?;
//! // A per-request deadline overrides the layer's default.
//! request.extensions_mut().insert(Deadline::after(Duration::from_secs(60)));
//!
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! let info = response.extensions().get::<RetryInfo>().unwrap();
//! assert_eq!(info.attempts(), 2);
//! assert_eq!(info.last_failure_status().map(|s| s.as_u16()), Some(529));
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], br#"{"type":"message"}"#);
//! # Ok(())
//! # }
//! ```
//!
//! # What is retried
//!
//! Only `POST /v1/messages` calls; everything else (and a body that cannot be scanned, which
//! upstream answers with 400) passes through untouched. `x-should-retry` decides first when
//! present. Otherwise 408, 409, 429, 500, 502, 503, 504 and 529 are retried, as are inner
//! service errors (connection errors and timeouts before any response byte) except those no
//! wait can cure, which fail at once: a key pool with no key left, a request larger than a
//! whole minute of a configured quota, a body over the size limit. 400, 401, 403,
//! 404, 413 and every other status are returned at once. A 429 whose envelope says
//! `enforced_spend_limit_reached` (the monthly spend cap) is never retried: the layer fails
//! with [`RetryErrorKind::SpendLimit`]. To see that, and to report the server's message, the
//! layer reads the body of a retryable error response (at most 64 KiB; error envelopes are
//! a few hundred bytes) and replays it unchanged if it returns that response.
//!
//! These rules are the default [`Policy`], [`Transient`]; give the layer your own with
//! [`RetryLayer::policy`], composed with [`PolicyExt`] (see [`policy`]). The spend cap is
//! never retried whatever the policy says.
//!
//! # What is returned
//!
//! A proxy in front of an SDK must forward what upstream said, so when the layer gives up on
//! a failure that has an HTTP response (attempts exhausted, the deadline or the budget
//! reached), it returns **the last upstream response unchanged**: status, headers
//! (`retry-after`, `anthropic-ratelimit-*`, `request-id`) and body. Every response the
//! layer returns carries a [`RetryInfo`] extension: attempts, total wait, elapsed time, the
//! last failure's status and server message, and why the layer stopped
//! ([`RetryOutcome`]).
//!
//! The layer fails with a [`RetryError`] (boxed; `downcast_ref` it) only when there is no
//! response to forward (the last attempt was an inner service error: kinds
//! [`Exhausted`](RetryErrorKind::Exhausted), [`DeadlineExceeded`](RetryErrorKind::DeadlineExceeded),
//! [`BudgetExhausted`](RetryErrorKind::BudgetExhausted), [`Inner`](RetryErrorKind::Inner)),
//! and for the spend cap, which must not look like a transient 429 to a caller that would
//! retry it. The error carries the last status, the server's error, the attempts and the time
//! spent. A proxy answering a `SpendLimit` error should send the envelope with
//! `x-should-retry: false`.
//!
//! # How long it waits
//!
//! `retry-after-ms`, then `retry-after` (seconds or an HTTP date), then, for a 429, the
//! `anthropic-ratelimit-*-reset` of the exhausted bucket, else exponential backoff with
//! decorrelated [`Jitter`]. A server delay is a floor; a positive spread of up to 1 s is added
//! so that callers told the same whole-second `retry-after` come back at different instants.
//! Consecutive 429s on one (API key, rate-limit group) lengthen the backoff base of every
//! request sharing them; successes relax it. Every wait is capped by `max_delay` (90 s by
//! default, so one-minute quota resets are waited for). See [`Jitter`] and the `backoff`
//! source for the exact rules.
//!
//! # Pacing after 429s
//!
//! A `retry-after` says when the quota can admit *one* request. When many requests of the
//! layer wait on the same quota, sending them all when it ends (even spread over a second)
//! makes all but a few collide again, and under a tight quota an unlucky request collides on
//! every attempt until `max_attempts` is spent: the task is lost. So after a 429 with a delay
//! the layer paces what it sends on that (API key, rate-limit group): each waiting request
//! reserves its own admission slot, no earlier than the server's delay and one step after the
//! previous slot. The step is the time the quota needs to admit one request like it, the
//! largest share of a per-minute `anthropic-ratelimit-*-limit` it uses (e.g.
//! `60 s / requests-limit`; at most the server's delay), plus a 10 % margin doubled per
//! consecutive 429, so an estimate that is too fast corrects itself. While slots are
//! reserved, a *new* request on that key and group takes the next slot too rather than being
//! sent into a quota known to be exhausted (it does not hold what the inner `poll_ready`
//! reserved while it waits, and never waits past its deadline). When the last slot has
//! passed, requests go straight through again. Turn it off with
//! [`pacing(false)`](RetryLayer::pacing). A rate limiter below the layer
//! ([`rate_limit`](crate::rate_limit)) avoids most 429s in the first place; pacing is what
//! keeps the retry layer alone from losing tasks: in `tests/retry.rs`, 1,000 tasks on 32
//! workers against a simulated 600 RPM quota with 10 % 529s lose none with this layer and 104
//! with an SDK-like policy (2 retries, server delay honoured up to 60 s); on 16 workers at
//! 100 RPM, none against 713.
//!
//! # Limits
//!
//! `max_attempts` (default 8, the first attempt included); a deadline per request (a
//! [`Deadline`] extension, else the layer's [`deadline`](RetryLayer::deadline)): when the next
//! wait would cross it, the layer stops at once and returns the last outcome (the first
//! attempt is always sent); the deadline is
//! also inserted into each attempt's extensions for the layers below. An optional shared
//! [`RetryBudget`] bounds retries to a share of the traffic.
//!
//! The deadline covers the upstream too: waiting for the inner service's readiness, each call
//! until its response head, and everything the layer reads ahead (an error body, a held-back
//! stream, and, when the request has a deadline, a 2xx JSON body, read whole up to 4 MiB
//! before it is returned). When the deadline passes there, the attempt is dropped and the
//! layer fails with [`RetryErrorKind::DeadlineExceeded`] without a source (a proxy answers it
//! 504 `timeout_error`). A body returned before the deadline and still running at it ends
//! there: an event stream with an `event: error` of type `timeout_error`, any other body with
//! an error.
//!
//! # Streams
//!
//! A stream can fail after HTTP 200 with `event: error` (`overloaded_error`). Such a failure
//! can be retried only if nothing of the stream has reached the caller. So the layer holds a
//! 2xx `text/event-stream` response back (reading and buffering its events) until the first
//! content event (`content_block_start` or anything after `message_start` other than `ping`),
//! then forwards the held bytes and the rest of the stream. An `event: error`, a body failure, or
//! an end of stream before any content is retried like any transient failure (after backoff:
//! the 200's headers carry no delay). Once content has been forwarded, a later `event: error`
//! passes to the caller as it is; a stream that is cut or ends before `message_stop` without
//! one ends with an `event: error` of type `api_error` ("upstream stream ended before
//! message_stop"), never silently. When every attempt breaks before any content, the caller
//! gets an error status and envelope (the stream's own error, else 500 `api_error`), not a
//! 200 with a broken body; so does a 2xx JSON answer that is cut or not a JSON object (read
//! ahead when the request has a deadline). An error status whose body is not an error
//! envelope gets the envelope of its status. Holding back costs only the time between
//! `message_start` and the first content block; it can be turned off with
//! [`hold_back_stream(false)`](RetryLayer::hold_back_stream).
//!
//! # Mechanics
//!
//! The buffered request ([`RequestBody`](crate::body::RequestBody)) is cloned for each attempt,
//! with its extensions, and gets the header `x-tower-claude-attempt: n`. The inner service
//! must be `Clone`; [`ready`](tower::ServiceExt::ready) is called on it before every attempt.
//! Jitter is seedable ([`RetryLayer::seed`]) for reproducible tests.

mod backoff;
mod body;
mod budget;
mod error;
mod future;
mod layer;
mod pacing;
pub mod policy;
mod resend;
mod service;
mod spare;

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

pub use backoff::Jitter;
pub use body::RetryBody;
pub use budget::RetryBudget;
pub use error::{RetryError, RetryErrorKind};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use policy::{Action, Attempt, Policy, PolicyExt, Transient, policy_fn};
pub use service::Retry;

pub(crate) use resend::{Described, LowerModels, Resend, ServerWait};
pub(crate) use spare::Spare;

/// A request extension: the instant after which [`Retry`] starts no new wait. It overrides
/// the layer's default [`deadline`](RetryLayer::deadline).
///
/// ```
/// use std::time::Duration;
/// use tower_claude::retry::Deadline;
///
/// let mut request = http::Request::new(tower_claude::body::RequestBody::empty());
/// request.extensions_mut().insert(Deadline::after(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// A deadline at `instant`.
    pub fn at(instant: Instant) -> Self {
        Self(instant)
    }

    /// A deadline `timeout` from now (about 30 years at most: a longer timeout is no deadline
    /// in practice).
    pub fn after(timeout: Duration) -> Self {
        const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
        let now = Instant::now();
        Self(
            now.checked_add(timeout.min(FAR))
                .unwrap_or_else(|| now + Duration::from_secs(24 * 60 * 60)),
        )
    }

    /// The instant.
    pub fn instant(self) -> Instant {
        self.0
    }
}

/// Why [`Retry`] returned the response it returned (see [`RetryInfo::outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryOutcome {
    /// The response is a success (2xx).
    Success,
    /// The response is an error the policy does not retry (400, `x-should-retry: false`, ...).
    NotRetryable,
    /// The response is the last of `max_attempts` failed attempts.
    Exhausted,
    /// The response is the last failed attempt: the next wait would have crossed the deadline.
    DeadlineExceeded,
    /// The response is the last failed attempt: the retry budget refused another.
    BudgetExhausted,
    /// The response is a 429 whose server-directed wait is longer than the request's
    /// [`MaxServerWait`]: a layer above (fallback) has a better option than waiting.
    WaitTooLong,
}

/// A request extension: the longest server-directed wait (a 429's `retry-after` or quota
/// reset) that [`Retry`] may sleep for this request. A 429 asking for more is returned at once,
/// with [`RetryOutcome::WaitTooLong`] in its [`RetryInfo`].
///
/// [`FallbackLayer`](crate::fallback::FallbackLayer) sets it while a lower model is left in the
/// request's chain, so that a model whose quota is gone is abandoned at once instead of waited
/// for; on the last model of the chain it is not set, and the retry layer waits as usual.
///
/// ```
/// use std::time::Duration;
/// use tower_claude::retry::MaxServerWait;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(MaxServerWait(Duration::from_secs(10)));
/// # assert!(request.extensions().get::<MaxServerWait>().is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxServerWait(pub Duration);

/// A response extension set by a layer below [`Retry`]: the next attempt of this request goes
/// out differently and can be sent after at most this long, whatever the response says.
///
/// [`KeyPoolLayer`](crate::key_pool::KeyPoolLayer) sets it when a key fails a request (a 429,
/// a spend cap, a 401, 402 or 403) and another key in rotation can take the request: the
/// time until that key can (zero: now); and after a 429 rate limit with no other key when it
/// admits through a quota board: the time until the key's cooldown ends (the retry then
/// waits in the pool's line, which the board paces). The retry layer then
///
/// * retries the response whatever its status (a spend cap or a 401 of one key is not the
///   request's fault), within the attempts, the deadline and the budget as always;
/// * waits at most this long instead of the answer's `retry-after` (the other key does not
///   need it);
/// * does not raise the 429 penalty of the request's key and group, and does not pace it
///   (the next attempt goes out with another key, or waits in the pool's line).
///
/// ```
/// use std::time::Duration;
/// use tower_claude::retry::RetrySooner;
///
/// let mut response = http::Response::new(());
/// response.extensions_mut().insert(RetrySooner(Duration::ZERO));
/// # assert!(response.extensions().get::<RetrySooner>().is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySooner(pub Duration);

/// A response extension added by [`Retry`] to every Messages API response it returns.
///
/// ```
/// use tower_claude::retry::{RetryInfo, RetryOutcome};
///
/// fn log(response: &http::Response<()>) {
///     if let Some(info) = response.extensions().get::<RetryInfo>() {
///         if info.outcome() != RetryOutcome::Success {
///             eprintln!("gave up after {} attempts: {:?}", info.attempts(), info.last_error_message());
///         }
///     }
/// }
/// # log(&http::Response::new(()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryInfo {
    attempts: u32,
    total_wait: Duration,
    elapsed: Duration,
    last_failure_status: Option<StatusCode>,
    last_error_message: Option<String>,
    outcome: RetryOutcome,
}

impl RetryInfo {
    pub(crate) fn new(
        attempts: u32,
        total_wait: Duration,
        elapsed: Duration,
        last_failure_status: Option<StatusCode>,
        last_error_message: Option<String>,
        outcome: RetryOutcome,
    ) -> Self {
        Self {
            attempts,
            total_wait,
            elapsed,
            last_failure_status,
            last_error_message,
            outcome,
        }
    }

    /// Attempts made, the first included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Total time spent waiting between attempts.
    pub fn total_wait(&self) -> Duration {
        self.total_wait
    }

    /// Time from the request reaching the layer to this response.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The status of the most recent failed attempt (the returned response's own status when
    /// it is a failure); `None` when no attempt failed with a response.
    pub fn last_failure_status(&self) -> Option<StatusCode> {
        self.last_failure_status
    }

    /// The server's message (or the inner error) of the most recent failed attempt.
    pub fn last_error_message(&self) -> Option<&str> {
        self.last_error_message.as_deref()
    }

    /// Why this response was returned.
    pub fn outcome(&self) -> RetryOutcome {
        self.outcome
    }
}
