//! # tower-claude
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::{BoxError, body::RequestBody};
//! use tower_claude::{rate_limit::RateLimitLayer, retry::{RetryInfo, RetryLayer}};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // Any service that speaks the Messages API: `client::HttpClient::anthropic()` for the real
//! // one (feature `client`), `testing::MockClaude` (feature `testing`), or a stand-in.
//! let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
//!     let body = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":30}}"#;
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from(body))))
//! });
//! let claude = ServiceBuilder::new()
//!     .layer(RetryLayer::new().deadline(Duration::from_secs(300)))
//!     .layer(RateLimitLayer::new()) // limits learned from the response headers
//!     .service(upstream);
//!
//! let request = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .header("anthropic-version", "2023-06-01")
//!     .body(RequestBody::from(
//!         r#"{"model":"claude-sonnet-4-6","max_tokens":256,"messages":[{"role":"user","content":"Hi"}]}"#,
//!     ))?;
//! let response = claude.oneshot(request).await?;
//! assert_eq!(response.extensions().get::<RetryInfo>().unwrap().attempts(), 1);
//! let _json = response.into_body().collect().await?.to_bytes();
//! # Ok(())
//! # }
//! ```
//!
//! All the layers in the recommended order, sharing one quota board: [`stack::ClaudeStack`].
//!
//! Tower layers that keep programs calling the Claude API (Anthropic Messages API) working
//! through rate limits: token buckets for requests and input / output tokens per minute,
//! concurrency caps, 429-aware retries, model fallback, response caching, and `claude-proxy`,
//! a local proxy built from the same layers.
//!
//! Every layer works on `http::Request<`[`RequestBody`](body::RequestBody)`>`: a buffered,
//! cheaply cloneable body, so that retries and fallbacks can replay a request.
#![deny(unsafe_code, missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// A `tracing` event built out of line, for the events on every request's path: the level is
/// checked here as the event macros check it first (the compile-time and the current maximum
/// level), and only then is the event (its callsite, interest and fields) built, in a
/// `#[cold]` function of its own. In line, each event's construction sat between the hot
/// blocks of the function it was in, lines of the instruction cache that every request
/// fetched and did not run (issue 14). `event_out_of_line!(Level::DEBUG, fields.., "message")`
/// is `tracing::event!` with the same arguments.
macro_rules! event_out_of_line {
    ($level:expr, $($event:tt)+) => {
        if $level <= ::tracing::level_filters::STATIC_MAX_LEVEL
            && $level <= ::tracing::level_filters::LevelFilter::current()
        {
            $crate::out_of_line(|| ::tracing::event!($level, $($event)+));
        }
    };
}

/// Runs `f`, out of line and laid out as cold code (see `event_out_of_line!`).
#[cold]
#[inline(never)]
pub(crate) fn out_of_line<F: FnOnce()>(f: F) {
    f()
}

pub mod anthropic;
pub mod body;
pub mod quota;

/// The boxed error type of every service in this crate (as in `tower`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod cache;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
pub mod concurrency;
pub mod exchange;
pub mod fallback;
pub mod key_pool;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod proxy;
pub mod rate_limit;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
pub mod retry;
pub mod stack;
pub mod tenant;
#[cfg(test)]
mod test_upstream;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
