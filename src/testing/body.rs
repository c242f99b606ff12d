//! [`MockBody`]: the simulator's response body, paced by tokio's clock.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::state::Flight;
use crate::BoxError;

/// The response body of [`MockClaude`](super::MockClaude).
///
/// Error and JSON answers are one chunk; a stream yields its SSE events one by one, each at the
/// instant the latency model gives it (with `tokio::time`, so paused time drives it). An
/// admitted request stays in flight until this body has yielded its last chunk or is dropped.
/// It never fails.
///
/// ```
/// use http_body_util::BodyExt;
/// use tower::ServiceExt;
/// use tower_claude::testing::MockClaude;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let res = MockClaude::builder().build()
///     .oneshot(http::Request::get("/v1/models").body(String::new()).unwrap())
///     .await
///     .unwrap();
/// assert_eq!(res.status(), 404);
/// let body = res.into_body().collect().await.unwrap().to_bytes();
/// assert!(body.starts_with(b"{"));
/// # }
/// ```
pub struct MockBody {
    kind: Kind,
}

enum Kind {
    Full {
        data: Option<Bytes>,
        /// Cumulative output tokens once `data` is sent.
        tokens: u64,
        flight: Option<Flight>,
    },
    Paced(Box<Paced>),
}

/// One timed chunk of a paced body.
pub(crate) struct Chunk {
    pub(crate) at: Instant,
    pub(crate) data: Bytes,
    /// Cumulative output tokens once this chunk is sent.
    pub(crate) tokens: u64,
}

struct Paced {
    chunks: VecDeque<Chunk>,
    sleep: Option<Pin<Box<Sleep>>>,
    flight: Option<Flight>,
}

impl MockBody {
    /// A body of one chunk.
    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data),
                tokens: 0,
                flight: None,
            },
        }
    }

    /// A one-chunk answer of an admitted request.
    pub(crate) fn answer(data: Bytes, tokens: u64, flight: Flight) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data),
                tokens,
                flight: Some(flight),
            },
        }
    }

    /// A paced stream of an admitted request.
    pub(crate) fn paced(chunks: VecDeque<Chunk>, flight: Flight) -> Self {
        Self {
            kind: Kind::Paced(Box::new(Paced {
                chunks,
                sleep: None,
                flight: Some(flight),
            })),
        }
    }
}

impl http_body::Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full {
                data,
                tokens,
                flight,
            } => {
                let Some(data) = data.take() else {
                    return Poll::Ready(None);
                };
                if let Some(mut flight) = flight.take() {
                    flight.sent(*tokens);
                    flight.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Kind::Paced(paced) => {
                let Some(at) = paced.chunks.front().map(|c| c.at) else {
                    if let Some(mut flight) = paced.flight.take() {
                        flight.finish();
                    }
                    return Poll::Ready(None);
                };
                if at > Instant::now() {
                    let sleep = match &mut paced.sleep {
                        Some(sleep) => {
                            if sleep.deadline() != at {
                                sleep.as_mut().reset(at);
                            }
                            sleep
                        }
                        none => none.insert(Box::pin(tokio::time::sleep_until(at))),
                    };
                    ready!(sleep.as_mut().poll(cx));
                }
                let Some(chunk) = paced.chunks.pop_front() else {
                    return Poll::Ready(None);
                };
                if let Some(flight) = &mut paced.flight {
                    flight.sent(chunk.tokens);
                }
                if paced.chunks.is_empty() {
                    if let Some(mut flight) = paced.flight.take() {
                        flight.finish();
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(chunk.data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, .. } => data.is_none(),
            Kind::Paced(paced) => paced.chunks.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            // Streams are sent chunked, like the real API's.
            Kind::Paced(_) => SizeHint::default(),
        }
    }
}

impl fmt::Debug for MockBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full { data, .. } => f
                .debug_struct("MockBody")
                .field("remaining_bytes", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Paced(paced) => f
                .debug_struct("MockBody")
                .field("remaining_chunks", &paced.chunks.len())
                .finish(),
        }
    }
}
