//! [`ConcurrencyBody`]: holds the concurrency permit until the response body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::limiter::Permit;

/// Response body of [`Concurrency`](super::Concurrency): data flows through unchanged; the
/// permit is released when the body reports its end, fails, or is dropped.
#[pin_project]
pub struct ConcurrencyBody<B> {
    #[pin]
    inner: B,
    permit: Option<Permit>,
}

impl<B> std::fmt::Debug for ConcurrencyBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyBody")
            .field("holds_permit", &self.permit.is_some())
            .finish()
    }
}

impl<B> ConcurrencyBody<B> {
    pub(crate) fn new(inner: B, permit: Option<Permit>) -> Self {
        Self { inner, permit }
    }

    /// Whether the body still holds a concurrency permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// A reference to the inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for ConcurrencyBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(_)) if !inner.is_end_stream() => {}
            _ => *this.permit = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
