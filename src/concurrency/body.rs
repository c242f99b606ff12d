//! [`ConcurrencyBody`]: holds the concurrency permit until the response body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::limiter::Permit;
use crate::anthropic::UsageTracker;
use crate::body::{Ending, Tracked, ending};

/// Response body of [`Concurrency`](super::Concurrency): data flows through unchanged; the
/// permit is released when the body reports its end, fails, or is dropped. With an adaptive
/// cap, an SSE stream that fails with `event: error` after its 200 head (the server
/// overloaded mid-stream) shrinks the cap as a 529 would: the body watches the answer's
/// [`UsageTracker`] (published here, the innermost layer, so that the layers above read the
/// same one and the stream is parsed once).
#[pin_project]
pub struct ConcurrencyBody<B> {
    #[pin]
    inner: Tracked<B>,
    permit: Option<Permit>,
    /// The stream's tracker, watched for its `event: error` until one is seen.
    watch: Option<UsageTracker>,
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
        Self {
            inner: Tracked::passthrough(inner),
            permit,
            watch: None,
        }
    }

    /// Like [`new`](Self::new), watching a stream's `tracker` (fed by `inner` or below) for a
    /// mid-stream error.
    pub(crate) fn watching(
        inner: Tracked<B>,
        permit: Option<Permit>,
        tracker: UsageTracker,
    ) -> Self {
        Self {
            inner,
            permit,
            watch: Some(tracker),
        }
    }

    /// Whether the body still holds a concurrency permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// A reference to the inner body.
    pub fn get_ref(&self) -> &B {
        self.inner.get_ref()
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
        // `Some(false)`: the stream carried an `event: error` (one atomic load per frame).
        if this.watch.as_ref().and_then(|t| t.settled_within(0)) == Some(false) {
            *this.watch = None;
            tracing::debug!("concurrency: stream failed mid-way, the adaptive cap shrinks");
            if let Some(p) = this.permit.as_ref() {
                p.limiter().on_stream_error(tokio::time::Instant::now());
            }
        }
        if ending(&frame, &*inner) != Ending::Open {
            *this.permit = None;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, StreamBody};

    use super::super::Aimd;
    use super::super::limiter::Limiter;
    use super::*;

    /// The body watching `stream` cut into chunks of `size`, under a fresh adaptive cap of 16:
    /// the cap after the body was read.
    async fn cap_after(stream: &'static [u8], size: usize) -> usize {
        let aimd = Aimd {
            initial: 16,
            min: 2,
            max: 20,
            decrease: 0.5,
            cooldown: Duration::from_secs(1),
        };
        let limiter = Limiter::new(16, Some(aimd), None);
        let permit = limiter.try_acquire();
        let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = stream
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        let (mut parts, ()) = http::Response::new(()).into_parts();
        let inner = StreamBody::new(futures_util::stream::iter(chunks));
        let (inner, tracker) = crate::body::track(&mut parts, inner, true, 0);
        let body = ConcurrencyBody::watching(inner, permit, tracker);
        body.collect().await.unwrap();
        limiter.limit()
    }

    #[tokio::test]
    async fn finds_the_error_event_however_the_stream_is_chunked() {
        let failed: &[u8] = b"event: ping\ndata: {}\n\nevent: content_block_delta\ndata: {\"text\":\"event: error\"}\n\nevent: error\r\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let clean: &[u8] = b"event: content_block_delta\ndata: {\"text\":\"event: error\"}\n\ndata: event: error\nevent: errors\nxevent: error\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for size in 1..failed.len() {
            assert_eq!(cap_after(failed, size).await, 8, "chunk size {size}");
        }
        for size in 1..clean.len() {
            assert_eq!(cap_after(clean, size).await, 16, "chunk size {size}");
        }
    }
}
