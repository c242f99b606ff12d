//! An in-process Anthropic Messages API simulator for tests: [`MockClaude`]; and a hostile
//! upstream for chaos tests: [`ChaosUpstream`] (never answers, trickles, resets, cuts
//! streams, pings forever, garbage, huge headers, absurd limits and usage, any status, 401 on
//! chosen paths; see [`Chaos`]).
//!
//! `MockClaude` is a [`tower::Service`](tower_service::Service) (and, with
//! [`MockClaude::serve`], a real HTTP/1.1 server on loopback) that answers like the real API
//! and is deterministic under tokio's paused time:
//!
//! - `POST /v1/messages`: a JSON message, or with `"stream": true` a `text/event-stream` of the
//!   real event sequence (`message_start`, `content_block_start`, `ping`, `content_block_delta`
//!   text deltas, `content_block_stop`, `message_delta` with the stop reason and cumulative
//!   usage, `message_stop`). `POST /v1/messages/count_tokens` answers `{"input_tokens": n}`.
//!   Other paths get 404 `not_found_error`, other methods on these paths a 405 with the same
//!   envelope.
//! - Validation like the real API, answered with the official error envelope: a request
//!   without a non-empty `x-api-key` (or `authorization: Bearer <key>`, which recent official
//!   SDKs send), or with a key not in [`MockClaudeBuilder::api_keys`], is 401
//!   `authentication_error`; a missing `anthropic-version`, malformed JSON, a missing or
//!   invalid `model`, `max_tokens` or `messages` is 400 `invalid_request_error`; a body over
//!   32 MB is 413 `request_too_large`.
//! - **Tokens charged.** Input tokens are the crate's own estimate,
//!   [`RequestMeta::input_tokens`](crate::anthropic::RequestMeta::input_tokens) (also reported
//!   by `count_tokens`), so tests can predict them exactly. Output tokens are
//!   `min(max_tokens, output_tokens)` (see [`MockClaudeBuilder::output_tokens`]).
//! - **Prompt caching.** Per (API key, model), the prefix up to each `cache_control`
//!   breakpoint ([`RequestMeta::cache_breakpoints`](crate::anthropic::RequestMeta::cache_breakpoints),
//!   1,024 estimated tokens at least) is cached for 5 minutes, or 1 hour with `"ttl":"1h"`,
//!   refreshed on every use. The longest cached prefix is reported as
//!   `cache_read_input_tokens`, the rest up to the last breakpoint as
//!   `cache_creation_input_tokens` (split by TTL in `cache_creation.ephemeral_5m_input_tokens` /
//!   `ephemeral_1h_input_tokens`, each part written with the TTL of the breakpoint that ends
//!   it), what follows as `input_tokens` (JSON and SSE usage). Like
//!   the API, only `input_tokens + cache_creation_input_tokens` count toward the input limit,
//!   plus the cache reads for the models whose reads count
//!   ([`ModelCatalog::cache_reads_count`](crate::anthropic::ModelCatalog::cache_reads_count)).
//! - **Rate limits.** Continuous token buckets per (API key, rate-limit group of the model in
//!   [`ModelCatalog`](crate::anthropic::ModelCatalog)) for requests, input and output tokens
//!   per minute ([`MockLimits`]). Output is reserved from `max_tokens` at admission (capped at
//!   the output limit) and the unused part is refunded when the answer ends. A request that
//!   does not fit gets 429 `rate_limit_error` with `retry-after` (whole seconds, rounded up:
//!   waiting that long is always enough) and takes nothing from any bucket. A request larger
//!   than a whole bucket (counted input above the input limit) can never be admitted: it
//!   gets 429 with `retry-after: 60`. Every Messages
//!   response that passed validation carries `anthropic-ratelimit-{requests,tokens,
//!   input-tokens,output-tokens}-{limit,remaining,reset}` (token counts rounded down to
//!   thousands, resets as RFC 3339 times rounded up to the second); every response carries a
//!   deterministic `request-id`.
//! - **Acceleration limits** (opt-in, [`MockClaudeBuilder::acceleration_limit`]): a sharp
//!   rise in the admitted request rate of a (key, group) gets 429 even below the per-minute
//!   limits, as the real API may do; a gradual ramp is accepted ([`AccelerationLimit`]).
//! - **Faults**, seeded and reproducible ([`MockClaudeBuilder::seed`]): 529 and 500 rates, a
//!   mid-stream `event: error` (`overloaded_error`) after the first text delta, spend-cap mode,
//!   an in-flight cap, and a queue of scripted outcomes ([`Fault`]). A faulted request
//!   (anything answered before admission) takes nothing from the buckets, not even the request
//!   bucket: the simulator models the rate limiter as the last gate before the model, so only
//!   admitted requests are counted. A stream that fails mid-way was admitted: it is charged its
//!   input and the output sent before the error.
//! - **Latency**: `base + per_output_token * output_tokens` with `tokio::time`.
//! - **Counters** for assertions: [`MockStats`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_claude::testing::{MockClaude, MockLimits};
//!
//! #[tokio::main(flavor = "current_thread", start_paused = true)]
//! async fn main() {
//!     let mock = MockClaude::builder()
//!         .limits("claude-sonnet-4-6", MockLimits { rpm: 1, itpm: 10_000, otpm: 1_000 })
//!         .latency(Duration::from_millis(300), Duration::from_millis(10))
//!         .output_tokens(20)
//!         .build();
//!     let request = || {
//!         http::Request::post("/v1/messages")
//!             .header("x-api-key", "sk-test")
//!             .header("anthropic-version", "2023-06-01")
//!             .body(r#"{"model":"claude-sonnet-4-6","max_tokens":64,
//!                       "messages":[{"role":"user","content":"Hi"}]}"#.to_string())
//!             .unwrap()
//!     };
//!
//!     let start = tokio::time::Instant::now();
//!     let res = mock.clone().oneshot(request()).await.unwrap();
//!     assert_eq!(res.status(), 200);
//!     // 300 ms + 20 tokens * 10 ms, in virtual time.
//!     assert_eq!(start.elapsed(), Duration::from_millis(500));
//!     let body = res.into_body().collect().await.unwrap().to_bytes();
//!     let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
//!     assert_eq!(json["usage"]["output_tokens"], 20);
//!
//!     // One request per minute: the second one is rate limited.
//!     let res = mock.clone().oneshot(request()).await.unwrap();
//!     assert_eq!(res.status(), 429);
//!     assert_eq!(res.headers()["retry-after"], "60");
//!     assert_eq!(mock.stats().rate_limited, 1);
//! }
//! ```

mod body;
mod builder;
mod chaos;
mod fault;
mod render;
pub mod scale;
mod server;
mod service;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod simulation;
mod state;
mod stats;

pub use body::MockBody;
pub use builder::{AccelerationLimit, MAX_BODY_BYTES, MockClaudeBuilder, MockLimits};
pub use chaos::{Chaos, ChaosBody, ChaosUpstream};
pub use fault::Fault;
pub use service::{MockClaude, ResponseFuture};
pub use stats::MockStats;
