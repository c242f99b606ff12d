//! Quota state: token-bucket maths and the shared [`QuotaBoard`] of limits, buckets, server
//! snapshots and wait queues per `(key id, rate-limit group)`.
//!
//! Anthropic limits requests, input tokens and output tokens per minute, per API key and per
//! model group, with buckets that refill continuously. The board mirrors that locally so that
//! requests which would be refused are held back instead of sent:
//!
//! * [`TokenBucket`]: continuous-refill arithmetic on [`tokio::time::Instant`] (paused-time
//!   friendly, refundable, re-seedable from the server's view).
//! * [`QuotaBoard`]: per `(key, group)` three buckets, the limits (configured or learned from
//!   `anthropic-ratelimit-*-limit` headers), the last server snapshot, and a queue of waiters
//!   (weighted-fair across tenants, FIFO within one: [`tenant::fair`](crate::tenant::fair)).
//!   [`QuotaBoard::acquire`] hands out [`Reservation`]s that are settled from the real usage.
//! * Read views for other layers: [`Headroom`], [`QuotaStatus`].
//!
//! The [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) drives the board from HTTP
//! traffic; give the same board to several layers to share one view of the quota:
//!
//! ```
//! use tower::ServiceBuilder;
//! use tower_claude::anthropic::RateLimitGroup;
//! use tower_claude::quota::{Limits, QuotaBoard};
//! use tower_claude::rate_limit::RateLimitLayer;
//! # use tower_claude::body::RequestBody;
//! # use tower_claude::BoxError;
//!
//! let board = QuotaBoard::builder()
//!     .limits(RateLimitGroup::new("claude-opus-4"), Limits { rpm: 50, itpm: 30_000, otpm: 8_000 })
//!     .build();
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new().board(board.clone()))
//!     .service(tower::service_fn(|_req: http::Request<RequestBody>| async {
//!         Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
//!     }));
//! # drop(svc);
//! // Other layers (fallback, key pool, a status page) read the same board:
//! for status in board.statuses() {
//!     println!("{} {}: {:.0}% left", status.key, status.group, status.headroom.fraction * 100.0);
//! }
//! ```

mod board;
mod bucket;
mod error;
mod local;
pub(crate) mod prompt_cache;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
mod types;

#[cfg(test)]
mod tests;

#[cfg(feature = "redis")]
pub use self::redis::{RedisOptions, RedisSetupError, RedisSetupErrorKind, RedisStatus};
#[cfg(test)]
pub(crate) use board::observations;
pub use board::{Acquire, Admission, QuotaBoard, QuotaBoardBuilder, Reservation};
pub use bucket::{TakeError, TokenBucket};
pub use error::{AcquireError, AcquireErrorKind};
pub use prompt_cache::{
    DEFAULT_PREFIX_CAPACITY, PromptCacheEstimate, PromptCacheMemory, PromptCacheUsage,
};
pub use types::{BucketHeadroom, Cost, Headroom, Limits, OutputReservation, QuotaStatus};
