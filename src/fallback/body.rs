//! [`FallbackBody`]: the inner response body, possibly preceded by bytes the layer already
//! read (an error envelope it looked at).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::BoxError;

/// Response body of [`Fallback`](super::Fallback).
///
/// Successful responses (streams included) flow through untouched. An error response the
/// layer read to decide whether to fail over (a 429 or 529 envelope, at most 64 KiB) and then
/// returned is replayed byte for byte: the bytes already read, then whatever the inner body
/// still had, then its error if reading it failed.
#[pin_project]
pub struct FallbackBody<B> {
    prefix: Option<Bytes>,
    #[pin]
    rest: Rest<B>,
}

#[pin_project(project = RestProj)]
enum Rest<B> {
    Body {
        #[pin]
        body: B,
    },
    Boxed {
        body: Pin<Box<B>>,
    },
    Error {
        error: Option<BoxError>,
    },
    Done,
}

impl<B> std::fmt::Debug for FallbackBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rest = match self.rest {
            Rest::Body { .. } | Rest::Boxed { .. } => "body",
            Rest::Error { .. } => "error",
            Rest::Done => "done",
        };
        f.debug_struct("FallbackBody")
            .field("prefix", &self.prefix.as_ref().map(Bytes::len))
            .field("rest", &rest)
            .finish()
    }
}

impl<B> FallbackBody<B> {
    /// The inner body, untouched.
    pub(crate) fn new(body: B) -> Self {
        Self {
            prefix: None,
            rest: Rest::Body { body },
        }
    }

    /// `prefix`, then the rest of `body`.
    pub(crate) fn replay(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest: Rest::Boxed { body },
        }
    }

    /// The bytes read ahead (empty when none).
    pub(crate) fn prefix(&self) -> &[u8] {
        self.prefix.as_deref().unwrap_or_default()
    }

    /// `prefix`, then the end of the body (the inner body ended).
    pub(crate) fn complete(prefix: Bytes) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest: Rest::Done,
        }
    }

    /// `prefix`, then `error` (reading the inner body failed after `prefix`).
    pub(crate) fn failed(prefix: Bytes, error: BoxError) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest: Rest::Error { error: Some(error) },
        }
    }
}

impl<B> Body for FallbackBody<B>
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
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        match this.rest.project() {
            RestProj::Body { body } => {
                Poll::Ready(ready!(body.poll_frame(cx)).map(|r| r.map_err(Into::into)))
            }
            RestProj::Boxed { body } => {
                Poll::Ready(ready!(body.as_mut().poll_frame(cx)).map(|r| r.map_err(Into::into)))
            }
            RestProj::Error { error } => Poll::Ready(error.take().map(Err)),
            RestProj::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && match &self.rest {
                Rest::Body { body } => body.is_end_stream(),
                Rest::Boxed { body } => body.is_end_stream(),
                Rest::Error { error } => error.is_none(),
                Rest::Done => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = match &self.rest {
            Rest::Body { body } => Some(body.size_hint()),
            Rest::Boxed { body } => Some(body.size_hint()),
            Rest::Error { .. } | Rest::Done => None,
        };
        match inner {
            Some(inner) => {
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            None => SizeHint::with_exact(extra),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn replays_prefix_then_rest() {
        let body = FallbackBody::replay(
            Bytes::from_static(b"ab"),
            Box::pin(Full::new(Bytes::from("cd"))),
        );
        assert_eq!(body.size_hint().exact(), Some(4));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"abcd");

        let body = FallbackBody::<Full<Bytes>>::complete(Bytes::from_static(b"xyz"));
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"xyz");

        let body = FallbackBody::<Full<Bytes>>::failed(Bytes::from_static(b"x"), "cut".into());
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "cut");

        let body = FallbackBody::new(Full::new(Bytes::from("plain")));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"plain");
    }
}
