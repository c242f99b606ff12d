//! A pool of upstream API keys: each request goes out with the key that can admit it
//! soonest in its rate-limit group; keys that got a 429 cool down, keys refused with a 403
//! in a group go last there, keys that hit their spend cap, were rejected (401) or have a
//! billing problem (402) leave the rotation.
//!
//! [`KeyPoolLayer`] sits outside the [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)
//! (buckets are per key, so the key must be chosen first) and inside the
//! [`RetryLayer`](crate::retry::RetryLayer): when a key fails a request (429, spend cap, 401,
//! 402, 403) and another key can take it, the response tells the retry layer so
//! ([`RetrySooner`](crate::retry::RetrySooner)), and the request is sent again with that key
//! at once instead of waiting out the first key's `retry-after`.
//! Give it the rate limiter's [`QuotaBoard`](crate::quota::QuotaBoard) so that it sees every
//! reservation:
//!
//! ```
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_claude::anthropic::{KeyId, RateLimitGroup};
//! use tower_claude::body::RequestBody;
//! use tower_claude::key_pool::{ChosenKey, KeyPoolLayer};
//! use tower_claude::quota::{Limits, QuotaBoard};
//! use tower_claude::rate_limit::RateLimitLayer;
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let board = QuotaBoard::builder()
//!     .default_limits(Limits { rpm: 50, itpm: 30_000, otpm: 8_000 })
//!     .build();
//! let pool = KeyPoolLayer::new(["sk-ant-api03-one", "sk-ant-api03-two"])?.board(board.clone());
//! let handle = pool.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(pool)
//!     .layer(RateLimitLayer::new().board(board.clone()))
//!     .service(tower::service_fn(|req: http::Request<RequestBody>| async move {
//!         // Upstream sees one of the pool's keys.
//!         assert!(KeyId::from_headers(req.headers()).is_some());
//!         Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
//!     }));
//!
//! let mut used = Vec::new();
//! for _ in 0..4 {
//!     let req = http::Request::post("/v1/messages")
//!         .body(RequestBody::from(r#"{"model":"claude-sonnet-4-5","max_tokens":1000,"messages":[]}"#))?;
//!     let res = svc.ready().await?.call(req).await?;
//!     used.push(res.extensions().get::<ChosenKey>().unwrap().key().clone());
//! }
//! // The load is spread: each key served two of the four requests.
//! for key in handle.keys() {
//!     assert_eq!(used.iter().filter(|k| **k == key).count(), 2);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Keys appear only as [`KeyId`](crate::anthropic::KeyId)s — in logs, in
//! [`KeyPoolHandle::statuses`], in [`ChosenKey`] and in every `Debug` output. The header
//! value is marked sensitive.
//!
//! # Admission across keys
//!
//! With a board shared with the rate limiter below ([`KeyPoolLayer::board`]), the pool
//! *admits* Messages requests itself: the requests of one rate-limit group wait in one line
//! across every key, weighted-fair across their [`Tenant`](crate::tenant::Tenant)s
//! (`interactive` before `batch`) and first come first served within a tenant (see
//! [`tenant::fair`](crate::tenant::fair)). The request at the head takes the first key
//! (cooldowns, 403s and first requests of new keys respected as below) whose three buckets
//! hold its cost now; if none does, it waits for whichever key frees up first (a refund or
//! settle on any key, new response headers, the refill of the soonest key, a cooldown that
//! ends) — a waiting request is never stuck on one key while another could take it. A waiter
//! that goes away takes nothing. The reservation travels down as a
//! [`quota::Admission`](crate::quota::Admission) request extension, which the rate limiter
//! uses instead of acquiring again. With a Redis board, the head tries every key in Redis
//! (one round trip each) and holds a ticket in each key's line there, so that nodes are
//! served in arrival order too. The wait ends at the request's
//! [`Deadline`](crate::retry::Deadline) with an
//! [`AcquireError`](crate::quota::AcquireError) of kind `QueueTimeout`. Without a board
//! (the pool's own), keys are picked at once by the same ranking and nothing waits here.
//!
//! # When keys run out
//!
//! * Every key cooling down or short of quota: the request waits in the line until a key
//!   can take it (or, without a shared board, the key available soonest is used and the rate
//!   limiter below holds the request until it fits).
//! * Every key out of rotation: the request that removed the last key gets its upstream
//!   response unchanged (the spend-cap 429, the 401 or the 402); later requests fail at once, without
//!   being sent, with a [`KeyPoolError`] of kind [`AllKeysRemoved`](KeyPoolErrorKind::AllKeysRemoved)
//!   (a [`RetryLayer`](crate::retry::RetryLayer) above does not retry it).
//!   [`KeyPoolHandle::restore`] puts a key back.
//!
//! # What removes a key
//!
//! A 401 or 402 removes a key only when it answers a request on a Messages API endpoint
//! (`/v1/messages`, `/v1/messages/count_tokens`, `/v1/messages/batches...`, spelled plainly:
//! no `.`/`..` segment, no percent-encoding). Callers choose the path, and ordinary keys are
//! refused (401) on the organisation and admin endpoints: a 401 on such a path is returned to
//! that caller and the key stays in rotation, so that one client cannot take the pool's keys
//! out (issue 18). A 429 spend cap removes a key on any path.

mod body;
mod config;
mod error;
mod future;
mod layer;
mod pool;
mod service;

pub use body::KeyPoolBody;
pub use error::{KeyPoolError, KeyPoolErrorKind};
pub use future::ResponseFuture;
pub use layer::KeyPoolLayer;
pub use pool::{ChosenKey, KeyPoolHandle, KeyState, KeyStatus, RemovalReason};
pub use service::KeyPool;
