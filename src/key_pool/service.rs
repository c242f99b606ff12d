//! [`KeyPool`]: the service built by [`KeyPoolLayer`](super::KeyPoolLayer).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::body::KeyPoolBody;
use super::config::Config;
use super::future::{ResponseFuture, Sent};
use super::pool::{ChosenKey, KeyCosts, KeyPoolHandle, Pick, Pool};
use crate::BoxError;
use crate::anthropic::header_names::X_API_KEY;
use crate::anthropic::{KeyId, RequestMeta, is_messages_call};
use crate::body::RequestBody;
use crate::quota::{Admission, Cost};
use crate::retry::Deadline;
use crate::tenant::Tenant;

/// Sends each request with the best key of a pool; see [`KeyPoolLayer`](super::KeyPoolLayer).
#[derive(Debug, Clone)]
pub struct KeyPool<S> {
    inner: S,
    pool: Arc<Pool>,
    config: Arc<Config>,
}

impl<S> KeyPool<S> {
    pub(crate) fn new(inner: S, pool: Arc<Pool>, config: Arc<Config>) -> Self {
        Self {
            inner,
            pool,
            config,
        }
    }

    /// A handle on the pool's state.
    pub fn handle(&self) -> KeyPoolHandle {
        KeyPoolHandle {
            pool: self.pool.clone(),
        }
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

impl<S, ResBody> Service<Request<RequestBody>> for KeyPool<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<KeyPoolBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let config = &self.config;
        let target = if is_messages_call(req.method(), req.uri().path()) {
            // The model's catalogue entry, resolved once per request and carried with the
            // meta (not looked up again here).
            match RequestMeta::get_or_scan_in(&mut req, &config.catalog) {
                Ok(meta) => meta.resolved_entry().map(|entry| {
                    let cost =
                        Cost::new(1, meta.input_tokens, config.output.reserve(meta.max_tokens));
                    (entry.group().clone(), cost)
                }),
                // Unreadable body: sent with a key all the same, so that upstream answers 400.
                Err(_) => None,
            }
        } else {
            None
        };
        if let (Some((group, cost)), false) = (&target, config.own_board) {
            // Admission by the pool: the request waits in its group's line and takes the
            // first key that can admit it (see `Pool::admit`).
            let deadline = req.extensions().get::<Deadline>().map(|d| d.instant());
            let tenant = req.extensions().get::<Tenant>().cloned();
            let (group, cost) = (group.clone(), *cost);
            let costs = key_costs(&self.pool, config, &req, cost);
            let (pool, config) = (self.pool.clone(), config.clone());
            // The ready service goes with the request; `self` keeps a fresh clone.
            let clone = self.inner.clone();
            let mut svc = std::mem::replace(&mut self.inner, clone);
            let fut = async move {
                let board = config.board.clone();
                let admitted = pool
                    .clone()
                    .admit(board, group.clone(), costs, deadline, tenant);
                let (pick, reservation, waited) = admitted.await?;
                let path = req.uri().path();
                let sent =
                    Sent::new(pool, config, pick.clone(), Some((group, cost)), path).admitted();
                send_with(&mut req, &pick);
                let admission = Admission::new(reservation, waited);
                req.extensions_mut().insert(admission.clone());
                if let Err(e) = std::future::poll_fn(|cx| svc.poll_ready(cx)).await {
                    if let Some((r, _)) = admission.take(&pick.id, sent.group()) {
                        r.refund();
                    }
                    return Err(e.into());
                }
                Ok((svc.call(req), sent))
            };
            return ResponseFuture::admitting(Box::pin(fut));
        }
        let pick = self.pool.pick(
            target.as_ref().map(|(g, c)| (g, c)),
            &config.board,
            Instant::now(),
        );
        let pick = match pick {
            Ok(pick) => pick,
            Err(err) => return ResponseFuture::failed(err),
        };
        send_with(&mut req, &pick);
        let sent = Sent::new(
            self.pool.clone(),
            config.clone(),
            pick,
            target,
            req.uri().path(),
        );
        ResponseFuture::called(self.inner.call(req), sent)
    }
}

/// What the request costs on each key: with prompt-cache breakpoints, each key leaves out the
/// prefix it sent to the model within its TTL (the rate limiter's cache-aware estimate).
fn key_costs(pool: &Pool, config: &Config, req: &Request<RequestBody>, cost: Cost) -> KeyCosts {
    match req.extensions().get::<RequestMeta>() {
        Some(meta) if !meta.cache_breakpoints.is_empty() => {
            let reads_count = match meta.model_entry(&config.catalog) {
                Some(entry) => entry.cache_reads_count(),
                None => config.catalog.cache_reads_count(""),
            };
            let memory = config.board.prompt_cache();
            pool.costs(cost, |key| {
                memory
                    .estimate(key, meta, reads_count)
                    .counted_input_tokens()
            })
        }
        _ => KeyCosts::uniform(cost),
    }
}

/// Puts the picked key on the request (and removes any other credential).
fn send_with(req: &mut Request<RequestBody>, pick: &Pick) {
    let headers = req.headers_mut();
    headers.remove(AUTHORIZATION);
    headers.insert(X_API_KEY, pick.header.clone());
    // The layers below read the chosen key's id from the memo, not from the header again.
    KeyId::remember_chosen(req, &pick.header, &pick.id);
    req.extensions_mut().insert(ChosenKey::new(pick.id.clone()));
}
