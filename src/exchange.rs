//! The extension contract: every value one layer learns and another reads travels as an
//! `http::Extensions` entry, and this page lists them all — who writes each, who reads it.
//! The links are intra-doc links: moving or renaming a type breaks `cargo doc`, so this table
//! cannot drift from the code.
//!
//! A request is scanned once ([`RequestMeta`]); a layer that learns something about the
//! exchange publishes it here instead of re-reading the body or the headers.
//!
//! # Request extensions (travel down, towards the upstream)
//!
//! | extension | written by | read by |
//! |---|---|---|
//! | [`RequestMeta`] — model, `max_tokens`, token estimate, `stream`, cache directives: the one scan of the body; with it the model's catalogue entry ([`ModelEntry`]: group, family, whether cache reads count), looked up once per request ([`RequestMeta::model_entry`]) | the first layer that needs it ([`RequestMeta::get_or_scan`]; in the stack, metrics, which also resolves the entry in the stack's catalogue); rewritten by fallback with the model it tries (and that model's entry) | rate limit, key pool, pacing, retry (policy and backoff), fallback, cache, metrics, testing; the entry: rate limit, pacing, retry, fallback (cost, the requested model's candidates), metrics (labels) |
//! | [`Deadline`] — when the caller stops waiting | the application or `claude-proxy`; [`RetryLayer`](crate::retry::RetryLayer) with a configured deadline, unless one is set | retry, rate limit and key pool (bound their queue waits), fallback, the proxy's error answers |
//! | [`MaxServerWait`] — the longest server-asked wait worth honouring | fallback (so that a long 429 comes back at once and the walk moves down), or the application | retry |
//! | [`NoFallback`] — this request must be answered by the model it names | the application, `x-tower-claude-fallback: off` (the proxy) | fallback, cache (serves only the requested model) |
//! | [`Admission`] — quota already taken for this request | key pool (it admits by earliest key) | rate limit (takes it when key and group match instead of acquiring again) |
//! | [`ChosenKey`] — the key the pool chose | key pool | (also set on the response) |
//! | [`CacheTenant`] — the cache partition | the application, `claude-proxy` (per client token or tenant) | cache (its key) |
//! | [`Tenant`] — who the request is for: weight, priority class, own limits, budget, counters | the application, `claude-proxy` (its tenants file) | the proxy's tenant accounting (and the fair queues, tenant limits and budgets built on it) |
//!
//! # Response extensions (travel up, towards the caller)
//!
//! | extension | written by | read by |
//! |---|---|---|
//! | [`ServedModel`] — the model that wrote the answer, and whether it is a fallback (the names shared with the catalogue's entries, `Arc<str>`) | fallback; cache (on a hit, the model that wrote the entry) | metrics, `claude-proxy` (`x-tower-claude-model`), the reqwest bridge, the application |
//! | [`CacheStatus`] — hit, miss, bypass, … | cache | `claude-proxy` (`x-tower-claude-cache`), the application |
//! | [`RetryInfo`] — attempts made and why retrying stopped | retry | fallback (moves down when retrying gave up), metrics, the application |
//! | [`RetrySooner`] — another key could serve this request sooner than the server's wait | key pool | retry (does not wait out a 429 that another key avoids) |
//! | [`ChosenKey`] — the key that served the answer | key pool | metrics, fallback (reads the served key's headroom), the application |
//! | [`QueueWait`] — how long the request waited for quota | rate limit | metrics, the application |
#![cfg_attr(
    feature = "metrics",
    doc = "| [`PacingDelay`] — how long pacing held the request | pacing (feature `metrics`) | metrics |"
)]
#![cfg_attr(
    not(feature = "metrics"),
    doc = "| `PacingDelay` — how long pacing held the request | pacing (feature `metrics`) | metrics |"
)]
//! | [`UsageTracker`] — the answer's one usage tracker: final usage, how far the body got ([`BodyState`]: complete / truncated / failed), the model that wrote it | the innermost layer that reads usage (an adaptive concurrency cap for a stream, else rate limit in the stack; else the budget, retry for a stream, the cache for a stream it records, metrics), wrapping the body once; retry drops it when it replaces the body. A JSON body is copied up to the largest limit any reader asks for (metrics' `json_limit`, 8 MiB for the rate limiter and the budget) | concurrency (an adaptive cap shrinks on a mid-stream `event: error`), rate limit (settles the reservation), budget (settles the tenant's cost), retry (holds a stream back, closes a cut one), cache (stores a stream only once `message_stop` is recorded), metrics (tokens, stream errors), the application |
//! | [`ErrorAnswer`] — the parsed envelope of an error answer (429, 529, any 4xx / 5xx), read once | the innermost layer that reads the body: key pool (429, 400), retry (any error status; it replaces it with the envelope it writes), fallback (429, 529) | key pool, retry, fallback (instead of reading the body again), the application |
//!
//! A crate-private memo of the request's key id (derived once from its `x-api-key` or
//! `Authorization` header, never the key itself) also rides with the request: inside its
//! [`RequestMeta`] once the request is scanned (no extension of its own), else in the
//! request's extensions (the proxy's front writes it before any layer scans the body). In
//! [`ClaudeStack`](crate::stack::ClaudeStack) the metrics layer checks it against the headers
//! and the fallback and rate limit layers below take it as it is; the key pool, which puts
//! another key on, writes that key's memo.
//!
//! A crate-private mark rides on a response whose rate-limit headers a rate limiter or a key
//! pool fed into its board: fallback, reading the same board, does not feed them again (one
//! observation per upstream answer; with Redis each is a script call).
//! In [`ClaudeStack`](crate::stack::ClaudeStack), where retry sits directly below fallback, a
//! crate-private description of how fallback built each request from its copy (the copy, the
//! body, the rewritten `RequestMeta`, the key id, and how to decide the `MaxServerWait`) rides
//! down to retry, which removes it, asks it for the `MaxServerWait` only when an attempt is
//! rate limited (retry is that extension's one reader: it is put on neither the request nor
//! the attempts rebuilt from the description, and fallback looks at the lower models' quota
//! only then, not for every request), takes the request's `RequestMeta` and key id from it
//! (not read from the request again) and sends again from it instead of keeping a copy of its
//! own.
//!
//! ```
//! use tower_claude::exchange::{Deadline, NoFallback};
//! use tower_claude::body::RequestBody;
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut req = http::Request::new(RequestBody::empty());
//! req.extensions_mut().insert(Deadline::after(Duration::from_secs(30)));
//! req.extensions_mut().insert(NoFallback);
//! assert!(req.extensions().get::<NoFallback>().is_some());
//! # }
//! ```

pub use crate::anthropic::{BodyState, ModelEntry, RequestMeta, UsageTracker};
pub use crate::body::ErrorAnswer;
pub use crate::cache::{CacheStatus, Tenant as CacheTenant};
pub use crate::fallback::{NoFallback, ServedModel};
pub use crate::key_pool::ChosenKey;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub use crate::metrics::pacing::PacingDelay;
pub use crate::quota::Admission;
pub use crate::rate_limit::QueueWait;
pub use crate::retry::{Deadline, MaxServerWait, RetryInfo, RetrySooner};
pub use crate::tenant::Tenant;

/// Gives `extensions` room for the extensions a stack writes, before the first of them is
/// inserted (crate-private: the rate limiter does it for the response, metrics for the
/// request).
///
/// `http::Extensions` allocates its map at the first insert with room for three entries and
/// grows it (a new table, every entry moved, the old one freed) at the fourth; an answer in
/// [`ClaudeStack`](crate::stack::ClaudeStack) gets at least four ([`QueueWait`], the
/// [`UsageTracker`], [`RetryInfo`], [`ServedModel`]), and with rate-limit headers, a cache or
/// a key pool up to seven; a request two ([`RequestMeta`], which carries the key memo, and
/// fallback's description for retry) beside what the caller set ([`Deadline`], [`Tenant`], …). `Extensions` has no `with_capacity`, but a clone keeps its
/// table's size: the map starts as a clone of an empty one that has room for seven, and what
/// `extensions` already held is moved into it. Only the map's size changes, never what it
/// holds.
pub(crate) fn make_room(extensions: &mut http::Extensions) {
    /// Placeholders inserted (then removed) to size the template's table.
    #[derive(Clone, Copy)]
    struct Room<const N: u8>;
    thread_local! {
        static ROOMY: http::Extensions = {
            let mut roomy = http::Extensions::new();
            roomy.insert(Room::<0>);
            roomy.insert(Room::<1>);
            roomy.insert(Room::<2>);
            roomy.insert(Room::<3>);
            roomy.clear();
            roomy
        };
    }
    let held = std::mem::replace(extensions, ROOMY.with(http::Extensions::clone));
    extensions.extend(held);
}

#[cfg(test)]
mod tests {
    /// Making room keeps what the map held and takes what is inserted after.
    #[test]
    fn make_room_keeps_every_entry() {
        let mut ext = http::Extensions::new();
        super::make_room(&mut ext);
        assert!(ext.is_empty());
        ext.insert(1u8);
        super::make_room(&mut ext);
        for i in 0..8u32 {
            ext.insert(u64::from(i));
            ext.insert(i);
        }
        assert_eq!(ext.get::<u8>(), Some(&1));
        assert_eq!(ext.get::<u32>(), Some(&7));
        assert_eq!(ext.get::<u64>(), Some(&7));
        assert_eq!(ext.len(), 3);
    }
}
