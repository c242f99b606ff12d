//! Model fallback by remaining quota: [`FallbackLayer`] sends each Messages API request to the
//! best model of its chain (Opus -> Sonnet -> Haiku by default) that still has quota, and moves
//! down the chain at once when a model turns out to be exhausted.
//!
//! Other gateways wait for a 429 before they fall back. This layer chooses **before sending**,
//! from what the [`QuotaBoard`](crate::quota::QuotaBoard) knows about each model's rate-limit
//! group, and fails over **after** an answer only when waiting would not help.
//!
//! # Choosing the model
//!
//! Only `POST /v1/messages` requests with a readable body and a `model` are handled; anything
//! else passes through untouched. For the others:
//!
//! 1. **Candidates**: [`ModelCatalog::chain_from`](crate::anthropic::ModelCatalog::chain_from)
//!    of the requested model (that model first, then the lower models of the chain: never an
//!    upgrade, never a model outside the chain), cut at the [floor](FallbackLayer::floor).
//! 2. **Quota view** of each candidate for this request's key
//!    ([`KeyId::from_headers`](crate::anthropic::KeyId::from_headers), else anonymous) — or,
//!    with a [key pool](FallbackLayer::key_pool) below, for its best key in rotation — and the
//!    candidate's rate-limit group: the binding remaining fraction
//!    ([`Headroom::fraction`](crate::quota::Headroom::fraction), the lowest of the requests,
//!    input-token and output-token buckets) and whether this request's cost (1 request, the
//!    estimated input tokens of [`RequestMeta`](crate::anthropic::RequestMeta), `max_tokens`
//!    of output) fits the buckets now. A group the board knows nothing about yet counts as
//!    full.
//! 3. **Pick** the first candidate the layer's [`Policy`] uses. The default policy,
//!    [`Thresholds`], uses a candidate whose cost fits now and whose fraction is at least the
//!    threshold of its position in the chain: by default 0.70 for the requested model, 0.30
//!    for the next, 0 for any later one ([`FallbackLayer::thresholds`],
//!    [`FallbackLayer::position_thresholds`]). So an Opus request stays on Opus above 70 %,
//!    goes to Sonnet when Opus is lower and Sonnet has 30 % or more, else to Haiku. Your own
//!    rules: [`FallbackLayer::policy`], composed with [`PolicyExt`] (see [`policy`]).
//! 4. If **the policy uses no candidate**, the one with the most headroom among those it
//!    did not [exclude](Action::Exclude) is used: one whose cost fits now, then the shortest
//!    wait until it fits, then the highest fraction, then the earliest in the chain. A
//!    request is never refused because of a policy (before the first send, the requested
//!    model is used when every candidate is excluded).
//!
//! The `model` of the buffered body is rewritten with
//! [`rewrite_model`](crate::anthropic::rewrite_model) (every other byte unchanged) and the
//! [`RequestMeta`](crate::anthropic::RequestMeta) extension is updated, so layers below see
//! the served model.
//!
//! # Failing over
//!
//! An answer can move the request on to the next model (chosen again by the rules above among
//! the models below the one that failed):
//!
//! * a **429 spend cap** (`enforced_spend_limit_reached`) at once;
//! * a **429** whose server wait (`retry-after-ms`, `retry-after`) is longer than
//!   [`max_wait_before_failover`](FallbackLayer::max_wait_before_failover) (10 s by default),
//!   or that gives no wait, at once. A shorter 429 is returned to the caller (a retry layer
//!   below has already waited it out);
//! * an **inner service error** that is a spend cap: the retry layer's
//!   [`RetryErrorKind::SpendLimit`](crate::retry::RetryErrorKind::SpendLimit), or a spend-cap
//!   [`ApiError`](crate::anthropic::ApiError) anywhere in the error's source chain, at once. Other inner errors (connection errors, timeouts) are not about the
//!   model: they end the walk;
//! * a **529** (`overloaded_error`): after [`max_overloaded`](FallbackLayer::max_overloaded)
//!   529s from that model (2 by default); below that count the same model is sent again after
//!   [`overloaded_pause`](FallbackLayer::overloaded_pause);
//! * a **429 or 529 that a [`RetryLayer`](crate::retry::RetryLayer) below gave up on** (its
//!   [`RetryInfo`](crate::retry::RetryInfo) outcome is `Exhausted`, `DeadlineExceeded` or
//!   `BudgetExhausted`), at once: the retry layer has already waited on that model.
//!
//! While a lower model is left in the chain, each attempt carries a
//! [`MaxServerWait`](crate::retry::MaxServerWait) request extension set to
//! [`max_wait_before_failover`](FallbackLayer::max_wait_before_failover): a retry layer below
//! returns a 429 that asks for a longer wait at once (outcome `WaitTooLong`) instead of sleeping
//! through it, and the request moves down the chain. On the last model no limit is set, so a
//! patient retry layer waits for the quota as usual. In [`ClaudeStack`](crate::stack::ClaudeStack),
//! where the retry layer sits directly below, it asks the fallback layer instead, when an
//! attempt is rate limited (whether a lower model is left is then decided by the board as it
//! is at that 429, and the lower models' quota is not looked at for every request).
//!
//! Every other answer (success, 400, 401, 500, ...) is returned as it is. To classify a 429 or
//! 529 the layer reads its body (at most 64 KiB) and replays it unchanged if it returns it.
//! Streaming requests fail over only on such an error *status*: once a 200 stream has started
//! the layer never reads or holds it, so nothing already forwarded is ever replayed.
//!
//! **Bounds.** Each model is visited at most once per request (the walk only moves down), at
//! most [`max_depth`](FallbackLayer::max_depth) models are sent to (3 by default), and a model
//! gets at most `max_overloaded` sends. A model with nothing allowed below it is never sent
//! again: its answer is returned.
//!
//! **When everything is exhausted** the last upstream answer is returned **unchanged** (status,
//! headers such as `retry-after` and `anthropic-ratelimit-*`, body), so an SDK behind a proxy
//! sees the real status and can wait. When the last thing that happened is an inner service
//! error (no HTTP answer), the layer fails with a [`FallbackError`] whose source is that error.
//!
//! # What the caller learns
//!
//! Every handled response carries the header `x-tower-claude-model: <served model>` and a
//! [`ServedModel`] extension (requested model, served model, upstream attempts, failovers);
//! the `model` of the JSON answer says it as well.
//!
//! # Opting out
//!
//! A request with the header `x-tower-claude-fallback: off` (or `false`), or with a
//! [`NoFallback`] extension, is sent to the requested model only and its answer returned as
//! it is. The header is removed before the request is forwarded, whatever its value.
//!
//! # Quota state
//!
//! Alone, the layer keeps its own board, fed by the `anthropic-ratelimit-*` headers of every
//! answer it sees: it then knows each model's remaining quota as of its last answer, plus the
//! continuous refill since. Stacked above a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)
//! (and a retry layer, see `DESIGN.md`), give both the same board: the choice then also counts
//! the requests in flight and waiting.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_claude::anthropic::{KeyId, RateLimitGroup};
//! use tower_claude::body::RequestBody;
//! use tower_claude::fallback::{FallbackLayer, ServedModel};
//! use tower_claude::quota::{Cost, Limits, QuotaBoard};
//! use tower_claude::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // An upstream that echoes the model it was asked for.
//! let upstream = tower::service_fn(|req: http::Request<RequestBody>| async move {
//!     let meta = tower_claude::anthropic::RequestMeta::scan(req.body().as_ref())?;
//!     let body = format!(r#"{{"type":"message","model":"{}"}}"#, meta.model.unwrap_or_default());
//!     Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))))
//! });
//!
//! // The board knows Opus is down to 20 % for this key.
//! let opus = RateLimitGroup::new("claude-opus-4");
//! let board = QuotaBoard::builder().limits(opus.clone(), Limits::new(50, 30_000, 8_000)).build();
//! let key = KeyId::from_api_key("sk-ant-example");
//! board.try_acquire(&key, &opus, Cost::new(40, 0, 0))?.settle(Cost::new(40, 0, 0));
//!
//! let client = ServiceBuilder::new()
//!     .layer(FallbackLayer::new().board(board))
//!     .service(upstream);
//! let request = http::Request::post("https://api.anthropic.com/v1/messages")
//!     .header("x-api-key", "sk-ant-example")
//!     .body(RequestBody::from(r#"{"model":"claude-opus-4-7","max_tokens":256,"messages":[]}"#))?;
//! let response = client.oneshot(request).await?;
//!
//! assert_eq!(response.headers()["x-tower-claude-model"], "claude-sonnet-4-6");
//! let served = response.extensions().get::<ServedModel>().unwrap();
//! assert_eq!(&*served.requested, "claude-opus-4-7");
//! assert!(served.fell_back());
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], br#"{"type":"message","model":"claude-sonnet-4-6"}"#);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

mod body;
mod config;
mod error;
mod future;
mod layer;
pub mod policy;
mod service;

pub use body::FallbackBody;
pub use error::{FallbackError, FallbackErrorKind};
pub use future::ResponseFuture;
pub use layer::{
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_OVERLOADED, DEFAULT_MAX_WAIT_BEFORE_FAILOVER,
    DEFAULT_OVERLOADED_PAUSE, FallbackLayer,
};
pub use policy::{Action, Candidate, Policy, PolicyExt, QuotaView, Thresholds, policy_fn};
pub(crate) use service::opted_out_of;
pub use service::{Fallback, FallbackHandle};

/// A request extension that turns model fallback off for one request (like the header
/// `x-tower-claude-fallback: off`): it is sent to the requested model only.
///
/// ```
/// use tower_claude::body::RequestBody;
/// use tower_claude::fallback::NoFallback;
///
/// let mut request = http::Request::new(RequestBody::empty());
/// request.extensions_mut().insert(NoFallback);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NoFallback;

/// A response extension set by [`Fallback`] on every Messages API response it handles: which
/// model produced it.
///
/// * `requested`: the `model` of the caller's request;
/// * `served`: the model of the attempt whose answer this is (also in the
///   `x-tower-claude-model` header). When every model was exhausted, the model whose error
///   answer is returned;
/// * `attempts`: upstream requests the layer sent for this request (re-sends after a 529
///   included);
///
/// The two names are shared strings (`Arc<str>`): fallback's come from its model catalogue's
/// entries (a reference count per answer, no copy).
/// * `failovers`: how many times it moved down the chain after an answer. A model chosen
///   before sending (by quota) is not a failover: `served != requested` with `failovers == 0`.
///
/// ```
/// use tower_claude::fallback::ServedModel;
///
/// fn log(response: &http::Response<()>) {
///     if let Some(s) = response.extensions().get::<ServedModel>() {
///         if s.fell_back() {
///             println!("{} served by {} ({} failovers)", s.requested, s.served, s.failovers);
///         }
///     }
/// }
/// # log(&http::Response::new(()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServedModel {
    /// The model the caller asked for.
    pub requested: Arc<str>,
    /// The model whose answer this is.
    pub served: Arc<str>,
    /// Upstream requests sent for this request.
    pub attempts: u32,
    /// Moves down the chain after an answer.
    pub failovers: u32,
}

impl ServedModel {
    /// Whether another model than the requested one produced the answer.
    pub fn fell_back(&self) -> bool {
        self.served != self.requested
    }
}
