//! [`ResponseFuture`] of the [`Metrics`](super::Metrics) service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use pin_project::pin_project;

use super::body::{Finish, MetricsBody};
use super::names;
use super::pacing::PacingDelay;
use super::shared::{Label, Labels, RequestInfo};
use crate::BoxError;
use crate::anthropic::parsed_names;
use crate::fallback::ServedModel;
use crate::rate_limit::QueueWait;

/// Response future of [`Metrics`](super::Metrics): records the response's status, retries,
/// fallback, cache decision and queue wait, and wraps its body to count tokens and latency
/// when the body ends.
#[pin_project]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    /// The requested model.
    requested: Requested,
    /// The request's measurement (`None`: not observed, or answered). Decrements the
    /// in-flight gauge if the future is dropped before the response.
    guard: Option<Finish>,
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("observed", &self.guard.is_some())
            .finish()
    }
}

/// The requested model of an observed request, for an answer that names its served model
/// only in a header.
#[derive(Debug)]
pub(crate) enum Requested {
    /// The request named no model.
    None,
    /// The model is the request's model label (a known model): read from its labels.
    Labelled,
    /// Another model, copied.
    Other(Label),
}

impl<F> ResponseFuture<F> {
    pub(crate) fn passthrough(inner: F) -> Self {
        Self {
            inner,
            requested: Requested::None,
            guard: None,
        }
    }

    pub(crate) fn observed(inner: F, requested: Requested, info: RequestInfo) -> Self {
        Self {
            inner,
            requested,
            guard: Some(Finish::new(info)),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<MetricsBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // One call of the inner poll, whether the span is entered or not: two calls (one
        // under the span, one without) left two answers to join, a copy of the answer more.
        let entered = this.guard.as_ref().map(|finish| finish.span.enter());
        let result = ready!(this.inner.poll(cx));
        drop(entered);
        // The measurement stays in the future until the body takes it (one move of it, not
        // two).
        let Some(finish) = this.guard.as_mut() else {
            return Poll::Ready(
                result
                    .map(|res| res.map(MetricsBody::passthrough))
                    .map_err(Into::into),
            );
        };
        match result {
            Err(error) => {
                let error = error.into();
                if let Some(mut finish) = this.guard.take() {
                    finish.status = None;
                    finish.finish(names::OUTCOME_ERROR);
                }
                Poll::Ready(Err(error))
            }
            Ok(mut response) => {
                observe(this.requested, finish, &response);
                // The response kept whole, its body wrapped in place (not taken apart and
                // rebuilt: each is a move of the head and of the body).
                let mut feed = None;
                if finish.count_usage {
                    let json_limit = finish.shared.json_limit;
                    // Whether the answer is a stream: the tracker a layer below published
                    // knows, else `tracker_in` reads the answer's `content-type` (its
                    // fallback, `false`, is what a missing `content-type` meant here). The
                    // `content-type` was looked up here too before, for this alone (~115
                    // instructions a request).
                    let (f, tracker) = crate::body::tracker_in(&mut response, false, json_limit);
                    feed = f;
                    finish.tracker = Some(tracker);
                }
                let finish = this.guard.take();
                Poll::Ready(Ok(response.map(|body| {
                    MetricsBody::observed(crate::body::Tracked::feeding(body, feed), finish)
                })))
            }
        }
    }
}

/// Records what the response head says and prepares the body's finish.
fn observe<B>(requested: &Requested, finish: &mut Finish, response: &Response<B>) {
    let span = &finish.span;
    let status = response.status();
    finish.status = Some(status);
    finish.outcome = match status.as_u16() {
        429 => names::OUTCOME_RATE_LIMITED,
        529 => names::OUTCOME_OVERLOADED,
        400..=499 => names::OUTCOME_CLIENT_ERROR,
        500.. => names::OUTCOME_SERVER_ERROR,
        _ => names::OUTCOME_SUCCESS,
    };
    finish.count_usage = status.is_success();
    span.record("status", status.as_u16());
    // A key pool below chose the upstream key: the span names that key, not the caller's.
    if let Some(chosen) = response.extensions().get::<crate::key_pool::ChosenKey>() {
        span.record("key", tracing::field::display(chosen.key()));
    }

    // Fallback: the model that served, from the fallback layer's `ServedModel` extension or
    // its `x-tower-claude-model` header.
    let fallen_back = {
        let model = match requested {
            Requested::None => None,
            Requested::Labelled => Some(&*finish.labels.model_label),
            Requested::Other(model) => Some(&**model),
        };
        let served = match response.extensions().get::<ServedModel>() {
            Some(served) => Some((Some(&*served.requested), &*served.served)),
            None => parsed_names::get(response.headers(), &parsed_names::X_TOWER_CLAUDE_MODEL)
                .and_then(|v| v.to_str().ok())
                .map(|served| (model, served)),
        };
        served.and_then(|(requested, served)| {
            span.record("served_model", served);
            // Fallback's names are the catalogue's shared strings: the same one when the
            // requested model served (its address first, then its text).
            let same = requested.is_some_and(|r| std::ptr::eq(r, served) || r == served);
            (!same).then(|| fallback_labels(&finish.shared, requested, served))
        })
    };
    if let Some(labels) = fallen_back {
        finish.labels = labels;
    }
    let shared = &finish.shared;
    let span = &finish.span;

    // Cache decision.
    if let Some(cache) = parsed_names::get(response.headers(), &parsed_names::X_TOWER_CLAUDE_CACHE)
        .and_then(|v| v.to_str().ok())
    {
        let cache = match cache {
            "hit" => "hit",
            "miss" => "miss",
            "bypass" => "bypass",
            _ => names::OTHER,
        };
        span.record("cache", cache);
        if cache == "hit" {
            // A stored answer used no quota: its usage is not counted again.
            finish.count_usage = false;
        }
        shared.handles.cache(cache, |c| c.increment(1));
    }

    // Retries.
    if let Some((attempts, reason)) = super::retries::retries(response.extensions()) {
        span.record("attempts", attempts);
        if attempts > 1 {
            count_retries(attempts, reason);
        }
    }

    // Queue wait: the rate limiter's queue plus pacing.
    let queue = response.extensions().get::<QueueWait>().map(|w| w.0);
    let pacing = response.extensions().get::<PacingDelay>().map(|w| w.0);
    if queue.is_some() || pacing.is_some() {
        let wait = queue.unwrap_or(Duration::ZERO) + pacing.unwrap_or(Duration::ZERO);
        span.record("queue_wait_ms", wait.as_millis() as u64);
        shared
            .handles
            .queue_wait_labelled(&finish.labels.group_label, |h| h.record(wait.as_secs_f64()));
    }
}

/// Counts the retries of a request that took `attempts` attempts. Out of line: a retried
/// request is rare, and the macro's registration code is long (kept out of the poll every
/// answer runs).
#[cold]
#[inline(never)]
fn count_retries(attempts: u32, reason: &'static str) {
    metrics::counter!(names::RETRIES_TOTAL, names::LABEL_REASON => reason)
        .increment(u64::from(attempts - 1));
}

/// Counts a fallback from `requested` to `served` and gives the served model's labels (the
/// request's from then on).
#[cold]
#[inline(never)]
fn fallback_labels(
    shared: &super::shared::Shared,
    requested: Option<&str>,
    served: &str,
) -> std::sync::Arc<Labels> {
    let to = shared.model_label(Some(served));
    let from = shared.model_label(requested);
    shared.handles.fallback(&from, &to, |c| c.increment(1));
    let (group, group_label) = shared.group_of(Some(served));
    std::sync::Arc::new(Labels {
        group,
        group_label,
        model_label: to,
    })
}
