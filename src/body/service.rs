use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Limited};
use tower_service::Service;

use super::{RequestBody, ResponseFuture};
use crate::BoxError;

/// Buffers each request body into a [`RequestBody`] before calling the inner service.
///
/// Built by [`BufferBodyLayer`](super::BufferBodyLayer); see the [module docs](super).
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
}

impl<S> BufferBody<S> {
    /// Wraps `inner`, buffering bodies of at most `limit` bytes.
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, limit }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<RequestBody>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service answers this request; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        ResponseFuture::new(
            inner,
            parts,
            Limited::new(body, self.limit).collect(),
            self.limit,
        )
    }
}
