//! Token-bucket rate limiting of Messages API requests: [`RateLimitLayer`].
//!
//! Each `POST /v1/messages` request is admitted only when the `(key, rate-limit group)`
//! buckets of a [`QuotaBoard`](crate::quota::QuotaBoard) hold its cost: 1 request, its
//! estimated input tokens that count toward the limit (cache-aware: a prompt-cache prefix the
//! same key sent to the same model within its TTL is left out, see
//! [`RateLimitLayer::cache_aware`]), and an output reservation
//! ([`OutputReservation`](crate::quota::OutputReservation): `max_tokens` by default). Requests
//! that do not fit wait in the response future, in the `(key, group)`'s queue: FIFO, or
//! weighted-fair across the requests' [`Tenant`](crate::tenant::Tenant) extensions
//! (`interactive` before `batch`, FIFO within a tenant; see
//! [`tenant::fair`](crate::tenant::fair)); a cancelled wait takes nothing. The time a
//! request waited is added to its tenant's
//! [`TenantStats::queue_wait`](crate::tenant::TenantStats::queue_wait).
//!
//! After the response:
//! * its `anthropic-ratelimit-*` headers re-seed the board (limits are learned when not
//!   configured; levels are lowered to the server's view);
//! * a success is settled from the real usage when the body ends (JSON `usage`, or the SSE
//!   stream's `message_start` / `message_delta`), refunding the unused reservation at once and
//!   waking waiters; streams hold their reservation until the end of the body;
//! * an error status (429, 529, 4xx, 5xx) is settled as "not charged" except for the request
//!   unit;
//! * an inner service error (the request never got an answer) refunds everything.
//!
//! The response carries a [`QueueWait`] extension: how long the request waited for quota.
//! Failures are [`AcquireError`]s in the [`BoxError`](crate::BoxError):
//! [`QueueTimeout`](AcquireErrorKind::QueueTimeout) after [`RateLimitLayer::max_wait`],
//! carrying when capacity should return, and
//! [`RequestTooLarge`](AcquireErrorKind::RequestTooLarge) when a request's counted input
//! tokens exceed the per-minute limit (the output reservation is clamped to the output limit),
//! carrying the numbers ([`AcquireError::sizes`]).
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::anthropic::RateLimitGroup;
//! use tower_claude::body::RequestBody;
//! use tower_claude::quota::Limits;
//! use tower_claude::rate_limit::{QueueWait, RateLimitLayer};
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":5}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let layer = RateLimitLayer::new()
//!     .default_limits(Limits { rpm: 50, itpm: 30_000, otpm: 8_000 })
//!     .max_wait(Duration::from_secs(30));
//! let board = layer.quota_board().clone();
//! let client = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let request = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .body(RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hi"}]}"#))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.extensions().get::<QueueWait>(), Some(&QueueWait(Duration::ZERO)));
//! // Reading the body to its end settles the reservation from the real usage.
//! let _ = http_body_util::BodyExt::collect(response.into_body()).await?;
//! let status = &board.statuses()[0];
//! assert_eq!(status.in_flight, 0);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

mod body;
pub(crate) mod config;
mod future;
mod layer;
pub(crate) mod service;

pub use body::RateLimitBody;
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use service::RateLimit;

pub use crate::quota::{AcquireError, AcquireErrorKind};

/// Response extension set by [`RateLimit`]: how long the request waited for quota before it
/// was sent (zero when admitted at once).
///
/// ```
/// use std::time::Duration;
/// use tower_claude::rate_limit::QueueWait;
///
/// let mut response = http::Response::new(());
/// response.extensions_mut().insert(QueueWait(Duration::from_millis(250)));
/// assert_eq!(response.extensions().get::<QueueWait>().unwrap().0.as_millis(), 250);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueWait(pub Duration);
