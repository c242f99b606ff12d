//! [`RateLimit`]: the service built by [`RateLimitLayer`](super::RateLimitLayer).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::body::{PromptNote, RateLimitBody};
use super::config::{Config, Scope};
use super::future::ResponseFuture;
use crate::BoxError;
use crate::anthropic::{KeyId, RequestMeta, is_messages_request};
use crate::body::RequestBody;
use crate::quota::{AcquireError, AcquireErrorKind, Admission, Cost, QuotaBoard};
use crate::retry::Deadline;
use crate::tenant::Tenant;

/// Holds Messages API requests until their cost fits the quota; see
/// [`RateLimitLayer`](super::RateLimitLayer).
///
/// Waiting happens in the [`ResponseFuture`], so `poll_ready` only reflects the inner
/// service; the inner service is cloned for requests that have to wait.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> RateLimit<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The board this service writes to.
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

impl<S, ResBody> Service<Request<RequestBody>> for RateLimit<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<RateLimitBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let config = &self.config;
        // A tenant-scoped limiter holds only requests that carry a tenant: look for one before
        // anything else (the stack runs one above every key-scoped limiter).
        let tenant = match config.scope {
            Scope::Tenant => match req.extensions().get::<Tenant>() {
                Some(tenant) => Some(tenant.clone()),
                None => return ResponseFuture::passthrough(self.inner.call(req)),
            },
            Scope::Key => req.extensions().get::<Tenant>().cloned(),
        };
        // The request's catalogue entry (looked up once per request: group, cache reads).
        // What the cost needs is read here too: the meta is looked up again below only for a
        // cache-aware estimate (a body with prompt-cache breakpoints).
        // With the key id's memo when a layer above checked it and the meta keeps it (one
        // look-up of the meta fewer than asking the request for it below).
        let read = |meta: &RequestMeta| {
            meta.resolved_entry().map(|entry| {
                (
                    entry.group().clone(),
                    entry.cache_reads_count(),
                    meta.max_tokens,
                    meta.stream,
                    meta.input_tokens,
                    !meta.cache_breakpoints.is_empty(),
                    match config.scope {
                        Scope::Key if config.key_checked_above => KeyId::checked_above_in(meta),
                        _ => None,
                    },
                )
            })
        };
        // A meta a layer above scanned and resolved in this catalogue is read as it is (one
        // look-up of the extension); else scanned or resolved here.
        let fields = match RequestMeta::in_extensions(req.extensions())
            .filter(|meta| meta.is_resolved_in(&config.catalog))
        {
            Some(meta) => read(meta),
            None => match RequestMeta::get_or_scan_in(&mut req, &config.catalog) {
                Ok(meta) => read(meta),
                // Unreadable body: upstream answers 400, untouched.
                Err(_) => return ResponseFuture::passthrough(self.inner.call(req)),
            },
        };
        let Some((group, reads_count, max_tokens, stream, input_tokens, breakpoints, memo_key)) =
            fields
        else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        let key = match config.scope {
            Scope::Key if config.key_checked_above => match memo_key {
                Some(key) => key,
                None => KeyId::of_request_checked_above(&mut req).unwrap_or_else(KeyId::anonymous),
            },
            Scope::Key => KeyId::of_request(&mut req).unwrap_or_else(KeyId::anonymous),
            Scope::Tenant => {
                let Some((t, limits)) = tenant
                    .as_ref()
                    .and_then(|t| Some((t, t.limit_for(group.as_str())?)))
                else {
                    return ResponseFuture::passthrough(self.inner.call(req));
                };
                let key = tenant_key(t);
                // Follows the tenant's current limits (a reloaded tenants file).
                if config.board.key_limits(&key, &group) != Some(limits) {
                    config
                        .board
                        .set_key_limits(key.clone(), group.clone(), limits);
                }
                key
            }
        };
        // The input that counts: the estimate minus the prompt-cache prefix this key sent to
        // this model within its TTL (for the models whose cache reads do not count).
        let memory = config.board.prompt_cache();
        let estimate = match config.cache_aware && breakpoints {
            true => RequestMeta::in_extensions(req.extensions())
                .map(|meta| memory.estimate(&key, meta, reads_count)),
            false => None,
        };
        let input_tokens = estimate
            .as_ref()
            .map_or(input_tokens, |e| e.counted_input_tokens());
        // The memory is named only when the reservation may come from another board (an
        // admission from above, a wait: see `ResponseFuture::called`).
        let mut note = Some(PromptNote {
            memory: None,
            estimate: estimate.map(Box::new),
            reads_count,
        });
        let name_memory = |note: &mut Option<PromptNote>| {
            if let Some(note) = note {
                note.memory = Some(memory.clone());
            }
        };
        let cost = Cost::new(1, input_tokens, config.output.reserve(max_tokens));
        // Admitted above (a key pool took the quota for this key): use that reservation.
        let admitted = match config.scope {
            Scope::Key => req
                .extensions_mut()
                .remove::<Admission>()
                .and_then(|a| a.take(&key, &group)),
            Scope::Tenant => None,
        };
        if let Some((reservation, waited)) = admitted {
            event_out_of_line!(
                tracing::Level::DEBUG,
                key = %reservation.key(),
                group = %reservation.group(),
                waited_ms = waited.as_millis() as u64,
                "rate limit: admitted with the quota the key pool took"
            );
            name_memory(&mut note);
            let fut = self.inner.call(req);
            return ResponseFuture::called(
                fut,
                reservation,
                waited,
                stream,
                config.scope,
                Some(config.clone()),
                note,
            );
        }

        match config.board.try_acquire_inner(&key, &group, &cost) {
            Ok(grant) => {
                event_out_of_line!(
                    tracing::Level::DEBUG,
                    key = %key,
                    group = %group,
                    "rate limit: admitted at once"
                );
                // Taken on the layer's board: the answer is read with the reservation's
                // board, no handle on the layer's configuration kept per request.
                let reservation = config.board.reservation(key, group, cost, grant);
                let fut = self.inner.call(req);
                ResponseFuture::called(
                    fut,
                    reservation,
                    Duration::ZERO,
                    stream,
                    config.scope,
                    None,
                    note,
                )
            }
            Err(check) => {
                let err = config.board.check_error(&key, &group, check);
                name_memory(&mut note);
                self.queue(req, (key, group, cost), err, tenant, stream, note)
            }
        }
    }
}

impl<S> RateLimit<S> {
    /// A request whose cost does not fit now: refused (larger than a bucket, or queueing
    /// off), or queued on the board. Out of the common path (`call` stays short).
    #[cold]
    #[inline(never)]
    fn queue<F>(
        &mut self,
        req: Request<RequestBody>,
        (key, group, cost): (KeyId, crate::anthropic::RateLimitGroup, Cost),
        err: AcquireError,
        tenant: Option<Tenant>,
        stream: bool,
        note: Option<PromptNote>,
    ) -> ResponseFuture<S, F>
    where
        S: Clone,
    {
        let config = &self.config;
        if err.kind() == AcquireErrorKind::RequestTooLarge {
            let err = config.board.with_sizes(err, &cost);
            tracing::warn!(
                key = %key,
                group = %group,
                input_tokens = cost.input_tokens,
                "rate limit: request larger than the per-minute limit; refused"
            );
            return ResponseFuture::failed(err);
        }
        if config.max_wait == Some(Duration::ZERO) {
            tracing::debug!(
                key = %key,
                group = %group,
                reason = ?err.kind(),
                "rate limit: refused at once (no capacity, queueing off)"
            );
            return ResponseFuture::failed(err);
        }
        // Give up at the earlier of the layer's `max_wait` and the request's deadline
        // (`retry::Deadline`, set by the caller or a retry layer above): no wait ever
        // crosses the caller's deadline.
        let by_max_wait = config.max_wait.and_then(|d| Instant::now().checked_add(d));
        let by_deadline = req.extensions().get::<Deadline>().map(|d| d.instant());
        let give_up = match (by_max_wait, by_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tracing::debug!(
            key = %key,
            group = %group,
            reason = ?err.kind(),
            give_up_in_ms = give_up.map(|at| {
                at.saturating_duration_since(Instant::now()).as_millis() as u64
            }),
            "rate limit: queued"
        );
        let acquire = config
            .board
            .acquire(key, group, cost)
            .deadline(give_up)
            .tenant_opt(tenant);
        // The ready service goes with the request; `self` keeps a fresh clone.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::waiting(acquire, service, req, stream, config.clone(), note)
    }
}

/// The board key of `tenant`'s own limits.
pub(crate) fn tenant_key(tenant: &Tenant) -> KeyId {
    KeyId::named(&format!("tenant:{}", tenant.name()))
}
