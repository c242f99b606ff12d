//! [`ResponseFuture`] of the [`Pacing`](super::Pacing) service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::PacingDelay;
use crate::BoxError;
use crate::body::RequestBody;

/// Response future of [`Pacing`](super::Pacing): sleeps out the pacing delay (if any), calls
/// the inner service, and adds a [`PacingDelay`] extension to the response.
#[pin_project]
pub struct ResponseFuture<S, F> {
    #[pin]
    state: State<S, F>,
}

#[pin_project(project = StateProj)]
enum State<S, F> {
    /// Boxed: only paced requests pay for the allocation.
    Sleeping(Box<Sleeping<S>>),
    Calling {
        #[pin]
        fut: F,
        delay: Option<Duration>,
    },
}

struct Sleeping<S> {
    sleep: Pin<Box<Sleep>>,
    delay: Duration,
    service: Option<S>,
    request: Option<Request<RequestBody>>,
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Sleeping(_) => "sleeping",
            State::Calling { .. } => "calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, F> ResponseFuture<S, F> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            state: State::Calling { fut, delay: None },
        }
    }

    pub(crate) fn called(fut: F, delay: Duration) -> Self {
        Self {
            state: State::Calling {
                fut,
                delay: Some(delay),
            },
        }
    }

    pub(crate) fn sleeping(delay: Duration, service: S, request: Request<RequestBody>) -> Self {
        Self {
            state: State::Sleeping(Box::new(Sleeping {
                sleep: Box::pin(tokio::time::sleep(delay)),
                delay,
                service: Some(service),
                request: Some(request),
            })),
        }
    }
}

impl<S, B> Future for ResponseFuture<S, S::Future>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Sleeping(sleeping) => {
                    ready!(sleeping.sleep.as_mut().poll(cx));
                    let delay = sleeping.delay;
                    // The service was made ready by the caller's `poll_ready` before `call`.
                    let (Some(mut service), Some(request)) =
                        (sleeping.service.take(), sleeping.request.take())
                    else {
                        return Poll::Ready(Err("pacing future polled after completion".into()));
                    };
                    let fut = service.call(request);
                    self.as_mut().project().state.set(State::Calling {
                        fut,
                        delay: Some(delay),
                    });
                }
                StateProj::Calling { fut, delay } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let delay = *delay;
                    return Poll::Ready(result.map(|mut response| {
                        if let Some(delay) = delay {
                            response.extensions_mut().insert(PacingDelay(delay));
                        }
                        response
                    }));
                }
            }
        }
    }
}
