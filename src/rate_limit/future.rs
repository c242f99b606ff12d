//! [`ResponseFuture`] of the [`RateLimit`](super::RateLimit) service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use pin_project::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::QueueWait;
use super::body::{PromptNote, RateLimitBody};
use super::config::{Config, Scope};
use crate::BoxError;
use crate::anthropic::RateLimitSnapshot;
use crate::body::{RequestBody, Tracked};
use crate::quota::{Acquire, AcquireError, Reservation};

/// Response future of [`RateLimit`](super::RateLimit): waits for quota (when needed), calls
/// the inner service, then observes the response headers and wraps the body so that the
/// reservation is settled from the real usage.
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
        reservation: Option<Reservation>,
        wait: Duration,
        stream: bool,
        config: Arc<Config>,
        note: Option<PromptNote>,
    },
    Passthrough {
        #[pin]
        fut: F,
    },
    Failed {
        error: Option<AcquireError>,
    },
}

struct Waiting<S> {
    acquire: Acquire,
    service: Option<S>,
    request: Option<Request<RequestBody>>,
    reservation: Option<Reservation>,
    started: Instant,
    stream: bool,
    config: Arc<Config>,
    note: Option<PromptNote>,
}

impl<S> Drop for Waiting<S> {
    fn drop(&mut self) {
        // Quota granted but the request was never sent (the inner service did not become
        // ready before the future was dropped): give everything back.
        if let Some(r) = self.reservation.take() {
            r.refund();
        }
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Waiting(_) => "waiting",
            State::Calling { .. } => "calling",
            State::Passthrough { .. } => "passthrough",
            State::Failed { .. } => "failed",
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

    pub(crate) fn failed(error: AcquireError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }

    pub(crate) fn called(
        fut: F,
        reservation: Reservation,
        wait: Duration,
        stream: bool,
        config: Arc<Config>,
        note: Option<PromptNote>,
    ) -> Self {
        Self {
            state: State::Calling {
                fut,
                reservation: Some(reservation),
                wait,
                stream,
                config,
                note,
            },
        }
    }

    pub(crate) fn waiting(
        acquire: Acquire,
        service: S,
        request: Request<RequestBody>,
        stream: bool,
        config: Arc<Config>,
        note: Option<PromptNote>,
    ) -> Self {
        Self {
            state: State::Waiting(Box::new(Waiting {
                acquire,
                service: Some(service),
                request: Some(request),
                reservation: None,
                started: Instant::now(),
                stream,
                config,
                note,
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
    type Output = Result<Response<RateLimitBody<ResBody>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Waiting(waiting) => {
                    let Waiting {
                        acquire,
                        service,
                        request,
                        reservation,
                        started,
                        stream,
                        config,
                        note,
                    } = &mut **waiting;
                    if reservation.is_none() {
                        match ready!(Pin::new(acquire).poll(cx)) {
                            Ok(r) => {
                                tracing::debug!(
                                    key = %r.key(),
                                    group = %r.group(),
                                    waited_ms = started.elapsed().as_millis() as u64,
                                    "rate limit: admitted after queueing"
                                );
                                *reservation = Some(r);
                            }
                            Err(e) => {
                                tracing::debug!(
                                    waited_ms = started.elapsed().as_millis() as u64,
                                    reason = ?e.kind(),
                                    "rate limit: refused after queueing"
                                );
                                return Poll::Ready(Err(Box::new(e)));
                            }
                        }
                    }
                    let (Some(svc), Some(req)) = (service.as_mut(), request.take()) else {
                        return Poll::Ready(
                            Err("rate limit future polled after completion".into()),
                        );
                    };
                    match svc.poll_ready(cx) {
                        Poll::Pending => {
                            *request = Some(req);
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => {
                            if let Some(r) = reservation.take() {
                                r.refund();
                            }
                            return Poll::Ready(Err(e.into()));
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    let fut = svc.call(req);
                    State::Calling {
                        fut,
                        reservation: reservation.take(),
                        wait: started.elapsed(),
                        stream: *stream,
                        config: config.clone(),
                        note: note.take(),
                    }
                }
                StateProj::Calling {
                    fut,
                    reservation,
                    wait,
                    stream,
                    config,
                    note,
                } => {
                    return match ready!(fut.poll(cx)) {
                        Err(e) => {
                            // Never reached the server (or no answer came back): refund.
                            if let Some(r) = reservation.take() {
                                r.refund();
                            }
                            Poll::Ready(Err(e.into()))
                        }
                        Ok(resp) => Poll::Ready(Ok(on_response(
                            resp,
                            reservation.take(),
                            *wait,
                            *stream,
                            config,
                            note.take(),
                        ))),
                    };
                }
                StateProj::Passthrough { fut } => {
                    return match ready!(fut.poll(cx)) {
                        Err(e) => Poll::Ready(Err(e.into())),
                        Ok(resp) => Poll::Ready(Ok(resp.map(RateLimitBody::passthrough))),
                    };
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(match error.take() {
                        Some(e) => Box::new(e),
                        None => "rate limit future polled after completion".into(),
                    }));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

fn on_response<B>(
    mut resp: Response<B>,
    reservation: Option<Reservation>,
    wait: Duration,
    stream: bool,
    config: &Config,
    note: Option<PromptNote>,
) -> Response<RateLimitBody<B>> {
    // The response is kept whole and its body wrapped in place (taking it apart and
    // rebuilding it moves the head and the body each time).
    let wait = match config.scope {
        Scope::Key => wait,
        // Waited for the tenant's limits, then for the quota below.
        Scope::Tenant => {
            wait + resp
                .extensions()
                .get::<QueueWait>()
                .map_or(Duration::ZERO, |w| w.0)
        }
    };
    // The first response extension written on the way up: the map gets room for the rest.
    if config.scope == Scope::Key {
        crate::exchange::make_room(resp.extensions_mut());
    }
    resp.extensions_mut().insert(QueueWait(wait));
    let Some(reservation) = reservation else {
        return resp.map(RateLimitBody::passthrough);
    };
    let snapshot = RateLimitSnapshot::from_headers(resp.headers());
    let status = resp.status();
    if !status.is_success() {
        // Refund first: the server's snapshot of a refused request does not include it, so
        // observing afterwards caps the refunded level at the server's view.
        if matches!(status.as_u16(), 401 | 403 | 404) {
            // The server does not know the key or the model (which a client may make up):
            // nothing to learn, and nothing to keep.
            reservation.settle_unknown();
        } else {
            let (key, group) = (reservation.key().clone(), reservation.group().clone());
            reservation.settle_rejected();
            if !snapshot.is_empty() && config.scope == Scope::Key {
                config.board.observe(&key, &group, &snapshot);
                resp.extensions_mut().insert(config.board.observed_mark());
            }
        }
        return resp.map(RateLimitBody::passthrough);
    }
    if !snapshot.is_empty() && config.scope == Scope::Key {
        // A success: its headers may also raise levels (upward reconciliation).
        reservation.observe(&snapshot);
        resp.extensions_mut().insert(config.board.observed_mark());
    }
    let (feed, tracker) = crate::body::tracker_in(&mut resp, stream, crate::body::MAX_JSON_COPY);
    resp.map(|body| {
        RateLimitBody::tracking(Tracked::feeding(body, feed), reservation, tracker, note)
    })
}
