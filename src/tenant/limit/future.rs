//! [`ResponseFuture`] of the [`TenantLimit`](super::TenantLimit) service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::body::RequestBody;
use crate::quota::AcquireError;
use crate::rate_limit::RateLimitBody;
use crate::rate_limit::service::tenant_key;
use crate::tenant::Tenant;

/// Response future of [`TenantLimit`](super::TenantLimit): the rate limiter's, keyed by the
/// tenant; a refusal by the tenant's own limits is counted in its
/// [`TenantStats`](crate::tenant::TenantStats).
#[pin_project]
pub struct ResponseFuture<S, F> {
    #[pin]
    inner: crate::rate_limit::ResponseFuture<S, F>,
    tenant: Option<Tenant>,
}

impl<S, F> ResponseFuture<S, F> {
    pub(crate) fn new(
        inner: crate::rate_limit::ResponseFuture<S, F>,
        tenant: Option<Tenant>,
    ) -> Self {
        Self { inner, tenant }
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .field("tenant", &self.tenant.as_ref().map(Tenant::name))
            .finish()
    }
}

impl<S, F, E, ResBody> Future for ResponseFuture<S, F>
where
    S: Service<Request<RequestBody>, Future = F, Error = E>,
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<RateLimitBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let (Err(e), Some(tenant)) = (&out, this.tenant.as_ref()) {
            // Refused by the tenant's own limits (not by the quota below, whose key differs).
            if let Some(err) = e.downcast_ref::<AcquireError>() {
                if *err.key() == tenant_key(tenant) {
                    tenant.stats().record_refusal();
                    tracing::debug!(
                        tenant = tenant.name(),
                        group = %err.group(),
                        kind = ?err.kind(),
                        "tenant limit: request refused"
                    );
                }
            }
        }
        Poll::Ready(out)
    }
}
