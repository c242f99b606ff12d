//! [`Tracked`]: the body wrapper that feeds an answer's one [`UsageTracker`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::ending::{Ending, ending};
use super::replay::event_stream;
use crate::anthropic::UsageTracker;

/// A response body that feeds the answer's [`UsageTracker`] as it is read (when this layer
/// published it), or passes through untouched (a layer below feeds it).
#[pin_project]
pub(crate) struct Tracked<B> {
    #[pin]
    inner: B,
    /// `None` when a layer below feeds the tracker, or once the body ended.
    tracker: Option<UsageTracker>,
}

impl<B> Tracked<B> {
    /// The body as it is.
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner,
            tracker: None,
        }
    }

    /// The body feeding `tracker` (from [`tracker_in`]; `None`: as it is).
    pub(crate) fn feeding(inner: B, tracker: Option<UsageTracker>) -> Self {
        Self { inner, tracker }
    }

    /// A reference to the inner body.
    pub(crate) fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The inner body.
    pub(crate) fn into_inner(self) -> B {
        self.inner
    }
}

/// The most of a JSON answer the layers that settle from real usage (the rate limiter, the
/// budget layer, metrics by default) copy to read its `usage`; beyond it the usage is unknown.
pub(crate) const MAX_JSON_COPY: usize = 8 * 1024 * 1024;

/// The answer's usage tracker: the one a layer below published, else a new one (an event
/// stream by its `content-type`, else by `stream`) that the returned body feeds, published on
/// `parts`. A JSON body is copied up to the largest `json_limit` any reader asked for: a
/// reader above the publisher raises the limit of the copy (see
/// [`UsageTracker::want_json`]), so that no reader's limit is ignored.
pub(crate) fn track<B>(
    parts: &mut http::response::Parts,
    body: B,
    stream: bool,
    json_limit: usize,
) -> (Tracked<B>, UsageTracker) {
    if let Some(tracker) = parts.extensions.get::<UsageTracker>() {
        tracker.want_json(json_limit);
        return (Tracked::passthrough(body), tracker.clone());
    }
    let sse = event_stream(&parts.headers).unwrap_or(stream);
    let tracker = UsageTracker::new(sse, json_limit);
    parts.extensions.insert(tracker.clone());
    let body = Tracked {
        inner: body,
        tracker: Some(tracker.clone()),
    };
    (body, tracker)
}

/// [`track`] on a response kept whole (its body then wrapped in place with
/// [`Tracked::feeding`], not taken apart and rebuilt): the answer's tracker, and the one the
/// body must feed (`None` when a layer below feeds it).
pub(crate) fn tracker_in<B>(
    response: &mut http::Response<B>,
    stream: bool,
    json_limit: usize,
) -> (Option<UsageTracker>, UsageTracker) {
    if let Some(tracker) = response.extensions().get::<UsageTracker>() {
        tracker.want_json(json_limit);
        return (None, tracker.clone());
    }
    let sse = event_stream(response.headers()).unwrap_or(stream);
    let tracker = UsageTracker::new(sse, json_limit);
    response.extensions_mut().insert(tracker.clone());
    (Some(tracker.clone()), tracker)
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        if let Some(tracker) = this.tracker.as_ref() {
            let data = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref());
            match (ending(&frame, &*inner), data) {
                (Ending::Open, Some(data)) => tracker.feed_bytes(data),
                (Ending::Open, None) => {}
                // The last chunk and the end under one lock of the tracker (a JSON answer
                // is mostly one chunk).
                (end, Some(data)) => {
                    tracker.feed_last(data, end == Ending::Failed);
                    *this.tracker = None;
                }
                (end, None) => {
                    tracker.end(end == Ending::Failed);
                    *this.tracker = None;
                }
            }
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
    use crate::anthropic::BodyState;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn publishes_once_and_reads_json_usage_once() {
        let json = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        let (body, tracker) = track(
            &mut parts,
            Full::new(Bytes::from_static(json.as_bytes())),
            false,
            1024,
        );
        // A layer above gets the same tracker and a body it does not feed.
        let (above, same) = track(&mut parts, body, false, 1024);
        assert!(above.tracker.is_none());
        assert_eq!(tracker.state(), BodyState::Open);
        above.collect().await.unwrap();
        assert_eq!(same.state(), BodyState::Complete);
        assert_eq!(same.usage().unwrap().output_tokens, 4);
        assert!(!same.is_stream());
    }

    /// A reader above the publisher with a larger JSON limit (metrics' `json_limit` over the
    /// rate limiter's 8 MiB) gets the usage of a body between the two limits.
    #[tokio::test]
    async fn the_json_copy_takes_the_largest_limit_any_reader_asked_for() {
        let json = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        let below = Full::new(Bytes::from_static(json.as_bytes()));
        let (body, _) = track(&mut parts, below, false, 10);
        let (above, tracker) = track(&mut parts, body, false, 1024);
        // A smaller wish does not lower the limit.
        let (above, _) = track(&mut parts, above, false, 1);
        above.collect().await.unwrap();
        assert_eq!(tracker.state(), BodyState::Complete);
        assert_eq!(tracker.usage().unwrap().output_tokens, 4);
    }
}
