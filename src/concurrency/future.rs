//! [`ResponseFuture`] of the [`Concurrency`](super::Concurrency) service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project::pin_project;
use tower_service::Service;

use super::body::ConcurrencyBody;
use super::limiter::Permit;
use crate::BoxError;
use crate::body::RequestBody;

type AcquireFuture = Pin<Box<dyn Future<Output = Option<Permit>> + Send>>;

/// Response future of [`Concurrency`](super::Concurrency): waits for a permit (when needed),
/// calls the inner service, feeds the response status to the adaptive cap, and hands the
/// permit to the response body.
#[pin_project]
pub struct ResponseFuture<S, F> {
    #[pin]
    state: State<S, F>,
}

#[pin_project(project = StateProj)]
enum State<S, F> {
    /// Boxed: only requests that have to wait pay for the allocation.
    Waiting(Box<Waiting<S>>),
    Calling {
        #[pin]
        fut: F,
        permit: Option<Permit>,
    },
    Passthrough {
        #[pin]
        fut: F,
    },
}

struct Waiting<S> {
    acquire: AcquireFuture,
    service: Option<S>,
    request: Option<Request<RequestBody>>,
    permit: Option<Permit>,
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Waiting(_) => "waiting",
            State::Calling { .. } => "calling",
            State::Passthrough { .. } => "passthrough",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, F> ResponseFuture<S, F> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            state: State::Passthrough { fut },
        }
    }

    pub(crate) fn called(fut: F, permit: Permit) -> Self {
        Self {
            state: State::Calling {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn waiting(
        acquire: AcquireFuture,
        service: S,
        request: Request<RequestBody>,
    ) -> Self {
        Self {
            state: State::Waiting(Box::new(Waiting {
                acquire,
                service: Some(service),
                request: Some(request),
                permit: None,
            })),
        }
    }
}

impl<S, F, E, ResBody> Future for ResponseFuture<S, F>
where
    S: Service<Request<RequestBody>, Future = F, Error = E>,
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<ConcurrencyBody<ResBody>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Waiting(waiting) => {
                    let Waiting {
                        acquire,
                        service,
                        request,
                        permit,
                    } = &mut **waiting;
                    if permit.is_none() {
                        match ready!(acquire.as_mut().poll(cx)) {
                            Some(p) => {
                                tracing::debug!("concurrency: permit granted after waiting");
                                *permit = Some(p);
                            }
                            None => return Poll::Ready(Err("concurrency limiter closed".into())),
                        }
                    }
                    let (Some(svc), Some(req)) = (service.as_mut(), request.take()) else {
                        return Poll::Ready(Err(
                            "concurrency future polled after completion".into()
                        ));
                    };
                    match svc.poll_ready(cx) {
                        Poll::Pending => {
                            *request = Some(req);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(Ok(())) => {}
                    }
                    State::Calling {
                        fut: svc.call(req),
                        permit: permit.take(),
                    }
                }
                StateProj::Calling { fut, permit } => {
                    let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let permit = permit.take();
                    // Only an adaptive cap learns from the status (and reads the clock).
                    if let Some(p) = permit.as_ref().filter(|p| p.limiter().is_adaptive()) {
                        p.limiter()
                            .on_status(resp.status(), tokio::time::Instant::now());
                    }
                    return Poll::Ready(Ok(wrap(resp, permit)));
                }
                StateProj::Passthrough { fut } => {
                    let resp = ready!(fut.poll(cx)).map_err(Into::into)?;
                    return Poll::Ready(Ok(resp.map(|b| ConcurrencyBody::new(b, None))));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

/// The answer with its body holding `permit`; with an adaptive cap, a 2xx event stream's
/// body also watches the answer's [`UsageTracker`](crate::anthropic::UsageTracker) (published
/// here when no layer below did) for a mid-stream error.
fn wrap<B>(resp: Response<B>, permit: Option<Permit>) -> Response<ConcurrencyBody<B>> {
    let adaptive = permit.as_ref().is_some_and(|p| p.limiter().is_adaptive());
    if !(adaptive && resp.status().is_success() && crate::body::is_event_stream(resp.headers())) {
        return resp.map(|b| ConcurrencyBody::new(b, permit));
    }
    let (mut parts, body) = resp.into_parts();
    let (body, tracker) = crate::body::track(&mut parts, body, true, 0);
    Response::from_parts(parts, ConcurrencyBody::watching(body, permit, tracker))
}
