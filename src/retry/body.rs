//! The response body of [`Retry`](super::Retry).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::BoxError;

/// The response body of [`Retry`](super::Retry): the upstream body, preceded by any frames the
/// layer read ahead (an error body it inspected, or the start of a stream it held back) and
/// replays unchanged.
#[pin_project]
pub struct RetryBody<B> {
    prefix: VecDeque<Frame<Bytes>>,
    /// An error met while reading ahead, yielded after the prefix.
    error: Option<BoxError>,
    #[pin]
    rest: Rest<B>,
}

#[pin_project(project = RestProj)]
enum Rest<B> {
    /// Never read ahead: polled in place.
    Plain(#[pin] B),
    /// Read ahead through a box (the body had to move after being polled).
    Boxed(Pin<Box<B>>),
    /// Ended.
    Done,
}

impl<B> RetryBody<B> {
    /// The body as it is.
    pub(crate) fn new(body: B) -> Self {
        Self {
            prefix: VecDeque::new(),
            error: None,
            rest: Rest::Plain(body),
        }
    }

    /// Replays `prefix`, then yields `error` if any, then the rest of `body` (if any).
    pub(crate) fn replay(
        prefix: VecDeque<Frame<Bytes>>,
        error: Option<BoxError>,
        body: Option<Pin<Box<B>>>,
    ) -> Self {
        Self {
            prefix,
            error,
            rest: match body {
                Some(b) => Rest::Boxed(b),
                None => Rest::Done,
            },
        }
    }

    fn prefix_len(&self) -> u64 {
        self.prefix
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.remaining() as u64)
            .sum()
    }
}

impl<B> Body for RetryBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.error.take() {
            this.rest.set(Rest::Done);
            return Poll::Ready(Some(Err(err)));
        }
        let polled = match this.rest.as_mut().project() {
            RestProj::Plain(body) => body.poll_frame(cx),
            RestProj::Boxed(body) => body.as_mut().poll_frame(cx),
            RestProj::Done => return Poll::Ready(None),
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.rest.set(Rest::Done);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(err))) => {
                this.rest.set(Rest::Done);
                Poll::Ready(Some(Err(err.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.error.is_none()
            && match &self.rest {
                Rest::Plain(b) => b.is_end_stream(),
                Rest::Boxed(b) => b.is_end_stream(),
                Rest::Done => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let rest = match &self.rest {
            Rest::Plain(b) => b.size_hint(),
            Rest::Boxed(b) => b.size_hint(),
            Rest::Done => SizeHint::with_exact(0),
        };
        let prefix = self.prefix_len();
        if prefix == 0 {
            return rest;
        }
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(prefix));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(prefix));
        }
        hint
    }
}

impl<B> fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBody")
            .field("replayed_bytes", &self.prefix_len())
            .field("pending_error", &self.error.is_some())
            .field("ended", &matches!(self.rest, Rest::Done))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn plain_body_passes_through() {
        let body = RetryBody::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
    }

    #[tokio::test]
    async fn replay_prefix_then_rest() {
        let rest = Box::pin(Full::new(Bytes::from_static(b" world")));
        let prefix = VecDeque::from([Frame::data(Bytes::from_static(b"hello"))]);
        let body = RetryBody::replay(prefix, None, Some(rest));
        assert_eq!(body.size_hint().exact(), Some(11));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");
    }

    #[tokio::test]
    async fn replay_then_error() {
        type Chunks = futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
        >;
        let prefix = VecDeque::from([Frame::data(Bytes::from_static(b"data"))]);
        let mut body: RetryBody<StreamBody<Chunks>> =
            RetryBody::replay(prefix, Some("connection reset".into()), None);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"data"));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "connection reset");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
