//! [`ResponseFuture`] of the [`Budgeted`](super::Budgeted) service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use pin_project::pin_project;
use tower_service::Service;

use super::body::{BudgetBody, Settle};
use super::{Decision, Refusal, Shared};
use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind, header_names};
use crate::body::{MAX_JSON_COPY, RequestBody, Tracked, track};
use crate::fallback::ServedModel;
use crate::tenant::Tenant;
use crate::tenant::spend::SpendKey;

/// What a metered request carries from its call to its settlement.
pub(crate) struct Admission {
    pub(crate) shared: std::sync::Arc<Shared>,
    pub(crate) tenant: Tenant,
    pub(crate) keys: Vec<SpendKey>,
    pub(crate) model: String,
    pub(crate) stream: bool,
}

/// A reservation held for a request in flight: settled once, with the real cost, or with 0
/// when dropped unsettled (the call failed or the caller went away before the answer).
pub(crate) struct Hold {
    admission: Admission,
    reserved: u64,
    done: bool,
}

impl Hold {
    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }

    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }

    pub(crate) fn finish(&mut self, cost: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let a = &self.admission;
        a.shared
            .settle(&a.tenant, a.keys.clone(), self.reserved, cost);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.finish(0);
    }
}

type Check = Pin<Box<dyn Future<Output = Decision> + Send>>;

/// Response future of [`Budgeted`](super::Budgeted): checks the tenant's budget (a store
/// read, and a wait while its requests in flight fill it), then calls the inner service and
/// wraps the answer's body to settle the real cost; or answers 429.
#[pin_project]
pub struct ResponseFuture<S, F> {
    #[pin]
    state: State<S, F>,
}

#[pin_project(project = StateProj)]
enum State<S, F> {
    Checking {
        check: Check,
        /// The ready service, the request and its admission, boxed: a small future while
        /// the request is in flight.
        waiting: Option<Box<(S, Request<RequestBody>, Admission)>>,
    },
    Called {
        #[pin]
        fut: F,
        hold: Option<Hold>,
    },
    Refused {
        refusal: Option<Refusal>,
    },
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Checking { .. } => "checking",
            State::Called { .. } => "called",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, F> ResponseFuture<S, F> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            state: State::Called { fut, hold: None },
        }
    }

    pub(crate) fn metered(fut: F, admission: Admission, reserved: u64) -> Self {
        Self {
            state: State::Called {
                fut,
                hold: Some(Hold {
                    admission,
                    reserved,
                    done: false,
                }),
            },
        }
    }

    pub(crate) fn checking(
        check: Check,
        service: S,
        req: Request<RequestBody>,
        admission: Admission,
    ) -> Self {
        Self {
            state: State::Checking {
                check,
                waiting: Some(Box::new((service, req, admission))),
            },
        }
    }
}

impl<S, F, B, E> Future for ResponseFuture<S, F>
where
    S: Service<Request<RequestBody>, Future = F, Response = Response<B>, Error = E>,
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = Bytes>,
{
    type Output = Result<Response<BudgetBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            match state.as_mut().project() {
                StateProj::Checking { check, waiting } => {
                    let decision = ready!(check.as_mut().poll(cx));
                    let Some(waiting) = waiting.take() else {
                        return Poll::Ready(Err("budget future polled after completion".into()));
                    };
                    let (mut service, req, admission) = *waiting;
                    match decision {
                        Decision::Admit { reserved } => {
                            let fut = service.call(req);
                            state.set(State::Called {
                                fut,
                                hold: Some(Hold {
                                    admission,
                                    reserved,
                                    done: false,
                                }),
                            });
                        }
                        Decision::Refuse(refusal) => {
                            admission.tenant.stats().record_refusal();
                            tracing::info!(
                                tenant = admission.tenant.name(),
                                retry_after_s = refusal.retry_after,
                                "budget: request refused"
                            );
                            state.set(State::Refused {
                                refusal: Some(refusal),
                            });
                        }
                        // The check loops until it admits or refuses.
                        Decision::Wait => {
                            return Poll::Ready(Err("budget check ended while waiting".into()));
                        }
                    }
                }
                StateProj::Called { fut, hold } => {
                    let result = ready!(fut.poll(cx));
                    let hold = hold.take();
                    return Poll::Ready(match result {
                        // The call failed: no answer, no cost (the hold is released on drop).
                        Err(error) => Err(error.into()),
                        Ok(response) => Ok(match hold {
                            None => response.map(BudgetBody::passthrough),
                            Some(hold) => metered(response, hold),
                        }),
                    });
                }
                StateProj::Refused { refusal } => {
                    let Some(refusal) = refusal.take() else {
                        return Poll::Ready(Err("budget future polled after completion".into()));
                    };
                    return Poll::Ready(Ok(refused(&refusal)));
                }
            }
        }
    }
}

/// The answer with its body wrapped to settle `hold`: from the model that answered and the
/// answer's usage tracker (the one a layer below published, else one published here); an
/// error answer is not billed and reads no usage.
fn metered<B>(response: Response<B>, hold: Hold) -> Response<BudgetBody<B>> {
    let served = response
        .extensions()
        .get::<ServedModel>()
        .map(|s| s.served.to_string())
        .or_else(|| {
            response
                .headers()
                .get(header_names::X_TOWER_CLAUDE_MODEL)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    let model = served.unwrap_or_else(|| hold.admission().model.clone());
    let (mut parts, body) = response.into_parts();
    let (body, tracker) = if parts.status.is_success() {
        let stream = hold.admission().stream;
        let (body, tracker) = track(&mut parts, body, stream, MAX_JSON_COPY);
        (body, Some(tracker))
    } else {
        (Tracked::passthrough(body), None)
    };
    let body = BudgetBody::metered(body, Settle::new(hold, model, tracker));
    Response::from_parts(parts, body)
}

/// The 429 answer of a refusal.
fn refused<B>(refusal: &Refusal) -> Response<BudgetBody<B>> {
    let body = ApiError::new(ApiErrorKind::RateLimit, refusal.message.clone()).to_envelope();
    let mut response = Response::new(BudgetBody::full(body));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header_names::RETRY_AFTER,
        HeaderValue::from(refusal.retry_after),
    );
    if refusal.final_ {
        headers.insert(
            header_names::X_SHOULD_RETRY,
            HeaderValue::from_static("false"),
        );
    }
    response
}
