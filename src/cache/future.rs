use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use super::body::CacheBody;
use crate::BoxError;

type Inner<B> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, BoxError>> + Send>>;

/// The response future of [`Cache`](super::Cache).
///
/// A request goes through up to four asynchronous steps (store lookup, waiting for an
/// in-flight twin, the upstream call, storing a JSON answer), and the store's own futures are
/// boxed trait objects, so the steps are one boxed `async` block: one allocation per request,
/// small next to a store lookup.
pub struct ResponseFuture<B> {
    inner: Inner<B>,
}

impl<B> ResponseFuture<B> {
    pub(crate) fn new(inner: Inner<B>) -> Self {
        Self { inner }
    }
}

impl<B> Future for ResponseFuture<B> {
    type Output = Result<Response<CacheBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
