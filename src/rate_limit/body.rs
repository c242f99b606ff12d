//! [`RateLimitBody`]: the response body wrapper that settles a reservation from real usage.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use crate::anthropic::{Usage, UsageTracker};
use crate::body::{Ending, Tracked, ending};
use crate::quota::{Cost, PromptCacheEstimate, PromptCacheMemory, Reservation};

/// What a request's settlement does with the prompt cache: counts cache reads toward the
/// limit for the models where they count, adds the cache tokens to the board's totals and,
/// when the server used its cache, remembers the request's prefixes.
///
/// Small (three words), carried inline: the estimate, made only for a request with prompt-cache
/// breakpoints, is boxed, so that a request without any allocates nothing for its note.
#[derive(Debug, Clone)]
pub(crate) struct PromptNote {
    /// The prompt-cache memory of the board the estimate was made on; `None` when that is
    /// the reservation's own board (a reservation the limiter took itself: no handle of its
    /// own to clone and drop per request).
    pub(crate) memory: Option<PromptCacheMemory>,
    pub(crate) estimate: Option<Box<PromptCacheEstimate>>,
    /// The model counts `cache_read_input_tokens` toward its input limit.
    pub(crate) reads_count: bool,
}

impl PromptNote {
    /// The input tokens that count for `usage`.
    fn counted(&self, usage: &Usage) -> u64 {
        let counted = usage.counted_input_tokens();
        if self.reads_count {
            counted.saturating_add(usage.cache_read_input_tokens)
        } else {
            counted
        }
    }

    fn after(&self, reservation: &Reservation, usage: &Usage) {
        let expected = self
            .estimate
            .as_deref()
            .map_or(0, PromptCacheEstimate::expected_read_tokens);
        let memory = match &self.memory {
            Some(memory) => memory,
            None => reservation.board().prompt_cache(),
        };
        memory.record_usage(reservation.key(), reservation.group(), usage, expected);
        if let Some(estimate) = &self.estimate {
            // The server cached (or read) the prefixes: remember them for their TTL. Prefixes
            // below the model's minimum cacheable length show no cache tokens and are not
            // remembered.
            if usage.cache_creation_input_tokens > 0 || usage.cache_read_input_tokens > 0 {
                memory.remember(estimate);
            }
            if expected > usage.cache_read_input_tokens {
                tracing::debug!(
                    key = %reservation.key(),
                    group = %reservation.group(),
                    expected_read = expected,
                    read = usage.cache_read_input_tokens,
                    "prompt cache: fewer tokens read than expected (settled from the usage)"
                );
            }
        }
    }
}

/// Response body of [`RateLimit`](super::RateLimit).
///
/// Data flows through unchanged. For an admitted request it reads the usage from the
/// answer's [`UsageTracker`] (publishing it when no layer below did):
/// * JSON: the body is copied as it passes (up to 8 MiB) and read with
///   [`Usage::from_json`] at the end;
/// * SSE: a [`StreamTracker`](crate::anthropic::StreamTracker) follows `message_start` / `message_delta`.
///
/// When the body ends, the reservation is settled once with the real cost (1 request,
/// `input_tokens + cache_creation_input_tokens`, plus `cache_read_input_tokens` for the models
/// whose cache reads count, `output_tokens`); the cache tokens go to the board's
/// [`PromptCacheMemory`] totals, and the request's prompt-cache prefixes are remembered when
/// the server used its cache. A body dropped early
/// settles with what was seen (a stream: the usage so far, with the reserved input when
/// `message_start` was not seen; a JSON body: the reservation is kept as reserved).
#[pin_project]
pub struct RateLimitBody<B> {
    #[pin]
    inner: Tracked<B>,
    /// Boxed: a reservation and its prompt-cache note are a few hundred bytes, and the body
    /// is moved through every layer above (a tenant limit's pass-through body carries none).
    settler: Option<Box<Settler>>,
}

impl<B> std::fmt::Debug for RateLimitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitBody")
            .field("tracking", &self.settler.is_some())
            .finish()
    }
}

impl<B> RateLimitBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            inner: Tracked::passthrough(inner),
            settler: None,
        }
    }

    /// `inner` feeds `tracker` (or a layer below does); the reservation settles from it.
    pub(crate) fn tracking(
        inner: Tracked<B>,
        reservation: Reservation,
        tracker: UsageTracker,
        note: Option<PromptNote>,
    ) -> Self {
        Self {
            inner,
            settler: Some(Box::new(Settler {
                reservation: Some(reservation),
                tracker,
                note,
            })),
        }
    }

    /// A reference to the inner body.
    pub fn get_ref(&self) -> &B {
        self.inner.get_ref()
    }

    /// Consumes `self`, returning the inner body. The reservation is settled with what was
    /// seen so far.
    pub fn into_inner(self) -> B {
        self.inner.into_inner()
    }
}

struct Settler {
    reservation: Option<Reservation>,
    tracker: UsageTracker,
    note: Option<PromptNote>,
}

impl Settler {
    /// Settles once, from what the tracker saw (the body reached its end, or was dropped).
    /// The reservation is settled where it is (not moved out: see
    /// [`Reservation::settle_in_place`]) and dropped with the settler.
    fn finish(&mut self) {
        let Some(reservation) = self.reservation.as_mut().filter(|r| !r.is_finished()) else {
            return;
        };
        let reserved = reservation.charged();
        let note = self.note.take();
        let counted = |u: &Usage| match &note {
            Some(n) => n.counted(u),
            None => u.counted_input_tokens(),
        };
        let sse = self.tracker.is_stream();
        match self.tracker.usage() {
            // A JSON document that parses is complete, whether or not the end was polled.
            Some(u) if !sse => {
                if let Some(n) = &note {
                    n.after(reservation, &u);
                }
                reservation.settle_in_place(Cost::new(1, counted(&u), u.output_tokens))
            }
            // Answered, real cost unknown: keep the reservation.
            None => reservation.keep_in_place(),
            Some(u) => {
                let input = if u == Usage::default() {
                    reserved.input_tokens
                } else {
                    if let Some(n) = &note {
                        n.after(reservation, &u);
                    }
                    counted(&u)
                };
                reservation.settle_in_place(Cost::new(1, input, u.output_tokens));
            }
        }
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B> Body for RateLimitBody<B>
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
        if let Some(settler) = this.settler.as_mut() {
            if ending(&frame, &*inner) != Ending::Open {
                settler.finish();
            }
        }
        if frame.is_none() {
            *this.settler = None;
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
