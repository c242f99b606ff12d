//! [`KeyPoolBody`]: the response body of [`KeyPool`](super::KeyPool).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::BoxError;

/// Response body of [`KeyPool`](super::KeyPool): the inner body, unchanged.
///
/// For a 429 the layer reads the start of the error body (at most 64 KiB) to tell a spend cap
/// from a rate limit; that part is replayed first, then the rest of the inner body follows.
#[pin_project]
pub struct KeyPoolBody<B> {
    #[pin]
    inner: Inner<B>,
}

#[pin_project(project = InnerProj)]
enum Inner<B> {
    Stream {
        #[pin]
        body: B,
    },
    Replay {
        prefix: Option<Bytes>,
        rest: Option<Pin<Box<B>>>,
        error: Option<BoxError>,
        trailers: Option<HeaderMap>,
    },
}

impl<B> fmt::Debug for KeyPoolBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Inner::Stream { .. } => "stream",
            Inner::Replay { .. } => "replay",
        };
        f.debug_struct("KeyPoolBody").field("kind", &kind).finish()
    }
}

impl<B> KeyPoolBody<B> {
    pub(crate) fn stream(body: B) -> Self {
        Self {
            inner: Inner::Stream { body },
        }
    }

    pub(crate) fn replay(
        prefix: Bytes,
        rest: Option<Pin<Box<B>>>,
        error: Option<BoxError>,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self {
            inner: Inner::Replay {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
                error,
                trailers,
            },
        }
    }
}

impl<B> Body for KeyPoolBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().inner.project() {
            InnerProj::Stream { body } => body.poll_frame(cx).map_err(Into::into),
            InnerProj::Replay {
                prefix,
                rest,
                error,
                trailers,
            } => {
                if let Some(data) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(body) = rest {
                    match body.as_mut().poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(frame)) => {
                            return Poll::Ready(Some(frame.map_err(Into::into)));
                        }
                        Poll::Ready(None) => *rest = None,
                    }
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Stream { body } => body.is_end_stream(),
            Inner::Replay {
                prefix,
                rest,
                error,
                trailers,
            } => {
                prefix.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
                    && error.is_none()
                    && trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Stream { body } => body.size_hint(),
            Inner::Replay { prefix, rest, .. } => {
                let n = prefix.as_ref().map_or(0, |p| p.len() as u64);
                match rest {
                    None => SizeHint::with_exact(n),
                    Some(b) => {
                        let h = b.size_hint();
                        let mut out = SizeHint::new();
                        out.set_lower(h.lower().saturating_add(n));
                        if let Some(u) = h.upper() {
                            out.set_upper(u.saturating_add(n));
                        }
                        out
                    }
                }
            }
        }
    }
}
