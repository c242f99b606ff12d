//! The [`ResponseFuture`] of [`Retry`](super::Retry) and the retry loop it drives.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::backoff::{BackoffState, Need, next_delay};
use super::body::STREAM_CUT;
use super::layer::Shared;
use super::pacing::{QuotaKey, Slot};
use super::policy::{
    Action, Attempt, StatusVerdict, is_permanent, is_rate_limit, is_spend_cap, needs_body,
};
use super::resend::Resend;
use super::{RetryBody, RetryError, RetryErrorKind, RetryInfo, RetryOutcome};
use crate::BoxError;
use crate::anthropic::{
    ApiError, ApiErrorKind, BodyState, ModelCatalog, RateLimitGroup, RequestMeta, UsageTracker,
    is_typed_object, parsed_names, request_id,
};
use crate::body::{
    ErrorAnswer, Peeked, Replay, RequestBody, RequestTemplate, Tracked, is_event_stream,
    read_error_answer, track,
};

type BoxedRun<B> = Pin<Box<dyn Future<Output = Result<Response<RetryBody<B>>, BoxError>> + Send>>;

/// The response future of [`Retry`](super::Retry).
///
/// Requests the layer does not apply to (anything but `POST /v1/messages`, or a body that
/// cannot be read) are polled in place, without allocation. A Messages API call is boxed once
/// (next to an HTTP round trip): its first attempt is awaited by a small hand-written future
/// (`First`: the call, then the read of a 2xx JSON answer when the request has a deadline),
/// and most answers end there. Only an answer that asks for more (an error status, an event
/// stream, a failure) starts the retry loop, one boxed `async` block: the loop alternates
/// between six kinds of waiting (a pacing slot, inner readiness, the call, reading an error
/// body, holding back a stream, sleeping) and carries the request template, the backoff state
/// and the last outcome across them, which a hand-written state machine would spread over as
/// many states with the same fields. The loop's state is the largest of all its waits (over
/// 2 KB): built and moved into its box for every request, it cost more than the work of a
/// request answered at once.
#[pin_project]
pub struct ResponseFuture<F, B> {
    #[pin]
    kind: Kind<F, B>,
}

#[pin_project(project = KindProj)]
enum Kind<F, B> {
    Passthrough(#[pin] F),
    Retrying(BoxedRun<B>),
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough(_) => "passthrough",
            Kind::Retrying(_) => "retrying",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough(future),
        }
    }

    /// The retry loop of a request whose first attempt's call (`call`, made by the service
    /// `poll_ready` readied) is in flight, awaited under `deadline` (reading a 2xx JSON answer
    /// up to `read` bytes, when set); `attempts` is the request's state (its shared state
    /// gives the service of the attempts after it: the spare, see [`Spare`](super::Spare)).
    ///
    /// The future's box is allocated first and its value written into it (a value built
    /// beside it, ~700 bytes, was copied in), with the state built where it stays.
    #[inline(always)]
    pub(crate) fn first<S>(
        call: F,
        deadline: Option<Instant>,
        read: Option<usize>,
        attempts: impl FnOnce() -> Attempts,
    ) -> Self
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Future = F>
            + Clone
            + Send
            + 'static,
        S::Error: Into<BoxError>,
        F: Future<Output = Result<Response<B>, S::Error>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut first = Box::new(First::<S, F, B>::Unset);
        *first = First::Attempt {
            attempt: within(deadline, FirstCall::new(call, read)),
            ctx: Some(attempts()),
            rng: None,
            service: PhantomData,
        };
        let run: BoxedRun<B> = Box::into_pin(first);
        Self {
            kind: Kind::Retrying(run),
        }
    }

    /// The retry loop of a request that waits for a pacing slot before its first attempt
    /// (the loop sends it). Out of line: only
    /// requests on a quota that answered 429 get here.
    #[cold]
    #[inline(never)]
    pub(crate) fn paced<S>(attempts: Attempts) -> Self
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Future = F>
            + Clone
            + Send
            + 'static,
        S::Error: Into<BoxError>,
        F: Future<Output = Result<Response<B>, S::Error>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: Kind::Retrying(Box::pin(run::<S, B>(None, attempts, None))),
        }
    }
}

/// The first attempt of a Messages API call (see [`ResponseFuture`]): the call made by
/// [`Retry::call`](super::Retry), awaited under the request's deadline, and the answer judged
/// as the loop judges it. A final answer is returned from here; anything else starts the
/// loop ([`run`]) from this attempt's outcome, or with the answer to inspect.
// The whole future is boxed (`ResponseFuture`), the loop in it boxed again: the size
// difference is the point.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = FirstProj)]
enum First<S, F, B> {
    Attempt {
        #[pin]
        attempt: Within<FirstCall<F, B>>,
        ctx: Option<Attempts>,
        /// Forked from the layer's generator at the first poll, as the loop does.
        rng: Option<fastrand::Rng>,
        /// The service the loop's later attempts go to (a clone of the spare).
        service: PhantomData<fn() -> S>,
    },
    Loop(BoxedRun<B>),
    /// Only between the allocation of the box and its first value (see
    /// [`ResponseFuture::first`]).
    Unset,
}

impl<S, F, B> Future for First<S, F, B>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Future = F> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<B>, S::Error>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<RetryBody<B>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = match self.as_mut().project() {
            FirstProj::Loop(run) => return run.as_mut().poll(cx),
            FirstProj::Unset => {
                return Poll::Ready(Err("retry future polled before it was set".into()));
            }
            FirstProj::Attempt {
                attempt, ctx, rng, ..
            } => {
                let Some(attempts) = ctx.as_ref() else {
                    return Poll::Ready(Err("retry future polled after completion".into()));
                };
                if rng.is_none() {
                    // What the loop does first: the request's jitter generator and its
                    // deposit into the budget.
                    *rng = Some(attempts.shared.fork_rng());
                    if let Some(budget) = &attempts.shared.config.budget {
                        budget.deposit();
                    }
                }
                let answered = ready!(attempt.poll(cx));
                let start = match answered {
                    None => {
                        return Poll::Ready(Err(deadline_passed(
                            attempts,
                            1,
                            Duration::ZERO,
                            &None,
                        )));
                    }
                    // Most answers: the loop's `Outcome::Final` with a success, finished in
                    // place (the answer is moved as little as it can be).
                    Some(Judged::Final(mut response)) => {
                        let info = success_info(attempts, 1, Duration::ZERO, None, None);
                        response.extensions_mut().insert(info);
                        response.body_mut().set_deadline(attempts.deadline);
                        // Done: a later poll is answered with an error, not polled into the
                        // finished call.
                        *ctx = None;
                        return Poll::Ready(Ok(response));
                    }
                    Some(Judged::Other(start)) => *start,
                };
                let Some(attempts) = ctx.take() else {
                    return Poll::Ready(Err("retry future polled after completion".into()));
                };
                start_loop::<S, B>(start, attempts, rng.take())
            }
        };
        self.set(First::Loop(start));
        match self.project() {
            FirstProj::Loop(run) => run.as_mut().poll(cx),
            FirstProj::Attempt { .. } | FirstProj::Unset => Poll::Pending,
        }
    }
}

/// The retry loop from the first attempt's `start`, boxed: built out of line, so that the
/// first attempt's poll (every request) is not diluted by the loop's construction (a state
/// of over 2 KB, built and moved into its box only for an answer that asks for more).
#[cold]
#[inline(never)]
fn start_loop<S, B>(start: Start<B>, attempts: Attempts, rng: Option<fastrand::Rng>) -> BoxedRun<B>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(run::<S, B>(Some(start), attempts, rng))
}

/// How the loop starts with the first attempt.
enum Start<B> {
    /// Its answer, to inspect (an error status, an event stream).
    Inspect(Response<B>),
    /// Its outcome, judged by [`First`].
    Judged(Outcome<B>),
}

/// What [`FirstCall`] made of the first attempt.
// The common variant is the large one on purpose: a final 2xx answer is returned as it is,
// and only the rare rest is boxed (boxing the answer would cost an allocation per request).
#[allow(clippy::large_enum_variant)]
enum Judged<B> {
    /// A 2xx answer, final (read ahead or not).
    Final(Response<RetryBody<B>>),
    /// Anything else, for the loop: a 2xx answer broken before it was forwarded, a failure
    /// (decided), or an answer to inspect. Boxed: the common answer is moved less.
    Other(Box<Start<B>>),
}

impl<B> Judged<B> {
    fn outcome(outcome: Outcome<B>) -> Self {
        match outcome {
            Outcome::Final {
                response,
                success: true,
            } => Self::Final(response),
            outcome => Self::Other(Box::new(Start::Judged(outcome))),
        }
    }
}

/// The first attempt's call, then (for a 2xx JSON answer, when the request has a deadline) the
/// read of its body, as [`inspect`] reads it.
#[pin_project(project = FirstCallProj)]
enum FirstCall<F, B> {
    Calling {
        #[pin]
        call: F,
        /// How much of a 2xx JSON answer is read (`None`: not read).
        read: Option<usize>,
    },
    Reading {
        parts: Option<http::response::Parts>,
        #[pin]
        peek: crate::body::Peek<Tracked<B>>,
    },
}

impl<F, B> FirstCall<F, B> {
    fn new(call: F, read: Option<usize>) -> Self {
        Self::Calling { call, read }
    }
}

impl<F, B, E> Future for FirstCall<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Judged<B>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Judged<B>> {
        loop {
            let (parts, peek) = match self.as_mut().project() {
                FirstCallProj::Calling { call, read } => {
                    let response = match ready!(call.poll(cx)) {
                        Ok(response) => response,
                        Err(err) => {
                            return Poll::Ready(Judged::outcome(Outcome::Failed(err.into())));
                        }
                    };
                    if !response.status().is_success() || is_event_stream(response.headers()) {
                        return Poll::Ready(Judged::Other(Box::new(Start::Inspect(response))));
                    }
                    let Some(cap) = *read else {
                        return Poll::Ready(Judged::Final(response.map(RetryBody::new)));
                    };
                    let (parts, body) = response.into_parts();
                    (parts, Replay::peek(Tracked::passthrough(body), cap))
                }
                FirstCallProj::Reading { parts, peek } => {
                    let read = ready!(peek.poll(cx));
                    let Some(parts) = parts.take() else {
                        return Poll::Ready(Judged::outcome(Outcome::Failed(
                            "retry future polled after completion".into(),
                        )));
                    };
                    return Poll::Ready(Judged::outcome(judge_json(parts, read)));
                }
            };
            self.set(Self::Reading {
                parts: Some(parts),
                peek,
            });
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RetryBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough(future) => match future.poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(result) => {
                    Poll::Ready(result.map(|r| r.map(RetryBody::new)).map_err(Into::into))
                }
            },
            KindProj::Retrying(run) => run.as_mut().poll(cx),
        }
    }
}

/// What every attempt of a request is built from.
pub(crate) enum Template {
    /// The layer's own copy of the request; every attempt is a copy of it.
    Own {
        template: RequestTemplate,
        /// The request's (key, group).
        key: QuotaKey,
    },
    /// The layer above said how it built the request ([`Resend`]): the first attempt is the
    /// request as received (sent by [`Retry::call`](super::Retry) at once: not kept here),
    /// later ones are rebuilt from the description.
    Resent {
        resend: Resend,
        /// The deadline this layer added to the request (added to every rebuilt attempt).
        deadline: Option<super::Deadline>,
        /// The request's (key, group), when not the description's: `None` for a
        /// description with its [`RequestMeta`], whose key and group are made when asked
        /// ([`quota_key`](Self::quota_key): a 429, pacing), not copied for every request.
        key: Option<QuotaKey>,
    },
}

impl Template {
    pub(crate) fn new(req: Request<RequestBody>, key: QuotaKey) -> Self {
        Self::Own {
            template: RequestTemplate::new(req),
            key,
        }
    }

    /// Attempts built from `resend` (plus `deadline`, when this layer added it to the
    /// request); the request as received is the first attempt, sent by the caller. `key`:
    /// see [`Template::Resent`].
    #[inline(always)]
    pub(crate) fn resent(
        resend: Resend,
        deadline: Option<super::Deadline>,
        key: Option<QuotaKey>,
    ) -> Self {
        Self::Resent {
            resend,
            deadline,
            key,
        }
    }

    /// The request's (key, rate-limit group): the pacer's and the 429 penalty's unit.
    pub(crate) fn quota_key(&self, catalog: &ModelCatalog) -> QuotaKey {
        match self {
            Self::Own { key, .. } | Self::Resent { key: Some(key), .. } => key.clone(),
            Self::Resent {
                resend, key: None, ..
            } => described_key(resend, catalog),
        }
    }

    fn meta(&self) -> Option<&RequestMeta> {
        match self {
            Self::Own { template, .. } => template.meta(),
            Self::Resent { resend, .. } => resend.meta(),
        }
    }

    fn headers(&self) -> &http::HeaderMap {
        match self {
            Self::Own { template, .. } => template.headers(),
            Self::Resent { resend, .. } => resend.headers(),
        }
    }

    /// The request's [`MaxServerWait`](super::MaxServerWait): the layer above's (asked of it
    /// now) or the request's own, from a description ([`Resend`]); else `own`, read from the
    /// request by [`Retry::call`](super::Retry).
    fn max_server_wait(&self, own: Option<Duration>) -> Option<Duration> {
        match self {
            Self::Own { .. } => own,
            Self::Resent { resend, .. } => resend.max_server_wait().map(|m| m.0),
        }
    }

    /// What the layer's [`Policy`](super::Policy) says about attempt `number`, which failed
    /// as `what` says (see [`Attempt`]).
    fn classify<'a>(
        &'a self,
        shared: &Shared,
        what: impl FnOnce(&'a RequestMeta) -> Attempt<'a>,
    ) -> Action {
        static NO_META: std::sync::LazyLock<RequestMeta> =
            std::sync::LazyLock::new(RequestMeta::default);
        let meta = self.meta().unwrap_or(&NO_META);
        let attempt = what(meta).with_request_headers(self.headers());
        let action = shared.config.policy.0.classify(&attempt);
        event_out_of_line!(
            tracing::Level::TRACE,
            attempt = attempt.number(),
            status = ?attempt.status(),
            ?action,
            "retry policy decided"
        );
        action
    }

    /// The request for attempt `attempt` (1-based), with `x-tower-claude-attempt` set.
    pub(crate) fn request(&self, attempt: u32) -> Request<RequestBody> {
        let req = match self {
            Self::Own { template, .. } => template.request(),
            Self::Resent {
                resend, deadline, ..
            } => {
                let mut req = resend.request();
                if let Some(deadline) = deadline {
                    req.extensions_mut().insert(*deadline);
                }
                req
            }
        };
        with_attempt(req, attempt)
    }
}

/// The rate-limit group of the request `meta` describes (`unknown` without a model).
pub(crate) fn group_of(meta: &RequestMeta, catalog: &ModelCatalog) -> RateLimitGroup {
    match meta.model_entry(catalog) {
        Some(entry) => entry.group().clone(),
        None => RateLimitGroup::new("unknown"),
    }
}

/// The (key, group) of a request described by `resend` (its key, its meta's group).
pub(crate) fn described_key(resend: &Resend, catalog: &ModelCatalog) -> QuotaKey {
    static NO_META: std::sync::LazyLock<RequestMeta> =
        std::sync::LazyLock::new(RequestMeta::default);
    let meta = resend.meta().unwrap_or(&NO_META);
    (resend.key().clone(), group_of(meta, catalog))
}

/// `req` with `x-tower-claude-attempt: attempt` set.
pub(crate) fn with_attempt(mut req: Request<RequestBody>, attempt: u32) -> Request<RequestBody> {
    set_attempt(&mut req, attempt);
    req
}

/// Sets `x-tower-claude-attempt: attempt` on `req`, in place (the request is not moved).
pub(crate) fn set_attempt(req: &mut Request<RequestBody>, attempt: u32) {
    // The first attempts' values are static (`HeaderValue::from(u32)` formats and
    // allocates), and checked at compile time (`from_static` at run time checks its bytes).
    let value = match attempt {
        1 => const { HeaderValue::from_static("1") },
        2 => const { HeaderValue::from_static("2") },
        3 => const { HeaderValue::from_static("3") },
        4 => const { HeaderValue::from_static("4") },
        5 => const { HeaderValue::from_static("5") },
        6 => const { HeaderValue::from_static("6") },
        7 => const { HeaderValue::from_static("7") },
        8 => const { HeaderValue::from_static("8") },
        9 => const { HeaderValue::from_static("9") },
        _ => HeaderValue::from(attempt),
    };
    req.headers_mut()
        .insert(&parsed_names::X_TOWER_CLAUDE_ATTEMPT, value);
}

/// The per-request context of the retry loop.
pub(crate) struct Attempts {
    pub(crate) shared: Arc<Shared>,
    pub(crate) template: Template,
    pub(crate) need: Need,
    pub(crate) deadline: Option<Instant>,
    /// The request's [`MaxServerWait`](super::MaxServerWait), if any (with a description
    /// from the layer above, none: [`Template::max_server_wait`] asks it).
    pub(crate) max_server_wait: Option<std::time::Duration>,
    pub(crate) started: Instant,
    /// The pacing slot a new request waits for before its first attempt.
    pub(crate) gate: Option<Slot>,
}

/// The result of one attempt.
enum Outcome<B> {
    /// Return this response (success, or an error the policy does not retry).
    Final {
        response: Response<RetryBody<B>>,
        success: bool,
    },
    /// The monthly spend cap: fail at once.
    SpendLimit {
        status: StatusCode,
        error: ApiError,
        request_id: Option<String>,
    },
    /// A transient failure that produced a response; it is returned if the layer gives up.
    Retryable {
        response: Response<RetryBody<B>>,
        error: Option<ApiError>,
        /// Whether the response headers may carry a delay (false for a failed stream).
        use_headers: bool,
    },
    /// The inner service failed.
    Failed(BoxError),
}

/// The last failed attempt, kept until the next one.
enum Failure<B> {
    Response {
        response: Box<Response<RetryBody<B>>>,
        error: Option<ApiError>,
    },
    Error(BoxError),
}

/// The error of a request whose deadline passed while attempt `attempt` waited for the
/// upstream.
fn deadline_passed(
    ctx: &Attempts,
    attempt: u32,
    total_wait: Duration,
    last_http: &Option<(StatusCode, Option<ApiError>)>,
) -> BoxError {
    tracing::debug!(attempt, "deadline passed while waiting for the upstream");
    let (status, api_error) = last_http.clone().unzip();
    BoxError::from(
        RetryError::new(RetryErrorKind::DeadlineExceeded, attempt)
            .with_timing(ctx.started.elapsed(), total_wait)
            .with_last_status(status)
            .with_api_error(api_error.flatten()),
    )
}

/// The answer of a [final](Outcome::Final) outcome at attempt `attempt`, with its
/// [`RetryInfo`].
#[allow(clippy::too_many_arguments)]
fn final_answer<B>(
    ctx: &Attempts,
    mut response: Response<RetryBody<B>>,
    success: bool,
    attempt: u32,
    total_wait: Duration,
    last_status: Option<StatusCode>,
    last_message: Option<String>,
) -> Response<RetryBody<B>> {
    let info = if success {
        success_info(ctx, attempt, total_wait, last_status, last_message)
    } else {
        // Its body was not read: no message.
        let status = Some(response.status());
        let elapsed = ctx.started.elapsed();
        RetryInfo::new(
            attempt,
            total_wait,
            elapsed,
            status,
            None,
            RetryOutcome::NotRetryable,
        )
    };
    response.extensions_mut().insert(info);
    response.body_mut().set_deadline(ctx.deadline);
    response
}

/// The [`RetryInfo`] of a success at attempt `attempt` (the pacer told).
fn success_info(
    ctx: &Attempts,
    attempt: u32,
    total_wait: Duration,
    last_status: Option<StatusCode>,
    last_message: Option<String>,
) -> RetryInfo {
    let pacer = &ctx.shared.pacer;
    // Nothing paced (no 429 seen): the request's key is not even made.
    if !pacer.idle() {
        pacer.succeeded(&ctx.template.quota_key(&ctx.shared.config.catalog));
    }
    let elapsed = ctx.started.elapsed();
    RetryInfo::new(
        attempt,
        total_wait,
        elapsed,
        last_status,
        last_message,
        RetryOutcome::Success,
    )
}

/// The retry loop, from its first attempt (`None`: the request waits for a pacing slot, then
/// the loop sends it) with the request's jitter generator (`None`: forked here, and the
/// request's deposit made).
async fn run<S, B>(
    mut start: Option<Start<B>>,
    ctx: Attempts,
    rng: Option<fastrand::Rng>,
) -> Result<Response<RetryBody<B>>, BoxError>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let shared = ctx.shared.clone();
    let config = &shared.config;
    let mut rng = match rng {
        Some(rng) => rng,
        None => {
            if let Some(budget) = &config.budget {
                budget.deposit();
            }
            shared.fork_rng()
        }
    };
    let key = ctx.template.quota_key(&config.catalog);
    let mut backoff = BackoffState::new(ctx.need);
    let mut total_wait = Duration::ZERO;
    let mut last_status: Option<StatusCode> = None;
    let mut last_message: Option<String> = None;
    // The last attempt that got an HTTP response (for an error after a later inner failure).
    let mut last_http: Option<(StatusCode, Option<ApiError>)> = None;
    // A new request on a quota being paced waits for its slot first (see `pacing`); its
    // first attempt was then not sent (`Retry::call` dropped the readied service).
    if let Some(slot) = ctx.gate {
        let now = Instant::now();
        let wake = slot.at.min(now + config.backoff.max_delay);
        tokio::time::sleep_until(wake).await;
        total_wait += wake.saturating_duration_since(now);
    }
    // The service of the attempts after the first, cloned from the spare when one is sent.
    let mut service: Option<S> = None;
    let mut attempt = 0u32;
    // The deadline covers the upstream too: waiting for readiness, the call, and reading what
    // `inspect` reads ahead. At the deadline the attempt is dropped and the layer fails.
    let timed_out =
        |attempt: u32, total_wait: Duration, last_http: &Option<(StatusCode, Option<ApiError>)>| {
            deadline_passed(&ctx, attempt, total_wait, last_http)
        };
    let read_json = ctx.deadline.is_some();
    loop {
        attempt += 1;
        let shared_ref = &shared;
        let template = &ctx.template;
        let attempted = match start.take() {
            // The first attempt, judged by `First`.
            Some(Start::Judged(outcome)) => Some(outcome),
            // The first attempt's answer, inspected here (under the same deadline).
            Some(Start::Inspect(response)) => {
                within(
                    ctx.deadline,
                    inspect(response, shared_ref, template, attempt, read_json),
                )
                .await
            }
            // Any other attempt (or the first, after its pacing slot) readies a service first.
            None => {
                let call = {
                    if service.is_none() {
                        service = shared.spare_service::<S>();
                    }
                    let Some(service) = service.as_mut() else {
                        return Err(RetryError::new(RetryErrorKind::Inner, attempt - 1)
                            .with_source("retry inner service lost".into())
                            .into());
                    };
                    let ready = within(
                        ctx.deadline,
                        std::future::poll_fn(|cx| service.poll_ready(cx)),
                    )
                    .await;
                    let Some(ready) = ready else {
                        return Err(timed_out(attempt - 1, total_wait, &last_http));
                    };
                    let ready: Result<(), BoxError> = ready.map_err(Into::into);
                    if let Err(err) = ready {
                        let (status, api_error) = last_http.unzip();
                        return Err(RetryError::new(RetryErrorKind::Inner, attempt - 1)
                            .with_timing(ctx.started.elapsed(), total_wait)
                            .with_last_status(status)
                            .with_api_error(api_error.flatten())
                            .with_source(err)
                            .into());
                    }
                    service.call(ctx.template.request(attempt))
                };
                within(ctx.deadline, async move {
                    match call.await.map_err(Into::into) {
                        Err(err) => Outcome::Failed(err),
                        Ok(response) => {
                            inspect(response, shared_ref, template, attempt, read_json).await
                        }
                    }
                })
                .await
            }
        };
        let Some(outcome) = attempted else {
            return Err(timed_out(attempt, total_wait, &last_http));
        };
        // Set by a layer below on a retryable response (see `RetrySooner`).
        let mut sooner: Option<Duration> = None;
        let (failure, delay_headers, rate_limited) = match outcome {
            Outcome::Final { response, success } => {
                return Ok(final_answer(
                    &ctx,
                    response,
                    success,
                    attempt,
                    total_wait,
                    last_status,
                    last_message,
                ));
            }
            Outcome::SpendLimit {
                status,
                error,
                request_id,
            } => {
                return Err(RetryError::new(RetryErrorKind::SpendLimit, attempt)
                    .with_timing(ctx.started.elapsed(), total_wait)
                    .with_last_status(Some(status))
                    .with_api_error(Some(error))
                    .with_request_id(request_id)
                    .into());
            }
            Outcome::Failed(err) => {
                let permanent = is_permanent(&err);
                if permanent {
                    tracing::debug!(
                        attempt,
                        error = %err,
                        "not retried: no wait can cure this error"
                    );
                }
                let retried = !permanent
                    && ctx
                        .template
                        .classify(&shared, |meta| Attempt::error(meta, attempt, &err))
                        == Action::Retry;
                if !retried {
                    let (status, api_error) = last_http.unzip();
                    return Err(RetryError::new(RetryErrorKind::Inner, attempt)
                        .with_timing(ctx.started.elapsed(), total_wait)
                        .with_last_status(status)
                        .with_api_error(api_error.flatten())
                        .with_source(err)
                        .into());
                }
                last_status = None;
                last_message = Some(err.to_string());
                (Failure::Error(err), None, false)
            }
            Outcome::Retryable {
                response,
                error,
                use_headers,
            } => {
                let status = response.status();
                sooner = response
                    .extensions()
                    .get::<super::RetrySooner>()
                    .map(|s| s.0);
                let rate_limited = is_rate_limit(status, error.as_ref());
                if rate_limited && sooner.is_none() {
                    shared.pacer.rate_limited(&key);
                }
                last_status = Some(status);
                last_message = error.as_ref().map(|e| e.message().to_string());
                last_http = Some((status, error.clone()));
                let headers = use_headers.then(|| response.headers().clone());
                (
                    Failure::Response {
                        response: Box::new(response),
                        error,
                    },
                    headers,
                    rate_limited,
                )
            }
        };

        // Decide whether to try again, and after how long.
        let next = if attempt >= config.max_attempts {
            Err(RetryOutcome::Exhausted)
        } else {
            let mut delay = next_delay(
                &config.backoff,
                &mut backoff,
                delay_headers.as_ref(),
                rate_limited,
                shared.pacer.level(&key),
                &mut rng,
                SystemTime::now(),
            );
            if let Some(sooner) = sooner {
                // The next attempt goes out with another key: its wait, not this answer's,
                // and no pacing slot of this key and group.
                delay.wait = delay.wait.min(sooner);
                delay.admission = None;
            }
            let now = Instant::now();
            // Asked only of a rate-limited attempt (fallback above looks at the lower models'
            // quota then, not for every request).
            let too_long = rate_limited
                && ctx
                    .template
                    .max_server_wait(ctx.max_server_wait)
                    .is_some_and(|max| delay.wait > max);
            let mut wake = now + delay.wait;
            let mut crosses = ctx.deadline.is_some_and(|deadline| wake > deadline);
            let mut slot = None;
            if let (false, true, Some(admission)) = (crosses, config.pacing, delay.admission) {
                match shared.pacer.reserve(&key, wake, admission, ctx.deadline) {
                    Some(reserved) => {
                        wake = reserved.at.min(now + config.backoff.max_delay);
                        slot = Some(reserved);
                    }
                    None => crosses = true,
                }
            }
            if too_long {
                if let Some(slot) = slot {
                    shared.pacer.release(&key, slot);
                }
                Err(RetryOutcome::WaitTooLong)
            } else if crosses {
                Err(RetryOutcome::DeadlineExceeded)
            } else if config.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                if let Some(slot) = slot {
                    shared.pacer.release(&key, slot);
                }
                Err(RetryOutcome::BudgetExhausted)
            } else {
                Ok((now, wake))
            }
        };
        let outcome = match next {
            Ok((now, wake)) => {
                // Nothing of the failed attempt is kept while waiting (no connection held).
                drop(failure);
                let wait = wake - now;
                tracing::debug!(
                    attempt,
                    status = last_status.map(|s| s.as_u16()),
                    wait_ms = wait.as_millis() as u64,
                    key = %key.0,
                    group = %key.1,
                    "retrying Messages API call"
                );
                tokio::time::sleep_until(wake).await;
                total_wait += wait;
                continue;
            }
            Err(outcome) => outcome,
        };
        return match failure {
            Failure::Response { response, error } => {
                // A 2xx whose stream (or JSON body) broke before anything was forwarded: the
                // caller gets an error status, not a 200 with a broken body.
                let (mut response, error) = if response.status().is_success() {
                    broken_answer(*response, error)
                } else {
                    (*response, error)
                };
                let message = error.map(|e| e.message().to_string());
                let status = Some(response.status());
                response.extensions_mut().insert(RetryInfo::new(
                    attempt,
                    total_wait,
                    ctx.started.elapsed(),
                    status,
                    message,
                    outcome,
                ));
                Ok(response.map(|body| body.until(ctx.deadline)))
            }
            Failure::Error(err) => {
                let kind = match outcome {
                    RetryOutcome::DeadlineExceeded => RetryErrorKind::DeadlineExceeded,
                    RetryOutcome::BudgetExhausted => RetryErrorKind::BudgetExhausted,
                    _ => RetryErrorKind::Exhausted,
                };
                let (status, api_error) = last_http.unzip();
                Err(RetryError::new(kind, attempt)
                    .with_timing(ctx.started.elapsed(), total_wait)
                    .with_last_status(status)
                    .with_api_error(api_error.flatten())
                    .with_source(err)
                    .into())
            }
        };
    }
}

/// The message of the error that replaces a 2xx JSON answer that is not one.
const NOT_A_MESSAGE: &str = "upstream answered 2xx with a body that is not a JSON object";

/// `future`, unless `deadline` passes first (`None` then).
///
/// A future of its own rather than an `async fn` around `timeout_at`: the loop's state holds
/// it directly, so `future` is moved into place once (not into the `async fn`, then into its
/// `Timeout`, then with both into the loop's state).
fn within<F: Future>(deadline: Option<Instant>, future: F) -> Within<F> {
    match deadline {
        Some(deadline) => Within::Timed(tokio::time::timeout_at(deadline, future)),
        None => Within::Plain(future),
    }
}

/// The future of [`within`].
#[pin_project(project = WithinProj)]
enum Within<F> {
    Timed(#[pin] tokio::time::Timeout<F>),
    Plain(#[pin] F),
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            WithinProj::Timed(timed) => timed.poll(cx).map(Result::ok),
            WithinProj::Plain(future) => future.poll(cx).map(Some),
        }
    }
}

/// The error response that replaces a 2xx whose body broke before anything reached the caller
/// (a stream cut or failed before its first content event, a JSON body cut short): the
/// stream's own `event: error` when it sent one, else an `api_error`; the upstream headers
/// (`request-id`, `anthropic-ratelimit-*`) are kept, the body is the JSON envelope.
fn broken_answer<B>(
    response: Response<RetryBody<B>>,
    error: Option<ApiError>,
) -> (Response<RetryBody<B>>, Option<ApiError>) {
    let error = error.unwrap_or_else(|| ApiError::new(ApiErrorKind::Api, STREAM_CUT));
    let (mut parts, _broken) = response.into_parts();
    parts.status = error.status();
    // The body is this layer's now: the upstream body's tracker no longer describes it.
    parts.extensions.remove::<UsageTracker>();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.extensions.insert(ErrorAnswer::from(error.clone()));
    let body = RetryBody::replay(Replay::from_bytes(error.to_envelope()));
    (Response::from_parts(parts, body), Some(error))
}

/// The outcome of a 2xx JSON answer read ahead (`read`, up to the layer's limit).
fn judge_json<B>(parts: http::response::Parts, read: Peeked<Tracked<B>>) -> Outcome<B> {
    // A body read whole that is not a JSON object with a `type` (garbage, HTML, a cut
    // document) is no answer: retried, and never returned as a 200. Read once: the usage
    // tracker of a layer below read the same bytes with their usage.
    let typed = || {
        parts
            .extensions
            .get::<UsageTracker>()
            .and_then(UsageTracker::typed_json)
            .unwrap_or_else(|| is_typed_object(&read.data()))
    };
    let error = if read.failed() {
        Some(ApiError::new(ApiErrorKind::Api, STREAM_CUT))
    } else if read.is_whole() && !typed() {
        Some(ApiError::new(ApiErrorKind::Api, NOT_A_MESSAGE))
    } else {
        None
    };
    let response = Response::from_parts(parts, RetryBody::replay(read.into_body()));
    if let Some(error) = error {
        tracing::debug!(error = %error, "2xx answer broken before it was forwarded");
        return Outcome::Retryable {
            response,
            error: Some(error),
            use_headers: false,
        };
    }
    Outcome::Final {
        response,
        success: true,
    }
}

/// Classifies one response, reading ahead in its body where the decision needs it.
/// `read_json`: a 2xx that is not an event stream is read whole (up to a limit) before it is
/// returned, so that a deadline passing while it trickles is still answered with an error
/// status, and a body cut short is retried.
async fn inspect<B>(
    response: Response<B>,
    shared: &Shared,
    template: &Template,
    attempt: u32,
    read_json: bool,
) -> Outcome<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let config = &shared.config;
    let status = response.status();
    if status.is_success() {
        let stream = is_event_stream(response.headers());
        if stream && config.hold_back_stream {
            return hold_back(response, config.max_hold_back, |error| {
                template.classify(shared, |meta| Attempt::stream_error(meta, attempt, error))
                    == Action::Retry
            })
            .await;
        }
        if stream {
            let (mut parts, body) = response.into_parts();
            let (body, tracker) = track(&mut parts, body, true, 0);
            let body = RetryBody::replay(Replay::new(body)).guard_stream(tracker);
            return Outcome::Final {
                response: Response::from_parts(parts, body),
                success: true,
            };
        }
        if !read_json {
            return Outcome::Final {
                response: response.map(RetryBody::new),
                success: true,
            };
        }
        let (parts, body) = response.into_parts();
        let read = Replay::peek(Tracked::passthrough(body), config.max_json_read).await;
        return judge_json(parts, read);
    }

    // A layer below sends the next attempt differently (another key): whatever the status,
    // the request itself may still succeed.
    let sooner = response.extensions().get::<super::RetrySooner>().is_some();
    let verdict = if sooner {
        StatusVerdict::Retry
    } else {
        let headers = response.headers();
        match template.classify(shared, |meta| {
            Attempt::response(meta, attempt, status, headers)
        }) {
            Action::Retry => StatusVerdict::Retry,
            Action::Return => StatusVerdict::Stop,
        }
    };
    // Read once: by this layer, or by a layer below that published it.
    let (mut parts, body) =
        read_error_answer(response.map(Tracked::passthrough), config.max_error_body)
            .await
            .into_parts();
    let answer = parts.extensions.get::<ErrorAnswer>().cloned();
    let foreign = answer.as_ref().is_some_and(ErrorAnswer::is_foreign);
    let error = answer.map_or_else(
        || ApiError::from_response(status, b""),
        |a| a.error().clone(),
    );
    if verdict == StatusVerdict::Stop && !needs_body(status) {
        // An error status whose body is not an error envelope (an HTML page from a gateway,
        // garbage): the caller gets the envelope of the same status instead, so that SDKs
        // report it like any API error.
        let body = if foreign {
            tracing::debug!(
                status = status.as_u16(),
                "error body replaced by an envelope"
            );
            parts.headers.remove(http::header::CONTENT_LENGTH);
            parts
                .headers
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            parts.extensions.insert(ErrorAnswer::from(error.clone()));
            RetryBody::replay(Replay::from_bytes(error.to_envelope()))
        } else {
            RetryBody::replay(body)
        };
        return Outcome::Final {
            response: Response::from_parts(parts, body),
            success: false,
        };
    }
    if needs_body(status) && is_spend_cap(&error) && !sooner {
        return Outcome::SpendLimit {
            status,
            error,
            request_id: request_id(&parts.headers).map(str::to_string),
        };
    }
    let response = Response::from_parts(parts, RetryBody::replay(body));
    match verdict {
        StatusVerdict::Stop => Outcome::Final {
            response,
            success: false,
        },
        StatusVerdict::Retry => Outcome::Retryable {
            response,
            error: Some(error),
            use_headers: true,
        },
    }
}

/// Holds a 2xx stream back until its first content event (or its end, or an error), then
/// decides: content with no error before it is forwarded; an error, a body failure or an end
/// before any content is a retryable failure (nothing reached the caller yet).
async fn hold_back<B>(
    response: Response<B>,
    limit: usize,
    retry_error: impl FnOnce(&ApiError) -> bool,
) -> Outcome<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    // The stream's one tracker (fed below, or by this body): it sees each chunk first.
    let (body, tracker) = track(&mut parts, body, true, 0);
    let read = Replay::peek_until(body, limit, |_| {
        // Once an error is seen, read on to the end of the (short) stream so nothing stays
        // open while the layer waits.
        tracker.content_started() && tracker.error().is_none()
    })
    .await;
    let rest_open = !read.is_whole() && !read.failed();
    if read.is_whole() {
        // A body that ended before yielding a frame was never seen ending.
        tracker.end(false);
    }
    let error = tracker.error();
    let body_failed = read.failed();
    let truncated = !rest_open && tracker.state() != BodyState::Complete;
    let content = tracker.content_started();
    let response = Response::from_parts(
        parts,
        RetryBody::replay(read.into_body()).guard_stream(tracker),
    );
    match error {
        Some(error) if !is_spend_cap(&error) && retry_error(&error) => Outcome::Retryable {
            response,
            error: Some(error),
            use_headers: false,
        },
        Some(_) => Outcome::Final {
            response,
            success: false,
        },
        None if !content && (body_failed || truncated) => Outcome::Retryable {
            response,
            error: None,
            use_headers: false,
        },
        None if body_failed => Outcome::Final {
            response,
            success: false,
        },
        None => Outcome::Final {
            response,
            success: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer to the first attempt is finished where it arrives: success, one attempt, the
    /// body as it came; a poll after that is an error, not a poll of the finished call.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_first_answer_is_finished_in_place() {
        use tower::{Layer, ServiceExt};
        let upstream = crate::test_upstream::message_upstream();
        for deadline in [None, Some(Duration::from_secs(30))] {
            let layer = super::super::RetryLayer::new();
            let layer = match deadline {
                Some(d) => layer.deadline(d),
                None => layer,
            };
            let mut svc = layer.layer(upstream);
            let req = Request::post("/v1/messages")
                .header("x-api-key", "k")
                .body(RequestBody::from(
                    r#"{"model":"claude-haiku-4-5","max_tokens":8,"messages":[]}"#,
                ))
                .unwrap();
            let mut fut = Box::pin(svc.ready().await.unwrap().call(req));
            let resp = (&mut fut).await.unwrap();
            let info = resp.extensions().get::<RetryInfo>().unwrap();
            assert_eq!(info.attempts(), 1);
            assert_eq!(info.outcome(), RetryOutcome::Success);
            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
            assert_eq!(body.unwrap().to_bytes().len(), 63, "{deadline:?}");
            assert!(fut.await.is_err(), "polled after completion: {deadline:?}");
        }
    }

    /// A description's key and group, made when asked, are the request's: its key, and the
    /// group of its meta's model (another model's meta for a rewritten request).
    #[test]
    fn a_described_request_is_keyed_by_its_description() {
        use std::sync::Arc;

        use crate::anthropic::KeyId;
        use crate::retry::{Described, ServerWait};

        struct Source(RequestTemplate, KeyId);
        impl Described for Source {
            fn template(&self) -> &RequestTemplate {
                &self.0
            }
            fn key(&self) -> &KeyId {
                &self.1
            }
            fn lower_left(&self, _: usize, _: usize) -> bool {
                false
            }
            fn max_wait(&self) -> Duration {
                Duration::ZERO
            }
        }
        let catalog = ModelCatalog::default();
        let mut req = Request::post("/v1/messages")
            .body(RequestBody::from(Bytes::from_static(
                br#"{"model":"claude-opus-4-7","max_tokens":1,"messages":[]}"#,
            )))
            .unwrap();
        RequestMeta::get_or_scan(&mut req).unwrap();
        let source = Arc::new(Source(RequestTemplate::new(req), KeyId::named("k")));
        let haiku =
            RequestMeta::scan(br#"{"model":"claude-haiku-4-5","max_tokens":1,"messages":[]}"#)
                .unwrap();
        for (meta, model) in [(None, "claude-opus-4-7"), (Some(haiku), "claude-haiku-4-5")] {
            let resend = Resend {
                source: source.clone(),
                body: None,
                meta: meta.map(Box::new),
                max_server_wait: ServerWait::Set(None),
            };
            let template = Template::resent(resend, None, None);
            let (key, group) = template.quota_key(&catalog);
            assert_eq!(key.as_str(), "k");
            assert_eq!(&group, catalog.entry(model).group(), "{model}");
        }
        assert_ne!(
            catalog.entry("claude-opus-4-7").group(),
            catalog.entry("claude-haiku-4-5").group()
        );
    }

    #[test]
    fn every_attempt_says_its_number() {
        use crate::anthropic::KeyId;
        let req = Request::post("/v1/messages")
            .header("x-api-key", "k")
            .body(RequestBody::from(Bytes::from_static(b"{}")))
            .unwrap();
        let template = Template::new(
            req,
            (KeyId::anonymous(), RateLimitGroup::new("claude-haiku-4")),
        );
        for attempt in 1..=12u32 {
            let req = template.request(attempt);
            assert_eq!(
                req.headers()["x-tower-claude-attempt"],
                attempt.to_string().as_str()
            );
            assert_eq!(req.headers()["x-api-key"], "k");
        }
    }
}
