//! [`Concurrency`]: the service built by [`ConcurrencyLayer`](super::ConcurrencyLayer).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::body::ConcurrencyBody;
use super::future::ResponseFuture;
use super::limiter::{ConcurrencyHandle, Limiter};
use crate::BoxError;
use crate::anthropic::is_messages_request;
use crate::body::RequestBody;

/// Caps in-flight Messages API requests; see [`ConcurrencyLayer`](super::ConcurrencyLayer).
///
/// Waiting for a permit happens in the [`ResponseFuture`]; `poll_ready` only reflects the
/// inner service, which is cloned for requests that have to wait. Other requests (not
/// `POST /v1/messages`) pass through without a permit.
#[derive(Debug, Clone)]
pub struct Concurrency<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Concurrency<S> {
    pub(crate) fn from_limiter(inner: S, limiter: Arc<Limiter>) -> Self {
        Self { inner, limiter }
    }

    /// A handle reading the shared cap.
    pub fn handle(&self) -> ConcurrencyHandle {
        ConcurrencyHandle {
            limiter: self.limiter.clone(),
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

impl<S, ResBody> Service<Request<RequestBody>> for Concurrency<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Response = Response<ConcurrencyBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        if !is_messages_request(req.method(), req.uri()) {
            return ResponseFuture::passthrough(self.inner.call(req));
        }
        // A fixed cap never moves: no clock read, no lock.
        if self.limiter.moves() {
            self.limiter.refresh(tokio::time::Instant::now());
        }
        match self.limiter.try_acquire() {
            Some(permit) => ResponseFuture::called(self.inner.call(req), permit),
            None => {
                tracing::debug!(
                    limit = self.limiter.limit(),
                    in_flight = self.limiter.in_flight(),
                    "concurrency: at the cap; waiting for a permit"
                );
                let clone = self.inner.clone();
                let service = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::waiting(Box::pin(self.limiter.clone().acquire()), service, req)
            }
        }
    }
}
