//! Which outcomes are retried: the [`Policy`] trait, its default ([`Transient`]: today's
//! rules), and combinators ([`PolicyExt`]).
//!
//! The default, for an HTTP response, in order:
//!
//! 1. 2xx is a success (for a stream, see the held-back stream in the [module docs](super)).
//! 2. A 429 whose error envelope says `enforced_spend_limit_reached` is the monthly spend cap:
//!    never retried, whatever the headers say; the layer fails at once with
//!    [`RetryErrorKind::SpendLimit`](super::RetryErrorKind::SpendLimit).
//! 3. `x-should-retry: true` / `false`, when present, decides.
//! 4. Otherwise 408, 409, 429, 500, 502, 503, 504 and 529 are retried; every other status
//!    (400, 401, 403, 404, 413, ...) is returned as it is.
//!
//! An inner service error (connection refused or reset, a timeout before any response byte)
//! is retried, except the errors no wait can cure: a key pool with no key left, a request
//! larger than a whole minute of quota, a request body over the limit.
//! Those fail at once. A mid-stream `event: error` received before any content was forwarded is
//! retried when its error type is transient (`overloaded_error`, `api_error`, ...).
//!
//! # Your own policy
//!
//! A [`Policy`] decides steps 3 and 4, stream errors and inner errors: it sees each failed
//! [`Attempt`] (a non-2xx status and its headers before the body is read, an `event: error`
//! of a held-back stream, or an inner service error) with the request ([`RequestMeta`], its
//! headers) and answers [`Action::Retry`] or [`Action::Return`]. Two rules stay the layer's,
//! because they are protocol facts rather than taste: the spend cap (step 2) is never
//! retried, and an answer a key pool below marks [`RetrySooner`](super::RetrySooner) (another
//! key can take the request) is always retried. The attempts, the deadline and the budget
//! bound every policy.
//!
//! Modelled on `tower_http::follow_redirect::policy`: object-safe (a layer stores it as
//! `Arc<dyn Policy>`), composed with [`and`](PolicyExt::and), [`or`](PolicyExt::or) and
//! [`never_for`](PolicyExt::never_for), or written as a closure with [`policy_fn`].
//!
//! ```
//! use tower_claude::retry::{Action, PolicyExt, RetryLayer, Transient, policy_fn};
//!
//! // Today's rules, but never retry a 500 (our upstream's 500s are deterministic), and never
//! // retry Opus requests at all.
//! let no_500 = policy_fn(|a| {
//!     if a.status().is_some_and(|s| s == 500) { Action::Return } else { Action::Retry }
//! });
//! let layer = RetryLayer::new().policy(Transient.and(no_500).never_for(["claude-opus-4-7"]));
//! # drop(layer);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, LazyLock};

use http::{HeaderMap, StatusCode};

use crate::BoxError;
use crate::anthropic::{ApiError, ApiErrorKind, RequestMeta, should_retry};
use crate::body::{BufferBodyError, BufferBodyErrorKind};
use crate::key_pool::KeyPoolError;
use crate::quota::{AcquireError, AcquireErrorKind};

/// What a [`Policy`] says about a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Try again (within the attempts, the deadline and the budget).
    Retry,
    /// Return this outcome to the caller as it is.
    Return,
}

/// What failed.
#[derive(Debug, Clone, Copy)]
enum What<'a> {
    Status(StatusCode, &'a HeaderMap),
    Stream(&'a ApiError),
    Error(&'a BoxError),
}

/// One failed attempt, as a [`Policy`] sees it: a non-2xx response (status and headers, before
/// its body is read), an `event: error` in a held-back 2xx stream, or an inner service error.
///
/// Build one with [`Attempt::response`], [`Attempt::stream_error`] or [`Attempt::error`] to
/// unit-test a policy in isolation.
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
/// use tower_claude::retry::{Action, Attempt, Policy, Transient};
///
/// let meta = RequestMeta::scan(br#"{"model":"claude-haiku-4-5","max_tokens":8}"#).unwrap();
/// let headers = http::HeaderMap::new();
/// let overloaded = Attempt::response(&meta, 1, http::StatusCode::from_u16(529).unwrap(), &headers);
/// assert_eq!(overloaded.model(), "claude-haiku-4-5");
/// assert_eq!(Transient.classify(&overloaded), Action::Retry);
/// let bad = Attempt::response(&meta, 1, http::StatusCode::BAD_REQUEST, &headers);
/// assert_eq!(Transient.classify(&bad), Action::Return);
/// ```
#[derive(Clone, Copy)]
pub struct Attempt<'a> {
    request: &'a RequestMeta,
    request_headers: &'a HeaderMap,
    number: u32,
    what: What<'a>,
}

static NO_HEADERS: LazyLock<HeaderMap> = LazyLock::new(HeaderMap::new);

impl fmt::Debug for Attempt<'_> {
    /// The request headers are left out: they carry the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("model", &self.model())
            .field("number", &self.number)
            .field("status", &self.status())
            .field("stream_error", &self.stream_error_event())
            .field("inner_error", &self.inner_error().map(ToString::to_string))
            .finish_non_exhaustive()
    }
}

impl<'a> Attempt<'a> {
    /// Attempt `number` (1: the first) of the request scanned as `request` was answered with
    /// a non-2xx `status` and `headers`.
    pub fn response(
        request: &'a RequestMeta,
        number: u32,
        status: StatusCode,
        headers: &'a HeaderMap,
    ) -> Self {
        Self::new(request, number, What::Status(status, headers))
    }

    /// Attempt `number` streamed `event: error` with `error` before any content.
    pub fn stream_error(request: &'a RequestMeta, number: u32, error: &'a ApiError) -> Self {
        Self::new(request, number, What::Stream(error))
    }

    /// Attempt `number` failed in the inner service with `error` (no response).
    pub fn error(request: &'a RequestMeta, number: u32, error: &'a BoxError) -> Self {
        Self::new(request, number, What::Error(error))
    }

    fn new(request: &'a RequestMeta, number: u32, what: What<'a>) -> Self {
        Self {
            request,
            request_headers: &NO_HEADERS,
            number,
            what,
        }
    }

    /// The same attempt, with the request's headers.
    pub fn with_request_headers(mut self, headers: &'a HeaderMap) -> Self {
        self.request_headers = headers;
        self
    }

    /// The request, as scanned once.
    pub fn request(&self) -> &'a RequestMeta {
        self.request
    }

    /// The request's `model` (empty when it has none).
    pub fn model(&self) -> &'a str {
        self.request.model.as_deref().unwrap_or_default()
    }

    /// The request's headers (`x-api-key` included: never log them).
    pub fn request_headers(&self) -> &'a HeaderMap {
        self.request_headers
    }

    /// Which attempt failed (1: the first).
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The response status: the non-2xx status, or 200 for a stream error. `None` for an
    /// inner service error.
    pub fn status(&self) -> Option<StatusCode> {
        match self.what {
            What::Status(status, _) => Some(status),
            What::Stream(_) => Some(StatusCode::OK),
            What::Error(_) => None,
        }
    }

    /// The response headers (`None` for a stream error or an inner service error).
    pub fn response_headers(&self) -> Option<&'a HeaderMap> {
        match self.what {
            What::Status(_, headers) => Some(headers),
            _ => None,
        }
    }

    /// The `event: error` of a held-back stream.
    pub fn stream_error_event(&self) -> Option<&'a ApiError> {
        match self.what {
            What::Stream(error) => Some(error),
            _ => None,
        }
    }

    /// The inner service error.
    pub fn inner_error(&self) -> Option<&'a BoxError> {
        match self.what {
            What::Error(error) => Some(error),
            _ => None,
        }
    }
}

/// Decides whether a failed attempt is retried. See the [module docs](self).
///
/// Object-safe: a layer stores it as `Arc<dyn Policy>`. Implement it for your own type, or
/// use [`policy_fn`] for a closure; compose with [`PolicyExt`].
///
/// ```
/// use tower_claude::retry::{Action, Attempt, Policy, RetryLayer, Transient};
///
/// /// Today's rules, except that a 529 is retried only twice: after that our batch job
/// /// would rather put the task back in its own queue.
/// struct FewOverloadedRetries;
///
/// impl Policy for FewOverloadedRetries {
///     fn classify(&self, attempt: &Attempt<'_>) -> Action {
///         let overloaded = attempt.status().is_some_and(|s| s.as_u16() == 529);
///         if overloaded && attempt.number() > 2 {
///             return Action::Return;
///         }
///         Transient.classify(attempt)
///     }
/// }
///
/// let layer = RetryLayer::new().policy(FewOverloadedRetries);
/// # drop(layer);
/// ```
pub trait Policy: Send + Sync {
    /// Whether `attempt` is retried.
    fn classify(&self, attempt: &Attempt<'_>) -> Action;
}

impl<P: Policy + ?Sized> Policy for &P {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        (**self).classify(attempt)
    }
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        (**self).classify(attempt)
    }
}

impl<P: Policy + ?Sized> Policy for Arc<P> {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        (**self).classify(attempt)
    }
}

/// The default policy (the rules of the [module docs](self)): `x-should-retry` decides first;
/// else 408, 409, 429, 500, 502, 503, 504 and 529 are retried; a stream's `event: error` is
/// retried when its type is transient; every inner service error is retried but those no
/// wait can cure (a key pool with no key left, a rate limiter's
/// [`RequestTooLarge`](crate::quota::AcquireErrorKind::RequestTooLarge), a request body over
/// the size limit).
///
/// ```
/// use tower_claude::anthropic::RequestMeta;
/// use tower_claude::retry::{Action, Attempt, Policy, Transient};
///
/// let meta = RequestMeta::default();
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-should-retry", "false".parse().unwrap());
/// let refused = Attempt::response(&meta, 1, http::StatusCode::TOO_MANY_REQUESTS, &headers);
/// assert_eq!(Transient.classify(&refused), Action::Return);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transient;

impl Policy for Transient {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        let retry = match attempt.what {
            What::Status(status, headers) => {
                status_verdict(status, headers) == StatusVerdict::Retry
            }
            What::Stream(error) => error.kind().is_retryable(),
            What::Error(error) => !is_permanent(error),
        };
        if retry { Action::Retry } else { Action::Return }
    }
}

/// A [`Policy`] from a closure; see [`policy_fn`].
#[derive(Clone, Copy)]
pub struct PolicyFn<F> {
    f: F,
}

impl<F> fmt::Debug for PolicyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyFn").finish_non_exhaustive()
    }
}

/// A policy from a closure `Fn(&Attempt) -> Action`.
///
/// ```
/// use tower_claude::retry::{Action, PolicyExt, Transient, policy_fn};
///
/// // Do not retry errors from an inner timeout layer.
/// let policy = Transient.and(policy_fn(|a| match a.inner_error() {
///     Some(e) if e.is::<tower::timeout::error::Elapsed>() => Action::Return,
///     _ => Action::Retry,
/// }));
/// # drop(policy);
/// ```
pub fn policy_fn<F>(f: F) -> PolicyFn<F>
where
    F: Fn(&Attempt<'_>) -> Action + Send + Sync,
{
    PolicyFn { f }
}

impl<F> Policy for PolicyFn<F>
where
    F: Fn(&Attempt<'_>) -> Action + Send + Sync,
{
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        (self.f)(attempt)
    }
}

/// Retries only when both policies retry. See [`PolicyExt::and`].
#[derive(Debug, Clone, Copy)]
pub struct And<A, B> {
    a: A,
    b: B,
}

impl<A: Policy, B: Policy> Policy for And<A, B> {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        match self.a.classify(attempt) {
            Action::Retry => self.b.classify(attempt),
            Action::Return => Action::Return,
        }
    }
}

/// Retries when either policy retries. See [`PolicyExt::or`].
#[derive(Debug, Clone, Copy)]
pub struct Or<A, B> {
    a: A,
    b: B,
}

impl<A: Policy, B: Policy> Policy for Or<A, B> {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        match self.a.classify(attempt) {
            Action::Retry => Action::Retry,
            Action::Return => self.b.classify(attempt),
        }
    }
}

/// Never retries requests for the listed models. See [`PolicyExt::never_for`].
#[derive(Debug, Clone)]
pub struct NeverFor<P> {
    inner: P,
    models: Vec<String>,
}

impl<P: Policy> Policy for NeverFor<P> {
    fn classify(&self, attempt: &Attempt<'_>) -> Action {
        if self.models.iter().any(|m| m == attempt.model()) {
            Action::Return
        } else {
            self.inner.classify(attempt)
        }
    }
}

/// Combinators for every [`Policy`].
pub trait PolicyExt: Policy + Sized {
    /// Retries only when both `self` and `other` retry (`other` is asked only when `self`
    /// retries).
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::retry::{Action, Attempt, Policy, PolicyExt, Transient, policy_fn};
    ///
    /// let first_only = policy_fn(|a| if a.number() < 2 { Action::Retry } else { Action::Return });
    /// let policy = Transient.and(first_only);
    /// let meta = RequestMeta::default();
    /// let h = http::HeaderMap::new();
    /// let s = http::StatusCode::SERVICE_UNAVAILABLE;
    /// assert_eq!(policy.classify(&Attempt::response(&meta, 1, s, &h)), Action::Retry);
    /// assert_eq!(policy.classify(&Attempt::response(&meta, 2, s, &h)), Action::Return);
    /// ```
    fn and<B: Policy>(self, other: B) -> And<Self, B> {
        And { a: self, b: other }
    }

    /// Retries when `self` or `other` retries (`other` is asked only when `self` returns).
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::retry::{Action, Attempt, Policy, PolicyExt, Transient, policy_fn};
    ///
    /// // Our gateway answers 425 Too Early while it warms up: retry that too.
    /// let too_early = policy_fn(|a| {
    ///     if a.status().is_some_and(|s| s.as_u16() == 425) { Action::Retry } else { Action::Return }
    /// });
    /// let policy = Transient.or(too_early);
    /// let meta = RequestMeta::default();
    /// let h = http::HeaderMap::new();
    /// let s = http::StatusCode::from_u16(425).unwrap();
    /// assert_eq!(policy.classify(&Attempt::response(&meta, 1, s, &h)), Action::Retry);
    /// ```
    fn or<B: Policy>(self, other: B) -> Or<Self, B> {
        Or { a: self, b: other }
    }

    /// Never retries a request for one of `models`; other requests are decided by `self`.
    ///
    /// ```
    /// use tower_claude::anthropic::RequestMeta;
    /// use tower_claude::retry::{Action, Attempt, Policy, PolicyExt, Transient};
    ///
    /// let policy = Transient.never_for(["claude-opus-4-7"]);
    /// let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
    /// let h = http::HeaderMap::new();
    /// let s = http::StatusCode::from_u16(529).unwrap();
    /// assert_eq!(policy.classify(&Attempt::response(&meta, 1, s, &h)), Action::Return);
    /// ```
    fn never_for<I, T>(self, models: I) -> NeverFor<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        NeverFor {
            inner: self,
            models: models.into_iter().map(Into::into).collect(),
        }
    }
}

impl<P: Policy> PolicyExt for P {}

/// The policy a layer holds: shared, with a `Debug` that names no closure.
#[derive(Clone)]
pub(crate) struct SharedPolicy(pub(crate) Arc<dyn Policy>);

impl fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Policy")
    }
}

impl Default for SharedPolicy {
    fn default() -> Self {
        Self(Arc::new(Transient))
    }
}

/// Whether an inner service error (or any error in its source chain) is one that no retry can
/// cure, so that the layer fails at once instead of spending its attempts and the caller's
/// time: every key of a pool is out of rotation (the docs promise "fail at once"), a request
/// costs more than a whole bucket of a configured limit, or a request body over the size
/// limit.
pub(crate) fn is_permanent(err: &BoxError) -> bool {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err.as_ref());
    while let Some(e) = current {
        if e.downcast_ref::<KeyPoolError>().is_some() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<AcquireError>() {
            return e.kind() == AcquireErrorKind::RequestTooLarge;
        }
        if let Some(e) = e.downcast_ref::<BufferBodyError>() {
            return e.kind() == BufferBodyErrorKind::TooLarge;
        }
        current = e.source();
    }
    false
}

/// What to do with a non-2xx response before looking at its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusVerdict {
    /// Transient: buffer the (small) error body, then retry.
    Retry,
    /// Final: return the response untouched.
    Stop,
}

/// The statuses retried when the server does not say otherwise.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        408 | 409 | 429 | 500 | 502 | 503 | 504 | 529
    )
}

/// The verdict for a non-2xx response from its status and headers.
pub(crate) fn status_verdict(status: StatusCode, headers: &HeaderMap) -> StatusVerdict {
    match should_retry(headers) {
        Some(true) => StatusVerdict::Retry,
        Some(false) => StatusVerdict::Stop,
        None if is_retryable_status(status) => StatusVerdict::Retry,
        None => StatusVerdict::Stop,
    }
}

/// Whether the body of a response with `status` must be read to classify it: every 429 and
/// 400 (either may be a spend cap, which `x-should-retry` does not override; see
/// [`ApiError::from_response`]).
pub(crate) fn needs_body(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::BAD_REQUEST
}

/// Whether an error is the monthly spend cap.
pub(crate) fn is_spend_cap(err: &ApiError) -> bool {
    err.kind() == ApiErrorKind::SpendLimit
        || err.error_code() == Some("enforced_spend_limit_reached")
}

/// Whether a 429 is a rate limit (the kind that raises the key / group penalty).
pub(crate) fn is_rate_limit(status: StatusCode, err: Option<&ApiError>) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS && !err.is_some_and(is_spend_cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn transient_statuses_are_retried() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(status_verdict(status, &h(&[])), StatusVerdict::Retry, "{s}");
        }
    }

    #[test]
    fn client_errors_are_never_retried() {
        for s in [400, 401, 402, 403, 404, 413, 422, 501] {
            let status = StatusCode::from_u16(s).unwrap();
            assert_eq!(status_verdict(status, &h(&[])), StatusVerdict::Stop, "{s}");
        }
    }

    #[test]
    fn x_should_retry_decides_first() {
        let yes = h(&[("x-should-retry", "true")]);
        let no = h(&[("x-should-retry", "false")]);
        assert_eq!(
            status_verdict(StatusCode::BAD_REQUEST, &yes),
            StatusVerdict::Retry
        );
        assert_eq!(
            status_verdict(StatusCode::from_u16(529).unwrap(), &no),
            StatusVerdict::Stop
        );
        assert_eq!(
            status_verdict(StatusCode::TOO_MANY_REQUESTS, &no),
            StatusVerdict::Stop
        );
    }

    #[test]
    fn spend_cap_is_recognised() {
        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"spend cap","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
        assert!(is_spend_cap(&err));
        assert!(!is_rate_limit(StatusCode::TOO_MANY_REQUESTS, Some(&err)));
        assert!(needs_body(StatusCode::TOO_MANY_REQUESTS));

        let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
        let err = ApiError::from_response(StatusCode::TOO_MANY_REQUESTS, body);
        assert!(!is_spend_cap(&err));
        assert!(is_rate_limit(StatusCode::TOO_MANY_REQUESTS, Some(&err)));
    }

    #[test]
    fn combinators_and_inner_errors() {
        let meta = RequestMeta::scan(br#"{"model":"claude-opus-4-7","max_tokens":8}"#).unwrap();
        let err: BoxError = "reset".into();
        let failed = Attempt::error(&meta, 1, &err);
        assert_eq!(Transient.classify(&failed), Action::Retry);
        assert_eq!(failed.status(), None);
        let never = policy_fn(|_| Action::Return);
        let always = policy_fn(|_| Action::Retry);
        assert_eq!(Transient.and(never).classify(&failed), Action::Return);
        assert_eq!(never.or(always).classify(&failed), Action::Retry);
        assert_eq!(never.or(never).classify(&failed), Action::Return);
        assert_eq!(
            always.never_for(["claude-opus-4-7"]).classify(&failed),
            Action::Return
        );
        assert_eq!(
            always.never_for(["claude-haiku-4-5"]).classify(&failed),
            Action::Retry
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", "sk-ant-secret".parse().unwrap());
        let shown = format!("{:?}", failed.with_request_headers(&headers));
        assert!(
            !shown.contains("sk-ant-secret") && shown.contains("reset"),
            "{shown}"
        );
        let boxed: Arc<dyn Policy> = Arc::new(Box::new(Transient) as Box<dyn Policy>);
        assert_eq!(boxed.classify(&failed), Action::Retry);
    }

    /// A request larger than a minute of quota used to be retried 8 times, sleeping through
    /// the whole backoff, before failing with the same error.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_fits_is_not_retried() {
        use crate::anthropic::RateLimitGroup;
        use crate::quota::{AcquireErrorKind, Limits};
        use crate::rate_limit::RateLimitLayer;
        use crate::retry::{RetryError, RetryErrorKind, RetryLayer};
        use tower::{ServiceBuilder, ServiceExt};

        let upstream = tower::service_fn(|_req: http::Request<crate::body::RequestBody>| async {
            Ok::<_, BoxError>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"{}"),
            )))
        });
        let svc = ServiceBuilder::new()
            .layer(RetryLayer::new().seed(1))
            .layer(RateLimitLayer::new().limits(
                RateLimitGroup::new("claude-haiku-4-5"),
                Limits::new(50, 100, 1_000),
            ))
            .service(upstream);
        // About 2,500 input tokens against a limit of 100 a minute.
        let body = format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "word ".repeat(2_000)
        );
        let req = http::Request::post("/v1/messages")
            .header("x-api-key", "sk-ant-test")
            .body(crate::body::RequestBody::from(body))
            .unwrap();
        let start = tokio::time::Instant::now();
        let err = svc.oneshot(req).await.unwrap_err();
        let retry = err.downcast_ref::<RetryError>().expect("a RetryError");
        assert_eq!(retry.kind(), RetryErrorKind::Inner);
        assert_eq!(retry.attempts(), 1);
        let acquire = std::error::Error::source(retry)
            .and_then(|e| e.downcast_ref::<crate::quota::AcquireError>())
            .expect("the limiter's error");
        assert_eq!(acquire.kind(), AcquireErrorKind::RequestTooLarge);
        assert_eq!(
            start.elapsed(),
            std::time::Duration::ZERO,
            "no backoff slept"
        );
    }

    #[test]
    fn stream_errors_are_retried_only_when_transient() {
        let overloaded = ApiError::from_sse_data(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )
        .unwrap();
        let meta = RequestMeta::default();
        let stream = |e| Transient.classify(&Attempt::stream_error(&meta, 1, e));
        assert_eq!(stream(&overloaded), Action::Retry);
        let invalid = ApiError::from_sse_data(
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#,
        )
        .unwrap();
        assert_eq!(stream(&invalid), Action::Return);
    }
}
