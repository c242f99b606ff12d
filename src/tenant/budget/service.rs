//! [`Budgeted`]: the service built by [`BudgetLayer`](super::BudgetLayer).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{Admission, ResponseFuture};
use super::{Decision, Shared, keys_for};
use crate::BoxError;
use crate::anthropic::{RequestMeta, is_messages_call};
use crate::body::RequestBody;
use crate::retry::Deadline;
use crate::tenant::Tenant;

/// Meters and limits each tenant's spend; see [`BudgetLayer`](super::BudgetLayer). (Named
/// `Budgeted` rather than `Budget`, which is the tenant's amounts, [`crate::tenant::Budget`].)
///
/// The admission check (a store read) happens in the [`ResponseFuture`], so `poll_ready` only
/// reflects the inner service; the ready inner service goes with the request and `self` keeps
/// a clone.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Budgeted<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgeted")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

impl<S, ResBody> Service<Request<RequestBody>> for Budgeted<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<super::BudgetBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<RequestBody>) -> Self::Future {
        let Some(tenant) = req.extensions().get::<Tenant>().cloned() else {
            return ResponseFuture::passthrough(self.inner.call(req));
        };
        if !is_messages_call(req.method(), req.uri().path()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        let shared = &self.shared;
        let (model, reserve, stream) = match RequestMeta::get_or_scan(&mut req) {
            Ok(meta) => match &meta.model {
                Some(model) => (
                    model.clone(),
                    shared
                        .prices
                        .max_cost_micro_usd(model, meta, shared.default_max_tokens),
                    meta.stream,
                ),
                None => return ResponseFuture::passthrough(self.inner.call(req)),
            },
            // Unreadable body: the upstream answers 400, which costs nothing.
            Err(_) => return ResponseFuture::passthrough(self.inner.call(req)),
        };
        let keys = keys_for(&tenant, shared.clock.now());
        let admission = Admission {
            shared: shared.clone(),
            tenant: tenant.clone(),
            keys: keys.clone(),
            model,
            stream,
        };
        if !Shared::has_budget(&tenant) {
            // Nothing to check: meter only.
            return ResponseFuture::metered(self.inner.call(req), admission, 0);
        }
        // Wait for settlements at most `max_wait`, and never past the caller's deadline.
        let by_max_wait = Instant::now().checked_add(shared.max_wait);
        let by_deadline = req.extensions().get::<Deadline>().map(|d| d.instant());
        let give_up = match (by_max_wait, by_deadline) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a
                .or(b)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        };
        let check_shared = shared.clone();
        let check = async move {
            loop {
                let settled = check_shared.settled();
                tokio::pin!(settled);
                settled.as_mut().enable();
                match check_shared.decide(&tenant, &keys, reserve).await {
                    Decision::Wait => {
                        tracing::debug!(
                            tenant = tenant.name(),
                            "budget: waiting for requests in flight to settle"
                        );
                        if tokio::time::timeout_at(give_up, settled).await.is_err() {
                            return Decision::Refuse(Shared::wait_expired(&tenant));
                        }
                    }
                    decision => return decision,
                }
            }
        };
        // The ready service goes with the request; `self` keeps a fresh clone.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(Box::pin(check), service, req, admission)
    }
}
