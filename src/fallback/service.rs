//! [`Fallback`]: the service built by [`FallbackLayer`](super::FallbackLayer).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use tower_service::Service;

use super::NoFallback;
use super::body::FallbackBody;
use super::config::Config;
use super::future::{ResponseFuture, Walk};
use super::policy;
use crate::BoxError;
use crate::anthropic::{KeyId, ModelEntry, RequestMeta, is_messages_request, parsed_names};
use crate::body::RequestBody;
use crate::quota::QuotaBoard;
use crate::retry::Spare;

/// A read-only handle on a fallback layer's choice, from
/// [`FallbackLayer::handle`](super::FallbackLayer::handle): which model the layer would send
/// a request to **now**, without sending it.
///
/// The [`CacheLayer`](crate::cache::CacheLayer) above a fallback layer asks it before serving
/// an answer that another model produced: an Opus request gets a cached Sonnet answer only
/// while fallback would send that request to Sonnet now.
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
/// use tower_claude::fallback::FallbackLayer;
///
/// use tower_claude::anthropic::KeyId;
///
/// let handle = FallbackLayer::new().handle();
/// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":64,"messages":[]}"#).unwrap();
/// // A board that knows nothing counts every group as full: Opus it is.
/// let key = KeyId::from_api_key("sk-ant-example");
/// assert_eq!(handle.choice(&key, &meta).as_deref(), Some("claude-opus-4-7"));
/// ```
#[derive(Debug, Clone)]
pub struct FallbackHandle {
    config: Arc<Config>,
}

impl FallbackHandle {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self { config }
    }

    /// The model a request sent with `key` (the request's API key, [`KeyId::anonymous`]
    /// without one; a key pool below is asked for its own keys) and described by `meta` would
    /// be sent to first, by the quota board as it is now. `None` when the request names no
    /// model.
    pub fn choice(&self, key: &KeyId, meta: &RequestMeta) -> Option<String> {
        let requested = meta.model.as_deref()?;
        let candidates: Vec<_> = policy::candidates(
            &self.config.catalog,
            requested,
            self.config.floor.as_deref(),
        )
        .iter()
        .map(|model| self.config.catalog.entry(model))
        .collect();
        let cost = self.config.cost(key, meta);
        let idx = self
            .config
            .select(meta, &HeaderMap::new(), &candidates, 0, key, &cost)
            .unwrap_or(0);
        candidates.get(idx).map(|entry| entry.id().to_owned())
    }
}

/// Chooses the model of each Messages API request by remaining quota and fails over down the
/// chain; see [`FallbackLayer`](super::FallbackLayer) and the [module docs](super).
///
/// The inner service must be `Clone`: the first attempt uses the service that `poll_ready`
/// prepared, later attempts a clone made ready in the response future (cloned, when a
/// request gets there, from one spare clone the layer keeps: most requests are sent once and
/// clone nothing).
#[derive(Debug, Clone)]
pub struct Fallback<S> {
    inner: S,
    config: Arc<Config>,
    spare: Spare<S>,
    /// The chain of the last requested model, as [`Config::candidates`] gave it: a steady
    /// stream of one model takes it from here, without the lock of the layer's shared list.
    last_chain: Option<Arc<[ModelEntry]>>,
}

impl<S> Fallback<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Self {
            inner,
            config,
            spare: Spare::new(),
            last_chain: None,
        }
    }

    /// The chain of `requested` ([`Config::candidates`]), from the service's memo when it
    /// was the last one asked.
    fn chain(&mut self, requested: &ModelEntry) -> Arc<[ModelEntry]> {
        if let Some(chain) = &self.last_chain {
            if chain.first().is_some_and(|m| m.id() == requested.id()) {
                return chain.clone();
            }
        }
        let chain = self.config.candidates(requested);
        self.last_chain = Some(chain.clone());
        chain
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
/// (see [`opted_out`]).
fn take_opt_out(headers: &mut HeaderMap) -> bool {
    // Almost no request carries one: one lookup, not a read and a removal.
    if !parsed_names::contains(headers, &parsed_names::X_TOWER_CLAUDE_FALLBACK) {
        return false;
    }
    take_opt_out_present(headers)
}

/// [`take_opt_out`] of a request that carries the header: out of line, as rare (the read and
/// the removal sat in `call`, between the lines every request runs).
#[cold]
#[inline(never)]
fn take_opt_out_present(headers: &mut HeaderMap) -> bool {
    let off = opted_out(headers);
    headers.remove(&parsed_names::X_TOWER_CLAUDE_FALLBACK);
    off
}

/// Whether a request turns fallback off: an `x-tower-claude-fallback` header that says `off`
/// or `false` (case-insensitive, surrounding whitespace ignored), or a [`NoFallback`]
/// extension. The cache above reads it too (without removing the header).
pub(crate) fn opted_out_of(req: &Request<RequestBody>) -> bool {
    req.extensions().get::<NoFallback>().is_some() || opted_out(req.headers())
}

fn opted_out(headers: &HeaderMap) -> bool {
    headers
        .get_all(&parsed_names::X_TOWER_CLAUDE_FALLBACK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .any(|v| v.eq_ignore_ascii_case("off") || v.eq_ignore_ascii_case("false"))
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
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let disabled = opted_out || req.extensions().get::<NoFallback>().is_some();
        // The request's catalogue entry (looked up once per request, then carried with its
        // `RequestMeta`): the first candidate, read where it is.
        let candidates = match RequestMeta::get_or_scan_in(&mut req, &self.config.catalog) {
            Ok(meta) => match meta.resolved_entry() {
                Some(entry) if disabled => Arc::from([entry.clone()]),
                Some(entry) => self.chain(entry),
                // No model: upstream answers 400, untouched.
                None => return ResponseFuture::passthrough(self.inner.call(req)),
            },
            // Unreadable body: upstream answers 400, untouched.
            Err(_) => return ResponseFuture::passthrough(self.inner.call(req)),
        };
        let config = self.config.clone();
        let key = match config.key_checked_above {
            true => KeyId::of_request_checked_above(&mut req),
            false => KeyId::of_request(&mut req),
        }
        .unwrap_or_else(KeyId::anonymous);
        // The walk reads the `RequestMeta` that `get_or_scan` left in the request.
        let Some(cost) =
            RequestMeta::in_extensions(req.extensions()).map(|meta| config.cost(&key, meta))
        else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };

        // Built in its box: the walk (with its next request) is not moved again.
        let mut walk = Box::new(Walk::new(config, &req, candidates, key, cost));
        // The ready service sends the first attempt; a later one clones the spare.
        let spare = self.spare.handle(&self.inner);
        let fut = match walk.first_request() {
            Some(request) => self.inner.call(request),
            None => {
                walk.mark_received(&mut req);
                self.inner.call(req)
            }
        };
        ResponseFuture::walking(fut, walk, spare)
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
    /// The service's memo of the last chain serves only the model it was made for: each
    /// model asked gets its own chain, the one the layer's shared list gives.
    #[test]
    fn the_chain_memo_follows_the_requested_model() {
        use tower::Layer;
        let upstream = tower::service_fn(|_req: Request<RequestBody>| async {
            Ok::<_, BoxError>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        let mut svc = crate::fallback::FallbackLayer::new().layer(upstream);
        let catalog = crate::anthropic::ModelCatalog::default();
        let opus = catalog.entry("claude-opus-4-7");
        let haiku = catalog.entry("claude-haiku-4-5");
        let ids =
            |chain: &[ModelEntry]| chain.iter().map(|m| m.id().to_owned()).collect::<Vec<_>>();
        for entry in [&opus, &opus, &haiku, &haiku, &opus] {
            let chain = svc.chain(entry);
            assert_eq!(chain[0].id(), entry.id());
            assert_eq!(ids(&chain), ids(&svc.config.candidates(entry)));
        }
        assert!(ids(&svc.chain(&opus)).len() > 1, "opus has lower models");
    }

    /// Headers reach the board once per upstream answer: a fallback over a rate limiter on
    /// the same board does not feed the rate limiter's observation again; on a board of its
    /// own (nothing below observes it), it still does.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_answer_reaches_the_shared_board_once() {
        use crate::quota::observations;
        use crate::rate_limit::RateLimitLayer;
        use tower::{Layer, ServiceExt};

        let upstream = tower::service_fn(|_req: http::Request<RequestBody>| async {
            let resp = http::Response::builder()
                .header("content-type", "application/json")
                .header("anthropic-ratelimit-requests-limit", "50")
                .header("anthropic-ratelimit-requests-remaining", "49")
                .header("anthropic-ratelimit-requests-reset", "2030-01-01T00:00:00Z")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":3,"output_tokens":1}}"#,
                )))
                .unwrap();
            Ok::<_, BoxError>(resp)
        });
        let request = || {
            http::Request::post("/v1/messages")
                .header("x-api-key", "sk-ant-test")
                .header("content-type", "application/json")
                .body(RequestBody::from(
                    r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
                ))
                .unwrap()
        };

        let shared = QuotaBoard::new();
        let svc = crate::fallback::FallbackLayer::new()
            .board(shared.clone())
            .layer(RateLimitLayer::new().board(shared).layer(upstream));
        let before = observations::get();
        let resp = svc.oneshot(request()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            observations::get() - before,
            1,
            "one answer, one observation"
        );

        // Fallback on a board the rate limiter does not feed: each board hears the answer once.
        let svc = crate::fallback::FallbackLayer::new()
            .board(QuotaBoard::new())
            .layer(
                RateLimitLayer::new()
                    .board(QuotaBoard::new())
                    .layer(upstream),
            );
        let before = observations::get();
        svc.oneshot(request()).await.unwrap();
        assert_eq!(observations::get() - before, 2);
    }
}
