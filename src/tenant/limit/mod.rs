//! Per-tenant limits: [`TenantLimitLayer`] holds a tenant's Messages requests to the limits of
//! its own ([`Tenant::limit`](crate::tenant::Tenant::limit): RPM, ITPM, OTPM per model group),
//! on top of the upstream's.
//!
//! It is the [`RateLimit`](crate::rate_limit::RateLimit) machinery with the tenant as the key:
//! a [`QuotaBoard`](crate::quota::QuotaBoard) of its own holds one set of continuous buckets
//! per `(tenant, group)` (key `tenant:{name}`) with the tenant's configured limits; a request
//! that does not fit waits in that board's fair queue (bounded by
//! [`max_wait`](TenantLimitLayer::max_wait) and the request's
//! [`Deadline`](crate::retry::Deadline)), and is settled from its real usage (JSON or SSE)
//! when its body ends. The upstream's `anthropic-ratelimit-*` headers are not the tenant's
//! view and are ignored here.
//!
//! * A request without a [`Tenant`](crate::tenant::Tenant), or whose tenant has no limits for
//!   the request's group, passes through untouched.
//! * A request that would wait past its max wait fails with the rate limiter's error: an
//!   [`AcquireError`](crate::quota::AcquireError) of kind
//!   [`QueueTimeout`](crate::quota::AcquireErrorKind::QueueTimeout) (or
//!   [`RequestTooLarge`](crate::quota::AcquireErrorKind::RequestTooLarge)) whose
//!   [`key`](crate::quota::AcquireError::key) is `tenant:{name}`; it is counted in the
//!   tenant's [`TenantStats::refusals`](crate::tenant::TenantStats::refusals). The time waited
//!   is added to its [`TenantStats::queue_wait`](crate::tenant::TenantStats::queue_wait) and
//!   to the response's [`QueueWait`](crate::rate_limit::QueueWait).
//!
//! Place it outside the quota that it protects others from: above the
//! [`KeyPoolLayer`](crate::key_pool::KeyPoolLayer) (which takes upstream quota when it admits
//! a request) and the [`RateLimitLayer`](crate::rate_limit::RateLimitLayer), below retry (every
//! attempt pays again), as [`ClaudeStack`](crate::stack::ClaudeStack) does.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_claude::body::RequestBody;
//! use tower_claude::quota::{AcquireError, AcquireErrorKind, Limits};
//! use tower_claude::tenant::Tenant;
//! use tower_claude::tenant::limit::TenantLimitLayer;
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":20,"output_tokens":5}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let mut client = ServiceBuilder::new()
//!     .layer(TenantLimitLayer::new().max_wait(Duration::from_secs(5)))
//!     .service(upstream);
//! // Two requests a minute on Haiku for this tenant.
//! let intern = Tenant::new("intern").limit("claude-haiku-4-5", Limits::new(2, 100_000, 10_000));
//! let request = || {
//!     let mut req = http::Request::post("/v1/messages")
//!         .body(RequestBody::from(r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[]}"#))
//!         .unwrap();
//!     req.extensions_mut().insert(intern.clone());
//!     req
//! };
//! for _ in 0..2 {
//!     let resp = client.ready().await?.call(request()).await?;
//!     resp.into_body().collect().await?; // settles from the real usage
//! }
//! // The third would wait about 30 s, more than its 5 s: refused.
//! let err = client.ready().await?.call(request()).await.unwrap_err();
//! let err = err.downcast_ref::<AcquireError>().unwrap();
//! assert_eq!(err.kind(), AcquireErrorKind::QueueTimeout);
//! assert_eq!(err.key().as_str(), "tenant:intern");
//! assert_eq!(intern.stats().refusals(), 1);
//! # Ok(())
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::TenantLimitLayer;
pub use service::TenantLimit;
