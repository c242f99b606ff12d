//! Live fan-out of one upstream stream to every caller of a coalesced streaming request.
//!
//! The leader of a streaming flight does not read its upstream body itself: a driver task
//! does (see `service::drive`), pushing each chunk into a [`Live`] buffer that every
//! subscriber — the leader's caller and each follower — reads at its own pace, from the first
//! chunk. A subscriber that leaves does not disturb the others; when the last one leaves, the
//! driver drops the upstream stream (the request is cancelled upstream).
//!
//! Hand-written rather than a `tokio::sync::broadcast` channel: a follower that joins late
//! must get every chunk from the start (a broadcast channel only delivers what is sent after
//! subscribing, and drops what a slow receiver has not read yet), and the driver must learn
//! when the last subscriber is gone.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use crate::BoxError;

/// How the upstream stream ended.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// It reached its end (with trailers, if it had any).
    Complete(Option<HeaderMap>),
    /// Its body failed: every subscriber gets this error after the chunks before it.
    Failed(String),
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    size: usize,
    end: Option<End>,
    /// Subscribers still reading, by id, with the waker of the ones waiting for a chunk.
    readers: HashMap<u64, Option<Waker>>,
    next_id: u64,
}

/// The chunks of one upstream stream so far, shared by its subscribers.
pub(crate) struct Live {
    status: StatusCode,
    headers: HeaderMap,
    state: Mutex<State>,
    /// Signalled when the last subscriber leaves.
    gone: Notify,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Live")
            .field("chunks", &st.chunks.len())
            .field("bytes", &st.size)
            .field("readers", &st.readers.len())
            .field("ended", &st.end.is_some())
            .finish()
    }
}

impl Live {
    /// A new buffer for a response with this head.
    pub(crate) fn new(status: StatusCode, headers: HeaderMap) -> Arc<Self> {
        Arc::new(Self {
            status,
            headers,
            state: Mutex::new(State::default()),
            gone: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single push or assignment: a panic elsewhere cannot leave the
        // state half-updated, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers.
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// A new reader, from the first chunk.
    pub(crate) fn subscribe(self: &Arc<Self>) -> LiveBody {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.readers.insert(id, None);
        LiveBody {
            live: self.clone(),
            id,
            pos: 0,
            finished: false,
        }
    }

    /// Appends a chunk and wakes the readers waiting for one. Returns the bytes so far.
    pub(crate) fn push(&self, data: Bytes) -> usize {
        let mut st = self.lock();
        st.size += data.len();
        st.chunks.push(data);
        wake_all(&mut st);
        st.size
    }

    /// Records how the stream ended and wakes every reader.
    pub(crate) fn finish(&self, end: End) {
        let mut st = self.lock();
        if st.end.is_none() {
            st.end = Some(end);
        }
        wake_all(&mut st);
    }

    /// Ends the stream for good if no subscriber is left: `true` when it did (the driver then
    /// stops). Called with the flights locked, so that no follower joins in between.
    pub(crate) fn close_if_unread(&self) -> bool {
        let mut st = self.lock();
        if !st.readers.is_empty() {
            return false;
        }
        if st.end.is_none() {
            st.end = Some(End::Failed("every caller left the stream".into()));
        }
        true
    }

    /// Resolves once no subscriber is left (at once if none is).
    pub(crate) async fn all_gone(&self) {
        loop {
            // Registered before the check, so that a departure in between is not missed.
            let notified = self.gone.notified();
            if self.lock().readers.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

fn wake_all(st: &mut State) {
    for waker in st.readers.values_mut().filter_map(Option::take) {
        waker.wake();
    }
}

/// One subscriber's view of a [`Live`] stream: every chunk from the first, then its end.
pub(crate) struct LiveBody {
    live: Arc<Live>,
    id: u64,
    pos: usize,
    finished: bool,
}

impl LiveBody {
    /// The shared stream.
    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.live
    }
}

impl fmt::Debug for LiveBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveBody")
            .field("id", &self.id)
            .field("pos", &self.pos)
            .finish()
    }
}

impl Body for LiveBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let mut st = this.live.lock();
        if let Some(chunk) = st.chunks.get(this.pos).cloned() {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match st.end.clone() {
            None => {
                st.readers.insert(this.id, Some(cx.waker().clone()));
                Poll::Pending
            }
            Some(End::Complete(trailers)) => {
                this.finished = true;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Some(End::Failed(message)) => {
                this.finished = true;
                Poll::Ready(Some(Err(message.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for LiveBody {
    fn drop(&mut self) {
        let mut st = self.live.lock();
        st.readers.remove(&self.id);
        if st.readers.is_empty() {
            // `notify_one` keeps a permit when the driver is not waiting yet.
            self.live.gone.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn late_readers_get_every_chunk_and_the_end() {
        let live = Live::new(StatusCode::OK, HeaderMap::new());
        let early = live.subscribe();
        live.push(Bytes::from_static(b"a"));
        let late = live.subscribe();
        live.push(Bytes::from_static(b"b"));
        live.finish(End::Complete(None));
        for body in [early, late] {
            assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
        }
    }

    #[tokio::test]
    async fn a_failure_reaches_every_reader_after_the_chunks() {
        let live = Live::new(StatusCode::OK, HeaderMap::new());
        let mut body = live.subscribe();
        live.push(Bytes::from_static(b"a"));
        live.finish(End::Failed("connection reset".into()));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "connection reset");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn all_gone_resolves_when_the_last_reader_leaves() {
        let live = Live::new(StatusCode::OK, HeaderMap::new());
        let a = live.subscribe();
        let b = live.subscribe();
        let gone = live.all_gone();
        tokio::pin!(gone);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(std::future::Future::poll(gone.as_mut(), &mut cx).is_pending());
        drop(a);
        assert!(std::future::Future::poll(gone.as_mut(), &mut cx).is_pending());
        drop(b);
        gone.await;
    }
}
