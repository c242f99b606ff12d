//! [`ConcurrencyBody`]: holds the concurrency permit until the response body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::limiter::Permit;
use crate::body::{Ending, ending};

/// Response body of [`Concurrency`](super::Concurrency): data flows through unchanged; the
/// permit is released when the body reports its end, fails, or is dropped. With an adaptive
/// cap, an SSE stream that fails with `event: error` after its 200 head (the server
/// overloaded mid-stream) shrinks the cap as a 529 would.
#[pin_project]
pub struct ConcurrencyBody<B> {
    #[pin]
    inner: B,
    permit: Option<Permit>,
    watch: Option<ErrorWatch>,
}

/// Finds an `event: error` line in an SSE byte stream, however it is chunked.
///
/// Hand-written rather than a [`StreamTracker`](crate::anthropic::StreamTracker): only the
/// first bytes of each line matter here, and the tracker would parse every event's JSON.
#[derive(Debug, Default)]
struct ErrorWatch {
    /// The start of the current line (at most `LINE_PREFIX` bytes).
    line: Vec<u8>,
    /// The current line is longer than any line this looks for.
    long: bool,
    seen: bool,
}

const LINE_PREFIX: usize = 16;

impl ErrorWatch {
    /// Feeds a chunk; `true` the first time an `event: error` line ends.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.seen {
            return false;
        }
        let mut rest = chunk;
        loop {
            let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
            let part = &rest[..end.unwrap_or(rest.len())];
            // Keep only the start of the line; a longer one cannot be `event: error`.
            let room = LINE_PREFIX - self.line.len();
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            self.long |= part.len() > room;
            let Some(end) = end else {
                return false;
            };
            let line = std::mem::take(&mut self.line);
            let long = std::mem::take(&mut self.long);
            if !long && (line == b"event: error" || line == b"event:error") {
                self.seen = true;
                return true;
            }
            rest = &rest[end + 1..];
        }
    }
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
            inner,
            permit,
            watch: None,
        }
    }

    /// Like [`new`](Self::new), watching an SSE stream for a mid-stream error when the cap
    /// is adaptive.
    pub(crate) fn watching(inner: B, permit: Option<Permit>, sse: bool) -> Self {
        let adaptive = permit.as_ref().is_some_and(|p| p.limiter().is_adaptive());
        Self {
            inner,
            permit,
            watch: (sse && adaptive).then(ErrorWatch::default),
        }
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
        if let (Some(watch), Some(Ok(f))) = (this.watch.as_mut(), &frame) {
            if let Some(data) = f.data_ref() {
                if watch.feed(data) {
                    if let Some(p) = this.permit.as_ref() {
                        p.limiter().on_stream_error(tokio::time::Instant::now());
                    }
                }
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
    use super::*;

    #[test]
    fn finds_the_error_event_however_the_stream_is_chunked() {
        let stream = b"event: ping\ndata: {}\n\nevent: content_block_delta\ndata: {\"text\":\"event: error\"}\n\nevent: error\r\ndata: {\"type\":\"error\"}\n\n";
        for size in 1..stream.len() {
            let mut w = ErrorWatch::default();
            let hits: usize = stream.chunks(size).map(|c| usize::from(w.feed(c))).sum();
            assert_eq!(hits, 1, "chunk size {size}");
        }
        let mut w = ErrorWatch::default();
        assert!(!w.feed(b"data: event: error\nevent: errors\nxevent: error\n"));
        assert!(w.feed(b"event:error\n"));
    }
}
