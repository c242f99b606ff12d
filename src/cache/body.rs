//! The response body of [`Cache`](super::Cache).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use pin_project::pin_project;

use super::config::{Config, keep};
use super::key::CacheKey;
use super::live::LiveBody;
use super::store::{CachedResponse, KeptHeaders};
use crate::BoxError;
use crate::anthropic::UsageTracker;
use crate::body::{Replay, Tracked};

/// The response body of [`Cache`](super::Cache): a stored body (hit), the inner body passed
/// through (bypass, or a response that is not stored), the inner body watched by a tee that
/// records a streaming response as it is forwarded (miss), or one reader of a stream shared
/// by concurrent identical streaming requests (see the module docs, *Coalescing*).
///
/// The tee never holds chunks back: each one is forwarded as soon as the inner body yields
/// it. At `message_stop` the recorded stream is handed to the write-behind queue (a caller
/// that drops the body after `message_stop` does not prevent the store). A stream that
/// fails, carries an `event: error`, is dropped before `message_stop`, is not a well-formed
/// Messages API stream, or outgrows the entry size cap is not stored.
#[pin_project]
pub struct CacheBody<B> {
    #[pin]
    kind: Kind<B>,
}

#[pin_project(project = KindProj)]
enum Kind<B> {
    Full {
        data: Option<Bytes>,
    },
    Inner {
        #[pin]
        body: B,
    },
    Tee {
        #[pin]
        body: Tracked<B>,
        tee: Box<Tee>,
    },
    /// A JSON answer read ahead and not stored (too large, cut, or with trailers).
    Replay {
        #[pin]
        body: Replay<B>,
    },
    Live {
        body: LiveBody,
    },
}

impl<B> CacheBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn live(body: LiveBody) -> Self {
        Self {
            kind: Kind::Live { body },
        }
    }

    pub(crate) fn tee(body: Tracked<B>, tee: Tee) -> Self {
        Self {
            kind: Kind::Tee {
                body,
                tee: Box::new(tee),
            },
        }
    }

    /// A body read ahead ([`Replay::peek`]), replayed whole.
    pub(crate) fn replay(body: Replay<B>) -> Self {
        Self {
            kind: Kind::Replay { body },
        }
    }
}

impl<B> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Full { .. } => "Full",
            Kind::Inner { .. } => "Inner",
            Kind::Tee { .. } => "Tee",
            Kind::Replay { .. } => "Replay",
            Kind::Live { .. } => "Live",
        };
        f.debug_struct("CacheBody").field("kind", &kind).finish()
    }
}

impl<B> Body for CacheBody<B>
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
        match self.project().kind.project() {
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Tee { body, tee } => tee.poll(body, cx),
            KindProj::Replay { body } => body.poll_frame(cx),
            KindProj::Live { body } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data } => data.is_none(),
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Tee { body, .. } => body.is_end_stream(),
            Kind::Replay { body } => body.is_end_stream(),
            Kind::Live { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body } => body.size_hint(),
            Kind::Tee { body, .. } => body.size_hint(),
            Kind::Replay { body } => body.size_hint(),
            Kind::Live { .. } => SizeHint::default(),
        }
    }
}

/// Records a streaming response while it is forwarded.
pub(crate) struct Tee {
    config: Arc<Config>,
    key: CacheKey,
    status: StatusCode,
    /// The answer's kept headers (taken when the entry is built).
    kept: Option<KeptHeaders>,
    /// The model that produced the stream.
    model: Option<Arc<str>>,
    /// The answer's usage tracker: says when `message_stop` (or an `event: error`) arrived.
    tracker: UsageTracker,
    chunks: Vec<Bytes>,
    size: usize,
    /// Stored (queued), or abandoned (not storable).
    done: bool,
}

impl Tee {
    pub(crate) fn new(
        config: Arc<Config>,
        key: CacheKey,
        status: StatusCode,
        kept: KeptHeaders,
        model: Option<Arc<str>>,
        tracker: UsageTracker,
    ) -> Self {
        Self {
            config,
            key,
            status,
            kept: Some(kept),
            model,
            tracker,
            chunks: Vec::new(),
            size: 0,
            done: false,
        }
    }

    fn poll<B>(
        &mut self,
        body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        match ready!(body.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.record(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.abandon();
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                if !self.done {
                    self.check();
                    // The stream ended without `message_stop`.
                    self.abandon();
                }
                Poll::Ready(None)
            }
        }
    }

    fn record(&mut self, data: &Bytes) {
        if self.done {
            return;
        }
        self.size += data.len();
        if self.size > self.config.max_entry_bytes {
            self.abandon();
            return;
        }
        self.chunks.push(data.clone());
        self.check();
    }

    /// Queues the entry for storing once the stream is complete — `message_stop` is among
    /// the bytes recorded (a layer below may have read further ahead) — and abandons it on an
    /// `event: error`.
    fn check(&mut self) {
        match self.tracker.settled_within(self.size as u64) {
            None => {}
            Some(false) => self.abandon(),
            Some(true) => self.store(),
        }
    }

    /// Queues the recorded stream for storing.
    fn store(&mut self) {
        self.done = true;
        let Some(kept) = self.kept.take() else {
            return;
        };
        let mut body = Vec::with_capacity(self.size);
        for c in self.chunks.drain(..) {
            body.extend_from_slice(&c);
        }
        let entry = CachedResponse::from_kept(self.status, kept, body.into(), true)
            .with_shared_model(self.model.take());
        keep(&self.config, self.key, &entry);
    }

    fn abandon(&mut self) {
        self.chunks = Vec::new();
        self.done = true;
    }
}
