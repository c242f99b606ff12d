use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body::Body;
use pin_project::pin_project;

use super::CacheStatus;
use super::body::CacheBody;
use super::config::Config;
use super::flights::FlightGuard;
use super::service::{Plan, Reading, Stored, mark, store_head, store_read};
use crate::BoxError;
use crate::body::Peek;

type Boxed<B> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, BoxError>> + Send>>;

/// The response future of [`Cache`](super::Cache).
///
/// What [`Cache::call`](super::Cache) settles at once (a hit, a share of a stream in flight,
/// a miss or a bypass whose store lookup needed no I/O while the inner service was ready)
/// runs without an allocation of its own: the inner service's future and what the miss needs
/// to store its answer, then the read of a JSON answer, are states of this future. The other
/// paths (waiting for an identical request in flight, a store that looks up over the network,
/// an inner service that was not ready) are one boxed `async` block.
#[pin_project]
pub struct ResponseFuture<F, B> {
    #[pin]
    state: State<F, B>,
}

/// What a miss needs once its answer's head arrives.
pub(crate) struct Miss {
    pub(crate) config: Arc<Config>,
    pub(crate) plan: Plan,
    pub(crate) guard: Option<FlightGuard>,
}

#[pin_project(project = StateProj)]
enum State<F, B> {
    /// Answered in `call` (taken once).
    Ready { res: Option<Response<CacheBody<B>>> },
    /// Passed through (`bypass`).
    Bypass {
        #[pin]
        fut: F,
    },
    /// A miss sent to the inner service.
    Upstream {
        #[pin]
        fut: F,
        miss: Option<Miss>,
    },
    /// A miss's JSON answer read whole, to store it.
    Reading {
        #[pin]
        peek: Peek<B>,
        reading: Option<(Arc<Config>, Reading)>,
    },
    /// Every other path.
    Boxed { fut: Boxed<B> },
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        Self {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn bypass(fut: F) -> Self {
        Self {
            state: State::Bypass { fut },
        }
    }

    pub(crate) fn upstream(fut: F, miss: Miss) -> Self {
        Self {
            state: State::Upstream {
                fut,
                miss: Some(miss),
            },
        }
    }

    pub(crate) fn boxed(fut: Boxed<B>) -> Self {
        Self {
            state: State::Boxed { fut },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<CacheBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Ready { res } => {
                    let res = res
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    return Poll::Ready(Ok(res));
                }
                StateProj::Bypass { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(mark(res.map(CacheBody::inner), CacheStatus::Bypass)));
                }
                StateProj::Upstream { fut, miss } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let Miss {
                        config,
                        plan,
                        guard,
                    } = miss
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    match store_head(&config, &plan, res, guard) {
                        Stored::Done(res) => {
                            return Poll::Ready(Ok(mark(res, CacheStatus::Miss)));
                        }
                        Stored::Read(peek, reading) => State::Reading {
                            peek,
                            reading: Some((config, reading)),
                        },
                    }
                }
                StateProj::Reading { peek, reading } => {
                    let read = ready!(peek.poll(cx));
                    let (config, reading) = reading
                        .take()
                        .expect("cache ResponseFuture polled after completion");
                    let res = store_read(&config, reading, read);
                    return Poll::Ready(Ok(mark(res, CacheStatus::Miss)));
                }
                StateProj::Boxed { fut } => return fut.as_mut().poll(cx),
            };
            state.set(next);
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "Ready",
            State::Bypass { .. } => "Bypass",
            State::Upstream { .. } => "Upstream",
            State::Reading { .. } => "Reading",
            State::Boxed { .. } => "Boxed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
