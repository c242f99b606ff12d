//! [`Fallback`]: the service built by [`FallbackLayer`](super::FallbackLayer).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tower_service::Service;

use super::NoFallback;
use super::body::FallbackBody;
use super::future::{ResponseFuture, Walk};
use super::policy::{self, Rules, SharedPolicy};
use crate::BoxError;
use crate::anthropic::{KeyId, ModelCatalog, RequestMeta, header_names, is_messages_call};
use crate::body::RequestBody;
use crate::quota::{Cost, OutputReservation, QuotaBoard};

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) board: QuotaBoard,
    /// A key pool below: the quota view of a model is the best of its keys.
    pub(crate) keys: Option<crate::key_pool::KeyPoolHandle>,
    pub(crate) catalog: ModelCatalog,
    pub(crate) floor: Option<String>,
    pub(crate) policy: SharedPolicy,
    pub(crate) rules: Rules,
    pub(crate) overloaded_pause: Duration,
    pub(crate) max_depth: usize,
    pub(crate) output: OutputReservation,
}

/// Chooses the model of each Messages API request by remaining quota and fails over down the
/// chain; see [`FallbackLayer`](super::FallbackLayer) and the [module docs](super).
///
/// The inner service must be `Clone`: the first attempt uses the service that `poll_ready`
/// prepared, later attempts a clone made ready in the response future.
#[derive(Debug, Clone)]
pub struct Fallback<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Fallback<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The board this service reads.
    pub fn board(&self) -> &QuotaBoard {
        &self.config.board
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Removes every `x-tower-claude-fallback` header; `true` when one of them turns fallback off
/// (`off` or `false`, case-insensitive, surrounding whitespace ignored).
fn take_opt_out(headers: &mut HeaderMap) -> bool {
    let mut off = false;
    if let http::header::Entry::Occupied(entry) =
        headers.entry(header_names::X_TOWER_CLAUDE_FALLBACK)
    {
        for value in entry.remove_entry_mult().1 {
            if let Ok(v) = value.to_str() {
                let v = v.trim();
                off |= v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("false");
            }
        }
    }
    off
}

impl<S, ResBody> Service<Request<RequestBody>> for Fallback<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<FallbackBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let opted_out = take_opt_out(req.headers_mut());
        if !is_messages_call(req.method(), req.uri().path()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let meta = match RequestMeta::get_or_scan(&mut req) {
            Ok(meta) if meta.model.is_some() => meta.clone(),
            // Unreadable body or no model: upstream answers 400, untouched.
            _ => return ResponseFuture::passthrough(self.inner.call(req)),
        };
        let requested = meta.model.clone().unwrap_or_default();
        let config = self.config.clone();
        let disabled = opted_out || req.extensions().get::<NoFallback>().is_some();
        let candidates = if disabled {
            vec![requested.clone()]
        } else {
            policy::candidates(&config.catalog, &requested, config.floor.as_deref())
        };
        let key = KeyId::of_request(&mut req).unwrap_or_else(KeyId::anonymous);
        // The cache-aware input estimate, as the rate limiter reserves it: a prompt-cache
        // prefix this key sent to the requested model within its TTL does not count.
        let input = config
            .board
            .prompt_cache()
            .estimate(&key, &meta, config.catalog.cache_reads_count(&requested))
            .counted_input_tokens();
        let cost = Cost::new(1, input, config.output.reserve(meta.max_tokens));

        let mut walk = Walk::new(config, req, meta, requested, candidates, key, cost);
        let request = walk.first_request();
        // The ready service sends the first attempt; `self` keeps a fresh clone.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let fut = service.call(request);
        ResponseFuture::walking(fut, walk, service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_out_header_is_removed_and_read() {
        let mut h = HeaderMap::new();
        assert!(!take_opt_out(&mut h));
        h.insert("x-tower-claude-fallback", " OFF ".parse().unwrap());
        assert!(take_opt_out(&mut h));
        assert!(h.is_empty());
        h.append("x-tower-claude-fallback", "on".parse().unwrap());
        h.append("x-tower-claude-fallback", "false".parse().unwrap());
        assert!(take_opt_out(&mut h));
        assert!(h.is_empty());
        h.insert("x-tower-claude-fallback", "on".parse().unwrap());
        assert!(!take_opt_out(&mut h));
        assert!(h.is_empty());
    }
}
