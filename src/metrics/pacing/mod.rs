//! Predictive throttling: [`PacingLayer`] spaces admissions of a rate-limit group at a
//! sustainable rate while its demand forecast is close to the quota.
//!
//! A token bucket admits a full minute of quota at once and then queues everything behind
//! it; with demand rising, the burst drains the upstream bucket, and whatever the local
//! estimate got wrong (another client on the same key, a different input-token count, output
//! longer than reserved) comes back as upstream 429s and a long queue. The pacing layer reads
//! the group's [`Forecaster`](super::forecast::Forecaster) (Holt's linear smoothing of demand,
//! fed by the [`MetricsLayer`](super::MetricsLayer)); when the forecast of any bucket reaches
//! `trigger` (80 % by default) of its limit, requests are released one by one, spaced by
//! `cost / (target * limit)` (target 95 % by default): a smooth flow just under the limit
//! instead of a burst and a wall. Pacing stops when the forecast falls below `release`
//! (`trigger - 0.1` by default).
//!
//! Upstreams with *acceleration limits* (the API may refuse a sharp rise in usage even below
//! the per-minute limits) call for [`PacingLayer::ramp`]: the released rate then rises by at
//! most a set number of requests per minute, every minute, and pacing also starts when the
//! forecast rises faster than that ramp can follow.
//!
//! Put it inside the metrics layer and outside the rate limiter:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::anthropic::RateLimitGroup;
//! use tower_claude::body::RequestBody;
//! use tower_claude::metrics::forecast::Forecaster;
//! use tower_claude::metrics::pacing::{PacingDelay, PacingLayer};
//! use tower_claude::metrics::MetricsLayer;
//! use tower_claude::quota::Limits;
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":5}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let forecaster = Forecaster::new();
//! let client = ServiceBuilder::new()
//!     .layer(MetricsLayer::new().forecaster(forecaster.clone()))
//!     .layer(
//!         PacingLayer::new(forecaster)
//!             .limits(RateLimitGroup::new("claude-haiku-4-5"), Limits::new(50, 50_000, 10_000))
//!             .trigger(0.8),
//!     )
//!     .service(upstream);
//! let request = http::Request::post("/v1/messages")
//!     .body(RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}"#))?;
//! let response = client.oneshot(request).await?;
//! // No forecast yet: not paced.
//! assert_eq!(response.extensions().get::<PacingDelay>(), Some(&PacingDelay(Duration::ZERO)));
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::PacingLayer;
pub use service::Pacing;

/// Response extension set by [`Pacing`] on every request it evaluated: the delay it added
/// (zero when the group was not paced).
///
/// ```
/// use std::time::Duration;
/// use tower_claude::metrics::pacing::PacingDelay;
///
/// let mut response = http::Response::new(());
/// response.extensions_mut().insert(PacingDelay(Duration::from_millis(40)));
/// assert_eq!(response.extensions().get::<PacingDelay>().unwrap().0.as_millis(), 40);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacingDelay(pub Duration);
