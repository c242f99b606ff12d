//! The response body of [`Retry`](super::Retry).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use tokio::time::{Instant, Sleep};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind, BodyState, UsageTracker};
use crate::body::{Replay, Tracked};

/// The message of the `event: error` that ends a stream cut before `message_stop`.
pub(crate) const STREAM_CUT: &str = "upstream stream ended before message_stop";
/// The message of the error that ends a body still running at the request's deadline.
pub(crate) const DEADLINE_PASSED: &str =
    "the request's deadline passed before the upstream answer ended";

/// The response body of [`Retry`](super::Retry): the upstream body as a [`Replay`] (any
/// frames the layer read ahead — an error body it inspected, or the start of a stream it held
/// back — replayed unchanged, then the rest).
///
/// Two guards end it the way a client can understand, never silently:
///
/// * a 2xx event stream that ends (or fails) before `message_stop` without an `event: error`
///   of its own ends with one: `api_error`, "upstream stream ended before message_stop";
/// * a body still running at the request's [`Deadline`](super::Deadline) ends there: an event
///   stream with an `event: error` of type `timeout_error`, any other body with an error
///   (the connection is cut, so the client sees a failed read, not a short answer).
#[pin_project]
pub struct RetryBody<B> {
    #[pin]
    inner: Replay<Tracked<B>>,
    /// A 2xx event stream: its usage tracker (fed below, or by `inner`).
    stream: Option<UsageTracker>,
    /// The request's deadline.
    deadline: Option<Instant>,
    /// Its timer, made the first time the inner body is not ready: a body that never waits
    /// (an answer read ahead, or arriving whole) allocates and registers none. An unpolled
    /// timer never reports its deadline passed, so waiting to make it changes nothing.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Nothing more is yielded.
    finished: bool,
}

impl<B> RetryBody<B> {
    /// The body as it is.
    pub(crate) fn new(body: B) -> Self {
        Self::replay(Replay::new(Tracked::passthrough(body)))
    }

    /// A body read ahead (or written by the layer).
    pub(crate) fn replay(inner: Replay<Tracked<B>>) -> Self {
        Self {
            inner,
            stream: None,
            deadline: None,
            sleep: None,
            finished: false,
        }
    }

    /// Guards the end of a 2xx event stream, as its usage `tracker` saw it.
    pub(crate) fn guard_stream(mut self, tracker: UsageTracker) -> Self {
        self.stream = Some(tracker);
        self
    }

    /// Ends the body at `deadline` (if any).
    pub(crate) fn until(mut self, deadline: Option<Instant>) -> Self {
        self.set_deadline(deadline);
        self
    }

    /// Ends the body at `deadline` (if any), in place.
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
        self.sleep = None;
    }

    /// Whether a guarded stream may still need its closing `event: error`.
    fn open_stream(&self) -> bool {
        self.stream.as_ref().is_some_and(open)
    }
}

/// Whether a guarded stream has neither completed nor carried its own `event: error`.
fn open(tracker: &UsageTracker) -> bool {
    tracker.state() != BodyState::Complete && tracker.error().is_none()
}

/// The end of a body: a closing `event: error` for a guarded stream that did not complete,
/// else `err` (if any), else the end.
fn close(
    stream: &mut Option<UsageTracker>,
    finished: &mut bool,
    kind: ApiErrorKind,
    message: &str,
    err: Option<BoxError>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    *finished = true;
    if let Some(tracker) = stream.as_ref() {
        // The tracker saw the body end (it is fed as the body is read, below this layer).
        if !open(tracker) {
            return Poll::Ready(None);
        }
        tracing::debug!(message, cause = ?err, "stream closed with an event: error");
        let event = ApiError::new(kind, message).to_sse_event();
        return Poll::Ready(Some(Ok(Frame::data(event))));
    }
    Poll::Ready(err.map(Err))
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
        if *this.finished {
            return Poll::Ready(None);
        }
        // What was read ahead is replayed even after the deadline (it was read in time).
        let passed =
            !this.inner.is_replaying() && this.sleep.as_ref().is_some_and(|d| d.is_elapsed());
        let polled = if passed {
            Poll::Pending
        } else {
            this.inner.as_mut().poll_frame(cx)
        };
        match polled {
            Poll::Pending => {
                let sleep = match (this.sleep.as_mut(), *this.deadline) {
                    (Some(sleep), _) => Some(sleep),
                    (None, Some(deadline)) => Some(
                        this.sleep
                            .insert(Box::pin(tokio::time::sleep_until(deadline))),
                    ),
                    (None, None) => None,
                };
                let passed = passed || sleep.is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if !passed {
                    return Poll::Pending;
                }
                *this.deadline = None;
                *this.sleep = None;
                let err = this
                    .stream
                    .is_none()
                    .then(|| BoxError::from(DEADLINE_PASSED));
                close(
                    this.stream,
                    this.finished,
                    ApiErrorKind::Timeout,
                    DEADLINE_PASSED,
                    err,
                )
            }
            Poll::Ready(None) => close(
                this.stream,
                this.finished,
                ApiErrorKind::Api,
                STREAM_CUT,
                None,
            ),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(err))) => close(
                this.stream,
                this.finished,
                ApiErrorKind::Api,
                STREAM_CUT,
                Some(err),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || (!self.open_stream() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.finished {
            return SizeHint::with_exact(0);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower());
        // A guarded stream may end with an `event: error` of its own.
        if let (Some(upper), false) = (inner.upper(), self.stream.is_some()) {
            hint.set_upper(upper);
        }
        hint
    }
}

impl<B> fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBody")
            .field("inner", &self.inner)
            .field("guarded_stream", &self.stream.is_some())
            .field("deadline", &self.deadline)
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
        type Chunks = futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
        >;
        let inner: StreamBody<Chunks> = StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
        ]));
        let peeked = Replay::peek(Tracked::passthrough(inner), 5).await;
        let body = RetryBody::replay(peeked.into_body());
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");
    }

    #[tokio::test]
    async fn replay_then_error() {
        type Chunks =
            futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>;
        let inner: StreamBody<Chunks> = StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"data"))),
            Err("connection reset".into()),
        ]));
        let mut body = RetryBody::replay(
            Replay::peek(Tracked::passthrough(inner), 1024)
                .await
                .into_body(),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"data"));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "connection reset");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
