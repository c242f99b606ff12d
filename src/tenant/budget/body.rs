//! [`BudgetBody`]: settles a request's real cost when its answer's body ends.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::future::Hold;
use crate::anthropic::UsageWatch;

/// The answer's usage reader and its reservation: when the body ends (or is dropped), the
/// reservation is replaced by the real cost.
pub(crate) struct Settle {
    hold: Hold,
    model: String,
    watch: UsageWatch,
    billable: bool,
    done: bool,
}

impl Settle {
    pub(crate) fn new(hold: Hold, model: String, watch: UsageWatch, billable: bool) -> Self {
        Self {
            hold,
            model,
            watch,
            billable,
            done: false,
        }
    }

    /// Settles once. `complete`: the body reached its end.
    fn finish(&mut self, complete: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let admission = self.hold.admission();
        let cost = if !self.billable {
            // Error answers are not billed.
            0
        } else {
            match self.watch.usage(complete) {
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
            }
        };
        admission.tenant.stats().record_cost_micro_usd(cost);
        self.hold.finish(cost);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        // Dropped before the end: what was seen (a stream's usage so far).
        self.finish(false);
    }
}

/// Response body of [`Budgeted`](super::Budgeted): the inner body, unchanged and never
/// buffered, whose usage is read as it passes to settle the request's cost; or the JSON of a
/// 429 refusal.
#[pin_project]
pub struct BudgetBody<B> {
    #[pin]
    kind: Kind<B>,
}

#[pin_project(project = KindProj)]
enum Kind<B> {
    Inner {
        #[pin]
        body: B,
        settle: Option<Settle>,
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
            kind: Kind::Inner { body, settle: None },
        }
    }

    pub(crate) fn metered(body: B, settle: Settle) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                settle: Some(settle),
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
                    match &frame {
                        Some(Ok(f)) => {
                            if let Some(data) = f.data_ref() {
                                s.watch.feed(data);
                            }
                            // hyper stops polling once `is_end_stream()` is true.
                            if body.is_end_stream() {
                                s.finish(true);
                            }
                        }
                        Some(Err(_)) => s.finish(false),
                        None => s.finish(true),
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
