//! [`MetricsBody`]: counts tokens and ends the request's measurement when the body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;
use tokio::time::Instant;

use super::names;
use super::shared::{Labels, RequestInfo, Shared};
use crate::BoxError;
use crate::anthropic::{BodyState, Usage, UsageTracker};
use crate::body::{Ending, Tracked, ending};

/// The response body of [`Metrics`](super::Metrics): forwards every frame unchanged and as it
/// comes (streams are never buffered); the token usage comes from the answer's
/// [`UsageTracker`] (a layer below feeds it, or this body does: a copy of a JSON body up to a
/// limit, or an SSE tracker). When the body ends, errors or is dropped, the request is counted
/// with its outcome, latency and tokens.
#[pin_project]
pub struct MetricsBody<B> {
    #[pin]
    inner: Tracked<B>,
    finish: Option<Finish>,
}

impl<B> std::fmt::Debug for MetricsBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsBody")
            .field("observed", &self.finish.is_some())
            .finish()
    }
}

impl<B> MetricsBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner: Tracked::passthrough(inner),
            finish: None,
        }
    }

    /// The body of an observed answer: `finish` is the request's measurement, taken from
    /// the response future as it is (an `Option`, not unwrapped and wrapped again: a move of
    /// the measurement less).
    pub(crate) fn observed(inner: Tracked<B>, finish: Option<Finish>) -> Self {
        Self { inner, finish }
    }
}

impl<B> Body for MetricsBody<B>
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
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        let end = ending(&frame, &*inner);
        if end != Ending::Open {
            if let Some(mut finish) = this.finish.take() {
                if end == Ending::Failed {
                    finish.outcome = names::OUTCOME_STREAM_ERROR;
                }
                finish.end();
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The end of one request's measurement; dropping it unfinished counts the request as
/// cancelled.
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) shared: Arc<Shared>,
    start: Instant,
    /// The request's model and group labels (the served model's after a fallback).
    pub(crate) labels: Arc<Labels>,
    /// The answer's status (`None`: no answer, the label is [`names::STATUS_NONE`]).
    pub(crate) status: Option<http::StatusCode>,
    pub(crate) outcome: &'static str,
    pub(crate) count_usage: bool,
    /// The answer's usage (when its usage counts).
    pub(crate) tracker: Option<UsageTracker>,
    pub(crate) span: tracing::Span,
    done: bool,
}

impl Finish {
    pub(crate) fn new(info: RequestInfo) -> Self {
        Self {
            shared: info.shared,
            start: info.start,
            labels: info.labels,
            status: None,
            outcome: names::OUTCOME_CANCELLED,
            count_usage: false,
            tracker: None,
            span: info.span,
            done: false,
        }
    }

    /// The body ended: settle the outcome from what the body said.
    fn end(mut self) {
        let mut usage = None;
        if let (true, Some(tracker)) = (self.count_usage, self.tracker.take()) {
            if tracker.is_stream() && tracker.state() != BodyState::Complete {
                self.outcome = names::OUTCOME_STREAM_ERROR;
            }
            usage = tracker.usage();
        }
        self.record(usage);
    }

    /// Ends with `outcome` (no body).
    pub(crate) fn finish(mut self, outcome: &'static str) {
        self.outcome = outcome;
        self.record(None);
    }

    fn record(&mut self, usage: Option<Usage>) {
        if self.done {
            return;
        }
        self.done = true;
        // One clock read for the latency and the quota refresh.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        // The in-flight gauge, the request's series and its tokens from one look at the
        // handle cache.
        self.shared.handles.finished_labelled(
            &self.labels.model_label,
            &self.labels.group_label,
            self.status,
            self.outcome,
            |series| {
                series.requests.increment(1);
                series.duration.record(elapsed.as_secs_f64());
            },
            usage.map(|usage| {
                move |series: &super::handles::TokenSeries| {
                    series.input.increment(usage.counted_input_tokens());
                    series.output.increment(usage.output_tokens);
                }
            }),
        );
        if let (Some(usage), Some(forecaster), Some(group)) =
            (usage, &self.shared.forecaster, &self.labels.group)
        {
            forecaster.record(group, 0, 0, usage.output_tokens);
        }
        let _entered = self.span.enter();
        event_out_of_line!(
            tracing::Level::DEBUG,
            outcome = self.outcome,
            elapsed_ms = elapsed.as_millis() as u64,
            input_tokens = usage.map(|u| u.counted_input_tokens()),
            output_tokens = usage.map(|u| u.output_tokens),
            "request finished"
        );
        drop(_entered);
        self.shared.maybe_refresh(now);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before the end: the caller went away. An error status keeps its outcome
            // (its body is rarely read); streams count the tokens they used.
            let usage = self
                .tracker
                .as_ref()
                .filter(|t| self.count_usage && t.is_stream())
                .and_then(UsageTracker::usage);
            if self.status.is_none() || self.outcome == names::OUTCOME_SUCCESS {
                self.outcome = names::OUTCOME_CANCELLED;
            }
            self.record(usage);
        }
    }
}
