//! [`ResponseFuture`] of the [`Fallback`](super::Fallback) service, and the per-request walk
//! down the chain.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Extensions, HeaderMap, Request, Response};
use http_body::Body;
use pin_project::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::ServedModel;
use super::body::FallbackBody;
use super::config::Config;
use super::error::FallbackError;
use super::policy::{self, Verdict};
use crate::BoxError;
use crate::anthropic::{
    ApiError, KeyId, ModelEntry, RateLimitSnapshot, RequestMeta, parsed_names, retry_after,
    rewrite_model,
};
use crate::body::{
    ErrorAnswer, ReadErrorAnswer, Replay, RequestBody, RequestTemplate, read_error_answer,
};
use crate::quota::Cost;
use crate::retry::LowerModels as _;
use crate::retry::{Described, MaxServerWait, Resend, RetryInfo, RetryOutcome, ServerWait, Spare};

/// The most bytes of an error response read to classify it (error envelopes are a few hundred
/// bytes); a longer body is classified by its status and returned unread beyond this.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Response future of [`Fallback`](super::Fallback): sends the request to the chosen model and,
/// while an answer says the model is exhausted, to the next one.
#[pin_project]
pub struct ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
{
    #[pin]
    state: State<S::Future, B>,
    walk: Option<Box<Walk<S>>>,
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("ResponseFuture");
        if let Some(walk) = &self.walk {
            d.field("requested", &walk.requested().id())
                .field("model", &walk.plan.candidates[walk.current].id())
                .field("attempts", &walk.attempts);
        }
        d.finish_non_exhaustive()
    }
}

#[pin_project(project = StateProj)]
enum State<F, B> {
    /// Not a request the layer applies its policy to.
    Passthrough {
        #[pin]
        fut: F,
    },
    /// An attempt in flight.
    Calling {
        #[pin]
        fut: F,
    },
    /// Reading an error answer's envelope. Boxed, as the pause: only an error answer that may
    /// move the walk on gets here, and every layer above holds this future (and moves it as
    /// its own is built): inline, the two made it ~250 bytes larger.
    Reading {
        read: Pin<Box<ReadErrorAnswer<B>>>,
    },
    /// Before sending a model that answered 529 again.
    Pausing {
        sleep: Pin<Box<Sleep>>,
    },
    /// Waiting for the inner service to be ready for the next attempt.
    Ready,
    Done,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>>,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        Self {
            state: State::Passthrough { fut },
            walk: None,
        }
    }

    pub(crate) fn walking(fut: S::Future, mut walk: Box<Walk<S>>, spare: Spare<S>) -> Self {
        walk.spare = Some(spare);
        Self {
            state: State::Calling { fut },
            walk: Some(walk),
        }
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<FallbackBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let walk = match this.state.as_mut().project() {
                StateProj::Passthrough { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(res.map(Replay::new)));
                }
                StateProj::Done => {
                    return Poll::Ready(Err(
                        "fallback response future polled after completion".into()
                    ));
                }
                _ => match this.walk.as_deref_mut() {
                    Some(walk) => walk,
                    None => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err("fallback walk state lost".into()));
                    }
                },
            };
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let res = match ready!(fut.poll(cx)) {
                        Ok(res) => res,
                        Err(e) => {
                            let e: BoxError = e.into();
                            if walk.can_move_on()
                                && policy::error_fails_over(&*e)
                                && walk.fail_over("no answer (transport error)")
                            {
                                this.state.set(State::Ready);
                                continue;
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(walk.error(e)));
                        }
                    };
                    walk.observe(res.headers(), res.extensions());
                    if !policy::may_move_on(res.status()) || !walk.can_move_on() {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(walk.finish(res.map(Replay::new))));
                    }
                    this.state.set(State::Reading {
                        read: Box::pin(read_error_answer(res, MAX_ERROR_BODY)),
                    });
                }
                StateProj::Reading { read } => {
                    // The envelope, read once (here or below); the body is replayed whole.
                    let (head, rest) = ready!(read.as_mut().poll(cx)).into_parts();
                    let verdict = walk.classify(&head);
                    let moved = match verdict {
                        Verdict::Return => false,
                        Verdict::FailOver => walk.fail_over(match head.status.as_u16() {
                            529 => "overloaded (529)",
                            429 => "rate limited (429)",
                            _ => "error answer",
                        }),
                        Verdict::Resend => walk.resend(),
                    };
                    if !moved {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(walk.finish(Response::from_parts(head, rest))));
                    }
                    if verdict == Verdict::Resend && !walk.config().overloaded_pause.is_zero() {
                        this.state.set(State::Pausing {
                            sleep: Box::pin(tokio::time::sleep(walk.config().overloaded_pause)),
                        });
                    } else {
                        this.state.set(State::Ready);
                    }
                }
                StateProj::Pausing { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    // The service of the attempts after the first: a clone of the layer's
                    // spare, taken once per walk.
                    if walk.service.is_none() {
                        walk.service = walk.spare.as_ref().and_then(Spare::service);
                    }
                    let Some(service) = walk.service.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err("fallback inner service lost".into()));
                    };
                    if let Err(e) = ready!(service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(walk.error(e.into())));
                    }
                    let Some(request) = walk.next.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err("fallback request lost".into()));
                    };
                    walk.attempts += 1;
                    let fut = service.call(*request);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Passthrough { .. } | StateProj::Done => {}
            }
        }
    }
}

/// What a request's walk keeps for all its attempts and never changes: shared (one
/// reference count) with every [`Resend`] it attaches for a retry layer directly below.
pub(crate) struct Plan {
    pub(crate) config: Arc<Config>,
    /// The request as the caller sent it, with its [`RequestMeta`] (read from there, not
    /// copied).
    request: RequestTemplate,
    /// The request's chain (truncated at the floor) as catalogue entries, best model first:
    /// the requested model first.
    candidates: Arc<[ModelEntry]>,
    key: KeyId,
    cost: Cost,
}

impl Plan {
    /// The request's [`RequestMeta`], as [`Fallback::call`](super::Fallback) scanned it into
    /// the request (a request without one, which the layer passes through, never walks).
    fn meta(&self) -> &RequestMeta {
        static NO_META: std::sync::LazyLock<RequestMeta> =
            std::sync::LazyLock::new(RequestMeta::default);
        self.request.meta().unwrap_or(&NO_META)
    }
}

/// Retry, directly below, asks when an attempt is rate limited (see [`ServerWait`]).
impl Described for Plan {
    fn template(&self) -> &RequestTemplate {
        &self.request
    }

    fn key(&self) -> &KeyId {
        &self.key
    }

    fn lower_left(&self, idx: usize, visited: usize) -> bool {
        self.request.meta().is_some_and(|meta| {
            self.config.lower_left(
                meta,
                self.request.headers(),
                &self.candidates,
                idx,
                visited,
                &self.key,
                &self.cost,
            )
        })
    }

    fn max_wait(&self) -> Duration {
        self.config.max_wait()
    }
}

/// Everything one request's walk down the chain needs.
pub(crate) struct Walk<S> {
    /// What the walk never changes.
    plan: Arc<Plan>,
    /// Index in `candidates` of the model of the attempt in flight (or just answered).
    current: usize,
    /// Models sent to so far.
    visited: usize,
    /// 529 answers from the current model.
    overloaded: u32,
    attempts: u32,
    failovers: u32,
    /// The next attempt, prepared. Boxed: only a request that moves on has one, and the walk
    /// (boxed, built beside its box and copied in) stays small.
    next: Option<Box<Request<RequestBody>>>,
    /// The service of the attempts after the first (cloned from `spare` when one is sent).
    service: Option<S>,
    /// The layer's spare service (see [`Spare`]).
    spare: Option<Spare<S>>,
}

impl<S> Walk<S> {
    /// The walk of `req` (copied: the request itself is the first attempt, see
    /// [`first_request`](Self::first_request)).
    pub(crate) fn new(
        config: Arc<Config>,
        req: &Request<RequestBody>,
        candidates: Arc<[ModelEntry]>,
        key: KeyId,
        cost: Cost,
    ) -> Self {
        Self {
            plan: Arc::new(Plan {
                config,
                request: RequestTemplate::copy_of(req),
                candidates,
                key,
                cost,
            }),
            current: 0,
            visited: 0,
            overloaded: 0,
            attempts: 0,
            failovers: 0,
            next: None,
            service: None,
            spare: None,
        }
    }

    /// The layer's configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.plan.config
    }

    /// The requested model (the first candidate).
    fn requested(&self) -> &ModelEntry {
        &self.plan.candidates[0]
    }

    fn meta(&self) -> &RequestMeta {
        self.plan.meta()
    }

    /// The best candidate from `from` on, as the layer's [`Policy`](super::Policy) decides,
    /// if any is left (and not excluded) and the depth allows another model.
    fn choose(&self, from: usize) -> Option<usize> {
        if from >= self.plan.candidates.len() || self.visited >= self.plan.config.max_depth {
            return None;
        }
        self.plan.config.select(
            self.meta(),
            self.plan.request.headers(),
            &self.plan.candidates,
            from,
            &self.plan.key,
            &self.plan.cost,
        )
    }

    /// The request for candidate `idx`: the body with its `model` rewritten (the original
    /// bytes for the requested model) and the `RequestMeta` extension updated, with
    /// [`MaxServerWait`] while a lower model is left once `visited` models (this one
    /// included) were sent to. `None` when the body cannot be rewritten.
    #[cold]
    #[inline(never)]
    fn build(&mut self, idx: usize, visited: usize) -> Option<Request<RequestBody>> {
        let model = &self.plan.candidates[idx];
        if idx == 0 {
            // The template carries the request's own `RequestMeta`, for this very model.
            return Some(self.original(idx, visited));
        }
        let body =
            RequestBody::from(rewrite_model(self.plan.request.body().bytes(), model.id()).ok()?);
        // The copy's meta remembers the candidate's catalogue entry: the layers below read
        // its group there, not from the catalogue.
        let meta = self.meta().with_model(model);
        let mut req = self.plan.request.with_body(body.clone());
        self.mark(&mut req, idx, visited, Some(body), Some(meta));
        Some(req)
    }

    /// The request as the caller sent it (opt-out header removed), for candidate `idx`: a
    /// copy of the template.
    fn original(&mut self, idx: usize, visited: usize) -> Request<RequestBody> {
        let mut req = self.plan.request.request();
        self.mark(&mut req, idx, visited, None, None);
        req
    }

    /// Marks `req` (the template with `body`, its own when `None`) for candidate `idx`: its
    /// `meta` (when set), and
    /// [`MaxServerWait`] while a lower model than `idx` is left; or, for a retry layer directly
    /// below, the [`Resend`] that describes it (one copy of the request head for both layers).
    /// In place: the request is not moved.
    fn mark(
        &self,
        req: &mut Request<RequestBody>,
        idx: usize,
        visited: usize,
        body: Option<RequestBody>,
        meta: Option<RequestMeta>,
    ) {
        // For retry directly below, the `MaxServerWait` is decided when it needs it (an
        // attempt rate limited): the lower models' quota is not looked at for every request.
        // Without one, on the request now.
        let resend = self.plan.config.resend_below.then(|| Resend {
            source: self.plan.clone(),
            body,
            meta: meta.clone().map(Box::new),
            max_server_wait: if self.lower_possible(idx, visited) {
                ServerWait::Ask { idx, visited }
            } else {
                ServerWait::Set(None)
            },
        });
        if let Some(meta) = meta {
            req.extensions_mut().insert(meta);
        }
        match resend {
            // Retry, directly below, removes the description and asks it for the
            // `MaxServerWait` (it is that extension's one reader): not set on the request.
            Some(resend) => {
                req.extensions_mut().insert(resend);
            }
            None => {
                if self.lower_left(idx, visited) {
                    req.extensions_mut().insert(MaxServerWait(
                        self.plan.config.rules.max_wait_before_failover,
                    ));
                }
            }
        }
    }

    /// While a lower model than `idx` is left (and the depth allows moving to it), a retry
    /// layer below must not sit out a long 429 wait on the current one: the request is marked
    /// with [`MaxServerWait`] so that such a 429 comes back at once and the walk moves down.
    /// `visited` counts `idx` already.
    fn lower_left(&self, idx: usize, visited: usize) -> bool {
        self.plan.config.lower_left(
            self.meta(),
            self.plan.request.headers(),
            &self.plan.candidates,
            idx,
            visited,
            &self.plan.key,
            &self.plan.cost,
        )
    }

    /// Whether the chain and the depth leave room for a lower model than `idx` (whether
    /// [`lower_left`](Self::lower_left) can be true), without looking at the board.
    fn lower_possible(&self, idx: usize, visited: usize) -> bool {
        idx + 1 < self.plan.candidates.len() && visited < self.plan.config.max_depth
    }

    /// The first attempt: the chosen model's request, or `None` when that is the requested
    /// model (or the body cannot be rewritten): then the request as received is the first
    /// attempt, marked by [`mark_received`](Self::mark_received) where it is (the request is
    /// not moved through the walk and back).
    pub(crate) fn first_request(&mut self) -> Option<Request<RequestBody>> {
        let chosen = self.choose(0).unwrap_or(0);
        let built = match chosen {
            0 => None,
            _ => self.build(chosen, 1),
        };
        let idx = if built.is_some() { chosen } else { 0 };
        tracing::debug!(
            requested = %self.requested().id(),
            model = %self.plan.candidates[idx].id(),
            why = if self.plan.candidates.len() <= 1 {
                "no fallback for this request (opted out, or no lower model in the chain)"
            } else if idx != chosen {
                "the body could not be rewritten; the requested model is sent"
            } else if idx == 0 {
                "the policy keeps the requested model"
            } else {
                "the policy moved down by remaining quota"
            },
            "fallback: model chosen"
        );
        self.current = idx;
        self.visited = 1;
        self.attempts = 1;
        built
    }

    /// Marks `received`, the request as received, as the first attempt to the requested
    /// model (when [`first_request`](Self::first_request) built none): it is sent as it is
    /// (its header map keeps the room it was built with, where a copy is cloned to its exact
    /// size and the attempt header retry adds would grow it).
    pub(crate) fn mark_received(&self, received: &mut Request<RequestBody>) {
        self.mark(received, 0, 1, None, None);
    }

    /// Whether an answer from the current model could still lead somewhere else (a lower model
    /// is left and the depth allows it). When not, every answer is returned as it is.
    pub(crate) fn can_move_on(&self) -> bool {
        self.current + 1 < self.plan.candidates.len() && self.visited < self.plan.config.max_depth
    }

    /// Feeds the board from the answer's rate-limit headers, under the key the answer was
    /// served with (a key pool below says which: [`ChosenKey`](crate::key_pool::ChosenKey)),
    /// unless a layer below (a rate limiter or a key pool on the same board) fed them already.
    pub(crate) fn observe(&self, headers: &HeaderMap, extensions: &Extensions) {
        if self.plan.config.board.already_observed(extensions) {
            return;
        }
        let snapshot = RateLimitSnapshot::from_headers(headers);
        if snapshot.is_empty() {
            return;
        }
        let key = match extensions.get::<crate::key_pool::ChosenKey>() {
            Some(chosen) => chosen.key(),
            // Served with a pool's key we cannot name: these headers are not this key's.
            None if self.plan.config.keys.is_some() => return,
            None => &self.plan.key,
        };
        let group = self.plan.candidates[self.current].group();
        self.plan.config.board.observe(key, group, &snapshot);
    }

    /// What an error answer (429 / 529) from the current model means, from the envelope read
    /// once ([`ErrorAnswer`]).
    #[cold]
    #[inline(never)]
    pub(crate) fn classify(&mut self, head: &http::response::Parts) -> Verdict {
        let kind = match head.extensions.get::<ErrorAnswer>() {
            Some(answer) => answer.error().kind(),
            None => ApiError::from_response(head.status, b"").kind(),
        };
        if head.status.as_u16() == 529 {
            self.overloaded += 1;
        }
        let wait = retry_after(&head.headers, SystemTime::now());
        policy::classify(
            &self.plan.config.rules,
            head.status,
            Some(kind),
            wait,
            self.overloaded,
            retried_below(&head.extensions),
        )
    }

    /// Prepares the next lower model; `false` when none is left (or allowed).
    #[cold]
    #[inline(never)]
    pub(crate) fn fail_over(&mut self, why: &'static str) -> bool {
        let Some(idx) = self.choose(self.current + 1) else {
            tracing::debug!(
                model = %self.plan.candidates[self.current].id(),
                why,
                "fallback: no lower model left to fail over to; the answer is returned"
            );
            return false;
        };
        let Some(req) = self.build(idx, self.visited + 1) else {
            return false;
        };
        tracing::debug!(
            from = %self.plan.candidates[self.current].id(),
            to = %self.plan.candidates[idx].id(),
            why,
            "fallback: failing over"
        );
        self.current = idx;
        self.visited += 1;
        self.overloaded = 0;
        self.failovers += 1;
        self.next = Some(Box::new(req));
        true
    }

    /// Prepares the same model again.
    #[cold]
    #[inline(never)]
    pub(crate) fn resend(&mut self) -> bool {
        match self.build(self.current, self.visited) {
            Some(req) => {
                self.next = Some(Box::new(req));
                true
            }
            None => false,
        }
    }

    /// Tags the response with the model that produced it: the header value and the names
    /// in [`ServedModel`] are the catalogue entries' (shared, not copied).
    pub(crate) fn finish<B>(&mut self, mut res: Response<B>) -> Response<B> {
        let served = &self.plan.candidates[self.current];
        if let Some(value) = served.header_value() {
            res.headers_mut()
                .insert(&parsed_names::X_TOWER_CLAUDE_MODEL, value.clone());
        }
        res.extensions_mut().insert(ServedModel {
            requested: self.requested().shared_id().clone(),
            served: served.shared_id().clone(),
            attempts: self.attempts,
            failovers: self.failovers,
        });
        res
    }

    /// The layer's error for an inner service error on the current attempt.
    #[cold]
    #[inline(never)]
    pub(crate) fn error(&self, source: BoxError) -> BoxError {
        Box::new(FallbackError::inner(
            self.requested().id().to_owned(),
            self.plan.candidates[self.current].id().to_owned(),
            self.attempts,
            self.failovers,
            source,
        ))
    }
}

/// Whether a retry layer below already retried this answer and gave up on it (its
/// [`RetryInfo`] says the attempts, the deadline or the budget ran out): waiting more on this
/// model is what it just did, so the request moves on.
fn retried_below(extensions: &Extensions) -> bool {
    extensions.get::<RetryInfo>().is_some_and(|info| {
        matches!(
            info.outcome(),
            RetryOutcome::Exhausted
                | RetryOutcome::DeadlineExceeded
                | RetryOutcome::BudgetExhausted
                | RetryOutcome::WaitTooLong
        )
    })
}
