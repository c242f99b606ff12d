//! # tower-claude
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
pub mod fallback;
pub mod key_pool;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(feature = "proxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "proxy")))]
pub mod proxy;
pub mod rate_limit;
pub mod retry;
pub mod stack;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
