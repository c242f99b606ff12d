//! [`BudgetBody`]: settles a request's real cost when its answer's body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::future::Hold;
use crate::anthropic::UsageTracker;
use crate::body::{Ending, Tracked, ending};

/// The answer's reservation and the usage it settles from: when the body ends (or is
/// dropped), the reservation is replaced by the real cost, read from the answer's one
/// [`UsageTracker`] (fed by the [`Tracked`] body below this one, or by a layer further down).
pub(crate) struct Settle {
    hold: Hold,
    model: String,
    /// `None` for an error answer, which is not billed.
    tracker: Option<UsageTracker>,
    done: bool,
}

impl Settle {
    pub(crate) fn new(hold: Hold, model: String, tracker: Option<UsageTracker>) -> Self {
        Self {
            hold,
            model,
            tracker,
            done: false,
        }
    }

    /// Settles once, from what the tracker saw (the body reached its end, or was dropped).
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let admission = self.hold.admission();
        let cost = match &self.tracker {
            // Error answers are not billed.
            None => 0,
            Some(tracker) => match tracker.usage() {
                Some(usage) => {
                    admission.tenant.stats().record_tokens(
                        usage
                            .input_tokens
                            .saturating_add(usage.cache_creation_input_tokens)
                            .saturating_add(usage.cache_read_input_tokens),
                        usage.output_tokens,
                    );
                    admission.shared.prices.cost_micro_usd(&self.model, &usage)
                }
                // A JSON answer whose usage cannot be read (too large, cut): its reservation.
                None => self.hold.reserved(),
            },
        };
        admission.tenant.stats().record_cost_micro_usd(cost);
        self.hold.finish(cost);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        // Dropped before the end: what was seen (a stream's usage so far).
        self.finish();
    }
}

/// Response body of [`Budgeted`](super::Budgeted): the inner body, unchanged and never
/// buffered, whose usage is read as it passes to settle the request's cost; or the JSON of a
/// 429 refusal.
///
/// The usage comes from the answer's [`UsageTracker`]: the one a layer below published
/// (the rate limiter, in [`ClaudeStack`](crate::stack::ClaudeStack)), else one this body
/// feeds and publishes, so that a stream is parsed once however many layers read its usage.
#[pin_project]
pub struct BudgetBody<B> {
    #[pin]
    kind: Kind<B>,
}

#[pin_project(project = KindProj)]
enum Kind<B> {
    Inner {
        #[pin]
        body: Tracked<B>,
        /// Boxed: the body is moved through every layer above, and most answers (every one
        /// without a budget) carry none.
        settle: Option<Box<Settle>>,
    },
    Full {
        data: Option<Bytes>,
    },
}

impl<B> std::fmt::Debug for BudgetBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { settle, .. } if settle.is_some() => "metered",
            Kind::Inner { .. } => "passthrough",
            Kind::Full { .. } => "refusal",
        };
        f.debug_struct("BudgetBody").field("kind", &kind).finish()
    }
}

impl<B> BudgetBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Inner {
                body: Tracked::passthrough(body),
                settle: None,
            },
        }
    }

    /// `body` feeds the settlement's tracker (or a layer below does).
    pub(crate) fn metered(body: Tracked<B>, settle: Settle) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                settle: Some(Box::new(settle)),
            },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full { data: Some(data) },
        }
    }
}

impl<B> Body for BudgetBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { mut body, settle } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                if let Some(s) = settle.as_mut() {
                    if ending(&frame, &*body) != Ending::Open {
                        s.finish();
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
