//! [`TenantLimit`]: the service built by [`TenantLimitLayer`](super::TenantLimitLayer).

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use crate::BoxError;
use crate::body::RequestBody;
use crate::quota::QuotaBoard;
use crate::rate_limit::{RateLimit, RateLimitBody};
use crate::tenant::Tenant;

/// Holds a tenant's Messages requests to the limits of its own; see
/// [`TenantLimitLayer`](super::TenantLimitLayer).
#[derive(Debug, Clone)]
pub struct TenantLimit<S> {
    inner: RateLimit<S>,
}

impl<S> TenantLimit<S> {
    pub(crate) fn new(inner: RateLimit<S>) -> Self {
        Self { inner }
    }

    /// The board holding the tenants' buckets.
    pub fn board(&self) -> &QuotaBoard {
        self.inner.board()
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, ResBody> Service<Request<RequestBody>> for TenantLimit<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<RateLimitBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        // A request without a tenant is not the tenant limiter's: straight to the service
        // below (readied by the limiter's `poll_ready`, which only forwards), without the
        // limiter looking for the tenant a second time.
        let Some(tenant) = req.extensions().get::<Tenant>().cloned() else {
            return ResponseFuture::passthrough(self.inner.get_mut().call(req));
        };
        ResponseFuture::limited(self.inner.call(req), tenant)
    }
}
