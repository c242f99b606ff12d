//! [`Replay`]: a response body that gives back, unchanged, what a layer read ahead of it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::BoxError;

/// A response body that replays what a layer peeked at, then yields the rest of the body.
///
/// Every layer of this crate that must look into an answer before returning it (an error
/// envelope to classify, the start of a stream held back, a JSON answer to store) reads it
/// with [`Replay::peek`], at most a byte cap, and returns [`Peeked::into_body`]: the frames
/// read, byte for byte and frame for frame, then whatever the inner body still has, then its
/// error if reading it failed. A body never peeked at ([`Replay::new`]) is polled in place,
/// without allocation.
///
/// The model is linkerd2-proxy's `ReplayBody`, turned around: linkerd buffers a *request*
/// body so that it can be sent again; here the request is already whole (see
/// [`RequestBody`](super::RequestBody)) and what is replayed is the head of a *response*.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_claude::body::Replay;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_claude::BoxError> {
/// let inner = Full::new(Bytes::from_static(b"{\"type\":\"error\"}"));
/// let peeked = Replay::peek(inner, 64 * 1024).await;
/// assert!(peeked.is_whole());
/// assert_eq!(&peeked.data()[..], b"{\"type\":\"error\"}");
/// // The caller still gets every byte.
/// let body = peeked.into_body().collect().await?.to_bytes();
/// assert_eq!(&body[..], b"{\"type\":\"error\"}");
/// # Ok(())
/// # }
/// ```
#[pin_project]
pub struct Replay<B> {
    /// Frames read ahead, yielded first.
    prefix: Frames,
    /// The error met while reading ahead, yielded after the prefix.
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
    /// Ended (or failed: the error is in `error`).
    Done,
}

impl<B> Replay<B> {
    /// The body as it is, polled in place.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body::Body;
    /// use http_body_util::Full;
    /// use tower_claude::body::Replay;
    ///
    /// let body = Replay::new(Full::new(Bytes::from_static(b"hello")));
    /// assert_eq!(body.size_hint().exact(), Some(5));
    /// ```
    pub fn new(body: B) -> Self {
        Self {
            prefix: Frames::default(),
            error: None,
            rest: Rest::Plain(body),
        }
    }

    /// A body of exactly `data` (no inner body left): an answer a layer wrote itself.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body::Body;
    /// use http_body_util::Full;
    /// use tower_claude::body::Replay;
    ///
    /// let body: Replay<Full<Bytes>> = Replay::from_bytes(Bytes::from_static(b"{}"));
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    pub fn from_bytes(data: Bytes) -> Self {
        Self {
            prefix: if data.is_empty() {
                Frames::Empty
            } else {
                Frames::One(data)
            },
            error: None,
            rest: Rest::Done,
        }
    }

    /// Reads `body` ahead until it ends, fails, or at least `cap` data bytes were read: the
    /// future's [`Peeked`] holds what was read and turns back into the whole body.
    ///
    /// A frame is never split, so up to one frame more than `cap` may be held.
    pub fn peek(body: B, cap: usize) -> Peek<B> {
        Self::peek_until(body, cap, |_| false)
    }

    /// Like [`peek`](Self::peek), and also stops after the data chunk for which `stop`
    /// returns true (it sees every data chunk read, in order).
    ///
    /// ```
    /// use bytes::Bytes;
    /// use futures_util::stream;
    /// use http_body::Frame;
    /// use http_body_util::{BodyExt, StreamBody};
    /// use tower_claude::body::Replay;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_claude::BoxError> {
    /// let chunks = ["event: ping\n\n", "event: content_block_start\n\n", "more"]
    ///     .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes()))));
    /// let inner = StreamBody::new(stream::iter(chunks));
    /// let peeked = Replay::peek_until(inner, 1024, |chunk| chunk.starts_with(b"event: content")).await;
    /// assert!(!peeked.is_whole());
    /// assert_eq!(peeked.data().len(), 13 + 28);
    /// let all = peeked.into_body().collect().await?.to_bytes();
    /// assert!(all.ends_with(b"more"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn peek_until<F>(body: B, cap: usize, stop: F) -> Peek<B, F>
    where
        F: FnMut(&[u8]) -> bool,
    {
        Peek {
            body: Some(Box::pin(body)),
            frames: Frames::default(),
            len: 0,
            cap,
            stop,
        }
    }

    /// Whether frames (or an error) read ahead are still to be yielded.
    pub(crate) fn is_replaying(&self) -> bool {
        !self.prefix.is_empty() || self.error.is_some()
    }

    fn prefix_len(&self) -> u64 {
        self.prefix.data().map(|d| d.remaining() as u64).sum()
    }
}

/// Frames read ahead, in order. One data frame (a JSON answer comes as one) is held as it
/// is: read ahead and replayed without a queue (an allocation and its free per answer
/// peeked at, for retry's read of a JSON answer and the cache's); a queue is made for a
/// second frame, or a first that is not data. 8 bytes more than the queue alone.
#[derive(Default)]
enum Frames {
    #[default]
    Empty,
    One(Bytes),
    Many(VecDeque<Frame<Bytes>>),
}

impl Frames {
    #[inline]
    fn push(&mut self, frame: Frame<Bytes>) {
        match self {
            Self::Many(queue) => queue.push_back(frame),
            Self::Empty => {
                *self = match frame.into_data() {
                    Ok(data) => Self::One(data),
                    Err(frame) => Self::Many(VecDeque::from([frame])),
                }
            }
            Self::One(_) => {
                let Self::One(first) = std::mem::take(self) else {
                    unreachable!("matched One")
                };
                let mut queue = VecDeque::with_capacity(4);
                queue.push_back(Frame::data(first));
                queue.push_back(frame);
                *self = Self::Many(queue);
            }
        }
    }

    #[inline]
    fn pop(&mut self) -> Option<Frame<Bytes>> {
        match self {
            Self::Empty => None,
            Self::One(_) => match std::mem::take(self) {
                Self::One(data) => Some(Frame::data(data)),
                _ => None,
            },
            Self::Many(queue) => queue.pop_front(),
        }
    }

    #[inline]
    fn is_empty(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::One(_) => false,
            Self::Many(queue) => queue.is_empty(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::One(_) => 1,
            Self::Many(queue) => queue.len(),
        }
    }

    /// The data chunks, in order.
    fn data(&self) -> impl Iterator<Item = &Bytes> {
        let (one, many) = match self {
            Self::Empty => (None, None),
            Self::One(data) => (Some(data), None),
            Self::Many(queue) => (None, Some(queue.iter().filter_map(Frame::data_ref))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    fn has_trailers(&self) -> bool {
        match self {
            Self::Many(queue) => queue.iter().any(Frame::is_trailers),
            _ => false,
        }
    }

    /// The data in one buffer: shared, not copied, when it is one chunk.
    #[inline]
    fn into_data(self) -> Bytes {
        match self {
            Self::Empty => Bytes::new(),
            Self::One(data) => data,
            many => many.concat(),
        }
    }

    fn concat(&self) -> Bytes {
        let mut data = self.data();
        let (Some(first), None) = (data.next(), data.next()) else {
            let mut all = BytesMut::new();
            for chunk in self.data() {
                all.extend_from_slice(chunk);
            }
            return all.freeze();
        };
        first.clone()
    }
}

impl<B> Body for Replay<B>
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
        if let Some(frame) = this.prefix.pop() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.error.take() {
            return Poll::Ready(Some(Err(err)));
        }
        let polled = match this.rest.as_mut().project() {
            RestProj::Plain(body) => ready!(body.poll_frame(cx)),
            RestProj::Boxed(body) => ready!(body.as_mut().poll_frame(cx)),
            RestProj::Done => return Poll::Ready(None),
        };
        match polled {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(err)) => {
                this.rest.set(Rest::Done);
                Poll::Ready(Some(Err(err.into())))
            }
            None => {
                this.rest.set(Rest::Done);
                Poll::Ready(None)
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
        let prefix = self.prefix_len();
        let rest = match &self.rest {
            Rest::Plain(b) => b.size_hint(),
            Rest::Boxed(b) => b.size_hint(),
            Rest::Done => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(prefix));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(prefix));
        }
        hint
    }
}

impl<B> fmt::Debug for Replay<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("replayed_bytes", &self.prefix_len())
            .field("pending_error", &self.error.is_some())
            .field("ended", &matches!(self.rest, Rest::Done))
            .finish()
    }
}

/// The future of [`Replay::peek`] and [`Replay::peek_until`]: reads a body ahead.
#[pin_project]
pub struct Peek<B, F = fn(&[u8]) -> bool> {
    /// `None` once the future has completed.
    body: Option<Pin<Box<B>>>,
    frames: Frames,
    /// Data bytes read.
    len: usize,
    cap: usize,
    stop: F,
}

impl<B, F> fmt::Debug for Peek<B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peek")
            .field("read", &self.len)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl<B, F> Future for Peek<B, F>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnMut(&[u8]) -> bool,
{
    type Output = Peeked<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Peeked<B>> {
        let this = self.project();
        let Some(body) = this.body.as_mut() else {
            // Polled after completion: nothing more to give.
            return Poll::Ready(Peeked::done(Frames::default(), None, None));
        };
        // A body's end is asked after each frame (it may end with its last frame, without a
        // poll that returns `None`), not before the first: a body that has ended yields `None`
        // when polled, and a fresh one has not (one call down the chain of bodies saved).
        loop {
            match ready!(body.as_mut().poll_frame(cx)) {
                None => {
                    this.body.take();
                    return Poll::Ready(Peeked::done(std::mem::take(this.frames), None, None));
                }
                Some(Err(err)) => {
                    this.body.take();
                    let frames = std::mem::take(this.frames);
                    return Poll::Ready(Peeked::done(frames, Some(err.into()), None));
                }
                Some(Ok(frame)) => {
                    let mut done = false;
                    if let Some(data) = frame.data_ref() {
                        *this.len = this.len.saturating_add(data.len());
                        done = (this.stop)(data) || *this.len >= *this.cap;
                    }
                    this.frames.push(frame);
                    if done {
                        let frames = std::mem::take(this.frames);
                        return Poll::Ready(Peeked::done(frames, None, this.body.take()));
                    }
                    if body.is_end_stream() {
                        let frames = std::mem::take(this.frames);
                        return Poll::Ready(Peeked::done(frames, None, None));
                    }
                }
            }
        }
    }
}

/// What [`Replay::peek`] read: the frames, the error that ended reading (if any), and the rest
/// of the body (if it did not end).
pub struct Peeked<B> {
    frames: Frames,
    error: Option<BoxError>,
    rest: Option<Pin<Box<B>>>,
}

impl<B> Peeked<B> {
    fn done(frames: Frames, error: Option<BoxError>, rest: Option<Pin<Box<B>>>) -> Self {
        Self {
            frames,
            error,
            rest,
        }
    }

    /// The data read, in one buffer (no copy when it came in one frame).
    pub fn data(&self) -> Bytes {
        self.frames.concat()
    }

    /// The data read, in one buffer, and the rest dropped: for a layer that answers with the
    /// data itself once it read the body whole ([`is_whole`](Self::is_whole)). No copy and
    /// no count of references taken and given back when the data came in one frame.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_claude::body::Replay;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let peeked = Replay::peek(Full::new(Bytes::from_static(b"{}")), 1024).await;
    /// assert!(peeked.is_whole());
    /// assert_eq!(&peeked.into_data()[..], b"{}");
    /// # }
    /// ```
    pub fn into_data(self) -> Bytes {
        self.frames.into_data()
    }

    /// Whether the body ended while it was read, without an error: the data is all of it.
    pub fn is_whole(&self) -> bool {
        self.rest.is_none() && self.error.is_none()
    }

    /// Whether reading the body failed (the error is replayed after the data).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// Whether the body sent trailers while it was read.
    pub fn has_trailers(&self) -> bool {
        self.frames.has_trailers()
    }

    /// The whole body again: the frames read, the error, then the rest.
    pub fn into_body(self) -> Replay<B> {
        Replay {
            prefix: self.frames,
            error: self.error,
            rest: match self.rest {
                Some(body) => Rest::Boxed(body),
                None => Rest::Done,
            },
        }
    }
}

impl<B> fmt::Debug for Peeked<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peeked")
            .field("frames", &self.frames.len())
            .field("failed", &self.error.is_some())
            .field("ended", &self.rest.is_none())
            .finish()
    }
}

/// Whether a response is a server-sent event stream (`content-type: text/event-stream`,
/// leading whitespace allowed): the one check every layer uses.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    event_stream(headers) == Some(true)
}

/// [`is_event_stream`], or `None` when the response has no (readable) `content-type`: a layer
/// then falls back on what the request asked for.
pub(crate) fn event_stream(headers: &HeaderMap) -> Option<bool> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start().starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    type Chunks =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn chunks(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> Chunks {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    #[tokio::test]
    async fn plain_body_passes_through() {
        let body = Replay::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
    }

    #[tokio::test]
    async fn peek_stops_at_the_cap_and_replays_everything() {
        let body = chunks(vec![data("ab"), data("cd"), data("ef")]);
        let peeked = Replay::peek(body, 3).await;
        assert!(!peeked.is_whole());
        assert_eq!(&peeked.data()[..], b"abcd");
        let body = peeked.into_body();
        assert!(!body.is_end_stream());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abcdef");
    }

    #[tokio::test]
    async fn whole_body_keeps_its_exact_size() {
        let peeked = Replay::peek(Full::new(Bytes::from_static(b"xyz")), 1024).await;
        assert!(peeked.is_whole() && !peeked.failed());
        let body = peeked.into_body();
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"xyz");
    }

    #[tokio::test]
    async fn error_is_replayed_after_the_data_once() {
        let body = chunks(vec![data("data"), Err("connection reset".into())]);
        let peeked = Replay::peek(body, 1024).await;
        assert!(peeked.failed() && !peeked.is_whole());
        let mut body = peeked.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"data"));
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "connection reset");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn trailers_are_replayed_in_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        let body = chunks(vec![data("a"), Ok(Frame::trailers(trailers))]);
        let peeked = Replay::peek(body, 1024).await;
        assert!(peeked.has_trailers());
        let collected = peeked.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-t"], "1");
        assert_eq!(&collected.to_bytes()[..], b"a");
    }

    #[tokio::test]
    async fn one_frame_is_held_without_a_queue_and_shared() {
        let source = Bytes::from(vec![b'x'; 600]);
        let peeked = Replay::peek(Full::new(source.clone()), 1024).await;
        assert!(peeked.is_whole());
        assert!(
            matches!(peeked.frames, Frames::One(_)),
            "the one frame is held without a queue"
        );
        assert_eq!(peeked.data().as_ptr(), source.as_ptr());
        assert_eq!(peeked.into_data().as_ptr(), source.as_ptr(), "not copied");
    }

    #[tokio::test]
    async fn frames_after_the_first_keep_their_order() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        // Trailers first (nothing held inline), then data: replayed as they came.
        let body = chunks(vec![Ok(Frame::trailers(trailers.clone())), data("late")]);
        let peeked = Replay::peek(body, 1024).await;
        assert!(peeked.has_trailers());
        assert_eq!(&peeked.data()[..], b"late");
        let mut body = peeked.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.into_data().unwrap(), Bytes::from_static(b"late"));
        assert!(body.frame().await.is_none());
        // Data, trailers, data: the data of several chunks is one buffer.
        let body = chunks(vec![data("ab"), Ok(Frame::trailers(trailers)), data("cd")]);
        let peeked = Replay::peek(body, 1024).await;
        assert_eq!(peeked.into_data(), Bytes::from_static(b"abcd"));
    }

    #[tokio::test]
    async fn an_empty_body_is_whole_and_a_body_ending_with_its_frame_is_not_polled_again() {
        let peeked = Replay::peek(Full::new(Bytes::new()), 16).await;
        assert!(peeked.is_whole() && peeked.data().is_empty());
        assert!(peeked.into_body().is_end_stream());
        // `Full` says it ended once its one frame is taken: read whole without a last poll.
        let peeked = Replay::peek(Full::new(Bytes::from_static(b"abc")), 16).await;
        assert!(peeked.is_whole());
        assert_eq!(peeked.into_data(), Bytes::from_static(b"abc"));
    }

    #[tokio::test]
    async fn from_bytes_is_the_whole_body() {
        let body: Replay<Full<Bytes>> = Replay::from_bytes(Bytes::from_static(b"{}"));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{}");
        let empty: Replay<Full<Bytes>> = Replay::from_bytes(Bytes::new());
        assert!(empty.is_end_stream());
    }

    #[test]
    fn event_stream_check_allows_leading_whitespace() {
        let mut h = HeaderMap::new();
        assert!(!is_event_stream(&h));
        assert_eq!(event_stream(&h), None);
        h.insert(
            CONTENT_TYPE,
            " text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert!(is_event_stream(&h));
        h.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        assert!(!is_event_stream(&h));
    }
}
