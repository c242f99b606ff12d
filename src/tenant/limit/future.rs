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
///
/// A request without a tenant (most of them) is the inner service's future as it is; the
/// limiter's future (its reservation, its queue) is boxed for a tenant's request only, so that
/// every layer above, which holds this future, does not carry (and move) its room.
#[pin_project]
pub struct ResponseFuture<S, F> {
    #[pin]
    kind: Kind<S, F>,
}

#[pin_project(project = KindProj)]
enum Kind<S, F> {
    /// No tenant: the inner service's future.
    Passthrough {
        #[pin]
        fut: F,
    },
    /// A tenant's request, through the limiter.
    Limited {
        inner: Pin<Box<crate::rate_limit::ResponseFuture<S, F>>>,
        tenant: Tenant,
    },
}

impl<S, F> ResponseFuture<S, F> {
    /// A request without a tenant: `fut` as it is.
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            kind: Kind::Passthrough { fut },
        }
    }

    /// A tenant's request, through the limiter's future `inner`.
    pub(crate) fn limited(inner: crate::rate_limit::ResponseFuture<S, F>, tenant: Tenant) -> Self {
        Self {
            kind: Kind::Limited {
                inner: Box::pin(inner),
                tenant,
            },
        }
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ResponseFuture");
        match &self.kind {
            Kind::Passthrough { .. } => d.field("tenant", &None::<&str>),
            Kind::Limited { inner, tenant } => d
                .field("inner", inner)
                .field("tenant", &Some(tenant.name())),
        };
        d.finish()
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
        let (out, tenant) = match self.project().kind.project() {
            // As the limiter passes a request through.
            KindProj::Passthrough { fut } => {
                return Poll::Ready(
                    ready!(fut.poll(cx))
                        .map(|r| r.map(RateLimitBody::passthrough))
                        .map_err(Into::into),
                );
            }
            KindProj::Limited { inner, tenant } => (ready!(inner.as_mut().poll(cx)), tenant),
        };
        if let Err(e) = &out {
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
