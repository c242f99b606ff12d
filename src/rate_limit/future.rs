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
use crate::quota::{Acquire, AcquireError, QuotaBoard, Reservation};

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
        scope: Scope,
        /// The layer's configuration, when the reservation may be another board's (see
        /// [`ResponseFuture::called`]).
        config: Option<Arc<Config>>,
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

    /// The call of a request holding `reservation`. `config`: the layer's, when the
    /// reservation may come from another board than the layer's (an admission from above, a
    /// wait that a Redis outage may have served from its fallback board); `None` for one the
    /// layer took on its own board, which the answer then reads through the reservation.
    pub(crate) fn called(
        fut: F,
        reservation: Reservation,
        wait: Duration,
        stream: bool,
        scope: Scope,
        config: Option<Arc<Config>>,
        note: Option<PromptNote>,
    ) -> Self {
        Self {
            state: State::Calling {
                fut,
                reservation: Some(reservation),
                wait,
                stream,
                scope,
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
                        scope: config.scope,
                        config: Some(config.clone()),
                        note: note.take(),
                    }
                }
                StateProj::Calling {
                    fut,
                    reservation,
                    wait,
                    stream,
                    scope,
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
                            *scope,
                            config.as_deref(),
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
    scope: Scope,
    config: Option<&Config>,
    note: Option<PromptNote>,
) -> Response<RateLimitBody<B>> {
    // The response is kept whole and its body wrapped in place (taking it apart and
    // rebuilding it moves the head and the body each time).
    let wait = match scope {
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
    if scope == Scope::Key {
        crate::exchange::make_room(resp.extensions_mut());
    }
    resp.extensions_mut().insert(QueueWait(wait));
    let Some(reservation) = reservation else {
        return resp.map(RateLimitBody::passthrough);
    };
    // The layer's board: the one the reservation was taken on, unless it may be another's.
    let board = match config {
        Some(config) => &config.board,
        None => reservation.board(),
    };
    let snapshot = RateLimitSnapshot::from_headers(resp.headers());
    let status = resp.status();
    if !status.is_success() {
        let board = board.clone();
        return refused(resp, reservation, scope, board, &snapshot);
    }
    if !snapshot.is_empty() && scope == Scope::Key {
        // A success: its headers may also raise levels (upward reconciliation).
        let mark = board.observed_mark();
        reservation.observe(&snapshot);
        resp.extensions_mut().insert(mark);
    }
    let (feed, tracker) = crate::body::tracker_in(&mut resp, stream, crate::body::MAX_JSON_COPY);
    resp.map(|body| {
        RateLimitBody::tracking(Tracked::feeding(body, feed), reservation, tracker, note)
    })
}

/// The answer of a request the server refused with an error status (settled at once, its
/// headers fed into `board`, the layer's), out of the common path.
#[cold]
#[inline(never)]
fn refused<B>(
    mut resp: Response<B>,
    reservation: Reservation,
    scope: Scope,
    board: QuotaBoard,
    snapshot: &RateLimitSnapshot,
) -> Response<RateLimitBody<B>> {
    // Refund first: the server's snapshot of a refused request does not include it, so
    // observing afterwards caps the refunded level at the server's view.
    if matches!(resp.status().as_u16(), 401 | 403 | 404) {
        // The server does not know the key or the model (which a client may make up):
        // nothing to learn, and nothing to keep.
        reservation.settle_unknown();
    } else {
        let (key, group) = (reservation.key().clone(), reservation.group().clone());
        reservation.settle_rejected();
        if !snapshot.is_empty() && scope == Scope::Key {
            board.observe(&key, &group, snapshot);
            resp.extensions_mut().insert(board.observed_mark());
        }
    }
    resp.map(RateLimitBody::passthrough)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};

    use crate::anthropic::{KeyId, ModelCatalog};
    use crate::body::RequestBody;
    use crate::quota::{Admission, Cost, QuotaBoard};
    use crate::rate_limit::RateLimitLayer;

    const USAGE: &[u8] = br#"{"type":"message","usage":{"input_tokens":3,"cache_creation_input_tokens":5,"output_tokens":1}}"#;

    /// An answer is booked as the layer's (the mark of its board, the prompt-cache usage in
    /// its board's memory, a refusal's headers on its board), whether the layer took the
    /// reservation itself (then read through the reservation) or it was admitted from another
    /// board above.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_answer_is_booked_on_the_layers_board() {
        let key = KeyId::from_api_key("sk-ant-test");
        let group = ModelCatalog::default()
            .entry("claude-haiku-4-5")
            .group()
            .clone();
        for status in [200u16, 429] {
            for admitted in [false, true] {
                let upstream =
                    tower::service_fn(move |_req: http::Request<RequestBody>| async move {
                        let resp = http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .header("anthropic-ratelimit-requests-limit", "50")
                            .header("anthropic-ratelimit-requests-remaining", "49")
                            .header("anthropic-ratelimit-requests-reset", "2030-01-01T00:00:00Z")
                            .body(Full::new(Bytes::from_static(USAGE)))
                            .unwrap();
                        Ok::<_, crate::BoxError>(resp)
                    });
                let board = QuotaBoard::new();
                let other = QuotaBoard::new();
                let svc = RateLimitLayer::new().board(board.clone()).layer(upstream);
                let mut req = http::Request::post("/v1/messages")
                    .header("x-api-key", "sk-ant-test")
                    .header("content-type", "application/json")
                    .body(RequestBody::from(
                        r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
                    ))
                    .unwrap();
                if admitted {
                    let reservation = other.try_acquire(&key, &group, Cost::new(1, 0, 0)).unwrap();
                    req.extensions_mut()
                        .insert(Admission::new(reservation, std::time::Duration::ZERO));
                }
                let resp = svc.oneshot(req).await.unwrap();
                let case = format!("status {status}, admitted {admitted}");
                assert!(board.already_observed(resp.extensions()), "{case}");
                assert!(!other.already_observed(resp.extensions()), "{case}");
                resp.into_body().collect().await.unwrap();
                // A success's headers go through the reservation (to the board it was taken
                // on); a refusal's to the layer's board.
                let fed = match (status, admitted) {
                    (200, true) => &other,
                    _ => &board,
                };
                assert_eq!(
                    fed.headroom(&key, &group)
                        .and_then(|h| h.requests)
                        .map(|r| r.limit),
                    Some(50),
                    "{case}: the headers reached the board"
                );
                if status == 200 {
                    let usage = board.prompt_cache().usage(&key, &group);
                    assert!(usage.is_some(), "{case}: usage on the layer's memory");
                    assert!(other.prompt_cache().usage(&key, &group).is_none(), "{case}");
                }
            }
        }
    }
}
